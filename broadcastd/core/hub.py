"""The channels this node has subscribers for, and fan-out.

The hub maps each channel with local subscribers to their outboxes, split by
the form they read messages in (``core.forms``), and remembers the last
position delivered to them, which is what a new subscriber is told. Positions
come from the broker: the hub never counts. Fan-out pushes a publication's one
encoding (per form in use) into every outbox without awaiting, so a slow
client cannot delay the others; what happened is returned as counts, once per
fan-out.

A channel leaves the hub with its last local subscriber; its stream (position
and history) is the broker's to keep or forget.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeAlias

from broadcastd.core.forms import Form
from broadcastd.core.outbox import DROPPED, Budget, Outbox
from broadcastd.core.stream import Position, Publication
from broadcastd.settings import SlowConsumerPolicy

Delivery: TypeAlias = tuple[SlowConsumerPolicy | None, Budget | None]


class Channel:
    """One channel's local subscribers and the last position delivered to them."""

    __slots__ = (
        "budget",
        "epoch",
        "forms",
        "name",
        "offset",
        "policy",
        "recovering",
        "subscriber_count",
    )

    def __init__(
        self,
        name: str,
        position: Position,
        policy: SlowConsumerPolicy | None = None,
        budget: Budget | None = None,
    ) -> None:
        self.name = name
        self.epoch, self.offset = position
        self.forms: dict[Form, dict[Outbox, None]] = {}
        """Its subscribers by the form they read (only forms in use are keys)."""
        self.subscriber_count = 0
        self.policy = policy
        """Its namespace's slow-consumer policy; None: each subscriber's own."""
        self.budget = budget
        """Its namespace's share of each outbox (set only with a policy)."""
        self.recovering: set[Any] = set()
        """Subscribers reading what they missed before they join (the node's): the
        channel stays while any does, even with no subscriber left."""

    def outboxes(self, events: bool = False) -> list[Outbox]:
        """Its subscribers' outboxes; ``events``: only those told events that are
        not messages (``Form.reads_events``)."""
        return [
            outbox
            for form, subscribers in self.forms.items()
            if form.reads_events or not events
            for outbox in subscribers
        ]

    @property
    def position(self) -> Position:
        return Position(self.epoch, self.offset)


class FanOut:
    """What one delivery did: how many outboxes took it."""

    __slots__ = ("dropped", "queued", "refused")

    def __init__(self) -> None:
        self.queued = 0
        """Outboxes the message was queued in (including those that dropped older ones)."""
        self.dropped = 0
        """Outboxes that dropped older frames to take it (drop_oldest)."""
        self.refused = 0
        """Outboxes that refused it: overflowed just now (disconnect policy) or closing."""


class Hub:
    """Channel -> local subscribers. No I/O, never awaits."""

    __slots__ = ("_channels", "_delivery_of", "subscriptions")

    def __init__(self, delivery_of: Callable[[str], Delivery] = lambda name: (None, None)) -> None:
        self._channels: dict[str, Channel] = {}
        self._delivery_of = delivery_of
        """Channel name -> its namespace's policy and budget (a budget comes with a
        policy: the server's, if the namespace sets none)."""
        self.subscriptions = 0

    def __len__(self) -> int:
        return len(self._channels)

    def __contains__(self, name: object) -> bool:
        return name in self._channels

    def __iter__(self) -> Iterator[Channel]:
        return iter(self._channels.values())

    def get(self, name: str) -> Channel | None:
        return self._channels.get(name)

    def add(self, name: str, position: Position) -> Channel:
        """A channel gains its first local subscriber, at ``position``."""
        channel = self._channels[name] = Channel(name, position, *self._delivery_of(name))
        return channel

    def join(self, channel: Channel, outbox: Outbox, form: Form) -> None:
        """Add ``outbox`` to ``channel``, reading ``form``; joining twice is harmless
        (an outbox reads one form per channel: the one it joined with first)."""
        forms = channel.forms
        for joined in forms.values():
            if outbox in joined:
                return
        subscribers = forms.get(form)
        if subscribers is None:
            subscribers = forms[form] = {}
        subscribers[outbox] = None
        channel.subscriber_count += 1
        self.subscriptions += 1

    def leave(self, outbox: Outbox, name: str) -> bool:
        """Remove ``outbox`` from channel ``name``; True when that was the channel's
        last local subscriber (the channel is then gone from the hub)."""
        channel = self._channels.get(name)
        if channel is None:
            return False
        for form, subscribers in channel.forms.items():
            if outbox in subscribers:
                del subscribers[outbox]
                if not subscribers:
                    del channel.forms[form]
                break
        else:
            return False
        channel.subscriber_count -= 1
        self.subscriptions -= 1
        if channel.subscriber_count or channel.recovering:
            return False
        del self._channels[name]
        return True

    def forget_if_idle(self, channel: Channel) -> bool:
        """Remove ``channel`` if nobody subscribes to it or recovers into it any
        more; True if it went."""
        if (
            self._channels.get(channel.name) is not channel
            or channel.subscriber_count
            or channel.recovering
        ):
            return False
        del self._channels[channel.name]
        return True

    def deliver(self, name: str, publication: Publication) -> FanOut:
        """Push ``publication`` to every local subscriber of channel ``name``."""
        result = FanOut()
        channel = self._channels.get(name)
        if channel is None:
            return result
        channel.epoch = publication.epoch
        channel.offset = publication.offset
        if channel.policy is not None:
            self._push_as(channel, publication, result)
            return result
        for form, subscribers in channel.forms.items():
            self._push(publication.encoded(form), subscribers, result)
        return result

    @staticmethod
    def _push_as(channel: Channel, publication: Publication, result: FanOut) -> None:
        """The fan-out of a channel whose namespace sets the slow-consumer policy or
        outbox bounds (``conflate`` and budgets need the channel of each queued frame)."""
        policy = channel.policy
        assert policy is not None
        name, budget = channel.name, channel.budget
        for form, subscribers in channel.forms.items():
            frame = publication.encoded(form)
            for outbox in subscribers:
                status = outbox.push_to(frame, name, policy, budget)
                if status == DROPPED:
                    result.dropped += 1
                    result.queued += 1
                elif status:
                    result.refused += 1
                else:
                    result.queued += 1

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


def page(names: Iterable[str], after: str | None, limit: int) -> tuple[list[str], str | None]:
    """Up to ``limit`` of ``names`` in name order, those after ``after``; and the
    cursor of the next page (the last name given), or None if none remain.

    Name order keeps a walk stable while channels come and go: a channel created
    during it shows up if its name sorts after the cursor. A page costs
    O(n log limit), with no index to keep on the publish path.
    """
    if after is not None:
        names = (name for name in names if name > after)
    first = heapq.nsmallest(limit + 1, names)
    more = len(first) > limit
    chosen = first[:limit]
    return chosen, (chosen[-1] if more and chosen else None)
