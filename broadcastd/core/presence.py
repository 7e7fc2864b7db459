"""Presence: who subscribes to a channel, and the join and leave events.

A channel of a namespace with ``presence`` or ``join_leave`` keeps one entry
per subscribed connection, ``{"client", "user", "node", "connected_at"}`` (and
``info`` when the token carries that claim), encoded once per connection. The
engine keeps the entries (``broadcastd.broker``): in this process on the memory
engine, in Redis with a time to live each node refreshes on the Redis engine.
Whoever removes an entry announces the leave, so a leave is told exactly once
per entry, even when the node that held the connection died.

Pages are in client-id order, the cursor being the last client id given: a
walk stays stable while clients come and go (one that arrives during it shows
up if its id sorts after the cursor), and needs no index on the subscribe path.
Stats count clients and distinct users (anonymous clients count as clients,
not as users).

``PresenceTable`` is the memory engine's store, and the model the Redis
engine's scripts are tested against.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator
from typing import Any, NamedTuple

import orjson

from broadcastd.core.envelope import Reply, reply_frame
from broadcastd.errors import BadCommand

JOIN = "join"
LEAVE = "leave"
MAX_CURSOR_LENGTH = 128
"""A cursor is a client id: far shorter than this."""


class PresencePage(NamedTuple):
    """Entries of a channel after a cursor, in client-id order."""

    clients: list[bytes]
    """Each entry's JSON text."""
    next: str | None
    """The cursor of the next page; None when this is the last."""


class PresenceStats(NamedTuple):
    clients: int
    users: int
    """Distinct users among the clients (anonymous ones are not users)."""


def entry_json(
    client: str, user: str | None, node: str, connected_at: float, info: Any = None
) -> bytes:
    """One connection's presence entry, encoded once for every channel it joins."""
    entry: dict[str, Any] = {
        "client": client,
        "user": user,
        "node": node,
        "connected_at": int(connected_at),
    }
    if info is not None:
        entry["info"] = info
    return orjson.dumps(entry)


def event_frame(kind: str, channel: str, client: str, user: str | None) -> Reply:
    """A join or leave event: no offset, not in history, never dropped or
    conflated (it is a Reply frame), encoded once per event per node."""
    return reply_frame({"type": kind, "channel": channel, "client": client, "user": user})


def check_cursor(value: object) -> str | None:
    """A presence cursor as given by a client (a client id from an earlier page)."""
    if value is None:
        return None
    if not isinstance(value, str) or not 0 < len(value) <= MAX_CURSOR_LENGTH:
        raise BadCommand(
            f"cursor must be a string of at most {MAX_CURSOR_LENGTH} characters "
            "(the next of an earlier page)"
        )
    return value


def page_of(
    clients: Iterator[str] | list[str], after: str | None, limit: int
) -> tuple[list[str], str | None]:
    """Up to ``limit`` client ids after ``after``, in order; and the next cursor."""
    if after is not None:
        clients = (client for client in clients if client > after)
    first = heapq.nsmallest(limit + 1, clients)
    chosen = first[:limit]
    return chosen, (chosen[-1] if len(first) > limit and chosen else None)


class ChannelPresence:
    """One channel's entries: client id -> (user, entry JSON), and users' counts."""

    __slots__ = ("entries", "users")

    def __init__(self) -> None:
        self.entries: dict[str, tuple[str | None, bytes]] = {}
        self.users: dict[str, int] = {}

    def add(self, client: str, user: str | None, entry: bytes) -> bool:
        """Add or replace ``client``'s entry; True if it is new."""
        new = client not in self.entries
        self.entries[client] = (user, entry)
        if new and user is not None:
            self.users[user] = self.users.get(user, 0) + 1
        return new

    def remove(self, client: str) -> tuple[bool, str | None]:
        """Remove ``client``'s entry: whether it was there, and its user."""
        found = self.entries.pop(client, None)
        if found is None:
            return False, None
        user = found[0]
        if user is not None:
            left = self.users[user] - 1
            if left:
                self.users[user] = left
            else:
                del self.users[user]
        return True, user

    def page(self, after: str | None, limit: int) -> PresencePage:
        chosen, cursor = page_of(iter(self.entries), after, limit)
        entries = self.entries
        return PresencePage([entries[client][1] for client in chosen], cursor)

    def stats(self) -> PresenceStats:
        return PresenceStats(len(self.entries), len(self.users))


class PresenceTable:
    """Every channel's entries in this process."""

    __slots__ = ("_channels", "bytes", "entries")

    def __init__(self) -> None:
        self._channels: dict[str, ChannelPresence] = {}
        self.entries = 0
        self.bytes = 0
        """What the entries hold (their JSON), for the memory budget's report."""

    def add(self, channel: str, client: str, user: str | None, entry: bytes) -> tuple[bool, int]:
        """Whether the entry is new, and the channel's entry count after."""
        presence = self._channels.get(channel)
        if presence is None:
            presence = self._channels[channel] = ChannelPresence()
        old = presence.entries.get(client)
        new = presence.add(client, user, entry)
        if new:
            self.entries += 1
        else:
            assert old is not None
            self.bytes -= len(old[1])
        self.bytes += len(entry)
        return new, len(presence.entries)

    def remove(self, channel: str, client: str) -> tuple[bool, str | None, int]:
        """Whether the entry was there, its user, and the count before it left."""
        presence = self._channels.get(channel)
        if presence is None:
            return False, None, 0
        count = len(presence.entries)
        entry = presence.entries.get(client)
        found, user = presence.remove(client)
        if found:
            assert entry is not None
            self.entries -= 1
            self.bytes -= len(entry[1])
            if not presence.entries:
                del self._channels[channel]
        return found, user, count

    def page(self, channel: str, after: str | None, limit: int) -> PresencePage:
        presence = self._channels.get(channel)
        return PresencePage([], None) if presence is None else presence.page(after, limit)

    def stats(self, channel: str) -> PresenceStats:
        presence = self._channels.get(channel)
        return PresenceStats(0, 0) if presence is None else presence.stats()

    def count(self, channel: str) -> int:
        presence = self._channels.get(channel)
        return 0 if presence is None else len(presence.entries)
