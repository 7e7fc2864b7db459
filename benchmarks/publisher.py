"""Publishers: keep-alive HTTP/1.1 with pipelining, on raw asyncio.

A request/response round trip per message would measure the loopback RTT and
the publisher's own overhead, not the server; pipelining (write K requests,
then read K responses) keeps the server's control port busy with one
connection, as a real backend with a connection pool would. Responses are
parsed with httptools (llhttp), so chunked or unusual responses (Nchan answers
201/202 with a text body) are still read correctly.

Every payload is exactly ``PAYLOAD_BYTES`` long and carries its send time,
``{"t":<monotonic_ns>,"pad":"xxx..."}``, for the subscribers' latency samples;
S1k's and S1z's are 2 KiB documents (:func:`document`) that compress like real JSON.
"""

from __future__ import annotations

import asyncio
import functools
import json
import random
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import cast

import httptools

from benchmarks.tls import CLIENT_TLS, server_hostname

PAYLOAD_BYTES = 64
RESPONSE_TIMEOUT = 30.0
"""Longest wait for the responses to one burst of requests."""
GET_TIMEOUT = 5.0


def payload(t_ns: int, size: int = PAYLOAD_BYTES) -> bytes:
    """A JSON object of exactly ``size`` bytes holding the send time."""
    head = b'{"t":%d,"pad":"' % t_ns
    return head + b"x" * max(0, size - len(head) - 2) + b'"}'


DOCUMENT_BYTES = 2048


@functools.cache
def _document_tail(head_bytes: int, size: int) -> bytes:
    """The part of a :func:`document` after its ``{"t":...,`` head: order-book
    entries (the same in every message) with a note padding it to ``size``."""
    rng = random.Random(21)
    symbols = ["AAPL", "MSFT", "NVDA", "AMZN", "GOOG", "META", "TSLA", "ASML", "SAP", "SHEL"]
    venues = ["XNAS", "XNYS", "XLON", "XETR", "XPAR"]
    items: list[dict[str, object]] = []
    budget = size - head_bytes - 64
    while True:
        entry = {
            "id": f"ord-{rng.randrange(10**7):07d}",
            "sym": rng.choice(symbols),
            "px": round(rng.uniform(10, 900), 2),
            "qty": rng.randrange(1, 50) * 100,
            "side": rng.choice(["buy", "sell"]),
            "venue": rng.choice(venues),
            "ts": 1_700_000_000_000 + rng.randrange(10**8),
        }
        if len(json.dumps([*items, entry], separators=(",", ":"))) > budget:
            break
        items.append(entry)
    body = b'"items":' + json.dumps(items, separators=(",", ":")).encode() + b',"note":"'
    words = b"bid ask fill cancel amend open close halt resume auction".split()
    note = b""
    while head_bytes + len(body) + len(note) + 2 < size:
        note += rng.choice(words) + b" "
    return body + note[: size - head_bytes - len(body) - 2] + b'"}'


def document(t_ns: int, size: int = DOCUMENT_BYTES) -> bytes:
    """A JSON object of exactly ``size`` bytes holding the send time, shaped like a
    real feed message (a list of orders: ids, symbols, prices) rather than
    :func:`payload`'s run of one letter, which deflate would shrink to nothing:
    it compresses about as well as real JSON does, message by message."""
    head = b'{"t":%d,' % t_ns
    return head + _document_tail(len(head), size)


def request(method: str, path: str, body: bytes = b"", content_type: str | None = None) -> bytes:
    """One HTTP/1.1 keep-alive request, ready to be written."""
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    if content_type is not None:
        head += f"Content-Type: {content_type}\r\n"
    if body or method in ("POST", "PUT"):
        head += f"Content-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + body


def publish_request(channel: str, t_ns: int, body: Callable[[int], bytes] = payload) -> bytes:
    return request("POST", f"/publish/{channel}", body(t_ns), "application/json")


def batch_request(channels: Sequence[str], t_ns: int) -> bytes:
    """``POST /batch`` with one 64-byte payload per channel (built by hand: no
    JSON encoder in the publisher's hot loop)."""
    data = payload(t_ns)
    items = b",".join(b'{"channel":"%s","data":%s}' % (c.encode(), data) for c in channels)
    return request("POST", "/batch", b"[" + items + b"]", "application/json")


@dataclass(slots=True)
class Response:
    status: int
    body: bytes


class HttpPipe(asyncio.Protocol):
    """One keep-alive connection; requests are written in bursts, responses are
    matched to them in order (HTTP/1.1 pipelining)."""

    def __init__(self, keep_bodies: bool) -> None:
        self.keep_bodies = keep_bodies
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.sent = 0
        self.received = 0
        self.ok = 0
        self.statuses: dict[int, int] = {}
        self.responses: list[Response] = []
        self._body: list[bytes] = []
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()
        self.lost: Exception | None = None

    @classmethod
    async def open(cls, host: str, port: int, keep_bodies: bool = False) -> HttpPipe:
        loop = asyncio.get_running_loop()
        _, pipe = await loop.create_connection(
            lambda: cls(keep_bodies),
            host,
            port,
            ssl=CLIENT_TLS.get(),
            server_hostname=server_hostname(host),
        )
        return pipe

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = exc or ConnectionResetError("the server closed the control connection")
        while self._waiters:
            _, waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(self.lost)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.lost = exc
            if self.transport is not None:
                self.transport.abort()

    # httptools callbacks

    def on_message_begin(self) -> None:
        self._body = []

    def on_body(self, body: bytes) -> None:
        if self.keep_bodies:
            self._body.append(body)

    def on_message_complete(self) -> None:
        status = self.parser.get_status_code()
        self.received += 1
        self.statuses[status] = self.statuses.get(status, 0) + 1
        if 200 <= status < 300:
            self.ok += 1
        if self.keep_bodies:
            self.responses.append(Response(status, b"".join(self._body)))
        waiters = self._waiters
        while waiters and waiters[0][0] <= self.received:
            _, waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)

    # API

    def send(self, data: bytes, count: int) -> None:
        """Write ``count`` requests at once without waiting for their responses."""
        if self.lost is not None or self.transport is None:
            raise ConnectionResetError("control connection lost") from self.lost
        self.transport.write(data)
        self.sent += count

    async def drain(self) -> None:
        """Wait until every request sent so far has its response (callers bound the
        wait with ``asyncio.timeout``)."""
        if self.received >= self.sent:
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((self.sent, waiter))
        await waiter

    async def exchange(self, data: bytes, count: int) -> None:
        """Write ``count`` requests and wait for their responses, at most RESPONSE_TIMEOUT."""
        self.send(data, count)
        async with asyncio.timeout(RESPONSE_TIMEOUT):
            await self.drain()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def http_get(
    host: str, port: int, path: str, headers: dict[str, str] | None = None
) -> Response:
    """One GET on a fresh connection (readiness probes, channel info), at most GET_TIMEOUT."""
    async with asyncio.timeout(GET_TIMEOUT):
        pipe = await HttpPipe.open(host, port, keep_bodies=True)
        try:
            extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
            pipe.send(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}\r\n".encode(), 1)
            await pipe.drain()
            return pipe.responses[0]
        finally:
            pipe.close()


@dataclass
class PublishStats:
    """What one publishing run achieved, as the publisher saw it."""

    requests: int = 0
    ok: int = 0
    messages: int = 0
    """Messages accepted by the server (one per ok publish; ``published`` per batch)."""
    seconds: float = 0.0
    statuses: dict[int, int] = field(default_factory=dict)


async def flat_out(
    pipe: HttpPipe,
    channels: Sequence[str],
    *,
    depth: int,
    duration: float,
    max_messages: int,
    body: Callable[[int], bytes] = payload,
) -> PublishStats:
    """Publish round-robin over ``channels`` as fast as the server answers, ``depth``
    requests per burst, until ``duration`` seconds or ``max_messages`` elapse;
    ``body(t_ns)`` makes each payload (S1k's and S1z's are 2 KiB)."""
    started = time.monotonic()
    deadline = started + duration
    sent = 0
    index = 0
    nch = len(channels)
    while sent < max_messages and time.monotonic() < deadline:
        k = min(depth, max_messages - sent)
        now = time.monotonic_ns()
        burst = []
        for _ in range(k):
            burst.append(publish_request(channels[index], now, body))
            index = (index + 1) % nch
        await pipe.exchange(b"".join(burst), k)
        sent += k
    return PublishStats(
        pipe.sent, pipe.ok, pipe.ok, time.monotonic() - started, dict(pipe.statuses)
    )


async def paced(
    pipe: HttpPipe,
    channel: str,
    *,
    rate: float,
    count: int,
    stop: asyncio.Event | None = None,
) -> PublishStats:
    """Publish ``count`` messages at ``rate`` per second on an absolute schedule
    (``loop.call_at``, so a late tick does not push every later one back), or
    fewer if ``stop`` is set first; then wait for the responses. The counts are
    this call's, not the connection's totals."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    first = loop.time() + 0.05
    started = time.monotonic()
    sent_before, ok_before = pipe.sent, pipe.ok
    statuses_before = dict(pipe.statuses)

    def tick(i: int) -> None:
        if done.done():
            return
        if i >= count or (stop is not None and stop.is_set()):
            done.set_result(None)
            return
        try:
            pipe.send(publish_request(channel, time.monotonic_ns()), 1)
        except ConnectionError as exc:
            done.set_exception(exc)
            return
        loop.call_at(first + (i + 1) / rate, tick, i + 1)

    loop.call_at(first, tick, 0)
    watcher = None
    if stop is not None:
        watcher = asyncio.ensure_future(stop.wait())
        watcher.add_done_callback(lambda _: None if done.done() else done.set_result(None))
    try:
        async with asyncio.timeout(None if stop is not None else count / rate + RESPONSE_TIMEOUT):
            await done
    finally:
        if watcher is not None:
            watcher.cancel()
    async with asyncio.timeout(RESPONSE_TIMEOUT):
        await pipe.drain()
    statuses = {
        status: n - statuses_before.get(status, 0)
        for status, n in pipe.statuses.items()
        if n > statuses_before.get(status, 0)
    }
    ok = pipe.ok - ok_before
    return PublishStats(pipe.sent - sent_before, ok, ok, time.monotonic() - started, statuses)


async def batch_flat_out(
    pipe: HttpPipe,
    channels: Sequence[str],
    *,
    items: int,
    depth: int,
    duration: float,
    max_messages: int,
) -> PublishStats:
    """``POST /batch`` of ``items`` messages each (round-robin channels), ``depth``
    batches per burst; counts the ``published`` field of each response."""
    started = time.monotonic()
    deadline = started + duration
    index = 0
    nch = len(channels)
    planned = 0
    published = 0
    while planned < max_messages and time.monotonic() < deadline:
        now = time.monotonic_ns()
        burst = []
        for _ in range(depth):
            group = [channels[(index + j) % nch] for j in range(items)]
            index = (index + items) % nch
            burst.append(batch_request(group, now))
        planned += depth * items
        await pipe.exchange(b"".join(burst), depth)
        for response in pipe.responses:
            if response.status == 200:
                published += int(json.loads(response.body).get("published", 0))
        pipe.responses.clear()
    seconds = time.monotonic() - started
    return PublishStats(pipe.sent, pipe.ok, published, seconds, dict(pipe.statuses))


async def steady(
    pipe: HttpPipe,
    channels: Sequence[str],
    *,
    rate: float,
    stop: asyncio.Event,
    max_messages: int,
    tick: float = 0.01,
) -> PublishStats:
    """Publish round-robin over ``channels`` at ``rate`` per second until ``stop`` is
    set (or ``max_messages`` went out): every ``tick`` seconds, the requests due by
    then on an absolute schedule, in one write, so a late tick catches up.

    Responses are read as they come; at most ``rate * RESPONSE_TIMEOUT``
    requests may wait for theirs (beyond it the publisher waits for the server).
    """
    loop = asyncio.get_running_loop()
    first = loop.time()
    started = time.monotonic()
    backlog = max(1000, int(rate * RESPONSE_TIMEOUT))
    sent = 0
    index = 0
    nch = len(channels)
    ticks = 0
    while not stop.is_set() and sent < max_messages:
        due = min(max_messages, int((loop.time() - first) * rate) + 1)
        if due > sent:
            now = time.monotonic_ns()
            burst = []
            for _ in range(due - sent):
                burst.append(publish_request(channels[index], now))
                index = (index + 1) % nch
            pipe.send(b"".join(burst), due - sent)
            sent = due
        if pipe.sent - pipe.received > backlog:
            async with asyncio.timeout(RESPONSE_TIMEOUT):
                await pipe.drain()
        ticks = max(ticks + 1, int((loop.time() - first) / tick) + 1)
        await asyncio.sleep(max(0.0, first + ticks * tick - loop.time()))
    async with asyncio.timeout(RESPONSE_TIMEOUT):
        await pipe.drain()
    return PublishStats(
        pipe.sent, pipe.ok, pipe.ok, time.monotonic() - started, dict(pipe.statuses)
    )
