"""A small HTTP/1.1 server on llhttp (httptools), for the control port.

Why httptools: it binds llhttp, Node.js's parser, written in C and fuzzed in
the field; uvicorn uses it for the same reason. Parsing is the part of HTTP
that must not be written by hand. What is left here is framing: keep-alive,
pipelining, bounds and flow control.

Handlers are plain functions that return a response at once, so a request is
answered inside the ``data_received`` call that completed it, pipelined
requests are answered in order with one write per read, and no task is created
per request. A handler may instead return an awaitable (a publish through Redis
waits for Redis): the connection goes on answering the requests pipelined behind
it, up to ``MAX_IN_FLIGHT`` of them, so that their calls share the engine's
round trips; each answer is written once every answer before it is, so the
answers keep their order, and what waits stays bounded.

The bounds, and why each is there:

* What a client can make the server buffer. Input is parsed ``READ_SLICE``
  bytes at a time. Once the answers a client has not read exceed
  ``write_limit``, answering stops at the next request and parsing at the end
  of the slice: the rest of the input waits unparsed, reading pauses, and both
  resume as the client reads. (llhttp reports no offset when a callback stops
  it, so it cannot be stopped mid-buffer and resumed; the requests of one slice
  wait parsed instead.)
* Time. ``idle_timeout`` between requests; ``header_timeout`` for a whole
  request line and headers, however slowly they trickle in (bytes of a partial
  head are not activity): 408 and close.
* Refusals that end a connection mid-request (413, 431, 408, CONNECT, a
  refused ``Expect: 100-continue``, malformed HTTP) are a lingering close: the
  answer goes out, the connection is half-closed, and what the client is still
  sending is read and dropped before closing, so that a client busy sending its
  body (urllib sends it whole before it reads) reads the answer instead of a
  reset. As nginx's lingering close, it is bounded in time, not in bytes: until
  the client pauses for ``linger_timeout`` seconds, and ``linger_time`` in all.
  What is dropped is never held, so a larger upload costs reads, not memory.

Protocol upgrades are not offered: ``Upgrade`` is ignored (RFC 9110 section
7.8 lets a server ignore it) and the request is served as HTTP/1.1; CONNECT is
refused with 405. Either way a request gets exactly one answer. HEAD is
answered like GET without the body. A handler that raises is a 500 with one
log line; the connection and every other one go on.
"""

from __future__ import annotations

import asyncio
import http
from collections import deque
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Protocol, cast

import httptools

from broadcastd import log
from broadcastd.errors import (
    ClientError,
    HeadersTooLarge,
    InternalError,
    MethodNotAllowed,
    PayloadTooLarge,
    RequestTimeout,
    error_json,
)
from broadcastd.later import Later


@dataclass(slots=True)
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    query: str = ""
    keep_alive: bool = True


@dataclass(slots=True)
class Response:
    status: int
    body: bytes
    headers: Sequence[tuple[str, str]] = ()
    content_type: str = "application/json"


class Api(Protocol):
    """What an HttpProtocol serves."""

    def handle(self, request: Request) -> Response | Awaitable[Response]:
        """The answer to a complete request (or, when it must wait, an awaitable of it)."""

    def check(self, request: Request) -> ClientError | None:
        """The error a request will get, judged from its head alone (for
        ``Expect: 100-continue``); None if its body is worth sending."""

    def refuse(self, error: ClientError | InternalError, request: Request | None) -> Response:
        """The answer to a request refused before (or instead of) ``handle``."""


@dataclass(frozen=True, slots=True)
class Limits:
    max_header: int
    max_body: int
    idle_timeout: float
    header_timeout: float = 10.0
    linger_timeout: float = 5.0
    linger_time: float = 30.0
    write_limit: int = 256 * 1024


READ_SLICE = 16 * 1024
"""Input parsed at a time: what may wait parsed once a client stops reading."""

_STATUS_LINES = {
    status.value: f"HTTP/1.1 {status.value} {status.phrase}\r\n".encode()
    for status in http.HTTPStatus
}
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"

# What happens to the input (HttpProtocol._state).
_READING = 0
"""Requests are parsed and answered."""
_SKIPPING_BODY = 1
"""A refused request's body is parsed and dropped; then _DONE."""
_DROPPING = 2
"""The input cannot be parsed any more: dropped unparsed until EOF or the linger
bounds."""
_DONE = 3
"""The last request is read; nothing more is."""

_throttle = log.Throttle(per_second=10)

_DETACHED = httptools.HttpRequestParser(object())
"""The parser of every closed connection: it is never fed, and refers to none."""


MAX_IN_FLIGHT = 128
"""Answers one connection may have under way: a handler still working on the
oldest, and those made after it, which wait for it. At the bound the
connection parses no further until the oldest is written."""


@dataclass(slots=True)
class _Reply:
    """An answer rendered before its turn came (a refusal, 100 Continue, or one
    behind a handler still working), or an answer to come (``data`` None)."""

    data: bytes | None
    close: bool


class _Stop(Exception):
    """Raised in a parser callback to stop parsing the rest of the input."""


class HttpProtocol(asyncio.Protocol):
    """One connection."""

    __slots__ = (
        "_body",
        "_body_size",
        "_budget",
        "_closing",
        "_connections",
        "_eof",
        "_final",
        "_head_at",
        "_header_bytes",
        "_headers",
        "_in_flight",
        "_last_active",
        "_limits",
        "_linger_until",
        "_loop",
        "_now",
        "_out",
        "_out_size",
        "_parser",
        "_pending",
        "_pump_soon",
        "_queue",
        "_reading_paused",
        "_shut",
        "_state",
        "_timer",
        "_timer_at",
        "_transport",
        "_upgrade",
        "_upgrade_left",
        "_url",
        "_write_limit",
        "_writing_paused",
        "api",
    )

    def __init__(self, api: Api, limits: Limits, connections: set[HttpProtocol]) -> None:
        self.api = api
        self._limits = limits
        self._write_limit = limits.write_limit
        self._connections = connections
        self._loop = asyncio.get_running_loop()
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._state = _READING
        # The request being parsed.
        self._url = b""
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._body_size = 0
        self._header_bytes = 0
        self._upgrade: Request | None = None
        """A request that asked for an upgrade: llhttp leaves its body to us."""
        self._upgrade_left = 0
        # Answers and flow control.
        self._pending: bytes | memoryview = b""
        """Input not parsed yet."""
        self._queue: deque[Request | _Reply] = deque()
        """Requests (and refusals) waiting for the client to read earlier answers."""
        self._out: list[bytes] = []
        self._out_size = 0
        self._budget = -1
        """Answer bytes this round (a pass of parsing and answering ending in one
        write) may still produce. A timer sets it to -1, so that the answer it
        makes waits in the queue for the pump."""
        self._pump_soon = False
        """A pump is due this turn of the loop: the answers that came meanwhile
        leave in its one write."""
        self._in_flight: deque[_Reply] = deque()
        """From the oldest answer a handler is still working on, every answer in
        request order (those made already wait for it): MAX_IN_FLIGHT at most."""
        self._final = False
        """The answer that ends the connection is made (it may wait in the queue)."""
        self._closing = False
        """That answer is written: close once the input is done with."""
        self._shut = False
        self._eof = False
        self._writing_paused = False
        self._reading_paused = False
        # Deadlines.
        self._now = 0.0
        self._last_active = 0.0
        self._head_at: float | None = None
        self._linger_until: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0

    # asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport = cast(asyncio.Transport, transport)  # uvloop's: no subclass
        transport.set_write_buffer_limits(high=self._limits.write_limit)
        self._connections.add(self)
        self._now = self._last_active = self._loop.time()
        self._arm(self._now + self._limits.idle_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._connections.discard(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._transport = None
        self._queue.clear()
        self._in_flight.clear()
        self._pending = b""
        # The parser calls back into this protocol: dropping it breaks the cycle,
        # so the connection and the last request's body are freed now by
        # reference counting, not by a cyclic collection the daemon makes rare.
        self._parser = _DETACHED
        self._body = []

    def data_received(self, data: bytes) -> None:
        self._now = now = self._loop.time()
        transport = self._transport
        try:
            if (
                self._state
                or self._pending
                or self._in_flight
                or self._upgrade is not None
                or len(data) > READ_SLICE
                or transport is None
            ):
                self._receive(data)
            else:  # the common case, kept short: parse it all, answer, one write
                out: list[bytes] = []
                self._out = out
                self._out_size = 0
                self._budget = self._write_limit - transport.get_write_buffer_size()
                try:
                    self._parser.feed_data(data)
                except Exception as exc:
                    self._feed_error(exc, data)
                if out:
                    transport.write(out[0] if len(out) == 1 else b"".join(out))
                if self._closing or self._queue:
                    self._pump()
        except Exception as exc:
            self._crash(exc, "read")
            return
        if self._head_at is None:
            self._last_active = now
        else:
            self._head_started()

    def _head_started(self) -> None:
        """A request head is arriving: make sure the timer sees its deadline."""
        assert self._head_at is not None
        deadline = self._head_at + self._limits.header_timeout
        if deadline < self._timer_at:
            self._arm(deadline)

    def _receive(self, data: bytes) -> None:
        """Input when something waits (answers, input, a refusal's end)."""
        if self._state:
            if self._linger(data):
                self._pump()
        else:
            self._pending = bytes(self._pending) + data if self._pending else data
            self._pump()

    def eof_received(self) -> bool | None:
        """The client will send nothing more: answer what it sent, then close."""
        self._eof = True
        return True if self._queue or self._pending or self._in_flight else None

    def pause_writing(self) -> None:
        self._writing_paused = True
        self._pause_reading()

    def resume_writing(self) -> None:
        """The client read: answer what waits (its reading counts as activity)."""
        self._writing_paused = False
        self._now = self._last_active = self._loop.time()
        try:
            self._pump()
        except Exception as exc:
            self._crash(exc, "write")

    def close(self) -> None:
        """Close the connection (at shutdown), whatever it is doing."""
        if self._transport is not None:
            self._transport.close()

    # The pump: parse, answer, write

    def _pump(self) -> None:
        """Answer what waits, then parse pending input, while the answers the
        client has not read stay under the write limit; one write per round.

        Stops when the input is used up (reading goes on) or when the transport
        asks to pause (``resume_writing`` pumps again).
        """
        transport = self._transport
        if transport is None:
            return
        write_limit = self._write_limit
        queue = self._queue
        in_flight = self._in_flight
        while True:
            out: list[bytes] = []
            self._out = out
            self._out_size = 0
            self._budget = write_limit - transport.get_write_buffer_size()
            while (
                in_flight
                and in_flight[0].data is not None
                and self._out_size <= self._budget
                and not self._closing
            ):
                self._write(in_flight.popleft())  # its turn came
            while (
                queue
                and self._out_size <= self._budget
                and not self._closing
                and len(self._in_flight) < MAX_IN_FLIGHT
            ):
                self._serve(queue.popleft())
            while (
                self._pending
                and not queue
                and self._out_size <= self._budget
                and len(self._in_flight) < MAX_IN_FLIGHT
            ):
                if self._state > _SKIPPING_BODY:
                    self._pending = b""
                    break
                data = self._pending
                if len(data) > READ_SLICE:
                    view = memoryview(data)
                    data, self._pending = view[:READ_SLICE], view[READ_SLICE:]
                else:
                    self._pending = b""
                self._feed(data)
            if out:
                transport.write(out[0] if len(out) == 1 else b"".join(out))
            if self._closing:
                self._end(transport)
                return
            if len(self._in_flight) >= MAX_IN_FLIGHT:
                if self._pending:
                    self._pause_reading()  # what is read meanwhile stays one slice
                return
            if not (queue or self._pending or (in_flight and in_flight[0].data is not None)):
                if self._eof:
                    if not in_flight:  # else the last answer closes
                        transport.close()
                elif self._reading_paused:
                    self._resume_reading()
                return
            if self._writing_paused:
                self._pause_reading()
                return
            # The kernel took everything: go on with what waits.

    def _feed(self, data: bytes | memoryview) -> None:
        """Parse ``data``, taking the bodies of upgrade requests out of it."""
        while data:
            if self._upgrade is not None:
                data = self._upgrade_body(data)
                if not data:
                    return
            try:
                self._parser.feed_data(data)
                return
            except httptools.HttpParserUpgrade as exc:
                # Not offered: what follows the request is HTTP/1.1 again.
                if self._state != _READING:
                    return
                self._parser = httptools.HttpRequestParser(self)
                data = data[exc.args[0] :]
            except Exception as exc:
                self._feed_error(exc, data)
                return

    def _feed_error(self, exc: Exception, data: bytes | memoryview) -> None:
        """What stopped llhttp: an upgrade request (served as HTTP/1.1, parsing goes
        on after it), a callback that stopped it or failed, or malformed input."""
        if isinstance(exc, httptools.HttpParserUpgrade):
            if self._state == _READING:
                self._parser = httptools.HttpRequestParser(self)
                self._feed(data[exc.args[0] :])
        elif isinstance(exc, httptools.HttpParserCallbackError):
            cause = exc.__context__
            if not isinstance(cause, _Stop):
                self._fail(cause, "parse")
        elif isinstance(exc, httptools.HttpParserError):
            if self._state == _READING:
                self._refuse(ClientError(f"malformed HTTP request: {exc}"), _DROPPING)
            else:
                self._state = _DROPPING
        else:
            raise exc

    def _upgrade_body(self, data: bytes | memoryview) -> bytes | memoryview:
        """The body of a request that asked for an upgrade, which llhttp leaves
        unparsed (Content-Length bytes); the rest of ``data`` is returned."""
        request = self._upgrade
        assert request is not None
        n = min(self._upgrade_left, len(data))
        self._body.append(bytes(data[:n]))
        self._upgrade_left -= n
        if self._upgrade_left:
            return b""
        self._upgrade = None
        request.body = b"".join(self._body)
        self._complete(request)
        return b"" if self._state else data[n:]

    def _emit(self, item: Request | _Reply) -> None:
        """Answer now, or queue behind answers waiting for the client to read."""
        if self._queue or self._out_size > self._budget:
            self._queue.append(item)
        else:
            self._serve(item)

    def _serve(self, item: Request | _Reply) -> None:
        if isinstance(item, _Reply):
            if self._in_flight:
                self._in_flight.append(item)  # after the answers still to come
            else:
                self._write(item)
        else:
            self._answer(item)

    def _write(self, reply: _Reply) -> None:
        assert reply.data is not None
        self._out.append(reply.data)
        self._out_size += len(reply.data)
        if reply.close:
            self._closing = True

    def _answer(self, request: Request) -> None:
        try:
            response = self.api.handle(request)
        except Exception as exc:
            self._log_error(exc, "handler", request)
            response = self._internal(request)
        if not isinstance(response, Response):
            slot = _Reply(None, not request.keep_alive)
            self._in_flight.append(slot)
            if isinstance(response, Later):  # answered as soon as it is set
                response.listen(lambda done: self._answered(request, slot, done))
            else:
                waiting = asyncio.ensure_future(response)
                waiting.add_done_callback(lambda done: self._answered(request, slot, done))
            return
        data = _render(response, request.method == "HEAD", not request.keep_alive)
        if self._in_flight:
            self._in_flight.append(_Reply(data, not request.keep_alive))
            return
        self._out.append(data)
        self._out_size += len(data)
        if not request.keep_alive:
            self._closing = True

    def _answered(
        self, request: Request, slot: _Reply, done: asyncio.Future[Response] | Later[Response]
    ) -> None:
        """A handler that waited has its answer: it goes out with the answers after
        it that are made, once every answer before it is written."""
        if self._transport is None:
            return
        try:
            if done.cancelled():
                response = self._internal(request)
            elif (exc := done.exception()) is not None:
                self._log_error(exc, "handler", request)
                response = self._internal(request)
            else:
                response = done.result()
            slot.data = _render(response, request.method == "HEAD", not request.keep_alive)
        except Exception as exc:  # called back by whoever set the answer: contain it here
            self._crash(exc, "write")
            return
        if self._in_flight[0].data is not None and not self._pump_soon:
            self._pump_soon = True
            self._loop.call_soon(self._pump_later)

    def _pump_later(self) -> None:
        self._pump_soon = False
        try:
            self._pump()
        except Exception as exc:
            self._crash(exc, "write")

    def _end(self, transport: asyncio.Transport) -> None:
        """The last answer is written. Close once the request it answered is
        read; until then half-close, so the client sees the end, and linger."""
        if self._state == _DONE or self._eof:
            self._state = _DONE
            self._queue.clear()
            self._pending = b""
            transport.close()
        elif not self._shut:
            self._shut = True
            if transport.can_write_eof():
                transport.write_eof()
            self._resume_reading()

    # Refusals, lingering and failures

    def _refuse(self, error: ClientError | InternalError, state: int) -> None:
        """Answer ``error``, end the connection, and set what becomes of the rest
        of the input: _SKIPPING_BODY (the request's body is parsed and dropped) or
        _DROPPING (input is dropped unparsed)."""
        self._state = state
        self._head_at = None
        if self._final:
            return
        self._final = True
        head_only = False
        request = None
        if self._url:
            head_only = self._parser.get_method() == b"HEAD"
            request = self._request(b"")
        try:
            response = self.api.refuse(error, request)
        except Exception as exc:
            self._log_error(exc, "refuse", request)
            response = _internal_response()
        self._emit(_Reply(_render(response, head_only, True), True))
        self._last_active = self._now
        self._linger_until = self._now + self._limits.linger_time
        self._arm(min(self._linger_until, self._now + self._limits.linger_timeout))

    def _linger(self, data: bytes) -> bool:
        """Input after a refusal: parsed (to find where a refused body ends: True)
        or dropped. Either way it counts as activity, which the linger's timer
        bounds."""
        if self._state == _DONE:
            return False
        if self._state == _SKIPPING_BODY:
            self._pending = bytes(self._pending) + data if self._pending else data
            return True
        return False

    def _abandon(self) -> None:
        """Stop lingering: close, or abort if the client is not even reading."""
        transport = self._transport
        if transport is None:
            return
        if transport.get_write_buffer_size():
            transport.abort()
        else:
            transport.close()

    def _fail(self, exc: BaseException | None, where: str) -> None:
        """An exception in our own parser callbacks: 500, then drop the input and close."""
        self._log_error(exc, where, None)
        self._refuse(InternalError(), _DROPPING)

    def _crash(self, exc: Exception, where: str) -> None:
        """An exception outside any request: end this connection, and only it."""
        self._log_error(exc, where, None)
        if self._transport is not None:
            self._transport.abort()

    def _internal(self, request: Request) -> Response:
        try:
            return self.api.refuse(InternalError(), request)
        except Exception as exc:
            self._log_error(exc, "refuse", request)
            return _internal_response()

    def _log_error(self, exc: BaseException | None, where: str, request: Request | None) -> None:
        if _throttle.allow("request.error"):
            log.get("broadcastd.http").error(
                "request.error",
                where=where,
                method=request.method if request else None,
                path=request.path[:128] if request else None,
                exc_info=exc,
                suppressed=_throttle.suppressed("request.error"),
            )

    # Reading and deadlines

    def _pause_reading(self) -> None:
        transport = self._transport
        if not self._reading_paused and transport is not None and not transport.is_closing():
            self._reading_paused = True
            transport.pause_reading()

    def _resume_reading(self) -> None:
        transport = self._transport
        if self._reading_paused and transport is not None and not transport.is_closing():
            self._reading_paused = False
            transport.resume_reading()

    def _arm(self, at: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        self._timer = self._loop.call_at(at, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self._transport is None:
            return
        try:
            self._now = now = self._loop.time()
            limits = self._limits
            if self._linger_until is not None:
                at = min(self._linger_until, self._last_active + limits.linger_timeout)
                if now >= at:
                    self._abandon()
                    return
            elif self._head_at is not None and not self._reading_paused:
                at = self._head_at + limits.header_timeout
                if now >= at:
                    timeout = RequestTimeout(
                        f"request line and headers not complete after {limits.header_timeout:g} s"
                    )
                    self._budget = -1  # not in a round: the answer waits for the pump
                    self._refuse(timeout, _DROPPING)
                    self._pump()
                    return
            else:
                at = self._last_active + limits.idle_timeout
                if now >= at:
                    self._abandon()
                    return
            self._arm(at)
        except Exception as exc:
            self._crash(exc, "timer")

    # llhttp callbacks

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = {}
        self._body = []
        self._body_size = 0
        self._header_bytes = 0
        self._head_at = self._now

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._header_bytes += len(url)
        if self._header_bytes > self._limits.max_header:
            self._headers_too_large()

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value) + 4
        if self._header_bytes > self._limits.max_header:
            self._headers_too_large()
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        if key in self._headers:
            self._headers[key] += ", " + text
        else:
            self._headers[key] = text

    def on_headers_complete(self) -> None:
        self._head_at = None
        headers = self._headers
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self._limits.max_body:
            self._refuse(self._too_large(), _SKIPPING_BODY)
        elif "expect" in headers:
            self._expect(length)

    def _expect(self, length: str | None) -> None:
        """``Expect: 100-continue``: 100 if the request would be served, else its
        error at once (the client then need not send the body)."""
        headers = self._headers
        if (
            headers["expect"].lower() == "100-continue"
            and (length not in (None, "0") or "transfer-encoding" in headers)
            and self._parser.get_http_version() == "1.1"
            and not self._parser.should_upgrade()
        ):
            error = self.api.check(self._request(b""))
            if error is None:
                self._emit(_Reply(_CONTINUE, False))
            else:
                self._refuse(error, _SKIPPING_BODY)

    def on_body(self, body: bytes) -> None:
        if self._state:
            return  # _SKIPPING_BODY: a refused body
        self._body_size += len(body)
        if self._body_size > self._limits.max_body:
            self._refuse(self._too_large(), _SKIPPING_BODY)
            return
        self._body.append(body)

    def on_message_complete(self) -> None:
        parser = self._parser
        if self._state:  # _SKIPPING_BODY: the refused request is read
            self._state = _DROPPING if parser.should_upgrade() else _DONE
            raise _Stop
        body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        path, _, query = self._url.decode("latin-1").partition("?")
        method = parser.get_method().decode("latin-1")
        headers = self._headers
        request = Request(method, path, headers, body, query, parser.should_keep_alive())
        if (
            ("upgrade" in headers or method == "CONNECT")  # what llhttp's flag needs
            and parser.should_upgrade()
            and self._upgrade_request(request)
        ):
            return
        self._complete(request)
        if self._state:
            raise _Stop

    def _upgrade_request(self, request: Request) -> bool:
        """A request asking for a protocol upgrade (or CONNECT). llhttp skipped its
        body: take it ourselves (Content-Length bytes), then serve the request as
        HTTP/1.1 (True); or serve it now, having no body (False). CONNECT, and
        a chunked body, are refused: what follows is not HTTP."""
        headers = self._headers
        if request.method == "CONNECT" or "transfer-encoding" in headers:
            error: ClientError = ClientError(
                "a request asking for an upgrade may not have a chunked body"
            )
            if request.method == "CONNECT":
                error = MethodNotAllowed("CONNECT is not supported", ("GET", "HEAD", "POST"))
            self._refuse(error, _DROPPING)
            raise _Stop
        length = int(headers.get("content-length") or 0)
        if not length:
            return False
        self._upgrade = request
        self._upgrade_left = length
        self._body = []
        return True

    def _complete(self, request: Request) -> None:
        """A request is read: answer it now, or after the answers waiting before it."""
        if not request.keep_alive:
            self._state = _DONE
            self._final = True
        if self._queue or self._out_size > self._budget or len(self._in_flight) >= MAX_IN_FLIGHT:
            self._queue.append(request)
        else:
            self._answer(request)

    # helpers

    def _request(self, body: bytes) -> Request:
        path, _, query = self._url.decode("latin-1").partition("?")
        method = self._parser.get_method().decode("latin-1")
        return Request(method, path, self._headers, body, query)

    def _headers_too_large(self) -> None:
        if not self._state:
            error = HeadersTooLarge(
                f"request line and headers exceed {self._limits.max_header} bytes"
            )
            self._refuse(error, _DROPPING)
        raise _Stop

    def _too_large(self) -> PayloadTooLarge:
        return PayloadTooLarge(f"request body exceeds {self._limits.max_body} bytes")


def _render(response: Response, head_only: bool, close: bool) -> bytes:
    content_type = response.content_type
    media = b"application/json" if content_type == "application/json" else content_type.encode()
    if not (response.headers or head_only or close):  # the common answer, in one step
        return b"%bContent-Type: %b\r\nContent-Length: %d\r\n\r\n%b" % (
            _STATUS_LINES[response.status],
            media,
            len(response.body),
            response.body,
        )
    head = [
        _STATUS_LINES[response.status],
        b"Content-Type: %b\r\nContent-Length: %d\r\n" % (media, len(response.body)),
    ]
    for name, value in response.headers:
        head.append(f"{name}: {value}\r\n".encode("latin-1"))
    if close:
        head.append(b"Connection: close\r\n")
    head.append(b"\r\n")
    if not head_only:
        head.append(response.body)
    return b"".join(head)


_INTERNAL_BODY = error_json("internal", "internal error")


def _internal_response() -> Response:
    """The 500 when even the API's own error answer failed."""
    return Response(500, _INTERNAL_BODY)
