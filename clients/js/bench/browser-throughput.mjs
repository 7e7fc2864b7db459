// One-off measurement, not part of CI: 100,000 messages to headless Chromium.
//   npm run bench:browser [-- --messages 100000 --rounds 2]
//
// 1. End to end. A daemon (its outbox raised so that the browser is never cut
//    as a slow consumer) publishes MESSAGES messages, in /batch requests of
//    1000 prepared beforehand, to a page that counts them: with this client,
//    and with a bare WebSocket + JSON.parse (the floor), alternating, ROUNDS
//    times each. Measured: the wall time from the first publish to the last
//    message in the page; the time spent in the page's onmessage handler (the
//    WebSocket class is wrapped to time it, in both modes alike); the JS heap
//    (CDP Runtime.getHeapUsage) after a GC before, at its highest during
//    (sampled every 50 ms), and after a GC at the end.
// 2. In the page alone. The same MESSAGES frames, as strings made beforehand,
//    fed to the client's handler through a stand-in WebSocket, and to a bare
//    handler: the client's own cost per message, with no network in the way.

import { parseArgs } from "node:util";

import { Daemon, StaticServer, launchChromium } from "../test/harness.js";

const { values } = parseArgs({
  options: {
    messages: { type: "string", default: "100000" },
    rounds: { type: "string", default: "2" },
  },
});
const MESSAGES = Number(values.messages);
const ROUNDS = Number(values.rounds);
const BATCH = 1000;

const PAGE = `<!doctype html><meta charset="utf-8"><title>bench</title>
<script type="module">
import { BroadcastClient } from "/clients/js/src/index.js";

const params = new URLSearchParams(location.search);
const bench = window.bench = { ready: false, count: 0, last: 0, outOfOrder: 0, target: 0, handlerMs: 0 };
let finish;
bench.finished = new Promise((resolve) => { finish = resolve; });
function count(offset) {
  if (offset !== bench.last + 1) bench.outOfOrder++;
  bench.last = offset;
  if (++bench.count === bench.target) finish();
}

// The browser's WebSocket, with the time spent in onmessage added up.
class TimedWebSocket extends WebSocket {
  set onmessage(handler) {
    super.onmessage = (event) => {
      const start = performance.now();
      handler(event);
      bench.handlerMs += performance.now() - start;
    };
  }
}

function connect(mode, url, channel) {
  if (mode === "client") {
    const client = new BroadcastClient(url, { pingInterval: 0, WebSocket: TimedWebSocket });
    const sub = client.subscribe(channel);
    sub.on("subscribed", () => { bench.ready = true; });
    sub.on("message", (message) => count(message.offset));
    client.connect();
  } else {
    const ws = new TimedWebSocket(url + "?channel=" + channel);
    ws.onmessage = (event) => {
      const frame = JSON.parse(event.data);
      if (frame.type === undefined) count(frame.offset);
      else if (frame.type === "subscribed") bench.ready = true;
    };
  }
}

// In the page alone: frames made beforehand, fed to a handler in a loop.
window.local = (mode, n) => {
  const frames = [];
  for (let i = 1; i <= n; i++) {
    frames.push(JSON.stringify({ channel: "local", offset: i,
      data: { n: i, symbol: "EURUSD", price: 1.0842, ts: 1767225600123 } }));
  }
  let handler;
  let socket;
  class Standin {
    constructor() { this.readyState = 0; socket = this; }
    send() {}
    close() {}
    set onmessage(h) { handler = h; }
  }
  let seen = 0;
  let last = 0;
  if (mode === "client") {
    const client = new BroadcastClient("ws://localhost/", { pingInterval: 0, WebSocket: Standin });
    client.subscribe("local").on("message", (m) => { seen++; last = m.offset; });
    client.connect();
    socket.readyState = 1;
    socket.onopen({ target: socket });
    handler({ data: JSON.stringify({ type: "subscribed", channel: "local", epoch: "e", offset: 0 }) });
  } else {
    handler = (event) => {
      const frame = JSON.parse(event.data);
      if (frame.type === undefined && frame.channel === "local") { seen++; last = frame.offset; }
    };
  }
  const event = { data: "" }; // one event object for all, as cheap as the harness can make it
  const start = performance.now();
  for (let i = 0; i < n; i++) {
    event.data = frames[i];
    handler(event);
  }
  const ms = performance.now() - start;
  return { ms, seen, last };
};

if (params.get("mode")) connect(params.get("mode"), params.get("url"), params.get("channel"));
</script>`;

const mib = (bytes) => `${(bytes / 1048576).toFixed(2)} MiB`;

function batches(channel) {
  const bodies = [];
  for (let first = 1; first <= MESSAGES; first += BATCH) {
    const items = [];
    for (let n = first; n < first + BATCH && n <= MESSAGES; n++) {
      items.push({ channel, data: { n, symbol: "EURUSD", price: 1.0842, ts: 1767225600123 } });
    }
    bodies.push(JSON.stringify(items));
  }
  return bodies;
}

async function endToEnd(context, site, daemon, mode, round) {
  const page = await context.newPage();
  const cdp = await context.newCDPSession(page);
  const channel = `bench-${mode}-${round}`;
  const bodies = batches(channel);
  const query = new URLSearchParams({ url: daemon.wsUrl, channel, mode });
  await page.goto(site.url(`/bench?${query}`));
  await page.waitForFunction(() => window.bench.ready, null, { polling: 10 });
  await page.evaluate((n) => { window.bench.target = n; }, MESSAGES);
  await cdp.send("HeapProfiler.collectGarbage");
  const before = (await cdp.send("Runtime.getHeapUsage")).usedSize;
  let peak = before;
  let sampling = true;
  const sampler = (async () => {
    while (sampling) {
      peak = Math.max(peak, (await cdp.send("Runtime.getHeapUsage")).usedSize);
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
  })();
  const finished = page.evaluate(() => window.bench.finished);
  const started = performance.now();
  for (const body of bodies) {
    const response = await fetch(`http://127.0.0.1:${daemon.controlPort}/batch`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body,
    });
    if (response.status !== 200) throw new Error(`batch: ${response.status}`);
    await response.arrayBuffer();
  }
  const published = performance.now() - started;
  await finished;
  const wall = performance.now() - started;
  sampling = false;
  await sampler;
  const result = await page.evaluate(() => window.bench);
  await cdp.send("HeapProfiler.collectGarbage");
  const after = (await cdp.send("Runtime.getHeapUsage")).usedSize;
  await page.close();
  return {
    mode,
    wallMs: Math.round(wall),
    publishMs: Math.round(published),
    perSecond: Math.round(MESSAGES / (wall / 1000)),
    handlerMs: Math.round(result.handlerMs),
    usPerMessage: Number(((result.handlerMs * 1000) / MESSAGES).toFixed(2)),
    outOfOrder: result.outOfOrder,
    heapBefore: mib(before),
    heapPeak: mib(peak),
    heapAfterGc: mib(after),
  };
}

async function inPage(context, site, mode) {
  const page = await context.newPage();
  const cdp = await context.newCDPSession(page);
  await page.goto(site.url("/bench"));
  await page.waitForFunction(() => typeof window.local === "function");
  await page.evaluate(() => window.local("client", 10000)); // warm up
  await page.evaluate(() => window.local("bare", 10000));
  await cdp.send("HeapProfiler.collectGarbage");
  const before = (await cdp.send("Runtime.getHeapUsage")).usedSize;
  const result = await page.evaluate(([m, n]) => window.local(m, n), [mode, MESSAGES]);
  await cdp.send("HeapProfiler.collectGarbage");
  const after = (await cdp.send("Runtime.getHeapUsage")).usedSize;
  await page.close();
  if (result.seen !== MESSAGES || result.last !== MESSAGES) throw new Error(JSON.stringify(result));
  return {
    mode: `${mode} (in page)`,
    handlerMs: Math.round(result.ms),
    usPerMessage: Number(((result.ms * 1000) / MESSAGES).toFixed(2)),
    perSecond: Math.round(MESSAGES / (result.ms / 1000)),
    heapBefore: mib(before),
    heapAfterGc: mib(after),
  };
}

const daemon = await new Daemon({
  args: [
    "--history-size", "100",
    "--ws-outbox-messages", String(MESSAGES * 2),
    "--ws-outbox-bytes", String(256 * 1048576),
    "--control-max-batch-items", String(BATCH),
  ],
}).start();
const site = await new StaticServer({ "/bench": PAGE }).start();
const browser = await launchChromium();
const results = [];
try {
  for (let round = 1; round <= ROUNDS; round++) {
    for (const mode of ["client", "bare"]) {
      results.push(await endToEnd(browser.context, site, daemon, mode, round));
      console.log(JSON.stringify(results.at(-1)));
    }
  }
  for (let round = 1; round <= ROUNDS; round++) {
    for (const mode of ["client", "bare"]) {
      results.push(await inPage(browser.context, site, mode));
      console.log(JSON.stringify(results.at(-1)));
    }
  }
} finally {
  await browser.close();
  await site.stop();
  await daemon.stop();
}
console.log(`${MESSAGES} messages; Chromium ${browser.context.browser()?.version() ?? ""}`);
console.table(results);
