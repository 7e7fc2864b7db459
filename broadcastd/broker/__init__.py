"""The engine seam: one interface for every broker, and the handler it calls back.

A broker (an engine) assigns stream positions, keeps history and carries
publications to every node; the node holds one and calls it one way, whichever
runs (ARCHITECTURE.md, "The engine seam"). The memory engine lives in this
process and answers at once; the Redis engine is a round trip away and answers
later. Both deliver through the same ``BrokerHandler``, so the path after the
engine is one path, and the node never asks which engine it holds.

The shape, and why, chosen by measurement (ARCHITECTURE.md, "The engine seam"):

- A call that may need a round trip returns its answer, or an awaitable of it
  (``MaybeAwaitable``), and ``then`` chains what to do with it. On the memory
  engine the answer is there at once and the chain runs in the caller's own
  step: no task, no future, no event-loop turn on the hot path (a publish, a
  subscribe in a connection storm), which an awaitable everywhere would cost
  the memory engine on every call. On Redis the same call site waits.
- ``publish`` takes one item, as centrifuge's ``Broker.Publish`` does; a batch
  is a loop over it. A list-shaped publish cost the memory engine's single
  publish about 1 µs of list building and scanning per call (in process: 12.3
  against 11.0 µs per control request).
- The pending form of a publish is a ``broadcastd.later.Later``, whose steps run
  as Redis's reply is read: a task and a chain of coroutines per publish cost
  the Redis node about a fifth of its CPU per publish (py-spy, benchmark S3).

Ordering is the engine's promise: ``deliver`` hands the node each channel's
publications in offset order from the position ``subscribed`` told, none twice
and none skipped; where a gap cannot be filled, ``resync`` says where the
channel continues. The gap tracking that keeps this promise over Redis's
pub/sub lives beside that engine (``broadcastd.broker.feeds``).
"""

from __future__ import annotations

import asyncio
import inspect
import types
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, NamedTuple, Protocol, TypeAlias, TypeGuard, TypeVar, cast

from broadcastd.core.envelope import Payload
from broadcastd.core.hub import FanOut
from broadcastd.core.presence import PresencePage, PresenceStats
from broadcastd.core.stream import Position, Publication
from broadcastd.errors import ClientError
from broadcastd.later import Later

T = TypeVar("T")
U = TypeVar("U")

MaybeAwaitable: TypeAlias = T | Awaitable[T]
"""An engine's answer: the value at once (memory), or an awaitable of it (Redis)."""


def pending(answer: MaybeAwaitable[T]) -> TypeGuard[Awaitable[T]]:
    """Whether an engine's answer is still to come. An engine answers later with a
    Later (a publish), a coroutine or a future; checking those types first keeps
    the test cheap on the memory engine's hot path (``inspect.isawaitable`` alone
    asks an ABC)."""
    return isinstance(answer, _AWAITABLES) or (
        type(answer) not in _VALUES and inspect.isawaitable(answer)
    )


_AWAITABLES = (Later, types.CoroutineType, asyncio.Future)


def then(
    answer: MaybeAwaitable[T],
    step: Callable[[T], MaybeAwaitable[U]],
    failed: Callable[[BaseException], MaybeAwaitable[U]] | None = None,
) -> MaybeAwaitable[U]:
    """``step`` applied to ``answer``: at once if it is there, else once it comes;
    or, if it fails, ``failed`` applied to the exception (without ``failed`` the
    exception passes on). A Later runs the step the moment it is set; a
    coroutine or a future is awaited (by whoever awaits what this returns)."""
    if not pending(answer):
        return step(cast(T, answer))
    if isinstance(answer, Later):
        return answer.then(step, failed)
    later = answer

    async def chained() -> U:
        try:
            value = await later
        except Exception as exc:
            if failed is None:
                raise
            result = failed(exc)
        else:
            result = step(value)
        if inspect.isawaitable(result):
            return await result
        return result

    return chained()


class Published(NamedTuple):
    """What one publish did."""

    position: Position
    fan_out: FanOut | None
    """The local fan-out, when the engine delivered inside publish (memory)."""
    duplicate: bool = False
    """The idempotency key was seen before: nothing was published, ``position``
    is the first publish's."""


class History(NamedTuple):
    """Publications of a channel after a position, and its latest position."""

    top: Position
    publications: list[Publication] | None
    """Oldest first; None when history no longer reaches back that far (or is off)."""


_VALUES = frozenset(
    (list, tuple, type(None), int, Position, History, Published, PresencePage, PresenceStats)
)
"""Answers that are values, told apart at once."""


class HistoryStats(NamedTuple):
    """What the engine keeps in this process, for metrics; evictions count since start."""

    entries: int = 0
    bytes: int = 0
    evicted_size: int = 0
    evicted_ttl: int = 0
    evicted_budget: int = 0
    forgotten: int = 0


class Health(NamedTuple):
    up: bool
    reason: str = ""


class BrokerHandler(Protocol):
    """What an engine calls back: the node."""

    def subscribed(self, channel: str, position: Position) -> None:
        """``subscribe(channel)`` holds: every publication after ``position`` will
        be delivered (called before any of them is)."""

    def unavailable(self, channel: str, error: ClientError) -> None:
        """``subscribe(channel)`` could not be made (the engine is unreachable)."""

    def deliver(self, channel: str, publication: Publication) -> FanOut:
        """The channel's next publication: fan it out to the local subscribers."""

    def resync(self, channel: str, position: Position, reason: str) -> None:
        """What the channel's subscribers missed cannot be had (``gap``), or its
        count restarted (``epoch``): it continues after ``position``."""

    @property
    def id(self) -> str:
        """The node's id: presence entries and control answers name it."""

    def presence_event(self, channel: str, kind: str, client: str, user: str | None) -> None:
        """``client`` joined or left ``channel`` (on any node): tell the local
        subscribers (not the client itself)."""

    def execute(self, command: dict[str, Any]) -> dict[str, Any]:
        """A server API command (from any node, this one included): carry it out on
        this node's connections and answer (JSON-able)."""


class Broker(Protocol):
    """An engine: memory (this process) or Redis (every node)."""

    async def start(self, handler: BrokerHandler) -> None:
        """Begin calling ``handler`` back."""

    def publish(
        self, channel: str, payload: Payload, key: str | None
    ) -> Published | Later[Published]:
        """Give the payload the channel's next position (or, for an idempotency key
        seen before, answer the first publish's position): at once, or as a Later
        set when the engine answers. A refusal known at once is raised:
        ChannelTableFull for this item alone, BrokerUnavailable (503) when the
        engine cannot be reached; a Later fails with BrokerUnavailable when the
        engine did not confirm the publish (then it is not known whether it was
        published)."""

    def refusal(self, channels: Sequence[str]) -> ClientError | None:
        """What publishing to every one of ``channels`` now would meet at once, if
        anything: BrokerUnavailable, else ChannelTableFull. Asked before a call of
        many items, so that it is refused whole or not at all."""

    def subscribe(self, channel: str) -> None:
        """This node gained its first subscriber of ``channel``: the engine answers
        through ``subscribed`` or ``unavailable`` (at once, or after a round
        trip). A refusal known at once (a full channel table) is raised."""

    def unsubscribe(self, channel: str) -> None:
        """This node lost its last subscriber of ``channel``."""

    def history(self, channel: str, since: int, limit: int) -> MaybeAwaitable[History]:
        """Up to ``limit`` publications after offset ``since``."""

    def latest(self, channel: str, count: int) -> MaybeAwaitable[History]:
        """The last ``count`` publications kept."""

    def position(self, channel: str) -> MaybeAwaitable[Position | None]:
        """The channel's latest position, if the engine knows the channel."""

    def channels(self) -> Iterable[tuple[str, Position]]:
        """The channels this engine holds here, with their latest position known
        here (memory: every stream; Redis: those this node subscribes to)."""

    def stats(self) -> HistoryStats:
        """What this engine keeps in this process."""

    # Presence: entries per channel per connection, with a time to live the
    # engine enforces; whoever removes an entry announces its leave.

    def add_presence(self, channel: str, client: str, user: str | None, entry: bytes) -> None:
        """``client`` subscribed to ``channel``: keep its entry (and announce its join
        where the namespace has ``join_leave``) until ``remove_presence``, or, should
        this node stop refreshing it, for ``presence.ttl``. Fire and forget: an
        engine that cannot be reached now keeps trying."""

    def remove_presence(self, channel: str, client: str) -> None:
        """``client`` left ``channel``: remove its entry (announcing the leave), if
        there is one."""

    def presence(self, channel: str, after: str | None, limit: int) -> MaybeAwaitable[PresencePage]:
        """Up to ``limit`` entries of ``channel`` after client id ``after`` (every node's)."""

    def presence_stats(self, channel: str) -> MaybeAwaitable[PresenceStats]:
        """Clients and distinct users of ``channel``, without reading every entry."""

    def presence_count(self, channel: str) -> int:
        """Entries of ``channel`` as known here without a round trip: exact on
        memory, as of Redis's last answer on Redis."""

    # Control: server API commands that reach every node.

    def command(self, command: dict[str, Any]) -> MaybeAwaitable[list[dict[str, Any]]]:
        """Carry ``command`` out on every node (``BrokerHandler.execute``): their
        answers, this node's included; a node that does not answer within the
        engine's deadline is left out."""

    @property
    def health(self) -> Health: ...

    async def close(self) -> None: ...
