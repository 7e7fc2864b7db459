"""The benchmark scenarios, S1 to S5, each against one freshly started server.

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
import time
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
from benchmarks.publisher import HttpPipe, batch_flat_out, flat_out, paced
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
    connect_timeout=20.0,
    settle_timeout=5.0,
    sample_every=7,
    scenario_timeout=30.0,
)


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
        server.ws_port,
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
    """Server CPU, client CPU and wall time over one measured phase."""

    def __init__(self, server: Server) -> None:
        self.pid = server.pid
        self.wall = time.monotonic()
        self.server_cpu = tree_cpu_seconds(self.pid)
        self.client_cpu = self_cpu_seconds()
        self.before = snapshot()

    def done(self, end: float) -> dict[str, float]:
        wall = max(end - self.wall, 1e-9)
        server_cpu = tree_cpu_seconds(self.pid) - self.server_cpu
        client_cpu = self_cpu_seconds() - self.client_cpu
        return {
            "seconds": wall,
            "server_cpu_s": server_cpu,
            "server_cpu_util": server_cpu / wall,
            "client_cpu_util": client_cpu / wall,
            **load_elsewhere(self.before, {*descendants(self.pid), os.getpid()}, wall),
        }


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
        }
        details: dict[str, Any] = {
            **_pool_details(pool, conn),
            "single": {**single, "published": stats.ok, "publish_statuses": stats.statuses},
        }
        if server.batch:
            label = f"S3 /batch ingest ({p.s3_batch_items}/request)"
            metrics["batch_ingest_per_s"], details["batch"] = await _batch_phase(
                server, pool, channels, p.s3_batch_items, label, p
            )
            # The same batches over a few hot channels: every subscriber then gets
            # many messages per pass of the writers, so one socket write carries
            # many of them and the figure shows the ingest path itself rather than
            # one write system call per message.
            hot = channels[: p.s3_hot_channels]
            label = f"S3 /batch ingest ({p.s3_hot_batch_items}/request, {len(hot)} channels)"
            metrics["hot_batch_ingest_per_s"], details["hot_batch"] = await _batch_phase(
                server, pool, hot, p.s3_hot_batch_items, label, p
            )
        return {"metrics": metrics, "details": details}
    finally:
        pool.abort_all()


async def _batch_phase(
    server: Server, pool: Pool, channels: list[str], items: int, label: str, p: Params
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Flat-out ``POST /batch`` of ``items`` messages round-robin over ``channels``:
    the ingest metric and the details behind it."""
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
    details = {**delivered, "published": batch.messages, "ingest_per_s": ingest}
    return metric(label, "msg/s", "higher", ingest), details


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


Scenario = Callable[[Server, Params], Awaitable[dict[str, Any]]]
SCENARIOS: dict[str, Scenario] = {
    "S1": s1_fanout,
    "S2b": s2b_latency,
    "S3": s3_channels,
    "S4": s4_memory,
    "S5": s5_storm,
}
