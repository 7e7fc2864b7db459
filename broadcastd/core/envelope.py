"""Messages and their one-time encoding to wire bytes.

A published message is encoded once, not once per subscriber: the JSON
envelope ``{"channel":…,"offset":…,"data":…}`` and, because server frames are
unmasked and compression is off by default, the whole WebSocket text frame
(RFC 6455 section 5.2) around it. Fan-out then hands the same ``bytes`` object
to every subscriber. Replies to commands are built the same way.
"""

from __future__ import annotations

from typing import Any

import msgspec
import orjson

from broadcastd.errors import BadEncoding, BadJson

_TEXT_FIN = 0x81
_syntax = msgspec.json.Decoder(msgspec.Raw)
"""Checks a JSON text's syntax without building Python objects."""
_string = msgspec.json.Decoder(str)


def check_utf8(body: bytes) -> None:
    """msgspec checks the syntax of a skipped value, not the UTF-8 inside its
    strings; one pass over the body does (and is free for ASCII)."""
    if not body.isascii():
        try:
            body.decode()
        except UnicodeDecodeError:
            raise BadJson("body is not valid JSON: it is not UTF-8") from None


def text_frame(payload: bytes, first: int = _TEXT_FIN) -> bytes:
    """An unmasked, unfragmented text frame carrying ``payload`` (valid UTF-8);
    ``first`` is its first byte (FIN and opcode; permessage-deflate adds RSV1)."""
    n = len(payload)
    if n < 126:
        return bytes((first, n)) + payload
    if n < 65536:
        return bytes((first, 126)) + n.to_bytes(2, "big") + payload
    return bytes((first, 127)) + n.to_bytes(8, "big") + payload


def frame_payload(frame: bytes) -> memoryview:
    """The payload of a frame built by :func:`text_frame` (for the compressed path)."""
    length = frame[1] & 0x7F
    start = 2 if length < 126 else 4 if length == 126 else 10
    return memoryview(frame)[start:]


class Payload:
    """What a publisher sent, in the two forms subscribers can ask for.

    ``json`` is the JSON text embedded as ``data`` in the envelope; ``raw`` is
    what raw-mode subscribers receive: the text itself when the data is a
    string, otherwise the same JSON text.
    """

    __slots__ = ("json", "raw")

    def __init__(self, json: bytes, raw: bytes) -> None:
        self.json = json
        self.raw = raw

    @classmethod
    def from_json_body(cls, body: bytes) -> Payload:
        """A JSON document as sent: its syntax checked and embedded verbatim, as the
        JSON forms embed ``data`` (a number of any size or exponent stays as written,
        where parsing it to a float would refuse ``1e999``)."""
        try:
            _syntax.decode(body)
        except msgspec.DecodeError as exc:
            raise BadJson(f"body is not valid JSON: {exc}") from None
        check_utf8(body)
        return cls.from_json_text(body)

    @classmethod
    def from_json_text(cls, text: bytes) -> Payload:
        """Valid JSON text, embedded verbatim; raw-mode subscribers get the text of a
        string, else the same JSON text."""
        if text.lstrip()[:1] == b'"':
            return cls(text, _string.decode(text).encode())
        return cls(text, text)

    @classmethod
    def from_text_body(cls, body: bytes) -> Payload:
        """Any other body: UTF-8 text, embedded as a JSON string."""
        try:
            text = body.decode()
        except UnicodeDecodeError:
            raise BadEncoding("body is not valid UTF-8 text") from None
        return cls(_exact(orjson.dumps(text)), body)

    @classmethod
    def from_value(cls, value: Any) -> Payload:
        """A value already parsed from a JSON request."""
        encoded = _exact(orjson.dumps(value))
        if isinstance(value, str):
            return cls(encoded, value.encode())
        return cls(encoded, encoded)

    def __len__(self) -> int:
        return len(self.json)


def _exact(encoded: bytes) -> bytes:
    """A copy of exactly its size: orjson's output keeps a 4 KiB buffer whatever
    its length, which history, holding payloads for minutes, must not pay."""
    return bytes(memoryview(encoded))


def channel_prefix(channel: str) -> bytes:
    """The envelope's constant head for one channel, cached on the channel."""
    return b'{"channel":"' + channel.encode() + b'","offset":'


def envelope_frame(prefix: bytes, offset: int, payload: Payload) -> bytes:
    """The text frame of one message in JSON mode."""
    return text_frame(b'%b%d,"data":%b}' % (prefix, offset, payload.json))


def raw_frame(payload: Payload) -> bytes:
    """The text frame of one message in raw mode: the payload alone."""
    return text_frame(payload.raw)


class Reply(bytes):
    """The frame of a reply or event to one client: never dropped by a slow-consumer
    policy, never counted as a message. A bytes subclass, so writers join it like
    any frame and only the outbox's overflow path looks at the type."""

    __slots__ = ()


def reply_frame(reply: dict[str, Any]) -> Reply:
    """A reply or event to one client (``{"type": …}``)."""
    return Reply(text_frame(orjson.dumps(reply)))


def missed_frame(count: int) -> Reply:
    """Told to a drop_oldest client before the messages that follow a gap."""
    return reply_frame({"type": "missed", "count": count})
