"""Admission under a storm (``ws.accept_rate``) and held writes (``ws.write_delay``):
what is refused is told with 503 ``rate_limited`` and ``Retry-After`` and counted,
and the connections already open lose nothing; held frames keep their order and
integrity, and a drain writes them."""

from __future__ import annotations

import asyncio
import json
import random
from typing import Any

from broadcastd.client import State, StateChanged, Subscribed, Subscriber, Unavailable

from .conftest import Running, recv_json, subscribed
from .rawclient import RawClient
from .test_metrics import scrape, value


async def refused(daemon: Running) -> Any:
    client = await RawClient.connect(daemon.ws_url + "/?channel=storm")
    response = await client.handshake()
    client.close()
    return response


async def test_a_storm_beyond_the_accept_rate_is_told_to_retry_and_the_open_lose_nothing(
    daemon_factory: Any,
) -> None:
    # One connection per 100 s: the witness takes the only token, the storm none.
    async with daemon_factory(**{"ws.accept_rate": 0.01}) as daemon:
        async with daemon.connect("/?channel=news") as witness:
            await subscribed(witness, "news")
            storm = [asyncio.ensure_future(refused(daemon)) for _ in range(20)]
            for i in range(50):
                await daemon.publish("news", {"n": i})
            responses = await asyncio.gather(*storm)
            got = [await recv_json(witness) for _ in range(50)]
        assert [m["data"]["n"] for m in got] == list(range(50))
        for response in responses:
            assert response.status_code == 503
            assert int(response.headers["Retry-After"]) >= 1
            assert json.loads(response.body)["error"]["code"] == "rate_limited"
        m = await scrape(daemon)
        assert value(m, "broadcastd_connections_rejected_total", reason="rate_limited") == 20
        assert value(m, "broadcastd_connections_rejected_total", reason="cap") == 0


async def test_held_frames_keep_order_and_integrity_under_random_schedules(
    daemon_factory: Any,
) -> None:
    """Publishes in bursts, pauses and pipelined runs of random sizes and payloads,
    several readers, a hold of 2 ms: every reader gets every message, whole and in
    order."""
    rng = random.Random(1907)
    async with daemon_factory(**{"ws.write_delay": 0.002}) as daemon:
        readers = [await daemon.connect("/?channel=a&channel=b").__aenter__() for _ in range(3)]
        try:
            for reader in readers:
                await subscribed(reader, "a", "b")
            sent: list[tuple[str, int, str]] = []
            for n in range(200):
                channel = rng.choice("ab")
                text = "x" * rng.choice((0, 1, 100, 5000))
                sent.append((channel, n, text))
                publishing = daemon.publish(channel, {"n": n, "text": text})
                if rng.random() < 0.7:
                    await publishing
                else:  # several in flight at once
                    await asyncio.gather(publishing, asyncio.sleep(0))
            for reader in readers:
                got = [await recv_json(reader) for _ in range(len(sent))]
                assert [(m["channel"], m["data"]["n"], m["data"]["text"]) for m in got] == sent
                for channel in "ab":
                    offsets = [m["offset"] for m in got if m["channel"] == channel]
                    assert offsets == list(range(1, len(offsets) + 1))
        finally:
            for reader in readers:
                await reader.__aexit__(None, None, None)


async def test_a_drain_writes_the_held_frames(daemon_factory: Any) -> None:
    """With frames held for up to a second and a drain that must end sooner, the
    held frames are written at once: the client gets all of them, then 1001."""
    async with (
        daemon_factory(**{"ws.write_delay": 1.0, "drain_timeout": 0.3}) as daemon,
        daemon.connect("/?channel=news") as client,
    ):
        await subscribed(client, "news")
        for i in range(20):
            await daemon.publish("news", {"n": i})
        daemon.daemon.shutdown()
        got = [await recv_json(client) for _ in range(20)]
        assert [m["data"]["n"] for m in got] == list(range(20))
        await client.wait_closed()
        assert client.close_code == 1001


async def test_the_python_subscriber_waits_out_a_rate_limit_then_connects(
    daemon_factory: Any,
) -> None:
    """One connection a second: the first client takes it; the second is refused
    with 503 ``rate_limited``, reports a retry no sooner than ``Retry-After``, and
    connects on its own once the rate allows."""
    async with daemon_factory(**{"ws.accept_rate": 1}) as daemon:
        async with daemon.connect("/?channel=news") as first:
            await subscribed(first, "news")
            async with Subscriber(daemon.ws_url) as sub:
                stream = sub.subscribe("news", events={Subscribed, StateChanged})
                refusal = None
                async with asyncio.timeout(30):
                    async for item in stream:
                        if isinstance(item, StateChanged) and item.state is State.DISCONNECTED:
                            refusal = refusal or item
                        if isinstance(item, Subscribed):
                            break
        assert refusal is not None
        assert isinstance(refusal.error, Unavailable)
        assert refusal.error.code == "rate_limited"
        assert refusal.retry_in is not None
        assert refusal.retry_in >= 1  # Retry-After, not the 0.5 s base backoff
        m = await scrape(daemon)
        assert value(m, "broadcastd_connections_rejected_total", reason="rate_limited") >= 1
