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
import base64
import os
from collections.abc import Callable, Iterable, Sequence

from broadcastd.broker import BrokerHandler, Health, History, HistoryStats, Published
from broadcastd.core.idempotency import Idempotency
from broadcastd.core.namespaces import Namespaces
from broadcastd.core.publish_forms import Item
from broadcastd.core.stream import Position, Streams
from broadcastd.errors import ClientError
from broadcastd.settings import Settings

SWEEP_INTERVAL = 1.0
"""Seconds between sweeps of expired history (each costs O(entries expired))."""


def new_epoch() -> str:
    """Eight characters from 40 random bits (lower-case base32)."""
    return base64.b32encode(os.urandom(5)).decode().lower()


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
            new_epoch=new_epoch,
            clock=clock,
        )
        self.keys = Idempotency(
            settings.publish.idempotency_ttl, settings.publish.idempotency_max_keys, clock
        )
        self._handler: BrokerHandler | None = None
        self._sweeper: asyncio.TimerHandle | None = None

    async def start(self, handler: BrokerHandler) -> None:
        self._handler = handler
        self._sweep()

    def _sweep(self) -> None:
        self.streams.expire()
        self._sweeper = asyncio.get_running_loop().call_later(SWEEP_INTERVAL, self._sweep)

    def publish(self, items: Sequence[Item]) -> list[Published | ClientError]:
        handler = self._handler
        assert handler is not None, "publish before start"
        deliver = handler.deliver
        append = self.streams.append
        keys = self.keys
        results: list[Published | ClientError] = []
        for channel, payload, key in items:
            if key is not None:
                first = keys.get(channel, key)
                if first is not None:
                    results.append(Published(first, None, True))
                    continue
            try:
                publication = append(channel, payload)
            except ClientError as exc:  # this item alone (a full channel table)
                results.append(exc)
                continue
            position = Position(publication.epoch, publication.offset)
            if key is not None:
                keys.put(channel, key, position)
            results.append(Published(position, deliver(channel, publication)))
        return results

    def has_room_for(self, channels: list[str]) -> bool:
        return self.streams.has_room_for(channels)

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

    @property
    def health(self) -> Health:
        return Health(True)

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        self._handler = None
