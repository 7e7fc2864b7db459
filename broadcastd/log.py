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

import orjson
import structlog

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def configure(level: str = "info", fmt: str = "auto") -> None:
    """Set up structlog for our events and route stdlib logging through the same
    renderer. Safe to call again (tests do).

    Our own events take structlog's direct path (orjson, one write per line,
    level filtering before any work): a connection storm logs two events per
    client, so the cost per event matters.
    """
    as_json = fmt == "json" or (fmt == "auto" and not sys.stdout.isatty())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if as_json:
        events_renderer: Any = structlog.processors.JSONRenderer(serializer=_json_bytes)
        stdlib_renderer: Any = structlog.processors.JSONRenderer(serializer=_json_str)
        factory: Any = structlog.BytesLoggerFactory(sys.stdout.buffer)
    else:
        events_renderer = stdlib_renderer = structlog.dev.ConsoleRenderer(
            colors=sys.stdout.isatty()
        )
        factory = structlog.PrintLoggerFactory(sys.stdout)
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, events_renderer],
        logger_factory=factory,
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            stdlib_renderer,
        ],
    )
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(LEVELS[level])
    # websockets logs every connection at INFO; we log our own connection events.
    logging.getLogger("websockets").setLevel(max(LEVELS[level], logging.WARNING))


def _json_bytes(event: dict[str, Any], **_: Any) -> bytes:
    return orjson.dumps(event, default=repr)


def _json_str(event: dict[str, Any], **_: Any) -> str:
    return orjson.dumps(event, default=repr).decode()


def get(name: str) -> Any:
    """A structlog logger whose events carry ``logger=name``."""
    return structlog.get_logger().bind(logger=name)


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
