// The client in headless Chromium behind a proxy that refuses WebSocket upgrades:
// it falls back to Server-Sent Events by itself, says so, and loses nothing when
// the stream is cut mid-flow.

import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";

import { Daemon, Proxy, StaticServer, launchChromium } from "./harness.js";

const range = (from, to) => Array.from({ length: to - from + 1 }, (_, i) => from + i);

const PAGE = `<!doctype html><meta charset="utf-8"><title>fallback</title>
<script type="module">
  import { BroadcastClient } from "/clients/js/src/index.js";
  const url = new URLSearchParams(location.search).get("url");
  const client = new BroadcastClient(url, { minBackoff: 20, maxBackoff: 200 });
  window.got = { a: [], b: [] };
  window.recoveries = [];
  window.states = [];
  window.client = client;
  client.on("state", (state, detail) => window.states.push([state, detail?.transport]));
  for (const channel of ["a", "b"]) {
    const sub = client.subscribe(channel);
    sub.on("message", (m) => window.got[channel].push(m.data));
    sub.on("recovered", (r) => window.recoveries.push([r.channel, r.recovered]));
  }
  client.connect();
</script>`;

describe("the client in Chromium behind a proxy that refuses WebSocket", { timeout: 90000 }, () => {
  let daemon;
  let proxy;
  let site;
  let browser;
  let page;
  const pageErrors = [];
  const waitInPage = (fn, arg) => page.waitForFunction(fn, arg, { timeout: 30000, polling: 20 });

  before(async () => {
    daemon = await new Daemon({ args: ["--history-size", "1000"] }).start();
    proxy = await new Proxy(daemon.wsPort, { refuseUpgrades: true }).start();
    site = await new StaticServer({ "/fallback.html": PAGE }).start();
    browser = await launchChromium();
    page = browser.context.pages()[0] ?? (await browser.context.newPage());
    page.on("pageerror", (error) => pageErrors.push(String(error)));
    await page.goto(site.url(`/fallback.html?${new URLSearchParams({ url: proxy.url })}`));
    await waitInPage(() => window.client.getSubscription("b")?.state === "subscribed");
  });

  after(async () => {
    await browser?.close();
    await site?.stop();
    await proxy?.stop();
    await daemon?.stop();
  });

  test("lands on SSE and resumes both channels after a cut with nothing lost", async () => {
    assert.equal(await page.evaluate(() => window.client.transport), "sse");
    assert.ok(proxy.refused >= 2, `upgrades refused: ${proxy.refused}`);
    const states = await page.evaluate(() => window.states);
    assert.deepEqual(states.at(-1), ["connected", "sse"]);

    await daemon.publishMany("a", range(1, 300), 100);
    await daemon.publishMany("b", range(1, 200), 100);
    await waitInPage(() => window.got.a.length === 300 && window.got.b.length === 200);
    proxy.block();
    await waitInPage(() => window.client.state !== "connected");
    await daemon.publishMany("a", range(301, 500), 100);
    await daemon.publishMany("b", range(201, 250), 100);
    proxy.unblock();
    await waitInPage(() => window.got.a.length >= 500 && window.got.b.length >= 250);
    await daemon.publish("a", 501);
    await waitInPage(() => window.got.a.length >= 501);
    const got = await page.evaluate(() => window.got);
    assert.deepEqual(got.a, range(1, 501));
    assert.deepEqual(got.b, range(1, 250));
    const recoveries = await page.evaluate(() => window.recoveries);
    assert.deepEqual(recoveries.sort(), [["a", true], ["b", true]]);
    assert.equal(await page.evaluate(() => window.client.transport), "sse");
    assert.deepEqual(pageErrors, []);
  });
});
