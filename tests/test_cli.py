"""The publish and subscribe commands against a real daemon, and the backoff policy."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from broadcastd.cli import Backoff

from .conftest import ROOT, DaemonProcess

TOKEN = "cli-token"


@pytest.fixture
def process(tmp_path: Path) -> Any:
    socket_path = tmp_path / "control.sock"
    proc = DaemonProcess("--control-unix-path", str(socket_path), "--control-token", TOKEN)
    try:
        proc.wait_ready()
        proc.socket_path = socket_path  # type: ignore[attr-defined]
        yield proc
    finally:
        proc.kill()


def cli(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROADCASTD_")}
    return subprocess.run(
        [sys.executable, "-m", "broadcastd", *args],
        input=stdin,
        capture_output=True,
        env=env,
        cwd=ROOT,
        timeout=60,
        check=False,
    )


def test_publish_and_subscribe_commands(process: Any) -> None:
    ws_url = f"ws://127.0.0.1:{process.ws_port}"
    control = f"http://127.0.0.1:{process.control_port}"
    subscriber = subprocess.Popen(
        [sys.executable, "-m", "broadcastd", "subscribe", "--url", ws_url, "--once", "a", "b"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )
    assert subscriber.stdout is not None
    try:
        ready = [json.loads(subscriber.stdout.readline()) for _ in range(2)]
        assert {r["channel"] for r in ready} == {"a", "b"}

        ok = cli("publish", "--url", control, "--token", TOKEN, "a", '{"x": 1}')
        assert ok.returncode == 0, ok.stderr
        assert json.loads(ok.stdout) == {"channel": "a", "offset": 1, "subscribers": 1}
        text = cli(
            "publish",
            "--unix",
            str(process.socket_path),
            "--token",
            TOKEN,
            "b",
            "-",
            stdin=b"hello there",
        )
        assert text.returncode == 0, text.stderr
        denied = cli("publish", "--url", control, "a", "1")
        assert denied.returncode == 1
        assert b"401" in denied.stderr

        first = json.loads(subscriber.stdout.readline())
        second = json.loads(subscriber.stdout.readline())
        assert first == {"channel": "a", "offset": 1, "data": {"x": 1}}
        assert second == {"channel": "b", "offset": 1, "data": "hello there"}
    finally:
        subscriber.kill()
        subscriber.wait()


def test_subscribe_gives_up_on_a_refused_handshake(process: Any) -> None:
    result = cli("subscribe", "--url", f"ws://127.0.0.1:{process.ws_port}", "bad channel")
    assert result.returncode == 1
    assert b"400" in result.stderr


def test_publish_reports_an_unreachable_daemon() -> None:
    result = cli("publish", "--url", "http://127.0.0.1:9", "a", "1")
    assert result.returncode == 1
    assert b"cannot reach" in result.stderr


def test_backoff_grows_with_full_jitter_up_to_the_cap() -> None:
    backoff = Backoff(base=1, cap=8, stable_after=10, rng=random.Random(7))
    ceilings = [1, 2, 4, 8, 8, 8]
    for ceiling in ceilings:
        delay = backoff.next_delay(now=0)
        assert 0 <= delay <= ceiling
    assert backoff.failures == len(ceilings)


def test_backoff_resets_only_after_a_connection_stayed_up() -> None:
    backoff = Backoff(base=1, cap=100, stable_after=10, rng=random.Random(1))
    for _ in range(5):
        backoff.next_delay(now=0)
    backoff.opened(now=100)
    backoff.next_delay(now=105)  # dropped after 5 s: still backing off
    assert backoff.failures == 6
    backoff.opened(now=200)
    backoff.next_delay(now=215)  # stayed up 15 s: start again
    assert backoff.failures == 1
