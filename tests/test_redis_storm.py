"""A storm of a node's own clients never makes it take a healthy Redis for down.

Every deploy makes all clients reconnect at once. On a Redis node, a thousand
resumes at once are a thousand history reads and position reads on top of the
handshakes: the event loop is busy, and replies wait in the socket before it
reads them. The node must judge Redis by what Redis does, not by how late it
gets to read the answers: readiness stays true, no client is answered with an
error, and every client recovers exactly what it missed while publishing goes on.

The storm is scenario R of the benchmarks (``benchmarks.scenarios.r_recovery``),
run at full size against one Redis node with readiness polled all along.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import httpx
import pytest

from benchmarks.scenarios import QUICK, r_recovery, server_env
from benchmarks.servers.adapters import BroadcastdRedis


@pytest.fixture
def redis_available() -> None:
    reason = BroadcastdRedis.unavailable()
    if reason is not None:
        pytest.skip(reason)


async def test_a_thousand_resumes_at_once_keep_a_redis_node_ready_and_lose_nothing(
    tmp_path: Path, redis_available: None
) -> None:
    params = dataclasses.replace(
        QUICK,
        r_clients=1000,
        r_channels=10,
        r_rate=200.0,
        r_warmup=1.0,
        r_outage=0.5,
        connect_concurrency=500,
        connect_timeout=120.0,
        settle_timeout=60.0,
        scenario_timeout=180.0,
    )
    # One core for the node, as deployed on a busy machine: the storm must not
    # make it take Redis for down however busy it is.
    server = BroadcastdRedis(tmp_path, pin_core=0)
    server.extra_env.update(server_env("R", params))
    # A healthy Redis answers within a millisecond; a tight timeout makes any
    # lateness of the node's own reading show.
    server.extra_env["BROADCASTD_BROKER__REDIS__TIMEOUT"] = "0.2"
    server.extra_env["BROADCASTD_BROKER__REDIS__PROBE_TIMEOUT"] = "0.5"
    await server.start()
    answers: list[int] = []
    stop = asyncio.Event()

    async def poll_readiness() -> None:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.control_port}") as http:
            while not stop.is_set():  # each poll is a round trip: no sleep needed
                answers.append((await http.get("/readyz")).status_code)

    poller = asyncio.create_task(poll_readiness())
    try:
        async with asyncio.timeout(params.scenario_timeout):
            result = await r_recovery(server, params)
    finally:
        stop.set()
        await poller
        await server.stop()
    details = result["details"]
    assert answers, "readiness was never read"
    assert set(answers) == {200}, f"readiness went false: {sorted(set(answers))}"
    assert details["clients"] == 1000, details
    assert details["connect_errors"] == {}, details
    assert details["unexpected_replies"] == {}, details  # no error reply, no resync
    assert details["recovered_true"] == 1000, details
    assert details["replayed"] == details["replay_expected"], details
    assert details["ordering_violations"] == 0, details
    assert details["live"] == 1000, details
