// broadcastd client: subscribe to channels of a broadcastd daemon over WebSocket,
// or Server-Sent Events where a WebSocket cannot pass, in browsers and in
// Node.js. No dependencies. See ../README.md for the API.
//
// One connection carries every subscription. It reconnects by itself with
// full-jitter exponential backoff, and each channel resumes from the last
// position it saw (`since`): what the daemon's history still holds is replayed,
// and when it cannot be (`recovered: false`) the subscription is told so with a
// `recovered` event, never silently.
//
// A token goes in the connection's first frame, `{"op": "auth"}`, never in its
// URL: browsers print the URL of a failed WebSocket to the page's console, and
// proxies and access logs keep URLs. The daemon subscribes channels named in the
// URL as soon as the connection opens, before any frame is read, so with a token
// every channel is subscribed by a command once the token is accepted. Without a
// token (or with `tokenInUrl`) the channels and their positions go in the URL
// and need no round trip.
//
// Server-Sent Events (`transport: "sse"`, or "auto" after WebSockets that never
// opened) are read with fetch() and a streamed body rather than EventSource:
// Node.js has no EventSource, and only fetch() can send `Authorization`. The
// stream is one-way, so the client reopens it with the new channel list (and
// every channel's position as `since`) where a WebSocket would send a command.
//
// Hot path: a message frame costs one JSON.parse and one Map lookup; the parsed
// object itself is what `message` listeners get. Nothing else is allocated per
// message (no closures, no wrapper objects, no copies of the listener list).

const CONNECTING = "connecting";
const CONNECTED = "connected";
const DISCONNECTED = "disconnected";
const CLOSED = "closed";

const OPEN = 1; // WebSocket.OPEN, the same in browsers and in the ws package
const CHANNEL = /^[A-Za-z0-9_.:@#-]{1,128}$/;
const MAX_URL = 6144; // the daemon takes request lines up to 8 KiB; the rest go as commands
const PING = '{"op":"ping"}';
const TRANSIENT = new Set(["broker_unavailable", "channel_table_full"]);
const TRANSPORTS = ["auto", "websocket", "sse"];
const MAX_EVENT = 16 * 1024 * 1024; // an SSE event (or line) longer than this ends the stream

const noop = () => {};

function checkToken(token) {
  if (typeof token !== "string" || token === "") throw new TypeError("a token must be a non-empty string");
  return token;
}

function rethrow(error) {
  // A listener threw: the other listeners and the client carry on, and the
  // error surfaces as an uncaught one (the console in a browser).
  if (typeof globalThis.reportError === "function") globalThis.reportError(error);
  else setTimeout(() => { throw error; }, 0);
}

/** A request refused by the daemon (`code` its error code: not_subscribed,
 * presence_not_allowed, ...), or left without an answer (`code` "network": not
 * connected, or the connection ended first). `frame` is the daemon's error reply. */
export class BroadcastError extends Error {
  constructor(code, message, frame = null) {
    super(`${code}: ${message}`);
    this.name = "BroadcastError";
    this.code = code;
    this.frame = frame;
  }
}

class Emitter {
  constructor() {
    this._listeners = new Map();
  }

  /** Add a listener; returns this. */
  on(event, listener) {
    if (typeof listener !== "function") throw new TypeError("a listener must be a function");
    const list = this._listeners.get(event);
    // Copy on write: emitting iterates the current array without copying it,
    // and a listener that adds or removes listeners affects the next emit only.
    this._listeners.set(event, list === undefined ? [listener] : list.concat(listener));
    return this;
  }

  /** Remove a listener added with on(); returns this. */
  off(event, listener) {
    const list = this._listeners.get(event);
    const at = list === undefined ? -1 : list.indexOf(listener);
    if (at !== -1) {
      if (list.length === 1) this._listeners.delete(event);
      else this._listeners.set(event, list.filter((_, i) => i !== at));
    }
    return this;
  }

  _emit(event, a, b) {
    const list = this._listeners.get(event);
    if (list === undefined) return false;
    for (let i = 0; i < list.length; i++) {
      try {
        list[i].call(this, a, b);
      } catch (error) {
        rethrow(error);
      }
    }
    return true;
  }
}

/**
 * A Server-Sent Events stream read with fetch(), shaped like the WebSocket the
 * client drives: `onopen` when the daemon answers 200, `onmessage({data})` for each
 * event (a message's envelope, or a reply's JSON, whose `type` names it), and
 * `onclose({code, reason})` once, with the code of the daemon's last `event: close`,
 * or 1006 when the stream ended without one or the request failed. `onkeepalive`
 * is called for the daemon's comment lines. `send()` does nothing: a stream is one-way.
 */
class EventStreamSocket {
  constructor(url, headers, fetchImpl) {
    this.url = url;
    this.readyState = 0;
    this.onopen = this.onmessage = this.onclose = this.onkeepalive = null;
    this.onerror = noop;
    this._abort = new AbortController();
    this._closeCode = 1006;
    this._closeReason = "";
    this._run(headers, fetchImpl).then(
      () => this._end(this._closeCode, this._closeReason),
      (error) => this._end(1006, String((error && error.message) || error)),
    );
  }

  send() {}

  close() {
    if (this.readyState === 3) return;
    this.readyState = 3;
    this._abort.abort();
  }

  async _run(headers, fetchImpl) {
    const response = await fetchImpl(this.url, { headers, cache: "no-store", signal: this._abort.signal });
    if (response.status !== 200 || response.body == null) {
      let why = `HTTP ${response.status}`;
      try {
        const { error } = JSON.parse(await response.text());
        why += ` ${error.code}: ${error.message}`;
      } catch {
        // not the daemon's JSON error: the status says enough
      }
      this._closeReason = why;
      return;
    }
    if (this.readyState !== 0) return;
    this.readyState = 1;
    this.onopen?.({ target: this });
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    let data = null; // the event's data lines so far, joined with "\n"
    let name = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done || this.readyState !== 1) return;
      buffer += decoder.decode(value, { stream: true });
      let start = 0;
      for (let end = buffer.indexOf("\n"); end !== -1; end = buffer.indexOf("\n", start)) {
        let line = buffer.slice(start, end);
        start = end + 1;
        if (line.endsWith("\r")) line = line.slice(0, -1);
        if (line === "") {
          if (data !== null) this._event(name, data);
          data = null;
          name = "";
          if (this.readyState !== 1) return;
          continue;
        }
        const colon = line.indexOf(":");
        if (colon === 0) {
          this.onkeepalive?.();
          continue;
        }
        const field = colon === -1 ? line : line.slice(0, colon);
        const text = colon === -1 ? "" : line.slice(line[colon + 1] === " " ? colon + 2 : colon + 1);
        if (field === "data") data = data === null ? text : `${data}\n${text}`;
        else if (field === "event") name = text;
        if (data !== null && data.length > MAX_EVENT) throw new Error("an event too large");
      }
      buffer = buffer.slice(start);
      if (buffer.length > MAX_EVENT) throw new Error("a line too long");
    }
  }

  _event(name, data) {
    if (name === "close") {
      // The daemon ends the stream: the close code and reason a WebSocket would get.
      try {
        const { code, reason } = JSON.parse(data);
        this._closeCode = code;
        this._closeReason = reason;
      } catch {
        // keep 1006
      }
      this.readyState = 2;
      return;
    }
    this.onmessage?.({ target: this, data });
  }

  _end(code, reason) {
    const told = this.readyState === 3;
    this.readyState = 3;
    this._abort.abort();
    if (!told) this.onclose?.({ target: this, code, reason });
  }
}

/** One channel of a BroadcastClient; made by client.subscribe(). */
export class Subscription extends Emitter {
  constructor(client, channel, since) {
    super();
    this.client = client;
    this.channel = channel;
    /** "subscribing" until the daemon confirms, "subscribed", or "unsubscribed". */
    this.state = "subscribing";
    /** The epoch of the channel's count (null until the first `subscribed`). */
    this.epoch = null;
    /** The offset of the last message delivered (or of the channel when subscribed). */
    this.offset = 0;
    this._last = 0; // since {last: N}, until the first `subscribed`
    this._joined = false; // `subscribed` received on the current connection
    this._sentOn = 0; // the connection (generation) its subscribe went out on
    this._requestId = 0; // the id of its subscribe command (0: named in the URL)
    this._failedOn = 0; // the connection on which the daemon refused it
    if (since != null) {
      if (typeof since.epoch === "string" && Number.isInteger(since.offset) && since.offset >= 0) {
        this.epoch = since.epoch;
        this.offset = since.offset;
      } else if (Number.isInteger(since.last) && since.last > 0) {
        this._last = since.last;
      } else {
        throw new TypeError("since must be {epoch, offset} or {last: N}");
      }
    }
  }

  /** {epoch, offset} of the last message seen (store it to resume later), or null. */
  get position() {
    return this.epoch === null ? null : { epoch: this.epoch, offset: this.offset };
  }

  /** Leave the channel. */
  unsubscribe() {
    this.client._remove(this);
  }

  /** A page of who subscribes to this channel: see BroadcastClient.presence(). */
  presence(cursor) {
    return this.client.presence(this.channel, cursor);
  }

  /** How many clients and users subscribe to this channel: see BroadcastClient.presenceStats(). */
  presenceStats() {
    return this.client.presenceStats(this.channel);
  }
}

/**
 * A connection to a broadcastd daemon.
 *
 *   const client = new BroadcastClient("ws://host:8765/", { getToken });
 *   const sub = client.subscribe("news");
 *   sub.on("message", (m) => show(m.data));
 *   client.connect();
 */
export class BroadcastClient extends Emitter {
  constructor(url, options = {}) {
    super();
    const transport = options.transport ?? "auto";
    if (!TRANSPORTS.includes(transport)) {
      throw new TypeError(`transport must be "auto", "websocket" or "sse"; got ${String(transport)}`);
    }
    const WebSocketImpl = options.WebSocket ?? globalThis.WebSocket;
    const fetchImpl = options.fetch ?? globalThis.fetch;
    const canSse = typeof fetchImpl === "function";
    if (typeof WebSocketImpl !== "function" && (transport === "websocket" || (transport === "auto" && !canSse))) {
      throw new TypeError("no WebSocket: pass options.WebSocket (e.g. the ws package's)");
    }
    if (transport === "sse" && !canSse) throw new TypeError("no fetch: Server-Sent Events are read with fetch()");
    const parsed = new URL(url);
    parsed.hash = "";
    if (parsed.protocol === "http:" || parsed.protocol === "https:") {
      parsed.protocol = parsed.protocol === "http:" ? "ws:" : "wss:";
    }
    if (parsed.protocol !== "ws:" && parsed.protocol !== "wss:") {
      throw new TypeError(`not a WebSocket URL: ${url}`);
    }
    /** The daemon's URL, as given (channels and since are added to it, and the token
     * with `tokenInUrl`). */
    this.url = parsed.href;
    /** connecting, connected, disconnected or closed. */
    this.state = DISCONNECTED;
    /** This connection's client id, as the daemon told it in its first reply (what
     * presence and the server API name it by); null until then, new at each reconnection. */
    this.clientId = null;
    /** The token's user (its `sub`), as the daemon told it; null without a token. */
    this.user = null;
    /** "websocket" or "sse": the transport of the current connection (or of the next
     * attempt while there is none). */
    this.transport = transport === "sse" || typeof WebSocketImpl !== "function" ? "sse" : "websocket";
    this._WebSocket = WebSocketImpl;
    this._fetch = fetchImpl;
    this._auto = transport === "auto" && typeof WebSocketImpl === "function" && canSse;
    this._fallbackAfter = options.fallbackAfter ?? 2;
    this._wsFailures = 0; // WebSocket attempts in a row that never opened
    this._sseOpened = false; // auto: an SSE stream opened, so the client stays on SSE
    this._wsOpened = false; // auto: a WebSocket opened, so the client stays on WebSocket
    this._opened = false; // the current connection opened
    this._reopening = false; // a reopen of the stream (new channels, new token) is queued
    this._token = options.token ?? null;
    this._getToken = options.getToken ?? null;
    this._needToken = this._token === null && this._getToken !== null;
    this._tokenInUrl = options.tokenInUrl === true;
    this._minBackoff = options.minBackoff ?? 500;
    this._maxBackoff = options.maxBackoff ?? 20000;
    this._stableAfter = options.stableAfter ?? 10000;
    this._connectTimeout = options.connectTimeout ?? 10000;
    this._pingInterval = options.pingInterval ?? 25000;
    this._subs = new Map();
    this._ws = null;
    this._generation = 0; // counts connection attempts
    this._wanted = false; // connect() was called, close() was not since
    this._suspended = false; // the page is hidden in the back/forward cache
    this._fetching = false; // a getToken() call is under way
    this._attempt = 0; // failed attempts since the last stable connection
    this._inUrl = []; // the subscriptions named in the current connection's URL
    this._authFirst = false; // the current connection sends its token before any channel
    this._authId = 0; // the id of the token command whose acceptance the connection waits for
    this._connToken = null; // the token the current connection was given (URL or command)
    this._ready = false; // open, and authenticated where the token goes first
    this._requests = 0;
    this._asked = new Map(); // id -> {resolve, reject} of presence requests awaiting their answer
    this._received = false;
    this._pinged = false;
    this._retryTimer = null;
    this._openTimer = null;
    this._stableTimer = null;
    this._pingTimer = null;
    // Bound once: no closure is made per connection or per message.
    this._onOpen = this._onOpen.bind(this);
    this._onMessage = this._onMessage.bind(this);
    this._onClose = this._onClose.bind(this);
    this._onRetry = this._onRetry.bind(this);
    this._onOpenTimeout = this._onOpenTimeout.bind(this);
    this._onStable = this._onStable.bind(this);
    this._onPingTick = this._onPingTick.bind(this);
    this._onPageHide = this._onPageHide.bind(this);
    this._onPageShow = this._onPageShow.bind(this);
    this._onOnline = this._onOnline.bind(this);
    this._onKeepalive = this._onKeepalive.bind(this);
    this._reopen = this._reopen.bind(this);
  }

  /** Start (or restart after close()) connecting; the socket opens once a channel is subscribed. */
  connect() {
    if (this._wanted) return this;
    this._wanted = true;
    this._attempt = 0;
    if (this._auto) {
      this._wsFailures = 0;
      this._sseOpened = this._wsOpened = false;
      this.transport = "websocket";
    }
    this._page(true);
    if (this._subs.size === 0) this._setState(DISCONNECTED);
    else this._open();
    return this;
  }

  /** Close the connection (code 1000) and stop reconnecting. Subscriptions are kept:
   * connect() again resumes them from their positions. */
  close() {
    this._wanted = false;
    this._page(false);
    this._drop(1000, "client closed");
    this._setState(CLOSED);
    return this;
  }

  /**
   * Subscribe to a channel. `since` resumes after a known position ({epoch, offset},
   * e.g. a stored sub.position) or starts with the last N messages kept ({last: N}).
   */
  subscribe(channel, options = {}) {
    if (typeof channel !== "string" || !CHANNEL.test(channel)) {
      throw new TypeError(`bad channel name: ${String(channel).slice(0, 140)}`);
    }
    if (this._subs.has(channel)) throw new Error(`already subscribed to ${channel}`);
    const sub = new Subscription(this, channel, options.since);
    this._subs.set(channel, sub);
    if (this._ws !== null) {
      if (this._stream()) this._queueReopen();
      else if (this._ready) this._sendSubscribe(sub);
      // else it is sent when the connection under way is ready
    } else {
      this._open();
    }
    return sub;
  }

  /** Use `token` from now on: sent as a `refresh` on the open connection (answered by an
   * `authenticated` event) and given to the next ones. */
  setToken(token) {
    this._token = checkToken(token);
    this._needToken = false;
    if (this._stream()) this._queueReopen(); // a stream's token is its request's
    else if (this._ws !== null && this._ws.readyState === OPEN) this._sendToken("refresh");
    return this;
  }

  /**
   * A page of who subscribes to `channel` (one this connection subscribes to, in a
   * namespace with presence_for_subscribers): resolves to the daemon's
   * {type: "presence", channel, clients, next}; give `next` as `cursor` for the
   * next page. Rejects with a BroadcastError: the daemon's refusal, or "network".
   */
  presence(channel, cursor) {
    const command = { op: "presence", channel };
    if (cursor != null) command.cursor = cursor;
    return this._ask(command);
  }

  /** Resolves to {type: "presence_stats", channel, clients, users}; rejects as presence() does. */
  presenceStats(channel) {
    return this._ask({ op: "presence_stats", channel });
  }

  _ask(command) {
    if (this.transport === "sse") {
      const why = `${command.op} needs a WebSocket: a Server-Sent Events stream is one-way`;
      return Promise.reject(new BroadcastError("one_way", why));
    }
    if (!this._ready) {
      const why = `not connected: ${command.op} needs an open connection`;
      return Promise.reject(new BroadcastError("network", why));
    }
    command.id = ++this._requests;
    return new Promise((resolve, reject) => {
      this._asked.set(command.id, { resolve, reject });
      this._send(JSON.stringify(command));
    });
  }

  /** The subscription of `channel`, if any. */
  getSubscription(channel) {
    return this._subs.get(channel);
  }

  /** All current subscriptions. */
  get subscriptions() {
    return Array.from(this._subs.values());
  }

  // -- connection --------------------------------------------------------

  _open() {
    if (!this._wanted || this._suspended || this._ws !== null || this._fetching) return;
    if (this._retryTimer !== null || this._subs.size === 0) return;
    if (this._auto) {
      // Until one transport has opened: SSE after fallbackAfter WebSockets in a row
      // that never opened (a proxy that breaks upgrades breaks every one), and back
      // to WebSocket after a stream that did not open either (the daemon may be
      // down). Once one has opened, the client keeps to it: a WebSocket that worked
      // and fails now is an outage, not a proxy.
      if (this._sseOpened) this.transport = "sse";
      else if (this._wsOpened) this.transport = "websocket";
      else this.transport = this._wsFailures >= this._fallbackAfter ? "sse" : "websocket";
    }
    this._setState(CONNECTING, { transport: this.transport });
    if (!this._wanted || this._ws !== null || this._fetching) return; // a listener acted
    if (this._needToken) {
      this._fetchToken(this._needToken === true ? "connect" : this._needToken);
      return;
    }
    const generation = ++this._generation;
    this._opened = false;
    let ws;
    try {
      if (this.transport === "sse") {
        const url = this._connectUrl(generation).replace(/^ws/, "http");
        const headers = { accept: "text/event-stream" };
        if (this._token !== null && !this._tokenInUrl) headers.authorization = `Bearer ${this._token}`;
        this._connToken = this._token;
        ws = new EventStreamSocket(url, headers, this._fetch);
        ws.onkeepalive = this._onKeepalive;
      } else {
        ws = new this._WebSocket(this._connectUrl(generation));
      }
    } catch (error) {
      this._emit("error", error);
      this._retry(0, String(error && error.message));
      return;
    }
    ws.onopen = this._onOpen;
    ws.onmessage = this._onMessage;
    ws.onclose = this._onClose;
    ws.onerror = noop; // a failed handshake is reported by onclose (1006)
    this._ws = ws;
    this._openTimer = setTimeout(this._onOpenTimeout, this._connectTimeout);
  }

  _connectUrl(generation) {
    const url = new URL(this.url);
    const query = url.searchParams;
    this._inUrl.length = 0;
    for (const sub of this._subs.values()) {
      sub._joined = false;
      sub._requestId = 0;
      sub._sentOn = 0; // subscribed by a command once ready, unless named in the URL below
    }
    const stream = this.transport === "sse";
    this._authFirst = this._token !== null && !this._tokenInUrl && !stream;
    this._connToken = null;
    if (this._authFirst) return url.href;
    if (this._token !== null && this._tokenInUrl) query.set("token", (this._connToken = this._token));
    else if (this._token !== null && !stream) query.set("token", (this._connToken = this._token));
    let length = url.href.length;
    for (const sub of this._subs.values()) {
      let key = "since";
      let value;
      if (sub.epoch !== null) value = `${sub.channel}:${sub.epoch}:${sub.offset}`;
      else if (sub._last > 0) value = `${sub.channel}:last:${sub._last}`;
      else [key, value] = ["channel", sub.channel];
      const more = key.length + value.length + 8; // '&', '=' and room for %23
      if (length + more > MAX_URL && !stream) continue; // subscribed by a command once open
      length += more;
      query.append(key, value);
      sub._sentOn = generation;
      this._inUrl.push(sub);
    }
    return url.href;
  }

  _onOpen(event) {
    if (event.target !== this._ws) return;
    this._opened = true;
    if (this.transport === "sse") this._sseOpened = this._auto;
    else this._wsOpened = this._auto;
    // The token first; the channels once it is accepted (_onReady), within connectTimeout.
    if (this._authFirst) this._sendToken("auth");
    else this._onReady();
  }

  /** The connection is open (and its token accepted): subscribe, and it counts as up. */
  _onReady() {
    this._ready = true;
    this._authId = 0;
    clearTimeout(this._openTimer);
    this._openTimer = null;
    this._received = false;
    this._pinged = false;
    this._stableTimer = setTimeout(this._onStable, this._stableAfter);
    if (this._pingInterval > 0) this._pingTimer = setInterval(this._onPingTick, this._pingInterval);
    if (this.transport === "sse") {
      this._setState(CONNECTED, { transport: "sse" });
      // Channels or a token that changed while the stream was being opened.
      const changed = this._token !== this._connToken || this._inUrl.length !== this._subs.size ||
        this._inUrl.some((sub) => this._subs.get(sub.channel) !== sub);
      if (changed) this._queueReopen();
      return;
    }
    // A token given by setToken() while the URL's connection was being made.
    if (this._token !== null && this._token !== this._connToken) this._sendToken("refresh");
    // Channels unsubscribed while the connection was being made: leave them.
    for (const sub of this._inUrl) {
      if (this._subs.get(sub.channel) !== sub) {
        this._send(JSON.stringify({ op: "unsubscribe", channel: sub.channel }));
      }
    }
    // Channels subscribed meanwhile or that did not fit in the URL; every channel
    // when the token went first.
    for (const sub of this._subs.values()) {
      if (sub._sentOn !== this._generation) this._sendSubscribe(sub);
    }
    this._setState(CONNECTED, { transport: "websocket" });
  }

  _onClose(event) {
    if (event.target !== this._ws) return;
    this._lost(event.code, event.reason);
  }

  _onOpenTimeout() {
    this._openTimer = null;
    this._lost(0, "connect timeout");
  }

  _onKeepalive() {
    this._received = true; // the daemon's comment line: the stream is alive
  }

  /** Reopen the stream soon (once for changes made together): a stream cannot be
   * told of new channels or a new token, its request must carry them. */
  _queueReopen() {
    if (this._reopening) return;
    this._reopening = true;
    queueMicrotask(this._reopen);
  }

  _reopen() {
    this._reopening = false;
    if (this._ws === null || !this._stream()) return;
    this._drop(1000, "reopened");
    if (this._subs.size === 0) this._setState(DISCONNECTED);
    else this._open();
  }

  _stream() {
    return this._ws !== null && this.transport === "sse";
  }

  _onStable() {
    this._stableTimer = null;
    this._attempt = 0; // only a connection that stayed up resets the backoff
  }

  _onPingTick() {
    // Any frame proves the path works. A silent interval sends a ping; a second
    // silent one means the connection is dead (a laptop that slept, a NAT that
    // forgot it): drop it without waiting for TCP to notice.
    if (this._received) {
      this._received = false;
      this._pinged = false;
    } else if (!this._pinged) {
      this._pinged = true;
      this._send(PING);
    } else {
      this._lost(0, "no answer to ping");
    }
  }

  _onRetry() {
    this._retryTimer = null;
    this._open();
  }

  /** The connection ended (or never opened): reconnect unless it makes no sense. */
  _lost(code, reason) {
    if (!this._opened && this._ws !== null && this._auto) {
      if (this.transport === "websocket") this._wsFailures++;
      else if (!this._sseOpened) this._wsFailures = 0;
    }
    this._drop(1000, reason);
    if (!this._wanted) return;
    const detail = { code, reason, transport: this.transport };
    if (code === 4001 || code === 4002 || code === 4003) {
      // 4001 authentication required, 4002 token refused, 4003 token expired.
      if (this._getToken === null) {
        this._wanted = false;
        this._page(false);
        this._setState(CLOSED, detail);
        return;
      }
      this._needToken = code === 4003 ? "expired" : code === 4002 ? "invalid" : "required";
    }
    if (this._subs.size === 0) {
      this._setState(DISCONNECTED, detail); // idle until a subscribe
      return;
    }
    this._retry(code, reason);
  }

  _retry(code, reason) {
    const ceiling = Math.min(this._maxBackoff, this._minBackoff * 2 ** this._attempt);
    if (ceiling < this._maxBackoff) this._attempt++;
    const delay = Math.floor(Math.random() * ceiling); // full jitter
    clearTimeout(this._retryTimer);
    this._retryTimer = setTimeout(this._onRetry, delay);
    this._setState(DISCONNECTED, { code, reason, delay, transport: this.transport });
  }

  /** Forget the current socket (closing it if it is still there) and its timers. */
  _drop(code, reason) {
    clearTimeout(this._openTimer);
    clearTimeout(this._stableTimer);
    clearInterval(this._pingTimer);
    clearTimeout(this._retryTimer);
    this._openTimer = this._stableTimer = this._pingTimer = this._retryTimer = null;
    this._ready = false;
    this._authId = 0;
    for (const sub of this._subs.values()) sub._joined = false;
    if (this._asked.size > 0) {
      const asked = Array.from(this._asked.values());
      this._asked.clear();
      const why = `the connection closed (${reason})`;
      for (const { reject } of asked) reject(new BroadcastError("network", why));
    }
    const ws = this._ws;
    if (ws === null) return;
    this._ws = null;
    ws.onopen = ws.onmessage = ws.onclose = ws.onkeepalive = null;
    ws.onerror = noop;
    try {
      ws.close(code, reason.length > 100 ? reason.slice(0, 100) : reason);
    } catch {
      // already closed, or closing before it opened: nothing to do
    }
  }

  _fetchToken(why) {
    this._fetching = true;
    Promise.resolve()
      .then(() => this._getToken(why))
      .then((token) => {
        this._fetching = false;
        this._token = checkToken(token);
        this._needToken = false;
        this._open(); // unless close() came meanwhile
      })
      .catch((error) => {
        this._fetching = false;
        this._emit("error", error);
        if (this._wanted) this._retry(0, "getToken failed");
      });
  }

  _refresh() {
    // `expiring`: the token ends soon. Get a new one and send it on this connection.
    Promise.resolve()
      .then(() => this._getToken("expiring"))
      .then((token) => this.setToken(token))
      .catch((error) => this._emit("error", error)); // the close with 4003 follows and is handled
  }

  _send(text) {
    if (this._ws !== null && this._ws.readyState === OPEN) this._ws.send(text);
  }

  /** `auth` or `refresh` with the current token. Until the connection is ready, the
   * answer to the latest one decides whether it goes on: `authenticated` makes it
   * ready, an error reply drops it (_onAuthError). */
  _sendToken(op) {
    const id = ++this._requests;
    if (!this._ready) this._authId = id;
    this._connToken = this._token;
    this._send(JSON.stringify({ op, token: this._token, id }));
  }

  _sendSubscribe(sub) {
    const command = { op: "subscribe", channel: sub.channel, id: ++this._requests };
    if (sub.epoch !== null) command.since = { epoch: sub.epoch, offset: sub.offset };
    else if (sub._last > 0) command.since = { last: sub._last };
    sub._joined = false;
    sub._requestId = command.id;
    sub._sentOn = this._generation;
    this._send(JSON.stringify(command));
  }

  _remove(sub) {
    if (this._subs.get(sub.channel) !== sub) return;
    this._subs.delete(sub.channel);
    sub.state = "unsubscribed";
    sub._joined = false;
    if (this._stream()) this._queueReopen();
    else if (sub._sentOn === this._generation) {
      this._send(JSON.stringify({ op: "unsubscribe", channel: sub.channel }));
    }
  }

  _setState(state, detail) {
    if (state === this.state) return;
    this.state = state;
    this._emit("state", state, detail);
  }

  // -- frames ------------------------------------------------------------

  _onMessage(event) {
    this._received = true;
    let frame;
    try {
      frame = JSON.parse(event.data);
    } catch (error) {
      this._emit("error", error);
      return;
    }
    if (frame === null || typeof frame !== "object") return;
    if (frame.type === undefined) {
      // A message: {channel, offset, data}.
      const sub = this._subs.get(frame.channel);
      if (sub === undefined || !sub._joined) return;
      if (frame.offset <= sub.offset) return; // already delivered (never sent twice by the daemon)
      sub.offset = frame.offset;
      sub._emit("message", frame);
      return;
    }
    this._onEvent(frame);
  }

  _onEvent(frame) {
    if (typeof frame.client === "string" && (frame.type === "subscribed" || frame.type === "authenticated")) {
      this.clientId = frame.client;
      this.user = typeof frame.user === "string" ? frame.user : null;
    }
    if (frame.id !== undefined && this._asked.size > 0) {
      const asked = this._asked.get(frame.id);
      if (asked !== undefined) {
        this._asked.delete(frame.id);
        if (frame.type === "error") asked.reject(new BroadcastError(frame.code, frame.message, frame));
        else asked.resolve(frame);
        return;
      }
    }
    switch (frame.type) {
      case "subscribed":
        this._onSubscribed(frame);
        break;
      case "error":
        this._onError(frame);
        break;
      case "missed":
        if (typeof frame.channel === "string") {
          this._tell(this._subs.get(frame.channel), "missed", frame);
        } else {
          // drop_oldest: messages of some channels of this connection were dropped.
          for (const sub of this._subs.values()) sub._emit("missed", frame);
          this._emit("missed", frame);
        }
        break;
      case "resync": {
        // Redis broker: the channel lost messages or restarted its count.
        const sub = this._subs.get(frame.channel);
        if (sub !== undefined) {
          sub.epoch = frame.epoch;
          sub.offset = frame.offset;
        }
        this._tell(sub, "resync", frame);
        break;
      }
      case "authenticated": {
        const awaited = this._authId !== 0 && frame.id === this._authId;
        this._emit("authenticated", frame);
        if (awaited && this._authId === frame.id) this._onReady(); // unless a listener acted
        break;
      }
      case "expiring":
        this._emit("expiring", frame);
        if (this._getToken !== null) this._refresh();
        break;
      case "join":
      case "leave":
        // Another client came or went (a namespace with join_leave); to listeners only.
        this._tell(this._subs.get(frame.channel), frame.type, frame);
        break;
      default:
        break; // pong, unsubscribed, and types this version does not know
    }
  }

  _onSubscribed(frame) {
    const sub = this._subs.get(frame.channel);
    if (sub === undefined) return;
    if (frame.id !== undefined && frame.id !== sub._requestId) return; // an earlier request's reply
    sub._joined = true;
    sub.state = "subscribed";
    if (frame.recovered === true) {
      sub.epoch = frame.epoch; // the replay that follows brings the offset up to date
    } else if (sub._last > 0 && frame.recovered === undefined) {
      sub.epoch = frame.epoch; // the last N kept follow
      sub.offset = Math.max(0, frame.offset - sub._last);
    } else {
      sub.epoch = frame.epoch;
      sub.offset = frame.offset;
    }
    sub._last = 0;
    sub._emit("subscribed", frame);
    if (frame.recovered !== undefined) this._tell(sub, "recovered", frame);
  }

  _onError(frame) {
    if (frame.op !== "subscribe") {
      this._tell(undefined, "error", frame); // connect (a close follows), auth, refresh, ...
      if (this._authId !== 0 && frame.id === this._authId) this._onAuthError(frame);
      return;
    }
    const generation = this._generation;
    let sub;
    if (frame.id !== undefined) {
      for (const candidate of this._subs.values()) {
        if (candidate._requestId === frame.id) sub = candidate;
      }
    } else {
      // A channel named in the URL: errors carry no channel, so take the refused
      // one among those still waiting, by its name in the message, else the first.
      for (const candidate of this._inUrl) {
        if (candidate._joined || candidate._failedOn === generation) continue;
        if (this._subs.get(candidate.channel) !== candidate) continue;
        if (sub === undefined) sub = candidate;
        if (typeof frame.message === "string" && frame.message.includes(`'${candidate.channel}'`)) {
          sub = candidate;
          break;
        }
      }
    }
    if (sub !== undefined) {
      sub._failedOn = generation;
      if (TRANSIENT.has(frame.code)) {
        // The daemon says try again: do so on this connection, after a while.
        const delay = 500 + Math.floor(Math.random() * 1500);
        setTimeout(() => {
          if (this._subs.get(sub.channel) === sub && !sub._joined && this._generation === generation) {
            this._sendSubscribe(sub);
          }
        }, delay);
      }
    }
    this._tell(sub, "error", frame);
  }

  /** The token the connection waits on was refused: as the daemon does with a token
   * refused in the URL (a close with 4002, or 4003 if it expired), drop the
   * connection, then get a new token or stop. */
  _onAuthError(frame) {
    if (frame.code === "bad_command") {
      // The daemon checks no tokens (it has no [auth]): its channels need none.
      this._onReady();
      return;
    }
    if (frame.code === "token_expired") this._lost(4003, "token expired");
    else this._lost(4002, "invalid token");
  }

  /** An event of one channel: to its subscription and to the client's listeners. */
  _tell(sub, event, frame) {
    let heard = sub !== undefined && sub._emit(event, frame);
    heard = this._emit(event, frame) || heard;
    if (!heard && (event === "error" || event === "resync" || frame.recovered === false)) {
      // Nobody listens for what means the state shown may be wrong: say it anyway.
      console.warn(`broadcastd: ${event}`, frame);
    }
  }

  // -- the page ----------------------------------------------------------

  _page(listen) {
    const w = typeof window === "object" && window !== null ? window : null;
    if (w === null || typeof w.addEventListener !== "function") return;
    const method = listen ? "addEventListener" : "removeEventListener";
    w[method]("pagehide", this._onPageHide);
    w[method]("pageshow", this._onPageShow);
    w[method]("online", this._onOnline);
  }

  _onPageHide() {
    // Leaving the page (or entering the back/forward cache): close cleanly with
    // 1000 rather than leave the daemon to find out.
    this._suspended = true;
    this._drop(1000, "page hidden");
    this._setState(DISCONNECTED);
  }

  _onPageShow() {
    if (!this._suspended) return;
    this._suspended = false;
    this._open();
  }

  _onOnline() {
    // The network is back: do not wait out the backoff.
    if (this._retryTimer === null) return;
    clearTimeout(this._retryTimer);
    this._retryTimer = null;
    this._open();
  }
}

export default BroadcastClient;
