"""The subscriber port's request reader (llhttp) against websockets' own.

A random request head goes through both: websockets' ``Request.parse`` and
``ServerProtocol.accept`` (what the daemon used before), and ``HeadReader`` with
``check_upgrade``. Whatever one accepts the other accepts, with the same
route (channels, positions, format and token); the heads are drawn from a
grammar of requests that browsers and clients send, mutated where parsers
disagree most (separators, line endings, case, repeats, odd bytes).
"""

from __future__ import annotations

import http
from dataclasses import dataclass

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from websockets.http11 import Request
from websockets.server import ServerProtocol

from broadcastd.core.handshake import (
    MAX_HEADERS,
    MAX_LINE,
    HeadReader,
    HttpDate,
    Refusal,
    check_upgrade,
    route_of,
    switching_protocols,
)
from broadcastd.core.route import Route

KEY = "dGhlIHNhbXBsZSBub25jZQ=="
ACCEPT = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="  # RFC 6455 1.3's example
MAX_CHANNELS = 100
GOOD = (
    b"GET /news HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: " + KEY.encode() + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


@dataclass(frozen=True)
class Verdict:
    route: Route | None
    """None: refused."""


def by_websockets(data: bytes) -> Verdict:
    """The old path: websockets parses and accepts, then the route and its token."""
    protocol = ServerProtocol()
    protocol.receive_data(data)
    events = protocol.events_received()
    if len(events) != 1 or protocol.handshake_exc is not None or protocol.data_to_send():
        return Verdict(None)
    request = events[0]
    assert isinstance(request, Request)
    if len(request.headers.get_all("Origin")) > 1:
        return Verdict(None)
    if protocol.accept(request).status_code != 101:
        return Verdict(None)
    try:
        return Verdict(route_of(_head_of(request), MAX_CHANNELS))
    except Refusal:
        return Verdict(None)


def _head_of(request: Request) -> object:
    """websockets' request, as the route reader reads a head."""

    class Head:
        path = request.path

        @staticmethod
        def get_all(name: str) -> list[str]:
            return request.headers.get_all(name)

    return Head


def by_reader(data: bytes, cut: int | None = None) -> Verdict:
    """The new path, fed in one piece or in two at ``cut``."""
    reader = HeadReader()
    try:
        head = None
        for piece in (data,) if cut is None else (data[:cut], data[cut:]):
            if piece:
                head = reader.feed(piece)
        if head is None or len(head.get_all("origin")) > 1:
            return Verdict(None)
        check_upgrade(head)
        return Verdict(route_of(head, MAX_CHANNELS))
    except Refusal:
        return Verdict(None)


# A grammar of request heads, with the mutations where parsers differ.

ODD = "\x00\x01\t\x7f\x80\xe9\xff \"#%&',:;<=>?@[\\]^`{|}~"
methods = st.sampled_from(["GET"] * 40 + ["POST", "get", "HEAD", "FOO", "G\x01T", ""])
versions = st.sampled_from(["HTTP/1.1"] * 40 + ["HTTP/1.0", "HTTP/2.0", "http/1.1", "HTTP/1.1 "])
spaces = st.sampled_from([" "] * 60 + ["  ", "\t", ""])
targets = st.one_of(
    st.sampled_from(
        ["/news"] * 20
        + [
            "/news",
            "/news,sport",
            "/?channel=a&channel=b",
            "/?channel=a&format=raw",
            "/?since=a:k3j9x2ab:41",
            "/?since=a:last:5",
            "/a%20b",
            "/?chanel=a",
            "/?token=abc&channel=a",
            "/",
            "*",
            "http://host/news",
            "/news#frag",
        ]
    ),
    st.text(alphabet=st.sampled_from("/?=&,:%abc019" + ODD), max_size=20).map(lambda t: "/" + t),
)
header_names = st.sampled_from(
    [
        *("Host", "User-Agent", "Origin", "Authorization", "X-A", "Cookie"),
        *("Sec-WebSocket-Protocol", "Sec-WebSocket-Extensions", "Content-Length"),
        *("Transfer-Encoding", "X A", "X:A", "", "X\x7f"),
    ]
)
header_values = st.one_of(
    st.sampled_from(
        [
            *("x", "", "Bearer abc", "bearer  tok", "Basic abc", "chat, superchat", "0", "5"),
            *("chunked", "permessage-deflate", "a b", "http://o"),
        ]
    ),
    st.text(alphabet=st.sampled_from('ab ,;="' + ODD), max_size=12),
)
separators = st.sampled_from([": "] * 20 + [":", ":\t", " : ", ":  "])
endings = st.sampled_from(["\r\n"] * 150 + ["\n", "\r", "\r\n "])
connection_values = st.sampled_from(
    ["Upgrade"] * 30 + ["upgrade", "keep-alive, Upgrade", "keep-alive", "Upgrade,", ",", "Up grade"]
)
upgrade_values = st.sampled_from(
    ["websocket"] * 30 + ["WebSocket", "websocket, h2c", "h2c", "websocket/13", "web socket", ""]
)
key_values = st.sampled_from(
    [KEY] * 30 + ["", "abc", KEY + "=", "dGhlIHNhbXBsZSBub25jZQ", "*" * 24]
)
version_values = st.sampled_from(["13"] * 30 + ["8", " 13", "13, 8", ""])


@st.composite
def heads(draw: st.DrawFn) -> bytes:
    required = [
        ("Host", draw(st.sampled_from(["x"] * 9 + ["a b"]))),
        ("Upgrade", draw(upgrade_values)),
        ("Connection", draw(connection_values)),
        ("Sec-WebSocket-Key", draw(key_values)),
        ("Sec-WebSocket-Version", draw(version_values)),
    ]
    kept = [h for h in required if draw(st.integers(0, 49))]  # now and then one is missing
    extra = draw(st.lists(st.tuples(header_names, header_values), max_size=3))
    repeated = draw(st.lists(st.sampled_from(required), max_size=1))
    lines = kept + extra + repeated
    order = draw(st.permutations(range(len(lines))))
    head = draw(methods) + draw(spaces) + draw(targets) + draw(spaces) + draw(versions)
    head += draw(endings)
    for i in order:
        name, value = lines[i]
        if draw(st.integers(0, 4)) == 0:
            name = name.upper() if draw(st.booleans()) else name.lower()
        head += name + draw(separators) + value + draw(endings)
    head += "\r\n"  # bytes after the head are refused whatever they are (a table case)
    return head.encode("latin-1")


@settings(max_examples=800, deadline=None)
@given(heads(), st.integers(0, 300))
@example(GOOD, 0)
@example(
    GOOD.replace(b"GET /news", b"GET /news?token=t").replace(
        b"Host: x", b"Authorization: Bearer h"
    ),
    7,
)
@example(GOOD.replace(b"Host: x\r\n", b"Host: x\r\n  folded\r\n"), 0)
@example(GOOD.replace(b"Upgrade\r\n", b"Upgrade\r\nContent-Length: 0\r\nContent-Length: 0\r\n"), 3)
@example(b"\r\n" + GOOD, 0)
def test_the_reader_accepts_what_websockets_accepts(data: bytes, cut: int) -> None:
    old = by_websockets(data)
    assert by_reader(data) == old, data
    assert by_reader(data, min(cut, len(data))) == old, data


def test_a_good_handshake_gets_the_rfc_accept_key_and_its_route() -> None:
    head = HeadReader().feed(GOOD)
    assert head is not None
    assert check_upgrade(head) == ACCEPT
    assert route_of(head, MAX_CHANNELS).channels == ("news",)
    answer = switching_protocols(ACCEPT, b"Thu, 01 Jan 1970 00:00:00 GMT")
    assert answer.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert b"\r\nSec-WebSocket-Accept: " + ACCEPT.encode() + b"\r\n" in answer
    assert answer.endswith(b"\r\n\r\n")
    assert answer.count(b"\r\n\r\n") == 1


def refusal(data: bytes) -> tuple[int, str]:
    try:
        head = HeadReader().feed(data)
        assert head is not None
        check_upgrade(head)
        route_of(head, MAX_CHANNELS)
    except Refusal as exc:
        return exc.status.value, exc.code
    raise AssertionError("accepted")


REFUSALS = {
    "POST": (b"POST /h HTTP/1.1\r\nHost: x\r\n\r\n", 405, "method_not_allowed"),
    "unknown method": (b"FOO /h HTTP/1.1\r\nHost: x\r\n\r\n", 405, "method_not_allowed"),
    "HTTP/1.0": (GOOD.replace(b"HTTP/1.1", b"HTTP/1.0"), 505, "http_version_not_supported"),
    "HTTP/2.0": (GOOD.replace(b"HTTP/1.1", b"HTTP/2.0"), 400, "bad_request"),
    "plain GET": (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 426, "upgrade_required"),
    "no Upgrade": (GOOD.replace(b"Upgrade: websocket\r\n", b""), 426, "upgrade_required"),
    "bad Connection list": (
        GOOD.replace(b"Connection: Upgrade", b"Connection: ,;"),
        400,
        "bad_request",
    ),
    "long URL": (GOOD.replace(b"GET /news", b"GET /" + b"a" * MAX_LINE), 414, "uri_too_long"),
    "long header": (GOOD.replace(b"Host: x", b"X: " + b"b" * MAX_LINE), 431, "headers_too_large"),
    "too many headers": (
        GOOD.replace(b"Host: x", b"Host: x" + b"\r\nX-N: 1" * MAX_HEADERS),
        431,
        "headers_too_large",
    ),
    "TLS hello": (b"\x16\x03\x01garbage\r\n\r\n", 400, "bad_request"),
    "bytes after the head": (GOOD + b"\x89\x80", 400, "bad_request"),
    "bare LF": (GOOD.replace(b"Host: x\r\n", b"Host: x\n"), 400, "bad_request"),
    "a body": (GOOD.replace(b"Host: x", b"Content-Length: 5"), 400, "bad_request"),
    "chunked": (GOOD.replace(b"Host: x", b"Transfer-Encoding: chunked"), 400, "bad_request"),
    "two keys": (
        GOOD.replace(b"Host: x", b"Sec-WebSocket-Key: " + KEY.encode()),
        400,
        "bad_request",
    ),
    "short key": (GOOD.replace(KEY.encode(), b"abcd"), 400, "bad_request"),
    "version 8": (GOOD.replace(b"Version: 13", b"Version: 8"), 400, "bad_request"),
    "bad subprotocol": (
        GOOD.replace(b"Host: x", b"Sec-WebSocket-Protocol: a b"),
        400,
        "bad_request",
    ),
    "Basic auth": (GOOD.replace(b"Host: x", b"Authorization: Basic abc"), 400, "bad_request"),
    "bad channel": (GOOD.replace(b"/news", b"/a%20b"), 400, "bad_channel"),
    "non-ASCII target": (GOOD.replace(b"/news", b"/n\xe9ws"), 400, "bad_request"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_each_refusal_has_its_status_and_code(case: str) -> None:
    data, status, code = REFUSALS[case]
    assert refusal(data) == (status, code)


def test_a_head_in_pieces_is_read_once_complete() -> None:
    reader = HeadReader()
    for byte in range(len(GOOD) - 1):
        assert reader.feed(GOOD[byte : byte + 1]) is None
    head = reader.feed(GOOD[-1:])
    assert head is not None
    assert check_upgrade(head) == ACCEPT


def test_a_line_too_long_is_refused_before_it_ends() -> None:
    reader = HeadReader()
    assert reader.feed(b"GET /" + b"a" * (MAX_LINE - 6)) is None  # 8191 bytes: may still end
    with pytest.raises(Refusal) as refused:
        reader.feed(b"aa")
    assert refused.value.status is http.HTTPStatus.REQUEST_URI_TOO_LONG
    reader = HeadReader()
    assert reader.feed(b"GET / HTTP/1.1\r\n" + b"X-N: 1\r\n" * MAX_HEADERS) is None
    with pytest.raises(Refusal) as refused:
        reader.feed(b"X-N: 1\r\n" + b"X: " + b"b" * MAX_LINE)
    assert refused.value.status is http.HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE


def test_the_date_is_formatted_once_per_second() -> None:
    date = HttpDate()
    first = date(86400.2)
    assert first == b"Fri, 02 Jan 1970 00:00:00 GMT"
    assert date(86400.9) is first
    assert date(86401.0) == b"Fri, 02 Jan 1970 00:00:01 GMT"
