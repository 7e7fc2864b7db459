"""A token's expiry takes effect at ``exp + leeway``, whatever the client's socket does.

A client that stopped reading holds its close frame back behind what is queued
for it; the expiry must not wait for that. At the moment it expires, the
connection leaves its channels: publishes no longer count it, nothing
published afterwards is queued for it, and when it reads again it finds only
what was published while its token was valid, then 4003.
"""

from __future__ import annotations

import asyncio
import json
import time

import jwt
from websockets.frames import Opcode

from .conftest import Running
from .rawclient import RawClient

SECRET = "e" * 32
PAYLOAD = "x" * 16_000


async def expired(d: Running, count: int = 1) -> None:
    """Until the daemon has counted ``count`` expiries (scraped: each scrape is a
    round trip, so the expiry is what ends the loop)."""
    series = 'broadcastd_auth_refusals_total{reason="token_expired"} '
    async with asyncio.timeout(30):
        while True:
            text = (await d.http.get("/metrics")).text
            line = next((x for x in text.splitlines() if x.startswith(series)), None)
            if line is not None and float(line.split()[-1]) >= count:
                return


async def paused(d: Running) -> None:
    """Publish until the daemon's writes to its one client are paused (the client's
    socket and the kernel's buffers are full)."""
    connections = d.daemon.ws.connections()
    assert len(connections) == 1
    _, conn = connections[0]
    batch = [{"channel": "news", "data": {"before": True, "text": PAYLOAD}}] * 64
    async with asyncio.timeout(60):
        while not conn.write_paused:  # a megabyte a request: a few fill every buffer
            assert conn.session is not None
            assert conn.session.channels, "the token expired before the buffers filled"
            assert (await d.http.post("/batch", json=batch)).status_code == 200


async def test_an_expired_token_leaves_its_channels_even_while_the_client_does_not_read(
    daemon_factory: object,
) -> None:
    settings = {
        "auth__hmac_secret": SECRET,
        "auth__leeway": 0,
        "ws__outbox_messages": 100_000,
        "ws__outbox_bytes": 64 * 1024 * 1024,
        "ws__write_limit": 16 * 1024,
        "ws__ping_interval": None,
        "ws__close_timeout": 600,
    }
    exp = int(time.time()) + 6
    claims = {"sub": "alice", "exp": exp, "channels": ["news"]}
    token = jwt.encode(claims, SECRET, algorithm="HS256")
    async with daemon_factory(**settings) as d:  # type: ignore[operator]
        client = await RawClient.connect(f"{d.ws_url}/?channel=news&token={token}")
        await client.handshake()
        while len(client.text_frames()) < 2:  # authenticated, subscribed
            await client.read_events()
        assert json.loads(client.text_frames()[1])["type"] == "subscribed"
        await paused(d)
        await expired(d)
        after = await d.publish("news", {"before": False})
        assert after["subscribers"] == 0, after
        close = await client.read_until_closed(timeout=60)
        assert close is not None
        assert close.code == 4003, close
        messages = [json.loads(bytes(f.data)) for f in client.frames if f.opcode is Opcode.TEXT][2:]
        data = [m["data"] for m in messages if "data" in m]
        assert data
        assert all(item["before"] for item in data), messages[-3:]
        offsets = [m["offset"] for m in messages if "offset" in m]
        assert offsets == list(range(offsets[0], offsets[0] + len(offsets)))
        client.close()
