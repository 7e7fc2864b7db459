"""What a subscription stream yields: messages, and events about the stream.

A :class:`Message` is one published message. Everything else is an
:class:`Event`, a typed form of a reply or event frame of the daemon (see the
README's "What the server sends") or a change of the connection's state. Each
event that came from the daemon keeps the frame as received in ``frame``, so a
program can log or forward it without encoding it again.

Three events say that messages were lost and the program may need to reload
state: :class:`Recovered` with ``recovered`` False, :class:`Resync` and
:class:`Missed`. A stream never drops those silently (see
:meth:`broadcastd.client.Subscriber.subscribe`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, NamedTuple

import msgspec


class Position(NamedTuple):
    """Where a channel's stream stands: ``epoch`` names one continuous life of the
    channel's count, ``offset`` the last message seen in it (0: none yet)."""

    epoch: str
    offset: int


class Message(msgspec.Struct, frozen=True, gc=False):
    """One published message: its channel, its place in that channel's count
    (``epoch`` None only against a daemon that sends no epochs), and ``data``,
    the payload decoded from JSON (integers of any size exact).

    ``frame`` is the frame as received (``{"channel":…,"offset":…,"data":…}``),
    to log or forward without encoding again; it is left out of comparisons and
    of the repr. A msgspec Struct rather than a dataclass: a subscriber makes one
    per message, and a Struct is made in a tenth of the time.
    """

    channel: str
    offset: int
    epoch: str | None
    data: Any
    frame: str = ""

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Message):
            return NotImplemented
        return (self.channel, self.offset, self.epoch, self.data) == (
            other.channel,
            other.offset,
            other.epoch,
            other.data,
        )

    def __repr__(self) -> str:
        return f"Message({self.channel!r}, {self.offset!r}, {self.epoch!r}, {self.data!r})"


@dataclass(frozen=True, slots=True)
class Event:
    """Base of everything a stream yields that is not a :class:`Message`."""

    frame: str = field(default="", repr=False, compare=False, kw_only=True)
    """The daemon's frame as received ("" for events the client makes itself)."""


@dataclass(frozen=True, slots=True)
class Subscribed(Event):
    """A channel is subscribed afresh (not resumed): the next message is
    ``offset + 1``. Comes for the channels of the first connection and for each
    :meth:`~broadcastd.client.Subscriber.add`."""

    channel: str
    epoch: str | None
    offset: int


@dataclass(frozen=True, slots=True)
class Recovered(Event):
    """The outcome of resuming a channel from its last position (after a
    reconnection, or from a ``since`` given to ``subscribe``).

    ``recovered`` True: every message missed meanwhile follows, in order, then
    the live stream; nothing was lost. False: messages published meanwhile are
    gone (``reason``: ``epoch`` after a daemon restart, ``too_old``,
    ``too_many``, ``disabled``, ``position``); the stream goes on with live
    messages after (``epoch``, ``offset``).
    """

    channel: str
    recovered: bool
    reason: str | None
    epoch: str
    offset: int


@dataclass(frozen=True, slots=True)
class Resync(Event):
    """Redis broker only: messages of ``channel`` were lost (``reason`` ``gap``)
    or its count restarted (``epoch``); it goes on after (``epoch``, ``offset``)."""

    channel: str
    epoch: str
    offset: int
    reason: str


@dataclass(frozen=True, slots=True)
class Missed(Event):
    """``count`` messages were dropped for this client because it read too slowly
    (``drop_oldest`` policy: ``channel`` None; ``conflate``: the channel)."""

    channel: str | None
    count: int


@dataclass(frozen=True, slots=True)
class Unsubscribed(Event):
    """A :meth:`~broadcastd.client.Subscriber.remove` took effect."""

    channel: str


@dataclass(frozen=True, slots=True)
class Join(Event):
    """Another client subscribed to ``channel`` (a namespace with ``join_leave``)."""

    channel: str
    client: str
    user: str | None


@dataclass(frozen=True, slots=True)
class Leave(Event):
    """Another client left ``channel``: once per join, even if its node died."""

    channel: str
    client: str
    user: str | None


@dataclass(frozen=True, slots=True)
class Authenticated(Event):
    """A token was accepted: at connect (``op`` "connect") or by a refresh."""

    user: str | None
    expires: int | None
    op: str


@dataclass(frozen=True, slots=True)
class Expiring(Event):
    """The token expires at ``expires`` (Unix time). With ``get_token`` the
    subscriber refreshes it by itself; without, the daemon closes the connection
    (4003) then."""

    expires: int


@dataclass(frozen=True, slots=True)
class CommandFailed(Event):
    """The daemon refused a command: ``op`` ``subscribe`` (for ``channel``; None
    when a channel of the connection URL was refused and which one cannot be
    told), ``refresh``, or ``connect`` (the token given at connect; the close
    that follows ends or restarts the connection). ``retrying``: the subscriber
    will send it again by itself (``broker_unavailable``)."""

    op: str | None
    channel: str | None
    code: str
    message: str
    retrying: bool = False


class State(StrEnum):
    """The connection's state, as told by :class:`StateChanged`."""

    CONNECTING = "connecting"
    CONNECTED = "connected"
    DISCONNECTED = "disconnected"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class StateChanged(Event):
    """The connection changed state.

    ``DISCONNECTED`` tells why: ``close_code`` when an open connection ended (the
    daemon's close code, 1006 when none came, or 1009 when this client closed it
    for a message larger than its ``max_size``), ``error`` when an attempt failed
    (an ``OSError``, a handshake refused with a
    :class:`~broadcastd.client.BroadcastdError`) or when the close is final
    (:class:`~broadcastd.client.ClosedByServer`,
    :class:`~broadcastd.client.MessageTooBig`); and
    ``retry_in``, the seconds before the next attempt, or None when there will be
    none (the stream then raises ``error``). ``CLOSED`` is the end of the stream.
    """

    state: State
    close_code: int | None = None
    error: BaseException | None = None
    retry_in: float | None = None


@dataclass(frozen=True, slots=True)
class Other(Event):
    """A frame of a type this client does not know (``pong``, or one a newer
    daemon sends): ``kind`` its ``type`` (None for a frame that is not a JSON
    object with one), ``fields`` the whole decoded object."""

    kind: str | None
    fields: dict[str, Any]


LOSSES = (Recovered, Resync, Missed)
"""The events that report lost messages (a Recovered only when not recovered)."""

DEFAULT_EVENTS: frozenset[type[Event]] = frozenset((Recovered, Resync, Missed, CommandFailed))
"""What a stream yields besides messages unless told otherwise: whatever reports a
loss or a refusal."""

ALL_EVENTS: frozenset[type[Event]] = frozenset(
    (
        Join,
        Leave,
        Subscribed,
        Recovered,
        Resync,
        Missed,
        Unsubscribed,
        Authenticated,
        Expiring,
        CommandFailed,
        StateChanged,
        Other,
    )
)
"""Every event type: what a program that shows everything (the CLI) asks for."""
