"""Shared fixtures: a real daemon on port 0, real HTTP and WebSocket clients."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvloop
from websockets.asyncio.client import ClientConnection, connect

from broadcastd.app import Daemon
from broadcastd.core.forms import Form
from broadcastd.core.outbox import Outbox
from broadcastd.settings import Settings, load_settings

from .redisserver import RedisServer

ROOT = Path(__file__).resolve().parent.parent


def pytest_asyncio_loop_factories(config: Any, item: Any) -> dict[str, Any]:
    """In-process daemons run on uvloop, as in production."""
    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests must not see a developer's BROADCASTD_* variables."""
    for key in list(os.environ):
        if key.startswith("BROADCASTD_") or key == "NOTIFY_SOCKET":
            monkeypatch.delenv(key)


class Wakes:
    """Counts an outbox's wake-ups (the calls its writer would get)."""

    def __init__(self, outbox: Outbox) -> None:
        self.count = 0
        outbox.wake = self

    def __call__(self) -> None:
        self.count += 1


def make_settings(**overrides: Any) -> Settings:
    """Settings on free ports; ``overrides`` use dotted names (``ws.max_clients``)."""
    base: dict[str, Any] = {
        "metrics.port": 0,
        "ws.port": 0,
        "control.port": 0,
        "ws.host": "127.0.0.1",
        "log.level": "warning",
    }
    base.update({k.replace("__", "."): v for k, v in overrides.items()})
    return load_settings(overrides=base)


class Running:
    """A daemon running in this event loop, with clients pointed at it."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.ws_url = f"ws://127.0.0.1:{daemon.ws.port}"
        self.control_url = f"http://127.0.0.1:{daemon.control.port}"
        self.http = httpx.AsyncClient(base_url=self.control_url, timeout=30)

    def connect(self, path: str = "/", **kwargs: Any) -> Any:
        kwargs.setdefault("compression", None)
        kwargs.setdefault("max_size", None)
        return connect(self.ws_url + path, **kwargs)

    async def publish(self, channel: str, data: Any, **kwargs: Any) -> dict[str, Any]:
        response = await self.http.post(f"/publish/{channel}", json=data, **kwargs)
        assert response.status_code == 200, response.text
        result: dict[str, Any] = response.json()
        return result


@asynccontextmanager
async def running_daemon(settings: Settings) -> AsyncIterator[Running]:
    daemon = Daemon(settings)
    task = asyncio.create_task(daemon.run(install_signals=False))
    started = asyncio.create_task(daemon.started.wait())
    done, _ = await asyncio.wait([task, started], return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        started.cancel()
        task.result()  # raises what made start-up fail
    running = Running(daemon)
    try:
        yield running
    finally:
        await running.http.aclose()
        daemon.shutdown()
        await task


@pytest.fixture
async def daemon() -> AsyncIterator[Running]:
    async with running_daemon(make_settings()) as running:
        yield running


@pytest.fixture
def daemon_factory() -> Callable[..., Any]:
    """``async with daemon_factory(ws__max_clients=3) as d:`` for custom settings."""

    def factory(**overrides: Any) -> Any:
        return running_daemon(make_settings(**overrides))

    return factory


async def recv_json(ws: ClientConnection, timeout: float = 10) -> dict[str, Any]:
    """The next frame, parsed. The timeout only turns a hang into a failure."""
    async with asyncio.timeout(timeout):
        message = await ws.recv()
    doc: dict[str, Any] = json.loads(message)
    return doc


async def subscribed(ws: ClientConnection, *channels: str) -> dict[str, int]:
    """Wait for the ``subscribed`` replies of ``channels``; return their offsets."""
    offsets: dict[str, int] = {}
    while len(offsets) < len(channels):
        reply = await recv_json(ws)
        assert reply["type"] == "subscribed", reply
        offsets[reply["channel"]] = reply["offset"]
    assert set(offsets) == set(channels)
    return offsets


def serve_command(*args: str) -> list[str]:
    """``broadcastd serve`` on free loopback ports with JSON logs, plus ``args``."""
    return [
        sys.executable,
        "-m",
        "broadcastd",
        "serve",
        "--ws-host",
        "127.0.0.1",
        "--ws-port",
        "0",
        "--control-port",
        "0",
        "--metrics-port",
        "0",
        "--log-format",
        "json",
        *args,
    ]


class DaemonProcess:
    """``broadcastd serve`` as a subprocess; ports read from its daemon.ready log line."""

    def __init__(
        self, *args: str, env: dict[str, str] | None = None, wrapper: tuple[str, ...] = ()
    ) -> None:
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("BROADCASTD_")}
        full_env.update(env or {})
        self.proc = subprocess.Popen(
            [*wrapper, *serve_command(*args)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=ROOT,
        )
        self.lines: list[dict[str, Any]] = []
        self.ws_port = self.control_port = 0

    def wait_ready(self) -> None:
        for event in self.events():
            if event.get("event") == "daemon.ready":
                self.ws_port = int(event["ws"].rsplit(":", 1)[1])
                self.control_port = int(event["control"].rsplit(":", 1)[1])
                return
        raise AssertionError(f"daemon exited before ready: {self.lines}")

    def events(self) -> Iterator[dict[str, Any]]:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            try:
                event = json.loads(raw)
            except ValueError:
                event = {"event": "non-json", "text": raw.decode(errors="replace")}
            self.lines.append(event)
            yield event

    def finish(self, timeout: float = 60) -> int:
        """Read the rest of the output and return the exit status."""
        for _ in self.events():
            pass
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A fresh persistent ``redis-server`` on a free port, stopped at teardown."""
    with RedisServer(tmp_path / "redis") as server:
        yield server


@pytest.fixture
def redis_factory(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    """``redis_factory(persistence=False)`` starts one more server (each in its
    own directory), for tests of two shards or of a server that loses its
    data; all of them are stopped at teardown."""
    servers: list[RedisServer] = []

    def factory(persistence: bool = True) -> RedisServer:
        server = RedisServer(tmp_path / f"redis-{len(servers)}", persistence=persistence)
        servers.append(server)
        server.start()
        return server

    try:
        yield factory
    finally:
        for server in servers:
            server.stop()


def node_publish(node: Any, channel: str, value: Any, key: str | None = None) -> Any:
    """One publish through the node, as ``POST /publish/{channel}`` makes it (a
    refusal raised); the memory engine answers at once."""
    from broadcastd.broker import Published
    from broadcastd.core.envelope import Payload

    answer = node.publish(channel, Payload.from_value(value), "channel", key)
    assert isinstance(answer, Published)
    return answer


def node_join(node: Any, outbox: Any, name: str, raw: bool = False, since: Any = None) -> Any:
    """Join ``outbox`` to channel ``name`` on a memory-engine node (which answers at
    once): the position it joined at and the recovery, if ``since`` was given."""
    got: list[Any] = []

    def failed(error: Exception) -> None:
        raise error

    node.join(
        outbox,
        name,
        Form.RAW_FRAME if raw else Form.FRAME,
        since,
        lambda position, recovery: got.append((position, recovery)),
        failed,
    )
    assert got, "the memory engine answers at once"
    return got[0]


def cyclic_garbage_of(kinds: tuple[type, ...], names: tuple[str, ...] = ()) -> list[str]:
    """The objects of ``kinds`` (or whose type's name holds one of ``names``) that
    only the cyclic collector would free now, by type name, sorted: collected with
    DEBUG_SAVEALL, so that they can be named. Whatever was freed by reference
    counting is not there."""
    import gc

    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        gc.collect()
        found = sorted(
            type(o).__qualname__
            for o in gc.garbage
            if isinstance(o, kinds) or any(n in type(o).__name__ for n in names)
        )
    finally:
        gc.garbage.clear()
        gc.set_debug(0)
    return found


def redis_settings(server: RedisServer, **overrides: Any) -> Settings:
    """``make_settings`` on the Redis engine of ``server``, quick to notice faults."""
    return make_settings(
        broker__type="redis",
        broker__redis__url=server.url,
        broker__redis__probe_interval=0.1,
        broker__redis__backoff_max=0.2,
        **overrides,
    )


Engine = Callable[..., Any]


@pytest.fixture(params=["memory", "redis"])
def engine(request: pytest.FixtureRequest) -> Engine:
    """``async with engine(**settings) as d``: a daemon on the memory engine, or on
    a real redis-server started for the test."""

    @asynccontextmanager
    async def start(**overrides: Any) -> AsyncIterator[Running]:
        if request.param == "memory":
            settings = make_settings(**overrides)
        else:
            settings = redis_settings(request.getfixturevalue("redis_server"), **overrides)
        async with running_daemon(settings) as d:
            yield d

    return start
