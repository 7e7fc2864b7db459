"""How the core and the adapters report what happens, without knowing who listens.

Metrics (Prometheus) implement this interface outside the core; tests and the
default daemon without metrics use NullObserver. Calls on the hot path are made
once per fan-out or once per writer wake-up, never once per delivery.
"""

from __future__ import annotations

from typing import Protocol


class Observer(Protocol):
    def published(self, form: str, messages: int, queued: int, refused: int) -> None:
        """``messages`` were accepted through API ``form`` and fanned out locally:
        queued for ``queued`` subscribers, refused by ``refused`` overflowing ones."""

    def written(self, frames: int, nbytes: int, writes: int, waited: float) -> None:
        """One pass of the writers handed ``frames`` frames (``nbytes`` bytes) to the
        sockets in ``writes`` writes; the oldest had waited ``waited`` seconds since
        its publish was accepted."""

    def dropped(self, reason: str, count: int) -> None:
        """``count`` frames were not delivered: ``drop_oldest`` dropped them, or a
        ``slow_consumer`` was disconnected with them queued."""

    def slow_consumer(self, policy: str) -> None:
        """A client fell behind: ``disconnect`` or ``drop_oldest`` acted on it."""

    def ping_rtt(self, seconds: float) -> None:
        """A keepalive pong came back after ``seconds``."""

    def connection_opened(self) -> None: ...

    def connection_closed(self, code: int, initiator: str) -> None:
        """A connection ended with close ``code``; ``initiator`` is server/client/abnormal."""

    def connection_rejected(self, reason: str) -> None:
        """A handshake was refused: cap, origin, bad_request, handshake_timeout, draining."""

    def control_request(self, endpoint: str, status: int) -> None: ...

    def recovered(self, outcome: bool, reason: str | None, replayed: int) -> None:
        """A subscriber asked to resume from a position: ``outcome`` and, when it
        failed, ``reason``; ``replayed`` messages were queued for it."""

    def delivered(self, queued: int, refused: int) -> None:
        """A publication that came through the broker (Redis) was fanned out here."""

    def broker_up(self, up: bool) -> None:
        """The broker became reachable (every shard) or stopped being so."""

    def broker_reconnected(self) -> None:
        """A pub/sub connection to the broker was made again after a failure."""

    def broker_probe(self, rtt: float | None) -> None:
        """A probe came back after ``rtt`` seconds, or (None) failed."""

    def broker_command(self, seconds: float) -> None:
        """A Redis round trip took ``seconds``."""

    def gap_repair(self, outcome: str) -> None:
        """A gap in a channel's offsets was ``repaired`` from history, or could not
        be and its subscribers were told to ``resync``."""

    def auth_refused(self, reason: str) -> None:
        """A subscriber's token was refused (``reason`` is the refusal's code), or a
        connection was closed for want of one (``token_required``)."""

    def subscribe_denied(self, reason: str) -> None:
        """A subscribe was refused by its namespace's rule (``reason`` as replied)."""


class NullObserver:
    """Reports to nobody."""

    def published(self, form: str, messages: int, queued: int, refused: int) -> None:
        return None

    def written(self, frames: int, nbytes: int, writes: int, waited: float) -> None:
        return None

    def dropped(self, reason: str, count: int) -> None:
        return None

    def slow_consumer(self, policy: str) -> None:
        return None

    def ping_rtt(self, seconds: float) -> None:
        return None

    def connection_opened(self) -> None:
        return None

    def connection_closed(self, code: int, initiator: str) -> None:
        return None

    def connection_rejected(self, reason: str) -> None:
        return None

    def control_request(self, endpoint: str, status: int) -> None:
        return None

    def recovered(self, outcome: bool, reason: str | None, replayed: int) -> None:
        return None

    def delivered(self, queued: int, refused: int) -> None:
        return None

    def broker_up(self, up: bool) -> None:
        return None

    def broker_reconnected(self) -> None:
        return None

    def broker_probe(self, rtt: float | None) -> None:
        return None

    def broker_command(self, seconds: float) -> None:
        return None

    def gap_repair(self, outcome: str) -> None:
        return None

    def auth_refused(self, reason: str) -> None:
        return None

    def subscribe_denied(self, reason: str) -> None:
        return None
