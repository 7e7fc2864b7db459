"""The room of scenario JL, in a process of its own: members of a ``join_leave``
channel that all close and reconnect at once, counting the join and leave events
they get.

A room of N members that all reconnect is N leaves and N joins, each told to
every other member present: up to N² deliveries, which is why the daemon stops
telling them beyond ``join_leave_max_subscribers``. JL asks what that storm
does to the node's other channels. Reading up to a million events costs the
load client more than the steady stream does, so, as S6's storm
(benchmarks/storm.py), the room runs in a child process at nice 19 on the load
client's core: the steady subscribers are served first, and a daemon that sends
the events faster is not made to look slower for the client's sake.

Protocol (the storm process's): the job (one JSON line) on stdin; the members
connect and subscribe, their own joins are let pass (none for ``quiet``
seconds), then the child says ``ready N`` (N subscribed); at
``go`` every member sends a close frame (1000) and closes its socket, and at
once as many new members connect (``in_flight`` handshakes at a time). Once all
are back, the child waits until no join or leave has arrived for ``quiet``
seconds (bounded by ``timeout``), prints its result (one JSON line) and exits at
the end of its stdin.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
import time
from dataclasses import dataclass

from benchmarks.procstat import self_cpu_seconds
from benchmarks.storm import GOING_AWAY, STORM_NICE, StormProcess
from benchmarks.tls import trust
from benchmarks.wsclient import Pool, Subscriber

_EVENT = re.compile(rb'"type": ?"(join|leave)"')
_TOLD = re.compile(rb'"join_leave": ?(true|false)')


@dataclass(frozen=True)
class RoomJob:
    host: str
    ports: list[int]
    path: str
    """Every member's subscribe URL (the room, JSON mode)."""
    members: int
    in_flight: int
    timeout: float
    """Seconds the reconnect and the events may take."""
    quiet: float
    """The events are over once none arrived for this long."""
    cafile: str | None = None


class Tally:
    """Join and leave events received by every member, and when the last came."""

    def __init__(self) -> None:
        self.joins = 0
        self.leaves = 0
        self.last_event_at = 0.0
        self.told: dict[str, int] = {}
        """``join_leave`` of the ``subscribed`` replies: false beyond the daemon's limit."""
        self.changed = asyncio.Event()


class Member(Subscriber):
    """A room member: a counting subscriber whose replies are counted as events."""

    __slots__ = ("tally",)

    def __init__(
        self,
        pool: Pool,
        request: bytes,
        accept: bytes,
        ready: asyncio.Future[None],
        tally: Tally,
    ) -> None:
        super().__init__(pool, request, accept, 1, ready)
        self.tally = tally

    def _reply(self, payload: bytes) -> None:
        event = _EVENT.search(payload, 0, 24)
        if event is None:
            told = _TOLD.search(payload) if b'"subscribed"' in payload else None
            if told is not None:
                key = told.group(1).decode()
                self.tally.told[key] = self.tally.told.get(key, 0) + 1
            super()._reply(payload)
            return
        tally = self.tally
        if event.group(1) == b"join":
            tally.joins += 1
        else:
            tally.leaves += 1
        tally.last_event_at = time.monotonic()
        tally.changed.set()

    def leave(self) -> None:
        """Close frame (1000), then the socket, without waiting for the answer."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(GOING_AWAY)
            self.transport.close()


async def _members(job: RoomJob, pool: Pool, tally: Tally) -> tuple[list[Member], int, float]:
    """``job.members`` members connected and subscribed: (them, how many, seconds)."""
    loop = asyncio.get_running_loop()
    made: list[Member] = []

    def member(i: int, request: bytes, accept: bytes, ready: asyncio.Future[None]) -> Member:
        m = Member(pool, request, accept, ready, tally)
        made.append(m)
        return m

    conn = await pool.connect(
        job.host,
        job.ports,
        [job.path] * job.members,
        replies_expected=1,
        concurrency=job.in_flight,
        deadline=loop.time() + job.timeout,
        make=member,
    )
    return made, conn.subscribed, conn.seconds


async def _settle(tally: Tally, quiet: float, deadline: float) -> None:
    """Until no event arrived for ``quiet`` seconds or the loop time ``deadline``.
    The end of a stream of events has no event of its own: each wait is bounded
    and restarts when an event came meanwhile."""
    loop = asyncio.get_running_loop()
    while loop.time() < deadline:
        tally.changed.clear()
        try:
            async with asyncio.timeout(min(quiet, max(0.0, deadline - loop.time()))):
                await tally.changed.wait()
        except TimeoutError:
            return


async def run_room(job: RoomJob, go: asyncio.Future[None]) -> dict[str, object]:
    """Connect the room, say ``ready``, and at ``go`` reconnect everyone at once."""
    loop = asyncio.get_running_loop()
    tally = Tally()
    first, second = Pool(json_mode=True), Pool(json_mode=True)
    try:
        members, subscribed, connect_s = await _members(job, first, tally)
        # The members' own joins may still be on their way (through Redis): they are
        # not the storm's.
        await _settle(tally, job.quiet, loop.time() + job.timeout)
        print(f"ready {subscribed}", flush=True)
        await go
        tally.joins = tally.leaves = 0  # the first connections' joins are not the storm's
        tally.told.clear()
        cpu_before = self_cpu_seconds()
        started = time.monotonic()
        for m in members:
            m.leave()
        first.aborting = True  # the closes are ours: not lost connections
        _, again, _ = await _members(job, second, tally)
        back_s = time.monotonic() - started
        await _settle(tally, job.quiet, loop.time() + job.timeout)
        end = max(tally.last_event_at, started + back_s)
        return {
            "members": subscribed,
            "first_connect_s": connect_s,
            "reconnected": again,
            "attempted": job.members,
            "reconnect_s": back_s,
            "events_s": end - started,
            "joins": tally.joins,
            "leaves": tally.leaves,
            "told": tally.told,
            "errors": dict(first.errors + second.errors),
            "closed_by_server": {
                str(k): v for k, v in (first.closed_by_server + second.closed_by_server).items()
            },
            "lost_connections": second.lost_connections,
            "cpu_s": self_cpu_seconds() - cpu_before,
        }
    finally:
        first.abort_all()
        second.abort_all()


class RoomProcess(StormProcess):
    """The parent's handle on the room process."""

    module = "benchmarks.joinleave"


def _room_main() -> None:
    """``python -m benchmarks.joinleave``: one job from stdin, as described above."""
    import uvloop

    os.nice(STORM_NICE)
    job = RoomJob(**json.loads(sys.stdin.readline()))
    trust(job.cafile)

    async def main() -> dict[str, object]:
        loop = asyncio.get_running_loop()
        go: asyncio.Future[None] = loop.create_future()

        def said(line: str) -> None:
            if line.strip() == "go":
                go.set_result(None)
            else:
                go.set_exception(RuntimeError(f"expected go, got {line!r}"))

        reading = loop.run_in_executor(None, sys.stdin.readline)
        reading.add_done_callback(lambda f: said(f.result()))
        return await run_room(job, go)

    result = uvloop.run(main())
    print(json.dumps(result), flush=True)
    sys.stdin.read()  # until the parent has read this process's CPU and closes stdin


if __name__ == "__main__":
    _room_main()
