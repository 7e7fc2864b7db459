"""The client side of scenario S6: steady subscribers that count their own messages,
a one-at-a-time paced stream, and the storm, run in a process of its own.

S6 asks whether a connection storm hurts the connections already open. Their
latency comes from the shared :class:`~benchmarks.wsclient.Pool`'s samples, as
in the other scenarios; whether each of them got every message needs a count
per connection, which :class:`Steady` keeps (one subtraction per read, on top of
the counting subscriber's hot path).

A :class:`Passerby` is one client of the storm: it opens a WebSocket, waits until
it is subscribed (its ``subscribed`` reply, or the 101 in raw mode and on Nchan),
sends a close frame (1000) and, once the server answered it, closes the socket.
The future ``Pool.connect`` waits on resolves only then, so "in flight" bounds
whole visits (connect, subscribe, close), not only handshakes.

The storm runs in a child process (``python -m benchmarks.storm``) at the lowest
priority (nice 19), on the load client's core. Its handshakes cost the client
far more CPU than the stream does, and in the same event loop they would
delay the steady subscribers' reads: a server that lets the storm in faster
would show a worse latency for the client's sake, not its own. At nice 19 the
steady subscribers and the publisher run whenever they have work, and the storm
gets the rest of the core. The child reads its job (one JSON line) on stdin,
says ``ready``, storms at ``go``, prints its result (one JSON line), and exits
at the end of its stdin, so that its CPU can still be read from /proc meanwhile.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Self

from benchmarks.procstat import self_cpu_seconds
from benchmarks.publisher import RESPONSE_TIMEOUT
from benchmarks.servers.base import REPO
from benchmarks.tls import trust
from benchmarks.wsclient import HandshakeError, Pool, Subscriber, client_frame

CLOSE_OPCODE = 0x8
GOING_AWAY = client_frame(CLOSE_OPCODE, (1000).to_bytes(2, "big"))
"""The close frame a passer-by sends once subscribed (1000, normal closure)."""
STORM_NICE = 19
"""The storm process's niceness: below the steady subscribers sharing its core."""
START_TIMEOUT = 30.0
"""Longest wait for the storm process to say ``ready`` (it imports uvloop)."""


class Steady(Subscriber):
    """A counting subscriber that also keeps how many messages it got itself."""

    __slots__ = ("received",)

    def __init__(
        self,
        pool: Pool,
        request: bytes,
        accept: bytes,
        replies_expected: int,
        ready: asyncio.Future[None],
    ) -> None:
        super().__init__(pool, request, accept, replies_expected, ready)
        self.received = 0

    def data_received(self, data: bytes) -> None:
        pool = self.pool
        before = pool.messages
        super().data_received(data)
        self.received += pool.messages - before


def received(subscribers: list[Steady]) -> list[int]:
    """Each subscriber's count so far, in order: taken before and after a phase."""
    return [s.received for s in subscribers]


def shortfalls(before: list[int], after: list[int], published: int) -> Iterator[int]:
    """Per subscriber, how many of the ``published`` messages it did not get
    between the two counts (negative: it got more, which is a duplicate)."""
    for a, b in zip(before, after, strict=True):
        yield published - (b - a)


class Passerby(Subscriber):
    """A storm client: connect, subscribe, close (handshake), then resolve ``done``."""

    __slots__ = ("done", "leaving", "left_cleanly")

    def __init__(
        self,
        pool: Pool,
        request: bytes,
        accept: bytes,
        replies_expected: int,
        done: asyncio.Future[None],
    ) -> None:
        subscribed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        super().__init__(pool, request, accept, replies_expected, subscribed)
        self.done = done
        self.leaving = False
        self.left_cleanly = False
        subscribed.add_done_callback(self._subscribed)

    def _subscribed(self, subscribed: asyncio.Future[None]) -> None:
        error = None if subscribed.cancelled() else subscribed.exception()
        if self.done.done() or self.pool.aborting:
            return  # the storm was given up (its deadline passed): the socket is gone
        if error is not None:
            self.done.set_exception(error)
            return
        if self.transport is None or self.transport.is_closing():
            self.done.set_exception(HandshakeError("closed right after subscribing"))
            return
        self.leaving = True
        self.transport.write(GOING_AWAY)

    def _closed_by_server(self, payload: bytes) -> None:
        if not self.leaving:
            super()._closed_by_server(payload)  # the server's own close: counted
            return
        self.left_cleanly = True
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.leaving:
            super().connection_lost(exc)
            if not self.done.done():
                self.done.set_exception(HandshakeError("closed before subscribed"))
            return
        self.pool.open -= 1
        if not self.left_cleanly:
            self.pool.errors["closed without answering the close frame"] += 1
        if not self.done.done():
            self.done.set_result(None)


@dataclass(frozen=True)
class StormJob:
    """What the storm process does: one connection per path, ``in_flight`` at once."""

    host: str
    ports: list[int]
    paths: list[str]
    replies_expected: int
    """``subscribed`` replies each client waits for (0: subscribed at the 101)."""
    in_flight: int
    timeout: float
    """Seconds the whole storm may take."""
    cafile: str | None = None
    """The daemon's certificate when it serves TLS (``--tls``): connect with TLS, trusting it."""


@dataclass
class StormResult:
    """What the storm process saw: ``completed`` clients connected, subscribed and
    closed; failures by reason; the CPU-seconds the storm cost the process."""

    completed: int
    attempted: int
    seconds: float
    errors: dict[str, int] = field(default_factory=dict)
    closed_by_server: dict[str, int] = field(default_factory=dict)
    lost_connections: int = 0
    cpu_s: float = 0.0


async def run_storm(job: StormJob) -> StormResult:
    """The storm itself (in the storm process): S5's ``Pool.connect`` with passers-by."""
    loop = asyncio.get_running_loop()
    pool = Pool(json_mode=job.replies_expected > 0)
    cpu_before = self_cpu_seconds()

    def passerby(i: int, request: bytes, accept: bytes, done: asyncio.Future[None]) -> Passerby:
        return Passerby(pool, request, accept, job.replies_expected, done)

    try:
        conn = await pool.connect(
            job.host,
            job.ports,
            job.paths,
            replies_expected=job.replies_expected,
            concurrency=job.in_flight,
            deadline=loop.time() + job.timeout,
            make=passerby,
        )
    finally:
        pool.abort_all()
    return StormResult(
        completed=conn.subscribed,
        attempted=conn.attempted,
        seconds=conn.seconds,
        errors=dict(pool.errors),
        closed_by_server={str(k): v for k, v in pool.closed_by_server.items()},
        lost_connections=pool.lost_connections,
        cpu_s=self_cpu_seconds() - cpu_before,
    )


class StormProcess:
    """The parent's handle on the storm process: start it (it gets ready: imports,
    the job read), let it go, read its result, then let it exit. ``module`` is the
    child's program; JL's room (benchmarks/joinleave.py) speaks the same protocol."""

    module: ClassVar[str] = "benchmarks.storm"

    def __init__(self, proc: asyncio.subprocess.Process, job: Any) -> None:
        self.proc = proc
        self.job = job
        self.reported = False
        self.ready_info = b""
        self.log: str | None = None
        """What the process wrote on stderr, once it has exited."""

    @property
    def pid(self) -> int:
        return self.proc.pid

    @classmethod
    async def start(cls, job: Any) -> Self:
        """Launch the child, hand it ``job`` (a dataclass) and wait for its ``ready``;
        the rest of that line (JL's room: how many members subscribed) is ``ready_info``."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            cls.module,
            cwd=REPO,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        storm = cls(proc, job)
        try:
            assert proc.stdin is not None
            proc.stdin.write(json.dumps(asdict(job)).encode() + b"\n")
            await proc.stdin.drain()
            storm.ready_info = (await storm._expect(b"ready", START_TIMEOUT))[5:].strip()
        except BaseException:
            await storm.finish()
            raise
        return storm

    async def run(self) -> StormResult:
        """Start the storm; its result once every client is done (the job's ``timeout``
        bounds it, and the reply gets RESPONSE_TIMEOUT more)."""
        return StormResult(**await self.go())

    async def go(self) -> dict[str, Any]:
        """Say ``go``; the child's result line, decoded."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"go\n")
        await self.proc.stdin.drain()
        line = await self._expect(b"{", self.job.timeout + RESPONSE_TIMEOUT)
        self.reported = True
        result: dict[str, Any] = json.loads(line)
        return result

    async def _expect(self, start: bytes, seconds: float) -> bytes:
        """The process's next line, which must begin with ``start``, within ``seconds``."""
        assert self.proc.stdout is not None
        async with asyncio.timeout(seconds):
            line = await self.proc.stdout.readline()
        if not line.startswith(start):
            last = (await self.finish()).strip().splitlines()[-1:]
            raise RuntimeError(f"the storm process said {line[:200]!r}, not {start!r}: {last}")
        return line

    async def finish(self) -> str:
        """Let the process exit (its stdin closes; killed if it is still storming: the
        scenario was given up), wait for it; what it wrote on stderr."""
        if self.log is None:
            if not self.reported and self.proc.returncode is None:
                self.proc.kill()
            if self.proc.stdin is not None:
                self.proc.stdin.close()  # communicate() leaves it open when given no input
            try:
                async with asyncio.timeout(RESPONSE_TIMEOUT):
                    _, err = await self.proc.communicate()
            except TimeoutError:
                self.proc.kill()
                _, err = await self.proc.communicate()
            self.log = err.decode(errors="replace")
        return self.log


def _storm_main() -> None:
    """``python -m benchmarks.storm``: one job from stdin, as described above."""
    import uvloop

    os.nice(STORM_NICE)
    job = StormJob(**json.loads(sys.stdin.readline()))
    trust(job.cafile)
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        return
    result = uvloop.run(run_storm(job))
    print(json.dumps(asdict(result)), flush=True)
    sys.stdin.read()  # until the parent has read this process's CPU and closes stdin


if __name__ == "__main__":
    _storm_main()
