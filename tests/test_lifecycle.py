"""Start-up, signals and the event loop's last line of defence.

A start-up that fails halfway closes what it opened; SIGHUP is ignored; what
escapes into the event loop is one throttled line; and at the file-descriptor
limit the daemon keeps serving, says so and counts it.
"""

from __future__ import annotations

import asyncio
import errno
import re
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect

from broadcastd import app
from broadcastd.app import Daemon

from .conftest import DaemonProcess, make_settings, recv_json, subscribed


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=10).close()
    except ConnectionRefusedError:
        return True
    return False


HANG = 60.0
"""Turns a wait that would never end into a failure; never waited out when all is well."""


async def first(process: DaemonProcess, events: Iterator[dict[str, Any]], name: str) -> Any:
    """The next event called ``name`` in the daemon's log (its stdout is read in a thread)."""
    reading = asyncio.to_thread(lambda: next((e for e in events if e["event"] == name), None))
    try:
        found = await asyncio.wait_for(asyncio.shield(reading), HANG)
    except TimeoutError:
        process.kill()  # ends the read
        found = None
    assert found is not None, f"no {name} in {process.lines}"
    return found


async def serves(ws_port: int, control_port: int) -> None:
    """/healthz answers and a subscriber gets what is published."""
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{control_port}", timeout=30) as http:
        assert (await http.get("/healthz")).status_code == 200
        async with connect(f"ws://127.0.0.1:{ws_port}/news", compression=None) as ws:
            await subscribed(ws, "news")
            assert (await http.post("/publish/news", json=1)).status_code == 200
            assert (await recv_json(ws))["data"] == 1


# start-up


async def test_a_failed_start_closes_what_it_opened(taken_port: int, tmp_path: Path) -> None:
    unix_path = tmp_path / "control.sock"
    daemon = Daemon(make_settings(**{"ws.port": taken_port, "control.unix_path": str(unix_path)}))
    opened: dict[str, int] = {}
    for name in ("control", "metrics_listener"):
        listener = getattr(daemon, name)
        start = listener.start

        async def record(listener: Any = listener, start: Any = start, name: str = name) -> None:
            await start()
            opened[name] = listener.port

        listener.start = record

    with pytest.raises(OSError) as failure:
        await daemon.run(install_signals=False)
    assert failure.value.errno == errno.EADDRINUSE
    assert set(opened) == {"control", "metrics_listener"}  # both were listening
    assert all(refused(port) for port in opened.values())  # and are closed again
    assert not unix_path.exists()
    assert not daemon.started.is_set()


def test_serve_exits_1_with_one_line_when_a_port_is_taken(taken_port: int) -> None:
    process = DaemonProcess("--ws-port", str(taken_port), "--ws-max-clients", "100")
    try:
        assert process.finish() == 1
        failed = [e for e in process.lines if e["event"] == "daemon.start_failed"]
        assert len(failed) == 1
        assert failed[0]["step"] == "ws"
        assert "address already in use" in failed[0]["error"]
        assert "exception" not in failed[0]  # the cause, not a traceback
        assert [e["event"] for e in process.lines] == ["daemon.start", "daemon.start_failed"]
    finally:
        process.kill()


# signals


async def test_sighup_is_logged_and_ignored() -> None:
    process = DaemonProcess()
    try:
        process.wait_ready()
        process.proc.send_signal(signal.SIGHUP)
        hangup = await first(process, process.events(), "signal.received")
        assert (hangup["signal"], hangup["action"]) == ("SIGHUP", "ignored")
        await serves(process.ws_port, process.control_port)
        process.proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(process.finish) == 0
        assert "drain.done" in [e["event"] for e in process.lines]
    finally:
        process.kill()


# the event loop's exception handler


class Recorder:
    """Stands in for the app's logger."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict[str, Any]]] = []

    def __getattr__(self, level: str) -> Any:
        return lambda event, **fields: self.events.append((level, event, fields))


async def test_loop_errors_become_throttled_one_line_warnings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    recorder = Recorder()
    monkeypatch.setattr(app, "_log", recorder)
    monkeypatch.setattr(app, "_throttle", app.log.Throttle(per_second=10, clock=lambda: 0.0))
    daemon = Daemon(make_settings())
    loop = asyncio.get_running_loop()
    task = asyncio.create_task(daemon.run(install_signals=False))
    await daemon.started.wait()
    try:
        for _ in range(100):  # a protocol bug hit by every connection
            try:
                raise ValueError("bug")
            except ValueError as exc:
                loop.call_exception_handler(
                    {"message": "Fatal error on transport TCPTransport", "exception": exc}
                )
        errors = [fields for level, event, fields in recorder.events if event == "loop.error"]
        assert len(errors) == 10
        assert errors[0]["error"] == "ValueError: bug"
        assert errors[0]["message"] == "Fatal error on transport TCPTransport"
        assert errors[0]["where"].startswith("test_lifecycle.py:")
        assert {level for level, event, _ in recorder.events if event == "loop.error"} == {
            "warning"
        }

        # asyncio's report of accept() out of file descriptors (uvloop reports none)
        loop.call_exception_handler(
            {
                "message": "socket.accept() out of system resource",
                "exception": OSError(errno.EMFILE, "Too many open files"),
            }
        )
        assert daemon.metrics is not None
        assert daemon.metrics.rejected["fd_limit"] == 1
        rejected = [f for _, e, f in recorder.events if e == "connection.rejected"]
        assert rejected[0]["reason"] == "fd_limit"
    finally:
        daemon.shutdown()
        await task
    assert loop.get_exception_handler() is None  # restored


# the file-descriptor limit

NOFILE = 96
"""The daemon's whole file table under prlimit: its own descriptors take about 20."""


async def test_at_the_fd_limit_the_daemon_warns_counts_and_keeps_serving() -> None:
    process = DaemonProcess(wrapper=("prlimit", f"--nofile={NOFILE}"))
    try:
        process.wait_ready()
        events = process.events()
        url = f"ws://127.0.0.1:{process.ws_port}/held"
        held: list[ClientConnection] = []
        turned_away = 0
        for _ in range(NOFILE + 20):
            try:
                ws = await connect(url, compression=None, open_timeout=30)
            except Exception:  # accepted and closed at once: reset or EOF in the handshake
                turned_away += 1
            else:
                held.append(ws)
        assert turned_away >= 20

        warning = await first(process, events, "connection.rejected")
        assert (warning["level"], warning["reason"]) == ("warning", "fd_limit")
        assert warning["nofile"] == NOFILE

        def closed(count: int) -> None:
            for event in events:
                count -= event["event"] == "connection.close"
                if count == 0:
                    return

        for ws in held:
            await ws.close()
        await asyncio.to_thread(closed, len(held))  # the daemon has let them go

        await serves(process.ws_port, process.control_port)
        async with httpx.AsyncClient() as http:
            text = (await http.get(f"http://127.0.0.1:{process.control_port}/metrics")).text
        match = re.search(r'broadcastd_connections_rejected_total\{reason="fd_limit"\} (\S+)', text)
        assert match is not None
        assert float(match.group(1)) > 0

        process.proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(process.finish) == 0
    finally:
        process.kill()
