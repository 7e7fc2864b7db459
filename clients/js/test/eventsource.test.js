// A browser's own EventSource, with no client code, against a real daemon through
// a proxy the test can cut: two channels in one stream, and after a cut the
// browser's reconnect (Last-Event-ID) resumes both with nothing lost or doubled.

import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";

import { Daemon, Proxy, StaticServer, launchChromium } from "./harness.js";

const range = (from, to) => Array.from({ length: to - from + 1 }, (_, i) => from + i);

const PAGE = `<!doctype html><meta charset="utf-8"><title>EventSource</title>
<script>
  const stream = new URLSearchParams(location.search).get("stream");
  window.got = { a: [], b: [] };
  window.subscribed = [];
  window.errors = 0;
  window.es = new EventSource(stream);
  es.onmessage = (e) => { const m = JSON.parse(e.data); window.got[m.channel].push(m.data); };
  es.addEventListener("subscribed", (e) => window.subscribed.push(JSON.parse(e.data)));
  es.onerror = () => { window.errors++; };
</script>`;

describe("EventSource in Chromium", { timeout: 90000 }, () => {
  let daemon;
  let proxy;
  let site;
  let browser;
  let page;
  const waitInPage = (fn, arg) => page.waitForFunction(fn, arg, { timeout: 30000, polling: 20 });

  before(async () => {
    daemon = await new Daemon({ args: ["--history-size", "100"] }).start();
    proxy = await new Proxy(daemon.wsPort).start();
    site = await new StaticServer({ "/es.html": PAGE }).start();
    browser = await launchChromium();
    page = browser.context.pages()[0] ?? (await browser.context.newPage());
    const stream = proxy.url.replace("ws://", "http://") + "?channel=a&channel=b";
    await page.goto(site.url(`/es.html?${new URLSearchParams({ stream })}`));
    await waitInPage(() => window.subscribed.length === 2);
  });

  after(async () => {
    await browser?.close();
    await site?.stop();
    await proxy?.stop();
    await daemon?.stop();
  });

  test("resumes every channel of the stream after a cut", async () => {
    await daemon.publishMany("a", range(1, 50));
    await daemon.publishMany("b", range(1, 40));
    await waitInPage(() => window.got.a.length === 50 && window.got.b.length === 40);
    proxy.block();
    await waitInPage(() => window.errors > 0);
    await daemon.publishMany("a", range(51, 80));
    await daemon.publishMany("b", range(41, 60));
    proxy.unblock();
    await waitInPage(() => window.got.a.length >= 80 && window.got.b.length >= 60);
    const got = await page.evaluate(() => window.got);
    assert.deepEqual(got.a, range(1, 80));
    assert.deepEqual(got.b, range(1, 60));
    const subscribed = await page.evaluate(() => window.subscribed);
    assert.deepEqual(
      subscribed.slice(2).map((s) => [s.channel, s.recovered]),
      [["a", true], ["b", true]],
    );
  });
});
