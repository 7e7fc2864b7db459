"""The systemd notifier against a real AF_UNIX datagram socket, as systemd binds it."""

from __future__ import annotations

import logging
import os
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from broadcastd.sdnotify import SystemdNotifier

RECV_TIMEOUT = 30.0
"""Upper bound for a datagram to arrive; sends are synchronous, so it is never waited out."""


class NotifySocket:
    """A bound datagram socket standing in for systemd's notification socket."""

    def __init__(self, sock: socket.socket, address: str) -> None:
        self.sock = sock
        self.address = address
        """What NOTIFY_SOCKET holds: a path, or @name in the abstract namespace."""

    def receive(self) -> str:
        return self.sock.recv(65536).decode()

    def receive_with_pid(self) -> tuple[str, int]:
        """The message and the sender's pid as the kernel reports it (what NotifyAccess checks)."""
        creds = struct.calcsize("3i")
        data, ancdata, _, _ = self.sock.recvmsg(65536, socket.CMSG_SPACE(creds))
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid, _uid, _gid = struct.unpack("3i", payload[:creds])
                return data.decode(), pid
        raise AssertionError("no SCM_CREDENTIALS on the datagram")

    def pending(self) -> bool:
        readable, _, _ = select.select([self.sock], [], [], 0)
        return bool(readable)


def _bind(address: str | bytes) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    sock.settimeout(RECV_TIMEOUT)
    sock.bind(address)
    return sock


@pytest.fixture
def path_socket() -> Iterator[NotifySocket]:
    # A short directory of its own: sun_path holds 108 bytes, pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="sdn-") as directory:
        path = os.path.join(directory, "notify")
        with _bind(path) as sock:
            yield NotifySocket(sock, path)


@pytest.fixture
def abstract_socket() -> Iterator[NotifySocket]:
    name = f"broadcastd-test-{uuid.uuid4().hex}"
    with _bind("\0" + name) as sock:
        yield NotifySocket(sock, "@" + name)


@pytest.fixture(params=["path", "abstract"])
def notify_socket(request: pytest.FixtureRequest) -> NotifySocket:
    fixture = "path_socket" if request.param == "path" else "abstract_socket"
    return request.getfixturevalue(fixture)  # type: ignore[no-any-return]


def notifier_for(sock: NotifySocket, **environ: str) -> SystemdNotifier:
    return SystemdNotifier.from_environ({"NOTIFY_SOCKET": sock.address, **environ})


def test_ready_sends_ready(notify_socket: NotifySocket) -> None:
    assert notifier_for(notify_socket).ready() is True
    assert notify_socket.receive() == "READY=1"


def test_each_state_has_its_message(notify_socket: NotifySocket) -> None:
    notifier = notifier_for(notify_socket)
    assert notifier.enabled
    assert notifier.stopping()
    assert notifier.watchdog()
    assert notifier.status("draining 3 clients")
    assert [notify_socket.receive() for _ in range(3)] == [
        "STOPPING=1",
        "WATCHDOG=1",
        "STATUS=draining 3 clients",
    ]


def test_sender_is_this_process(path_socket: NotifySocket) -> None:
    """NotifyAccess=main accepts only datagrams whose credentials name the main pid."""
    SystemdNotifier.from_environ({"NOTIFY_SOCKET": path_socket.address}).ready()
    assert path_socket.receive_with_pid() == ("READY=1", os.getpid())


def test_status_cannot_inject_assignments(path_socket: NotifySocket) -> None:
    notifier = notifier_for(path_socket)
    assert notifier.status("line one\nREADY=1\r\nMAINPID=1")
    assert path_socket.receive() == "STATUS=line one READY=1 MAINPID=1"


def test_notify_sends_several_assignments_in_one_datagram(path_socket: NotifySocket) -> None:
    assert notifier_for(path_socket).notify("READY=1", "STATUS=serving")
    assert path_socket.receive() == "READY=1\nSTATUS=serving"
    assert not path_socket.pending()


def test_status_text_is_utf8(path_socket: NotifySocket) -> None:
    assert notifier_for(path_socket).status("prêt ✓")
    assert path_socket.receive() == "STATUS=prêt ✓"


@pytest.mark.parametrize("environ", [{}, {"NOTIFY_SOCKET": ""}])
def test_without_notify_socket_every_call_is_a_noop(environ: dict[str, str]) -> None:
    notifier = SystemdNotifier.from_environ(environ)
    assert not notifier.enabled
    assert notifier.watchdog_interval is None
    assert not notifier.ready()
    assert not notifier.stopping()
    assert not notifier.status("x")
    assert not notifier.watchdog()


def test_default_environment_is_os_environ(
    path_socket: NotifySocket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", path_socket.address)
    assert SystemdNotifier.from_environ().ready()
    assert path_socket.receive() == "READY=1"


@pytest.mark.parametrize("address", ["relative/notify", "vsock:2:1234", "notify"])
def test_unsupported_addresses_are_a_noop(address: str) -> None:
    notifier = SystemdNotifier.from_environ({"NOTIFY_SOCKET": address})
    assert not notifier.enabled
    assert not notifier.ready()


def test_send_failures_return_false_and_log_nothing(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with tempfile.TemporaryDirectory(prefix="sdn-") as directory:
        missing = SystemdNotifier.from_environ({"NOTIFY_SOCKET": f"{directory}/absent"})
        assert missing.enabled
        assert missing.ready() is False
        a_directory = SystemdNotifier.from_environ({"NOTIFY_SOCKET": directory})
        assert a_directory.ready() is False
    gone = SystemdNotifier.from_environ({"NOTIFY_SOCKET": f"@broadcastd-gone-{uuid.uuid4().hex}"})
    assert gone.watchdog() is False
    too_long = SystemdNotifier.from_environ({"NOTIFY_SOCKET": "/" + "x" * 200})
    assert too_long.ready() is False
    assert caplog.records == []


def test_a_closed_receiver_is_a_send_failure() -> None:
    with tempfile.TemporaryDirectory(prefix="sdn-") as directory:
        path = f"{directory}/notify"
        _bind(path).close()  # the file stays, nobody listens
        assert Path(path).exists()
        assert SystemdNotifier.from_environ({"NOTIFY_SOCKET": path}).ready() is False


def test_a_full_queue_drops_the_notification_instead_of_blocking(
    path_socket: NotifySocket,
) -> None:
    path_socket.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)  # the kernel's minimum
    notifier = notifier_for(path_socket)
    results = [notifier.status("x" * 1024) for _ in range(10_000)]
    assert results[0] is True
    assert results[-1] is False  # did not block


@pytest.mark.parametrize(
    ("environ", "interval"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "1000"}, 0.0005),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": ""}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "30s"}, None),
        ({"WATCHDOG_USEC": "²"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval_is_half_the_timeout(
    path_socket: NotifySocket, environ: dict[str, str], interval: float | None
) -> None:
    assert notifier_for(path_socket, **environ).watchdog_interval == interval


def test_watchdog_interval_without_notify_socket_still_reported() -> None:
    """systemd always sets both; the interval alone is harmless to report."""
    notifier = SystemdNotifier.from_environ({"WATCHDOG_USEC": "4000000"})
    assert notifier.watchdog_interval == 2.0
    assert notifier.watchdog() is False


def test_constructor_and_repr() -> None:
    notifier = SystemdNotifier("@x", watchdog_usec=20_000_000)
    assert notifier.enabled
    assert notifier.watchdog_interval == 10.0
    assert repr(notifier) == "SystemdNotifier(address='@x', watchdog_interval=10.0)"
    assert SystemdNotifier().enabled is False


def daemon(notify: NotifySocket, **environ: str) -> subprocess.Popen[bytes]:
    """``broadcastd serve`` on free ports, as systemd would start it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BROADCASTD_", "WATCHDOG_"))}
    env.update(
        NOTIFY_SOCKET=notify.address,
        BROADCASTD_WS__HOST="127.0.0.1",
        BROADCASTD_WS__PORT="0",
        BROADCASTD_CONTROL__PORT="0",
        BROADCASTD_METRICS__PORT="0",
        BROADCASTD_LOG__LEVEL="warning",
        **environ,
    )
    return subprocess.Popen(
        [sys.executable, "-m", "broadcastd", "serve"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def test_daemon_reports_ready_then_stopping(path_socket: NotifySocket) -> None:
    """Type=notify end to end: READY=1 once serving, STOPPING=1 on SIGTERM, then exit 0."""
    with daemon(path_socket) as proc:
        try:
            message, pid = path_socket.receive_with_pid()
            assert "READY=1" in message.splitlines()
            assert pid == proc.pid  # NotifyAccess=main would accept it
            # READY=1 comes only once every listener accepts connections: the
            # ports it reports take a connection at once.
            status = next(line for line in message.splitlines() if line.startswith("STATUS="))
            ports = [int(m) for m in re.findall(r":(\d+)", status)]
            assert len(ports) == 3, status
            for port in ports:
                socket.create_connection(("127.0.0.1", port), timeout=RECV_TIMEOUT).close()
            proc.send_signal(signal.SIGTERM)
            assert "STOPPING=1" in path_socket.receive().splitlines()
            _, stderr = proc.communicate(timeout=RECV_TIMEOUT)
        finally:
            proc.kill()
    assert proc.returncode == 0, stderr.decode()


def test_daemon_pings_the_watchdog(path_socket: NotifySocket) -> None:
    """With WatchdogSec= set, WATCHDOG=1 must arrive every watchdog_interval seconds."""
    path_socket.sock.settimeout(3.0)  # six intervals of 0.5 s
    with daemon(path_socket, WATCHDOG_USEC="1000000") as proc:
        try:
            received = []
            for _ in range(3):
                try:
                    received += path_socket.receive().splitlines()
                except TimeoutError:
                    break
            assert "READY=1" in received
            assert "WATCHDOG=1" in received
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=RECV_TIMEOUT)
            proc.kill()
