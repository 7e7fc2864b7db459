"""The monitoring kit (deploy/prometheus, deploy/grafana) checked against the real daemon.

Every metric the alert rules and the dashboard query must be one the daemon exposes, and
every broadcastd family the daemon exposes must be on the dashboard, so the kit cannot
drift from the code. With promtool (Debian/Ubuntu package ``prometheus``) the Prometheus
configuration, the rules and the dashboard's PromQL are validated, and each alert is
unit-tested: it fires on a scenario and stays quiet on its near misses.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from broadcastd.settings import MetricsSettings

from .conftest import ROOT, Running, recv_json, subscribed

PROMETHEUS = ROOT / "deploy" / "prometheus"
GRAFANA = ROOT / "deploy" / "grafana"
PROMETHEUS_CONFIG = PROMETHEUS / "prometheus.yml"
ALERTS = PROMETHEUS / "alerts.yml"
DATASOURCES = GRAFANA / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = GRAFANA / "provisioning" / "dashboards" / "broadcastd.yml"
DASHBOARD = GRAFANA / "dashboards" / "broadcastd.json"
KIT_FILES = sorted(
    path
    for folder in (PROMETHEUS, GRAFANA)
    for path in folder.rglob("*")
    if path.suffix in {".yml", ".yaml", ".json"}
)

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool is not installed, so the Prometheus config, the alert rules and the "
    "dashboard's PromQL were NOT validated (Debian/Ubuntu: apt-get install prometheus)",
)

REQUIRED_ALERTS = {
    "BroadcastdDown",
    "BroadcastdNotReady",
    "BroadcastdSlowConsumerDisconnects",
    "BroadcastdQueuesNearBound",
    "BroadcastdAbnormalClosesRising",
    "BroadcastdDeliveryLatencyHigh",
    "BroadcastdClientsDroppedToZero",
    "BroadcastdMemoryGrowingFasterThanClients",
    "BroadcastdRejectingConnections",
    "BroadcastdBrokerDown",
    "BroadcastdGapRepairs",
    "BroadcastdBrokerProbeFailing",
}
SEVERITIES = {"critical", "warning", "info"}
DATASOURCE_UIDS = {"prometheus", "${datasource}"}

# A metric name in PromQL: what the daemon exposes, what the process collector adds, and
# the `up` series Prometheus itself records for every target.
METRIC_NAME = re.compile(
    r"(?<![\w:])(?:(?:broadcastd|process)_[A-Za-z0-9_]*[A-Za-z0-9]|up(?=\s*\{))"
)
SYNTHETIC = {"up"}
SAMPLE_NAME = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def load(path: Path) -> Any:
    text = path.read_text(encoding="utf-8")
    return json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in load(ALERTS)["groups"] for rule in group["rules"]]


def dashboard_panels() -> list[dict[str, Any]]:
    panels: list[dict[str, Any]] = []
    for panel in load(DASHBOARD)["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))  # those of a collapsed row
    return panels


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, PromQL) of every query on the dashboard: panels, variables, annotations."""
    dashboard = load(DASHBOARD)
    queries = [
        (f"panel {panel['title']!r} {target['refId']}", target["expr"])
        for panel in dashboard_panels()
        for target in panel.get("targets", [])
    ]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            queries.append(
                (
                    f"variable {variable['name']}",
                    query["query"] if isinstance(query, dict) else query,
                )
            )
    queries.extend(
        (f"annotation {a['name']!r}", a["expr"])
        for a in dashboard["annotations"]["list"]
        if "expr" in a
    )
    return queries


def metric_names(promql: str) -> set[str]:
    return set(METRIC_NAME.findall(promql))


def sample_names(exposition: str) -> set[str]:
    names = set()
    for line in exposition.splitlines():
        if line and not line.startswith("#"):
            match = SAMPLE_NAME.match(line)
            assert match is not None, line
            names.add(match.group())
    return names


def scrape_job() -> dict[str, Any]:
    jobs = {job["job_name"]: job for job in load(PROMETHEUS_CONFIG)["scrape_configs"]}
    job: dict[str, Any] = jobs["broadcastd"]
    return job


async def exposed_samples(daemon: Running) -> set[str]:
    """The sample names of a daemon that has seen some traffic, so that the labelled
    counters that start empty (closes, control requests) have series too."""
    async with daemon.connect("/news") as ws:
        await subscribed(ws, "news")
        await daemon.publish("news", {"n": 1})
        await recv_json(ws)
    listener = daemon.daemon.metrics_listener
    assert listener is not None
    url = f"http://127.0.0.1:{listener.port}{scrape_job().get('metrics_path', '/metrics')}"
    async with httpx.AsyncClient() as client:
        # Each scrape lets the daemon's tasks run: the connection's bookkeeping
        # finishes after its socket closes.
        for _ in range(500):
            response = await client.get(url)
            assert response.status_code == 200
            names = sample_names(response.text)
            if "broadcastd_connections_closed_total" in names:
                return names
    raise AssertionError("the closed connection never showed in /metrics")


def unknown_names(used: dict[str, set[str]], exposed: set[str]) -> dict[str, list[str]]:
    return {where: sorted(names - exposed) for where, names in used.items() if names - exposed}


def promtool(*args: str | Path) -> None:
    assert PROMTOOL is not None
    result = subprocess.run(
        [PROMTOOL, *map(str, args)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, f"promtool {args[:2]} failed:\n{result.stdout}{result.stderr}"


# (a) everything loads


def test_the_kit_is_complete() -> None:
    for path in (PROMETHEUS_CONFIG, ALERTS, DATASOURCES, DASHBOARD_PROVIDERS, DASHBOARD):
        assert path in KIT_FILES, path


@pytest.mark.parametrize("path", KIT_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_file_loads(path: Path) -> None:
    assert isinstance(load(path), dict)


# the pieces fit together


def test_prometheus_scrapes_broadcastd_and_loads_the_rules() -> None:
    config = load(PROMETHEUS_CONFIG)
    job = scrape_job()
    targets = [t for static in job["static_configs"] for t in static["targets"]]
    assert targets == [f"broadcastd:{MetricsSettings().port}"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    # docker-compose mounts deploy/prometheus at /etc/prometheus.
    assert config["rule_files"] == [f"/etc/prometheus/{ALERTS.name}"]


def test_grafana_provisions_the_datasource_and_the_dashboard() -> None:
    datasources = {d["uid"]: d for d in load(DATASOURCES)["datasources"]}
    assert datasources["prometheus"]["type"] == "prometheus"
    assert datasources["prometheus"]["url"] == "http://prometheus:9090"
    (provider,) = load(DASHBOARD_PROVIDERS)["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
    dashboard = load(DASHBOARD)
    assert dashboard["uid"] == "broadcastd"
    assert dashboard["schemaVersion"] >= 38  # Grafana 10
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["datasource"]["current"]["value"] == "prometheus"


def test_every_panel_and_query_uses_the_prometheus_datasource() -> None:
    dashboard = load(DASHBOARD)
    users = [p for p in dashboard_panels() if p["type"] != "row"]
    users += [t for p in users for t in p["targets"]]
    users += [v for v in dashboard["templating"]["list"] if v["type"] == "query"]
    users += [a for a in dashboard["annotations"]["list"] if "expr" in a]
    for user in users:
        assert user["datasource"]["type"] == "prometheus", user
        assert user["datasource"]["uid"] in DATASOURCE_UIDS, user


def test_panels_have_unique_ids_and_do_not_overlap() -> None:
    panels = dashboard_panels()
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    taken: dict[tuple[int, int], str] = {}
    for panel in panels:
        pos = panel["gridPos"]
        assert pos["x"] >= 0, panel["title"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        assert panel["type"] == "row" or panel["description"], panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in taken, (panel["title"], taken[(x, y)])
                taken[(x, y)] = panel["title"]


def test_queue_depths_are_a_heatmap() -> None:
    (heatmap,) = [p for p in dashboard_panels() if p["type"] == "heatmap"]
    (target,) = heatmap["targets"]
    assert target["format"] == "heatmap"
    assert "broadcastd_outbox_depth_frames_bucket" in target["expr"]
    assert "rate(" not in target["expr"]  # a gauge histogram: its buckets are current counts
    assert heatmap["options"]["calculate"] is False


# (b) no name the daemon does not expose; every family it exposes is shown


async def test_every_metric_in_the_rules_and_the_dashboard_is_exposed(daemon: Running) -> None:
    exposed = await exposed_samples(daemon)
    used = {f"alert {rule['alert']}": metric_names(rule["expr"]) for rule in alert_rules()}
    used.update({where: metric_names(expr) for where, expr in dashboard_queries()})
    used.update(
        {
            f"promtool case {i} ({case.alert})": {name.split("{")[0] for name in case.series}
            for i, case in enumerate(ALERT_CASES)
        }
    )
    assert all(used.values()), [where for where, names in used.items() if not names]
    assert unknown_names(used, exposed | SYNTHETIC) == {}


async def test_every_broadcastd_metric_is_on_the_dashboard(daemon: Running) -> None:
    exposed = {name for name in await exposed_samples(daemon) if name.startswith("broadcastd_")}
    shown = set().union(*(metric_names(expr) for _, expr in dashboard_queries()))

    def family(name: str) -> str:
        return re.sub(r"_(bucket|count|sum|total)$", "", name)

    missing = {family(name) for name in exposed} - {family(name) for name in shown}
    assert missing == set()


# (c) alerts a person on call can act on


def test_alerts_have_a_severity_a_summary_and_a_description() -> None:
    rules = alert_rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names))
    assert set(names) >= REQUIRED_ALERTS
    for rule in rules:
        assert rule["labels"]["severity"] in SEVERITIES, rule["alert"]
        annotations = rule["annotations"]
        assert annotations["summary"].strip(), rule["alert"]
        assert len(annotations["description"]) > 200, rule["alert"]  # runbook, not a title
        assert "for" in rule, rule["alert"]


# (d) promtool


@needs_promtool
def test_promtool_accepts_the_prometheus_config(tmp_path: Path) -> None:
    # The config names the rules by their path in the container; check them from here.
    config = load(PROMETHEUS_CONFIG)
    config["rule_files"] = [str(ALERTS)]
    checked = tmp_path / "prometheus.yml"
    checked.write_text(yaml.safe_dump(config))
    promtool("check", "config", checked)


@needs_promtool
def test_promtool_accepts_the_alert_rules() -> None:
    promtool("check", "rules", ALERTS)


@needs_promtool
def test_the_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    grafana_variables = {
        "$__rate_interval": "1m",
        "$__interval": "1m",
        "$job": ".*",
        "$instance": ".*",
    }
    rules = []
    for index, (where, expr) in enumerate(dashboard_queries()):
        if where.startswith("variable"):
            match = re.fullmatch(r"label_values\((.*), *\w+\)", expr)
            assert match is not None, (where, expr)
            expr = match.group(1)
        for variable, value in grafana_variables.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, (where, expr)
        rules.append({"record": f"dashboard:query_{index}", "expr": expr})
    checked = tmp_path / "dashboard_queries.yml"
    checked.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    promtool("check", "rules", checked)


@dataclass(frozen=True)
class AlertCase:
    """Series of one daemon (job/instance added) and whether ``alert`` fires at ``at``."""

    alert: str
    fires: bool
    at: str
    series: dict[str, str]


CLIENTS = "broadcastd_clients"
DISCONNECTS = 'broadcastd_slow_consumer_actions_total{policy="disconnect"}'
CLOSED = "broadcastd_connections_closed_total"
LATENCY = "broadcastd_delivery_latency_seconds_bucket"
RSS = "process_resident_memory_bytes"
BROKER_UP = "broadcastd_broker_up"
REPAIRS = "broadcastd_broker_gap_repairs_total"
PROBE_FAILURES = "broadcastd_broker_probe_failures_total"


def latency(*cumulative_per_minute: int) -> dict[str, str]:
    """Delivery latency buckets filling at these cumulative rates per minute."""
    bounds = ("0.1", "0.25", "0.5", "1.0", "+Inf")
    return {
        f'{LATENCY}{{le="{le}"}}': f"0+{n}x30"
        for le, n in zip(bounds, cumulative_per_minute, strict=True)
    }


ALERT_CASES = [
    AlertCase("BroadcastdDown", True, "5m", {"up": "1 1 0x10"}),
    AlertCase("BroadcastdDown", False, "5m", {"up": "1x4 0 1x5"}),
    AlertCase(
        "BroadcastdNotReady",
        True,
        "7m",
        {"broadcastd_ready": "0x10", "broadcastd_draining": "0x10"},
    ),
    AlertCase(
        "BroadcastdNotReady",
        False,
        "7m",
        {"broadcastd_ready": "0x10", "broadcastd_draining": "1x10"},
    ),
    AlertCase("BroadcastdDrainStuck", True, "7m", {"broadcastd_draining": "1x10"}),
    AlertCase("BroadcastdDrainStuck", False, "7m", {"broadcastd_draining": "0 1 1 0x7"}),
    AlertCase(
        "BroadcastdClientsDroppedToZero",
        True,
        "17m",
        {CLIENTS: "50x10 0x10", "broadcastd_draining": "0x20"},
    ),
    AlertCase(  # never had more than a handful
        "BroadcastdClientsDroppedToZero",
        False,
        "17m",
        {CLIENTS: "5x10 0x10", "broadcastd_draining": "0x20"},
    ),
    AlertCase(  # a drain empties the daemon on purpose
        "BroadcastdClientsDroppedToZero",
        False,
        "17m",
        {CLIENTS: "50x10 0x10", "broadcastd_draining": "0x9 1x11"},
    ),
    AlertCase(
        "BroadcastdRejectingConnections",
        True,
        "12m",
        {'broadcastd_connections_rejected_total{reason="cap"}': "0+10x20"},
    ),
    AlertCase(
        "BroadcastdRejectingConnections",
        False,
        "12m",
        {
            'broadcastd_connections_rejected_total{reason="cap"}': "0+0.5x20",
            'broadcastd_connections_rejected_total{reason="origin"}': "0+100x20",
        },
    ),
    AlertCase(
        "BroadcastdSlowConsumerDisconnects",
        True,
        "20m",
        {DISCONNECTS: "0+30x30", CLIENTS: "1000x30"},
    ),
    AlertCase(  # the same number, but a tiny share of a big audience
        "BroadcastdSlowConsumerDisconnects",
        False,
        "20m",
        {DISCONNECTS: "0+30x30", CLIENTS: "100000x30"},
    ),
    AlertCase(  # a big share of a tiny audience, but one a minute
        "BroadcastdSlowConsumerDisconnects", False, "20m", {DISCONNECTS: "0+1x30", CLIENTS: "10x30"}
    ),
    AlertCase(
        "BroadcastdSlowConsumerDisconnects",
        False,
        "20m",
        {
            'broadcastd_slow_consumer_actions_total{policy="drop_oldest"}': "0+100x30",
            CLIENTS: "1000x30",
        },
    ),
    AlertCase(
        "BroadcastdMessagesDropped",
        True,
        "16m",
        {
            'broadcastd_messages_dropped_total{reason="drop_oldest"}': "0+60x30",
            "broadcastd_deliveries_total": "0+1000x30",
        },
    ),
    AlertCase(
        "BroadcastdMessagesDropped",
        False,
        "16m",
        {
            'broadcastd_messages_dropped_total{reason="slow_consumer"}': "0+6x30",
            "broadcastd_deliveries_total": "0+1000x30",
        },
    ),
    AlertCase(
        "BroadcastdQueuesNearBound", True, "12m", {"broadcastd_outbox_fill_ratio_max": "0.9x20"}
    ),
    AlertCase(  # it drained a little in between
        "BroadcastdQueuesNearBound",
        False,
        "12m",
        {"broadcastd_outbox_fill_ratio_max": "0.9x5 0.1 0.9x10"},
    ),
    AlertCase("BroadcastdDeliveryLatencyHigh", True, "16m", latency(90, 90, 90, 100, 100)),
    AlertCase("BroadcastdDeliveryLatencyHigh", False, "16m", latency(100, 100, 100, 100, 100)),
    AlertCase(
        "BroadcastdAbnormalClosesRising",
        True,
        "20m",
        {
            f'{CLOSED}{{code="1006", initiator="abnormal"}}': "0+30x30",
            f'{CLOSED}{{code="1000", initiator="client"}}': "0+30x30",
        },
    ),
    AlertCase(
        "BroadcastdAbnormalClosesRising",
        False,
        "20m",
        {
            f'{CLOSED}{{code="1006", initiator="abnormal"}}': "0+3x30",
            f'{CLOSED}{{code="1000", initiator="client"}}': "0+300x30",
        },
    ),
    AlertCase(  # all abnormal, but one a minute
        "BroadcastdAbnormalClosesRising",
        False,
        "20m",
        {f'{CLOSED}{{code="1006", initiator="abnormal"}}': "0+1x30"},
    ),
    AlertCase(  # +120 MB/h with a steady audience
        "BroadcastdMemoryGrowingFasterThanClients",
        True,
        "90m",
        {RSS: "100000000+2000000x120", CLIENTS: "1000x120"},
    ),
    AlertCase(  # +120 MB/h, in step with the audience
        "BroadcastdMemoryGrowingFasterThanClients",
        False,
        "90m",
        {RSS: "100000000+2000000x120", CLIENTS: "1000+20x120"},
    ),
    AlertCase(  # +12%/h, but only 6 MB/h
        "BroadcastdMemoryGrowingFasterThanClients",
        False,
        "90m",
        {RSS: "50000000+100000x120", CLIENTS: "1000x120"},
    ),
    AlertCase(
        "BroadcastdFileDescriptorsNearLimit",
        True,
        "12m",
        {"process_open_fds": "900x20", "process_max_fds": "1000x20"},
    ),
    AlertCase(
        "BroadcastdFileDescriptorsNearLimit",
        False,
        "12m",
        {"process_open_fds": "100x20", "process_max_fds": "1000x20"},
    ),
    AlertCase("BroadcastdCpuSaturated", True, "20m", {"process_cpu_seconds_total": "0+57x30"}),
    AlertCase("BroadcastdCpuSaturated", False, "20m", {"process_cpu_seconds_total": "0+30x30"}),
    AlertCase("BroadcastdBrokerDown", True, "3m", {BROKER_UP: "1 0x10"}),
    AlertCase("BroadcastdBrokerDown", False, "3m", {BROKER_UP: "1 0 1x10"}),  # a reconnect
    AlertCase(
        "BroadcastdGapRepairs",
        True,
        "6m",
        {f'{REPAIRS}{{outcome="resync"}}': "0x3 2x20", f'{REPAIRS}{{outcome="repaired"}}': "0x23"},
    ),
    AlertCase(  # every gap filled from history
        "BroadcastdGapRepairs",
        False,
        "10m",
        {f'{REPAIRS}{{outcome="resync"}}': "0x20", f'{REPAIRS}{{outcome="repaired"}}': "0+5x20"},
    ),
    AlertCase(  # a resync, but 20 minutes ago
        "BroadcastdGapRepairs", False, "30m", {f'{REPAIRS}{{outcome="resync"}}': "0 3x40"}
    ),
    AlertCase("BroadcastdBrokerProbeFailing", True, "15m", {PROBE_FAILURES: "0+1x30"}),
    AlertCase(  # one failed probe
        "BroadcastdBrokerProbeFailing", False, "8m", {PROBE_FAILURES: "0x3 1x30"}
    ),
]

INSTANCE = {"job": "broadcastd", "instance": "broadcastd:8767"}


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    cases = {(case.alert, case.fires) for case in ALERT_CASES}
    for rule in alert_rules():
        assert (rule["alert"], True) in cases, rule["alert"]
        assert (rule["alert"], False) in cases, rule["alert"]


@needs_promtool
@pytest.mark.parametrize(
    "case",
    ALERT_CASES,
    ids=[f"{c.alert}-{'fires' if c.fires else 'quiet'}-{i}" for i, c in enumerate(ALERT_CASES)],
)
def test_alert_fires_exactly_when_it_should(case: AlertCase, tmp_path: Path) -> None:
    # promtool compares annotations too: test the expressions, for and labels alone.
    rules = load(ALERTS)
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations")
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(rules))
    (rule,) = [rule for rule in alert_rules() if rule["alert"] == case.alert]
    own = ", ".join(f'{k}="{v}"' for k, v in INSTANCE.items())
    series = [
        {
            "series": f"{name[:-1]}, {own}}}" if name.endswith("}") else f"{name}{{{own}}}",
            "values": values,
        }
        for name, values in case.series.items()
    ]
    expected = [{"exp_labels": {**INSTANCE, **rule["labels"]}}] if case.fires else []
    test = {
        "rule_files": ["alerts.yml"],
        "evaluation_interval": "1m",
        "tests": [
            {
                "name": case.alert,
                "interval": "1m",
                "input_series": series,
                "alert_rule_test": [
                    {"eval_time": case.at, "alertname": case.alert, "exp_alerts": expected}
                ],
            }
        ],
    }
    (tmp_path / "test.yml").write_text(yaml.safe_dump(test))
    promtool("test", "rules", tmp_path / "test.yml")
