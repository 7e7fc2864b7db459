"""The servers under test: broadcastd (memory broker, and Redis broker with one or two
nodes), the naive baseline, and Nchan."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import shutil
import string
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

from benchmarks.publisher import http_get
from benchmarks.servers.base import HOST, Process, Server, free_ports

NCHAN_MODULE = Path("/usr/lib/nginx/modules/ngx_nchan_module.so")
NCHAN_TEMPLATE = Path(__file__).parent / "nchan" / "nginx.conf.tmpl"
NOFILE = 20_000


class Broadcastd(Server):
    """The daemon, started through its own console script."""

    name = "broadcastd"
    recovery = True
    tokens = True
    conflation = True
    presence = True
    tls = True
    sse = True
    deflate = True
    log_noise = ('"level":"info"',)

    @classmethod
    def unavailable(cls) -> str | None:
        if importlib.util.find_spec("broadcastd.cli") is None:
            return "broadcastd is not importable yet (broadcastd.cli missing)"
        if cls._script() is None:
            return "the broadcastd console script is not installed in the venv"
        return None

    @staticmethod
    def _script() -> str | None:
        beside = Path(sys.executable).with_name("broadcastd")
        return str(beside) if beside.exists() else shutil.which("broadcastd")

    def argv(self) -> list[str]:
        script = self._script()
        assert script is not None
        return [
            script,
            "serve",
            "--ws-host",
            HOST,
            "--ws-port",
            str(self.ws_port),
            "--control-port",
            str(self.control_port),
            "--metrics-port",
            "0",
            "--log-format",
            "json",
            "--drain-timeout",
            "3",
        ]

    def env(self) -> dict[str, str]:
        """The runner's environment, so ``BROADCASTD_*=... python -m benchmarks``
        measures any setting (``BROADCASTD_METRICS__ENABLED=false``, say), except
        the broker: this column is the memory broker, ``broadcastd-redis`` is Redis."""
        return {
            **super().env(),
            "BROADCASTD_WS__MAX_CLIENTS": "19800",
            "BROADCASTD_BROKER__TYPE": "memory",
        }


def redis_server() -> str | None:
    return shutil.which("redis-server") or (
        "/usr/bin/redis-server" if os.access("/usr/bin/redis-server", os.X_OK) else None
    )


class RedisProcess(Process):
    """A private redis-server on a free loopback port, without persistence (no RDB
    snapshots, no AOF): the figures measure the broker, not the disk."""

    name = "redis-server"
    log_noise = (
        # Start and stop: warning level, but every run has them.
        "Redis is starting",
        "Redis version=",
        "Configuration loaded",
        "Server initialized",
        "Received SIGTERM",
        "User requested shutdown",
        "ready to exit",
        # The host's settings (vm.overcommit_memory, somaxconn), not the broker's.
        "Memory overcommit must be enabled",
        "TCP backlog setting",
    )

    def __init__(self, workdir: Path, pin_core: int | None) -> None:
        (self.port,) = free_ports(1)
        super().__init__(workdir, pin_core, f"redis-{self.port}.log")

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def _new_ports(self) -> bool:
        (self.port,) = free_ports(1)
        return True

    def argv(self) -> list[str]:
        executable = redis_server()
        assert executable is not None
        data = self.workdir / f"redis-{self.port}"
        data.mkdir(parents=True, exist_ok=True)
        return [
            executable,
            "--port",
            str(self.port),
            "--bind",
            HOST,
            "--protected-mode",
            "no",
            "--daemonize",
            "no",
            "--dir",
            str(data),
            "--save",
            "",
            "--appendonly",
            "no",
            "--loglevel",
            "warning",
            "--logfile",
            "",
        ]

    async def _ready(self) -> bool:
        """It answers PING (not ``-LOADING``)."""
        reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, self.port), 1.0)
        try:
            writer.write(b"PING\r\n")
            return await asyncio.wait_for(reader.readline(), 1.0) == b"+PONG\r\n"
        finally:
            writer.close()


class BroadcastdRedis(Broadcastd):
    """broadcastd on the Redis broker: a private redis-server, then ``nodes`` daemons
    using it, each ready (``/readyz``) only once its Redis connection works. Every
    process goes on the server's core. The server's CPU is the nodes'; redis-server's
    is measured on its own rows."""

    name = "broadcastd-redis"
    nodes: ClassVar[int] = 1

    @classmethod
    def unavailable(cls) -> str | None:
        reason = super().unavailable()
        if reason is not None:
            return reason
        if importlib.util.find_spec("broadcastd.broker.redis") is None:
            return "broadcastd has no Redis broker (broadcastd.broker.redis missing)"
        if importlib.util.find_spec("redis") is None:
            return "redis-py is not installed in the venv"
        if redis_server() is None:
            return "redis-server is not installed (apt-get install -y redis-server)"
        return None

    def __init__(self, workdir: Path, pin_core: int | None) -> None:
        super().__init__(workdir, pin_core)
        self.redis = RedisProcess(workdir, pin_core)
        self.peers: list[_Peer] = []
        """The other nodes, made at start: their ports are picked right before they
        bind, so that the first node's connections do not take them meanwhile."""

    def env(self) -> dict[str, str]:
        return {
            **super().env(),
            "BROADCASTD_BROKER__TYPE": "redis",
            "BROADCASTD_BROKER__REDIS__URL": self.redis.url,
        }

    async def start(self) -> None:
        await self.redis.start()
        await super().start()
        for _ in range(self.nodes - 1):
            peer = _Peer(self)
            self.peers.append(peer)
            await peer.start()

    async def stop(self) -> int | None:
        """The nodes first (they drain while Redis is still there), then Redis."""
        await asyncio.gather(*(peer.stop() for peer in self.peers))
        code = await super().stop()
        await self.redis.stop()
        return code

    def alive(self) -> bool:
        return all(p.alive() for p in (self.redis, *self.peers)) and super().alive()

    def tail(self, lines: int = 20) -> str:
        """Each node's log, then redis-server's, each line after the first node's
        prefixed with where it comes from."""
        parts = [super().tail(lines)]
        for i, proc in enumerate((*self.peers, self.redis), start=2):
            who = proc.name if proc is self.redis else f"node{i}"
            parts += [f"{who}: {line}" for line in proc.tail(lines).splitlines()]
        return "\n".join(part for part in parts if part)

    @property
    def ws_ports(self) -> list[int]:
        return [self.ws_port, *(peer.ws_port for peer in self.peers)]

    def node_pids(self) -> list[int]:
        return [self.pid, *(peer.pid for peer in self.peers)]

    def helpers(self) -> dict[str, int]:
        return {"redis-server": self.redis.pid}

    def processes(self) -> dict[str, int]:
        pids = self.node_pids()
        nodes = {f"node{i}": pid for i, pid in enumerate(pids, start=1)}
        return {**(nodes if self.peers else {"broadcastd": self.pid}), **self.helpers()}

    async def subscribers(self, channel: str) -> int | None:
        """The sum of every node's count (each counts its own subscribers)."""
        counts = [await super().subscribers(channel)]
        counts += [await peer.subscribers(channel) for peer in self.peers]
        return None if None in counts else sum(c for c in counts if c is not None)


class _Peer(Broadcastd):
    """Another node of a BroadcastdRedis cluster, with the first node's environment."""

    name = "broadcastd-node"

    def __init__(self, first: BroadcastdRedis) -> None:
        super().__init__(first.workdir, first.pin_core)
        self.first = first

    def env(self) -> dict[str, str]:
        return self.first.env()


class BroadcastdRedis2(BroadcastdRedis):
    """Two nodes on one Redis: subscribers split evenly between their WebSocket ports,
    every publish sent to the first node, so half the deliveries cross nodes."""

    name = "broadcastd-redis2"
    nodes = 2
    only = ("S1",)
    only_why = "two nodes measure cross-node fan-out (S1) only; broadcastd-redis is one node"


class Naive(Server):
    """benchmarks/servers/naive.py, the websockets-guide pattern."""

    name = "naive"

    def argv(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "benchmarks.servers.naive",
            "--ws-port",
            str(self.ws_port),
            "--control-port",
            str(self.control_port),
        ]


class Nchan(Server):
    """nginx + the Nchan module, one worker, its own prefix dir under the run's temp dir.

    Nchan sends each message as the frame payload (no envelope, no subscribed
    reply), which the client treats like broadcastd's raw mode, and has no
    batch endpoint.
    """

    name = "nchan"
    envelope = False
    batch = False
    log_noise = ("exceed open file resource limit",)

    @classmethod
    def unavailable(cls) -> str | None:
        if shutil.which("nginx") is None or not NCHAN_MODULE.exists():
            return (
                "Nchan is not installed (apt-get update && "
                "apt-get install -y nginx-light libnginx-mod-nchan)"
            )
        return None

    def argv(self) -> list[str]:
        prefix = self.workdir / f"nchan-{self.ws_port}"
        prefix.mkdir(parents=True, exist_ok=True)
        # worker_connections above the fd limit on purpose: nginx needs more slots
        # than sockets (19,900 slots served only ~18,650 WebSockets); fds stay capped.
        conf = string.Template(NCHAN_TEMPLATE.read_text()).substitute(
            module=NCHAN_MODULE,
            prefix=prefix,
            nofile=NOFILE,
            connections=NOFILE + 5000,
            ws_port=self.ws_port,
            control_port=self.control_port,
        )
        path = prefix / "nginx.conf"
        path.write_text(conf)
        nginx = shutil.which("nginx")
        assert nginx is not None
        return [nginx, "-p", str(prefix), "-c", str(path)]

    def ws_path(self, channels: Sequence[str], raw: bool) -> str:
        return "/" + ",".join(channels)  # always raw; a query string would be ignored

    async def subscribers(self, channel: str) -> int | None:
        try:
            response = await http_get(
                HOST, self.control_port, f"/publish/{channel}", {"Accept": "text/json"}
            )
        except (OSError, TimeoutError):
            return None
        if response.status != 200:
            return None
        return int(json.loads(response.body)["subscribers"])


SERVERS: dict[str, type[Server]] = {
    cls.name: cls for cls in (Broadcastd, BroadcastdRedis, BroadcastdRedis2, Naive, Nchan)
}
