"""permessage-deflate, compressed once per message for every subscriber that
negotiated it: against websockets' own client (which checks every frame it
inflates), and on the wire (RSV1, sizes, what the 101 says)."""

from __future__ import annotations

import asyncio
import json
import zlib
from typing import Any

import pytest

from .conftest import Running, recv_json, subscribed

BIG = {"text": "broadcastd " * 200, "n": list(range(100))}  # ~2.5 KiB of JSON
OFFER = "permessage-deflate; client_max_window_bits"


async def test_one_message_is_compressed_once_for_every_subscriber(daemon_factory: Any) -> None:
    async with daemon_factory(ws__compression=True) as d:
        clients = [await d.connect("/news", compression="deflate") for _ in range(10)]
        plain = await d.connect("/news")  # offers nothing: uncompressed
        for ws in [*clients, plain]:
            await subscribed(ws, "news")
        for ws in clients:
            (extension,) = ws.protocol.extensions
            assert extension.remote_no_context_takeover  # the server's frames stand alone
            assert extension.local_no_context_takeover
        before = d.daemon.ws.deflater.compressed
        await d.publish("news", BIG)
        await d.publish("news", "small")
        for ws in [*clients, plain]:
            assert (await recv_json(ws))["data"] == BIG
            assert (await recv_json(ws))["data"] == "small"
        assert d.daemon.ws.deflater.compressed - before == 1
        # A compressed command from the client is read too.
        await clients[0].send(json.dumps({"op": "subscribe", "channel": "other", "pad": "x" * 600}))
        assert (await recv_json(clients[0]))["type"] in ("subscribed", "error")
        for ws in [*clients, plain]:
            await ws.close()


class Wire:
    """A socket that speaks just enough WebSocket to see frames as they are sent
    (websockets' own client would refuse RSV1 without the extension)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, d: Running, offer: str | None) -> tuple[Wire, bytes]:
        """Connected and subscribed to ``news``, having offered ``offer``; the answer's head."""
        reader, writer = await asyncio.open_connection("127.0.0.1", d.daemon.ws.port)
        extra = f"Sec-WebSocket-Extensions: {offer}\r\n" if offer else ""
        writer.write(
            (
                "GET /news HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                f"{extra}\r\n"
            ).encode()
        )
        head = await reader.readuntil(b"\r\n\r\n")
        wire = cls(reader, writer)
        if head.startswith(b"HTTP/1.1 101"):
            await wire.frame()  # subscribed
        return wire, head

    async def frame(self) -> tuple[bool, bytes]:
        """The next frame: whether RSV1 is set, and its payload."""
        async with asyncio.timeout(10):
            first, second = await self.reader.readexactly(2)
            n = second & 0x7F
            if n == 126:
                n = int.from_bytes(await self.reader.readexactly(2), "big")
            elif n == 127:
                n = int.from_bytes(await self.reader.readexactly(8), "big")
            return bool(first & 0x40), await self.reader.readexactly(n)

    def close(self) -> None:
        self.writer.close()


@pytest.mark.parametrize(
    ("offer", "compressed"),
    [
        (OFFER, True),
        ("permessage-deflate; server_no_context_takeover; client_no_context_takeover", True),
        ("permessage-deflate; server_max_window_bits=15", True),
        ("permessage-deflate; server_max_window_bits=10", False),  # cannot share: declined
        ("permessage-deflate; unknown_parameter", False),
        ("x-webkit-deflate-frame", False),
        (None, False),
    ],
)
async def test_the_wire_says_what_was_negotiated(
    daemon_factory: Any, offer: str | None, compressed: bool
) -> None:
    async with daemon_factory(ws__compression=True, ws__compression_min_bytes=256) as d:
        wire, head = await Wire.open(d, offer)
        negotiated = b"Sec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover"
        assert (negotiated in head) is compressed, head
        await d.publish("news", BIG)
        await d.publish("news", "x" * 100)  # below compression_min_bytes
        (rsv1, data), (small_rsv1, small) = await wire.frame(), await wire.frame()
        assert rsv1 is compressed
        body = zlib.decompressobj(-15).decompress(data + b"\x00\x00\xff\xff") if rsv1 else data
        assert json.loads(body)["data"] == BIG
        if compressed:
            assert len(data) < len(body) / 4
        assert not small_rsv1
        assert json.loads(small)["data"] == "x" * 100
        wire.close()


async def test_a_malformed_offer_is_refused_and_an_offer_is_ignored_when_off(
    daemon_factory: Any,
) -> None:
    async with daemon_factory(ws__compression=True) as d:
        wire, head = await Wire.open(d, "permessage-deflate; =")
        assert head.startswith(b"HTTP/1.1 400"), head
        wire.close()
    async with daemon_factory() as d:
        wire, head = await Wire.open(d, OFFER)
        assert b"Sec-WebSocket-Extensions" not in head
        await d.publish("news", BIG)
        rsv1, _ = await wire.frame()
        assert not rsv1
        wire.close()


async def test_frames_queued_across_passes_stay_whole(daemon_factory: Any) -> None:
    """Messages published while a compressing reader does not read are written in
    later passes; every one arrives whole and in order."""
    async with (
        daemon_factory(ws__compression=True) as d,
        d.connect("/news", compression="deflate", max_queue=None) as ws,
    ):
        await subscribed(ws, "news")
        for i in range(50):
            await d.publish("news", {**BIG, "i": i})
        for i in range(50):
            assert (await recv_json(ws))["data"]["i"] == i
