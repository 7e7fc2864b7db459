"""Several daemon processes on one Redis: every message reaches every subscriber.

Real ``broadcastd serve`` processes and a real ``redis-server``. Witnesses
subscribe across the nodes; when their node goes away they reconnect to
another one with their positions, as a client library does, and must recover.
Publishers send to random nodes, singly and in batches, and retry a failed
publish on another node with the same Idempotency-Key, so that what was
acknowledged is known exactly. At the end every witness must hold, for its
channel, every offset from its first to the last acknowledged one, each once,
in order, with the acknowledged payload, and must never have been refused a
recovery or told to resync.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from .conftest import DaemonProcess
from .redisserver import RedisServer

CHANNELS = [f"room{i}" for i in range(5)]


class Node:
    """One daemon process on the Redis broker."""

    def __init__(self, redis_url: str) -> None:
        self.process = DaemonProcess(
            "--broker-type",
            "redis",
            "--broker-redis-url",
            redis_url,
            "--broker-redis-probe-interval",
            "0.2",
            "--history-size",
            "2000",
        )
        self.http: httpx.AsyncClient | None = None
        self.stopping = False

    async def start(self) -> None:
        await asyncio.to_thread(self.process.wait_ready)
        self.http = httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{self.process.control_port}", timeout=10
        )
        await asyncio.to_thread(self._broker_up)
        assert (await self.http.get("/readyz")).status_code == 200

    def _broker_up(self) -> None:
        """Read the log until the broker is up (it may have been before the daemon was)."""
        if any(e.get("event") == "broker.up" for e in self.process.lines):
            return
        for event in self.process.events():
            if event.get("event") == "broker.up":
                return
        raise AssertionError(f"the node exited before its broker was up: {self.process.lines}")

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.process.ws_port}/"

    @property
    def alive(self) -> bool:
        return self.process.proc.poll() is None and not self.stopping

    def signal(self, signum: int) -> None:
        self.process.proc.send_signal(signum)

    async def stop(self) -> None:
        """SIGTERM: the node drains (its subscribers are closed with 1001)."""
        self.stopping = True
        if self.process.proc.poll() is None:
            self.signal(signal.SIGTERM)
        await asyncio.to_thread(self.process.finish)
        if self.http is not None:
            await self.http.aclose()


class Cluster:
    def __init__(self, redis_url: str) -> None:
        self.redis_url = redis_url
        self.nodes: list[Node] = []

    async def add(self) -> Node:
        node = Node(self.redis_url)
        self.nodes.append(node)
        await node.start()
        return node

    def live(self) -> list[Node]:
        return [n for n in self.nodes if n.alive and n.http is not None]


@asynccontextmanager
async def cluster(redis_url: str, size: int) -> AsyncIterator[Cluster]:
    c = Cluster(redis_url)
    try:
        await asyncio.gather(*(c.add() for _ in range(size)))
        yield c
    finally:
        await asyncio.gather(*(n.stop() for n in c.nodes), return_exceptions=True)


class Witness:
    """A subscriber that resumes from its position on whichever node is alive."""

    def __init__(self, c: Cluster, channel: str, first_node: int) -> None:
        self.cluster = c
        self.channel = channel
        self.node = first_node
        self.epoch: str | None = None
        self.offset = 0
        self.start: int | None = None
        self.data: list[Any] = []
        self.problems: list[Any] = []
        self.reconnects = 0
        self.subscribed = asyncio.Event()
        self.progress = asyncio.Condition()

    async def run(self) -> None:
        while True:
            nodes = self.cluster.live()
            node = nodes[self.node % len(nodes)]
            url = f"{node.ws_url}?channel={self.channel}"
            if self.epoch is not None:
                url += f"&since={self.channel}:{self.epoch}:{self.offset}"
            try:
                async with connect(url, max_size=None, compression=None) as ws:
                    async for frame in ws:
                        await self._take(json.loads(frame))
            except (ConnectionClosed, OSError):
                pass
            self.node += 1
            self.reconnects += 1

    async def _take(self, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        if kind == "subscribed":
            if self.epoch is not None and frame.get("recovered") is not True:
                self.problems.append(frame)
            self.epoch = frame["epoch"]
            if self.start is None:
                self.start = self.offset = frame["offset"]
            self.subscribed.set()
        elif kind is not None:
            self.problems.append(frame)
        else:
            if frame["offset"] != self.offset + 1:
                self.problems.append(("offset", self.offset, frame["offset"]))
            self.offset = frame["offset"]
            self.data.append(frame["data"])
            async with self.progress:
                self.progress.notify_all()

    async def reach(self, offset: int) -> None:
        async with self.progress:
            await self.progress.wait_for(lambda: self.offset >= offset or bool(self.problems))


class Publisher:
    """Publishes to random live nodes; a failure is retried elsewhere with the same
    Idempotency-Key, so each message is acknowledged exactly once."""

    def __init__(self, c: Cluster, seed: int) -> None:
        self.cluster = c
        self.random = random.Random(seed)
        self.seed = seed
        self.acked: dict[str, dict[int, Any]] = {ch: {} for ch in CHANNELS}
        self.sent = 0
        self.progress = asyncio.Condition()

    async def reach(self, sent: int) -> None:
        async with self.progress:
            await self.progress.wait_for(lambda: self.sent >= sent)

    async def run(self, count: int, batch_every: int = 3) -> None:
        while self.sent < count:
            if self.random.randrange(batch_every) == 0:
                size = min(self.random.randint(2, 20), count - self.sent)
                await self._batch(size)
            else:
                await self._single()
            async with self.progress:
                self.progress.notify_all()

    async def _single(self) -> None:
        channel = self.random.choice(CHANNELS)
        data = {"id": f"p{self.seed}-{self.sent}"}
        self.sent += 1
        key = f"p{self.seed}-{data['id']}"
        answer = await self._post(f"/publish/{channel}", data, key)
        self._ack(channel, answer["offset"], data)

    async def _batch(self, size: int) -> None:
        items = []
        for _ in range(size):
            items.append(
                {
                    "channel": self.random.choice(CHANNELS),
                    "data": {"id": f"p{self.seed}-{self.sent}"},
                    "idempotency_key": f"p{self.seed}-{self.sent}",
                }
            )
            self.sent += 1
        answer = await self._post("/batch", items, None)
        assert answer["failed"] == 0, answer
        for item, result in zip(items, answer["results"], strict=True):
            self._ack(item["channel"], result["offset"], item["data"])

    def _ack(self, channel: str, offset: int, data: Any) -> None:
        assert self.acked[channel].setdefault(offset, data) == data, (channel, offset)

    async def _post(self, path: str, body: Any, key: str | None) -> Any:
        headers = {} if key is None else {"Idempotency-Key": key}
        for _ in range(200):
            nodes = self.cluster.live()
            node = self.random.choice(nodes)
            assert node.http is not None
            try:
                response = await node.http.post(path, json=body, headers=headers)
            except httpx.TransportError:
                continue  # the node went away: try another with the same key
            if response.status_code == 200:
                return response.json()
            assert response.status_code == 503, response.text
        raise AssertionError(f"no node accepted {path}")


async def check(witnesses: list[Witness], publisher: Publisher) -> None:
    """Every witness holds every acknowledged message of its channel after its start."""
    for w in witnesses:
        top = max(publisher.acked[w.channel], default=0)
        async with asyncio.timeout(60):
            await w.reach(top)
    for w in witnesses:
        assert not w.problems, (w.channel, w.problems[:5])
        acked = publisher.acked[w.channel]
        assert w.start is not None
        expected = [acked[o] for o in range(w.start + 1, w.offset + 1)]
        assert w.data == expected, w.channel


async def witnesses_on(c: Cluster, count: int) -> tuple[list[Witness], list[asyncio.Task[None]]]:
    witnesses = [Witness(c, CHANNELS[i % len(CHANNELS)], i) for i in range(count)]
    tasks = [asyncio.create_task(w.run()) for w in witnesses]
    async with asyncio.timeout(60):
        for w in witnesses:
            await w.subscribed.wait()
    return witnesses, tasks


async def stop(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


@pytest.mark.timeout(240)
async def test_three_nodes_deliver_every_message_to_every_subscriber(
    redis_server: RedisServer,
) -> None:
    async with cluster(redis_server.url, 3) as c:
        witnesses, tasks = await witnesses_on(c, 300)
        try:
            publishers = [Publisher(c, seed) for seed in range(4)]
            await asyncio.gather(*(p.run(1250) for p in publishers))
            merged = Publisher(c, 0)
            for p in publishers:
                for channel, acked in p.acked.items():
                    for offset, data in acked.items():
                        merged._ack(channel, offset, data)
            assert sum(len(a) for a in merged.acked.values()) == 5000
            await check(witnesses, merged)
        finally:
            await stop(tasks)


@pytest.mark.timeout(240)
async def test_a_killed_node_and_a_rolling_restart_lose_nothing(
    redis_server: RedisServer,
) -> None:
    async with cluster(redis_server.url, 3) as c:
        witnesses, tasks = await witnesses_on(c, 60)
        publisher = Publisher(c, 7)
        try:
            publishing = asyncio.create_task(publisher.run(3000))
            await publisher.reach(300)
            c.nodes[0].signal(signal.SIGKILL)  # mid-stream, no drain
            await asyncio.to_thread(c.nodes[0].process.proc.wait)
            await publisher.reach(900)
            await c.add()  # replaces the killed one
            for old in list(c.live()):  # rolling restart, one at a time, under load
                await old.stop()
                await c.add()
            await publishing
            await check(witnesses, publisher)
            moved = [w for w in witnesses if w.reconnects]
            assert len(moved) == len(witnesses)  # every witness lost its node at least once
        finally:
            await stop(tasks)
