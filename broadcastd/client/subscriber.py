"""The subscriber: one connection, kept up, resumed where it stopped.

One :class:`Subscriber` is one connection to the daemon (in JSON mode), kept up
across failures: when it drops, the subscriber waits (exponential backoff with
full jitter, see :class:`~broadcastd.client.Backoff`) and reconnects asking each
channel to resume after the last message it yielded
(``since=CHANNEL:EPOCH:OFFSET`` in the URL). The daemon then replays what was
missed, or says it cannot (``recovered: false``): that outcome is an event of the
stream, never dropped.

The stream is pulled: the connection reads ahead at most ``max_queue`` frames,
then stops reading until the program catches up, so a program that falls behind
holds the daemon back through TCP (the daemon then applies its slow-consumer
policy to this one client) instead of piling messages up in this process; and no
message may be larger than ``max_size``, so what is read ahead is bounded in
bytes too, whatever the peer sends. The connection itself is
:class:`~broadcastd.client.connection.Connection`, made for this: about 3 µs of
CPU per message in all, where a general WebSocket library spends more than that
on parsing the frame alone. With ``transport="sse"`` it is the daemon's
Server-Sent Events stream instead
(:class:`~broadcastd.client.eventstream.EventStreamConnection`), with the same
events and the same resume; being one-way, the stream is reopened where a
WebSocket would carry a command.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import ssl as ssl_module
import time
from collections import deque
from collections.abc import Awaitable, Callable, Collection, Coroutine, Iterable, Mapping
from dataclasses import replace
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

import msgspec

from broadcastd.client.backoff import Backoff
from broadcastd.client.connection import (
    DEFAULT_MAX_SIZE,
    TOO_BIG,
    Closed,
    Connection,
    HandshakeFailed,
    HandshakeRefused,
)
from broadcastd.client.errors import (
    BroadcastdError,
    ClosedByServer,
    CommandRefused,
    MessagesLost,
    MessageTooBig,
    NetworkError,
    RequestRefused,
    Unavailable,
    refusal,
)
from broadcastd.client.events import (
    DEFAULT_EVENTS,
    Authenticated,
    CommandFailed,
    Event,
    Expiring,
    Join,
    Leave,
    Message,
    Missed,
    Other,
    Position,
    Recovered,
    Resync,
    State,
    StateChanged,
    Subscribed,
    Unsubscribed,
)
from broadcastd.client.eventstream import EventStreamConnection
from broadcastd.client.presence import PresencePage, PresenceStats, presence_page, presence_stats

Link = Connection | EventStreamConnection
"""A connection to the daemon: a WebSocket or an event stream."""
TRANSPORTS = ("websocket", "sse")
TokenSource = Callable[[], Awaitable[str | None]]
"""An async callable giving the token of the moment (None: connect without one)."""

GIVE_UP_CODES = frozenset((1003, 1007, 1008, 1009))
"""Close codes that mean the client is at fault: reconnecting would fail again."""
TOKEN_CODES = frozenset((4001, 4002, 4003))
"""Closes for want of a (valid, current) token: worth a reconnection only with a
``get_token`` that may give a better one."""
CLOSE_CODE_NAMES = {
    1003: "binary_frame",
    1007: "invalid_utf8",
    1008: "policy_violation",
    1009: "message_too_big",
    4001: "authentication_required",
    4002: "invalid_token",
    4003: "token_expired",
}
RETRIED_CODES = frozenset(("broker_unavailable",))
"""Subscribe refusals that a later attempt may not meet (Redis did not answer in
time): the subscriber sends the subscribe again by itself."""
RESUBSCRIBE_DELAY = (0.5, 2.0)
"""Bounds of the random wait before a subscribe refused for a passing reason is
sent again."""

_decode = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode


class Tracker:
    """The channels wanted and where each one's stream stands.

    A channel's position is (epoch, offset) of the last message seen: the epoch
    comes from the ``subscribed`` reply (message frames do not repeat it), the
    offset from each message, and a ``resync`` moves it. :meth:`query` gives the
    next connection's URL parameters: ``since=CHANNEL:EPOCH:OFFSET`` for every
    channel with a position and ``channel=CHANNEL`` for the others (new ones, or
    a daemon that sends no epoch). :meth:`feed` turns one frame into a typed
    :class:`~broadcastd.client.Message` or event, noting positions on the way.
    """

    def __init__(self, channels: Iterable[str] = ()) -> None:
        self.channels: dict[str, None] = dict.fromkeys(channels)
        """The channels wanted, in the order given (a dict as an ordered set)."""
        # Epochs and offsets apart: a message only stores its offset, with no
        # Position made for each one.
        self._epochs: dict[str, str] = {}
        self._offsets: dict[str, int] = {}
        self.client: str | None = None
        """This connection's client id, as the daemon told it in its first reply
        (what the server API names it by); None until then."""
        self.user: str | None = None
        """The token's user, as the daemon told it."""

    @property
    def positions(self) -> dict[str, Position]:
        """Each channel's position (a new dict: change it with the setter)."""
        offsets = self._offsets
        return {c: Position(epoch, offsets[c]) for c, epoch in self._epochs.items()}

    @positions.setter
    def positions(self, positions: Mapping[str, Position | tuple[str, int]]) -> None:
        self._epochs, self._offsets = {}, {}
        for channel, at in positions.items():
            self.set_position(channel, Position(*at))

    def position(self, channel: str) -> Position | None:
        epoch = self._epochs.get(channel)
        return None if epoch is None else Position(epoch, self._offsets[channel])

    def set_position(self, channel: str, at: Position) -> None:
        self._epochs[channel] = at.epoch
        self._offsets[channel] = at.offset

    def forget(self, channel: str) -> None:
        """No position for ``channel``: the next connection subscribes it afresh."""
        self._epochs.pop(channel, None)
        self._offsets.pop(channel, None)

    def query(self) -> list[tuple[str, str]]:
        """The query string parameters of the next connection."""
        query: list[tuple[str, str]] = []
        for channel in self.channels:
            epoch = self._epochs.get(channel)
            if epoch is None:
                query.append(("channel", channel))
            else:
                query.append(("since", f"{channel}:{epoch}:{self._offsets[channel]}"))
        return query

    def feed(self, text: str) -> Message | Event:
        """One frame as received, typed; positions follow it."""
        try:
            doc = _decode(text)
        except msgspec.DecodeError:
            return Other(None, {}, frame=text)
        return self.note(doc, text)

    def note(self, doc: Any, text: str) -> Message | Event:
        """A frame already decoded (``doc``) as received (``text``), typed."""
        if type(doc) is not dict:
            return Other(None, {}, frame=text)
        kind = doc.get("type")
        if kind is None:
            channel = doc.get("channel")
            if type(channel) is str and "data" in doc:
                offset = doc.get("offset")
                epoch = self._epochs.get(channel)
                if type(offset) is not int:
                    offset = 0
                elif epoch is not None:
                    self._offsets[channel] = offset
                return Message(channel, offset, epoch, doc["data"], frame=text)
            return Other(None, doc, frame=text)
        channel = doc.get("channel")
        client = doc.get("client")
        if kind in ("join", "leave") and type(channel) is str and type(client) is str:
            user = doc.get("user")
            event = Join if kind == "join" else Leave
            return event(channel, client, user if type(user) is str else None, frame=text)
        if type(client) is str and kind in ("subscribed", "authenticated"):
            user = doc.get("user")
            self.client, self.user = client, user if type(user) is str else None
        if kind == "subscribed" and type(channel) is str:
            return self._subscribed(channel, doc, text)
        if kind == "resync" and type(channel) is str:
            epoch, offset = doc.get("epoch"), doc.get("offset")
            if type(epoch) is str and type(offset) is int:
                if channel in self.channels:
                    self.set_position(channel, Position(epoch, offset))
                return Resync(channel, epoch, offset, str(doc.get("reason")), frame=text)
        elif kind == "missed":
            count = doc.get("count")
            missed_channel = channel if type(channel) is str else None
            return Missed(missed_channel, count if type(count) is int else 0, frame=text)
        elif kind == "unsubscribed" and type(channel) is str:
            return Unsubscribed(channel, frame=text)
        elif kind == "error":
            op = doc.get("op")
            return CommandFailed(
                op if type(op) is str else None,
                None,
                str(doc.get("code")),
                str(doc.get("message", "")),
                frame=text,
            )
        elif kind == "authenticated":
            user, expires, op = doc.get("user"), doc.get("expires"), doc.get("op", "connect")
            return Authenticated(
                user if type(user) is str else None,
                expires if type(expires) is int else None,
                str(op),
                frame=text,
            )
        elif kind == "expiring" and type(doc.get("expires")) is int:
            return Expiring(doc["expires"], frame=text)
        return Other(kind if type(kind) is str else None, doc, frame=text)

    def _subscribed(self, channel: str, reply: dict[str, Any], text: str) -> Message | Event:
        epoch, offset, recovered = reply.get("epoch"), reply.get("offset"), reply.get("recovered")
        if type(epoch) is not str or type(offset) is not int:
            # A daemon without epochs: nothing to resume from; subscribe afresh.
            self.forget(channel)
            return Subscribed(
                channel,
                epoch if type(epoch) is str else None,
                offset if type(offset) is int else 0,
                frame=text,
            )
        if recovered is True and self._epochs.get(channel) == epoch:
            # The replay that follows brings the offset up to date.
            return Recovered(channel, True, None, epoch, offset, frame=text)
        if channel in self.channels:
            self.set_position(channel, Position(epoch, offset))
        if recovered is None:
            return Subscribed(channel, epoch, offset, frame=text)
        reason = reply.get("reason")
        return Recovered(
            channel,
            recovered is True,
            reason if type(reason) is str else None,
            epoch,
            offset,
            frame=text,
        )


def _lost_messages(item: Event) -> bool:
    if type(item) is Recovered:
        return not item.recovered
    return type(item) is Resync or type(item) is Missed


class Stream:
    """The messages and events of a :class:`Subscriber`, as an async iterator.

    Yields each :class:`~broadcastd.client.Message`, and each event whose type is
    in ``events``. An event that reports lost messages or a refused command but
    whose type was left out of ``events`` is raised instead
    (:class:`~broadcastd.client.MessagesLost`,
    :class:`~broadcastd.client.CommandRefused`), so that it cannot pass unseen;
    the stream stays usable after it: iterate it again to carry on. It ends
    (``StopAsyncIteration``) after :meth:`Subscriber.close`, and raises the
    error that ended it for good (a handshake refused with a 4xx,
    :class:`~broadcastd.client.ClosedByServer`,
    :class:`~broadcastd.client.MessageTooBig`).

    One task at a time may iterate it.
    """

    def __init__(self, subscriber: Subscriber, events: frozenset[type[Event]]) -> None:
        self._subscriber = subscriber
        self._events = events

    def __aiter__(self) -> Stream:
        return self

    async def __anext__(self) -> Message | Event:
        subscriber = self._subscriber
        events = self._events
        while True:
            item = subscriber._poll()
            if item is None:
                item = await subscriber._next()
            kind = type(item)
            if kind is Message or kind in events:
                return item
            assert isinstance(item, Event)
            if _lost_messages(item):
                assert isinstance(item, Recovered | Resync | Missed)
                raise MessagesLost(item)
            if kind is CommandFailed:
                assert isinstance(item, CommandFailed)
                if item.op != "connect" and not item.retrying:
                    raise CommandRefused(item)

    async def aclose(self) -> None:
        """Close the subscriber (the stream's end)."""
        await self._subscriber.close()


class Subscriber:
    """A subscriber connection to broadcastd, kept up and resumed.

    ::

        async with Subscriber("ws://127.0.0.1:8765", get_token=fetch_token) as sub:
            async for item in sub.subscribe("news", "sport"):
                if isinstance(item, Message):
                    handle(item.channel, item.data)
                elif isinstance(item, Recovered) and not item.recovered:
                    reload(item.channel)  # messages were lost meanwhile

    ``url`` is the daemon's WebSocket address, without channels. ``token`` is sent
    as ``Authorization: Bearer`` at each connection; ``get_token``, an async
    callable, is asked for the token of the moment instead: at each
    (re)connection, and when the daemon says the token is ``expiring`` (the new
    one is then sent as a ``refresh`` command, unless it is the same token, in
    which case the daemon closes with 4003 at expiry and the reconnection asks
    again). Without ``get_token`` a token refused or expired ends the stream
    (:class:`~broadcastd.client.ClosedByServer`).

    Reconnection waits a random time in [0, min(max_backoff, min_backoff *
    2**n)] after the n-th consecutive failure; the count starts again only after
    a connection stayed up ``stable_after`` seconds. It gives up on a handshake
    refused with a 4xx and on close codes 1003, 1007, 1008, 1009; a 503 waits at
    least its ``Retry-After`` (up to ``max_backoff``).

    ``max_size`` (bytes; 1 MiB by default) is the largest message accepted. A
    frame that announces more, or fragments that add up to more, fail the
    connection with close code 1009 as soon as the frame's header is read, before
    any of it is kept, and end the stream with
    :class:`~broadcastd.client.MessageTooBig`: it is not retried, because the
    daemon would replay the same message to the reconnection, again and again.
    The daemon's frames are at most its ``control.max_payload_bytes`` (64 KiB by
    default) plus 256 bytes; raise ``max_size`` above that if the daemon allows
    larger payloads. There is no unlimited setting: ``max_size`` is what keeps a
    peer that is not a well-behaved daemon from filling this process's memory.

    ``max_queue`` is how many frames the connection reads ahead of the program
    before it stops reading the socket (so at most about ``max_queue *
    max_size`` bytes are held); ``open_timeout`` bounds a connection
    attempt (TCP, TLS and handshake); ``ping_interval`` (None: off) is how long
    the daemon may stay silent before a ping asks whether it is still there (and
    as long again for any answer before the connection is given up); ``headers``
    are added to each handshake (an ``Origin``, say); ``ssl`` is the TLS context
    for ``wss://`` (the default verifies the daemon's certificate). ``rng``
    draws the backoff's jitter (seeded, for tests).

    ``transport="sse"`` reads the daemon's Server-Sent Events stream on the same
    URL (asked over ``http://`` or ``https://``) with the same messages, events
    and resume: a reconnection sends the last event's id back as
    ``Last-Event-ID`` (and every position as ``since``). The stream is one-way,
    so :meth:`add`, :meth:`remove` and a token refreshed on ``expiring`` reopen
    it (what it had received is kept, and not asked for again), and
    :meth:`presence` raises :class:`~broadcastd.client.BroadcastdError`
    (``one_way``). A stream silent for ``2 * ping_interval`` is given up.
    """

    def __init__(
        self,
        url: str = "ws://127.0.0.1:8765",
        *,
        token: str | None = None,
        get_token: TokenSource | None = None,
        max_backoff: float = 30.0,
        min_backoff: float = 0.5,
        stable_after: float = 10.0,
        headers: Mapping[str, str] | None = None,
        open_timeout: float = 10.0,
        ping_interval: float | None = 20.0,
        max_queue: int = 1024,
        max_size: int = DEFAULT_MAX_SIZE,
        ssl: ssl_module.SSLContext | None = None,
        rng: random.Random | None = None,
        transport: str = "websocket",
    ) -> None:
        if transport not in TRANSPORTS:
            raise ValueError(f"transport is 'websocket' or 'sse'; got {transport!r}")
        parts = urlsplit(url)
        schemes = ("ws", "wss") if transport == "websocket" else ("ws", "wss", "http", "https")
        if parts.scheme not in schemes or not parts.netloc:
            raise ValueError(f"a subscriber URL is ws://HOST[:PORT] or wss://...; got {url!r}")
        if transport == "sse":
            # The same URL as the WebSocket's, asked over plain HTTP(S).
            parts = parts._replace(
                scheme={"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
            )
        if max_size < 1:
            raise ValueError(f"max_size must be at least 1 byte; got {max_size}")
        self._base = urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/") + "/", "", ""))
        self._base_query = parts.query
        self._token = token
        self._get_token = get_token
        self._headers = dict(headers or {})
        self._open_timeout = open_timeout
        self._ping_interval = ping_interval
        self._max_queue = max_queue
        self._max_size = max_size
        self._ssl = ssl
        self.transport = transport
        """``"websocket"`` or ``"sse"``, as given."""
        self._last_event_id: str | None = None
        """The id of the last event of the last stream (SSE), sent back as
        ``Last-Event-ID`` by the next one if it names the same channels."""
        self._id_channels: tuple[str, ...] = ()
        """The channels of the stream that made that id, in its URL's order."""
        self._fresh_token: str | None = None
        """A token given by ``get_token`` for the next stream (SSE: a refresh)."""
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not secrecy
        self._backoff = Backoff(min_backoff, max_backoff, stable_after, self._rng)
        self._tracker = Tracker()
        self.state = State.DISCONNECTED
        """The connection's state now (changes are also events of the stream)."""
        self._stream: Stream | None = None
        self._conn: Link | None = None
        self._pending: deque[Message | Event] = deque()
        self._deferred: BaseException | None = None
        """An error from a background step (``get_token`` while refreshing), raised
        by the next step of the stream."""
        self._fatal: BaseException | None = None
        """What ended the stream for good, raised once the pending events are out."""
        self._delay: float | None = None
        """Seconds to wait before the next connection attempt."""
        self._closing = False
        self._stopped = asyncio.Event()
        """Set by close(): ends waits."""
        self._wake = asyncio.Event()
        """Set by add() and close(): ends the wait of a subscriber without channels."""
        self._ids = itertools.count(1)
        self._commands: dict[int, tuple[str, str | None]] = {}
        """This connection's commands awaiting their reply: id -> (op, channel)."""
        self._unconfirmed: set[str] = set()
        """Channels of this connection's URL without a reply yet."""
        self._connect_error: CommandFailed | None = None
        self._token_used: str | None = None
        self._refreshed_for: int | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._requests: dict[int, asyncio.Future[tuple[Event, Any]]] = {}
        """This connection's requests awaiting their answer (presence): id -> future."""
        self._waiting = False
        """Whether a task waits on the connection for a frame."""
        self._turn: asyncio.Future[None] | None = None
        """Set when that wait ends, for another task that came to wait meanwhile."""

    # the public side

    def subscribe(
        self,
        *channels: str,
        since: Mapping[str, Position | tuple[str, int]] | None = None,
        events: Collection[type[Event]] = DEFAULT_EVENTS,
    ) -> Stream:
        """The stream of ``channels`` (more can be added later with :meth:`add`).

        ``since`` resumes channels from positions saved earlier (each one's epoch
        and the offset of the last message handled): the first connection asks
        for them as a reconnection would, and the outcome is a
        :class:`~broadcastd.client.Recovered` event.

        ``events`` are the event types yielded besides messages; by default the
        ones that report lost messages or a refused command
        (:data:`~broadcastd.client.DEFAULT_EVENTS`);
        :data:`~broadcastd.client.ALL_EVENTS` for everything, including
        :class:`~broadcastd.client.StateChanged`. Those two kinds are raised when
        left out (see :class:`Stream`): a loss is never silent.

        The connection opens when the stream is first iterated. A subscriber has
        one stream.
        """
        if self._stream is not None:
            raise RuntimeError("this Subscriber has its stream already: add channels with add()")
        if self._closing:
            raise RuntimeError("this Subscriber is closed")
        tracker = self._tracker
        for channel in channels:
            tracker.channels.setdefault(channel)
        for channel, at in (since or {}).items():
            tracker.channels.setdefault(channel)
            tracker.set_position(channel, Position(*at))
        self._stream = Stream(self, frozenset(events))
        return self._stream

    @property
    def channels(self) -> tuple[str, ...]:
        """The channels subscribed or to be subscribed at the next connection."""
        return tuple(self._tracker.channels)

    @property
    def positions(self) -> dict[str, Position]:
        """Each channel's position: save it to resume later with ``since``."""
        return self._tracker.positions

    @property
    def client(self) -> str | None:
        """This connection's client id, as the daemon told it in its first reply
        (what the server API and presence entries name it by; None until then,
        and a new one at each reconnection)."""
        return self._tracker.client

    @property
    def user(self) -> str | None:
        """The token's user (its ``sub``), as the daemon told it; None without a token."""
        return self._tracker.user

    async def add(self, channel: str) -> None:
        """Subscribe to ``channel`` too, now if connected, else at the next connection.

        Returns once the command is sent: the outcome comes through the stream,
        a :class:`~broadcastd.client.Subscribed` event (if asked for) before the
        channel's first message, or a :class:`~broadcastd.client.CommandFailed`
        (a bad name, ``too_many_channels``, a token that does not allow it), after
        which the channel is no longer wanted.
        """
        if self._closing:
            raise RuntimeError("this Subscriber is closed")
        channels = self._tracker.channels
        if channel in channels:
            return
        channels[channel] = None
        self._wake.set()
        conn = self._conn
        if conn is not None:
            self._send_subscribe(conn, channel)

    async def remove(self, channel: str) -> None:
        """Stop receiving ``channel``: nothing more of it is yielded from now on,
        even what the daemon had sent already, and its position is forgotten."""
        tracker = self._tracker
        if channel not in tracker.channels:
            return
        del tracker.channels[channel]
        tracker.forget(channel)
        self._unconfirmed.discard(channel)
        conn = self._conn
        if conn is not None:
            self._command(conn, {"op": "unsubscribe", "channel": channel}, channel)

    async def presence(self, channel: str, cursor: str | None = None) -> PresencePage:
        """A page of who subscribes to ``channel``, asked of the daemon over this
        connection (a channel this connection subscribes to, in a namespace with
        ``presence_for_subscribers``): at most ``presence.max_page`` entries after
        ``cursor``, the ``next`` of the page before.

        A refusal raises :class:`~broadcastd.client.CommandRefused`
        (``not_subscribed``, ``presence_not_allowed``, ``presence_disabled``...);
        no connection, or one that closes before the answer,
        :class:`~broadcastd.client.NetworkError` (bound the wait with
        ``asyncio.timeout``). The answer may be awaited from the task that
        iterates the stream: while waiting, the frames received before it are kept
        for the stream, in order.
        """
        command: dict[str, Any] = {"op": "presence", "channel": channel}
        if cursor is not None:
            command["cursor"] = cursor
        return presence_page(await self._request(command))

    async def presence_stats(self, channel: str) -> PresenceStats:
        """How many clients and distinct users subscribe to ``channel``; asked and
        refused as :meth:`presence` is."""
        return presence_stats(await self._request({"op": "presence_stats", "channel": channel}))

    async def close(self) -> None:
        """Close the connection normally (1000) and end the stream. Idempotent."""
        if self._closing:
            return
        self._closing = True
        self._stopped.set()
        self._wake.set()
        self._cancel_tasks()
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()
        self._finish()

    async def __aenter__(self) -> Subscriber:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # the stream's steps

    def _poll(self) -> Message | Event | None:
        """The next item if it can be had without waiting (an event pending, a frame
        already received), else None. Most messages come this way, with no
        coroutine made for them."""
        while True:
            if self._pending:
                return self._pending.popleft()
            if self._deferred is not None:
                error, self._deferred = self._deferred, None
                raise error
            if self._fatal is not None:
                error, self._fatal = self._fatal, None
                raise error
            conn = self._conn
            if conn is None:
                if self.state is State.CLOSED:
                    raise StopAsyncIteration
                return None
            text = conn.pop()
            if text is None:
                return None
            try:
                doc = _decode(text)
            except msgspec.DecodeError:
                return Other(None, {}, frame=text)
            tracker = self._tracker
            item = tracker.note(doc, text)
            if type(item) is Message:
                if item.channel in tracker.channels:
                    return item
                continue  # removed meanwhile
            assert isinstance(item, Event)
            event = self._event(conn, item, doc)
            if event is not None:
                return event

    async def _next(self) -> Message | Event:
        """The next message or event, reading, reconnecting and waiting as needed."""
        while True:
            item = self._poll()
            if item is not None:
                return item
            conn = self._conn
            if conn is None:
                if self.state is State.CONNECTING:
                    await self._open()
                else:
                    await self._prepare()
                continue
            try:
                await self._wait_frame(conn)
            except Closed as exc:
                self._lost(conn, exc)

    async def _wait_frame(self, conn: Link) -> None:
        """Wait until ``conn`` holds a frame; raise :class:`Closed` when none will
        come. One task waits on the connection itself; another that comes to wait
        meanwhile (one awaiting :meth:`presence` beside the stream's) waits for
        that wait to end, then looks again."""
        if self._waiting:
            turn = self._turn
            if turn is None:
                turn = self._turn = asyncio.get_running_loop().create_future()
            await asyncio.shield(turn)  # a follower cancelled must not cancel the turn
            return
        self._waiting = True
        try:
            await conn.wait()
        finally:
            self._waiting = False
            turn, self._turn = self._turn, None
            if turn is not None:
                turn.set_result(None)

    async def _request(self, command: dict[str, Any]) -> Any:
        """Send ``command`` and return its answer (decoded), reading the
        connection until it comes if no other task does."""
        if self.transport == "sse":
            raise BroadcastdError(
                "one_way", f"{command['op']} needs a WebSocket: an event stream is one-way"
            )
        conn = self._conn
        if conn is None:
            raise NetworkError(f"not connected: {command['op']} needs an open connection")
        request_id = next(self._ids)
        answer: asyncio.Future[tuple[Event, Any]] = asyncio.get_running_loop().create_future()
        self._requests[request_id] = answer
        conn.send(_encode({**command, "id": request_id}).decode())
        try:
            while not answer.done():
                if self._conn is not conn:
                    raise NetworkError(f"the connection closed before the {command['op']}")
                self._drain(conn, answer)
                if not answer.done():
                    await self._wait_frame(conn)
        except Closed as exc:
            raise NetworkError(
                f"the connection closed ({exc.code}) before the {command['op']}"
            ) from None
        finally:
            self._requests.pop(request_id, None)
        item, doc = answer.result()
        if isinstance(item, CommandFailed):
            raise CommandRefused(replace(item, channel=command.get("channel")))
        return doc

    def _event(self, conn: Link, item: Event, doc: Any) -> Event | None:
        """Act on an event from the daemon; what to yield of it (None: nothing)."""
        if type(doc) is dict and "id" in doc:
            request = self._requests.pop(doc["id"], None)
            if request is not None:
                request.set_result((item, doc))
                return None
        command = self._commands.pop(doc["id"], None) if type(doc) is dict and "id" in doc else None
        wanted = self._tracker.channels
        if isinstance(item, Subscribed | Recovered):
            self._unconfirmed.discard(item.channel)
            return item if item.channel in wanted else None
        if isinstance(item, CommandFailed):
            return self._failed(conn, item, command)
        if isinstance(item, Expiring):
            self._expiring(conn, item.expires)
        return item

    def _failed(
        self, conn: Link, item: CommandFailed, command: tuple[str, str | None] | None
    ) -> CommandFailed | None:
        if item.op == "connect":
            self._connect_error = item
            return item
        channel = command[1] if command is not None else None
        if command is None and item.op == "subscribe" and len(self._unconfirmed) == 1:
            # One of the URL's channels was refused; which one is told only when
            # a single one is still unanswered.
            channel = self._unconfirmed.pop()
        if item.op == "unsubscribe" and item.code == "not_subscribed":
            return None  # not subscribed is what was asked for
        retrying = False
        wanted = self._tracker.channels
        if item.op == "subscribe" and channel is not None and channel in wanted:
            if item.code in RETRIED_CODES:
                retrying = True
                self._spawn(self._subscribe_later(conn, channel))
            else:
                del wanted[channel]
                self._tracker.forget(channel)
        return replace(item, channel=channel, retrying=retrying)

    async def _prepare(self) -> None:
        """Wait as the last failure asked, then say the next attempt begins (its own
        step, so that the program hears of it before the handshake, not after)."""
        if self._delay is not None:
            delay, self._delay = self._delay, None
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._stopped.wait()
        if self._closing:
            self._finish()
            return
        if not self._tracker.channels:
            # Nothing to subscribe to: the daemon would close an empty connection.
            self._wake.clear()
            await self._wake.wait()
            return
        self._set_state(State.CONNECTING)

    async def _open(self) -> None:
        """One connection attempt: the token of the moment, the handshake, and the
        commands for what changed while it was under way."""
        tracker = self._tracker
        token: str | None
        try:
            if self._fresh_token is not None:
                token, self._fresh_token = self._fresh_token, None
            elif self._get_token is not None:
                token = await self._get_token()
            else:
                token = self._token
        except Exception as exc:
            self._retry(error=exc)
            self._deferred = exc
            return
        if self._closing:
            self._finish()
            return
        channels = list(tracker.channels)
        query = urlencode(tracker.query())
        if self._base_query:
            query = f"{self._base_query}&{query}"
        headers = dict(self._headers)
        if token:
            headers["Authorization"] = f"Bearer {token}"
        url = urlsplit(f"{self._base}?{query}")
        if url.scheme in ("wss", "https") and self._ssl is None:
            self._ssl = ssl_module.create_default_context()  # once: it reads the CA files
        try:
            sse = self.transport == "sse"
            if sse and self._last_event_id and tuple(channels) == self._id_channels:
                headers["Last-Event-ID"] = self._last_event_id
            kind: type[EventStreamConnection] | type[Connection]
            kind = EventStreamConnection if sse else Connection
            conn: Link = await kind.open(
                url,
                headers=headers,
                ssl=self._ssl,
                open_timeout=self._open_timeout,
                max_queue=self._max_queue,
                max_size=self._max_size,
                ping_interval=self._ping_interval,
                ping_timeout=self._ping_interval,
            )
            if sse:
                self._id_channels, self._last_event_id = tuple(channels), None
        except HandshakeRefused as exc:
            error = _handshake_error(exc)
            if isinstance(error, RequestRefused):
                self._end(error)
            else:
                # The daemon's Retry-After, but never past max_backoff: the
                # program's bound on a wait wins over the daemon's advice.
                at_least = error.retry_after if isinstance(error, Unavailable) else None
                if at_least is not None:
                    at_least = min(at_least, self._backoff.cap)
                self._retry(error=error, at_least=at_least)
            return
        except (OSError, TimeoutError, HandshakeFailed) as exc:
            self._retry(error=exc)
            return
        if self._closing:
            await conn.close()
            self._finish()
            return
        # From here on add() and remove() send commands themselves: what changed
        # during the handshake is caught up below, from this one snapshot.
        self._conn = conn
        missing = [c for c in tracker.channels if c not in channels]
        dropped = [c for c in channels if c not in tracker.channels]
        self._commands.clear()
        self._requests.clear()
        self._unconfirmed = {c for c in channels if c in tracker.channels}
        self._connect_error = None
        self._token_used = token
        self._refreshed_for = None
        self._backoff.opened(time.monotonic())
        self._set_state(State.CONNECTED)
        if isinstance(conn, EventStreamConnection):
            if missing or dropped:
                self._reopen(conn)
            return
        for channel in missing:
            self._send_subscribe(conn, channel)
        for channel in dropped:
            self._command(conn, {"op": "unsubscribe", "channel": channel}, channel)

    def _lost(self, conn: Link, exc: Closed) -> None:
        """The connection ended: reconnect later, or end the stream."""
        if isinstance(conn, EventStreamConnection):
            if self._conn is not conn:
                return  # reopened (_reopen): the next stream is under way
            self._last_event_id = conn.last_event_id
        if self._conn is conn:
            self._conn = None
        self._cancel_tasks()
        if self._closing:
            self._finish()
            return
        code, reason = exc.code, exc.reason
        if exc.failed == TOO_BIG:
            self._end(MessageTooBig(reason), close_code=TOO_BIG)
            return
        if code in GIVE_UP_CODES or (code in TOKEN_CODES and self._get_token is None):
            told = self._connect_error
            if told is not None:
                error = ClosedByServer(told.code, told.message, code)
            else:
                error = ClosedByServer(CLOSE_CODE_NAMES.get(code, "closed"), reason, code)
            self._end(error, close_code=code)
            return
        self._retry(close_code=code)

    def _reopen(self, conn: EventStreamConnection) -> None:
        """End this stream and open the next one at once, for what only a new
        request can carry (channels, a token). What it received and was not yet
        taken is kept for the stream, in order, and the next one resumes after it."""
        if self._conn is not conn:
            return
        self._drain(conn)
        self._last_event_id = conn.last_event_id
        self._conn = None
        self._cancel_tasks()
        conn.abort()
        if self._tracker.channels:
            self._set_state(State.CONNECTING)
        else:
            self._set_state(State.DISCONNECTED)

    def _drain(self, conn: Link, until: asyncio.Future[Any] | None = None) -> None:
        """Every frame ``conn`` holds (or those before ``until`` is answered),
        noted and kept for the stream, in order."""
        pending = self._pending
        tracker = self._tracker
        while until is None or not until.done():
            text = conn.pop()
            if text is None:
                return
            try:
                doc = _decode(text)
            except msgspec.DecodeError:
                pending.append(Other(None, {}, frame=text))
                continue
            item = tracker.note(doc, text)
            if type(item) is Message:
                if item.channel in tracker.channels:
                    pending.append(item)
                continue
            assert isinstance(item, Event)
            event = self._event(conn, item, doc)
            if event is not None:
                pending.append(event)

    def _retry(
        self,
        *,
        close_code: int | None = None,
        error: BaseException | None = None,
        at_least: float | None = None,
    ) -> None:
        delay = self._backoff.next_delay(time.monotonic())
        if at_least is not None:
            delay = max(delay, at_least)
        self._delay = delay
        self._set_state(State.DISCONNECTED, close_code=close_code, error=error, retry_in=delay)

    def _end(self, error: BroadcastdError, close_code: int | None = None) -> None:
        """No reconnection will do better: say so, close, raise ``error``."""
        self._set_state(State.DISCONNECTED, close_code=close_code, error=error)
        self._fatal = error
        self._closing = True
        self._finish()

    def _finish(self) -> None:
        if self.state is not State.CLOSED:
            self._cancel_tasks()
            self._set_state(State.CLOSED)

    def _set_state(self, state: State, **details: Any) -> None:
        self.state = state
        self._pending.append(StateChanged(state, **details))

    # commands

    def _send_subscribe(self, conn: Link, channel: str) -> None:
        command: dict[str, Any] = {"op": "subscribe", "channel": channel}
        at = self._tracker.position(channel)
        if at is not None:
            command["since"] = {"epoch": at.epoch, "offset": at.offset}
        self._command(conn, command, channel)

    def _command(self, conn: Link, command: dict[str, Any], channel: str | None) -> None:
        """Send ``command`` with an id, so that its reply or error names its channel.
        A connection that closed meanwhile is no failure: the next one's URL
        holds the channels as they are wanted then."""
        if isinstance(conn, EventStreamConnection):
            self._reopen(conn)  # a stream is one-way: its next request carries the change
            return
        command_id = command["id"] = next(self._ids)
        self._commands[command_id] = (command["op"], channel)
        conn.send(_encode(command).decode())

    async def _subscribe_later(self, conn: Link, channel: str) -> None:
        await asyncio.sleep(self._rng.uniform(*RESUBSCRIBE_DELAY))
        if self._conn is conn and channel in self._tracker.channels:
            self._send_subscribe(conn, channel)

    def _expiring(self, conn: Link, expires: int) -> None:
        """The token expires soon: ask ``get_token`` for a new one, once per notice
        (a daemon re-sends the notice at once for a new token that expires as
        soon, which must not become a loop)."""
        if self._get_token is None or expires == self._refreshed_for:
            return
        self._refreshed_for = expires
        self._spawn(self._refresh(conn, self._get_token))

    async def _refresh(self, conn: Link, get_token: TokenSource) -> None:
        try:
            token = await get_token()
        except Exception as exc:
            self._deferred = exc
            return
        if not token or token == self._token_used or self._conn is not conn:
            return  # nothing newer: at expiry the daemon closes, and the reconnection asks again
        if isinstance(conn, EventStreamConnection):
            self._fresh_token = token  # for the stream that _command reopens
        self._token_used = token
        self._command(conn, {"op": "refresh", "token": token}, None)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _cancel_tasks(self) -> None:
        for task in self._tasks:
            task.cancel()


def _handshake_error(refused: HandshakeRefused) -> BroadcastdError:
    """The daemon's JSON error body of a refused handshake, typed by status."""
    return refusal(refused.status, refused.body, refused.reason, refused.headers.get("retry-after"))
