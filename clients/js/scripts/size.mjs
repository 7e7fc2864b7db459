// The client's size as a browser gets it: minified (esbuild), then gzip and brotli.
//   npm run size
import { readFile } from "node:fs/promises";
import { brotliCompressSync, gzipSync } from "node:zlib";

import { build } from "esbuild";

const entry = new URL("../src/index.js", import.meta.url).pathname;
const source = await readFile(entry);
const { outputFiles } = await build({
  entryPoints: [entry],
  bundle: true,
  minify: true,
  format: "esm",
  target: "es2020",
  write: false,
});
const minified = outputFiles[0].contents;
const kb = (n) => `${n} B (${(n / 1024).toFixed(2)} KiB)`;
console.log(`source:            ${kb(source.length)}`);
console.log(`minified:          ${kb(minified.length)}`);
console.log(`minified + gzip:   ${kb(gzipSync(minified, { level: 9 }).length)}`);
console.log(`minified + brotli: ${kb(brotliCompressSync(minified).length)}`);
