"""Commands to one Redis server, pipelined by themselves, read with hiredis.

The Redis broker's cost is the node's CPU per publish, and a general-purpose
client spends most of it on per-command machinery (a connection taken from a
pool and given back, a parser object per reply, a pipeline object per batch).
This connection does only what the broker needs:

- every call made in one turn of the event loop (the publishes of one batch, the
  position reads of a subscribe storm) is appended to one output buffer, and the
  whole buffer leaves in one ``transport.write`` at the start of the next turn:
  pipelining without asking for it;
- replies are parsed by one ``hiredis.Reader`` and resolve the waiting futures in
  the order the commands were sent, which is the order Redis answers them;
- a reply error fails its own call only (``CommandError``); a lost connection or a
  missed deadline fails every call waiting on it (``ConnectionLost``,
  ``CommandTimeout``) and the connection is over: the owner opens another;
- the deadline judges Redis by its replies, not by how late a busy event loop
  reads them: a call times out only when Redis has sent nothing for
  ``call_timeout`` seconds while calls wait (it answers in order, so any reply
  is progress), and only after the sockets were read once more (a timer can fire
  before the reads of its loop turn: a storm of the node's own clients must not
  make it take a healthy Redis for a silent one);
- at most ``max_in_flight`` calls are sent and unanswered; beyond that, calls
  wait in order for replies to make room, and while the transport asks for a
  pause the output stays here (bounded by the same cap) instead of in its buffer.

Its life: ``await CommandConnection.open(url, within, call_timeout=...)``; then
``call`` and ``script``, from the event loop's thread, from coroutines or plain
callbacks (they never block and never await), as long as ``closed`` is false
(after, they raise ConnectionLost at once); ``lost`` resolves when it ends, for
any reason, and ``close()`` ends it at any time. It never reconnects: its owner
opens a new one.

A connection that has ended is freed by reference counting alone: it lets go of
its transport and its deadline timer, and keeps no exception (so no traceback
through the frames of those that called it).
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar, cast, overload

import hiredis
from redis.connection import parse_url
from redis.exceptions import ResponseError

Arg = bytes | str | int | float | memoryview
"""What a command's arguments may be (``bool`` and ``None`` are refused: Redis
has neither, and the broker never means to send one)."""

DEFAULT_MAX_IN_FLIGHT = 4096
"""Calls sent and not yet answered, at most, unless ``open`` is told otherwise."""

_pack = cast(Callable[[tuple[Arg, ...]], bytes], hiredis.pack_command)
"""RESP of a command, in C (its stub types the tuple as of one item)."""
_ReplyError = hiredis.ReplyError


class Answer(Protocol):
    """Where a reply goes: an asyncio Future, or anything set the same way."""

    def done(self) -> bool: ...

    def set_result(self, result: Any, /) -> None: ...

    def set_exception(self, exception: BaseException, /) -> None: ...


A = TypeVar("A", bound=Answer)
_Retry = tuple[Arg, Arg, Sequence[Arg], Sequence[Arg]]
"""(sha, source, keys, args) of a script call, to send it again as EVAL."""
_Entry = tuple["Answer | None", "_Retry | None", list[float]]
"""A call sent (or in this turn's buffer): its future (None for a SCRIPT LOAD
whose reply nobody needs), how to retry it, and its turn's deadline (``_now``)
(one list shared by the calls of a turn: set when they are called, and set again
when they are written)."""
_Held = tuple["Answer", bytes, "_Retry | None"]
"""A call waiting for room: its future, its command, how to retry it."""

_now = time.monotonic
"""The clock of deadlines: read fresh, not the event loop's time, which uvloop
keeps from the start of a loop turn (a turn busy for a second would count the
calls it writes at its end as a second old)."""

_CERT_REQS = {
    "none": ssl.CERT_NONE,
    "optional": ssl.CERT_OPTIONAL,
    "required": ssl.CERT_REQUIRED,
}


class CommandError(ResponseError):
    """Redis answered this call with an error; the connection goes on.

    A ``ResponseError`` (a ``RedisError``), so that callers which catch redis-py's
    errors catch it too. ``code`` is the error's first word (``ERR``, ``BUSY``,
    ``WRONGTYPE``, ``NOSCRIPT``...)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.code = message.partition(" ")[0]


class ConnectionLost(ConnectionError):
    """The connection ended before this call was answered (or had ended when it
    was made). A call that was sent may or may not have run."""


class CommandTimeout(TimeoutError):
    """A call was not answered within the connection's deadline. Redis answers in
    order, so every call behind it was late too: all of them fail with this, and
    the connection is closed (a reply arriving later would be taken for the
    answer to another call)."""


class HandshakeRefused(ConnectionError):
    """Redis refused AUTH or SELECT while the connection was being opened."""


def tls_context(options: dict[str, Any]) -> ssl.SSLContext:
    """The TLS context of a ``rediss://`` URL, from the query options redis-py's
    ``parse_url`` leaves in ``options``: ``ssl_ca_certs`` (a CA file trusted
    instead of the system's), ``ssl_cert_reqs`` (``none``, ``optional`` or
    ``required``, the default), ``ssl_check_hostname``, and ``ssl_certfile`` with
    ``ssl_keyfile`` (a client certificate, for ``tls-auth-clients yes``)."""
    context = ssl.create_default_context(cafile=options.get("ssl_ca_certs"))
    reqs = str(options.get("ssl_cert_reqs", "required")).lower()
    if reqs not in _CERT_REQS:
        raise ValueError(
            f"ssl_cert_reqs in the Redis URL must be none, optional or required, not {reqs!r}"
        )
    check_hostname = options.get("ssl_check_hostname")
    context.check_hostname = reqs != "none" and check_hostname is not False
    context.verify_mode = _CERT_REQS[reqs]
    certfile = options.get("ssl_certfile")
    if certfile is not None:
        context.load_cert_chain(certfile, options.get("ssl_keyfile"))
    return context


class CommandConnection(asyncio.Protocol):
    """One connection to one Redis server, for commands (not pub/sub).

    Open it with ``open``; call ``call`` and ``script`` from the event loop's
    thread, as often as wanted, until ``closed``; ``lost`` resolves when it ends.
    """

    def __init__(
        self, *, call_timeout: float | None = None, max_in_flight: int = DEFAULT_MAX_IN_FLIGHT
    ) -> None:
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self._loop = asyncio.get_running_loop()
        self._reader = hiredis.Reader()
        self._transport: asyncio.Transport | None = None
        self._out: list[bytes] = []
        """Commands of this turn, written together by ``_flush``."""
        self._waiting: deque[_Entry] = deque()
        """Calls sent or in ``_out``, in the order Redis will answer them."""
        self._held: deque[_Held] = deque()
        """Calls waiting for room under ``max_in_flight``, in order."""
        self._loaded: set[Arg] = set()
        """Scripts (by sha) loaded on this connection."""
        self._flush_scheduled = False
        self._paused = False
        self._ended: str | None = None
        """Why the connection ended, once it has (a message, never an exception)."""
        self._timer: asyncio.TimerHandle | None = None
        self._turn_deadline: list[float] = [0.0]
        self._unwritten: list[list[float]] = []
        """The deadlines of turns not written yet: they run from the write."""
        self._last_read = 0.0
        """When Redis last sent something (``_now``)."""
        self._max_in_flight = max_in_flight
        self._timeout = call_timeout
        self.lost: asyncio.Future[Exception | None] = self._loop.create_future()
        """Resolves when the connection ends: with None after ``close()``, else with
        an exception (never raised) that says why."""

    @classmethod
    async def open(
        cls,
        url: str,
        within: float,
        *,
        call_timeout: float | None = None,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    ) -> CommandConnection:
        """Connect as ``url`` says (``redis://``, ``rediss://``, ``unix://``), then
        AUTH (user and password from the URL) and SELECT (its db), all within
        ``within`` seconds.

        Raises OSError (refused, unreachable), TimeoutError (``within`` passed),
        HandshakeRefused (AUTH or SELECT refused) or ValueError (a bad URL); the
        connection is closed then, on Redis and here.
        """
        options: dict[str, Any] = parse_url(url)  # type: ignore[no-untyped-call]
        if url[:7].lower() == "unix://" and "path" not in options:
            raise ValueError("a unix:// Redis URL needs the socket's path")
        tls = tls_context(options) if url[:9].lower() == "rediss://" else None
        loop = asyncio.get_running_loop()
        connection = cls(call_timeout=call_timeout, max_in_flight=max_in_flight)
        try:
            async with asyncio.timeout(within):
                if "path" in options:
                    await loop.create_unix_connection(lambda: connection, options["path"])
                else:
                    await loop.create_connection(
                        lambda: connection,
                        options.get("host", "localhost"),
                        int(options.get("port", 6379)),
                        ssl=tls,
                    )
                await connection._handshake(options)
        except BaseException:
            connection.close()  # refused or too slow: not left open, on Redis nor here
            raise
        return connection

    async def _handshake(self, options: dict[str, Any]) -> None:
        steps: list[tuple[str, tuple[Arg, ...]]] = []
        password = options.get("password")
        if password is not None:
            username = options.get("username")
            steps.append(("AUTH", ("AUTH", username, password) if username else ("AUTH", password)))
        db = int(options.get("db") or 0)
        if db:
            steps.append(("SELECT", ("SELECT", db)))
        if not steps:
            return
        # Sent together; every reply is collected (none is left unretrieved), and
        # what is raised is made here, so no local of this frame holds it.
        replies = await asyncio.gather(
            *(self.call(*args) for _, args in steps), return_exceptions=True
        )
        refused = lost = ""
        for (name, _), reply in zip(steps, replies, strict=True):
            if isinstance(reply, CommandError):
                refused = refused or f"Redis refused {name}: {reply}"
            elif isinstance(reply, BaseException):
                lost = lost or str(reply)
        del replies
        if lost:
            raise ConnectionLost(lost)
        if refused:
            raise HandshakeRefused(refused)

    # Calls

    def call(self, *args: Arg) -> asyncio.Future[Any]:
        """Send one command (in this turn's write); its future resolves with the reply.

        Raises at once ConnectionLost if the connection has ended, TypeError for an
        argument that is not bytes, str, int, float or memoryview, ValueError for
        no arguments (nothing is sent then). The future fails with CommandError
        (Redis refused this command), ConnectionLost or CommandTimeout.
        Cancelling it only stops the wait: a command already sent still runs.
        """
        if self._ended is not None:
            raise ConnectionLost(self._ended)
        if not args:
            raise ValueError("a Redis command needs at least its name")
        command: bytes = _pack(args)
        future = self._loop.create_future()
        if self._held or len(self._waiting) >= self._max_in_flight:
            self._held.append((future, command, None))
        else:
            self._send(command, future, None)
        return future

    @overload
    def script(
        self, sha: Arg, source: Arg, keys: Sequence[Arg], args: Sequence[Arg]
    ) -> asyncio.Future[Any]: ...

    @overload
    def script(
        self, sha: Arg, source: Arg, keys: Sequence[Arg], args: Sequence[Arg], into: A
    ) -> A: ...

    def script(
        self,
        sha: Arg,
        source: Arg,
        keys: Sequence[Arg],
        args: Sequence[Arg],
        into: Answer | None = None,
    ) -> Answer:
        """EVALSHA of the Lua script ``source`` (whose SHA1 in hex is ``sha``).

        The script is loaded once per connection (SCRIPT LOAD, in the same write as
        its first call); if Redis has lost it since (SCRIPT FLUSH, a restart behind
        a proxy), the call is sent again as EVAL, after the calls already sent.
        ``keys`` and ``args`` are read again then: do not change them until the
        future is done. Errors as for ``call``. The reply goes to ``into`` if
        given (a ``broadcastd.later.Later``, whose steps run as the reply is
        read), else to a new future.
        """
        if self._ended is not None:
            raise ConnectionLost(self._ended)
        command: bytes = _pack(("EVALSHA", sha, len(keys), *keys, *args))
        future = self._loop.create_future() if into is None else into
        retry = (sha, source, keys, args)
        if self._held or len(self._waiting) >= self._max_in_flight:
            self._held.append((future, command, retry))
            return future
        if sha not in self._loaded:
            self._load(sha, source)
        self._send(command, future, retry)
        return future

    @property
    def max_in_flight(self) -> int:
        """Calls sent and unanswered, at most (SCRIPT LOADs and retries aside)."""
        return self._max_in_flight

    @max_in_flight.setter
    def max_in_flight(self, value: int) -> None:
        if value < 1:
            raise ValueError("max_in_flight must be at least 1")
        self._max_in_flight = value
        if self._held and self._ended is None:
            self._release()

    @property
    def call_timeout(self) -> float | None:
        """Seconds a call may wait for its reply once sent (None: no deadline)."""
        return self._timeout

    @property
    def in_flight(self) -> int:
        """Calls sent (or in this turn's write) and not yet answered."""
        return len(self._waiting)

    @property
    def waiting_for_room(self) -> int:
        """Calls not sent yet because ``max_in_flight`` are."""
        return len(self._held)

    @property
    def closed(self) -> bool:
        """The connection has ended: every call raises ConnectionLost."""
        return self._ended is not None

    def close(self) -> None:
        """End the connection now: every call waiting fails with ConnectionLost.

        Safe to call at any time, more than once."""
        self._end(ConnectionLost, "the Redis connection was closed", None)

    def _send(self, command: bytes, future: Answer | None, retry: _Retry | None) -> None:
        self._out.append(command)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop = self._loop
            loop.call_soon(self._flush)
            if self._timeout is not None:
                self._turn_deadline = [_now() + self._timeout]
                self._unwritten.append(self._turn_deadline)
                if self._timer is None:
                    self._timer = loop.call_later(self._timeout, self._check_deadline)
        self._waiting.append((future, retry, self._turn_deadline))

    def _load(self, sha: Arg, source: Arg) -> None:
        self._loaded.add(sha)
        self._send(_pack(("SCRIPT", "LOAD", source)), None, None)

    def _release(self) -> None:
        """Send held calls, in order, while there is room."""
        held = self._held
        waiting = self._waiting
        cap = self._max_in_flight
        while held and len(waiting) < cap:
            future, command, retry = held.popleft()
            if future.done():
                continue  # its caller gave up: never sent
            if retry is not None and retry[0] not in self._loaded:
                self._load(retry[0], retry[1])
            self._send(command, future, retry)

    def _flush(self) -> None:
        self._flush_scheduled = False
        out = self._out
        transport = self._transport
        if not out or transport is None or self._paused:
            return  # resume_writing flushes
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        if self._timeout is not None:
            # Redis is judged from the moment it was asked: a loop busy before it
            # wrote the calls (a storm of the node's own clients) is not Redis's delay.
            written = _now() + self._timeout
            for turn in self._unwritten:
                turn[0] = written
            self._unwritten.clear()
        try:
            transport.write(data)
        except Exception as exc:  # in a loop callback: never let it escape
            self._end(
                ConnectionLost,
                f"the connection to Redis failed: {type(exc).__name__}: {exc}",
                ConnectionLost,
            )

    def _check_deadline(self, confirming: bool = False) -> None:
        self._timer = None
        if not self._waiting or self._ended is not None or self._timeout is None:
            return
        # Any reply since the oldest call was written is progress: the deadline runs
        # from the last thing Redis sent.
        deadline = max(self._waiting[0][2][0], self._last_read + self._timeout)
        # Timers may fire a little early (uvloop's are in milliseconds).
        left = deadline - _now()
        if left > 0.001:
            self._timer = self._loop.call_later(left, self._check_deadline)
        elif not confirming:
            # Judged again once the loop has written what waits and read the
            # sockets: a timer due now runs before this turn's writes and reads,
            # one a millisecond out after them.
            self._timer = self._loop.call_later(0.001, self._check_deadline, True)
        else:
            self._end(
                CommandTimeout,
                f"Redis did not answer within {self._timeout} s; the connection is closed",
                CommandTimeout,
            )

    def _end(
        self,
        kind: type[Exception],
        message: str,
        reason: type[Exception] | None,
    ) -> None:
        """Fail every call waiting with its own ``kind(message)``, resolve ``lost``
        with ``reason(message)`` (or None), drop the transport."""
        if self._ended is not None:
            return
        self._ended = message
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        waiting, self._waiting = self._waiting, deque()
        held, self._held = self._held, deque()
        self._out.clear()
        for future, _, _ in waiting:
            if future is not None and not future.done():
                future.set_exception(kind(message))
        for future, _, _ in held:
            if not future.done():
                future.set_exception(kind(message))
        if not self.lost.done():
            self.lost.set_result(None if reason is None else reason(message))
        transport, self._transport = self._transport, None
        if transport is not None:
            transport.abort()

    # asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's: no subclass
        if self._out and not self._flush_scheduled:
            self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._end(
            ConnectionLost,
            "Redis closed the connection"
            if exc is None
            else f"the connection to Redis was lost: {type(exc).__name__}: {exc}",
            ConnectionLost,
        )

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._flush()

    def data_received(self, data: bytes) -> None:
        if self._ended is not None:
            return
        self._last_read = _now()
        reader = self._reader
        reader.feed(data)
        waiting = self._waiting
        try:
            while (reply := reader.gets()) is not False:
                future, retry, _ = waiting.popleft()
                if future is None or future.done():
                    continue  # a SCRIPT LOAD, or a call whose caller gave up
                if type(reply) is _ReplyError:
                    message = str(reply)
                    if retry is not None and message.startswith("NOSCRIPT"):
                        sha, source, keys, args = retry
                        self._loaded.discard(sha)
                        self._send(_pack(("EVAL", source, len(keys), *keys, *args)), future, None)
                    else:
                        future.set_exception(CommandError(message))
                else:
                    future.set_result(reply)
        except Exception as exc:  # not RESP, or a reply nobody asked for: out of step
            self._end(
                ConnectionLost,
                f"the Redis connection is out of step: {type(exc).__name__}: {exc}",
                ConnectionLost,
            )
            return
        if self._held:
            self._release()
