"""One Redis pub/sub connection, read with hiredis on a plain asyncio Protocol.

Written for what the broker needs and redis-py's PubSub does not give plainly: a
connection that is either subscribed to every channel it was asked for or known
to be lost (never silently half-there), a future per SUBSCRIBE that resolves when
Redis confirms it (so a position read afterwards cannot miss a message), every
message of one read handed over in one call, and a close that the broker can
force when the probe says the connection is wedged.

A connection that has ended is freed by reference counting alone: it lets go
of its transport and its callback, and nothing it keeps (the futures it
resolved, the reason it ended) refers back to it through a traceback.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any, cast

import hiredis
from redis.connection import parse_url

from broadcastd.broker.commands import tls_context

OnMessages = Callable[[list[tuple[bytes, bytes]]], None]
"""Called with every (pub/sub channel, data) of one read, in order."""


def command(*args: bytes | str) -> bytes:
    """One command in RESP."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg.encode() if isinstance(arg, str) else arg
        parts.append(b"$%d\r\n%b\r\n" % (len(data), data))
    return b"".join(parts)


class PubSubConnection(asyncio.Protocol):
    """Subscriptions on one connection; ``lost`` resolves when it ends, for any reason."""

    def __init__(self, on_messages: OnMessages) -> None:
        self._on_messages = on_messages
        self._reader = hiredis.Reader()
        self._transport: asyncio.Transport | None = None
        self._confirming: dict[bytes, deque[asyncio.Future[None]]] = {}
        self._auth: asyncio.Future[None] | None = None
        self._out: list[bytes] = []
        """Commands of this turn of the loop, written together at its end: the
        SUBSCRIBEs and UNSUBSCRIBEs of a connection storm cost one write a turn."""
        self.lost: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()

    @classmethod
    async def open(cls, url: str, within: float, on_messages: OnMessages) -> PubSubConnection:
        """Connect and authenticate as ``url`` says (redis://, rediss://, unix://)."""
        options: dict[str, Any] = parse_url(url)  # type: ignore[no-untyped-call]
        loop = asyncio.get_running_loop()
        protocol = cls(on_messages)
        try:
            async with asyncio.timeout(within):
                if "path" in options:
                    await loop.create_unix_connection(lambda: protocol, options["path"])
                else:
                    tls = tls_context(options) if url[:9].lower() == "rediss://" else None
                    await loop.create_connection(
                        lambda: protocol,
                        options.get("host", "localhost"),
                        int(options.get("port", 6379)),
                        ssl=tls,
                    )
                password = options.get("password")
                if password is not None:
                    username = options.get("username")
                    await protocol._authenticate(
                        ("AUTH", username, password) if username else ("AUTH", password)
                    )
        except BaseException:
            protocol.close()  # refused or too slow: not left open, on Redis nor here
            raise
        return protocol

    async def _authenticate(self, args: tuple[str, ...]) -> None:
        self._auth = asyncio.get_running_loop().create_future()
        try:
            self._write(command(*args))
            await self._auth
        finally:
            self._auth = None

    def subscribe(self, channels: list[bytes]) -> list[asyncio.Future[None]]:
        """SUBSCRIBE; one future per channel, resolved when Redis confirms it."""
        loop = asyncio.get_running_loop()
        futures = []
        for channel in channels:
            future = loop.create_future()
            self._confirming.setdefault(channel, deque()).append(future)
            futures.append(future)
        if channels:
            self._write(command("SUBSCRIBE", *channels))
        return futures

    def unsubscribe(self, channels: list[bytes]) -> None:
        if channels:
            self._write(command("UNSUBSCRIBE", *channels))

    def close(self, reason: Exception | None = None) -> None:
        """End the connection (a probe found it wedged, or the broker closes)."""
        if not self.lost.done():
            self.lost.set_result(reason)
        self._on_messages = _ignore
        if self._transport is not None:
            self._transport.abort()

    def _write(self, data: bytes) -> None:
        if self._transport is None or self._transport.is_closing():
            raise ConnectionError("the pub/sub connection is closed")
        out = self._out
        out.append(data)
        if len(out) == 1:
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        out, self._out = self._out, []
        transport = self._transport
        if transport is not None and not transport.is_closing():  # else it is rebuilt
            transport.write(out[0] if len(out) == 1 else b"".join(out))

    # asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's: no subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._on_messages = _ignore
        # Those waiting get an exception of their own: raised where they wait, it
        # gets a traceback through their frames, which must not be reachable from
        # ``lost`` (whose result is ``exc``).
        failure = ConnectionError(
            "Redis closed the pub/sub connection"
            if exc is None
            else f"the pub/sub connection was lost: {type(exc).__name__}: {exc}"
        )
        for futures in self._confirming.values():
            for future in futures:
                if not future.done():
                    future.set_exception(failure)
        self._confirming.clear()
        if self._auth is not None and not self._auth.done():
            self._auth.set_exception(failure)
        if not self.lost.done():
            self.lost.set_result(exc)

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        on_messages = self._on_messages
        reader.feed(data)
        messages: list[tuple[bytes, bytes]] = []
        try:
            while (reply := reader.gets()) is not False:
                if type(reply) is list and reply[0] == b"message":
                    messages.append((reply[1], reply[2]))
                else:
                    self._control(reply)
        except Exception as exc:  # a protocol error: this connection is done for
            # Kept as the reason without its traceback (this frame, which holds self).
            self.close(exc.with_traceback(None))
        if messages:
            on_messages(messages)

    def _control(self, reply: Any) -> None:
        if isinstance(reply, hiredis.ReplyError):
            if self._auth is not None and not self._auth.done():
                self._auth.set_exception(ConnectionError(f"Redis refused AUTH: {reply}"))
                return
            raise ConnectionError(f"Redis error on the pub/sub connection: {reply}")
        if reply == b"OK" and self._auth is not None and not self._auth.done():
            self._auth.set_result(None)
        elif type(reply) is list and reply[0] == b"subscribe":
            waiting = self._confirming.get(reply[1])
            if waiting:
                future = waiting.popleft()
                if not waiting:
                    del self._confirming[reply[1]]
                if not future.done():
                    future.set_result(None)


def _ignore(messages: list[tuple[bytes, bytes]]) -> None:
    """The callback of a connection that has ended (it no longer holds the broker's)."""
