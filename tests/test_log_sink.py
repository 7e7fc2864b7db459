"""A stdout nobody reads, whose reader has gone, or that is closed never stops serving.

Each test runs ``broadcastd serve`` with stdout in one of those states, so the
daemon's ports cannot come from its log: they come from the ``STATUS=`` line it
sends to a NOTIFY_SOCKET the test binds, as systemd would.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect

from broadcastd.log import LogSink

from .conftest import ROOT, recv_json, serve_command, subscribed

READY_TIMEOUT = 60.0
"""Upper bound for start-up; never waited out by a daemon that starts."""
PIPE_SIZE = 4096
"""The smallest pipe the kernel allows: a few lines fill it."""


class Daemon:
    """``broadcastd serve`` with the given stdout; ports from its READY notification."""

    def __init__(self, stdout: int | None, *, shell_prefix: str = "", buffer_bytes: int = 4096):
        self._dir = tempfile.TemporaryDirectory(prefix="sink-")  # sun_path is short
        path = os.path.join(self._dir.name, "notify")
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(path)
        command = serve_command("--log-buffer-bytes", str(buffer_bytes))
        if shell_prefix:  # e.g. ">&-": let a shell arrange stdout, then exec the daemon
            command = ["sh", "-c", f'exec "$@" {shell_prefix}', "sh", *command]
        env = {k: v for k, v in os.environ.items() if not k.startswith("BROADCASTD_")}
        env["NOTIFY_SOCKET"] = path
        self.proc = subprocess.Popen(
            command, stdout=stdout, stderr=subprocess.PIPE, env=env, cwd=ROOT
        )
        self.ws_port = self.control_port = 0

    def wait_ready(self) -> None:
        """Wait for READY=1, or fail with stderr if the daemon exits first."""
        assert self.proc.stderr is not None
        while True:
            readable, _, _ = select.select([self.notify, self.proc.stderr], [], [], READY_TIMEOUT)
            assert readable, "no READY=1 notification"
            if self.proc.stderr in readable:
                raise AssertionError(f"daemon wrote to stderr: {self.stderr()!r}")
            message = self.notify.recv(65536).decode()
            fields = dict(line.split("=", 1) for line in message.splitlines())
            if fields.get("READY") == "1":
                status = fields["STATUS"]  # "serving: ws 127.0.0.1:P, control 127.0.0.1:P, ..."
                ports = dict(part.split() for part in status.split(": ", 1)[1].split(", "))
                self.ws_port = int(ports["ws"].rsplit(":", 1)[1])
                self.control_port = int(ports["control"].rsplit(":", 1)[1])
                return

    def stderr(self) -> str:
        assert self.proc.stderr is not None
        return self.proc.stderr.read().decode(errors="replace")

    def stop(self) -> tuple[int, str]:
        """SIGTERM; the exit status and everything written to stderr."""
        self.proc.send_signal(signal.SIGTERM)
        errors = self.stderr()
        return self.proc.wait(60), errors

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        self.notify.close()
        self._dir.cleanup()


def small_pipe() -> tuple[int, int]:
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    return read_end, write_end


def small_socket() -> tuple[int, int]:
    """A stream socket pair, as journald gives a service for its stdout."""
    reader, writer = socket.socketpair()
    writer.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, PIPE_SIZE)
    reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, PIPE_SIZE)
    return reader.detach(), writer.detach()


@pytest.fixture(params=["pipe", "socket"])
def stdout(request: pytest.FixtureRequest) -> Iterator[tuple[int, int]]:
    """(read end, write end) of what the daemon gets as stdout."""
    ends = small_pipe() if request.param == "pipe" else small_socket()
    try:
        yield ends
    finally:
        for fd in ends:
            with contextlib.suppress(OSError):
                os.close(fd)


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    ends = small_pipe()
    try:
        yield ends
    finally:
        for fd in ends:
            with contextlib.suppress(OSError):
                os.close(fd)


async def churn(daemon: Daemon, connections: int) -> None:
    """Open and close subscriber connections: two log lines each."""
    for n in range(connections):
        async with connect(f"ws://127.0.0.1:{daemon.ws_port}/churn{n}", compression=None) as ws:
            await subscribed(ws, f"churn{n}")


async def still_serves(daemon: Daemon) -> None:
    """/healthz answers and a subscriber gets what is published."""
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{daemon.control_port}", timeout=30
    ) as http:
        health = await http.get("/healthz")
        assert health.status_code == 200
        url = f"ws://127.0.0.1:{daemon.ws_port}/news"
        async with connect(url, compression=None, open_timeout=30) as ws:
            await subscribed(ws, "news")
            published = await http.post("/publish/news", json={"price": 42})
            assert published.status_code == 200
            message = await recv_json(ws, timeout=30)
            assert message["data"] == {"price": 42}


async def test_a_stdout_nobody_reads_does_not_stop_serving(stdout: tuple[int, int]) -> None:
    read_end, write_end = stdout
    daemon = Daemon(write_end)
    os.close(write_end)
    try:
        daemon.wait_ready()
        await churn(daemon, 100)  # far more than the pipe and the buffer hold
        await still_serves(daemon)

        # The log shipper comes back: what was held arrives, then the count of the rest.
        lines: list[dict[str, Any]] = []
        reported = threading.Event()

        def read() -> None:
            with os.fdopen(read_end, "rb") as pipe:
                for raw in pipe:
                    lines.append(json.loads(raw))
                    if lines[-1]["event"] == "log.dropped":
                        reported.set()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        assert reported.wait(READY_TIMEOUT), lines
        dropped = next(line for line in lines if line["event"] == "log.dropped")
        assert dropped["level"] == "warning"
        assert dropped["count"] > 0
        assert lines[0]["event"] == "daemon.start"  # whole lines, in order

        status, errors = daemon.stop()
        reader.join(READY_TIMEOUT)
        assert status == 0
        assert errors == ""
        assert lines[-1]["event"] == "drain.done"
    finally:
        daemon.close()


async def test_a_stdout_whose_reader_has_gone_does_not_stop_serving(
    stdout: tuple[int, int],
) -> None:
    read_end, write_end = stdout
    daemon = Daemon(write_end)
    os.close(write_end)
    try:
        daemon.wait_ready()
        os.close(read_end)  # every write from now on fails with EPIPE
        await churn(daemon, 20)
        await still_serves(daemon)
        status, errors = daemon.stop()
        assert status == 0
        assert errors == ""  # no tracebacks
    finally:
        daemon.close()


async def test_a_closed_stdout_does_not_stop_serving() -> None:
    daemon = Daemon(None, shell_prefix=">&-")
    try:
        daemon.wait_ready()
        await churn(daemon, 20)
        await still_serves(daemon)
        status, errors = daemon.stop()
        assert status == 0
        assert errors == ""
    finally:
        daemon.close()


# The sink on its own, without a daemon


def test_lines_beyond_the_buffer_are_dropped_whole_and_counted(pipe: tuple[int, int]) -> None:
    read_end, write_end = pipe
    os.set_blocking(write_end, False)
    sink = LogSink(write_end, lambda data: os.write(write_end, data), limit=1000)
    reports: list[int] = []
    sink.on_drained = reports.append
    line = b"x" * 99 + b"\n"
    for _ in range(PIPE_SIZE // len(line) + 20):  # fill the pipe, then 20 more
        sink.write(line)
    assert sink.dropped == 10  # the buffer held the first ten of the twenty
    data = os.read(read_end, 65536)
    sink.close(timeout=0)  # no event loop runs here: write out what is held now
    data += os.read(read_end, 65536)
    assert data == line * (len(data) // len(line))
    assert len(data) // len(line) == PIPE_SIZE // len(line) + 10
    assert reports == [10]


def test_a_sink_whose_reader_has_gone_drops_and_never_raises(pipe: tuple[int, int]) -> None:
    read_end, write_end = pipe
    os.close(read_end)
    sink = LogSink(write_end, lambda data: os.write(write_end, data), limit=1000)
    for _ in range(3):
        sink.write(b"line\n")
    assert sink.closed
    assert sink.dropped == 3


def test_stdout_closed_at_start_is_a_closed_sink() -> None:
    script = (
        "import sys, broadcastd.log as log; sink = log.LogSink.stdout(4096); "
        "sink.write(b'x\\n'); print(sink.closed, sink.dropped, file=sys.stderr)"
    )
    result = subprocess.run(
        ["sh", "-c", 'exec "$@" >&-', "sh", sys.executable, "-c", script],
        capture_output=True,
        cwd=ROOT,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.decode().split() == ["True", "1"]
