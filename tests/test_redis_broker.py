"""The Redis broker, with daemons in this process and a real ``redis-server``.

Faults are real: the server is stopped, restarted with and without its data,
frozen with SIGSTOP, and written to behind the daemon's back. Every test
checks what a subscriber receives: everything acknowledged, in offset order,
exactly once, or an explicit event saying what could not be had.
"""

from __future__ import annotations

import asyncio
import gc
import json
import time
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import pytest
from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.connection import AbstractConnection

from broadcastd.broker import Published
from broadcastd.broker.commands import CommandConnection
from broadcastd.broker.pubsub import PubSubConnection
from broadcastd.broker.redis import RedisBroker, Shard, shard_of
from broadcastd.core.envelope import Payload
from broadcastd.core.hub import FanOut
from broadcastd.core.observer import NullObserver
from broadcastd.core.stream import Position, Publication

from .conftest import Running, cyclic_garbage_of, make_settings, recv_json, running_daemon
from .redisserver import RedisServer, free_port
from .test_control_edges import RawHttp, head

PROBE = 0.1


def redis_settings(url: str | list[str], **overrides: Any) -> Any:
    where = {"broker__redis__shards": url} if isinstance(url, list) else {"broker__redis__url": url}
    return make_settings(
        broker__type="redis",
        broker__redis__probe_interval=PROBE,
        broker__redis__probe_timeout=1.0,
        broker__redis__backoff_max=0.2,
        **where,
        **overrides,
    )


async def broker_is(d: Running, up: bool, timeout: float = 20) -> None:
    """Wait for the broker's health to become ``up`` (a connection, a reconnection,
    a probe failing), then check that readiness says the same."""
    broker = d.daemon.node.broker
    assert isinstance(broker, RedisBroker)
    async with asyncio.timeout(timeout):
        while broker.health.up != up:
            await broker.health_changed()
    assert await (ready(d) if up else not_ready(d))


async def ready(d: Running) -> bool:
    return bool((await d.http.get("/readyz")).status_code == 200)


async def not_ready(d: Running) -> bool:
    response = await d.http.get("/readyz")
    return response.status_code == 503 and response.json()["reason"] == "broker"


async def messages(ws: Any, count: int) -> list[dict[str, Any]]:
    """The next ``count`` frames that are messages (events are checked apart)."""
    got = [await recv_json(ws) for _ in range(count)]
    assert all("data" in m for m in got), got
    return got


async def test_publish_reaches_a_subscriber_with_positions(redis_server: RedisServer) -> None:
    async with running_daemon(redis_settings(redis_server.url)) as d:
        await broker_is(d, up=True)
        async with d.connect("/?channel=news") as ws:
            first = await recv_json(ws)
            assert (first["type"], first["offset"]) == ("subscribed", 0)
            assert first["epoch"]
            answers = [await d.publish("news", {"n": i}) for i in range(5)]
            assert [a["offset"] for a in answers] == [1, 2, 3, 4, 5]
            assert {a["epoch"] for a in answers} == {first["epoch"]}
            got = await messages(ws, 5)
            assert [m["data"]["n"] for m in got] == list(range(5))
            assert [m["offset"] for m in got] == [1, 2, 3, 4, 5]


async def test_pipelined_publishes_on_one_connection_keep_their_order(
    redis_server: RedisServer,
) -> None:
    """Requests pipelined on one control connection are under way together (their
    Redis calls share round trips); the answers come in request order, each
    channel's offsets follow that order, and a read pipelined behind publishes
    sees them."""
    async with running_daemon(redis_settings(redis_server.url)) as d:
        await broker_is(d, up=True)
        async with d.connect("/?channel=a&channel=b") as ws:
            await recv_json(ws)
            await recv_json(ws)
            client = await RawHttp.connect(d.daemon.control.port)
            pipeline = b""
            for i in range(300):
                body = json.dumps({"n": i}).encode()
                channel = "a" if i % 3 else "b"
                pipeline += head(
                    "POST",
                    f"/publish/{channel}",
                    f"Content-Length: {len(body)}",
                    "Content-Type: application/json",
                )
                pipeline += body
            pipeline += head("GET", "/channels/a")
            client.send(pipeline)
            offsets: dict[str, list[int]] = {"a": [], "b": []}
            for i in range(300):
                status, _, body = await client.response()
                assert status == 200, body
                answer = json.loads(body)
                assert answer["channel"] == ("a" if i % 3 else "b")
                offsets[answer["channel"]].append(answer["offset"])
            status, _, body = await client.response()
            assert (status, json.loads(body)["offset"]) == (200, 200)
            client.close()
            assert offsets == {"a": list(range(1, 201)), "b": list(range(1, 101))}
            got = await messages(ws, 300)
            for channel in "ab":
                mine = [m for m in got if m["channel"] == channel]
                assert [m["offset"] for m in mine] == offsets[channel]
                assert [m["data"]["n"] % 3 != 0 for m in mine] == [channel == "a"] * len(mine)
                assert [m["data"]["n"] for m in mine] == sorted(m["data"]["n"] for m in mine)


async def test_every_publish_form_and_read_route(redis_server: RedisServer) -> None:
    async with running_daemon(redis_settings(redis_server.url)) as d:
        await broker_is(d, up=True)
        async with d.connect("/?channel=a&channel=b") as ws:
            await messages_or_replies(ws, 2)
            multi = await d.http.post("/publish", json={"channels": ["a", "b"], "data": 1})
            assert multi.status_code == 200, multi.text
            assert [r["offset"] for r in multi.json()["results"]] == [1, 1]
            batch = await d.http.post(
                "/batch",
                json=[
                    {"channel": "a", "data": 2},
                    {"channel": "bad channel", "data": 3},
                    {"channel": "b", "data": "text"},
                ],
            )
            body = batch.json()
            assert (body["published"], body["failed"]) == (2, 1), body
            assert body["results"][1]["error"]["code"] == "bad_channel"
            got = await messages(ws, 4)
            assert sorted((m["channel"], m["offset"]) for m in got) == [
                ("a", 1),
                ("a", 2),
                ("b", 1),
                ("b", 2),
            ]
        state = (await d.http.get("/channels/a")).json()
        assert (state["offset"], state["subscribers"]) == (2, 0)
        history = (await d.http.get("/channels/b/history?since=0")).json()
        assert [p["data"] for p in history["publications"]] == [1, "text"]
        assert history["complete"] is True
        newest = (await d.http.get("/channels/b/history?order=desc&limit=1")).json()
        assert [p["offset"] for p in newest["publications"]] == [2]
        missing = await d.http.get("/channels/never/history")
        assert missing.status_code == 404
        too_big = await d.http.post("/publish/a", content=b'"' + b"x" * 70_000 + b'"')
        assert too_big.status_code == 413


async def messages_or_replies(ws: Any, count: int) -> list[dict[str, Any]]:
    return [await recv_json(ws) for _ in range(count)]


async def test_redis_down_at_start_is_unready_and_refuses_fast() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    async with running_daemon(redis_settings(url, broker__redis__timeout=0.5)) as d:
        assert await not_ready(d)
        started = time.monotonic()
        response = await d.http.post("/publish/news", json=1)
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "broker_unavailable"
        assert response.headers["retry-after"]
        assert time.monotonic() - started < 5  # bounded, not a measurement
        async with d.connect("/") as ws:
            await ws.send(json.dumps({"op": "subscribe", "channel": "news", "id": 1}))
            reply = await recv_json(ws)
            assert (reply["type"], reply["code"], reply["id"]) == ("error", "broker_unavailable", 1)
            await ws.send(json.dumps({"op": "ping"}))
            assert (await recv_json(ws))["type"] == "pong"  # the connection goes on
        metrics = (await d.http.get("/metrics")).text
        assert "broadcastd_broker_up 0.0" in metrics


async def test_a_daemon_started_before_redis_becomes_ready(tmp_path: Any) -> None:
    server = RedisServer(tmp_path / "late")
    port = free_port()
    server._port = port
    async with running_daemon(redis_settings(f"redis://127.0.0.1:{port}/0")) as d:
        assert await not_ready(d)
        await asyncio.to_thread(server.start)
        try:
            await broker_is(d, up=True)
            assert (await d.publish("late", 1))["offset"] == 1
        finally:
            await asyncio.to_thread(server.stop)


async def test_recovery_from_redis_history(redis_server: RedisServer) -> None:
    async with running_daemon(redis_settings(redis_server.url, history__size=20)) as d:
        await broker_is(d, up=True)
        async with d.connect("/?channel=feed") as ws:
            epoch = (await recv_json(ws))["epoch"]
            for i in range(5):
                await d.publish("feed", i)
            seen = await messages(ws, 5)
        assert seen[-1]["offset"] == 5
        for i in range(5, 12):
            await d.publish("feed", i)
        async with d.connect(f"/?channel=feed&since=feed:{epoch}:5") as ws:
            reply = await recv_json(ws)
            assert (reply["recovered"], reply["offset"]) == (True, 12), reply
            replay = await messages(ws, 7)
            assert [m["data"] for m in replay] == list(range(5, 12))
            await d.publish("feed", 12)
            assert (await messages(ws, 1))[0]["offset"] == 13
        for i in range(13, 40):
            await d.publish("feed", i)
        async with d.connect(f"/?channel=feed&since=feed:{epoch}:5") as ws:
            reply = await recv_json(ws)
            assert (reply["recovered"], reply["reason"]) == (False, "too_old"), reply
        async with d.connect("/?channel=feed&since=feed:other:5") as ws:
            assert (await recv_json(ws))["reason"] == "epoch"
        async with d.connect("/") as ws:
            await ws.send(json.dumps({"op": "subscribe", "channel": "feed", "since": {"last": 3}}))
            reply = await recv_json(ws)
            assert reply["type"] == "subscribed"
            assert [m["offset"] for m in await messages(ws, 3)] == [38, 39, 40]


async def test_recovery_races_publishes_without_gap_or_duplicate(
    redis_server: RedisServer,
) -> None:
    """Publishes keep flowing while subscribers recover: each gets every offset
    after its position exactly once, in order."""
    async with running_daemon(redis_settings(redis_server.url, history__size=1000)) as d:
        await broker_is(d, up=True)
        async with d.connect("/?channel=race") as anchor:
            epoch = (await recv_json(anchor))["epoch"]
            publishing = asyncio.create_task(publish_many(d, "race", 400))
            starts = [10 * i for i in range(8)]
            clients = []
            seen = 0
            for start in starts:  # each position exists once the anchor saw it
                while seen < start:
                    seen = (await recv_json(anchor))["offset"]
                url = f"/?channel=race&since=race:{epoch}:{start}"
                clients.append(await d.connect(url).__aenter__())
            await publishing
            for start, ws in zip(starts, clients, strict=True):
                reply = await recv_json(ws)
                assert reply["recovered"] is True, reply
                got = await messages(ws, 400 - start)
                assert [m["offset"] for m in got] == list(range(start + 1, 401))
                await ws.close()


async def test_a_loop_busy_past_the_probe_timeout_keeps_a_healthy_redis_up(
    redis_server: RedisServer,
) -> None:
    """The node's own load (a storm of its clients) may keep it from reading the
    probe's return for longer than ``probe_timeout``: Redis answered, so health
    and readiness stay up. The probe is judged after the sockets were read."""
    settings = make_settings(
        broker__type="redis",
        broker__redis__url=redis_server.url,
        broker__redis__probe_interval=0.05,
        broker__redis__probe_timeout=0.2,
    )
    async with running_daemon(settings) as d:
        await broker_is(d, up=True)
        metrics = d.daemon.metrics
        assert metrics is not None
        failures = metrics.broker_probe_failures
        loop = asyncio.get_running_loop()
        for _ in range(4):
            done = sum(metrics.probe_rtt.counts)
            loop.call_soon(time.sleep, 0.5)  # CPU-bound work past the probe timeout
            async with asyncio.timeout(20):
                while sum(metrics.probe_rtt.counts) < done + 3:  # noqa: ASYNC110 - probe rounds
                    await asyncio.sleep(0.01)
            assert d.daemon.node.broker.health.up
        assert metrics.broker_probe_failures == failures
        assert metrics.broker_reconnects == 0
        assert await ready(d)


def occupy_the_loop(seconds: float) -> None:
    """Keep the event loop from running anything else, as CPU-bound work (a storm
    of connections) does: not a wait for something to happen."""
    time.sleep(seconds)


async def test_a_publish_the_busy_loop_wrote_late_is_answered_not_refused(
    redis_server: RedisServer,
) -> None:
    """A publish issued just before the node's loop got busy (a storm of its own
    clients) is written late and answered at once by a healthy Redis: it is
    answered, not refused with 503, however late the loop got to it."""
    settings = redis_settings(redis_server.url, broker__redis__timeout=0.2)
    async with running_daemon(settings) as d:
        await broker_is(d, up=True)
        broker = d.daemon.node.broker
        payload = Payload.from_value(1)
        for _ in range(3):
            publishing = asyncio.ensure_future(broker.publish("busy", payload, None))
            await asyncio.sleep(0)  # the publish is issued; its write comes next turn
            occupy_the_loop(0.5)  # past broker.redis.timeout, before that write
            published = await publishing
            assert isinstance(published, Published)
        assert d.daemon.node.broker.health.up


async def publish_many(d: Running, channel: str, count: int) -> None:
    for i in range(count):
        await d.publish(channel, i)


async def test_an_idempotency_key_holds_across_nodes(redis_server: RedisServer) -> None:
    settings = redis_settings(redis_server.url)
    async with running_daemon(settings) as a, running_daemon(redis_settings(redis_server.url)) as b:
        await broker_is(a, up=True)
        await broker_is(b, up=True)
        async with b.connect("/?channel=orders") as ws:
            await recv_json(ws)
            first = await a.publish("orders", {"id": 7}, headers={"Idempotency-Key": "k-7"})
            again = await b.publish("orders", {"id": 7}, headers={"Idempotency-Key": "k-7"})
            assert again == {**first, "duplicate": True, "subscribers": 0}  # it went nowhere
            await b.publish("orders", {"id": 8})
            got = await messages(ws, 2)
            assert [m["data"]["id"] for m in got] == [7, 8]


def inject(server: RedisServer, channel: str, data: Any, *, keep: bool = True) -> int:
    """Publish behind the daemons' backs: the offset and the history entry, but no
    pub/sub announcement (a lost message). Returns the offset taken."""
    client = server.client()
    tag = "{broadcastd:" + channel + "}"
    offset = int(client.hincrby(tag + ":m", "o", 1))
    if keep:
        now = int(client.time()[0])
        client.xadd(tag + ":s", {"t": now, "d": json.dumps(data)}, id=f"0-{offset}")
    return offset


async def test_a_lost_pubsub_message_is_repaired_from_history(redis_server: RedisServer) -> None:
    async with running_daemon(redis_settings(redis_server.url)) as d:
        await broker_is(d, up=True)
        async with d.connect("/?channel=gap") as ws:
            await recv_json(ws)
            await d.publish("gap", "one")
            lost = await asyncio.to_thread(inject, redis_server, "gap", "two")
            assert lost == 2
            await d.publish("gap", "three")
            got = await messages(ws, 3)
            assert [(m["offset"], m["data"]) for m in got] == [(1, "one"), (2, "two"), (3, "three")]
        metrics = (await d.http.get("/metrics")).text
        assert 'broadcastd_broker_gap_repairs_total{outcome="repaired"} 1.0' in metrics


async def test_a_gap_history_cannot_fill_is_told(redis_server: RedisServer) -> None:
    async with running_daemon(redis_settings(redis_server.url)) as d:
        await broker_is(d, up=True)
        async with d.connect("/?channel=hole") as ws:
            epoch = (await recv_json(ws))["epoch"]
            await d.publish("hole", "one")
            await asyncio.to_thread(inject, redis_server, "hole", "gone", keep=False)
            await asyncio.to_thread(redis_server.client().delete, "{broadcastd:hole}:s")
            await d.publish("hole", "three")
            assert (await messages(ws, 1))[0]["offset"] == 1
            event = await recv_json(ws)
            assert event == {
                "type": "resync",
                "channel": "hole",
                "epoch": epoch,
                "offset": 3,
                "reason": "gap",
            }
            await d.publish("hole", "four")
            assert [m["offset"] for m in await messages(ws, 1)] == [4]
        metrics = (await d.http.get("/metrics")).text
        assert 'broadcastd_broker_gap_repairs_total{outcome="resync"} 1.0' in metrics


async def test_a_redis_restart_loses_nothing_acknowledged(redis_server: RedisServer) -> None:
    """Publishes during the outage get 503; every 2xx reaches the subscriber, in
    order and without a gap in offsets, once Redis is back (with its data:
    appendfsync always)."""
    async with running_daemon(redis_settings(redis_server.url, broker__redis__timeout=0.3)) as d:
        await broker_is(d, up=True)
        async with d.connect("/?channel=steady") as ws:
            await recv_json(ws)
            acknowledged: list[int] = []
            refused = 0
            restarted = asyncio.create_task(asyncio.sleep(0))
            for i in range(300):
                if i == 100:
                    restarted = asyncio.create_task(asyncio.to_thread(redis_server.restart))
                response = await d.http.post("/publish/steady", json=i)
                if response.status_code == 200:
                    acknowledged.append(i)
                else:
                    assert response.status_code == 503, response.text
                    assert response.json()["error"]["code"] == "broker_unavailable"
                    refused += 1
                if i > 100 and restarted.done() and refused and len(acknowledged) > 150:
                    break
            await restarted
            await broker_is(d, up=True)
            await d.publish("steady", "last")
            got: list[Any] = []
            offsets: list[int] = []
            while not got or got[-1] != "last":
                frame = await recv_json(ws)
                assert "data" in frame, frame
                got.append(frame["data"])
                offsets.append(frame["offset"])
            assert offsets == list(range(1, len(offsets) + 1))
            # A 503 means "not known to be published": one whose answer was lost
            # may still arrive. Every 2xx must, in order.
            delivered = iter(got)
            assert all(i in delivered for i in acknowledged)


async def test_redis_restarted_without_its_data_is_told(tmp_path: Any) -> None:
    server = RedisServer(tmp_path / "volatile", persistence=False)
    server.start()
    try:
        async with running_daemon(redis_settings(server.url)) as d:
            await broker_is(d, up=True)
            async with d.connect("/?channel=prices") as ws:
                epoch = (await recv_json(ws))["epoch"]
                await d.publish("prices", 1)
                await messages(ws, 1)
                await asyncio.to_thread(server.restart)
                event = await recv_json(ws)
                assert (event["type"], event["reason"], event["offset"]) == (
                    "resync",
                    "epoch",
                    0,
                ), event
                assert event["epoch"] != epoch
                await broker_is(d, up=True)
                answer = await d.publish("prices", 2)
                assert (answer["epoch"], answer["offset"]) == (event["epoch"], 1)
                assert (await messages(ws, 1))[0]["offset"] == 1
    finally:
        server.stop()


async def test_a_frozen_redis_makes_the_node_unready_and_fail_fast(
    redis_server: RedisServer,
) -> None:
    settings = redis_settings(redis_server.url, broker__redis__timeout=0.3)
    async with running_daemon(settings) as d:
        await broker_is(d, up=True)
        async with d.connect("/?channel=ice") as ws:
            await recv_json(ws)
            await asyncio.to_thread(redis_server.freeze)
            try:
                await broker_is(d, up=False)
                response = await d.http.post("/publish/ice", json="lost?")
                assert response.status_code == 503
            finally:
                await asyncio.to_thread(redis_server.thaw)
            await broker_is(d, up=True)
            await d.publish("ice", "after")
            frame = await recv_json(ws)
            while "data" not in frame:  # a resync is allowed only if something was lost
                assert frame["type"] == "resync", frame
                frame = await recv_json(ws)
            assert frame["data"] == "after"
        metrics = (await d.http.get("/metrics")).text
        assert "broadcastd_broker_probe_failures_total 0.0" not in metrics


async def test_channels_spread_over_two_shards(redis_factory: Callable[..., RedisServer]) -> None:
    shards = [redis_factory(), redis_factory()]
    urls = [s.url for s in shards]
    names = [f"ch{i}" for i in range(8)]
    assert {shard_of(n, 2) for n in names} == {0, 1}
    async with running_daemon(redis_settings(urls)) as a, running_daemon(redis_settings(urls)) as b:
        await broker_is(a, up=True)
        await broker_is(b, up=True)
        query = "&".join(f"channel={n}" for n in names)
        async with b.connect("/?" + query) as ws:
            epochs = {r["channel"]: r["epoch"] for r in await messages_or_replies(ws, 8)}
            for n in names:
                await a.publish(n, n)
            got = await messages(ws, 8)
            assert sorted(m["channel"] for m in got) == names
        for n in names:
            await a.publish(n, "missed")
        for n in names:
            meta = "{broadcastd:" + n + "}:m"
            owner = shards[shard_of(n, 2)].client()
            other = shards[1 - shard_of(n, 2)].client()
            assert await asyncio.to_thread(owner.exists, meta)
            assert not await asyncio.to_thread(other.exists, meta)
        since = "&".join(f"since={n}:{epochs[n]}:1" for n in names)
        async with a.connect(f"/?{query}&{since}") as ws:
            replies = await messages_or_replies(ws, 16)
            assert all(r["recovered"] for r in replies if r.get("type") == "subscribed")
            assert sorted(r["channel"] for r in replies if "data" in r) == names


async def test_subscriptions_follow_local_subscribers(redis_server: RedisServer) -> None:
    """Redis hears of a channel on the first local subscriber and the last leaving."""
    async with running_daemon(redis_settings(redis_server.url)) as d:
        await broker_is(d, up=True)
        client = redis_server.client()

        def topics() -> list[bytes]:
            return sorted(t for t in client.pubsub_channels() if b":p:" in t)

        async with d.connect("/?channel=x") as one, d.connect("/?channel=x") as two:
            await recv_json(one)
            await recv_json(two)
            assert await asyncio.to_thread(topics) == [b"broadcastd:p:x"]
            await one.close()
            await d.publish("x", 1)
            assert (await messages(two, 1))[0]["data"] == 1
            assert await asyncio.to_thread(topics) == [b"broadcastd:p:x"]
        async with asyncio.timeout(20):  # Redis's side: nothing to wait on but itself
            while await asyncio.to_thread(topics):  # noqa: ASYNC110
                await asyncio.sleep(0.02)


def kill_pubsub(server: RedisServer) -> int:
    """Cut every pub/sub connection from Redis's side (a proxy or a network blip)."""
    return int(server.client().execute_command("CLIENT", "KILL", "TYPE", "pubsub"))


async def test_publishes_while_the_pubsub_connection_is_cut_arrive_in_order(
    redis_server: RedisServer,
) -> None:
    async with running_daemon(redis_settings(redis_server.url)) as d:
        await broker_is(d, up=True)
        async with d.connect("/?channel=cut") as ws:
            await recv_json(ws)
            sent = 0
            for _ in range(5):
                assert await asyncio.to_thread(kill_pubsub, redis_server) == 1
                for _ in range(20):  # some of these go out while the node is unsubscribed
                    response = await d.http.post("/publish/cut", json=sent)
                    if response.status_code == 200:
                        sent += 1
                await broker_is(d, up=True)
            got = await messages(ws, sent)
            assert [m["data"] for m in got] == list(range(sent))
            assert [m["offset"] for m in got] == list(range(1, sent + 1))
        metrics = (await d.http.get("/metrics")).text
        assert "broadcastd_broker_reconnects_total 5.0" in metrics


async def test_redis_that_went_back_in_time_starts_a_new_epoch(redis_server: RedisServer) -> None:
    """Redis lost acknowledged writes (a crash between fsyncs): the offsets it would
    give out again are never reused in the same epoch; subscribers are told."""
    async with running_daemon(redis_settings(redis_server.url)) as d:
        await broker_is(d, up=True)
        async with d.connect("/?channel=clock") as ws:
            epoch = (await recv_json(ws))["epoch"]
            for i in range(3):
                await d.publish("clock", i)
            await messages(ws, 3)
            client = redis_server.client()
            await asyncio.to_thread(client.hset, "{broadcastd:clock}:m", "o", 1)
            await asyncio.to_thread(kill_pubsub, redis_server)
            event = await recv_json(ws)
            assert (event["type"], event["reason"], event["offset"]) == ("resync", "epoch", 0)
            assert event["epoch"] != epoch
            answer = await d.publish("clock", "new")
            assert (answer["epoch"], answer["offset"]) == (event["epoch"], 1)
            assert (await messages(ws, 1))[0]["data"] == "new"


async def test_garbage_on_a_pubsub_channel_harms_nobody(redis_server: RedisServer) -> None:
    """Something else publishing to our pub/sub channel: logged, skipped, and the
    subscribers' stream goes on."""
    async with running_daemon(redis_settings(redis_server.url)) as d:
        await broker_is(d, up=True)
        async with d.connect("/?channel=junk") as ws:
            await recv_json(ws)
            await d.publish("junk", 1)
            client = redis_server.client()
            for garbage in (b"", b"nonsense", b"e x y", b"e 2 {not json", b"\xff\xfe 2 1"):
                await asyncio.to_thread(client.publish, "broadcastd:p:junk", garbage)
            await d.publish("junk", 2)
            got = await messages(ws, 2)
            assert [(m["offset"], m["data"]) for m in got] == [(1, 1), (2, 2)]
            await ws.send(json.dumps({"op": "ping"}))
            assert (await recv_json(ws))["type"] == "pong"


async def test_namespace_history_options_reach_redis(redis_server: RedisServer) -> None:
    namespaces = [{"name": "short", "history_size": 2}, {"name": "nohist", "history_size": 0}]
    async with running_daemon(redis_settings(redis_server.url, namespaces=namespaces)) as d:
        await broker_is(d, up=True)
        for channel in ("short:a", "nohist:a", "plain"):
            for i in range(4):
                await d.publish(channel, i)
        client = redis_server.client()
        lengths = [
            await asyncio.to_thread(client.xlen, "{broadcastd:" + c + "}:s")
            for c in ("short:a", "nohist:a", "plain")
        ]
        assert lengths == [2, 0, 4]
        epoch = (await d.http.get("/channels/short:a")).json()["epoch"]
        async with d.connect(f"/?since=short:a:{epoch}:1") as ws:
            reply = await recv_json(ws)
            assert (reply["recovered"], reply["reason"]) == (False, "too_old")
        async with d.connect(f"/?since=short:a:{epoch}:2") as ws:
            assert (await recv_json(ws))["recovered"] is True
            assert [m["data"] for m in await messages(ws, 2)] == [2, 3]


async def test_a_redis_daemon_starts_without_warnings(redis_server: RedisServer) -> None:
    """Nothing in the construction of the Redis clients is deprecated or converted
    behind our back (a warning on every node's start)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        async with running_daemon(redis_settings(redis_server.url)) as d:
            await broker_is(d, up=True)
            assert (await d.publish("calm", 1))["offset"] == 1
    assert [f"{w.category.__name__}: {w.message}" for w in caught] == []


OURS = (RedisBroker, Shard, PubSubConnection, CommandConnection)
REDIS_PY = (Redis, ConnectionPool, AbstractConnection)


def cyclic_garbage() -> list[str]:
    """The broker's and redis-py's objects that only the cyclic collector would free."""
    return cyclic_garbage_of(OURS + REDIS_PY)


def alive(refs: list[weakref.ref[Any]]) -> list[str]:
    return [type(o).__qualname__ for ref in refs if (o := ref()) is not None]


async def reconnected(broker: RedisBroker, before: PubSubConnection | None) -> PubSubConnection:
    """Wait until the shard's pub/sub connection is a new one and the broker is up."""
    shard = broker.shards[0]
    async with asyncio.timeout(20):
        while shard.pubsub is None or shard.pubsub is before or not broker.health.up:
            await broker.health_changed()
    return shard.pubsub


async def test_closed_redis_connections_need_no_cyclic_collector(
    redis_server: RedisServer,
) -> None:
    """The daemon runs with the cyclic collector tuned down, so a connection freed
    only by it holds its memory (buffers, sockets' state) for an unknown time.
    With the collector off: connections lost to a Redis restart and to a kill are
    freed at once, and a closed broker takes all of its objects with it."""
    gc.collect()
    gc.disable()
    try:
        refs = await run_broker_through_reconnects(redis_server)
        assert cyclic_garbage() == []
        assert alive(refs) == []
    finally:
        gc.enable()


class Collector:
    """An engine's handler that keeps what it is told."""

    def __init__(self) -> None:
        self.got: asyncio.Queue[Publication] = asyncio.Queue()
        self.subscriptions: asyncio.Queue[tuple[str, Position]] = asyncio.Queue()

    def subscribed(self, channel: str, position: Position) -> None:
        self.subscriptions.put_nowait((channel, position))

    def unavailable(self, channel: str, error: Exception) -> None:
        raise AssertionError(f"{channel}: {error}")

    def deliver(self, channel: str, publication: Publication) -> FanOut:
        self.got.put_nowait(publication)
        return FanOut()

    def resync(self, channel: str, position: Position, reason: str) -> None:
        raise AssertionError(f"{channel}: resync ({reason})")

    id = "collector"
    """The node's id (presence entries and server API answers name it)."""

    def presence_event(self, channel: str, kind: str, client: str, user: str | None) -> None:
        raise AssertionError(f"{channel}: {kind} of {client}")

    def execute(self, command: dict[str, Any]) -> dict[str, Any]:
        return {"node": self.id}


async def run_broker_through_reconnects(server: RedisServer) -> list[weakref.ref[Any]]:
    """A broker through a Redis restart and a killed pub/sub connection, then
    closed; returns weak references to every object of ours it made."""
    broker = RedisBroker(redis_settings(server.url), NullObserver())
    handler = Collector()
    got = handler.got
    await broker.start(handler)
    refs: list[weakref.ref[Any]] = [weakref.ref(broker), *map(weakref.ref, broker.shards)]
    payload = Payload.from_json_text(b"1")
    first = await reconnected(broker, None)
    broker.subscribe("loop")
    await handler.subscriptions.get()
    await broker.publish("loop", payload, None)
    assert (await got.get()).offset == 1
    refs.append(weakref.ref(first))

    await asyncio.to_thread(server.restart)
    second = await reconnected(broker, first)
    refs.append(weakref.ref(second))
    await asyncio.gather(
        broker.publish("loop", payload, None), broker.publish("other", payload, None)
    )
    assert (await got.get()).offset == 2
    del first
    assert alive(refs[-2:-1]) == []  # the connection Redis's restart ended
    assert cyclic_garbage() == []

    await asyncio.to_thread(kill_pubsub, server)
    third = await reconnected(broker, second)
    refs.append(weakref.ref(third))
    await broker.publish("loop", payload, None)
    assert (await got.get()).offset == 3
    del second
    assert alive(refs[-2:-1]) == []  # the connection the kill ended
    assert cyclic_garbage() == []

    await broker.close()
    del third
    return refs


async def test_a_pubsub_connection_refused_by_auth_is_closed_and_freed(
    redis_server: RedisServer,
) -> None:
    """A wrong password is retried with backoff for as long as it stays wrong:
    each refused connection must be closed (not left open on Redis and in this
    process) and freed without the cyclic collector."""
    url = f"redis://nobody:wrong@127.0.0.1:{redis_server.port}/0"
    gc.collect()
    gc.disable()
    try:
        with pytest.raises(ConnectionError, match="refused AUTH"):
            await PubSubConnection.open(url, 10, lambda messages: None)
        for _ in range(100):  # the transport lets go of it in a callback of the loop
            if not any(isinstance(o, PubSubConnection) for o in gc.get_objects()):
                break
            await asyncio.sleep(0)
        assert [o for o in gc.get_objects() if isinstance(o, PubSubConnection)] == []
        assert cyclic_garbage() == []
    finally:
        gc.enable()
