"""End to end through the real daemon: every message, once, in order."""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from typing import Any

from .conftest import Running, recv_json, subscribed

CHANNELS = ("alpha", "beta", "gamma")
SUBSCRIBERS = 100
MESSAGES = 1000


async def test_100_subscribers_3_channels_1000_messages(daemon: Running) -> None:
    # Subscriber i takes channel i % 3, and every fifth one a second channel too,
    # half of them by URL and half by command.
    plans: list[tuple[str, ...]] = []
    for i in range(SUBSCRIBERS):
        first = CHANNELS[i % 3]
        plans.append((first, CHANNELS[(i + 1) % 3]) if i % 5 == 0 else (first,))
    clients = []
    for i, channels in enumerate(plans):
        if i % 2:
            ws = await daemon.connect("/?" + "&".join(f"channel={c}" for c in channels))
        else:
            ws = await daemon.connect("/")
            for c in channels:
                await ws.send(json.dumps({"op": "subscribe", "channel": c}))
        await subscribed(ws, *channels)
        clients.append(ws)

    expected: dict[str, list[int]] = defaultdict(list)
    for n in range(MESSAGES):
        channel = CHANNELS[n % 3]
        result = await daemon.publish(channel, {"n": n})
        expected[channel].append(result["offset"])
        want = sum(1 for p in plans if channel in p)
        assert result["subscribers"] == want

    async def collect(ws: Any, channels: tuple[str, ...]) -> dict[str, list[int]]:
        total = sum(len(expected[c]) for c in channels)
        got: dict[str, list[int]] = defaultdict(list)
        for _ in range(total):
            message = await recv_json(ws)
            assert message["data"]["n"] % 3 == CHANNELS.index(message["channel"])
            got[message["channel"]].append(message["offset"])
        return got

    results = await asyncio.gather(*(collect(ws, p) for ws, p in zip(clients, plans, strict=True)))
    for plan, got in zip(plans, results, strict=True):
        assert set(got) == set(plan)
        for channel in plan:
            assert got[channel] == expected[channel]  # all, once each, in offset order
            assert got[channel] == list(range(1, len(expected[channel]) + 1))
    for ws in clients:
        await ws.close()


async def test_envelope_matches_the_documented_example(daemon: Running) -> None:
    async with daemon.connect("/news") as ws:
        reply = await recv_json(ws)
        epoch = reply["epoch"]
        assert reply == {
            "type": "subscribed",
            "channel": "news",
            "epoch": epoch,
            "offset": 0,
            "client": reply["client"],  # the first reply tells who: client id and user
            "user": None,
        }
        response = await daemon.http.post(
            "/publish/news",
            content=b'{"price": 42}',
            headers={"Content-Type": "application/json"},
        )
        assert response.json() == {
            "channel": "news",
            "epoch": epoch,
            "offset": 1,
            "subscribers": 1,
        }
        assert await recv_json(ws) == {"channel": "news", "offset": 1, "data": {"price": 42}}


async def test_raw_mode_delivers_the_payload_alone(daemon: Running) -> None:
    async with daemon.connect("/?channel=t&format=raw") as raw, daemon.connect("/t") as enveloped:
        await subscribed(enveloped, "t")
        # A raw client hears nothing but payloads; a ping proves it is subscribed.
        await raw.send('{"op": "ping"}')
        assert json.loads(await raw.recv()) == {"type": "pong"}
        await daemon.http.post(
            "/publish/t", content=b"plain text", headers={"Content-Type": "text/plain"}
        )
        await daemon.publish("t", {"k": [1, 2]})
        assert await raw.recv() == "plain text"
        assert json.loads(await raw.recv()) == {"k": [1, 2]}
        assert (await recv_json(enveloped))["data"] == "plain text"
        assert (await recv_json(enveloped))["data"] == {"k": [1, 2]}


async def test_unsubscribe_stops_delivery_in_order(daemon: Running) -> None:
    async with daemon.connect("/a,b") as ws:
        await subscribed(ws, "a", "b")
        await ws.send('{"op": "unsubscribe", "channel": "a", "id": 1}')
        assert await recv_json(ws) == {"type": "unsubscribed", "channel": "a", "id": 1}
        await daemon.publish("a", 1)
        await daemon.publish("b", 2)
        assert await recv_json(ws) == {"channel": "b", "offset": 1, "data": 2}


async def test_publish_forms_and_statistics(daemon: Running) -> None:
    async with daemon.connect("/x,y") as ws:
        await subscribed(ws, "x", "y")
        one = (await daemon.http.post("/publish", json={"channel": "x", "data": "a"})).json()
        ex = one.pop("epoch")
        assert one == {"channel": "x", "offset": 1, "subscribers": 1}
        many = await daemon.http.post("/publish", json={"channels": ["x", "y"], "data": "b"})
        results = many.json()["results"]
        ey = results[1]["epoch"]
        assert results == [
            {"channel": "x", "epoch": ex, "offset": 2, "subscribers": 1},
            {"channel": "y", "epoch": ey, "offset": 1, "subscribers": 1},
        ]
        batch = await daemon.http.post(
            "/batch",
            json=[
                {"channel": "y", "data": 1},
                {"channel": "x", "data": 2},
            ],
        )
        assert batch.json()["published"] == 2
        got = [await recv_json(ws) for _ in range(5)]
        assert [(m["channel"], m["offset"], m["data"]) for m in got] == [
            ("x", 1, "a"),
            ("x", 2, "b"),
            ("y", 1, "b"),
            ("y", 2, 1),
            ("x", 3, 2),
        ]
        channel = await daemon.http.get("/channels/x")
        assert channel.json() == {"name": "x", "subscribers": 1, "epoch": ex, "offset": 3}
        listing = (await daemon.http.get("/channels")).json()
        assert {c["name"] for c in listing["channels"]} == {"x", "y"}
        stats = (await daemon.http.get("/stats")).json()
        assert stats == {
            "clients": 1,
            "channels": 2,
            "subscriptions": 2,
            "ready": True,
            "draining": False,
        }
        assert (await daemon.http.get("/healthz")).json() == {"status": "ok"}
        assert (await daemon.http.get("/readyz")).json() == {"ready": True}


async def test_compression_when_enabled(daemon_factory: Any) -> None:
    async with (
        daemon_factory(**{"ws.compression": "true"}) as daemon,
        daemon.connect("/z", compression="deflate") as ws,
    ):
        await subscribed(ws, "z")
        assert ws.protocol.extensions  # permessage-deflate was negotiated
        for n in range(3):
            await daemon.publish("z", {"n": n, "pad": "p" * 500})
        got = [await recv_json(ws) for _ in range(3)]
        assert [m["data"]["n"] for m in got] == [0, 1, 2]
