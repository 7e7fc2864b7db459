// The client against a real broadcastd daemon (a subprocess on free loopback ports).

import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";

import WebSocket from "ws";

import { BroadcastClient } from "../src/index.js";
import { Daemon, Proxy, Recorder, jwt, waitFor } from "./harness.js";

const range = (from, to) => Array.from({ length: to - from + 1 }, (_, i) => from + i);
const options = { WebSocket, transport: "websocket", minBackoff: 50, maxBackoff: 300, pingInterval: 0 };
const SECRET = "a-test-secret-of-at-least-32-bytes!!";
/** An HS256 token for alice, for every channel, valid for `seconds` (expired if negative). */
const token = (seconds) =>
  jwt(SECRET, { sub: "alice", channels: ["*"], exp: Math.floor(Date.now() / 1000) + seconds });

/** Run `body` with a started daemon, stopped afterwards whatever happens. */
async function withDaemon(args, body) {
  const daemon = await new Daemon({ args }).start();
  try {
    return await body(daemon);
  } finally {
    await daemon.stop();
  }
}

describe("against a daemon", { timeout: 60000 }, () => {
  let daemon; // one daemon for the tests that need no restart nor settings of their own
  before(async () => {
    daemon = await new Daemon({ args: ["--history-size", "100"] }).start();
  });
  after(() => daemon?.stop());

  test("messages arrive in order; channels come and go while connected", async () => {
    const client = new BroadcastClient(daemon.wsUrl, options);
    const news = client.subscribe("news");
    const seen = new Recorder(client, news);
    const subscribed = [];
    news.on("subscribed", (frame) => subscribed.push(frame));
    client.connect();
    await waitFor(() => news.state === "subscribed", 10000, "subscribed");
    assert.equal(subscribed[0].offset, 0);
    assert.equal(subscribed[0].recovered, undefined);

    await daemon.publishMany("news", range(1, 500).map((n) => ({ n })));
    await waitFor(() => seen.offsets.length === 500, 10000, "500 messages");
    assert.deepEqual(seen.offsets, range(1, 500));
    assert.deepEqual(seen.datas, range(1, 500).map((n) => ({ n })));
    assert.deepEqual(news.position, { epoch: subscribed[0].epoch, offset: 500 });

    // A channel added on the open connection, starting with the last N kept.
    await daemon.publishMany("news2", range(1, 10));
    const tail = client.subscribe("news2", { since: { last: 3 } });
    const tailSeen = new Recorder(client, tail);
    await waitFor(() => tailSeen.offsets.length === 3, 10000, "the last 3 of news2");
    await daemon.publish("news2", 11);
    await waitFor(() => tailSeen.offsets.length === 4, 10000, "news2's next");
    assert.deepEqual(tailSeen.offsets, [8, 9, 10, 11]);
    assert.deepEqual(tailSeen.datas, [8, 9, 10, 11]);

    // Unsubscribed: nothing more. (Frames of one connection keep their order, so
    // once the later message of `news` is here, one of news2 would have been too.)
    tail.unsubscribe();
    await daemon.publish("news2", 12);
    await daemon.publish("news", { n: 501 });
    await waitFor(() => seen.offsets.length === 501, 10000, "message 501");
    assert.equal(tailSeen.offsets.at(-1), 11);

    client.close();
    assert.equal(client.state, "closed");
    const closed = await daemon.waitForEvent(
      (e) => e.event === "connection.close" && e.channels?.includes("news"),
    );
    assert.equal(closed.code, 1000);
    assert.equal(closed.initiator, "client");
    assert.deepEqual(seen.recoveries, []);
    assert.deepEqual(seen.errors, []);
  });

  test("after the daemon restarts, it resumes and says recovered: false", async () => {
    const first = await new Daemon({ args: ["--history-size", "100"] }).start();
    let second;
    try {
      const client = new BroadcastClient(first.wsUrl, options);
      const sub = client.subscribe("news");
      const seen = new Recorder(client, sub);
      client.connect();
      await waitFor(() => sub.state === "subscribed", 10000, "subscribed");
      await first.publishMany("news", range(1, 10));
      await waitFor(() => seen.offsets.length === 10, 10000, "10 messages");
      const epoch = sub.epoch;

      await first.stop(); // a drain: the client is closed with 1001
      await waitFor(() => client.state !== "connected", 10000, "disconnected");
      second = await new Daemon({ wsPort: first.wsPort, args: ["--history-size", "100"] }).start();
      await waitFor(() => seen.recoveries.length === 1, 15000, "the recovery outcome");
      const [outcome] = seen.recoveries;
      assert.equal(outcome.recovered, false);
      assert.equal(outcome.reason, "epoch");
      assert.notEqual(sub.epoch, epoch);
      assert.equal(client.state, "connected");
      assert.ok(seen.states.some((s) => s.state === "disconnected" && s.code === 1001), JSON.stringify(seen.states));

      await second.publishMany("news", range(1, 5));
      await waitFor(() => seen.offsets.length === 15, 10000, "the new epoch's messages");
      assert.deepEqual(seen.offsets, [...range(1, 10), ...range(1, 5)]);
      client.close();
    } finally {
      await first.stop();
      await second?.stop();
    }
  });

  test("after a dropped connection, nothing is lost and nothing repeated", async () => {
    const proxy = await new Proxy(daemon.wsPort).start();
    try {
      const client = new BroadcastClient(proxy.url, options);
      const sub = client.subscribe("dropped");
      const seen = new Recorder(client, sub);
      client.connect();
      await waitFor(() => sub.state === "subscribed", 10000, "subscribed");
      await daemon.publishMany("dropped", range(1, 30));
      await waitFor(() => seen.offsets.length === 30, 10000, "30 messages");

      proxy.block();
      await waitFor(() => client.state !== "connected", 10000, "disconnected");
      await daemon.publishMany("dropped", range(31, 60));
      proxy.unblock();
      // Publish while it reconnects, one message at a time.
      for (const n of range(61, 90)) await daemon.publish("dropped", n);
      await waitFor(() => seen.offsets.length === 90, 10000, "90 messages");
      assert.deepEqual(seen.offsets, range(1, 90));
      assert.deepEqual(seen.datas, range(1, 90));
      assert.equal(seen.recoveries.length, 1);
      assert.equal(seen.recoveries[0].recovered, true);
      assert.ok(proxy.accepted >= 2);
      client.close();
    } finally {
      await proxy.stop();
    }
  });

  test("beyond the history window, recovered: false (too_old) and live messages go on", async () => {
    const proxy = await new Proxy(daemon.wsPort).start();
    try {
      const client = new BroadcastClient(proxy.url, options);
      const sub = client.subscribe("window");
      const seen = new Recorder(client, sub);
      client.connect();
      await waitFor(() => sub.state === "subscribed", 10000, "subscribed");
      await daemon.publishMany("window", range(1, 5));
      await waitFor(() => seen.offsets.length === 5, 10000, "5 messages");

      proxy.block();
      await waitFor(() => client.state !== "connected", 10000, "disconnected");
      await daemon.publishMany("window", range(6, 155)); // 150 > history.size
      proxy.unblock();
      await waitFor(() => seen.recoveries.length === 1, 10000, "the recovery outcome");
      assert.equal(seen.recoveries[0].recovered, false);
      assert.equal(seen.recoveries[0].reason, "too_old");
      assert.equal(seen.recoveries[0].offset, 155);
      await daemon.publish("window", 156);
      await waitFor(() => seen.offsets.length === 6, 10000, "the next live message");
      assert.deepEqual(seen.offsets, [...range(1, 5), 156]);
      client.close();
    } finally {
      await proxy.stop();
    }
  });

  test("a token given to a daemon without [auth]: told, and subscribed all the same", async () => {
    const client = new BroadcastClient(daemon.wsUrl, { ...options, token: "not.checked.here" });
    const errors = [];
    client.on("error", (frame) => errors.push([frame.op, frame.code]));
    const sub = client.subscribe("open-news");
    client.connect();
    await waitFor(() => sub.state === "subscribed", 10000, "subscribed");
    assert.deepEqual(errors, [["auth", "bad_command"]]);
    assert.equal(client.state, "connected");
    client.close();
  });

  test("tokens: refreshed before they expire; after an expiry, a new one and a resume", () => {
    const args = [
      "--history-size", "100",
      "--auth-hmac-secret", SECRET,
      "--auth-expiring-notice", "1",
      "--auth-leeway", "0",
    ];
    const refreshed = async (daemon, tokenInUrl) => {
      // `expiring` -> getToken("expiring") -> refresh: the connection stays.
      const reasons = [];
      const first = token(2);
      const client = new BroadcastClient(daemon.wsUrl, {
        ...options,
        tokenInUrl,
        token: first,
        getToken: (reason) => {
          reasons.push(reason);
          return token(60);
        },
      });
      const authenticated = [];
      client.on("authenticated", (frame) => authenticated.push(frame));
      const channel = `refreshed-${tokenInUrl}`;
      const sub = client.subscribe(channel);
      const seen = new Recorder(client, sub);
      client.connect();
      await waitFor(() => authenticated.some((f) => f.op === "refresh"), 10000, "the refresh");
      assert.deepEqual(reasons, ["expiring"]);
      assert.equal(authenticated[0].op, tokenInUrl ? undefined : "auth");
      const expired = (authenticated[0].expires + 0.3) * 1000;
      await waitFor(() => Date.now() > expired, 5000, "the first token's exp");
      await daemon.publish(channel, "after the first token's exp");
      await waitFor(() => seen.datas.includes("after the first token's exp"), 10000, "a message");
      assert.deepEqual(seen.states.map((s) => s.state), ["connecting", "connected"]);
      client.close();
    };
    const expired = async (daemon, tokenInUrl) => {
      // No new token in time: closed with 4003, then getToken("expired"), reconnect, resume.
      const reasons = [];
      const client = new BroadcastClient(daemon.wsUrl, {
        ...options,
        tokenInUrl,
        token: token(2),
        getToken: (reason) => {
          reasons.push(reason);
          if (reason === "expiring") throw new Error("the token service is down");
          return token(60);
        },
      });
      const errors = [];
      client.on("error", (error) => errors.push(error));
      const channel = `expired-${tokenInUrl}`;
      const sub = client.subscribe(channel);
      const seen = new Recorder(client, sub);
      client.connect();
      await waitFor(() => sub.state === "subscribed", 10000, "subscribed");
      await waitFor(() => seen.states.some((s) => s.code === 4003), 10000, "the close with 4003");
      await daemon.publish(channel, "sent while it reconnects");
      await waitFor(() => seen.offsets.length === 1, 10000, "the message sent meanwhile");
      assert.deepEqual(reasons, ["expiring", "expired"]);
      assert.equal(errors[0].message, "the token service is down");
      assert.deepEqual(seen.datas, ["sent while it reconnects"]);
      assert.equal(client.state, "connected");
      client.close();
    };
    const refusedFirst = async (daemon) => {
      // A token already expired, refused in the first frame: getToken("expired"), or the end.
      const reasons = [];
      const client = new BroadcastClient(daemon.wsUrl, {
        ...options,
        token: token(-60),
        getToken: (reason) => {
          reasons.push(reason);
          return token(60);
        },
      });
      const errors = [];
      client.on("error", (frame) => errors.push([frame.op, frame.code]));
      const sub = client.subscribe("refused");
      client.connect();
      await waitFor(() => sub.state === "subscribed", 10000, "subscribed with a new token");
      assert.deepEqual(reasons, ["expired"]);
      assert.deepEqual(errors, [["auth", "token_expired"]]);
      client.close();

      const alone = new BroadcastClient(daemon.wsUrl, { ...options, token: token(-60) });
      const states = [];
      alone.on("state", (state, detail) => states.push([state, detail?.code]));
      alone.on("error", () => {});
      alone.subscribe("refused");
      alone.connect();
      await waitFor(() => alone.state === "closed", 10000, "the end of a client without getToken");
      assert.deepEqual(states.at(-1), ["closed", 4003]);
    };
    return withDaemon(args, (daemon) =>
      Promise.all([
        refreshed(daemon, false),
        refreshed(daemon, true),
        expired(daemon, false),
        expired(daemon, true),
        refusedFirst(daemon),
      ]),
    );
  });

  test("a token is in no URL, proxy request line or daemon log line; resuming works", () => {
    const args = ["--history-size", "100", "--auth-hmac-secret", SECRET, "--log-level", "debug"];
    return withDaemon(args, async (daemon) => {
      const secret = token(600);
      const proxy = await new Proxy(daemon.wsPort).start();
      try {
        const client = new BroadcastClient(proxy.url, { ...options, token: secret });
        const authenticated = [];
        client.on("authenticated", (frame) => authenticated.push([frame.op, frame.user]));
        const sub = client.subscribe("private");
        const seen = new Recorder(client, sub);
        client.connect();
        await waitFor(() => sub.state === "subscribed", 10000, "subscribed");
        await daemon.publishMany("private", range(1, 30));
        await waitFor(() => seen.offsets.length === 30, 10000, "30 messages");

        proxy.block();
        await waitFor(() => client.state !== "connected", 10000, "disconnected");
        await daemon.publishMany("private", range(31, 60));
        proxy.unblock();
        for (const n of range(61, 90)) await daemon.publish("private", n);
        await waitFor(() => seen.offsets.length === 90, 10000, "90 messages");
        // Each connection asked for "/" alone: token and channels went in frames.
        assert.ok(proxy.requests.length >= 2);
        for (const line of proxy.requests) assert.equal(line, "GET / HTTP/1.1");
        assert.deepEqual(seen.offsets, range(1, 90));
        assert.deepEqual(seen.datas, range(1, 90));
        assert.deepEqual(seen.recoveries.map((r) => r.recovered), [true]);
        assert.deepEqual(seen.errors, []);
        assert.ok(authenticated.length >= 2, JSON.stringify(authenticated));
        assert.ok(authenticated.every(([op, user]) => op === "auth" && user === "alice"));
        client.close();

        // tokenInUrl keeps the URL form for daemons or deployments that need it.
        const inUrl = new BroadcastClient(proxy.url, { ...options, token: secret, tokenInUrl: true });
        const inUrlSub = inUrl.subscribe("private", { since: sub.position });
        inUrl.connect();
        await waitFor(() => inUrlSub.state === "subscribed", 10000, "subscribed with the token in the URL");
        assert.match(proxy.requests.at(-1), /^GET \/\?token=[^ ]+&since=private%3A\w+%3A90 HTTP\/1\.1$/);
        inUrl.close();
      } finally {
        await proxy.stop();
      }
      await daemon.stop(); // everything it had to say is written
      const parts = secret.split(".").slice(1); // claims and signature
      const leaks = daemon.output().filter((line) => parts.some((part) => line.includes(part)));
      assert.deepEqual(leaks, []);
    });
  });
});
