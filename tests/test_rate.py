"""The token bucket behind ``ws.accept_rate``, on a clock the test turns."""

from __future__ import annotations

import pytest

from broadcastd.core.rate import TokenBucket


def test_a_burst_of_one_seconds_worth_then_the_rate() -> None:
    bucket = TokenBucket(10)
    assert [bucket.take(0.0) for _ in range(10)] == [0.0] * 10
    assert bucket.take(0.0) == pytest.approx(0.1)  # the next token in 1/10 s
    assert bucket.take(0.05) == pytest.approx(0.05)  # nothing taken by a refusal
    assert bucket.take(0.1) == 0.0
    assert bucket.take(0.1) > 0


def test_idle_time_refills_up_to_the_burst_only() -> None:
    bucket = TokenBucket(2)
    bucket.take(0.0)
    bucket.take(0.0)
    granted = [bucket.take(100.0) for _ in range(5)]
    assert granted[:2] == [0.0, 0.0]
    assert all(wait > 0 for wait in granted[2:])


def test_a_rate_below_one_still_lets_one_through() -> None:
    bucket = TokenBucket(0.5)
    assert bucket.take(0.0) == 0.0
    assert bucket.take(0.0) == pytest.approx(2.0)
    assert bucket.take(2.0) == 0.0
