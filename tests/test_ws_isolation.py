"""The subscriber port under hostile input: each case is contained to its connection.

Every case here reproduced a defect of an earlier release; each asserts what the
misbehaving client gets (a JSON refusal, a close code) and, where the defect
reached others, what a well-behaved witness still receives.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from typing import Any

import pytest
from websockets.frames import Opcode

from .conftest import Running, recv_json, subscribed
from .rawclient import RawClient
from .test_metrics import scrape, value

KEY = b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
HANDSHAKE = (
    b"GET /h HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    + KEY
    + b"Sec-WebSocket-Version: 13\r\n\r\n"
)


def client_frame(opcode: int, payload: bytes = b"", fin: bool = True) -> bytes:
    """A masked client frame (all-zero mask, so the payload goes as it is)."""
    assert len(payload) < 126
    return bytes(((0x80 if fin else 0) | opcode, 0x80 | len(payload))) + b"\0\0\0\0" + payload


async def http_answer(daemon: Running, request: bytes) -> tuple[int, dict[str, str], Any]:
    """Send raw bytes to the subscriber port; return the HTTP status, headers and JSON body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", daemon.daemon.ws.port)
    writer.write(request)
    try:
        head = await reader.readuntil(b"\r\n\r\n")
        status_line, *lines = head.decode().split("\r\n")
        headers = {k.lower(): v for k, _, v in (line.partition(": ") for line in lines if line)}
        body = await reader.readexactly(int(headers["content-length"]))
    finally:
        writer.close()
    return int(status_line.split()[1]), headers, json.loads(body)


def half_close_now(client: RawClient) -> None:
    """Send FIN at once (an event loop's write_eof may wait for its next turn)."""
    sock = socket.socket(fileno=socket.dup(client.writer.get_extra_info("socket").fileno()))
    sock.shutdown(socket.SHUT_WR)
    sock.close()


async def fill_until_paused(daemon: Running, channel: str, conn: Any) -> None:
    """Publish until the connection's transport is above its write limit."""
    while not conn.write_paused:
        batch = [{"channel": channel, "data": "x" * 1000}] * 200
        assert (await daemon.http.post("/batch", json=batch)).status_code == 200


HANDSHAKE_REFUSALS = {
    "POST": (b"POST /h HTTP/1.1\r\nHost: x\r\n\r\n", 405, "method_not_allowed"),
    "PUT": (b"PUT /h HTTP/1.1\r\nHost: x\r\n\r\n", 405, "method_not_allowed"),
    "HTTP/1.0": (HANDSHAKE.replace(b"HTTP/1.1", b"HTTP/1.0"), 505, "http_version_not_supported"),
    "plain GET": (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 426, "upgrade_required"),
    "9000-byte URL": (
        HANDSHAKE.replace(b"GET /h", b"GET /" + b"a" * 9000),
        414,
        "uri_too_long",
    ),
    "9000-byte header": (
        HANDSHAKE.replace(b"Host: x", b"Host: x\r\nX-Big: " + b"b" * 9000),
        431,
        "headers_too_large",
    ),
    "200 headers": (
        HANDSHAKE.replace(b"Host: x", b"Host: x" + b"\r\nX-N: 1" * 200),
        431,
        "headers_too_large",
    ),
    "garbage request line": (b"\x16\x03\x01garbage\r\n\r\n", 400, "bad_request"),
    "garbage after the handshake": (HANDSHAKE + b"\xff\xff\xff\xff\x00garbage", 400, "bad_request"),
    "a frame before the 101": (HANDSHAKE + client_frame(0x9), 400, "bad_request"),
    "two Origin headers": (
        HANDSHAKE.replace(b"Host: x", b"Host: x\r\nOrigin: a\r\nOrigin: b"),
        400,
        "bad_request",
    ),
    "two keys": (HANDSHAKE.replace(KEY, KEY + KEY), 400, "bad_request"),
    "103 channels": (
        HANDSHAKE.replace(b"GET /h", b"GET /?" + b"&".join(b"channel=c%d" % i for i in range(103))),
        400,
        "too_many_channels",
    ),
}


@pytest.mark.parametrize("case", list(HANDSHAKE_REFUSALS))
async def test_every_refused_handshake_gets_a_json_error(daemon: Running, case: str) -> None:
    request, status, code = HANDSHAKE_REFUSALS[case]
    async with daemon.connect("/witness") as witness:
        await subscribed(witness, "witness")
        got_status, headers, body = await http_answer(daemon, request)
        assert (got_status, body["error"]["code"]) == (status, code), body
        assert headers["content-type"] == "application/json"
        await daemon.publish("witness", case)
        assert (await recv_json(witness))["data"] == case
    m = await scrape(daemon)
    assert value(m, "broadcastd_connections_rejected_total", reason="bad_request") == 1


async def test_a_fin_in_the_same_turn_as_a_publish_silences_nobody(daemon_factory: Any) -> None:
    """FIN clients half-close while a batch fans out to them; the witnesses that
    share their channel (and come after them in the fan-out) must receive every
    message, before and after."""
    rounds = 5
    async with daemon_factory(**{"ws.ping_interval": None}) as daemon:
        finners = [await RawClient.connect(daemon.ws_url + "/c", rcvbuf=None) for _ in range(20)]
        for client in finners:
            await client.handshake()
            while not client.text_frames():  # the subscribed reply
                await client.read_events()
        witnesses = [await daemon.connect("/c").__aenter__() for _ in range(10)]
        for ws in witnesses:
            await subscribed(ws, "c")
        reader, writer = await asyncio.open_connection("127.0.0.1", daemon.daemon.control.port)
        for round_ in range(rounds):
            # Publish and half-close in one burst, with no await in between, so the
            # daemon reads both in one event-loop turn: it fans out to the FIN
            # clients, then reads their FINs, then its writers run.
            body = json.dumps([{"channel": "c", "data": [round_, i]} for i in range(50)])
            writer.write(
                b"POST /batch HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body.encode())
            )
            for client in finners[round_ * 4 : round_ * 4 + 4]:
                half_close_now(client)
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200"), head
            await reader.readexactly(int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0]))
        writer.close()
        await daemon.publish("c", "last")
        for ws in witnesses:
            got = []
            while True:
                message = await recv_json(ws)
                if message["data"] == "last":
                    break
                got.append(message["data"])
            assert got == [[r, i] for r in range(rounds) for i in range(50)]
            await ws.close()
        for client in finners:
            client.close()


async def test_a_ping_flood_that_never_reads_is_not_buffered(daemon_factory: Any) -> None:
    """Reading pauses while a connection is above its write limit, so what the
    client can make the server write back stays bounded."""
    limit = 16 * 1024
    async with daemon_factory(**{"ws.write_limit": limit, "ws.ping_interval": None}) as daemon:
        client = await RawClient.connect(daemon.ws_url + "/p", rcvbuf=4096)
        await client.handshake()
        ((_, conn),) = daemon.daemon.ws.connections()
        assert conn.transport is not None
        # A small kernel buffer on the server's side too, so that the daemon's own
        # buffering shows after kilobytes instead of the megabytes loopback allows.
        conn.transport.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_SNDBUF, 4096
        )
        sock = client.writer.get_extra_info("socket")
        raw = socket.socket(fileno=socket.dup(sock.fileno()))
        raw.setblocking(False)
        flood = client_frame(0x9, b"p" * 120) * 512  # 64 KiB of pings per send
        sent = stalled = 0
        pending = memoryview(flood)
        # Flood until the server has stopped reading for two thousand loop turns in
        # a row (or 16 MiB went out: then it never stopped, and the checks fail).
        while sent < 16 * 1024 * 1024 and stalled < 2000:
            try:
                n = raw.send(pending)  # partial sends resume mid-frame
                sent += n
                pending = pending[n:] or memoryview(flood)
                stalled = 0
            except BlockingIOError:
                stalled += 1
            await asyncio.sleep(0)  # the daemon runs in this loop: let it read
        assert conn.transport is not None
        # The server stopped reading because its answers are not read, not by chance,
        # with at most one read slice of pings answered past the limit.
        assert not conn.transport.is_reading()
        assert conn.transport.get_write_buffer_size() <= limit + 16 * 1024 + 4096
        raw.close()
        client.close()


async def test_empty_continuation_frames_are_bounded(daemon: Running) -> None:
    async with daemon.connect("/witness") as witness:
        await subscribed(witness, "witness")
        client = await RawClient.connect(daemon.ws_url + "/", rcvbuf=None)
        await client.handshake()
        client.send_raw(client_frame(0x1, b"{", fin=False) + client_frame(0x0, fin=False) * 10_000)
        close = await client.read_until_closed()
        assert close is not None
        assert close.code == 1009
        client.close()
        await daemon.publish("witness", "still here")
        assert (await recv_json(witness))["data"] == "still here"


@pytest.mark.parametrize("form", ["batch", "pipelined"])
async def test_a_burst_larger_than_the_outbox_reaches_a_reader(
    daemon_factory: Any, form: str
) -> None:
    """A client is slow only when its socket cannot take more: a batch of 2000
    (outbox bound 1024) reaches a subscriber that reads."""
    async with daemon_factory() as daemon, daemon.connect("/big") as ws:
        await subscribed(ws, "big")
        count = 2000 if form == "batch" else 1500
        if form == "batch":
            response = await daemon.http.post(
                "/batch", json=[{"channel": "big", "data": i} for i in range(count)]
            )
            assert response.status_code == 200
        else:
            reader, writer = await asyncio.open_connection("127.0.0.1", daemon.daemon.control.port)
            request = b"POST /publish/big HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%d"
            writer.write(b"".join(request % (len(b"%d" % i), i) for i in range(count)))
            for _ in range(count):
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
                assert b" 200 " in head.split(b"\r\n")[0]
                await reader.readexactly(length)
            writer.close()
        for i in range(count):
            assert (await recv_json(ws))["data"] == (i if form == "batch" else str(i))
        m = await scrape(daemon)
        assert value(m, "broadcastd_slow_consumer_actions_total", policy="disconnect") == 0


async def test_drain_cuts_connections_that_never_handshake(daemon_factory: Any) -> None:
    """A load balancer's TCP check must not hold the drain for ws.open_timeout."""
    async with daemon_factory(**{"ws.open_timeout": 3600, "drain_timeout": 3600}) as daemon:
        reader, writer = await asyncio.open_connection("127.0.0.1", daemon.daemon.ws.port)
        async with daemon.connect("/w") as ws:
            await subscribed(ws, "w")  # the TCP check has surely been accepted by now
            daemon.daemon.shutdown()
            try:
                async with asyncio.timeout(60):  # turns a hang into a failure
                    assert await reader.read() == b""
            except ConnectionResetError:
                pass
            await ws.wait_closed()
        writer.close()


async def test_a_connection_without_subscriptions_is_closed_after_the_deadline(
    daemon_factory: Any,
) -> None:
    async with daemon_factory(**{"ws.subscribe_timeout": 0.2}) as daemon:
        async with daemon.connect("/") as idle, asyncio.timeout(30):
            await idle.wait_closed()
            assert idle.close_code == 4000
        async with daemon.connect("/a") as leaver, asyncio.timeout(30):
            await subscribed(leaver, "a")
            await leaver.send(json.dumps({"op": "unsubscribe", "channel": "a"}))
            assert (await recv_json(leaver))["type"] == "unsubscribed"
            await leaver.wait_closed()
            assert leaver.close_code == 4000


async def test_delivery_latency_counts_the_time_spent_in_a_paused_outbox(
    daemon_factory: Any,
) -> None:
    async with daemon_factory(**{"ws.write_limit": 4096, "ws.ping_interval": None}) as daemon:
        node = daemon.daemon.node
        now = [1000.0]
        node.clock = lambda: now[0]
        slow = await RawClient.connect(daemon.ws_url + "/s", rcvbuf=4096)
        await slow.handshake()
        ((_, conn),) = daemon.daemon.ws.connections()
        await fill_until_paused(daemon, "s", conn)
        await daemon.publish("s", "held")  # queued while the transport is paused
        now[0] += 30.0  # the client reads only after 30 (injected) seconds
        seen = 0
        while not any(b"held" in bytes(f.data) for f in slow.frames[seen:]):
            seen = len(slow.frames)
            await slow.read_events()
        m = await scrape(daemon)
        over_10s = value(m, "broadcastd_delivery_latency_seconds_count") - value(
            m, "broadcastd_delivery_latency_seconds_bucket", le="10.0"
        )
        assert over_10s >= 1
        slow.close()


async def test_undocumented_client_close_codes_share_one_series(daemon: Running) -> None:
    for code in (4321, 4322, 3999):
        async with daemon.connect("/x") as ws:
            await subscribed(ws, "x")
            await ws.close(code=code)
    for _ in range(1000):  # each request lets the daemon see the connections end
        if not (await daemon.http.get("/stats")).json()["clients"]:
            break
    m = await scrape(daemon)
    assert value(m, "broadcastd_connections_closed_total", code="other", initiator="client") == 3
    assert not any('code="4321"' in name for name in m)


async def test_drop_oldest_never_drops_replies(daemon_factory: Any) -> None:
    settings = {
        "ws.slow_consumer_policy": "drop_oldest",
        "ws.outbox_messages": 8,
        "ws.write_limit": 4096,
        "ws.ping_interval": None,
    }
    async with daemon_factory(**settings) as daemon:
        slow = await RawClient.connect(daemon.ws_url + "/d", rcvbuf=4096)
        await slow.handshake()
        ((_, conn),) = daemon.daemon.ws.connections()
        await fill_until_paused(daemon, "d", conn)
        for i in range(20):  # commands (read once the client reads) and dropped messages
            if i < 5:
                slow.protocol.send_text(json.dumps({"op": "ping", "id": i}).encode())
                slow.flush()
            await daemon.publish("d", "x" * 1000)
        await daemon.publish("d", "end")
        pongs: list[int] = []
        missed = seen = 0
        done = False
        while not done:
            await slow.read_events()
            frames, seen = slow.frames[seen:], len(slow.frames)
            for frame in frames:
                if frame.opcode is not Opcode.TEXT:
                    continue
                doc = json.loads(bytes(frame.data))
                if doc.get("type") == "pong":
                    pongs.append(doc["id"])
                elif doc.get("type") == "missed":
                    missed += doc["count"]
                done = done or doc.get("data") == "end"
        assert pongs == [0, 1, 2, 3, 4]
        assert missed > 0
        slow.close()


def test_client_frame_helper_builds_masked_frames() -> None:
    frame = client_frame(Opcode.PING.value, b"ab")
    assert frame[:2] == bytes((0x89, 0x82))
    assert struct.unpack("!I", frame[2:6]) == (0,)
