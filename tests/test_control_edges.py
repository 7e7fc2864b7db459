"""The control port at its edges: what HTTP clients do that the happy path never shows.

Each test drives a real daemon over real sockets: http.client and urllib for
what they do with a refused upload, a raw socket for what no library sends.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import urllib.error
import urllib.request
from typing import Any

import pytest
import structlog

from broadcastd.transport.control import HttpListener
from broadcastd.transport.http import Limits, Request, Response

from .conftest import Running, recv_json, subscribed

TOKEN = "edge-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class RawHttp:
    """HTTP/1.1 over a bare socket: send anything, read answers one by one."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int, rcvbuf: int | None = None) -> RawHttp:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 20)
        return cls(reader, writer)

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def response(self, head_only: bool = False) -> tuple[int, dict[str, str], bytes]:
        """The next answer: status, headers (lower-case names), body."""
        async with asyncio.timeout(30):
            head = await self.reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split()[1])
            headers = {}
            for line in lines[1:]:
                if line:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
            length = int(headers.get("content-length", "0"))
            body = b"" if head_only or status == 100 else await self.reader.readexactly(length)
        return status, headers, body

    async def at_eof(self) -> bool:
        """True if the server sends nothing more and closes."""
        async with asyncio.timeout(30):
            rest = await self.reader.read()
        return rest == b""

    def close(self) -> None:
        self.writer.close()


def error_code(body: bytes) -> str:
    code: str = json.loads(body)["error"]["code"]
    return code


def head(method: str, path: str, *extra: str, auth: bool = True) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *extra]
    if auth:
        lines.append(f"Authorization: Bearer {TOKEN}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@pytest.fixture
async def edge_daemon(daemon_factory: Any) -> Any:
    async with daemon_factory(
        **{"control.token": TOKEN, "control.max_body_bytes": 64 * 1024}
    ) as daemon:
        yield daemon


# 1. A body over the limit: the client that is still sending reads the 413.


def post_with_http_client(port: int, body: bytes) -> tuple[int, str, str | None]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("POST", "/publish/side", body=body, headers=AUTH)
        response = connection.getresponse()
        return response.status, error_code(response.read()), response.getheader("Connection")
    finally:
        connection.close()


def post_with_urllib(port: int, body: bytes) -> tuple[int, str]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/publish/side", data=body, headers=AUTH, method="POST"
    )
    try:
        urllib.request.urlopen(request, timeout=30)
    except urllib.error.HTTPError as exc:
        return exc.code, error_code(exc.read())
    raise AssertionError("accepted")


async def test_a_body_over_the_limit_is_a_413_that_a_client_still_sending_reads(
    edge_daemon: Running,
) -> None:
    port = edge_daemon.daemon.control.port
    # Over the 64 KiB limit, and more than the socket buffers take: the client is
    # still sending when the 413 is written (but within what is read and dropped).
    body = b"x" * 15_000_000
    got = await asyncio.to_thread(post_with_http_client, port, body)
    assert got == (413, "payload_too_large", "close")
    assert await asyncio.to_thread(post_with_urllib, port, body) == (413, "payload_too_large")
    assert (await edge_daemon.http.get("/healthz")).status_code == 200


# 2. Expect: 100-continue.


async def test_expect_100_continue_gets_100_then_the_answer(edge_daemon: Running) -> None:
    async with edge_daemon.connect("/expect") as ws:
        await subscribed(ws, "expect")
        client = await RawHttp.connect(edge_daemon.daemon.control.port)
        client.send(head("POST", "/publish/expect", "Expect: 100-continue", "Content-Length: 5"))
        assert (await client.response())[0] == 100
        client.send(b"hello")
        status, _, body = await client.response()
        assert (status, json.loads(body)["offset"]) == (200, 1)
        assert (await recv_json(ws))["data"] == "hello"
        client.close()


@pytest.mark.parametrize(
    ("request_head", "expected"),
    [
        (head("POST", "/publish/x", "Expect: 100-continue", "Content-Length: 999999"), 413),
        (
            head("POST", "/publish/x", "Expect: 100-continue", "Content-Length: 5", auth=False),
            401,
        ),
        (head("POST", "/nope", "Expect: 100-continue", "Content-Length: 5"), 404),
        (head("PUT", "/publish/x", "Expect: 100-continue", "Content-Length: 5"), 405),
    ],
)
async def test_expect_100_continue_is_refused_at_once(
    edge_daemon: Running, request_head: bytes, expected: int
) -> None:
    client = await RawHttp.connect(edge_daemon.daemon.control.port)
    client.send(request_head)  # and never the body
    status, headers, body = await client.response()
    assert status == expected
    assert headers["connection"] == "close"
    assert error_code(body)
    assert await client.at_eof()


# 3. Upgrade and CONNECT: one answer per request.


async def test_an_h2c_upgrade_is_ignored_and_the_request_served_once(edge_daemon: Running) -> None:
    async with edge_daemon.connect("/up") as ws:
        await subscribed(ws, "up")
        client = await RawHttp.connect(edge_daemon.daemon.control.port)
        body = b'{"n": 123456789012345678901234567890}'
        client.send(
            head(
                "POST",
                "/publish/up",
                "Connection: Upgrade, HTTP2-Settings",
                "Upgrade: h2c",
                "HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA",
                "Content-Type: application/json",
                f"Content-Length: {len(body)}",
            )
            + body
            + head("GET", "/channels/up")
        )
        status, _, answer = await client.response()
        assert (status, json.loads(answer)["offset"]) == (200, 1)
        status, _, answer = await client.response()
        assert (status, json.loads(answer)["offset"]) == (200, 1)  # published once
        message = await asyncio.wait_for(ws.recv(), 10)
        assert message == '{"channel":"up","offset":1,"data":{"n": 123456789012345678901234567890}}'
        client.close()


async def test_a_websocket_upgrade_on_a_control_route_gets_one_answer(
    edge_daemon: Running,
) -> None:
    client = await RawHttp.connect(edge_daemon.daemon.control.port)
    client.send(
        head(
            "GET",
            "/stats",
            "Connection: Upgrade",
            "Upgrade: websocket",
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
            "Sec-WebSocket-Version: 13",
        )
        + head("GET", "/healthz")
    )
    status, _, body = await client.response()
    assert (status, "clients" in json.loads(body)) == (200, True)
    status, _, body = await client.response()
    assert (status, json.loads(body)) == (200, {"status": "ok"})
    client.close()


async def test_connect_is_refused_with_one_answer_and_closed(edge_daemon: Running) -> None:
    client = await RawHttp.connect(edge_daemon.daemon.control.port)
    client.send(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n\x16\x03\x01")
    status, headers, body = await client.response()
    assert (status, error_code(body), headers["connection"]) == (405, "method_not_allowed", "close")
    assert await client.at_eof()


# 4. HEAD.


@pytest.mark.parametrize(
    "path",
    ["/healthz", "/readyz", "/channels", "/channels/known", "/stats", "/metrics", "/openapi.json"],
)
async def test_head_answers_the_headers_of_get_and_no_body(edge_daemon: Running, path: str) -> None:
    await edge_daemon.http.post("/publish/known", json=1, headers=AUTH)
    client = await RawHttp.connect(edge_daemon.daemon.control.port)
    client.send(head("HEAD", path) + head("GET", path))
    status, headers, _ = await client.response(head_only=True)
    get_status, get_headers, get_body = await client.response()
    assert status == get_status == 200
    assert headers["content-type"] == get_headers["content-type"]
    if path != "/metrics":  # metrics move between the two requests
        assert int(headers["content-length"]) == len(get_body)
    client.close()


async def test_head_of_a_post_route_is_405_without_a_body(edge_daemon: Running) -> None:
    client = await RawHttp.connect(edge_daemon.daemon.control.port)
    client.send(head("HEAD", "/publish/x") + head("GET", "/healthz"))
    status, headers, _ = await client.response(head_only=True)
    assert (status, headers["allow"]) == (405, "POST")
    status, _, body = await client.response()  # framing intact: no body bytes in between
    assert (status, json.loads(body)) == (200, {"status": "ok"})
    client.close()


# 5. A failure of ours: 500, one log line, the connection goes on.


async def test_a_failing_handler_is_a_logged_500_and_the_connection_goes_on(
    edge_daemon: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = edge_daemon.daemon.node
    publish = node.publish

    def broken(channel: str, *args: Any) -> Any:
        if channel == "boom":
            raise RuntimeError("bug")
        return publish(channel, *args)

    monkeypatch.setattr(node, "publish", broken)
    client = await RawHttp.connect(edge_daemon.daemon.control.port)
    secret = b'"the payload"'
    with structlog.testing.capture_logs() as logs:
        client.send(
            head("POST", "/publish/boom", f"Content-Length: {len(secret)}")
            + secret
            + head("GET", "/healthz")
        )
        status, headers, body = await client.response()
        assert (status, error_code(body)) == (500, "internal")
        assert "connection" not in headers
        assert (await client.response())[0] == 200
    errors = [entry for entry in logs if entry["log_level"] == "error"]
    assert len(errors) == 1
    assert errors[0]["event"] == "request.error"
    assert isinstance(errors[0]["exc_info"], RuntimeError)
    assert "payload" not in repr(errors[0])
    assert TOKEN not in repr(errors[0])
    client.close()


class Flaky:
    """An Api whose handler (and, on /worse, whose error answer too) raises."""

    def handle(self, request: Request) -> Response:
        if request.path in ("/boom", "/worse"):
            raise ValueError("bug")
        return Response(200, b'{"ok":true}')

    def check(self, request: Request) -> None:
        return None

    def refuse(self, error: Any, request: Request | None) -> Response:
        if request is not None and request.path == "/worse":
            raise ValueError("another bug")
        return Response(
            error.http_status, b'{"error":{"code":"%s","message":""}}' % error.code.encode()
        )


async def test_the_http_layer_answers_500_whatever_the_handler_raises() -> None:
    listener = HttpListener(Flaky(), "127.0.0.1", 0, Limits(4096, 4096, 60.0))
    await listener.start()
    try:
        client = await RawHttp.connect(listener.port)
        client.send(
            b"GET /boom HTTP/1.1\r\n\r\nGET /worse HTTP/1.1\r\n\r\nGET /ok HTTP/1.1\r\n\r\n"
        )
        answers = [await client.response() for _ in range(3)]
        assert [
            (status, error_code(body) if status != 200 else "") for status, _, body in answers
        ] == [
            (500, "internal"),
            (500, "internal"),
            (200, ""),
        ]
        client.close()
    finally:
        await listener.close()


# 6. Pipelined answers a client does not read are bounded; listings are paged.


def server_side(daemon: Running) -> list[Any]:
    return list(daemon.daemon.control._connections)


async def test_pipelined_answers_a_client_does_not_read_stay_bounded(daemon_factory: Any) -> None:
    write_limit = 16 * 1024
    async with daemon_factory(**{"control.write_limit": write_limit}) as daemon:
        names = [f"c{i:04d}" + "x" * 120 for i in range(1000)]
        batch = [{"channel": name, "data": 1} for name in names]
        assert (await daemon.http.post("/batch", json=batch)).json()["published"] == 1000
        one_page = len((await daemon.http.get("/channels")).content) + 200

        known = set(server_side(daemon))
        client = await RawHttp.connect(daemon.daemon.control.port, rcvbuf=4096)
        client.send(b"GET /channels HTTP/1.1\r\nHost: x\r\n\r\n" * 100)
        await client.writer.drain()
        # Each /healthz round trip is a turn of the daemon's loop: wait, on them,
        # until the connection that is not read stops being read.
        for _ in range(10_000):
            assert (await daemon.http.get("/healthz")).status_code == 200
            flooding = [
                c
                for c in server_side(daemon)
                if c not in known and c._transport and not c._transport.is_reading()
            ]
            if flooding:
                break
        else:
            raise AssertionError("the connection was never paused")
        buffered = flooding[0]._transport.get_write_buffer_size()
        assert buffered <= write_limit + one_page, buffered

        for _ in range(100):  # every answer comes, in order, once it is read
            status, _, body = await client.response()
            page = json.loads(body)
            assert (status, page["count"], page["channels"][0]["name"]) == (200, 1000, names[0])
        client.close()


async def test_channels_are_listed_a_page_at_a_time_in_name_order(daemon: Running) -> None:
    names = ["m", "b", "z:1", "a@x", "q", "c", "b.2"]
    for name in names:
        await daemon.publish(name, 1)
    seen: list[str] = []
    after = None
    for _ in range(10):
        params = {"limit": "3"} | ({"after": after} if after else {})
        page = (await daemon.http.get("/channels", params=params)).json()
        assert page["count"] == len(page["channels"]) <= 3
        seen += [c["name"] for c in page["channels"]]
        after = page["next"]
        if after is None:
            break
    assert seen == sorted(names)
    whole = (await daemon.http.get("/channels")).json()
    assert (whole["count"], whole["next"]) == (len(names), None)


@pytest.mark.parametrize(
    "query",
    [
        "limit=0",
        "limit=1001",
        "limit=abc",
        "limit=",
        "limit=1&limit=2",
        "after=a%20b",
        "after=",
        "x=1",
    ],
)
async def test_a_bad_listing_query_is_a_400(daemon: Running, query: str) -> None:
    response = await daemon.http.get(f"/channels?{query}")
    assert (response.status_code, response.json()["error"]["code"]) == (400, "bad_request")


# 7. A request head that trickles in.


async def test_a_head_that_trickles_gets_408_however_often_a_byte_comes(
    daemon_factory: Any,
) -> None:
    async with daemon_factory(
        **{"control.header_timeout": 0.5, "control.idle_timeout": 600}
    ) as daemon:
        client = await RawHttp.connect(daemon.daemon.control.port)
        client.send(b"GET /healthz HTTP/1.1\r\n")
        for byte in b"X-Slow: " + b"a" * 400:  # a byte every 50 ms, until an answer
            client.send(bytes((byte,)))
            try:
                status, headers, body = await asyncio.wait_for(client.response(), 0.05)
                break
            except TimeoutError:
                continue
        else:
            raise AssertionError("no answer while the head trickled in")
        assert (status, error_code(body), headers["connection"]) == (
            408,
            "request_timeout",
            "close",
        )
        assert await client.at_eof()


# 8. Publishing to several channels is all or nothing.


async def test_a_publish_to_several_channels_is_all_or_nothing(daemon_factory: Any) -> None:
    async with (
        daemon_factory(**{"channels.max_channels": 2}) as daemon,
        daemon.connect("/a,b") as ws,
    ):
        await subscribed(ws, "a", "b")  # the table is full, every channel busy
        response = await daemon.http.post("/publish", json={"channels": ["a", "new"], "data": 1})
        assert (response.status_code, response.json()["error"]["code"]) == (
            503,
            "channel_table_full",
        )
        assert response.headers["retry-after"] == "5"
        await daemon.http.post("/publish", json={"channels": ["a", "b"], "data": 2})
        got = [await recv_json(ws) for _ in range(2)]
        assert [(m["channel"], m["offset"], m["data"]) for m in got] == [("a", 1, 2), ("b", 1, 2)]


# 9. The JSON forms embed data as the client wrote it.


async def test_the_json_forms_embed_data_verbatim(daemon: Running) -> None:
    async with daemon.connect("/v") as ws, daemon.connect("/?channel=v&format=raw") as raw:
        await subscribed(ws, "v")
        await raw.send('{"op": "ping"}')
        assert json.loads(await raw.recv()) == {"type": "pong"}
        big = "123456789012345678901234567890"
        one = b'{"channel": "v", "data": ' + big.encode() + b"}"
        response = await daemon.http.post(
            "/publish", content=one, headers={"Content-Type": "application/json"}
        )
        assert response.status_code == 200
        batch = b'[{"channel": "v", "data": {"n": 18446744073709551616, "f": 1.10}},'
        batch += b' {"channel": "v", "data": "caf\\u00e9"}]'
        response = await daemon.http.post(
            "/batch", content=batch, headers={"Content-Type": "application/json"}
        )
        assert response.json()["published"] == 2
        response = await daemon.http.post(  # the body form too, even past a double's range
            "/publish/v", content=b'{"x": 1e999}', headers={"Content-Type": "application/json"}
        )
        assert response.status_code == 200
        assert [await asyncio.wait_for(ws.recv(), 10) for _ in range(4)] == [
            '{"channel":"v","offset":1,"data":' + big + "}",
            '{"channel":"v","offset":2,"data":{"n": 18446744073709551616, "f": 1.10}}',
            '{"channel":"v","offset":3,"data":"caf\\u00e9"}',
            '{"channel":"v","offset":4,"data":{"x": 1e999}}',
        ]
        assert [await asyncio.wait_for(raw.recv(), 10) for _ in range(4)] == [
            big,
            '{"n": 18446744073709551616, "f": 1.10}',
            "café",
            '{"x": 1e999}',
        ]


# 10. Numbers in a query are ASCII digits within their range.


@pytest.mark.parametrize(
    "query",
    [
        "since=%C2%B2",  # a digit to str.isdigit(), not to int()
        "limit=%C2%B2",
        "since=%D9%A3",  # ARABIC-INDIC DIGIT THREE: int() reads it, the API does not
        "limit=" + "1" * 5000,  # int() refuses more than 4300 digits
        "since=" + "1" * 5000,
        f"since={2**63}",  # past a signed 64-bit offset
        "since=-1",
        "limit=0",
        "limit=1001",
    ],
)
async def test_a_bad_number_in_a_history_query_is_a_400(daemon: Running, query: str) -> None:
    await daemon.publish("h", 1)
    with structlog.testing.capture_logs() as logs:
        response = await daemon.http.get(f"/channels/h/history?{query}")
    assert (response.status_code, response.json()["error"]["code"]) == (400, "bad_request")
    assert [entry for entry in logs if entry["log_level"] == "error"] == []


async def test_history_since_may_be_the_largest_offset(daemon: Running) -> None:
    await daemon.publish("h", 1)
    response = await daemon.http.get(f"/channels/h/history?since={2**63 - 1}&limit=0001")
    assert response.status_code == 200
    assert response.json()["publications"] == []


# 11. An idempotency key is text: the same in the header and in a batch item.


async def test_an_idempotency_key_beyond_ascii_is_one_key_in_the_header_and_in_a_batch(
    daemon: Running,
) -> None:
    key = "clé-é-日本"
    first = await daemon.http.post(
        "/publish/k",
        json=1,
        headers={"Idempotency-Key": key.encode()},  # sent as UTF-8
    )
    assert (first.status_code, first.json()["offset"]) == (200, 1)
    again = await daemon.http.post(
        "/batch", json=[{"channel": "k", "data": 1, "idempotency_key": key}]
    )
    assert again.json()["results"][0] | {"epoch": None} == {
        "channel": "k",
        "epoch": None,
        "offset": 1,
        "subscribers": 0,
        "duplicate": True,
    }
    # And the other way round: a batch item's key, then the JSON form's header.
    await daemon.http.post("/batch", json=[{"channel": "k", "data": 2, "idempotency_key": "ü"}])
    response = await daemon.http.post(
        "/publish",
        json={"channel": "k", "data": 2},
        headers={"Idempotency-Key": "ü".encode()},
    )
    assert (response.json()["offset"], response.json()["duplicate"]) == (2, True)
    assert (await daemon.http.get("/channels/k")).json()["offset"] == 2


async def test_an_idempotency_key_header_that_is_not_utf8_is_a_400(daemon: Running) -> None:
    response = await daemon.http.post(
        "/publish/k", json=1, headers={"Idempotency-Key": "café".encode("latin-1")}
    )
    assert (response.status_code, response.json()["error"]["code"]) == (400, "bad_command")
    assert "UTF-8" in response.json()["error"]["message"]
    assert (await daemon.http.get("/channels/k")).status_code == 404  # nothing published
