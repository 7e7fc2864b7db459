"""The benchmark scenarios, S1 to S5 and R, each against one freshly started server.

Every scenario returns ``{"metrics": {...}, "details": {...}}``: metrics are
the headline figures the report tabulates (each with its label, unit and which
direction is better), details are what one needs to trust them (subscribers
the server itself counted, deliveries expected vs received, connections the
server closed, the client's own CPU use - near 1.0 means the client, not the
server, was the bottleneck).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from benchmarks.procstat import (
    descendants,
    load_elsewhere,
    self_cpu_seconds,
    snapshot,
    tree_cpu_seconds,
    tree_rss_bytes,
)
from benchmarks.publisher import HttpPipe, batch_flat_out, flat_out, paced, steady
from benchmarks.recovery import Fleet, Resumer, Track
from benchmarks.servers import HOST, Server
from benchmarks.stats import percentiles_ms
from benchmarks.wsclient import ConnectResult, Pool


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


HISTORY_SIZE = "BROADCASTD_HISTORY__SIZE"
"""The daemon setting R raises (``Params.r_history_size``)."""

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
    server: Server, pool: Pool, channels: list[str], p: Params, concurrency: int | None = None
) -> ConnectResult:
    """One connection per entry of ``channels``, each subscribed to that channel."""
    raw, json_mode = _mode(server, p)
    paths = [server.ws_path([c], raw) for c in channels]
    return await pool.connect(
        HOST,
        server.ws_ports,  # a cluster's nodes take turns
        paths,
        replies_expected=1 if json_mode else 0,
        concurrency=concurrency or p.connect_concurrency,
        deadline=asyncio.get_running_loop().time() + p.connect_timeout,
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
    /proc/PID/stat), client CPU and wall time over one measured phase."""

    def __init__(self, server: Server) -> None:
        self.pids = server.node_pids()
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
        ours = {os.getpid(), *self.helpers.values()}
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
    _, json_mode = _mode(server, p)
    pool = Pool(json_mode=json_mode, sample_every=p.sample_every)
    try:
        conn = await _connect(server, pool, ["s1"] * p.s1_subscribers, p)
        seen = await server.wait_subscribers("s1", conn.subscribed, acknowledged=json_mode)
        n = conn.subscribed
        metrics: dict[str, Any] = {}
        details: dict[str, Any] = {**_pool_details(pool, conn), "server_subscribers": seen}
        for depth in dict.fromkeys((p.s1_depth, 1)):
            pool.reset_counts()
            pipe = await HttpPipe.open(HOST, server.control_port)
            meter = _Meter(server)
            stats = await flat_out(
                pipe, ["s1"], depth=depth, duration=p.s1_duration, max_messages=p.s1_max_messages
            )
            result = await _deliveries(pool, stats.ok * n, meter, p)
            pipe.close()
            details[f"depth{depth}"] = {
                **result,
                "published": stats.ok,
                "publish_statuses": stats.statuses,
                "publishes_per_s": stats.ok / stats.seconds,
            }
            how = f"{depth} pipelined" if depth > 1 else "1 in flight"
            metrics[f"deliveries_per_s@{depth}"] = metric(
                f"S1 fan-out {n} subs, {how}: deliveries/s",
                "msg/s",
                "higher",
                result["deliveries_per_s"],
            )
            metrics[f"cpu_s_per_1m@{depth}"] = metric(
                f"S1 {how}: server CPU-s per 1M deliveries", "s", "lower", result["cpu_s_per_1m"]
            )
            metrics.update(_helper_rows(result, stats.ok, f"S1 {how}", f"@{depth}"))
            if not result["complete"]:
                break  # the server shed subscribers: the next phase would measure nothing
        details.update(_pool_details(pool, conn))
        return {"metrics": metrics, "details": details}
    finally:
        pool.abort_all()


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
    _, json_mode = _mode(server, p)
    pool = Pool(json_mode=json_mode)
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
                f"S4 RSS per idle conn @{count}", "KiB", "lower", per_conn
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
        return {"metrics": metrics, "details": {"base_rss_mib": base / 2**20, "steps": steps}}
    finally:
        pool.abort_all()


async def s5_storm(server: Server, p: Params) -> dict[str, Any]:
    """S5: clients connect and subscribe at once (bounded in flight), own channel each."""
    _, json_mode = _mode(server, p)
    pool = Pool(json_mode=json_mode)
    try:
        channels = [f"s5-{i}" for i in range(p.s5_clients)]
        conn = await _connect(server, pool, channels, p, concurrency=p.s5_in_flight)
        all_ok = conn.subscribed == conn.attempted
        return {
            "metrics": {
                "seconds": metric(
                    f"S5 {conn.attempted} connect+subscribe ({p.s5_in_flight} in flight)",
                    "s",
                    "lower",
                    conn.seconds if all_ok else None,
                ),
                "per_s": metric(
                    "S5 subscriptions/s", "conn/s", "higher", conn.subscribed / conn.seconds
                ),
            },
            "details": _pool_details(pool, conn),
        }
    finally:
        pool.abort_all()


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
    return None


def server_env(scenario: str, p: Params) -> dict[str, str]:
    """Environment the server of ``scenario`` gets on top of the runner's (which
    wins: ``BROADCASTD_HISTORY__SIZE=100 python -m benchmarks`` measures 100)."""
    if scenario == "R" and p.r_history_size is not None and HISTORY_SIZE not in os.environ:
        return {HISTORY_SIZE: str(p.r_history_size)}
    return {}


Scenario = Callable[[Server, Params], Awaitable[dict[str, Any]]]
SCENARIOS: dict[str, Scenario] = {
    "S1": s1_fanout,
    "S2b": s2b_latency,
    "S3": s3_channels,
    "S4": s4_memory,
    "S5": s5_storm,
    "R": r_recovery,
}
