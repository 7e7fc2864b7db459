"""Subscriber tokens and namespaces on a real daemon, with real WebSocket clients.

Tokens are real HS256 JWTs; the daemon's own clock decides expiry, so tokens
that must expire during a test are made to expire a second or two ahead.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import jwt
import pytest
import structlog
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from websockets.exceptions import ConnectionClosed, InvalidStatus

from .conftest import Running, recv_json
from .rawclient import RawClient
from .test_auth_tokens import JwksServer

SECRET = "s" * 64


def token(sub: str = "alice", channels: list[str] | None = None, **claims: Any) -> str:
    payload: dict[str, Any] = {"sub": sub, "exp": int(time.time()) + 3600, **claims}
    if channels is not None:
        payload["channels"] = channels
    return jwt.encode(payload, SECRET, algorithm="HS256")


AUTH = {"auth__hmac_secret": SECRET}
NAMESPACES = [
    {"name": "public", "subscribe": "public"},
    {"name": "members", "subscribe": "user"},
    {"name": "paid", "subscribe": "token"},
    {"name": "short", "subscribe": "public", "history_size": 2},
    {"name": "live", "subscribe": "public", "recover": False},
    {"name": "tiny", "subscribe": "public", "max_payload_bytes": 32},
]


async def read_all(ws: Any, count: int) -> list[dict[str, Any]]:
    return [await recv_json(ws) for _ in range(count)]


async def closed_with(ws: Any) -> int:
    """Read until the server closes; its close code."""
    try:
        while True:
            await recv_json(ws)
    except ConnectionClosed:
        pass
    code: int = ws.close_code
    return code


async def test_a_token_in_the_url_the_header_or_a_command(daemon_factory: Any) -> None:
    async with daemon_factory(**AUTH, namespaces=NAMESPACES) as d:
        good = token(channels=["paid:*"])
        async with d.connect(f"/?channel=paid:gold&token={good}") as ws:
            assert (await recv_json(ws))["type"] == "authenticated"
            assert (await recv_json(ws))["type"] == "subscribed"
        headers = {"Authorization": f"Bearer {good}"}
        async with d.connect("/?channel=paid:gold", additional_headers=headers) as ws:
            assert (await recv_json(ws))["type"] == "authenticated"
            assert (await recv_json(ws))["type"] == "subscribed"
        async with d.connect("/") as ws:
            await ws.send(json.dumps({"op": "auth", "token": good, "id": 1}))
            reply = await recv_json(ws)
            assert (reply["type"], reply["user"], reply["id"]) == ("authenticated", "alice", 1)
            await ws.send(json.dumps({"op": "subscribe", "channel": "paid:gold"}))
            assert (await recv_json(ws))["type"] == "subscribed"
            await d.publish("paid:gold", "hi")
            assert (await recv_json(ws))["data"] == "hi"


async def test_subscribe_rules(daemon_factory: Any) -> None:
    async with daemon_factory(**AUTH, namespaces=NAMESPACES) as d:
        cases = [
            # (token, channel, expected error code or None)
            (None, "public:news", None),
            (None, "members:lounge", "token_required"),
            (token(), "members:lounge", None),
            (token(channels=["paid:gold"]), "paid:gold", None),
            (token(channels=["paid:gold"]), "paid:silver", "channel_not_allowed"),
            (token(channels=["paid:*"]), "paid:silver", None),
            (token("alice"), "members:inbox#alice", None),
            (token("bob", channels=["*"]), "members:inbox#alice", "not_your_channel"),
            (None, "public:inbox#alice", "token_required"),
            (token(channels=["*"]), "nowhere:x", "unknown_namespace"),
            (token(channels=["*"]), "plain", None),
        ]
        for given, channel, expected in cases:
            async with d.connect("/") as ws:
                if given is not None:
                    await ws.send(json.dumps({"op": "auth", "token": given}))
                    assert (await recv_json(ws))["type"] == "authenticated"
                await ws.send(json.dumps({"op": "subscribe", "channel": channel}))
                reply = await recv_json(ws)
                got = reply["code"] if reply["type"] == "error" else None
                assert got == expected, (channel, reply)
        metrics = (await d.http.get("/metrics")).text
        assert 'broadcastd_subscribe_denials_total{reason="not_your_channel"} 1.0' in metrics


@pytest.mark.parametrize(
    ("make", "code", "close"),
    [
        (lambda: "not.a.jwt", "token_invalid", 4002),
        (lambda: jwt.encode({"sub": "a"}, "other" * 13, algorithm="HS256"), "token_invalid", 4002),
        (lambda: token(exp=int(time.time()) - 60), "token_expired", 4003),
        (lambda: token(nbf=int(time.time()) + 600), "token_not_yet_valid", 4002),
        (lambda: jwt.encode({"sub": "a"}, None, algorithm="none"), "token_invalid", 4002),
    ],
)
async def test_a_bad_token_at_connect_is_refused_and_closed(
    daemon_factory: Any, make: Any, code: str, close: int, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = make()
    async with daemon_factory(**AUTH, namespaces=NAMESPACES) as d:
        async with d.connect(
            "/?channel=public:news", additional_headers={"Authorization": f"Bearer {bad}"}
        ) as ws:
            error = await recv_json(ws)
            assert (error["type"], error["code"], error["op"]) == ("error", code, "connect")
            assert await closed_with(ws) == close
        async with d.connect("/?channel=public:news") as witness:  # nobody else affected
            assert (await recv_json(witness))["type"] == "subscribed"
        metrics = (await d.http.get("/metrics")).text
        assert f'broadcastd_auth_refusals_total{{reason="{code}"}} 1.0' in metrics
    assert bad not in capsys.readouterr().out  # never logged


YEAR_9999 = 253_402_300_799
"""The latest ``exp`` a token can mean: a later one is taken as this."""


@pytest.mark.parametrize("exp", [1e20, 1e308, 2**64 - 1])
async def test_a_token_expiring_after_year_9999_is_accepted_as_year_9999(
    daemon_factory: Any, exp: float
) -> None:
    """At connect (URL) and by the auth and refresh commands: ``authenticated``
    tells the clamped ``expires`` and the connection goes on."""
    far = token(channels=["paid:*"], exp=exp)
    async with daemon_factory(**AUTH, namespaces=NAMESPACES) as d:
        with structlog.testing.capture_logs() as logs:
            async with d.connect(f"/?channel=paid:gold&token={far}") as ws:
                reply = await recv_json(ws)
                assert reply == {
                    "type": "authenticated",
                    "user": "alice",
                    "client": reply["client"],
                    "expires": YEAR_9999,
                }
                assert (await recv_json(ws))["type"] == "subscribed"
                await d.publish("paid:gold", "far")
                assert (await recv_json(ws))["data"] == "far"
            async with d.connect("/") as ws:
                for op in ("auth", "refresh"):
                    await ws.send(json.dumps({"op": op, "token": far, "id": op}))
                    reply = await recv_json(ws)
                    assert reply == {
                        "type": "authenticated",
                        "user": "alice",
                        "client": reply["client"],
                        "expires": YEAR_9999,
                        "op": op,
                        "id": op,
                    }
                await ws.send(json.dumps({"op": "subscribe", "channel": "paid:gold"}))
                assert (await recv_json(ws))["type"] == "subscribed"
        assert [entry for entry in logs if entry["log_level"] == "error"] == []


@pytest.fixture(scope="module")
def signing_keys() -> dict[str, Any]:
    return {
        "issuer": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "other": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "ec": ec.generate_private_key(ec.SECP256R1()),
    }


@pytest.fixture
async def jwks_server() -> AsyncIterator[JwksServer]:
    server = JwksServer()
    await server.start()
    yield server
    await server.stop()


@pytest.mark.parametrize(
    ("forgery", "key", "algorithm", "header"),
    [
        ("a wrong key for its kid", "other", "RS256", {"kid": "k"}),
        ("an alg its key does not allow", "ec", "ES256", {"kid": "k"}),
        (
            "a jku naming another JWKS document",
            "other",
            "RS256",
            {"kid": "evil", "jku": "https://evil.example/jwks.json"},
        ),
        (
            "an x5u naming another certificate",
            "other",
            "RS256",
            {"kid": "evil", "x5u": "https://evil.example/cert.pem"},
        ),
    ],
)
async def test_a_token_refused_on_the_jwks_path_closes_at_once(
    daemon_factory: Any,
    jwks_server: JwksServer,
    signing_keys: dict[str, Any],
    forgery: str,
    key: str,
    algorithm: str,
    header: dict[str, str],
) -> None:
    """The verdict waits on the JWKS (reading is held meanwhile); a refusal must
    then close as the others do, at once. With ws.close_timeout (and the client's)
    at 600 s, a close that waited for it would not come within the test's timeout."""
    jwks_server.publish(("k", signing_keys["issuer"]))
    claims = {"sub": "alice", "exp": int(time.time()) + 3600}
    bad = jwt.encode(claims, signing_keys[key], algorithm=algorithm, headers=header)
    settings = {"auth__jwks_url": jwks_server.url, "ws__close_timeout": 600}
    async with daemon_factory(**settings, namespaces=NAMESPACES) as d:
        good = jwt.encode(claims, signing_keys["issuer"], algorithm="RS256", headers={"kid": "k"})
        async with d.connect(f"/?channel=public:news&token={good}") as ws:  # the JWKS works
            assert (await recv_json(ws))["type"] == "authenticated"
        ws = await d.connect(f"/?channel=public:news&token={bad}", close_timeout=600)
        try:
            error = await recv_json(ws)
            assert (error["type"], error["code"], error["op"]) == (
                "error",
                "token_invalid",
                "connect",
            )
            assert await closed_with(ws) == 4002
        finally:
            ws.transport.abort()  # a failure here must not wait for the client's close_timeout
        metrics = (await d.http.get("/metrics")).text
        assert 'broadcastd_auth_refusals_total{reason="token_invalid"} 1.0' in metrics
        assert 'reason="token_required"' not in metrics  # refused once, not twice


async def test_a_refusal_waiting_for_its_close_is_not_counted_again(
    daemon_factory: Any, jwks_server: JwksServer, signing_keys: dict[str, Any]
) -> None:
    """A client that never answers the close frame keeps the closing handshake
    open until ws.close_timeout. The auth deadline, shorter, must not count the
    refused connection a second time (as ``token_required``) meanwhile."""
    jwks_server.publish(("k", signing_keys["issuer"]))
    claims = {"sub": "alice", "exp": int(time.time()) + 3600}
    bad = jwt.encode(claims, signing_keys["other"], algorithm="RS256", headers={"kid": "k"})
    settings = {
        "auth__jwks_url": jwks_server.url,
        "auth__auth_timeout": 0.5,
        "ws__close_timeout": 2,
    }
    async with daemon_factory(**settings) as d:
        client = await RawClient.connect(f"{d.ws_url}/?token={bad}", rcvbuf=None)
        protocol = client.protocol
        while not client.reader.at_eof():  # until the daemon cuts the connection
            data = await asyncio.wait_for(client.reader.read(65536), 30)
            if data:
                protocol.receive_data(data)
            else:
                protocol.receive_eof()
            protocol.events_received()
            protocol.data_to_send()  # dropped: the close frame is never answered
        client.close()
        assert protocol.close_rcvd is not None
        assert protocol.close_rcvd.code == 4002
        metrics = (await d.http.get("/metrics")).text
        assert 'broadcastd_auth_refusals_total{reason="token_invalid"} 1.0' in metrics
        assert 'reason="token_required"' not in metrics


async def test_refresh_keeps_the_connection_and_no_refresh_closes_it(daemon_factory: Any) -> None:
    settings = {**AUTH, "auth__leeway": 0, "auth__expiring_notice": 60, "namespaces": NAMESPACES}
    async with daemon_factory(**settings) as d:
        soon = int(time.time()) + 2
        async with d.connect(f"/?channel=members:lounge&token={token(exp=soon)}") as ws:
            assert (await recv_json(ws))["type"] == "authenticated"
            assert (await recv_json(ws))["type"] == "subscribed"
            assert await recv_json(ws) == {"type": "expiring", "expires": soon}
            await ws.send(json.dumps({"op": "refresh", "token": token(), "id": "r"}))
            reply = await recv_json(ws)
            assert (reply["type"], reply["op"], reply["id"]) == ("authenticated", "refresh", "r")
            # Past the first token's exp: still connected, still subscribed.
            while time.time() < soon + 0.5:
                await ws.send(json.dumps({"op": "ping"}))
                assert (await recv_json(ws))["type"] == "pong"
            await d.publish("members:lounge", "still here")
            assert (await recv_json(ws))["data"] == "still here"
        soon = int(time.time()) + 2
        async with d.connect(f"/?channel=members:lounge&token={token(exp=soon)}") as ws:
            assert (await recv_json(ws))["type"] == "authenticated"
            assert (await recv_json(ws))["type"] == "subscribed"
            assert (await recv_json(ws))["type"] == "expiring"
            assert await closed_with(ws) == 4003
        async with d.connect("/") as ws:  # another user's token cannot take over
            await ws.send(json.dumps({"op": "auth", "token": token("alice")}))
            assert (await recv_json(ws))["type"] == "authenticated"
            await ws.send(json.dumps({"op": "refresh", "token": token("mallory")}))
            assert (await recv_json(ws))["code"] == "token_user"


async def test_refused_tokens_count_towards_the_command_error_limit(
    daemon_factory: Any,
) -> None:
    url = f"/?channel=news&token={token(channels=['news'])}"
    async with daemon_factory(**AUTH, ws__max_command_errors=3) as d, d.connect(url) as ws:
        assert (await recv_json(ws))["type"] == "authenticated"
        assert (await recv_json(ws))["type"] == "subscribed"
        for i in range(3):
            await ws.send(json.dumps({"op": "refresh", "token": "bad", "id": i}))
        assert await closed_with(ws) == 1008


async def test_a_connection_that_never_authenticates_is_closed(daemon_factory: Any) -> None:
    async with daemon_factory(**AUTH, auth__auth_timeout=0.3) as d, d.connect("/") as ws:
        await ws.send(json.dumps({"op": "subscribe", "channel": "news"}))
        assert (await recv_json(ws))["code"] == "token_required"
        assert await closed_with(ws) == 4001


async def test_auth_commands_without_auth_configured(daemon: Running) -> None:
    async with daemon.connect("/") as ws:
        await ws.send(json.dumps({"op": "auth", "token": "x", "id": 3}))
        reply = await recv_json(ws)
        assert (reply["type"], reply["code"], reply["id"]) == ("error", "bad_command", 3)
        await ws.send(json.dumps({"op": "auth", "id": 4}))
        assert (await recv_json(ws))["code"] == "bad_command"


async def test_namespace_options_take_effect(daemon_factory: Any) -> None:
    async with daemon_factory(namespaces=NAMESPACES) as d:
        async with d.connect("/?channel=short:a&channel=live:a&channel=plain") as ws:
            epochs = {r["channel"]: r["epoch"] for r in [await recv_json(ws) for _ in range(3)]}
            for channel in ("short:a", "live:a", "plain"):
                for i in range(3):
                    await d.publish(channel, i)
            for _ in range(9):
                await recv_json(ws)
        since = "&".join(f"since={c}:{epochs[c]}:0" for c in ("short:a", "live:a", "plain"))
        async with d.connect("/?" + since) as ws:
            replies = {}
            for _ in range(6):
                frame = await recv_json(ws)
                if frame.get("type") == "subscribed":
                    replies[frame["channel"]] = frame
            assert (replies["short:a"]["recovered"], replies["short:a"]["reason"]) == (
                False,
                "too_old",
            )
            assert (replies["live:a"]["recovered"], replies["live:a"]["reason"]) == (
                False,
                "disabled",
            )
            assert replies["plain"]["recovered"] is True
        big = await d.http.post("/publish/tiny:x", json="x" * 40)
        assert big.status_code == 413
        assert (await d.http.post("/publish/plain", json="x" * 40)).status_code == 200
        unknown = await d.http.post("/publish/nowhere:x", json=1)
        assert (unknown.status_code, unknown.json()["error"]["code"]) == (400, "unknown_namespace")
        async with d.connect("/?channel=nowhere:x") as ws:
            assert (await recv_json(ws))["code"] == "unknown_namespace"


async def test_origin_is_optional_unless_required(daemon_factory: Any) -> None:
    origins = {"ws__allowed_origins": ["https://app.example"]}
    async with daemon_factory(**origins) as d, d.connect("/?channel=a") as ws:
        assert (await recv_json(ws))["type"] == "subscribed"  # no Origin: not a browser
    async with daemon_factory(**origins, ws__require_origin=True) as d:
        with pytest.raises(InvalidStatus, match="403"):
            await d.connect("/?channel=a").__aenter__()
        async with d.connect("/?channel=a", origin="https://app.example") as ws:
            assert (await recv_json(ws))["type"] == "subscribed"


async def test_a_slow_reader_of_a_conflating_feed_gets_every_channels_latest(
    daemon_factory: Any,
) -> None:
    """Ten channels published far faster than one client reads: it gets, per
    channel, increasing offsets, missed counts that add up, and the last message;
    a fast reader of the same channels gets everything."""
    namespaces = [{"name": "px", "slow_consumer_policy": "conflate"}]
    channels = [f"px:s{i}" for i in range(10)]
    query = "/?" + "&".join(f"channel={c}" for c in channels)
    async with (
        daemon_factory(namespaces=namespaces, ws__outbox_messages=16, ws__write_limit=1024) as d,
        d.connect(query, max_queue=1) as slow,
        d.connect(query) as fast,
    ):
        for ws in (slow, fast):
            for _ in channels:
                assert (await recv_json(ws))["type"] == "subscribed"
        # 9 MB in all, far more than the slow reader's socket buffers hold; the
        # fast reader takes each round (30 KB, 10 messages: less than its outbox)
        # before the next is published, so nothing of its is ever conflated.
        got_fast = []
        for n in range(300):
            batch = [{"channel": c, "data": {"n": n, "pad": "x" * 3000}} for c in channels]
            answer = await d.http.post("/batch", json=batch)
            assert answer.json()["published"] == 10
            got_fast += await read_all(fast, 10)
        assert sorted((m["channel"], m["offset"]) for m in got_fast) == sorted(
            (c, n) for c in channels for n in range(1, 301)
        )
        offsets: dict[str, list[int]] = {c: [] for c in channels}
        missed: dict[str, int] = dict.fromkeys(channels, 0)
        while any(not o or o[-1] < 300 for o in offsets.values()):
            frame = await recv_json(slow)
            if frame.get("type") == "missed":
                missed[frame["channel"]] += frame["count"]
            else:
                offsets[frame["channel"]].append(frame["offset"])
        assert sum(missed.values()) > 0  # it really was slow
        for c in channels:
            assert offsets[c] == sorted(offsets[c])
            assert offsets[c][-1] == 300
            assert len(offsets[c]) + missed[c] == 300, c
        metrics = (await d.http.get("/metrics")).text
        assert 'broadcastd_messages_dropped_total{reason="conflate"}' in metrics


async def test_a_namespaces_outbox_bounds_keep_its_flood_from_other_channels(
    daemon_factory: Any,
) -> None:
    """A client that stops reading holds a flooding price feed and an order book.
    With ``drop_oldest`` the feed's messages are dropped within its own share
    (``outbox_messages = 4``) and the order book loses nothing; without the share,
    the outbox's oldest (order book included) would go."""
    namespaces = [{"name": "px", "outbox_messages": 4}, {"name": "orders"}]
    async with (
        daemon_factory(
            namespaces=namespaces,
            ws__slow_consumer_policy="drop_oldest",
            ws__outbox_messages=64,
            ws__write_limit=1024,
        ) as d,
        d.connect("/?channel=px:feed&channel=orders:book", max_queue=1) as slow,
    ):
        for _ in range(2):
            assert (await recv_json(slow))["type"] == "subscribed"
        for n in range(100):  # 9 MB of prices: far more than the socket buffers hold
            batch = [{"channel": "px:feed", "data": {"pad": "x" * 3000}} for _ in range(30)]
            if n % 5 == 0:
                batch.append({"channel": "orders:book", "data": {"n": n}})
            answer = await d.http.post("/batch", json=batch)
            assert answer.status_code == 200
        orders: list[int] = []
        prices: list[int] = []
        missed = {"px:feed": 0, "orders:book": 0, "any channel": 0}
        while not prices or prices[-1] < 3000:  # the feed's last message comes last
            frame = await recv_json(slow)
            if frame.get("type") == "missed":
                missed[frame.get("channel", "any channel")] += frame["count"]
            elif frame["channel"] == "orders:book":
                orders.append(frame["offset"])
            else:
                prices.append(frame["offset"])
        assert orders == list(range(1, 21))
        assert missed["orders:book"] == missed["any channel"] == 0
        assert missed["px:feed"] > 0  # it really was a flood
        assert len(prices) + missed["px:feed"] == 3000
        assert prices == sorted(prices)
