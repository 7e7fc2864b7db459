"""broadcastd.client against a real daemon: the Subscriber (messages, channels
added and removed at run time, resuming after a dropped connection, the outcome
of a recovery that failed, tokens refreshed) and the publishers (answers and
errors typed, idempotent retries, the Unix socket)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import jwt
import msgspec
import pytest

from broadcastd.client import (
    AsyncPublisher,
    Authenticated,
    BatchItem,
    BroadcastdError,
    ChannelInfo,
    ClosedByServer,
    CommandFailed,
    CommandRefused,
    Event,
    Expiring,
    ItemFailed,
    Message,
    MessagesLost,
    NetworkError,
    Position,
    Published,
    Publisher,
    Recovered,
    RequestRefused,
    State,
    StateChanged,
    Stream,
    Subscribed,
    Subscriber,
    Unavailable,
    Unsubscribed,
)
from broadcastd.core.envelope import Payload

from .conftest import DaemonProcess, Running, recv_json

FAST = 0.1
"""Longest wait before a reconnection (max_backoff): the tests wait for nothing longer."""


async def next_item(stream: Stream, timeout: float = 10) -> Message | Event:
    """The stream's next item; the timeout only turns a hang into a failure."""
    async with asyncio.timeout(timeout):
        return await anext(stream)


async def next_message(stream: Stream) -> Message:
    item = await next_item(stream)
    assert isinstance(item, Message), item
    return item


async def until_messages(stream: Stream, count: int) -> tuple[list[Message], list[Event]]:
    """Read until ``count`` messages came; those and the events met on the way."""
    messages: list[Message] = []
    events: list[Event] = []
    while len(messages) < count:
        item = await next_item(stream)
        if isinstance(item, Message):
            messages.append(item)
        else:
            events.append(item)
    return messages, events


async def read_until(stream: Stream, kind: type[Event], count: int = 1) -> list[Message | Event]:
    """Read until ``count`` items of type ``kind`` came; everything read."""
    items: list[Message | Event] = []
    while sum(1 for i in items if isinstance(i, kind)) < count:
        items.append(await next_item(stream))
    return items


def drop_connections(daemon: Running) -> None:
    """Cut every client off, as a failing network would (the client sees 1006)."""
    for _, conn in daemon.daemon.ws.connections():
        conn.abort()


def publish_now(daemon: Running, channel: str, value: Any) -> None:
    """Publish without yielding to the event loop: no client can connect meanwhile."""
    daemon.daemon.node.publish(channel, Payload.from_value(value), "channel")


# Subscriber


async def test_subscribe_yields_messages_with_their_positions(daemon: Running) -> None:
    async with Subscriber(daemon.ws_url) as sub:
        stream = sub.subscribe("news", "sport", events={Subscribed, StateChanged})
        states = [await next_item(stream) for _ in range(2)]
        assert states == [StateChanged(State.CONNECTING), StateChanged(State.CONNECTED)]
        assert sub.state is State.CONNECTED
        replies: dict[str, Subscribed] = {}
        for _ in range(2):
            reply = await next_item(stream)
            assert isinstance(reply, Subscribed)
            replies[reply.channel] = reply
        assert {c: r.offset for c, r in replies.items()} == {"news": 0, "sport": 0}

        await daemon.publish("news", {"price": 42})
        await daemon.publish("sport", "goal")
        big = b'{"big": 123456789012345678901234567890}'
        answer = await daemon.http.post(
            "/publish/news", content=big, headers={"Content-Type": "application/json"}
        )
        assert answer.status_code == 200
        first, second, third = [await next_message(stream) for _ in range(3)]
        assert first == Message("news", 1, replies["news"].epoch, {"price": 42})
        assert json.loads(first.frame) == {"channel": "news", "offset": 1, "data": {"price": 42}}
        assert second == Message("sport", 1, replies["sport"].epoch, "goal")
        assert third.data == {"big": 123456789012345678901234567890}  # exact, not a float
        assert sub.positions == {
            "news": Position(replies["news"].epoch or "", 2),
            "sport": Position(replies["sport"].epoch or "", 1),
        }
    assert sub.state is State.CLOSED
    assert await next_item(stream) == StateChanged(State.CLOSED)
    with pytest.raises(StopAsyncIteration):
        await next_item(stream)


async def test_channels_are_added_and_removed_at_run_time(daemon: Running) -> None:
    async with Subscriber(daemon.ws_url) as sub:
        stream = sub.subscribe("a", events={Subscribed, Unsubscribed, CommandFailed})
        first = await next_item(stream)
        assert isinstance(first, Subscribed)
        assert first.channel == "a"

        await sub.add("b")
        added = await next_item(stream)
        assert isinstance(added, Subscribed)
        assert added.channel == "b"
        await daemon.publish("b", 1)
        message = await next_message(stream)
        assert (message.channel, message.offset, message.data) == ("b", 1, 1)

        await sub.remove("a")
        assert await next_item(stream) == Unsubscribed("a")
        assert (await daemon.publish("a", "unseen"))["subscribers"] == 0
        await daemon.publish("b", 2)
        message = await next_message(stream)
        assert (message.channel, message.offset, message.data) == ("b", 2, 2)
        assert sub.channels == ("b",)
        assert "a" not in sub.positions

        await sub.add("no good")
        refused = await next_item(stream)
        assert isinstance(refused, CommandFailed)
        assert (refused.op, refused.channel, refused.code) == (
            "subscribe",
            "no good",
            "bad_channel",
        )
        assert sub.channels == ("b",)  # no longer wanted: not asked again at a reconnection


async def test_a_refusal_left_out_of_events_is_raised_and_the_stream_goes_on(
    daemon: Running,
) -> None:
    async with Subscriber(daemon.ws_url) as sub:
        stream = sub.subscribe("a", events={Subscribed})
        assert isinstance(await next_item(stream), Subscribed)
        await sub.add("no good")
        with pytest.raises(CommandRefused) as refused:
            await next_item(stream)
        assert refused.value.code == "bad_channel"
        assert refused.value.event.channel == "no good"
        await daemon.publish("a", 1)
        assert (await next_message(stream)).data == 1


async def test_a_refused_handshake_ends_the_stream(daemon: Running) -> None:
    async with Subscriber(daemon.ws_url) as sub:
        stream = sub.subscribe("bad channel")
        with pytest.raises(RequestRefused) as refused:
            await next_item(stream)
        assert (refused.value.status, refused.value.code) == (400, "bad_channel")
        with pytest.raises(StopAsyncIteration):
            await next_item(stream)


async def test_a_dropped_connection_resumes_each_channel_nothing_lost_or_doubled(
    daemon: Running,
) -> None:
    async with Subscriber(daemon.ws_url, max_backoff=FAST) as sub:
        stream = sub.subscribe("news", "user:42", events={Subscribed, Recovered, StateChanged})
        await read_until(stream, Subscribed, 2)
        for n in (1, 2, 3):
            await daemon.publish("news", n)
        received, _ = await until_messages(stream, 3)

        # Cut off with three news and no user:42 received; five more are missed live.
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
        assert states[0].retry_in is not None
        recovered = {e.channel: e.recovered for e in events if isinstance(e, Recovered)}
        assert recovered == {"news": True, "user:42": True}

        await daemon.publish("news", 7)
        await daemon.publish("user:42", 3)
        live, _ = await until_messages(stream, 2)
        received += live
    for channel, count in (("news", 7), ("user:42", 3)):
        mine = [m for m in received if m.channel == channel]
        assert [(m.offset, m.data) for m in mine] == [(n, n) for n in range(1, count + 1)]


async def test_a_saved_position_resumes_a_new_subscriber(daemon: Running) -> None:
    async with Subscriber(daemon.ws_url) as first:
        stream = first.subscribe("feed", events={Subscribed})
        assert isinstance(await next_item(stream), Subscribed)
        await daemon.publish("feed", 1)
        assert (await next_message(stream)).data == 1
        saved = first.positions
    await daemon.publish("feed", 2)
    await daemon.publish("feed", 3)
    async with Subscriber(daemon.ws_url) as second:
        stream = second.subscribe(since=saved)
        assert await next_item(stream) == Recovered("feed", True, None, saved["feed"].epoch, 3)
        assert [(await next_message(stream)).data for _ in range(2)] == [2, 3]


@pytest.mark.parametrize("told", ["yielded", "raised"])
async def test_a_daemon_restart_is_told_as_recovered_false(daemon_factory: Any, told: str) -> None:
    """The memory broker's channels begin a new epoch at each start: a subscriber
    that resumes across a restart is told it could not recover, as an event it
    asked for or, if it did not, as MessagesLost; the stream carries on."""
    events: set[type[Event]] = {Subscribed, Recovered} if told == "yielded" else {Subscribed}
    async with daemon_factory() as first:
        port = first.daemon.ws.port
        sub = Subscriber(first.ws_url, max_backoff=FAST)
        stream = sub.subscribe("news", events=events)
        before = await next_item(stream)
        assert isinstance(before, Subscribed)
        await first.publish("news", "a")
        assert (await next_message(stream)).data == "a"
    try:  # the first daemon drained and closed the connection (1001)
        async with daemon_factory(ws__port=port) as second:
            if told == "yielded":
                after = await next_item(stream)
            else:
                with pytest.raises(MessagesLost) as lost:
                    await next_item(stream)
                after = lost.value.event
            assert isinstance(after, Recovered)
            assert (after.channel, after.recovered, after.reason) == ("news", False, "epoch")
            assert after.epoch != before.epoch
            assert after.offset == 0
            await second.publish("news", "b")
            assert await next_message(stream) == Message("news", 1, after.epoch, "b")
    finally:
        await sub.close()


class PingsAnswered:
    """Wraps the daemon's observer to tell each pong it got (a ping answered)."""

    def __init__(self, daemon: Running) -> None:
        self.inner = daemon.daemon.node.observer
        self.pongs: asyncio.Queue[float] = asyncio.Queue()
        daemon.daemon.node.observer = self

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def ping_rtt(self, seconds: float) -> None:
        self.inner.ping_rtt(seconds)
        self.pongs.put_nowait(seconds)


async def test_the_daemons_pings_are_answered(daemon_factory: Any) -> None:
    async with daemon_factory(ws__ping_interval=0.05, ws__ping_timeout=1) as d:
        answered = PingsAnswered(d)
        async with Subscriber(d.ws_url) as sub:
            stream = sub.subscribe("a", events={Subscribed, StateChanged})
            await read_until(stream, Subscribed)
            for _ in range(3):  # answered while the program is not reading, too
                async with asyncio.timeout(10):
                    await answered.pongs.get()
            await d.publish("a", 1)
            assert (await next_item(stream)) == Message("a", 1, sub.positions["a"].epoch, 1)


async def test_a_silent_daemon_is_given_up_and_the_subscriber_resumes() -> None:
    """The daemon stops answering (SIGSTOP): the keepalive pings, gets nothing,
    gives up; once the daemon is back the subscriber reconnects and resumes."""
    daemon = DaemonProcess()
    try:
        daemon.wait_ready()
        async with (
            Subscriber(
                f"ws://127.0.0.1:{daemon.ws_port}",
                ping_interval=0.1,
                open_timeout=0.5,
                max_backoff=FAST,
            ) as sub,
            AsyncPublisher(f"http://127.0.0.1:{daemon.control_port}") as pub,
        ):
            stream = sub.subscribe("a", events={Subscribed, Recovered, StateChanged})
            await read_until(stream, Subscribed)
            await pub.publish("a", 1)
            assert (await next_message(stream)).data == 1
            os.kill(daemon.proc.pid, signal.SIGSTOP)
            try:
                lost = await next_item(stream)
            finally:
                os.kill(daemon.proc.pid, signal.SIGCONT)
            assert isinstance(lost, StateChanged)
            assert (lost.state, lost.close_code) == (State.DISCONNECTED, 1006)
            back = (await read_until(stream, Recovered))[-1]
            assert isinstance(back, Recovered)
            assert back.recovered
            await pub.publish("a", 2)
            assert (await next_message(stream)).offset == 2
    finally:
        daemon.kill()


SECRET = "k" * 64
AUTH = {"auth__hmac_secret": SECRET, "auth__leeway": 0, "auth__expiring_notice": 60}


def token(lifetime: float) -> str:
    claims = {"sub": "alice", "channels": ["*"], "exp": int(time.time() + lifetime)}
    return jwt.encode(claims, SECRET, algorithm="HS256")


async def test_get_token_refreshes_an_expiring_token(daemon_factory: Any) -> None:
    issued: list[str] = []

    async def get_token() -> str:
        issued.append(token(2 if not issued else 3600))
        return issued[-1]

    async with daemon_factory(**AUTH) as d, Subscriber(d.ws_url, get_token=get_token) as sub:
        stream = sub.subscribe("ticks", events={Authenticated, Expiring, Subscribed, StateChanged})
        items = [await next_item(stream) for _ in range(6)]
        assert [type(i) for i in items] == [
            StateChanged,
            StateChanged,
            Authenticated,
            Subscribed,
            Expiring,  # at once: the token expires within the notice
            Authenticated,  # the refresh, sent by the subscriber with get_token's new token
        ]
        connected, subscribed, refreshed = items[2], items[3], items[5]
        assert isinstance(subscribed, Subscribed)
        assert isinstance(connected, Authenticated)
        assert isinstance(refreshed, Authenticated)
        assert (connected.op, refreshed.op) == ("connect", "refresh")
        assert connected.expires is not None
        assert refreshed.expires is not None
        assert refreshed.expires > connected.expires + 3000
        assert len(issued) == 2

        # The first token's expiry passes: without the refresh the daemon would
        # close the connection (4003) then, and a StateChanged would come first.
        await asyncio.sleep(max(0.0, connected.expires + 0.5 - time.time()))
        await d.publish("ticks", 1)
        assert await next_item(stream) == Message("ticks", 1, subscribed.epoch, 1)


async def test_an_expired_token_is_replaced_at_the_reconnection(daemon_factory: Any) -> None:
    """get_token has nothing newer at the notice: the daemon closes at expiry (4003),
    the subscriber reconnects with get_token's next token and resumes."""
    calls = 0
    short = token(2)

    async def get_token() -> str:
        nonlocal calls
        calls += 1
        return short if calls <= 2 else token(3600)

    async with (
        daemon_factory(**AUTH) as d,
        Subscriber(d.ws_url, get_token=get_token, max_backoff=FAST) as sub,
    ):
        stream = sub.subscribe("ticks", events={Subscribed, Recovered, StateChanged})
        await read_until(stream, Subscribed)
        await d.publish("ticks", 1)
        assert (await next_message(stream)).data == 1
        closed = await next_item(stream)  # at the token's expiry
        assert isinstance(closed, StateChanged)
        assert (closed.state, closed.close_code) == (State.DISCONNECTED, 4003)
        again = await read_until(stream, Recovered)
        states = [e.state for e in again if isinstance(e, StateChanged)]
        assert states == [State.CONNECTING, State.CONNECTED]
        recovered = again[-1]
        assert isinstance(recovered, Recovered)
        assert recovered.recovered
        await d.publish("ticks", 2)
        assert (await next_message(stream)).offset == 2
        assert calls == 3


async def test_a_refused_token_without_get_token_ends_the_stream(daemon_factory: Any) -> None:
    async with daemon_factory(**AUTH) as d, Subscriber(d.ws_url, token=token(-10)) as sub:
        stream = sub.subscribe("ticks")
        refused = await next_item(stream)
        assert isinstance(refused, CommandFailed)
        assert (refused.op, refused.code) == ("connect", "token_expired")
        with pytest.raises(ClosedByServer) as closed:
            await next_item(stream)
        assert (closed.value.close_code, closed.value.code) == (4003, "token_expired")


# Publishers


async def test_async_publisher_publishes_and_reads(daemon: Running) -> None:
    async with AsyncPublisher(daemon.control_url) as pub, Subscriber(daemon.ws_url) as sub:
        stream = sub.subscribe("news", events={Subscribed})
        subscribed = await next_item(stream)
        assert isinstance(subscribed, Subscribed)
        epoch = subscribed.epoch

        assert await pub.publish("news", {"price": 42}) == Published("news", epoch, 1, 1)
        assert (await next_message(stream)).data == {"price": 42}
        await pub.publish("news", "hello there", content_type="text/plain")
        assert (await next_message(stream)).data == "hello there"
        await pub.publish("news", msgspec.Raw(b'{"exact": 1.10}'))
        assert (await next_message(stream)).frame.endswith('"data":{"exact": 1.10}}')

        many = await pub.publish_many(["news", "sport"], [1, 2])
        assert [(p.channel, p.offset) for p in many] == [("news", 4), ("sport", 1)]
        batch = await pub.batch([("news", 5), BatchItem("sport", 6, "k-6"), ("no good", 7)])
        assert (batch.published, batch.failed) == (2, 1)
        assert [type(r) for r in batch.results] == [Published, Published, ItemFailed]
        failed = batch.results[2]
        assert isinstance(failed, ItemFailed)
        assert (failed.channel, failed.code) == ("no good", "bad_channel")

        first = await pub.publish("orders", {"id": 17}, idempotency_key="order-17")
        again = await pub.publish("orders", {"id": 17}, idempotency_key="order-17")
        assert again == Published("orders", first.epoch, first.offset, 0, duplicate=True)

        history = await pub.history("news")
        assert (history.channel, history.epoch, history.offset) == ("news", epoch, 5)
        assert history.complete
        assert history.next is None
        assert [(p.offset, p.data) for p in history.publications] == [
            (1, {"price": 42}),
            (2, "hello there"),
            (3, {"exact": 1.1}),
            (4, [1, 2]),
            (5, 5),
        ]
        page = await pub.history("news", since=1, limit=2)
        assert [p.offset for p in page.publications] == [2, 3]
        assert page.next == 3
        newest = await pub.history("news", limit=1, newest_first=True)
        assert [p.offset for p in newest.publications] == [5]

        assert await pub.channel("news") == ChannelInfo("news", 1, epoch or "", 5)
        names = [c.name for c in await pub.channels()]
        assert names == sorted(names)
        assert {"news", "sport", "orders"} <= set(names)


async def test_publisher_errors_carry_the_daemons_code(daemon_factory: Any) -> None:
    async with daemon_factory(control__token="secret", control__max_payload_bytes=1024) as d:
        async with AsyncPublisher(d.control_url) as anonymous:
            with pytest.raises(RequestRefused) as denied:
                await anonymous.publish("a", 1)
            assert (denied.value.status, denied.value.code) == (401, "unauthorized")
        async with AsyncPublisher(d.control_url, token="secret") as pub:
            cases: list[tuple[Any, int, str]] = [
                (pub.publish("no good", 1), 400, "bad_channel"),
                (pub.publish("a", "x" * 2000), 413, "payload_too_large"),
                (pub.channel("nothing"), 404, "not_found"),
            ]
            for call, status, code in cases:
                with pytest.raises(RequestRefused) as refused:
                    await call
                assert (refused.value.status, refused.value.code) == (status, code)
                assert isinstance(refused.value, BroadcastdError)
                assert json.loads(refused.value.body)["error"]["code"] == code
            await pub.publish("a", 1)
            with pytest.raises(RequestRefused) as moved:
                await pub.history("a", epoch="another")
            assert (moved.value.status, moved.value.code) == (409, "epoch_mismatch")


async def test_only_what_cannot_duplicate_is_retried() -> None:
    """Nothing listens: a read is retried, a publish only with an idempotency key."""
    retries: list[tuple[str, int]] = []

    def heard(attempt: int, error: BroadcastdError, delay: float) -> None:
        assert isinstance(error, NetworkError)
        retries.append((error.code, attempt))

    async with AsyncPublisher(
        "http://127.0.0.1:9", retries=2, min_backoff=0.001, max_backoff=0.002, on_retry=heard
    ) as pub:
        with pytest.raises(NetworkError):
            await pub.publish("a", 1)
        assert retries == []
        with pytest.raises(NetworkError):
            await pub.batch([("a", 1, "k1"), ("b", 2)])  # one item without a key
        assert retries == []
        with pytest.raises(NetworkError):
            await pub.channels()
        assert retries == [("network", 1), ("network", 2)]
        with pytest.raises(NetworkError):
            await pub.publish("a", 1, idempotency_key="k1")
        assert len(retries) == 4


async def test_an_idempotent_publish_is_retried_after_a_503_with_its_key(
    daemon_factory: Any,
) -> None:
    """A full channel table (503 channel_table_full) frees up between the attempts:
    the retry, with the same key, publishes once; a repeat is a duplicate."""
    async with (
        daemon_factory(channels__max_channels=1) as d,
        d.connect("/?channel=held") as holder,
    ):
        assert (await recv_json(holder))["type"] == "subscribed"
        retries: list[tuple[int, str]] = []

        async def free_the_table(attempt: int, error: BroadcastdError, delay: float) -> None:
            retries.append((attempt, error.code))
            drop_connections(d)  # "held" loses its only subscriber: it may be forgotten
            await holder.wait_closed()

        async with AsyncPublisher(
            d.control_url, min_backoff=0.01, max_backoff=0.05, on_retry=free_the_table
        ) as pub:
            with pytest.raises(Unavailable) as full:
                await pub.publish("other", 0)  # no key: not retried
            assert (full.value.status, full.value.code) == (503, "channel_table_full")
            assert full.value.retry_after == 5
            assert retries == []
            published = await pub.publish("orders", 1, idempotency_key="order-1")
            assert retries == [(1, "channel_table_full")]
            assert (published.offset, published.duplicate) == (1, False)
            again = await pub.publish("orders", 1, idempotency_key="order-1")
            assert again == Published("orders", published.epoch, 1, 0, duplicate=True)


async def test_blocking_publisher_over_a_unix_socket(daemon_factory: Any, tmp_path: Path) -> None:
    """The blocking Publisher (in a thread: the daemon runs in this event loop)."""
    path = str(tmp_path / "control.sock")
    async with daemon_factory(control__unix_path=path, control__token="secret"):

        def work() -> None:
            with Publisher(unix=path, token="secret") as pub:
                first = pub.publish("news", {"n": 1})
                assert (first.channel, first.offset, first.subscribers) == ("news", 1, 0)
                keyed = pub.publish("news", {"n": 2}, idempotency_key="k2")
                assert pub.publish("news", {"n": 2}, idempotency_key="k2") == Published(
                    "news", keyed.epoch, 2, 0, duplicate=True
                )
                batch = pub.batch([("news", 3), ("sport", 1)])
                assert [r.offset for r in batch.results if isinstance(r, Published)] == [3, 1]
                assert [p.channel for p in pub.publish_many(["a", "b"], None)] == ["a", "b"]
                history = pub.history("news", since=1)
                assert [p.data for p in history.publications] == [{"n": 2}, 3]
                assert pub.channel("sport").offset == 1
                assert [c.name for c in pub.channels()] == ["a", "b", "news", "sport"]
                with pytest.raises(RequestRefused) as refused:
                    pub.publish("no good", 1)
                assert refused.value.code == "bad_channel"
            with Publisher(unix=path) as anonymous, pytest.raises(RequestRefused) as denied:
                anonymous.publish("news", 1)
            assert denied.value.status == 401

        await asyncio.to_thread(work)


async def test_blocking_publisher_retries_an_idempotent_publish(daemon_factory: Any) -> None:
    async with (
        daemon_factory(channels__max_channels=1) as d,
        d.connect("/?channel=held") as holder,
    ):
        assert (await recv_json(holder))["type"] == "subscribed"
        loop = asyncio.get_running_loop()

        async def free_the_table() -> None:
            drop_connections(d)
            await holder.wait_closed()

        retries: list[str] = []

        def heard(attempt: int, error: BroadcastdError, delay: float) -> None:
            retries.append(error.code)
            asyncio.run_coroutine_threadsafe(free_the_table(), loop).result(30)

        def work() -> tuple[Published, Published]:
            with Publisher(
                d.control_url, min_backoff=0.01, max_backoff=0.05, on_retry=heard
            ) as pub:
                first = pub.publish("orders", "o-1", idempotency_key="o-1")
                return first, pub.publish("orders", "o-1", idempotency_key="o-1")

        first, again = await asyncio.to_thread(work)
        assert retries == ["channel_table_full"]
        assert (first.offset, first.duplicate, again.offset, again.duplicate) == (1, False, 1, True)
