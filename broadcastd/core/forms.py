"""The forms a message is written in, each made once per message for every
subscriber that reads it that way.

A WebSocket subscriber reads a text frame: the JSON envelope, or the payload
alone (``format=raw``). An event stream reads Server-Sent Events or lines of
JSON. Fan-out encodes a message once per form its channel's subscribers use and
queues the same bytes in each of their outboxes, so a writer joins what is
queued as it stands, whatever the transport.

A Server-Sent Event's ``id:`` holds the stream's position in every channel of
its URL (see ``core.eventstream``). For a stream of one channel that is the
message's own position, the same for every such stream: its whole event is a
form of the message (``EVENT``). A stream of several channels numbers its
events itself, from the JSON frames (``FRAME``).
"""

from __future__ import annotations

import enum

from broadcastd.core.envelope import Payload, envelope_frame, raw_frame

ID_VERSION = "1"
"""The first field of every event id: the layout of the fields that follow."""
ID_SEPARATOR = "~"
_ID_HEAD = b"id: " + ID_VERSION.encode() + ID_SEPARATOR.encode()
_DIGITS = "0123456789abcdefghijklmnopqrstuvwxyz"


class Form(enum.IntEnum):
    """How a subscriber reads the messages of one channel."""

    FRAME = 0
    """A WebSocket text frame holding the JSON envelope."""
    RAW_FRAME = 1
    """A WebSocket text frame holding the payload alone."""
    EVENT = 2
    """A one-channel event stream's whole event: ``id:`` (the position) and the
    envelope as ``data:``."""
    RAW_EVENT = 3
    """The same with the payload alone as ``data:``; a payload of several lines,
    which takes a ``data:`` line each, is queued as its JSON frame instead (the
    outbox's bounds count what was published, not what framing adds), and the
    stream makes its event as it writes it."""
    LINE = 4
    """A line of newline-delimited JSON: the envelope."""
    RAW_LINE = 5
    """A line holding the JSON of the payload alone."""

    @property
    def reads_events(self) -> bool:
        """Its reader is told events that are not messages (join, leave): all but
        a raw WebSocket, which reads payloads alone. A raw event stream is told
        them as named events or lines."""
        return self is not Form.RAW_FRAME


class Prepared(bytes):
    """A message already in its stream's form (``EVENT``, ``LINE``...): a writer of
    an event stream writes it as it stands. WebSocket frames and replies are not
    Prepared: a stream turns them into its own form as it writes them."""

    __slots__ = ()


def encode(form: Form, prefix: bytes, epoch: str, offset: int, payload: Payload) -> bytes:
    """One message in ``form``; ``prefix`` is its channel's envelope head."""
    if form is Form.FRAME:
        return envelope_frame(prefix, offset, payload)
    if form is Form.RAW_FRAME:
        return raw_frame(payload)
    if form is Form.EVENT or form is Form.LINE:
        envelope = flat(b'%b%d,"data":%b}' % (prefix, offset, payload.json))
        if form is Form.LINE:
            return Prepared(envelope + b"\n")
        return Prepared(b"%b%b\ndata: %b\n\n" % (_ID_HEAD, id_field(epoch, offset), envelope))
    if form is Form.RAW_EVENT:
        if b"\n" in payload.raw or b"\r" in payload.raw:
            return envelope_frame(prefix, offset, payload)
        return Prepared(b"%b%b\n%b" % (_ID_HEAD, id_field(epoch, offset), data_lines(payload.raw)))
    return Prepared(flat(payload.json) + b"\n")


def id_field(epoch: str, offset: int) -> bytes:
    """One channel's position as an event id holds it: ``EPOCH.OFFSET``, the
    offset in base 36."""
    return f"{epoch}.{base36(offset)}".encode()


def base36(number: int) -> str:
    digits = []
    while True:
        number, digit = divmod(number, 36)
        digits.append(_DIGITS[digit])
        if not number:
            return "".join(reversed(digits))


def data_lines(text: bytes) -> bytes:
    """``text`` as an event's ``data:`` lines (one per line of it), and the blank
    line that ends the event."""
    lines = text.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
    return b"".join([b"data: " + line + b"\n" for line in lines]) + b"\n"


def flat(json: bytes) -> bytes:
    """JSON text on one line: a newline in it can only be whitespace."""
    return json.replace(b"\n", b" ").replace(b"\r", b" ")
