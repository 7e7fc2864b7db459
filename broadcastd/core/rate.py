"""A token bucket: how many events per second to let through, with a burst.

Kept apart from the transport so that it can be driven by any clock: the
subscriber port admits new connections through one (``ws.accept_rate``).
"""

from __future__ import annotations


class TokenBucket:
    """``rate`` events per second on average, up to ``max(rate, 1)`` at once (one
    second's worth): a storm is let through at the rate, the rest told to wait."""

    __slots__ = ("_at", "_burst", "_rate", "_tokens")

    def __init__(self, rate: float) -> None:
        self._rate = rate
        self._burst = max(rate, 1.0)
        self._tokens = self._burst
        self._at: float | None = None

    def take(self, now: float) -> float:
        """Take one token at time ``now`` (seconds, any monotonic clock): 0.0 if it
        was there, else the seconds until one will be (nothing is taken then)."""
        if self._at is not None:
            self._tokens = min(self._burst, self._tokens + (now - self._at) * self._rate)
        self._at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return 0.0
        return (1.0 - self._tokens) / self._rate
