"""A small HTTP/1.1 server on llhttp (httptools), for the control port.

Why httptools: it binds llhttp, Node.js's parser, written in C and fuzzed in
the field; uvicorn uses it for the same reason. Parsing is the part of HTTP
that must not be written by hand. What is left here is framing: keep-alive,
pipelining, bounds (header bytes, body bytes, idle time) and flow control.

Handlers are plain functions that return a response at once; publishing never
waits, so a request is answered inside the ``data_received`` call that
completed it, pipelined requests are answered in order, and no task is
created per request. When a client does not read its responses, reading from
it pauses until the transport's buffer drains.
"""

from __future__ import annotations

import asyncio
import http
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

import httptools

from broadcastd.errors import ClientError, HeadersTooLarge, PayloadTooLarge


@dataclass(slots=True)
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass(slots=True)
class Response:
    status: int
    body: bytes
    headers: list[tuple[str, str]] = field(default_factory=list)
    content_type: str = "application/json"


Handler = Callable[[Request], Response]
ErrorBody = Callable[[ClientError], Response]

_STATUS_LINES = {
    status.value: f"HTTP/1.1 {status.value} {status.phrase}\r\n".encode()
    for status in http.HTTPStatus
}


class _Abort(Exception):
    """Raised inside a parser callback to stop reading a request we will refuse."""

    def __init__(self, error: ClientError) -> None:
        self.error = error


class HttpProtocol(asyncio.Protocol):
    """One control connection."""

    __slots__ = (
        "_body",
        "_body_size",
        "_closing",
        "_connections",
        "_header_bytes",
        "_headers",
        "_idle",
        "_last_active",
        "_limits",
        "_loop",
        "_out",
        "_parser",
        "_transport",
        "_url",
        "handler",
        "on_error",
    )

    def __init__(
        self, handler: Handler, on_error: ErrorBody, limits: Limits, connections: set[HttpProtocol]
    ) -> None:
        self.handler = handler
        self._connections = connections
        self.on_error = on_error
        self._limits = limits
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        self._url = b""
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._body_size = 0
        self._header_bytes = 0
        self._closing = False
        self._out: list[bytes] = []
        self._last_active = 0.0
        self._idle: asyncio.TimerHandle | None = None

    # asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self._connections.add(self)
        self._last_active = self._loop.time()
        self._idle = self._loop.call_later(self._limits.idle_timeout, self._check_idle)

    def connection_lost(self, exc: Exception | None) -> None:
        self._connections.discard(self)
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        self._transport = None

    def data_received(self, data: bytes) -> None:
        self._last_active = self._loop.time()
        out: list[bytes] = []
        self._out = out
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            error = cause.error if isinstance(cause, _Abort) else ClientError("bad request")
            self._respond(self.on_error(error), close=True)
        except httptools.HttpParserUpgrade:
            self._respond(
                self.on_error(ClientError("protocol upgrade is not offered here")), close=True
            )
        except httptools.HttpParserError as exc:
            self._respond(self.on_error(ClientError(f"malformed HTTP request: {exc}")), close=True)
        # Every response to the requests in this read goes out in one write.
        transport = self._transport
        if out and transport is not None:
            transport.write(out[0] if len(out) == 1 else b"".join(out))
            if self._closing:
                transport.close()

    def close(self) -> None:
        """Close the connection (at shutdown), whatever it is doing."""
        if self._transport is not None:
            self._transport.close()

    def pause_writing(self) -> None:
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        if self._transport is not None:
            self._transport.resume_reading()

    def _check_idle(self) -> None:
        if self._transport is None:
            return
        idle_for = self._loop.time() - self._last_active
        if idle_for >= self._limits.idle_timeout:
            self._transport.close()
            return
        self._idle = self._loop.call_later(self._limits.idle_timeout - idle_for, self._check_idle)

    # llhttp callbacks

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = {}
        self._body = []
        self._body_size = 0
        self._header_bytes = 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._count_header_bytes(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_header_bytes(len(name) + len(value) + 4)
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        if key in self._headers:
            self._headers[key] += ", " + text
        else:
            self._headers[key] = text

    def on_headers_complete(self) -> None:
        length = self._headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self._limits.max_body:
            raise _Abort(self._too_large())

    def on_body(self, body: bytes) -> None:
        self._body_size += len(body)
        if self._body_size > self._limits.max_body:
            raise _Abort(self._too_large())
        self._body.append(body)

    def on_message_complete(self) -> None:
        if self._closing:
            return
        method = self._parser.get_method().decode("latin-1")
        path = self._url.decode("latin-1").partition("?")[0]
        body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        request = Request(method, path, self._headers, body)
        self._body = []
        self._respond(self.handler(request), close=not self._parser.should_keep_alive())

    # helpers

    def _count_header_bytes(self, n: int) -> None:
        self._header_bytes += n
        if self._header_bytes > self._limits.max_header:
            raise _Abort(
                HeadersTooLarge(f"request line and headers exceed {self._limits.max_header} bytes")
            )

    def _too_large(self) -> PayloadTooLarge:
        return PayloadTooLarge(f"request body exceeds {self._limits.max_body} bytes")

    def _respond(self, response: Response, *, close: bool) -> None:
        """Queue a response; data_received writes them all at its end."""
        if self._transport is None or self._closing:
            return
        head = [
            _STATUS_LINES[response.status],
            b"Content-Type: %s\r\nContent-Length: %d\r\n"
            % (response.content_type.encode("latin-1"), len(response.body)),
        ]
        for name, value in response.headers:
            head.append(f"{name}: {value}\r\n".encode("latin-1"))
        if close:
            head.append(b"Connection: close\r\n")
        head.append(b"\r\n")
        head.append(response.body)
        self._out.append(b"".join(head))
        if close:
            self._closing = True


@dataclass(frozen=True, slots=True)
class Limits:
    max_header: int
    max_body: int
    idle_timeout: float
