"""Redis brought back from an older snapshot: no position is given out twice.

A real ``redis-server`` is saved (``SAVE``), written to further, then crashed
and started again from the older RDB file, as a host restored from a backup, or
an RDB-only server that crashed between saves. Redis then holds each channel in
the same epoch at a lower offset than it already gave out. Nothing in Redis can
tell; the node that saw the higher offsets must, at its next publish, so that
the offsets given out before are never given to other messages.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from broadcastd.broker.redis import RedisBroker
from broadcastd.core.envelope import Payload
from broadcastd.core.stream import Position

from .conftest import Running, recv_json, running_daemon
from .redisserver import RedisServer
from .test_redis_broker import broker_is, redis_settings


class Positions:
    """Every position a publish was answered with, and what it was given to."""

    def __init__(self, d: Running) -> None:
        self.d = d
        broker = d.daemon.node.broker
        assert isinstance(broker, RedisBroker)
        self.broker = broker
        self.given: list[tuple[Position, str, Any]] = []

    async def publish(self, channel: str, data: Any) -> None:
        """Each channel alternately through the control port and the broker directly."""
        if sum(c == channel for _, c, _ in self.given) % 2 == 0:
            answer = await self.d.publish(channel, data)
            self.given.append((Position(answer["epoch"], answer["offset"]), channel, data))
        else:
            await self.batch(channel, [data])

    async def batch(self, channel: str, data: list[Any]) -> None:
        """Through the broker directly, in one pipeline."""
        items = [(channel, Payload.from_json_text(json.dumps(d).encode()), None) for d in data]
        calls = [self.broker.publish(*item) for item in items]  # in one write
        for call, d in zip(calls, data, strict=True):
            published = await call
            self.given.append((published.position, channel, d))

    def of(self, channel: str) -> list[Position]:
        return [p for p, c, _ in self.given if c == channel]

    def twice(self) -> list[tuple[str, Position]]:
        seen: set[tuple[str, Position]] = set()
        doubled = []
        for position, channel, _ in self.given:
            if (channel, position) in seen:
                doubled.append((channel, position))
            seen.add((channel, position))
        return doubled


async def roll_back(d: Running, server: RedisServer, snapshot: bytes) -> None:
    """Crash Redis, wait for the node to see it gone, bring it back from ``snapshot``."""
    await asyncio.to_thread(server.kill)
    await broker_is(d, up=False)
    await asyncio.to_thread(server.restore, snapshot)
    await broker_is(d, up=True)


async def test_no_position_is_given_twice_after_redis_went_back_to_a_snapshot(
    redis_server: RedisServer,
) -> None:
    """Two channels: ``quiet`` has no subscriber here, so only the publish itself
    can notice; ``watched`` has one, so the node's repair and the next publish
    race to notice. Either way each position is given once, and the subscriber
    is told (``resync``), then gets every later publish."""
    async with running_daemon(redis_settings(redis_server.url)) as d:
        await broker_is(d, up=True)
        positions = Positions(d)
        async with d.connect("/?channel=watched") as ws:
            epochs = {"watched": (await recv_json(ws))["epoch"]}
            for i in range(10):
                for channel in ("quiet", "watched"):
                    await positions.publish(channel, i)
            snapshot = await asyncio.to_thread(redis_server.snapshot)
            for i in range(10, 20):
                for channel in ("quiet", "watched"):
                    await positions.publish(channel, i)
            epochs["quiet"] = positions.of("quiet")[0].epoch
            for channel in ("quiet", "watched"):
                assert positions.of(channel) == [Position(epochs[channel], n) for n in range(1, 21)]
            frames = [await recv_json(ws) for _ in range(20)]
            assert [(f["offset"], f["data"]) for f in frames] == [(n + 1, n) for n in range(20)]

            await roll_back(d, redis_server, snapshot)
            client = redis_server.client()
            offset = await asyncio.to_thread(client.hget, "{broadcastd:quiet}:m", "o")
            assert offset == b"10"  # Redis went back in time

            await positions.batch("quiet", [20, 21])  # one pipeline, one channel twice
            for i in range(22, 30):
                await positions.publish("quiet", i)
            for i in range(20, 30):
                await positions.publish("watched", i)
            assert positions.twice() == []

            after = positions.of("quiet")[20:]
            assert after[0].epoch != epochs["quiet"]
            assert after == [Position(after[0].epoch, n) for n in range(1, 11)]
            history = (await d.http.get("/channels/quiet/history?since=0")).json()
            assert history["epoch"] == after[0].epoch
            assert [p["data"] for p in history["publications"]] == list(range(20, 30))

            seen = {(epochs["watched"], n) for n in range(1, 21)}
            current = epochs["watched"]
            data: list[Any] = []
            resyncs = 0
            while data[-1:] != [29]:
                frame = await recv_json(ws)
                if frame.get("type") == "resync":
                    assert frame["reason"] == "epoch", frame
                    assert frame["epoch"] != epochs["watched"]
                    current = frame["epoch"]
                    resyncs += 1
                    continue
                assert "data" in frame, frame
                assert (current, frame["offset"]) not in seen, (current, frame)
                seen.add((current, frame["offset"]))
                data.append(frame["data"])
            assert resyncs >= 1
            assert data == list(range(20, 30))
