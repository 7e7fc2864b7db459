"""The publish request forms of the control API, parsed and validated.

Three forms reach the node:

* ``POST /publish/{channel}``: the body is the payload. A JSON content type
  (``application/json`` or ``*/*+json``) embeds the body as JSON; any other
  type embeds it as a JSON string (it must be UTF-8 text).
* ``POST /publish``: ``{"channel": "a", "data": …}`` or
  ``{"channels": ["a", "b"], "data": …}``. The node checks every channel
  before it publishes any, so the request is all or nothing.
* ``POST /batch``: a JSON array of ``{"channel": …, "data": …}`` items. Each
  item stands alone: a bad item gets an error in its place in the results and
  the others are published.

In the JSON forms ``data`` is embedded as the client wrote it: msgspec decodes
the request with ``data`` typed ``msgspec.Raw``, which checks its syntax and
hands back its exact text without building Python objects. So an integer
beyond 64 bits stays exact, no number is re-formatted, and nothing is encoded
twice.

msgspec walks nested arrays and objects by recursion, guarded by the
interpreter's recursion limit: JSON nested deeper than that (about a thousand
levels) raises RecursionError, which is the client's malformed input, not a
failure of ours, so it is refused as ``bad_json`` like any other syntax error.
"""

from __future__ import annotations

from collections.abc import Container
from typing import Any

import msgspec

from broadcastd.core.channels import check_channel
from broadcastd.core.envelope import Payload, check_utf8
from broadcastd.core.idempotency import check_key
from broadcastd.errors import BadCommand, BadJson, ClientError, TooManyItems

Item = tuple[str, Payload, str | None]
"""One message to publish: channel, payload, idempotency key."""

_ABSENT = msgspec.Raw()
"""What a missing ``data`` decodes to (no JSON value is empty text)."""


class _Message(msgspec.Struct):
    """One batch item. ``channel`` stays untyped so that a bad one is a
    ``bad_channel`` error of its item, as in every other form."""

    channel: Any = msgspec.UNSET
    data: msgspec.Raw = _ABSENT
    idempotency_key: Any = None


class _Publish(msgspec.Struct):
    channel: Any = msgspec.UNSET
    channels: Any = msgspec.UNSET
    data: msgspec.Raw = _ABSENT


_publish = msgspec.json.Decoder(_Publish)
_batch = msgspec.json.Decoder(list[_Message])
_batch_items = msgspec.json.Decoder(list[msgspec.Raw])
_message = msgspec.json.Decoder(_Message)


def is_json_type(content_type: str | None) -> bool:
    if content_type is None:
        return False
    media = content_type.partition(";")[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


def body_payload(body: bytes, content_type: str | None) -> Payload:
    """The payload of ``POST /publish/{channel}``."""
    if is_json_type(content_type):
        try:
            return Payload.from_json_body(body)
        except RecursionError:
            raise _too_deep() from None
    return Payload.from_text_body(body)


def _too_deep() -> BadJson:
    return BadJson("body is not valid JSON: arrays and objects are nested too deeply")


def raw_payload(data: msgspec.Raw) -> Payload:
    """A payload from the JSON text of a ``data`` member, embedded verbatim."""
    return Payload.from_json_text(bytes(data))


def parse_publish(body: bytes, max_channels: int) -> tuple[list[str], Payload, bool]:
    """``POST /publish``: (channels, payload, whether the multi-channel form was used)."""
    try:
        doc = _publish.decode(body)
    except msgspec.ValidationError:
        raise BadCommand(
            'body must be a JSON object with "channel" or "channels" and "data"'
        ) from None
    except msgspec.DecodeError as exc:
        raise BadJson(f"body is not valid JSON: {exc}") from None
    except RecursionError:
        raise _too_deep() from None
    check_utf8(body)
    if not len(doc.data):
        raise BadCommand('body needs "data"')
    if (doc.channel is msgspec.UNSET) == (doc.channels is msgspec.UNSET):
        raise BadCommand('body needs exactly one of "channel" and "channels"')
    if doc.channel is not msgspec.UNSET:
        return [check_channel(doc.channel)], raw_payload(doc.data), False
    names = doc.channels
    if not isinstance(names, list) or not names:
        raise BadCommand('"channels" must be a non-empty array of channel names')
    if len(names) > max_channels:
        raise TooManyItems(f'"channels" may name at most {max_channels} channels')
    checked = [check_channel(name) for name in names]
    return list(dict.fromkeys(checked)), raw_payload(doc.data), True


def parse_batch(
    body: bytes, max_items: int, known: Container[str] = ()
) -> list[Item | ClientError]:
    """``POST /batch``: one (channel, payload, idempotency key) or one error per
    item, in order.

    A well-formed batch is decoded in one call; only when some item is not an
    object is each item decoded on its own, so that it alone gets the error.
    Names in ``known`` (the channels the hub already holds) were checked when
    they were created and are not checked again.
    """
    try:
        try:
            messages: list[_Message | ClientError] = list(_batch.decode(body))
        except msgspec.ValidationError:
            # A syntax error after the first misfit item is found only now.
            messages = _decode_items(body)
    except msgspec.DecodeError as exc:
        raise BadJson(f"body is not valid JSON: {exc}") from None
    except RecursionError:
        raise _too_deep() from None
    check_utf8(body)
    if len(messages) > max_items:
        raise TooManyItems(f"a batch may hold at most {max_items} messages")
    items: list[Item | ClientError] = []
    for message in messages:
        if isinstance(message, ClientError):
            items.append(message)
            continue
        try:
            channel = message.channel
            if channel is msgspec.UNSET or not len(message.data):
                raise BadCommand('each item must be an object with "channel" and "data"')
            if not (isinstance(channel, str) and channel in known):
                channel = check_channel(channel)
            key = message.idempotency_key
            if key is not None:
                key = check_key(key)
            items.append((channel, raw_payload(message.data), key))
        except ClientError as exc:
            items.append(exc)
    return items


def _decode_items(body: bytes) -> list[_Message | ClientError]:
    try:
        raws = _batch_items.decode(body)
    except msgspec.ValidationError:
        raise BadCommand('body must be a JSON array of {"channel": …, "data": …} objects') from None
    messages: list[_Message | ClientError] = []
    for raw in raws:
        try:
            messages.append(_message.decode(raw))
        except msgspec.ValidationError:
            messages.append(BadCommand('each item must be an object with "channel" and "data"'))
    return messages
