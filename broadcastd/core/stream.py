"""Streams: every channel's position (epoch, offset) and its bounded history.

A message's position is ``(epoch, offset)``. The offset counts a channel's
messages from 1; the epoch is a short random string naming one continuous life
of that count, so two messages with the same position are the same message.
The epoch of a channel changes exactly when its count restarts:

* the channel is first used (subscribed to or published to) in this life of the
  store: with the memory broker, every process start;
* the channel was forgotten: it had no local subscriber and either the store
  needed room for another (``max_streams``) or its whole history expired.

A channel with a subscriber is never forgotten, so a connected client never sees
its channel's count restart.

History keeps, per channel, the last ``size`` publications for ``ttl`` seconds,
as Publication objects whose encoded frame is built once and shared by fan-out
and replays. A global byte budget evicts the oldest entries across all channels;
one FIFO of every kept entry, oldest first, serves both the budget and the TTL
sweep. The store is pure data: the clock and the epoch source are handed in.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

from broadcastd.core.envelope import Payload, channel_prefix, envelope_frame
from broadcastd.core.forms import Form, encode
from broadcastd.errors import BadCommand, ChannelTableFull, ClientError

ENTRY_OVERHEAD = 200
"""Bytes an entry costs besides its payload (objects, list and FIFO slots): counted
against the byte budget so that the budget bounds real memory."""


class Position(NamedTuple):
    epoch: str
    offset: int


class Last(NamedTuple):
    """A new subscriber asks for the last ``number`` messages kept (a chat tail)."""

    number: int


Since = Position | Last
"""Where a subscriber asks to start: after a position it saw, or the last N."""

MAX_EPOCH_LENGTH = 64


def parse_since(value: object) -> Since:
    """The in-band form: ``{"epoch": "...", "offset": 41}`` or ``{"last": 5}``, its
    numbers bounded as in the URL form (MAX_OFFSET)."""
    if isinstance(value, dict):
        if set(value) == {"last"} and _count(value["last"]):
            return Last(value["last"])
        if set(value) == {"epoch", "offset"}:
            epoch, offset = value["epoch"], value["offset"]
            if _epoch(epoch) and _offset(offset):
                return Position(epoch, offset)
    raise BadCommand('since must be {"epoch": "...", "offset": N} or {"last": N}')


def parse_since_text(text: str) -> tuple[str, Since]:
    """The URL form: ``CHANNEL:EPOCH:OFFSET`` or ``CHANNEL:last:N`` (a channel name
    may hold ``:``; the last two fields never do)."""
    channel, _, rest = text.rpartition(":")
    channel, _, kind = channel.rpartition(":")
    number = decimal(rest, MAX_OFFSET)
    if channel and number is not None:
        if kind == "last":
            if _count(number):
                return channel, Last(number)
        elif _epoch(kind):
            return channel, Position(kind, number)
    raise ClientError("since must be CHANNEL:EPOCH:OFFSET or CHANNEL:last:N")


MAX_OFFSET = 2**63 - 1
"""Largest offset or count a client may name: a signed 64-bit integer, the range
of the counters Redis keeps."""


def decimal(text: str, maximum: int) -> int | None:
    """``text`` as an integer from 0 to ``maximum``, or None.

    Only ASCII digits count (``str.isdigit()`` also accepts ``²`` and other
    Unicode digits, which ``int()`` then refuses with a ValueError), and no more
    of them than ``maximum`` has, so ``int()`` never sees a number of thousands
    of digits (which it refuses too).
    """
    if 0 < len(text) <= len(str(maximum)) and text.isascii() and text.isdigit():
        value = int(text)
        if value <= maximum:
            return value
    return None


def _epoch(value: object) -> bool:
    return (
        isinstance(value, str)
        and 0 < len(value) <= MAX_EPOCH_LENGTH
        and value.isascii()
        and value.replace("-", "").replace("_", "").isalnum()
    )


def _offset(value: object) -> bool:
    """An offset or count as a client may name one: an integer, 0 to MAX_OFFSET."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_OFFSET


def _count(value: object) -> bool:
    return _offset(value) and value > 0  # type: ignore[operator]


class Publication:
    """One message at its position: what fan-out delivers and history keeps."""

    __slots__ = ("_frame", "epoch", "offset", "payload", "prefix", "size", "stream", "time")

    def __init__(
        self, prefix: bytes, epoch: str, offset: int, payload: Payload, time: float
    ) -> None:
        self.prefix = prefix
        self.epoch = epoch
        self.offset = offset
        self.payload = payload
        self.time = time
        self._frame: bytes | None = None
        self.stream: Stream | None = None
        """The stream keeping it in history (None when not kept)."""
        raw = 0 if payload.raw is payload.json else len(payload.raw)
        self.size = 2 * len(payload.json) + raw + ENTRY_OVERHEAD
        """What keeping it costs, for the byte budget (the frame repeats the JSON)."""

    def frame(self) -> bytes:
        """The JSON-mode text frame, encoded on first use only."""
        frame = self._frame
        if frame is None:
            frame = self._frame = envelope_frame(self.prefix, self.offset, self.payload)
        return frame

    def encoded(self, form: Form) -> bytes:
        """The message in ``form``; only the JSON frame, the form of most
        subscribers and of replays, is kept (and counted in ``size``)."""
        if form is Form.FRAME:
            return self.frame()
        return encode(form, self.prefix, self.epoch, self.offset, self.payload)


class Stream:
    """One channel's count and the publications kept of it, oldest first."""

    __slots__ = ("entries", "epoch", "name", "offset", "prefix", "size", "ttl")

    def __init__(self, name: str, epoch: str, size: int, ttl: float) -> None:
        self.name = name
        self.epoch = epoch
        self.offset = 0
        self.prefix = channel_prefix(name)
        self.entries: list[Publication] = []
        self.size = size
        """Most entries kept (0: none); its namespace's, or the top-level one."""
        self.ttl = ttl

    @property
    def position(self) -> Position:
        return Position(self.epoch, self.offset)


class Evictions:
    """Entries evicted from history so far, by cause; channels forgotten."""

    __slots__ = ("budget", "channels", "size", "ttl")

    def __init__(self) -> None:
        self.size = 0
        self.ttl = 0
        self.budget = 0
        self.channels = 0


class Streams:
    """The positions and histories of every channel one process assigns."""

    def __init__(
        self,
        *,
        size: int,
        ttl: float,
        max_bytes: int,
        max_streams: int,
        new_epoch: Callable[[], str],
        clock: Callable[[], float],
        options: Callable[[str], tuple[int, float]] | None = None,
    ) -> None:
        self.size = size
        """The largest history size of any channel (0: history is off everywhere)."""
        self.ttl = ttl
        self.options = options or (lambda name: (size, ttl))
        """A channel's (size, ttl): its namespace's."""
        self.max_bytes = max_bytes
        self.max_streams = max_streams
        self.new_epoch = new_epoch
        self.clock = clock
        self._streams: dict[str, Stream] = {}
        self._idle: dict[str, None] = {}
        """Streams without local subscribers, least recently used first: the ones
        that may be forgotten."""
        self._fifo: deque[Publication] = deque()
        """Every kept entry, oldest first (and some already dropped by the size cap,
        skipped when reached)."""
        self.bytes = 0
        self.entries = 0
        self.evicted = Evictions()

    def __len__(self) -> int:
        return len(self._streams)

    def __contains__(self, name: object) -> bool:
        return name in self._streams

    def __iter__(self) -> Iterator[Stream]:
        return iter(self._streams.values())

    def get(self, name: str) -> Stream | None:
        return self._streams.get(name)

    def has_room_for(self, names: Sequence[str]) -> bool:
        """Whether every one of ``names`` can be used without refusing any: room for
        one new stream is room for all (the first one made is idle, so forgettable)."""
        if len(self._streams) < self.max_streams or self._idle:
            return True
        return all(name in self._streams for name in names)

    def open(self, name: str) -> Stream:
        """The stream of ``name``, begun (with a new epoch) if the store has none."""
        stream = self._streams.get(name)
        if stream is not None:
            return stream
        if len(self._streams) >= self.max_streams:
            if not self._idle:
                raise ChannelTableFull(
                    f"the server holds {self.max_streams} channels, all with subscribers"
                )
            self._forget(self._streams[next(iter(self._idle))])
        stream = self._streams[name] = Stream(name, self.new_epoch(), *self.options(name))
        self._idle[name] = None
        return stream

    def pin(self, name: str) -> Stream:
        """A local subscriber holds ``name``: it must not be forgotten."""
        stream = self.open(name)
        self._idle.pop(name, None)
        return stream

    def unpin(self, name: str) -> None:
        if name in self._streams:
            self._idle[name] = None

    def append(self, name: str, payload: Payload) -> Publication:
        """Give ``payload`` the channel's next position and keep it in history."""
        stream = self._streams.get(name)
        if stream is None:
            stream = self.open(name)
        elif name in self._idle:  # keep recently used idle streams the longest
            del self._idle[name]
            self._idle[name] = None
        stream.offset += 1
        publication = Publication(stream.prefix, stream.epoch, stream.offset, payload, self.clock())
        if stream.size:
            self._keep(stream, publication)
        return publication

    def _keep(self, stream: Stream, publication: Publication) -> None:
        entries = stream.entries
        entries.append(publication)
        publication.stream = stream
        self._fifo.append(publication)
        if len(entries) > stream.size:  # the usual case once a channel is warm: one in, one out
            first = entries.pop(0)
            first.stream = None
            self.bytes += publication.size - first.size
            self.evicted.size += 1
        else:
            self.entries += 1
            self.bytes += publication.size
        fifo = self._fifo
        while self.bytes > self.max_bytes and fifo:
            entry = fifo.popleft()
            oldest = entry.stream
            if oldest is not None:  # not yet dropped for size or TTL
                self._drop_first(oldest)
                self.evicted.budget += 1
        if len(fifo) > 2 * self.entries + 1024:
            self._fifo = deque(e for e in fifo if e.stream is not None)

    def _drop_first(self, stream: Stream) -> None:
        entry = stream.entries.pop(0)
        entry.stream = None
        self.entries -= 1
        self.bytes -= entry.size

    def expire(self) -> int:
        """Drop every entry older than its channel's TTL, oldest first, up to the first
        that is not; forget idle streams whose history is then empty. Returns how many
        entries went. Cost: O(entries expired). (With TTLs that differ by namespace an
        entry of a short TTL behind one of a longer TTL waits for it here; reads
        never return it, as ``_live`` applies each channel's own TTL.)"""
        if not self.size:
            return 0
        now = self.clock()
        fifo = self._fifo
        expired = 0
        while fifo:
            entry = fifo[0]
            stream = entry.stream
            if stream is not None and entry.time >= now - stream.ttl:
                break
            fifo.popleft()
            if stream is not None:
                self._drop_first(stream)
                expired += 1
                if not stream.entries and stream.name in self._idle:
                    self._forget(stream)
        self.evicted.ttl += expired
        return expired

    def _forget(self, stream: Stream) -> None:
        while stream.entries:
            self._drop_first(stream)
        del self._streams[stream.name]
        self._idle.pop(stream.name, None)
        self.evicted.channels += 1

    def since(self, name: str, offset: int, limit: int) -> list[Publication] | None:
        """The kept publications of ``name`` after ``offset``, oldest first, at most
        ``limit``; None when history no longer reaches back to ``offset + 1``."""
        stream = self._streams.get(name)
        if stream is None:
            return None
        entries = self._live(stream)
        if offset >= stream.offset:
            return []
        if not entries or entries[0].offset > offset + 1:
            return None
        start = offset + 1 - entries[0].offset
        return entries[start : start + limit]

    def latest(self, name: str, count: int) -> list[Publication]:
        """The last ``count`` kept publications of ``name``, oldest first."""
        stream = self._streams.get(name)
        if stream is None or count <= 0:
            return []
        return self._live(stream)[-count:]

    def _live(self, stream: Stream) -> list[Publication]:
        """The stream's entries, less any that expired since the last sweep."""
        entries = stream.entries
        if entries and entries[0].time < self.clock() - stream.ttl:
            horizon = self.clock() - stream.ttl
            while entries and entries[0].time < horizon:
                self._drop_first(stream)
                self.evicted.ttl += 1
        return entries


class Recovery(NamedTuple):
    """What a subscriber that gave a position gets: the messages after it, or a
    plain reason why they cannot be had (and then nothing from before)."""

    recovered: bool
    reason: str | None
    replay: list[Publication]


NOT_KEPT = "disabled"
"""Reasons a recovery fails (the README lists them): history is off for the channel,"""
OTHER_EPOCH = "epoch"
"""the count restarted since (another epoch),"""
AHEAD = "position"
"""the position is past the channel's latest (it never existed),"""
TOO_MANY = "too_many"
"""more messages were missed than ``history.max_recover``,"""
TOO_OLD = "too_old"
"""or history no longer reaches back to it (size, TTL or byte budget)."""


def plan_recovery(
    top: Position,
    since: Position,
    max_recover: int,
    read: Callable[[int, int], list[Publication] | None] | None,
) -> Recovery:
    """Decide a recovery from ``since`` given the channel's ``top`` position and a
    reader of history (``read(after_offset, limit)``; None when history is off)."""
    if since.epoch != top.epoch:
        return Recovery(False, OTHER_EPOCH, [])
    missed = top.offset - since.offset
    if missed < 0:
        return Recovery(False, AHEAD, [])
    if missed == 0:
        return Recovery(True, None, [])
    if read is None:
        return Recovery(False, NOT_KEPT, [])
    if missed > max_recover:
        return Recovery(False, TOO_MANY, [])
    replay = read(since.offset, missed)
    if replay is None or len(replay) != missed:
        return Recovery(False, TOO_OLD, [])
    return Recovery(True, None, replay)
