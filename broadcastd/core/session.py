"""One subscriber's commands and subscriptions.

A client sends small JSON text frames::

    {"op": "subscribe",   "channel": "news", "id": 1}
    {"op": "subscribe",   "channel": "news", "since": {"epoch": "k3j9x2ab", "offset": 41}}
    {"op": "subscribe",   "channel": "chat", "since": {"last": 20}}
    {"op": "unsubscribe", "channel": "news"}
    {"op": "ping"}
    {"op": "auth",        "token": "eyJ..."}     (a JWT, when [auth] is configured)
    {"op": "refresh",     "token": "eyJ..."}     (a new one before the first expires)

and gets one reply per command through its own outbox, so replies and messages
reach it in the order they happened (a ``subscribed`` reply always precedes the
first message of that channel, and a recovery's replay precedes the live
messages, with nothing in between: subscribing, reading history and queuing the
replay happen in one call, so no publish can come between them)::

    {"type": "subscribed",   "channel": "news", "epoch": "k3j9x2ab", "offset": 6, "id": 1}
    {"type": "subscribed",   "channel": "news", "epoch": "k3j9x2ab", "offset": 48,
     "recovered": true}
    {"type": "subscribed",   "channel": "news", "epoch": "p2m4q7zz", "offset": 3,
     "recovered": false, "reason": "epoch"}
    {"type": "unsubscribed", "channel": "news"}
    {"type": "pong"}
    {"type": "error", "code": "bad_channel", "message": "...", "op": "subscribe"}

``id`` is optional (a string of at most 64 characters or an integer) and is echoed
in the reply. Unknown fields are ignored, so newer clients can talk to older
servers. Each invalid command gets an error reply; after ``max_errors`` of them the
session asks for the connection to be closed with 1008 (policy violation).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from broadcastd.auth.claims import Claims
from broadcastd.core.channels import check_channel
from broadcastd.core.envelope import reply_frame
from broadcastd.core.outbox import Outbox
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

OPS = ("subscribe", "unsubscribe", "ping", "auth", "refresh")
TOKEN_OPS = ("auth", "refresh")
MAX_ID_LENGTH = 64

CommandId = str | int | None


@dataclass(frozen=True, slots=True)
class Command:
    op: str
    channel: str | None = None
    id: CommandId = None
    since: Since | None = None
    token: str | None = None


class Membership(Protocol):
    """What a session needs of the node: joining and leaving channels (recovering
    on the way in), and whether it may join one."""

    def join(
        self,
        outbox: Outbox,
        name: str,
        raw: bool,
        since: Since | None,
        joined: Callable[[Position, Recovery | None], None],
        failed: Callable[[ClientError], None],
    ) -> None:
        """Add ``outbox`` to channel ``name``, recovering from ``since`` first; then
        call ``joined`` (at once, or after a round trip to a remote broker) right
        before the live stream continues, or ``failed``."""

    def unsubscribe(self, outbox: Outbox, name: str) -> None:
        """Leave the channel (or stop waiting to join it)."""

    def check_subscribe(self, name: str, claims: Claims | None) -> object:
        """Raise the ClientError that refuses ``claims`` the channel ``name``
        (an unknown namespace, a token that does not allow it), if any."""


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
        "channels",
        "claims",
        "errors",
        "id",
        "max_channels",
        "max_errors",
        "on_token",
        "outbox",
        "raw",
    )

    def __init__(
        self,
        client_id: str,
        node: Membership,
        outbox: Outbox,
        *,
        raw: bool = False,
        max_channels: int = 100,
        max_errors: int = 20,
    ) -> None:
        self.id = client_id
        self._node = node
        self.outbox = outbox
        self.raw = raw
        self.channels: dict[str, None] = {}
        self.errors = 0
        self.max_channels = max_channels
        self.max_errors = max_errors
        self.claims: Claims | None = None
        """What the client's token says (None: no token given, or none accepted yet)."""
        self.on_token: TokenHandler | None = None
        """Set by the transport when subscriber authentication is configured."""

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
            self._node.unsubscribe(self.outbox, name)
        self.channels.clear()

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
        if command.op == "subscribe":
            self._subscribe(name, command.since, command_id=command.id)
            return None
        if name not in self.channels:
            raise NotSubscribed(f"not subscribed to {name!r}")
        del self.channels[name]
        self._node.unsubscribe(self.outbox, name)
        self.outbox.forget(name)
        return {"type": "unsubscribed", "channel": name}

    def _subscribe(
        self, name: str, since: Since | None, *, tell: bool = True, command_id: CommandId = None
    ) -> None:
        """Subscribe; the reply and any replay are queued once the node has joined
        the channel (``_joined``), or an error reply if it could not."""
        if name not in self.channels and len(self.channels) >= self.max_channels:
            raise TooManyChannels(f"at most {self.max_channels} channels per connection")
        self._node.check_subscribe(name, self.claims)
        self.channels[name] = None

        def joined(position: Position, recovery: Recovery | None) -> None:
            self._joined(name, since, position, recovery, tell, command_id)

        def failed(exc: ClientError) -> None:
            self.channels.pop(name, None)
            self._error(exc, "subscribe", command_id)

        try:
            self._node.join(self.outbox, name, self.raw, since, joined, failed)
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
            if command_id is not None:
                reply["id"] = command_id
            self._reply(reply)
        if recovery is not None and recovery.replay:
            push = self.outbox.push
            if self.raw:
                for publication in recovery.replay:
                    push(publication.raw_frame())
            else:
                for publication in recovery.replay:
                    push(publication.frame())

    def authenticated(self, claims: Claims, op: str, command_id: CommandId) -> None:
        """A token (``op`` auth or refresh, or given at connect) was accepted."""
        self.claims = claims
        reply: dict[str, Any] = {"type": "authenticated", "user": claims.user}
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
