"""Presence changes on Redis leave in one script call per shard and loop turn.

A subscribe storm adds one presence entry per subscribe; each used to be a script
run of its own, which doubled what redis-server spent on the storm. The changes
of one turn (a join batch's adds, a drain's removes) now go as one call per
shard, each channel's changes in the order they were made. These tests count
the calls in redis-server's own statistics and check that the order, the joins,
the leaves and the counts are those of one change at a time.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from broadcastd.broker.redis import PRESENCE_BATCH, RedisBroker
from broadcastd.core.observer import NullObserver
from broadcastd.node import Node

from .conftest import make_settings
from .redisserver import RedisServer


@pytest.fixture
async def node(redis_server: RedisServer) -> AsyncIterator[Node]:
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
    async with asyncio.timeout(10):
        while not started.broker.health.up:
            await started.broker.health_changed()  # type: ignore[attr-defined]
    yield started
    await started.close()


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
        assert await redis.hlen(f"{{broadcastd:p:c{i}}}:ph") == 1
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
    assert await redis.hgetall(f"{{broadcastd:p:many{PRESENCE_BATCH}}}:pu") == {b'"alice"': b"1"}


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
        assert await redis.exists("{broadcastd:jl:room}:ph", "{broadcastd:jl:room}:pu") == 0
        assert broker.presence_count("jl:room") == 0
    finally:
        await pubsub.aclose()


async def test_changes_queued_at_close_still_reach_redis(node: Node, redis: aioredis.Redis) -> None:
    broker = node.broker
    broker.add_presence("p:drain", "c", None, b"{}")
    await broker.presence_stats("p:drain")  # type: ignore[misc]
    broker.remove_presence("p:drain", "c")
    await broker.close()
    assert await redis.hlen("{broadcastd:p:drain}:ph") == 0
