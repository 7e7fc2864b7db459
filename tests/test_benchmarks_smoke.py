"""The benchmark code still runs (tiny numbers; nothing here is timed or judged)."""

from __future__ import annotations

import benchmarks


def test_benchmark_scenarios_run_against_the_daemon() -> None:
    results = benchmarks.run_quick(server="broadcastd")
    outcome = results["servers"]["broadcastd"]
    assert outcome["scenarios"], outcome
    for name, scenario in outcome["scenarios"].items():
        assert "error" not in scenario, (name, scenario.get("error"))
