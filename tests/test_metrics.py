"""/metrics: well-formed, and every known action moves the right series."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from websockets.exceptions import InvalidStatus
from websockets.frames import Opcode

from .conftest import ROOT, Running, recv_json, subscribed
from .rawclient import RawClient


async def scrape(daemon: Running) -> dict[str, Any]:
    """Families by name, from the dedicated metrics listener."""
    listener = daemon.daemon.metrics_listener
    assert listener is not None
    async with httpx.AsyncClient() as client:
        response = await client.get(f"http://127.0.0.1:{listener.port}/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return {family.name: family for family in text_string_to_metric_families(response.text)}


def value(families: dict[str, Any], name: str, **labels: str) -> float:
    """The value of one sample (summed over samples matching ``labels``)."""
    family_name = name
    for suffix in ("_total", "_count", "_sum", "_bucket"):
        if name not in families and name.removesuffix(suffix) in families:
            family_name = name.removesuffix(suffix)
    samples: list[Sample] = families[family_name].samples
    matching = [
        s
        for s in samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    assert matching, f"no sample {name}{labels}"
    return sum(s.value for s in matching)


async def eventually(daemon: Running, check: Any, attempts: int = 500) -> dict[str, Any]:
    """Scrape until ``check(families)`` holds: each scrape lets the daemon's tasks run
    (a connection's bookkeeping finishes after its socket closes)."""
    for _ in range(attempts):
        families = await scrape(daemon)
        try:
            if check(families):
                return families
        except AssertionError:  # the series does not exist yet
            pass
    raise AssertionError("the metrics never reached the expected state")


async def publish_until(daemon: Running, channel: str, check: Any) -> dict[str, Any]:
    """Publish 80 KB batches to ``channel`` until ``check(families)`` holds; a client
    that does not read fills the kernel's buffers, then its outbox."""
    for _ in range(200):
        await daemon.http.post("/batch", json=[{"channel": channel, "data": "x" * 8000}] * 10)
        families = await scrape(daemon)
        if check(families):
            return families
    raise AssertionError("the condition never held")


async def test_every_family_parses_with_help_and_type(daemon: Running) -> None:
    listener = daemon.daemon.metrics_listener
    assert listener is not None
    async with httpx.AsyncClient() as client:
        text = (await client.get(f"http://127.0.0.1:{listener.port}/metrics")).text
    families = list(text_string_to_metric_families(text))
    names = {f.name for f in families}
    for family in families:
        assert family.documentation, family.name
        assert f"# HELP {family.name}" in text or f"# HELP {family.name}_total" in text
        assert f"# TYPE {family.name}" in text
    for expected in (
        "broadcastd_clients",
        "broadcastd_channels",
        "broadcastd_subscriptions",
        "broadcastd_build_info",
        "broadcastd_ready",
        "broadcastd_draining",
        "broadcastd_outbox_depth_frames",
        "broadcastd_outbox_depth_max_frames",
        "broadcastd_outbox_bytes",
        "broadcastd_ping_latency_seconds",
        "broadcastd_delivery_latency_seconds",
        "broadcastd_connections_closed",
        "broadcastd_messages_published",
        "broadcastd_deliveries",
        "broadcastd_bytes_sent",
        "broadcastd_messages_dropped",
        "broadcastd_slow_consumer_actions",
        "broadcastd_connections_accepted",
        "broadcastd_connections_rejected",
        "broadcastd_control_requests",
        "process_resident_memory_bytes",
    ):
        assert expected in names, expected


async def test_the_control_port_serves_metrics_too(daemon: Running) -> None:
    response = await daemon.http.get("/metrics")
    assert response.status_code == 200
    assert "broadcastd_clients" in response.text


async def test_publishing_in_each_form_moves_published_deliveries_and_latency(
    daemon: Running,
) -> None:
    async with daemon.connect("/a,b") as ws:
        await subscribed(ws, "a", "b")
        await daemon.publish("a", 1)
        await daemon.http.post("/publish", json={"channels": ["a", "b"], "data": 2})
        await daemon.http.post("/batch", json=[{"channel": "b", "data": 3}] * 4)
        for _ in range(7):
            await recv_json(ws)
        m = await scrape(daemon)
        assert value(m, "broadcastd_messages_published_total", form="channel") == 1
        assert value(m, "broadcastd_messages_published_total", form="json") == 2
        assert value(m, "broadcastd_messages_published_total", form="batch") == 4
        assert value(m, "broadcastd_deliveries_total") == 7
        assert value(m, "broadcastd_frames_sent_total") >= 9  # 7 messages + 2 replies
        assert value(m, "broadcastd_delivery_latency_seconds_count") >= 1
        assert value(m, "broadcastd_clients") == 1
        assert value(m, "broadcastd_channels") == 2
        assert value(m, "broadcastd_subscriptions") == 2
        assert value(m, "broadcastd_control_requests_total", endpoint="batch", status="200") == 1
        assert (
            value(m, "broadcastd_control_requests_total", endpoint="publish_channel", status="200")
            == 1
        )


async def test_close_codes_are_counted_with_their_initiator(daemon: Running) -> None:
    async with daemon.connect("/") as ws:
        await ws.send('{"op": "ping"}')
        await recv_json(ws)
    for send, _code in (
        (lambda c: c.protocol.send_binary(b"x"), 1003),
        (lambda c: c.protocol.send_text(b"x" * 10_000), 1009),
        (lambda c: c.send_raw(bytes((0x81, 0x82, 0, 0, 0, 0)) + b"\xff\xfe"), 1007),
    ):
        client = await RawClient.connect(daemon.ws_url + "/", rcvbuf=None)
        await client.handshake()
        send(client)
        client.flush()
        await client.read_until_closed()
        client.close()
    m = await eventually(daemon, lambda m: value(m, "broadcastd_connections_closed_total") == 4)
    assert value(m, "broadcastd_connections_closed_total", code="1000", initiator="client") == 1
    for code in ("1003", "1009", "1007"):
        assert value(m, "broadcastd_connections_closed_total", code=code, initiator="server") == 1
    assert value(m, "broadcastd_connections_accepted_total") == 4


async def test_rejections_are_counted_by_reason(daemon_factory: Any) -> None:
    async with daemon_factory(
        **{"ws.max_clients": 1, "ws.allowed_origins": ["https://ok"], "ws.open_timeout": 0.2}
    ) as daemon:
        async with daemon.connect("/") as first:
            await first.send('{"op": "ping"}')
            await recv_json(first)
            with pytest.raises(InvalidStatus, match="503"):
                async with daemon.connect("/"):
                    pass
        with pytest.raises(InvalidStatus, match="403"):
            async with daemon.connect("/", origin="https://evil"):  # type: ignore[arg-type]
                pass
        with pytest.raises(InvalidStatus, match="400"):
            async with daemon.connect("/?x=1"):
                pass
        # A client that never sends its handshake is cut at ws.open_timeout.
        reader, writer = await asyncio.open_connection("127.0.0.1", daemon.daemon.ws.port)
        assert await reader.read() == b""
        writer.close()
        m = await scrape(daemon)
        for reason in ("cap", "origin", "bad_request", "handshake_timeout"):
            assert value(m, "broadcastd_connections_rejected_total", reason=reason) == 1


async def test_a_stalled_client_shows_in_the_queue_depth_distribution(
    daemon_factory: Any,
) -> None:
    async with daemon_factory(
        **{"ws.outbox_messages": 64, "ws.outbox_bytes": 1024 * 1024, "ws.write_limit": 16 * 1024}
    ) as daemon:
        slow = await RawClient.connect(daemon.ws_url + "/q")
        await slow.handshake()
        m = await publish_until(
            daemon, "q", lambda m: value(m, "broadcastd_outbox_depth_max_frames") > 0
        )
        depth = value(m, "broadcastd_outbox_depth_max_frames")
        family = m["broadcastd_outbox_depth_frames"]
        buckets = {
            s.labels["le"]: s.value
            for s in family.samples
            if s.name == "broadcastd_outbox_depth_frames_bucket"
        }
        assert buckets["0.0"] == 0  # the one client is not idle
        assert buckets["+Inf"] == 1
        assert value(m, "broadcastd_outbox_depth_frames_gsum") == depth
        assert value(m, "broadcastd_outbox_bytes") > 0
        assert 0 < value(m, "broadcastd_outbox_fill_ratio_max") <= 1
        slow.close()


async def test_slow_consumer_disconnects_and_drops_are_counted(daemon_factory: Any) -> None:
    for policy in ("disconnect", "drop_oldest"):
        async with daemon_factory(
            **{
                "ws.outbox_messages": 8,
                "ws.write_limit": 4096,
                "ws.close_timeout": 0.5,
                "ws.slow_consumer_policy": policy,
            }
        ) as daemon:
            slow = await RawClient.connect(daemon.ws_url + "/s")
            await slow.handshake()
            m = await publish_until(
                daemon, "s", lambda m: value(m, "broadcastd_messages_dropped_total") > 0
            )
            if policy == "disconnect":
                await slow.read_until_closed()
                m = await eventually(
                    daemon,
                    lambda m: value(m, "broadcastd_connections_closed_total", code="1013") == 1,
                )
                assert value(m, "broadcastd_slow_consumer_actions_total", policy="disconnect") == 1
                assert value(m, "broadcastd_messages_dropped_total", reason="slow_consumer") > 0
                assert value(m, "broadcastd_connections_closed_total", code="1013") == 1
            else:
                assert value(m, "broadcastd_messages_dropped_total", reason="drop_oldest") > 0
            slow.close()


async def test_ping_latency_appears_after_a_keepalive_cycle(daemon_factory: Any) -> None:
    async with daemon_factory(**{"ws.ping_interval": 0.05}) as daemon:
        client = await RawClient.connect(daemon.ws_url + "/", rcvbuf=None)
        await client.handshake()
        while not any(f.opcode is Opcode.PING for f in client.frames):
            await client.read_events()  # the protocol answers the ping with a pong
        # The server reads this connection in order: once it answers the command,
        # it has processed the pong before it.
        client.protocol.send_text(b'{"op": "ping"}')
        client.flush()
        while '{"type":"pong"}' not in client.text_frames():
            await client.read_events()
        m = await scrape(daemon)
        assert value(m, "broadcastd_ping_latency_seconds_count") >= 1
        assert value(m, "broadcastd_ping_latency_seconds_sum") > 0
        client.close()


async def test_readiness_and_drain_in_metrics_and_handshakes_under_way_are_cut(
    daemon_factory: Any,
) -> None:
    async with daemon_factory(drain_timeout=30) as daemon:
        m = await scrape(daemon)
        assert (value(m, "broadcastd_ready"), value(m, "broadcastd_draining")) == (1, 0)
        holder = await RawClient.connect(daemon.ws_url + "/h")
        await holder.handshake()
        await daemon.publish("h", "x" * 100)
        # A handshake in flight when the drain begins is cut at once: it holds
        # nothing to flush, and must not hold the drain up.
        reader, writer = await asyncio.open_connection("127.0.0.1", daemon.daemon.ws.port)
        writer.write(b"GET /h HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n")
        await writer.drain()
        daemon.daemon.shutdown()
        for _ in range(100):  # each request lets the daemon's drain task run
            if (await daemon.http.get("/readyz")).status_code == 503:
                break
        else:
            raise AssertionError("/readyz never turned 503")
        m = await scrape(daemon)
        assert (value(m, "broadcastd_ready"), value(m, "broadcastd_draining")) == (0, 1)
        with contextlib.suppress(ConnectionResetError):
            assert await reader.read() == b""
        writer.close()
        m = await scrape(daemon)
        assert value(m, "broadcastd_connections_rejected_total", reason="draining") == 1
        close = await holder.read_until_closed()
        assert close is not None
        assert close.code == 1001


async def test_the_operations_page_lists_every_broadcastd_metric(daemon: Running) -> None:
    page = (ROOT / "docs" / "operations.md").read_text()
    for name in await scrape(daemon):
        if name.startswith("broadcastd_") and not name.endswith(("_gcount", "_gsum")):
            documented = f"`{name}`" in page or f"`{name}_total`" in page
            assert documented, f"docs/operations.md does not document {name}"
