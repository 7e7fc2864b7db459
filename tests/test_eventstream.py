"""Server-Sent Events and ndjson on the subscriber URL: the events, their ids,
lossless resume by ``Last-Event-ID`` across every channel of a stream, the
bounds and refusals they share with WebSocket, and the end of a stream."""

from __future__ import annotations

import asyncio
import json
import random
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from broadcastd.core.envelope import Reply, text_frame
from broadcastd.core.eventstream import EventStream, Messages, resume_positions
from broadcastd.core.forms import base36
from broadcastd.core.handshake import Refusal

from .conftest import Running, recv_json, subscribed

SEEDS = [1, 106, 124, 20261208]
"""Seeds of the random resume test; a seed that ever failed stays here."""
SSE_HEADERS = {"Accept": "text/event-stream"}


@dataclass
class Event:
    name: str = "message"
    data: str = ""
    id: str | None = None

    def json(self) -> Any:
        return json.loads(self.data)


@dataclass
class Stream:
    response: httpx.Response
    lines: AsyncIterator[str]
    last_id: str | None = None
    events: list[Event] = field(default_factory=list)

    async def next(self) -> Event:
        """The next event, as EventSource parses it (comments skipped)."""
        event, data = Event(), []
        async with asyncio.timeout(10):
            async for line in self.lines:
                if not line:
                    if data or event.name != "message":
                        event.data = "\n".join(data)
                        if event.id is not None:
                            self.last_id = event.id
                        self.events.append(event)
                        return event
                    continue
                if line.startswith(":"):
                    continue
                name, _, value = line.partition(":")
                value = value.removeprefix(" ")
                if name == "data":
                    data.append(value)
                elif name == "event":
                    event.name = value
                elif name == "id":
                    event.id = value
        raise EOFError("the stream ended")

    async def until(self, name: str) -> Event:
        while (event := await self.next()).name != name:
            pass
        return event


@asynccontextmanager
async def sse(
    d: Running, path: str, headers: dict[str, str] | None = None
) -> AsyncIterator[Stream]:
    url = d.ws_url.replace("ws://", "http://") + path
    async with (
        httpx.AsyncClient(timeout=30) as client,
        client.stream("GET", url, headers={**SSE_HEADERS, **(headers or {})}) as response,
    ):
        yield Stream(response, response.aiter_lines())


async def test_a_stream_gets_messages_and_notices_as_events(daemon: Running) -> None:
    async with sse(daemon, "/?channel=news&channel=sport") as stream:
        response = stream.response
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
        assert response.headers["cache-control"] == "no-cache"
        assert response.headers["x-accel-buffering"] == "no"
        assert response.headers["access-control-allow-origin"] == "*"
        first = await stream.next()
        assert (first.name, first.json()["channel"]) == ("subscribed", "news")
        second = await stream.next()
        assert (second.name, second.json()["channel"]) == ("subscribed", "sport")
        news = await daemon.publish("news", {"a": 1})
        sport = await daemon.publish("sport", "two\nlines")
        message = await stream.next()
        assert (message.name, message.json()) == (
            "message",
            {"channel": "news", "offset": 1, "data": {"a": 1}},
        )
        assert message.id == f"1~{news['epoch']}.1~{sport['epoch']}.0"
        message = await stream.next()
        assert message.json()["data"] == "two\nlines"
        assert message.id == f"1~{news['epoch']}.1~{sport['epoch']}.1"


async def test_raw_events_carry_the_payload_alone_over_as_many_data_lines(
    daemon: Running,
) -> None:
    async with sse(daemon, "/?channel=news&format=raw") as stream:
        await stream.until("subscribed")
        await daemon.http.post("/publish/news", content=b"one\ntwo\r\nthree")
        await daemon.publish("news", {"b": [1, 2]})
        assert (await stream.next()).data == "one\ntwo\nthree"
        assert json.loads((await stream.next()).data) == {"b": [1, 2]}


async def test_a_stream_resumes_every_channel_from_last_event_id(daemon: Running) -> None:
    async with sse(daemon, "/?channel=a&channel=b&channel=c") as stream:
        for _ in range(3):
            await stream.until("subscribed")
        for i in range(3):
            await daemon.publish("a", i)
            await stream.next()
        await daemon.publish("b", "b0")
        await stream.next()
        last = stream.last_id
    assert last is not None
    for i in range(3, 6):
        await daemon.publish("a", i)
    await daemon.publish("b", "b1")
    async with sse(daemon, "/?channel=a&channel=b&channel=c", {"Last-Event-ID": last}) as again:
        events = [await again.next() for _ in range(7)]
        replies = {e.json()["channel"]: e.json() for e in events if e.name == "subscribed"}
        assert all(reply["recovered"] is True for reply in replies.values())
        data = [e.json()["data"] for e in events if e.name == "message"]
        assert data == [3, 4, 5, "b1"]


async def test_a_last_event_id_of_another_stream_is_refused(daemon: Running) -> None:
    url = daemon.ws_url.replace("ws://", "http://")
    async with httpx.AsyncClient(timeout=30) as client:
        for bad in ("1~abc.1", "2~abc.1~def.2", "1~abc~", "1~abc.zzzzzzzzzzzzzz~", "junk"):
            headers = {**SSE_HEADERS, "Last-Event-ID": bad}
            response = await client.get(f"{url}/?channel=a&channel=b", headers=headers)
            assert response.status_code == 400, bad
            assert response.json()["error"]["code"] == "bad_request"


async def test_every_handshake_refusal_applies_to_a_stream(daemon_factory: Any) -> None:
    async with daemon_factory(ws__allowed_origins=["https://ok.example"]) as d:
        url = d.ws_url.replace("ws://", "http://")
        async with httpx.AsyncClient(timeout=30) as client:
            bad = await client.get(f"{url}/?channel=a%20b", headers=SSE_HEADERS)
            assert (bad.status_code, bad.json()["error"]["code"]) == (400, "bad_channel")
            origin = await client.get(
                f"{url}/?channel=a", headers={**SSE_HEADERS, "Origin": "https://evil.example"}
            )
            assert (origin.status_code, origin.json()["error"]["code"]) == (403, "origin")
            post = await client.post(f"{url}/?channel=a", headers=SSE_HEADERS)
            assert post.status_code == 405
        async with sse(d, "/?channel=a", {"Origin": "https://ok.example"}) as stream:
            assert stream.response.headers["access-control-allow-origin"] == "https://ok.example"
            assert stream.response.headers["vary"] == "Origin"


async def test_drain_ends_a_stream_with_a_close_event(daemon_factory: Any) -> None:
    async with daemon_factory() as d, sse(d, "/?channel=news") as stream:
        await stream.until("subscribed")
        await d.publish("news", "last")
        assert (await stream.next()).json()["data"] == "last"
        drained = asyncio.create_task(d.daemon.drain())
        close = await stream.until("close")
        assert close.json() == {"type": "close", "code": 1001, "reason": "server shutting down"}
        with pytest.raises(EOFError):
            await stream.next()
        await drained


async def test_ndjson_streams_one_document_per_line_and_resumes_by_since(
    daemon: Running,
) -> None:
    url = daemon.ws_url.replace("ws://", "http://")
    headers = {"Accept": "application/x-ndjson"}
    async with (
        httpx.AsyncClient(timeout=30) as client,
        client.stream("GET", f"{url}/?channel=news", headers=headers) as response,
    ):
        assert response.headers["content-type"] == "application/x-ndjson; charset=utf-8"
        lines = response.aiter_lines()
        reply = json.loads(await anext(lines))
        assert reply["type"] == "subscribed"
        await daemon.http.post(
            "/publish/news", content=b'{\n "a": 1\n}', headers={"Content-Type": "application/json"}
        )
        message = json.loads(await anext(lines))
        assert message == {"channel": "news", "offset": 1, "data": {"a": 1}}
    since = f"news:{reply['epoch']}:1"
    await daemon.publish("news", 2)
    async with (
        httpx.AsyncClient(timeout=30) as client,
        client.stream("GET", f"{url}/?since={since}", headers=headers) as response,
    ):
        lines = response.aiter_lines()
        assert json.loads(await anext(lines))["recovered"] is True
        assert json.loads(await anext(lines))["data"] == 2


async def test_a_websocket_upgrade_to_the_same_url_is_unchanged(daemon: Running) -> None:
    async with daemon.connect("/?channel=news", additional_headers=SSE_HEADERS) as ws:
        await subscribed(ws, "news")
        await daemon.publish("news", 1)
        assert (await recv_json(ws))["data"] == 1


# Lossless resume under random disconnections


@pytest.mark.parametrize("seed", SEEDS)
async def test_streams_cut_at_random_resume_without_loss_or_duplicates(
    daemon: Running, seed: int
) -> None:
    """Readers of three channels are cut at random points, between and within
    bursts of publishes, and reconnect with their last id, as a browser does;
    each must see every channel's messages once, in order."""
    rng = random.Random(seed)
    channels = [f"r{seed}-{name}" for name in "xyz"]
    path = "/?" + "&".join(f"channel={c}" for c in channels)
    published = dict.fromkeys(channels, 0)

    async def publisher() -> None:
        for _ in range(120):
            channel = rng.choice(channels)
            published[channel] += 1
            await daemon.publish(channel, published[channel])

    async def reader(ready: asyncio.Event) -> dict[str, list[int]]:
        seen: dict[str, list[int]] = {c: [] for c in channels}
        last: str | None = None
        while sum(len(v) for v in seen.values()) < 120:
            headers = {"Last-Event-ID": last} if last else {}
            async with sse(daemon, path, headers) as stream:
                if not ready.is_set():  # every channel has a position before publishing
                    for _ in channels:
                        await stream.until("subscribed")
                    ready.set()
                cut_after = rng.randint(1, 40)
                for _ in range(cut_after):
                    event = await stream.next()
                    if event.name == "message":
                        doc = event.json()
                        seen[doc["channel"]].append(doc["data"])
                    elif event.name == "subscribed":
                        assert event.json().get("recovered", True) is True, event.data
                    if sum(len(v) for v in seen.values()) == 120:
                        break
                last = stream.last_id or last  # a browser keeps the last id it was given
        return seen

    ready = [asyncio.Event() for _ in range(3)]
    readers = [asyncio.create_task(reader(event)) for event in ready]
    for event in ready:
        await event.wait()
    await publisher()
    for seen in await asyncio.gather(*readers):
        for channel in channels:
            assert seen[channel] == list(range(1, published[channel] + 1)), channel


# The encoder, in process


def test_the_id_holds_each_url_channel_and_reads_back_as_since() -> None:
    stream = EventStream("text/event-stream", ("a", "b"), raw=False)
    subscribed = b'{"type":"subscribed","channel":"a","epoch":"e1","offset":40}'

    chunk = stream.render(
        [Reply(text_frame(subscribed)), text_frame(b'{"channel":"a","offset":41,"data":1}')],
        Messages(),
    )
    ids = [line for line in chunk.split(b"\n") if line.startswith(b"id: ")]
    assert ids == [b"id: 1~e1.14~", b"id: 1~e1.15~"]
    assert resume_positions("1~e1.15~", ("a", "b")) == [("a", ("e1", 41))]
    assert base36(36**12) == "1" + "0" * 12
    with pytest.raises(Refusal):
        resume_positions("1~e1.15", ("a", "b"))


# Bounds and refusals shared with WebSocket


async def test_a_slow_sse_reader_is_cut_by_the_policy_and_a_fast_one_loses_nothing(
    daemon_factory: Any,
) -> None:
    settings = {
        "ws.outbox_messages": 64,
        "ws.outbox_bytes": 128 * 1024,
        "ws.write_limit": 16 * 1024,
        "ws.slow_consumer_policy": "disconnect",
    }
    payload = "x" * 2000
    async with daemon_factory(**settings) as d:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", d.daemon.ws.port))
        reader, writer = await asyncio.open_connection(sock=sock)
        writer.write(b"GET /busy HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n")
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
        async with sse(d, "/busy") as fast:
            await fast.until("subscribed")
            published = 0
            while True:
                response = await d.http.post(
                    "/batch", json=[{"channel": "busy", "data": payload}] * 50
                )
                published += 50
                if response.json()["results"][-1]["subscribers"] == 1:
                    break  # the slow reader's outbox refused: it is being cut
                assert published < 20_000, "the slow SSE reader was never cut"
            await d.publish("busy", "end")
            got = 0
            while (await fast.next()).json()["data"] != "end":
                got += 1
            assert got == published
        writer.close()
        closed = (await d.http.get("/metrics")).text
        assert 'broadcastd_connections_closed_total{code="1013"' in closed


async def test_a_stream_with_a_bad_token_is_told_why_and_ended(daemon_factory: Any) -> None:
    async with (
        daemon_factory(auth__hmac_secret="s" * 64) as d,
        sse(d, "/?channel=a&token=bad") as stream,
    ):
        failure = await stream.until("failure")
        assert (failure.json()["op"], failure.json()["code"]) == ("connect", "token_invalid")
        close = await stream.until("close")
        assert close.json()["code"] == 4002


async def test_too_many_channels_are_refused_for_a_stream(daemon_factory: Any) -> None:
    async with daemon_factory(ws__max_channels_per_client=2) as d:
        url = d.ws_url.replace("ws://", "http://")
        async with httpx.AsyncClient(timeout=30) as client:
            response = await client.get(f"{url}/a,b,c", headers=SSE_HEADERS)
            assert (response.status_code, response.json()["error"]["code"]) == (
                400,
                "too_many_channels",
            )


async def test_a_cors_preflight_allows_a_stream_s_headers_from_an_admitted_origin(
    daemon_factory: Any,
) -> None:
    async with daemon_factory(ws__allowed_origins=["https://ok.example"]) as d:
        url = d.ws_url.replace("ws://", "http://") + "/?channel=news"
        asked = {
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "authorization, last-event-id",
        }
        async with httpx.AsyncClient(timeout=30) as client:
            ok = await client.options(url, headers={**asked, "Origin": "https://ok.example"})
            assert ok.status_code == 204
            assert ok.headers["access-control-allow-origin"] == "https://ok.example"
            assert "Last-Event-ID" in ok.headers["access-control-allow-headers"]
            assert "Authorization" in ok.headers["access-control-allow-headers"]
            other = await client.options(url, headers={**asked, "Origin": "https://evil.example"})
            assert (other.status_code, other.json()["error"]["code"]) == (403, "origin")
