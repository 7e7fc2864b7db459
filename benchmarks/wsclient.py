"""Cheap WebSocket subscribers: raw asyncio Protocols that count frames.

A load client that parses every frame with a full WebSocket library (and every
message with a JSON parser) becomes the bottleneck long before a server does,
so these subscribers do the RFC 6455 handshake themselves and then only walk
frame headers. The hot path in ``data_received`` goes further: when a chunk
holds a run of equally long message frames (the common case when one channel
is flooded), three strided slices checked with ``bytes.count`` (C speed)
prove the framing of the whole run, and the frames are counted without a
Python-level loop. Anything else (pings, replies, a length change, a partial
frame) falls back to a plain header walk.

Frames of 126 to 65535 bytes (the 2 KiB payloads of S1k and S1z) take the same
fast path with their 16-bit length checked by two more slices. Subscribers that
negotiated permessage-deflate (S1z, S4z) offer it with
``server_no_context_takeover``, so every compressed message inflates on its
own: they count compressed frames without inflating them once subscribed, and
inflate only the sampled ones (and the replies before ``subscribed``).

Latency is sampled, not measured for every frame: the publisher puts its
``time.monotonic_ns()`` in the payload as ``{"t":...}``; every Nth message
(across all connections) the digits after ``"t":`` are read with a regex and
subtracted from the arrival time. CLOCK_MONOTONIC is system-wide on Linux, so
the publisher may live in another process.

All connections of one test share one :class:`Pool`, which holds the counters,
so the hot path touches one object and never allocates per frame.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import os
import re
import socket
import struct
import time
import zlib
from array import array
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

from benchmarks.tls import CLIENT_TLS, server_hostname

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_T_FIELD = re.compile(rb'"t": ?(\d+)')
_MISSED_COUNT = re.compile(rb'"count": ?(\d+)')
_MAX_HANDSHAKE = 16 * 1024
_OP_CONT, _OP_TEXT, _OP_BINARY, _OP_CLOSE, _OP_PING = 0x0, 0x1, 0x2, 0x8, 0x9
_OP_PONG = 0xA
_RSV1 = 0x40
"""The first header bit of a compressed message (RFC 7692 6)."""
_DATA_FIN = frozenset((0x81, 0x82, 0x81 | _RSV1, 0x82 | _RSV1))
"""Unfragmented text and binary frames, compressed or not."""
_DEFLATE_TAIL = b"\x00\x00\xff\xff"
DEFLATE_OFFER = "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
"""The extension offer of S1z's and S4z's subscribers: no compressor state kept
across messages on either side, so the server may compress each message once
for all of them, and each message inflates on its own."""
_C = ord("c")  # third byte of b'{"channel"...': envelope frames, as opposed to replies
_NEVER = 1 << 62
_LINGER_RST = struct.pack("ii", 1, 0)
OPEN_TIMEOUT = 30.0
"""Seconds one connection may take from connect() to subscribed."""


class HandshakeError(Exception):
    """The server answered the upgrade request with something other than a valid 101."""


def client_frame(opcode: int, payload: bytes) -> bytes:
    """A masked, unfragmented client frame (RFC 6455 5.3): used only for pongs and closes,
    so the small-payload XOR below is fast enough."""
    n = len(payload)
    if n > 125:
        raise ValueError("control frames carry at most 125 bytes")
    mask = os.urandom(4)
    if n:
        key = (mask * (n // 4 + 1))[:n]
        payload = (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")
    return bytes((0x80 | opcode, 0x80 | n)) + mask + payload


def upgrade_request(
    host: str, port: int, path: str, extensions: str | None = None
) -> tuple[bytes, bytes]:
    """The GET that opens a WebSocket (offering ``extensions``, if given), and the
    Sec-WebSocket-Accept it must be answered with."""
    key = base64.b64encode(os.urandom(16))
    accept = base64.b64encode(hashlib.sha1(key + _GUID).digest())  # RFC 6455 mandates SHA-1
    offer = f"Sec-WebSocket-Extensions: {extensions}\r\n" if extensions else ""
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key.decode()}\r\n"
        f"Sec-WebSocket-Version: 13\r\n{offer}\r\n"
    ).encode()
    return request, accept


def inflate(payload: bytes) -> bytes:
    """One compressed message without context takeover (RFC 7692 7.2.2)."""
    return zlib.decompressobj(-zlib.MAX_WBITS).decompress(payload + _DEFLATE_TAIL)


class Pool:
    """Counters shared by every subscriber connection of one test."""

    def __init__(self, *, json_mode: bool, sample_every: int = 0, offer: str | None = None) -> None:
        self.json_mode = json_mode
        self.offer = offer
        """The ``Sec-WebSocket-Extensions`` offer of every connection (None: none)."""
        self.deflate = Counter[str]()
        """With an offer: connections by what the server answered (``negotiated``,
        ``declined``)."""
        self.compressed = 0
        """Compressed message frames received (counted in ``messages`` too)."""
        self.bytes_received = 0
        """Every byte read from the sockets (HTTP heads, frame headers, payloads)."""
        """Frames are envelopes; frames not starting with ``{"c`` are replies."""
        self.sample_every = sample_every
        """Sample the latency of every Nth message (0: never)."""
        self.countdown = sample_every
        self.latencies_ns: array[int] = array("q")
        self.messages = 0
        self.missed = 0
        """Messages the server said were lost (``missed`` events of a conflating or
        drop_oldest channel): they count towards the expected total."""
        self.replies = 0
        self.handshakes = 0
        self.open = 0
        self.closed_by_server: Counter[int] = Counter()
        self.lost_connections = 0
        """Connections that ended while the test still wanted them."""
        self.aborting = False
        self.errors: Counter[str] = Counter()
        self.last_message_at = 0.0
        self.target = _NEVER
        self.target_reached = asyncio.Event()
        self.subscribers: list[Subscriber] = []

    def expect(self, total_messages: int) -> None:
        """Arm :meth:`wait_for_messages` to wake once ``messages`` reaches the total."""
        self.target = total_messages - self.missed
        self.target_reached.clear()
        if self.messages >= self.target:
            self.target_reached.set()

    def add_missed(self, count: int) -> None:
        """``count`` messages will never come (the server said so): the target is
        lowered instead of the hot path checking ``messages + missed``."""
        self.missed += count
        self.target -= count
        if self.messages >= self.target:
            self.target_reached.set()

    async def wait_for_messages(self, deadline: float) -> bool:
        """Wait (event-driven) until the expected total arrived or the loop time
        ``deadline`` passed; False if it passed first."""
        try:
            async with asyncio.timeout_at(deadline):
                await self.target_reached.wait()
        except TimeoutError:
            return False
        return True

    def reset_counts(self) -> None:
        """Zero the message counters between phases of one test."""
        self.messages = 0
        self.missed = 0
        self.latencies_ns = array("q")
        self.countdown = self.sample_every
        self.target = _NEVER
        self.target_reached.clear()

    def abort_all(self) -> None:
        """Drop every connection with a TCP RST (SO_LINGER 0): no closing handshake
        and no TIME_WAIT, so the next test finds its ephemeral ports free."""
        self.aborting = True
        for sub in self.subscribers:
            transport = sub.transport
            if transport is None or transport.is_closing():
                continue
            sock = transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
            transport.abort()
        self.subscribers.clear()

    async def connect(
        self,
        host: str,
        port: int | Sequence[int],
        paths: Sequence[str],
        *,
        replies_expected: int,
        concurrency: int,
        deadline: float,
        make: MakeSubscriber | None = None,
        sockopts: Sequence[SockOpt] = (),
    ) -> ConnectResult:
        """Open one connection per path with at most ``concurrency`` handshakes in flight.

        A connection counts as subscribed once it got its 101 and then
        ``replies_expected`` ``subscribed`` replies (0 in raw mode). Each
        connection gets OPEN_TIMEOUT seconds, the whole phase ends at the loop
        time ``deadline``. Failures are counted by reason in ``errors``, not
        raised: a benchmark reports them. ``make(index, request, accept, ready)``
        builds the protocol of ``paths[index]`` instead of a plain Subscriber.
        Given several ports (the nodes of a cluster), ``paths[index]`` connects to
        ``port[index % len(port)]``. ``sockopts`` (level, option, value) are set
        on each socket before it connects: SO_RCVBUF and TCP_MAXSEG must be, since
        the SYN carries the window scale and the MSS (shrinking the buffer of an
        established connection makes the kernel drop segments it already allowed,
        and the sender stalls in retransmits).
        """
        loop = asyncio.get_running_loop()
        ports = [port] if isinstance(port, int) else list(port)
        work = iter(enumerate(paths))
        ok = 0

        async def worker() -> None:
            nonlocal ok
            for index, path in work:
                to = ports[index % len(ports)]
                request, accept = upgrade_request(host, to, path, self.offer)
                ready: asyncio.Future[None] = loop.create_future()
                if make is None:
                    sub = Subscriber(self, request, accept, replies_expected, ready)
                else:
                    sub = make(index, request, accept, ready)
                try:
                    async with asyncio.timeout(OPEN_TIMEOUT):
                        factory = functools.partial(_same, sub)
                        tls = CLIENT_TLS.get()
                        name = server_hostname(host)
                        if sockopts:
                            sock = await _socket_with(loop, host, to, sockopts)
                            await loop.create_connection(
                                factory, sock=sock, ssl=tls, server_hostname=name
                            )
                        else:
                            await loop.create_connection(
                                factory, host, to, ssl=tls, server_hostname=name
                            )
                        await ready
                except TimeoutError:
                    self.errors["timeout"] += 1
                    sub.abort()
                except HandshakeError as exc:
                    self.errors[str(exc)[:60]] += 1
                except OSError as exc:
                    self.errors[type(exc).__name__] += 1
                else:
                    ok += 1

        started = time.monotonic()
        workers = [loop.create_task(worker()) for _ in range(max(1, min(concurrency, len(paths))))]
        try:
            async with asyncio.timeout_at(deadline):
                await asyncio.gather(*workers)
        except TimeoutError:
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            self.errors["connect phase timeout"] += 1
        return ConnectResult(ok, len(paths), time.monotonic() - started)


async def _socket_with(
    loop: asyncio.AbstractEventLoop, host: str, port: int, sockopts: Sequence[SockOpt]
) -> socket.socket:
    """A TCP socket connected to ``host:port``, ``sockopts`` set before the SYN."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        for level, option, value in sockopts:
            sock.setsockopt(level, option, value)
        await loop.sock_connect(sock, (host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def _same(protocol: Subscriber) -> Subscriber:
    """A protocol factory returning a protocol made beforehand."""
    return protocol


@dataclass(frozen=True, slots=True)
class ConnectResult:
    subscribed: int
    attempted: int
    seconds: float


SockOpt = tuple[int, int, int]
"""(level, option, value) for ``socket.setsockopt``."""

MakeSubscriber = Callable[[int, bytes, bytes, "asyncio.Future[None]"], "Subscriber"]
"""Builds the protocol of one connection: (index of its path, upgrade request,
expected Sec-WebSocket-Accept, future to resolve once subscribed)."""


class Subscriber(asyncio.Protocol):
    """One subscriber connection: handshake, then counting frames into the pool."""

    __slots__ = (
        "accept",
        "handshaking",
        "pending",
        "pool",
        "ready",
        "replies_left",
        "request",
        "transport",
    )

    def __init__(
        self,
        pool: Pool,
        request: bytes,
        accept: bytes,
        replies_expected: int,
        ready: asyncio.Future[None],
    ) -> None:
        self.pool = pool
        self.request = request
        self.accept = accept
        self.replies_left = replies_expected
        self.ready = ready
        self.transport: asyncio.Transport | None = None
        self.handshaking = True
        self.pending = b""

    # asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.pool.subscribers.append(self)
        self.transport.write(self.request)

    def connection_lost(self, exc: Exception | None) -> None:
        pool = self.pool
        if self.handshaking:
            self._fail("closed during handshake")
            return
        pool.open -= 1
        if not pool.aborting:
            pool.lost_connections += 1
        if not self.ready.done():
            self._fail("closed before subscribed")

    def data_received(self, data: bytes) -> None:
        pool = self.pool
        pool.bytes_received += len(data)
        if self.pending:
            data = self.pending + data
            self.pending = b""
        if self.handshaking:
            data = self._handshake(data)
            if not data:
                return
        n = len(data)
        pos = 0
        # Fast path: a run of equal message frames, validated by strided slices.
        if n >= 8 and data[0] in _DATA_FIN:
            b0 = data[0]
            b1 = data[1]
            head = 2 if b1 < 126 else 4 if b1 == 126 else 0
            stride = head + (b1 if head == 2 else data[2] << 8 | data[3])
            full = n // stride if head else 0
            end = full * stride
            if (
                full > 1
                and data[0:end:stride].count(b0) == full
                and data[1:end:stride].count(b1) == full
                and (
                    head == 2
                    or (
                        data[2:end:stride].count(data[2]) == full
                        and data[3:end:stride].count(data[3]) == full
                    )
                )
                and (
                    b0 & _RSV1
                    or not pool.json_mode
                    or data[head + 2 : end : stride].count(_C) == full
                )
            ):
                pool.messages += full
                if b0 & _RSV1:
                    pool.compressed += full
                pool.last_message_at = time.monotonic()
                if pool.sample_every:
                    self._sample_run(data, stride, full, head, b0 & _RSV1)
                if pool.messages >= pool.target:
                    pool.target_reached.set()
                if end == n:
                    return
                pos = end
        self._walk(data, pos)

    # internals

    def _response_head(
        self, data: bytes, status: str
    ) -> tuple[list[tuple[str, str]], bytes] | None:
        """The answer's header fields (names lowercased, values stripped) and the
        bytes after its head, once the whole head has come with ``status``; None
        while it has not (kept in ``pending``) or when it failed (``_fail``)."""
        end = data.find(b"\r\n\r\n")
        if end < 0:
            if len(data) > _MAX_HANDSHAKE:
                self._fail("response head too large")
            else:
                self.pending = data
            return None
        head = data[:end].decode("latin-1")
        status_line, _, headers = head.partition("\r\n")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or parts[1] != status:
            self._fail(f"HTTP {parts[1] if len(parts) > 1 else '?'}")
            return None
        fields = []
        for line in headers.split("\r\n"):
            name, _, value = line.partition(":")
            fields.append((name.strip().lower(), value.strip()))
        return fields, data[end + 4 :]

    def _handshake(self, data: bytes) -> bytes:
        """Check the 101 response; return the bytes after it (frames already sent)."""
        read = self._response_head(data, "101")
        if read is None:
            return b""
        fields, rest = read
        accept = None
        extensions = ""
        for name, value in fields:
            if name == "sec-websocket-accept":
                accept = value.encode()
            elif name == "sec-websocket-extensions":
                extensions += value
        if accept != self.accept:
            self._fail("bad Sec-WebSocket-Accept")
            return b""
        pool = self.pool
        if extensions:
            if not pool.offer or "permessage-deflate" not in extensions:
                self._fail(f"extension not offered: {extensions.strip()}")
                return b""
            if "server_no_context_takeover" not in extensions:
                self._fail("deflate without server_no_context_takeover")  # RFC 7692 7.1.1.1
                return b""
            pool.deflate["negotiated"] += 1
        elif pool.offer:
            pool.deflate["declined"] += 1
        self.handshaking = False
        pool.handshakes += 1
        pool.open += 1
        if self.replies_left == 0:
            self.ready.set_result(None)
        return rest

    def _fail(self, reason: str) -> None:
        if not self.ready.done():
            self.ready.set_exception(HandshakeError(reason))
        self.abort()

    def abort(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()

    def _walk(self, data: bytes, pos: int) -> None:
        """Walk frame headers one by one: the general (slow) path."""
        pool = self.pool
        json_mode = pool.json_mode
        n = len(data)
        count = 0
        while n - pos >= 2:
            b0 = data[pos]
            b1 = data[pos + 1]
            length = b1 & 0x7F
            head = 2
            if length == 126:
                if n - pos < 4:
                    break
                length = int.from_bytes(data[pos + 2 : pos + 4], "big")
                head = 4
            elif length == 127:
                if n - pos < 10:
                    break
                length = int.from_bytes(data[pos + 2 : pos + 10], "big")
                head = 10
            if b1 & 0x80:
                pool.errors["masked server frame"] += 1
                self.abort()
                return
            start = pos + head
            end = start + length
            if end > n:
                break
            opcode = b0 & 0x0F
            if opcode in (_OP_TEXT, _OP_BINARY) or (opcode == _OP_CONT and b0 & 0x80):
                compressed = b0 & _RSV1
                if compressed and json_mode and self.replies_left:
                    # Before ``subscribed`` a compressed frame may be a reply (a
                    # server may compress them too); after it, S1z's channel sends
                    # nothing but messages, and the samples check that.
                    text = inflate(data[start:end])
                    if text[2:3] != b"c":
                        self._reply(text)
                        pos = end
                        continue
                if compressed:
                    count += 1
                    pool.compressed += 1
                    if pool.sample_every:
                        pool.countdown -= 1
                        if pool.countdown <= 0:
                            pool.countdown = pool.sample_every
                            self._sample_compressed(data[start:end], time.monotonic_ns())
                elif json_mode and (length < 3 or data[start + 2] != _C):
                    self._reply(data[start:end])
                else:
                    count += 1
                    if pool.sample_every:
                        pool.countdown -= 1
                        if pool.countdown <= 0:
                            pool.countdown = pool.sample_every
                            self._sample(data, start, end, time.monotonic_ns())
            elif opcode == _OP_PING:
                if self.transport is not None:
                    self.transport.write(client_frame(_OP_PONG, data[start:end]))
            elif opcode == _OP_CLOSE:
                self._closed_by_server(data[start:end])
                return
            pos = end
        if pos < n:
            self.pending = data[pos:]
        if count:
            pool.messages += count
            pool.last_message_at = time.monotonic()
            if pool.messages >= pool.target:
                pool.target_reached.set()

    def _reply(self, payload: bytes) -> None:
        pool = self.pool
        pool.replies += 1
        if self.replies_left and b'"subscribed"' in payload:
            self.replies_left -= 1
            if self.replies_left == 0 and not self.ready.done():
                self.ready.set_result(None)
        elif b'"missed"' in payload:
            match = _MISSED_COUNT.search(payload)
            if match is not None:
                pool.add_missed(int(match.group(1)))

    def _closed_by_server(self, payload: bytes) -> None:
        code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
        self.pool.closed_by_server[code] += 1
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(client_frame(_OP_CLOSE, payload[:2]))
            self.transport.close()
        if not self.ready.done():
            self._fail(f"closed {code} before subscribed")

    def _sample_run(
        self, data: bytes, stride: int, full: int, head: int = 2, compressed: int = 0
    ) -> None:
        pool = self.pool
        now = time.monotonic_ns()
        if pool.sample_every == 1:
            picked = range(full)
        else:
            pool.countdown -= full
            if pool.countdown > 0:
                return
            pool.countdown = pool.sample_every
            picked = range(full - 1, full)
        for k in picked:
            start, end = k * stride + head, (k + 1) * stride
            if compressed:
                self._sample_compressed(data[start:end], now)
            else:
                self._sample(data, start, end, now)

    def _sample(self, data: bytes, start: int, end: int, now_ns: int) -> None:
        match = _T_FIELD.search(data, start, end)
        if match is not None:
            self.pool.latencies_ns.append(now_ns - int(match.group(1)))

    def _sample_compressed(self, payload: bytes, now_ns: int) -> None:
        """Inflate a sampled compressed message: its latency, and a check that it
        was a message (in JSON mode, an envelope), as counted."""
        text = inflate(payload)
        if self.pool.json_mode and text[2:3] != b"c":
            self.pool.errors["compressed reply counted as a message"] += 1
        self._sample(text, 0, len(text), now_ns)


class OffsetReader(Subscriber):
    """A subscriber of one channel that reads the offset of every message it gets,
    for the scenarios that check each one (R, S1c) rather than count and sample.

    Subclasses give ``prefix`` (the envelope head of their channel) and the hooks;
    the frame walk is this one."""

    __slots__ = ()

    @property
    def prefix(self) -> bytes:
        raise NotImplementedError

    def on_offset(self, offset: int, now: float) -> None:
        """A message of the channel, at ``offset``."""

    def on_foreign(self) -> None:
        """An envelope of another channel (never expected)."""

    def on_reply(self, payload: bytes, now: float) -> None:
        """A reply or event (a JSON object with a ``type``)."""

    def after_read(self, messages: int, now: float) -> None:
        """Called after each read that did not end the connection."""

    def data_received(self, data: bytes) -> None:
        if self.pending:
            data = self.pending + data
            self.pending = b""
        if self.handshaking:
            data = self._handshake(data)
            if not data:
                return
        prefix = self.prefix
        skip = len(prefix)
        now = time.monotonic()
        n = len(data)
        pos = 0
        count = 0
        while n - pos >= 2:
            b0 = data[pos]
            b1 = data[pos + 1]
            length = b1 & 0x7F
            head = 2
            if length == 126:
                if n - pos < 4:
                    break
                length = int.from_bytes(data[pos + 2 : pos + 4], "big")
                head = 4
            elif length == 127:
                if n - pos < 10:
                    break
                length = int.from_bytes(data[pos + 2 : pos + 10], "big")
                head = 10
            if b1 & 0x80:
                self.pool.errors["masked server frame"] += 1
                self.abort()
                return
            start = pos + head
            end = start + length
            if end > n:
                break
            opcode = b0 & 0x0F
            if opcode in (_OP_TEXT, _OP_BINARY) or (opcode == _OP_CONT and b0 & 0x80):
                if data.startswith(prefix, start):
                    comma = data.find(b",", start + skip, end)
                    self.on_offset(int(data[start + skip : comma]), now)
                    count += 1
                elif length >= 3 and data[start + 2] == _C:
                    self.on_foreign()
                else:
                    self.on_reply(data[start:end], now)
            elif opcode == _OP_PING:
                if self.transport is not None:
                    self.transport.write(client_frame(_OP_PONG, data[start:end]))
            elif opcode == _OP_CLOSE:
                self._closed_by_server(data[start:end])
                return
            pos = end
        if pos < n:
            self.pending = data[pos:]
        if count:
            self.pool.messages += count
            self.pool.last_message_at = now
        self.after_read(count, now)
