"""The publish and subscribe commands against a real daemon, and the backoff policy."""

from __future__ import annotations

import http.server
import json
import os
import random
import signal
import subprocess
import sys
import threading
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


def subscriber(process: Any, *channels: str) -> subprocess.Popen[bytes]:
    """``broadcastd subscribe`` to ``channels``, past its ``subscribed`` lines."""
    url = f"ws://127.0.0.1:{process.ws_port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "broadcastd", "subscribe", "--url", url, *channels],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )
    assert proc.stdout is not None
    replies = [json.loads(proc.stdout.readline()) for _ in channels]
    assert [(r["type"], r["channel"]) for r in replies] == [("subscribed", c) for c in channels]
    return proc


def received(proc: subprocess.Popen[bytes]) -> Any:
    assert proc.stdout is not None
    return json.loads(proc.stdout.readline())


def test_publish_sends_colon_and_at_in_channel_names_as_they_are(process: Any) -> None:
    control = f"http://127.0.0.1:{process.control_port}"
    sub = subscriber(process, "user:42", "ops@eu")
    try:
        for channel in ("user:42", "ops@eu"):
            result = cli("publish", "--url", control, "--token", TOKEN, channel, "hi")
            assert result.returncode == 0, result.stderr
            assert json.loads(result.stdout)["channel"] == channel
            assert received(sub) == {"channel": channel, "offset": 1, "data": "hi"}
    finally:
        sub.kill()
        sub.wait()


def test_publish_puts_the_channel_name_in_the_path_literally() -> None:
    """``:`` and ``@`` are legal in a path: sent as typed, a daemon that does not
    percent-decode (names are literal) still finds the channel."""
    paths: list[str] = []

    class Recorder(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            paths.append(self.path)
            self.rfile.read(int(self.headers["Content-Length"]))
            body = b'{"channel": "x", "offset": 1, "subscribers": 0}'
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    with http.server.HTTPServer(("127.0.0.1", 0), Recorder) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        url = f"http://127.0.0.1:{server.server_address[1]}"
        try:
            for name in ("user:42", "ops@eu", "a b"):
                assert cli("publish", "--url", url, name, "hi").returncode == 0
        finally:
            server.shutdown()
    assert paths == ["/publish/user:42", "/publish/ops@eu", "/publish/a%20b"]


def test_publish_reports_a_name_that_is_not_a_channel(process: Any) -> None:
    control = f"http://127.0.0.1:{process.control_port}"
    for name in ("a b", "a/b", "a%3Ab"):
        result = cli("publish", "--url", control, "--token", TOKEN, name, "hi")
        assert result.returncode == 1
        assert b"bad_channel" in result.stderr, result.stderr


def test_publish_from_stdin_drops_one_trailing_newline(process: Any) -> None:
    control = f"http://127.0.0.1:{process.control_port}"
    sub = subscriber(process, "chat")
    try:
        for stdin, data in [(b"hello\n", "hello"), (b"two\n\n", "two\n"), (b"crlf\r\n", "crlf")]:
            result = cli("publish", "--url", control, "--token", TOKEN, "chat", stdin=stdin)
            assert result.returncode == 0, result.stderr
            assert received(sub)["data"] == data
        as_json = cli("publish", "--url", control, "--token", TOKEN, "chat", stdin=b'{"n": 1}\n')
        assert as_json.returncode == 0, as_json.stderr
        assert received(sub)["data"] == {"n": 1}
    finally:
        sub.kill()
        sub.wait()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_subscribe_closes_normally(process: Any, signum: int) -> None:
    sub = subscriber(process, "news")
    sub.send_signal(signum)
    _, errors = sub.communicate(timeout=60)
    assert sub.returncode == 128 + signum
    assert errors == b""  # no traceback, no "connection closed" notice
    close = next(e for e in process.events() if e["event"] == "connection.close")
    assert (close["code"], close["initiator"]) == (1000, "client")


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
