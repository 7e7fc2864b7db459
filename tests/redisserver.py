"""A real ``redis-server`` process for tests, on a free loopback port.

The broker's failure modes (a restart, a crash, a hung server, lost data) are
what the tests are about, and a fake cannot reproduce them faithfully. This
helper runs Debian's ``redis-server`` with command-line options only (no config
file) and gives the test control over the process: stop, kill, restart on the
same port, freeze and thaw, and bring it back from an older snapshot.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

HOST = "127.0.0.1"
#: How many fresh ports ``start`` tries when another process takes the port
#: between our probe and redis's own bind.
BIND_ATTEMPTS = 5
#: Redis writes this (at warning level) when its port is taken.
ADDRESS_IN_USE = "Address already in use"


class RedisServerError(RuntimeError):
    """The server did not come up; the message ends with its log."""


@dataclass(frozen=True)
class TLSFiles:
    """PEM files for a TLS port: the server's certificate and key, and the CA
    that signed it (which clients must trust)."""

    cert: Path
    key: Path
    ca: Path


def make_tls_files(directory: Path) -> TLSFiles:
    """A fresh CA and a certificate it signed for 127.0.0.1 and localhost."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOST)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address(HOST)), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    files = TLSFiles(directory / "server.crt", directory / "server.key", directory / "ca.crt")
    files.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return files


def free_port() -> int:
    """A port the kernel just gave out for 127.0.0.1; free again once we return.

    Another process may take it before redis binds: ``start`` retries then.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        port: int = probe.getsockname()[1]
        return port


def no_retry() -> Retry:
    """redis-py >= 6 retries 10 times with backoff by default; tests want the
    first failure, both to poll readiness quickly and to see a hung server."""
    return Retry(NoBackoff(), 0)


class RedisServer:
    """One ``redis-server`` child process, its data kept in ``directory``.

    With ``persistence`` every acknowledged write reaches the append-only file
    before the reply (``appendfsync always``), so even ``kill()`` then
    ``start()`` keeps it. Without, there is no AOF and no RDB: every start is
    empty, as after losing a cache node.

    The port is chosen by the first ``start()`` and kept by later ones, so
    clients (and the daemon under test) find the server again after a restart.

    With ``password`` the server requires it (``requirepass``), and ``url`` and
    ``client()`` carry it; ``unix_socket`` adds a Unix socket at that path
    (``unix_url``), ``tls`` a TLS port beside the plain one (``tls_url``, whose
    clients trust ``tls.ca``).
    """

    def __init__(
        self,
        directory: Path,
        *,
        persistence: bool = True,
        ready_timeout: float = 10.0,
        password: str | None = None,
        unix_socket: Path | None = None,
        tls: TLSFiles | None = None,
    ) -> None:
        executable = shutil.which("redis-server")
        if executable is None:
            pytest.skip(
                "redis-server is not installed (Debian: apt-get install redis-server;"
                " `make unit` runs scripts/bootstrap-system.sh to install it)"
            )
        self.executable = executable
        self.directory = directory
        self.persistence = persistence
        self.ready_timeout = ready_timeout
        self.password = password
        self.unix_socket = unix_socket
        self.tls = tls
        self.log_path = directory / "redis-server.log"
        self._port: int | None = None
        self._tls_port: int | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._frozen = False
        self._clients: list[redis.Redis] = []

    # -- what tests read --------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("RedisServer.port before the first start()")
        return self._port

    @property
    def url(self) -> str:
        return f"redis://{self._credentials}{HOST}:{self.port}/0"

    @property
    def tls_url(self) -> str:
        """The TLS port's URL, trusting the test CA (``tls`` must be given)."""
        if self.tls is None or self._tls_port is None:
            raise RuntimeError("RedisServer.tls_url without tls, or before the first start()")
        return (
            f"rediss://{self._credentials}{HOST}:{self._tls_port}/0"
            f"?ssl_ca_certs={quote(str(self.tls.ca))}"
        )

    @property
    def unix_url(self) -> str:
        """The Unix socket's URL (``unix_socket`` must be given)."""
        if self.unix_socket is None:
            raise RuntimeError("RedisServer.unix_url without unix_socket")
        return f"unix://{self._credentials}{self.unix_socket}?db=0"

    @property
    def _credentials(self) -> str:
        return "" if self.password is None else f":{quote(self.password, safe='')}@"

    @property
    def pid(self) -> int:
        if self._process is None:
            raise RuntimeError("RedisServer.pid while not running")
        return self._process.pid

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def client(self, **kwargs: Any) -> redis.Redis:
        """A sync client to inspect or inject data; its connections are closed
        by ``stop()`` and ``kill()``, and reopened when it is used again.

        No retries unless ``kwargs`` ask for them: a test should see a dead or
        hung server as it is, not after ten silent reconnects.
        """
        kwargs.setdefault("socket_timeout", 10.0)
        kwargs.setdefault("socket_connect_timeout", 10.0)
        kwargs.setdefault("retry", no_retry())
        kwargs.setdefault("password", self.password)
        client = redis.Redis(host=HOST, port=self.port, **kwargs)
        self._clients.append(client)
        return client

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        """Start and return once the server answers PING.

        A first start picks a free port, and tries another if redis loses the
        race for it; later starts reuse the port and fail if it is taken.
        """
        if self.running:
            raise RuntimeError("RedisServer.start while already running")
        self._process = None  # it may have exited by itself
        self.directory.mkdir(parents=True, exist_ok=True)
        if not self.persistence:
            # Nothing should write one (no save points), but SAVE or SHUTDOWN
            # SAVE from a test could: a non-persistent server starts empty.
            (self.directory / "dump.rdb").unlink(missing_ok=True)
        if self._port is not None:
            self._launch(self._port)
            return
        for attempt in range(BIND_ATTEMPTS):
            if self.tls is not None:
                self._tls_port = free_port()
            try:
                self._launch(free_port())
            except _PortTaken:
                if attempt == BIND_ATTEMPTS - 1:
                    raise
            else:
                return

    def stop(self) -> None:
        """SIGTERM (redis flushes its AOF and exits), SIGKILL if it hangs."""
        self._close_clients()
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            if self._frozen:
                process.send_signal(signal.SIGCONT)  # a stopped process ignores SIGTERM
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._process = None
        self._frozen = False

    def kill(self) -> None:
        """SIGKILL: a crash, with no chance to flush anything."""
        self._close_clients()
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.kill()
            process.wait()
        self._process = None
        self._frozen = False

    def restart(self) -> None:
        """A clean stop and a start on the same port (data kept with persistence)."""
        self.stop()
        self.start()

    def snapshot(self) -> bytes:
        """The data as it is now, as an RDB file (``SAVE``), for ``restore``."""
        self.client().save()
        return (self.directory / "dump.rdb").read_bytes()

    def restore(self, snapshot: bytes) -> None:
        """A crash, then a start from ``snapshot``: the server holds exactly the
        data of that moment, and every write since is gone (a host brought back
        from an older backup, or an RDB-only server that crashed between saves).

        The AOF, which would win over the RDB, is removed first; redis loads an
        RDB only with the AOF off, so this start has it off, and with persistence
        it is turned back on at once (``CONFIG SET appendonly yes`` rewrites it
        from the data loaded) before this returns.
        """
        self.kill()
        shutil.rmtree(self.directory / "appendonlydir", ignore_errors=True)
        (self.directory / "dump.rdb").write_bytes(snapshot)
        self._launch(self.port, aof=False)
        if self.persistence:
            client = self.client()
            client.config_set("appendonly", "yes")
            deadline = time.monotonic() + self.ready_timeout
            while True:  # the rewrite runs in a child process: nothing to wait on but INFO
                info = client.info("persistence")
                if not (info["aof_rewrite_in_progress"] or info["aof_rewrite_scheduled"]):
                    break
                if time.monotonic() > deadline:
                    raise RedisServerError("redis-server did not rewrite its AOF in time")
                time.sleep(0.01)

    def freeze(self) -> None:
        """SIGSTOP: the server keeps its sockets and accepts connections (the
        kernel does) but answers nothing, like a hung or partitioned node.
        Returns once the kernel reports the process stopped."""
        process = self._require_running()
        process.send_signal(signal.SIGSTOP)
        self._frozen = True
        stat = Path(f"/proc/{process.pid}/stat")
        deadline = time.monotonic() + self.ready_timeout
        while stat.exists() and _process_state(stat) not in {"T", "t"}:
            if time.monotonic() > deadline:
                raise RedisServerError(f"redis-server {process.pid} did not stop on SIGSTOP")
            time.sleep(0.001)

    def thaw(self) -> None:
        """SIGCONT, and return once the server answers PING again."""
        process = self._require_running()
        process.send_signal(signal.SIGCONT)
        self._frozen = False
        self._wait_ready(process, self.port, self.log_path.stat().st_size)

    def __enter__(self) -> Self:
        if not self.running:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- internals -----------------------------------------------------------------

    def command(self, port: int, *, aof: bool | None = None) -> list[str]:
        """The full ``redis-server`` command line for ``port`` (with the AOF if
        the server has persistence, unless ``aof`` says otherwise)."""
        if aof is None:
            aof = self.persistence
        appendonly = ["--appendonly", "yes", "--appendfsync", "always"]
        return [
            self.executable,
            "--port",
            str(port),
            "--bind",
            HOST,
            "--protected-mode",
            "no",
            "--daemonize",
            "no",
            "--dir",
            str(self.directory),
            "--dbfilename",
            "dump.rdb",
            "--save",
            "",  # no RDB snapshots, ever: the AOF is the persistence
            *(appendonly if aof else ["--appendonly", "no"]),
            "--loglevel",
            "warning",
            "--logfile",
            "",  # stdout, which goes to log_path
            # DEBUG SLEEP and friends, for tests of a slow server.
            "--enable-debug-command",
            "local",
            *self._options(),
        ]

    def _options(self) -> list[str]:
        """The command-line options of ``password``, ``unix_socket`` and ``tls``."""
        options = []
        if self.password is not None:
            options += ["--requirepass", self.password]
        if self.unix_socket is not None:
            options += ["--unixsocket", str(self.unix_socket), "--unixsocketperm", "700"]
        if self.tls is not None:
            options += [
                "--tls-port",
                str(self._tls_port),
                "--tls-cert-file",
                str(self.tls.cert),
                "--tls-key-file",
                str(self.tls.key),
                "--tls-ca-cert-file",
                str(self.tls.ca),
                "--tls-auth-clients",
                "no",
            ]
        return options

    def _launch(self, port: int, *, aof: bool | None = None) -> None:
        with self.log_path.open("ab") as log:
            log_start = log.tell()
            process = subprocess.Popen(
                self.command(port, aof=aof),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.directory,
            )
        self._process = process
        try:
            self._wait_ready(process, port, log_start)
        except BaseException:
            self.kill()
            raise
        self._port = port  # kept by later starts only once redis has it

    def _wait_ready(self, process: subprocess.Popen[bytes], port: int, log_start: int) -> None:
        """Poll PING until it answers, the process exits, or the deadline passes."""
        deadline = time.monotonic() + self.ready_timeout
        with redis.Redis(
            host=HOST,
            port=port,
            password=self.password,
            socket_timeout=0.5,
            socket_connect_timeout=0.5,
            retry=no_retry(),
        ) as probe:
            while True:
                try:
                    if probe.ping():
                        return
                except (redis.ConnectionError, redis.TimeoutError):
                    pass  # not listening yet, or still loading its AOF
                try:
                    # The poll interval, cut short if the process dies.
                    status = process.wait(timeout=0.02)
                except subprocess.TimeoutExpired:
                    if time.monotonic() > deadline:
                        raise RedisServerError(
                            f"redis-server on port {port} did not answer PING within"
                            f" {self.ready_timeout} s; its log:\n{self._log_tail(log_start)}"
                        ) from None
                    continue
                log = self._log_tail(log_start)
                error = _PortTaken if ADDRESS_IN_USE in log else RedisServerError
                raise error(f"redis-server on port {port} exited with {status}; its log:\n{log}")

    def _log_tail(self, start: int, limit: int = 4000) -> str:
        with contextlib.suppress(OSError), self.log_path.open("rb") as log:
            log.seek(max(start, log.seek(0, os.SEEK_END) - limit))
            return log.read().decode(errors="replace")
        return "(no log)"

    def _require_running(self) -> subprocess.Popen[bytes]:
        if self._process is None or self._process.poll() is not None:
            raise RuntimeError("redis-server is not running")
        return self._process

    def _close_clients(self) -> None:
        """Their sockets die with the server anyway. A closed redis-py client
        stays usable (it reconnects on use), so the list is kept for the next
        stop."""
        for client in self._clients:
            client.close()


class _PortTaken(RedisServerError):
    """Redis lost the race for a port we had probed as free."""


def _process_state(stat: Path) -> str:
    """The state letter of /proc/PID/stat (after the parenthesised command)."""
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "?"
