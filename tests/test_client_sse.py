"""The Python Subscriber over Server-Sent Events (``transport="sse"``) against a
real daemon: the same messages and events as over WebSocket, a cut stream
resumed with nothing lost or doubled, channels and tokens changed by reopening
the stream, and what a one-way stream cannot do refused."""

from __future__ import annotations

import time
from typing import Any

import jwt
import pytest

from broadcastd.client import (
    Authenticated,
    BroadcastdError,
    Expiring,
    Message,
    Recovered,
    RequestRefused,
    State,
    StateChanged,
    Subscribed,
    Subscriber,
)

from .conftest import Running
from .test_client import (
    FAST,
    drop_connections,
    next_item,
    next_message,
    publish_now,
    read_until,
    until_messages,
)

SECRET = "k" * 64
AUTH = {"auth__hmac_secret": SECRET, "auth__leeway": 0, "auth__expiring_notice": 60}


def token(lifetime: float) -> str:
    claims = {"sub": "alice", "channels": ["*"], "exp": int(time.time() + lifetime)}
    return jwt.encode(claims, SECRET, algorithm="HS256")


def stream_transports(daemon: Running) -> list[str]:
    return [conn.session.transport for _, conn in daemon.daemon.ws.connections() if conn.session]


async def test_messages_and_events_as_over_websocket(daemon: Running) -> None:
    async with Subscriber(daemon.ws_url, transport="sse", max_backoff=FAST) as sub:
        stream = sub.subscribe("news", "sport", events={Subscribed, StateChanged})
        items = await read_until(stream, Subscribed, 2)
        assert [type(i) for i in items] == [StateChanged, StateChanged, Subscribed, Subscribed]
        assert stream_transports(daemon) == ["sse"]
        assert sub.client is not None
        for n in range(1, 51):
            await daemon.publish("news", {"n": n})
        await daemon.publish("sport", "goal")
        received, _ = await until_messages(stream, 51)
        news = [m for m in received if m.channel == "news"]
        assert [(m.offset, m.data) for m in news] == [(n, {"n": n}) for n in range(1, 51)]
        assert [m.data for m in received if m.channel == "sport"] == ["goal"]
        epoch = items[2].epoch  # type: ignore[union-attr]
        assert sub.positions["news"] == (epoch, 50)

        with pytest.raises(BroadcastdError) as refused:
            await sub.presence_stats("news")
        assert refused.value.code == "one_way"


async def test_a_cut_stream_resumes_each_channel_nothing_lost_or_doubled(daemon: Running) -> None:
    async with Subscriber(daemon.ws_url, transport="sse", max_backoff=FAST) as sub:
        stream = sub.subscribe("news", "user:42", events={Subscribed, Recovered, StateChanged})
        await read_until(stream, Subscribed, 2)
        for n in (1, 2, 3):
            await daemon.publish("news", n)
        received, _ = await until_messages(stream, 3)

        drop_connections(daemon)
        for n in (4, 5, 6):
            publish_now(daemon, "news", n)
        for n in (1, 2):
            publish_now(daemon, "user:42", n)
        replayed, events = await until_messages(stream, 5)
        received += replayed
        states = [e for e in events if isinstance(e, StateChanged)]
        assert [s.state for s in states] == [State.DISCONNECTED, State.CONNECTING, State.CONNECTED]
        assert states[0].close_code == 1006
        recovered = {e.channel: e.recovered for e in events if isinstance(e, Recovered)}
        assert recovered == {"news": True, "user:42": True}
        # The reconnection gave the stream's last id back, as a browser does.
        assert sub._id_channels == ("news", "user:42")

        await daemon.publish("news", 7)
        await daemon.publish("user:42", 3)
        live, _ = await until_messages(stream, 2)
        received += live
    for channel, count in (("news", 7), ("user:42", 3)):
        mine = [m for m in received if m.channel == channel]
        assert [(m.offset, m.data) for m in mine] == [(n, n) for n in range(1, count + 1)]


async def test_channels_added_and_removed_reopen_the_stream(daemon: Running) -> None:
    async with Subscriber(daemon.ws_url, transport="sse", max_backoff=FAST) as sub:
        stream = sub.subscribe("a", events={Subscribed, Recovered})
        await read_until(stream, Subscribed)
        for n in (1, 2):
            await daemon.publish("a", n)
        # Received by the stream before the reopen, taken by the program after it:
        # kept, and not replayed a second time.
        await daemon.publish("a", 3)
        first = await next_message(stream)
        await sub.add("b")
        items = await read_until(stream, Subscribed)
        recovered = [i for i in items if isinstance(i, Recovered)]
        assert [(r.channel, r.recovered) for r in recovered] == [("a", True)]
        await daemon.publish("b", "x")
        await daemon.publish("a", 4)
        before = [i for i in items if isinstance(i, Message)]
        rest, _ = await until_messages(stream, 4 - len(before))
        messages = [first, *before, *rest]
        assert [m.data for m in messages if m.channel == "a"] == [1, 2, 3, 4]
        assert [m.data for m in messages if m.channel == "b"] == ["x"]

        await sub.remove("a")
        await daemon.publish("a", 5)
        await daemon.publish("b", "y")
        item = await next_item(stream)
        while not isinstance(item, Message):
            item = await next_item(stream)
        assert (item.channel, item.data) == ("b", "y")
        assert sub.channels == ("b",)


async def test_a_refused_stream_ends_with_the_daemons_error(daemon: Running) -> None:
    async with Subscriber(daemon.ws_url + "/?chanel=typo", transport="sse") as sub:
        stream = sub.subscribe("news")
        with pytest.raises(RequestRefused) as refused:
            await next_item(stream)
        assert (refused.value.status, refused.value.code) == (400, "bad_request")


async def test_an_expiring_token_is_refreshed_by_reopening_the_stream(daemon_factory: Any) -> None:
    issued: list[str] = []

    async def get_token() -> str:
        issued.append(token(2 if not issued else 3600))
        return issued[-1]

    async with (
        daemon_factory(**AUTH) as d,
        Subscriber(d.ws_url, transport="sse", get_token=get_token, max_backoff=FAST) as sub,
    ):
        events = {Authenticated, Expiring, Subscribed, Recovered}
        stream = sub.subscribe("ticks", events=events)
        await read_until(stream, Expiring)  # at once: the token expires within the notice
        await d.publish("ticks", 1)
        items = await read_until(stream, Message)
        authenticated = [i for i in items if isinstance(i, Authenticated)]
        assert len(authenticated) == 1
        assert authenticated[0].expires is not None
        assert authenticated[0].expires > time.time() + 3000
        assert [i.recovered for i in items if isinstance(i, Recovered)] == [True]
        assert len(issued) == 2
        assert isinstance(items[-1], Message)
        assert items[-1].data == 1


async def test_a_drain_ends_the_stream_with_1001(daemon_factory: Any) -> None:
    async with daemon_factory() as d:
        sub = Subscriber(d.ws_url, transport="sse", max_backoff=FAST)
        stream = sub.subscribe("news", events={Subscribed, StateChanged})
        await read_until(stream, Subscribed)
        d.daemon.shutdown()
        items = await read_until(stream, StateChanged, 1)
        ended = items[-1]
        assert isinstance(ended, StateChanged)
        assert (ended.state, ended.close_code) == (State.DISCONNECTED, 1001)
        await sub.close()
