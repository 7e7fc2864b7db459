"""Feeds: the order of what a remote engine (Redis) delivers, kept across round trips.

The memory engine delivers each publication inside the publish that made it,
so its channels are in order by construction. Over Redis, publications arrive
on a pub/sub connection that can lose messages (a reconnection, a slow node cut
off by Redis's output buffer limit), and the channel's position is read by a
separate command. A Feed keeps the engine's promise to the node
(``broadcastd.broker``): each channel's publications are handed on in offset
order from the position the subscription began at, none twice, none skipped.

- What arrives before the subscription's position is known is held, then
  merged by offset once it is.
- A publication that is the next one is handed on; a duplicate (already handed
  on by a repair) is dropped; one past a gap is held and the gap is filled from
  history, in order, before anything newer.
- Where history cannot fill a gap, or the channel's count restarted (Redis lost
  its data, or went back to an older snapshot), the node is told with
  ``resync`` and the channel continues from there: a loss is told, never
  silent.

Feeds know nothing of subscribers: the node joins and recovers them against the
positions handed on here.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from broadcastd.background import Background
from broadcastd.broker import BrokerHandler, History
from broadcastd.core.observer import Observer
from broadcastd.core.stream import Position, Publication
from broadcastd.errors import ClientError

HELD_MAX = 10_000
"""Publications held for one channel while it is subscribed or repaired; older
ones are let go (they are in history, which the repair reads)."""
REPAIR_PAGE = 1000
"""Publications read from history per round trip of a repair."""
RETRY_REPAIR = 0.5
"""Seconds before a repair that could not reach the engine is tried again."""
GAP = "gap"
EPOCH = "epoch"


class Source(Protocol):
    """What a repair reads: the remote engine."""

    async def history(self, channel: str, since: int, limit: int) -> History: ...

    async def begin(self, channel: str) -> Position:
        """The channel's position, begun in a new epoch if the engine has none."""

    async def restart(self, channel: str, epoch: str) -> Position:
        """Begin a new epoch if the channel is still in ``epoch``."""


class Feed:
    """One channel subscribed here: the last position handed on, and what waits."""

    __slots__ = ("epoch", "held", "name", "offset", "ready", "repairing")

    def __init__(self, name: str) -> None:
        self.name = name
        self.ready = False
        """The subscription's position is known."""
        self.epoch = ""
        self.offset = 0
        """Last offset handed on to the node."""
        self.repairing = False
        self.held: list[Publication] = []


class Feeds:
    """Every channel a remote engine delivers to this node."""

    def __init__(self, source: Source, handler: BrokerHandler, observer: Observer) -> None:
        self.source = source
        self.handler = handler
        self.observer = observer
        self._feeds: dict[str, Feed] = {}
        self._background = Background("broadcastd.feeds", "feeds.error")

    def __contains__(self, name: object) -> bool:
        return name in self._feeds

    def __len__(self) -> int:
        return len(self._feeds)

    def close(self) -> None:
        self._background.cancel()

    # A subscription's life

    def want(self, name: str) -> None:
        """A subscription is being made: hold what arrives until its position is known."""
        self._feeds.setdefault(name, Feed(name))

    def opened(self, name: str, position: Position) -> None:
        """The subscription holds from ``position``: tell the node, then hand on
        what was held."""
        feed = self._feeds.get(name)
        if feed is None or feed.ready:
            return
        feed.epoch, feed.offset = position
        feed.ready = True
        self.handler.subscribed(name, position)
        held, feed.held = feed.held, []
        for publication in sorted(held, key=lambda p: p.offset):
            self.deliver(name, publication)

    def failed(self, name: str, error: ClientError) -> None:
        if self._feeds.pop(name, None) is not None:
            self.handler.unavailable(name, error)

    def forget(self, name: str) -> None:
        self._feeds.pop(name, None)

    # Delivering

    def deliver(self, name: str, publication: Publication) -> None:
        """A publication from the engine: handed on if it is the next one, else
        held and the gap repaired."""
        feed = self._feeds.get(name)
        if feed is None:
            return
        if not feed.ready or feed.repairing:
            self._hold(feed, publication)
            return
        if publication.epoch == feed.epoch:
            if publication.offset == feed.offset + 1:
                feed.offset = publication.offset
                self.handler.deliver(name, publication)
                return
            if publication.offset <= feed.offset:
                return  # handed on already (by a repair)
        self._hold(feed, publication)
        self._repair(feed)

    def resubscribed(self, names: list[str]) -> None:
        """The pub/sub connection was made again: anything may have been missed
        meanwhile, so every channel is checked against history."""
        for name in names:
            feed = self._feeds.get(name)
            if feed is not None and feed.ready:
                self._repair(feed)

    def _hold(self, feed: Feed, publication: Publication) -> None:
        held = feed.held
        held.append(publication)
        if len(held) > HELD_MAX:
            del held[: HELD_MAX // 2]

    # Repairing

    def _repair(self, feed: Feed) -> None:
        if not feed.repairing and self._feeds.get(feed.name) is feed:
            feed.repairing = True
            self._background.spawn(self._repair_run(feed))

    async def _repair_run(self, feed: Feed) -> None:
        name = feed.name
        source = self.source
        outcome = None
        try:
            while self._feeds.get(name) is feed:
                history = await source.history(name, feed.offset, REPAIR_PAGE)
                if self._feeds.get(name) is not feed:
                    return
                top = history.top
                if not top.epoch:  # Redis lost the channel: begin it again
                    top = await source.begin(name)
                elif top.epoch == feed.epoch and top.offset < feed.offset:
                    # Redis lost publications it had acknowledged (a crash between
                    # fsyncs, an older snapshot): their offsets would be given out again.
                    top = await source.restart(name, feed.epoch)
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
                            self.handler.deliver(name, publication)
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

    def _release_held(self, feed: Feed) -> None:
        """Hand on what was held while the channel was repaired, in offset order,
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
            self.handler.deliver(feed.name, publication)

    def _resync(self, feed: Feed, position: Position, reason: str) -> None:
        feed.epoch, feed.offset = position
        self.handler.resync(feed.name, position, reason)
