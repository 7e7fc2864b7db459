"""A closed connection is freed by reference counting alone.

The daemon makes the cyclic collector rare (``cli._tune_gc``), so anything a
closed connection leaves in a reference cycle stays in memory until a full
collection: a control connection's last request body, a subscriber's protocol
and outbox. These tests close connections every way they can end, then look for
what is left: in process, with the collector off, ``gc.collect()`` under
``DEBUG_SAVEALL`` must find none of the connection's objects among the garbage
(they were freed before it ran); and in a real daemon, RSS must stay flat over
rounds of connections, with no explicit collection.
"""

from __future__ import annotations

import asyncio
import gc
import json
import resource
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import httpx
import jwt
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.server import ServerProtocol

from broadcastd.core.outbox import Outbox
from broadcastd.core.session import Session
from broadcastd.transport.http import HttpProtocol
from broadcastd.transport.ws import Connection
from broadcastd.transport.wsauth import ConnectionAuth

from .conftest import Running, cyclic_garbage_of, make_settings, recv_json, running_daemon
from .rawclient import RawClient
from .test_fault_injection import Daemon

OURS = (Connection, ServerProtocol, Session, Outbox, ConnectionAuth, HttpProtocol)
"""What one connection is made of: none may be left to the cyclic collector."""
SECRET = "s" * 32
MiB = 1024 * 1024


@contextmanager
def collector_off() -> Iterator[Callable[[], Counter[str]]]:
    """The cyclic collector off; the function returns what a collection would
    free of OURS (and of httptools' parser), by type name."""
    gc.collect()
    gc.disable()

    def left() -> Counter[str]:
        return Counter(cyclic_garbage_of(OURS, ("HttpRequestParser",)))

    try:
        yield left
    finally:
        gc.enable()


async def all_closed(d: Running) -> None:
    """Until the daemon holds no connection on either port (each close is an event
    the daemon has seen; the loop polls the sets those events empty)."""
    ws = d.daemon.ws
    control = d.daemon.control
    async with asyncio.timeout(30):
        while ws._all or control._connections:  # noqa: ASYNC110 - no event says "none left"
            await asyncio.sleep(0.01)


def token(**claims: Any) -> str:
    payload = {"sub": "alice", **claims}
    return jwt.encode(payload, SECRET, algorithm="HS256")


Scenario = Callable[[Running], Awaitable[None]]


async def until_closed(ws: Any) -> None:
    """Read until the server closes the connection."""
    async with asyncio.timeout(30):
        while True:
            try:
                await ws.recv()
            except ConnectionClosed:
                return


async def subscribe_and_close(d: Running) -> None:
    for _ in range(20):
        async with d.connect("/?channel=news") as ws:
            await recv_json(ws)


async def server_closes(d: Running) -> None:
    """The server ends it: a binary frame (1003), too many command errors (1008)."""
    for _ in range(10):
        async with d.connect("/?channel=news") as ws:
            await recv_json(ws)
            await ws.send(b"binary")
            with pytest.raises(ConnectionClosed):
                await ws.recv()
        async with d.connect("/") as ws:
            for _ in range(d.daemon.settings.ws.max_command_errors):
                await ws.send("not json")
            await until_closed(ws)


async def refused_and_reset(d: Running) -> None:
    """Refused handshakes, and connections reset mid-stream."""
    for _ in range(10):
        response = await d.http.get(f"{d.ws_url.replace('ws:', 'http:')}/?channel=")
        assert response.status_code >= 400
        raw = await RawClient.connect(d.ws_url + "/?channel=news")
        await raw.handshake()
        raw.writer.transport.abort()


async def slow_consumer(d: Running) -> None:
    """Clients that never read, cut by the slow-consumer policy."""
    clients = [await RawClient.connect(d.ws_url + "/?channel=big") for _ in range(3)]
    for client in clients:
        await client.handshake()
    while d.daemon.ws.client_count:
        # Connection: close, so that no keep-alive connection outlives the scenario
        await d.publish("big", "x" * 60_000, headers={"Connection": "close"})
    for client in clients:
        client.close()


async def with_tokens(d: Running) -> None:
    """Tokens in the URL, by command, refused, and expiring."""
    for _ in range(5):
        async with d.connect(f"/?channel=news&token={token(exp=time.time() + 600)}") as ws:
            await recv_json(ws)
        async with d.connect("/") as ws:
            await ws.send(json.dumps({"op": "auth", "token": token()}))
            await recv_json(ws)
            await ws.send(json.dumps({"op": "subscribe", "channel": "news"}))
            await recv_json(ws)
        async with d.connect("/?channel=news&token=garbage") as ws:
            await until_closed(ws)
    async with d.connect(f"/?channel=news&token={token(exp=time.time() + 1)}") as ws:
        await until_closed(ws)


async def control_requests(d: Running) -> None:
    """Served, refused (401, 413, malformed) and cut requests, each on a fresh
    connection."""
    body = json.dumps([{"channel": "news", "data": i} for i in range(100)]).encode()
    for _ in range(5):
        for headers, content in (
            ({"Authorization": "Bearer right"}, body),
            ({"Authorization": "Bearer wrong"}, body),
            ({"Authorization": "Bearer right"}, b"[" * (2 * MiB)),
        ):
            async with httpx.AsyncClient(base_url=d.control_url) as client:
                await client.post(
                    "/batch", content=content, headers={**headers, "Content-Type": "x/json"}
                )
        reader, writer = await asyncio.open_connection("127.0.0.1", d.daemon.control.port)
        writer.write(b"POST /batch HTTP/1.1\r\nContent-Length: 100000\r\n\r\n" + b"x" * 5000)
        writer.transport.abort()
        reader, writer = await asyncio.open_connection("127.0.0.1", d.daemon.control.port)
        writer.write(b"NOT HTTP\r\n\r\n")
        await reader.read()
        writer.close()


SCENARIOS: dict[str, Scenario] = {
    "subscribe_and_close": subscribe_and_close,
    "server_closes": server_closes,
    "refused_and_reset": refused_and_reset,
    "slow_consumer": slow_consumer,
    "with_tokens": with_tokens,
    "control_requests": control_requests,
}


@asynccontextmanager
async def release_daemon() -> AsyncIterator[Running]:
    settings = make_settings(
        auth__hmac_secret=SECRET,
        auth__leeway=0,
        control__token="right",
        control__max_body_bytes=MiB,
        ws__outbox_messages=8,
        ws__outbox_bytes=128 * 1024,
        ws__close_timeout=1,
    )
    async with running_daemon(settings) as d:
        d.http.headers["Authorization"] = "Bearer right"
        yield d


@pytest.mark.parametrize("name", sorted(SCENARIOS))
async def test_closed_connections_leave_nothing_to_the_cyclic_collector(name: str) -> None:
    async with release_daemon() as d:
        await subscribe_and_close(d)  # what is built once (caches, first imports)
        await all_closed(d)
        with collector_off() as left:
            left()
            await SCENARIOS[name](d)
            await all_closed(d)
            assert left() == Counter(), f"left to the cyclic collector after {name}"


# In a real daemon: RSS, with no explicit collection


ROUNDS = 6
PER_ROUND = 3000
FLAT = 6 * MiB
"""Most RSS may grow from the second round to the last (allocator noise). Left
to the cyclic collector, each round of PER_ROUND connections kept about 3.5 MiB."""


async def _connect_round(port: int, count: int) -> None:
    """``count`` connections that handshake, subscribe (in the URL) and read their
    ``subscribed`` reply, all held open together (so that what they are made of
    lives long enough to leave the youngest generation), then all closed."""
    request = (
        b"GET /?channel=churn HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 13\r\n\r\n"
    )

    async def one() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head
        first = await reader.readexactly(2)
        await reader.readexactly(first[1] & 0x7F)  # the subscribed reply (< 126 bytes)
        return reader, writer

    async def close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"\x88\x82abcd" + bytes([0x03 ^ 0x61, 0xE8 ^ 0x62]))  # close 1000
        await reader.read()
        writer.close()

    held = []
    for start in range(0, count, 200):
        held += await asyncio.gather(*(one() for _ in range(min(200, count - start))))
    for start in range(0, count, 200):
        await asyncio.gather(*(close(*pair) for pair in held[start : start + 200]))


async def _wait_for_no_clients(control_port: int) -> None:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{control_port}") as http:
        async with asyncio.timeout(30):
            while (await http.get("/stats")).json()["clients"]:
                pass  # each read is a round trip: the last close ends the loop


async def test_rss_stays_flat_over_rounds_of_subscribers_opened_and_closed() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < PER_ROUND + 100:
        pytest.skip(f"{PER_ROUND} connections need more files than the limit of {hard}")
    daemon = Daemon()
    try:
        rss = []
        for _ in range(ROUNDS):
            await _connect_round(daemon.ws_port, PER_ROUND)
            await _wait_for_no_clients(daemon.control_port)
            rss.append(daemon.memory())
        growth = rss[-1] - rss[1]
        assert growth < FLAT, f"RSS after each round, MiB: {[r / MiB for r in rss]}"
    finally:
        daemon.kill()


BODY_MiB = 6.5
REQUESTS = 40
CONTROL_BOUND = 48 * MiB
"""Most RSS may grow over REQUESTS large requests on fresh connections: a
connection holds its request (at most control.max_body_bytes, read in pieces
and joined) while it is served and nothing once closed, so what stays is what
the allocator keeps of a few bodies. Left to the cyclic collector, 40 requests
of 6.5 MB kept about 250 MiB."""


@pytest.mark.parametrize("authorised", [True, False], ids=["authorised", "refused"])
async def test_rss_stays_bounded_over_large_requests_on_fresh_control_connections(
    authorised: bool,
) -> None:
    daemon = Daemon(
        "--control-token",
        "right",
        "--namespaces",
        '[{"name": "nohist", "history_size": 0}]',
    )
    item = {"channel": "nohist:x", "data": "x" * 600}
    count = int(BODY_MiB * MiB) // len(json.dumps(item))
    body = json.dumps([item] * min(count, 10_000)).encode()
    headers = {
        "Authorization": "Bearer right" if authorised else "Bearer wrong",
        "Content-Type": "application/json",
    }
    url = f"http://127.0.0.1:{daemon.control_port}/batch"

    def post() -> int:
        with httpx.Client() as client:  # a fresh connection each time
            return client.post(url, content=body, headers=headers).status_code

    try:
        assert await asyncio.to_thread(post) == (200 if authorised else 401)
        before = daemon.memory()
        for _ in range(REQUESTS):
            assert await asyncio.to_thread(post) == (200 if authorised else 401)
        growth = daemon.memory() - before
        assert growth < CONTROL_BOUND, f"RSS grew {growth / MiB:.1f} MiB"
    finally:
        daemon.kill()
