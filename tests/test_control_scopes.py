"""Several control tokens, each with scopes and channel patterns.

A real daemon, real HTTP: what each kind of token may do (and that a refusal
publishes nothing, checked from a subscriber or from history), the old single
token, the Redis route variants, the refusals counted in metrics, start-up
errors of a bad configuration, and, from a ``broadcastd serve`` subprocess, that
no token ever reaches the log.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from broadcastd.app import Daemon
from broadcastd.broker.redis import RedisBroker
from broadcastd.errors import ConfigError
from broadcastd.settings import Settings

from .conftest import DaemonProcess, Running, make_settings, recv_json, running_daemon, subscribed
from .redisserver import RedisServer

ADMIN = "the-old-single-token"
PUBLISHER = "publisher-secret-1f3a"
READER = "reader-secret-8c2d"
ORDERS = "orders-secret-from-a-file-77b1"
EVERYTHING = "admin-scope-secret-45e0"
WRONG = "not-a-configured-token-9d9d"
SECRETS = (ADMIN, PUBLISHER, READER, ORDERS, EVERYTHING, WRONG)

READ_PATHS = (
    "/channels",
    "/channels/x",
    "/channels/x/history",
    "/stats",
    "/metrics",
    "/openapi.json",
)


def sha256(token: str) -> str:
    """What ``printf %s "$TOKEN" | sha256sum`` prints."""
    return hashlib.sha256(token.encode()).hexdigest()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def token_file(tmp_path: Path, token: str, name: str = "orders.token") -> Path:
    path = tmp_path / name
    path.write_text(f"  {token}\n")  # surrounding whitespace is not part of the token
    return path


def tokens_config(tmp_path: Path) -> list[dict[str, Any]]:
    return [
        {"name": "publisher", "sha256": sha256(PUBLISHER), "scopes": ["publish"]},
        {"name": "reader", "sha256": sha256(READER), "scopes": ["read"]},
        {
            "name": "orders",
            "file": str(token_file(tmp_path, ORDERS)),
            "scopes": ["publish", "read"],
            "namespaces": ["orders:*", "audit"],
        },
        {"name": "everything", "sha256": sha256(EVERYTHING), "scopes": ["admin"]},
    ]


def scoped_settings(tmp_path: Path, **overrides: Any) -> Settings:
    return make_settings(control__token=ADMIN, control__tokens=tokens_config(tmp_path), **overrides)


@pytest.fixture
async def scoped(tmp_path: Path) -> AsyncIterator[Running]:
    async with running_daemon(scoped_settings(tmp_path)) as running:
        yield running


def refused(response: httpx.Response, status: int = 403) -> str:
    """The refusal's message, once its status, code and body are checked."""
    code = "forbidden" if status == 403 else "unauthorized"
    assert (response.status_code, response.json()["error"]["code"]) == (status, code), response.text
    message: str = response.json()["error"]["message"]
    assert not any(secret in response.text for secret in SECRETS)
    return message


async def offset(d: Running, channel: str) -> int:
    """A channel's latest offset (0: unknown), read with the old token."""
    response = await d.http.get(f"/channels/{channel}", headers=bearer(ADMIN))
    if response.status_code == 404:
        return 0
    assert response.status_code == 200, response.text
    value: int = response.json()["offset"]
    return value


# Scopes


async def test_a_publish_token_publishes_and_reads_nothing(scoped: Running) -> None:
    auth = bearer(PUBLISHER)
    assert (await scoped.http.post("/publish/x", json=1, headers=auth)).status_code == 200
    one = {"channel": "x", "data": 2}
    assert (await scoped.http.post("/publish", json=one, headers=auth)).status_code == 200
    response = await scoped.http.post("/batch", json=[one], headers=auth)
    assert response.json()["published"] == 1
    for path in READ_PATHS:
        message = refused(await scoped.http.get(path, headers=auth))
        assert "needs the 'read' scope" in message
        assert "'publisher'" in message
        assert (await scoped.http.head(path, headers=auth)).status_code == 403
    assert await offset(scoped, "x") == 3


async def test_a_read_token_reads_and_publishes_nothing(scoped: Running) -> None:
    await scoped.publish("x", 1, headers=bearer(ADMIN))
    auth = bearer(READER)
    for path in READ_PATHS:
        assert (await scoped.http.get(path, headers=auth)).status_code == 200, path
    attempts = [
        scoped.http.post("/publish/x", json=2, headers=auth),
        scoped.http.post("/publish", json={"channel": "x", "data": 2}, headers=auth),
        scoped.http.post("/publish", json={"channels": ["x", "y"], "data": 2}, headers=auth),
        scoped.http.post("/batch", json=[{"channel": "x", "data": 2}], headers=auth),
    ]
    for attempt in attempts:
        assert "needs the 'publish' scope" in refused(await attempt)
    assert (await offset(scoped, "x"), await offset(scoped, "y")) == (1, 0)


async def test_the_admin_scope_and_the_old_token_do_everything(scoped: Running) -> None:
    for token in (ADMIN, EVERYTHING):
        auth = bearer(token)
        channel = f"any-{len(token)}"
        assert (await scoped.http.post(f"/publish/{channel}", json=1, headers=auth)).is_success
        one = {"channel": channel, "data": 2}
        assert (await scoped.http.post("/publish", json=one, headers=auth)).is_success
        assert (await scoped.http.post("/batch", json=[one], headers=auth)).is_success
        for path in READ_PATHS:
            path = path.replace("/x", f"/{channel}")
            assert (await scoped.http.get(path, headers=auth)).status_code == 200, (token, path)


async def test_a_missing_or_wrong_token_is_a_401_and_the_probes_stay_open(
    scoped: Running,
) -> None:
    for headers in (
        {},
        bearer(WRONG),
        {"Authorization": "Bearer"},
        {"Authorization": f"Basic {PUBLISHER}"},
        {"Authorization": PUBLISHER},
        bearer(sha256(PUBLISHER)),  # the digest is not the token
    ):
        response = await scoped.http.post("/publish/x", json=1, headers=headers)
        refused(response, 401)
        assert response.headers["www-authenticate"] == 'Bearer realm="broadcastd"'
        refused(await scoped.http.get("/stats", headers=headers), 401)
    assert (await scoped.http.get("/healthz")).status_code == 200
    assert (await scoped.http.get("/readyz")).status_code == 200
    assert await offset(scoped, "x") == 0


async def test_the_scheme_is_case_insensitive(scoped: Running) -> None:
    headers = {"Authorization": f"bearer {READER}"}
    assert (await scoped.http.get("/stats", headers=headers)).status_code == 200


# Channel patterns


async def test_a_namespace_token_publishes_only_to_its_channels(scoped: Running) -> None:
    auth = bearer(ORDERS)
    async with scoped.connect("/news,orders:1") as ws:
        await subscribed(ws, "news", "orders:1")
        assert (await scoped.http.post("/publish/orders:1", json="ok", headers=auth)).is_success
        assert (await scoped.http.post("/publish/audit", json="ok", headers=auth)).is_success
        message = refused(await scoped.http.post("/publish/news", json="no", headers=auth))
        assert message == "channel 'news' is outside the channels token 'orders' may use"
        one = {"channel": "news", "data": 0}
        refused(await scoped.http.post("/publish", json=one, headers=auth))
        refused(await scoped.http.post("/publish/audit2", json="no", headers=auth))
        refused(await scoped.http.post("/publish/orders", json="no", headers=auth))
        # What reaches the subscriber: the one allowed message, then the marker
        # published to news with the old token; nothing refused came first.
        await scoped.publish("news", "marker", headers=bearer(ADMIN))
        first, second = await recv_json(ws), await recv_json(ws)
        assert (first["channel"], first["data"]) == ("orders:1", "ok")
        assert (second["channel"], second["offset"], second["data"]) == ("news", 1, "marker")


async def test_a_batch_or_a_multi_publish_with_one_foreign_channel_is_refused_whole(
    scoped: Running,
) -> None:
    auth = bearer(ORDERS)
    batch = [
        {"channel": "orders:2", "data": 1},
        {"channel": "bad name", "data": 1},  # refused on its own either way
        {"channel": "news", "data": 1},
        {"channel": "weather", "data": 1},
    ]
    message = refused(await scoped.http.post("/batch", json=batch, headers=auth))
    assert message.startswith("item 2 (channel 'news') is outside the channels token 'orders'")
    assert "nothing was published" in message
    multi = {"channels": ["orders:3", "news"], "data": 1}
    message = refused(await scoped.http.post("/publish", json=multi, headers=auth))
    assert message.startswith("channel 'news' is outside")
    assert message.endswith("nothing was published")
    for channel in ("orders:2", "orders:3", "news", "weather"):
        assert await offset(scoped, channel) == 0, channel
    # The same requests within the patterns go through.
    allowed = [batch[0], batch[1]]
    response = await scoped.http.post("/batch", json=allowed, headers=auth)
    assert (response.json()["published"], response.json()["failed"]) == (1, 1)
    multi = {"channels": ["orders:3", "audit"], "data": 1}
    assert (await scoped.http.post("/publish", json=multi, headers=auth)).is_success
    assert [await offset(scoped, c) for c in ("orders:2", "orders:3", "audit")] == [1, 1, 1]


async def test_a_namespace_token_reads_and_lists_only_its_channels(scoped: Running) -> None:
    admin = bearer(ADMIN)
    for channel in ("news", "orders:1", "orders:2", "audit", "zzz"):
        await scoped.publish(channel, 1, headers=admin)
    auth = bearer(ORDERS)
    listed = (await scoped.http.get("/channels", headers=auth)).json()
    assert [c["name"] for c in listed["channels"]] == ["audit", "orders:1", "orders:2"]
    first = (await scoped.http.get("/channels?limit=2", headers=auth)).json()
    assert ([c["name"] for c in first["channels"]], first["next"]) == (
        ["audit", "orders:1"],
        "orders:1",
    )
    rest = (await scoped.http.get("/channels?limit=2&after=orders:1", headers=auth)).json()
    assert ([c["name"] for c in rest["channels"]], rest["next"]) == (["orders:2"], None)
    assert (await scoped.http.get("/channels/orders:1", headers=auth)).status_code == 200
    history = await scoped.http.get("/channels/orders:1/history", headers=auth)
    assert history.json()["publications"] == [{"offset": 1, "data": 1}]
    for path in ("/channels/news", "/channels/news/history", "/channels/unknown"):
        assert "'orders' may use" in refused(await scoped.http.get(path, headers=auth))
    # Encoded path parameters are judged once decoded.
    refused(await scoped.http.get("/channels/news%2Fhistory", headers=auth))
    assert (await scoped.http.get("/channels/orders%3A1", headers=auth)).status_code == 200
    # Counts are not per channel: stats and metrics stay readable.
    assert (await scoped.http.get("/stats", headers=auth)).status_code == 200


async def test_a_channel_refusal_comes_before_the_body_is_sent(scoped: Running) -> None:
    port = scoped.daemon.control.port
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"POST /publish/news HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
        b"Content-Length: 5\r\nAuthorization: Bearer " + ORDERS.encode() + b"\r\n\r\n"
    )  # and never the body
    async with asyncio.timeout(30):
        head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 403 ")
    writer.close()


async def test_refusals_are_counted_by_endpoint_and_status(scoped: Running) -> None:
    await scoped.http.get("/stats", headers=bearer(PUBLISHER))
    await scoped.http.get("/stats", headers=bearer(WRONG))
    await scoped.http.post("/batch", json=[{"channel": "news", "data": 1}], headers=bearer(ORDERS))
    text = (await scoped.http.get("/metrics", headers=bearer(READER))).text

    def count(endpoint: str, status: int) -> float:
        for line in text.splitlines():
            if (
                line.startswith("broadcastd_control_requests_total{")
                and f'endpoint="{endpoint}"' in line
                and f'status="{status}"' in line
            ):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    assert (count("stats", 403), count("stats", 401), count("batch", 403)) == (1, 1, 1)


# The Redis broker: the remote route variants check before they publish.


async def test_the_redis_routes_refuse_before_publishing(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    settings = scoped_settings(tmp_path, broker__type="redis", broker__redis__url=redis_server.url)
    async with running_daemon(settings) as d:
        assert isinstance(d.daemon.node.broker, RedisBroker)
        auth = bearer(ORDERS)
        assert (await d.http.post("/publish/orders:1", json=1, headers=auth)).is_success
        refused(await d.http.post("/publish/news", json=1, headers=auth))
        multi = {"channels": ["orders:1", "news"], "data": 2}
        refused(await d.http.post("/publish", json=multi, headers=auth))
        batch = [{"channel": "orders:1", "data": 3}, {"channel": "news", "data": 3}]
        assert "item 1 " in refused(await d.http.post("/batch", json=batch, headers=auth))
        refused(await d.http.post("/batch", json=batch, headers=bearer(READER)))
        refused(await d.http.get("/channels/news/history", headers=auth))
        refused(await d.http.get("/channels/orders:1", headers=bearer(PUBLISHER)))
        history = await d.http.get("/channels/orders:1/history", headers=auth)
        assert [p["data"] for p in history.json()["publications"]] == [1]
        assert await offset(d, "news") == 0
        assert await redis_keys_naming(redis_server, "orders:1")  # where a publish shows
        assert await redis_keys_naming(redis_server, "news") == []


async def redis_keys_naming(server: RedisServer, channel: str) -> list[str]:
    def scan() -> list[str]:
        client = server.client()
        try:
            return [key.decode() for key in client.scan_iter(f"*{channel}*")]
        finally:
            client.close()

    return await asyncio.to_thread(scan)


# Configuration


def daemon_error(**overrides: Any) -> str:
    with pytest.raises(ConfigError) as caught:
        Daemon(make_settings(**overrides))
    return str(caught.value)


def test_a_token_file_that_is_missing_or_empty_stops_the_start(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.token"
    message = daemon_error(control__tokens=[{"name": "gone", "file": str(missing)}])
    assert message.startswith(f"control.tokens[0] ('gone'): cannot read token file {missing}")
    empty = tmp_path / "empty.token"
    empty.write_text(" \n")
    message = daemon_error(control__tokens=[{"name": "blank", "file": str(empty)}])
    assert "is empty" in message


def test_other_mistakes_stop_the_start_without_naming_a_secret(tmp_path: Path) -> None:
    same = [
        {"name": "a", "sha256": sha256(PUBLISHER)},
        {"name": "b", "file": str(token_file(tmp_path, PUBLISHER))},
    ]
    messages = [daemon_error(control__tokens=same)]
    assert messages[-1] == "control.tokens[1] ('b'): the same token as 'a'"
    messages.append(daemon_error(control__token=PUBLISHER, control__tokens=same[1:]))
    assert messages[-1] == "control.tokens[0] ('b'): the same token as 'control.token'"
    messages.append(daemon_error(control__tokens=[{"name": "e", "sha256": sha256("")}]))
    assert "digest of an empty token" in messages[-1]
    for pattern in ("or*ders", "**", ""):
        tokens = [{"name": "p", "sha256": sha256(READER), "namespaces": [pattern]}]
        messages.append(daemon_error(control__tokens=tokens))
        assert "channel pattern" in messages[-1]
    assert not any(secret in message for secret in SECRETS for message in messages)


def test_tokens_alone_let_the_control_port_leave_loopback(tmp_path: Path) -> None:
    tokens = [{"name": "r", "sha256": sha256(READER), "scopes": ["read"]}]
    assert make_settings(control__host="0.0.0.0", control__tokens=tokens).control.tokens


async def test_tokens_alone_protect_every_route(daemon_factory: Any) -> None:
    tokens = [{"name": "r", "sha256": sha256(READER), "scopes": ["read"]}]
    async with daemon_factory(control__tokens=tokens) as d:
        refused(await d.http.get("/stats"), 401)
        assert (await d.http.get("/stats", headers=bearer(READER))).status_code == 200
        refused(await d.http.post("/publish/x", json=1, headers=bearer(READER)))


# Logs


def test_no_token_ever_reaches_the_log(tmp_path: Path) -> None:
    """A real ``broadcastd serve`` at debug level, driven through every kind of
    refusal and success; its JSON lines hold the token names, not the tokens."""
    env = {
        "BROADCASTD_CONTROL__TOKEN": ADMIN,
        "BROADCASTD_CONTROL__TOKENS": json.dumps(tokens_config(tmp_path)),
    }
    proc = DaemonProcess("--log-level", "debug", env=env)
    try:
        proc.wait_ready()
        url = f"http://127.0.0.1:{proc.control_port}"
        with httpx.Client(base_url=url, timeout=30) as http:
            for token in SECRETS:
                auth = bearer(token)
                http.post("/publish/orders:1", json=1, headers=auth)
                http.post("/publish/news", json=1, headers=auth)
                http.post("/batch", json=[{"channel": "news", "data": 1}], headers=auth)
                http.get("/stats", headers=auth)
                http.get("/channels/news/history", headers=auth)
                http.get("/nope", headers=auth)
            http.get("/stats", headers={"Authorization": f"Basic {ADMIN}"})
    finally:
        proc.proc.terminate()
        status = proc.finish()
    assert status == 0, proc.lines
    text = "\n".join(json.dumps(line) for line in proc.lines)
    for secret in SECRETS:
        assert secret not in text
    for digest in (sha256(PUBLISHER), sha256(READER)):
        assert digest not in text  # nor the configured digests (check the setup said nothing)
    refusals = [line for line in proc.lines if line.get("event") == "control.refused"]
    reasons = {(line["reason"], line.get("token_name")) for line in refusals}
    assert ("unauthorized", None) in reasons
    assert ("scope", "publisher") in reasons or ("scope", "reader") in reasons
    assert ("channel", "orders") in reasons
