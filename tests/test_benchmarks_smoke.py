"""The benchmark code still runs (tiny numbers; nothing here is timed or judged)."""

from __future__ import annotations

import pytest

import benchmarks
from benchmarks.scenarios import QUICK
from benchmarks.servers import SERVERS


def test_benchmark_scenarios_run_against_the_daemon() -> None:
    results = benchmarks.run_quick(server="broadcastd")
    outcome = results["servers"]["broadcastd"]
    assert outcome["scenarios"], outcome
    for name, scenario in outcome["scenarios"].items():
        assert "error" not in scenario, (name, scenario.get("error"))
    # S1c's checks are exact: every slow reader's received + missed == published,
    # and it got the last message; and the paused ones were conflated.
    s1c = outcome["scenarios"]["S1c"]
    assert s1c["metrics"]["slow_wrong"]["value"] == 0, s1c["details"].get("problems")
    assert s1c["metrics"]["slow_missed"]["value"] > 0, s1c["details"]["slow_readers"]
    assert "time_ratio" in outcome["scenarios"]["S5t"]["metrics"]  # compared with S5
    # S6's counts are exact too: every storm client came and went, and no open
    # subscriber lost a message to it.
    s6 = outcome["scenarios"]["S6"]
    assert s6["details"]["storm_clients"]["connected"] == QUICK.s6_storm, s6["details"]
    assert s6["metrics"]["storm_missed"]["value"] == 0, s6["details"].get("problems")


@pytest.mark.parametrize(
    ("server", "scenarios"),
    [("broadcastd-redis", ["S1", "S2b", "S3"]), ("broadcastd-redis2", ["S1", "S2b"])],
)
def test_benchmark_scenarios_run_on_the_redis_broker(server: str, scenarios: list[str]) -> None:
    """A private redis-server and one or two nodes; redis-server's CPU is measured."""
    reason = SERVERS[server].unavailable()
    if reason is not None:
        pytest.skip(reason)
    results = benchmarks.run_quick(server=server, scenarios=scenarios)
    outcome = results["servers"][server]
    for name, scenario in outcome["scenarios"].items():
        assert "error" not in scenario, (name, scenario.get("error"), scenario.get("server_log"))
    assert "redis-server" in outcome["pinning"], outcome.get("pinning")
    s1 = outcome["scenarios"]["S1"]["details"]
    assert "redis-server" in s1["depth1"]["helper_cpu_s"], s1["depth1"]
    if server == "broadcastd-redis2":  # S1 only: the others are skipped, with the reason
        assert "skipped" in outcome["scenarios"]["S2b"]
