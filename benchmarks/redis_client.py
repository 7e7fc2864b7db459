"""What the Redis broker's commands cost this process, per Redis client, in process.

The calls are the broker's own: EVALSHA of the PUBLISH script with the keys and
arguments ``RedisBroker._publish_args`` builds, of POSITION as a subscribe reads
it, and of HISTORY reading 10 kept publications, issued 1 at a time (each
awaited before the next) or 64 and 1000 in one turn of the event loop. Each
client runs each case for ``--seconds`` against a private ``redis-server`` (on a
free loopback port, empty, without persistence), on uvloop as the daemon does,
and the table shows:

- ``CPU us/call``: this process's CPU (``time.process_time``, every thread, so
  a client's native threads count too) per call: what the node pays;
- ``calls/s``: calls answered per wall-clock second;
- ``redis us/call``: redis-server's CPU per call (utime + stime from /proc, in
  clock ticks: coarse), the same work whichever client sends it.

Clients: ``redis-py`` as the broker uses it today (one script call awaited
alone, or a non-transactional pipeline of script calls; hiredis parses replies
when installed), ``commands`` (``broadcastd.broker.commands``: calls of one turn
written together), and, when installed, ``coredis`` (alone, in a pipeline, or
concurrent calls multiplexed on its connection) and ``valkey-glide``
(concurrent ``invoke_script`` calls, which its core pipelines). Only redis-py is
a dependency of broadcastd; the others are skipped with a line saying so. To
compare them, give them a virtualenv of their own:

    python3 -m venv /tmp/rc
    /tmp/rc/bin/pip install coredis valkey-glide 'redis[hiredis]' uvloop pytest \\
        pydantic pydantic-settings orjson msgspec structlog prometheus-client \\
        httptools websockets 'pyjwt[crypto]' httpx
    PYTHONPATH=. /tmp/rc/bin/python -m benchmarks.redis_client

Run from the repository root:

    .venv/bin/python -m benchmarks.redis_client [--seconds 1] [--only commands,redis-py]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import uvloop

from broadcastd.broker.commands import CommandConnection
from broadcastd.broker.memory import Epochs
from broadcastd.broker.redis import RedisBroker
from broadcastd.broker.scripts import HISTORY, POSITION, PUBLISH
from broadcastd.core.envelope import Payload
from broadcastd.core.observer import NullObserver
from broadcastd.settings import load_settings
from tests.redisserver import RedisServer

CHANNELS = 1000
HISTORY_CHANNELS = 64
KEPT = 20
"""Publications kept in each history channel; a history read returns the last 10."""
SCRIPTS = {"publish": PUBLISH, "position": POSITION, "history": HISTORY}
CASES = [
    ("publish", 1),
    ("publish", 64),
    ("publish", 1000),
    ("position", 1),
    ("position", 64),
    ("history", 1),
    ("history", 64),
]
Call = tuple[list[Any], list[Any]]
"""A script call's keys and arguments."""


def broker_calls(url: str) -> dict[str, list[Call]]:
    """Keys and arguments of each kind of call, built as the broker builds them."""
    settings = load_settings(
        overrides={"broker.type": "redis", "broker.redis.url": url, "log.level": "warning"}
    )
    broker = RedisBroker(settings, NullObserver())
    payload = Payload.from_json_body(b'{"text":"' + b"x" * 80 + b'","n":1}')
    publish = [broker._publish_args(f"bench:{i}", payload, None) for i in range(CHANNELS)]
    position: list[Call] = []
    new_epoch = Epochs()
    for i in range(CHANNELS):
        channel = f"bench:{i}"
        known = broker._known(channel)
        position.append((list(broker._keys(channel)), [new_epoch(), broker.meta_ttl_ms, *known]))
    # As RedisBroker._read builds them: the last 10 of KEPT, oldest first.
    ttl = max(1, int(broker.namespaces.history_ttl("kept:0")))
    history: list[Call] = [
        (list(broker._keys(f"kept:{i}")), [f"0-{KEPT - 10 + 1}", 10, ttl, "0"])
        for i in range(HISTORY_CHANNELS)
    ]
    prefill = [broker._publish_args(f"kept:{i}", payload, None) for i in range(HISTORY_CHANNELS)]
    return {"publish": publish, "position": position, "history": history, "prefill": prefill}


class Client:
    """One client library, doing ``calls`` (all issued in one loop turn) of one script."""

    name = ""
    missing = ""
    """Why this client cannot run here (empty if it can)."""

    async def open(self, url: str) -> None:
        raise NotImplementedError

    async def run(self, kind: str, calls: Sequence[Call]) -> list[Any]:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError


class RedisPy(Client):
    """redis-py's asyncio client, set up as ``broadcastd.broker.redis.Shard`` does."""

    name = "redis-py"

    async def open(self, url: str) -> None:
        from redis.asyncio import Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff
        from redis.maint_notifications import MaintNotificationsConfig

        self.client = Redis.from_url(
            url,
            socket_timeout=5.0,
            socket_connect_timeout=5.0,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
            maint_notifications_config=MaintNotificationsConfig(enabled=False),
        )
        self.scripts = {kind: self.client.register_script(s) for kind, s in SCRIPTS.items()}

    async def run(self, kind: str, calls: Sequence[Call]) -> list[Any]:
        script = self.scripts[kind]
        if len(calls) == 1:
            keys, args = calls[0]
            return [await script(keys=keys, args=args)]
        async with self.client.pipeline(transaction=False) as pipe:
            for keys, args in calls:
                await script(keys=keys, args=args, client=pipe)
            result: list[Any] = await pipe.execute()
            return result

    async def close(self) -> None:
        await self.client.aclose()


class Commands(Client):
    """``broadcastd.broker.commands.CommandConnection``."""

    name = "commands"

    async def open(self, url: str) -> None:
        self.connection = await CommandConnection.open(url, 5.0, call_timeout=5.0)
        self.scripts = {
            kind: (hashlib.sha1(s.encode()).hexdigest(), s) for kind, s in SCRIPTS.items()
        }

    async def run(self, kind: str, calls: Sequence[Call]) -> list[Any]:
        sha, source = self.scripts[kind]
        script = self.connection.script
        futures = [script(sha, source, keys, args) for keys, args in calls]
        return [await future for future in futures]

    async def close(self) -> None:
        self.connection.close()


class Coredis(Client):
    """coredis: one call awaited alone, or a non-transactional pipeline."""

    name = "coredis"

    def __init__(self) -> None:
        try:
            import coredis  # noqa: F401
        except ImportError:
            self.missing = "not installed (pip install coredis)"

    async def open(self, url: str) -> None:
        import coredis

        self.client: Any = coredis.Redis.from_url(url)
        await self.client.__aenter__()
        self.scripts = {kind: self.client.register_script(s) for kind, s in SCRIPTS.items()}

    async def run(self, kind: str, calls: Sequence[Call]) -> list[Any]:
        script = self.scripts[kind]
        if len(calls) == 1:
            keys, args = calls[0]
            return [await script(keys, args)]
        async with self.client.pipeline(transaction=False) as pipe:
            requests = [script(keys, args, client=pipe) for keys, args in calls]
        return [await request for request in requests]

    async def close(self) -> None:
        await self.client.__aexit__(None, None, None)


class CoredisConcurrent(Coredis):
    """coredis: concurrent calls, which it multiplexes on one connection."""

    name = "coredis-concurrent"

    async def run(self, kind: str, calls: Sequence[Call]) -> list[Any]:
        script = self.scripts[kind]
        if len(calls) == 1:
            keys, args = calls[0]
            return [await script(keys, args)]
        return list(await asyncio.gather(*(script(keys, args) for keys, args in calls)))


class Glide(Client):
    """valkey-glide: concurrent ``invoke_script`` calls (its Rust core pipelines them)."""

    name = "valkey-glide"

    def __init__(self) -> None:
        try:
            import glide  # noqa: F401
        except ImportError:
            self.missing = "not installed (pip install valkey-glide)"

    async def open(self, url: str) -> None:
        from glide import GlideClient, GlideClientConfiguration, NodeAddress, Script

        host, port = url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
        config = GlideClientConfiguration([NodeAddress(host, int(port))], request_timeout=5000)
        self.client: Any = await GlideClient.create(config)
        self.scripts = {kind: Script(s) for kind, s in SCRIPTS.items()}
        self.converted: dict[int, tuple[list[Any], list[Any]]] = {}

    def _strings(self, call: Call) -> tuple[list[Any], list[Any]]:
        """Glide takes str and bytes only: ints are converted once, outside the timing."""
        converted = self.converted.get(id(call))
        if converted is None:
            keys, args = call
            converted = (keys, [a if isinstance(a, str | bytes) else str(a) for a in args])
            self.converted[id(call)] = converted
        return converted

    async def run(self, kind: str, calls: Sequence[Call]) -> list[Any]:
        script = self.scripts[kind]
        invoke = self.client.invoke_script
        prepared = [self._strings(call) for call in calls]
        if len(prepared) == 1:
            keys, args = prepared[0]
            return [await invoke(script, keys=keys, args=args)]
        return list(
            await asyncio.gather(*(invoke(script, keys=keys, args=args) for keys, args in prepared))
        )

    async def close(self) -> None:
        await self.client.close()


def redis_cpu(pid: int) -> float:
    """redis-server's CPU seconds so far (utime + stime)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def check(kind: str, replies: list[Any], count: int) -> None:
    """Every client must really have done the work (a reply of the right shape each)."""
    assert len(replies) == count, (kind, len(replies))
    for reply in replies:
        assert isinstance(reply, list), (kind, reply)
        if kind == "history":
            assert len(reply[2]) == 20, (kind, reply)  # 10 (id, payload) pairs


async def measure(
    run: Callable[[str, Sequence[Call]], Awaitable[list[Any]]],
    kind: str,
    batches: list[list[Call]],
    seconds: float,
    pid: int,
) -> tuple[float, float, float]:
    """CPU us per call (this process), calls per second, redis CPU us per call."""
    for batch in batches[:3]:  # warm up: scripts loaded, connections made
        check(kind, await run(kind, batch), len(batch))
    calls = 0
    i = 0
    redis_before = redis_cpu(pid)
    cpu_before = time.process_time()
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        batch = batches[i % len(batches)]
        i += 1
        await run(kind, batch)
        calls += len(batch)
    wall = time.perf_counter() - started
    cpu = time.process_time() - cpu_before
    redis = redis_cpu(pid) - redis_before
    return cpu / calls * 1e6, calls / wall, redis / calls * 1e6


def batches_of(calls: list[Call], size: int) -> list[list[Call]]:
    if size >= len(calls):
        return [calls[:size]]
    return [calls[i : i + size] for i in range(0, len(calls) - size + 1, size)]


async def bench(server: RedisServer, clients: list[Client], seconds: float) -> list[list[str]]:
    calls = broker_calls(server.url)
    prefill = Commands()
    await prefill.open(server.url)
    for _ in range(KEPT):
        await prefill.run("publish", calls["prefill"])
    await prefill.close()
    rows = []
    for client in clients:
        await client.open(server.url)
        try:
            for kind, size in CASES:
                cpu, rate, redis = await measure(
                    client.run, kind, batches_of(calls[kind], size), seconds, server.pid
                )
                rows.append(
                    [kind, str(size), client.name, f"{cpu:.1f}", f"{rate:,.0f}", f"{redis:.1f}"]
                )
                print(" ".join(rows[-1]), file=sys.stderr, flush=True)
        finally:
            await client.close()
    return rows


def table(rows: list[list[str]]) -> str:
    head = ["call", "batch", "client", "CPU us/call", "calls/s", "redis us/call"]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = []
    for row in [head, *rows]:
        cells = [
            c.ljust(w) if i < 3 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells))
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="per client and case")
    parser.add_argument("--only", default="", help="comma-separated client names")
    options = parser.parse_args()
    everyone = [RedisPy(), Commands(), Coredis(), CoredisConcurrent(), Glide()]
    wanted = set(filter(None, options.only.split(",")))
    clients = []
    for client in everyone:
        if wanted and client.name not in wanted:
            continue
        if client.missing:
            print(f"skipped {client.name}: {client.missing}")
        else:
            clients.append(client)
    from redis.utils import HIREDIS_AVAILABLE

    print(f"redis-py parses with hiredis: {HIREDIS_AVAILABLE}")
    with (
        tempfile.TemporaryDirectory(prefix="bench-redis-") as directory,
        RedisServer(Path(directory), persistence=False) as server,
    ):
        rows = uvloop.run(bench(server, clients, options.seconds))
    print(table(rows))


if __name__ == "__main__":
    main()
