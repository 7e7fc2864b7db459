"""Server-Sent Events and newline-delimited JSON: the subscriber stream as plain HTTP.

A subscriber that cannot or will not speak WebSocket (a browser's
``EventSource``, ``curl -N``, a corporate proxy) asks the subscriber URL with
``Accept: text/event-stream`` or ``Accept: application/x-ndjson`` instead of an
upgrade. Everything else is the WebSocket path's: admission, the route, auth,
the session and its outbox, the slow-consumer policies, drain. This module
says which forms a stream's messages are queued in (``core.forms``: a
one-channel stream's whole events and ndjson lines are made once per message
at fan-out), turns the rest (replies, and the JSON frames of a stream of
several channels) into the stream's bytes, one HTTP chunk per write, and keeps
what lossless resume needs.

**Resume.** A browser reconnects by itself and sends the ``id`` of the last
event it received as ``Last-Event-ID``; it cannot be told anything else. So
every event that moves a channel's position (a message, and the ``subscribed``
and ``resync`` notices) carries an id holding the position of *every* channel
of the stream, in the order of the URL: ``1~EPOCH.OFFSET~EPOCH.OFFSET...``
(offsets in base 36; an empty field for a channel with no position yet). The
URL does not change across reconnects, so the id names no channel. Sent back,
it resumes each channel after what the client saw, exactly as ``since`` does
on a WebSocket, with the same ``recovered`` answers. Its size is about 17 bytes
per channel: 1.7 KB at ``ws.max_channels_per_client`` = 100.

**Events.** A message is an event with no ``event:`` field (``onmessage``), its
``data:`` the JSON envelope, or the payload alone with ``format=raw``. Replies
and notices are named events: ``event: subscribed``, ``resync``, ``missed``,
``expiring``, ``authenticated``... except ``error`` replies, named
``failure``: ``EventSource`` reserves ``error`` for its own connection errors.
When the server ends the stream, a last ``event: close`` says why
(``{"code": 1013, "reason": "slow consumer"}``, the WebSocket close code and
reason). ndjson sends every frame as one line of JSON (with ``format=raw``, a
message's ``data`` alone), with no positions (resume with ``since``).
"""

from __future__ import annotations

import http
from collections.abc import Iterable

import orjson

from broadcastd.core.envelope import Payload, Reply, frame_payload
from broadcastd.core.forms import (
    ID_SEPARATOR,
    ID_VERSION,
    Form,
    Prepared,
    data_lines,
    flat,
    id_field,
)
from broadcastd.core.handshake import Head, Refusal
from broadcastd.core.stream import MAX_EPOCH_LENGTH, MAX_OFFSET, Position, Since

SSE = "text/event-stream"
NDJSON = "application/x-ndjson"
RETRY_MS = 2000
"""The reconnection delay suggested to browsers (``retry:``)."""
_EVENT_NAMES = {"error": "failure"}
_ALL_PREPARED = {Prepared}
_ENVELOPE_HEAD = b'{"channel":"'
_OFFSET = b'","offset":'
_DATA = b',"data":'


def stream_kind(head: Head) -> str | None:
    """``SSE`` or ``NDJSON`` for a plain GET that asks for one (no WebSocket
    upgrade), else None."""
    if head.get_all("upgrade"):
        return None
    accept = ",".join(head.get_all("accept")).lower()
    if SSE in accept:
        return SSE
    if NDJSON in accept:
        return NDJSON
    return None


def preflight_answer(allow_origin: str | None) -> bytes:
    """The answer to a CORS preflight (``OPTIONS``): GET, with the headers a stream
    may send, allowed from ``allow_origin``; the answer is cached for 10 minutes."""
    lines = [
        "HTTP/1.1 204 No Content",
        "Server: broadcastd",
        "Connection: close",
        "Access-Control-Allow-Methods: GET",
        "Access-Control-Allow-Headers: Authorization, Last-Event-ID, Accept, Cache-Control",
        "Access-Control-Max-Age: 600",
    ]
    return _head(lines, allow_origin)


def _head(lines: list[str], allow_origin: str | None) -> bytes:
    """An answer's head: ``lines``, and the CORS headers for ``allow_origin``."""
    if allow_origin is not None:
        lines.append(f"Access-Control-Allow-Origin: {allow_origin}")
        if allow_origin != "*":
            lines.append("Vary: Origin")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def resume_positions(last_event_id: str, channels: tuple[str, ...]) -> list[tuple[str, Since]]:
    """The positions a ``Last-Event-ID`` made by this stream holds, as ``since``
    pairs; a Refusal (400) for an id not made for these channels."""
    fields = last_event_id.split(ID_SEPARATOR)
    if fields[0] != ID_VERSION or len(fields) != len(channels) + 1:
        raise _bad_id()
    since: list[tuple[str, Since]] = []
    for channel, field in zip(channels, fields[1:], strict=True):
        if not field:
            continue
        epoch, dot, offset = field.partition(".")
        if (
            not dot
            or not epoch
            or len(epoch) > MAX_EPOCH_LENGTH
            or not offset.isascii()
            or not offset.isalnum()
            or len(offset) > 13
        ):
            raise _bad_id()
        number = int(offset, 36)
        if number > MAX_OFFSET:
            raise _bad_id()
        since.append((channel, Position(epoch, number)))
    return since


def _bad_id() -> Refusal:
    return Refusal(
        http.HTTPStatus.BAD_REQUEST,
        "bad_request",
        "Last-Event-ID was not made by a stream of these channels",
    )


class EventStream:
    """One subscriber's stream: the HTTP head, then its frames as chunks."""

    __slots__ = ("_epochs", "_fields", "_index", "kind", "raw")

    def __init__(
        self,
        kind: str,
        channels: tuple[str, ...],
        raw: bool,
        since: Iterable[tuple[str, Since]] = (),
    ) -> None:
        self.kind = kind
        self.raw = raw
        self._index = {name: i for i, name in enumerate(channels)}
        self._fields = [""] * len(channels)
        """Each URL channel's ``EPOCH.OFFSET`` as of the last event (the id's fields):
        at first, the positions the stream resumes from."""
        self._epochs: dict[str, str] = {}
        for channel, where in since:
            if isinstance(where, Position):
                self._moved(channel, where.epoch, where.offset)

    def head(self, allow_origin: str | None) -> bytes:
        """The 200 answer's head, and the first chunk (``retry:`` for SSE)."""
        lines = [
            "HTTP/1.1 200 OK",
            "Server: broadcastd",
            f"Content-Type: {self.kind}; charset=utf-8",
            "Cache-Control: no-cache",
            "X-Accel-Buffering: no",
            "Transfer-Encoding: chunked",
        ]
        head = _head(lines, allow_origin)
        if self.kind == SSE:
            head += _chunk(b"retry: %d\n\n" % RETRY_MS)
        return head

    def forms(self) -> tuple[Form, dict[str, Form]]:
        """The forms its session queues messages in: every channel's, and the
        exceptions. A one-channel SSE stream reads its channel's whole events as
        fan-out made them; a stream of several channels numbers its events
        itself, from JSON frames; ndjson reads lines."""
        if self.kind == NDJSON:
            return (Form.RAW_LINE if self.raw else Form.LINE), {}
        if len(self._fields) == 1:
            (channel,) = self._index
            return Form.FRAME, {channel: Form.RAW_EVENT if self.raw else Form.EVENT}
        return Form.FRAME, {}

    def render(self, frames: list[bytes], messages: Messages) -> bytes:
        """One chunk carrying ``frames`` as events (SSE) or lines (ndjson).
        Prepared frames (a one-channel stream's events, lines) go as they stand;
        what a stream of several channels writes for a message frame is made
        once per pass in ``messages``."""
        if set(map(type, frames)) == _ALL_PREPARED:  # the common case, checked in C
            return _chunk(b"".join(frames))
        if self.kind == NDJSON:
            parts = [frame if type(frame) is Prepared else _line(frame) for frame in frames]
        else:
            event = self._event
            parts = [
                frame if type(frame) is Prepared else event(frame, messages) for frame in frames
            ]
        return _chunk(b"".join(parts))

    def keepalive(self) -> bytes:
        """A comment (SSE) or an empty line (ndjson): keeps proxies from timing out."""
        return _chunk(b":\n\n" if self.kind == SSE else b"\n")

    def end(self, code: int, reason: str) -> bytes:
        """The last event (why the server ends the stream), and the chunked end."""
        close = orjson.dumps({"type": "close", "code": code, "reason": reason})
        body = close + b"\n" if self.kind == NDJSON else b"event: close\ndata: " + close + b"\n\n"
        return _chunk(body) + b"0\r\n\r\n"

    def _event(self, frame: bytes, messages: Messages) -> bytes:
        if isinstance(frame, Reply):
            return self._notice(bytes(frame_payload(frame)))
        return self._message(messages.get(frame))

    def _notice(self, payload: bytes) -> bytes:
        doc = orjson.loads(payload)
        kind = str(doc.get("type", ""))
        name = _EVENT_NAMES.get(kind, kind).encode()
        moved = b""
        if kind in ("subscribed", "resync") and "epoch" in doc:
            channel = doc.get("channel", "")
            self._epochs[channel] = doc["epoch"]
            # A recovery's replay follows its reply: until its messages arrive, the
            # client has seen no further than where it resumed from.
            replayed = kind == "subscribed" and doc.get("recovered") is True
            if not replayed and self._moved(channel, doc["epoch"], doc["offset"]):
                moved = self._id()
        return moved + b"event: " + name + b"\ndata: " + payload + b"\n\n"

    def _message(self, message: Message) -> bytes:
        channel = message.channel
        epoch = self._epochs.get(channel)
        index = self._index.get(channel)
        if epoch is None or index is None:
            # No position yet, or a channel the server API added (not in the URL).
            return message.raw_event() if self.raw else message.json_event
        self._fields[index] = message.field(epoch)
        return self._id() + (message.raw_event() if self.raw else message.json_event)

    def _moved(self, channel: str, epoch: str, offset: int) -> bool:
        index = self._index.get(channel)
        if index is None:
            return False  # a channel the server API added: not in the URL, not resumed
        self._fields[index] = id_field(epoch, offset).decode()
        return True

    def _id(self) -> bytes:
        return b"id: " + ID_SEPARATOR.join((ID_VERSION, *self._fields)).encode() + b"\n"


class Message:
    """One message frame as streams of several channels write it, made once: its
    channel and offset read back from the envelope, and its event's data."""

    __slots__ = ("_field", "_payload", "_raw_event", "channel", "data_at", "json_event", "offset")

    def __init__(self, frame: bytes) -> None:
        payload = self._payload = bytes(frame_payload(frame))
        end = payload.index(_OFFSET, len(_ENVELOPE_HEAD))
        self.channel = payload[len(_ENVELOPE_HEAD) : end].decode()
        self.data_at = payload.index(_DATA, end)
        self.offset = int(payload[end + len(_OFFSET) : self.data_at])
        self.json_event = b"data: " + flat(payload) + b"\n\n"
        self._raw_event: bytes | None = None
        self._field: tuple[str, str] | None = None
        """The id field of the last epoch asked for (every stream of it asks the same)."""

    def field(self, epoch: str) -> str:
        cached = self._field
        if cached is None or cached[0] != epoch:
            cached = self._field = (epoch, id_field(epoch, self.offset).decode())
        return cached[1]

    def raw_event(self) -> bytes:
        if self._raw_event is None:
            data_json = self._payload[self.data_at + len(_DATA) : -1]
            self._raw_event = data_lines(Payload.from_json_text(data_json).raw)
        return self._raw_event


class Messages:
    """The messages of the frames being written, each made once: a fan-out queues
    the same frame object for every subscriber, and the writers' pass writes them
    all; kept by the frame's identity until the pass ends (``forget``)."""

    __slots__ = ("made",)

    def __init__(self) -> None:
        self.made: dict[int, tuple[bytes, Message]] = {}
        """id(frame) -> (frame, its message): the frame is held so its id stays its own."""

    def get(self, frame: bytes) -> Message:
        cached = self.made.get(id(frame))
        if cached is not None and cached[0] is frame:
            return cached[1]
        message = Message(frame)
        self.made[id(frame)] = (frame, message)
        return message

    def forget(self) -> None:
        self.made.clear()


def _line(frame: bytes) -> bytes:
    """A reply or notice as an ndjson line (messages come as lines already)."""
    return flat(bytes(frame_payload(frame))) + b"\n"


def _chunk(body: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(body), body)
