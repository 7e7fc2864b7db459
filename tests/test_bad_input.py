"""Every bad input gets its documented error, and nothing else is affected.

One daemon (with a control token) takes the whole table in turn. Around every
case a message is published to a witness subscriber that stays connected
throughout: it must receive all of them, in order, none missing. A bad input is
the client's mistake, not a failure of ours: no case but the one that simulates
a bug of ours may log at error level.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import structlog
from websockets.exceptions import InvalidStatus

from .conftest import Running, recv_json, subscribed
from .rawclient import RawClient
from .test_control_edges import RawHttp, error_code

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MAX_CHANNELS = 3


@dataclass
class Case:
    name: str
    run: Callable[[Running], Awaitable[Any]]
    expect: Any
    logs_error: bool = False
    """Whether the case is a failure of ours, which is logged at error level."""


DEEP = 30_000
"""Levels of nesting in the deeply nested JSON cases: far beyond any parser's
recursion limit, within the table daemon's body limit."""


def nested(depth: int = DEEP) -> bytes:
    return b"[" * depth + b"]" * depth


# WebSocket cases: each returns the error code replied, or the close code.


async def command_error(daemon: Running, *frames: str) -> str:
    """Send frames on a fresh connection; return the code of the last error reply."""
    async with daemon.connect("/") as ws:
        for frame in frames:
            await ws.send(frame)
        reply: dict[str, Any] = {}
        for _ in frames:
            reply = await recv_json(ws)
        assert reply["type"] == "error", reply
        # The connection is still usable after an error.
        await ws.send('{"op": "ping"}')
        assert (await recv_json(ws))["type"] == "pong"
        return str(reply["code"])


def ws_command(*frames: str) -> Callable[[Running], Awaitable[str]]:
    return lambda daemon: command_error(daemon, *frames)


async def close_code(daemon: Running, send: Callable[[RawClient], None]) -> int:
    client = await RawClient.connect(daemon.ws_url + "/", rcvbuf=None)
    await client.handshake()
    send(client)
    client.flush()
    close = await client.read_until_closed()
    client.close()
    assert close is not None
    return close.code


def ws_close(send: Callable[[RawClient], None]) -> Callable[[Running], Awaitable[int]]:
    return lambda daemon: close_code(daemon, send)


def masked_text_frame(payload: bytes) -> bytes:
    """A client text frame with an all-zero mask, bypassing any UTF-8 check."""
    assert len(payload) < 126
    return bytes((0x81, 0x80 | len(payload))) + b"\x00\x00\x00\x00" + payload


def too_many_errors(client: RawClient) -> None:
    for _ in range(5):
        client.protocol.send_text(b"nope")


async def handshake_status(daemon: Running, path: str) -> tuple[int, str]:
    try:
        async with daemon.connect(path):
            pass
    except InvalidStatus as exc:
        body = json.loads(exc.response.body)
        return exc.response.status_code, body["error"]["code"]
    raise AssertionError("handshake accepted")


def ws_handshake(path: str) -> Callable[[Running], Awaitable[tuple[int, str]]]:
    return lambda daemon: handshake_status(daemon, path)


async def handshake_answer(daemon: Running, path: str) -> tuple[int, str]:
    """The status and error code of a handshake answer, read off a raw socket: a
    handshake the daemon drops without answering is ``(0, "no answer")``."""
    reader, writer = await asyncio.open_connection("127.0.0.1", daemon.daemon.ws.port)
    writer.write(
        (
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    try:
        async with asyncio.timeout(10):
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split()[1])
            if status == 101:
                return status, "accepted"
            length = next(
                int(line.split(b":")[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length")
            )
            body = await reader.readexactly(length)
    except asyncio.IncompleteReadError:
        return 0, "no answer"
    finally:
        writer.close()
    return status, error_code(body)


def ws_handshake_raw(path: str) -> Callable[[Running], Awaitable[tuple[int, str]]]:
    return lambda daemon: handshake_answer(daemon, path)


async def plain_http_on_ws_port(daemon: Running) -> int:
    async with httpx.AsyncClient() as client:
        response = await client.get(daemon.ws_url.replace("ws:", "http:") + "/")
    return response.status_code


# Control cases: each returns (status, error code) or a custom summary.


def control(
    method: str, path: str, *, auth: dict[str, str] | None = AUTH, **kwargs: Any
) -> Callable[[Running], Awaitable[tuple[int, str]]]:
    async def run(daemon: Running) -> tuple[int, str]:
        response = await daemon.http.request(
            method, path, headers={**(auth or {}), **kwargs.pop("headers", {})}, **kwargs
        )
        body = response.json()
        assert response.headers["content-type"] == "application/json"
        return response.status_code, body["error"]["code"]

    return run


async def batch_with_one_bad_item(daemon: Running) -> list[str]:
    response = await daemon.http.post(
        "/batch",
        headers=AUTH,
        json=[
            {"channel": "side", "data": 1},
            {"channel": "bad channel", "data": 2},
            {"channel": "side", "data": 3},
            {"channel": "side"},
        ],
    )
    assert response.status_code == 200
    doc = response.json()
    assert (doc["published"], doc["failed"]) == (2, 2)
    return [r["error"]["code"] if "error" in r else str(r["offset"]) for r in doc["results"]]


async def raw_request(daemon: Running, data: bytes) -> tuple[int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", daemon.daemon.control.port)
    writer.write(data)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split()[1])
    length = int(
        next(
            line.split(b":")[1]
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length")
        )
    )
    body = json.loads(await reader.readexactly(length))
    writer.close()
    return status, body["error"]["code"]


def raw_head(method: str, path: str, *extra: str) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", f"Authorization: Bearer {TOKEN}"]
    return ("\r\n".join([*lines, *extra]) + "\r\n\r\n").encode()


async def upload_with_http_client(daemon: Running) -> tuple[int, str]:
    """15 MB, more than the socket buffers take: http.client is still sending
    when the 413 is written, and must read it rather than a reset."""

    def post() -> tuple[int, str]:
        connection = http.client.HTTPConnection("127.0.0.1", daemon.daemon.control.port)
        try:
            connection.request("POST", "/publish/side", body=b"x" * 15_000_000, headers=AUTH)
            response = connection.getresponse()
            return response.status, error_code(response.read())
        finally:
            connection.close()

    return await asyncio.to_thread(post)


async def raw_exchange(
    daemon: Running, data: bytes, answers: int, head_only: bool = False, closes: bool = False
) -> list[tuple[int, str]]:
    """Send ``data``; return each answer's status and error code (or body), then,
    if the connection should close, whether it does ("EOF")."""
    client = await RawHttp.connect(daemon.daemon.control.port)
    client.send(data)
    got: list[tuple[int, str]] = []
    for n in range(answers):
        status, headers, body = await client.response(head_only=head_only and n == 0)
        if head_only and n == 0:
            got.append((status, headers.get("allow", "")))
        else:
            text = re.sub(r'"epoch":"[^"]*",', "", body.decode())  # epochs are random
            got.append((status, error_code(body) if status >= 400 else text))
    if closes:
        got.append((0, "EOF" if await client.at_eof() else "open"))
    client.close()
    return got


async def trickled_head(daemon: Running) -> tuple[int, str]:
    client = await RawHttp.connect(daemon.daemon.control.port)
    client.send(b"GET /healthz HTTP/1.1\r\n")
    for byte in b"X-Slow: " + b"a" * 400:  # a byte every 50 ms, until an answer
        client.send(bytes((byte,)))
        try:
            status, _, body = await asyncio.wait_for(client.response(), 0.05)
            break
        except TimeoutError:
            continue
    else:
        raise AssertionError("no answer while the head trickled in")
    client.close()
    return status, error_code(body)


async def handler_failure(daemon: Running) -> tuple[int, str]:
    node = daemon.daemon.node
    node.publish = lambda *args: 1 / 0  # type: ignore[method-assign]
    try:
        response = await daemon.http.post("/publish/side", json=1, headers=AUTH)
    finally:
        del node.publish
    return response.status_code, response.json()["error"]["code"]


async def pipelined_and_never_read(daemon: Running) -> str:
    """1000 pipelined requests for the OpenAPI document (20 MB of answers) from a
    client that does not read: the daemon holds about one write limit of them."""
    known = set(daemon.daemon.control._connections)
    client = await RawHttp.connect(daemon.daemon.control.port, rcvbuf=4096)
    client.send(raw_head("GET", "/openapi.json") * 1000)
    await client.writer.drain()
    for _ in range(10_000):  # /healthz round trips: turns of the daemon's loop
        assert (await daemon.http.get("/healthz")).status_code == 200
        flooding = [
            c
            for c in daemon.daemon.control._connections
            if c not in known and c._transport and not c._transport.is_reading()
        ]
        if flooding:
            break
    else:
        raise AssertionError("never paused")
    size = len((await daemon.http.get("/openapi.json", headers=AUTH)).content)
    buffered = flooding[0]._transport.get_write_buffer_size()
    bounded = buffered <= 256 * 1024 + size + 200
    statuses = {(await client.response())[0] for _ in range(1000)}
    client.close()
    return f"bounded={bounded} statuses={sorted(statuses)}"


CASES = [
    Case("ws: non-JSON command", ws_command("hello"), "bad_json"),
    Case("ws: JSON that is not an object", ws_command("[1]"), "bad_command"),
    Case("ws: missing op", ws_command('{"channel": "a"}'), "bad_command"),
    Case("ws: unknown op", ws_command('{"op": "publish"}'), "unknown_op"),
    Case("ws: missing channel", ws_command('{"op": "subscribe"}'), "bad_command"),
    Case("ws: empty channel", ws_command('{"op": "subscribe", "channel": ""}'), "bad_channel"),
    Case(
        "ws: channel too long",
        ws_command(json.dumps({"op": "subscribe", "channel": "a" * 129})),
        "bad_channel",
    ),
    Case(
        "ws: channel with a space",
        ws_command('{"op": "subscribe", "channel": "a b"}'),
        "bad_channel",
    ),
    Case(
        "ws: channel with a slash",
        ws_command('{"op": "subscribe", "channel": "a/b"}'),
        "bad_channel",
    ),
    Case(
        "ws: channel not a string",
        ws_command('{"op": "subscribe", "channel": ["a"]}'),
        "bad_channel",
    ),
    Case(
        "ws: too many subscriptions",
        ws_command(
            *(json.dumps({"op": "subscribe", "channel": f"c{i}"}) for i in range(MAX_CHANNELS + 1))
        ),
        "too_many_channels",
    ),
    Case(
        "ws: unsubscribe without subscribing",
        ws_command('{"op": "unsubscribe", "channel": "a"}'),
        "not_subscribed",
    ),
    Case("ws: bad id", ws_command('{"op": "ping", "id": [1]}'), "bad_command"),
    Case("ws: oversized frame", ws_close(lambda c: c.protocol.send_text(b"x" * 2000)), 1009),
    Case("ws: invalid UTF-8", ws_close(lambda c: c.send_raw(masked_text_frame(b"\xff\xfe"))), 1007),
    Case(
        "ws: unmasked client frame", ws_close(lambda c: c.send_raw(bytes((0x81, 2)) + b"{}")), 1002
    ),
    Case("ws: binary command frame", ws_close(lambda c: c.protocol.send_binary(b"{}")), 1003),
    Case("ws: repeated invalid commands", ws_close(too_many_errors), 1008),
    Case("ws handshake: bad channel in path", ws_handshake("/a%20b"), (400, "bad_channel")),
    Case("ws handshake: unknown query parameter", ws_handshake("/?chanel=a"), (400, "bad_request")),
    Case("ws handshake: too many channels", ws_handshake("/a,b,c,d"), (400, "too_many_channels")),
    Case("ws handshake: bad format", ws_handshake("/?format=xml"), (400, "bad_request")),
    Case(
        "ws handshake: since offset ² (a digit to isdigit(), not to int())",
        ws_handshake_raw("/?since=a:ep:%C2%B2"),
        (400, "bad_request"),
    ),
    Case(
        "ws handshake: since count ²",
        ws_handshake_raw("/?since=a:last:%C2%B2"),
        (400, "bad_request"),
    ),
    Case(
        "ws handshake: since offset of 5000 digits",
        ws_handshake_raw("/?since=a:ep:" + "1" * 5000),
        (400, "bad_request"),
    ),
    Case(
        "ws handshake: since offset beyond 64 bits",
        ws_handshake_raw("/?since=a:ep:" + str(2**63)),
        (400, "bad_request"),
    ),
    Case("ws port: plain HTTP request", plain_http_on_ws_port, 426),
    Case(
        "control: bad JSON",
        control("POST", "/publish", content=b"{nope", headers={"Content-Type": "application/json"}),
        (400, "bad_json"),
    ),
    Case(
        "control: bad JSON body to a channel",
        control(
            "POST", "/publish/side", content=b"[1,", headers={"Content-Type": "application/json"}
        ),
        (400, "bad_json"),
    ),
    Case(
        "control: JSON nested too deeply in the JSON form",
        control(
            "POST",
            "/publish",
            content=b'{"channel": "side", "data": ' + nested() + b"}",
            headers={"Content-Type": "application/json"},
        ),
        (400, "bad_json"),
    ),
    Case(
        "control: JSON body nested too deeply to a channel",
        control(
            "POST", "/publish/side", content=nested(), headers={"Content-Type": "application/json"}
        ),
        (400, "bad_json"),
    ),
    Case(
        "control: batch item data nested too deeply",
        control("POST", "/batch", content=b'[{"channel": "side", "data": ' + nested() + b"}]"),
        (400, "bad_json"),
    ),
    Case(
        "control: batch whose second item is nested too deeply",
        control("POST", "/batch", content=b"[1, " + nested() + b"]"),
        (400, "bad_json"),
    ),
    Case(
        "control: batch with a syntax error after an item that is not an object",
        control("POST", "/batch", content=b"[1, [}"),
        (400, "bad_json"),
    ),
    Case(
        "control: JSON form without data",
        control("POST", "/publish", json={"channel": "a"}),
        (400, "bad_command"),
    ),
    Case(
        "control: channel and channels",
        control("POST", "/publish", json={"channel": "a", "channels": ["b"], "data": 1}),
        (400, "bad_command"),
    ),
    Case("control: bad channel", control("POST", "/publish/a%20b", json=1), (400, "bad_channel")),
    Case(
        "control: bad channel in JSON form",
        control("POST", "/publish", json={"channels": ["ok", "not ok"], "data": 1}),
        (400, "bad_channel"),
    ),
    Case(
        "control: body too large",
        control("POST", "/publish/side", content=b"x" * 70_000),
        (413, "payload_too_large"),
    ),
    Case(
        "control: payload too large",
        control("POST", "/publish/side", content=b"x" * 5_000),
        (413, "payload_too_large"),
    ),
    Case(
        "control: text body not UTF-8",
        control("POST", "/publish/side", content=b"\xff", headers={"Content-Type": "text/plain"}),
        (400, "bad_encoding"),
    ),
    Case(
        "control: wrong media type",
        control(
            "POST",
            "/batch",
            content=b"a=1",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        ),
        (415, "unsupported_media_type"),
    ),
    Case("control: wrong method", control("GET", "/publish/side"), (405, "method_not_allowed")),
    Case("control: unknown route", control("GET", "/nope"), (404, "not_found")),
    Case("control: unknown channel", control("GET", "/channels/never"), (404, "not_found")),
    Case(
        "control: missing token",
        control("POST", "/publish/side", auth=None, json=1),
        (401, "unauthorized"),
    ),
    Case(
        "control: wrong token",
        control("POST", "/publish/side", json=1, auth={"Authorization": "Bearer nope"}),
        (401, "unauthorized"),
    ),
    Case(
        "control: batch not an array",
        control("POST", "/batch", json={"channel": "a"}),
        (400, "bad_command"),
    ),
    Case(
        "control: batch too large",
        control("POST", "/batch", json=[{"channel": "a", "data": 1}] * 11),
        (400, "too_many_items"),
    ),
    Case(
        "control: batch with bad items",
        batch_with_one_bad_item,
        ["1", "bad_channel", "2", "bad_command"],
    ),
    Case(
        "control: malformed HTTP",
        lambda d: raw_request(d, b"GARBAGE\r\n\r\n"),
        (400, "bad_request"),
    ),
    Case(
        "control: headers too large",
        lambda d: raw_request(d, b"GET /healthz HTTP/1.1\r\nX-Big: " + b"a" * 5000 + b"\r\n\r\n"),
        (431, "headers_too_large"),
    ),
    Case(
        "control: body too large, read by http.client while still sending",
        upload_with_http_client,
        (413, "payload_too_large"),
    ),
    Case(
        "control: HEAD of a POST route",
        lambda d: raw_exchange(
            d, raw_head("HEAD", "/publish/side") + raw_head("GET", "/healthz"), 2, True
        ),
        [(405, "POST"), (200, '{"status":"ok"}')],
    ),
    Case(
        "control: Upgrade h2c on a publish",
        lambda d: raw_exchange(
            d,
            raw_head(
                "POST",
                "/publish/upgraded",
                "Connection: Upgrade, HTTP2-Settings",
                "Upgrade: h2c",
                "HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA",
                "Content-Length: 2",
            )
            + b"hi"
            + raw_head("GET", "/channels/upgraded"),
            2,
        ),
        [
            (200, '{"channel":"upgraded","offset":1,"subscribers":0}'),
            (200, '{"name":"upgraded","subscribers":0,"offset":1}'),
        ],
    ),
    Case(
        "control: Upgrade websocket on a control route",
        lambda d: raw_exchange(
            d,
            raw_head(
                "GET",
                "/healthz",
                "Connection: Upgrade",
                "Upgrade: websocket",
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
                "Sec-WebSocket-Version: 13",
            )
            + raw_head("GET", "/healthz"),
            2,
        ),
        [(200, '{"status":"ok"}'), (200, '{"status":"ok"}')],
    ),
    Case(
        "control: CONNECT",
        lambda d: raw_exchange(
            d, b"CONNECT example.com:443 HTTP/1.1\r\nHost: x\r\n\r\n\x16\x03", 1, closes=True
        ),
        [(405, "method_not_allowed"), (0, "EOF")],
    ),
    Case(
        "control: Expect 100-continue with a length over the limit",
        lambda d: raw_exchange(
            d,
            raw_head("POST", "/publish/side", "Expect: 100-continue", "Content-Length: 999999"),
            1,
            closes=True,
        ),
        [(413, "payload_too_large"), (0, "EOF")],
    ),
    Case("control: request head that trickles in", trickled_head, (408, "request_timeout")),
    Case("control: a failure of ours", handler_failure, (500, "internal"), logs_error=True),
    Case(
        "control: bad listing query",
        control("GET", "/channels?limit=100000"),
        (400, "bad_request"),
    ),
    Case(
        "control: history since ²",
        control("GET", "/channels/side/history?since=%C2%B2"),
        (400, "bad_request"),
    ),
    Case(
        "control: history limit ²",
        control("GET", "/channels/side/history?limit=%C2%B2"),
        (400, "bad_request"),
    ),
    Case(
        "control: history since beyond 64 bits",
        control("GET", f"/channels/side/history?since={2**63}"),
        (400, "bad_request"),
    ),
    Case(
        "control: Idempotency-Key that is not UTF-8",
        lambda d: raw_request(
            d,
            raw_head("POST", "/publish/side", "Idempotency-Key: KEY", "Content-Length: 1").replace(
                b"KEY",
                b"caf\xe9",  # latin-1, not UTF-8
            )
            + b"1",
        ),
        (400, "bad_command"),
    ),
    Case(
        "control: pipelined requests whose answers are never read",
        pipelined_and_never_read,
        "bounded=True statuses=[200]",
    ),
]


@pytest.fixture
async def strict_daemon(daemon_factory: Any) -> Any:
    async with daemon_factory(
        **{
            "control.token": TOKEN,
            "ws.max_channels_per_client": MAX_CHANNELS,
            "ws.max_message_bytes": 1024,
            "ws.max_command_errors": 5,
            "control.max_body_bytes": 64 * 1024,
            "control.max_payload_bytes": 4096,
            "control.max_batch_items": 10,
            "control.max_header_bytes": 4096,
            "control.header_timeout": 1.0,
        }
    ) as daemon:
        yield daemon


async def test_every_bad_input_gets_its_documented_error(strict_daemon: Running) -> None:
    daemon = strict_daemon
    assert len(CASES) >= 25
    async with daemon.connect("/witness") as witness:
        await subscribed(witness, "witness")
        failures = []
        published = 0
        for case in CASES:
            await daemon.http.post("/publish/witness", json=case.name, headers=AUTH)
            published += 1
            with structlog.testing.capture_logs() as logs:
                try:
                    got = await case.run(daemon)
                except Exception as exc:  # one broken case must not hide the others
                    got = f"raised {exc!r}"
            if got != case.expect:
                failures.append(f"{case.name}: expected {case.expect!r}, got {got!r}")
            errors = [entry["event"] for entry in logs if entry["log_level"] == "error"]
            if bool(errors) != case.logs_error:
                failures.append(f"{case.name}: logged at error level: {errors!r}")
        await daemon.http.post("/publish/witness", json="end", headers=AUTH)
        published += 1
        assert not failures, "\n".join(failures)

        # The witness saw every message, in order; the daemon is still healthy.
        for offset in range(1, published + 1):
            message = await recv_json(witness)
            assert message["offset"] == offset
        assert message["data"] == "end"
        assert (await daemon.http.get("/healthz")).status_code == 200
        stats = (await daemon.http.get("/stats", headers=AUTH)).json()
        assert stats["clients"] == 1


async def test_a_batch_item_with_an_unhashable_channel_is_its_own_error(
    strict_daemon: Running,
) -> None:
    await strict_daemon.http.post("/publish/known", json=1, headers=AUTH)
    response = await strict_daemon.http.post(
        "/batch",
        headers=AUTH,
        json=[
            {"channel": ["known"], "data": 1},
            {"channel": {"a": 1}, "data": 2},
            {"channel": "known", "data": 3},
        ],
    )
    results = response.json()["results"]
    assert [r.get("error", {}).get("code") for r in results] == ["bad_channel", "bad_channel", None]
    assert results[2]["offset"] == 2


async def test_a_deeply_nested_command_is_a_json_error_and_the_connection_goes_on(
    daemon: Running,
) -> None:
    """Nested past the JSON parser's 1024 levels, within the default frame limit."""
    deep = "[" * 4000 + "]" * 4000
    assert await command_error(daemon, deep) == "bad_json"
    inside = '{"op": "subscribe", "channel": "a", "since": ' + deep[1000:-1000] + "}"
    assert await command_error(daemon, inside) == "bad_json"
