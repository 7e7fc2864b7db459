"""What a subscriber asks for in its handshake URL.

Two equivalent forms, which may be combined::

    ws://host:8765/?channel=news&channel=sports&format=raw
    ws://host:8765/news,sports?format=raw

``since`` asks to recover a channel (and subscribes it): after the last position
seen, ``since=news:EPOCH:OFFSET``, or from the last N kept, ``since=news:last:N``.
OFFSET and N are ASCII digits, at most MAX_OFFSET; anything else is refused
with 400 ``bad_request`` like every other malformed ``since``.

The path is ``/`` or a comma-separated list of channel names; the query may
repeat ``channel``, may set ``format`` to ``json`` (the default: each message
is a JSON envelope) or ``raw`` (the payload alone), and may give a subscriber
``token`` (browsers cannot set an Authorization header on a WebSocket). Channel names follow the
grammar in broadcastd.core.channels and are never percent-decoded in the path,
so each channel has exactly one spelling. Unknown query parameters are refused
rather than ignored, so a typo such as ``chanel=`` fails loudly. The query is
parsed whole (the request line is bounded at 8 KiB before it gets here), so too
many channels is told as ``too_many_channels``, not as a malformed query.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qsl

from broadcastd.core.channels import check_channel
from broadcastd.core.stream import MAX_OFFSET, Since, decimal, parse_since_text
from broadcastd.errors import BadChannel, ClientError, TooManyChannels

FORMATS = ("json", "raw")
MAX_TOKEN_LENGTH = 16 * 1024


@dataclass(frozen=True, slots=True)
class Route:
    channels: tuple[str, ...]
    raw: bool
    since: tuple[tuple[str, Since], ...] = ()
    token: str | None = None
    """A subscriber token (JWT) given as ``?token=`` (browsers cannot set headers)."""


def parse_route(target: str, max_channels: int) -> Route:
    """Parse a request target (path and query); raise a ClientError saying what is wrong."""
    path, _, query = target.partition("?")
    if not path.startswith("/"):
        raise ClientError("request path must start with /")
    channels: dict[str, None] = {}
    if path != "/":
        for name in path[1:].split(","):
            try:
                channels[check_channel(name)] = None
            except BadChannel as exc:
                raise BadChannel(f"path {path[:64]!r}: {exc.message}") from None
    raw = False
    token: str | None = None
    since: dict[str, Since] = {}
    try:
        pairs = parse_qsl(
            query,
            keep_blank_values=True,
            strict_parsing=bool(query),
            errors="strict",
        )
    except (ValueError, UnicodeDecodeError) as exc:
        raise ClientError(f"malformed query string: {exc}") from None
    for key, value in pairs:
        if key == "channel":
            channels[check_channel(value)] = None
        elif key == "since":
            if decimal(value.rpartition(":")[2], MAX_OFFSET) is None:
                raise ClientError(
                    "since must be CHANNEL:EPOCH:OFFSET or CHANNEL:last:N "
                    f"(OFFSET and N in ASCII digits, at most {MAX_OFFSET})"
                )
            name, where = parse_since_text(value)
            channels[check_channel(name)] = None
            since[name] = where
        elif key == "token":
            if token is not None or not 0 < len(value) <= MAX_TOKEN_LENGTH:
                raise ClientError(
                    f"token must be given once, at most {MAX_TOKEN_LENGTH} characters"
                )
            token = value
        elif key == "format":
            if value not in FORMATS:
                raise ClientError(f"format must be one of {', '.join(FORMATS)}")
            raw = value == "raw"
        else:
            raise ClientError(f"unknown query parameter {key[:32]!r}")
    if len(channels) > max_channels:
        raise TooManyChannels(f"at most {max_channels} channels per connection")
    return Route(tuple(channels), raw, tuple(since.items()), token)
