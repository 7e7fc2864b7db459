"""Presence on Redis against a reference model, under random joins, leaves,
crashes and heartbeats.

Three nodes (each a Node on its own RedisBroker, sharing a real redis-server)
add and remove entries as hypothesis draws; a crash closes a node's engine
without removing its entries, which must then expire (each with one leave)
within ``presence.ttl`` while the survivors' heartbeats go on. The model is
``PresenceTable``, the memory engine's store: after every step, what Redis
answers lies between the model's live entries and those plus the crashed ones
not yet expired; at the end it is exactly the live ones, every entry that left
(removed or expired) was told once, and every new entry joined once.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter
from typing import Any

import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broadcastd.broker.redis import RedisBroker
from broadcastd.core.observer import NullObserver
from broadcastd.core.presence import PresenceTable
from broadcastd.node import Node

from .conftest import make_settings
from .redisserver import RedisServer

TTL = 0.3
NODES = 3
CHANNEL_IDS = itertools.count()

Op = tuple[str, int, int]
ops = st.lists(
    st.tuples(
        st.sampled_from(["add", "add", "remove", "heartbeat", "crash"]),
        st.integers(0, NODES - 1),
        st.integers(0, 7),
    ),
    max_size=25,
)


async def started(url: str) -> Node:
    overrides: dict[str, Any] = {
        "broker__type": "redis",
        "broker__redis__url": url,
        "presence__ttl": TTL,
        "namespaces": [{"name": "m", "presence": True, "join_leave": True}],
    }
    node_settings = make_settings(**overrides)
    node = Node(node_settings, broker=RedisBroker(node_settings, NullObserver()))
    await node.start()
    async with asyncio.timeout(10):
        while not node.broker.health.up:
            await node.broker.health_changed()  # type: ignore[attr-defined]
    return node


async def entries(node: Node, channel: str) -> set[str]:
    page = await node.broker.presence(channel, None, 1000)  # type: ignore[misc]
    return {entry.decode() for entry in page.clients}


async def run(url: str, steps: list[Op]) -> None:
    channel = f"m:{next(CHANNEL_IDS)}"
    nodes = [await started(url) for _ in range(NODES)]
    alive = [True] * NODES
    model = PresenceTable()
    owner: dict[str, int] = {}
    doomed: set[str] = set()
    joins: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    expected_joins: Counter[str] = Counter()
    expected_leaves: Counter[str] = Counter()
    heard = asyncio.Event()
    listener = aioredis.from_url(url)
    pubsub = listener.pubsub()
    await pubsub.subscribe(f"broadcastd:p:{channel}")

    async def listen() -> None:
        async for message in pubsub.listen():
            if message["type"] != "message":
                continue
            kind, client, _ = message["data"][2:].decode().split(" ", 2)
            (joins if kind == "join" else leaves)[client] += 1
            heard.set()

    listening = asyncio.create_task(listen())
    try:
        for kind, index, number in steps:
            if not alive[index]:
                continue
            node = nodes[index]
            client = f"n{index}-{number}"
            if kind == "add":
                new, _ = model.add(channel, client, None, client.encode())
                if new:
                    expected_joins[client] += 1
                    owner[client] = index
                node.broker.add_presence(channel, client, None, client.encode())
            elif kind == "remove":
                found, _, _ = model.remove(channel, client)
                if found:
                    expected_leaves[client] += 1
                node.broker.remove_presence(channel, client)
            elif kind == "heartbeat":
                node.broker._heartbeat()  # type: ignore[attr-defined]
            else:  # a crash: the engine goes, its entries stay in Redis
                alive[index] = False
                await node.close()
                for gone in [c for c, i in owner.items() if i == index]:
                    found, _, _ = model.remove(channel, gone)
                    if found:
                        doomed.add(gone)
                        expected_leaves[gone] += 1
                    del owner[gone]
            # Read through the node that acted (its connection keeps its calls in
            # order; those of earlier steps were read back the same way).
            survivor = (
                node
                if alive[index]
                else next((n for n, up in zip(nodes, alive, strict=True) if up), None)
            )
            if survivor is None:
                break
            live = {e.decode() for e in model.page(channel, None, 1000).clients}
            seen = await entries(survivor, channel)
            assert live <= seen <= live | doomed, (live, seen, doomed)
        survivor = next((n for n, up in zip(nodes, alive, strict=True) if up), None)
        if survivor is not None:
            live = {e.decode() for e in model.page(channel, None, 1000).clients}
            async with asyncio.timeout(TTL * 10):  # the heartbeats sweep what expired
                while leaves != expected_leaves:
                    heard.clear()
                    await heard.wait()
            assert await entries(survivor, channel) == live
            stats = await survivor.broker.presence_stats(channel)  # type: ignore[misc]
            assert stats.clients == len(live)
        async with asyncio.timeout(5):
            while joins != expected_joins:
                heard.clear()
                await heard.wait()
        assert all(count == 1 for count in leaves.values())
    finally:
        listening.cancel()
        await pubsub.aclose()
        await listener.aclose()
        for node, up in zip(nodes, alive, strict=True):
            if up:
                await node.close()


def test_presence_on_redis_matches_the_model(redis_server: RedisServer) -> None:
    @settings(
        max_examples=12,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(steps=ops)
    def check(steps: list[Op]) -> None:
        asyncio.run(run(redis_server.url, steps))

    check()
