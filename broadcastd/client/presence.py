"""What presence and the server API answer: pages of entries and counts.

An entry is kept as the daemon's JSON object (a ``dict``): presence entries are
``{"client", "user", "node", "connected_at"}`` with ``info`` when the token
carries that claim, connections add ``remote``, ``channels`` and
``transport``. Kept whole rather than typed field by field, so that a field a
newer daemon adds reaches the program, and ``broadcastd presence`` prints each
entry as the daemon sent it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class PresencePage:
    """A page of a channel's presence entries, in client-id order; ``next`` is
    the cursor of the next page (None on the last one)."""

    channel: str
    clients: tuple[dict[str, Any], ...]
    next: str | None


@dataclass(frozen=True, slots=True)
class PresenceStats:
    """How many connections subscribe to ``channel`` (``clients``) and how many
    distinct users they are (``users``; a connection without a token is no user)."""

    channel: str
    clients: int
    users: int


@dataclass(frozen=True, slots=True)
class ConnectionPage:
    """A page of open connections, of every node, in client-id order; ``next``
    is the cursor of the next page (None on the last one)."""

    connections: tuple[dict[str, Any], ...]
    next: str | None


def presence_page(doc: Any) -> PresencePage:
    return PresencePage(str(doc["channel"]), tuple(doc["clients"]), _cursor(doc["next"]))


def presence_stats(doc: Any) -> PresenceStats:
    return PresenceStats(str(doc["channel"]), int(doc["clients"]), int(doc["users"]))


def connection_page(doc: Any) -> ConnectionPage:
    return ConnectionPage(tuple(doc["connections"]), _cursor(doc["next"]))


def _cursor(value: Any) -> str | None:
    if value is None or type(value) is str:
        return value
    raise TypeError(f"a cursor is a string or null, not {value!r}")
