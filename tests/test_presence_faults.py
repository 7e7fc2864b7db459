"""Presence under random comings and goings: witnesses must see it consistently.

Clients join a join_leave room on random nodes and leave it in random ways (a
close, a reset, the server API's disconnect, an unsubscribe of the server API)
while messages are published between the steps. Each witness must get every
message once, in order, and exactly one join and one leave of every other
client, never its own; and presence, read from any node, must be the model's.
On Redis the clients spread over two nodes sharing a real redis-server.

``PRESENCE_SEED=N`` runs one seed; by default the seeds of CI_SEEDS run.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from .conftest import Running, make_settings, recv_json, redis_settings, running_daemon
from .test_presence import SETTINGS, join, token

CI_SEEDS = [1, 2]
SEEDS = [int(os.environ["PRESENCE_SEED"])] if "PRESENCE_SEED" in os.environ else CI_SEEDS
STEPS = 24
CHANNEL = "room:f"
WAYS_OUT = ("close", "reset", "disconnect", "unsubscribe")


@asynccontextmanager
async def nodes_of(engine: str, request: pytest.FixtureRequest) -> AsyncIterator[list[Running]]:
    if engine == "memory":
        async with running_daemon(make_settings(**SETTINGS)) as d:
            yield [d]
        return
    settings = redis_settings(request.getfixturevalue("redis_server"), **SETTINGS)
    async with contextlib.AsyncExitStack() as stack:
        yield [await stack.enter_async_context(running_daemon(settings)) for _ in range(2)]


class Witness:
    """A client that follows the room: what it was told, in order."""

    def __init__(self, ws: Any, client: str) -> None:
        self.ws = ws
        self.client = client
        self.present: set[str] = set()
        self.joins: dict[str, int] = {}
        self.leaves: dict[str, int] = {}
        self.messages: list[int] = []

    async def until(self, kind: str, client: str) -> None:
        """Read until ``kind`` of ``client`` came (recording all on the way)."""
        while True:
            doc = await recv_json(self.ws)
            if doc.get("type") in ("join", "leave"):
                assert doc["channel"] == CHANNEL
                other = doc["client"]
                assert other != self.client, "a client is told of its own join or leave"
                counts = self.joins if doc["type"] == "join" else self.leaves
                counts[other] = counts.get(other, 0) + 1
                if doc["type"] == "join":
                    self.present.add(other)
                else:
                    self.present.discard(other)
                if (doc["type"], other) == (kind, client):
                    return
            elif "data" in doc:
                self.messages.append(doc["data"])
            else:
                raise AssertionError(f"unexpected frame {doc}")


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("engine", ["memory", "redis"])
async def test_witnesses_see_presence_consistently(
    engine: str, seed: int, request: pytest.FixtureRequest
) -> None:
    rng = random.Random(seed)
    async with nodes_of(engine, request) as nodes:
        witnesses = []
        for i, node in enumerate(nodes):
            ws, me = await join(node, f"witness{i}", CHANNEL)
            witnesses.append(Witness(ws, me["client"]))
        for earlier in witnesses[:-1]:
            for later in witnesses[witnesses.index(earlier) + 1 :]:
                await earlier.until("join", later.client)
        live: dict[str, tuple[Any, Running]] = {}
        published = 0
        for step in range(STEPS):
            if not live or (len(live) < 6 and rng.random() < 0.55):
                node = rng.choice(nodes)
                path = f"/?channel={CHANNEL}&token={token(f'u{step}')}"
                ws = await node.connect(path, max_queue=None)  # it never reads: it must close
                client = (await recv_json(ws))["client"]
                assert (await recv_json(ws))["type"] == "subscribed"
                live[client] = (ws, node)
                for witness in witnesses:
                    await witness.until("join", client)
            else:
                client = rng.choice(sorted(live))
                ws, node = live.pop(client)
                way = rng.choice(WAYS_OUT)
                asker = rng.choice(nodes)  # the server API reaches every node
                if way == "close":
                    await ws.close()
                elif way == "reset":
                    ws.transport.abort()
                elif way == "disconnect":
                    response = await asker.http.post("/disconnect", json={"client": client})
                    assert response.json() == {"disconnected": 1}
                else:
                    body = {"client": client, "channel": CHANNEL}
                    response = await asker.http.post("/unsubscribe", json=body)
                    assert response.json() == {"unsubscribed": 1}
                for witness in witnesses:
                    await witness.until("leave", client)
                if way in ("disconnect", "unsubscribe"):
                    await ws.close()
            for _ in range(rng.randint(0, 3)):
                published += 1
                await rng.choice(nodes).publish(CHANNEL, published)
        marker = published + 1
        await nodes[0].publish(CHANNEL, marker)
        for witness in witnesses:
            while not witness.messages or witness.messages[-1] != marker:
                doc = await recv_json(witness.ws)
                assert "data" in doc, doc
                witness.messages.append(doc["data"])
            assert witness.messages == list(range(1, marker + 1))
            later = {w.client for w in witnesses[witnesses.index(witness) + 1 :]}
            assert witness.present == set(live) | later
            assert all(count == 1 for count in witness.joins.values())
            assert all(count == 1 for count in witness.leaves.values())
        expected = set(live) | {w.client for w in witnesses}
        for node in nodes:
            doc = (await node.http.get(f"/channels/{CHANNEL}/presence")).json()
            assert {e["client"] for e in doc["clients"]} == expected
            stats = (await node.http.get(f"/channels/{CHANNEL}/presence/stats")).json()
            assert stats["clients"] == len(expected)
        for ws, _ in live.values():
            await ws.close()
        for witness in witnesses:
            await witness.ws.close()
