"""Deliberately slow subscribers of a conflating channel: the client side of scenario S1c.

On a channel whose namespace conflates (``slow_consumer_policy = "conflate"``),
a client that cannot keep up is not disconnected: once its outbox is full, only
the newest queued message of the channel is kept, and the client is told
``{"type": "missed", "channel": C, "count": N}`` just before the channel's next
message. So, for every slow reader, exactly:

* messages received + the sum of its ``missed`` counts == messages published;
* each message's offset is the previous one + 1 + the missed counts told in
  between (no gap the server did not own up to, no repeat, no reordering);
* the last message published is the last one received (conflation keeps the
  newest, it never loses it).

A :class:`SlowReader` checks all three. Two kinds: *paused* readers stop reading
right after their ``subscribed`` reply and read again only when the publisher
is done (:meth:`SlowGroup.release`); *lagging* readers read one chunk at a time
and then stop reading for ``delay`` seconds, with a small receive buffer, so
that they fall steadily behind and get messages and ``missed`` events
interleaved. Both read at full speed after the release. Both connect with a
small SO_RCVBUF and an Ethernet MSS (``Pool.connect(sockopts=...)``), so that
the kernels hold little for them (on loopback the daemon's send buffer would
otherwise grow to ~4 MiB per connection) and the daemon's outbox, where
conflation happens, fills within seconds.

They parse every frame (the offset of each envelope, every reply with ``json``),
which is fine for a handful of connections; the fan-out's other subscribers are
the cheap counting :class:`benchmarks.wsclient.Subscriber`.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from typing import Any

from benchmarks.wsclient import OffsetReader, Pool


class SlowGroup:
    """What the slow readers of one run share: the release, and who has the last message."""

    def __init__(self, channel: str) -> None:
        self.channel = channel
        self.prefix = b'{"channel":' + json.dumps(channel).encode() + b',"offset":'
        self.readers: list[SlowReader] = []
        self.released = False
        self.final: int | None = None
        """Offset of the last message published, once known."""
        self.done = 0
        self.all_done = asyncio.Event()

    def release(self, final: int) -> None:
        """Publishing is over, its last offset was ``final``: every reader reads at full
        speed from now on; ``all_done`` is set once each one got that offset."""
        self.released = True
        self.final = final
        for reader in self.readers:
            reader.release()
        self._check()

    def reached(self) -> None:
        self.done += 1
        self._check()

    def _check(self) -> None:
        if self.final is not None and self.done >= len(self.readers):
            self.all_done.set()


class SlowReader(OffsetReader):
    """One slow subscriber of ``group.channel``: every offset and ``missed`` count checked."""

    __slots__ = (
        "delay",
        "group",
        "kind",
        "last",
        "messages",
        "missed",
        "missed_events",
        "reached",
        "read_paused",
        "timer",
        "top",
        "unexpected",
        "untold",
        "violations",
    )

    def __init__(
        self,
        pool: Pool,
        request: bytes,
        accept: bytes,
        ready: asyncio.Future[None],
        group: SlowGroup,
        *,
        delay: float | None,
    ) -> None:
        super().__init__(pool, request, accept, 1, ready)
        self.group = group
        self.delay = delay
        """None: paused until the release; else seconds without reading after each read."""
        self.kind = "paused" if delay is None else f"lagging {delay:g}s/read"
        self.read_paused = False
        self.timer: asyncio.TimerHandle | None = None
        self.top: int | None = None
        """The channel's offset in the ``subscribed`` reply."""
        self.last = 0
        """Offset of the last message received (``top`` before the first)."""
        self.messages = 0
        self.missed = 0
        """Sum of the ``missed`` counts told."""
        self.missed_events = 0
        self.untold = 0
        """Missed counts told since the last message: the next offset must skip them."""
        self.violations = 0
        """Offsets that were not last + 1 + untold, and envelopes before the reply."""
        self.reached = False
        self.unexpected: Counter[str] = Counter()
        group.readers.append(self)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        super().connection_lost(exc)

    def release(self) -> None:
        self.delay = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self._resume()
        self._check_final()

    def _pause(self) -> None:
        transport = self.transport
        if not self.read_paused and transport is not None and not transport.is_closing():
            transport.pause_reading()
            self.read_paused = True

    def _resume(self) -> None:
        self.timer = None
        transport = self.transport
        if self.read_paused and transport is not None and not transport.is_closing():
            transport.resume_reading()
        self.read_paused = False

    @property
    def prefix(self) -> bytes:
        return self.group.prefix

    def on_offset(self, offset: int, now: float) -> None:
        self._message(offset)

    def on_foreign(self) -> None:
        self.unexpected["envelope of another channel"] += 1

    def on_reply(self, payload: bytes, now: float) -> None:
        self._slow_reply(payload)

    def after_read(self, messages: int, now: float) -> None:
        if messages:
            self._check_final()
        if self.delay is not None and self.top is not None and self.timer is None:
            self._pause()
            self.timer = asyncio.get_running_loop().call_later(self.delay, self._resume)

    def _message(self, offset: int) -> None:
        self.messages += 1
        if self.top is None or offset != self.last + 1 + self.untold:
            self.violations += 1
        self.last = offset
        self.untold = 0

    def _check_final(self) -> None:
        final = self.group.final
        if not self.reached and final is not None and self.last >= final:
            self.reached = True
            self.group.reached()

    def _slow_reply(self, payload: bytes) -> None:
        self.pool.replies += 1
        try:
            reply: Any = json.loads(payload)
        except ValueError:
            reply = None
        kind = reply.get("type") if isinstance(reply, dict) else None
        if kind == "missed" and reply.get("channel") == self.group.channel:
            count = reply.get("count")
            if isinstance(count, int) and count > 0:
                self.missed += count
                self.untold += count
                self.missed_events += 1
            else:
                self.unexpected["missed without a positive count"] += 1
        elif kind == "subscribed" and self.top is None:
            top = reply.get("offset")
            self.top = self.last = top if isinstance(top, int) else 0
            if not self.ready.done():
                self.ready.set_result(None)
            if self.delay is None and not self.group.released:
                self._pause()
        else:
            self.unexpected[str(kind)] += 1

    def report(self, published: int) -> dict[str, Any]:
        """What this reader got, and whether it adds up to ``published`` messages."""
        final = self.group.final
        return {
            "kind": self.kind,
            "received": self.messages,
            "missed": self.missed,
            "missed_events": self.missed_events,
            "adds_up": self.messages + self.missed == published,
            "last_offset": self.last,
            "got_last": final is not None and self.last == final,
            "offset_violations": self.violations + (1 if self.untold else 0),
            "unexpected_replies": dict(self.unexpected),
        }
