"""Connection events under a storm: each is logged at its level up to the rate,
the rest of the second at debug, and one summary line carries the second's counts."""

from __future__ import annotations

from typing import Any

import structlog

from broadcastd.connlog import ConnectionLog


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def at(logs: list[dict[str, Any]], level: str, event: str) -> list[dict[str, Any]]:
    return [e for e in logs if e["log_level"] == level and e["event"] == event]


async def test_under_the_rate_every_event_is_logged_at_its_level() -> None:
    clock = Clock()
    connections = ConnectionLog("info", 5, clock)
    with structlog.testing.capture_logs() as logs:
        for i in range(5):
            connections.opened(client=f"c{i}")
        clock.now += 1.0
        for i in range(5):
            connections.closed(1000, client=f"c{i}")
        connections.close()
    assert len(at(logs, "info", "connection.open")) == 5
    assert len(at(logs, "info", "connection.close")) == 5
    assert not at(logs, "info", "connections.summary")


async def test_above_the_rate_the_rest_go_to_debug_and_a_summary_counts_all() -> None:
    clock = Clock()
    connections = ConnectionLog("info", 3, clock)
    with structlog.testing.capture_logs() as logs:
        for i in range(10):
            connections.opened(client=f"c{i}")
        for i in range(4):
            connections.closed(1000 if i % 2 else 1006, client=f"c{i}")
        clock.now += 1.5  # the next second: its first event closes the last one
        connections.opened(client="late")
        connections.close()
    assert [e["client"] for e in at(logs, "info", "connection.open")] == [
        "c0",
        "c1",
        "c2",
        "late",
    ]
    assert not at(logs, "info", "connection.close")
    (summary,) = at(logs, "info", "connections.summary")
    assert (summary["opened"], summary["closed"]) == (10, 4)
    assert summary["close_codes"] == {"1000": 2, "1006": 2}


async def test_a_rate_of_zero_logs_every_event_at_the_level_set() -> None:
    connections = ConnectionLog("debug", 0, Clock())
    with structlog.testing.capture_logs() as logs:
        for i in range(500):
            connections.opened(client=f"c{i}")
        connections.close()
    assert len(at(logs, "debug", "connection.open")) == 500
    assert not at(logs, "info", "connections.summary")
