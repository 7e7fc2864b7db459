"""A client that stops reading never stalls the others, and costs bounded memory."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from broadcastd.settings import SlowConsumerPolicy

from .conftest import Running, recv_json, subscribed
from .rawclient import RawClient

GOOD_CLIENTS = 50
PAYLOAD = "x" * 4000
BATCH = 50
OUTBOX_BYTES = 256 * 1024
WRITE_LIMIT = 32 * 1024
SETTINGS: dict[str, Any] = {
    "ws.outbox_messages": 64,
    "ws.outbox_bytes": OUTBOX_BYTES,
    "ws.write_limit": WRITE_LIMIT,
    "ws.close_timeout": 30,
}


def kernel_buffers() -> int:
    """The most bytes the kernel can hold for one loopback connection (both ends)."""
    wmem = int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    return wmem + 64 * 1024


async def good_reader(ws: Any, count: int | None = None) -> list[int]:
    """Offsets received: ``count`` of them, or up to and including the "end" message."""
    offsets = []
    while count is None or len(offsets) < count:
        message = await recv_json(ws)
        offsets.append(message["offset"])
        if message["data"] == "end":
            break
    return offsets


def assert_memory_bounded(daemon: Running) -> None:
    """Everything the daemon holds for its clients stays within the configured bounds."""
    frame = len(PAYLOAD) + 64
    for session, conn in daemon.daemon.ws.connections():
        assert session.outbox.size <= OUTBOX_BYTES
        if conn.transport is not None:
            buffered = conn.transport.get_write_buffer_size()
            assert buffered <= WRITE_LIMIT + BATCH * frame + OUTBOX_BYTES


async def publish_batch(daemon: Running) -> list[dict[str, Any]]:
    response = await daemon.http.post("/batch", json=[{"channel": "busy", "data": PAYLOAD}] * BATCH)
    assert response.status_code == 200
    return list(response.json()["results"])


async def test_slow_consumer_is_closed_1013_and_the_others_get_everything(
    daemon_factory: Any,
) -> None:
    async with daemon_factory(**SETTINGS) as daemon:
        slow = await RawClient.connect(daemon.ws_url + "/busy")
        assert (await slow.handshake()).status_code == 101
        good = [await daemon.connect("/busy") for _ in range(GOOD_CLIENTS)]
        for ws in good:
            await subscribed(ws, "busy")
        readers = [asyncio.create_task(good_reader(ws)) for ws in good]

        published = 0
        limit = 4 * (kernel_buffers() + OUTBOX_BYTES + WRITE_LIMIT) // len(PAYLOAD)
        while published < limit:
            results = await publish_batch(daemon)
            published += len(results)
            assert_memory_bounded(daemon)
            if results[-1]["subscribers"] == GOOD_CLIENTS:
                break  # the slow client's outbox refused: it is being disconnected
        else:
            raise AssertionError("the slow consumer was never disconnected")

        await daemon.publish("busy", "end")
        # Every good client got every message, in order, none missing.
        for offsets in await asyncio.gather(*readers):
            assert offsets == list(range(1, published + 2))
        for ws in good:
            await ws.close()
        close = await slow.read_until_closed()
        assert close is not None
        assert (close.code, close.reason) == (1013, "slow consumer")
        channel = (await daemon.http.get("/channels/busy")).json()
        assert channel["offset"] == published + 1


async def test_good_clients_receive_every_message_while_one_stalls(daemon_factory: Any) -> None:
    async with daemon_factory(**SETTINGS) as daemon:
        slow = await RawClient.connect(daemon.ws_url + "/busy")
        await slow.handshake()
        good = [await daemon.connect("/busy") for _ in range(GOOD_CLIENTS)]
        for ws in good:
            await subscribed(ws, "busy")
        total = 2 * (kernel_buffers() + OUTBOX_BYTES) // len(PAYLOAD) // BATCH * BATCH
        readers = [asyncio.create_task(good_reader(ws, total)) for ws in good]
        for _ in range(total // BATCH):
            await publish_batch(daemon)
            assert_memory_bounded(daemon)
        for offsets in await asyncio.gather(*readers):
            assert offsets == list(range(1, total + 1))
        slow.close()


async def test_drop_oldest_tells_the_client_what_it_missed(daemon_factory: Any) -> None:
    async with daemon_factory(
        **SETTINGS, **{"ws.slow_consumer_policy": SlowConsumerPolicy.DROP_OLDEST.value}
    ) as daemon:
        slow = await RawClient.connect(daemon.ws_url + "/busy")
        await slow.handshake()
        async with daemon.connect("/busy") as good:
            await subscribed(good, "busy")
            total = 3 * (kernel_buffers() + OUTBOX_BYTES + WRITE_LIMIT) // len(PAYLOAD)
            total = total // BATCH * BATCH
            reader = asyncio.create_task(good_reader(good, total))
            for _ in range(total // BATCH):
                results = await publish_batch(daemon)
                assert results[-1]["subscribers"] == 2  # never disconnected
                assert_memory_bounded(daemon)
            assert await reader == list(range(1, total + 1))
            await daemon.http.post("/publish/busy", json="last")

            received: list[int] = []
            missed = 0
            while not received or received[-1] != total + 1:
                await slow.read_events()
                for text in slow.text_frames():
                    doc = json.loads(text)
                    if doc.get("type") == "missed":
                        missed += doc["count"]
                    elif "type" not in doc:
                        received.append(doc["offset"])
                slow.frames.clear()
            assert missed > 0
            assert received == sorted(received)
            assert len(received) + missed == total + 1
        slow.close()
