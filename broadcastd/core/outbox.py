"""Per-subscriber bounded queue with overflow policies, per client and per channel.

Fan-out pushes frames here and never waits. A push that finds the queue full
first asks the adapter to write out what is queued (``write_now``): a client is slow
only when its socket cannot take more, so a burst larger than the queue (a big
batch, many pipelined publishes in one read) reaches a client that reads. Only
when the socket is full too does a policy act:

- ``disconnect`` refuses the frame and marks the outbox closed, after which the
  connection's writer closes it with 1013;
- ``drop_oldest`` drops the oldest queued messages to make room and counts them,
  so the client can be told;
- ``conflate`` keeps only the newest queued message of the frame's channel: the
  new frame replaces, in place, the channel's newest queued one, or is appended
  beyond the bound if the channel has none queued. A conflating client always
  gets the latest value of every channel, however slow it reads.

A namespace may also set outbox bounds (a ``Budget``): its frames queued in
one outbox are then held to them as well, and when its share is full the
namespace's policy acts on its own frames first (its oldest are dropped, its
channels conflated, or the client is disconnected), so a flood in one namespace
cannot push another's messages out of a client's queue.

``push(frame)`` applies the outbox's own policy (the server's default; a
``conflate`` outbox falls back to ``drop_oldest`` there, since an untagged frame
has no channel to conflate). ``push_to(frame, channel, policy)`` is for channels
whose namespace sets a policy: it applies that policy and tags the frame with
its channel, so that what is lost is counted per channel. ``push`` does none of
that work: fan-out to the default policy costs what it always did.

Replies and events (``Reply`` frames) are never dropped, conflated or counted
as messages: a client that floods commands without reading the replies fills
its queue with them and is disconnected as a slow consumer.

Missed messages are told before the next delivered message of their channel.
Frames of untagged channels lost by ``drop_oldest`` are counted in ``missed``,
which the writer reports as ``{"type": "missed", "count": N}``. Tagged frames
lost (conflated, dropped, refused) are counted per channel, and ``take`` itself
puts ``{"type": "missed", "channel": C, "count": N}`` just before the next
delivered frame of channel C, which is exact: for every channel, messages
delivered plus missed counts told plus ``untold()`` equals messages pushed, and
a channel's messages come out in the order they were pushed.

Bounds. Untagged and ``drop_oldest``/``disconnect`` frames keep the queue within
``max_messages`` frames and ``max_bytes`` bytes. Conflation may exceed them by
at most one frame per conflated channel the client holds (K): the queue holds
at most ``max_messages + K`` frames and ``max_bytes + K * F`` bytes, F being the
largest frame (``max_payload_bytes + ENVELOPE_OVERHEAD``, which settings keep
below ``max_bytes``, so at most ``(K + 1) * max_bytes``). A budget holds its
namespace's frames to its own bounds in the same way (plus one frame per
conflated channel of the namespace). Missed events are
built by ``take`` as it hands the frames over, never queued. The newest queued
frame of a conflated channel is never dropped by ``drop_oldest`` to make room for
another channel, or its latest value could be lost for good. A client that stops
reading thus costs at most that plus the transport's write buffer.

The adapter's part: clear ``tell_missed`` for raw-mode clients (payloads only;
losses are still counted), read ``take_channel_missed()`` for metrics, and call
``forget(channel)`` when the client unsubscribes.

The outbox knows nothing of sockets. The adapter gives it two callables:
``wake``, called only when the queue goes from empty to non-empty or the
outbox closes, so an idle writer costs no wake-ups and a busy one at most one
per write; and ``write_now`` (above). ``detach`` lets go of both when the
connection closes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from broadcastd.core.envelope import Reply, reply_frame
from broadcastd.errors import CloseReason
from broadcastd.settings import SlowConsumerPolicy

QUEUED = 0
"""push(): the frame was queued."""
DROPPED = 1
"""push(): the frame was queued after dropping one or more older frames (drop_oldest),
or in place of its channel's newest queued frame (conflate)."""
REFUSED = 2
"""push(): the frame was not queued; the outbox overflowed or was already closed."""

_CONFLATE = SlowConsumerPolicy.CONFLATE
_DROP_OLDEST = SlowConsumerPolicy.DROP_OLDEST


def _no_wake() -> None:
    return None


def _cannot_write() -> bool:
    return False


def channel_missed_frame(channel: str, count: int) -> Reply:
    """Told before the next message of ``channel`` after ``count`` of its messages
    were lost (conflated, dropped or refused)."""
    return reply_frame({"type": "missed", "channel": channel, "count": count})


@dataclass(frozen=True, slots=True, eq=False)
class Budget:
    """A namespace's bounds on its own frames in each outbox (one shared object per
    namespace; compared by identity). Within the outbox's bounds: settings refuse
    larger ones."""

    namespace: str
    max_messages: int
    max_bytes: int


class _Tags:
    """What the outbox knows of the frames ``push_to`` queued. Created by the first
    ``push_to``, so a client that only ever gets ``push`` pays neither memory nor
    time for it. Indexes are positions in the outbox's queue: they stay valid while
    frames are only appended or replaced in place, and are rebuilt by the two
    operations that move frames (``drop_oldest`` and ``take``)."""

    __slots__ = ("budget_of", "channel_of", "marks", "newest", "unplaced", "used")

    def __init__(self) -> None:
        self.channel_of: dict[int, str] = {}
        """Queue index -> channel, for every queued tagged frame: what drop_oldest
        needs to count its drops per channel."""
        self.newest: dict[str, int] = {}
        """Channel -> queue index of its newest queued frame, for channels pushed with
        conflate only: the slot a conflated frame replaces, and the frame drop_oldest
        must not drop."""
        self.marks: dict[int, int] = {}
        """Queue index -> messages of that frame's channel missed just before it: where
        take() puts the missed events."""
        self.unplaced: dict[str, int] = {}
        """Channel -> messages missed after its last queued frame: told before its
        next one, whenever that comes (it survives take())."""
        self.budget_of: dict[str, Budget] = {}
        """Channel -> its namespace's budget, for channels pushed with one."""
        self.used: dict[Budget, list[int]] = {}
        """Budget -> [frames, bytes] of its channels queued now."""

    def count(self, budget: Budget | None, channel: str, size: int) -> None:
        """A frame of ``size`` bytes of ``channel`` was queued under ``budget``."""
        if budget is not None:
            self.budget_of[channel] = budget
            used = self.used.get(budget)
            if used is None:
                self.used[budget] = [1, size]
            else:
                used[0] += 1
                used[1] += size

    def recount(self, frames: list[bytes]) -> None:
        """Count the budgets' frames again, after drops moved them."""
        self.used.clear()
        budget_of = self.budget_of
        if budget_of:
            for index, channel in self.channel_of.items():
                self.count(budget_of.get(channel), channel, len(frames[index]))

    def place(self, index: int, channel: str) -> None:
        """The frame at ``index`` is the first of ``channel`` since it lost some."""
        count = self.unplaced.pop(channel, 0)
        if count:
            self.marks[index] = self.marks.get(index, 0) + count

    def clear(self) -> None:
        """The queue is empty: no index means anything any more."""
        self.channel_of.clear()
        self.newest.clear()
        self.marks.clear()
        self.used.clear()
        self.budget_of.clear()

    def take(self, frames: list[bytes]) -> list[bytes]:
        """``frames``, the whole queue, with the missed events in front of the frames
        they precede; leaves the indexes empty."""
        marks = self.marks
        if marks:
            channel_of = self.channel_of
            told: list[bytes] = []
            start = 0
            for index in sorted(marks):
                told += frames[start:index]
                told.append(channel_missed_frame(channel_of[index], marks[index]))
                start = index
            told += frames[start:]
            frames = told
        self.clear()
        return frames


class Outbox:
    """The frames waiting to be written to one client, oldest first."""

    __slots__ = (
        "_bytes",
        "_queue",
        "_tags",
        "channel_missed",
        "closed",
        "discarded",
        "drop_oldest",
        "max_bytes",
        "max_messages",
        "missed",
        "tell_missed",
        "wake",
        "write_now",
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
        self._tags: _Tags | None = None
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.drop_oldest = policy is not SlowConsumerPolicy.DISCONNECT
        """What push() does when full: conflate needs a channel, which push() frames
        do not have, so a conflate outbox drops the oldest for them."""
        self.missed = 0
        """Untagged messages dropped since the client was last told (drop_oldest)."""
        self.channel_missed = 0
        """Tagged messages lost since the adapter last took the count (for metrics;
        the client is told per channel, by take())."""
        self.tell_missed = True
        """Whether take() tells the client of missed tagged messages; the adapter clears
        it for raw-mode clients, who get payloads only (counts are still kept)."""
        self.discarded = 0
        """Frames thrown away when the outbox overflowed (disconnect policy)."""
        self.closed: CloseReason | None = None
        """Set once the connection must end; the writer then closes with this reason."""
        self.wake: Callable[[], None] = _no_wake
        self.write_now: Callable[[], bool] = _cannot_write
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

    def push_to(
        self,
        frame: bytes,
        channel: str,
        policy: SlowConsumerPolicy,
        budget: Budget | None = None,
    ) -> int:
        """Queue ``frame``, a message of ``channel``, applying ``policy`` if the outbox
        (or ``budget``, the share of the channel's namespace) is full; return
        QUEUED, DROPPED or REFUSED.

        For channels whose namespace sets a policy or a budget. It costs a little
        more than push() (the frame is tagged with its channel), which is why the
        channels that follow the server's options keep using push()."""
        if isinstance(frame, Reply):
            return self.push(frame)  # never conflated, dropped or counted
        tags = self._tags
        if tags is None:
            tags = self._tags = _Tags()
        queue = self._queue
        size = len(frame)
        if budget is not None:
            used = tags.used.get(budget)
            if used is not None and (
                used[0] >= budget.max_messages or used[1] + size > budget.max_bytes
            ):
                return self._full_to(tags, frame, channel, policy, budget)
        if len(queue) < self.max_messages and self._bytes + size <= self.max_bytes:
            # _append(), inlined: this is fan-out's path for these channels.
            index = len(queue)
            queue.append(frame)
            self._bytes += size
            tags.channel_of[index] = channel
            if policy is _CONFLATE:
                tags.newest[channel] = index
            elif tags.newest:
                tags.newest.pop(channel, None)
            if tags.unplaced:
                tags.place(index, channel)
            if budget is not None:
                tags.count(budget, channel, size)
            if not index:
                self.wake()
            return QUEUED
        return self._full_to(tags, frame, channel, policy, budget)

    def _append(
        self, tags: _Tags, frame: bytes, channel: str, conflate: bool, budget: Budget | None
    ) -> None:
        """Queue a tagged frame whatever the bounds (the callers checked them, or
        conflate goes beyond them)."""
        queue = self._queue
        index = len(queue)
        queue.append(frame)
        self._bytes += len(frame)
        self._tag(tags, index, channel, conflate)
        tags.count(budget, channel, len(frame))
        if not index:
            self.wake()

    @staticmethod
    def _tag(tags: _Tags, index: int, channel: str, conflate: bool) -> None:
        """The frame at ``index`` is the newest of ``channel`` (the caller counts it
        against its budget)."""
        tags.channel_of[index] = channel
        if conflate:
            tags.newest[channel] = index
        elif tags.newest:
            # Only conflated frames are replaced: without this, a later conflated
            # frame would replace one older than this and overtake it.
            tags.newest.pop(channel, None)
        if tags.unplaced:
            tags.place(index, channel)

    def _full(self, frame: bytes) -> int:
        if self.closed is not None:
            return REFUSED
        if self.write_now() and not self._queue and len(frame) <= self.max_bytes:
            self._queue.append(frame)
            self._bytes = len(frame)
            self.wake()
            return QUEUED
        if self.drop_oldest:
            return self._drop_for(frame, None, None)
        self.close(CloseReason.SLOW_CONSUMER)
        return REFUSED

    def _full_to(
        self,
        tags: _Tags,
        frame: bytes,
        channel: str,
        policy: SlowConsumerPolicy,
        budget: Budget | None,
    ) -> int:
        """push_to() found the outbox (or the budget) full: write out what is queued,
        else the frame's policy decides."""
        if self.closed is not None:
            return REFUSED
        if self.write_now() and not self._queue and len(frame) <= self.max_bytes:
            self._append(tags, frame, channel, policy is _CONFLATE, budget)
            return QUEUED
        if policy is _CONFLATE:
            return self._conflate(tags, frame, channel, budget)
        if policy is _DROP_OLDEST:
            return self._drop_for(frame, channel, budget)
        self.close(CloseReason.SLOW_CONSUMER)
        return REFUSED

    def _conflate(self, tags: _Tags, frame: bytes, channel: str, budget: Budget | None) -> int:
        """Replace ``channel``'s newest queued frame with ``frame``, or append it beyond
        the bound if the channel has none queued (at most one frame per channel)."""
        index = tags.newest.get(channel)
        if index is None:
            self._append(tags, frame, channel, True, budget)
            return QUEUED
        queue = self._queue
        grown = len(frame) - len(queue[index])
        self._bytes += grown
        queue[index] = frame
        used = None if budget is None else tags.used.get(budget)
        if used is not None:
            used[1] += grown
        self._lost(tags, channel, index)
        if tags.unplaced:
            # Lost after the replaced frame (refused while the channel's policy was
            # drop_oldest): before the new one too.
            tags.place(index, channel)
        return DROPPED

    def _lost(self, tags: _Tags, channel: str, index: int | None) -> None:
        """A message of ``channel`` was lost just before the frame at ``index`` (None:
        after its queued frames, so before its next one)."""
        self.channel_missed += 1
        if not self.tell_missed:
            return
        if index is None:
            tags.unplaced[channel] = tags.unplaced.get(channel, 0) + 1
        else:
            tags.marks[index] = tags.marks.get(index, 0) + 1

    def _drop_for(self, frame: bytes, channel: str | None, budget: Budget | None) -> int:
        """Make room for ``frame`` (of ``channel`` if tagged, within ``budget`` if
        given) by dropping the oldest messages (never replies)."""
        tags = self._tags
        if tags is not None and tags.channel_of:
            return self._drop_tagged(tags, frame, channel, budget)
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
            return self._cannot_fit(frame, channel)
        kept.append(frame)
        self._queue = kept
        self._bytes += size - freed
        self.missed += dropped
        if channel is not None:
            assert tags is not None  # push_to() made it
            self._tag(tags, len(kept) - 1, channel, False)
            tags.count(budget, channel, size)
        if len(kept) == 1:
            self.wake()
        return DROPPED

    def _drop_tagged(
        self, tags: _Tags, frame: bytes, channel: str | None, budget: Budget | None
    ) -> int:
        """_drop_for() when tagged frames are queued: the same drops, except the newest
        frame of a conflated channel, each counted for its channel and told before the
        next kept frame of that channel; the indexes follow the frames that move.
        With a ``budget``, its own oldest frames are also dropped until the frame
        fits in it; other frames only as the outbox's bounds need."""
        queue = self._queue
        size = len(frame)
        excess_frames = len(queue) + 1 - self.max_messages
        excess_bytes = self._bytes + size - self.max_bytes
        channel_of, newest, marks = tags.channel_of, tags.newest, tags.marks
        budget_of = tags.budget_of
        share_frames = share_bytes = 0
        if budget is not None:
            used = tags.used.get(budget, (0, 0))
            share_frames = used[0] + 1 - budget.max_messages
            share_bytes = used[1] + size - budget.max_bytes
        kept: list[bytes] = []
        kept_channel_of: dict[int, str] = {}
        kept_newest: dict[str, int] = {}
        kept_marks: dict[int, int] = {}
        # Channel -> missed before its next kept frame: its drops, and the marks of
        # its dropped frames.
        carried: dict[str, int] = {}
        tell = self.tell_missed
        dropped = freed = untagged = 0
        for index, queued in enumerate(queue):
            tag = channel_of.get(index)
            ours = budget is not None and tag is not None and budget_of.get(tag) is budget
            if (
                (
                    dropped < excess_frames
                    or freed < excess_bytes
                    or (ours and (share_frames > 0 or share_bytes > 0))
                )
                and not isinstance(queued, Reply)
                and (tag is None or newest.get(tag) != index)
            ):
                dropped += 1
                freed += len(queued)
                if ours:
                    share_frames -= 1
                    share_bytes -= len(queued)
                if tag is None:
                    untagged += 1
                elif tell:
                    carried[tag] = carried.get(tag, 0) + 1 + marks.get(index, 0)
                continue
            moved = len(kept)
            kept.append(queued)
            if tag is not None:
                kept_channel_of[moved] = tag
                if newest.get(tag) == index:
                    kept_newest[tag] = moved
                count = marks.get(index, 0) + carried.pop(tag, 0)
                if count:
                    kept_marks[moved] = count
        if dropped < excess_frames or freed < excess_bytes or share_frames > 0 or share_bytes > 0:
            # Nothing changed: the loop above only built copies.
            return self._cannot_fit(frame, channel)
        kept.append(frame)
        self._queue = kept
        self._bytes += size - freed
        self.missed += untagged
        self.channel_missed += dropped - untagged
        tags.channel_of, tags.newest, tags.marks = kept_channel_of, kept_newest, kept_marks
        if budget_of:
            tags.recount(kept)
        unplaced = tags.unplaced
        for tag, count in carried.items():
            unplaced[tag] = unplaced.get(tag, 0) + count
        if channel is not None:
            self._tag(tags, len(kept) - 1, channel, False)
            tags.count(budget, channel, size)
        if len(kept) == 1:
            self.wake()
        return DROPPED

    def _cannot_fit(self, frame: bytes, channel: str | None) -> int:
        """drop_oldest cannot make room: only replies (and conflated channels' newest
        frames) are left, which the client does not read."""
        if isinstance(frame, Reply):
            self.close(CloseReason.SLOW_CONSUMER)
        elif channel is None:
            self.missed += 1  # the new message itself cannot fit
        else:
            assert self._tags is not None  # push_to() made it
            self._lost(self._tags, channel, None)
        return REFUSED

    def take(self) -> list[bytes]:
        """Everything queued, oldest first, leaving the outbox empty; the missed events
        of tagged channels come just before the frames they precede."""
        frames = self._queue
        self._queue = []
        self._bytes = 0
        tags = self._tags
        if tags is not None and tags.channel_of:
            if tags.marks:
                return tags.take(frames)
            tags.clear()
        return frames

    def take_missed(self) -> int:
        """Untagged messages dropped since last asked; the writer tells the client."""
        missed, self.missed = self.missed, 0
        return missed

    def take_channel_missed(self) -> int:
        """Tagged messages lost since last asked (already told by take(); for metrics)."""
        missed, self.channel_missed = self.channel_missed, 0
        return missed

    def usage(self, budget: Budget) -> tuple[int, int]:
        """Frames and bytes of ``budget``'s channels queued now."""
        tags = self._tags
        used = None if tags is None else tags.used.get(budget)
        return (0, 0) if used is None else (used[0], used[1])

    def untold(self) -> dict[str, int]:
        """Missed counts per channel not yet handed out by take(): those waiting for a
        queued frame to precede, and those waiting for the channel's next message."""
        tags = self._tags
        if tags is None:
            return {}
        counts = dict(tags.unplaced)
        for index, count in tags.marks.items():
            channel = tags.channel_of[index]
            counts[channel] = counts.get(channel, 0) + count
        return counts

    def forget(self, channel: str) -> None:
        """The client left ``channel``: drop what waits for its next message, which
        belongs to no subscription any more, and stop conflating into its queued
        frame (a replay after a new subscribe, queued behind it with push(), must not
        be overtaken). Queued frames of the channel are still delivered."""
        tags = self._tags
        if tags is not None:
            tags.newest.pop(channel, None)
            tags.unplaced.pop(channel, None)

    def detach(self) -> None:
        """Forget the adapter's callbacks: its connection is gone, and they would
        keep it and this outbox in a reference cycle."""
        self.wake = _no_wake
        self.write_now = _cannot_write

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
            if self._tags is not None:
                self._tags.clear()
                self._tags.unplaced.clear()
            # A zero bound sends every later push down the slow path, which refuses
            # it, so the fast path needs no closed check of its own.
            self.max_messages = 0
        self.wake()
