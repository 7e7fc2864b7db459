"""The publish request forms of the control API, parsed and validated.

Three forms reach the same ``Node.publish``:

* ``POST /publish/{channel}``: the body is the payload. A JSON content type
  (``application/json`` or ``*/*+json``) embeds the body as JSON; any other
  type embeds it as a JSON string (it must be UTF-8 text).
* ``POST /publish``: ``{"channel": "a", "data": …}`` or
  ``{"channels": ["a", "b"], "data": …}``. Every channel is checked before any
  is published, so the request is all or nothing.
* ``POST /batch``: a JSON array of ``{"channel": …, "data": …}`` items. Each
  item stands alone: a bad item gets an error in its place in the results and
  the others are published.
"""

from __future__ import annotations

from collections.abc import Container
from typing import Any

import orjson

from broadcastd.core.channels import check_channel
from broadcastd.core.envelope import Payload
from broadcastd.core.idempotency import MAX_KEY_LENGTH
from broadcastd.errors import BadCommand, BadJson, ClientError, TooManyItems

Item = tuple[str, Payload, str | None]
"""One message to publish: channel, payload, idempotency key."""


def check_key(key: object) -> str:
    """An idempotency key: 1 to 128 printable ASCII characters."""
    if (
        isinstance(key, str)
        and 0 < len(key) <= MAX_KEY_LENGTH
        and key.isascii()
        and key.isprintable()
    ):
        return key
    raise BadCommand(f"an idempotency key is 1 to {MAX_KEY_LENGTH} printable ASCII characters")


def is_json_type(content_type: str | None) -> bool:
    if content_type is None:
        return False
    media = content_type.partition(";")[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


def body_payload(body: bytes, content_type: str | None) -> Payload:
    """The payload of ``POST /publish/{channel}``."""
    if is_json_type(content_type):
        return Payload.from_json_body(body)
    return Payload.from_text_body(body)


def load_json(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadJson(f"body is not valid JSON: {exc}") from None


def parse_publish(body: bytes, max_channels: int) -> tuple[list[str], Payload, bool]:
    """``POST /publish``: (channels, payload, whether the multi-channel form was used)."""
    doc = load_json(body)
    if not isinstance(doc, dict):
        raise BadCommand('body must be a JSON object with "channel" or "channels" and "data"')
    if "data" not in doc:
        raise BadCommand('body needs "data"')
    if ("channel" in doc) == ("channels" in doc):
        raise BadCommand('body needs exactly one of "channel" and "channels"')
    if "channel" in doc:
        return [check_channel(doc["channel"])], Payload.from_value(doc["data"]), False
    names = doc["channels"]
    if not isinstance(names, list) or not names:
        raise BadCommand('"channels" must be a non-empty array of channel names')
    if len(names) > max_channels:
        raise TooManyItems(f'"channels" may name at most {max_channels} channels')
    checked = [check_channel(name) for name in names]
    return list(dict.fromkeys(checked)), Payload.from_value(doc["data"]), True


def parse_batch(
    body: bytes, max_items: int, known: Container[str] = ()
) -> list[Item | ClientError]:
    """``POST /batch``: one (channel, payload) or one error per item, in order.

    Names in ``known`` (the channels the hub already holds) were checked when
    they were created and are not checked again.
    """
    doc = load_json(body)
    if not isinstance(doc, list):
        raise BadCommand('body must be a JSON array of {"channel": …, "data": …} objects')
    if len(doc) > max_items:
        raise TooManyItems(f"a batch may hold at most {max_items} messages")
    items: list[Item | ClientError] = []
    for item in doc:
        try:
            if not isinstance(item, dict) or "data" not in item or "channel" not in item:
                raise BadCommand('each item must be an object with "channel" and "data"')
            channel = item["channel"]
            if not (isinstance(channel, str) and channel in known):
                channel = check_channel(channel)
            key = item.get("idempotency_key")
            if key is not None:
                key = check_key(key)
            items.append((channel, Payload.from_value(item["data"]), key))
        except ClientError as exc:
            items.append(exc)
    return items
