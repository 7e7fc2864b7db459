"""The ordering rules of a remote engine's feeds, and the node's merge of a
recovery with the live stream, in process against fakes of the other side.

Feeds (``broadcastd.broker.feeds``) stand between Redis's pub/sub and the node:
a duplicate is dropped, a gap is repaired from history before anything newer,
what cannot be repaired is told (``resync``). The node joins a recovering
subscriber in the very step its read of history reaches what was delivered,
whatever arrived meanwhile. Both are driven here by hand: a fake engine answers
reads when the test says so, and a recording handler stands for the node.
"""

from __future__ import annotations

import asyncio
from typing import Any

from broadcastd.broker import History
from broadcastd.broker.feeds import Feeds
from broadcastd.core.envelope import Payload
from broadcastd.core.forms import Form
from broadcastd.core.hub import FanOut
from broadcastd.core.observer import NullObserver
from broadcastd.core.outbox import Outbox
from broadcastd.core.stream import Position, Publication, Recovery
from broadcastd.errors import BrokerUnavailable, ClientError
from broadcastd.node import Node

from .conftest import make_settings

E = "e1"


def pub(offset: int, epoch: str = E) -> Publication:
    return Publication(b'{"channel":"c"', epoch, offset, Payload.from_value(offset), 0.0)


class Kept:
    """A fake remote engine's history: what it keeps of channel ``c``, and its top."""

    def __init__(self, top: Position, kept: range) -> None:
        self.top = top
        self.kept = kept
        self.reads = 0
        self.restarted: list[str] = []

    async def history(self, channel: str, since: int, limit: int) -> History:
        self.reads += 1
        if since >= self.top.offset:
            return History(self.top, [])
        if since + 1 not in self.kept:
            return History(self.top, None)
        offsets = range(since + 1, min(since + limit, self.top.offset) + 1)
        return History(self.top, [pub(o, self.top.epoch) for o in offsets if o in self.kept])

    async def begin(self, channel: str) -> Position:
        self.top = Position("e2", 0)
        return self.top

    async def restart(self, channel: str, epoch: str) -> Position:
        self.restarted.append(epoch)
        self.top = Position("e2", 0)
        return self.top


class Recorder:
    """The node, as feeds see it: what was handed on, in order."""

    def __init__(self) -> None:
        self.events: list[Any] = []
        self.idle = asyncio.Event()

    def subscribed(self, channel: str, position: Position) -> None:
        self.events.append(("subscribed", position.offset))

    def unavailable(self, channel: str, error: ClientError) -> None:
        self.events.append(("unavailable", error.code))

    def deliver(self, channel: str, publication: Publication) -> FanOut:
        self.events.append(publication.offset)
        return FanOut()

    def resync(self, channel: str, position: Position, reason: str) -> None:
        self.events.append(("resync", reason, position.epoch, position.offset))


async def settle(feeds: Feeds) -> None:
    """Until every repair under way has ended."""
    while pending := feeds._background.pending():
        await asyncio.gather(*pending, return_exceptions=True)


def opened(source: Kept, at: int) -> tuple[Feeds, Recorder]:
    recorder = Recorder()
    feeds = Feeds(source, recorder, NullObserver())
    feeds.want("c")
    feeds.opened("c", Position(E, at))
    return feeds, recorder


async def test_in_order_is_handed_on_and_a_duplicate_dropped() -> None:
    feeds, seen = opened(Kept(Position(E, 3), range(1, 4)), 0)
    for offset in (1, 2, 2, 1, 3):
        feeds.deliver("c", pub(offset))
    assert seen.events == [("subscribed", 0), 1, 2, 3]


async def test_a_gap_is_filled_from_history_before_anything_newer() -> None:
    source = Kept(Position(E, 6), range(1, 7))
    feeds, seen = opened(source, 0)
    feeds.deliver("c", pub(1))
    feeds.deliver("c", pub(4))  # 2 and 3 were lost
    feeds.deliver("c", pub(5))  # held behind the repair
    await settle(feeds)
    feeds.deliver("c", pub(6))
    await settle(feeds)
    assert seen.events == [("subscribed", 0), 1, 2, 3, 4, 5, 6]


async def test_what_history_no_longer_has_is_told_then_the_stream_goes_on() -> None:
    source = Kept(Position(E, 9), range(6, 10))  # 2 to 5 are gone
    feeds, seen = opened(source, 0)
    feeds.deliver("c", pub(1))
    feeds.deliver("c", pub(8))
    await settle(feeds)
    feeds.deliver("c", pub(10))
    assert seen.events == [("subscribed", 0), 1, ("resync", "gap", E, 9), 10]


async def test_a_channel_redis_lost_continues_in_a_new_epoch_and_is_told() -> None:
    source = Kept(Position(E, 4), range(1, 5))
    feeds, seen = opened(source, 4)
    source.top = Position("", 0)  # Redis lost the channel
    feeds.resubscribed(["c"])
    await settle(feeds)
    feeds.deliver("c", pub(1, "e2"))
    assert seen.events == [("subscribed", 4), ("resync", "epoch", "e2", 0), 1]


async def test_redis_behind_in_the_same_epoch_restarts_the_count() -> None:
    source = Kept(Position(E, 2), range(1, 3))  # an older snapshot: 3 to 5 were given out
    feeds, seen = opened(source, 5)
    feeds.resubscribed(["c"])
    await settle(feeds)
    assert source.restarted == [E]
    assert seen.events == [("subscribed", 5), ("resync", "epoch", "e2", 0)]


async def test_what_arrives_before_the_position_is_merged_by_offset() -> None:
    recorder = Recorder()
    feeds = Feeds(Kept(Position(E, 5), range(1, 6)), recorder, NullObserver())
    feeds.want("c")
    for offset in (5, 3, 4):  # before the subscription's position is known
        feeds.deliver("c", pub(offset))
    feeds.opened("c", Position(E, 3))
    await settle(feeds)
    assert recorder.events == [("subscribed", 3), 4, 5]


async def test_a_repair_that_cannot_reach_redis_is_tried_again() -> None:
    class Flaky(Kept):
        failures = 1

        async def history(self, channel: str, since: int, limit: int) -> History:
            if self.failures:
                self.failures -= 1
                raise BrokerUnavailable("down")
            return await super().history(channel, since, limit)

    source = Flaky(Position(E, 3), range(1, 4))
    feeds, seen = opened(source, 0)
    feeds.deliver("c", pub(3))
    await settle(feeds)
    async with asyncio.timeout(10):
        while seen.events[-1] != 3:  # noqa: ASYNC110 - the retry is a timer (RETRY_REPAIR)
            await asyncio.sleep(0.1)
    assert seen.events == [("subscribed", 0), 1, 2, 3]


# The node's merge of a recovery with the live stream, against an engine that
# answers reads only when the test lets it.


class SlowEngine:
    """A remote engine whose history reads wait for ``answer()``."""

    def __init__(self) -> None:
        self.handler: Any = None
        self.kept: list[Publication] = []
        self.reads: list[tuple[int, asyncio.Future[History]]] = []
        self.subscribed_to: list[str] = []

    async def start(self, handler: Any) -> None:
        self.handler = handler

    def subscribe(self, channel: str) -> None:
        self.subscribed_to.append(channel)

    def unsubscribe(self, channel: str) -> None:
        self.subscribed_to.remove(channel)

    def history(self, channel: str, since: int, limit: int) -> asyncio.Future[History]:
        future: asyncio.Future[History] = asyncio.get_running_loop().create_future()
        self.reads.append((since, future))
        return future

    def answer(self, top: int) -> None:
        """Answer the oldest read with what is kept up to ``top``."""
        since, future = self.reads.pop(0)
        kept = [p for p in self.kept if since < p.offset <= top]
        future.set_result(History(Position(E, top), kept))

    def publish_here(self, offset: int) -> None:
        publication = pub(offset)
        self.kept.append(publication)
        self.handler.deliver("c", publication)

    async def close(self) -> None:
        return None


async def test_a_recovery_joins_the_live_stream_with_no_gap_and_no_duplicate() -> None:
    engine = SlowEngine()
    node = Node(make_settings(), broker=engine)  # type: ignore[arg-type]
    await node.start()
    first, late = Outbox(100, 100_000), Outbox(100, 100_000)
    joined: list[tuple[Position, Recovery | None]] = []
    node.join(first, "c", Form.FRAME, None, lambda p, r: joined.append((p, r)), _fail)
    node.subscribed("c", Position(E, 0))  # the engine confirms
    for offset in (1, 2, 3):
        engine.publish_here(offset)
    node.join(late, "c", Form.FRAME, Position(E, 1), lambda p, r: joined.append((p, r)), _fail)
    assert len(joined) == 1  # the late one reads history first
    engine.publish_here(4)  # arrives while its read is under way
    engine.answer(3)  # the read ends at 3: the node reads on to 4
    async with asyncio.timeout(10):
        while not engine.reads:  # noqa: ASYNC110 - the node's task runs the read's answer
            await asyncio.sleep(0)
    engine.publish_here(5)
    engine.answer(5)
    async with asyncio.timeout(10):
        while len(joined) < 2:  # noqa: ASYNC110 - the node's task runs the read's answer
            await asyncio.sleep(0)
    position, recovery = joined[1]
    assert recovery is not None
    assert recovery.recovered
    replayed = [p.offset for p in recovery.replay]
    assert replayed == [2, 3, 4, 5]
    assert position == Position(E, 5)
    engine.publish_here(6)
    live = [frame for frame in late.take()]
    assert len(live) == 1  # only 6 is live for it: 2 to 5 came as its replay
    await node.close()


async def test_a_subscriber_leaving_while_it_recovers_releases_the_channel() -> None:
    engine = SlowEngine()
    node = Node(make_settings(), broker=engine)  # type: ignore[arg-type]
    await node.start()
    only = Outbox(100, 100_000)
    node.join(only, "c", Form.FRAME, Position(E, 0), _nothing, _fail)
    node.subscribed("c", Position(E, 2))
    engine.kept = [pub(1), pub(2)]
    node.unsubscribe(only, "c")
    assert engine.subscribed_to == ["c"]  # still held by the read under way
    engine.answer(2)
    async with asyncio.timeout(10):
        while engine.subscribed_to:  # noqa: ASYNC110 - the node's task runs the read's answer
            await asyncio.sleep(0)
    assert "c" not in node.hub
    await node.close()


def _nothing(*_: object) -> None:
    return None


def _fail(error: ClientError) -> None:
    raise AssertionError(error)
