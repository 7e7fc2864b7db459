"""Subscribers that check every offset: the client side of scenario R (recovery).

Unlike :class:`benchmarks.wsclient.Subscriber`, which only counts frames, a
:class:`Resumer` reads the offset of every message (it knows its channel, so
the envelope's constant head ``{"channel":"r-3","offset":`` is one
``startswith``, and the digits up to the next comma are the offset) and
checks that offsets follow each other without gap or repeat. Its state lives
in a :class:`Track`, one per client, which outlives the connection: after a
drop the client reconnects with ``since=CHANNEL:EPOCH:LAST`` taken from its
track, and the new connection carries on checking where the old one stopped.

Replies (frames that are not envelopes) are rare and parsed with ``json``.
A ``subscribed`` reply gives the channel's epoch and latest offset ``top``; on
a resume it also says ``recovered``. Then, in a recovery:

* replayed messages are the ones with offset <= top (they were missed while
  disconnected), and must be exactly ``last + 1 .. top``;
* the client is *live* again at the first message with offset > top: it is
  newer than the drop (top was read after it) and was not replayed.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from typing import Any
from urllib.parse import quote

from benchmarks.wsclient import OffsetReader, Pool

NO_EPOCH = "none"
"""Sent as the epoch when the server's ``subscribed`` reply had none (a server
without recovery): a well-formed position that no epoch matches."""


class Fleet:
    """What all tracks of one run share: the count of live clients and its event."""

    def __init__(self) -> None:
        self.live = 0
        self.target = 1 << 62
        self.all_live = asyncio.Event()

    def expect(self, count: int) -> None:
        """Arm ``all_live`` to be set once ``count`` clients went live."""
        self.target = count
        self.all_live.clear()
        if self.live >= count:
            self.all_live.set()

    def went_live(self) -> None:
        self.live += 1
        if self.live >= self.target:
            self.all_live.set()


class Track:
    """One client's position and what it saw, across its connections."""

    __slots__ = (
        "before_reply",
        "channel",
        "duplicates",
        "epoch",
        "expected",
        "fleet",
        "foreign",
        "gaps",
        "live_at",
        "messages",
        "prefix",
        "reason",
        "recovered",
        "recovering",
        "replay_done_at",
        "replayed",
        "since",
        "subscribed_at",
        "top",
        "unexpected_replies",
    )

    def __init__(self, channel: str, fleet: Fleet) -> None:
        self.channel = channel
        self.fleet = fleet
        self.prefix = b'{"channel":' + json.dumps(channel).encode() + b',"offset":'
        self.epoch: str | None = None
        self.expected = 0
        """The next offset due: last seen + 1."""
        self.recovering = False
        self.since = 0
        self.top = 0
        self.recovered: bool | None = None
        self.reason: str | None = None
        self.subscribed_at: float | None = None
        self.replay_done_at: float | None = None
        self.live_at: float | None = None
        self.messages = 0
        self.replayed = 0
        self.gaps = 0
        """Offsets that skipped ahead of the one due (each jump counts once)."""
        self.duplicates = 0
        """Offsets at or below the last one seen."""
        self.foreign = 0
        """Envelopes of another channel."""
        self.before_reply = 0
        """Envelopes that came before the ``subscribed`` reply."""
        self.unexpected_replies: Counter[str] = Counter()

    @property
    def last(self) -> int:
        return self.expected - 1

    @property
    def violations(self) -> int:
        return self.gaps + self.duplicates + self.foreign + self.before_reply

    def subscribe_path(self) -> str:
        return f"/?channel={quote(self.channel, safe='')}"

    def resume_path(self) -> str:
        position = f"{self.channel}:{self.epoch or NO_EPOCH}:{self.last}"
        return f"/?since={quote(position, safe=':')}"

    def begin_recovery(self) -> dict[str, int]:
        """Switch to checking a resume; return (and zero) the checks made so far."""
        before = {
            "messages": self.messages,
            "gaps": self.gaps,
            "duplicates": self.duplicates,
            "foreign": self.foreign,
            "before_reply": self.before_reply,
        }
        self.messages = self.gaps = self.duplicates = self.foreign = self.before_reply = 0
        self.recovering = True
        self.since = self.last
        self.subscribed_at = self.replay_done_at = self.live_at = None
        return before

    def on_reply(self, reply: Any, now: float) -> bool:
        """A non-envelope frame; True if it is this channel's ``subscribed`` reply."""
        if not isinstance(reply, dict) or reply.get("type") != "subscribed":
            kind = reply.get("type") if isinstance(reply, dict) else None
            self.unexpected_replies[str(kind)] += 1
            return False
        if reply.get("channel") != self.channel or self.subscribed_at is not None:
            self.unexpected_replies["subscribed (other channel or twice)"] += 1
            return False
        self.subscribed_at = now
        top = reply.get("offset")
        self.top = top if isinstance(top, int) else 0
        if not self.recovering:
            epoch = reply.get("epoch")
            self.epoch = epoch if isinstance(epoch, str) else None
            self.expected = self.top + 1
            return True
        if reply.get("recovered") is True:
            self.recovered = True
            if reply.get("epoch", self.epoch) != self.epoch:
                self.unexpected_replies["recovered, in another epoch"] += 1
            if self.top < self.since:  # the server claims a recovery from the future
                self.unexpected_replies["recovered, offset below the position"] += 1
            if self.top <= self.since:
                self.replay_done_at = now
        else:
            self.recovered = False
            reason = reply.get("reason")
            self.reason = str(reason) if "recovered" in reply else "no 'recovered' field"
            self.expected = self.top + 1  # told: nothing from before comes
            self.replay_done_at = now
        return True

    def on_message(self, offset: int, now: float) -> None:
        self.messages += 1
        if self.subscribed_at is None:
            self.before_reply += 1
        expected = self.expected
        if offset == expected:
            self.expected = offset + 1
        elif offset > expected:
            self.gaps += 1
            self.expected = offset + 1
        else:
            self.duplicates += 1
        if not self.recovering:
            return
        if offset <= self.top:
            if self.recovered:
                self.replayed += 1
                if offset == self.top:
                    self.replay_done_at = now
        elif self.live_at is None:
            self.live_at = now
            if self.replay_done_at is None:  # the replay never completed
                self.replay_done_at = now
            self.fleet.went_live()


class Resumer(OffsetReader):
    """One connection of a tracked client: every message's offset goes to its Track."""

    __slots__ = ("track",)

    def __init__(
        self,
        pool: Pool,
        request: bytes,
        accept: bytes,
        ready: asyncio.Future[None],
        track: Track,
    ) -> None:
        super().__init__(pool, request, accept, 1, ready)
        self.track = track

    @property
    def prefix(self) -> bytes:
        return self.track.prefix

    def on_offset(self, offset: int, now: float) -> None:
        self.track.on_message(offset, now)

    def on_foreign(self) -> None:
        self.track.foreign += 1

    def on_reply(self, payload: bytes, now: float) -> None:
        self._tracked_reply(payload, now)

    def _tracked_reply(self, payload: bytes, now: float) -> None:
        self.pool.replies += 1
        try:
            reply = json.loads(payload)
        except ValueError:
            reply = None
        if self.track.on_reply(reply, now) and not self.ready.done():
            self.ready.set_result(None)
