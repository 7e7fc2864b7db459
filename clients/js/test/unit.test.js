// The client against a scripted WebSocket: URLs, first frames, backoff, tokens, frames,
// page unload.
// No daemon, no network; fast.

import assert from "node:assert/strict";
import { afterEach, beforeEach, describe, test } from "node:test";

import { BroadcastClient } from "../src/index.js";
import { waitFor } from "./harness.js";

/** A WebSocket class whose sockets the test opens, feeds and closes by hand. */
function fakeWebSocket() {
  const sockets = [];
  class FakeSocket {
    constructor(url) {
      this.url = new URL(url);
      this.readyState = 0;
      this.sent = [];
      this.closedWith = null;
      sockets.push(this);
    }

    send(text) {
      this.sent.push(JSON.parse(text));
    }

    close(code, reason) {
      this.closedWith = { code, reason };
      this.readyState = 3;
    }

    open() {
      this.readyState = 1;
      this.onopen?.({ target: this });
    }

    receive(frame) {
      this.onmessage?.({ target: this, data: JSON.stringify(frame) });
    }

    serverClose(code, reason = "") {
      this.readyState = 3;
      this.onclose?.({ target: this, code, reason });
    }
  }
  return { FakeSocket, sockets };
}

const quick = { transport: "websocket", minBackoff: 10, maxBackoff: 80, pingInterval: 0 };

describe("connecting", () => {
  test("tokenInUrl: the URL names each channel, its position and the token", () => {
    const { FakeSocket, sockets } = fakeWebSocket();
    const client = new BroadcastClient("ws://example.test:8765/", {
      WebSocket: FakeSocket,
      token: "t0",
      tokenInUrl: true,
      ...quick,
    });
    client.subscribe("news");
    client.subscribe("chat:room", { since: { last: 20 } });
    client.subscribe("inbox#alice", { since: { epoch: "e1", offset: 41 } });
    assert.equal(sockets.length, 0, "nothing opens before connect()");
    client.connect();
    assert.equal(sockets.length, 1);
    const query = sockets[0].url.searchParams;
    assert.deepEqual(query.getAll("channel"), ["news"]);
    assert.deepEqual(query.getAll("since"), ["chat:room:last:20", "inbox#alice:e1:41"]);
    assert.equal(query.get("token"), "t0");
    assert.equal(client.state, "connecting");
    sockets[0].open();
    assert.equal(client.state, "connected");
    assert.deepEqual(sockets[0].sent, [], "URL channels need no command");
    client.close();
  });

  test("a token goes in the first frame, in no URL; the channels follow once it is accepted", async () => {
    const { FakeSocket, sockets } = fakeWebSocket();
    const client = new BroadcastClient("ws://example.test:8765/", {
      WebSocket: FakeSocket,
      token: "t0",
      ...quick,
    });
    const news = client.subscribe("news");
    client.subscribe("chat:room", { since: { last: 20 } });
    client.subscribe("inbox#alice", { since: { epoch: "e1", offset: 41 } });
    const authenticated = [];
    client.on("authenticated", (frame) => authenticated.push([frame.op, client.state]));
    client.connect();
    assert.equal(sockets[0].url.href, "ws://example.test:8765/");
    sockets[0].open();
    assert.deepEqual(sockets[0].sent, [{ op: "auth", token: "t0", id: 1 }]);
    assert.equal(client.state, "connecting", "not up until the token is accepted");
    client.subscribe("late"); // while the token is being checked: sent after it
    assert.equal(sockets[0].sent.length, 1);
    sockets[0].receive({ type: "authenticated", user: "alice", op: "auth", id: 1 });
    assert.deepEqual(authenticated, [["auth", "connecting"]]);
    assert.equal(client.state, "connected");
    assert.deepEqual(
      sockets[0].sent.slice(1).map(({ op, channel, since }) => ({ op, channel, since })),
      [
        { op: "subscribe", channel: "news", since: undefined },
        { op: "subscribe", channel: "chat:room", since: { last: 20 } },
        { op: "subscribe", channel: "inbox#alice", since: { epoch: "e1", offset: 41 } },
        { op: "subscribe", channel: "late", since: undefined },
      ],
    );
    const newsId = sockets[0].sent[1].id;
    sockets[0].receive({ type: "subscribed", channel: "news", epoch: "e", offset: 4, id: newsId });
    sockets[0].receive({ channel: "news", offset: 5, data: 1 });
    assert.deepEqual(news.position, { epoch: "e", offset: 5 });

    // Reconnecting: the token first again, then each channel from its position.
    sockets[0].serverClose(1006);
    await waitFor(() => sockets.length === 2, 2000, "a reconnection");
    assert.equal(sockets[1].url.href, "ws://example.test:8765/");
    sockets[1].open();
    assert.deepEqual(sockets[1].sent, [{ op: "auth", token: "t0", id: sockets[1].sent[0].id }]);
    sockets[1].receive({ type: "authenticated", user: "alice", op: "auth", id: sockets[1].sent[0].id });
    assert.deepEqual(sockets[1].sent[1].since, { epoch: "e", offset: 5 });
    assert.equal(sockets[1].sent[1].channel, "news");
    client.close();
  });

  test("setToken while the first token is checked: the refresh's answer decides", () => {
    const { FakeSocket, sockets } = fakeWebSocket();
    const client = new BroadcastClient("ws://example.test/", { WebSocket: FakeSocket, token: "old", ...quick });
    client.subscribe("news");
    client.connect();
    sockets[0].open();
    client.setToken("new");
    const [auth, refresh] = sockets[0].sent;
    assert.deepEqual([auth.op, auth.token, refresh.op, refresh.token], ["auth", "old", "refresh", "new"]);
    const errors = [];
    client.on("error", (frame) => errors.push(frame.code));
    sockets[0].receive({ type: "error", op: "auth", code: "token_expired", message: "x", id: auth.id });
    assert.equal(sockets[0].closedWith, null, "the refresh may still be accepted");
    sockets[0].receive({ type: "authenticated", user: "alice", op: "refresh", id: refresh.id });
    assert.equal(client.state, "connected");
    assert.deepEqual(sockets[0].sent.at(-1).channel, "news");
    assert.deepEqual(errors, ["token_expired"]);
    client.close();
  });

  test("setToken while a connection with its token in the URL opens: a refresh once open", () => {
    const { FakeSocket, sockets } = fakeWebSocket();
    const client = new BroadcastClient("ws://example.test/", {
      WebSocket: FakeSocket,
      token: "old",
      tokenInUrl: true,
      ...quick,
    });
    client.subscribe("news");
    client.connect();
    client.setToken("new");
    assert.equal(sockets[0].url.searchParams.get("token"), "old");
    sockets[0].open();
    assert.deepEqual(sockets[0].sent.map((c) => [c.op, c.token]), [["refresh", "new"]]);
    assert.equal(client.state, "connected");
    client.close();
  });

  test("a client with no channel waits for one; channels added later are commands", () => {
    const { FakeSocket, sockets } = fakeWebSocket();
    const client = new BroadcastClient("ws://example.test/", { WebSocket: FakeSocket, ...quick });
    client.connect();
    assert.equal(sockets.length, 0);
    client.subscribe("a");
    assert.equal(sockets.length, 1);
    client.subscribe("b", { since: { epoch: "e", offset: 3 } }); // while connecting
    sockets[0].open();
    client.subscribe("c");
    assert.deepEqual(
      sockets[0].sent.map(({ op, channel, since }) => ({ op, channel, since })),
      [
        { op: "subscribe", channel: "b", since: { epoch: "e", offset: 3 } },
        { op: "subscribe", channel: "c", since: undefined },
      ],
    );
    assert.throws(() => client.subscribe("c"), /already subscribed/);
    assert.throws(() => client.subscribe("bad name"), /bad channel/);
    client.close();
  });

  test("a channel left while connecting is left once open", () => {
    const { FakeSocket, sockets } = fakeWebSocket();
    const client = new BroadcastClient("ws://example.test/", { WebSocket: FakeSocket, ...quick });
    const a = client.subscribe("a");
    client.subscribe("b");
    client.connect();
    a.unsubscribe();
    sockets[0].open();
    assert.deepEqual(sockets[0].sent, [{ op: "unsubscribe", channel: "a" }]);
    sockets[0].receive({ type: "subscribed", channel: "a", epoch: "e", offset: 0 });
    assert.equal(a.state, "unsubscribed");
    client.close();
  });

  test("close() closes with 1000 and stops; connect() resumes from the positions", () => {
    const { FakeSocket, sockets } = fakeWebSocket();
    const client = new BroadcastClient("ws://example.test/", { WebSocket: FakeSocket, ...quick });
    const sub = client.subscribe("news");
    client.connect();
    sockets[0].open();
    sockets[0].receive({ type: "subscribed", channel: "news", epoch: "e", offset: 4 });
    sockets[0].receive({ channel: "news", offset: 5, data: 1 });
    client.close();
    assert.deepEqual(sockets[0].closedWith, { code: 1000, reason: "client closed" });
    assert.equal(client.state, "closed");
    assert.deepEqual(sub.position, { epoch: "e", offset: 5 });
    client.connect();
    assert.deepEqual(sockets[1].url.searchParams.getAll("since"), ["news:e:5"]);
    client.close();
  });
});

describe("reconnecting", () => {
  let random;
  beforeEach(() => {
    random = Math.random;
    Math.random = () => 0.999;
  });
  afterEach(() => {
    Math.random = random;
  });

  test("full-jitter exponential backoff, capped, reset only after a stable connection", async () => {
    const { FakeSocket, sockets } = fakeWebSocket();
    const client = new BroadcastClient("ws://example.test/", {
      WebSocket: FakeSocket,
      ...quick,
      stableAfter: 100,
    });
    const delays = [];
    client.on("state", (state, detail) => {
      if (state === "disconnected") delays.push(detail.delay);
    });
    client.subscribe("news");
    client.connect();
    for (let i = 0; i < 5; i++) {
      await waitFor(() => sockets.length === i + 1, 2000, `attempt ${i + 1}`);
      sockets[i].serverClose(1006); // the handshake failed
    }
    assert.deepEqual(delays, [9, 19, 39, 79, 79]); // random() * min(80, 10 * 2^n)
    // A connection that opens but drops at once does not reset the backoff...
    await waitFor(() => sockets.length === 6, 2000);
    sockets[5].open();
    sockets[5].serverClose(1011);
    assert.equal(delays.at(-1), 79);
    // ...one that stayed up stableAfter does.
    await waitFor(() => sockets.length === 7, 2000);
    sockets[6].open();
    await new Promise((resolve) => setTimeout(resolve, 150));
    sockets[6].serverClose(1001, "server shutting down");
    assert.equal(delays.at(-1), 9);
    client.close();
  });

  test("each channel resumes after its last message; recovered: false is told", async () => {
    const { FakeSocket, sockets } = fakeWebSocket();
    const client = new BroadcastClient("ws://example.test/", { WebSocket: FakeSocket, ...quick });
    const sub = client.subscribe("news");
    const seen = [];
    const outcomes = [];
    const clientOutcomes = [];
    sub.on("message", (m) => seen.push(m.offset));
    sub.on("recovered", (frame) => outcomes.push([frame.recovered, frame.reason]));
    client.on("recovered", (frame) => clientOutcomes.push(frame.channel));
    client.connect();
    sockets[0].open();
    sockets[0].receive({ channel: "news", offset: 1, data: 0 }); // before subscribed: not ours
    sockets[0].receive({ type: "subscribed", channel: "news", epoch: "e1", offset: 10 });
    sockets[0].receive({ channel: "news", offset: 11, data: 0 });
    sockets[0].receive({ channel: "news", offset: 12, data: 0 });
    sockets[0].serverClose(1006);
    await waitFor(() => sockets.length === 2, 2000);
    assert.deepEqual(sockets[1].url.searchParams.getAll("since"), ["news:e1:12"]);
    sockets[1].open();
    sockets[1].receive({ type: "subscribed", channel: "news", epoch: "e1", offset: 14, recovered: true });
    sockets[1].receive({ channel: "news", offset: 12, data: 0 }); // a duplicate is never delivered
    sockets[1].receive({ channel: "news", offset: 13, data: 0 });
    sockets[1].receive({ channel: "news", offset: 14, data: 0 });
    sockets[1].serverClose(1001);
    await waitFor(() => sockets.length === 3, 2000);
    assert.deepEqual(sockets[2].url.searchParams.getAll("since"), ["news:e1:14"]);
    sockets[2].open();
    sockets[2].receive({
      type: "subscribed", channel: "news", epoch: "e2", offset: 0, recovered: false, reason: "epoch",
    });
    sockets[2].receive({ channel: "news", offset: 1, data: 0 });
    assert.deepEqual(seen, [11, 12, 13, 14, 1]);
    assert.deepEqual(outcomes, [[true, undefined], [false, "epoch"]]);
    assert.deepEqual(clientOutcomes, ["news", "news"]);
    assert.deepEqual(sub.position, { epoch: "e2", offset: 1 });
    client.close();
  });

  test("recovered: false with nobody listening is still said (console.warn)", () => {
    const { FakeSocket, sockets } = fakeWebSocket();
    const client = new BroadcastClient("ws://example.test/", { WebSocket: FakeSocket, ...quick });
    client.subscribe("news", { since: { epoch: "old", offset: 3 } });
    client.connect();
    sockets[0].open();
    const warned = [];
    const warn = console.warn;
    console.warn = (...args) => warned.push(args);
    try {
      sockets[0].receive({
        type: "subscribed", channel: "news", epoch: "e", offset: 9, recovered: false, reason: "epoch",
      });
    } finally {
      console.warn = warn;
    }
    assert.equal(warned.length, 1);
    assert.equal(warned[0][1].reason, "epoch");
    client.close();
  });

  test("a dead connection is found by ping", async () => {
    const { FakeSocket, sockets } = fakeWebSocket();
    const client = new BroadcastClient("ws://example.test/", {
      WebSocket: FakeSocket,
      ...quick,
      pingInterval: 30,
    });
    client.subscribe("news");
    client.connect();
    sockets[0].open();
    await waitFor(() => sockets[0].sent.some((c) => c.op === "ping"), 2000, "a ping");
    await waitFor(() => sockets.length === 2, 2000, "a new connection");
    assert.equal(sockets[0].closedWith.code, 1000);
    client.close();
  });

  test("a handshake that never completes is given up", async () => {
    const { FakeSocket, sockets } = fakeWebSocket();
    const client = new BroadcastClient("ws://example.test/", {
      WebSocket: FakeSocket,
      ...quick,
      connectTimeout: 30,
    });
    client.subscribe("news");
    client.connect();
    await waitFor(() => sockets.length === 2, 2000, "a second attempt");
    assert.ok(sockets[0].closedWith);
    client.close();
  });
});

describe("tokens", () => {
  test("expiring: getToken('expiring') and a refresh on the same connection", async () => {
    const { FakeSocket, sockets } = fakeWebSocket();
    const reasons = [];
    const client = new BroadcastClient("ws://example.test/", {
      WebSocket: FakeSocket,
      ...quick,
      getToken: async (reason) => {
        reasons.push(reason);
        return `token-${reasons.length}`;
      },
    });
    client.subscribe("news");
    client.connect();
    await waitFor(() => sockets.length === 1, 2000);
    assert.equal(sockets[0].url.search, "");
    sockets[0].open();
    const tokens = (socket) => socket.sent.filter((c) => c.token !== undefined).map((c) => [c.op, c.token]);
    assert.deepEqual(tokens(sockets[0]), [["auth", "token-1"]]);
    sockets[0].receive({ type: "authenticated", user: "u", op: "auth", id: sockets[0].sent[0].id });
    sockets[0].receive({ type: "expiring", expires: 1 });
    await waitFor(() => tokens(sockets[0]).length === 2, 2000, "the refresh");
    assert.deepEqual(tokens(sockets[0]), [["auth", "token-1"], ["refresh", "token-2"]]);
    sockets[0].serverClose(1006);
    await waitFor(() => sockets.length === 2, 2000);
    sockets[1].open();
    assert.deepEqual(tokens(sockets[1]), [["auth", "token-2"]]);
    sockets[1].serverClose(4003, "token expired");
    await waitFor(() => sockets.length === 3, 2000);
    sockets[2].open();
    assert.deepEqual(tokens(sockets[2]), [["auth", "token-3"]]);
    assert.deepEqual(reasons, ["connect", "expiring", "expired"]);
    for (const socket of sockets) assert.equal(socket.url.search, "", "never a token in a URL");
    client.close();
  });

  test("a refused first-frame token: a new one from getToken, as after a 4003 close", async () => {
    const { FakeSocket, sockets } = fakeWebSocket();
    const reasons = [];
    const client = new BroadcastClient("ws://example.test/", {
      WebSocket: FakeSocket,
      ...quick,
      token: "stale",
      getToken: (reason) => {
        reasons.push(reason);
        return "fresh";
      },
    });
    const states = [];
    client.on("state", (state, detail) => states.push([state, detail?.code]));
    client.on("error", () => {});
    client.subscribe("news");
    client.connect();
    sockets[0].open();
    const { id } = sockets[0].sent[0];
    sockets[0].receive({ type: "error", op: "auth", code: "token_expired", message: "expired", id });
    assert.equal(sockets[0].closedWith.code, 1000);
    assert.deepEqual(states.at(-1), ["disconnected", 4003]);
    await waitFor(() => sockets.length === 2, 2000, "a reconnection");
    sockets[1].open();
    assert.deepEqual(sockets[1].sent.map((c) => [c.op, c.token]), [["auth", "fresh"]]);
    assert.deepEqual(reasons, ["expired"]);
    client.close();
  });

  test("a daemon without [auth] refuses the auth command: told, and the channels subscribed", () => {
    const { FakeSocket, sockets } = fakeWebSocket();
    const client = new BroadcastClient("ws://example.test/", { WebSocket: FakeSocket, token: "t", ...quick });
    const errors = [];
    client.on("error", (frame) => errors.push([frame.op, frame.code]));
    client.subscribe("news");
    client.connect();
    sockets[0].open();
    const { id } = sockets[0].sent[0];
    sockets[0].receive({ type: "error", op: "auth", code: "bad_command", message: "not configured", id });
    assert.deepEqual(errors, [["auth", "bad_command"]]);
    assert.equal(client.state, "connected");
    assert.deepEqual(sockets[0].sent.slice(1).map((c) => [c.op, c.channel]), [["subscribe", "news"]]);
    client.close();
  });

  test("without getToken, a refused token ends the client", () => {
    const { FakeSocket, sockets } = fakeWebSocket();
    const client = new BroadcastClient("ws://example.test/", {
      WebSocket: FakeSocket,
      ...quick,
      token: "bad",
      tokenInUrl: true,
    });
    const errors = [];
    const states = [];
    client.on("error", (e) => errors.push(e.code));
    client.on("state", (state, detail) => states.push([state, detail?.code]));
    client.subscribe("news");
    client.connect();
    sockets[0].open();
    sockets[0].receive({ type: "error", op: "connect", code: "token_invalid", message: "bad" });
    sockets[0].serverClose(4002, "invalid token");
    assert.deepEqual(errors, ["token_invalid"]);
    assert.deepEqual(states.at(-1), ["closed", 4002]);
    assert.equal(sockets.length, 1);

    // The same when the token went in the first frame and was refused there.
    const first = new BroadcastClient("ws://example.test/", { WebSocket: FakeSocket, ...quick, token: "bad" });
    const firstStates = [];
    first.on("state", (state, detail) => firstStates.push([state, detail?.code]));
    first.on("error", () => {});
    first.subscribe("news");
    first.connect();
    sockets[1].open();
    sockets[1].receive({ type: "error", op: "auth", code: "token_invalid", message: "bad", id: sockets[1].sent[0].id });
    assert.deepEqual(firstStates.at(-1), ["closed", 4002]);
    assert.equal(sockets[1].closedWith.code, 1000);
    assert.equal(sockets.length, 2);
  });
});

describe("frames", () => {
  test("errors go to the channel they concern", () => {
    const { FakeSocket, sockets } = fakeWebSocket();
    const client = new BroadcastClient("ws://example.test/", { WebSocket: FakeSocket, ...quick });
    const a = client.subscribe("a");
    const b = client.subscribe("b");
    client.connect();
    sockets[0].open();
    const c = client.subscribe("c");
    const told = [];
    for (const sub of [a, b, c]) sub.on("error", (frame) => told.push([sub.channel, frame.code]));
    const clientErrors = [];
    client.on("error", (frame) => clientErrors.push(frame.code));
    // URL channels: no id, the name in the message (else the first still waiting).
    sockets[0].receive({ type: "error", op: "subscribe", code: "channel_not_allowed", message: "may not subscribe to 'b': x" });
    sockets[0].receive({ type: "subscribed", channel: "a", epoch: "e", offset: 0 });
    sockets[0].receive({ type: "error", op: "subscribe", code: "not_your_channel", message: "x", id: sockets[0].sent[0].id });
    assert.deepEqual(told, [["b", "channel_not_allowed"], ["c", "not_your_channel"]]);
    assert.deepEqual(clientErrors, ["channel_not_allowed", "not_your_channel"]);
    client.close();
  });

  test("missed and resync reach the subscription; a throwing listener stops nothing", () => {
    const { FakeSocket, sockets } = fakeWebSocket();
    const client = new BroadcastClient("ws://example.test/", { WebSocket: FakeSocket, ...quick });
    const sub = client.subscribe("news");
    const got = [];
    sub.on("message", () => {
      throw new Error("listener bug");
    });
    sub.on("message", (m) => got.push(m.offset));
    sub.on("missed", (f) => got.push(`missed ${f.count}`));
    sub.on("resync", (f) => got.push(`resync ${f.reason}`));
    const uncaught = [];
    globalThis.reportError = (error) => uncaught.push(error.message); // as in a browser
    try {
      client.connect();
      sockets[0].open();
      sockets[0].receive({ type: "subscribed", channel: "news", epoch: "e", offset: 0 });
      sockets[0].receive({ channel: "news", offset: 1, data: null });
      sockets[0].receive({ type: "missed", count: 3 });
      sockets[0].receive({ channel: "news", offset: 5, data: null });
      sockets[0].receive({ type: "resync", channel: "news", epoch: "f", offset: 0, reason: "epoch" });
      sockets[0].receive({ channel: "news", offset: 1, data: null });
    } finally {
      delete globalThis.reportError;
    }
    assert.deepEqual(got, [1, "missed 3", 5, "resync epoch", 1]);
    assert.deepEqual(uncaught, ["listener bug", "listener bug", "listener bug"]);
    assert.deepEqual(sub.position, { epoch: "f", offset: 1 });
    client.close();
  });
});

describe("in a page", () => {
  test("pagehide closes with 1000; pageshow from the cache reconnects", () => {
    const page = new EventTarget();
    globalThis.window = page;
    try {
      const { FakeSocket, sockets } = fakeWebSocket();
      const client = new BroadcastClient("ws://example.test/", { WebSocket: FakeSocket, ...quick });
      client.subscribe("news");
      client.connect();
      sockets[0].open();
      page.dispatchEvent(new Event("pagehide"));
      assert.equal(sockets[0].closedWith.code, 1000);
      assert.equal(client.state, "disconnected");
      page.dispatchEvent(new Event("pageshow"));
      assert.equal(sockets.length, 2);
      client.close();
      page.dispatchEvent(new Event("pageshow"));
      assert.equal(sockets.length, 2, "closed: the listeners are gone");
    } finally {
      delete globalThis.window;
    }
  });
});
