"""Every namespace option the engine applies answers the same on both engines.

History size and time to live, recovery and the payload bound are kept (or
enforced) by whichever engine runs; the slow-consumer policy, the outbox share
and the subscribe rule are decided in the node and the hub before any engine
is asked, and their own tests cover them. Each case here runs against the memory
engine and a real redis-server: the history route, a recovery and a publish must
say the same on both.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from .conftest import Engine, Running, recv_json

NAMESPACES = [
    {"name": "long", "history_size": 50},
    {"name": "short", "history_size": 3},
    {"name": "nohist", "history_size": 0},
    {"name": "norecover", "recover": False},
    {"name": "brief", "history_ttl": 0.2},
    {"name": "small", "max_payload_bytes": 32},
]


async def history(d: Running, channel: str, **query: Any) -> dict[str, Any]:
    response = await d.http.get(f"/channels/{channel}/history", params=query)
    assert response.status_code == 200, response.text
    doc: dict[str, Any] = response.json()
    return doc


@pytest.mark.parametrize("top_level", [10, 0])
async def test_history_follows_the_namespace_size_not_the_top_level(
    engine: Engine, top_level: int
) -> None:
    async with engine(history__size=top_level, namespaces=NAMESPACES) as d:
        for i in range(40):
            await d.publish("long:a", i)
        for i in range(5):
            await d.publish("short:a", i)
            await d.publish("nohist:a", i)
        doc = await history(d, "long:a", limit=1000)
        assert [p["data"] for p in doc["publications"]] == list(range(40))
        assert doc["complete"] is True
        newest = await history(d, "long:a", limit=5, order="desc")
        assert [p["data"] for p in newest["publications"]] == [39, 38, 37, 36, 35]
        later = await history(d, "long:a", since=30, limit=4)
        assert [p["data"] for p in later["publications"]] == [30, 31, 32, 33]
        assert later["next"] == 34
        short = await history(d, "short:a")
        assert [p["data"] for p in short["publications"]] == [2, 3, 4]
        assert short["complete"] is False
        assert (await history(d, "short:a", since=2))["complete"] is True
        nohist = await history(d, "nohist:a")
        assert (nohist["publications"], nohist["offset"]) == ([], 5)


async def test_recovery_follows_the_namespace_options(engine: Engine) -> None:
    async with engine(history__size=2, namespaces=NAMESPACES) as d:
        for i in range(20):
            await d.publish("long:a", i)
            await d.publish("norecover:a", i)
        epoch = (await history(d, "long:a"))["epoch"]
        async with d.connect(f"/?since=long:a:{epoch}:4") as ws:
            reply = await recv_json(ws)
            assert reply["recovered"] is True, reply
            got = [(await recv_json(ws))["data"] for _ in range(16)]
            assert got == list(range(4, 20))
        other = (await history(d, "norecover:a"))["epoch"]
        async with d.connect(f"/?since=norecover:a:{other}:19") as ws:
            reply = await recv_json(ws)
            assert (reply["recovered"], reply["reason"]) == (False, "disabled")


async def test_history_ttl_of_a_namespace_expires_what_it_keeps(engine: Engine) -> None:
    async with engine(namespaces=NAMESPACES) as d:
        await d.publish("brief:a", 1)
        await d.publish("long:a", 1)
        async with asyncio.timeout(30):
            while (await history(d, "brief:a"))["publications"]:
                pass  # each read is a round trip: the expiry is what ends the loop
        assert [p["data"] for p in (await history(d, "long:a"))["publications"]] == [1]


async def test_the_payload_bound_of_a_namespace(engine: Engine) -> None:
    async with engine(namespaces=NAMESPACES) as d:
        response = await d.http.post("/publish/small:a", json={"text": "x" * 64})
        assert response.status_code == 413, response.text
        assert response.json()["error"]["code"] == "payload_too_large"
        await d.publish("small:a", "ok")
        await d.publish("long:a", {"text": "x" * 64})


async def test_history_after_a_very_large_offset(engine: Engine) -> None:
    """Offsets up to 2**63 - 1 are valid: far past the top is an empty page."""
    async with engine() as d:
        await d.publish("big", 1)
        for since in (10**14, 2**63 - 1):
            doc = await history(d, "big", since=since)
            assert (doc["publications"], doc["offset"]) == ([], 1)
