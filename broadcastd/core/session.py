"""One subscriber's commands and subscriptions.

A client sends small JSON text frames::

    {"op": "subscribe",   "channel": "news", "id": 1}
    {"op": "subscribe",   "channel": "news", "since": {"epoch": "k3j9x2ab", "offset": 41}}
    {"op": "subscribe",   "channel": "chat", "since": {"last": 20}}
    {"op": "unsubscribe", "channel": "news"}
    {"op": "ping"}
    {"op": "auth",        "token": "eyJ..."}     (a JWT, when [auth] is configured)
    {"op": "refresh",     "token": "eyJ..."}     (a new one before the first expires)
    {"op": "presence",    "channel": "room", "cursor": "..."}  (where the namespace allows)
    {"op": "presence_stats", "channel": "room"}

and gets one reply per command through its own outbox, so replies and messages
reach it in the order they happened (a ``subscribed`` reply always precedes the
first message of that channel, and a recovery's replay precedes the live
messages, with nothing in between: subscribing, reading history and queuing the
replay happen in one call, so no publish can come between them)::

    {"type": "subscribed",   "channel": "news", "epoch": "k3j9x2ab", "offset": 6, "id": 1,
     "client": "4f1c9a0e22b7-1a", "user": null}           (the first reply tells who)
    {"type": "subscribed",   "channel": "news", "epoch": "k3j9x2ab", "offset": 48,
     "recovered": true}
    {"type": "subscribed",   "channel": "news", "epoch": "p2m4q7zz", "offset": 3,
     "recovered": false, "reason": "epoch"}
    {"type": "unsubscribed", "channel": "news"}
    {"type": "unsubscribed", "channel": "news", "reason": "server"}   (the server API)
    {"type": "presence", "channel": "room", "clients": [...], "next": null}
    {"type": "presence_stats", "channel": "room", "clients": 2, "users": 2}
    {"type": "join", "channel": "room", "client": "...", "user": "alice"}
    {"type": "pong"}
    {"type": "error", "code": "bad_channel", "message": "...", "op": "subscribe"}

``id`` is optional (a string of at most 64 characters or an integer) and is echoed
in the reply. Unknown fields are ignored, so newer clients can talk to older
servers. Each invalid command gets an error reply; after ``max_errors`` of them the
session asks for the connection to be closed with 1008 (policy violation).

The server API acts on a session too (``disconnect``, ``unsubscribe``,
``subscribe``): the session leaves or joins as if its client had asked, and says
so through its outbox; a disconnect closes the outbox with the backend's code,
which the transport's close path sends as it sends any other.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from broadcastd.auth.claims import Claims
from broadcastd.core.channels import check_channel
from broadcastd.core.envelope import reply_frame
from broadcastd.core.forms import Form
from broadcastd.core.outbox import Outbox
from broadcastd.core.presence import PresencePage, PresenceStats, check_cursor
from broadcastd.core.route import MAX_TOKEN_LENGTH
from broadcastd.core.stream import Position, Recovery, Since, parse_since
from broadcastd.errors import (
    BadCommand,
    BadJson,
    ClientError,
    CloseReason,
    NotSubscribed,
    TooManyChannels,
    UnknownOp,
)

OPS = ("subscribe", "unsubscribe", "ping", "auth", "refresh", "presence", "presence_stats")
TOKEN_OPS = ("auth", "refresh")
PRESENCE_OPS = ("presence", "presence_stats")
MAX_ID_LENGTH = 64

CommandId = str | int | None


@dataclass(frozen=True, slots=True)
class Command:
    op: str
    channel: str | None = None
    id: CommandId = None
    since: Since | None = None
    token: str | None = None
    cursor: str | None = None


class Membership(Protocol):
    """What a session needs of the node: joining and leaving channels (recovering
    on the way in), and whether it may join one."""

    def join(
        self,
        outbox: Outbox,
        name: str,
        form: Form,
        since: Since | None,
        joined: Callable[[Position, Recovery | None], None],
        failed: Callable[[ClientError], None],
        member: Session | None = None,
    ) -> None:
        """Add ``outbox`` to channel ``name``, reading ``form``, recovering from
        ``since`` first; then call ``joined`` (at once, or after a round trip to a
        remote broker) right before the live stream continues, or ``failed``. A
        ``member`` is in the channel's presence from then on."""

    def unsubscribe(self, outbox: Outbox, name: str, member: Session | None = None) -> None:
        """Leave the channel (or stop waiting to join it)."""

    def check_subscribe(self, name: str, claims: Claims | None) -> object:
        """Raise the ClientError that refuses ``claims`` the channel ``name``
        (an unknown namespace, a token that does not allow it), if any."""

    def connected(self, session: Session) -> None:
        """A connection opened: the server API can find it from now on."""

    def disconnected(self, session: Session) -> None:
        """The connection ended."""

    def join_leave(self, name: str) -> bool | None:
        """Whether the channel's subscribers get join and leave events now (None:
        its namespace has none)."""

    def ask_presence(
        self,
        name: str,
        cursor: str | None,
        answered: Callable[[PresencePage], None],
        failed: Callable[[ClientError], None],
    ) -> None:
        """A page of the channel's presence for one of its subscribers (refused
        where the namespace does not allow it)."""

    def ask_presence_stats(
        self,
        name: str,
        answered: Callable[[PresenceStats], None],
        failed: Callable[[ClientError], None],
    ) -> None:
        """The channel's presence counts for one of its subscribers."""


TokenHandler = Callable[[str, str, "CommandId"], None]
"""What the transport does with ``auth``/``refresh``: (op, token, command id)."""


def parse_command(text: str | bytes) -> Command:
    """Parse and validate one command frame; raise a ClientError saying what is wrong.

    orjson refuses arrays and objects nested more than 1024 levels deep as
    malformed, so a deeply nested frame is ``bad_json`` like any other, and the
    connection goes on. Offsets and counts in ``since`` are bounded as in the URL
    (MAX_OFFSET)."""
    try:
        doc = orjson.loads(text)
    except orjson.JSONDecodeError:
        raise BadJson("command is not valid JSON") from None
    if not isinstance(doc, dict):
        raise BadCommand("command must be a JSON object")
    command_id = doc.get("id")
    if command_id is not None and not _valid_id(command_id):
        raise BadCommand(f"id must be an integer or a string of at most {MAX_ID_LENGTH} characters")
    op = doc.get("op")
    if not isinstance(op, str):
        raise BadCommand('command needs an "op" string')
    if op not in OPS:
        raise UnknownOp(f"unknown op {op[:32]!r}; expected one of {', '.join(OPS)}")
    if op == "ping":
        return Command(op, None, command_id)
    if op in TOKEN_OPS:
        token = doc.get("token")
        if not isinstance(token, str) or not 0 < len(token) <= MAX_TOKEN_LENGTH:
            raise BadCommand(
                f'{op} needs a "token" string of at most {MAX_TOKEN_LENGTH} characters'
            )
        return Command(op, None, command_id, token=token)
    if "channel" not in doc:
        raise BadCommand(f'{op} needs a "channel"')
    channel = check_channel(doc["channel"])
    if op == "presence":
        return Command(op, channel, command_id, cursor=check_cursor(doc.get("cursor")))
    since = doc.get("since")
    if since is not None and op == "subscribe":
        return Command(op, channel, command_id, parse_since(since))
    return Command(op, channel, command_id)


def _valid_id(value: object) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, str) and len(value) <= MAX_ID_LENGTH)


def _peek_id(text: str | bytes) -> tuple[str | None, CommandId]:
    """Best-effort op and id of a command that failed validation, for the error reply."""
    try:
        doc = orjson.loads(text)
    except orjson.JSONDecodeError:
        return None, None
    if not isinstance(doc, dict):
        return None, None
    op = doc.get("op")
    command_id = doc.get("id")
    return (
        op if isinstance(op, str) and op in OPS else None,
        command_id if _valid_id(command_id) else None,
    )


class Session:
    """A subscriber: its outbox, its channels, its mode and its error budget."""

    __slots__ = (
        "_node",
        "_told",
        "channels",
        "claims",
        "connected_at",
        "entry",
        "errors",
        "form",
        "forms",
        "id",
        "max_channels",
        "max_errors",
        "on_channels",
        "on_token",
        "outbox",
        "raw",
        "remote",
        "transport",
    )

    def __init__(
        self,
        client_id: str,
        node: Membership,
        outbox: Outbox,
        *,
        raw: bool = False,
        form: Form | None = None,
        forms: Mapping[str, Form] | None = None,
        max_channels: int = 100,
        max_errors: int = 20,
        remote: str = "",
        transport: str = "websocket",
    ) -> None:
        self.id = client_id
        self._node = node
        self.outbox = outbox
        self.raw = raw
        """Told nothing but payloads (a WebSocket with ``format=raw``)."""
        self.form = form if form is not None else Form.RAW_FRAME if raw else Form.FRAME
        """The form its messages are queued in (``core.forms``)..."""
        self.forms: Mapping[str, Form] = forms or {}
        """... but for these channels (a one-channel event stream's own)."""
        self.channels: dict[str, None] = {}
        self.errors = 0
        self.max_channels = max_channels
        self.max_errors = max_errors
        self.claims: Claims | None = None
        """What the client's token says (None: no token given, or none accepted yet)."""
        self.on_token: TokenHandler | None = None
        self.on_channels: Callable[[], None] | None = None
        """Called when the server API changed the channels held (the transport's
        deadline for holding none watches them)."""
        """Set by the transport when subscriber authentication is configured."""
        self.remote = remote
        """The client's address, as the connection listing shows it."""
        self.transport = transport
        self.connected_at = 0.0
        """Unix time of the connection (set by the node when it registers it)."""
        self.entry: bytes | None = None
        """Its presence entry, encoded once (by the node; again if the user changes)."""
        self._told = False
        """Its client id and user were told (in the first reply that can carry them)."""
        node.connected(self)

    @property
    def user(self) -> str | None:
        """The token's ``sub``; None without a token (or one without ``sub``)."""
        claims = self.claims
        return claims.user or None if claims is not None else None

    @property
    def info(self) -> Any:
        """The token's ``info`` claim (connection metadata for presence), if any."""
        return None if self.claims is None else self.claims.info

    def open(self, channels: Iterable[str], since: Sequence[tuple[str, Since]] = ()) -> None:
        """Subscribe to the channels named in the URL (already validated).

        JSON-mode clients are told each channel's position; raw-mode clients get
        nothing but payloads, except the outcome of a recovery they asked for.
        """
        wanted = dict(since)
        for name in channels:
            where = wanted.get(name)
            try:
                self._subscribe(name, where, tell=not self.raw or where is not None)
            except ClientError as exc:
                self._error(exc, "subscribe", None)

    def handle(self, text: str | bytes) -> CloseReason | None:
        """Execute one command frame; return a reason when the connection must close."""
        try:
            command = parse_command(text)
        except ClientError as exc:
            op, command_id = _peek_id(text)
            return self._error(exc, op, command_id)
        try:
            reply = self._execute(command)
        except ClientError as exc:
            return self._error(exc, command.op, command.id)
        if reply is not None:
            if command.id is not None:
                reply["id"] = command.id
            self._reply(reply)
        return None

    def close(self) -> None:
        """Leave every channel. Idempotent."""
        for name in self.channels:
            self._node.unsubscribe(self.outbox, name, self)
        self.channels.clear()

    def end(self) -> None:
        """The connection ended: leave every channel, and the node's registry."""
        self.close()
        self._node.disconnected(self)

    # What the server API does to a session

    def disconnect(self, reason: CloseReason) -> bool:
        """Leave every channel at once and close with ``reason`` once what is queued
        went out (as a token's expiry does); False if it was closing already."""
        if self.outbox.closed is not None:
            return False
        self.close()
        self.outbox.close(reason)
        return True

    def unsubscribe_by_server(self, name: str) -> bool:
        """Leave ``name`` as the server API asked; the client is told, with
        ``"reason": "server"``. False if it was not subscribed."""
        if name not in self.channels or self.outbox.closed is not None:
            return False
        del self.channels[name]
        self._node.unsubscribe(self.outbox, name, self)
        self.outbox.forget(name)
        self._reply({"type": "unsubscribed", "channel": name, "reason": "server"})
        if self.on_channels is not None:
            self.on_channels()
        return True

    def subscribe_by_server(self, name: str, since: Since | None) -> bool:
        """Subscribe to ``name`` as the server API asked (the backend decides: the
        namespace's subscribe rule is not asked), recovering from ``since``; the
        client gets the usual ``subscribed`` reply. False if it was subscribed
        already, or could not be (closing, too many channels, an unknown
        namespace)."""
        if name in self.channels or self.outbox.closed is not None:
            return False
        try:
            self._subscribe(name, since, tell=not self.raw or since is not None, checked=True)
        except ClientError:
            return False
        if self.on_channels is not None:
            self.on_channels()
        return True

    def _execute(self, command: Command) -> dict[str, Any] | None:
        """Run a command; its reply, or None when it was queued already."""
        if command.op == "ping":
            return {"type": "pong"}
        if command.token is not None:
            if self.on_token is None:
                raise BadCommand("authentication is not configured on this server")
            self.on_token(command.op, command.token, command.id)
            return None
        name = command.channel
        assert name is not None
        if command.op in PRESENCE_OPS:
            self._presence(command, name)
            return None
        if command.op == "subscribe":
            self._subscribe(name, command.since, command_id=command.id)
            return None
        if name not in self.channels:
            raise NotSubscribed(f"not subscribed to {name!r}")
        del self.channels[name]
        self._node.unsubscribe(self.outbox, name)
        self.outbox.forget(name)
        return {"type": "unsubscribed", "channel": name}

    def _presence(self, command: Command, name: str) -> None:
        """Answer ``presence`` or ``presence_stats`` once the engine has (a round trip
        on Redis): only a subscriber of the channel may ask."""
        if name not in self.channels:
            raise NotSubscribed(f"not subscribed to {name!r}")
        op, command_id = command.op, command.id

        def failed(exc: ClientError) -> None:
            self._error(exc, op, command_id)

        def answered(reply: dict[str, Any]) -> None:
            if command_id is not None:
                reply["id"] = command_id
            self._reply(reply)

        if op == "presence":
            self._node.ask_presence(
                name,
                command.cursor,
                lambda page: answered(
                    {
                        "type": "presence",
                        "channel": name,
                        "clients": [orjson.Fragment(entry) for entry in page.clients],
                        "next": page.next,
                    }
                ),
                failed,
            )
        else:
            self._node.ask_presence_stats(
                name,
                lambda stats: answered(
                    {
                        "type": "presence_stats",
                        "channel": name,
                        "clients": stats.clients,
                        "users": stats.users,
                    }
                ),
                failed,
            )

    def _subscribe(
        self,
        name: str,
        since: Since | None,
        *,
        tell: bool = True,
        command_id: CommandId = None,
        checked: bool = False,
    ) -> None:
        """Subscribe; the reply and any replay are queued once the node has joined
        the channel (``_joined``), or an error reply if it could not. ``checked``:
        the server API decided, the namespace's subscribe rule is not asked."""
        if name not in self.channels and len(self.channels) >= self.max_channels:
            raise TooManyChannels(f"at most {self.max_channels} channels per connection")
        if not checked:
            self._node.check_subscribe(name, self.claims)
        self.channels[name] = None

        def joined(position: Position, recovery: Recovery | None) -> None:
            self._joined(name, since, position, recovery, tell, command_id)

        def failed(exc: ClientError) -> None:
            self.channels.pop(name, None)
            self._error(exc, "subscribe", command_id)

        try:
            form = self.forms.get(name, self.form)
            self._node.join(self.outbox, name, form, since, joined, failed, self)
        except ClientError:
            self.channels.pop(name, None)
            raise

    def _joined(
        self,
        name: str,
        since: Since | None,
        position: Position,
        recovery: Recovery | None,
        tell: bool,
        command_id: CommandId,
    ) -> None:
        """Queue the reply and any replay in one go: the live stream continues
        right after them, with no gap and no duplicate."""
        if tell:
            reply: dict[str, Any] = {
                "type": "subscribed",
                "channel": name,
                "epoch": position.epoch,
                "offset": position.offset,
            }
            if recovery is not None and isinstance(since, Position):
                reply["recovered"] = recovery.recovered
                if recovery.reason is not None:
                    reply["reason"] = recovery.reason
            join_leave = self._node.join_leave(name)
            if join_leave is not None:
                reply["join_leave"] = join_leave
            if command_id is not None:
                reply["id"] = command_id
            if not self._told:
                self._told = True
                reply["client"] = self.id
                reply["user"] = self.user
            self._reply(reply)
        if recovery is not None and recovery.replay:
            push = self.outbox.push
            form = self.forms.get(name, self.form)
            for publication in recovery.replay:
                push(publication.encoded(form))

    def authenticated(self, claims: Claims, op: str, command_id: CommandId) -> None:
        """A token (``op`` auth or refresh, or given at connect) was accepted."""
        if self.claims is None or self.claims.user != claims.user:
            self.entry = None  # its presence entry names the user
        self.claims = claims
        self._told = True
        reply: dict[str, Any] = {"type": "authenticated", "user": claims.user, "client": self.id}
        if claims.expires is not None:
            reply["expires"] = int(claims.expires)
        if op != "connect":
            reply["op"] = op
        if command_id is not None:
            reply["id"] = command_id
        self._reply(reply)

    def refused(self, exc: ClientError, op: str, command_id: CommandId) -> CloseReason | None:
        """A command the transport answered later (a token) failed."""
        return self._error(exc, op, command_id)

    def notify(self, event: dict[str, Any]) -> None:
        """An event the transport raises (``expiring``)."""
        self._reply(event)

    def _error(self, exc: ClientError, op: str | None, command_id: CommandId) -> CloseReason | None:
        self.errors += 1
        reply: dict[str, Any] = {"type": "error", "code": exc.code, "message": exc.message}
        if op is not None:
            reply["op"] = op
        if command_id is not None:
            reply["id"] = command_id
        self._reply(reply)
        return CloseReason.POLICY if self.errors >= self.max_errors else None

    def _reply(self, reply: dict[str, Any]) -> None:
        self.outbox.push(reply_frame(reply))
