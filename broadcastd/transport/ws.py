"""The subscriber port: websockets' sans-I/O protocol on a bare asyncio Protocol.

websockets' ``ServerProtocol`` does everything RFC 6455 asks - the opening
handshake, frame parsing with masking and size limits, automatic pongs, the
closing handshake, the close codes for protocol errors - without I/O. This
adapter feeds it the socket's bytes and writes out what it produces; it holds
no per-connection task, so an idle subscriber costs a few kilobytes, not the
tens that a task-per-connection design spends on coroutine frames.

Reads: ``data_received`` parses and handles every command at once (nothing
queues inbound beyond the one frame being parsed, at most
``ws.max_message_bytes``); replies go into the client's outbox like messages,
so the client sees one ordered stream.

Writes: every frame for a client waits in its core Outbox. The first frame
queued for an idle client puts it on the server's flush list; one callback per
event-loop iteration then writes each listed client's whole queue in a single
write. That is the writer of each connection: one place writes, everything
queued in a wake-up goes out together, and a fan-out of one message to a
thousand clients costs a thousand list appends, not a thousand task wake-ups.
Frames were encoded once per message (server frames are unmasked, so the same
bytes suit every client); they are written only while the protocol is OPEN, and
never while the transport is above ``ws.write_limit`` (the client's outbox
absorbs the difference until the slow-consumer policy acts). With compression
negotiated, frames go through the protocol instead, compressed per client.

Timers, not tasks: one TimerHandle per connection serves, in turn, the opening
handshake timeout, the keepalive ping interval (websockets' ping frames; the
pong echoes the send time, so the round trip needs no state), the pong timeout
and the closing-handshake timeout.
"""

from __future__ import annotations

import asyncio
import http
import logging
import struct
import time
from collections.abc import Callable
from typing import Any, cast

import orjson
from websockets.datastructures import Headers
from websockets.extensions.base import ServerExtensionFactory
from websockets.extensions.permessage_deflate import enable_server_permessage_deflate
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import SEND_EOF, State
from websockets.server import ServerProtocol

from broadcastd import log
from broadcastd.core.envelope import frame_payload, missed_frame
from broadcastd.core.outbox import Outbox
from broadcastd.core.route import Route, parse_route
from broadcastd.core.session import Session
from broadcastd.errors import ClientError, CloseReason
from broadcastd.node import Node
from broadcastd.settings import WebSocketSettings

_log = log.get("broadcastd.ws")
_throttle = log.Throttle(per_second=10)
"""Floods of identical warnings (thousands of slow consumers at once) are summarised."""
_protocol_log = logging.getLogger("websockets.server")
OPEN = State.OPEN
TEXT, CONT, BINARY, PONG = Opcode.TEXT, Opcode.CONT, Opcode.BINARY, Opcode.PONG
BACKLOG = 4096
_PING_STAMP = struct.Struct("!d")


class WsServer:
    """Accepts subscribers; keeps the flush list; drains."""

    def __init__(self, settings: WebSocketSettings, node: Node) -> None:
        self.settings = settings
        self.node = node
        self.extensions: list[ServerExtensionFactory] | None = (
            list(enable_server_permessage_deflate(None)) if settings.compression else None
        )
        self._server: asyncio.AbstractServer | None = None
        self._open: dict[Session, Connection] = {}
        self._all: set[Connection] = set()
        self._dirty: list[Connection] = []
        self._pass_since = 0.0
        self.pass_bytes = 0
        """Bytes written in the current pass of the writers (the writers add to it)."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._gone: asyncio.Event | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = cast(asyncio.Server, self._server).sockets[0].getsockname()[1]
        return port

    @property
    def client_count(self) -> int:
        return len(self._open)

    def connections(self) -> list[tuple[Session, Connection]]:
        return list(self._open.items())

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        s = self.settings
        self._server = await self._loop.create_server(
            lambda: Connection(self), s.host, s.port, backlog=BACKLOG
        )

    def stop_accepting(self) -> None:
        """Close the listening socket; handshakes already under way get HTTP 503."""
        if self._server is not None:
            self._server.close()

    async def drain(self, deadline: float) -> int:
        """Flush every outbox, close each connection with 1001; abort what remains
        at loop time ``deadline``. Returns how many connections had to be aborted."""
        self._gone = asyncio.Event()
        for session in list(self._open):
            session.outbox.close(CloseReason.SHUTDOWN)
        aborted = 0
        if self._all:
            try:
                async with asyncio.timeout_at(deadline):
                    await self._gone.wait()
            except TimeoutError:
                for conn in list(self._all):
                    if conn.session is not None:
                        aborted += 1
                    conn.abort()
                async with asyncio.timeout(1.0):
                    await self._gone.wait()
        if self._server is not None:
            await self._server.wait_closed()
        return aborted

    # Connections report here

    def schedule_flush(self, conn: Connection) -> None:
        if not self._dirty:
            since = self.node.publishing_since
            self._pass_since = since if since is not None else self.node.clock()
            assert self._loop is not None
            self._loop.call_soon(self._flush)
        self._dirty.append(conn)

    def _flush(self) -> None:
        """One pass of the writers: every client that has frames queued gets one write.

        Metrics are reported once per pass; its delivery latency is that of the
        oldest frame written in it (the first queued, the last written).
        """
        dirty, self._dirty = self._dirty, []
        self.pass_bytes = 0
        frames = 0
        for conn in dirty:
            frames += conn.flush()
        if frames:
            self.node.observer.written(
                frames, self.pass_bytes, len(dirty), self.node.clock() - self._pass_since
            )

    def check(self, conn: Connection, request: Request) -> Response | None:
        """Admission: a refusal, or None (and the route stored on ``conn``)."""
        s = self.settings
        if self.node.draining:
            conn.reject_reason = "draining"
            return _refusal(
                http.HTTPStatus.SERVICE_UNAVAILABLE, "draining", "the server is shutting down"
            )
        if len(self._open) >= s.max_clients:
            conn.reject_reason = "cap"
            return _refusal(
                http.HTTPStatus.SERVICE_UNAVAILABLE, "cap", "the server is at its connection limit"
            )
        if s.allowed_origins is not None:
            origin = request.headers.get("Origin")
            if origin is not None and origin not in s.allowed_origins:
                conn.reject_reason = "origin"
                return _refusal(http.HTTPStatus.FORBIDDEN, "origin", "origin not allowed")
        try:
            conn.route = parse_route(request.path, s.max_channels_per_client)
        except ClientError as exc:
            conn.reject_reason = "bad_request"
            return _refusal(http.HTTPStatus.BAD_REQUEST, exc.code, exc.message)
        return None

    def connected(self, conn: Connection) -> None:
        self._all.add(conn)

    def opened(self, conn: Connection, session: Session) -> None:
        self._open[session] = conn

    def closed(self, conn: Connection) -> None:
        self._all.discard(conn)
        if conn.session is not None:
            self._open.pop(conn.session, None)
        if not self._all and self._gone is not None:
            self._gone.set()


class Connection(asyncio.Protocol):
    """One subscriber connection: its protocol state, its session, its writer."""

    __slots__ = (
        "_fragments",
        "_ping_sent",
        "closing",
        "compressed",
        "dirty",
        "frames_sent",
        "open",
        "outbox",
        "paused",
        "protocol",
        "reject_reason",
        "remote",
        "route",
        "server",
        "session",
        "started",
        "timer",
        "transport",
    )

    def __init__(self, server: WsServer) -> None:
        self.server = server
        self.protocol = ServerProtocol(
            extensions=server.extensions,
            max_size=server.settings.max_message_bytes,
            logger=_protocol_log,
        )
        self.transport: asyncio.Transport | None = None
        self.session: Session | None = None
        self.outbox: Outbox | None = None
        self.route: Route | None = None
        self.reject_reason: str | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.paused = False
        self.dirty = False
        self.closing = False
        self.frames_sent = 0
        self.open = False
        """The protocol is OPEN: frames may be written (kept here, not read off the
        protocol, because the writer asks on every write)."""
        self.compressed = False
        self.started = 0.0
        self.remote = ""
        self._fragments: list[bytes] | None = None
        self._ping_sent: bytes | None = None

    # asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)
        transport.set_write_buffer_limits(high=self.server.settings.write_limit)
        self.server.connected(self)
        self._set_timer(self.server.settings.open_timeout, self._handshake_timeout)

    def data_received(self, data: bytes) -> None:
        protocol = self.protocol
        protocol.receive_data(data)
        events = protocol.events_received()
        self._send_protocol_data()
        for event in events:
            if isinstance(event, Frame):
                self._on_frame(event)
            elif isinstance(event, Request):
                self._on_request(event)
        if self.open and protocol.state is not OPEN:
            self.open = False
        if protocol.close_expected() and not self.closing:
            self._expect_close()

    def eof_received(self) -> bool:
        self.protocol.receive_eof()
        self._send_protocol_data()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.protocol.receive_eof()  # idempotent; the state is now CLOSED
        self.open = False
        self._cancel_timer()
        self.transport = None
        self.server.closed(self)
        if self.session is not None:
            self._report_close()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self.outbox is not None and not self.dirty:
            self.dirty = True
            self.server.schedule_flush(self)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # Opening handshake

    def _on_request(self, request: Request) -> None:
        protocol = self.protocol
        response = self.server.check(self, request)
        if response is None:
            response = protocol.accept(request)
            if response.status_code != http.HTTPStatus.SWITCHING_PROTOCOLS:
                self.reject_reason = "bad_request"
        response.headers["Server"] = "broadcastd"
        protocol.send_response(response)
        self._send_protocol_data()
        if protocol.state is OPEN:
            self._open()
        else:
            self.route = None
            self.server.node.observer.connection_rejected(self.reject_reason or "bad_request")
            self._expect_close()

    def _handshake_timeout(self) -> None:
        self.timer = None
        if self.protocol.state is State.CONNECTING:
            self.server.node.observer.connection_rejected(
                "draining" if self.server.node.draining else "handshake_timeout"
            )
            self.abort()

    def _open(self) -> None:
        server = self.server
        s = server.settings
        node = server.node
        route = self.route
        assert route is not None
        self.route = None
        self.open = True
        self.compressed = bool(self.protocol.extensions)
        outbox = self.outbox = Outbox(s.outbox_messages, s.outbox_bytes, s.slow_consumer_policy)
        outbox.wake = self.wake
        session = self.session = Session(
            self.protocol.id.hex,
            node.hub,
            outbox,
            raw=route.raw,
            max_channels=s.max_channels_per_client,
            max_errors=s.max_command_errors,
        )
        server.opened(self, session)
        self.started = time.monotonic()
        assert self.transport is not None
        self.remote = _address(self.transport.get_extra_info("peername"))
        if node.draining:
            outbox.close(CloseReason.SHUTDOWN)
        session.open(list(route.channels))
        node.observer.connection_opened()
        _log.info(
            "connection.open",
            client=session.id,
            remote=self.remote,
            channels=list(route.channels),
            format="raw" if route.raw else "json",
        )
        self._schedule_ping()

    # Reading

    def _on_frame(self, frame: Frame) -> None:
        opcode = frame.opcode
        if opcode is TEXT or opcode is CONT:
            if not frame.fin:
                if self._fragments is None:
                    self._fragments = []
                self._fragments.append(bytes(frame.data))
                return
            data = bytes(frame.data)
            if self._fragments is not None:
                self._fragments.append(data)
                data = b"".join(self._fragments)
                self._fragments = None
            self._on_text(data)
        elif opcode is BINARY:
            self._end(CloseReason.UNSUPPORTED_DATA)
        elif opcode is PONG:
            self._on_pong(bytes(frame.data))

    def _on_text(self, data: bytes) -> None:
        session = self.session
        if session is None or self.outbox is None or self.outbox.closed is not None:
            return  # closing: what the client says no longer matters
        try:
            text = data.decode()
        except UnicodeDecodeError:
            reason = CloseReason.INVALID_UTF8
            self.protocol.fail(reason.code, reason.reason)
            self._send_protocol_data()
            return
        close = session.handle(text)
        if close is not None:
            self._end(close)

    def _end(self, reason: CloseReason) -> None:
        """Close after flushing what is queued (an error reply, say)."""
        assert self.outbox is not None
        self.outbox.close(reason)

    # Writing

    def wake(self) -> None:
        """Called by the outbox when it stops being empty, or closes."""
        if not self.dirty:
            self.dirty = True
            self.server.schedule_flush(self)

    def flush(self) -> int:
        """Write everything queued in one write; close when the outbox says so.
        Returns how many frames were written."""
        self.dirty = False
        outbox = self.outbox
        if outbox is None or not self.open:
            return 0
        written = 0
        if not self.paused:
            frames = outbox.take()
            if frames:
                if outbox.missed:
                    self._report_missed(outbox.take_missed(), frames)
                if self.compressed:
                    data = self._compress(frames)
                else:
                    data = frames[0] if len(frames) == 1 else b"".join(frames)
                assert self.transport is not None
                self.transport.write(data)
                written = len(frames)
                self.frames_sent += written
                self.server.pass_bytes += len(data)
        if outbox.closed is not None:
            self._close_if_flushed(outbox, outbox.closed)
        return written

    def _compress(self, frames: list[bytes]) -> bytes:
        for frame in frames:
            self.protocol.send_text(frame_payload(frame))
        return b"".join(self.protocol.data_to_send())

    def _close_if_flushed(self, outbox: Outbox, reason: CloseReason) -> None:
        if len(outbox) or self.closing:
            return
        if self.paused and reason is not CloseReason.SLOW_CONSUMER:
            return  # resume_writing() flushes again, then closes
        self.open = False
        self.protocol.send_close(reason.code, reason.reason)
        self._send_protocol_data()
        self._expect_close()

    def _send_protocol_data(self) -> None:
        """Write what the protocol produced (handshake response, pongs, close frames)."""
        transport = self.transport
        for data in self.protocol.data_to_send():
            if transport is None:
                return
            if data is SEND_EOF or not data:
                if transport.can_write_eof():
                    transport.write_eof()
                else:
                    transport.close()
            else:
                transport.write(data)

    def _report_missed(self, missed: int, frames: list[bytes]) -> None:
        observer = self.server.node.observer
        observer.dropped("drop_oldest", missed)
        observer.slow_consumer("drop_oldest")
        assert self.session is not None
        if not self.session.raw:
            frames.insert(0, missed_frame(missed))
        if _throttle.allow("slow_consumer.drop"):
            _log.warning(
                "slow_consumer.drop",
                client=self.session.id,
                missed=missed,
                suppressed=_throttle.suppressed("slow_consumer.drop"),
            )

    # Timers

    def _set_timer(self, delay: float, callback: Callable[[], None]) -> None:
        self._cancel_timer()
        loop = asyncio.get_running_loop()
        self.timer = loop.call_later(delay, callback)

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _schedule_ping(self) -> None:
        interval = self.server.settings.ping_interval
        if interval is None:
            self._cancel_timer()
        else:
            self._set_timer(interval, self._ping)

    def _ping(self) -> None:
        self.timer = None
        if self.protocol.state is not OPEN or self.closing:
            return
        self._ping_sent = _PING_STAMP.pack(time.monotonic())
        self.protocol.send_ping(self._ping_sent)
        self._send_protocol_data()
        timeout = self.server.settings.ping_timeout
        if timeout is None:
            self._schedule_ping()
        else:
            self._set_timer(timeout, self._pong_timeout)

    def _on_pong(self, data: bytes) -> None:
        if data != self._ping_sent or self.closing:
            return  # unsolicited, or late
        self._ping_sent = None
        self.server.node.observer.ping_rtt(time.monotonic() - _PING_STAMP.unpack(data)[0])
        if self.server.settings.ping_timeout is not None:
            self._schedule_ping()

    def _pong_timeout(self) -> None:
        self.timer = None
        self.protocol.fail(CloseReason.KEEPALIVE_TIMEOUT.code, CloseReason.KEEPALIVE_TIMEOUT.reason)
        self._send_protocol_data()
        self._expect_close()

    def _expect_close(self) -> None:
        """The closing handshake is under way: bound it, then cut the connection."""
        self.open = False
        self.closing = True
        self._set_timer(self.server.settings.close_timeout, self.abort)

    # Closing

    def _report_close(self) -> None:
        session = self.session
        outbox = self.outbox
        assert session is not None
        assert outbox is not None
        channels = list(session.channels)
        session.close()
        code, reason, initiator = _how_closed(self.protocol, outbox)
        observer = self.server.node.observer
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
            remote=self.remote,
            channels=channels,
            code=code,
            reason=reason,
            initiator=initiator,
            messages_sent=self.frames_sent,
            duration_s=round(time.monotonic() - self.started, 3),
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


def _address(peer: Any) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer)


def _how_closed(protocol: ServerProtocol, outbox: Outbox) -> tuple[int, str, str]:
    """Close code, reason and initiator (server / client / abnormal) of a closed connection."""
    if protocol.close_sent is not None and protocol.close_rcvd_then_sent is False:
        return protocol.close_sent.code, protocol.close_sent.reason, "server"
    if protocol.close_rcvd is not None:
        return protocol.close_rcvd.code, protocol.close_rcvd.reason, "client"
    if protocol.close_sent is not None:
        return protocol.close_sent.code, protocol.close_sent.reason, "server"
    if outbox.closed is not None:
        return outbox.closed.code, outbox.closed.reason, "server"
    return CloseReason.ABNORMAL.code, CloseReason.ABNORMAL.reason, "abnormal"
