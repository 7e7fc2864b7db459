"""What a presence entry costs on Redis: redis-server's CPU and this process's.

The entries go through the broker's own code (``RedisBroker.add_presence`` and
``remove_presence``) against a private ``redis-server`` (a free loopback port,
empty, without persistence), as a subscribe storm makes them: 100 channels'
changes per turn of the event loop, each channel new, one entry each (S5p's
shape) or ``--per-channel`` entries each. Then one heartbeat. The table shows,
per entry added and per entry removed:

- ``redis us``: redis-server's CPU (``INFO cpu``: its user and system time);
- ``node us``: this process's CPU (``time.process_time``): building the
  changes, packing the calls, reading the answers;

and the heartbeat's cost for all the entries the node holds.

Run from the repository root:

    .venv/bin/python -m benchmarks.presence_cost [--entries 20000] [--per-channel 1]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
import uvloop

from broadcastd import log
from broadcastd.broker.redis import RedisBroker
from broadcastd.core.observer import NullObserver
from broadcastd.settings import load_settings
from tests.redisserver import RedisServer

TURN = 100
"""Channels whose changes one loop turn makes (and the broker sends in one call)."""


async def redis_cpu(client: aioredis.Redis) -> float:
    info = await client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def measure(url: str, entries: int, per_channel: int) -> dict[str, Any]:
    settings = load_settings(
        overrides={
            "broker": {"type": "redis", "redis": {"url": url}},
            "namespaces": [{"name": "p", "presence": True}],
        }
    )
    broker = RedisBroker(settings, NullObserver())
    client = aioredis.from_url(url)

    class Handler:
        id = "bench"

        def __getattr__(self, name: str) -> Any:
            return lambda *args, **kwargs: None

    await broker.start(Handler())  # type: ignore[arg-type]
    try:
        async with asyncio.timeout(10):
            while not broker.health.up:
                await broker.health_changed()
        names = [(f"p:c{i // per_channel}", f"client-{i}") for i in range(entries)]
        figures: dict[str, Any] = {}
        for label, step in (
            ("add", lambda channel, id_: broker.add_presence(channel, id_, None, b"{}")),
            ("remove", lambda channel, id_: broker.remove_presence(channel, id_)),
        ):
            redis_before, node_before = await redis_cpu(client), time.process_time()
            for first in range(0, entries, TURN * per_channel):
                for channel, id_ in names[first : first + TURN * per_channel]:
                    step(channel, id_)
                await broker.presence_stats(names[first][0])  # sent, and answered
            figures[label] = (
                (await redis_cpu(client) - redis_before) / entries * 1e6,
                (time.process_time() - node_before) / entries * 1e6,
            )
            if label == "add":
                redis_before, node_before = await redis_cpu(client), time.process_time()
                broker._heartbeat()
                await broker.presence_stats(names[0][0])
                figures["heartbeat"] = (
                    (await redis_cpu(client) - redis_before) * 1e3,
                    (time.process_time() - node_before) * 1e3,
                )
        return figures
    finally:
        await broker.close()
        await client.aclose()


def run(entries: int, per_channel: int = 1) -> dict[str, Any]:
    """The figures, against a private redis-server (for tests and ``main``)."""
    with (
        tempfile.TemporaryDirectory(prefix="bench-presence-") as directory,
        RedisServer(Path(directory), persistence=False) as server,
    ):
        return uvloop.run(measure(server.url, entries, per_channel))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=20_000)
    parser.add_argument("--per-channel", type=int, default=1)
    options = parser.parse_args()
    log.configure("warning")
    figures = run(options.entries, options.per_channel)
    print(f"{options.entries} entries, {options.per_channel} per channel")
    print(f"{'':10} {'redis':>10} {'node':>10}")
    for label in ("add", "remove"):
        redis_us, node_us = figures[label]
        print(f"{label + ' us':10} {redis_us:10.1f} {node_us:10.1f}")
    redis_ms, node_ms = figures["heartbeat"]
    print(f"{'beat ms':10} {redis_ms:10.1f} {node_ms:10.1f}")


if __name__ == "__main__":
    main()
