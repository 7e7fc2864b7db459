"""Streams end to end: positions, lossless recovery on reconnect, plain refusals,
idempotent publishing, and the bounds of history."""

from __future__ import annotations

import asyncio
import json
import random
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broadcastd.core.envelope import Payload
from broadcastd.core.outbox import Outbox
from broadcastd.core.session import Session
from broadcastd.core.stream import Position
from broadcastd.node import Node

from .conftest import DaemonProcess, Running, make_settings, recv_json
from .test_metrics import scrape, value


async def first_reply(ws: Any) -> dict[str, Any]:
    reply = await recv_json(ws)
    assert reply["type"] == "subscribed", reply
    return reply


async def publish_batches(daemon: Running, channel: str, total: int, size: int = 50) -> None:
    for start in range(1, total + 1, size):
        batch = [
            {"channel": channel, "data": i} for i in range(start, min(start + size, total + 1))
        ]
        response = await daemon.http.post("/batch", json=batch)
        assert response.status_code == 200
        await asyncio.sleep(0)  # let the subscribers' side run between batches


@pytest.mark.parametrize("form", ["url", "in-band"])
async def test_a_reset_connection_resumes_with_nothing_missing_or_doubled(
    daemon_factory: Any, form: str
) -> None:
    total = 2000
    async with daemon_factory(**{"history.size": total, "history.max_recover": total}) as daemon:
        got: list[int] = []
        ws = await daemon.connect("/?channel=c").__aenter__()
        epoch = (await first_reply(ws))["epoch"]
        publisher = asyncio.create_task(publish_batches(daemon, "c", total))
        while len(got) < 500:
            got.append((await recv_json(ws))["data"])
        ws.transport.abort()  # an RST, mid-stream
        last = got[-1]
        if form == "url":
            resumed = await daemon.connect(f"/?since=c:{epoch}:{last}").__aenter__()
        else:
            resumed = await daemon.connect("/").__aenter__()
            since = {"epoch": epoch, "offset": last}
            await resumed.send(json.dumps({"op": "subscribe", "channel": "c", "since": since}))
        reply = await first_reply(resumed)
        assert (reply["recovered"], reply["epoch"]) == (True, epoch)
        while got[-1] < total:
            message = await recv_json(resumed)
            assert message["offset"] == message["data"]
            got.append(message["data"])
        assert got == list(range(1, total + 1))
        await publisher
        await resumed.close()
        m = await scrape(daemon)
        assert value(m, "broadcastd_recoveries_total", recovered="true", reason="") == 1
        assert value(m, "broadcastd_messages_replayed_total") == reply["offset"] - last


async def test_the_last_n_messages_for_a_new_subscriber(daemon: Running) -> None:
    for i in range(10):
        await daemon.publish("tail", i)
    async with daemon.connect("/?since=tail:last:3") as ws:
        reply = await first_reply(ws)
        assert reply["offset"] == 10
        assert "recovered" not in reply
        assert [(await recv_json(ws))["data"] for _ in range(3)] == [7, 8, 9]


@pytest.mark.parametrize(
    ("overrides", "since", "reason"),
    [
        ({"history.size": 5}, 2, "too_old"),
        ({"history.max_recover": 3}, 2, "too_many"),
        ({"history.size": 0}, 2, "disabled"),
        ({}, 99, "position"),
    ],
)
async def test_what_cannot_be_recovered_is_said_plainly(
    daemon_factory: Any, overrides: dict[str, Any], since: int, reason: str
) -> None:
    async with daemon_factory(**overrides) as daemon:
        epoch = ""
        for i in range(10):
            epoch = (await daemon.publish("c", i))["epoch"]
        async with daemon.connect(f"/?since=c:{epoch}:{since}") as ws:
            reply = await first_reply(ws)
            assert (reply["recovered"], reply["reason"], reply["offset"]) == (False, reason, 10)
            await daemon.publish("c", "live")
            assert (await recv_json(ws))["data"] == "live"  # nothing from before
        m = await scrape(daemon)
        assert value(m, "broadcastd_recoveries_total", recovered="false", reason=reason) == 1


def test_a_restart_is_another_epoch() -> None:
    first = DaemonProcess()
    try:
        first.wait_ready()
        url = f"http://127.0.0.1:{first.control_port}"
        epoch = httpx.post(f"{url}/publish/c", json=1).json()["epoch"]
    finally:
        first.proc.terminate()
        assert first.finish() == 0
    second = DaemonProcess()
    try:
        second.wait_ready()

        async def resume() -> dict[str, Any]:
            from websockets.asyncio.client import connect

            uri = f"ws://127.0.0.1:{second.ws_port}/?since=c:{epoch}:1"
            async with connect(uri) as ws:
                return await first_reply(ws)

        reply = asyncio.run(resume())
        assert (reply["recovered"], reply["reason"]) == (False, "epoch")
        assert reply["epoch"] != epoch
    finally:
        second.proc.terminate()
        assert second.finish() == 0


async def test_an_idempotency_key_publishes_once(daemon: Running) -> None:
    async with daemon.connect("/k") as ws:
        await first_reply(ws)
        headers = {"Idempotency-Key": "order-17"}
        first = (await daemon.http.post("/publish/k", json=1, headers=headers)).json()
        again = (await daemon.http.post("/publish/k", json=1, headers=headers)).json()
        assert again.pop("duplicate") is True
        assert again == {**first, "subscribers": 0}
        # pipelined: both in one read
        reader, writer = await asyncio.open_connection("127.0.0.1", daemon.daemon.control.port)
        request = (
            b"POST /publish/k HTTP/1.1\r\nHost: x\r\nIdempotency-Key: p\r\n"
            b"Content-Type: application/json\r\nContent-Length: 1\r\n\r\n2"
        )
        writer.write(request * 2)
        answers = []
        for _ in range(2):
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            answers.append(json.loads(await reader.readexactly(length)))
        writer.close()
        assert answers[0]["offset"] == answers[1]["offset"] == 2
        # inside one batch
        batch = [{"channel": "k", "data": 3, "idempotency_key": "b"}] * 2
        results = (await daemon.http.post("/batch", json=batch)).json()["results"]
        assert results[0]["offset"] == results[1]["offset"] == 3
        assert results[1]["duplicate"] is True
        await daemon.publish("k", "end")
        assert [(await recv_json(ws))["data"] for _ in range(4)] == [1, 2, 3, "end"]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["publish", "drop", "resume"]), st.integers(0, 3)),
        max_size=80,
    ),
    st.integers(1, 6),
)
def test_any_interleaving_of_publishes_drops_and_resumes(
    ops: list[tuple[str, int]], size: int
) -> None:
    """Clients drop and resume at random while publishes flow: within history each
    receives every offset once, in order; beyond it, it is told, never skipped."""
    node = Node(make_settings(**{"history.size": size}))
    node.broker.attach(node)  # type: ignore[attr-defined]  # the memory engine, started
    clients: dict[int, dict[str, Any]] = {}
    published = 0
    rng = random.Random(len(ops))

    def connect(i: int, since: Position | None) -> None:
        outbox = Outbox(10_000, 10_000_000)
        session = Session(f"c{i}", node, outbox)
        session.open(["c"], [] if since is None else [("c", since)])
        clients[i] = {
            "session": session,
            "outbox": outbox,
            "got": clients.get(i, {}).get("got", []),
        }
        read(i)

    def read(i: int) -> None:
        client = clients[i]
        for frame in client["outbox"].take():
            doc = json.loads(frame[2:] if frame[1] < 126 else frame[4:])
            if doc.get("type") == "subscribed":
                client["epoch"] = doc["epoch"]
                if doc.get("recovered") is False:
                    client["told"] = doc["offset"]  # a gap it was told of
                    client["got"].append(("gap", doc["offset"]))
            else:
                client["got"].append(doc["offset"])

    for i in range(4):
        connect(i, None)
    for op, i in ops:
        if op == "publish":
            node.publish("c", Payload.from_value(rng.random()), "json")
            published += 1
            for j, client in clients.items():
                if client.get("session") is not None:
                    read(j)
        elif op == "drop" and clients[i].get("session") is not None:
            clients[i]["session"].close()
            clients[i]["session"] = None
        elif op == "resume" and clients[i].get("session") is None:
            got = [o for o in clients[i]["got"] if isinstance(o, int)]
            connect(i, Position(clients[i]["epoch"], got[-1] if got else 0))
    for client in clients.values():
        offsets: list[int] = []
        expected_next = 1
        for entry in client["got"]:
            if isinstance(entry, tuple):  # told: the count goes on from the top
                expected_next = entry[1] + 1
                continue
            assert entry == expected_next, client["got"]
            offsets.append(entry)
            expected_next += 1
        if client["session"] is not None:
            assert expected_next == published + 1  # a connected client is up to date


def test_the_byte_budget_holds_under_100000_channels() -> None:
    budget = 16 * 1024 * 1024
    daemon = DaemonProcess("--history-max-bytes", str(budget), "--channels-max-channels", "100000")
    try:
        daemon.wait_ready()
        url = f"http://127.0.0.1:{daemon.control_port}"

        def rss() -> int:
            with open(f"/proc/{daemon.proc.pid}/status") as status:
                line = next(x for x in status if x.startswith("VmRSS:"))
            return int(line.split()[1]) * 1024

        before = rss()
        with httpx.Client(base_url=url, timeout=60) as client:
            for _ in range(3):
                for start in range(0, 100_000, 10_000):
                    batch = [
                        {"channel": f"ch{n}", "data": "x" * 200}
                        for n in range(start, start + 10_000)
                    ]
                    assert client.post("/batch", json=batch).status_code == 200
            metrics = client.get("/metrics").text
        kept = next(
            float(line.split()[1])
            for line in metrics.splitlines()
            if line.startswith("broadcastd_history_bytes ")
        )
        assert kept <= budget
        # The budget, plus 100,000 channels' positions (about 1 KiB each), plus slack.
        grown = rss() - before
        assert grown <= budget + 100_000 * 1024 + 32 * 1024 * 1024, grown
    finally:
        daemon.proc.terminate()
        assert daemon.finish() == 0


async def test_the_history_endpoint_pages_and_refuses_bad_parameters(
    daemon_factory: Any,
) -> None:
    async with daemon_factory(**{"history.size": 5}) as daemon:
        epoch = ""
        for i in range(1, 9):
            epoch = (await daemon.publish("h", {"n": i, "big": 2**70}))["epoch"]
        http = daemon.http
        first = (await http.get("/channels/h/history", params={"limit": 2})).json()
        assert (first["epoch"], first["offset"], first["complete"]) == (epoch, 8, False)
        assert [p["offset"] for p in first["publications"]] == [4, 5]
        assert first["publications"][0]["data"] == {"n": 4, "big": 2**70}  # verbatim
        rest = (await http.get(f"/channels/h/history?since={first['next']}&limit=10")).json()
        assert [p["offset"] for p in rest["publications"]] == [6, 7, 8]
        assert (rest["complete"], rest["next"]) == (True, None)
        newest = (await http.get("/channels/h/history?order=desc&limit=2")).json()
        assert [p["offset"] for p in newest["publications"]] == [8, 7]
        ok = await http.get(f"/channels/h/history?since=8&epoch={epoch}")
        assert ok.json()["publications"] == []
        for query, status, code in [
            ("since=-1", 400, "bad_request"),
            ("limit=0", 400, "bad_request"),
            ("limit=1001", 400, "bad_request"),
            ("order=up", 400, "bad_request"),
            ("colour=red", 400, "bad_request"),
            ("epoch=other", 409, "epoch_mismatch"),
        ]:
            response = await http.get(f"/channels/h/history?{query}")
            assert (response.status_code, response.json()["error"]["code"]) == (status, code)
        missing = await http.get("/channels/nothing/history")
        assert (missing.status_code, missing.json()["error"]["code"]) == (404, "not_found")
