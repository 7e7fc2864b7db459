"""The naive baseline: the broadcast pattern of the websockets guide.

Why it exists: it is what one writes in an afternoon following the websockets
documentation, so it shows what broadcastd's design (frames encoded once,
direct transport writes, bounded outboxes) buys over the obvious approach:

* ``websockets.asyncio.server.serve`` with default settings, except a larger
  listen backlog (a default of 100 would make the connection-storm scenario
  measure SYN retransmits rather than the server);
* per client an unbounded ``asyncio.Queue`` and one task doing
  ``await ws.send(message)`` per message (so each frame is built per client);
* a tiny HTTP control endpoint on httptools: ``POST /publish/{channel}``,
  ``POST /batch``, ``GET /readyz``, ``GET /channels/{name}``, answering in
  broadcastd's JSON shapes.

It speaks broadcastd's subscriber URL forms (``/?channel=a&channel=b``,
``/a,b``, ``&format=raw``) and envelope (``{"channel","offset","data"}``, with
a ``subscribed`` reply per channel in JSON mode), so one load client drives
both. It runs on uvloop, like broadcastd, so the comparison is of designs, not
of event loops (``--loop asyncio`` for the stock loop).

Run: ``python -m benchmarks.servers.naive --ws-port 8765 --control-port 8766``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import parse_qsl

import httptools
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed


@dataclass(eq=False)
class Client:
    raw: bool
    queue: asyncio.Queue[str] = field(default_factory=asyncio.Queue)


class Hub:
    """Channels, their offsets and their subscribers."""

    def __init__(self) -> None:
        self.subscribers: dict[str, set[Client]] = {}
        self.offsets: dict[str, int] = {}

    def publish(self, channel: str, data: Any) -> dict[str, Any]:
        offset = self.offsets.get(channel, 0) + 1
        self.offsets[channel] = offset
        clients = self.subscribers.get(channel, set())
        message = json.dumps({"channel": channel, "offset": offset, "data": data})
        raw = data if isinstance(data, str) else json.dumps(data)
        for client in clients:
            client.queue.put_nowait(raw if client.raw else message)
        return {"channel": channel, "offset": offset, "subscribers": len(clients)}


def parse_route(target: str) -> tuple[list[str], bool]:
    path, _, query = target.partition("?")
    channels = [c for c in path.strip("/").split(",") if c]
    raw = False
    for key, value in parse_qsl(query):
        if key == "channel":
            channels.append(value)
        elif key == "format":
            raw = value == "raw"
    return channels, raw


async def handler(hub: Hub, ws: ServerConnection) -> None:
    assert ws.request is not None
    channels, raw = parse_route(ws.request.path)
    if not channels:
        await ws.close(1008, "no channel")
        return
    client = Client(raw)
    for channel in channels:
        hub.subscribers.setdefault(channel, set()).add(client)
    sender = asyncio.create_task(send_loop(ws, client))
    try:
        if not raw:
            for channel in channels:
                reply = {
                    "type": "subscribed",
                    "channel": channel,
                    "offset": hub.offsets.get(channel, 0),
                }
                client.queue.put_nowait(json.dumps(reply))
        async for _ in ws:  # commands are not supported; just keep reading
            pass
    except ConnectionClosed:
        pass
    finally:
        sender.cancel()
        for channel in channels:
            hub.subscribers[channel].discard(client)


async def send_loop(ws: ServerConnection, client: Client) -> None:
    with contextlib.suppress(ConnectionClosed):
        while True:
            message = await client.queue.get()
            await ws.send(message)


class Control(asyncio.Protocol):
    """One control connection: llhttp parsing, answers in order (pipelining works)."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.body: list[bytes] = []
        self.content_type = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.respond(400, {"error": {"code": "bad_request", "message": "bad HTTP"}})
            if self.transport is not None:
                self.transport.close()

    def on_message_begin(self) -> None:
        self.url = b""
        self.body = []
        self.content_type = b""

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"content-type":
            self.content_type = value

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        method = self.parser.get_method().decode()
        path = self.url.decode("latin-1").partition("?")[0]
        try:
            status, doc = self.route(method, path, b"".join(self.body))
        except (ValueError, UnicodeDecodeError) as exc:
            status, doc = 400, {"error": {"code": "bad_request", "message": str(exc)[:200]}}
        self.respond(status, doc)
        if not self.parser.should_keep_alive() and self.transport is not None:
            self.transport.close()

    def route(self, method: str, path: str, body: bytes) -> tuple[int, Any]:
        hub = self.hub
        if method == "GET" and path == "/readyz":
            return 200, {"ready": True}
        if method == "GET" and path.startswith("/channels/"):
            name = path.removeprefix("/channels/")
            if name not in hub.offsets and name not in hub.subscribers:
                return 404, {"error": {"code": "not_found", "message": "no such channel"}}
            count = len(hub.subscribers.get(name, ()))
            return 200, {"name": name, "subscribers": count, "offset": hub.offsets.get(name, 0)}
        if method == "POST" and path.startswith("/publish/"):
            if self.content_type.startswith(b"application/json"):
                data = json.loads(body)
            else:
                data = body.decode()
            return 200, hub.publish(path.removeprefix("/publish/"), data)
        if method == "POST" and path == "/batch":
            results: list[Any] = []
            failed = 0
            for item in json.loads(body):
                if not isinstance(item, dict) or not isinstance(item.get("channel"), str):
                    failed += 1
                    results.append({"error": {"code": "bad_item", "message": "bad item"}})
                    continue
                results.append(hub.publish(item["channel"], item.get("data")))
            return 200, {"results": results, "published": len(results) - failed, "failed": failed}
        return 404, {"error": {"code": "not_found", "message": "no route"}}

    def respond(self, status: int, doc: Any) -> None:
        body = json.dumps(doc).encode()
        head = (
            f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        if self.transport is not None:
            self.transport.write(head.encode() + body)


async def main(ws_port: int, control_port: int, host: str) -> None:
    hub = Hub()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    control = await loop.create_server(lambda: Control(hub), host, control_port, backlog=2048)
    async with serve(lambda ws: handler(hub, ws), host, ws_port, backlog=2048):
        await stop.wait()
    control.close()


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ws-port", type=int, default=8765)
    parser.add_argument("--control-port", type=int, default=8766)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    args = parser.parse_args()
    coro = main(args.ws_port, args.control_port, args.host)
    if args.loop == "uvloop":
        import uvloop

        uvloop.run(coro)
    else:
        asyncio.run(coro)


if __name__ == "__main__":
    cli()
