// A browser's own EventSource, with no client code, against a real daemon through
// a proxy the test can cut: 1000 messages on three channels in order; after a cut,
// the browser's reconnect (Last-Event-ID) resumes every channel with nothing lost
// or doubled; after a daemon restart, the channels' new epochs are told
// (recovered: false, reason epoch). And wss:// and SSE over https:// in Chromium.

import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { mkdtemp, rm } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { after, before, describe, test } from "node:test";

import { Daemon, Proxy, StaticServer, launchChromium } from "./harness.js";

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..", "..", "..");
const range = (from, to) => Array.from({ length: to - from + 1 }, (_, i) => from + i);
const CHANNELS = ["a", "b", "c"];

const PAGE = `<!doctype html><meta charset="utf-8"><title>EventSource</title>
<script>
  const stream = new URLSearchParams(location.search).get("stream");
  window.got = { a: [], b: [], c: [] };
  window.subscribed = [];
  window.errors = 0;
  window.es = new EventSource(stream);
  es.onmessage = (e) => { const m = JSON.parse(e.data); window.got[m.channel].push(m.data); };
  es.addEventListener("subscribed", (e) => window.subscribed.push(JSON.parse(e.data)));
  es.onerror = () => { window.errors++; };
</script>`;

describe("EventSource in Chromium", { timeout: 120000 }, () => {
  let daemon;
  let proxy;
  let site;
  let browser;
  let page;
  const waitInPage = (fn, arg) => page.waitForFunction(fn, arg, { timeout: 30000, polling: 20 });
  const got = () => page.evaluate(() => window.got);
  const counts = (want) =>
    waitInPage((w) => Object.entries(w).every(([c, n]) => window.got[c].length >= n), want);

  before(async () => {
    daemon = await new Daemon({ args: ["--history-size", "1000"] }).start();
    proxy = await new Proxy(daemon.wsPort).start();
    site = await new StaticServer({ "/es.html": PAGE }).start();
    browser = await launchChromium();
    page = browser.context.pages()[0] ?? (await browser.context.newPage());
    const query = CHANNELS.map((c) => `channel=${c}`).join("&");
    const stream = `${proxy.url.replace("ws://", "http://")}?${query}`;
    await page.goto(site.url(`/es.html?${new URLSearchParams({ stream })}`));
    await waitInPage(() => window.subscribed.length === 3);
  });

  after(async () => {
    await browser?.close();
    await site?.stop();
    await proxy?.stop();
    await daemon?.stop();
  });

  test("receives 1000 messages on three channels in order", async () => {
    await daemon.publishMany("a", range(1, 400));
    await daemon.publishMany("b", range(1, 350));
    await daemon.publishMany("c", range(1, 250));
    await counts({ a: 400, b: 350, c: 250 });
    assert.deepEqual(await got(), { a: range(1, 400), b: range(1, 350), c: range(1, 250) });
  });

  test("resumes every channel of the stream after a cut", async () => {
    proxy.block();
    await waitInPage(() => window.errors > 0);
    await daemon.publishMany("a", range(401, 450));
    await daemon.publishMany("c", range(251, 300));
    proxy.unblock();
    await daemon.publishMany("b", range(351, 360)); // live, once the stream is back
    await counts({ a: 450, b: 360, c: 300 });
    assert.deepEqual(await got(), { a: range(1, 450), b: range(1, 360), c: range(1, 300) });
    const resumed = (await page.evaluate(() => window.subscribed)).slice(3);
    assert.deepEqual(resumed.map((s) => [s.channel, s.recovered]), CHANNELS.map((c) => [c, true]));
  });

  test("is told the channels began again after a daemon restart", async () => {
    const before = await page.evaluate(() => window.subscribed.length);
    await daemon.stop();
    daemon = await new Daemon({ wsPort: daemon.wsPort, args: ["--history-size", "1000"] }).start();
    await waitInPage((n) => window.subscribed.length >= n + 3, before);
    const restarted = (await page.evaluate(() => window.subscribed)).slice(before);
    assert.deepEqual(
      restarted.map((s) => [s.channel, s.recovered, s.reason]),
      CHANNELS.map((c) => [c, false, "epoch"]),
    );
    await daemon.publishMany("a", ["after"]);
    await waitInPage(() => window.got.a.at(-1) === "after");
  });
});

describe("wss:// and SSE over https:// in Chromium", { timeout: 90000 }, () => {
  let folder;
  let daemon;
  let site;
  let browser;
  let page;

  before(async () => {
    folder = await mkdtemp(path.join(os.tmpdir(), "broadcastd-tls-"));
    const made = execFileSync(
      path.join(ROOT, ".venv", "bin", "python"),
      ["-c", "import sys; from pathlib import Path; from tests.certs import self_signed; " +
        "print(*self_signed(Path(sys.argv[1]), 'chromium'))", folder],
      { cwd: ROOT, encoding: "utf8" },
    );
    const [cert, key] = made.trim().split(" ");
    daemon = await new Daemon({
      env: { BROADCASTD_WS__TLS_CERT_FILE: cert, BROADCASTD_WS__TLS_KEY_FILE: key },
    }).start();
    site = await new StaticServer({ "/blank.html": "<!doctype html><title>tls</title>" }).start();
    browser = await launchChromium(["--ignore-certificate-errors"]); // the test's own certificate
    page = browser.context.pages()[0] ?? (await browser.context.newPage());
    await page.goto(site.url("/blank.html"));
  });

  after(async () => {
    await browser?.close();
    await site?.stop();
    await daemon?.stop();
    if (folder) await rm(folder, { recursive: true, force: true });
  });

  test("a WebSocket and an EventSource receive over TLS", async () => {
    const port = daemon.wsPort;
    await page.evaluate((p) => {
      window.tls = { ws: [], sse: [], open: 0 };
      const ws = new WebSocket(`wss://127.0.0.1:${p}/?channel=t`);
      ws.onmessage = (e) => {
        const m = JSON.parse(e.data);
        if (m.type === "subscribed") window.tls.open++;
        else window.tls.ws.push(m.data);
      };
      const es = new EventSource(`https://127.0.0.1:${p}/?channel=t`);
      es.addEventListener("subscribed", () => window.tls.open++);
      es.onmessage = (e) => window.tls.sse.push(JSON.parse(e.data).data);
    }, port);
    await page.waitForFunction(() => window.tls.open === 2, null, { timeout: 30000 });
    await daemon.publishMany("t", range(1, 20));
    await page.waitForFunction(
      () => window.tls.ws.length === 20 && window.tls.sse.length === 20,
      null,
      { timeout: 30000 },
    );
    assert.deepEqual(await page.evaluate(() => window.tls), { ws: range(1, 20), sse: range(1, 20), open: 2 });
  });
});
