"""Join and leave events on their way to a channel's subscribers, told in slices.

Telling one join to a room of N subscribers is N pushes, so a reconnect storm in
that room (every deploy) is N² of them. Told as they come, a storm's turn of the
event loop would hold every other channel back for as long as it takes. So
events wait here and go out at most ``budget`` pushes at a time, one slice per
turn, while the node's other channels are served between slices.

What this keeps:

* the events of a channel reach each subscriber in the order they happened;
* a message of a channel is never written before a join or leave of that
  channel that came first: the node tells the channel's waiting events before
  it fans a message out (``tell``);
* an event goes to the subscribers the channel has when it is told, except the
  client it is about when it is that client's join. So a subscriber that came
  in just after a join may be told of it, as on the Redis engine, where events
  travel through Redis: events are idempotent by client id.

Pure data: the node schedules the slices.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from broadcastd.core.envelope import Reply
from broadcastd.core.outbox import Outbox

SLICE_PUSHES = 10_000
"""Most pushes of join and leave events per event-loop turn (about a
millisecond's work)."""

Subscribers = Callable[[str], list[Outbox]]
"""A channel's subscribers that read events (not payloads alone), at that moment."""


class _Event:
    __slots__ = ("channel", "frame", "skip")

    def __init__(self, channel: str, frame: Reply, skip: Outbox | None) -> None:
        self.channel = channel
        self.frame = frame
        self.skip = skip
        """The outbox of the client a join is about (it is not told its own join)."""


class Announcements:
    """Events waiting to be told, oldest first."""

    __slots__ = ("_left", "_queue", "waiting")

    def __init__(self) -> None:
        self._queue: deque[_Event] = deque()
        self._left: list[Outbox] = []
        """The outboxes the oldest event is still to reach (set as its slice began),
        reversed: a slice pops from the end."""
        self.waiting: dict[str, int] = {}
        """Events queued per channel: the node's check before each fan-out."""

    def __len__(self) -> int:
        return len(self._queue)

    def add(self, channel: str, frame: Reply, skip: Outbox | None = None) -> bool:
        """Queue an event; True if the queue was empty (a slice must be scheduled)."""
        self._queue.append(_Event(channel, frame, skip))
        waiting = self.waiting
        waiting[channel] = waiting.get(channel, 0) + 1
        return len(self._queue) == 1

    def run(self, subscribers: Subscribers, budget: int = SLICE_PUSHES) -> bool:
        """Tell events, oldest first, until ``budget`` pushes are made; True while
        events remain (the next slice is due)."""
        queue = self._queue
        while queue and budget > 0:
            event = queue[0]
            left = self._left
            if not left:
                left = self._left = _targets(event, subscribers)
            budget -= self._push(event, left, budget)
            if not left:
                self._done()
        return bool(queue)

    def tell(self, channel: str, subscribers: Subscribers) -> None:
        """Tell every waiting event of ``channel`` now, whatever the budget (a
        message of it is about to be fanned out)."""
        queue = self._queue
        if queue[0].channel == channel and self._left:
            self._push(queue[0], self._left, len(self._left))
            self._done()
        kept: deque[_Event] = deque()
        for event in queue:
            if event.channel == channel:
                targets = _targets(event, subscribers)
                self._push(event, targets, len(targets))
            else:
                kept.append(event)
        self._queue = kept
        self.waiting.pop(channel, None)

    @staticmethod
    def _push(event: _Event, left: list[Outbox], budget: int) -> int:
        """Push ``event`` to up to ``budget`` of ``left`` (taken from its end);
        the pushes made."""
        frame = event.frame
        made = min(budget, len(left))
        for _ in range(made):
            left.pop().push(frame)
        return made

    def _done(self) -> None:
        """The oldest event reached everyone."""
        event = self._queue.popleft()
        self._left = []
        waiting = self.waiting
        count = waiting[event.channel] - 1
        if count:
            waiting[event.channel] = count
        else:
            del waiting[event.channel]


def _targets(event: _Event, subscribers: Subscribers) -> list[Outbox]:
    targets = subscribers(event.channel)
    if event.skip is not None and event.skip in targets:
        targets.remove(event.skip)
    targets.reverse()
    return targets
