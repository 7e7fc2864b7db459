"""The benchmark scenarios, S1 to S6, S5t, S1c, R, S5p, PS, JL, S1s, S1k, S1z and
S4z, each against one freshly started server.

Every scenario returns ``{"metrics": {...}, "details": {...}}``: metrics are
the headline figures the report tabulates (each with its label, unit and which
direction is better), details are what one needs to trust them (subscribers
the server itself counted, deliveries expected vs received, connections the
server closed, the client's own CPU use - near 1.0 means the client, not the
server, was the bottleneck).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import secrets
import socket
import statistics
import time
from array import array
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from benchmarks.conflation import SlowGroup, SlowReader
from benchmarks.joinleave import RoomJob, RoomProcess
from benchmarks.procstat import (
    descendants,
    load_elsewhere,
    self_cpu_seconds,
    snapshot,
    tree_cpu_seconds,
    tree_rss_bytes,
    tree_written_bytes,
)
from benchmarks.publisher import (
    HttpPipe,
    PublishStats,
    batch_flat_out,
    document,
    flat_out,
    paced,
    payload,
    request,
    steady,
)
from benchmarks.recovery import Fleet, Resumer, Track
from benchmarks.servers import HOST, Server
from benchmarks.sseclient import SseSubscriber, stream_request
from benchmarks.stats import percentiles_ms
from benchmarks.storm import (
    Steady,
    StormJob,
    StormProcess,
    StormResult,
    received,
    shortfalls,
)
from benchmarks.tls import client_cafile
from benchmarks.wsclient import DEFLATE_OFFER, ConnectResult, MakeSubscriber, Pool


@dataclass(frozen=True)
class Params:
    """Sizes and bounds of one run. Every loop is bounded in count and in time."""

    s1_subscribers: int = 1000
    s1_duration: float = 10.0
    s1_max_messages: int = 5_000_000
    s1_depth: int = 64
    """Publishes pipelined per burst in S1's first phase (the second uses 1)."""
    s2_subscribers: int = 1000
    s2_rate: float = 50.0
    s2_duration: float = 10.0
    s3_subscribers: int = 10_000
    s3_duration: float = 10.0
    s3_max_messages: int = 5_000_000
    s3_depth: int = 64
    s3_batch_items: int = 100
    s3_batch_depth: int = 4
    s3_hot_channels: int = 100
    s3_hot_batch_items: int = 1000
    s4_counts: tuple[int, ...] = (10_000, 19_500)
    s5_clients: int = 10_000
    s5_in_flight: int = 500
    """S5 and S5t: handshakes in flight."""
    s6_subscribers: int = 1000
    """S6: steady subscribers of one channel, open through both phases."""
    s6_rate: float = 50.0
    """S6: publishes per second to the steady subscribers' channel, one at a time: S2b's
    stream, so that the quiet phase leaves the server room for a storm. At 200/s
    (200,000 deliveries/s, each its own socket write) the stream alone saturated a
    core on the reference VM (broadcastd's, 99 % busy; against Nchan, the load
    client's, 99 %): the quiet latency was a queue's, and neither storm finished
    within ``connect_timeout``."""
    s6_quiet: float = 5.0
    """S6: seconds of the quiet phase (the stream alone)."""
    s6_storm: int = 20_000
    """S6: clients of the storm, each on a channel of its own: connect, subscribe, close."""
    s6_in_flight: int = 500
    """S6: storm clients in flight (from connect to closed)."""
    s6_sample_every: int = 31
    """S6: latency of every Nth delivery (prime to the subscriber count, so that the
    samples rotate over the subscribers)."""
    s1c_slow: int = 10
    """S1c: slow readers among the ``s1_subscribers`` (half paused, half lagging)."""
    s1c_max_messages: int = 5_000_000
    """S1c: publishes at most (``s1_duration`` bounds it too)."""
    s1c_lag_delay: float = 0.2
    """S1c: seconds a lagging reader stops reading after each read."""
    s1c_slow_rcvbuf: int = 4096
    """S1c: SO_RCVBUF of the slow readers (the kernel doubles it), set before connecting."""
    s1c_slow_mss: int = 1460
    """S1c: TCP_MAXSEG of the slow readers, set before connecting: an Ethernet client's.
    With loopback's 64 KiB MSS the daemon's kernel grows the send buffer of each
    connection to ~4 MiB, which holds ~20,000 of S1's messages for a reader that does
    not read, and S1c would conflate nothing; with 1460 it stays near 120 KiB."""
    ps_members: int = 10_000
    """PS: subscribers of the presence channel whose stats are asked for."""
    ps_requests: int = 1000
    """PS: ``GET /channels/{name}/presence/stats`` requests, one at a time."""
    jl_room: int = 1000
    """JL: members of the ``join_leave`` room, who all close and reconnect at once."""
    jl_steady: int = 1000
    """JL: subscribers of the other channels, spread round-robin over ``jl_channels``."""
    jl_channels: int = 10
    jl_rate: float = 100.0
    """JL: publishes per second round-robin over the other channels (10,000
    deliveries/s at the default sizes: a tenth of broadcastd's core, room to spare
    for the room's storm)."""
    jl_quiet: float = 5.0
    """JL: seconds of the quiet phase (the stream alone)."""
    jl_event_quiet: float = 1.0
    """JL: the room's events are over once none arrived for this long."""
    jl_sample_every: int = 7
    """JL: latency of every Nth delivery of the stream."""
    r_clients: int = 1000
    r_channels: int = 10
    r_rate: float = 200.0
    """R: publishes per second, round-robin over R's channels, steady through the
    drop and the recovery. Each delivery is about one socket write at this rate,
    and the stream alone keeps about half of broadcastd's core busy (on the
    reference VM); at 500/s the daemon has little left for the reconnect burst,
    which then takes seconds and varies a lot from run to run."""
    r_warmup: float = 1.0
    """R: seconds of publishing before the drop."""
    r_outage: float = 0.5
    """R: seconds between the drop and the reconnect burst. What a client misses is
    about ``r_rate / r_channels * (r_outage + reconnect time)`` messages: keep it
    under the daemon's history size (100 by default) or every resume fails."""
    r_history_size: int | None = 1000
    """R: ``BROADCASTD_HISTORY__SIZE`` for R's daemon, unless the runner's environment
    sets it (None: the daemon's default, 100). 1000 covers 50 s of R's 20 messages/s
    per channel: a reconnect burst slowed down by a busy machine still recovers, and
    the rows measure it rather than refusals."""
    connect_concurrency: int = 500
    connect_timeout: float = 120.0
    settle_timeout: float = 30.0
    """Longest wait for the last deliveries after publishing stopped."""
    sample_every: int = 997
    """Latency sampling under flat-out load (S1, S3): every Nth message."""
    raw: bool = False
    """Subscribe broadcastd and naive in raw mode (Nchan is always raw)."""
    scenario_timeout: float = 600.0


QUICK = Params(
    s1_subscribers=20,
    s1_duration=5.0,
    s1_max_messages=200,
    s2_subscribers=20,
    s2_duration=1.0,
    s3_subscribers=100,
    s3_duration=1.0,
    s3_max_messages=200,
    s3_batch_items=10,
    s3_hot_channels=10,
    s3_hot_batch_items=20,
    s4_counts=(100, 195),
    s5_clients=200,
    s5_in_flight=50,
    s1c_slow=4,
    s1c_max_messages=5000,
    s6_subscribers=50,
    s6_quiet=0.5,
    s6_storm=200,
    s6_in_flight=50,
    s6_sample_every=7,
    ps_members=100,
    ps_requests=50,
    jl_room=30,
    jl_steady=20,
    jl_channels=2,
    jl_quiet=0.5,
    jl_event_quiet=0.3,
    jl_sample_every=1,
    r_clients=20,
    r_channels=2,
    r_rate=40.0,
    r_warmup=0.3,
    r_outage=0.1,
    connect_timeout=20.0,
    settle_timeout=5.0,
    sample_every=7,
    scenario_timeout=30.0,
)


COMPRESSION = "BROADCASTD_WS__COMPRESSION"
"""The daemon setting S1z and S4z turn on (``ws.compression``)."""
HISTORY_SIZE = "BROADCASTD_HISTORY__SIZE"
"""The daemon setting R raises (``Params.r_history_size``)."""

AUTH_SECRET = secrets.token_urlsafe(48)
"""S5t's HS256 secret (64 characters, the daemon's minimum), new for every run."""
TOKEN_TTL = 3600
TOKEN_COST_TARGET = 1.2
"""S5t may take at most 20 % more than S5 (time, and server CPU)."""

CONFLATE_NAMESPACE = "px"
CONFLATE_CHANNEL = f"{CONFLATE_NAMESPACE}:feed"
"""S1c's channel, in a namespace whose slow-consumer policy is ``conflate``."""

PRESENCE_NAMESPACE = "pr"
"""S5p's and PS's channels: a namespace with ``presence = true``."""
PRESENCE_COST_TARGET = 1.15
"""S5p may take at most 15 % more than S5."""
ROOM_NAMESPACE = "jl"
"""JL's room: a namespace with ``join_leave = true`` (and the default
``join_leave_max_subscribers``, 1000)."""
PRESENCE_NAMESPACES = [
    {"name": PRESENCE_NAMESPACE, "presence": True},
    {"name": ROOM_NAMESPACE, "join_leave": True},
]

PRESENCE_STATS_TARGET_MS = 5.0
"""PS: the p99 of presence stats of a 10,000-member channel, on Redis."""

S6_CHANNEL = "s6"
STORM_IMPACT_TARGET = 3.0
"""S6: the storm's p99 latency may be at most 3 times the quiet phase's."""
SATURATED = 0.9
"""A core busier than this in an S6 phase: that process set the pace."""
MIN_PHASE_S = 1.0
"""Shorter phases (quick runs) are too short for CPU shares to mean much."""
STORM_LOG_LINES = 5

MIN_CPU_S = 0.05
"""Less server CPU than this (5 ticks of /proc's 10 ms clock) is too little to
divide by: the per-1M figure is left out (quick runs)."""


def metric(label: str, unit: str, better: str, value: float | None) -> dict[str, Any]:
    return {"label": label, "unit": unit, "better": better, "value": value}


def _mode(server: Server, p: Params) -> tuple[bool, bool]:
    """(raw URL, JSON client mode) for this server."""
    json_mode = server.envelope and not p.raw
    return not json_mode, json_mode


async def _connect(
    server: Server,
    pool: Pool,
    channels: list[str],
    p: Params,
    concurrency: int | None = None,
    tokens: list[str] | None = None,
    make: MakeSubscriber | None = None,
) -> ConnectResult:
    """One connection per entry of ``channels``, each subscribed to that channel (with
    the token of the same index in ``?token=``, if given; built by ``make``, if given)."""
    raw, json_mode = _mode(server, p)
    paths = [server.ws_path([c], raw) for c in channels]
    if tokens is not None:
        paths = [
            f"{path}{'&' if '?' in path else '?'}token={token}"
            for path, token in zip(paths, tokens, strict=True)
        ]
    return await pool.connect(
        HOST,
        server.ws_ports,  # a cluster's nodes take turns
        paths,
        replies_expected=1 if json_mode else 0,
        concurrency=concurrency or p.connect_concurrency,
        deadline=asyncio.get_running_loop().time() + p.connect_timeout,
        make=make,
    )


def _pool_details(pool: Pool, conn: ConnectResult) -> dict[str, Any]:
    return {
        "connected": conn.subscribed,
        "attempted": conn.attempted,
        "connect_s": round(conn.seconds, 3),
        "connect_errors": dict(pool.errors),
        "closed_by_server": {str(k): v for k, v in pool.closed_by_server.items()},
        "lost_connections": pool.lost_connections,
    }


class _Meter:
    """Server CPU (all its nodes), its helpers' CPU (redis-server: utime+stime from
    /proc/PID/stat), client CPU and wall time over one measured phase. ``clients``
    are other processes of the load client (S6's storm): not "other processes"."""

    def __init__(self, server: Server, clients: Sequence[int] = ()) -> None:
        self.pids = server.node_pids()
        self.clients = list(clients)
        self.helpers = server.helpers()
        self.wall = time.monotonic()
        self.server_cpu = self._server_cpu()
        self.helper_cpu = {role: tree_cpu_seconds(pid) for role, pid in self.helpers.items()}
        self.client_cpu = self_cpu_seconds()
        self.before = snapshot()

    def _server_cpu(self) -> float:
        return sum(tree_cpu_seconds(pid) for pid in self.pids)

    def done(self, end: float) -> dict[str, Any]:
        wall = max(end - self.wall, 1e-9)
        server_cpu = self._server_cpu() - self.server_cpu
        client_cpu = self_cpu_seconds() - self.client_cpu
        helpers = {
            role: tree_cpu_seconds(pid) - self.helper_cpu[role]
            for role, pid in self.helpers.items()
        }
        ours = {os.getpid(), *self.clients, *self.helpers.values()}
        for pid in self.pids:
            ours.update(descendants(pid))
        usage: dict[str, Any] = {
            "seconds": wall,
            "server_cpu_s": server_cpu,
            "server_cpu_util": server_cpu / wall,
            "client_cpu_util": client_cpu / wall,
        }
        if helpers:
            usage["helper_cpu_s"] = helpers
            usage["helper_cpu_util"] = {role: cpu / wall for role, cpu in helpers.items()}
        return {**usage, **load_elsewhere(self.before, ours, wall)}


def _helper_rows(usage: dict[str, Any], published: int, label: str, key: str) -> dict[str, Any]:
    """A row per helper process of the server (redis-server): its CPU-seconds per
    1000 publishes (batch items count one each), also kept in ``usage``."""
    rows = {}
    for role, cpu in usage.get("helper_cpu_s", {}).items():
        per_1k = cpu / published * 1000 if published and cpu >= MIN_CPU_S else None
        usage[f"{role}_cpu_s_per_1k_publishes"] = per_1k
        rows[f"{role}_cpu_s_per_1k{key}"] = metric(
            f"{label}: {role} CPU-s per 1k publishes", "s", "lower", per_1k
        )
    return rows


async def _deliveries(pool: Pool, expected: int, meter: _Meter, p: Params) -> dict[str, Any]:
    """Wait for the expected deliveries; rate over first publish to last arrival."""
    pool.expect(expected)
    complete = await pool.wait_for_messages(asyncio.get_running_loop().time() + p.settle_timeout)
    end = pool.last_message_at if pool.messages else time.monotonic()
    usage = meter.done(end)
    delivered = pool.messages
    return {
        **usage,
        "expected": expected,
        "delivered": delivered,
        "complete": complete,
        "deliveries_per_s": delivered / usage["seconds"],
        "cpu_s_per_1m": (
            usage["server_cpu_s"] / delivered * 1e6
            if delivered and usage["server_cpu_s"] >= MIN_CPU_S
            else None
        ),
        "latency_sampled_ms": percentiles_ms(pool.latencies_ns),
    }


async def s1_fanout(server: Server, p: Params) -> dict[str, Any]:
    """S1: many subscribers on one channel, publisher flat out: fan-out throughput.

    Two phases, because the answer depends on how many publishes arrive together:
    with ``s1_depth`` requests pipelined a server can coalesce the frames of
    many messages into one write per subscriber; with one publish in flight
    (depth 1) every message pays the whole per-subscriber cost on its own.
    """
    return await _fanout(server, p, FANOUTS["S1"])


async def s1s_fanout_sse(server: Server, p: Params) -> dict[str, Any]:
    """S1s: S1 with every subscriber reading Server-Sent Events (a plain GET with
    ``Accept: text/event-stream`` on the subscriber URL) instead of a WebSocket;
    compared with S1 of the same run (``--scenario S1,S1s``)."""
    return await _fanout(server, p, FANOUTS["S1s"])


async def s1k_fanout_2k(server: Server, p: Params) -> dict[str, Any]:
    """S1k: S1 with 2 KiB JSON payloads (:func:`~benchmarks.publisher.document`),
    uncompressed: what S1z is compared with."""
    return await _fanout(server, p, FANOUTS["S1k"])


async def s1z_fanout_deflate(server: Server, p: Params) -> dict[str, Any]:
    """S1z: S1k with every subscriber negotiating permessage-deflate (no context
    takeover either way) against a daemon with ``ws.compression`` on; compared
    with S1k of the same run (``--scenario S1k,S1z``)."""
    return await _fanout(server, p, FANOUTS["S1z"])


@dataclass(frozen=True)
class Fanout:
    """What an S1-like scenario varies: how subscribers read and what is published."""

    name: str
    what: str
    """Put in the row labels after the name."""
    sse: bool = False
    offer: str | None = None
    body: Callable[[int], bytes] = payload


FANOUTS = {
    f.name: f
    for f in (
        Fanout("S1", "fan-out"),
        Fanout("S1s", "SSE fan-out", sse=True),
        Fanout("S1k", "2 KiB fan-out", body=document),
        Fanout("S1z", "2 KiB deflate fan-out", offer=DEFLATE_OFFER, body=document),
    )
}


async def _fanout(server: Server, p: Params, how: Fanout) -> dict[str, Any]:
    raw, json_mode = _mode(server, p)
    pool = Pool(json_mode=json_mode, sample_every=p.sample_every, offer=how.offer)
    try:
        channels = ["s1"] * p.s1_subscribers
        if how.sse:
            conn = await _connect_streams(server, pool, channels, p, raw=raw)
        else:
            conn = await _connect(server, pool, channels, p)
        seen = await server.wait_subscribers("s1", conn.subscribed, acknowledged=json_mode)
        n = conn.subscribed
        metrics: dict[str, Any] = {}
        details: dict[str, Any] = {**_pool_details(pool, conn), "server_subscribers": seen}
        if how.sse:
            details["transport"] = "sse"
        if how.offer:
            details["deflate_offer"] = how.offer
            details["deflate"] = dict(pool.deflate)
        for depth in dict.fromkeys((p.s1_depth, 1)):
            pool.reset_counts()
            pipe = await HttpPipe.open(HOST, server.control_port)
            meter = _Meter(server)
            received_before, compressed_before = pool.bytes_received, pool.compressed
            written_before = _server_written(server)
            stats = await flat_out(
                pipe,
                ["s1"],
                depth=depth,
                duration=p.s1_duration,
                max_messages=p.s1_max_messages,
                body=how.body,
            )
            result = await _deliveries(pool, stats.ok * n, meter, p)
            pipe.close()
            delivered = result["delivered"]
            wire = pool.bytes_received - received_before
            written = _server_written(server) - written_before
            details[f"depth{depth}"] = {
                **result,
                "published": stats.ok,
                "publish_statuses": stats.statuses,
                "publishes_per_s": stats.ok / stats.seconds,
                "bytes_received": wire,
                "server_bytes_written": written,
                "compressed_frames": pool.compressed - compressed_before,
            }
            how_many = f"{depth} pipelined" if depth > 1 else "1 in flight"
            metrics[f"deliveries_per_s@{depth}"] = metric(
                f"{how.name} {how.what} {n} subs, {how_many}: deliveries/s",
                "msg/s",
                "higher",
                result["deliveries_per_s"],
            )
            metrics[f"cpu_s_per_1m@{depth}"] = metric(
                f"{how.name} {how_many}: server CPU-s per 1M deliveries",
                "s",
                "lower",
                result["cpu_s_per_1m"],
            )
            if how.name != "S1":
                metrics[f"wire_bytes@{depth}"] = metric(
                    f"{how.name} {how_many}: bytes received per delivery",
                    "B",
                    "lower",
                    wire / delivered if delivered else None,
                )
                metrics[f"server_bytes@{depth}"] = metric(
                    f"{how.name} {how_many}: server bytes written per delivery",
                    "B",
                    "lower",
                    written / delivered if delivered and written else None,
                )
            metrics.update(_helper_rows(result, stats.ok, f"{how.name} {how_many}", f"@{depth}"))
            if not result["complete"]:
                break  # the server shed subscribers: the next phase would measure nothing
        details.update(_pool_details(pool, conn))
        if how.offer:
            details["deflate"] = dict(pool.deflate)
            if pool.deflate["declined"]:
                details.setdefault("problems", []).append(
                    f"{pool.deflate['declined']} of {n} subscribers were refused "
                    "permessage-deflate: their frames went uncompressed"
                )
        return {"metrics": metrics, "details": details}
    finally:
        pool.abort_all()


def _server_written(server: Server) -> int:
    """Bytes the server's processes have written so far (sockets mostly: the
    daemon logs little at the benchmark's log level)."""
    return sum(tree_written_bytes(pid) for pid in server.node_pids())


async def _connect_streams(
    server: Server, pool: Pool, channels: list[str], p: Params, *, raw: bool
) -> ConnectResult:
    """One Server-Sent Events stream per entry of ``channels``, each counted as
    subscribed at its ``event: subscribed``."""
    ports = server.ws_ports
    paths = [server.ws_path([c], raw) for c in channels]

    def make(
        index: int, _request: bytes, _accept: bytes, ready: asyncio.Future[None]
    ) -> SseSubscriber:
        port = ports[index % len(ports)]
        return SseSubscriber(pool, stream_request(HOST, port, paths[index]), ready, raw=raw)

    return await pool.connect(
        HOST,
        ports,
        paths,
        replies_expected=1,
        concurrency=p.connect_concurrency,
        deadline=asyncio.get_running_loop().time() + p.connect_timeout,
        make=make,
    )


async def s1c_conflate(server: Server, p: Params) -> dict[str, Any]:
    """S1c: S1's fan-out (one phase, ``s1_depth`` pipelined) on a conflating channel,
    with ``s1c_slow`` deliberately slow readers among the subscribers.

    The daemon declares the namespace ``px`` with ``slow_consumer_policy =
    "conflate"``; everyone subscribes to ``px:feed`` (JSON mode, always: the
    checks need offsets and ``missed`` events). Half the slow readers stop
    reading right after subscribing, the others read one small chunk every
    ``s1c_lag_delay`` seconds (see benchmarks/conflation.py). Once the normal
    subscribers have every message, the daemon's RSS is read (the slow readers'
    outboxes are still full), then the slow readers read at full speed, and
    each must end with received + missed == published and the last message.
    """
    p = dataclasses.replace(p, raw=False)
    loop = asyncio.get_running_loop()
    channel = CONFLATE_CHANNEL
    slow_n = max(1, min(p.s1c_slow, p.s1_subscribers - 1))
    pool = Pool(json_mode=True, sample_every=p.sample_every)
    slow_pool = Pool(json_mode=True)
    group = SlowGroup(channel)
    pipe: HttpPipe | None = None

    def slow_reader(
        i: int, request: bytes, accept: bytes, ready: asyncio.Future[None]
    ) -> SlowReader:
        delay = None if i % 2 == 0 else p.s1c_lag_delay
        return SlowReader(slow_pool, request, accept, ready, group, delay=delay)

    try:
        base_rss = tree_rss_bytes(server.pid)
        conn = await _connect(server, pool, [channel] * (p.s1_subscribers - slow_n), p)
        slow_conn = await slow_pool.connect(
            HOST,
            server.ws_ports,
            [server.ws_path([channel], False)] * slow_n,
            replies_expected=1,
            concurrency=p.connect_concurrency,
            deadline=loop.time() + p.connect_timeout,
            make=slow_reader,
            sockopts=(
                (socket.SOL_SOCKET, socket.SO_RCVBUF, p.s1c_slow_rcvbuf),
                (socket.IPPROTO_TCP, socket.TCP_MAXSEG, p.s1c_slow_mss),
            ),
        )
        group.readers = [r for r in group.readers if r.top is not None]
        total = conn.subscribed + slow_conn.subscribed
        seen = await server.wait_subscribers(channel, total, acknowledged=True)
        subscribed_rss = tree_rss_bytes(server.pid)
        pipe = await HttpPipe.open(HOST, server.control_port)
        meter = _Meter(server)
        stats = await flat_out(
            pipe,
            [channel],
            depth=p.s1_depth,
            duration=p.s1_duration,
            max_messages=p.s1c_max_messages,
        )
        result = await _deliveries(pool, stats.ok * conn.subscribed, meter, p)
        held_rss = tree_rss_bytes(server.pid)
        top = max((r.top or 0 for r in group.readers), default=0)
        group.release(top + stats.ok)
        try:
            async with asyncio.timeout(p.settle_timeout):
                await group.all_done.wait()
        except TimeoutError:
            pass
        readers = [r.report(stats.ok) for r in group.readers]
        return _conflation_result(
            p,
            (conn, slow_conn),
            (pool, slow_pool),
            stats,
            result,
            readers,
            {
                "server_subscribers": seen,
                "base_rss_mib": base_rss / 2**20,
                "subscribed_rss_mib": subscribed_rss / 2**20,
                "held_rss_mib": held_rss / 2**20,
                "end_rss_mib": tree_rss_bytes(server.pid) / 2**20,
            },
        )
    finally:
        if pipe is not None:
            pipe.close()
        pool.abort_all()
        slow_pool.abort_all()


def _conflation_result(
    p: Params,
    conns: tuple[ConnectResult, ConnectResult],
    pools: tuple[Pool, Pool],
    stats: PublishStats,
    result: dict[str, Any],
    readers: list[dict[str, Any]],
    memory: dict[str, Any],
) -> dict[str, Any]:
    """S1c's rows and details: the fan-out to the normal subscribers, the slow readers'
    counts and checks, the daemon's RSS with the slow readers' outboxes full."""
    conn, slow_conn = conns
    pool, slow_pool = pools
    n, slow_n = conn.subscribed, slow_conn.subscribed
    published = stats.ok
    wrong = [
        r
        for r in readers
        if not (r["adds_up"] and r["got_last"]) or r["offset_violations"] or r["unexpected_replies"]
    ]
    problems = [
        f"slow reader {i} ({r['kind']}): received {r['received']:,} + missed "
        f"{r['missed']:,} of {published:,} published, last offset {r['last_offset']}"
        f"{'' if r['got_last'] else ' (not the last)'}, "
        f"{r['offset_violations']} offset violation(s), unexpected {r['unexpected_replies']}"
        for i, r in enumerate(readers)
        if r in wrong
    ]
    if slow_n < slow_conn.attempted:
        problems.append(f"only {slow_n} of {slow_conn.attempted} slow readers subscribed")
    if slow_pool.closed_by_server or slow_pool.lost_connections:
        closed = {str(k): v for k, v in slow_pool.closed_by_server.items()}
        problems.append(
            f"slow readers closed by the server {closed}, lost {slow_pool.lost_connections}"
        )
    if not any(r["missed"] for r in readers):
        problems.append("no slow reader missed anything: nothing was conflated")
    if pool.missed:
        problems.append(
            f"the normal subscribers missed {pool.missed:,} messages (conflated): "
            "the load client fell behind"
        )
    label = f"S1c fan-out {n} subs + {slow_n} slow, conflating channel, {p.s1_depth} pipelined"
    metrics = {
        "deliveries_per_s": metric(
            f"{label}: deliveries/s", "msg/s", "higher", result["deliveries_per_s"]
        ),
        "cpu_s_per_1m": metric(
            "S1c server CPU-s per 1M deliveries (normal subscribers)",
            "s",
            "lower",
            result["cpu_s_per_1m"],
        ),
        **_helper_rows(result, published, "S1c", ""),
        "slow_received": metric(
            f"S1c slow readers: messages received (of {published:,} each)",
            "msg",
            "higher",
            sum(r["received"] for r in readers),
        ),
        "slow_missed": metric(
            "S1c slow readers: missed (sum of counts told)",
            "msg",
            "lower",
            sum(r["missed"] for r in readers),
        ),
        "slow_wrong": metric(
            "S1c slow readers: received + missed != published, or last message missing",
            "readers",
            "lower",
            len(wrong) + slow_conn.attempted - slow_n,
        ),
        "held_rss_mib": metric(
            "S1c server RSS, slow readers' outboxes full", "MiB", "lower", memory["held_rss_mib"]
        ),
        "held_growth_mib": metric(
            "S1c server RSS growth since all subscribed",
            "MiB",
            "lower",
            memory["held_rss_mib"] - memory["subscribed_rss_mib"],
        ),
    }
    details: dict[str, Any] = {
        **_pool_details(pool, conn),
        **result,
        **memory,
        "published": published,
        "publish_statuses": stats.statuses,
        "publishes_per_s": published / stats.seconds if stats.seconds else None,
        "normal_missed": pool.missed,
        "slow_connected": slow_n,
        "slow_connect_errors": dict(slow_pool.errors),
        "slow_closed_by_server": {str(k): v for k, v in slow_pool.closed_by_server.items()},
        "slow_lost_connections": slow_pool.lost_connections,
        "slow_readers": readers,
    }
    if problems:
        details["problems"] = problems
    return {"metrics": metrics, "details": details}


async def s2b_latency(server: Server, p: Params) -> dict[str, Any]:
    """S2b: many subscribers, a steady 50 publishes/s: end-to-end latency."""
    _, json_mode = _mode(server, p)
    pool = Pool(json_mode=json_mode, sample_every=1)
    try:
        conn = await _connect(server, pool, ["s2"] * p.s2_subscribers, p)
        seen = await server.wait_subscribers("s2", conn.subscribed, acknowledged=json_mode)
        pipe = await HttpPipe.open(HOST, server.control_port)
        count = max(1, int(p.s2_rate * p.s2_duration))
        meter = _Meter(server)
        stats = await paced(pipe, "s2", rate=p.s2_rate, count=count)
        result = await _deliveries(pool, stats.ok * conn.subscribed, meter, p)
        pipe.close()
        lat = result["latency_sampled_ms"]
        n = conn.subscribed
        rate = f"{p.s2_rate:g}/s"
        return {
            "metrics": {
                "p50_ms": metric(f"S2b latency p50 ({n} subs, {rate})", "ms", "lower", lat["p50"]),
                "p99_ms": metric("S2b latency p99", "ms", "lower", lat["p99"]),
                "max_ms": metric("S2b latency max", "ms", "lower", lat["max"]),
                **_helper_rows(result, stats.ok, "S2b", ""),
            },
            "details": {
                **_pool_details(pool, conn),
                **result,
                "server_subscribers": seen,
                "published": stats.ok,
                "publish_statuses": stats.statuses,
            },
        }
    finally:
        pool.abort_all()


async def s3_channels(server: Server, p: Params) -> dict[str, Any]:
    """S3: one channel per subscriber; single publishes round-robin, then /batch."""
    _, json_mode = _mode(server, p)
    pool = Pool(json_mode=json_mode, sample_every=p.sample_every)
    channels = [f"s3-{i}" for i in range(p.s3_subscribers)]
    try:
        conn = await _connect(server, pool, channels, p)
        pipe = await HttpPipe.open(HOST, server.control_port)
        meter = _Meter(server)
        stats = await flat_out(
            pipe, channels, depth=p.s3_depth, duration=p.s3_duration, max_messages=p.s3_max_messages
        )
        single = await _deliveries(pool, stats.ok, meter, p)
        pipe.close()
        n = conn.subscribed
        metrics = {
            "deliveries_per_s": metric(
                f"S3 {n} channels, single publishes: deliveries/s",
                "msg/s",
                "higher",
                single["deliveries_per_s"],
            ),
            "cpu_s_per_1m": metric(
                "S3 server CPU-s per 1M deliveries", "s", "lower", single["cpu_s_per_1m"]
            ),
            **_helper_rows(single, stats.ok, "S3 single", ""),
        }
        details: dict[str, Any] = {
            **_pool_details(pool, conn),
            "single": {**single, "published": stats.ok, "publish_statuses": stats.statuses},
        }
        if server.batch:
            label = f"S3 /batch ingest ({p.s3_batch_items}/request)"
            rows, details["batch"] = await _batch_phase(
                server,
                pool,
                channels,
                p.s3_batch_items,
                "batch_ingest_per_s",
                label,
                "S3 /batch",
                p,
            )
            metrics.update(rows)
            # The same batches over a few hot channels: every subscriber then gets
            # many messages per pass of the writers, so one socket write carries
            # many of them and the figure shows the ingest path itself rather than
            # one write system call per message.
            hot = channels[: p.s3_hot_channels]
            label = f"S3 /batch ingest ({p.s3_hot_batch_items}/request, {len(hot)} channels)"
            rows, details["hot_batch"] = await _batch_phase(
                server,
                pool,
                hot,
                p.s3_hot_batch_items,
                "hot_batch_ingest_per_s",
                label,
                "S3 hot /batch",
                p,
            )
            metrics.update(rows)
        return {"metrics": metrics, "details": details}
    finally:
        pool.abort_all()


async def _batch_phase(
    server: Server,
    pool: Pool,
    channels: list[str],
    items: int,
    key: str,
    label: str,
    short: str,
    p: Params,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Flat-out ``POST /batch`` of ``items`` messages round-robin over ``channels``:
    the ingest metric ``key`` (and, labelled ``short``, the helpers' CPU rows), and
    the details behind them."""
    pool.reset_counts()
    pipe = await HttpPipe.open(HOST, server.control_port, keep_bodies=True)
    meter = _Meter(server)
    batch = await batch_flat_out(
        pipe,
        channels,
        items=items,
        depth=p.s3_batch_depth,
        duration=p.s3_duration,
        max_messages=p.s3_max_messages,
    )
    delivered = await _deliveries(pool, batch.messages, meter, p)
    pipe.close()
    ingest = batch.messages / batch.seconds
    rows = {
        key: metric(label, "msg/s", "higher", ingest),
        **_helper_rows(delivered, batch.messages, short, f"@{key}"),
    }
    details = {**delivered, "published": batch.messages, "ingest_per_s": ingest}
    return rows, details


async def s4_memory(server: Server, p: Params) -> dict[str, Any]:
    """S4: server RSS per idle subscribed connection (all on one channel)."""
    return await _idle_memory(server, p, "S4", None)


async def s4z_memory_deflate(server: Server, p: Params) -> dict[str, Any]:
    """S4z: S4 with every connection negotiating permessage-deflate (no context
    takeover) against a daemon with ``ws.compression`` on; compared with S4 of
    the same run (``--scenario S4,S4z``)."""
    return await _idle_memory(server, p, "S4z", DEFLATE_OFFER)


async def _idle_memory(server: Server, p: Params, name: str, offer: str | None) -> dict[str, Any]:
    """RSS growth per idle connection at each of ``s4_counts``, then once more after
    one 2 KiB message reached them all: a connection that compressed or sent
    something may keep buffers (a compressor's window) that an idle one never had."""
    _, json_mode = _mode(server, p)
    pool = Pool(json_mode=json_mode, offer=offer)
    try:
        base = tree_rss_bytes(server.pid)
        metrics: dict[str, Any] = {}
        steps = []
        have = 0
        for count in p.s4_counts:
            conn = await _connect(server, pool, ["idle"] * (count - have), p)
            have += conn.subscribed
            seen = await server.wait_subscribers("idle", have, acknowledged=json_mode)
            rss = tree_rss_bytes(server.pid)
            per_conn = (rss - base) / have / 1024 if have else None
            metrics[f"kib_per_conn@{count}"] = metric(
                f"{name} RSS per idle conn @{count}", "KiB", "lower", per_conn
            )
            steps.append(
                {
                    "target": count,
                    "connected": have,
                    "server_subscribers": seen,
                    "rss_mib": rss / 2**20,
                    "kib_per_conn": per_conn,
                    "connect_errors": dict(pool.errors),
                }
            )
        pipe = await HttpPipe.open(HOST, server.control_port)
        try:
            pool.expect(have)
            message = document(time.monotonic_ns())
            await pipe.exchange(request("POST", "/publish/idle", message, "application/json"), 1)
            got_all = await pool.wait_for_messages(
                asyncio.get_running_loop().time() + p.settle_timeout
            )
        finally:
            pipe.close()
        rss = tree_rss_bytes(server.pid)
        per_conn = (rss - base) / have / 1024 if have and got_all else None
        metrics[f"kib_per_conn_after_message@{p.s4_counts[-1]}"] = metric(
            f"{name} RSS per idle conn @{p.s4_counts[-1]}, after one 2 KiB message to all",
            "KiB",
            "lower",
            per_conn,
        )
        details: dict[str, Any] = {
            "base_rss_mib": base / 2**20,
            "steps": steps,
            "after_message": {
                "delivered": pool.messages,
                "expected": have,
                "complete": got_all,
                "compressed": pool.compressed,
                "rss_mib": rss / 2**20,
                "kib_per_conn": per_conn,
            },
        }
        if offer:
            details["deflate"] = dict(pool.deflate)
        return {"metrics": metrics, "details": details}
    finally:
        pool.abort_all()


async def s5_storm(server: Server, p: Params) -> dict[str, Any]:
    """S5: clients connect and subscribe at once (bounded in flight), own channel each."""
    return await _storm(server, p, with_tokens=False)


async def s5p_storm(server: Server, p: Params) -> dict[str, Any]:
    """S5p: S5 with presence on: every channel is in a namespace with ``presence =
    true`` (``pr:s5-N``), so each subscribe also writes a presence entry (on Redis,
    a hash field and a sorted-set member, refreshed by the node's heartbeat)."""
    return await _storm(server, p, with_tokens=False, prefix=f"{PRESENCE_NAMESPACE}:")


async def s5t_storm(server: Server, p: Params) -> dict[str, Any]:
    """S5t: S5 against a daemon with subscriber auth on (``auth.hmac_secret``): each
    client passes its own HS256 token (``sub`` its own, ``channels`` its one channel)
    as ``?token=``, and counts as subscribed at its ``subscribed`` reply, which
    comes after the token was verified (and after an ``authenticated`` event).
    Always JSON mode: in raw mode a client would count itself subscribed at the 101,
    before the token is checked. The tokens are signed before the clock starts."""
    p = dataclasses.replace(p, raw=False)
    return await _storm(server, p, with_tokens=True)


def subscriber_tokens(channels: list[str]) -> list[str]:
    """One HS256 token per channel, signed with AUTH_SECRET, valid for TOKEN_TTL."""
    import jwt  # PyJWT, a dependency of broadcastd; only S5t needs it

    expires = int(time.time()) + TOKEN_TTL
    return [
        jwt.encode(
            {"sub": f"bench-{i}", "channels": [channel], "exp": expires},
            AUTH_SECRET,
            algorithm="HS256",
        )
        for i, channel in enumerate(channels)
    ]


async def _storm(
    server: Server, p: Params, *, with_tokens: bool, prefix: str = ""
) -> dict[str, Any]:
    """S5, S5t and S5p: the connect+subscribe storm, timed, and the server's CPU over
    it; ``prefix`` puts the channels in a namespace."""
    name = "S5t" if with_tokens else "S5p" if prefix else "S5"
    _, json_mode = _mode(server, p)
    pool = Pool(json_mode=json_mode)
    try:
        channels = [f"{prefix}s5-{i}" for i in range(p.s5_clients)]
        tokens = subscriber_tokens(channels) if with_tokens else None
        meter = _Meter(server)
        conn = await _connect(server, pool, channels, p, concurrency=p.s5_in_flight, tokens=tokens)
        usage = meter.done(time.monotonic())
        all_ok = conn.subscribed == conn.attempted
        cpu_ms = (
            usage["server_cpu_s"] / conn.subscribed * 1000
            if conn.subscribed and usage["server_cpu_s"] >= MIN_CPU_S
            else None
        )
        how = ", an HS256 token each" if with_tokens else ", presence on" if prefix else ""
        return {
            "metrics": {
                "seconds": metric(
                    f"{name} {conn.attempted} connect+subscribe{how} ({p.s5_in_flight} in flight)",
                    "s",
                    "lower",
                    conn.seconds if all_ok else None,
                ),
                "per_s": metric(
                    f"{name} subscriptions/s", "conn/s", "higher", conn.subscribed / conn.seconds
                ),
                "cpu_ms": metric(
                    f"{name} server CPU-ms per connect+subscribe", "ms", "lower", cpu_ms
                ),
            },
            "details": {
                **_pool_details(pool, conn),
                "json_mode": json_mode,
                "tokens": with_tokens,
                "presence": bool(prefix),
                "cpu_ms_per_connect": cpu_ms,
                "usage": usage,
            },
        }
    finally:
        pool.abort_all()


async def s6_storm_impact(server: Server, p: Params) -> dict[str, Any]:
    """S6: does a connection storm hurt the connections already open?

    ``s6_subscribers`` steady subscribers of one channel get ``s6_rate``
    publishes/s, one request at a time on an absolute schedule. Quiet phase:
    the stream alone for ``s6_quiet`` seconds. Storm phase: the stream again,
    while ``s6_storm`` clients connect, subscribe to a channel of their own and
    close (``s6_in_flight`` at once, S5's connect machinery, in a process of
    its own at a lower priority: see benchmarks/storm.py); the stream stops
    when the last of them has closed. Each phase ends once its messages reached
    every steady subscriber (or ``settle_timeout`` passed), so the two phases'
    counts are exact: a subscriber missed what it did not get of what was
    published in the phase. The latency is sampled (every ``s6_sample_every``-th
    delivery) as in S1.
    """
    _, json_mode = _mode(server, p)
    replies = 1 if json_mode else 0
    pool = Pool(json_mode=json_mode, sample_every=p.s6_sample_every)
    made: list[Steady] = []
    pipe: HttpPipe | None = None
    publishing: asyncio.Task[PublishStats] | None = None
    storm: StormProcess | None = None

    def steady_subscriber(
        i: int, request: bytes, accept: bytes, ready: asyncio.Future[None]
    ) -> Steady:
        subscriber = Steady(pool, request, accept, replies, ready)
        made.append(subscriber)
        return subscriber

    try:
        conn = await _connect(
            server, pool, [S6_CHANNEL] * p.s6_subscribers, p, make=steady_subscriber
        )
        subscribers = [
            s
            for s in made
            if s.ready.done() and not s.ready.cancelled() and not s.ready.exception()
        ]
        seen = await server.wait_subscribers(S6_CHANNEL, len(subscribers), acknowledged=json_mode)
        n = len(subscribers)

        pool.reset_counts()
        before = received(subscribers)
        pipe = await HttpPipe.open(HOST, server.control_port)
        meter = _Meter(server)
        stats = await paced(
            pipe, S6_CHANNEL, rate=p.s6_rate, count=max(1, int(p.s6_rate * p.s6_quiet))
        )
        quiet = await _deliveries(pool, stats.ok * n, meter, p)
        pipe.close()
        quiet.update(_stream_details(stats, before, received(subscribers)))

        storm = await StormProcess.start(
            StormJob(
                host=HOST,
                ports=server.ws_ports,
                paths=[server.ws_path([f"s6-{i}"], not json_mode) for i in range(p.s6_storm)],
                replies_expected=replies,
                in_flight=p.s6_in_flight,
                timeout=p.connect_timeout,
                cafile=client_cafile(),
            )
        )
        pool.reset_counts()
        before = received(subscribers)
        pipe = await HttpPipe.open(HOST, server.control_port)
        stop = asyncio.Event()
        meter = _Meter(server, clients=[storm.pid])
        publishing = asyncio.create_task(
            paced(
                pipe,
                S6_CHANNEL,
                rate=p.s6_rate,
                count=int(p.s6_rate * p.scenario_timeout),
                stop=stop,
            )
        )
        visits = await storm.run()
        stop.set()
        stats = await publishing
        publishing = None
        during = await _deliveries(pool, stats.ok * n, meter, p)
        pipe.close()
        during.update(_stream_details(stats, before, received(subscribers)))
        during["storm_client_cpu_util"] = visits.cpu_s / max(visits.seconds, 1e-9)
        storm_log = await storm.finish()
        clients = {
            "connected": visits.completed,
            "attempted": visits.attempted,
            "connect_s": round(visits.seconds, 3),
            "connect_errors": visits.errors,
            "closed_by_server": visits.closed_by_server,
            "lost_connections": visits.lost_connections,
            "in_flight": p.s6_in_flight,
            "cpu_s": visits.cpu_s,
            "log": storm_log.splitlines()[-STORM_LOG_LINES:],
        }
        details = {
            **_pool_details(pool, conn),
            "server_subscribers": seen,
            "json_mode": json_mode,
            "quiet": quiet,
            "storm": during,
            "storm_clients": clients,
        }
        return _storm_impact_result(p, n, visits, details)
    finally:
        if publishing is not None:
            publishing.cancel()
            await asyncio.gather(publishing, return_exceptions=True)
        if pipe is not None:
            pipe.close()
        if storm is not None:
            await storm.finish()
        pool.abort_all()


def _stream_details(stats: PublishStats, before: list[int], after: list[int]) -> dict[str, Any]:
    """One S6 phase's stream: what was published, and what each subscriber missed of it."""
    short = list(shortfalls(before, after, stats.ok))
    return {
        "published": stats.ok,
        "publish_statuses": stats.statuses,
        "publishes_per_s": stats.ok / stats.seconds if stats.seconds else None,
        "missed": sum(s for s in short if s > 0),
        "subscribers_missing": sum(1 for s in short if s > 0),
        "duplicates": sum(-s for s in short if s < 0),
        "missed_per_subscriber": _spread(short),
    }


def _storm_impact_result(
    p: Params, n: int, visits: StormResult, details: dict[str, Any]
) -> dict[str, Any]:
    """S6's rows (quiet and storm p99, their ratio, messages missed in the storm, the
    storm's rate), and what is off added to ``details`` as ``problems``."""
    quiet, storm, clients = details["quiet"], details["storm"], details["storm_clients"]
    quiet_p99 = quiet["latency_sampled_ms"]["p99"]
    storm_p99 = storm["latency_sampled_ms"]["p99"]
    ratio = storm_p99 / quiet_p99 if storm_p99 is not None and quiet_p99 else None
    per_s = visits.completed / visits.seconds if visits.seconds else None
    target = f"target <= {STORM_IMPACT_TARGET:g}"
    problems = []
    if ratio is not None and ratio > STORM_IMPACT_TARGET:
        problems.append(f"the storm's p99 is {ratio:.2f}x the quiet p99 ({target})")
    for name, phase in (("quiet phase", quiet), ("storm", storm)):
        if phase["missed"]:
            problems.append(
                f"{phase['subscribers_missing']} of {n} open subscribers missed "
                f"{phase['missed']:,} messages in the {name}"
            )
        if phase["duplicates"]:
            problems.append(f"{phase['duplicates']:,} messages more than published in the {name}")
    if quiet["server_cpu_util"] > SATURATED:
        problems.append(
            f"the stream alone kept the server's core {quiet['server_cpu_util']:.0%} busy: "
            "the storm had no room, and the quiet latency is a saturated one"
        )
    client_load = storm["client_cpu_util"] + storm["storm_client_cpu_util"]
    long_enough = storm["seconds"] >= MIN_PHASE_S  # /proc has 10 ms ticks
    if long_enough and storm["server_cpu_util"] < SATURATED and client_load > SATURATED:
        problems.append(
            f"the load client set the storm's pace, not the server: the stream and the "
            f"storm used {client_load:.2f} cores, the server {storm['server_cpu_util']:.2f}"
        )
    if visits.completed < visits.attempted:
        problems.append(
            f"only {visits.completed:,} of {visits.attempted:,} storm clients "
            f"connected, subscribed and closed: {visits.errors}"
        )
    if visits.closed_by_server:
        problems.append(f"the server closed storm clients {visits.closed_by_server}")
    if clients["log"]:
        problems.append(f"the storm process wrote: {clients['log'][-1][:160]}")
    label = f"S6 {n} open subs, {p.s6_rate:g} msg/s one at a time"
    storm_label = f"{visits.attempted:,} connect+subscribe+close, {p.s6_in_flight} in flight"
    metrics = {
        "quiet_p99_ms": metric(f"{label}: quiet latency p99", "ms", "lower", quiet_p99),
        "storm_p99_ms": metric(
            f"S6 latency p99 during a storm of {storm_label}", "ms", "lower", storm_p99
        ),
        "p99_ratio": metric(f"S6 storm p99 / quiet p99 ({target})", "x", "lower", ratio),
        "storm_missed": metric(
            "S6 messages the open subscribers missed during the storm (target 0)",
            "msg",
            "lower",
            storm["missed"],
        ),
        "storm_per_s": metric("S6 storm connections/s", "conn/s", "higher", per_s),
    }
    details.update(
        storm_s=visits.seconds,
        storm_connections_per_s=per_s,
        p99_ratio=ratio,
        target=STORM_IMPACT_TARGET,
    )
    if problems:
        details["problems"] = problems
    return {"metrics": metrics, "details": details}


async def ps_presence_stats(server: Server, p: Params) -> dict[str, Any]:
    """PS: what presence stats of a big channel cost. ``ps_members`` real subscribers
    join one channel of the presence namespace, then ``ps_requests`` requests
    ``GET /channels/{name}/presence/stats``, one at a time on one keep-alive
    connection, each timed from its write to its response. The daemon answers
    from counters, not by reading every entry (on Redis: the channel's hash and
    sorted set are counted, not scanned), so the latency should not grow with
    the channel; the first answer's counts are checked against the subscribers."""
    p = dataclasses.replace(p, raw=False)
    channel = f"{PRESENCE_NAMESPACE}:ps"
    pool = Pool(json_mode=True)
    pipe: HttpPipe | None = None
    try:
        conn = await _connect(server, pool, [channel] * p.ps_members, p)
        seen = await server.wait_subscribers(channel, conn.subscribed, acknowledged=True)
        pipe = await HttpPipe.open(HOST, server.control_port, keep_bodies=True)
        ask = request("GET", f"/channels/{channel}/presence/stats")
        await pipe.exchange(ask, 1)
        first = pipe.responses.pop()
        answer = json.loads(first.body) if first.status == 200 else None
        problems = []
        if answer is None:
            problems.append(f"presence stats answered {first.status}: {first.body[:120]!r}")
        elif answer.get("clients") != conn.subscribed:
            problems.append(
                f"presence stats counted {answer.get('clients')} clients, "
                f"{conn.subscribed} are subscribed"
            )
        samples: array[int] = array("q")
        meter = _Meter(server)
        for _ in range(p.ps_requests):
            sent = time.monotonic_ns()
            await pipe.exchange(ask, 1)
            samples.append(time.monotonic_ns() - sent)
        usage = meter.done(time.monotonic())
        statuses = Counter(r.status for r in pipe.responses)
        pipe.responses.clear()
        if set(statuses) != {200}:
            problems.append(f"presence stats statuses {dict(statuses)}")
        lat = percentiles_ms(samples)
        cpu_us = (
            usage["server_cpu_s"] / p.ps_requests * 1e6
            if usage["server_cpu_s"] >= MIN_CPU_S
            else None
        )
        n = conn.subscribed
        label = f"PS presence stats of a {n:,}-member channel"
        details: dict[str, Any] = {
            **_pool_details(pool, conn),
            "server_subscribers": seen,
            "answer": answer,
            "requests": p.ps_requests,
            "statuses": {str(k): v for k, v in statuses.items()},
            "latency_ms": lat,
            "server_cpu_us_per_request": cpu_us,
            "usage": usage,
            "target_p99_ms": PRESENCE_STATS_TARGET_MS,
        }
        if lat["p99"] is not None and lat["p99"] > PRESENCE_STATS_TARGET_MS:
            problems.append(
                f"presence stats p99 {lat['p99']:.2f} ms (target <= {PRESENCE_STATS_TARGET_MS} ms)"
            )
        if problems:
            details["problems"] = problems
        return {
            "metrics": {
                "p50_ms": metric(f"{label}: latency p50", "ms", "lower", lat["p50"]),
                "p99_ms": metric(
                    f"PS latency p99 (target <= {PRESENCE_STATS_TARGET_MS:g} ms)",
                    "ms",
                    "lower",
                    lat["p99"],
                ),
                "max_ms": metric("PS latency max", "ms", "lower", lat["max"]),
                "cpu_us": metric("PS server CPU-us per request", "us", "lower", cpu_us),
            },
            "details": details,
        }
    finally:
        if pipe is not None:
            pipe.close()
        pool.abort_all()


async def jl_join_leave_storm(server: Server, p: Params) -> dict[str, Any]:
    """JL: a reconnect storm in a ``join_leave`` room beside a steady stream elsewhere.

    ``jl_steady`` subscribers spread over ``jl_channels`` other channels get
    ``jl_rate`` publishes/s round-robin (``steady``: an absolute schedule). The
    room's ``jl_room`` members live in a process of their own
    (benchmarks/joinleave.py). Quiet phase: the stream alone for ``jl_quiet``
    seconds. Storm phase: the stream again while every member closes and at once
    reconnects (``connect_concurrency`` handshakes in flight); it ends when the
    members are back and no join or leave came for ``jl_event_quiet`` seconds.
    Each phase then waits until its messages reached every steady subscriber, so
    what each missed is exact. The rows: the stream's p99 quiet and during the
    storm, their ratio, what the steady subscribers missed, and how many join
    and leave events the members got (each is one delivery)."""
    p = dataclasses.replace(p, raw=False)
    room = f"{ROOM_NAMESPACE}:room"
    channels = [f"jls-{i}" for i in range(max(1, p.jl_channels))]
    pool = Pool(json_mode=True, sample_every=p.jl_sample_every)
    made: list[tuple[int, Steady]] = []
    pipe: HttpPipe | None = None
    publishing: asyncio.Task[PublishStats] | None = None
    members: RoomProcess | None = None

    def steady_subscriber(
        i: int, request: bytes, accept: bytes, ready: asyncio.Future[None]
    ) -> Steady:
        subscriber = Steady(pool, request, accept, 1, ready)
        made.append((i % len(channels), subscriber))
        return subscriber

    async def phase(stop_when: Callable[[], Awaitable[Any]], clients: Sequence[int] = ()) -> Any:
        """The stream until ``stop_when`` returns; its deliveries, and what it returned."""
        nonlocal pipe, publishing
        pool.reset_counts()
        before = received([s for _, s in subscribers])
        pipe = await HttpPipe.open(HOST, server.control_port)
        stop = asyncio.Event()
        meter = _Meter(server, clients=clients)
        publishing = asyncio.create_task(
            steady(
                pipe,
                channels,
                rate=p.jl_rate,
                stop=stop,
                max_messages=int(p.jl_rate * p.scenario_timeout),
            )
        )
        outcome = await stop_when()
        stop.set()
        stats = await publishing
        publishing = None
        due = _due_per_channel(stats.ok, len(channels))
        expected = [due[k] for k, _ in subscribers]
        result = await _deliveries(pool, sum(expected), meter, p)
        pipe.close()
        after = received([s for _, s in subscribers])
        short = [e - (b - a) for e, a, b in zip(expected, before, after, strict=True)]
        result.update(
            published=stats.ok,
            publish_statuses=stats.statuses,
            missed=sum(x for x in short if x > 0),
            subscribers_missing=sum(1 for x in short if x > 0),
            duplicates=sum(-x for x in short if x < 0),
        )
        return result, outcome

    try:
        paths = [server.ws_path([channels[i % len(channels)]], False) for i in range(p.jl_steady)]
        conn = await pool.connect(
            HOST,
            server.ws_ports,
            paths,
            replies_expected=1,
            concurrency=p.connect_concurrency,
            deadline=asyncio.get_running_loop().time() + p.connect_timeout,
            make=steady_subscriber,
        )
        subscribers = [
            (k, s)
            for k, s in made
            if s.ready.done() and not s.ready.cancelled() and not s.ready.exception()
        ]
        members = await RoomProcess.start(
            RoomJob(
                host=HOST,
                ports=server.ws_ports,
                path=server.ws_path([room], False),
                members=p.jl_room,
                in_flight=p.connect_concurrency,
                timeout=p.connect_timeout,
                quiet=p.jl_event_quiet,
                cafile=client_cafile(),
            )
        )
        in_room = int(members.ready_info or 0)
        room_seen = await server.wait_subscribers(room, in_room, acknowledged=True)
        quiet, _ = await phase(lambda: asyncio.sleep(p.jl_quiet))
        room_process = members
        storm, visit = await phase(room_process.go, clients=[room_process.pid])
        storm["room_client_cpu_util"] = visit["cpu_s"] / max(visit["events_s"], 1e-9)
        log = await members.finish()
        details = {
            **_pool_details(pool, conn),
            "room_members": in_room,
            "room_server_subscribers": room_seen,
            "quiet": quiet,
            "storm": storm,
            "room": {**visit, "log": log.splitlines()[-STORM_LOG_LINES:]},
        }
        return _join_leave_result(p, len(subscribers), in_room, details)
    finally:
        if publishing is not None:
            publishing.cancel()
            await asyncio.gather(publishing, return_exceptions=True)
        if pipe is not None:
            pipe.close()
        if members is not None:
            await members.finish()
        pool.abort_all()


def _due_per_channel(published: int, channels: int) -> list[int]:
    """Messages each channel got of ``published`` round-robin publishes from the first."""
    return [published // channels + (1 if k < published % channels else 0) for k in range(channels)]


def _join_leave_result(p: Params, n: int, in_room: int, details: dict[str, Any]) -> dict[str, Any]:
    """JL's rows, and what is off added to ``details`` as ``problems``."""
    quiet, storm, visit = details["quiet"], details["storm"], details["room"]
    quiet_p99 = quiet["latency_sampled_ms"]["p99"]
    storm_p99 = storm["latency_sampled_ms"]["p99"]
    ratio = storm_p99 / quiet_p99 if storm_p99 is not None and quiet_p99 else None
    most = in_room * max(0, in_room - 1)
    problems = []
    for name, part in (("quiet phase", quiet), ("storm", storm)):
        if part["missed"] or part["duplicates"]:
            problems.append(
                f"{part['subscribers_missing']} of {n} steady subscribers missed "
                f"{part['missed']:,} messages ({part['duplicates']:,} extra) in the {name}"
            )
    if visit["reconnected"] < visit["attempted"]:
        problems.append(
            f"only {visit['reconnected']} of {visit['attempted']} room members came back: "
            f"{visit['errors']}"
        )
    if visit["closed_by_server"]:
        problems.append(f"the server closed room members {visit['closed_by_server']}")
    if visit.get("told", {}).get("false"):
        problems.append(
            f"{visit['told']['false']} members were told join_leave false (beyond the "
            "namespace's join_leave_max_subscribers while old and new connections overlapped)"
        )
    if visit["log"]:
        problems.append(f"the room process wrote: {visit['log'][-1][:160]}")
    if problems:
        details["problems"] = problems
    details.update(p99_ratio=ratio, events_most_each=most)
    label = f"JL {n} subs on {p.jl_channels} other channels, {p.jl_rate:g} msg/s"
    return {
        "metrics": {
            "quiet_p99_ms": metric(f"{label}: quiet latency p99", "ms", "lower", quiet_p99),
            "storm_p99_ms": metric(
                f"JL latency p99 while a join_leave room of {in_room} reconnects",
                "ms",
                "lower",
                storm_p99,
            ),
            "p99_ratio": metric("JL storm p99 / quiet p99", "x", "lower", ratio),
            "storm_missed": metric(
                "JL messages the other channels' subscribers missed in the storm",
                "msg",
                "lower",
                storm["missed"],
            ),
            "reconnect_s": metric(
                f"JL s until all {in_room} members reconnected", "s", "lower", visit["reconnect_s"]
            ),
            "events_s": metric(
                "JL s until the last join/leave event arrived", "s", "lower", visit["events_s"]
            ),
            "joins": metric(
                f"JL join events the members received (at most {most:,})",
                "events",
                "higher",
                visit["joins"],
            ),
            "leaves": metric(
                f"JL leave events the members received (at most {most:,})",
                "events",
                "higher",
                visit["leaves"],
            ),
        },
        "details": details,
    }


COMPARED = (
    ("S5t", TOKEN_COST_TARGET, "what tokens cost", "tokens"),
    ("S5p", PRESENCE_COST_TARGET, "what presence costs", "presence"),
)
"""Scenarios compared with S5 of the same server and run: (name, target, what the
ratio is, what the problem line blames)."""

SSE_COST_TARGET = 1.2
"""S1s: SSE's deliveries/s and server CPU per delivery within 1.2x of WebSocket's."""
PAIRED = (
    ("S1s", "S1", "SSE / WebSocket"),
    ("S1z", "S1k", "deflate / uncompressed"),
    ("S4z", "S4", "deflate / uncompressed"),
)
"""Scenarios whose every row is compared with the same row of another scenario of
the same server and run: (name, compared with, what the ratio is)."""


def compare(scenarios: dict[str, Any], runs: dict[str, list[dict[str, Any]]] | None = None) -> None:
    """Rows that need two scenarios of one server: S5t's and S5p's cost against S5 (all
    in JSON mode), added to their metrics, with a problem noted above their target.

    With S5 and S5t (or S5p) repeated (``--scenario S5,S5t,S5,S5t,...``; ``runs``
    holds every run of each), the i-th S5t is compared with the i-th S5 and the
    rows are the median of those pairs: on a shared VM one pair ranges over tenths."""
    for name, target, what, blamed in COMPARED:
        _versus_s5(scenarios, runs or {}, name, target, what, blamed)
    for name, base, what in PAIRED:
        _versus(scenarios, runs or {}, name, base, what)


def _versus(
    scenarios: dict[str, Any],
    runs: dict[str, list[dict[str, Any]]],
    name: str,
    base: str,
    what: str,
) -> None:
    """A ``vs:KEY`` row (``name`` / ``base``) after each row of ``name`` that ``base``
    has too; with both repeated, the median of the pairs (i-th with i-th). S1s's
    rows are held against SSE_COST_TARGET (in both directions: deliveries/s at
    least 1/1.2 of WebSocket's, CPU per delivery at most 1.2x)."""
    plain, other = scenarios.get(base, {}), scenarios.get(name, {})
    if "metrics" not in plain or "metrics" not in other:
        return
    pairs = [
        (a, b)
        for a, b in zip(runs.get(base, [plain]), runs.get(name, [other]), strict=False)
        if "metrics" in a and "metrics" in b
    ]
    rows: dict[str, Any] = {}
    ratios: dict[str, Any] = {"pairs": len(pairs)}
    how = f" (median of {len(pairs)} pairs)" if len(pairs) > 1 else ""
    for key, m in other["metrics"].items():
        rows[key] = m
        if key.startswith("vs:") or key not in plain["metrics"]:
            continue
        each = [
            b["metrics"][key]["value"] / a["metrics"][key]["value"]
            for a, b in pairs
            if key in a["metrics"]
            and key in b["metrics"]
            and b["metrics"][key]["value"] is not None
            and a["metrics"][key]["value"]
        ]
        ratio = statistics.median(each) if each else None
        rows[f"vs:{key}"] = metric(f"{m['label']}: {what}{how}", "x", m["better"], ratio)
        ratios[key] = {"ratio": ratio, "each": each}
        if name == "S1s" and ratio is not None and key.startswith(("deliveries", "cpu")):
            worse = (
                ratio < 1 / SSE_COST_TARGET if m["better"] == "higher" else ratio > SSE_COST_TARGET
            )
            if worse:
                other["details"].setdefault("problems", []).append(
                    f"SSE {key} is {ratio:.2f}x WebSocket's (target: within {SSE_COST_TARGET:.1f}x)"
                )
    other["metrics"] = rows
    other["details"][f"vs_{base}"] = ratios


def _versus_s5(
    scenarios: dict[str, Any],
    runs: dict[str, list[dict[str, Any]]],
    name: str,
    target_ratio: float,
    what: str,
    blamed: str,
) -> None:
    plain, other = scenarios.get("S5", {}), scenarios.get(name, {})
    if "metrics" not in plain or "metrics" not in other:
        return
    if not plain["details"].get("json_mode"):
        other["details"]["vs_S5"] = "not compared: S5 ran in raw mode (--raw)"
        return
    pairs = [
        (a, b)
        for a, b in zip(runs.get("S5", [plain]), runs.get(name, [other]), strict=False)
        if "metrics" in a and "metrics" in b
    ]

    def ratio(key: str) -> tuple[float | None, list[float]]:
        each = [
            b["metrics"][key]["value"] / a["metrics"][key]["value"]
            for a, b in pairs
            if b["metrics"][key]["value"] is not None and a["metrics"][key]["value"]
        ]
        return (statistics.median(each) if each else None), each

    (time_ratio, times), (cpu_ratio, cpus) = ratio("seconds"), ratio("cpu_ms")
    target = f"target <= {target_ratio:.2f}"
    how = f"median of {len(pairs)} pairs, " if len(pairs) > 1 else ""
    other["metrics"]["time_ratio"] = metric(
        f"{name} / S5 time: {what} ({how}{target})", "x", "lower", time_ratio
    )
    other["metrics"]["cpu_ratio"] = metric(
        f"{name} / S5 server CPU per connect+subscribe{f' ({how[:-2]})' if how else ''}",
        "x",
        "lower",
        cpu_ratio,
    )
    other["details"]["vs_S5"] = {
        "time_ratio": time_ratio,
        "cpu_ratio": cpu_ratio,
        "pairs": len(pairs),
        "time_ratios": times,
        "cpu_ratios": cpus,
        "per_s_without": plain["metrics"]["per_s"]["value"],
        "per_s_with": other["metrics"]["per_s"]["value"],
        "target": target_ratio,
    }
    for kind, value in (("time", time_ratio), ("server CPU", cpu_ratio)):
        if value is not None and value > target_ratio:
            other["details"].setdefault("problems", []).append(
                f"{blamed} cost {value:.2f}x the {kind} of S5 ({target})"
            )


async def r_recovery(server: Server, p: Params) -> dict[str, Any]:
    """R: every client drops at once under a steady publish stream, then all resume.

    ``r_clients`` clients spread over ``r_channels`` channels subscribe (JSON
    mode), the publisher starts ``r_rate`` publishes/s round-robin over the
    channels, and after ``r_warmup`` seconds every connection is aborted (TCP
    RST) in the same instant. Publishing goes on; ``r_outage`` seconds later all
    clients reconnect at once (``connect_concurrency`` handshakes in flight) with
    ``since=CHANNEL:EPOCH:LAST``, the position of the last message each one got.
    A client is live again when it got its replay (offsets LAST+1..TOP, TOP
    from its ``subscribed`` reply) and then a message newer than TOP. Every
    offset is checked, before and after the drop: each must be the last one + 1.
    """
    if not server.recovery:
        raise RuntimeError(f"{server.name} has no recovery protocol")
    loop = asyncio.get_running_loop()
    fleet = Fleet()
    channels = [f"r-{i}" for i in range(max(1, p.r_channels))]
    tracks = [Track(channels[i % len(channels)], fleet) for i in range(p.r_clients)]
    first = Pool(json_mode=True)
    second = Pool(json_mode=True)
    stop = asyncio.Event()
    publishing: asyncio.Task[Any] | None = None
    pipe: HttpPipe | None = None
    try:
        conn = await first.connect(
            HOST,
            server.ws_port,
            [t.subscribe_path() for t in tracks],
            replies_expected=1,
            concurrency=p.connect_concurrency,
            deadline=loop.time() + p.connect_timeout,
            make=lambda i, request, accept, ready: Resumer(
                first, request, accept, ready, tracks[i]
            ),
        )
        clients = [t for t in tracks if t.subscribed_at is not None]
        pipe = await HttpPipe.open(HOST, server.control_port)
        publishing = asyncio.create_task(
            steady(
                pipe,
                channels,
                rate=p.r_rate,
                stop=stop,
                max_messages=int(p.r_rate * p.scenario_timeout),
            )
        )
        steady_meter = _Meter(server)
        await asyncio.sleep(p.r_warmup)
        steady_state = steady_meter.done(time.monotonic())
        if publishing.done():
            await publishing  # raises what stopped it
            raise RuntimeError("the publisher stopped before the drop")
        first.abort_all()
        dropped_at = time.monotonic()
        before = [t.begin_recovery() for t in clients]
        await asyncio.sleep(p.r_outage)
        fleet.expect(len(clients))
        meter = _Meter(server)
        started = time.monotonic()
        again = await second.connect(
            HOST,
            server.ws_port,
            [t.resume_path() for t in clients],
            replies_expected=1,
            concurrency=p.connect_concurrency,
            deadline=loop.time() + p.connect_timeout,
            make=lambda i, request, accept, ready: Resumer(
                second, request, accept, ready, clients[i]
            ),
        )
        fleet.expect(again.subscribed)  # a client that could not reconnect never goes live
        try:
            async with asyncio.timeout(p.settle_timeout):
                await fleet.all_live.wait()
        except TimeoutError:
            pass
        last_live = max((t.live_at for t in clients if t.live_at is not None), default=None)
        usage = meter.done(last_live or time.monotonic())
        stop.set()
        stats = await publishing
        publishing = None
        extra = {
            "history_size": server.env().get(HISTORY_SIZE, "default (100)"),
            "steady_state": steady_state,
            "outage_s": started - dropped_at,
            "published": stats.ok,
            "publish_statuses": stats.statuses,
            "publishes_per_s": stats.ok / stats.seconds if stats.seconds else None,
        }
        return _recovery_result(
            p, clients, before, started, (conn, again), (first, second), usage, extra
        )
    finally:
        stop.set()
        if publishing is not None:
            publishing.cancel()
            await asyncio.gather(publishing, return_exceptions=True)
        if pipe is not None:
            pipe.close()
        first.abort_all()
        second.abort_all()


def _recovery_result(
    p: Params,
    clients: list[Track],
    before: list[dict[str, int]],
    started: float,
    conns: tuple[ConnectResult, ConnectResult],
    pools: tuple[Pool, Pool],
    usage: dict[str, float],
    extra: dict[str, Any],
) -> dict[str, Any]:
    """R's metrics and details from the tracks of the clients that subscribed;
    times are seconds from the start of the reconnect burst (``started``)."""
    conn, again = conns
    first, second = pools
    n = len(clients)
    live = [t.live_at - started for t in clients if t.live_at is not None]
    all_live = max(live) if live and len(live) == n else None
    replies = [t.subscribed_at - started for t in clients if t.subscribed_at is not None]
    replays = [t.replay_done_at - started for t in clients if t.replay_done_at is not None]
    replayed = sum(t.replayed for t in clients)
    recovered = [t for t in clients if t.recovered is True]
    refused = [t for t in clients if t.recovered is False]
    missed = [t.top - t.since for t in recovered]
    kinds = ("gaps", "duplicates", "foreign", "before_reply")
    after = {k: sum(getattr(t, k) for t in clients) for k in kinds}
    prior = {k: sum(b[k] for b in before) for k in kinds}
    violations = sum(after.values())
    unexpected: Counter[str] = Counter()
    for t in clients:
        unexpected.update(t.unexpected_replies)
    nch = len({t.channel for t in clients})
    label = f"R {n} clients resume ({nch} ch, {p.r_rate:g} msg/s published)"
    metrics = {
        "seconds_to_live": metric(f"{label}: s until all live", "s", "lower", all_live),
        "replayed_per_s": metric(
            "R replayed msg/s (replayed / s until all live)",
            "msg/s",
            "higher",
            replayed / all_live if all_live else None,
        ),
        "replayed": metric("R messages replayed", "msg", "higher", replayed),
        "recovered_true": metric("R clients recovered: true", "clients", "higher", len(recovered)),
        "recovered_false": metric("R clients recovered: false", "clients", "lower", len(refused)),
        "ordering_violations": metric(
            "R ordering violations after resume", "count", "lower", violations
        ),
    }
    details: dict[str, Any] = {
        "clients": n,
        "connected": again.subscribed,
        "attempted": again.attempted,
        "connect_errors": dict(first.errors + second.errors),
        "closed_by_server": {
            str(k): v for k, v in (first.closed_by_server + second.closed_by_server).items()
        },
        "lost_connections": second.lost_connections,
        **extra,
        "live": len(live),
        "not_live": n - len(live),
        "s_to_all_subscribed": max(replies, default=None),
        "s_to_all_replayed": max(replays, default=None),
        "s_to_all_live": all_live,
        "live_s": _spread(live),
        "recovered_true": len(recovered),
        "recovered_false": len(refused),
        "refusal_reasons": dict(Counter(str(t.reason) for t in refused)),
        "replayed": replayed,
        "replay_expected": sum(missed),
        "missed_per_client": _spread(missed),
        "ordering_violations": violations,
        "violations_by_kind": after,
        "unexpected_replies": dict(unexpected),
        "recovery_phase": usage,
        "before_drop": {
            "connected": conn.subscribed,
            "attempted": conn.attempted,
            "connect_s": conn.seconds,
            "messages": sum(b["messages"] for b in before),
            "epochs_missing": sum(t.epoch is None for t in clients),
            "ordering_violations": prior,
        },
    }
    return {"metrics": metrics, "details": details}


def _spread(values: list[float] | list[int]) -> dict[str, float | None]:
    """min, median, p99 and max of a small list (one value per client)."""
    if not values:
        return {"min": None, "p50": None, "p99": None, "max": None}
    ordered = sorted(values)
    return {
        "min": ordered[0],
        "p50": statistics.median(ordered),
        "p99": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
        "max": ordered[-1],
    }


def unsupported(scenario: str, server: type[Server]) -> str | None:
    """Why ``server`` does not run ``scenario`` (None if it does)."""
    if server.only is not None and scenario not in server.only:
        return server.only_why
    if scenario == "R" and not server.recovery:
        return "no resume from a position (since=CHANNEL:EPOCH:OFFSET): R is for broadcastd"
    if scenario == "S5t" and not server.tokens:
        return "no subscriber tokens (?token=JWT): S5t is for broadcastd"
    if scenario == "S1c" and not server.conflation:
        return "no conflating namespaces: S1c is for broadcastd"
    if scenario in ("S5p", "PS", "JL") and not server.presence:
        return f"no presence or join/leave events: {scenario} is for broadcastd"
    if scenario == "S1s" and not server.sse:
        return "no Server-Sent Events on the subscriber URL: S1s is for broadcastd"
    if scenario in ("S1z", "S4z") and not server.deflate:
        return f"no permessage-deflate setting: {scenario} is for broadcastd"
    return None


def server_env(scenario: str, p: Params) -> dict[str, str]:
    """Environment the server of ``scenario`` gets on top of the runner's. For R the
    runner's wins (``BROADCASTD_HISTORY__SIZE=100 python -m benchmarks`` measures
    100); S5t's secret and S1c's namespace are what those scenarios are about."""
    if scenario == "R" and p.r_history_size is not None and HISTORY_SIZE not in os.environ:
        return {HISTORY_SIZE: str(p.r_history_size)}
    if scenario == "S5t":
        return {"BROADCASTD_AUTH__HMAC_SECRET": AUTH_SECRET}
    if scenario == "S1c":
        namespaces = [{"name": CONFLATE_NAMESPACE, "slow_consumer_policy": "conflate"}]
        return {"BROADCASTD_NAMESPACES": json.dumps(namespaces)}
    if scenario in ("S5p", "PS", "JL"):
        return {"BROADCASTD_NAMESPACES": json.dumps(PRESENCE_NAMESPACES)}
    if scenario in ("S1z", "S4z"):
        return {COMPRESSION: "true"}
    return {}


Scenario = Callable[[Server, Params], Awaitable[dict[str, Any]]]
SCENARIOS: dict[str, Scenario] = {
    "S1": s1_fanout,
    "S1c": s1c_conflate,
    "S2b": s2b_latency,
    "S3": s3_channels,
    "S4": s4_memory,
    "S5": s5_storm,
    "S5t": s5t_storm,
    "S6": s6_storm_impact,
    "R": r_recovery,
    "S5p": s5p_storm,
    "PS": ps_presence_stats,
    "JL": jl_join_leave_storm,
    "S1s": s1s_fanout_sse,
    "S1k": s1k_fanout_2k,
    "S1z": s1z_fanout_deflate,
    "S4z": s4z_memory_deflate,
}
