"""Connection events that cost less than the connections they report.

An operator wants a ``connection.open`` and a ``connection.close`` line per
client at ordinary rates. In a reconnect storm (every deploy) those lines cost
more than the connections: rendering and writing two events per client was
about 12 % of the daemon's CPU in a storm of 10,000. So once more than
``log.connection_summary_rate`` opens and closes come in one second, the rest of
that second's go at ``debug`` (filtered out before any work at the usual
levels), and one ``connections.summary`` line at ``info`` gives the second's
counts: opened, closed, and closes by code. Nothing is lost to an operator: the
summary carries the counts, the metrics carry the rest.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from typing import Any

from broadcastd import log

_log = log.get("broadcastd.ws")


class ConnectionLog:
    """Writes each connection's open and close event, or, in a storm, counts them."""

    __slots__ = (
        "_clock",
        "_closed",
        "_codes",
        "_emit",
        "_events",
        "_opened",
        "_rate",
        "_storm",
        "_timer",
        "_window",
    )

    def __init__(
        self, level: str, summary_rate: int, clock: Callable[[], float] = lambda: 0.0
    ) -> None:
        self._emit: Callable[..., Any] = getattr(_log, level)
        """Each event's level (``log.connection_level``)."""
        self._rate = summary_rate
        self._clock = clock
        self._window = -1.0
        """When this second began."""
        self._events = 0
        """Opens and closes in this second."""
        self._storm = False
        self._opened = 0
        self._closed = 0
        self._codes: Counter[int] = Counter()
        self._timer: asyncio.TimerHandle | None = None

    def opened(self, **fields: Any) -> None:
        if self._quiet():
            self._emit("connection.open", **fields)
        else:
            _log.debug("connection.open", **fields)
        self._opened += 1

    def closed(self, code: int, **fields: Any) -> None:
        if self._quiet():
            self._emit("connection.close", code=code, **fields)
        else:
            _log.debug("connection.close", code=code, **fields)
        self._closed += 1
        self._codes[code] += 1

    def _quiet(self) -> bool:
        """Count the event; whether it is to be logged on its own."""
        if not self._rate:
            return True
        now = self._clock()
        if now - self._window >= 1.0:
            if self._storm:
                self._summary()
            self._window = now
            self._events = self._opened = self._closed = 0
            self._codes.clear()
        self._events += 1
        if self._storm or self._events <= self._rate:
            return not self._storm
        self._storm = True  # the summary of this second comes at its end
        self._timer = asyncio.get_running_loop().call_later(
            max(0.0, self._window + 1.0 - now), self._summary
        )
        return False

    def _summary(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._storm:
            return
        self._storm = False
        _log.info(
            "connections.summary",
            seconds=1,
            opened=self._opened,
            closed=self._closed,
            close_codes={str(code): n for code, n in sorted(self._codes.items())},
            individually_above=self._rate,
        )
        self._window = -1.0  # the next event begins a new second
        self._events = self._opened = self._closed = 0
        self._codes.clear()

    def close(self) -> None:
        """Write the summary of a storm under way (at shutdown)."""
        self._summary()
