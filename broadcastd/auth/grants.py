"""Control-token grants: what the bearer of each control token may do.

Once ``control.token`` or any ``control.tokens`` entry is set, every control
route but the probes needs ``Authorization: Bearer TOKEN``. Each token is a
Grant: the scopes it holds (which routes) and the channel patterns it may touch
(which channels). ``control.token`` holds every scope on every channel.

Only digests are kept in memory: a token given in the settings or read from its
file at load is hashed (SHA-256) at once. A presented token is hashed once and
its digest compared in constant time with the digest of every configured token,
all of them, so neither the time taken nor the order of the entries says which
matched. Reading the token files at load is this module's only I/O.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeAlias

from broadcastd.errors import ConfigError
from broadcastd.settings import ControlSettings, ControlToken, Scope

_EMPTY_DIGEST = hashlib.sha256(b"").digest()


@dataclass(frozen=True, slots=True)
class Grant:
    """What the bearer of one control token may do: the routes its scopes open
    and the channels its patterns cover (``exact`` None: every channel)."""

    name: str
    scopes: frozenset[Scope]
    exact: frozenset[str] | None = None
    prefixes: tuple[str, ...] = ()

    def allows(self, scope: Scope) -> bool:
        return Scope.ADMIN in self.scopes or scope in self.scopes

    def covers(self, channel: str) -> bool:
        """``channel`` matches a pattern: its exact name, or a prefix ending in ``*``."""
        if self.exact is None:
            return True
        return channel in self.exact or channel.startswith(self.prefixes)

    @property
    def everywhere(self) -> bool:
        return self.exact is None


OPEN_GRANT = Grant("", frozenset(Scope))
"""Every request's grant when no token is configured (and the probes' always)."""

Grants: TypeAlias = list[tuple[bytes, Grant]]
"""Every configured token as (SHA-256 digest, Grant)."""


def load_grants(settings: ControlSettings) -> Grants:
    """Every configured token as (SHA-256 digest, Grant), read once at start.

    A ``file`` entry is read here and only its digest kept. Raises ConfigError for
    a token file that is missing, unreadable or empty, a digest of the empty
    string (``printf %s "$TOKEN" | sha256sum`` with TOKEN unset), a pattern with
    ``*`` anywhere but at its end, and two entries holding the same token (which
    of their grants would apply?). Messages name the entry, never a secret.
    """
    grants: Grants = []
    if settings.token is not None:
        secret = settings.token.get_secret_value().encode()
        grants.append((hashlib.sha256(secret).digest(), Grant("control.token", frozenset(Scope))))
    for index, entry in enumerate(settings.tokens):
        where = f"control.tokens[{index}] ({entry.name!r})"
        digest = _token_digest(entry, where)
        if digest == _EMPTY_DIGEST:
            raise ConfigError(f"{where}: sha256 is the digest of an empty token")
        for known, grant in grants:
            if hmac.compare_digest(known, digest):
                raise ConfigError(f"{where}: the same token as {grant.name!r}")
        grants.append((digest, _grant(entry, where)))
    return grants


def find_grant(grants: Sequence[tuple[bytes, Grant]], token: bytes) -> Grant | None:
    """The grant of ``token``, or None. Its digest is compared with every
    configured digest, without stopping at a match (load_grants made sure at
    most one can match)."""
    digest = hashlib.sha256(token).digest()
    matched: Grant | None = None
    for known, grant in grants:
        if hmac.compare_digest(digest, known):
            matched = grant
    return matched


def _token_digest(entry: ControlToken, where: str) -> bytes:
    if entry.sha256 is not None:
        return bytes.fromhex(entry.sha256)
    assert entry.file is not None
    try:
        secret = entry.file.read_bytes().strip()
    except OSError as exc:
        raise ConfigError(
            f"{where}: cannot read token file {entry.file}: {exc.strerror or exc}"
        ) from None
    if not secret:
        raise ConfigError(f"{where}: token file {entry.file} is empty")
    return hashlib.sha256(secret).digest()


def _grant(entry: ControlToken, where: str) -> Grant:
    scopes = frozenset(entry.scopes)
    if entry.namespaces is None:
        return Grant(entry.name, scopes)
    exact: set[str] = set()
    prefixes: list[str] = []
    for pattern in entry.namespaces:
        if not pattern or "*" in pattern[:-1]:
            raise ConfigError(
                f"{where}: channel pattern {pattern[:64]!r} must be a channel name, "
                "or a prefix ending in * (orders:*)"
            )
        if pattern.endswith("*"):
            prefixes.append(pattern[:-1])
        else:
            exact.add(pattern)
    return Grant(entry.name, scopes, frozenset(exact), tuple(prefixes))
