"""One subscriber's commands and subscriptions.

A client sends small JSON text frames::

    {"op": "subscribe",   "channel": "news", "id": 1}
    {"op": "unsubscribe", "channel": "news"}
    {"op": "ping"}

and gets one reply per command through its own outbox, so replies and messages
reach it in the order they happened (a ``subscribed`` reply always precedes the
first message of that channel)::

    {"type": "subscribed",   "channel": "news", "offset": 6, "id": 1}
    {"type": "unsubscribed", "channel": "news"}
    {"type": "pong"}
    {"type": "error", "code": "bad_channel", "message": "...", "op": "subscribe"}

``id`` is optional (a string of at most 64 characters or an integer) and is echoed
in the reply. Unknown fields are ignored, so newer clients can talk to older
servers. Each invalid command gets an error reply; after ``max_errors`` of them the
session asks for the connection to be closed with 1008 (policy violation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from broadcastd.core.channels import check_channel
from broadcastd.core.envelope import reply_frame
from broadcastd.core.hub import Hub
from broadcastd.core.outbox import Outbox
from broadcastd.errors import (
    BadCommand,
    BadJson,
    ClientError,
    CloseReason,
    NotSubscribed,
    TooManyChannels,
    UnknownOp,
)

OPS = ("subscribe", "unsubscribe", "ping")
MAX_ID_LENGTH = 64

CommandId = str | int | None


@dataclass(frozen=True, slots=True)
class Command:
    op: str
    channel: str | None = None
    id: CommandId = None


def parse_command(text: str | bytes) -> Command:
    """Parse and validate one command frame; raise a ClientError saying what is wrong."""
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
    if "channel" not in doc:
        raise BadCommand(f'{op} needs a "channel"')
    return Command(op, check_channel(doc["channel"]), command_id)


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

    __slots__ = ("_hub", "channels", "errors", "id", "max_channels", "max_errors", "outbox", "raw")

    def __init__(
        self,
        client_id: str,
        hub: Hub,
        outbox: Outbox,
        *,
        raw: bool = False,
        max_channels: int = 100,
        max_errors: int = 20,
    ) -> None:
        self.id = client_id
        self._hub = hub
        self.outbox = outbox
        self.raw = raw
        self.channels: dict[str, None] = {}
        self.errors = 0
        self.max_channels = max_channels
        self.max_errors = max_errors

    def open(self, channels: list[str]) -> None:
        """Subscribe to the channels named in the URL (already validated).

        JSON-mode clients are told each channel's offset; raw-mode clients get
        nothing but payloads unless they send commands.
        """
        for name in channels:
            try:
                offset = self._subscribe(name)
            except ClientError as exc:
                self._error(exc, "subscribe", None)
                continue
            if not self.raw:
                self._reply({"type": "subscribed", "channel": name, "offset": offset})

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
        if command.id is not None:
            reply["id"] = command.id
        self._reply(reply)
        return None

    def close(self) -> None:
        """Leave every channel. Idempotent."""
        for name in self.channels:
            self._hub.unsubscribe(self.outbox, name)
        self.channels.clear()

    def _execute(self, command: Command) -> dict[str, Any]:
        if command.op == "ping":
            return {"type": "pong"}
        name = command.channel
        assert name is not None
        if command.op == "subscribe":
            offset = self._subscribe(name)
            return {"type": "subscribed", "channel": name, "offset": offset}
        if name not in self.channels:
            raise NotSubscribed(f"not subscribed to {name!r}")
        del self.channels[name]
        self._hub.unsubscribe(self.outbox, name)
        return {"type": "unsubscribed", "channel": name}

    def _subscribe(self, name: str) -> int:
        if name not in self.channels and len(self.channels) >= self.max_channels:
            raise TooManyChannels(f"at most {self.max_channels} channels per connection")
        offset = self._hub.subscribe(self.outbox, name, self.raw)
        self.channels[name] = None
        return offset

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
