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
number (143 for SIGTERM, 130 for SIGINT), as a shell would report it. SIGHUP
reads the TLS certificates and keys again (``broadcastd.tls``; a bad file is
logged and the old one kept); the other settings are fixed at start, and a
hang-up must not kill the daemon without a drain.

A start-up that fails halfway (a port taken) closes what it had opened and
re-raises after one ``daemon.start_failed`` line. While serving, the event
loop's exception handler turns what escapes into the loop (a protocol bug, an
``accept()`` out of file descriptors) into throttled one-line warnings.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import resource
import signal
import time
from collections.abc import Awaitable
from types import TracebackType
from typing import Any

from broadcastd import __version__, log
from broadcastd.broker import Broker
from broadcastd.broker.redis import RedisBroker
from broadcastd.core.observer import NullObserver, Observer
from broadcastd.node import Node
from broadcastd.sdnotify import SystemdNotifier
from broadcastd.settings import BrokerType, Settings
from broadcastd.tls import ServerTls
from broadcastd.transport.control import (
    ControlApi,
    HttpListener,
    control_listener,
    metrics_listener,
)
from broadcastd.transport.metrics import LoopLagProbe, Metrics, build_registry, render
from broadcastd.transport.ws import WsServer

_log = log.get("broadcastd.app")
_throttle = log.Throttle(per_second=10)
"""A fault repeated for every connection must cost one line a tenth of a second."""
SIGNALS = (signal.SIGTERM, signal.SIGINT)
FD_ERRNOS = frozenset((errno.EMFILE, errno.ENFILE))
FD_PROBE_INTERVAL = 1.0
FD_RESERVE = 128
"""File descriptors the daemon needs besides its subscribers (listeners, control
connections, the loop's own): fewer than ``ws.max_clients`` plus this is warned of."""


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
        reporter = observer or self.metrics or NullObserver()
        if broker is None and settings.broker.type == BrokerType.REDIS:
            broker = RedisBroker(settings, reporter)
        self.node = Node(settings, broker=broker, observer=reporter)  # memory if None
        self.tls = [
            ServerTls(name, section.tls_cert_file, section.tls_key_file)
            for name, section in (("ws", settings.ws), ("control", settings.control))
            if section.tls_cert_file is not None and section.tls_key_file is not None
        ]
        """Each TLS port's context, in the order ws, control (read again on SIGHUP)."""
        contexts = {tls.port_name: tls.context for tls in self.tls}
        self.ws = WsServer(settings.ws, self.node, contexts.get("ws"))
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
        self.control = control_listener(
            settings.control, api, settings.ws.reuse_port, contexts.get("control")
        )
        self.notifier = notifier if notifier is not None else SystemdNotifier.from_environ()
        self.started = asyncio.Event()
        """Set once every listener accepts connections (tests wait on it)."""
        self._shutdown = asyncio.Event()
        self._signals = 0
        self._watchdog: asyncio.TimerHandle | None = None
        self._fd_probe: asyncio.TimerHandle | None = None

    async def start(self) -> None:
        """Open everything; if one step fails, close what the earlier ones opened
        (so no listener outlives a failed start), log one line and re-raise."""
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        _log.info("daemon.start", version=__version__, pid=os.getpid(), nofile=nofile)
        if nofile != resource.RLIM_INFINITY and nofile < self.settings.ws.max_clients + FD_RESERVE:
            _log.warning(
                "fd_limit.low",
                nofile=nofile,
                max_clients=self.settings.ws.max_clients,
                hint=f"raise LimitNOFILE (ulimit -n) above ws.max_clients + {FD_RESERVE}",
            )
        async with contextlib.AsyncExitStack() as opened:
            await _step("broker", self.node.start())
            opened.push_async_callback(self.node.close)
            await _step("control", self.control.start())
            opened.push_async_callback(self.control.close)
            if self.metrics_listener is not None:
                await _step("metrics", self.metrics_listener.start())
                opened.push_async_callback(self.metrics_listener.close)
            await _step("ws", self.ws.start())
            opened.pop_all()
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
        self._probe_fds()
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

    def _probe_fds(self) -> None:
        """Once a second, check that one more file descriptor can be opened.

        uvloop reports nothing when ``accept()`` fails with EMFILE or ENFILE:
        libuv closes a spare descriptor it keeps, accepts every waiting connection
        and closes each at once, so those clients see their connection reset and
        the daemon's listener survives, silently. This probe is what notices.
        (asyncio reports the failure to the loop's exception handler instead.)
        A timer chain, not a task.
        """
        try:
            os.close(os.open(os.devnull, os.O_RDONLY))
        except OSError as exc:
            if exc.errno in FD_ERRNOS:
                self._at_fd_limit(exc)
        loop = asyncio.get_running_loop()
        self._fd_probe = loop.call_later(FD_PROBE_INTERVAL, self._probe_fds)

    def _at_fd_limit(self, exc: OSError) -> None:
        """New connections are being turned away for want of file descriptors."""
        self.node.observer.connection_rejected("fd_limit")
        if _throttle.allow("fd_limit"):
            _log.warning(
                "connection.rejected",
                reason="fd_limit",
                error=os.strerror(exc.errno or 0),
                nofile=resource.getrlimit(resource.RLIMIT_NOFILE)[0],
                clients=self.ws.client_count,
                suppressed=_throttle.suppressed("fd_limit"),
            )

    def _on_loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """The event loop's exception handler: what escaped a callback or a
        transport (``Fatal error on transport``, ``Exception in callback``) becomes
        one throttled line naming the error and where it was raised, not a
        traceback per connection; the full traceback is logged at debug level."""
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in FD_ERRNOS:
            self._at_fd_limit(exc)  # asyncio: "socket.accept() out of system resource"
            return
        if not _throttle.allow("loop.error"):
            return
        _log.warning(
            "loop.error",
            message=str(context.get("message", ""))[:200],
            error=None if exc is None else f"{type(exc).__name__}: {exc}"[:200],
            where=_where(exc),
            suppressed=_throttle.suppressed("loop.error"),
        )
        if exc is not None:
            _log.debug("loop.error.traceback", exc_info=exc)

    def shutdown(self) -> None:
        """Begin the drain (what SIGTERM does)."""
        self._shutdown.set()

    async def run(self, install_signals: bool = True) -> int:
        """Serve until shut down; drain; return the exit status."""
        loop = asyncio.get_running_loop()
        previous_handler = loop.get_exception_handler()
        loop.set_exception_handler(self._on_loop_error)
        if install_signals:
            for signum in SIGNALS:
                loop.add_signal_handler(signum, self._on_signal, signum)
            loop.add_signal_handler(signal.SIGHUP, self._on_hangup)
        try:
            await self.start()
            await self._shutdown.wait()
            await self.drain()
        finally:
            for timer in (self._watchdog, self._fd_probe):
                if timer is not None:
                    timer.cancel()
            if self.lag_probe is not None:
                self.lag_probe.stop()
            if install_signals:
                for signum in (*SIGNALS, signal.SIGHUP):
                    loop.remove_signal_handler(signum)
            loop.set_exception_handler(previous_handler)
        return 0

    def _on_hangup(self) -> None:
        action = "reload_tls" if self.tls else "ignored"
        _log.info("signal.received", signal="SIGHUP", action=action)
        for tls in self.tls:
            tls.reload()

    def _on_signal(self, signum: int) -> None:
        self._signals += 1
        name = signal.Signals(signum).name
        if self._signals == 1:
            _log.info("signal.received", signal=name, action="drain")
            self.shutdown()
            return
        _log.warning("signal.received", signal=name, action="exit_now", status=128 + signum)
        log.flush(timeout=0)
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
        if self.ws.verifier is not None:
            await self.ws.verifier.aclose()
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


async def _step(name: str, opening: Awaitable[None]) -> None:
    """One step of the start-up; if it fails, say which in one line."""
    try:
        await opening
    except Exception as exc:
        _log.error(
            "daemon.start_failed",
            step=name,
            error=str(exc) or type(exc).__name__,
            exc_info=None if isinstance(exc, OSError) else exc,  # a bug: show where
        )
        raise


def _where(exc: BaseException | None) -> str | None:
    """``file.py:123 in function`` of the innermost frame of ``exc``'s traceback."""
    tb: TracebackType | None = None if exc is None else exc.__traceback__
    if tb is None:
        return None
    while tb.tb_next is not None:
        tb = tb.tb_next
    code = tb.tb_frame.f_code
    return f"{os.path.basename(code.co_filename)}:{tb.tb_lineno} in {code.co_name}"
