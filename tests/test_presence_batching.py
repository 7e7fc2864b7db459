"""Presence changes on Redis leave in one script call per shard and loop turn,
and a node's liveness is one call per shard and heartbeat.

A subscribe storm adds one presence entry per subscribe; each used to be a script
run of its own, which doubled what redis-server spent on the storm. The changes
of one turn (a join batch's adds, a drain's removes) now go as one call per
shard, each channel's changes in the order they were made. These tests count
the calls in redis-server's own statistics and check that the order, the joins,
the leaves and the counts are those of one change at a time. Then: a
heartbeat costs one call whatever the entries; a node that Redis forgot (its
data lost, or swept after a pause longer than the TTL) adds its entries again;
what was removed while Redis was out of reach is removed there once it is back.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, cast

import pytest
import redis.asyncio as aioredis

from broadcastd.broker.redis import PRESENCE_BATCH, RedisBroker
from broadcastd.core.observer import NullObserver
from broadcastd.node import Node

from .conftest import make_settings
from .redisserver import RedisServer


@pytest.fixture
async def node(redis_server: RedisServer) -> AsyncIterator[Node]:
    started = await started_node(redis_server)
    yield started
    await started.close()


async def started_node(redis_server: RedisServer) -> Node:
    overrides: dict[str, Any] = {
        "broker__type": "redis",
        "broker__redis__url": redis_server.url,
        "namespaces": [
            {"name": "p", "presence": True},
            {"name": "jl", "presence": True, "join_leave": True},
        ],
    }
    node_settings = make_settings(**overrides)
    started = Node(node_settings, broker=RedisBroker(node_settings, NullObserver()))
    await started.start()
    await until_up(started)
    return started


async def until_up(node: Node) -> None:
    async with asyncio.timeout(10):
        while not node.broker.health.up:
            await node.broker.health_changed()  # type: ignore[attr-defined]


@pytest.fixture
async def redis(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(redis_server.url)
    yield client
    await client.aclose()


async def script_runs(redis: aioredis.Redis) -> int:
    stats = await redis.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


async def test_a_turns_adds_on_many_channels_are_one_script_call(
    node: Node, redis: aioredis.Redis
) -> None:
    broker = node.broker
    before = await script_runs(redis)
    for i in range(50):
        broker.add_presence(f"p:c{i}", f"client-{i}", None, b"{}")
    stats = await broker.presence_stats("p:c7")  # type: ignore[misc]
    # One call for the 50 adds, one for the stats (and none per add).
    assert await script_runs(redis) - before == 2
    assert (stats.clients, stats.users) == (1, 0)
    for i in range(50):
        assert await redis.hlen(f"{{broadcastd:p:c{i}}}:p:entries") == 1
        assert broker.presence_count(f"p:c{i}") == 1


async def test_more_channels_than_a_batch_take_a_few_calls(
    node: Node, redis: aioredis.Redis
) -> None:
    broker = node.broker
    channels = 2 * PRESENCE_BATCH + 1
    before = await script_runs(redis)
    for i in range(channels):
        broker.add_presence(f"p:many{i}", "client", "alice", b"{}")
    page = await broker.presence(f"p:many{channels - 1}", None, 10)  # type: ignore[misc]
    assert await script_runs(redis) - before == 3 + 1
    assert page.clients == [b"{}"]
    for i in range(channels):
        assert broker.presence_count(f"p:many{i}") == 1
    assert await redis.hgetall(f"{{broadcastd:p:many{PRESENCE_BATCH}}}:p:users") == {
        b'"alice"': b"1"
    }


async def test_changes_of_one_turn_keep_their_order_and_are_told_once(
    node: Node, redis: aioredis.Redis
) -> None:
    broker = node.broker
    pubsub = redis.pubsub()
    await pubsub.subscribe("broadcastd:p:jl:room")
    try:
        # Joined and gone within one turn, then back; another joins and stays.
        broker.add_presence("jl:room", "a", "alice", b"{}")
        broker.add_presence("jl:room", "b", "bob", b"{}")
        broker.remove_presence("jl:room", "a")
        broker.add_presence("jl:room", "a", "alice", b"{}")
        broker.add_presence("jl:room", "b", "bob", b"{}")  # again: no second join
        stats = await broker.presence_stats("jl:room")  # type: ignore[misc]
        assert (stats.clients, stats.users) == (2, 2)
        assert broker.presence_count("jl:room") == 2
        told: list[bytes] = []
        async with asyncio.timeout(5):
            while len(told) < 4:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5)
                if message is not None:
                    told.append(message["data"])
        assert told == [
            b'! join a "alice"',
            b'! join b "bob"',
            b'! leave a "alice"',
            b'! join a "alice"',
        ]
        broker.remove_presence("jl:room", "a")
        broker.remove_presence("jl:room", "b")
        async with asyncio.timeout(5):
            while len(told) < 6:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5)
                if message is not None:
                    told.append(message["data"])
        assert told[4:] == [b'! leave a "alice"', b'! leave b "bob"']
        assert (
            await redis.exists("{broadcastd:jl:room}:p:entries", "{broadcastd:jl:room}:p:users")
            == 0
        )
        assert broker.presence_count("jl:room") == 0
    finally:
        await pubsub.aclose()


async def test_changes_queued_at_close_still_reach_redis(node: Node, redis: aioredis.Redis) -> None:
    broker = node.broker
    broker.add_presence("p:drain", "c", None, b"{}")
    await broker.presence_stats("p:drain")  # type: ignore[misc]
    broker.remove_presence("p:drain", "c")
    await broker.close()
    assert await redis.hlen("{broadcastd:p:drain}:p:entries") == 0


async def told(pubsub: Any, count: int) -> list[bytes]:
    got: list[bytes] = []
    async with asyncio.timeout(5):
        while len(got) < count:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5)
            if message is not None:
                got.append(message["data"])
    return got


async def test_a_heartbeat_is_one_call_whatever_the_entries(
    node: Node, redis: aioredis.Redis
) -> None:
    broker = cast(RedisBroker, node.broker)
    for i in range(300):
        broker.add_presence(f"p:h{i % 150}", f"client-{i}", None, b"{}")
    await broker.presence_stats("p:h0")
    before = await script_runs(redis)
    broker._heartbeat()
    await broker.presence_stats("p:h0")  # answered after the heartbeat's call
    assert await script_runs(redis) - before == 2  # the heartbeat and the stats


async def test_a_node_redis_forgot_adds_its_entries_again(
    node: Node, redis: aioredis.Redis
) -> None:
    broker = cast(RedisBroker, node.broker)
    broker.add_presence("p:lost", "c1", "carol", b"{}")
    broker.add_presence("p:lost", "c2", None, b"{}")
    assert (await broker.presence_stats("p:lost")).clients == 2
    await redis.flushall()
    assert (await broker.presence_stats("p:lost")).clients == 0
    broker._heartbeat()
    await broker.presence_stats("p:lost")  # the heartbeat's answer came first
    async with asyncio.timeout(5):
        while (stats := await broker.presence_stats("p:lost")).clients < 2:
            pass
    assert (stats.clients, stats.users) == (2, 1)


@asynccontextmanager
async def two_nodes(
    redis_server: RedisServer, redis: aioredis.Redis, topic: str
) -> AsyncIterator[tuple[RedisBroker, RedisBroker, Any]]:
    """Two nodes on one redis-server, and a pub/sub client on ``topic`` (where the
    joins and leaves of its channel are told)."""
    first, second = await started_node(redis_server), await started_node(redis_server)
    pubsub = redis.pubsub()
    await pubsub.subscribe(topic)
    try:
        yield cast(RedisBroker, first.broker), cast(RedisBroker, second.broker), pubsub
    finally:
        await pubsub.aclose()
        await second.close()
        await first.close()


async def test_a_node_that_lapsed_is_swept_with_one_leave_each_then_comes_back(
    redis_server: RedisServer, redis: aioredis.Redis
) -> None:
    async with two_nodes(redis_server, redis, "broadcastd:p:jl:lapse") as (a, w, pubsub):
        a.add_presence("jl:lapse", "x1", None, b"{}")
        a.add_presence("jl:lapse", "x2", None, b"{}")
        w.add_presence("jl:lapse", "w1", None, b"{}")
        await w.presence_stats("jl:lapse")
        joins = [b"! join w1 null", b"! join x1 null", b"! join x2 null"]
        assert sorted(await told(pubsub, 3)) == joins
        await redis.zadd("{broadcastd}:pnodes", {a.node_id: 0})  # its liveness ran out
        w._heartbeat()
        assert sorted(await told(pubsub, 2)) == [b"! leave x1 null", b"! leave x2 null"]
        assert (await w.presence_stats("jl:lapse")).clients == 1
        w._heartbeat()  # nothing is swept twice
        a._heartbeat()  # the paused node is back: Redis did not know it
        assert sorted(await told(pubsub, 2)) == [b"! join x1 null", b"! join x2 null"]
        assert (await w.presence_stats("jl:lapse")).clients == 3
        assert await redis.scard("{broadcastd}:pdead") == 0


async def test_what_was_removed_while_redis_was_out_of_reach_is_removed_once_back(
    node: Node, redis: aioredis.Redis
) -> None:
    broker = cast(RedisBroker, node.broker)
    broker.add_presence("p:gap", "gone", None, b"{}")
    broker.add_presence("p:gap", "stays", None, b"{}")
    assert (await broker.presence_stats("p:gap")).clients == 2
    (shard,) = broker.shards
    assert shard.commands is not None
    shard.commands.close()  # the connection ends: the broker makes a new one
    broker.remove_presence("p:gap", "gone")
    broker.add_presence("p:gap", "new", None, b"{}")
    async with asyncio.timeout(10):
        while broker.health.up:
            await broker.health_changed()
    await until_up(node)
    await broker._reconcile(shard)  # as the reconnect does
    assert (await broker.presence_stats("p:gap")).clients == 2  # sent before it
    assert set(await redis.hkeys("{broadcastd:p:gap}:p:entries")) == {b"stays", b"new"}


async def until_down(node: Node) -> None:
    async with asyncio.timeout(10):
        while node.broker.health.up:
            await node.broker.health_changed()  # type: ignore[attr-defined]


async def test_a_remove_queued_as_the_connection_ends_reaches_redis_once_it_is_back(
    node: Node, redis: aioredis.Redis
) -> None:
    broker = cast(RedisBroker, node.broker)
    pubsub = redis.pubsub()
    await pubsub.subscribe("broadcastd:p:jl:cut")
    try:
        broker.add_presence("jl:cut", "gone", None, b"{}")
        broker.add_presence("jl:cut", "stays", None, b"{}")
        await broker.presence_stats("jl:cut")
        assert sorted(await told(pubsub, 2)) == [b"! join gone null", b"! join stays null"]
        (shard,) = broker.shards
        assert shard.commands is not None
        broker.remove_presence("jl:cut", "gone")  # queued until the turn ends...
        shard.commands.close()  # ...in which the connection ends
        await until_down(node)
        await until_up(node)
        await broker._reconcile(shard)  # as the reconnect does
        assert (await broker.presence_stats("jl:cut")).clients == 1
        assert await redis.hkeys("{broadcastd:jl:cut}:p:entries") == [b"stays"]
        assert await told(pubsub, 1) == [b"! leave gone null"]
    finally:
        await pubsub.aclose()


async def test_a_remove_redis_lost_in_a_rollback_is_made_again(
    node: Node, redis_server: RedisServer
) -> None:
    broker = cast(RedisBroker, node.broker)
    broker.add_presence("p:back", "left", None, b"{}")
    broker.add_presence("p:back", "stays", None, b"{}")
    assert (await broker.presence_stats("p:back")).clients == 2
    snapshot = redis_server.snapshot()
    broker.remove_presence("p:back", "left")
    assert (await broker.presence_stats("p:back")).clients == 1
    redis_server.restore(snapshot)  # back from a moment before the remove
    await until_down(node)
    await until_up(node)
    (shard,) = broker.shards
    await broker._reconcile(shard)
    assert (await broker.presence_stats("p:back")).clients == 1
    client = aioredis.from_url(redis_server.url)
    try:
        assert await client.hkeys("{broadcastd:p:back}:p:entries") == [b"stays"]
        assert await client.smembers(f"{{broadcastd}}:pn:{broker.node_id}") == {
            b"-1\np:back\nstays"
        }
    finally:
        await client.aclose()


async def test_a_heartbeat_sweeps_on_past_a_hundred_expired_nodes(
    redis_server: RedisServer, redis: aioredis.Redis
) -> None:
    async with two_nodes(redis_server, redis, "broadcastd:p:jl:many-dead") as (a, w, pubsub):
        a.add_presence("jl:many-dead", "x", None, b"{}")
        await a.presence_stats("jl:many-dead")
        assert await told(pubsub, 1) == [b"! join x null"]
        # A hundred nodes without entries expired before this one did.
        await redis.zadd("{broadcastd}:pnodes", {f"empty{i:03}": 0 for i in range(100)})
        await redis.zadd("{broadcastd}:pnodes", {a.node_id: 1})
        w._heartbeat()  # and, at once, as many more calls as the sweep needs
        assert await told(pubsub, 1) == [b"! leave x null"]
        assert await redis.zcard("{broadcastd}:pnodes") == 1  # the witness alone
