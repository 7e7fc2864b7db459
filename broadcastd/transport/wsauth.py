"""One subscriber connection's token: checked at connect or by a command, watched to expiry.

A token may come three ways: ``?token=`` in the URL (browsers cannot set headers
on a WebSocket), ``Authorization: Bearer`` (servers), or a first command
``{"op": "auth", "token": ...}``, which keeps it out of URLs and proxy logs.
Verification may need a round trip (a JWKS fetch for an unknown key), so it runs
as a task when it does: a token given at connect then holds the connection's
input and its URL subscriptions until it is decided, and a command's token is
answered when decided. Tokens checked with a secret or a PEM key are decided at
once, in the callback that received them.

Then the token's ``exp`` is watched: ``auth.expiring_notice`` seconds before it
the client gets ``{"type": "expiring", "expires": EXP}`` and may send
``{"op": "refresh", "token": ...}``; without a new token the connection is closed
with 4003 at ``exp`` plus ``auth.leeway``. A connection with no accepted token
that holds no channel after ``auth.auth_timeout`` is closed with 4001, so that
nobody can keep connections open by never authenticating.

Refusals are counted by reason and logged with the client id and the reason,
never the token.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import Any

from broadcastd import log
from broadcastd.auth.claims import Claims
from broadcastd.auth.tokens import TokenVerifier
from broadcastd.core.observer import Observer
from broadcastd.core.session import CommandId, Session
from broadcastd.errors import CloseReason, TokenError
from broadcastd.settings import AuthSettings

_log = log.get("broadcastd.auth")
_throttle = log.Throttle(per_second=10)
CONNECT = "connect"


class ConnectionAuth:
    """The token of one connection, from the first one given to the close."""

    __slots__ = (
        "_close",
        "_deadline",
        "_expiry",
        "_tasks",
        "closed",
        "observer",
        "session",
        "settings",
        "verifier",
    )

    def __init__(
        self,
        verifier: TokenVerifier,
        settings: AuthSettings,
        session: Session,
        observer: Observer,
        close: Callable[[CloseReason], None],
    ) -> None:
        self.verifier = verifier
        self.settings = settings
        self.session = session
        self.observer = observer
        self._close = close
        self._expiry: asyncio.TimerHandle | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.closed = False
        session.on_token = self.on_command

    def start(self, token: str | None, then: Callable[[], None], hold: Callable[[], None]) -> None:
        """The connection is open: check ``token`` (if one came with it), then call
        ``then`` (which subscribes the URL's channels), unless it was refused.
        ``hold`` stops reading the client's commands while the verdict waits; a
        refusal then closes the connection, and the transport must read again
        once it is closing, or the client's close frame would wait unread for
        ``ws.close_timeout``."""
        if token is None:
            self._arm_deadline()
            then()
            return
        try:
            claims = self.verifier.verify_now(token)
        except TokenError as exc:
            self._refused(exc, CONNECT, None)
            self._close(_close_reason(exc))
            return
        if claims is None:  # a JWKS key: perhaps a fetch
            self._arm_deadline()
            hold()
            self._spawn(self._connect(token, then))
            return
        self._accept(claims, CONNECT, None)
        then()

    def _arm_deadline(self) -> None:
        """Close in ``auth.auth_timeout`` unless a token is accepted or a channel held
        by then (not armed for a token decided at connect: one timer fewer)."""
        loop = asyncio.get_running_loop()
        self._deadline = loop.call_later(self.settings.auth_timeout, self._no_token)

    async def _connect(self, token: str, then: Callable[[], None]) -> None:
        try:
            claims = await self.verifier.verify(token)
        except TokenError as exc:
            if not self.closed:
                # Refused once: the deadline must not count it again while the
                # closing handshake runs.
                self._disarm_deadline()
                self._refused(exc, CONNECT, None)
                self._close(_close_reason(exc))
            return
        if self.closed:
            return
        self._accept(claims, CONNECT, None)
        then()

    def on_command(self, op: str, token: str, command_id: CommandId) -> None:
        """``{"op": "auth" | "refresh", "token": ...}``: answered once decided."""
        try:
            claims = self.verifier.verify_now(token)
        except TokenError as exc:
            self._refused(exc, op, command_id)
            return
        if claims is None:
            self._spawn(self._command(op, token, command_id))
        else:
            self._accept(claims, op, command_id)

    async def _command(self, op: str, token: str, command_id: CommandId) -> None:
        try:
            claims = await self.verifier.verify(token)
        except TokenError as exc:
            if not self.closed:
                self._refused(exc, op, command_id)
            return
        if not self.closed:
            self._accept(claims, op, command_id)

    def _accept(self, claims: Claims, op: str, command_id: CommandId) -> None:
        previous = self.session.claims
        if previous is not None and previous.user != claims.user:
            # A refresh cannot turn a connection into another user's: its user
            # channels were granted to the first one.
            exc = TokenError("a refreshed token must be for the same user", "token_user")
            self._refused(exc, op, command_id)
            return
        self.session.authenticated(claims, op, command_id)
        self._disarm_deadline()
        self._watch(claims)

    def _disarm_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _watch(self, claims: Claims) -> None:
        """Arm the expiring notice, which then arms the close at ``exp`` + leeway:
        one timer per connection at a time."""
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        if claims.expires is None:
            return
        loop = asyncio.get_running_loop()
        notice = claims.expires - time.time() - self.settings.expiring_notice
        self._expiry = loop.call_later(max(0.0, notice), self._notify, claims.expires)

    def _notify(self, expires: float) -> None:
        self._expiry = None
        if self.closed:
            return
        self.session.notify({"type": "expiring", "expires": int(expires)})
        left = expires + self.settings.leeway - time.time()
        self._expiry = asyncio.get_running_loop().call_later(max(0.0, left), self._expired)

    def _expired(self) -> None:
        self._expiry = None
        if self.closed:
            return
        self._count("token_expired")
        self._close(CloseReason.TOKEN_EXPIRED)

    def _no_token(self) -> None:
        """No token accepted within ``auth.auth_timeout`` and no channel held."""
        self._deadline = None
        if self.closed or self.session.claims is not None or self.session.channels:
            return
        self._count("token_required")
        self._close(CloseReason.AUTH_REQUIRED)

    def _refused(self, exc: TokenError, op: str, command_id: CommandId) -> None:
        """Count and answer a refused token. A refused command counts towards
        ``ws.max_command_errors`` like any invalid command (the connect refusal
        closes on its own, with the token's close code)."""
        self._count(exc.code)
        close = self.session.refused(exc, op, command_id)
        if close is not None and op != CONNECT:
            self._close(close)

    def _count(self, reason: str) -> None:
        self.observer.auth_refused(reason)
        if _throttle.allow("auth.refused"):
            _log.info(
                "auth.refused",
                client=self.session.id,
                reason=reason,
                suppressed=_throttle.suppressed("auth.refused"),
            )

    def close(self) -> None:
        """The connection ended: no timer or verification acts on it any more."""
        self.closed = True
        for timer in (self._expiry, self._deadline):
            if timer is not None:
                timer.cancel()
        self._expiry = self._deadline = None
        for task in self._tasks:
            task.cancel()

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if task.cancelled() or task.exception() is None:
            return
        if _throttle.allow("auth.error"):  # a failure of ours: this connection only
            _log.error("auth.error", client=self.session.id, exc_info=task.exception())
        self._close(CloseReason.TOKEN_INVALID)


def _close_reason(exc: TokenError) -> CloseReason:
    return CloseReason.TOKEN_EXPIRED if exc.code == "token_expired" else CloseReason.TOKEN_INVALID
