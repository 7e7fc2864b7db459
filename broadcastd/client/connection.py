"""A client WebSocket connection (RFC 6455) made for receiving a lot, fast.

A general WebSocket library parses each frame with a generator-based state
machine and hands it through a queue: about 5 µs a frame, more than everything
else a subscriber does with a message. The daemon's frames are simple (text,
unmasked, unfragmented, no extensions), so this connection walks the frame
headers of each chunk read in one loop and queues the decoded texts; everything
unusual (control frames, fragments) takes a slower path, and anything the
protocol forbids fails the connection with the RFC's close code.

It does its own opening handshake (a non-101 answer is a
:class:`HandshakeRefused` carrying the daemon's status and JSON body), answers
pings, sends pings when the daemon has been silent for ``ping_interval``
(closing after ``ping_timeout`` more without a byte), and performs the closing
handshake both ways. Reading stops while ``max_queue`` texts wait unread, so a
slow program holds the daemon back through TCP. No message may be larger than
``max_size`` bytes: a frame that announces more, or fragments that add up to
more, fail the connection with 1009 as soon as their header is read, before
any of it is kept, so what a connection holds is bounded by about
``(max_queue + 1) * max_size`` whatever the peer sends. It offers no
compression and no HTTP proxy.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import ssl as ssl_module
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import TypeVar, cast
from urllib.parse import SplitResult

from broadcastd import __version__

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
MAX_HEAD = 64 * 1024
"""Largest handshake answer head (status line and headers) accepted."""
MAX_REFUSAL_BODY = 64 * 1024
"""Most of a refusal's body kept."""
MAX_CONTROL = 125
DEFAULT_MAX_SIZE = 1024 * 1024
"""Largest message accepted unless told otherwise (1 MiB, as in websockets): the
daemon's largest frame is its ``control.max_payload_bytes`` (64 KiB by default)
plus 256 bytes of envelope."""

_TEXT_FIN = 0x81
_OP_CONT, _OP_TEXT, _OP_BINARY = 0x0, 0x1, 0x2
_OP_CLOSE, _OP_PING, _OP_PONG = 0x8, 0x9, 0xA

NORMAL = 1000
PROTOCOL_ERROR = 1002
UNSUPPORTED_DATA = 1003
NO_STATUS = 1005
ABNORMAL = 1006
INVALID_DATA = 1007
TOO_BIG = 1009
KEEPALIVE = 1011


class Closed(Exception):
    """The connection ended: ``code`` is the close code the daemon sent (1005 for a
    close frame without one), or 1006 when none came (the connection was lost or
    failed here). ``failed`` is the close code this side sent when it failed the
    connection itself (1002, 1003, 1007, 1009, 1011), else None: the code alone
    (1006) cannot tell a daemon that broke a rule from a network that broke."""

    def __init__(self, code: int, reason: str = "", failed: int | None = None) -> None:
        super().__init__(f"connection closed ({code}{': ' + reason if reason else ''})")
        self.code = code
        self.reason = reason
        self.failed = failed


class HandshakeRefused(Exception):
    """The daemon answered the opening handshake with something other than 101."""

    def __init__(self, status: int, reason: str, headers: dict[str, str], body: bytes) -> None:
        super().__init__(f"handshake refused: HTTP {status} {reason}")
        self.status = status
        self.reason = reason
        self.headers = headers
        """Header names in lower case."""
        self.body = body


class HandshakeFailed(Exception):
    """The answer to the opening handshake is not a valid WebSocket upgrade."""


def client_frame(opcode: int, payload: bytes) -> bytes:
    """A masked, unfragmented client frame (RFC 6455 5.3)."""
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    mask = os.urandom(4)
    if n:
        # XOR with the repeated key as two big integers: one C-level pass.
        key = (mask * (n // 4 + 1))[:n]
        payload = (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")
    return head + mask + payload


def _close_payload(code: int, reason: str = "") -> bytes:
    return code.to_bytes(2, "big") + reason.encode()[: MAX_CONTROL - 2]


R = TypeVar("R", bound="Receiving")


class Receiving(asyncio.Protocol):
    """What the WebSocket connection and the event stream share: the request and
    its answer's head (a refusal carries the daemon's status and JSON body), the
    texts received and waiting (reading stops at ``max_queue``), and the end.

    A subclass says which answer opens it (``_opens``), reads what follows
    (``_body``), and fails the connection its own way (``_fail``)."""

    _ANSWER = 101
    """The status of the answer that opens the connection."""

    def __init__(self, request: bytes, *, max_queue: int, max_size: int) -> None:
        if max_size < 1:
            raise ValueError(f"max_size must be at least 1 byte; got {max_size}")
        self._loop = asyncio.get_running_loop()
        self._request = request
        self._high = max(1, max_queue)
        self._low = self._high // 4
        self._max_size = max_size
        self._transport: asyncio.Transport | None = None
        self.handshake: asyncio.Future[None] = self._loop.create_future()
        self._head = b""
        self._refusal: HandshakeRefused | None = None
        self._refusal_length: int | None = None
        self._messages: deque[str] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False
        self._received: Closed | None = None
        """How the daemon ended the connection (its close frame, or close event)."""
        self._failed: Closed | None = None
        """Why this side ended the connection, when it did."""
        self._lost = False
        self.closed: asyncio.Future[None] = self._loop.create_future()
        self._last_read = time.monotonic()
        self._keepalive: asyncio.TimerHandle | None = None

    @staticmethod
    async def _dial(
        url: SplitResult,
        secure: bool,
        factory: Callable[[], R],
        ssl: ssl_module.SSLContext | None,
        open_timeout: float | None,
    ) -> R:
        """Connect ``factory``'s connection to ``url`` and wait for its answer."""
        host = url.hostname or "localhost"
        port = url.port or (443 if secure else 80)
        context = (ssl or ssl_module.create_default_context()) if secure else None
        async with asyncio.timeout(open_timeout):
            _, connection = await asyncio.get_running_loop().create_connection(
                factory, host, port, ssl=context, server_hostname=host if secure else None
            )
            try:
                await connection.handshake
            except BaseException:
                connection.abort()
                raise
        return connection

    # the program's side

    def pop(self) -> str | None:
        """The next text received, or None if none is waiting."""
        messages = self._messages
        if not messages:
            return None
        text = messages.popleft()
        if self._paused and len(messages) <= self._low:
            self._paused = False
            if self._transport is not None:
                self._transport.resume_reading()
        return text

    async def wait(self) -> None:
        """Return once a text is waiting; raise :class:`Closed` if none ever will."""
        while not self._messages:
            # Nothing follows the daemon's close: no need to wait for the TCP close.
            if self._received is not None or self._failed is not None or self._lost:
                raise self._received or self._failed or Closed(ABNORMAL)
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def abort(self) -> None:
        """Drop the connection at once."""
        if self._transport is not None:
            self._transport.abort()

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not derive from asyncio.Transport, but are one.
        self._transport = cast(asyncio.Transport, transport)
        self._transport.write(self._request)

    def data_received(self, data: bytes) -> None:
        self._last_read = time.monotonic()
        if not self.handshake.done() or self._refusal is not None:
            data = self._handshake_data(data)
            if not data:
                return
        if self._failed is not None or self._received is not None:
            return  # nothing more is read after the daemon's close or a failure
        self._body(data)

    def eof_received(self) -> bool:
        return False  # let the transport close

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        if self._keepalive is not None:
            self._keepalive.cancel()
        if not self.handshake.done():
            refusal = self._refusal
            self.handshake.set_exception(
                refusal  # its body ends with the connection
                if refusal is not None
                else ConnectionError("the connection closed before the daemon's answer")
            )
        if not self.closed.done():
            self.closed.set_result(None)
        self._wake()

    # the answer's head

    def _handshake_data(self, data: bytes) -> bytes:
        """Take the answer to the request; what follows it."""
        if self._refusal is not None:
            self._refusal_body(data)
            return b""
        head = self._head + data
        end = head.find(b"\r\n\r\n")
        if end == -1:
            if len(head) > MAX_HEAD:
                self._handshake_failed("the answer's head is too long")
            self._head = head
            return b""
        self._head = b""
        lines = head[:end].decode("latin-1").split("\r\n")
        rest = head[end + 4 :]
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            self._handshake_failed(f"not an HTTP answer: {lines[0][:80]!r}")
            return b""
        status, reason = int(parts[1]), parts[2] if len(parts) > 2 else ""
        fields: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            fields[name.strip().lower()] = value.strip()
        if status != self._ANSWER:
            self._refusal = HandshakeRefused(status, reason, fields, b"")
            length = fields.get("content-length", "")
            self._refusal_length = int(length) if length.isdigit() else None
            self._refusal_body(rest)
            return b""
        wrong = self._opens(fields)
        if wrong is not None:
            self._handshake_failed(wrong)
            return b""
        self.handshake.set_result(None)
        self._arm_keepalive()
        return rest

    def _refusal_body(self, data: bytes) -> None:
        refusal = self._refusal
        assert refusal is not None
        if len(refusal.body) < MAX_REFUSAL_BODY:
            refusal.body = (refusal.body + data)[:MAX_REFUSAL_BODY]
        length = self._refusal_length
        if length is not None and len(refusal.body) >= min(length, MAX_REFUSAL_BODY):
            refusal.body = refusal.body[:length]
            if not self.handshake.done():
                self.handshake.set_exception(refusal)
            self.abort()

    def _handshake_failed(self, why: str) -> None:
        if not self.handshake.done():
            self.handshake.set_exception(HandshakeFailed(why))
        self.abort()

    # what a subclass does

    def _opens(self, fields: dict[str, str]) -> str | None:
        """Why an answer with the opening status is not what was asked for, or None."""
        raise NotImplementedError

    def _body(self, data: bytes) -> None:
        """Read what follows the answer's head."""
        raise NotImplementedError

    def _fail(self, code: int, reason: str) -> bool:
        """End the connection for a protocol violation; False."""
        raise NotImplementedError

    def _arm_keepalive(self) -> None:
        raise NotImplementedError

    # shared steps

    def _queued(self, before: int) -> None:
        """Texts were queued (``before`` were waiting): wake the reader, and stop
        reading while ``max_queue`` wait."""
        if len(self._messages) > before:
            self._wake()
            if len(self._messages) >= self._high and not self._paused and self._transport:
                self._paused = True
                self._transport.pause_reading()

    def _too_big(self, size: int) -> bool:
        return self._fail(
            TOO_BIG, f"a message of at least {size} bytes; max_size is {self._max_size}"
        )

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class Connection(Receiving):
    """One client connection; make it with :meth:`open`."""

    def __init__(
        self,
        request: bytes,
        accept: bytes,
        *,
        max_queue: int,
        max_size: int,
        ping_interval: float | None,
        ping_timeout: float | None,
        close_timeout: float,
    ) -> None:
        super().__init__(request, max_queue=max_queue, max_size=max_size)
        self._accept = accept
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        self._close_timeout = close_timeout
        self._rest = b""
        """The start of a frame not yet complete."""
        self._parts: list[bytes] = []
        self._parts_size = 0
        self._need = 0
        """Bytes the frame begun in ``_rest`` and ``_parts`` needs in all."""
        self._fragments: bytearray | None = None
        """The message being received in fragments, so far (at most ``max_size``)."""
        self._fragmented_op = _OP_TEXT
        self._close_sent = False
        self._linger: asyncio.TimerHandle | None = None

    @classmethod
    async def open(
        cls,
        url: SplitResult,
        *,
        headers: Mapping[str, str],
        ssl: ssl_module.SSLContext | None = None,
        open_timeout: float | None = 10.0,
        max_queue: int = 1024,
        max_size: int = DEFAULT_MAX_SIZE,
        ping_interval: float | None = 20.0,
        ping_timeout: float | None = 20.0,
        close_timeout: float = 10.0,
    ) -> Connection:
        """Connect to ``url`` (``ws://`` or ``wss://``, path and query included)
        and complete the opening handshake within ``open_timeout`` seconds.
        ``max_size`` (bytes, at least 1) bounds each message received; there is
        no unbounded setting."""
        if max_size < 1:
            raise ValueError(f"max_size must be at least 1 byte; got {max_size}")
        secure = url.scheme == "wss"
        host = url.hostname or "localhost"
        key = base64.b64encode(os.urandom(16))
        accept = base64.b64encode(hashlib.sha1(key + _GUID).digest())  # noqa: S324 - RFC 6455
        target = (url.path or "/") + (f"?{url.query}" if url.query else "")
        host_header = f"[{host}]" if ":" in host else host
        if url.port is not None:
            host_header += f":{url.port}"
        lines = [
            f"GET {target} HTTP/1.1",
            f"Host: {host_header}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key.decode()}",
            "Sec-WebSocket-Version: 13",
            f"User-Agent: broadcastd-client/{__version__}",
            *(f"{name}: {value}" for name, value in headers.items()),
        ]
        request = ("\r\n".join(lines) + "\r\n\r\n").encode()

        def factory() -> Connection:
            return cls(
                request,
                accept,
                max_queue=max_queue,
                max_size=max_size,
                ping_interval=ping_interval,
                ping_timeout=ping_timeout,
                close_timeout=close_timeout,
            )

        return await cls._dial(url, secure, factory, ssl, open_timeout)

    # the program's side

    def send(self, text: str) -> None:
        """Send a text frame (a command): small, so written at once, never awaited."""
        if not self._close_sent and self._transport is not None and not self._lost:
            self._transport.write(client_frame(_OP_TEXT, text.encode()))

    async def close(self, code: int = NORMAL, reason: str = "") -> None:
        """The closing handshake: send a close frame, wait for the daemon's close of
        the TCP connection (at most ``close_timeout`` seconds), then let go."""
        if not self._lost:
            self._send_close(code, reason)
            try:
                async with asyncio.timeout(self._close_timeout):
                    await asyncio.shield(self.closed)
            except TimeoutError:
                self.abort()
        self._wake()

    # asyncio.Protocol

    def connection_lost(self, exc: Exception | None) -> None:
        if self._linger is not None:
            self._linger.cancel()
        super().connection_lost(exc)

    # the opening handshake

    def _opens(self, fields: dict[str, str]) -> str | None:
        if (
            fields.get("upgrade", "").lower() != "websocket"
            or "upgrade" not in fields.get("connection", "").lower()
            or fields.get("sec-websocket-accept", "").encode() != self._accept
        ):
            return "the answer is not a valid WebSocket upgrade"
        if fields.get("sec-websocket-extensions") or fields.get("sec-websocket-protocol"):
            return "the server chose an extension or subprotocol not offered"
        return None

    # frames

    def _body(self, data: bytes) -> None:
        """Walk the frames of ``data`` (after what an earlier chunk left begun)."""
        if self._need:
            self._parts.append(data)
            self._parts_size += len(data)
            if len(self._rest) + self._parts_size < self._need:
                return  # a large frame still arriving: gather, do not copy
            data = self._rest + b"".join(self._parts)
            self._rest, self._parts, self._parts_size, self._need = b"", [], 0, 0
        elif self._rest:
            data = self._rest + data
            self._rest = b""
        messages = self._messages
        queued = len(messages)
        # Frames up to this long need no check of their length at their header; a
        # whole text frame (the daemon's) needs only a comparison with max_size.
        max_size = self._max_size
        unchecked = min(MAX_CONTROL, max_size)
        size = len(data)
        pos = 0
        walking = True
        while size - pos >= 2:
            first = data[pos]
            length = data[pos + 1]
            if length & 0x80:
                walking = self._fail(PROTOCOL_ERROR, "a server frame must not be masked")
                break
            start = pos + 2
            if length == 126:
                if size - pos < 4:
                    break
                length = int.from_bytes(data[start : start + 2], "big")
                start += 2
            elif length == 127:
                if size - pos < 10:
                    break
                length = int.from_bytes(data[start : start + 8], "big")
                start += 8
            if (
                length > unchecked
                and (first != _TEXT_FIN or length > max_size)
                and not self._may_take(first, length)
            ):
                walking = False
                break
            end = start + length
            if end > size:
                self._need = end - pos
                break
            if first == _TEXT_FIN:
                try:
                    messages.append(data[start:end].decode())
                except UnicodeDecodeError:
                    walking = self._fail(INVALID_DATA, "invalid UTF-8")
                    break
            elif not self._frame(first, data[start:end]):
                walking = False
                break
            pos = end
        if walking and pos < size:
            self._rest = data[pos:]
        self._queued(queued)

    def _frame(self, first: int, payload: bytes) -> bool:
        """Any frame but a whole text frame; False if nothing more is to be read (a
        close frame, or a violation that failed the connection)."""
        fin, opcode = first & 0x80, first & 0x0F
        if first & 0x70:
            return self._fail(PROTOCOL_ERROR, "reserved bits set without an extension")
        if opcode >= 0x8:
            if not fin or len(payload) > MAX_CONTROL:
                return self._fail(PROTOCOL_ERROR, "a control frame must be whole and short")
            if opcode == _OP_PING:
                if not self._close_sent and self._transport is not None:
                    self._transport.write(client_frame(_OP_PONG, payload))
            elif opcode == _OP_CLOSE:
                self._close_received(payload)
                return False
            elif opcode != _OP_PONG:
                return self._fail(PROTOCOL_ERROR, f"unknown opcode {opcode}")
            return True
        message: bytes | bytearray = payload
        if opcode == _OP_CONT:
            fragments = self._fragments
            if fragments is None:
                return self._fail(PROTOCOL_ERROR, "a continuation frame starts nothing")
            if len(fragments) + len(payload) > self._max_size:
                return self._too_big(len(fragments) + len(payload))
            fragments += payload
            if not fin:
                return True
            message, self._fragments = fragments, None
            opcode = self._fragmented_op
        elif opcode in (_OP_TEXT, _OP_BINARY):
            if self._fragments is not None:
                return self._fail(PROTOCOL_ERROR, "a new message began inside a fragmented one")
            if not fin:
                self._fragments, self._fragmented_op = bytearray(payload), opcode
                return True
        else:
            return self._fail(PROTOCOL_ERROR, f"unknown opcode {opcode}")
        if opcode == _OP_BINARY:
            return self._fail(UNSUPPORTED_DATA, "binary frames are not expected")
        try:
            self._messages.append(message.decode())
        except UnicodeDecodeError:
            return self._fail(INVALID_DATA, "invalid UTF-8")
        return True

    def _may_take(self, first: int, length: int) -> bool:
        """Whether a frame that announces ``length`` bytes may be read; if not, the
        connection fails at once, from its header, before any of it is kept: a
        control frame longer than 125 bytes breaks the protocol (1002), a message
        that would pass ``max_size`` is too big (1009)."""
        if first & 0x08:
            return self._fail(PROTOCOL_ERROR, "a control frame must be whole and short")
        fragments = self._fragments
        if first & 0x0F == _OP_CONT and fragments is not None:
            length += len(fragments)
        if length > self._max_size:
            return self._too_big(length)
        return True

    def _close_received(self, payload: bytes) -> None:
        if len(payload) == 1:
            self._fail(PROTOCOL_ERROR, "a close frame's payload cannot be one byte")
            return
        code = int.from_bytes(payload[:2], "big") if payload else NO_STATUS
        try:
            reason = payload[2:].decode()
        except UnicodeDecodeError:
            self._fail(INVALID_DATA, "invalid UTF-8 in the close reason")
            return
        self._received = Closed(code, reason)
        # Echo the code, then let the daemon close the TCP connection (RFC 6455 7.1.1),
        # or close it here if it does not within close_timeout.
        self._send_close(code if code != NO_STATUS else NORMAL)
        self._linger = self._loop.call_later(self._close_timeout, self.abort)
        self._wake()

    def _send_close(self, code: int, reason: str = "") -> None:
        if self._close_sent or self._transport is None or self._lost:
            return
        self._close_sent = True
        self._transport.write(client_frame(_OP_CLOSE, _close_payload(code, reason)))

    def _fail(self, code: int, reason: str) -> bool:
        """End the connection for a protocol violation: tell the daemon why, then
        close; the program sees 1006 (no close frame came), as RFC 6455 7.1.5 says."""
        if self._failed is None:
            self._failed = Closed(ABNORMAL, reason, code)
            self._send_close(code, reason)
            if self._transport is not None:
                self._transport.close()
            self._wake()
        return False

    # keepalive

    def _arm_keepalive(self) -> None:
        if self._ping_interval is not None:
            self._keepalive = self._loop.call_later(self._ping_interval, self._check_alive)

    def _check_alive(self) -> None:
        """Every ``ping_interval``: after that long without a byte from the daemon,
        ping; if ``ping_timeout`` more pass without one, the daemon is gone."""
        assert self._ping_interval is not None
        if self._lost or self._close_sent:
            return
        silent = time.monotonic() - self._last_read
        if silent < self._ping_interval or self._paused:
            # Not silent, or not read (the program is behind): no reason to ping.
            silent = 0.0 if self._paused else silent
            self._keepalive = self._loop.call_later(self._ping_interval - silent, self._check_alive)
            return
        if self._transport is not None:
            self._transport.write(client_frame(_OP_PING, b""))
        timeout = self._ping_timeout if self._ping_timeout is not None else self._ping_interval
        self._keepalive = self._loop.call_later(timeout, self._still_silent, self._last_read)

    def _still_silent(self, since: float) -> None:
        if self._lost or self._close_sent:
            return
        if self._last_read == since and not self._paused:
            self._failed = Closed(ABNORMAL, "keepalive ping timeout", KEEPALIVE)
            self._send_close(KEEPALIVE, "keepalive ping timeout")
            self.abort()
            self._wake()
            return
        self._arm_keepalive()
