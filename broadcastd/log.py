"""Logging: structlog, JSON lines in production, readable console on a TTY.

Standard-library loggers (websockets, asyncio) are routed through the same
renderer so that every line has one shape. Events are named ``noun.verb``
(``connection.open``, ``drain.start``); payloads and tokens are never logged.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import Any

import structlog

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def configure(level: str = "info", fmt: str = "auto") -> None:
    """Install the renderer on the root logger. Safe to call again (tests do)."""
    if fmt == "auto":
        fmt = "console" if sys.stdout.isatty() else "json"
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stdout.isatty())
    )
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            renderer,
        ],
    )
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(LEVELS[level])
    # websockets logs every failed handshake at INFO/ERROR with tracebacks; we log
    # our own connection events instead.
    logging.getLogger("websockets").setLevel(max(LEVELS[level], logging.WARNING))


def get(name: str) -> Any:
    """A bound structlog logger for module ``name``."""
    return structlog.stdlib.get_logger(name)


class Throttle:
    """Lets at most ``per_second`` events of each name through per second.

    A flood of identical warnings (thousands of slow consumers cut at once) must
    not cost more than the problem it reports. Events held back are counted and
    reported with the next one let through (``suppressed=N``).
    """

    __slots__ = ("_held", "_windows", "clock", "per_second")

    def __init__(self, per_second: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_second = per_second
        self.clock = clock
        self._windows: dict[str, tuple[float, int]] = {}
        self._held: dict[str, int] = {}

    def allow(self, name: str) -> bool:
        now = self.clock()
        start, count = self._windows.get(name, (now, 0))
        if now - start >= 1.0:
            start, count = now, 0
        if count >= self.per_second:
            self._windows[name] = (start, count)
            self._held[name] = self._held.get(name, 0) + 1
            return False
        self._windows[name] = (start, count + 1)
        return True

    def suppressed(self, name: str) -> int:
        """How many were held back since the last one let through (and reset it)."""
        return self._held.pop(name, 0)
