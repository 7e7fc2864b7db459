"""Background work of one owner: tasks held until they end, cancelled together,
and a failure of ours in one of them logged once.

The event loop holds a task only weakly, so whoever starts one must hold it; and
an exception in a task nobody awaits would surface only as "Task exception was
never retrieved", when the task is collected. The node (joins that wait for a
round trip) and the Redis engine's feeds (repairs) start such tasks; each keeps
a ``Background`` for them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

from broadcastd import log


class Background:
    """Tasks of one owner; a failure is logged as ``event`` (throttled), with its
    traceback, and ends that task only."""

    __slots__ = ("_event", "_log", "_tasks", "_throttle")

    def __init__(self, logger: str, event: str) -> None:
        self._log = log.get(logger)
        self._event = event
        self._throttle = log.Throttle(per_second=10)
        self._tasks: set[asyncio.Task[Any]] = set()

    def __len__(self) -> int:
        return len(self._tasks)

    def pending(self) -> list[asyncio.Task[Any]]:
        return list(self._tasks)

    def spawn(self, work: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def cancel(self) -> None:
        for task in self._tasks:
            task.cancel()

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None and self._throttle.allow(self._event):
            error = f"{type(exc).__name__}: {exc}"[:200]
            self._log.error(self._event, error=error, exc_info=exc)
