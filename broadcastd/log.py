"""Logging: structlog, JSON lines in production, readable console on a TTY.

Standard-library loggers (websockets, asyncio) are routed through the same
renderer so that every line has one shape. Events are named ``noun.verb``
(``connection.open``, ``drain.start``); payloads and tokens are never logged.

Every line, ours and the standard library's, goes through one ``LogSink`` that
never blocks and never raises: a log shipper that stops reading, a full
journald or a closed stdout must not stop the daemon from serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import select
import socket
import stat
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import orjson
import structlog

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
EXIT_FLUSH_TIMEOUT = 1.0
"""Seconds the last lines may wait at exit for a stuck stdout before they are dropped."""
_GONE = frozenset((errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.EBADF, errno.ENXIO))
"""Write errors that mean nobody will read stdout again."""


class LogSink:
    """Writes log lines to stdout without ever blocking or raising.

    The fast path is one non-blocking write per line. When stdout cannot take a
    line (its reader is slow or stuck), the rest waits in a buffer of at most
    ``limit`` bytes that the event loop writes out when stdout is writable again
    (``add_writer``); a line that does not fit is dropped whole and counted. Once
    the buffer has drained, ``on_drained`` is told how many were lost, so that one
    line can say so. When stdout is gone (EPIPE, or closed at start) every line is
    dropped and counted.
    """

    def __init__(
        self, fd: int | None, send: Callable[[bytes | bytearray], int] | None, limit: int
    ) -> None:
        self.fd = fd
        """What the event loop polls for writability (None: stdout is gone)."""
        self.limit = limit
        self.dropped = 0
        """Lines dropped since start: a counter for metrics."""
        self.on_drained: Callable[[int], None] | None = None
        self._send = send
        self._unreported = 0
        self._pending = bytearray()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()

    @property
    def closed(self) -> bool:
        return self._send is None

    @classmethod
    def stdout(cls, limit: int) -> LogSink:
        """A sink for fd 1 that writes through a non-blocking handle of its own.

        O_NONBLOCK on fd 1 itself would change the open file description it shares
        with the parent (a shell, a terminal), so a pipe, FIFO or terminal is opened
        again through /proc (a description of our own), and a socket (journald's) is
        sent to with MSG_DONTWAIT. A regular file is written as is: it never makes a
        writer wait for a reader, and reopening it would lose O_APPEND.
        """
        try:
            mode = os.fstat(1).st_mode
        except OSError:  # started with stdout closed (">&-")
            return cls(None, None, limit)
        if stat.S_ISREG(mode):
            return cls(1, partial(os.write, 1), limit)
        fd = 1
        try:
            if stat.S_ISSOCK(mode):
                sock = socket.socket(fileno=os.dup(1))
                flags = socket.MSG_DONTWAIT | getattr(socket, "MSG_NOSIGNAL", 0)
                return cls(sock.fileno(), lambda data: sock.send(data, flags), limit)
            fd = os.open("/proc/self/fd/1", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno == errno.ENXIO and not stat.S_ISSOCK(mode):  # the reader has gone
                return cls(None, None, limit)
            if not os.isatty(1):  # no /proc: make fd 1 itself non-blocking
                os.set_blocking(1, False)
        return cls(fd, partial(os.write, fd), limit)

    def write(self, line: bytes) -> None:
        """Write one whole line (ending in a newline) now, or hold it, or drop it."""
        with self._lock:
            if self._pending and (self._loop is None or self._loop.is_closed()):
                self._loop = None
                self._flush()  # no event loop waits on stdout for us: retry now
            if self._pending or self._send is None:
                self._hold(line)
                return
            try:
                n = self._send(line)
            except BlockingIOError:
                n = 0
            except OSError as exc:
                self._failed(exc, 1)
                return
            if n < len(line):
                self._pending += line[n:]
                self._arm()
                return
            due = self._unreported
        if due:
            self._report()

    def _hold(self, line: bytes) -> None:
        if self._send is None:
            self.dropped += 1
        elif len(self._pending) + len(line) > self.limit:
            self.dropped += 1
            self._unreported += 1
        else:
            self._pending += line
            self._arm()

    def _flush(self) -> bool:
        """Write what is pending without waiting; True when all of it went."""
        while self._pending and self._send is not None:
            try:
                n = self._send(self._pending)
            except BlockingIOError:
                return False
            except OSError as exc:
                self._failed(exc, 0)
                return False
            del self._pending[:n]
        return not self._pending

    def _failed(self, exc: OSError, lines: int) -> None:
        """A write failed: drop what it held; if stdout is gone, stop writing for good."""
        lines += self._pending.count(b"\n")
        self._pending.clear()
        self._disarm()
        self.dropped += lines
        if exc.errno in _GONE:
            self._send = None
        else:
            self._unreported += lines

    def _arm(self) -> None:
        """Have the running event loop call us back when stdout can take more."""
        if self._loop is not None or self.fd is None:
            return
        try:
            loop = asyncio.get_running_loop()
            loop.add_writer(self.fd, self._on_writable)
        except (RuntimeError, OSError, ValueError):
            return  # no loop (start-up, exit) or not pollable: the next write retries
        self._loop = loop

    def _disarm(self) -> None:
        loop, self._loop = self._loop, None
        if loop is not None and self.fd is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError, OSError, ValueError):
                loop.remove_writer(self.fd)

    def _on_writable(self) -> None:
        with self._lock:
            drained = self._flush()
            if drained:
                self._disarm()
        if drained:
            self._report()

    def _report(self) -> None:
        with self._lock:
            count, self._unreported = self._unreported, 0
        if count and self.on_drained is not None:
            self.on_drained(count)

    def close(self, timeout: float) -> None:
        """At exit: give stdout up to ``timeout`` seconds to take what is held;
        what it does not take is dropped. The sink stays usable."""
        deadline = time.monotonic() + timeout
        with self._lock:
            self._disarm()
            while not self._flush() and self.fd is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                poller = select.poll()
                poller.register(self.fd, select.POLLOUT)
                poller.poll(remaining * 1000)
            self.dropped += self._pending.count(b"\n")
            self._pending.clear()
        self._report()


class _Lines:
    """structlog's output for our events: each rendered line goes to the sink."""

    __slots__ = ("_write",)

    def __init__(self, write: Callable[[bytes], None]) -> None:
        self._write = write

    def msg(self, message: bytes) -> None:
        self._write(message + b"\n")

    log = debug = info = warn = warning = err = error = critical = exception = fatal = msg


class _TextLines:
    """The same for the console renderer, which renders to str."""

    __slots__ = ("_write",)

    def __init__(self, write: Callable[[bytes], None]) -> None:
        self._write = write

    def msg(self, message: str) -> None:
        self._write(message.encode("utf-8", "replace") + b"\n")

    log = debug = info = warn = warning = err = error = critical = exception = fatal = msg


class _SinkHandler(logging.Handler):
    """Standard-library records, rendered by structlog's formatter, to the sink."""

    def __init__(self, sink: LogSink) -> None:
        super().__init__()
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self.sink.write(line.encode("utf-8", "replace") + b"\n")


_sink: LogSink | None = None


def configure(level: str = "info", fmt: str = "auto", buffer_bytes: int = 1 << 20) -> None:
    """Set up structlog for our events and route stdlib logging through the same
    renderer and the same sink. Safe to call again (stdout is the one seen first).

    Our own events take structlog's direct path (orjson, one write per line,
    level filtering before any work): a connection storm logs two events per
    client, so the cost per event matters.
    """
    global _sink
    if _sink is None:
        _sink = LogSink.stdout(buffer_bytes)
        _sink.on_drained = _report_dropped
        _reserve_standard_fds()
    sink = _sink
    sink.limit = buffer_bytes
    tty = sink.fd is not None and os.isatty(sink.fd)
    as_json = fmt == "json" or (fmt == "auto" and not tty)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        _Timestamp(),
    ]
    if as_json:
        events_renderer: Any = structlog.processors.JSONRenderer(serializer=_json_bytes)
        stdlib_renderer: Any = structlog.processors.JSONRenderer(serializer=_json_str)
        lines: type[_Lines | _TextLines] = _Lines
    else:
        events_renderer = stdlib_renderer = structlog.dev.ConsoleRenderer(colors=tty)
        lines = _TextLines
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, events_renderer],
        logger_factory=lambda *_: lines(sink.write),
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
    handler = _SinkHandler(sink)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(LEVELS[level])
    # websockets logs every connection at INFO; we log our own connection events.
    logging.getLogger("websockets").setLevel(max(LEVELS[level], logging.WARNING))


def _reserve_standard_fds() -> None:
    """Put /dev/null on fds 0-2 where they are closed, so that no socket the daemon
    opens later lands there and receives what is meant for stdout or stderr."""
    for fd in range(3):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)


def _report_dropped(count: int) -> None:
    structlog.get_logger().warning(
        "log.dropped", logger="broadcastd.log", count=count, total=dropped_lines()
    )


def dropped_lines() -> int:
    """Log lines dropped since start because stdout was stuck beyond
    ``log.buffer_bytes`` or gone: the counter behind
    ``broadcastd_log_lines_dropped_total``."""
    return 0 if _sink is None else _sink.dropped


def flush(timeout: float = EXIT_FLUSH_TIMEOUT) -> None:
    """Write out held lines, waiting at most ``timeout`` seconds (at exit)."""
    if _sink is not None:
        _sink.close(timeout)


class _Timestamp:
    """``timestamp``: ISO 8601 in UTC to the millisecond, formatted once per
    millisecond. A connection storm logs thousands of events a second, and
    structlog's TimeStamper formats a datetime for each."""

    __slots__ = ("_ms", "_text")

    def __init__(self) -> None:
        self._ms = -1
        self._text = ""

    def __call__(self, _: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
        ms = int(time.time() * 1000)
        if ms != self._ms:
            seconds, millis = divmod(ms, 1000)
            self._ms = ms
            self._text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + (
                f".{millis:03d}Z"
            )
        event["timestamp"] = self._text
        return event


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
