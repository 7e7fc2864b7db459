"""Channels, their subscribers and their offsets; fan-out.

The hub maps each channel to the outboxes subscribed to it, split by the frame
format they want, and counts the channel's offset (1 for the first message,
+1 per message). Fan-out encodes a message once per format and pushes the same
bytes into every outbox without awaiting, so a slow client cannot delay the
others; what happened is returned as counts, once per fan-out.

Channel state is bounded: at most ``max_channels`` are remembered. Channels
without subscribers wait in an oldest-first list and are forgotten first when
room is needed (their offsets then restart at 1).
"""

from __future__ import annotations

from collections.abc import Iterator

from broadcastd.core.envelope import Payload, channel_prefix, envelope_frame, raw_frame
from broadcastd.core.outbox import DROPPED, Outbox
from broadcastd.errors import ChannelTableFull


class Channel:
    """One channel's state."""

    __slots__ = ("json_subscribers", "name", "offset", "prefix", "raw_subscribers")

    def __init__(self, name: str) -> None:
        self.name = name
        self.offset = 0
        self.prefix = channel_prefix(name)
        self.json_subscribers: dict[Outbox, None] = {}
        self.raw_subscribers: dict[Outbox, None] = {}

    @property
    def subscriber_count(self) -> int:
        return len(self.json_subscribers) + len(self.raw_subscribers)


class FanOut:
    """What one publish did: its offset and how many outboxes took it."""

    __slots__ = ("channel", "dropped", "offset", "queued", "refused")

    def __init__(self, channel: str, offset: int) -> None:
        self.channel = channel
        self.offset = offset
        self.queued = 0
        """Outboxes the message was queued in (including those that dropped older ones)."""
        self.dropped = 0
        """Outboxes that dropped older frames to take it (drop_oldest)."""
        self.refused = 0
        """Outboxes that refused it: overflowed just now (disconnect policy) or closing."""


class Hub:
    """Channel -> subscribers. No I/O, never awaits."""

    __slots__ = ("_channels", "_idle", "max_channels", "subscriptions")

    def __init__(self, max_channels: int) -> None:
        self._channels: dict[str, Channel] = {}
        self._idle: dict[str, None] = {}
        """Names of channels without subscribers, least recently used first."""
        self.max_channels = max_channels
        self.subscriptions = 0

    def __len__(self) -> int:
        return len(self._channels)

    def __contains__(self, name: object) -> bool:
        return name in self._channels

    def __iter__(self) -> Iterator[Channel]:
        return iter(self._channels.values())

    def get(self, name: str) -> Channel | None:
        return self._channels.get(name)

    def _channel(self, name: str) -> Channel:
        channel = self._channels.get(name)
        if channel is not None:
            return channel
        if len(self._channels) >= self.max_channels:
            if not self._idle:
                raise ChannelTableFull(
                    f"the server holds {self.max_channels} channels, all with subscribers"
                )
            oldest = next(iter(self._idle))
            del self._idle[oldest]
            del self._channels[oldest]
        channel = self._channels[name] = Channel(name)
        self._idle[name] = None
        return channel

    def subscribe(self, outbox: Outbox, name: str, raw: bool = False) -> int:
        """Add ``outbox`` to channel ``name``; return the channel's current offset.

        Subscribing twice is harmless. ``name`` must already be valid.
        """
        channel = self._channel(name)
        subscribers = channel.raw_subscribers if raw else channel.json_subscribers
        if outbox not in subscribers:
            subscribers[outbox] = None
            self.subscriptions += 1
            self._idle.pop(name, None)
        return channel.offset

    def unsubscribe(self, outbox: Outbox, name: str) -> bool:
        """Remove ``outbox`` from channel ``name``; False if it was not subscribed."""
        channel = self._channels.get(name)
        if channel is None:
            return False
        if (
            channel.json_subscribers.pop(outbox, False) is False
            and channel.raw_subscribers.pop(outbox, False) is False
        ):
            return False
        self.subscriptions -= 1
        if not channel.subscriber_count:
            self._idle[name] = None
        return True

    def publish(self, name: str, payload: Payload) -> FanOut:
        """Give ``payload`` the channel's next offset and push it to every subscriber."""
        channel = self._channels.get(name)
        if channel is None:
            channel = self._channel(name)
        elif name in self._idle:
            # Keep recently used idle channels (and their offsets) the longest.
            del self._idle[name]
            self._idle[name] = None
        channel.offset += 1
        result = FanOut(name, channel.offset)
        if channel.json_subscribers:
            frame = envelope_frame(channel.prefix, channel.offset, payload)
            self._push(frame, channel.json_subscribers, result)
        if channel.raw_subscribers:
            self._push(raw_frame(payload), channel.raw_subscribers, result)
        return result

    @staticmethod
    def _push(frame: bytes, subscribers: dict[Outbox, None], result: FanOut) -> None:
        refused = 0
        for outbox in subscribers:
            status = outbox.push(frame)
            if status:  # rare: DROPPED or REFUSED
                if status == DROPPED:
                    result.dropped += 1
                else:
                    refused += 1
        result.queued += len(subscribers) - refused
        result.refused += refused
