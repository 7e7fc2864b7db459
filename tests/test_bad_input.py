"""Every bad input gets its documented error, and nothing else is affected.

One daemon (with a control token) takes the whole table in turn. Around every
case a message is published to a witness subscriber that stays connected
throughout: it must receive all of them, in order, none missing.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus

from .conftest import Running, recv_json, subscribed
from .rawclient import RawClient

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MAX_CHANNELS = 3


@dataclass
class Case:
    name: str
    run: Callable[[Running], Awaitable[Any]]
    expect: Any


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
            try:
                got = await case.run(daemon)
            except (AssertionError, ConnectionClosed, OSError) as exc:
                got = f"raised {exc!r}"
            if got != case.expect:
                failures.append(f"{case.name}: expected {case.expect!r}, got {got!r}")
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
