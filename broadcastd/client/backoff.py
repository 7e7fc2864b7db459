"""Exponential backoff with full jitter, shared by the subscriber and the publishers."""

from __future__ import annotations

import random


class Backoff:
    """Exponential backoff with full jitter between reconnection attempts.

    The n-th consecutive failure waits a uniformly random time in
    [0, min(cap, base * 2**n)], so many clients dropped at once do not return
    at once. The count starts again only after a connection has stayed up for
    ``stable_after`` seconds: a server that accepts and then drops clients
    at once must not be hammered at the base rate.
    """

    def __init__(
        self,
        base: float = 0.5,
        cap: float = 30.0,
        stable_after: float = 10.0,
        rng: random.Random | None = None,
    ) -> None:
        self.base = base
        self.cap = cap
        self.stable_after = stable_after
        self.failures = 0
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not secrecy
        self._opened_at: float | None = None

    def opened(self, now: float) -> None:
        """A connection is up as of ``now`` (a monotonic time)."""
        self._opened_at = now

    def next_delay(self, now: float) -> float:
        """Seconds to wait before the next attempt; call when a connection ends or fails."""
        if self._opened_at is not None and now - self._opened_at >= self.stable_after:
            self.failures = 0
        self._opened_at = None
        # The exponent stops growing long before a float would overflow (after a
        # thousand failures, hours of retrying at the cap).
        ceiling = min(self.cap, self.base * 2 ** min(self.failures, 64))
        delay = self._rng.uniform(0, ceiling)
        self.failures += 1
        return delay
