"""Idempotent publishing: the first position of each (channel, key), for a while.

A publisher that timed out cannot tell whether its message went out; with an
idempotency key it can retry safely: a repeat of a key on the same channel
within ``ttl`` seconds publishes nothing and gets the first publish's position.
Keys are remembered oldest first, at most ``max_keys`` of them, so memory stays
bounded whatever publishers send; a key forgotten early (the bound) makes a
late retry publish again, which is the documented limit of the promise.
"""

from __future__ import annotations

from collections.abc import Callable

from broadcastd.core.stream import Position
from broadcastd.errors import BadCommand

MAX_KEY_LENGTH = 128


def check_key(key: object) -> str:
    """An idempotency key: 1 to 128 printable characters (``str.isprintable``, so no
    control characters: it travels in a header, where it is UTF-8)."""
    if isinstance(key, str) and 0 < len(key) <= MAX_KEY_LENGTH and key.isprintable():
        return key
    raise BadCommand(f"an idempotency key is 1 to {MAX_KEY_LENGTH} printable characters")


class Idempotency:
    """(channel, key) -> the position the first publish got, with its expiry."""

    __slots__ = ("_keys", "clock", "max_keys", "ttl")

    def __init__(self, ttl: float, max_keys: int, clock: Callable[[], float]) -> None:
        self.ttl = ttl
        self.max_keys = max_keys
        self.clock = clock
        self._keys: dict[tuple[str, str], tuple[float, Position]] = {}

    def __len__(self) -> int:
        return len(self._keys)

    def get(self, channel: str, key: str) -> Position | None:
        """The position published under this key, if it is still remembered."""
        found = self._keys.get((channel, key))
        if found is None:
            return None
        expires, position = found
        if expires <= self.clock():
            del self._keys[(channel, key)]
            return None
        return position

    def put(self, channel: str, key: str, position: Position) -> None:
        keys = self._keys
        now = self.clock()
        # Oldest first: expired keys and those over the bound go from the front.
        while keys:
            oldest = next(iter(keys))
            if keys[oldest][0] > now and len(keys) < self.max_keys:
                break
            del keys[oldest]
        keys[(channel, key)] = (now + self.ttl, position)
