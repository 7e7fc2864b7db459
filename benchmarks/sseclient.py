"""Cheap Server-Sent Events subscribers (S1s): raw asyncio Protocols that count events.

As lean as the WebSocket load client (:mod:`benchmarks.wsclient`), so that S1s
against S1 compares the servers' transports and not two clients: the GET is
written by hand, and the chunked body is walked chunk by chunk (the daemon
writes each pass of events as one chunk, so a chunk holds whole events). In
each complete chunk the messages are counted with one ``bytes.count`` of the
marker every message event has and no notice has (``data: {"c`` for an
envelope, ``data: {"t":`` for a raw payload: notices are ``data: {"type"...``
after an ``event:`` line); only chunks with an ``event:`` line are parsed
further. The ``id:`` line each message carries is not read.

Connections share the WebSocket client's :class:`~benchmarks.wsclient.Pool`
(its counters, its ``connect`` with bounded handshakes in flight): a stream
counts as subscribed at its ``event: subscribed``, which the daemon sends in
raw mode too.
"""

from __future__ import annotations

import asyncio
import re
import time

from benchmarks.wsclient import _MISSED_COUNT, HandshakeError, Pool, Subscriber

SSE = "text/event-stream"
_ENVELOPE = b'data: {"c'
_RAW = b'data: {"t":'
_EVENT = b"event: "
_CLOSE_CODE = re.compile(rb'"code": ?(\d+)')


def stream_request(host: str, port: int, path: str) -> bytes:
    """The GET that opens an event stream on the subscriber URL."""
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: {SSE}\r\n"
        "Cache-Control: no-cache\r\n\r\n"
    ).encode()


class SseSubscriber(Subscriber):
    """One event stream: the 200 head, then chunks of events counted into the pool."""

    __slots__ = ("marker",)

    def __init__(
        self, pool: Pool, request: bytes, ready: asyncio.Future[None], *, raw: bool
    ) -> None:
        super().__init__(pool, request, b"", 1, ready)
        self.marker = _RAW if raw else _ENVELOPE

    def data_received(self, data: bytes) -> None:
        pool = self.pool
        pool.bytes_received += len(data)
        if self.pending:
            data = self.pending + data
            self.pending = b""
        if self.handshaking:
            data = self._head(data)
            if not data:
                return
        marker = self.marker
        n = len(data)
        pos = 0
        count = 0
        while True:
            eol = data.find(b"\r\n", pos)
            if eol < 0:
                break
            try:
                size = int(data[pos:eol], 16)
            except ValueError:
                pool.errors["bad chunk"] += 1
                self.abort()
                return
            start = eol + 2
            end = start + size
            if end + 2 > n:
                break
            if size == 0:
                pos = n
                break
            found = data.count(marker, start, end)
            if found:
                count += found
                if pool.sample_every:
                    pool.countdown -= found
                    if pool.countdown <= 0:
                        pool.countdown = pool.sample_every
                        self._sample(data, data.rfind(marker, start, end), end, time.monotonic_ns())
            if data.find(_EVENT, start, end) >= 0 and self._notices(data[start:end]):
                return
            pos = end + 2
        if pos < n:
            self.pending = data[pos:]
        if count:
            pool.messages += count
            pool.last_message_at = time.monotonic()
            if pool.messages >= pool.target:
                pool.target_reached.set()

    def _head(self, data: bytes) -> bytes:
        """Check the 200 answer; return the bytes after its head (the first chunks)."""
        read = self._response_head(data, "200")
        if read is None:
            return b""
        head, rest = read
        fields = {name: value.lower() for name, value in head}
        if not fields.get("content-type", "").startswith(SSE):
            self._fail(f"not an event stream: {fields.get('content-type')}")
            return b""
        if fields.get("transfer-encoding") != "chunked":
            self._fail("not chunked")
            return b""
        self.handshaking = False
        self.pool.handshakes += 1
        self.pool.open += 1
        return rest

    def _notices(self, chunk: bytes) -> bool:
        """The named events of one chunk; True if the stream ended."""
        for event in chunk.split(b"\n\n"):
            at = event.find(_EVENT)
            if at < 0:
                continue
            name = event[at + len(_EVENT) : event.find(b"\n", at)]
            self.pool.replies += 1
            if name == b"subscribed":
                if self.replies_left:
                    self.replies_left -= 1
                    if self.replies_left == 0 and not self.ready.done():
                        self.ready.set_result(None)
            elif name == b"missed":
                match = _MISSED_COUNT.search(event)
                if match is not None:
                    self.pool.add_missed(int(match.group(1)))
            elif name == b"close":
                match = _CLOSE_CODE.search(event)
                code = int(match.group(1)) if match is not None else 1005
                self.pool.closed_by_server[code] += 1
                if self.transport is not None:
                    self.transport.close()
                if not self.ready.done():
                    self.ready.set_exception(HandshakeError(f"closed {code} before subscribed"))
                return True
        return False
