"""The publish and subscribe commands against a real daemon, and the backoff policy."""

from __future__ import annotations

import asyncio
import http.server
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import jwt
import pytest
import uvloop

from broadcastd.cli import Backoff, Position, Resume, _watch_reader
from broadcastd.core.envelope import Payload
from broadcastd.core.route import parse_route
from broadcastd.core.stream import Position as StreamPosition

from .conftest import ROOT, DaemonProcess, Running

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
        answer = json.loads(ok.stdout)
        assert answer.pop("epoch", None) == ready[0].get("epoch")
        assert answer == {"channel": "a", "offset": 1, "subscribers": 1}
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


def subscriber(
    process: Any, *channels: str, options: tuple[str, ...] = (), env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """``broadcastd subscribe`` to ``channels``, past its ``subscribed`` lines;
    ``env`` adds to a copy of the environment without BROADCASTD_* variables."""
    url = f"ws://127.0.0.1:{process.ws_port}"
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("BROADCASTD_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "broadcastd", "subscribe", "--url", url, *options, *channels],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
        env=full_env | (env or {}),
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


def test_subscribe_ends_quietly_when_its_reader_goes(process: Any) -> None:
    """``broadcastd subscribe news | head -1``: no traceback, SIGPIPE's status."""
    sub = subscriber(process, "news")
    assert sub.stdout is not None
    sub.stdout.close()
    control = f"http://127.0.0.1:{process.control_port}"
    result = cli("publish", "--url", control, "--token", TOKEN, "news", "hi")
    assert result.returncode == 0, result.stderr
    assert sub.wait(timeout=60) == 128 + signal.SIGPIPE
    assert sub.stderr is not None
    assert sub.stderr.read() == b""


def test_subscribe_exits_when_its_reader_goes_with_nothing_more_to_print(process: Any) -> None:
    """``broadcastd subscribe news | head -1`` with no traffic after the first
    message: the command sees the pipe's reader go and exits by itself (141,
    quietly), closing its connection normally; no further message is needed."""
    sub = subscriber(process, "news")
    try:
        control = f"http://127.0.0.1:{process.control_port}"
        result = cli("publish", "--url", control, "--token", TOKEN, "news", "first")
        assert result.returncode == 0, result.stderr
        assert received(sub)["data"] == "first"
        assert sub.stdout is not None
        sub.stdout.close()
        assert sub.wait(timeout=60) == 128 + signal.SIGPIPE
        assert sub.stderr is not None
        assert sub.stderr.read() == b""
        close = next(e for e in process.events() if e["event"] == "connection.close")
        assert (close["code"], close["initiator"]) == (1000, "client")
    finally:
        sub.kill()
        sub.wait()


@pytest.mark.parametrize(
    "loop_factory", [asyncio.new_event_loop, uvloop.new_event_loop], ids=["asyncio", "uvloop"]
)
def test_a_pipes_reader_going_is_noticed_without_a_write(loop_factory: Any) -> None:
    """On either event loop; and the pipe stays blocking for the command's writes."""
    read_end, write_end = os.pipe()

    async def watch(output: Any) -> None:
        loop = asyncio.get_running_loop()
        gone: asyncio.Future[None] = loop.create_future()
        unwatch = _watch_reader(loop, output, lambda: gone.set_result(None))
        try:
            assert os.get_blocking(write_end)
            os.close(read_end)
            async with asyncio.timeout(30):
                await gone
        finally:
            unwatch()  # before the descriptor closes

    with open(write_end, "wb") as output, asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(watch(output))


def test_subscribe_ends_on_a_message_over_max_size(process: Any) -> None:
    """A message larger than ``--max-size`` closes the connection with 1009 and ends
    the command (1), saying why: the daemon would replay it to a reconnection."""
    sub = subscriber(process, "news", options=("--max-size", "200"))
    try:
        control = f"http://127.0.0.1:{process.control_port}"
        result = cli("publish", "--url", control, "--token", TOKEN, "news", "x" * 200)
        assert result.returncode == 0, result.stderr
        _, errors = sub.communicate(timeout=60)
        assert sub.returncode == 1
        assert errors.startswith(b"broadcastd: connection closed (1009): message_too_big: "), errors
        assert b"--max-size" in errors
        close = next(e for e in process.events() if e["event"] == "connection.close")
        assert (close["code"], close["initiator"]) == (1009, "client")
    finally:
        sub.kill()
        sub.wait()


def test_subscribe_takes_the_largest_message_its_configuration_allows(tmp_path: Path) -> None:
    """Without ``--max-size``, ``subscribe`` accepts what the daemon it finds in its
    configuration may send, even past the client library's 1 MiB default."""
    configuration = {
        "BROADCASTD_CONTROL__MAX_PAYLOAD_BYTES": str(2 * 1024 * 1024),
        "BROADCASTD_WS__OUTBOX_BYTES": str(4 * 1024 * 1024),
    }
    process = DaemonProcess(env=configuration)
    try:
        process.wait_ready()
        sub = subscriber(process, "big", env=configuration)
        try:
            payload = tmp_path / "payload"
            payload.write_text("x" * (1024 * 1024 + 1))
            control = f"http://127.0.0.1:{process.control_port}"
            with payload.open("rb") as data:
                result = subprocess.run(
                    [sys.executable, "-m", "broadcastd", "publish", "--url", control, "big"],
                    stdin=data,
                    capture_output=True,
                    cwd=ROOT,
                    timeout=60,
                    check=False,
                )
            assert result.returncode == 0, result.stderr
            assert received(sub)["data"] == "x" * (1024 * 1024 + 1)
        finally:
            sub.kill()
            sub.wait()
    finally:
        process.kill()


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


# Resuming after a reconnection


def test_resume_asks_for_each_channel_from_where_its_output_stands() -> None:
    resume = Resume(["news", "user:42", "quiet"])
    assert resume.query() == [("channel", "news"), ("channel", "user:42"), ("channel", "quiet")]
    replies = [
        {"type": "subscribed", "channel": "news", "epoch": "e1", "offset": 6},
        {"type": "subscribed", "channel": "user:42", "epoch": "e2", "offset": 0},
        {"type": "subscribed", "channel": "quiet", "offset": 3},  # a daemon without epochs
        {"channel": "news", "offset": 7, "data": 1},
        {"channel": "user:42", "offset": 1, "data": 2},
        {"channel": "quiet", "offset": 4, "data": 3},
    ]
    for doc in replies:
        text = json.dumps(doc)
        assert resume.frame(text) == (text, None)
    assert resume.positions == {"news": Position("e1", 7), "user:42": Position("e2", 1)}
    route = parse_route("/?" + urlencode(resume.query()), max_channels=10)
    assert route.channels == ("news", "user:42", "quiet")
    assert dict(route.since) == {
        "news": StreamPosition("e1", 7),
        "user:42": StreamPosition("e2", 1),
    }


def test_resume_follows_a_replay_and_tells_a_failed_recovery() -> None:
    resume = Resume(["news", "sport"])
    resume.positions = {"news": Position("e1", 7), "sport": Position("e1", 2)}
    recovered = {"type": "subscribed", "channel": "news", "epoch": "e1", "offset": 9}
    failed = {"type": "subscribed", "channel": "sport", "epoch": "e9", "offset": 4}
    failed |= {"recovered": False, "reason": "epoch"}
    assert resume.frame(json.dumps(recovered | {"recovered": True}))[1] is None
    assert resume.positions["news"] == Position("e1", 7)  # until the replay arrives
    _, notice = resume.frame(json.dumps(failed))
    assert notice == (
        "broadcastd subscribe: sport: could not recover (reason epoch): "
        "messages may have been missed"
    )
    assert resume.positions["sport"] == Position("e9", 4)
    resume.frame(json.dumps({"channel": "news", "offset": 8, "data": None}))
    assert resume.positions["news"] == Position("e1", 8)
    resume.frame(json.dumps({"type": "subscribed", "channel": "news", "offset": 0}))
    assert "news" not in resume.positions  # an old daemon: subscribe afresh


def test_resume_in_raw_mode_prints_what_raw_mode_would() -> None:
    resume = Resume(["news"], raw=True)
    subscribed = {"type": "subscribed", "channel": "news", "epoch": "e1", "offset": 0}
    assert resume.frame(json.dumps(subscribed)) == (None, None)
    assert resume.frame('{"channel":"news","offset":1,"data":"two\\nlines"}') == (
        "two\nlines",
        None,
    )
    spaced = '{"channel":"news","offset":2,"data":{"a": [1, 2.50],  "b": "}"}}'
    assert resume.frame(spaced) == ('{"a": [1, 2.50],  "b": "}"}', None)
    reordered = '{"data": {"a": 1}, "channel": "news", "offset": 3}'
    assert resume.frame(reordered) == ('{"a":1}', None)
    assert resume.frame('{"type":"missed","count":2}') == (None, None)
    error = '{"type":"error","code":"too_many_channels","message":"x"}'
    assert resume.frame(error) == (error, None)
    assert resume.positions == {"news": Position("e1", 3)}


async def start_subscribe(daemon: Running, *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "broadcastd", "subscribe", "--url", daemon.ws_url, *args),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )


async def next_line(proc: asyncio.subprocess.Process) -> bytes:
    """The next line printed; the timeout only turns a hang into a failure."""
    assert proc.stdout is not None
    async with asyncio.timeout(30):
        line = await proc.stdout.readline()
    assert line, "subscribe exited"
    return line.rstrip(b"\n")


async def stop(proc: asyncio.subprocess.Process) -> tuple[bytes, bytes]:
    """End ``subscribe`` as Ctrl-C would; what it printed since, and all of its stderr."""
    proc.send_signal(signal.SIGINT)
    async with asyncio.timeout(30):
        out, err = await proc.communicate()
    assert proc.returncode == 128 + signal.SIGINT, err
    return out, err


def drop_connections(daemon: Running) -> None:
    """Cut every client off, as a failing network would (the client sees 1006)."""
    for _, conn in daemon.daemon.ws.connections():
        conn.abort()


def publish_now(daemon: Running, channel: str, payload: Payload) -> None:
    """Publish without yielding to the event loop: no client can connect meanwhile."""
    daemon.daemon.node.publish(channel, payload, "channel")


async def test_subscribe_resumes_each_channel_after_a_reconnect(daemon: Running) -> None:
    sub = await start_subscribe(daemon, "news", "user:42")
    printed: list[dict[str, Any]] = []

    async def lines(count: int) -> list[dict[str, Any]]:
        docs = [json.loads(await next_line(sub)) for _ in range(count)]
        printed.extend(docs)
        return docs

    try:
        first = await lines(2)
        assert [(r["type"], r["channel"]) for r in first] == [
            ("subscribed", "news"),
            ("subscribed", "user:42"),
        ]
        for n in (1, 2, 3):
            await daemon.publish("news", n)
        await lines(3)

        # Cut off with three news and no user:42 printed; five more are missed live.
        drop_connections(daemon)
        for n in (4, 5, 6):
            publish_now(daemon, "news", Payload.from_value(n))
        for n in (1, 2):
            publish_now(daemon, "user:42", Payload.from_value(n))

        again = await lines(2 + 5)  # the two subscribed replies and the replay
        replies = [r for r in again if "type" in r]
        assert {r["channel"]: r["recovered"] for r in replies} == {"news": True, "user:42": True}
        await daemon.publish("news", 7)
        await daemon.publish("user:42", 3)
        await lines(2)
    finally:
        rest, errors = await stop(sub)
    assert rest == b""  # nothing printed twice
    assert b"connection closed (1006)" in errors
    assert b"could not recover" not in errors, errors
    messages = [doc for doc in printed if "type" not in doc]
    for channel, count in (("news", 7), ("user:42", 3)):
        mine = [m for m in messages if m["channel"] == channel]
        assert [(m["offset"], m["data"]) for m in mine] == [(n, n) for n in range(1, count + 1)]


class ConnectionsOpened:
    """Wraps the daemon's observer to tell each connection opened (and subscribed)."""

    def __init__(self, daemon: Running) -> None:
        self.inner = daemon.daemon.node.observer
        self.opened: asyncio.Queue[None] = asyncio.Queue()
        daemon.daemon.node.observer = self

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def connection_opened(self) -> None:
        self.inner.connection_opened()
        self.opened.put_nowait(None)

    async def next(self) -> None:
        async with asyncio.timeout(30):
            await self.opened.get()


async def test_raw_subscribe_resumes_and_prints_payloads_as_raw_mode_does(
    daemon: Running,
) -> None:
    connections = ConnectionsOpened(daemon)
    sub = await start_subscribe(daemon, "--raw", "news")
    bodies = [
        (b'{"a": [1, 2.50],  "b": "}"}', "application/json"),
        (b'"quoted"', "application/json"),
        (b"two\nlines", "text/plain"),
    ]
    try:
        await connections.next()
        async with daemon.connect("/?channel=news&format=raw") as raw:
            await connections.next()
            for body, content_type in bodies:
                response = await daemon.http.post(
                    "/publish/news", content=body, headers={"Content-Type": content_type}
                )
                assert response.status_code == 200, response.text
            expected = [await raw.recv() for _ in bodies]
        assert expected == ['{"a": [1, 2.50],  "b": "}"}', "quoted", "two\nlines"]
        printed = [await next_line(sub) for _ in range(4)]
        assert b"\n".join(printed).decode() == "\n".join(expected)

        drop_connections(daemon)
        publish_now(daemon, "news", Payload.from_json_body(b'{"missed": true }'))
        await connections.next()
        await daemon.publish("news", "live")
        assert await next_line(sub) == b'{"missed": true }'
        assert await next_line(sub) == b"live"
    finally:
        rest, errors = await stop(sub)
    assert rest == b""
    assert b"could not recover" not in errors, errors


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_subscribe_tells_a_lost_recovery_after_a_daemon_restart_and_carries_on() -> None:
    ports = ("--ws-port", str(free_port()), "--control-port", str(free_port()))
    first = DaemonProcess(*ports, "--control-token", TOKEN)
    second: DaemonProcess | None = None
    try:
        first.wait_ready()
        control = f"http://127.0.0.1:{first.control_port}"
        sub = subprocess.Popen(
            [
                *(sys.executable, "-m", "broadcastd", "subscribe", "--max-backoff", "0.2"),
                *("--url", f"ws://127.0.0.1:{first.ws_port}", "news"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=ROOT,
        )
        try:
            before = received(sub)
            assert before["type"] == "subscribed"
            assert cli("publish", "--url", control, "--token", TOKEN, "news", "a").returncode == 0
            assert received(sub) == {"channel": "news", "offset": 1, "data": "a"}

            first.kill()  # its channels' counts are gone: a new epoch on the next daemon
            second = DaemonProcess(*ports, "--control-token", TOKEN)
            second.wait_ready()
            after = received(sub)
            assert after["type"] == "subscribed"
            assert (after["recovered"], after["reason"]) == (False, "epoch")
            assert after["epoch"] != before["epoch"]
            assert cli("publish", "--url", control, "--token", TOKEN, "news", "b").returncode == 0
            assert received(sub) == {"channel": "news", "offset": 1, "data": "b"}
        finally:
            sub.send_signal(signal.SIGINT)
            rest, errors = sub.communicate(timeout=60)
        assert sub.returncode == 128 + signal.SIGINT
        assert rest == b""
        notices = [line for line in errors.splitlines() if b"could not recover" in line]
        assert notices == [
            b"broadcastd subscribe: news: could not recover (reason epoch): "
            b"messages may have been missed"
        ]
    finally:
        first.kill()
        if second is not None:
            second.kill()


async def test_subscribe_renews_an_expired_token_from_its_file(
    daemon_factory: Any, tmp_path: Path
) -> None:
    """The token expires (close 4003); the command reads the renewed token from its
    file, reconnects and resumes, nothing lost, nothing printed twice."""

    secret = "k" * 64

    def token(lifetime: float) -> str:
        claims = {"sub": "cli", "channels": ["*"], "exp": int(time.time() + lifetime)}
        return jwt.encode(claims, secret, algorithm="HS256")

    token_file = tmp_path / "token"
    token_file.write_text(token(2))
    settings = {"auth__hmac_secret": secret, "auth__leeway": 0, "auth__expiring_notice": 60}
    async with daemon_factory(**settings) as daemon:
        sub = await start_subscribe(daemon, "--token-file", str(token_file), "ticks")
        try:
            kinds = [json.loads(await next_line(sub))["type"] for _ in range(3)]
            assert kinds == ["authenticated", "subscribed", "expiring"]
            await daemon.publish("ticks", 1)
            assert json.loads(await next_line(sub))["data"] == 1
            token_file.write_text(token(3600))  # renewed, as a sidecar would
            assert json.loads(await next_line(sub))["type"] == "authenticated"
            reply = json.loads(await next_line(sub))
            assert (reply["type"], reply["recovered"]) == ("subscribed", True)
            await daemon.publish("ticks", 2)
            assert json.loads(await next_line(sub))["data"] == 2
        finally:
            rest, errors = await stop(sub)
        assert rest == b""
        assert b"connection closed (4003)" in errors
