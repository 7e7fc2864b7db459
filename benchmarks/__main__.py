"""``python -m benchmarks [--quick] [--scenario S1,S3] [--server broadcastd,nchan] [--tls]``.

Pins itself (load client and publisher) to core 1 and each server to core 0,
runs the scenarios, prints the table and the command line, and writes the
results to benchmarks/results/<timestamp>.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
from collections.abc import Mapping
from pathlib import Path

import uvloop

from benchmarks.report import render_table, write_json
from benchmarks.runner import run
from benchmarks.scenarios import QUICK, SCENARIOS, Params
from benchmarks.servers import SERVERS

RESULTS = Path(__file__).parent / "results"
CLIENT_CORE = 1


def _names(value: str, known: Mapping[str, object], what: str) -> list[str]:
    lookup = {k.lower(): k for k in known}
    names = []
    for item in filter(None, (v.strip() for v in value.split(","))):
        if item.lower() not in lookup:
            raise argparse.ArgumentTypeError(f"unknown {what} {item!r}; known: {', '.join(known)}")
        names.append(lookup[item.lower()])
    return names


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (seconds)")
    parser.add_argument(
        "--scenario",
        type=lambda v: _names(v, SCENARIOS, "scenario"),
        default=list(SCENARIOS),
        help=f"comma-separated, from {','.join(SCENARIOS)} (default: all)",
    )
    parser.add_argument(
        "--server",
        type=lambda v: _names(v, SERVERS, "server"),
        default=list(SERVERS),
        help=f"comma-separated, from {','.join(SERVERS)} (default: all; missing ones are skipped)",
    )
    parser.add_argument(
        "--duration", type=float, help="seconds of publishing in S1, S2b and S3 (default 10)"
    )
    parser.add_argument(
        "--depth", type=int, help="publishes pipelined per burst in S1 and S3 (default 64)"
    )
    parser.add_argument(
        "--raw", action="store_true", help="subscribe broadcastd and naive in raw mode too"
    )
    parser.add_argument(
        "--wait-idle",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="before each scenario, wait up to SECONDS for other processes to go idle",
    )
    parser.add_argument(
        "--tls",
        action="store_true",
        help="also run each broadcastd server over TLS (self-signed; wss:// and https://)",
    )
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to cores")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    params: Params = QUICK if args.quick else Params()
    if args.duration is not None:
        d = args.duration
        params = dataclasses.replace(params, s1_duration=d, s2_duration=d, s3_duration=d)
    if args.depth is not None:
        params = dataclasses.replace(params, s1_depth=args.depth, s3_depth=args.depth)
    if args.raw:
        params = dataclasses.replace(params, raw=True)
    pin = not args.no_pin and CLIENT_CORE in os.sched_getaffinity(0)
    if pin:
        os.sched_setaffinity(0, {CLIENT_CORE})
    command = shlex.join(sys.orig_argv)  # as typed: interpreter, -m benchmarks, flags
    print(f"$ {command}", flush=True)
    results = uvloop.run(
        run(
            args.server,
            args.scenario,
            params,
            pin=pin,
            wait_idle=args.wait_idle,
            progress=lambda m: print(m, flush=True),
            tls=args.tls,
        )
    )
    results["command"] = command
    results["cwd"] = os.getcwd()
    path = write_json(results, args.results_dir)
    print()
    print(render_table(results))
    print()
    print(f"results: {path}")
    print(f"command: {command}")
    failed = any(
        "error" in res
        for outcome in results["servers"].values()
        for res in outcome.get("scenarios", {}).values()
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
