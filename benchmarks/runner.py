"""Runs the chosen scenarios against the chosen servers, one fresh server per scenario.

A fresh server per scenario keeps the figures independent (S4's memory
baseline is not inflated by S3's channels, S1 does not inherit S5's sockets).
"""

from __future__ import annotations

import asyncio
import os
import platform
import sys
import tempfile
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any

from benchmarks.procstat import busy_elsewhere, raise_nofile
from benchmarks.report import format_cores
from benchmarks.scenarios import PAIRED, SCENARIOS, Params, compare, server_env, unsupported
from benchmarks.servers import SERVERS, Server, ServerError
from benchmarks.tls import self_signed, trust

TLS_SUFFIX = "+tls"
TLS_COMPARED = ("S1", "S5")
"""Scenarios whose rows get a TLS / plain ratio: what TLS costs per delivery (S1)
and per connection (S5)."""


def tls_env(cert_file: Path, key_file: Path) -> dict[str, str]:
    """The daemon's settings for serving both ports over TLS."""
    return {
        "BROADCASTD_WS__TLS_CERT_FILE": str(cert_file),
        "BROADCASTD_WS__TLS_KEY_FILE": str(key_file),
        "BROADCASTD_CONTROL__TLS_CERT_FILE": str(cert_file),
        "BROADCASTD_CONTROL__TLS_KEY_FILE": str(key_file),
    }


def compare_tls(plain: dict[str, Any], over_tls: dict[str, Any]) -> None:
    """A ``tls_ratio:KEY`` row (TLS / plain) after each of S1's and S5's rows, in the
    TLS column; the plain figures are in the plain column of the same run."""
    for scenario in TLS_COMPARED:
        before, after = plain.get(scenario, {}), over_tls.get(scenario, {})
        if "metrics" not in before or "metrics" not in after:
            continue
        rows: dict[str, Any] = {}
        for key, m in after["metrics"].items():
            rows[key] = m
            if key.startswith("redis-server"):
                continue  # Redis does not see TLS: its per-publish CPU is S1's
            a, b = m["value"], before["metrics"].get(key, {}).get("value")
            rows[f"tls_ratio:{key}"] = {
                "label": f"{m['label']}: TLS / plain",
                "unit": "x",
                "better": m["better"],
                "value": a / b if a is not None and b else None,
            }
        after["metrics"] = rows


SERVER_LOG_LINES = 20
IDLE_CORES = 0.1
IDLE_WINDOW = 3.0


def host_info() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "affinity": sorted(os.sched_getaffinity(0)),
    }


async def run(
    server_names: Sequence[str],
    scenario_names: Sequence[str],
    params: Params,
    *,
    pin: bool,
    wait_idle: float = 0.0,
    progress: Callable[[str], None] = print,
    tls: bool = False,
) -> dict[str, Any]:
    """Every scenario against every server; never raises for one failed scenario.

    With ``tls``, each server that serves TLS runs every scenario a second time
    with a self-signed certificate (its column is ``NAME+tls``: wss:// and
    https://, the load client trusting that certificate), and S1's and S5's rows
    get TLS / plain ratios."""
    needed = (
        max(*params.s4_counts, params.s3_subscribers, params.s5_clients, params.r_clients) + 200
    )
    results: dict[str, Any] = {
        "started": datetime.now().isoformat(timespec="seconds"),
        "host": host_info(),
        "nofile_soft": raise_nofile(needed),
        "params": asdict(params),
        "scenarios": list(scenario_names),
        "tls": tls,
        "servers": {},
    }
    with tempfile.TemporaryDirectory(prefix="broadcastd-bench-") as tmp:
        certificate = self_signed(Path(tmp)) if tls else None
        for name in server_names:
            cls = SERVERS[name]
            reason = cls.unavailable()
            if reason is not None:
                progress(f"[{name}] skipped: {reason}")
                results["servers"][name] = {"skipped": reason}
                continue
            plain = await _scenarios(
                name, cls, scenario_names, params, tmp, pin, wait_idle, {}, progress
            )
            results["servers"][name] = plain
            if certificate is None:
                continue
            over_tls = f"{name}{TLS_SUFFIX}"
            if not cls.tls:
                progress(f"[{over_tls}] skipped: {name} does not serve TLS")
                continue
            cert_file, key_file = certificate
            trust(cert_file)
            try:
                outcome = await _scenarios(
                    over_tls,
                    cls,
                    scenario_names,
                    params,
                    tmp,
                    pin,
                    wait_idle,
                    tls_env(cert_file, key_file),
                    progress,
                )
            finally:
                trust(None)
            outcome["tls"] = {"certificate": "self-signed ECDSA P-256", "min_version": "TLSv1.2"}
            compare_tls(plain["scenarios"], outcome["scenarios"])
            results["servers"][over_tls] = outcome
            for scenario in TLS_COMPARED:
                if "metrics" in outcome["scenarios"].get(scenario, {}):
                    summary = _summary(outcome["scenarios"][scenario], "tls_ratio")
                    progress(f"[{over_tls}] {scenario} over TLS / plain: {summary}")
    return results


async def _scenarios(
    name: str,
    cls: type[Server],
    scenario_names: Sequence[str],
    params: Params,
    tmp: str,
    pin: bool,
    wait_idle: float,
    env: dict[str, str],
    progress: Callable[[str], None],
) -> dict[str, Any]:
    """Every scenario against a fresh server of ``cls`` each (with ``env`` on top of
    what the scenario sets), the results under ``name``."""
    outcome: dict[str, Any] = {"scenarios": {}}
    runs: dict[str, list[dict[str, Any]]] = {}
    for scenario in scenario_names:
        why = unsupported(scenario, cls)
        if why is not None:
            progress(f"[{name}] {scenario} skipped: {why}")
            outcome["scenarios"][scenario] = {"skipped": why}
            continue
        if wait_idle > 0:
            await _wait_idle(wait_idle, progress)
        progress(f"[{name}] {scenario} ...")
        server = cls(Path(tmp), 0 if pin else None)
        server.extra_env.update(server_env(scenario, params))
        server.extra_env.update(env)
        res = await _one(server, scenario, params)
        outcome["scenarios"][scenario] = res  # the last run of a repeated one
        runs.setdefault(scenario, []).append(res)
        if "pinning" in res and "pinning" not in outcome:
            outcome["pinning"] = res["pinning"]
            client = format_cores({"load client": sorted(os.sched_getaffinity(0))})
            progress(f"[{name}] cores: {format_cores(res['pinning'])}; {client}")
        progress(f"[{name}] {scenario} {_summary(res)}")
    compare(outcome["scenarios"], runs)  # S5t and S5p against S5
    for other in ("S5t", "S5p"):
        if "time_ratio" in outcome["scenarios"].get(other, {}).get("metrics", {}):
            progress(f"[{name}] {other} vs S5 {_summary(outcome['scenarios'][other], 'ratio')}")
    for other, base, _ in PAIRED:
        if f"vs_{base}" in outcome["scenarios"].get(other, {}).get("details", {}):
            progress(f"[{name}] {other} vs {base} {_summary(outcome['scenarios'][other], 'vs:')}")
    return outcome


async def _wait_idle(limit: float, progress: Callable[[str], None]) -> None:
    """Wait (at most ``limit`` seconds) for IDLE_WINDOW seconds in which the rest of
    the machine uses under IDLE_CORES, so that a test suite running on a shared
    machine does not skew the next scenario. Nothing signals "the machine is
    idle": this is a bounded poll, one window after another, run in a thread."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    busy = 0.0
    while loop.time() < deadline:
        busy = await asyncio.to_thread(busy_elsewhere, IDLE_WINDOW)
        if busy < IDLE_CORES:
            return
        progress(f"  waiting for an idle machine: other processes use {busy:.2f} cores")
    progress(f"  still busy after {limit:.0f}s ({busy:.2f} cores): running anyway")


async def _one(server: Any, scenario: str, params: Params) -> dict[str, Any]:
    res: dict[str, Any]
    pinning: dict[str, list[int]] = {}
    try:
        await server.start()
        pinning = server.pinning()  # every process of the server, helpers included
        async with asyncio.timeout(params.scenario_timeout):
            res = await SCENARIOS[scenario](server, params)
    except Exception as exc:  # one failed scenario must not lose the others' figures
        res = {"error": f"{type(exc).__name__}: {exc}".strip()}
        if not isinstance(exc, ServerError | TimeoutError | OSError):
            res["traceback"] = traceback.format_exc()
    finally:
        died = server.proc is not None and not server.alive()
        await server.stop()
    if died:
        res.setdefault("error", f"the server died during the scenario: {server.tail(5)}")
    if pinning:
        res["pinning"] = pinning
    log = [line for line in server.tail(SERVER_LOG_LINES).splitlines() if line.strip()]
    if log:
        res["server_log"] = log
    return res


def _summary(res: dict[str, Any], only: str = "") -> str:
    """The scenario's metrics in a line (those whose key contains ``only``)."""
    if "error" in res:
        return f"FAILED: {res['error']}"
    parts = []
    for key, m in res.get("metrics", {}).items():
        if only not in key:
            continue
        value = m["value"]
        shown = "n/a" if value is None else f"{value:.4g}{m['unit']}"
        parts.append(f"{m['label']}={shown}")
    return "; ".join(parts)
