"""Per-subscriber bounded queue with an overflow policy.

Fan-out pushes frames here and never waits: a push either queues the frame,
queues it after dropping older ones (``drop_oldest``), or refuses it and marks
the outbox as overflowed (``disconnect``), after which the connection's writer
closes it with 1013. The queue is bounded both in frames and in bytes, so a
client that stops reading costs at most ``max_bytes`` plus the transport's
write buffer.

The outbox knows nothing of sockets: the adapter gives it a ``wake`` callable,
called only when the queue goes from empty to non-empty or the outbox closes,
so an idle writer costs no wake-ups and a busy one at most one per drain.
"""

from __future__ import annotations

from collections.abc import Callable

from broadcastd.errors import CloseReason
from broadcastd.settings import SlowConsumerPolicy

QUEUED = 0
"""push(): the frame was queued."""
DROPPED = 1
"""push(): the frame was queued after dropping one or more older frames (drop_oldest)."""
REFUSED = 2
"""push(): the frame was not queued; the outbox overflowed or was already closed."""


def _no_wake() -> None:
    return None


class Outbox:
    """The frames waiting to be written to one client, oldest first."""

    __slots__ = (
        "_bytes",
        "_queue",
        "closed",
        "discarded",
        "drop_oldest",
        "max_bytes",
        "max_messages",
        "missed",
        "wake",
    )

    def __init__(
        self,
        max_messages: int,
        max_bytes: int,
        policy: SlowConsumerPolicy = SlowConsumerPolicy.DISCONNECT,
    ) -> None:
        self._queue: list[bytes] = []
        """A list, not a deque: an empty deque costs 760 bytes per idle client, and
        take() hands the whole list over instead of copying it."""
        self._bytes = 0
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.drop_oldest = policy is SlowConsumerPolicy.DROP_OLDEST
        self.missed = 0
        """Frames dropped since the client was last told (drop_oldest)."""
        self.discarded = 0
        """Frames thrown away when the outbox overflowed (disconnect policy)."""
        self.closed: CloseReason | None = None
        """Set once the connection must end; the writer then closes with this reason."""
        self.wake: Callable[[], None] = _no_wake

    def __len__(self) -> int:
        return len(self._queue)

    @property
    def size(self) -> int:
        """Bytes queued."""
        return self._bytes

    def push(self, frame: bytes) -> int:
        """Queue ``frame`` without waiting; return QUEUED, DROPPED or REFUSED."""
        queue = self._queue
        size = len(frame)
        if len(queue) < self.max_messages and self._bytes + size <= self.max_bytes:
            queue.append(frame)
            self._bytes += size
            if len(queue) == 1:
                self.wake()
            return QUEUED
        if self.closed is not None:
            return REFUSED
        if self.drop_oldest:
            return self._drop_for(frame)
        self.close(CloseReason.SLOW_CONSUMER)
        return REFUSED

    def _drop_for(self, frame: bytes) -> int:
        queue = self._queue
        size = len(frame)
        drop = 0
        kept = self._bytes
        while drop < len(queue) and (
            len(queue) - drop >= self.max_messages or kept + size > self.max_bytes
        ):
            kept -= len(queue[drop])
            drop += 1
        del queue[:drop]
        self._bytes = kept
        self.missed += drop
        if size > self.max_bytes:
            self.missed += 1
            return REFUSED
        queue.append(frame)
        self._bytes += size
        if len(queue) == 1:
            self.wake()
        return DROPPED

    def take(self) -> list[bytes]:
        """Everything queued, oldest first, leaving the outbox empty."""
        frames = self._queue
        self._queue = []
        self._bytes = 0
        return frames

    def take_missed(self) -> int:
        missed, self.missed = self.missed, 0
        return missed

    def close(self, reason: CloseReason) -> None:
        """Mark the outbox closed. A slow consumer's pending frames are discarded;
        on shutdown they stay, so the writer flushes them before closing."""
        if self.closed is not None:
            return
        self.closed = reason
        if reason is CloseReason.SLOW_CONSUMER:
            self.discarded = len(self._queue)
            self._queue.clear()
            self._bytes = 0
            # A zero bound sends every later push down the slow path, which refuses
            # it, so the fast path needs no closed check of its own.
            self.max_messages = 0
        self.wake()
