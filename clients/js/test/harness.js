// What the tests need around the client: a real broadcastd daemon (as
// tests/conftest.py's DaemonProcess starts it), publishing over its control
// port, a TCP proxy that can cut connections and keeps request lines as an
// access log does, HS256 tokens, waiting, and what a Chromium page reports.

import { spawn } from "node:child_process";
import { createHmac } from "node:crypto";
import { once } from "node:events";
import { mkdtemp, readFile, rm } from "node:fs/promises";
import http from "node:http";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import readline from "node:readline";
import { fileURLToPath } from "node:url";

export const PACKAGE = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
export const ROOT = path.resolve(PACKAGE, "..", "..");

/** How to run broadcastd: JS_TEST_PYTHON (set by tests/test_js_client.py) runs
 * `python -m broadcastd`; otherwise the repository's .venv/bin/broadcastd. */
function daemonCommand() {
  const python = process.env.JS_TEST_PYTHON;
  if (python) return [python, ["-m", "broadcastd"]];
  return [path.join(ROOT, ".venv", "bin", "broadcastd"), []];
}

/** `broadcastd serve` on loopback; `wsPort` 0 picks a free port (give the old one to restart). */
export class Daemon {
  constructor({ wsPort = 0, args = [], env = {} } = {}) {
    this.wsPort = wsPort;
    this.args = args;
    this.env = env; // BROADCASTD_* settings of this daemon
    this.controlPort = 0;
    this.events = [];
    this.stderr = [];
    this.proc = null;
    this._waiters = [];
  }

  async start() {
    const [command, prefix] = daemonCommand();
    const env = {};
    for (const [key, value] of Object.entries(process.env)) {
      if (!key.startsWith("BROADCASTD_")) env[key] = value;
    }
    Object.assign(env, this.env);
    const argv = [
      ...prefix, "serve",
      "--ws-host", "127.0.0.1", "--ws-port", String(this.wsPort),
      "--control-port", "0", "--metrics-port", "0", "--log-format", "json",
      ...this.args,
    ];
    this.proc = spawn(command, argv, { cwd: ROOT, env, stdio: ["ignore", "pipe", "pipe"] });
    this.exited = once(this.proc, "exit");
    const stderr = this.stderr;
    this.proc.stderr.on("data", (chunk) => stderr.push(chunk));
    readline.createInterface({ input: this.proc.stdout }).on("line", (line) => {
      let event;
      try {
        event = JSON.parse(line);
      } catch {
        event = { event: "non-json", text: line };
      }
      this.events.push(event);
      this._waiters = this._waiters.filter((waiter) => !waiter(event));
    });
    const ready = this.waitForEvent((e) => e.event === "daemon.ready", 20000);
    const exited = this.exited.then(([code]) => {
      throw new Error(`broadcastd exited (${code}) before ready: ${Buffer.concat(stderr)}\n` +
        JSON.stringify(this.events));
    });
    const event = await Promise.race([ready, exited]);
    exited.catch(() => {});
    this.wsPort = Number(event.ws.split(":").pop());
    this.controlPort = Number(event.control.split(":").pop());
    return this;
  }

  get wsUrl() {
    return `ws://127.0.0.1:${this.wsPort}/`;
  }

  /** Every line it wrote so far, stdout (its log) and stderr, as text. */
  output() {
    return [...this.events.map((event) => JSON.stringify(event)), Buffer.concat(this.stderr).toString()];
  }

  /** The first log event (seen or to come) for which `predicate` is true. */
  waitForEvent(predicate, timeout = 10000) {
    const seen = this.events.find(predicate);
    if (seen) return Promise.resolve(seen);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this._waiters = this._waiters.filter((waiter) => waiter !== check);
        reject(new Error(`no such daemon log event within ${timeout} ms`));
      }, timeout);
      const check = (event) => {
        if (!predicate(event)) return false;
        clearTimeout(timer);
        resolve(event);
        return true;
      };
      this._waiters.push(check);
    });
  }

  /** SIGTERM (a drain: clients are closed with 1001), SIGKILL if it lingers. */
  async stop() {
    if (this.proc === null || this.proc.exitCode !== null || this.proc.signalCode !== null) return;
    this.proc.kill("SIGTERM");
    const timer = setTimeout(() => this.proc.kill("SIGKILL"), 10000);
    await this.exited;
    clearTimeout(timer);
  }

  async publish(channel, data) {
    const response = await fetch(`http://127.0.0.1:${this.controlPort}/publish/${channel}`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify(data),
    });
    if (response.status !== 200) throw new Error(`publish: ${response.status} ${await response.text()}`);
    return response.json();
  }

  /** Publish `datas` to `channel` in order, `size` per /batch request. */
  async publishMany(channel, datas, size = 500) {
    for (let i = 0; i < datas.length; i += size) {
      const items = datas.slice(i, i + size).map((data) => ({ channel, data }));
      const response = await fetch(`http://127.0.0.1:${this.controlPort}/batch`, {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify(items),
      });
      const body = await response.json();
      if (response.status !== 200 || body.failed !== 0) {
        throw new Error(`batch: ${response.status} ${JSON.stringify(body).slice(0, 500)}`);
      }
    }
  }
}

/** A TCP proxy to `port` whose connections the test can cut, and refuse while blocked.
 * It keeps the request line of each connection it passes on, as the access log of
 * a reverse proxy would. With `refuseUpgrades`, it cuts every request whose head asks
 * for a WebSocket upgrade, as some corporate proxies do, and passes the others on. */
export class Proxy {
  constructor(targetPort, { refuseUpgrades = false } = {}) {
    this.targetPort = targetPort;
    this.refuseUpgrades = refuseUpgrades;
    this.refused = 0;
    this.blocked = false;
    this.sockets = new Set();
    this.accepted = 0;
    this.requests = [];
    this.server = net.createServer((client) => this._accept(client));
  }

  async start(port = 0) {
    this.server.listen(port, "127.0.0.1");
    await once(this.server, "listening");
    this.port = this.server.address().port;
    return this;
  }

  get url() {
    return `ws://127.0.0.1:${this.port}/`;
  }

  _accept(client) {
    if (this.blocked) {
      client.destroy();
      return;
    }
    if (this.refuseUpgrades) {
      this._screen(client);
      return;
    }
    this._pass(client, null);
  }

  /** Read the request's head; cut the connection if it asks for an upgrade. */
  _screen(client) {
    let head = Buffer.alloc(0);
    const sockets = this.sockets;
    sockets.add(client);
    const onClose = () => sockets.delete(client);
    const onData = (chunk) => {
      head = Buffer.concat([head, chunk]);
      const text = head.toString("latin1");
      if (!text.includes("\r\n\r\n") && head.length < 16384) return;
      client.off("data", onData);
      client.off("close", onClose);
      client.off("error", onClose);
      sockets.delete(client);
      if (/^upgrade:\s*websocket/im.test(text)) {
        this.refused++;
        client.destroy();
        return;
      }
      this._pass(client, head);
    };
    client.on("data", onData);
    client.on("close", onClose);
    client.on("error", onClose);
  }

  _pass(client, screened) {
    this.accepted++;
    if (screened !== null) this.requests.push(screened.toString("latin1").split("\r\n", 1)[0]);
    let head = "";
    const readHead = (chunk) => {
      head += chunk.toString("latin1");
      const end = head.indexOf("\r\n");
      if (end === -1 && head.length < 16384) return;
      client.off("data", readHead);
      this.requests.push(end === -1 ? head : head.slice(0, end));
    };
    if (screened === null) client.on("data", readHead);
    const upstream = net.connect(this.targetPort, "127.0.0.1");
    if (screened !== null) upstream.write(screened);
    for (const [a, b] of [[client, upstream], [upstream, client]]) {
      this.sockets.add(a);
      a.on("error", () => b.destroy());
      a.on("close", () => {
        this.sockets.delete(a);
        b.destroy();
      });
      a.pipe(b);
    }
  }

  /** Cut every connection now (the client sees 1006) and refuse new ones. */
  block() {
    this.blocked = true;
    for (const socket of this.sockets) socket.destroy();
  }

  unblock() {
    this.blocked = false;
  }

  async stop() {
    this.block();
    await new Promise((resolve) => this.server.close(resolve));
  }
}

/** An HS256 JWT. */
export function jwt(secret, claims) {
  const encode = (value) => Buffer.from(JSON.stringify(value)).toString("base64url");
  const body = `${encode({ alg: "HS256", typ: "JWT" })}.${encode(claims)}`;
  return `${body}.${createHmac("sha256", secret).update(body).digest("base64url")}`;
}

/** Resolve once `condition()` is truthy (polled), or fail after `timeout` ms. */
export async function waitFor(condition, timeout = 10000, what = "condition") {
  const deadline = Date.now() + timeout;
  for (;;) {
    const value = await condition();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

/** Everything a subscription and its client tell, for assertions. */
export class Recorder {
  constructor(client, sub) {
    this.offsets = [];
    this.datas = [];
    this.recoveries = [];
    this.states = [];
    this.errors = [];
    sub.on("message", (m) => {
      this.offsets.push(m.offset);
      this.datas.push(m.data);
    });
    sub.on("recovered", (frame) => this.recoveries.push(frame));
    sub.on("error", (frame) => this.errors.push(frame));
    client.on("state", (state, detail) => this.states.push(detail ? { state, ...detail } : { state }));
  }
}

/** A static HTTP server of the example page and the client's source, from the repository. */
export class StaticServer {
  static TYPES = { ".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8" };

  constructor(routes = {}) {
    this.routes = routes; // extra resources: path -> HTML text, or {type, body}
    this.server = http.createServer((request, response) => this._serve(request, response));
  }

  async start() {
    this.server.listen(0, "127.0.0.1");
    await once(this.server, "listening");
    this.port = this.server.address().port;
    return this;
  }

  url(pathname) {
    return `http://127.0.0.1:${this.port}${pathname}`;
  }

  async _serve(request, response) {
    const pathname = decodeURIComponent(new URL(request.url, "http://x").pathname);
    let body = this.routes[pathname];
    let type = StaticServer.TYPES[".html"];
    if (body !== undefined && typeof body === "object") ({ type, body } = body);
    if (body === undefined) {
      const file = path.resolve(ROOT, `.${pathname}`);
      const allowed = ["examples/browser", "clients/js/src"].some((dir) =>
        file.startsWith(path.join(ROOT, dir) + path.sep),
      );
      type = StaticServer.TYPES[path.extname(file)];
      try {
        if (!allowed || type === undefined) throw new Error("not served");
        body = await readFile(file);
      } catch {
        response.writeHead(404).end();
        return;
      }
    }
    response.writeHead(200, { "content-type": type, "cache-control": "no-store" }).end(body);
  }

  async stop() {
    this.server.closeAllConnections();
    await new Promise((resolve) => this.server.close(resolve));
  }
}

export const CHROMIUM = process.env.CHROMIUM_PATH || "/usr/bin/chromium";

/** Headless Chromium with a fresh profile in a temporary directory (Playwright). */
export async function launchChromium(extraArgs = []) {
  const { chromium } = await import("playwright-core");
  const profile = await mkdtemp(path.join(os.tmpdir(), "broadcastd-chromium-"));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM,
    headless: true,
    args: [
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--disable-background-networking",
      "--disable-component-update",
      "--no-first-run",
      ...extraArgs,
    ],
  });
  const close = async () => {
    await context.close();
    await rm(profile, { recursive: true, force: true });
  };
  return { context, close };
}

/** Everything a page tells the outside about itself, through the DevTools protocol:
 * console messages (the page's own and the browser's, such as a WebSocket that
 * failed), uncaught exceptions, network failures, and the URL of every WebSocket
 * it opens. Each entry is {kind, text}, `text` the event's parameters as JSON. */
export async function recordPage(context, page) {
  const entries = [];
  const session = await context.newCDPSession(page);
  const kinds = [
    "Log.entryAdded",
    "Runtime.consoleAPICalled",
    "Runtime.exceptionThrown",
    "Network.loadingFailed",
    "Network.webSocketFrameError",
    "Network.webSocketCreated",
  ];
  for (const kind of kinds) session.on(kind, (params) => entries.push({ kind, text: JSON.stringify(params) }));
  await Promise.all(["Log.enable", "Runtime.enable", "Network.enable"].map((method) => session.send(method)));
  return { entries, session };
}
