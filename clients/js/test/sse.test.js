// The client on Server-Sent Events against a real daemon: chosen (`transport: "sse"`)
// or fallen back to (`"auto"`, through a proxy that refuses WebSocket upgrades),
// with the same events as on WebSocket, positions kept across a cut, a stream
// reopened for new channels and a new token, and presence refused.

import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";

import WebSocket from "ws";

import { BroadcastClient, BroadcastError } from "../src/index.js";
import { Daemon, Proxy, Recorder, jwt, waitFor } from "./harness.js";

const range = (from, to) => Array.from({ length: to - from + 1 }, (_, i) => from + i);
const quick = { minBackoff: 20, maxBackoff: 200, pingInterval: 0 };
const SECRET = "a-test-secret-of-at-least-32-bytes!!";

describe("Server-Sent Events against a daemon", { timeout: 60000 }, () => {
  let daemon;
  before(async () => {
    daemon = await new Daemon({ args: ["--history-size", "200"] }).start();
  });
  after(() => daemon?.stop());

  test("transport: sse delivers in order; channels added and removed reopen the stream", async () => {
    const client = new BroadcastClient(daemon.wsUrl, { ...quick, transport: "sse" });
    assert.equal(client.transport, "sse");
    const a = client.subscribe("sse-a");
    const seenA = new Recorder(client, a);
    client.connect();
    await waitFor(() => a.state === "subscribed", 10000, "subscribed");
    assert.ok(seenA.states.some((s) => s.state === "connected" && s.transport === "sse"));
    await daemon.publishMany("sse-a", range(1, 300));
    await waitFor(() => seenA.offsets.length === 300, 10000, "300 messages");
    assert.deepEqual(seenA.datas, range(1, 300));

    // A new channel: the stream is reopened with both, sse-a resuming from 300,
    // while publishes to sse-a go on: none lost, none twice.
    const publishing = daemon.publishMany("sse-a", range(301, 600), 20);
    const b = client.subscribe("sse-b", { since: { last: 2 } });
    const seenB = new Recorder(client, b);
    await daemon.publishMany("sse-b", range(1, 5));
    await publishing;
    await waitFor(() => seenA.offsets.length === 600 && seenB.datas.at(-1) === 5, 10000, "both channels");
    assert.deepEqual(seenA.datas, range(1, 600));
    assert.deepEqual(seenB.offsets, range(seenB.offsets[0], 5));
    assert.ok(seenA.recoveries.length >= 1, "sse-a resumed on the reopened stream");
    assert.ok(seenA.recoveries.every((r) => r.recovered === true), JSON.stringify(seenA.recoveries));

    // Unsubscribing reopens the stream without it; the other channel carries on.
    a.unsubscribe();
    await daemon.publish("sse-a", 601);
    await daemon.publish("sse-b", 6);
    await waitFor(() => seenB.datas.at(-1) === 6, 10000, "sse-b's next");
    assert.equal(seenA.offsets.length, 600);

    // Presence needs commands: refused at once, saying why.
    await assert.rejects(b.presenceStats(), (error) => {
      assert.ok(error instanceof BroadcastError);
      assert.equal(error.code, "one_way");
      assert.match(error.message, /needs a WebSocket/);
      return true;
    });
    client.close();
  });

  test("a token goes as Authorization, and a new one reopens the stream", async () => {
    await withDaemon(["--auth-hmac-secret", SECRET, "--history-size", "100"], async (authed) => {
      const proxy = await new Proxy(authed.wsPort).start();
      try {
        const claims = (n) => ({ sub: "alice", channels: ["*"], n, exp: Math.floor(Date.now() / 1000) + 600 });
        const first = jwt(SECRET, claims(1));
        const client = new BroadcastClient(proxy.url, { ...quick, transport: "sse", token: first });
        const sub = client.subscribe("private");
        const seen = new Recorder(client, sub);
        const users = [];
        client.on("authenticated", (frame) => users.push(frame.user));
        client.connect();
        await waitFor(() => sub.state === "subscribed", 10000, "subscribed");
        assert.equal(client.user, "alice");
        await authed.publishMany("private", range(1, 10));
        await waitFor(() => seen.offsets.length === 10, 10000, "10 messages");
        const second = jwt(SECRET, claims(2));
        client.setToken(second);
        await authed.publishMany("private", range(11, 20));
        await waitFor(() => seen.offsets.length === 20 && users.length === 2, 10000, "after the new token");
        assert.deepEqual(seen.datas, range(1, 20));
        client.close();
        const carries = (token) => proxy.requests.some((line) => line.includes(token.split(".")[2]));
        assert.equal(carries(first) || carries(second), false, "no token in a request line");
      } finally {
        await proxy.stop();
      }
    });
  });

  test("auto: falls back to SSE behind a proxy that refuses upgrades, and loses nothing across a cut", async () => {
    const proxy = await new Proxy(daemon.wsPort, { refuseUpgrades: true }).start();
    try {
      const client = new BroadcastClient(proxy.url, { ...quick, WebSocket, fallbackAfter: 2 });
      assert.equal(client.transport, "websocket");
      const sub = client.subscribe("fallback");
      const seen = new Recorder(client, sub);
      client.connect();
      await waitFor(() => sub.state === "subscribed", 10000, "subscribed");
      assert.equal(client.transport, "sse");
      assert.equal(proxy.refused, 2, "two WebSockets refused, then SSE");
      const connecting = seen.states.filter((s) => s.state === "connecting").map((s) => s.transport);
      assert.deepEqual(connecting, ["websocket", "websocket", "sse"]);
      assert.deepEqual(seen.states.at(-1), { state: "connected", transport: "sse" });

      await daemon.publishMany("fallback", range(1, 100));
      await waitFor(() => seen.offsets.length === 100, 10000, "100 messages");
      proxy.block();
      await waitFor(() => client.state !== "connected", 10000, "the cut");
      await daemon.publishMany("fallback", range(101, 150));
      proxy.unblock();
      await waitFor(() => seen.offsets.length === 150, 10000, "the missed ones");
      assert.deepEqual(seen.datas, range(1, 150));
      assert.deepEqual(seen.recoveries.map((r) => [r.recovered, r.offset]), [[true, 150]]);
      assert.equal(client.transport, "sse", "it stays on SSE");
      assert.equal(proxy.refused, 2);
      client.close();
    } finally {
      await proxy.stop();
    }
  });

  test("auto: a WebSocket that opened keeps the client on WebSocket", async () => {
    const proxy = await new Proxy(daemon.wsPort).start();
    try {
      const client = new BroadcastClient(proxy.url, { ...quick, WebSocket, fallbackAfter: 1 });
      const sub = client.subscribe("stays");
      const seen = new Recorder(client, sub);
      client.connect();
      await waitFor(() => sub.state === "subscribed", 10000, "subscribed");
      proxy.block();
      await waitFor(() => seen.states.filter((s) => s.state === "disconnected").length >= 3, 10000, "failures");
      proxy.unblock();
      await waitFor(() => client.state === "connected", 10000, "reconnected");
      const transports = new Set(seen.states.filter((s) => s.transport).map((s) => s.transport));
      assert.deepEqual([...transports], ["websocket"]);
      client.close();
    } finally {
      await proxy.stop();
    }
  });

  test("the daemon's end of a stream is a close code, as on WebSocket", async () => {
    await withDaemon(["--history-size", "10"], async (doomed) => {
      const client = new BroadcastClient(doomed.wsUrl, { ...quick, transport: "sse" });
      const sub = client.subscribe("ending");
      const seen = new Recorder(client, sub);
      client.connect();
      await waitFor(() => sub.state === "subscribed", 10000, "subscribed");
      await doomed.stop(); // a drain: the stream's last event says 1001
      await waitFor(() => seen.states.some((s) => s.state === "disconnected"), 10000, "the end");
      const ended = seen.states.find((s) => s.state === "disconnected");
      assert.equal(ended.code, 1001);
      assert.equal(ended.transport, "sse");
      client.close();
    });
  });
});

/** Run `body` with a daemon of its own, stopped afterwards whatever happens. */
async function withDaemon(args, body) {
  const daemon = await new Daemon({ args }).start();
  try {
    return await body(daemon);
  } finally {
    await daemon.stop();
  }
}
