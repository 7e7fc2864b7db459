"""Feeds: this node's view of channels whose positions a remote broker (Redis) assigns.

With the memory broker a publication is delivered inside the publish call, so
a subscriber's join, its recovery and the live stream are ordered by being one
synchronous step. With Redis, publications arrive on the pub/sub connection, and
joining, recovering and repairing need reads that take a round trip. A Feed keeps
the promises across those round trips:

- it knows the last offset delivered here, and delivers a publication only if
  it is the next one: a duplicate is dropped, a gap (a pub/sub message lost, a
  reconnection) is filled from history, in order, before anything newer;
- while a channel is being subscribed or repaired, what arrives is held, then
  merged by offset, so that nothing is doubled or skipped;
- a recovering subscriber joins the live stream in the same step that its replay
  ends, at the offset its replay reached;
- where history cannot fill a gap, or the channel's count restarted (Redis lost
  its data), every subscriber of the channel gets a ``resync`` event with the new
  position: a loss is always told, never silent.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

from broadcastd import log
from broadcastd.broker import RemoteBroker
from broadcastd.core.envelope import reply_frame
from broadcastd.core.hub import FanOut, Hub
from broadcastd.core.observer import Observer
from broadcastd.core.outbox import Outbox
from broadcastd.core.stream import Last, Position, Publication, Recovery, Since, plan_recovery
from broadcastd.errors import ClientError

_log = log.get("broadcastd.feeds")
_throttle = log.Throttle(per_second=10)

Joined = Callable[[Position, Recovery | None], None]
Failed = Callable[[ClientError], None]
HELD_MAX = 10_000
"""Publications held for one channel while it is repaired; older ones are let go
(they are in history, which the repair reads)."""
REPAIR_PAGE = 1000
"""Publications read from history per round trip of a repair."""
RETRY_REPAIR = 0.5
"""Seconds before a repair that could not reach the broker is tried again."""
GAP = "gap"
EPOCH = "epoch"


class Joiner:
    """A subscriber waiting to join a channel (and perhaps to recover first)."""

    __slots__ = ("cancelled", "failed", "joined", "outbox", "raw", "since")

    def __init__(
        self, outbox: Outbox, raw: bool, since: Since | None, joined: Joined, failed: Failed
    ) -> None:
        self.outbox = outbox
        self.raw = raw
        self.since = since
        self.joined = joined
        self.failed = failed
        self.cancelled = False


class Feed:
    """One channel with subscribers here: the last position delivered, and what waits."""

    __slots__ = ("epoch", "held", "name", "offset", "ready", "recovering", "repairing", "waiting")

    def __init__(self, name: str) -> None:
        self.name = name
        self.ready = False
        """The broker confirmed the subscription and told the position."""
        self.epoch = ""
        self.offset = 0
        """Last offset delivered to this node's subscribers."""
        self.repairing = False
        self.held: list[Publication] = []
        self.waiting: list[Joiner] = []
        self.recovering: set[Joiner] = set()

    @property
    def position(self) -> Position:
        return Position(self.epoch, self.offset)

    def has_joiners(self) -> bool:
        return bool(self.waiting) or any(not j.cancelled for j in self.recovering)


class Feeds:
    """Every channel this node subscribes to through a remote broker."""

    def __init__(
        self,
        hub: Hub,
        broker: RemoteBroker,
        observer: Observer,
        fan_out: Callable[[str, Publication], FanOut],
        *,
        history_on: Callable[[str], bool],
        max_recover: int,
    ) -> None:
        self.hub = hub
        self.broker = broker
        self.observer = observer
        self.fan_out = fan_out
        self.history_on = history_on
        """Whether a channel keeps history and allows recovery (its namespace)."""
        self.max_recover = max_recover
        self._feeds: dict[str, Feed] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def __contains__(self, name: object) -> bool:
        return name in self._feeds

    def names(self) -> list[str]:
        return list(self._feeds)

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()

    # Joining and leaving

    def join(
        self,
        outbox: Outbox,
        name: str,
        raw: bool,
        since: Since | None,
        joined: Joined,
        failed: Failed,
    ) -> None:
        """Subscribe ``outbox``; ``joined`` is called (perhaps later) with the position
        and the recovery, right before the live stream continues; or ``failed``."""
        joiner = Joiner(outbox, raw, since, joined, failed)
        feed = self._feeds.get(name)
        if feed is None:
            feed = self._feeds[name] = Feed(name)
            feed.waiting.append(joiner)
            self._spawn(self._open(feed), name)
        elif not feed.ready or feed.repairing:
            feed.waiting.append(joiner)
        else:
            self._admit(feed, joiner)

    def leave(self, outbox: Outbox, name: str) -> None:
        feed = self._feeds.get(name)
        if feed is None:
            return
        for joiner in (*feed.waiting, *feed.recovering):
            if joiner.outbox is outbox:
                joiner.cancelled = True
        feed.waiting = [j for j in feed.waiting if not j.cancelled]
        self.hub.leave(outbox, name)
        channel = self.hub.get(name)
        if (channel is None or not channel.subscriber_count) and not feed.has_joiners():
            del self._feeds[name]
            self.broker.unsubscribe(name)

    async def _open(self, feed: Feed) -> None:
        try:
            position = await self.broker.subscribe(feed.name)
        except ClientError as exc:
            if self._feeds.get(feed.name) is feed:
                del self._feeds[feed.name]
            for joiner in feed.waiting:
                if not joiner.cancelled:
                    joiner.failed(exc)
            return
        if self._feeds.get(feed.name) is not feed:
            return  # everyone left meanwhile
        feed.epoch, feed.offset = position
        feed.ready = True
        self.hub.add(feed.name, position)
        held, feed.held = feed.held, []
        for publication in held:
            self.deliver(feed.name, publication)
        self._admit_waiting(feed)

    def _admit_waiting(self, feed: Feed) -> None:
        waiting, feed.waiting = feed.waiting, []
        for joiner in waiting:
            if not joiner.cancelled:
                self._admit(feed, joiner)

    def _admit(self, feed: Feed, joiner: Joiner) -> None:
        """Join now if nothing must be read first; else recover, then join."""
        since = joiner.since
        if since is None:
            self._join_now(feed, joiner, None)
        elif isinstance(since, Last):
            if since.number == 0 or feed.offset == 0 or not self.history_on(feed.name):
                self._join_now(feed, joiner, Recovery(True, None, []))
            else:
                self._spawn(self._recover(feed, joiner), feed.name)
        else:
            missed = feed.offset - since.offset
            history_on = self.history_on(feed.name)
            if 0 < missed <= self.max_recover and since.epoch == feed.epoch and history_on:
                self._spawn(self._recover(feed, joiner), feed.name)
                return
            read = _nothing_read if history_on else None  # not called in these cases
            recovery = plan_recovery(feed.position, since, self.max_recover, read)
            self.observer.recovered(recovery.recovered, recovery.reason, 0)
            self._join_now(feed, joiner, recovery)

    def _join_now(self, feed: Feed, joiner: Joiner, recovery: Recovery | None) -> None:
        channel = self.hub.get(feed.name)
        if channel is None:  # its last subscriber left while this one recovered
            channel = self.hub.add(feed.name, feed.position)
        self.hub.join(channel, joiner.outbox, joiner.raw)
        joiner.joined(feed.position, recovery)

    async def _recover(self, feed: Feed, joiner: Joiner) -> None:
        """Read what ``joiner`` missed until the read reaches what this node has
        delivered; then join it in the same step (nothing can come between)."""
        feed.recovering.add(joiner)
        try:
            since = joiner.since
            epoch = feed.epoch
            if isinstance(since, Last):
                latest = await self.broker.latest(feed.name, min(since.number, self.max_recover))
                got = [p for p in latest.publications or [] if p.epoch == epoch]
                got = [p for p in got if p.offset <= feed.offset]
                cursor = got[-1].offset if got else feed.offset
            else:
                assert since is not None
                got, cursor = [], since.offset
            complete = True
            while cursor < feed.offset and feed.epoch == epoch:
                history = await self.broker.history(
                    feed.name, cursor, min(feed.offset - cursor, self.max_recover)
                )
                if joiner.cancelled or self._feeds.get(feed.name) is not feed:
                    return
                page = [p for p in history.publications or [] if p.offset <= feed.offset]
                if history.top.epoch != epoch or not page:
                    complete = False
                    break
                got.extend(page)
                cursor = page[-1].offset
            if joiner.cancelled or self._feeds.get(feed.name) is not feed:
                return
            if feed.repairing or not feed.ready or feed.epoch != epoch:
                feed.waiting.append(joiner)  # decided again once the channel is whole
                return
            if isinstance(since, Last):
                recovery = Recovery(True, None, got if complete else [])
            else:
                assert since is not None
                kept = got if complete else None
                recovery = plan_recovery(
                    feed.position, since, self.max_recover, lambda after, limit: kept
                )
                self.observer.recovered(recovery.recovered, recovery.reason, len(recovery.replay))
            self._join_now(feed, joiner, recovery)
        except ClientError as exc:
            if not joiner.cancelled:
                joiner.failed(exc)
        finally:
            feed.recovering.discard(joiner)

    # Delivering

    def deliver(self, name: str, publication: Publication) -> None:
        """A publication from the broker: delivered if it is the next one, else held
        and the gap repaired."""
        feed = self._feeds.get(name)
        if feed is None:
            return
        if not feed.ready or feed.repairing:
            self._hold(feed, publication)
            return
        if publication.epoch == feed.epoch:
            if publication.offset == feed.offset + 1:
                feed.offset = publication.offset
                self.fan_out(name, publication)
                return
            if publication.offset <= feed.offset:
                return  # delivered already (by a repair)
        self._hold(feed, publication)
        self._repair(feed)

    def resubscribed(self, names: list[str]) -> None:
        """The broker's pub/sub connection was made again: anything may have been
        missed meanwhile, so every channel is checked against history."""
        for name in names:
            feed = self._feeds.get(name)
            if feed is not None and feed.ready:
                self._repair(feed)

    def _hold(self, feed: Feed, publication: Publication) -> None:
        held = feed.held
        held.append(publication)
        if len(held) > HELD_MAX:
            del held[: HELD_MAX // 2]

    def _repair(self, feed: Feed) -> None:
        if not feed.repairing and self._feeds.get(feed.name) is feed:
            feed.repairing = True
            self._spawn(self._repair_run(feed), feed.name)

    async def _repair_run(self, feed: Feed) -> None:
        name = feed.name
        outcome = None
        try:
            while self._feeds.get(name) is feed:
                history = await self.broker.history(name, feed.offset, REPAIR_PAGE)
                if self._feeds.get(name) is not feed:
                    return
                top = history.top
                if not top.epoch:  # Redis lost the channel: begin it again
                    top = await self.broker.begin(name)
                elif top.epoch == feed.epoch and top.offset < feed.offset:
                    # Redis lost publications it had acknowledged (a crash between
                    # fsyncs): their offsets would be given out again.
                    top = await self.broker.restart(name, feed.epoch)
                if self._feeds.get(name) is not feed:
                    return
                if top.epoch != feed.epoch:
                    self._resync(feed, Position(top.epoch, 0), EPOCH)
                    outcome = EPOCH
                    continue
                if history.publications is None:
                    self._resync(feed, top, GAP)
                    outcome = GAP
                else:
                    for publication in history.publications:
                        if publication.offset == feed.offset + 1:
                            feed.offset = publication.offset
                            self.fan_out(name, publication)
                            outcome = outcome or "repaired"
                self._release_held(feed)
                if feed.offset >= top.offset and not feed.held:
                    break
        except ClientError:  # unreachable: try again (a reconnection also repairs)
            if self._feeds.get(name) is feed:
                asyncio.get_running_loop().call_later(RETRY_REPAIR, self._repair, feed)
        finally:
            feed.repairing = False
        if outcome is not None:
            self.observer.gap_repair("repaired" if outcome == "repaired" else "resync")
        if self._feeds.get(name) is feed:
            self._admit_waiting(feed)

    def _release_held(self, feed: Feed) -> None:
        """Deliver what was held while the channel was repaired, in offset order,
        up to the first gap (kept for the next round)."""
        held = sorted(
            (p for p in feed.held if p.epoch == feed.epoch and p.offset > feed.offset),
            key=lambda p: p.offset,
        )
        feed.held = []
        for i, publication in enumerate(held):
            if publication.offset == feed.offset:
                continue
            if publication.offset != feed.offset + 1:
                feed.held = held[i:]
                return
            feed.offset = publication.offset
            self.fan_out(feed.name, publication)

    def _resync(self, feed: Feed, position: Position, reason: str) -> None:
        """Tell every subscriber of the channel that what it missed cannot be had,
        and where the channel continues from."""
        feed.epoch, feed.offset = position
        channel = self.hub.get(feed.name)
        _log.warning(
            "channel.resync",
            channel=feed.name,
            reason=reason,
            epoch=position.epoch,
            offset=position.offset,
            subscribers=0 if channel is None else channel.subscriber_count,
        )
        if channel is None:
            return
        channel.epoch, channel.offset = position
        frame = reply_frame(
            {
                "type": "resync",
                "channel": feed.name,
                "epoch": position.epoch,
                "offset": position.offset,
                "reason": reason,
            }
        )
        for outbox in (*channel.json_subscribers, *channel.raw_subscribers):
            outbox.push(frame)

    # Tasks

    def _spawn(self, work: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None and _throttle.allow("feeds.error"):
            _log.error("feeds.error", error=f"{type(exc).__name__}: {exc}"[:200], exc_info=exc)


def _nothing_read(after: int, limit: int) -> list[Publication] | None:
    return []
