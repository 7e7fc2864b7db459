"""The daemon's lifecycle: start order, signals, drain.

``Daemon(settings)`` builds the node and both listeners; ``run()`` starts
them, waits for the shutdown trigger (SIGTERM/SIGINT, or an event a test
injects) and drains:

1. readiness goes false and publishes are refused with 503;
2. the subscriber listener closes (new connections are refused; handshakes
   already under way get HTTP 503);
3. every subscriber's outbox is flushed - all publishes accepted before the
   drain reach every subscriber that keeps up - and each connection is closed
   with 1001 (going away);
4. connections still open at ``drain_timeout`` are aborted; the control
   listener closes; ``run()`` returns 0.

A second signal during the drain exits at once with status 128 + signal
number (143 for SIGTERM, 130 for SIGINT), as a shell would report it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time

from broadcastd import __version__, log
from broadcastd.broker import Broker
from broadcastd.core.observer import Observer
from broadcastd.node import Node
from broadcastd.sdnotify import SystemdNotifier
from broadcastd.settings import Settings
from broadcastd.transport.control import (
    ControlApi,
    HttpListener,
    control_listener,
    metrics_listener,
)
from broadcastd.transport.metrics import LoopLagProbe, Metrics, build_registry, render
from broadcastd.transport.ws import WsServer

_log = log.get("broadcastd.app")
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Daemon:
    """One broadcastd process: ``Config -> Daemon(config) -> run()``."""

    def __init__(
        self,
        settings: Settings,
        *,
        broker: Broker | None = None,
        observer: Observer | None = None,
        notifier: SystemdNotifier | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = Metrics() if settings.metrics.enabled and observer is None else None
        self.node = Node(settings, broker=broker, observer=observer or self.metrics)
        self.ws = WsServer(settings.ws, self.node)
        scrape = None
        self.metrics_listener: HttpListener | None = None
        self.lag_probe: LoopLagProbe | None = None
        if self.metrics is not None:
            self.lag_probe = LoopLagProbe(self.metrics.loop_lag)
            registry = build_registry(self.metrics, self.node, self.ws)
            scrape = lambda: render(registry)  # noqa: E731
            if settings.metrics.port is not None:
                self.metrics_listener = metrics_listener(
                    settings.metrics.host, settings.metrics.port, scrape
                )
        api = ControlApi(settings.control, self.node, lambda: self.ws.client_count, scrape)
        self.control = control_listener(settings.control, api)
        self.notifier = notifier if notifier is not None else SystemdNotifier.from_environ()
        self.started = asyncio.Event()
        """Set once every listener accepts connections (tests wait on it)."""
        self._shutdown = asyncio.Event()
        self._signals = 0
        self._watchdog: asyncio.TimerHandle | None = None

    async def start(self) -> None:
        _log.info("daemon.start", version=__version__, pid=os.getpid())
        await self.node.start()
        await self.control.start()
        if self.metrics_listener is not None:
            await self.metrics_listener.start()
        await self.ws.start()
        self.node.ready = True
        if self.lag_probe is not None:
            self.lag_probe.start()
        _log.info(
            "daemon.ready",
            ws=f"{self.settings.ws.host}:{self.ws.port}",
            control=f"{self.settings.control.host}:{self.control.port}",
            control_unix=str(self.settings.control.unix_path or ""),
            metrics=(
                f"{self.settings.metrics.host}:{self.metrics_listener.port}"
                if self.metrics_listener is not None
                else ""
            ),
        )
        self.notifier.notify("READY=1", f"STATUS={self._status()}")
        self._pet_watchdog()
        self.started.set()

    def _status(self) -> str:
        """One line for ``systemctl status``: where the daemon listens."""
        parts = [
            f"ws {self.settings.ws.host}:{self.ws.port}",
            f"control {self.settings.control.host}:{self.control.port}",
        ]
        if self.metrics_listener is not None:
            parts.append(f"metrics {self.settings.metrics.host}:{self.metrics_listener.port}")
        return "serving: " + ", ".join(parts)

    def _pet_watchdog(self) -> None:
        """WATCHDOG=1 every half WatchdogSec from the event loop itself, so a wedged
        loop gets the service restarted. A timer chain, not a sleeping task."""
        interval = self.notifier.watchdog_interval
        if interval is None:
            return
        self.notifier.watchdog()
        self._watchdog = asyncio.get_running_loop().call_later(interval, self._pet_watchdog)

    def shutdown(self) -> None:
        """Begin the drain (what SIGTERM does)."""
        self._shutdown.set()

    async def run(self, install_signals: bool = True) -> int:
        """Serve until shut down; drain; return the exit status."""
        loop = asyncio.get_running_loop()
        if install_signals:
            for signum in SIGNALS:
                loop.add_signal_handler(signum, self._on_signal, signum)
        try:
            await self.start()
            await self._shutdown.wait()
            await self.drain()
        finally:
            if self._watchdog is not None:
                self._watchdog.cancel()
            if self.lag_probe is not None:
                self.lag_probe.stop()
            if install_signals:
                for signum in SIGNALS:
                    loop.remove_signal_handler(signum)
        return 0

    def _on_signal(self, signum: int) -> None:
        self._signals += 1
        name = signal.Signals(signum).name
        if self._signals == 1:
            _log.info("signal.received", signal=name, action="drain")
            self.shutdown()
            return
        _log.warning("signal.received", signal=name, action="exit_now", status=128 + signum)
        sys.stdout.flush()
        os._exit(128 + signum)

    async def drain(self) -> None:
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        deadline = loop.time() + self.settings.drain_timeout
        clients = self.ws.client_count
        _log.info("drain.start", clients=clients, timeout_s=self.settings.drain_timeout)
        self.node.begin_drain()
        self.notifier.stopping()
        self.ws.stop_accepting()
        aborted = await self.ws.drain(deadline)
        await self.control.close()
        if self.metrics_listener is not None:
            await self.metrics_listener.close()
        await self.node.close()
        _log.info(
            "drain.done",
            clients=clients,
            aborted=aborted,
            duration_s=round(time.monotonic() - started, 3),
        )
