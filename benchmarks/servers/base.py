"""What the runner needs from a server under test, and how servers are launched.

Each server runs as a subprocess on free loopback ports, pinned to core 0 with
``taskset -c 0`` (the load client stays on core 1), in its own session so that
stopping it reaches its children (nginx's worker), with its output in a log
file in the run's temp dir. A server may be several processes (broadcastd
nodes and their redis-server): all of them go on the server's core. The
runner raises its own RLIMIT_NOFILE soft limit before launching, and children
inherit it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

from benchmarks.publisher import http_get

HOST = "127.0.0.1"
READY_TIMEOUT = 30.0
BIND_ATTEMPTS = 3
"""Starts with fresh ports when a port was taken between ``free_ports`` and the
bind (by another process's outgoing connection, say)."""
STOP_GRACE = 15.0
SUBSCRIBERS_TIMEOUT = 5.0
REPO = Path(__file__).resolve().parents[2]


class ServerError(Exception):
    """The server did not start, or died."""


def free_ports(count: int) -> list[int]:
    """Ports nothing listens on right now (bound to port 0, then released)."""
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind((HOST, 0))
            socks.append(sock)
        return [s.getsockname()[1] for s in socks]
    finally:
        for sock in socks:
            sock.close()


class Process:
    """A subprocess the benchmarks start: pinned, in its own session, its output in a
    log file. ``_wait_ready`` says when it is up."""

    name: ClassVar[str]
    log_noise: ClassVar[tuple[str, ...]] = ()
    """Log lines containing one of these are expected and not reported."""

    def __init__(self, workdir: Path, pin_core: int | None, log_name: str) -> None:
        self.workdir = workdir
        self.pin_core = pin_core
        self.proc: asyncio.subprocess.Process | None = None
        self.extra_env: dict[str, str] = {}
        """Set by the runner for one scenario (R's history size, S5t's auth secret, S1c's
        namespace), over the environment."""
        self.log_path = workdir / log_name

    def argv(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return {**os.environ, **self.extra_env}

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self) -> None:
        """Launch and wait until ready; on a port taken meanwhile, again on new ports."""
        for attempt in range(1, BIND_ATTEMPTS + 1):
            try:
                await self._launch()
                return
            except ServerError as exc:
                if attempt == BIND_ATTEMPTS or "address already in use" not in str(exc).lower():
                    raise
                if not self._new_ports():
                    raise
                # Not the server's fault: keep its log apart from the next attempt's.
                self.log_path.rename(self.log_path.with_suffix(f".bind{attempt}.log"))

    def _new_ports(self) -> bool:
        """Pick other free ports after losing one; False if this process cannot."""
        return False

    async def _launch(self) -> None:
        argv = self.argv()
        if self.pin_core is not None and shutil.which("taskset"):
            argv = ["taskset", "-c", str(self.pin_core), *argv]  # taskset execs: same pid
        with self.log_path.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                *argv,
                env=self.env(),
                cwd=REPO,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        await self._wait_ready()

    async def _wait_ready(self) -> None:
        """Bounded poll of ``_ready`` (every 50 ms, at most READY_TIMEOUT seconds): a
        subprocess offers no event to wait on."""
        assert self.proc is not None
        for _ in range(int(READY_TIMEOUT / 0.05)):
            if self.proc.returncode is not None:
                raise ServerError(f"{self.name} exited with {self.proc.returncode}: {self.tail()}")
            with contextlib.suppress(OSError, TimeoutError):
                if await self._ready():
                    return
            await asyncio.sleep(0.05)
        raise ServerError(f"{self.name} not ready after {READY_TIMEOUT:.0f}s: {self.tail()}")

    async def _ready(self) -> bool:
        raise NotImplementedError

    async def stop(self) -> int | None:
        """SIGTERM, then SIGKILL to the whole session after STOP_GRACE seconds."""
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return None if proc is None else proc.returncode
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(proc.wait(), STOP_GRACE)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            return await proc.wait()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def tail(self, lines: int = 20) -> str:
        """The last lines of the process's output, expected noise left out."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        kept = [
            line
            for line in text.splitlines()
            if line.strip() and not any(noise in line for noise in self.log_noise)
        ]
        return "\n".join(kept[-lines:])


class Server(Process):
    """A server under test: start, stop, and the few ways servers differ."""

    envelope: ClassVar[bool] = True
    """Has the JSON envelope mode with ``subscribed`` replies (else raw frames only)."""
    batch: ClassVar[bool] = True
    """Has ``POST /batch``."""
    recovery: ClassVar[bool] = False
    """Resumes a subscriber from a position (``since=CHANNEL:EPOCH:OFFSET``, scenario R)."""
    tokens: ClassVar[bool] = False
    """Checks an HS256 subscriber token given as ``?token=`` (scenario S5t)."""
    conflation: ClassVar[bool] = False
    """Has namespaces whose channels conflate for slow consumers (scenario S1c)."""
    presence: ClassVar[bool] = False
    """Has namespaces with presence and join/leave events (scenarios S5p, PS, JL)."""
    tls: ClassVar[bool] = False
    """Serves wss:// and https:// given a certificate (``--tls``)."""
    sse: ClassVar[bool] = False
    """Serves Server-Sent Events on the subscriber URL (``Accept: text/event-stream``,
    scenario S1s)."""
    deflate: ClassVar[bool] = False
    """Negotiates permessage-deflate when told to (scenarios S1z and S4z)."""
    only: ClassVar[tuple[str, ...] | None] = None
    """The scenarios this server runs (None: all it supports); ``only_why`` says why."""
    only_why: ClassVar[str] = ""

    def __init__(self, workdir: Path, pin_core: int | None) -> None:
        self.ws_port, self.control_port = free_ports(2)
        super().__init__(workdir, pin_core, f"{self.name}-{self.ws_port}.log")

    @classmethod
    def unavailable(cls) -> str | None:
        """Why this server cannot run here (None if it can)."""
        return None

    def _new_ports(self) -> bool:
        self.ws_port, self.control_port = free_ports(2)
        return True

    async def _ready(self) -> bool:
        """``GET /readyz`` answers 200."""
        response = await http_get(HOST, self.control_port, "/readyz")
        return response.status == 200

    # the processes behind the server

    @property
    def ws_ports(self) -> list[int]:
        """Where subscribers connect; several for a cluster (clients are spread evenly)."""
        return [self.ws_port]

    def node_pids(self) -> list[int]:
        """The processes whose CPU is the server's (each counted with its descendants)."""
        return [self.pid]

    def helpers(self) -> dict[str, int]:
        """Processes the server relies on, measured on rows of their own (redis-server)."""
        return {}

    def processes(self) -> dict[str, int]:
        """Every process of the server, by role (for the report of core pinning)."""
        return {self.name: self.pid, **self.helpers()}

    def pinning(self) -> dict[str, list[int]]:
        """The cores each process may run on, as the kernel says."""
        cores = {}
        for role, pid in self.processes().items():
            with contextlib.suppress(OSError):
                cores[role] = sorted(os.sched_getaffinity(pid))
        return cores

    # protocol differences

    def ws_path(self, channels: Sequence[str], raw: bool) -> str:
        """The subscriber URL path (path form ``/a,b``, which all servers accept)."""
        return "/" + ",".join(channels) + ("?format=raw" if raw else "")

    async def subscribers(self, channel: str) -> int | None:
        """Subscriber count of a channel as the server reports it (None if unknown)."""
        try:
            response = await http_get(HOST, self.control_port, f"/channels/{channel}")
        except (OSError, TimeoutError):
            return None
        if response.status != 200:
            return None
        return int(json.loads(response.body)["subscribers"])

    async def wait_subscribers(self, channel: str, count: int, acknowledged: bool) -> int | None:
        """The server's own subscriber count, waiting for it to reach ``count``.

        When clients waited for ``subscribed`` replies (``acknowledged``), the
        server registered them before they counted themselves: one look
        suffices. A bare 101 (raw mode, Nchan) may precede registration and
        offers no event to wait on: poll every 20 ms, at most SUBSCRIBERS_TIMEOUT.
        """
        seen = await self.subscribers(channel)
        for _ in range(int(SUBSCRIBERS_TIMEOUT / 0.02)):
            if acknowledged or seen is None or seen >= count:
                break
            await asyncio.sleep(0.02)
            seen = await self.subscribers(channel)
        return seen
