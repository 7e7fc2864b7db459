"""The channel-name grammar.

A name is 1 to 128 characters from ``A-Z a-z 0-9 _ - . : @ #``. Names are taken
literally: no case folding, trimming or decoding, so two names are the same
channel exactly when they are the same string. The grammar leaves out ``,``
and ``/`` (the separators of the URL path form), ``%`` (so a percent-encoded
name can never alias a plain one), whitespace and control characters, so a name
can be written in a log line or a metric label unescaped and can never collide
with another. ``#`` marks a user channel (``ns:room#alice`` belongs to user
``alice``); in a URL it is written ``%23``, as a ``#`` there starts the fragment.
"""

from __future__ import annotations

import re

from broadcastd.errors import BadChannel

MAX_CHANNEL_LENGTH = 128
CHANNEL_ALPHABET = "A-Za-z0-9_\\-.:@#"
_CHANNEL_RE = re.compile(f"[{CHANNEL_ALPHABET}]{{1,{MAX_CHANNEL_LENGTH}}}")


def is_valid_channel(name: object) -> bool:
    return isinstance(name, str) and _CHANNEL_RE.fullmatch(name) is not None


def check_channel(name: object) -> str:
    """Return ``name`` if it is a valid channel name, else raise BadChannel saying why."""
    if is_valid_channel(name):
        assert isinstance(name, str)
        return name
    if not isinstance(name, str):
        raise BadChannel("channel must be a string")
    if not name:
        raise BadChannel("channel must not be empty")
    if len(name) > MAX_CHANNEL_LENGTH:
        raise BadChannel(f"channel is longer than {MAX_CHANNEL_LENGTH} characters")
    raise BadChannel("channel may contain only letters, digits and _ - . : @ #")
