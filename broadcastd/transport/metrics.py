"""Prometheus metrics: the Observer that counts, and the collector that exposes.

Counting happens on the hot path, so it is plain integer arithmetic on one
object, bumped once per fan-out and once per writer wake-up, never once per
delivery; the two latency histograms are exact (every writer wake-up and every
keepalive pong is observed) because a bucket increment costs less than a
sampling decision would save. Gauges that describe the current state - clients,
channels, queue depths - are computed from the daemon's own structures at
scrape time. Everything lives in a per-daemon registry, so several daemons in
one process (the tests) never share a series.
"""

from __future__ import annotations

import asyncio
import platform
import sys
import time
from bisect import bisect_left
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeHistogramMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector
from websockets.version import version as websockets_version

from broadcastd import __version__, log
from broadcastd.errors import CloseReason

if TYPE_CHECKING:
    from broadcastd.node import Node
    from broadcastd.transport.ws import WsServer

NAMESPACE = "broadcastd"
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


class Histogram:
    """Cumulative-on-export bucket counts; observe() is a bisect and two adds."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    def family(self, name: str, documentation: str) -> HistogramMetricFamily:
        buckets = _cumulative(self.bounds, self.counts)
        return HistogramMetricFamily(name, documentation, buckets=buckets, sum_value=self.total)


def _cumulative(bounds: Sequence[float], counts: Sequence[int]) -> list[tuple[str, float]]:
    """Per-bucket counts (the last one above every bound) as Prometheus ``le`` buckets."""
    buckets: list[tuple[str, float]] = []
    running = 0
    for bound, count in zip((*bounds, float("inf")), counts, strict=True):
        running += count
        le = "+Inf" if bound == float("inf") else repr(float(bound))
        buckets.append((le, running))
    return buckets


class Metrics:
    """The Observer behind /metrics: every event the daemon reports, counted."""

    def __init__(self) -> None:
        self.published_by_form: dict[str, int] = dict.fromkeys(PUBLISH_FORMS, 0)
        """A plain dict of the known forms: bumped on every publish, so no Counter."""
        self.deliveries = 0
        self.frames_sent = 0
        self.bytes_sent = 0
        self.writes = 0
        self.dropped_by_reason: Counter[str] = Counter()
        self.slow_consumers: Counter[str] = Counter()
        self.accepted = 0
        self.rejected: Counter[str] = Counter()
        self.closed: Counter[tuple[str, str]] = Counter()
        self.control: dict[tuple[str, int], int] = {}
        self.recoveries: Counter[tuple[str, ...]] = Counter()
        self.replayed = 0
        self.delivery_latency = Histogram(LATENCY_BUCKETS)
        self.ping_latency = Histogram(LATENCY_BUCKETS)
        self.loop_lag = Histogram(LATENCY_BUCKETS)
        self.broker_up_now = 1
        """1 unless a remote broker (Redis) is unreachable; the memory broker is always up."""
        self.broker_reconnects = 0
        self.broker_probe_failures = 0
        self.gap_repairs: Counter[str] = Counter()
        self.probe_rtt = Histogram(LATENCY_BUCKETS)
        self.broker_commands = Histogram(LATENCY_BUCKETS)
        self.auth_refusals: Counter[str] = Counter()
        self.subscribe_denials: Counter[str] = Counter()

    # Observer

    def published(self, form: str, messages: int, queued: int, refused: int) -> None:
        self.published_by_form[form] += messages
        self.deliveries += queued
        if refused:
            self.dropped_by_reason["slow_consumer"] += refused

    def written(self, frames: int, nbytes: int, writes: int, waited: float) -> None:
        self.frames_sent += frames
        self.bytes_sent += nbytes
        self.writes += writes
        self.delivery_latency.observe(waited)

    def dropped(self, reason: str, count: int) -> None:
        self.dropped_by_reason[reason] += count

    def slow_consumer(self, policy: str) -> None:
        self.slow_consumers[policy] += 1

    def ping_rtt(self, seconds: float) -> None:
        self.ping_latency.observe(seconds)

    def connection_opened(self) -> None:
        self.accepted += 1

    def connection_closed(self, code: int, initiator: str) -> None:
        # Clients choose their close codes: undocumented ones share one series.
        label = str(code) if code in CLOSE_CODES else "other"
        self.closed[(label, initiator)] += 1

    def connection_rejected(self, reason: str) -> None:
        self.rejected[reason] += 1

    def control_request(self, endpoint: str, status: int) -> None:
        key = (endpoint, status)
        self.control[key] = self.control.get(key, 0) + 1

    def recovered(self, outcome: bool, reason: str | None, replayed: int) -> None:
        self.recoveries[("true", "") if outcome else ("false", reason or "")] += 1
        self.replayed += replayed

    def delivered(self, queued: int, refused: int) -> None:
        self.deliveries += queued
        if refused:
            self.dropped_by_reason["slow_consumer"] += refused

    def broker_up(self, up: bool) -> None:
        self.broker_up_now = int(up)

    def broker_reconnected(self) -> None:
        self.broker_reconnects += 1

    def broker_probe(self, rtt: float | None) -> None:
        if rtt is None:
            self.broker_probe_failures += 1
        else:
            self.probe_rtt.observe(rtt)

    def broker_command(self, seconds: float) -> None:
        self.broker_commands.observe(seconds)

    def gap_repair(self, outcome: str) -> None:
        self.gap_repairs[outcome] += 1

    def auth_refused(self, reason: str) -> None:
        self.auth_refusals[reason] += 1

    def subscribe_denied(self, reason: str) -> None:
        self.subscribe_denials[reason] += 1


class LoopLagProbe:
    """Measures how late the event loop runs a timer: the one number that says the
    daemon's single core is saturated. A timer chain, four ticks a second."""

    INTERVAL = 0.25

    def __init__(self, histogram: Histogram) -> None:
        self.histogram = histogram
        self._handle: asyncio.TimerHandle | None = None
        self._due = 0.0

    def start(self) -> None:
        self._due = time.monotonic() + self.INTERVAL
        self._handle = asyncio.get_running_loop().call_later(self.INTERVAL, self._tick)

    def _tick(self) -> None:
        now = time.monotonic()
        self.histogram.observe(max(0.0, now - self._due))
        self._due = now + self.INTERVAL
        self._handle = asyncio.get_running_loop().call_later(self.INTERVAL, self._tick)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


PUBLISH_FORMS = ("channel", "json", "batch")
DROP_REASONS = ("drop_oldest", "slow_consumer", "conflate")
POLICIES = ("disconnect", "drop_oldest", "conflate")
REJECT_REASONS = (
    "cap",
    "rate_limited",
    "origin",
    "bad_request",
    "handshake_timeout",
    "draining",
    "fd_limit",
)
RECOVERY_FAILURES = ("epoch", "too_old", "too_many", "disabled", "position")
CLOSE_CODES = frozenset({1000, 1002, 1005} | {reason.code for reason in CloseReason})
"""Close codes with a series of their own (README, "How connections end")."""


class DaemonCollector(Collector):
    """Turns the Metrics counters and the daemon's live state into metric families."""

    def __init__(self, metrics: Metrics, node: Node, ws: WsServer) -> None:
        self.metrics = metrics
        self.node = node
        self.ws = ws
        bound = ws.settings.outbox_messages
        depth_bounds = [0]
        while depth_bounds[-1] < bound:
            depth_bounds.append(min(bound, max(1, depth_bounds[-1] * 2)))
        self.depth_bounds = tuple(depth_bounds)
        self._unsent_missed = 0
        """Drops not yet told to their clients, summed by _queues() for _counters()."""

    def collect(self) -> Iterator[Metric]:
        yield from self._state()
        yield from self._queues()
        yield from self._counters()
        m = self.metrics
        yield m.delivery_latency.family(
            f"{NAMESPACE}_delivery_latency_seconds",
            "Time from a publish being accepted to its frame being handed to the socket, "
            "observed once per pass of the writers (one per event-loop turn with frames to "
            "write) for the oldest frame written in it: the worst case of each pass.",
        )
        yield m.ping_latency.family(
            f"{NAMESPACE}_ping_latency_seconds",
            "Round-trip time of keepalive pings, one observation per pong.",
        )
        yield m.probe_rtt.family(
            f"{NAMESPACE}_broker_probe_rtt_seconds",
            "Round trip of the broker probe: a message to this node's own probe channel "
            "through Redis pub/sub and back (Redis broker only).",
        )
        yield m.broker_commands.family(
            f"{NAMESPACE}_broker_command_seconds",
            "Time of each Redis round trip: a publish (or a pipeline of them), a history "
            "read, a position read (Redis broker only).",
        )
        yield m.loop_lag.family(
            f"{NAMESPACE}_event_loop_lag_seconds",
            "How late the event loop ran a timer, sampled four times a second: high "
            "values mean the daemon's one core is saturated.",
        )

    def _state(self) -> Iterator[Metric]:
        node = self.node
        info = GaugeMetricFamily(
            f"{NAMESPACE}_build_info",
            "broadcastd build, always 1.",
            labels=["version", "python", "websockets"],
        )
        info.add_metric([__version__, platform.python_version(), websockets_version], 1)
        yield info
        yield _gauge("clients", "Subscriber connections open.", self.ws.client_count)
        yield _gauge(
            "clients_limit",
            "Configured most subscriber connections (ws.max_clients).",
            self.ws.settings.max_clients,
        )
        yield _gauge(
            "channels",
            "Channels remembered (with or without subscribers).",
            sum(1 for _ in node.channel_names()),
        )
        yield _gauge(
            "channels_limit",
            "Configured most channels remembered (channels.max_channels).",
            node.settings.channels.max_channels,
        )
        yield _gauge(
            "subscriptions", "Channel subscriptions over all clients.", node.hub.subscriptions
        )
        yield _gauge(
            "ready", "1 when every listener is up and the daemon is not draining.", int(node.ready)
        )
        yield _gauge("draining", "1 while a SIGTERM/SIGINT drain is under way.", int(node.draining))

    def _queues(self) -> Iterator[Metric]:
        bounds = self.depth_bounds
        counts = [0] * (len(bounds) + 1)
        total_frames = total_bytes = deepest = write_buffers = unsent_missed = stuck = 0
        fullest = 0.0
        oldest = now = self.node.clock()
        s = self.ws.settings
        for session, conn in self.ws.connections():
            outbox = session.outbox
            depth = len(outbox)
            size = outbox.size
            unsent_missed += outbox.missed
            if depth and conn.waiting_since:
                oldest = min(oldest, conn.waiting_since)
            if outbox.closed is not None and not conn.closing:
                stuck += 1
            counts[bisect_left(bounds, depth)] += 1
            total_frames += depth
            total_bytes += size
            deepest = max(deepest, depth)
            fullest = max(fullest, depth / s.outbox_messages, size / s.outbox_bytes)
            transport = conn.transport
            if transport is not None:
                write_buffers += transport.get_write_buffer_size()
        self._unsent_missed = unsent_missed
        buckets = _cumulative(bounds, counts)
        yield GaugeHistogramMetricFamily(
            f"{NAMESPACE}_outbox_depth_frames",
            "Clients by the number of frames waiting in their outbox, at scrape time.",
            buckets=buckets,
            gsum_value=total_frames,
        )
        yield _gauge("outbox_depth_max_frames", "Frames waiting in the fullest outbox.", deepest)
        yield _gauge(
            "outbox_fill_ratio_max",
            "Fullest outbox as a fraction of its bound (frames or bytes, whichever is "
            "nearer); at 1 the slow-consumer policy acts.",
            fullest,
        )
        yield _gauge("outbox_bytes", "Bytes waiting in all outboxes.", total_bytes)
        yield _gauge(
            "outbox_oldest_age_seconds",
            "Age of the oldest frame waiting in any outbox (0 when none waits): what a "
            "client that cannot drain its queue has been kept waiting.",
            now - oldest,
        )
        yield _gauge(
            "outboxes_closed_pending",
            "Connections whose outbox is closed (slow consumer, shutdown, error) but whose "
            "closing handshake has not begun: normally brief; a lasting value means "
            "connections are held without being written.",
            stuck,
        )
        yield _gauge(
            "write_buffer_bytes",
            "Bytes handed to sockets but not yet taken by the kernel, all clients.",
            write_buffers,
        )
        yield _gauge(
            "outbox_limit_frames", "Configured bound of each outbox, in frames.", s.outbox_messages
        )
        yield _gauge(
            "outbox_limit_bytes", "Configured bound of each outbox, in bytes.", s.outbox_bytes
        )

    def _counters(self) -> Iterator[Metric]:
        m = self.metrics
        yield _counter(
            "messages_published",
            "Messages accepted for publishing, by API form.",
            ["form"],
            _complete(m.published_by_form, PUBLISH_FORMS),
        )
        yield _counter(
            "deliveries",
            "Messages queued for a subscriber (one per subscriber per message).",
            [],
            {(): m.deliveries},
        )
        yield _counter(
            "frames_sent",
            "Frames handed to sockets (messages and replies).",
            [],
            {(): m.frames_sent},
        )
        yield _counter("bytes_sent", "Bytes handed to sockets.", [], {(): m.bytes_sent})
        yield _counter(
            "writes", "Socket writes (each carries every frame queued).", [], {(): m.writes}
        )
        dropped = Counter(m.dropped_by_reason)
        dropped["drop_oldest"] += self._unsent_missed
        yield _counter(
            "messages_dropped",
            "Messages not delivered to a subscriber, by reason (drop_oldest counts them "
            "when they are dropped, before the client is told).",
            ["reason"],
            _complete(dropped, DROP_REASONS),
        )
        yield _counter(
            "slow_consumer_actions",
            "Times the slow-consumer policy acted, by "
            "policy (disconnect: per client; drop_oldest: per gap reported).",
            ["policy"],
            _complete(m.slow_consumers, POLICIES),
        )
        yield _counter(
            "connections_accepted", "Subscriber connections accepted.", [], {(): m.accepted}
        )
        yield _counter(
            "connections_rejected",
            "Subscriber handshakes refused, by reason.",
            ["reason"],
            _complete(m.rejected, REJECT_REASONS),
        )
        yield _counter(
            "connections_closed",
            "Subscriber connections ended, by close code and "
            "by who closed (server, client, abnormal).",
            ["code", "initiator"],
            {k: v for k, v in m.closed.items()},
        )
        yield _counter(
            "log_lines_dropped",
            "Log lines dropped because stdout could not take them (the daemon never "
            "waits for its log).",
            [],
            {(): log.dropped_lines()},
        )
        yield _counter(
            "recoveries",
            "Subscribers that asked to resume from a position, by outcome (recovered "
            "true/false) and, when it failed, reason (epoch, too_old, too_many, disabled, "
            "position).",
            ["recovered", "reason"],
            {("true", ""): 0, **{("false", r): 0 for r in RECOVERY_FAILURES}, **m.recoveries},
        )
        yield _counter(
            "messages_replayed",
            "Messages replayed from history to recovering subscribers.",
            [],
            {(): m.replayed},
        )
        stats = self.node.broker.stats()
        yield _gauge("history_entries", "Messages kept in channel histories here.", stats.entries)
        yield _gauge(
            "history_bytes",
            "Memory the kept messages cost (counted against history.max_bytes).",
            stats.bytes,
        )
        yield _counter(
            "history_evictions",
            "Messages evicted from history, by cause: size (history.size), ttl "
            "(history.ttl), budget (history.max_bytes).",
            ["cause"],
            {
                ("size",): stats.evicted_size,
                ("ttl",): stats.evicted_ttl,
                ("budget",): stats.evicted_budget,
            },
        )
        yield _counter(
            "channels_forgotten",
            "Channels whose position was forgotten (no local subscriber, and the table "
            "was full or their history expired): their offsets restart in a new epoch.",
            [],
            {(): stats.forgotten},
        )
        yield _gauge(
            "broker_up",
            "1 when the broker is reachable and its pub/sub path answers the probe "
            "(always 1 with the memory broker); 0 makes readiness false.",
            m.broker_up_now,
        )
        yield _counter(
            "broker_reconnects",
            "Pub/sub connections to Redis made again after a failure or a failed probe.",
            [],
            {(): m.broker_reconnects},
        )
        yield _counter(
            "broker_probe_failures",
            "Broker probes that could not be sent or did not come back in time.",
            [],
            {(): m.broker_probe_failures},
        )
        yield _counter(
            "broker_gap_repairs",
            "Gaps in a channel's offsets seen on the pub/sub path: repaired (read from "
            "history and delivered in order) or resync (history could not fill it; the "
            "channel's subscribers were sent a resync event).",
            ["outcome"],
            _complete(m.gap_repairs, ("repaired", "resync")),
        )
        yield _counter(
            "auth_refusals",
            "Subscriber tokens refused, by reason (token_invalid, token_expired, "
            "token_not_yet_valid, token_audience, token_issuer, token_unavailable, "
            "token_user), and connections closed for want of one (token_required).",
            ["reason"],
            {(reason,): n for reason, n in m.auth_refusals.items()},
        )
        yield _counter(
            "subscribe_denials",
            "Subscribes refused by a channel's rule, by reason (token_required, "
            "channel_not_allowed, not_your_channel, unknown_namespace).",
            ["reason"],
            {(reason,): n for reason, n in m.subscribe_denials.items()},
        )
        yield _counter(
            "control_requests",
            "Control-port requests, by endpoint and status.",
            ["endpoint", "status"],
            {(endpoint, str(status)): n for (endpoint, status), n in m.control.items()},
        )


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{NAMESPACE}_{name}", documentation, value=value)


def _counter(
    name: str, documentation: str, labels: list[str], values: dict[tuple[str, ...], int]
) -> CounterMetricFamily:
    family = CounterMetricFamily(f"{NAMESPACE}_{name}", documentation, labels=labels)
    for key, value in values.items():
        family.add_metric(list(key), value)
    return family


def _complete(counts: Mapping[str, int], known: Iterable[str]) -> dict[tuple[str, ...], int]:
    """Every known label value, zero when nothing happened yet, so rates start at 0."""
    values: dict[tuple[str, ...], int] = {(label,): counts.get(label, 0) for label in known}
    values.update({(label,): count for label, count in counts.items()})
    return values


def build_registry(metrics: Metrics, node: Node, ws: WsServer) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DaemonCollector(metrics, node, ws))
    ProcessCollector(namespace="", registry=registry)
    if sys.platform != "win32":
        PlatformCollector(registry=registry)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
