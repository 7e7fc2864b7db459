"""A client Server-Sent Events connection, shaped like the WebSocket one.

:class:`~broadcastd.client.subscriber.Subscriber` drives a connection through
four calls: ``pop()`` a text, ``wait()`` for one (or :class:`Closed`),
``send()`` a command, ``close()``. This is the same for the daemon's event
stream (``Accept: text/event-stream`` on the subscriber URL), so that one
subscriber serves both transports: each event's ``data`` is a text (a message's
JSON envelope, or a reply's JSON, whose ``type`` names it), and the daemon's
last ``event: close`` becomes the :class:`Closed` a close frame would have
given. A stream is one-way: ``send()`` cannot carry a command, and the
subscriber reopens the stream instead.

It speaks HTTP/1.1 on a raw asyncio connection (the daemon's stream is chunked),
keeps the ``id`` of the last event read (:attr:`last_event_id`, what a browser
sends back as ``Last-Event-ID``), stops reading while ``max_queue`` texts wait
unread, as the WebSocket connection does, and fails with 1009 on a line longer
than ``max_size`` before keeping more of it. It cannot ping: a stream silent for
``ping_interval`` plus ``ping_timeout`` (the daemon sends a comment every
``ws.ping_interval``) is taken for dead.
"""

from __future__ import annotations

import asyncio
import ssl as ssl_module
import time
from collections import deque
from collections.abc import Mapping
from typing import cast
from urllib.parse import SplitResult

import msgspec

from broadcastd import __version__
from broadcastd.client.connection import (
    ABNORMAL,
    DEFAULT_MAX_SIZE,
    INVALID_DATA,
    KEEPALIVE,
    MAX_HEAD,
    MAX_REFUSAL_BODY,
    PROTOCOL_ERROR,
    TOO_BIG,
    Closed,
    HandshakeFailed,
    HandshakeRefused,
)

MAX_CHUNK_LINE = 1024
"""Longest chunk-size line accepted (hex digits and extensions)."""
_LINE_SLACK = 64
"""A ``data:`` line holds at most ``max_size`` of text plus its field name."""

_decode_close = msgspec.json.Decoder().decode


class EventStreamConnection(asyncio.Protocol):
    """One Server-Sent Events stream; make it with :meth:`open`."""

    def __init__(
        self,
        request: bytes,
        *,
        max_queue: int,
        max_size: int,
        ping_interval: float | None,
        ping_timeout: float | None,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._request = request
        self._high = max(1, max_queue)
        self._low = self._high // 4
        self._max_line = max_size + _LINE_SLACK
        self._max_size = max_size
        self._silence = None if ping_interval is None else ping_interval + (ping_timeout or 0.0)
        self._transport: asyncio.Transport | None = None
        self.handshake: asyncio.Future[None] = self._loop.create_future()
        self._head = b""
        self._refusal: HandshakeRefused | None = None
        self._refusal_length: int | None = None
        self._messages: deque[str] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False
        self._chunked = b""
        """Bytes of the chunked body not yet decoded."""
        self._chunk_left = 0
        """Bytes of the current chunk still to come (and then its CRLF)."""
        self._text = b""
        """The start of an event-stream line not yet complete."""
        self._data: list[bytes] | None = None
        self._name = b""
        self._pending_id: str | None = None
        self.last_event_id: str | None = None
        """The ``id`` of the last event read (None before any)."""
        self._received: Closed | None = None
        """The daemon's ``event: close``, or the end of its stream."""
        self._failed: Closed | None = None
        self._lost = False
        self.closed: asyncio.Future[None] = self._loop.create_future()
        self._last_read = time.monotonic()
        self._keepalive: asyncio.TimerHandle | None = None

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
    ) -> EventStreamConnection:
        """Ask ``url`` (``http://`` or ``https://``, path and query included) for
        its event stream; return once the daemon answered 200. Another answer is a
        :class:`HandshakeRefused` with its status and JSON body."""
        if max_size < 1:
            raise ValueError(f"max_size must be at least 1 byte; got {max_size}")
        secure = url.scheme == "https"
        host = url.hostname or "localhost"
        port = url.port or (443 if secure else 80)
        target = (url.path or "/") + (f"?{url.query}" if url.query else "")
        host_header = f"[{host}]" if ":" in host else host
        if url.port is not None:
            host_header += f":{url.port}"
        lines = [
            f"GET {target} HTTP/1.1",
            f"Host: {host_header}",
            "Accept: text/event-stream",
            "Cache-Control: no-cache",
            f"User-Agent: broadcastd-client/{__version__}",
            *(f"{name}: {value}" for name, value in headers.items()),
        ]
        request = ("\r\n".join(lines) + "\r\n\r\n").encode()
        loop = asyncio.get_running_loop()

        def factory() -> EventStreamConnection:
            return cls(
                request,
                max_queue=max_queue,
                max_size=max_size,
                ping_interval=ping_interval,
                ping_timeout=ping_timeout,
            )

        context = (ssl or ssl_module.create_default_context()) if secure else None
        async with asyncio.timeout(open_timeout):
            _, connection = await loop.create_connection(
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
            if self._received is not None or self._failed is not None or self._lost:
                raise self._received or self._failed or Closed(ABNORMAL)
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def send(self, text: str) -> None:
        """Nothing: a stream carries no commands (the subscriber reopens it instead)."""

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """End the stream: an HTTP stream has no closing handshake, so the
        connection is closed at once."""
        self.abort()
        self._wake()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._transport.write(self._request)

    def data_received(self, data: bytes) -> None:
        self._last_read = time.monotonic()
        if not self.handshake.done() or self._refusal is not None:
            data = self._handshake_data(data)
            if not data:
                return
        if self._failed is not None or self._received is not None:
            return
        queued = len(self._messages)
        self._body(data)
        if len(self._messages) > queued:
            self._wake()
            if len(self._messages) >= self._high and not self._paused and self._transport:
                self._paused = True
                self._transport.pause_reading()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        if self._keepalive is not None:
            self._keepalive.cancel()
        if not self.handshake.done():
            refusal = self._refusal
            self.handshake.set_exception(
                refusal
                if refusal is not None
                else ConnectionError("the connection closed before the stream's answer")
            )
        if not self.closed.done():
            self.closed.set_result(None)
        self._wake()

    # the answer's head

    def _handshake_data(self, data: bytes) -> bytes:
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
        if status != 200:
            self._refusal = HandshakeRefused(status, reason, fields, b"")
            length = fields.get("content-length", "")
            self._refusal_length = int(length) if length.isdigit() else None
            self._refusal_body(rest)
            return b""
        if not fields.get("content-type", "").startswith("text/event-stream"):
            self._handshake_failed("the answer is not an event stream")
            return b""
        if fields.get("transfer-encoding", "").lower() != "chunked":
            self._handshake_failed("the event stream is not chunked")
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

    # the body: chunks, then lines, then events

    def _body(self, data: bytes) -> None:
        buffer = self._chunked + data if self._chunked else data
        self._chunked = b""
        pos, size = 0, len(buffer)
        while pos < size:
            left = self._chunk_left
            if left > 0:
                take = min(left, size - pos)
                if not self._lines(buffer[pos : pos + take]):
                    return
                pos += take
                self._chunk_left = left - take
                if self._chunk_left == 0:
                    self._chunk_left = -2  # its CRLF
                continue
            if left < 0:
                # The CRLF after a chunk's data.
                need = -left
                if size - pos < need:
                    self._chunk_left = -(need - (size - pos))
                    return
                pos += need
                self._chunk_left = 0
                continue
            end = buffer.find(b"\r\n", pos)
            if end == -1:
                if size - pos > MAX_CHUNK_LINE:
                    self._fail(PROTOCOL_ERROR, "a chunk size line too long")
                    return
                self._chunked = buffer[pos:]
                return
            digits = buffer[pos:end].split(b";", 1)[0].strip()
            try:
                length = int(digits, 16)
            except ValueError:
                self._fail(PROTOCOL_ERROR, "a malformed chunk size")
                return
            pos = end + 2
            if length == 0:
                self._received = Closed(ABNORMAL, "the stream ended without a close event")
                self._wake()
                return
            self._chunk_left = length

    def _lines(self, data: bytes) -> bool:
        """Take a piece of the event stream; False once nothing more is to be read."""
        text = self._text + data if self._text else data
        lines = text.split(b"\n")
        self._text = rest = lines.pop()
        if len(rest) > self._max_line:
            return self._too_big(len(rest))
        for line in lines:
            if line.endswith(b"\r"):
                line = line[:-1]
            if not line:
                if not self._dispatch():
                    return False
                continue
            if line[0] == 0x3A:  # ":" a comment: the daemon's keepalive
                continue
            field, colon, value = line.partition(b":")
            if colon and value.startswith(b" "):
                value = value[1:]
            if field == b"data":
                data_lines = self._data
                if data_lines is None:
                    self._data = [value]
                else:
                    data_lines.append(value)
            elif field == b"event":
                self._name = value
            elif field == b"id":
                self._pending_id = value.decode("utf-8", "replace")
        return True

    def _dispatch(self) -> bool:
        data_lines, name = self._data, self._name
        self._data, self._name = None, b""
        if self._pending_id is not None:
            self.last_event_id, self._pending_id = self._pending_id, None
        if data_lines is None:
            return True
        data = data_lines[0] if len(data_lines) == 1 else b"\n".join(data_lines)
        if len(data) > self._max_size:
            return self._too_big(len(data))
        try:
            text = data.decode()
        except UnicodeDecodeError:
            return self._fail(INVALID_DATA, "invalid UTF-8")
        if name == b"close":
            # The daemon ends the stream: the close code a WebSocket would get.
            code, reason = ABNORMAL, ""
            try:
                close = _decode_close(text)
                code, reason = int(close["code"]), str(close.get("reason", ""))
            except (msgspec.DecodeError, KeyError, TypeError, ValueError):
                pass
            self._received = Closed(code, reason)
            self._wake()
            return False
        self._messages.append(text)
        return True

    def _too_big(self, size: int) -> bool:
        return self._fail(
            TOO_BIG, f"a message of at least {size} bytes; max_size is {self._max_size}"
        )

    def _fail(self, code: int, reason: str) -> bool:
        if self._failed is None:
            self._failed = Closed(ABNORMAL, reason, code)
            self.abort()
            self._wake()
        return False

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # keepalive

    def _arm_keepalive(self) -> None:
        if self._silence is not None:
            self._keepalive = self._loop.call_later(self._silence, self._check_alive)

    def _check_alive(self) -> None:
        """A stream silent for ``ping_interval + ping_timeout`` (while read) is dead."""
        assert self._silence is not None
        if self._lost:
            return
        silent = time.monotonic() - self._last_read
        if silent < self._silence or self._paused:
            wait = self._silence - (0.0 if self._paused else silent)
            self._keepalive = self._loop.call_later(wait, self._check_alive)
            return
        self._fail(KEEPALIVE, "keepalive timeout: the stream was silent")
