"""Per-subscriber bounded queue with an overflow policy.

Fan-out pushes frames here and never waits. A push that finds the queue full
first asks the adapter to write out what is queued (``drain``): a client is slow
only when its socket cannot take more, so a burst larger than the queue (a big
batch, many pipelined publishes in one read) reaches a client that reads. Only
when the socket is full too does the policy act: ``disconnect`` refuses the
frame and marks the outbox closed, after which the connection's writer closes
it with 1013; ``drop_oldest`` drops the oldest queued messages to make room and
counts them, so the client can be told. Replies and events (``Reply`` frames)
are never dropped and never counted as messages: a client that floods commands
without reading the replies fills its queue with them and is disconnected as a
slow consumer. The queue is bounded both in frames and in bytes, so a client
that stops reading costs at most ``max_bytes`` plus the transport's write
buffer.

The outbox knows nothing of sockets: the adapter gives it a ``wake`` callable,
called only when the queue goes from empty to non-empty or the outbox closes,
so an idle writer costs no wake-ups and a busy one at most one per drain.
"""

from __future__ import annotations

from collections.abc import Callable

from broadcastd.core.envelope import Reply
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


def _cannot_drain() -> bool:
    return False


class Outbox:
    """The frames waiting to be written to one client, oldest first."""

    __slots__ = (
        "_bytes",
        "_queue",
        "closed",
        "discarded",
        "drain",
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
        """Messages dropped since the client was last told (drop_oldest)."""
        self.discarded = 0
        """Frames thrown away when the outbox overflowed (disconnect policy)."""
        self.closed: CloseReason | None = None
        """Set once the connection must end; the writer then closes with this reason."""
        self.wake: Callable[[], None] = _no_wake
        self.drain: Callable[[], bool] = _cannot_drain
        """Set by the adapter: write everything queued now if the socket can take it
        and return True (the queue is then empty), else return False."""

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
        return self._full(frame)

    def _full(self, frame: bytes) -> int:
        if self.closed is not None:
            return REFUSED
        if self.drain() and not self._queue and len(frame) <= self.max_bytes:
            self._queue.append(frame)
            self._bytes = len(frame)
            self.wake()
            return QUEUED
        if self.drop_oldest:
            return self._drop_for(frame)
        self.close(CloseReason.SLOW_CONSUMER)
        return REFUSED

    def _drop_for(self, frame: bytes) -> int:
        """Make room for ``frame`` by dropping the oldest messages (never replies)."""
        queue = self._queue
        size = len(frame)
        excess_frames = len(queue) + 1 - self.max_messages
        excess_bytes = self._bytes + size - self.max_bytes
        kept: list[bytes] = []
        dropped = freed = 0
        for queued in queue:
            if (dropped < excess_frames or freed < excess_bytes) and not isinstance(queued, Reply):
                dropped += 1
                freed += len(queued)
            else:
                kept.append(queued)
        if dropped < excess_frames or freed < excess_bytes:
            # Only replies are left to drop: the client does not read them.
            if isinstance(frame, Reply):
                self.close(CloseReason.SLOW_CONSUMER)
                return REFUSED
            self.missed += 1  # the new message itself cannot fit
            return REFUSED
        kept.append(frame)
        self._queue = kept
        self._bytes += size - freed
        self.missed += dropped
        if len(kept) == 1:
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
        on any other close they stay, so the writer flushes them before closing."""
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
