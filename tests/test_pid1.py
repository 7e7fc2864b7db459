"""As PID 1 (a container's init), the daemon still drains on SIGTERM.

The kernel drops signals to PID 1 that have no handler, so a daemon that relied
on default signal actions would ignore ``docker stop`` until SIGKILL. No Docker
engine runs here; a fresh PID namespace (``unshare --pid``) gives the daemon PID
1 the same way a container does.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import connect

from .conftest import DaemonProcess, subscribed


def _can_unshare() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True, check=False
    )
    return probe.returncode == 0


pytestmark = pytest.mark.skipif(
    not _can_unshare(), reason="unshare --pid needs root (or user namespaces) on this machine"
)


def _child_of(pid: int) -> int:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    assert len(children) == 1, children
    return int(children[0])


async def test_pid_1_drains_on_sigterm_and_exits_0() -> None:
    process = DaemonProcess(wrapper=("unshare", "--pid", "--fork", "--mount-proc", "--kill-child"))
    try:
        process.wait_ready()
        assert process.lines[0]["event"] == "daemon.start"
        assert process.lines[0]["pid"] == 1
        daemon_pid = _child_of(process.proc.pid)  # the namespace's PID 1, as the host sees it

        url = f"ws://127.0.0.1:{process.ws_port}/news"
        async with connect(url, compression=None) as ws:
            await subscribed(ws, "news")
            async with httpx.AsyncClient() as client:
                published = await client.post(
                    f"http://127.0.0.1:{process.control_port}/publish/news", json={"last": True}
                )
            assert published.status_code == 200
            os.kill(daemon_pid, signal.SIGTERM)
            message = json.loads(await ws.recv())
            assert message["data"] == {"last": True}
            with pytest.raises(Exception, match="1001"):
                await ws.recv()
        assert process.finish() == 0
        assert "drain.done" in [e.get("event") for e in process.lines]
    finally:
        process.kill()
