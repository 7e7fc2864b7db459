"""broadcastd.client's side of presence against a real daemon: the identity the
first reply tells, join and leave events (off by default), and the subscriber's
``presence`` and ``presence_stats`` calls, awaited from the task that iterates
the stream and from another one while messages flow."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import jwt
import pytest

from broadcastd.client import (
    CommandRefused,
    Join,
    Leave,
    Message,
    NetworkError,
    PresencePage,
    PresenceStats,
    Stream,
    Subscribed,
    Subscriber,
)

from .conftest import Running, make_settings, running_daemon

SECRET = "s" * 64
NAMESPACES = [
    {"name": "room", "presence": True, "join_leave": True, "presence_for_subscribers": True},
    {"name": "quiet", "presence": True},
]


def token(sub: str) -> str:
    return jwt.encode({"sub": sub, "exp": int(time.time()) + 3600}, SECRET, algorithm="HS256")


@pytest.fixture
async def daemon() -> AsyncIterator[Running]:
    # Pages of two, so that three clients take two pages.
    settings = make_settings(
        auth__hmac_secret=SECRET,
        channels__subscribe="public",
        namespaces=NAMESPACES,
        presence__max_page=2,
    )
    async with running_daemon(settings) as d:
        yield d


async def next_item(stream: Stream) -> Any:
    async with asyncio.timeout(10):
        return await anext(stream)


async def joined(d: Running, user: str | None, *channels: str, **options: Any) -> Any:
    """A Subscriber of ``user`` (None: no token), its stream past the
    ``subscribed`` of ``channels``."""
    subscriber = Subscriber(d.ws_url, token=token(user) if user else None, max_backoff=0.1)
    events = options.pop("events", frozenset()) | {Subscribed}
    stream = subscriber.subscribe(*channels, events=events, **options)
    for channel in channels:
        item = await next_item(stream)
        assert (type(item), item.channel) == (Subscribed, channel), item
    return subscriber, stream


async def test_the_first_reply_tells_the_client_id_and_the_user(daemon: Running) -> None:
    alice, _ = await joined(daemon, "alice", "room:a")
    guest, _ = await joined(daemon, None, "room:a")
    assert alice.user == "alice"
    assert guest.user is None
    page = await alice.presence("room:a")
    assert {(e["client"], e["user"]) for e in page.clients} == {
        (alice.client, "alice"),
        (guest.client, None),
    }
    for subscriber in (alice, guest):
        await subscriber.close()


async def test_join_and_leave_are_events_of_the_stream_when_asked_for(daemon: Running) -> None:
    witness, events = await joined(daemon, "carol", "room:a", events={Join, Leave})
    unasked, plain = await joined(daemon, "dave", "room:a")
    bob, _ = await joined(daemon, "bob", "room:a")
    assert await next_item(events) == Join("room:a", unasked.client, "dave")
    join = await next_item(events)
    assert join == Join("room:a", bob.client, "bob")
    assert join.frame.startswith('{"type":"join"')
    await bob.close()
    assert await next_item(events) == Leave("room:a", bob.client, "bob")
    # Off by default: neither yielded nor raised; the next item is the message.
    await daemon.publish("room:a", "after")
    assert (await next_item(plain)).data == "after"
    assert (await next_item(events)).data == "after"
    for subscriber in (witness, unasked):
        await subscriber.close()


async def test_presence_from_the_task_that_iterates_keeps_what_came_before(
    daemon: Running,
) -> None:
    alice, stream = await joined(daemon, "alice", "room:a")
    bob, _ = await joined(daemon, "bob", "room:a")
    guest, _ = await joined(daemon, None, "room:a")
    await daemon.publish("room:a", "before")  # received ahead of the answer
    first = await alice.presence("room:a")
    assert isinstance(first, PresencePage)
    assert (first.channel, len(first.clients)) == ("room:a", 2)
    assert first.next is not None
    rest = await alice.presence("room:a", cursor=first.next)
    assert (len(rest.clients), rest.next) == (1, None)
    clients = {e["client"]: e["user"] for e in first.clients + rest.clients}
    assert clients == {alice.client: "alice", bob.client: "bob", guest.client: None}
    assert await alice.presence_stats("room:a") == PresenceStats("room:a", 3, 2)
    item = await next_item(stream)
    assert (type(item), item.data) == (Message, "before")
    for subscriber in (alice, bob, guest):
        await subscriber.close()


async def test_presence_beside_a_task_that_iterates_while_messages_flow(daemon: Running) -> None:
    alice, stream = await joined(daemon, "alice", "room:b")
    count = 200

    async def read() -> list[int]:
        return [(await next_item(stream)).data for _ in range(count)]

    reader = asyncio.create_task(read())
    for n in range(count):
        await daemon.publish("room:b", n)
        if n % 20 == 0:
            assert await alice.presence_stats("room:b") == PresenceStats("room:b", 1, 1)
    async with asyncio.timeout(10):
        assert await reader == list(range(count))
    await alice.close()


async def test_refusals_are_typed_errors(daemon: Running) -> None:
    alice, _ = await joined(daemon, "alice", "room:a", "quiet:a")
    refusals = [
        (lambda: alice.presence("room:other"), "presence", "not_subscribed"),
        (lambda: alice.presence("quiet:a"), "presence", "presence_not_allowed"),
        (lambda: alice.presence_stats("bad name"), "presence_stats", "bad_channel"),
        (lambda: alice.presence("room:a", cursor="x" * 129), "presence", "bad_command"),
    ]
    for call, op, code in refusals:
        with pytest.raises(CommandRefused) as refused:
            await call()
        assert (refused.value.code, refused.value.event.op) == (code, op)
    await alice.close()
    with pytest.raises(NetworkError):
        await alice.presence("room:a")
    never_connected = Subscriber(daemon.ws_url)
    with pytest.raises(NetworkError):
        await never_connected.presence_stats("room:a")
