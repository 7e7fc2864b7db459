"""The memory engine: positions, history and idempotency keys in this process.

A publication gets its position from the in-process Streams and is delivered to
this node synchronously, inside ``publish``: the fast path stays one call deep,
and the publish response can say how many local subscribers took it. Every
answer of this engine is there at once (``broadcastd.broker`` says why that
matters). A process start begins every channel in a new epoch, so a client
that reconnects after a restart is told its position belongs to another life
of the channel.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from broadcastd.broker import BrokerHandler, Health, History, HistoryStats, Published
from broadcastd.core.envelope import Payload
from broadcastd.core.hub import FanOut
from broadcastd.core.idempotency import Idempotency
from broadcastd.core.namespaces import Namespaces
from broadcastd.core.presence import (
    JOIN,
    LEAVE,
    PresencePage,
    PresenceStats,
    PresenceTable,
)
from broadcastd.core.stream import Position, Publication, Streams
from broadcastd.errors import ChannelTableFull, ClientError
from broadcastd.settings import Settings

SWEEP_INTERVAL = 1.0
"""Seconds between sweeps of expired history (each costs O(entries expired))."""


class Epochs:
    """New epochs: 40 random bits as ten hexadecimal digits.

    The bits come from a generator seeded once per engine from the OS. An epoch
    must differ from the channel's earlier ones, not be secret (it grants
    nothing), and the Redis engine sends a fresh one with every publish (used
    only where the channel must begin again), where a ``getrandom`` system call
    each cost a tenth of the node's time per publish.
    """

    __slots__ = ("_bits",)

    def __init__(self) -> None:
        self._bits = random.Random(os.urandom(16)).getrandbits  # noqa: S311 - see above

    def __call__(self) -> str:
        return f"{self._bits(40):010x}"


def _not_started(channel: str, publication: Publication) -> FanOut:
    raise AssertionError("publish before start")


class MemoryBroker:
    """Channels live in this process only."""

    def __init__(
        self,
        settings: Settings,
        clock: Callable[[], float],
        namespaces: Namespaces | None = None,
    ) -> None:
        history = settings.history
        namespaces = namespaces or Namespaces(settings)
        self.streams = Streams(
            size=namespaces.max_history_size,
            ttl=history.ttl,
            options=lambda name: (namespaces.history_size(name), namespaces.history_ttl(name)),
            max_bytes=history.max_bytes,
            max_streams=settings.channels.max_channels,
            new_epoch=Epochs(),
            clock=clock,
        )
        self.keys = Idempotency(
            settings.publish.idempotency_ttl, settings.publish.idempotency_max_keys, clock
        )
        self.max_channels = settings.channels.max_channels
        self.namespaces = namespaces
        self.presences = PresenceTable()
        """Exact and immediate: the node removes each entry as its client leaves,
        and nothing outlives this process."""
        self._handler: BrokerHandler | None = None
        self._deliver: Callable[[str, Publication], FanOut] = _not_started
        self._sweeper: asyncio.TimerHandle | None = None

    async def start(self, handler: BrokerHandler) -> None:
        self.attach(handler)
        self._sweep()

    def attach(self, handler: BrokerHandler) -> None:
        """Call ``handler`` back from now on (``start`` without the sweeper, which
        needs a running loop: for driving a node in process)."""
        self._handler = handler
        self._deliver = handler.deliver

    def _sweep(self) -> None:
        self.streams.expire()
        self._sweeper = asyncio.get_running_loop().call_later(SWEEP_INTERVAL, self._sweep)

    def publish(self, channel: str, payload: Payload, key: str | None) -> Published:
        keys = self.keys
        if key is not None:
            first = keys.get(channel, key)
            if first is not None:
                return Published(first, None, True)
        publication = self.streams.append(channel, payload)  # ChannelTableFull: this item
        position = Position(publication.epoch, publication.offset)
        if key is not None:
            keys.put(channel, key, position)
        return Published(position, self._deliver(channel, publication))

    def refusal(self, channels: Sequence[str]) -> ClientError | None:
        if self.streams.has_room_for(channels):
            return None
        return ChannelTableFull(
            f"the server holds {self.max_channels} channels, all with subscribers"
        )

    def subscribe(self, channel: str) -> None:
        position = self.streams.pin(channel).position
        assert self._handler is not None, "subscribe before start"
        self._handler.subscribed(channel, position)

    def unsubscribe(self, channel: str) -> None:
        self.streams.unpin(channel)

    def history(self, channel: str, since: int, limit: int) -> History:
        stream = self.streams.get(channel)
        if stream is None:
            return History(Position("", 0), None)
        return History(stream.position, self.streams.since(channel, since, limit))

    def latest(self, channel: str, count: int) -> History:
        stream = self.streams.get(channel)
        if stream is None:
            return History(Position("", 0), [])
        return History(stream.position, self.streams.latest(channel, count))

    def position(self, channel: str) -> Position | None:
        stream = self.streams.get(channel)
        return None if stream is None else stream.position

    def channels(self) -> Iterable[tuple[str, Position]]:
        return ((stream.name, stream.position) for stream in self.streams)

    def stats(self) -> HistoryStats:
        streams = self.streams
        evicted = streams.evicted
        return HistoryStats(
            streams.entries,
            streams.bytes,
            evicted.size,
            evicted.ttl,
            evicted.budget,
            evicted.channels,
        )

    def add_presence(self, channel: str, client: str, user: str | None, entry: bytes) -> None:
        new, count = self.presences.add(channel, client, user, entry)
        if new and self._announces(channel, count):
            assert self._handler is not None, "presence before start"
            self._handler.presence_event(channel, JOIN, client, user)

    def remove_presence(self, channel: str, client: str) -> None:
        found, user, count = self.presences.remove(channel, client)
        if found and self._handler is not None and self._announces(channel, count):
            self._handler.presence_event(channel, LEAVE, client, user)

    def _announces(self, channel: str, count: int) -> bool:
        """Whether a join or leave on ``channel`` with ``count`` entries is told."""
        options = self.namespaces.of(channel)
        return options.join_leave and count <= options.join_leave_max

    def presence(self, channel: str, after: str | None, limit: int) -> PresencePage:
        return self.presences.page(channel, after, limit)

    def presence_stats(self, channel: str) -> PresenceStats:
        return self.presences.stats(channel)

    def presence_count(self, channel: str) -> int:
        return self.presences.count(channel)

    def command(self, command: dict[str, Any]) -> list[dict[str, Any]]:
        assert self._handler is not None, "command before start"
        return [self._handler.execute(command)]

    @property
    def health(self) -> Health:
        return Health(True)

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        self._handler = None
        self._deliver = _not_started
