"""The opening handshake of the subscriber port: reading the request, checking the
upgrade, and the answers (101, or an HTTP error with a JSON body).

Why not websockets' own: its request parser is pure Python, line by line, and
its ``accept`` builds a ``Headers`` object and formats an e-mail ``Date`` per
connection; in a reconnect storm the two were a quarter of the daemon's CPU.
Here llhttp (httptools, as on the control port) parses the head in one call
once it is complete, the ``Date`` is formatted once per second, and the 101 is
one bytes concatenation. websockets' sans-I/O protocol still does everything
after the handshake, and its header parsers still judge the rare values the
common case does not cover (a ``Connection`` list, an extension offer), so
what is accepted does not change: a property test holds this module against
websockets' ``Request.parse`` and ``ServerProtocol.accept``.

Nothing here does I/O: the transport feeds bytes in and writes what comes out.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import email.utils
import hashlib
import http
from collections.abc import Callable, Sequence

import httptools
from websockets.exceptions import InvalidHeaderFormat, InvalidHeaderValue
from websockets.headers import parse_connection, parse_subprotocol, parse_upgrade
from websockets.http11 import Request
from websockets.streams import StreamReader

from broadcastd.core.route import Route, parse_route
from broadcastd.errors import ClientError, error_json

MAX_LINE = 8192
"""Longest request or header line, CRLF included (as websockets allows)."""
MAX_HEADERS = 128
"""Most header lines in a request (as websockets allows)."""
MAX_HEAD = (MAX_HEADERS + 2) * MAX_LINE
"""Bytes a head can hold at most; beyond this it is refused, whatever its lines."""
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
"""RFC 6455's constant for ``Sec-WebSocket-Accept``."""


class Refusal(ClientError):
    """A handshake answered with an HTTP error instead of 101 (JSON body)."""

    def __init__(
        self,
        status: http.HTTPStatus,
        code: str,
        message: str,
        reason: str = "bad_request",
        headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        super().__init__(message, code)
        self.status = status
        self.reason = reason
        """The label of the rejected-connections metric."""
        self.headers = headers

    def serialize(self) -> bytes:
        body = error_json(self.code, self.message)
        head = [
            f"HTTP/1.1 {self.status.value} {self.status.phrase}",
            "Server: broadcastd",
            "Connection: close",
            "Content-Type: application/json",
            f"Content-Length: {len(body)}",
        ]
        if self.status is http.HTTPStatus.SERVICE_UNAVAILABLE and not any(
            name == "Retry-After" for name, _ in self.headers
        ):
            head.append("Retry-After: 5")
        head.extend(f"{name}: {value}" for name, value in self.headers)
        return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def _bad(message: str) -> Refusal:
    return Refusal(http.HTTPStatus.BAD_REQUEST, "bad_request", message)


MALFORMED = "malformed HTTP request"
EARLY_DATA = "data arrived before the handshake completed"
"""RFC 6455 4.1: a client waits for the 101 before it sends frames."""


class Head:
    """A request head, parsed: method, version, target and headers (names lowered)."""

    __slots__ = ("_values", "method", "path", "version")

    def __init__(self) -> None:
        self.method = ""
        self.version = ""
        self.path = ""
        self._values: dict[str, list[str]] = {}

    def get_all(self, name: str) -> list[str]:
        """Every value of the header ``name`` (lowercase), in order."""
        return self._values.get(name, [])

    def add(self, name: str, value: str) -> None:
        values = self._values.get(name)
        if values is None:
            self._values[name] = [value]
        else:
            values.append(value)

    def items(self) -> list[tuple[str, str]]:
        return [(name, value) for name, values in self._values.items() for value in values]


_READ = frozenset(
    name.encode()
    for name in (
        "accept",
        "authorization",
        "connection",
        "content-length",
        "last-event-id",
        "origin",
        "sec-websocket-extensions",
        "sec-websocket-key",
        "sec-websocket-protocol",
        "sec-websocket-version",
        "transfer-encoding",
        "upgrade",
    )
)
"""The headers the handshake reads; the others (Host, User-Agent, Cookie...) are
counted and skipped."""


class _Collector:
    """llhttp's callbacks for one head: the target and the header lines it reads."""

    __slots__ = ("count", "head", "url")

    def __init__(self, head: Head) -> None:
        self.head = head
        self.url = b""
        self.count = 0

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.count += 1
        name = name.lower()
        if name in _READ:
            # llhttp checked both against RFC 9110's grammar; values are opaque
            # octets beyond ASCII, as websockets reads them.
            self.head.add(name.decode(), value.strip(b" \t").decode("latin-1"))


class HeadReader:
    """Collects a connection's bytes until its request head is complete.

    ``feed`` returns the parsed head once its blank line has arrived (None before),
    or raises a Refusal for a head websockets would refuse too: a line over
    ``MAX_LINE`` (414 for the request line, 431 for a header), more than
    ``MAX_HEADERS`` headers (431), a line not ended by CRLF, anything llhttp
    finds malformed, a request with a body, or bytes after the head (a client
    must wait for the 101). At most ``MAX_HEAD`` bytes are ever held.
    """

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> Head | None:
        buffer = self._buffer + data if self._buffer else data
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            _check_lines(buffer, complete=False)
            self._buffer = buffer
            return None
        self._buffer = b""
        end += 4
        if end < len(buffer):
            raise _bad(EARLY_DATA)
        if len(buffer) > MAX_LINE:
            _check_lines(buffer, complete=True)
        if (
            buffer.count(b"\n") != buffer.count(b"\r\n")
            or buffer.count(b" ", 0, buffer.find(b"\r\n")) != 2
        ):
            raise _bad(MALFORMED)  # websockets splits the request line at its spaces
        return _parse(buffer)


def _check_lines(buffer: bytes, complete: bool) -> None:
    """Refuse what websockets refuses line by line: a line not ended by CRLF, a
    line over ``MAX_LINE`` (before its end has arrived, too), and, before the
    head is complete, more than ``MAX_HEADERS`` header lines (a complete head's
    are counted as they are parsed)."""
    if b"\n" in buffer and buffer.count(b"\n") != buffer.count(b"\r\n"):
        raise _bad(MALFORMED)
    if len(buffer) <= MAX_LINE:
        return
    lines = buffer.split(b"\r\n")
    for number, line in enumerate(lines):
        under_way = not complete and number == len(lines) - 1
        if len(line) + (0 if under_way else 2) > MAX_LINE:
            if number == 0:
                raise Refusal(
                    http.HTTPStatus.REQUEST_URI_TOO_LONG,
                    "uri_too_long",
                    f"the request line is over {MAX_LINE} bytes",
                )
            raise _headers_too_large(f"a header line is over {MAX_LINE} bytes")
    if not complete and (len(lines) - 2 > MAX_HEADERS or len(buffer) > MAX_HEAD):
        raise _headers_too_large(f"more than {MAX_HEADERS} headers")


def _headers_too_large(message: str) -> Refusal:
    return Refusal(http.HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "headers_too_large", message)


def _parse(data: bytes) -> Head:
    head = Head()
    collector = _Collector(head)
    parser = httptools.HttpRequestParser(collector)
    try:
        parser.feed_data(data)
    except httptools.HttpParserUpgrade:
        pass  # the head ends here: what follows would be WebSocket frames
    except (httptools.HttpParserError, UnicodeDecodeError):
        return _parse_leniently(data)
    if collector.count > MAX_HEADERS:
        raise _headers_too_large(f"more than {MAX_HEADERS} headers")
    version = parser.get_http_version()
    if version not in ("1.1", "1.0"):
        raise _bad(MALFORMED)
    head.version = "HTTP/" + version
    head.method = parser.get_method().decode("ascii")
    try:
        head.path = collector.url.decode("ascii")
    except UnicodeDecodeError:
        raise _bad(MALFORMED) from None
    if head.get_all("transfer-encoding") or any(
        length != "0" for length in head.get_all("content-length")
    ):
        raise _bad("a handshake has no body")
    return head


def _parse_leniently(data: bytes) -> Head:
    """llhttp refused the head: websockets' parser has the last word, so that
    what the daemon accepts is exactly what it accepted before (a repeated
    ``Content-Length: 0``, say). Only malformed requests pay for it."""
    reader = StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    parser = Request.parse(reader.read_line)
    try:
        next(parser)
    except StopIteration as done:
        request: Request = done.value
    except Exception:  # whatever it raises, the request is malformed
        raise _bad(MALFORMED) from None
    else:
        raise _bad(MALFORMED)  # it wants more than a whole head: not a request
    head = Head()
    head.method = request.method
    head.version = request.protocol
    head.path = request.path
    for name, value in request.headers.raw_items():
        head.add(name.lower(), value)
    return head


def _method_not_allowed() -> Refusal:
    return Refusal(
        http.HTTPStatus.METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "a WebSocket handshake is a GET",
        headers=(("Allow", "GET"),),
    )


def check_stream(head: Head) -> None:
    """A Refusal unless ``head`` can be answered with an event stream: a GET in
    HTTP/1.1 (the stream is chunked)."""
    _check_get_11(head, "an event stream")


def _check_get_11(head: Head, what: str) -> None:
    """405 for another method than GET, then 505 for another version than HTTP/1.1."""
    if head.method != "GET":
        raise _method_not_allowed()
    if head.version != "HTTP/1.1":
        raise Refusal(
            http.HTTPStatus.HTTP_VERSION_NOT_SUPPORTED,
            "http_version_not_supported",
            f"{what} is HTTP/1.1",
        )


def check_upgrade(head: Head) -> str:
    """The ``Sec-WebSocket-Accept`` of a valid upgrade request, or a Refusal: 405
    for another method, 505 for HTTP/1.0, 426 without ``Connection: Upgrade`` and
    ``Upgrade: websocket``, 400 for a missing, repeated or malformed key or
    version. The checks and their order are websockets' ``process_request``."""
    _check_get_11(head, "a WebSocket handshake")
    connection = head.get_all("connection")
    if not (len(connection) == 1 and connection[0].lower() == "upgrade"):
        _check_list(connection, parse_connection, "upgrade", "Connection")
    upgrade = head.get_all("upgrade")
    if not (len(upgrade) == 1 and upgrade[0].lower() == "websocket"):
        _check_list(upgrade, parse_upgrade, "websocket", "Upgrade", only=True)
    keys = head.get_all("sec-websocket-key")
    if len(keys) != 1:
        raise _bad("one Sec-WebSocket-Key header is required")
    key = keys[0]
    try:
        raw_key = base64.b64decode(key.encode(), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raw_key = b""
    if len(raw_key) != 16:
        raise _bad("invalid Sec-WebSocket-Key")
    versions = head.get_all("sec-websocket-version")
    if len(versions) != 1:
        raise _bad("one Sec-WebSocket-Version header is required")
    if versions[0] != "13":
        raise _bad("unsupported Sec-WebSocket-Version: 13 is required")
    for value in head.get_all("sec-websocket-protocol"):
        try:
            parse_subprotocol(value)
        except InvalidHeaderFormat:
            raise _bad("malformed Sec-WebSocket-Protocol") from None
    digest = hashlib.sha1(key.encode() + WS_GUID).digest()  # noqa: S324 - RFC 6455
    return base64.b64encode(digest).decode()


def _check_list(
    values: list[str],
    parse: Callable[[str], Sequence[str]],
    wanted: str,
    name: str,
    only: bool = False,
) -> None:
    """The uncommon forms of ``Connection`` and ``Upgrade``, judged by websockets'
    parsers: a Refusal unless ``wanted`` is among (or, ``only``, is all of) them."""
    try:
        items = [item.lower() for value in values for item in parse(value)]
    except (InvalidHeaderFormat, InvalidHeaderValue):
        raise _bad(f"malformed {name} header") from None
    if (items == [wanted]) if only else (wanted in items):
        return
    raise Refusal(
        http.HTTPStatus.UPGRADE_REQUIRED,
        "upgrade_required",
        "this port speaks WebSocket: the request must upgrade",
        headers=(("Upgrade", "websocket"), ("Sec-WebSocket-Version", "13")),
    )


def route_of(head: Head, max_channels: int) -> Route:
    """What the handshake asks for: its URL's route, with the token of an
    ``Authorization: Bearer`` header unless the URL gives one. A Refusal (400)
    for a bad route or another kind of Authorization."""
    try:
        route = parse_route(head.path, max_channels)
    except ClientError as exc:
        raise Refusal(http.HTTPStatus.BAD_REQUEST, exc.code, exc.message) from None
    authorization = head.get_all("authorization")
    if authorization and route.token is None:
        scheme, _, token = authorization[0].partition(" ")
        if len(authorization) > 1 or scheme.lower() != "bearer" or not token.strip():
            raise _bad("Authorization must be one header: Bearer TOKEN")
        route = dataclasses.replace(route, token=token.strip())
    return route


class HttpDate:
    """The ``Date`` header's value, formatted once per second."""

    __slots__ = ("_second", "_value")

    def __init__(self) -> None:
        self._second = -1
        self._value = b""

    def __call__(self, now: float) -> bytes:
        second = int(now)
        if second != self._second:
            self._second = second
            self._value = email.utils.formatdate(second, usegmt=True).encode()
        return self._value


_SWITCHING = (
    b"HTTP/1.1 101 Switching Protocols\r\n"
    b"Upgrade: websocket\r\n"
    b"Connection: Upgrade\r\n"
    b"Server: broadcastd\r\n"
    b"Date: "
)


def switching_protocols(accept: str, date: bytes, extensions: str | None = None) -> bytes:
    """The 101 answer: the constant headers, the date, the accept key, and the
    extensions negotiated (if any)."""
    tail = b"\r\n\r\n"
    if extensions is not None:
        tail = b"\r\nSec-WebSocket-Extensions: " + extensions.encode() + tail
    return _SWITCHING + date + b"\r\nSec-WebSocket-Accept: " + accept.encode() + tail
