// examples/browser/index.html in headless Chromium, against a real daemon reached
// through a TCP proxy that the test can cut: order, reconnection after a restart,
// resuming with nothing lost, and recovered: false past the history window; and
// with a token, that the token shows in nothing the page, the proxy or the daemon
// reports, failed reconnections included.

import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";

import { Daemon, Proxy, StaticServer, jwt, launchChromium, recordPage, waitFor } from "./harness.js";

const HISTORY = 100;
const range = (from, to) => Array.from({ length: to - from + 1 }, (_, i) => from + i);

describe("the example page in Chromium", { timeout: 90000 }, () => {
  let daemon;
  let proxy;
  let site;
  let browser;
  let page;
  const pageErrors = [];

  /** What the page saw so far. */
  const seen = () =>
    page.evaluate(() => ({
      offsets: window.demo.offsets,
      datas: window.demo.datas,
      recoveries: window.demo.recoveries,
      state: window.demo.client.state,
    }));
  const waitInPage = (fn, arg) => page.waitForFunction(fn, arg, { timeout: 20000, polling: 20 });
  const disconnected = () => waitInPage(() => window.demo.client.state !== "connected");

  before(async () => {
    daemon = await new Daemon({ args: ["--history-size", String(HISTORY)] }).start();
    proxy = await new Proxy(daemon.wsPort).start();
    site = await new StaticServer().start();
    browser = await launchChromium();
    page = browser.context.pages()[0] ?? (await browser.context.newPage());
    page.on("pageerror", (error) => pageErrors.push(String(error)));
    const query = new URLSearchParams({ channel: "news", url: proxy.url, maxBackoff: "300", record: "1" });
    await page.goto(site.url(`/examples/browser/index.html?${query}`));
    await waitInPage(() => window.demo?.sub.state === "subscribed");
  });

  after(async () => {
    await browser?.close();
    await site?.stop();
    await proxy?.stop();
    await daemon?.stop();
  });

  test("receives 1000 messages in order", async () => {
    await daemon.publishMany("news", range(1, 1000).map((n) => ({ n })), 100);
    await waitInPage(() => window.demo.count === 1000);
    const { offsets, datas } = await seen();
    assert.deepEqual(offsets, range(1, 1000));
    assert.deepEqual(datas, range(1, 1000).map((n) => ({ n })));
    await waitInPage(() => document.getElementById("count").textContent === "1000");
  });

  test("resumes with nothing lost after its connection is cut", async () => {
    proxy.block();
    await disconnected();
    await daemon.publishMany("news", range(1001, 1050).map((n) => ({ n }))); // within history
    proxy.unblock();
    await waitInPage(() => window.demo.count === 1050);
    const { offsets, datas, recoveries, state } = await seen();
    assert.deepEqual(offsets, range(1, 1050));
    assert.deepEqual(datas.slice(1000), range(1001, 1050).map((n) => ({ n })));
    assert.deepEqual(recoveries, [{ recovered: true, offset: 1050 }]);
    assert.equal(state, "connected");
  });

  test("is told recovered: false when the history window is exceeded", async () => {
    proxy.block();
    await disconnected();
    await daemon.publishMany("news", range(1051, 1051 + HISTORY + 49).map((n) => ({ n })));
    proxy.unblock();
    await waitInPage(() => window.demo.recoveries.length === 2);
    const last = 1051 + HISTORY + 49;
    assert.deepEqual((await seen()).recoveries[1], { recovered: false, reason: "too_old", offset: last });
    await daemon.publish("news", { n: last + 1 });
    await waitInPage(() => window.demo.count === 1051);
    assert.deepEqual((await seen()).offsets.slice(-2), [1050, last + 1]);
    assert.match(await page.textContent("#recovery"), /not recovered \(too_old\)/);
  });

  test("survives a daemon restart by itself", async () => {
    await daemon.stop();
    await disconnected();
    daemon = await new Daemon({ wsPort: daemon.wsPort, args: ["--history-size", String(HISTORY)] }).start();
    await waitInPage(() => window.demo.recoveries.length === 3);
    assert.deepEqual((await seen()).recoveries[2], { recovered: false, reason: "epoch", offset: 0 });
    await daemon.publishMany("news", range(1, 10).map((n) => ({ n })));
    await waitInPage(() => window.demo.count === 1061);
    const { offsets, state } = await seen();
    assert.deepEqual(offsets.slice(-11), [1201, ...range(1, 10)]);
    assert.equal(state, "connected");
    assert.equal(await page.textContent("#state"), "connected");
  });

  test("closes with 1000 when the page goes away", async () => {
    await page.goto("about:blank");
    const closed = await daemon.waitForEvent((e) => e.event === "connection.close");
    assert.equal(closed.code, 1000);
    assert.equal(closed.initiator, "client");
    assert.deepEqual(pageErrors, []);
  });
});

describe("the example page with a token, in Chromium", { timeout: 90000 }, () => {
  const secret = "a-test-secret-of-at-least-32-bytes!!";
  const token = jwt(secret, { sub: "alice", channels: ["*"], exp: Math.floor(Date.now() / 1000) + 600 });
  const parts = token.split(".").slice(1); // claims and signature: neither may show anywhere
  const carriesToken = (text) => parts.some((part) => text.includes(part));
  let daemon;
  let proxy;
  let site;
  let browser;
  let page;
  let recorded;
  const pageErrors = [];
  const waitInPage = (fn, arg) => page.waitForFunction(fn, arg, { timeout: 20000, polling: 20 });

  before(async () => {
    daemon = await new Daemon({
      args: ["--history-size", String(HISTORY), "--auth-hmac-secret", secret, "--log-level", "debug"],
    }).start();
    proxy = await new Proxy(daemon.wsPort).start();
    // The page gets its token from its own site, as an application's page would.
    site = await new StaticServer({ "/push-token": { type: "text/plain", body: token } }).start();
    browser = await launchChromium();
    page = browser.context.pages()[0] ?? (await browser.context.newPage());
    page.on("pageerror", (error) => pageErrors.push(String(error)));
    recorded = await recordPage(browser.context, page);
    const query = new URLSearchParams({
      channel: "private:news",
      url: proxy.url,
      tokenUrl: "/push-token",
      maxBackoff: "300",
      record: "1",
    });
    await page.goto(site.url(`/examples/browser/index.html?${query}`));
    await waitInPage(() => window.demo?.sub.state === "subscribed");
  });

  after(async () => {
    await browser?.close();
    await site?.stop();
    await proxy?.stop();
    await daemon?.stop();
  });

  test("failed reconnections print no token, and it resumes with nothing lost", async () => {
    await daemon.publishMany("private:news", range(1, 20));
    await waitInPage(() => window.demo.count === 20);

    proxy.block(); // the connection is cut, and every attempt fails until unblock()
    await waitInPage(() => window.demo.client.state !== "connected");
    await daemon.publishMany("private:news", range(21, 40));
    const failed = (entry) => entry.kind === "Log.entryAdded" && /WebSocket connection to .* failed/.test(entry.text);
    await waitFor(() => recorded.entries.filter(failed).length >= 2, 20000, "failed reconnections in the console");
    proxy.unblock();
    await waitInPage(() => window.demo.count === 40);
    const { offsets, datas, recoveries, state } = await page.evaluate(() => ({
      offsets: window.demo.offsets,
      datas: window.demo.datas,
      recoveries: window.demo.recoveries,
      state: window.demo.client.state,
    }));
    assert.deepEqual(offsets, range(1, 40));
    assert.deepEqual(datas, range(1, 40));
    assert.deepEqual(recoveries, [{ recovered: true, offset: 40 }]);
    assert.equal(state, "connected");

    await page.goto("about:blank"); // the page closes its connection; the daemon logs it
    await daemon.waitForEvent((e) => e.event === "connection.close" && e.code === 1000);
    await daemon.stop(); // everything it had to say is written

    const sockets = recorded.entries.filter((entry) => entry.kind === "Network.webSocketCreated");
    assert.ok(sockets.length >= 3, `WebSockets opened: ${sockets.length}`);
    assert.deepEqual(recorded.entries.filter((entry) => carriesToken(entry.text)), []);
    assert.deepEqual(proxy.requests.filter(carriesToken), []);
    assert.deepEqual(daemon.output().filter(carriesToken), []);
    assert.deepEqual(pageErrors, []);
  });
});
