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
from benchmarks.scenarios import SCENARIOS, Params, compare, server_env, unsupported
from benchmarks.servers import SERVERS, ServerError

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
) -> dict[str, Any]:
    """Every scenario against every server; never raises for one failed scenario."""
    needed = (
        max(*params.s4_counts, params.s3_subscribers, params.s5_clients, params.r_clients) + 200
    )
    results: dict[str, Any] = {
        "started": datetime.now().isoformat(timespec="seconds"),
        "host": host_info(),
        "nofile_soft": raise_nofile(needed),
        "params": asdict(params),
        "scenarios": list(scenario_names),
        "servers": {},
    }
    with tempfile.TemporaryDirectory(prefix="broadcastd-bench-") as tmp:
        for name in server_names:
            cls = SERVERS[name]
            reason = cls.unavailable()
            if reason is not None:
                progress(f"[{name}] skipped: {reason}")
                results["servers"][name] = {"skipped": reason}
                continue
            outcome: dict[str, Any] = {"scenarios": {}}
            runs: dict[str, list[dict[str, Any]]] = {}
            results["servers"][name] = outcome
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
                res = await _one(server, scenario, params)
                outcome["scenarios"][scenario] = res  # the last run of a repeated one
                runs.setdefault(scenario, []).append(res)
                if "pinning" in res and "pinning" not in outcome:
                    outcome["pinning"] = res["pinning"]
                    client = format_cores({"load client": results["host"]["affinity"]})
                    progress(f"[{name}] cores: {format_cores(res['pinning'])}; {client}")
                progress(f"[{name}] {scenario} {_summary(res)}")
            compare(outcome["scenarios"], runs)  # S5t against S5
            if "time_ratio" in outcome["scenarios"].get("S5t", {}).get("metrics", {}):
                progress(f"[{name}] S5t vs S5 {_summary(outcome['scenarios']['S5t'], 'ratio')}")
    return results


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
