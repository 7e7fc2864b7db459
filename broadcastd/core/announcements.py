"""Join and leave events on their way to a channel's subscribers, told in slices.

Telling one join to a room of N subscribers is N pushes, so a reconnect storm in
that room (every deploy) is N² of them. Told as they come, a storm's turn of the
event loop would hold every other channel back for as long as it takes. So
events wait here, a queue per channel, and go out at most ``budget`` pushes at
a time, one slice per turn, while the node's other channels are served between
slices.

What this keeps:

* the events of a channel reach each subscriber in the order they happened;
* a message or notice of a channel is never written before a join or leave of
  that channel that came first: the node tells the channel's waiting events
  before it fans a message out or tells a resync (``tell``);
* an event goes to the subscribers the channel has when it is told (one that
  left meanwhile is not told the rest), never to the client it is about. So a
  subscriber that came in just after a join may be told of it, as on the Redis
  engine, where events travel through Redis: events are idempotent by client
  id;
* events belong to one life of a channel in the hub: once the channel has left
  the hub (its last local subscriber went), its waiting events are dropped, and
  a later subscriber is not told them.

Pure data: the node schedules the slices.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from broadcastd.core.envelope import Reply
from broadcastd.core.hub import Channel
from broadcastd.core.outbox import Outbox

SLICE_PUSHES = 10_000
"""Most pushes of join and leave events per event-loop turn (about a
millisecond's work)."""


class _Event:
    __slots__ = ("frame", "skip")

    def __init__(self, frame: Reply, skip: Outbox | None) -> None:
        self.frame = frame
        self.skip = skip
        """The outbox of the client the event is about: it is not told of itself."""


class Announcements:
    """Events waiting to be told, by channel; channels in the order their first
    waiting event came."""

    __slots__ = ("_current", "_left", "queues", "scheduled")

    def __init__(self, current: Callable[[str], Channel | None]) -> None:
        self._current = current
        """The hub's channel of a name now (None: it has none)."""
        self.queues: dict[Channel, deque[_Event]] = {}
        """Waiting events by channel (empty: nothing waits; the node checks that
        before each fan-out, so it is a plain dict, not a method)."""
        self._left: list[Outbox] | None = None
        """The outboxes the first channel's oldest event is still to reach, reversed
        (a slice pops from the end); None before its first slice."""
        self.scheduled = False
        """A slice is due (the node has asked the loop for one)."""

    def __len__(self) -> int:
        return sum(len(queue) for queue in self.queues.values())

    def __contains__(self, channel: object) -> bool:
        return channel in self.queues

    def add(self, channel: Channel, frame: Reply, skip: Outbox | None = None) -> bool:
        """Queue an event of ``channel``; True if a slice must be scheduled now."""
        queue = self.queues.get(channel)
        if queue is None:
            queue = self.queues[channel] = deque()
        queue.append(_Event(frame, skip))
        if self.scheduled:
            return False
        self.scheduled = True
        return True

    def run(self, budget: int = SLICE_PUSHES) -> bool:
        """Tell events, channel by channel, oldest first, until ``budget`` pushes
        are made; True while events remain (the next slice is due)."""
        queues = self.queues
        while queues and budget > 0:
            channel = next(iter(queues))
            if self._current(channel.name) is not channel:
                self._drop_first()
                continue
            queue = queues[channel]
            left = self._left
            if left is None:
                left = self._left = self._targets(channel, queue[0])
            else:
                left = self._left = self._still(channel, left)
            made = _push(queue[0].frame, left, budget)
            budget -= made
            if not left:
                self._left = None
                queue.popleft()
                if not queue:
                    del queues[channel]
        if queues:
            return True
        self.scheduled = False
        return False

    def tell(self, channel: Channel) -> None:
        """Tell every waiting event of ``channel`` now, whatever the budget (a
        message or notice of it is about to be queued)."""
        queues = self.queues
        queue = queues.get(channel)
        if queue is None:
            return
        resumed = None
        if self._left is not None and next(iter(queues)) is channel:
            resumed = self._still(channel, self._left)  # its oldest event, part told
            self._left = None
        del queues[channel]
        for event in queue:
            if resumed is not None:
                targets, resumed = resumed, None
            else:
                targets = self._targets(channel, event)
            _push(event.frame, targets, len(targets))

    def _drop_first(self) -> None:
        """The first channel left the hub: its events are no one's any more."""
        del self.queues[next(iter(self.queues))]
        self._left = None

    @staticmethod
    def _targets(channel: Channel, event: _Event) -> list[Outbox]:
        targets = channel.outboxes(events=True)
        if event.skip is not None and event.skip in targets:
            targets.remove(event.skip)
        targets.reverse()
        return targets

    @staticmethod
    def _still(channel: Channel, left: list[Outbox]) -> list[Outbox]:
        """Those of ``left`` that still read the channel's events."""
        now = set(channel.outboxes(events=True))
        return [outbox for outbox in left if outbox in now]


def _push(frame: Reply, left: list[Outbox], budget: int) -> int:
    """Push ``frame`` to up to ``budget`` of ``left`` (taken from its end); the
    pushes made."""
    made = min(budget, len(left))
    for _ in range(made):
        left.pop().push(frame)
    return made
