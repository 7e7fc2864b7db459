"""What a verified subscriber token allows: pure functions, no I/O.

A token names its user (``sub``) and may carry a ``channels`` claim: channel
names, or patterns ending in ``*`` that match every channel starting with the
text before it (``orders:*``; ``*`` alone matches everything). Only a trailing
``*`` is special: any other ``*`` is literal, and as ``*`` is not a channel
character such a pattern grants nothing (``a*b`` matches only the impossible
name ``a*b``).

User channels follow Centrifugo's rule: a channel containing ``#`` belongs to
the users listed, comma-separated, after its *last* ``#`` (``chat:dm#alice,bob``
is alice's and bob's). It is theirs alone, whatever the namespace's rule says,
and no pattern grants it to anyone else: ``*`` in a token must not open every
user's private channel.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class Refusal(StrEnum):
    """Why a subscription is refused: stable codes, compared and sent as plain strings."""

    UNAUTHENTICATED = "token_required"
    """The channel needs a token and the connection has none."""
    CHANNEL_NOT_ALLOWED = "channel_not_allowed"
    """The token's ``channels`` claim does not match the channel."""
    NOT_YOUR_CHANNEL = "not_your_channel"
    """A user channel (``...#USER``) of users other than the token's ``sub``."""


USER_BOUNDARY = "#"
USER_SEPARATOR = ","
WILDCARD = "*"


@dataclass(frozen=True, slots=True)
class Claims:
    """The parts of a verified token that broadcastd acts on."""

    user: str
    """The ``sub`` claim; "" when the token has none (it then owns no user channel)."""
    expires: float | None
    """The ``exp`` claim in epoch seconds, at most the end of year 9999 (a later one
    is clamped to it); None for a token that never expires."""
    channels: tuple[str, ...] = ()
    """The ``channels`` claim: names and trailing-``*`` patterns."""
    info: Any = field(default=None, compare=False)
    """The ``info`` claim, any JSON value: connection metadata that presence entries
    and the connection listing show as given (None without one)."""


def matches(pattern: str, channel: str) -> bool:
    """Whether one entry of a ``channels`` claim covers ``channel``.

    A pattern ending in ``*`` is a prefix; anything else must equal the channel.
    """
    if pattern.endswith(WILDCARD):
        return channel.startswith(pattern[:-1])
    return pattern == channel


def users_of(channel: str) -> frozenset[str] | None:
    """The users a user channel belongs to, or None when ``channel`` is not one.

    The users are the comma-separated ids after the last ``#``; empty ids are
    dropped so that a token without ``sub`` (user "") owns nothing, and
    ``news#`` belongs to no one.
    """
    boundary = channel.rfind(USER_BOUNDARY)
    if boundary < 0:
        return None
    ids = channel[boundary + 1 :].split(USER_SEPARATOR)
    return frozenset(user for user in ids if user)


def may_subscribe(claims: Claims | None, channel: str, rule: str) -> Refusal | None:
    """None when the subscription is allowed, else the Refusal (a str).

    ``claims`` is None for a connection without a verified token. ``rule`` is the
    channel's SubscribeRule (``public``, ``token`` or ``user``); a user channel
    is decided by its users alone, whatever the rule.
    """
    owners = users_of(channel)
    if owners is not None:
        if claims is None:
            return Refusal.UNAUTHENTICATED
        return None if claims.user in owners else Refusal.NOT_YOUR_CHANNEL
    if rule == "public":
        return None
    if rule not in ("token", "user"):
        raise ValueError(f"unknown subscribe rule {rule!r}")
    if claims is None:
        return Refusal.UNAUTHENTICATED
    if rule == "user":
        return None
    if any(matches(pattern, channel) for pattern in claims.channels):
        return None
    return Refusal.CHANNEL_NOT_ALLOWED
