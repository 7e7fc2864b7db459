"""The printed table and the JSON results file.

One row per scenario metric, one column per server, then broadcastd's value
divided by Nchan's and by the naive baseline's (for "lower is better" rows a
ratio below 1 favours broadcastd). Under the table, everything that makes a
figure suspect: skipped servers, failed scenarios, missing deliveries,
connections the server closed, and a client that was itself saturated.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

SUBJECT = "broadcastd"
REFERENCES = ("nchan", "naive")
CLIENT_BOUND = 0.9
OTHER_LOAD = 0.15
UNATTRIBUTED_LOAD = 0.3
"""Kernel work charged to no process is normal (softirqs); more means processes
that came and went during the phase."""
MIN_PHASE_S = 1.0


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def _rows(results: dict[str, Any]) -> list[tuple[str, str, str, dict[str, float | None]]]:
    """(label, unit, better, {server: value}) in scenario order; within a scenario, a
    metric only some servers have (redis-server's CPU) goes right after the one it
    follows in their results."""
    order: list[tuple[str, str]] = []
    info: dict[tuple[str, str], tuple[str, str, str]] = {}
    values: dict[tuple[str, str], dict[str, float | None]] = {}
    for scenario in results["scenarios"]:
        section: list[tuple[str, str]] = []
        for server, outcome in results["servers"].items():
            previous: tuple[str, str] | None = None
            for key, m in outcome.get("scenarios", {}).get(scenario, {}).get("metrics", {}).items():
                ident = (scenario, key)
                if ident not in info:
                    at = 0 if previous is None else section.index(previous) + 1
                    section.insert(at, ident)
                    info[ident] = (m["label"], m["unit"], m["better"])
                values.setdefault(ident, {})[server] = m["value"]
                previous = ident
        order += section
    return [(*info[i], values[i]) for i in order]


def render_table(results: dict[str, Any]) -> str:
    servers = list(results["servers"])
    ratio_cols = [r for r in REFERENCES if r in servers and SUBJECT in servers]
    header = ["metric", "unit", "better", *servers, *(f"{SUBJECT}/{r}" for r in ratio_cols)]
    lines = []
    for label, unit, better, vals in _rows(results):
        cells = [label, unit, better, *(_fmt(vals.get(s)) for s in servers)]
        for ref in ratio_cols:
            a, b = vals.get(SUBJECT), vals.get(ref)
            cells.append(f"{a / b:.2f}x" if a is not None and b else "-")
        lines.append(cells)
    widths = [max(len(str(row[i])) for row in [header, *lines]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        first = [cells[0].ljust(widths[0]), cells[1].ljust(widths[1]), cells[2].ljust(widths[2])]
        rest = [c.rjust(w) for c, w in zip(cells[3:], widths[3:], strict=True)]
        return "  ".join(first + rest)

    out = [line(header), "  ".join("-" * w for w in widths)]
    out += [line(cells) for cells in lines]
    notes = _notes(results)
    if notes:
        out += ["", "notes:", *(f"  - {n}" for n in notes)]
    return "\n".join(out)


def format_cores(pinning: dict[str, list[int]]) -> str:
    """``{"broadcastd": [0], "redis-server": [0]}`` as "broadcastd 0, redis-server 0"."""
    return ", ".join(f"{role} {','.join(map(str, cores))}" for role, cores in pinning.items())


def _notes(results: dict[str, Any]) -> list[str]:
    notes = []
    pinned = [
        f"{server}: {format_cores(outcome['pinning'])}"
        for server, outcome in results["servers"].items()
        if outcome.get("pinning")
    ]
    if pinned:
        client = format_cores({"load client": results["host"]["affinity"]})
        notes.append(f"cores: {'; '.join(pinned)}; {client}")
    for server, outcome in results["servers"].items():
        if "skipped" in outcome:
            notes.append(f"{server}: skipped - {outcome['skipped']}")
            continue
        for scenario, res in outcome.get("scenarios", {}).items():
            where = f"{server} {scenario}"
            if "skipped" in res:
                notes.append(f"{where}: skipped - {res['skipped']}")
                continue
            if "error" in res:
                notes.append(f"{where}: FAILED - {res['error']}")
                continue
            notes += [f"{where}: {n}" for n in _suspect(res.get("details", {}))]
            if res.get("server_log"):
                notes.append(
                    f"{where}: server logged {len(res['server_log'])} line(s), e.g. "
                    f"{res['server_log'][0][:160]}"
                )
    return notes


def _suspect(details: dict[str, Any]) -> list[str]:
    found = []
    phases = [details, *(v for v in details.values() if isinstance(v, dict))]
    for phase in phases:
        if phase.get("expected") and not phase.get("complete"):
            found.append(f"delivered {phase['delivered']:,} of {phase['expected']:,} expected")
        long_enough = phase.get("seconds", 0) >= MIN_PHASE_S  # /proc has 10 ms ticks
        others = phase.get("other_processes_cpu_util", 0)
        unattributed = phase.get("unattributed_cpu_util", 0)
        if long_enough and (others > OTHER_LOAD or unattributed > UNATTRIBUTED_LOAD):
            found.append(
                f"the rest of the machine used {others + unattributed:.2f} cores meanwhile "
                f"({others:.2f} in processes still running at the end): figures may be off"
            )
        if long_enough and phase.get("client_cpu_util", 0) > CLIENT_BOUND:
            found.append(
                f"load client CPU {phase['client_cpu_util']:.0%}: the client may be the bottleneck"
            )
    found += details.get("problems", [])
    if details.get("connect_errors"):
        found.append(f"connect errors {details['connect_errors']}")
    if details.get("closed_by_server"):
        found.append(f"server closed connections {details['closed_by_server']}")
    if details.get("lost_connections"):
        found.append(f"{details['lost_connections']} connection(s) lost mid-test")
    if details.get("connected", 0) < details.get("attempted", 0):
        found.append(f"only {details['connected']} of {details['attempted']} subscribed")
    found += _recovery_suspect(details)
    for step in details.get("steps", []):
        if step["connected"] < step["target"]:
            found.append(f"only {step['connected']} of {step['target']} connections opened")
    return found


def _recovery_suspect(details: dict[str, Any]) -> list[str]:
    """What is off in scenario R: clients not live again, refused resumes, offsets
    out of order (any is a correctness defect, not a slow figure)."""
    found = []
    if details.get("not_live"):
        found.append(f"{details['not_live']} of {details['clients']} clients never live again")
    if details.get("recovered_false"):
        found.append(
            f"{details['recovered_false']} resume(s) refused {details.get('refusal_reasons')}"
        )
    if details.get("ordering_violations"):
        found.append(
            f"ORDERING: {details['ordering_violations']} violation(s) after resume "
            f"{details.get('violations_by_kind')}"
        )
    prior = details.get("before_drop", {}).get("ordering_violations", {})
    if any(prior.values()):
        found.append(f"ORDERING: violations before the drop {prior}")
    if details.get("replayed", 0) != details.get("replay_expected", 0):
        found.append(
            f"replayed {details['replayed']:,} messages, the resumes promised "
            f"{details['replay_expected']:,}"
        )
    if details.get("unexpected_replies"):
        found.append(f"unexpected replies {details['unexpected_replies']}")
    return found


def write_json(results: dict[str, Any], directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    path = directory / f"{stamp}.json"
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    return path
