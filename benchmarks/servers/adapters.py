"""The three servers under test: broadcastd, the naive baseline, and Nchan."""

from __future__ import annotations

import importlib.util
import json
import shutil
import string
import sys
from collections.abc import Sequence
from pathlib import Path

from benchmarks.publisher import http_get
from benchmarks.servers.base import HOST, Server

NCHAN_MODULE = Path("/usr/lib/nginx/modules/ngx_nchan_module.so")
NCHAN_TEMPLATE = Path(__file__).parent / "nchan" / "nginx.conf.tmpl"
NOFILE = 20_000


class Broadcastd(Server):
    """The daemon, started through its own console script."""

    name = "broadcastd"
    recovery = True
    log_noise = ('"level":"info"',)

    @classmethod
    def unavailable(cls) -> str | None:
        if importlib.util.find_spec("broadcastd.cli") is None:
            return "broadcastd is not importable yet (broadcastd.cli missing)"
        if cls._script() is None:
            return "the broadcastd console script is not installed in the venv"
        return None

    @staticmethod
    def _script() -> str | None:
        beside = Path(sys.executable).with_name("broadcastd")
        return str(beside) if beside.exists() else shutil.which("broadcastd")

    def argv(self) -> list[str]:
        script = self._script()
        assert script is not None
        return [
            script,
            "serve",
            "--ws-host",
            HOST,
            "--ws-port",
            str(self.ws_port),
            "--control-port",
            str(self.control_port),
            "--metrics-port",
            "0",
            "--log-format",
            "json",
            "--drain-timeout",
            "3",
        ]

    def env(self) -> dict[str, str]:
        """The runner's environment, so ``BROADCASTD_*=... python -m benchmarks``
        measures any setting (``BROADCASTD_METRICS__ENABLED=false``, say)."""
        return {**super().env(), "BROADCASTD_WS__MAX_CLIENTS": "19800"}


class Naive(Server):
    """benchmarks/servers/naive.py, the websockets-guide pattern."""

    name = "naive"

    def argv(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "benchmarks.servers.naive",
            "--ws-port",
            str(self.ws_port),
            "--control-port",
            str(self.control_port),
        ]


class Nchan(Server):
    """nginx + the Nchan module, one worker, its own prefix dir under the run's temp dir.

    Nchan sends each message as the frame payload (no envelope, no subscribed
    reply), which the client treats like broadcastd's raw mode, and has no
    batch endpoint.
    """

    name = "nchan"
    envelope = False
    batch = False
    log_noise = ("exceed open file resource limit",)

    @classmethod
    def unavailable(cls) -> str | None:
        if shutil.which("nginx") is None or not NCHAN_MODULE.exists():
            return (
                "Nchan is not installed (apt-get update && "
                "apt-get install -y nginx-light libnginx-mod-nchan)"
            )
        return None

    def argv(self) -> list[str]:
        prefix = self.workdir / f"nchan-{self.ws_port}"
        prefix.mkdir(parents=True, exist_ok=True)
        # worker_connections above the fd limit on purpose: nginx needs more slots
        # than sockets (19,900 slots served only ~18,650 WebSockets); fds stay capped.
        conf = string.Template(NCHAN_TEMPLATE.read_text()).substitute(
            module=NCHAN_MODULE,
            prefix=prefix,
            nofile=NOFILE,
            connections=NOFILE + 5000,
            ws_port=self.ws_port,
            control_port=self.control_port,
        )
        path = prefix / "nginx.conf"
        path.write_text(conf)
        nginx = shutil.which("nginx")
        assert nginx is not None
        return [nginx, "-p", str(prefix), "-c", str(path)]

    def ws_path(self, channels: Sequence[str], raw: bool) -> str:
        return "/" + ",".join(channels)  # always raw; a query string would be ignored

    async def subscribers(self, channel: str) -> int | None:
        try:
            response = await http_get(
                HOST, self.control_port, f"/publish/{channel}", {"Accept": "text/json"}
            )
        except (OSError, TimeoutError):
            return None
        if response.status != 200:
            return None
        return int(json.loads(response.body)["subscribers"])


SERVERS: dict[str, type[Server]] = {cls.name: cls for cls in (Broadcastd, Naive, Nchan)}
