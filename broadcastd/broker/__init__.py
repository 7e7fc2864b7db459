"""Brokers assign stream positions and carry publications to every node.

The seam (DESIGN.md, "Broker seam"): the node hands a publication to the
broker, which gives it the channel's next position and delivers it back, through
``deliver``, to every node with local subscribers of the channel. The node
never invents an offset, and the publish path after the broker is the same on
one node (MemoryBroker, which delivers synchronously inside ``publish``) and on
many.

``subscribe``/``unsubscribe`` are called for a node's first and last local
subscriber of a channel; ``history`` reads what the broker keeps of a channel,
for recovery and the control API.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple, Protocol

from broadcastd.core.envelope import Payload
from broadcastd.core.hub import FanOut
from broadcastd.core.publication import Item
from broadcastd.core.stream import Position, Publication

Deliver = Callable[[str, Publication], FanOut]


class Published(NamedTuple):
    """What one publish did."""

    position: Position
    fan_out: FanOut | None
    """The local fan-out, when the broker delivered inside publish (memory)."""
    duplicate: bool = False
    """The idempotency key was seen before: nothing was published, ``position``
    is the first publish's."""


class History(NamedTuple):
    """Publications of a channel after a position, and its latest position."""

    top: Position
    publications: list[Publication] | None
    """Oldest first; None when history no longer reaches back that far (or is off)."""


class HistoryStats(NamedTuple):
    """What the broker keeps here, for metrics; evictions count since start."""

    entries: int = 0
    bytes: int = 0
    evicted_size: int = 0
    evicted_ttl: int = 0
    evicted_budget: int = 0
    forgotten: int = 0


class Health(NamedTuple):
    up: bool
    reason: str = ""


class Broker(Protocol):
    async def start(self, deliver: Deliver) -> None:
        """Begin delivering publications to ``deliver``."""

    def publish(self, channel: str, payload: Payload, key: str | None = None) -> Published:
        """Give ``payload`` the channel's next position (or, for an idempotency
        ``key`` seen before, answer the first publish's position)."""

    def has_room_for(self, channels: list[str]) -> bool:
        """Whether publishing to all of ``channels`` would be refused for none."""

    def subscribe(self, channel: str) -> Position:
        """This node gained its first subscriber of ``channel``; its position now."""

    def unsubscribe(self, channel: str) -> None:
        """This node lost its last subscriber of ``channel``."""

    def history(self, channel: str, since: int, limit: int) -> History:
        """Up to ``limit`` publications after offset ``since``."""

    def latest(self, channel: str, count: int) -> History:
        """The last ``count`` publications kept."""

    def position(self, channel: str) -> Position | None:
        """The channel's latest position, if the broker holds it here."""

    def channels(self) -> Iterable[str]:
        """The channels whose streams this broker holds here (for listings)."""

    def history_stats(self) -> HistoryStats: ...

    @property
    def health(self) -> Health: ...

    async def close(self) -> None: ...


class RemoteBroker(Protocol):
    """A broker in another process (Redis): every call that asks it something is a
    round trip, and publications reach this node later, through ``deliver``.

    Failures to reach it are BrokerUnavailable (HTTP 503, code
    ``broker_unavailable``), raised within its configured timeout.
    """

    async def start(
        self, deliver: Callable[[str, Publication], None], resubscribed: Callable[[list[str]], None]
    ) -> None:
        """Begin (in the background) delivering this node's channels to ``deliver``;
        ``resubscribed`` hears, after each reconnection, which channels may have
        missed publications."""

    async def publish(self, items: Sequence[Item]) -> list[Published]:
        """Publish every item; answered once the broker has accepted all of them."""

    async def subscribe(self, channel: str) -> Position:
        """Subscribe this node; once confirmed, the channel's position (begun in a
        new epoch if it had none). Every later publication arrives via ``deliver``."""

    def unsubscribe(self, channel: str) -> None: ...

    async def begin(self, channel: str) -> Position:
        """The channel's position, begun in a new epoch if the broker has none."""

    async def restart(self, channel: str, epoch: str) -> Position:
        """Begin a new epoch if the channel is still in ``epoch`` (the broker lost
        acknowledged publications: their offsets must not be given out again)."""

    async def history(self, channel: str, since: int, limit: int) -> History: ...

    async def latest(self, channel: str, count: int) -> History: ...

    async def position(self, channel: str) -> Position | None: ...

    @property
    def health(self) -> Health: ...

    async def close(self) -> None: ...
