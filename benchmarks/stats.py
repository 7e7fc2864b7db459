"""Percentiles of latency samples (nearest-rank: no interpolation between samples,
so a reported p99 is a latency some message actually had)."""

from __future__ import annotations

import math
from collections.abc import Sequence


def percentile(ordered: Sequence[int], q: float) -> int:
    """The nearest-rank ``q``-th percentile (0 < q <= 100) of sorted values."""
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def percentiles_ms(samples_ns: Sequence[int]) -> dict[str, float | int | None]:
    """count, p50, p90, p99, max and mean of nanosecond samples, in milliseconds."""
    if not samples_ns:
        return {"count": 0, "p50": None, "p90": None, "p99": None, "max": None, "mean": None}
    ordered = sorted(samples_ns)
    ms = 1e-6
    return {
        "count": len(ordered),
        "p50": percentile(ordered, 50) * ms,
        "p90": percentile(ordered, 90) * ms,
        "p99": percentile(ordered, 99) * ms,
        "max": ordered[-1] * ms,
        "mean": sum(ordered) / len(ordered) * ms,
    }
