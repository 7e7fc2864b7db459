"""CPU time and memory of a server process tree, read from /proc.

CPU is read as utime + stime (``/proc/PID/stat``) rather than inferred from
wall time: on a shared 2-core machine the CPU-seconds a server spent per
million deliveries is far less noisy than throughput alone. Nginx runs a
master and a worker, so every figure covers the process and its descendants.
"""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path
from typing import Any

CLK_TCK = os.sysconf("SC_CLK_TCK")


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (scans /proc: a handful of processes)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        parents.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(parents.get(current, ()))
    return tree


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process, in seconds (0 if it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_bytes(pid: int) -> int:
    """Resident set size of one process (VmRSS), in bytes (0 if it is gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def tree_cpu_seconds(pid: int) -> float:
    return sum(cpu_seconds(p) for p in descendants(pid))


def tree_rss_bytes(pid: int) -> int:
    return sum(rss_bytes(p) for p in descendants(pid))


def written_bytes(pid: int) -> int:
    """Bytes one process handed to write and send calls (``wchar`` of
    /proc/PID/io: sockets, pipes and files alike; 0 if it is gone)."""
    try:
        io = Path(f"/proc/{pid}/io").read_text()
    except OSError:
        return 0
    for line in io.splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    return 0


def tree_written_bytes(pid: int) -> int:
    return sum(written_bytes(p) for p in descendants(pid))


def self_cpu_seconds() -> float:
    """CPU time of this process (the load client and publisher)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def raise_nofile(needed: int) -> int:
    """Raise the soft fd limit towards the hard one (children inherit it, which is
    how the servers get it too); return the resulting soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, needed)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        soft = want
    return soft


def core_times() -> dict[int, tuple[int, int]]:
    """Per core (busy, total) jiffies from /proc/stat. Loopback TCP work done in
    softirq context is not always charged to the server or the client, so a
    core's own busy share is the honest test of saturation."""
    cores: dict[int, tuple[int, int]] = {}
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("cpu") and line[3:4].isdigit():
            name, *values = line.split()
            ticks = [int(v) for v in values[:8]]
            idle = ticks[3] + ticks[4]  # idle + iowait
            cores[int(name[3:])] = (sum(ticks) - idle, sum(ticks))
    return cores


def all_cpu_seconds() -> dict[int, float]:
    """utime + stime of every process (a few hundred /proc reads)."""
    times: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            times[int(entry.name)] = cpu_seconds(int(entry.name))
    return times


def load_elsewhere(
    before: tuple[dict[int, tuple[int, int]], dict[int, float]],
    ours: set[int],
    wall: float,
) -> dict[str, Any]:
    """What else used the CPU since ``before`` (a :func:`snapshot`): the busy share of
    each core, the CPU (in cores) of processes other than ``ours`` (e.g. a test
    suite running on the same machine), and busy time no process was charged
    for (kernel work such as softirqs)."""
    cores0, procs0 = before
    cores1, procs1 = snapshot()
    busy: dict[str, float] = {}
    busy_s = 0.0
    for core, (b1, t1) in cores1.items():
        b0, t0 = cores0.get(core, (0, 0))
        busy[f"core{core}"] = round((b1 - b0) / (t1 - t0), 3) if t1 > t0 else 0.0
        busy_s += (b1 - b0) / CLK_TCK
    charged = sum(max(0.0, t - procs0.get(pid, 0.0)) for pid, t in procs1.items())
    others = sum(max(0.0, t - procs0.get(pid, 0.0)) for pid, t in procs1.items() if pid not in ours)
    return {
        "core_busy": busy,
        "other_processes_cpu_util": others / wall,
        "unattributed_cpu_util": max(0.0, busy_s - charged) / wall,
    }


def snapshot() -> tuple[dict[int, tuple[int, int]], dict[int, float]]:
    return core_times(), all_cpu_seconds()


def busy_elsewhere(window: float) -> float:
    """CPU (in cores) used by everything but this process over the next ``window``
    seconds, from /proc/stat, so that short-lived processes (a test suite's
    subprocesses) count too. Blocking: called between scenarios, never during one."""
    cores0, mine0 = core_times(), self_cpu_seconds()
    time.sleep(window)
    cores1, mine1 = core_times(), self_cpu_seconds()
    busy = sum(b1 - cores0.get(core, (0, 0))[0] for core, (b1, _) in cores1.items()) / CLK_TCK
    return max(0.0, busy - (mine1 - mine0)) / window
