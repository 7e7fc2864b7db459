"""SIGTERM drains: nothing accepted is lost, then 1001, then exit 0."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect

from .conftest import DaemonProcess, recv_json, subscribed
from .rawclient import RawClient

SUBSCRIBERS = 50
MESSAGES = 5000
BATCH = 500


@pytest.fixture
def process() -> Iterator[DaemonProcess]:
    # Nothing here may depend on how fast a loaded machine runs: no keepalive (the
    # holder below never answers a ping), and outboxes that hold every message
    # (so no slow-consumer policy acts on a subscriber that falls behind).
    proc = DaemonProcess(
        "--drain-timeout",
        "60",
        "--ws-close-timeout",
        "30",
        "--ws-ping-interval",
        "none",
        "--ws-outbox-messages",
        str(2 * MESSAGES),
    )
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.kill()


async def drain_started(process: DaemonProcess) -> None:
    """Wait for the daemon to log drain.start (reading its stdout in a thread)."""
    events = process.events()
    found = await asyncio.to_thread(
        lambda: next((e for e in events if e["event"] == "drain.start"), None)
    )
    assert found is not None, process.lines


async def read_all(ws: Any) -> tuple[list[int], int | None]:
    """Offsets of every message until the connection ends, and the close code."""
    offsets = []
    async for message in ws:
        offsets.append(json.loads(message)["offset"])
    return offsets, ws.close_code


async def test_sigterm_flushes_everything_accepted_then_closes_1001(
    process: DaemonProcess,
) -> None:
    ws_url = f"ws://127.0.0.1:{process.ws_port}/drain"
    control = httpx.AsyncClient(base_url=f"http://127.0.0.1:{process.control_port}", timeout=30)
    subscribers = []
    for _ in range(SUBSCRIBERS):
        ws = await connect(ws_url, compression=None)
        await subscribed(ws, "drain")
        subscribers.append(ws)
    # A client that reads nothing until told holds the drain open long enough
    # to look at the daemon while it drains.
    holder = await RawClient.connect(ws_url)
    await holder.handshake()
    readers = [asyncio.create_task(read_all(ws)) for ws in subscribers]

    for start in range(0, MESSAGES, BATCH):
        items = [{"channel": "drain", "data": {"n": n}} for n in range(start, start + BATCH)]
        response = await control.post("/batch", json=items)
        assert response.status_code == 200
        assert response.json()["published"] == BATCH
    process.proc.send_signal(signal.SIGTERM)

    await drain_started(process)
    ready = await control.get("/readyz")
    assert (ready.status_code, ready.json()) == (503, {"ready": False, "reason": "draining"})
    refused = await control.post("/publish/drain", json="late")
    assert (refused.status_code, refused.json()["error"]["code"]) == (503, "draining")
    with pytest.raises(OSError):
        await connect(ws_url, open_timeout=5)

    for offsets, code in await asyncio.gather(*readers):
        assert offsets == list(range(1, MESSAGES + 1))
        assert code == 1001
    close = await holder.read_until_closed()
    assert close is not None
    assert close.code == 1001
    held = [json.loads(t) for t in holder.text_frames()]
    assert [m["offset"] for m in held if "type" not in m] == list(range(1, MESSAGES + 1))
    holder.close()
    await control.aclose()

    status = await asyncio.to_thread(process.finish)
    assert status == 0
    names = [e.get("event") for e in process.lines]
    assert "drain.done" in names
    done = next(e for e in process.lines if e.get("event") == "drain.done")
    assert done["aborted"] == 0


async def test_a_second_signal_exits_at_once(process: DaemonProcess) -> None:
    holder = await RawClient.connect(f"ws://127.0.0.1:{process.ws_port}/x")
    await holder.handshake()
    async with httpx.AsyncClient() as client:
        await client.post(f"http://127.0.0.1:{process.control_port}/publish/x", json=1)
    process.proc.send_signal(signal.SIGTERM)
    await drain_started(process)
    process.proc.send_signal(signal.SIGTERM)
    status = await asyncio.to_thread(process.finish)
    assert status == 128 + signal.SIGTERM
    holder.close()


async def test_sigint_drains_like_sigterm(process: DaemonProcess) -> None:
    async with connect(f"ws://127.0.0.1:{process.ws_port}/x", compression=None) as ws:
        await subscribed(ws, "x")
        process.proc.send_signal(signal.SIGINT)
        with pytest.raises(Exception, match="1001"):
            await recv_json(ws)
    assert await asyncio.to_thread(process.finish) == 0
