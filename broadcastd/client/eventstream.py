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

import ssl as ssl_module
import time
from collections.abc import Mapping
from urllib.parse import SplitResult

import msgspec

from broadcastd import __version__
from broadcastd.client.connection import (
    ABNORMAL,
    DEFAULT_MAX_SIZE,
    INVALID_DATA,
    KEEPALIVE,
    PROTOCOL_ERROR,
    Closed,
    Receiving,
)

MAX_CHUNK_LINE = 1024
"""Longest chunk-size line accepted (hex digits and extensions)."""
_LINE_SLACK = 64
"""A ``data:`` line holds at most ``max_size`` of text plus its field name."""

_decode_close = msgspec.json.Decoder().decode


class EventStreamConnection(Receiving):
    """One Server-Sent Events stream; make it with :meth:`open`."""

    _ANSWER = 200

    def __init__(
        self,
        request: bytes,
        *,
        max_queue: int,
        max_size: int,
        ping_interval: float | None,
        ping_timeout: float | None,
    ) -> None:
        super().__init__(request, max_queue=max_queue, max_size=max_size)
        self._max_line = max_size + _LINE_SLACK
        self._silence = None if ping_interval is None else ping_interval + (ping_timeout or 0.0)
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

        def factory() -> EventStreamConnection:
            return cls(
                request,
                max_queue=max_queue,
                max_size=max_size,
                ping_interval=ping_interval,
                ping_timeout=ping_timeout,
            )

        return await cls._dial(url, secure, factory, ssl, open_timeout)

    # the program's side

    def send(self, text: str) -> None:
        """Nothing: a stream carries no commands (the subscriber reopens it instead)."""

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """End the stream: an HTTP stream has no closing handshake, so the
        connection is closed at once."""
        self.abort()
        self._wake()

    # the answer's head

    def _opens(self, fields: dict[str, str]) -> str | None:
        if not fields.get("content-type", "").startswith("text/event-stream"):
            return "the answer is not an event stream"
        if fields.get("transfer-encoding", "").lower() != "chunked":
            return "the event stream is not chunked"
        return None

    # the body: chunks, then lines, then events

    def _body(self, data: bytes) -> None:
        queued = len(self._messages)
        self._chunks(data)
        self._queued(queued)

    def _chunks(self, data: bytes) -> None:
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

    def _fail(self, code: int, reason: str) -> bool:
        if self._failed is None:
            self._failed = Closed(ABNORMAL, reason, code)
            self.abort()
            self._wake()
        return False

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
