"""The subscriber port: websockets' sans-I/O protocol on a bare asyncio Protocol.

The opening handshake is read by ``core.handshake`` (llhttp, then the checks
websockets' ``accept`` makes, and a 101 built from constant bytes), which costs
a connection storm a fraction of websockets' pure-Python request parser; the
101 leaves in the same write as the first replies. From then on websockets'
``ServerProtocol``, created OPEN, does everything RFC 6455 asks - frame parsing
with masking and size limits, automatic pongs, the closing handshake, the close
codes for protocol errors - without I/O. This adapter feeds it the socket's
bytes and writes out what it produces; it holds no per-connection task, so an
idle subscriber costs a few kilobytes, not the tens that a task-per-connection
design spends on coroutine frames.

A plain GET that asks for ``text/event-stream`` or ``application/x-ndjson``
instead of an upgrade becomes an event stream on the same Connection: the same
admission, session and outbox, its frames rendered by ``core.eventstream``
rather than written as they are; a CORS preflight (``OPTIONS``) is answered and
closed.

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
negotiated, a frame is written compressed, compressed once for every such client
in the writers' pass (``core.deflate``).

Backpressure both ways: a fan-out that finds a client's outbox full first
writes out what is queued if the socket can take it (the client is slow only
when it cannot); while a connection is above its write limit its input is not
read either, so pings and commands cannot make the server buffer answers
without bound; and at most ``READ_SLICE`` input bytes are parsed per connection
per event-loop turn, so a flood of tiny frames delays nobody else for long.

Containment: whether frames may be written is read off the protocol state (and
the transport), never kept in sync by hand; every callback that serves several
connections (the writer pass) catches per connection, and an exception while
reading from, writing to or closing one connection aborts that connection
alone, with one throttled log line.

Timers, not tasks: one TimerHandle per connection serves, in turn, the opening
handshake timeout, the keepalive ping interval (websockets' ping frames; the
pong echoes the send time, so the round trip needs no state), the pong timeout
and the closing-handshake timeout; a second one, armed only while the
connection holds no subscription, enforces ``ws.subscribe_timeout``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import http
import logging
import math
import ssl
import struct
import time
from collections.abc import Callable
from typing import Any, cast

from websockets.frames import Frame, Opcode
from websockets.protocol import SEND_EOF, State
from websockets.server import ServerProtocol

from broadcastd import log
from broadcastd.auth.tokens import TokenVerifier
from broadcastd.connlog import ConnectionLog
from broadcastd.core.deflate import RESPONSE as DEFLATE_RESPONSE
from broadcastd.core.deflate import Deflater, receiving_extension
from broadcastd.core.deflate import accepts as accepts_deflate
from broadcastd.core.envelope import missed_frame
from broadcastd.core.eventstream import (
    SSE,
    EventStream,
    Messages,
    preflight_answer,
    resume_positions,
    stream_kind,
)
from broadcastd.core.handshake import (
    Head,
    HeadReader,
    HttpDate,
    Refusal,
    check_stream,
    check_upgrade,
    route_of,
    switching_protocols,
)
from broadcastd.core.ids import ClientIds
from broadcastd.core.outbox import Outbox
from broadcastd.core.rate import TokenBucket
from broadcastd.core.route import Route
from broadcastd.core.session import Session
from broadcastd.errors import CloseReason, Draining
from broadcastd.node import Node
from broadcastd.settings import WebSocketSettings
from broadcastd.transport.wsauth import ConnectionAuth

_log = log.get("broadcastd.ws")
_throttle = log.Throttle(per_second=10)
"""Floods of identical warnings (thousands of slow consumers at once) are summarised."""
_protocol_log = logging.getLogger("websockets.server")
OPEN = State.OPEN
TEXT, CONT, BINARY, PONG = Opcode.TEXT, Opcode.CONT, Opcode.BINARY, Opcode.PONG
LISTEN_BACKLOG = 4096
"""Connections the kernel queues for ``accept()`` (listen(2)'s backlog)."""
READ_SLICE = 16 * 1024
"""Most input bytes parsed per connection per event-loop turn (about 2700 of the
smallest frames): the rest waits, with reading paused, for the next turn."""
_PING_STAMP = struct.Struct("!d")
# Why a connection's reading is paused (``Connection._read_paused`` holds any of
# them at once; reading resumes when none is left).
_PAUSED_WRITE_FULL = 1
"""The socket is above its write limit: the client must read first."""
_PAUSED_PENDING_INPUT = 2
"""Input beyond ``READ_SLICE`` waits, unparsed, for the next event-loop turn."""
_PAUSED_TOKEN = 4
"""The token given at connect is being verified: its verdict comes first."""


class WsServer:
    """Accepts subscribers; keeps the flush list; drains."""

    def __init__(
        self, settings: WebSocketSettings, node: Node, tls: ssl.SSLContext | None = None
    ) -> None:
        self.settings = settings
        self.node = node
        self.tls = tls
        """The listener's TLS context (None: plain ws://)."""
        self.deflater = Deflater(settings.compression_min_bytes) if settings.compression else None
        """Compresses each frame once for the connections that negotiated deflate."""
        self.messages = Messages()
        """Each message frame as event streams write it, made once per pass."""
        self._server: asyncio.AbstractServer | None = None
        self._open: dict[Session, Connection] = {}
        self._all: set[Connection] = set()
        self._dirty: list[Connection] = []
        self._held: asyncio.TimerHandle | None = None
        """The pass of the writers due at the end of ``ws.write_delay``, if one is."""
        self._rate = TokenBucket(settings.accept_rate)
        self.client_ids = ClientIds(node.id)
        self.date = HttpDate()
        self.connections_log = ConnectionLog(
            node.settings.log.connection_level,
            node.settings.log.connection_summary_rate,
            time.monotonic,
        )
        self.pass_frames = 0
        self.pass_bytes = 0
        self.pass_writes = 0
        self.pass_oldest = _NEVER
        """What the writers did since the last report (they add to these): frames,
        bytes, writes, and when the oldest frame written was queued."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._gone: asyncio.Event | None = None
        auth = node.settings.auth
        self.verifier = TokenVerifier.from_settings(auth) if auth.enabled else None

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
            lambda: Connection(self),
            s.host,
            s.port,
            backlog=LISTEN_BACKLOG,
            reuse_port=s.reuse_port,
            ssl=self.tls,
        )

    def stop_accepting(self) -> None:
        """Close the listening socket; handshakes already under way get HTTP 503."""
        if self._server is not None:
            self._server.close()

    async def drain(self, deadline: float) -> int:
        """Flush every outbox, close each connection with 1001; abort what remains
        at loop time ``deadline``. Returns how many connections had to be aborted.

        Connections that have not completed a handshake (a load balancer's TCP
        check, a client that never speaks) are cut at once: they hold nothing
        that must be flushed."""
        self._gone = asyncio.Event()
        for conn in list(self._all):
            if conn.session is None:
                if not conn.closing:
                    self.node.observer.connection_rejected("draining")
                conn.abort()
        for session in list(self._open):
            session.outbox.close(CloseReason.SHUTDOWN)
        self.flush_held()
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
        self.connections_log.close()
        return aborted

    # Connections report here

    def now(self) -> float:
        """When the frames being queued now were accepted: the publish under way,
        else the present (a reply)."""
        since = self.node.publishing_since
        return since if since is not None else self.node.clock()

    def schedule_flush(self, conn: Connection) -> None:
        if not self._dirty:
            assert self._loop is not None
            delay = self.settings.write_delay
            if delay:
                self._held = self._loop.call_later(delay, self._flush)
            else:
                self._loop.call_soon(self._flush)
        self._dirty.append(conn)

    def flush_held(self) -> None:
        """Write what ``ws.write_delay`` holds now (at drain)."""
        if self._held is not None:
            self._held.cancel()
            self._flush()

    def _flush(self) -> None:
        """One pass of the writers: every client that has frames queued gets one write.

        Each connection is served on its own: an exception writing to one ends that
        connection alone, and the rest of the pass goes on. Metrics are reported
        once per pass; its delivery latency is that of the oldest frame written
        since the last report (the first queued, the last written).
        """
        self._held = None
        dirty, self._dirty = self._dirty, []
        for conn in dirty:
            try:
                conn.flush()
            except Exception as exc:
                conn.crash(exc, "write")
        if self.pass_frames:
            self.node.observer.written(
                self.pass_frames,
                self.pass_bytes,
                self.pass_writes,
                self.node.clock() - self.pass_oldest,
            )
            self.pass_frames = self.pass_bytes = self.pass_writes = 0
            self.pass_oldest = _NEVER
        if self.deflater is not None:
            self.deflater.forget()
        self.messages.forget()

    def admit(self, conn: Connection, head: Head) -> None:
        """Admission: store the route asked for on ``conn``, or raise a Refusal. The
        daemon's limits come first, then the origin, then what is asked for."""
        s = self.settings
        try:
            self.node.refuse_if_draining()
        except Draining as exc:
            raise Refusal(
                http.HTTPStatus.SERVICE_UNAVAILABLE, exc.code, exc.message, "draining"
            ) from None
        if len(self._open) >= s.max_clients:
            raise Refusal(
                http.HTTPStatus.SERVICE_UNAVAILABLE,
                "cap",
                "the server is at its connection limit",
                "cap",
            )
        if s.accept_rate:
            wait = self._rate.take(self.node.clock())
            if wait:
                raise Refusal(
                    http.HTTPStatus.SERVICE_UNAVAILABLE,
                    "rate_limited",
                    f"more than {s.accept_rate:g} new connections per second: try again shortly",
                    "rate_limited",
                    (("Retry-After", str(max(1, math.ceil(wait)))),),
                )
        origins = head.get_all("origin")
        if len(origins) > 1:
            raise Refusal(http.HTTPStatus.BAD_REQUEST, "bad_request", "more than one Origin")
        if s.allowed_origins is not None:
            if origins and origins[0] not in s.allowed_origins:
                raise Refusal(http.HTTPStatus.FORBIDDEN, "origin", "origin not allowed", "origin")
            if not origins and s.require_origin:
                raise Refusal(
                    http.HTTPStatus.FORBIDDEN, "origin", "an Origin is required", "origin"
                )
        conn.route = route_of(head, s.max_channels_per_client)

    def allow_origin(self, head: Head) -> str | None:
        """``Access-Control-Allow-Origin`` for an event stream: any origin while
        ``ws.allowed_origins`` is unset, else the request's (admission refused
        the others); None for a request without an Origin."""
        if self.settings.allowed_origins is None:
            return "*"
        origins = head.get_all("origin")
        return origins[0] if origins else None

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


_NEVER = float("inf")


class Connection(asyncio.Protocol):
    """One subscriber connection: its protocol state, its session, its writer."""

    __slots__ = (
        "_fragments",
        "_pending",
        "_ping_sent",
        "_read_paused",
        "auth",
        "channels",
        "closing",
        "compressed",
        "dirty",
        "frames_sent",
        "outbox",
        "preamble",
        "protocol",
        "reader",
        "remote",
        "route",
        "server",
        "session",
        "started",
        "stream",
        "subscribe_timer",
        "timer",
        "transport",
        "waiting_since",
        "write_paused",
    )

    def __init__(self, server: WsServer) -> None:
        self.server = server
        self.reader: HeadReader | None = HeadReader()
        """Reads the opening handshake (None once it is read)."""
        self.protocol: ServerProtocol | None = None
        """websockets' protocol, from the 101 on (None during the handshake)."""
        self.preamble = b""
        """The 101 answer, written with the first frames if they follow at once."""
        self.stream: EventStream | None = None
        """For an SSE or ndjson subscriber (no WebSocket): its encoder."""
        self.transport: asyncio.Transport | None = None
        self.session: Session | None = None
        self.auth: ConnectionAuth | None = None
        self.outbox: Outbox | None = None
        self.route: Route | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.subscribe_timer: asyncio.TimerHandle | None = None
        self.write_paused = False
        """The transport is above its write limit: the writer waits for resume_writing."""
        self.dirty = False
        self.closing = False
        self.frames_sent = 0
        self.compressed = False
        self.started = 0.0
        self.waiting_since = 0.0
        """When the oldest frame in the outbox was queued (0: nothing waits)."""
        self.remote = ""
        self.channels: list[str] = []
        """The channels held when the connection left them (for the close log line)."""
        self._fragments: list[bytes] | None = None
        self._ping_sent: bytes | None = None
        self._pending = b""
        self._read_paused = 0

    # asyncio callbacks: each serves this connection only, and contains its failures

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)
        transport.set_write_buffer_limits(high=self.server.settings.write_limit)
        self.server.connected(self)
        self._set_timer(self.server.settings.open_timeout, self._handshake_timeout)

    def data_received(self, data: bytes) -> None:
        try:
            self._receive(data)
        except Exception as exc:
            self.crash(exc, "read")

    def eof_received(self) -> bool:
        if self.protocol is None:
            return False  # the handshake never completed: close
        try:
            self.protocol.receive_eof()
            self._send_protocol_data()
            self._leave()
        except Exception as exc:
            self.crash(exc, "eof")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            if self.protocol is not None:
                self.protocol.receive_eof()  # idempotent; the state is now CLOSED
            self._cancel_timer()
            if self.subscribe_timer is not None:
                self.subscribe_timer.cancel()
                self.subscribe_timer = None
            self.transport = None
            self._pending = b""
            if self.auth is not None:
                self.auth.close()
            self._leave()
            self.server.closed(self)
            if self.session is not None:
                self.session.end()  # out of the node's registry (the server API's)
                self._report_close()
        except Exception as error:
            self.crash(error, "close")
        finally:
            self._release()

    def _release(self) -> None:
        """Break the reference cycles a connection is part of, so that it is freed
        by reference counting the moment the transport lets go of it, however
        rarely the cyclic collector runs (``cli._tune_gc`` makes it rare).

        The cycles: websockets' parser is a generator whose frame refers to its
        protocol (closing it ends the frame), and the exceptions the protocol
        keeps (a refused handshake's, a parse error's) hold tracebacks through
        its frames; the outbox calls back into this connection; a connection's
        auth is called back by its session."""
        protocol = self.protocol
        if protocol is not None:
            protocol.parser.close()
            protocol.parser_exc = protocol.handshake_exc = None
        self.reader = None
        outbox = self.outbox
        if outbox is not None:
            outbox.detach()
        if self.session is not None:
            self.session.on_token = self.session.on_channels = None
        self.auth = None
        self.timer = self.subscribe_timer = None

    def pause_writing(self) -> None:
        self.write_paused = True
        self._pause_reading(_PAUSED_WRITE_FULL)

    def resume_writing(self) -> None:
        self.write_paused = False
        self._resume_reading(_PAUSED_WRITE_FULL)
        if self._pending:
            asyncio.get_running_loop().call_soon(self._receive_pending)
        if self.outbox is not None and not self.dirty:
            self.dirty = True
            self.server.schedule_flush(self)

    def abort(self) -> None:
        transport = self.transport
        if transport is not None:
            self.transport = None
            transport.abort()

    def crash(self, exc: Exception, where: str) -> None:
        """Something unexpected while serving this connection: end it, and only it."""
        if _throttle.allow("connection.error"):
            _log.error(
                "connection.error",
                client=self.session.id if self.session is not None else None,
                remote=self.remote,
                where=where,
                exc_info=exc,
                suppressed=_throttle.suppressed("connection.error"),
            )
        self.closing = True
        self.abort()

    # Reading

    def _receive(self, data: bytes) -> None:
        if len(data) > READ_SLICE:
            self._pending = data[READ_SLICE:]
            data = data[:READ_SLICE]
            self._pause_reading(_PAUSED_PENDING_INPUT)
            asyncio.get_running_loop().call_soon(self._receive_pending)
        if self.protocol is None:
            self._receive_handshake(data)
        else:
            self._receive_frames(data)

    def _receive_pending(self) -> None:
        """Parse the next slice of input held back; while the socket is above its
        write limit, wait for resume_writing instead."""
        if self.write_paused or not self._pending or self.transport is None:
            return
        data, self._pending = self._pending, b""
        try:
            self._receive(data)
            if not self._pending:
                self._resume_reading(_PAUSED_PENDING_INPUT)
        except Exception as exc:
            self.crash(exc, "read")

    def _pause_reading(self, why: int) -> None:
        transport = self.transport
        if not self._read_paused and transport is not None and not transport.is_closing():
            transport.pause_reading()
        self._read_paused |= why

    def _resume_reading(self, why: int) -> None:
        if not self._read_paused:
            return
        self._read_paused &= ~why
        transport = self.transport
        if not self._read_paused and transport is not None and not transport.is_closing():
            transport.resume_reading()

    def _receive_frames(self, data: bytes) -> None:
        protocol = self.protocol
        assert protocol is not None
        protocol.receive_data(data)
        events = protocol.events_received()
        self._send_protocol_data()
        for event in events:
            if protocol.state is not OPEN:
                break  # what a failing client says no longer matters
            if isinstance(event, Frame):
                self._on_frame(event)
        if protocol.close_expected() and not self.closing:
            self._expect_close()

    # Opening handshake

    def _receive_handshake(self, data: bytes) -> None:
        reader = self.reader
        if self.closing or reader is None:
            return  # refused; waiting for the client to close
        server = self.server
        try:
            head = reader.feed(data)
            if head is None:
                return
            self.reader = None
            server.admit(self, head)
            if head.method == "OPTIONS":
                self._preflight(head)
                return
            kind = stream_kind(head)
            if kind is not None:
                self._start_stream(head, kind)
                return
            accept = check_upgrade(head)
            protocol = ServerProtocol(
                state=OPEN,
                max_size=server.settings.max_message_bytes,
                logger=_protocol_log,
            )
            extensions = None
            offers = head.get_all("sec-websocket-extensions")
            if server.deflater is not None and offers and _deflate_offered(offers):
                extensions = DEFLATE_RESPONSE
                protocol.extensions = [receiving_extension()]
        except Refusal as refused:
            # Its traceback holds this frame, and so this connection, in a cycle.
            refused.__traceback__ = refused.__context__ = None
            self._refuse(refused)
            return
        self.protocol = protocol
        self.preamble = switching_protocols(accept, server.date(time.time()), extensions)
        self._open()
        if self.preamble and not self.dirty:
            self._write(b"")  # nothing to answer yet (a token or an engine is asked)

    def _start_stream(self, head: Head, kind: str) -> None:
        """An event stream instead of a WebSocket: the same route and session, its
        positions resumed from ``Last-Event-ID``; its session speaks JSON (the
        stream renders ``format=raw`` itself, and needs every position)."""
        route = self.route
        assert route is not None
        check_stream(head)
        last_ids = head.get_all("last-event-id")
        if kind == SSE and last_ids and last_ids[0]:
            resumed = resume_positions(last_ids[0], route.channels)
            self.route = dataclasses.replace(
                route, since=tuple({**dict(route.since), **dict(resumed)}.items())
            )
        route = self.route
        assert route is not None
        self.stream = EventStream(kind, route.channels, route.raw, route.since)
        self.preamble = self.stream.head(self.server.allow_origin(head))
        self._open()
        if self.preamble and not self.dirty:
            self._write(b"")

    def _preflight(self, head: Head) -> None:
        """A browser asks whether a cross-origin event stream may send headers
        (``Authorization``, ``Last-Event-ID``): yes, from an admitted origin. The
        connection then closes, as after a refusal."""
        self.route = None
        transport = self.transport
        if transport is not None:
            transport.write(preflight_answer(self.server.allow_origin(head)))
            if transport.can_write_eof():
                transport.write_eof()
            else:
                transport.close()
        self._expect_close()

    def _refuse(self, refusal: Refusal) -> None:
        """Answer the handshake with a JSON error, then half-close and wait (bounded)
        for the client to close."""
        self.route = None
        observer = self.server.node.observer
        observer.connection_rejected(refusal.reason)
        if refusal.reason == "bad_request" and _throttle.allow("handshake.refused"):
            _log.warning(
                "handshake.refused",
                remote=_address(self._peer()),
                status=refusal.status.value,
                code=refusal.code,
                suppressed=_throttle.suppressed("handshake.refused"),
            )
        transport = self.transport
        if transport is not None:
            transport.write(refusal.serialize())
            if transport.can_write_eof():
                transport.write_eof()
            else:
                transport.close()
        self._expect_close()

    def _peer(self) -> Any:
        return self.transport.get_extra_info("peername") if self.transport is not None else None

    def _handshake_timeout(self) -> None:
        self.timer = None
        if self.session is None and not self.closing:
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
        self.compressed = bool(self.protocol is not None and self.protocol.extensions)
        outbox = self.outbox = Outbox(s.outbox_messages, s.outbox_bytes, s.slow_consumer_policy)
        stream = self.stream
        outbox.tell_missed = stream is not None or not route.raw
        outbox.wake = self.wake
        outbox.write_now = self.write_now
        self.remote = _address(self._peer())
        form, forms = (None, None) if stream is None else stream.forms()
        session = self.session = Session(
            server.client_ids(),
            node,
            outbox,
            raw=route.raw and stream is None,
            form=form,
            forms=forms,
            max_channels=s.max_channels_per_client,
            max_errors=s.max_command_errors,
            remote=self.remote,
            transport="websocket" if stream is None else "sse" if stream.kind == SSE else "ndjson",
        )
        server.opened(self, session)
        self.started = time.monotonic()
        if node.draining:
            outbox.close(CloseReason.SHUTDOWN)
        if server.verifier is None:
            session.open(route.channels, route.since)
        else:
            auth = self.auth = ConnectionAuth(
                server.verifier, node.settings.auth, session, node.observer, self._end
            )

            def open_channels() -> None:
                session.open(route.channels, route.since)
                self._resume_reading(_PAUSED_TOKEN)
                if self.session is not None:
                    self._watch_subscriptions()

            auth.start(route.token, open_channels, lambda: self._pause_reading(_PAUSED_TOKEN))
        session.on_channels = self._watch_subscriptions
        node.observer.connection_opened()
        server.connections_log.opened(
            client=session.id,
            remote=self.remote,
            channels=list(route.channels),
            format="raw" if route.raw else "json",
            transport=session.transport,
        )
        self._schedule_ping()
        self._watch_subscriptions()

    # Frames

    def _on_frame(self, frame: Frame) -> None:
        opcode = frame.opcode
        if opcode is TEXT or opcode is CONT:
            if not frame.fin:
                fragments = self._fragments
                if fragments is None:
                    fragments = self._fragments = []
                elif len(fragments) + 1 >= self.server.settings.max_fragments:
                    self._fail(CloseReason.TOO_MANY_FRAGMENTS)
                    return
                fragments.append(bytes(frame.data))
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
            self._fail(CloseReason.INVALID_UTF8)
            return
        close = session.handle(text)
        if close is not None:
            self._end(close)
        else:
            self._watch_subscriptions()

    def _fail(self, reason: CloseReason) -> None:
        """Close at once for a protocol violation (queued frames are not sent)."""
        assert self.protocol is not None
        self.protocol.fail(reason.code, reason.reason)
        self._send_protocol_data()

    def _end(self, reason: CloseReason) -> None:
        """Close after flushing what is queued (an error reply, say).

        The connection leaves its channels at once: whatever its socket is doing
        (a client that stopped reading may hold the close back for long), nothing
        published after this decision is queued for it, and publishes no longer
        count it. A token's expiry takes effect at its moment this way."""
        assert self.outbox is not None
        self._leave()
        self.outbox.close(reason)

    def _watch_subscriptions(self) -> None:
        """Arm the subscribe deadline while the connection holds no channel."""
        timeout = self.server.settings.subscribe_timeout
        session = self.session
        if timeout is None or session is None:
            return
        if session.channels:
            if self.subscribe_timer is not None:
                self.subscribe_timer.cancel()
                self.subscribe_timer = None
        elif self.subscribe_timer is None:
            self.subscribe_timer = asyncio.get_running_loop().call_later(
                timeout, self._no_subscription
            )

    def _no_subscription(self) -> None:
        self.subscribe_timer = None
        if self.session is not None and not self.session.channels and self.outbox is not None:
            self.outbox.close(CloseReason.NO_SUBSCRIPTION)

    # Writing

    def wake(self) -> None:
        """Called by the outbox when it stops being empty, or closes."""
        if not self.waiting_since:
            self.waiting_since = self.server.now()
        if not self.dirty:
            self.dirty = True
            self.server.schedule_flush(self)

    def writable(self) -> bool:
        """Frames may go out: the protocol is OPEN and the connection still there."""
        if self.transport is None:
            return False
        protocol = self.protocol
        if protocol is None:
            return self.stream is not None and not self.closing
        return protocol.state is OPEN

    def flush(self) -> None:
        """Write everything queued in one write; close when the outbox says so."""
        self.dirty = False
        outbox = self.outbox
        if outbox is None or not self.writable():
            return
        if not self.write_paused:
            self._write_queued(outbox)
        if outbox.closed is not None:
            self._close_if_flushed(outbox, outbox.closed)

    def write_now(self) -> bool:
        """The outbox is full: write it out now if the socket can take more."""
        outbox = self.outbox
        if self.write_paused or outbox is None or not self.writable():
            return False
        self._write_queued(outbox)
        return True

    def _write_queued(self, outbox: Outbox) -> None:
        frames = outbox.take()
        since, self.waiting_since = self.waiting_since, 0.0
        if not frames:
            return
        if outbox.missed:
            self._report_missed(outbox.take_missed(), frames)
        if outbox.channel_missed:
            self._report_conflated(outbox.take_channel_missed())
        if self.stream is not None:
            data = self.stream.render(frames, self.server.messages)
        elif self.compressed:
            deflate = self.server.deflater
            assert deflate is not None
            data = b"".join([deflate.frame(frame) for frame in frames])
        else:
            data = frames[0] if len(frames) == 1 else b"".join(frames)
        self._write(data)
        server = self.server
        self.frames_sent += len(frames)
        server.pass_frames += len(frames)
        server.pass_bytes += len(data)
        server.pass_writes += 1
        if since and since < server.pass_oldest:
            server.pass_oldest = since

    def _write(self, data: bytes) -> None:
        """Write, after the 101 answer if it has not gone yet."""
        if self.preamble:
            data, self.preamble = self.preamble + data, b""
        assert self.transport is not None
        self.transport.write(data)

    def _close_if_flushed(self, outbox: Outbox, reason: CloseReason) -> None:
        if len(outbox) or self.closing:
            return
        if self.write_paused and reason is not CloseReason.SLOW_CONSUMER:
            return  # resume_writing() flushes again, then closes
        if self.stream is not None:
            self._end_stream(reason)
            return
        assert self.protocol is not None
        self.protocol.send_close(reason.code, reason.reason)
        self._send_protocol_data()
        self._expect_close()

    def _end_stream(self, reason: CloseReason) -> None:
        """The server ends an event stream: a last event says why, then the
        chunked body ends and the connection closes (a browser reconnects)."""
        assert self.stream is not None
        self._write(self.stream.end(reason.code, reason.reason))
        self._expect_close()
        assert self.transport is not None
        self.transport.close()

    def _send_protocol_data(self) -> None:
        """Write what the protocol produced (pongs, close frames)."""
        protocol = self.protocol
        if protocol is None:
            return
        for data in protocol.data_to_send():
            transport = self.transport
            if transport is None or transport.is_closing():
                return
            if data is SEND_EOF or not data:
                if self.preamble:
                    self._write(b"")
                if transport.can_write_eof():
                    transport.write_eof()
                else:
                    transport.close()
            else:
                self._write(data)

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

    def _report_conflated(self, missed: int) -> None:
        """Messages a namespace's policy let go (conflate, or a namespace's
        drop_oldest): the client was told per channel by the outbox."""
        observer = self.server.node.observer
        observer.dropped("conflate", missed)
        observer.slow_consumer("conflate")
        if _throttle.allow("slow_consumer.conflate"):
            assert self.session is not None
            _log.info(
                "slow_consumer.conflate",
                client=self.session.id,
                missed=missed,
                suppressed=_throttle.suppressed("slow_consumer.conflate"),
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
        if not self.writable() or self.closing:
            return
        if self.stream is not None:
            if not self.write_paused:  # a stream is kept alive, not probed: no pong comes
                self._write(self.stream.keepalive())
            self._schedule_ping()
            return
        try:
            self._ping_sent = _PING_STAMP.pack(time.monotonic())
            assert self.protocol is not None
            self.protocol.send_ping(self._ping_sent)
            self._send_protocol_data()
        except Exception as exc:
            self.crash(exc, "ping")
            return
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
        try:
            self._fail(CloseReason.KEEPALIVE_TIMEOUT)
            self._expect_close()
        except Exception as exc:
            self.crash(exc, "ping")

    def _expect_close(self) -> None:
        """The closing handshake is under way: bound it, then cut the connection.
        Reading resumes if a token's verdict was holding it, so that the client's
        close frame is read and the connection ends as soon as the client answers
        (what it sent meanwhile is read and ignored: the protocol is not OPEN)."""
        self.closing = True
        self._leave()
        self._resume_reading(_PAUSED_TOKEN)
        self._set_timer(self.server.settings.close_timeout, self.abort)

    # Closing

    def _leave(self) -> None:
        """Leave every channel as soon as the connection stops being open, so that
        fan-out no longer queues for it. Idempotent."""
        session = self.session
        if session is not None and session.channels:
            self.channels = list(session.channels)
            session.close()

    def _report_close(self) -> None:
        session = self.session
        outbox = self.outbox
        assert session is not None
        assert outbox is not None
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
        self.server.connections_log.closed(
            code,
            client=session.id,
            remote=self.remote,
            channels=self.channels,
            reason=reason,
            initiator=initiator,
            messages_sent=self.frames_sent,
            duration_s=round(time.monotonic() - self.started, 3),
        )


def _deflate_offered(offers: list[str]) -> bool:
    try:
        return accepts_deflate(offers)
    except ValueError as exc:
        raise Refusal(
            http.HTTPStatus.BAD_REQUEST, "bad_request", f"Sec-WebSocket-Extensions: {exc}"
        ) from None


def _address(peer: Any) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer)


def _how_closed(protocol: ServerProtocol | None, outbox: Outbox) -> tuple[int, str, str]:
    """Close code, reason and initiator (server / client / abnormal) of a closed
    connection (an event stream has no protocol: the outbox's reason, or gone)."""
    if protocol is None:
        if outbox.closed is not None:
            return outbox.closed.code, outbox.closed.reason, "server"
        return CloseReason.ABNORMAL.code, CloseReason.ABNORMAL.reason, "abnormal"
    if protocol.close_sent is not None and protocol.close_rcvd_then_sent is False:
        return protocol.close_sent.code, protocol.close_sent.reason, "server"
    if protocol.close_rcvd is not None:
        return protocol.close_rcvd.code, protocol.close_rcvd.reason, "client"
    if protocol.close_sent is not None:
        return protocol.close_sent.code, protocol.close_sent.reason, "server"
    if outbox.closed is not None:
        return outbox.closed.code, outbox.closed.reason, "server"
    return CloseReason.ABNORMAL.code, CloseReason.ABNORMAL.reason, "abnormal"
