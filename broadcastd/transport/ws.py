"""The subscriber port: a websockets server around the core.

Per connection, websockets owns the handshake, the reads, the keepalive
ping/pong and the closing handshake; this adapter adds one reader loop (feeding
commands to the core Session) and one writer task (draining the core Outbox).
Every frame the server sends - messages and replies alike - goes through the
outbox, so a connection has exactly one stream of outgoing data frames.

The writer hands the pre-built frames straight to the transport: they were
encoded once per message (server frames are unmasked), and a whole wake-up's
worth goes out in one write. This is safe because each frame is written whole
in one call (nothing can interleave inside it), only while the protocol state
is OPEN (never after a close frame), and the writer waits whenever the
transport's buffer is above ``write_limit``. With compression negotiated the
writer falls back to websockets' own send path.
"""

from __future__ import annotations

import asyncio
import http
import struct
import time
from collections.abc import Callable
from typing import Any, cast

import orjson
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.protocol import State

from broadcastd import log
from broadcastd.core.envelope import frame_payload, missed_frame
from broadcastd.core.observer import NullObserver, Observer
from broadcastd.core.outbox import Outbox
from broadcastd.core.route import Route, parse_route
from broadcastd.core.session import Session
from broadcastd.errors import ClientError, CloseReason
from broadcastd.node import Node
from broadcastd.settings import WebSocketSettings

_log = log.get("broadcastd.ws")
_throttle = log.Throttle(per_second=10)
"""Floods of identical warnings (thousands of slow consumers at once) are summarised."""
OPEN = State.OPEN
BACKLOG = 2048
_PING_STAMP = struct.Struct("!d")


class _Connection(ServerConnection):
    """A websockets connection that remembers what its handshake asked for and
    reports what websockets decides on its own (refused handshakes, pong times)."""

    route: Route | None = None
    reject_reason: str | None = None
    observer: Observer = NullObserver()
    draining: Callable[[], bool] = staticmethod(lambda: False)

    async def handshake(self, *args: Any, **kwargs: Any) -> None:
        try:
            await super().handshake(*args, **kwargs)
        except asyncio.CancelledError:
            # open_timeout expired (or the server is going away) mid-handshake.
            self.observer.connection_rejected(
                "draining" if self.draining() else "handshake_timeout"
            )
            raise
        response = self.response
        if response is not None and response.status_code != http.HTTPStatus.SWITCHING_PROTOCOLS:
            reason = self.reject_reason
            if reason is None:  # refused by websockets itself, or by its server closing
                reason = "draining" if self.draining() else "bad_request"
            self.observer.connection_rejected(reason)

    async def ping(self, data: Any = None) -> Any:
        # Keepalive pings carry their send time: the pong returns it, so the
        # round trip is measured with a fine clock at no cost per connection
        # (the loop's clock may tick in milliseconds, too coarse for loopback).
        if data is None:
            data = _PING_STAMP.pack(time.monotonic())
        return await super().ping(data)

    def acknowledge_pings(self, data: bytes) -> None:
        solicited = data in self.pending_pings
        super().acknowledge_pings(data)
        if solicited and len(data) == _PING_STAMP.size:
            self.observer.ping_rtt(time.monotonic() - _PING_STAMP.unpack(data)[0])


class _Writer:
    """The one task that writes to one connection."""

    __slots__ = ("conn", "frames_sent", "node", "outbox", "queued_at", "raw", "waiter")

    def __init__(self, conn: _Connection, outbox: Outbox, node: Node, raw: bool) -> None:
        self.conn = conn
        self.outbox = outbox
        self.node = node
        self.raw = raw
        self.waiter: asyncio.Future[None] | None = None
        self.frames_sent = 0
        self.queued_at = 0.0
        """When the oldest frame now queued was published (or queued, for replies)."""
        outbox.wake = self.wake

    def wake(self) -> None:
        """Called by the outbox when it stops being empty, or closes."""
        since = self.node.publishing_since
        self.queued_at = since if since is not None else self.node.clock()
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def run(self, close_timeout: float) -> None:
        conn = self.conn
        outbox = self.outbox
        observer = self.node.observer
        clock = self.node.clock
        transport = conn.transport
        compressed = bool(conn.protocol.extensions)
        loop = asyncio.get_running_loop()
        while True:
            if len(outbox):
                queued_at = self.queued_at
                missed = outbox.take_missed() if outbox.missed else 0
                frames = outbox.take()
                if conn.protocol.state is not OPEN:
                    break
                if missed:
                    self._report_missed(missed, frames)
                if compressed:
                    for frame in frames:
                        await conn.send(frame_payload(frame), text=True)
                    nbytes = sum(map(len, frames))
                else:
                    data = frames[0] if len(frames) == 1 else b"".join(frames)
                    transport.write(data)
                    nbytes = len(data)
                self.frames_sent += len(frames)
                observer.written(len(frames), nbytes, clock() - queued_at)
                if conn.paused:
                    await conn.drain()
                continue
            if outbox.closed is not None:
                break
            self.waiter = loop.create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        reason = outbox.closed
        if reason is not None and conn.protocol.state is OPEN:
            # The peer may not be reading at all (a slow consumer): bound the
            # closing handshake, then cut the TCP connection.
            try:
                async with asyncio.timeout(close_timeout):
                    await conn.close(reason.code, reason.reason)
            except TimeoutError:
                transport.abort()

    def _report_missed(self, missed: int, frames: list[bytes]) -> None:
        observer = self.node.observer
        observer.dropped("drop_oldest", missed)
        observer.slow_consumer("drop_oldest")
        if not self.raw:
            frames.insert(0, missed_frame(missed))
        if _throttle.allow("slow_consumer.drop"):
            _log.warning(
                "slow_consumer.drop",
                client=self.conn.id.hex,
                missed=missed,
                suppressed=_throttle.suppressed("slow_consumer.drop"),
            )


class WsServer:
    """Accepts subscribers and runs their reader loops and writer tasks."""

    def __init__(self, settings: WebSocketSettings, node: Node) -> None:
        self.settings = settings
        self.node = node
        self._server: Server | None = None
        self._sessions: dict[Session, _Connection] = {}
        self._connection_class = cast(
            type[_Connection],
            type(
                "Connection",
                (_Connection,),
                {
                    "observer": node.observer,
                    "draining": staticmethod(lambda: node.draining),
                },
            ),
        )

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def client_count(self) -> int:
        return len(self._sessions)

    def sessions(self) -> list[Session]:
        return list(self._sessions)

    def connections(self) -> list[tuple[Session, ServerConnection]]:
        return list(self._sessions.items())

    async def start(self) -> None:
        s = self.settings
        self._server = await serve(
            self._handle,
            s.host,
            s.port,
            process_request=self._process_request,
            create_connection=self._connection_class,
            compression="deflate" if s.compression else None,
            max_size=s.max_message_bytes,
            max_queue=s.inbound_queue,
            write_limit=s.write_limit,
            open_timeout=s.open_timeout,
            ping_interval=s.ping_interval,
            ping_timeout=s.ping_timeout,
            close_timeout=s.close_timeout,
            server_header="broadcastd",
            backlog=BACKLOG,
        )

    def stop_accepting(self) -> None:
        """Close the listening socket; handshakes already under way get HTTP 503."""
        if self._server is not None:
            self._server.close(close_connections=False)

    async def drain(self, deadline: float) -> int:
        """Flush every outbox, close each connection with 1001; abort what remains
        at loop time ``deadline``. Returns how many connections had to be aborted."""
        for session in list(self._sessions):
            session.outbox.close(CloseReason.SHUTDOWN)
        aborted = 0
        server = self._server
        if server is None:
            return 0
        try:
            async with asyncio.timeout_at(deadline):
                await server.wait_closed()
        except TimeoutError:
            for conn in list(self._sessions.values()):
                conn.transport.abort()
                aborted += 1
            for task in list(server.handler_tasks):  # handshakes that never finished
                task.cancel()
            await server.wait_closed()
        return aborted

    # Handshake

    def _process_request(self, conn: ServerConnection, request: Request) -> Response | None:
        assert isinstance(conn, _Connection)
        s = self.settings
        if self.node.draining:
            conn.reject_reason = "draining"
            return _refusal(
                http.HTTPStatus.SERVICE_UNAVAILABLE, "draining", "the server is shutting down"
            )
        if len(self._sessions) >= s.max_clients:
            conn.reject_reason = "cap"
            return _refusal(
                http.HTTPStatus.SERVICE_UNAVAILABLE,
                "cap",
                "the server has reached its connection limit",
            )
        if s.allowed_origins is not None:
            origin = request.headers.get("Origin")
            if origin is not None and origin not in s.allowed_origins:
                conn.reject_reason = "origin"
                return _refusal(http.HTTPStatus.FORBIDDEN, "origin", "origin not allowed")
        try:
            route = parse_route(request.path, s.max_channels_per_client)
        except ClientError as exc:
            conn.reject_reason = "bad_request"
            return _refusal(http.HTTPStatus.BAD_REQUEST, exc.code, exc.message)
        conn.route = route
        return None

    # Connection

    async def _handle(self, conn: ServerConnection) -> None:
        assert isinstance(conn, _Connection)
        assert conn.route is not None
        route = conn.route
        s = self.settings
        node = self.node
        outbox = Outbox(s.outbox_messages, s.outbox_bytes, s.slow_consumer_policy)
        session = Session(
            conn.id.hex,
            node.hub,
            outbox,
            raw=route.raw,
            max_channels=s.max_channels_per_client,
            max_errors=s.max_command_errors,
        )
        writer = _Writer(conn, outbox, node, route.raw)
        writer_task = asyncio.get_running_loop().create_task(writer.run(s.close_timeout))
        self._sessions[session] = conn
        started = time.monotonic()
        if node.draining:
            outbox.close(CloseReason.SHUTDOWN)
        session.open(list(route.channels))
        node.observer.connection_opened()
        _log.info(
            "connection.open",
            client=session.id,
            remote=_address(conn),
            channels=list(route.channels),
            format="raw" if route.raw else "json",
        )
        close: CloseReason | None = None
        try:
            async for message in conn:
                if not isinstance(message, str):
                    close = CloseReason.UNSUPPORTED_DATA
                    break
                close = session.handle(message)
                if close is not None:
                    break
        except ConnectionClosed:
            pass
        finally:
            channels = list(session.channels)
            session.close()
            if close is not None:
                outbox.close(close)
            elif outbox.closed is None:
                writer_task.cancel()  # the peer closed or vanished: nothing left to write
            await asyncio.wait([writer_task])
            if not writer_task.cancelled() and writer_task.exception() is not None:
                _log.error("writer.failed", client=session.id, exc_info=writer_task.exception())
                conn.transport.abort()
            await conn.wait_closed()
            del self._sessions[session]
            code, reason, initiator = _how_closed(conn, outbox)
            observer = node.observer
            observer.connection_closed(code, initiator)
            if outbox.missed:
                observer.dropped("drop_oldest", outbox.missed)
            if outbox.closed is CloseReason.SLOW_CONSUMER:
                observer.slow_consumer("disconnect")
                observer.dropped("slow_consumer", outbox.discarded)
                if _throttle.allow("slow_consumer.disconnect"):
                    _log.warning(
                        "slow_consumer.disconnect",
                        client=session.id,
                        discarded=outbox.discarded,
                        suppressed=_throttle.suppressed("slow_consumer.disconnect"),
                    )
            _log.info(
                "connection.close",
                client=session.id,
                remote=_address(conn),
                channels=channels,
                code=code,
                reason=reason,
                initiator=initiator,
                messages_sent=writer.frames_sent,
                duration_s=round(time.monotonic() - started, 3),
            )


def _refusal(status: http.HTTPStatus, code: str, message: str) -> Response:
    """A handshake refusal with the same JSON error body as the control port."""
    body = orjson.dumps({"error": {"code": code, "message": message}})
    headers = Headers(
        [
            ("Connection", "close"),
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(body))),
        ]
    )
    if status is http.HTTPStatus.SERVICE_UNAVAILABLE:
        headers["Retry-After"] = "5"
    return Response(status.value, status.phrase, headers, body)


def _address(conn: ServerConnection) -> str:
    peer: Any = conn.remote_address
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer)


def _how_closed(conn: ServerConnection, outbox: Outbox) -> tuple[int, str, str]:
    """Close code, reason and initiator (server / client / abnormal) of a closed connection."""
    protocol = conn.protocol
    if protocol.close_sent is not None and protocol.close_rcvd_then_sent is False:
        return protocol.close_sent.code, protocol.close_sent.reason, "server"
    if protocol.close_rcvd is not None:
        return protocol.close_rcvd.code, protocol.close_rcvd.reason, "client"
    if protocol.close_sent is not None:
        return protocol.close_sent.code, protocol.close_sent.reason, "server"
    if outbox.closed is not None:
        return outbox.closed.code, outbox.closed.reason, "server"
    return CloseReason.ABNORMAL.code, CloseReason.ABNORMAL.reason, "abnormal"
