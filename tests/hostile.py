"""Misbehaving subscriber-port clients for the fault-injection test.

Every client here works on a bare non-blocking socket driven by the event
loop's ``sock_*`` calls, so that it can do what no WebSocket library does: a
half-close (``shutdown(SHUT_WR)``) or a reset (``SO_LINGER`` 0, then close) at
an exact instant, frames with reserved bits, bad opcodes or no mask, floods
written without ever reading, handshakes that are duplicated, garbled or never
finished.

Each action is ``async def action(arena, rng)``: it draws every choice from
``rng`` (a seeded ``random.Random``) and paces itself on the publisher's
progress through the :class:`Arena` (``await arena.ticks(n)``: n more publish
operations), never on wall-clock sleeps. Whatever the daemon answers, an action
only ends; what is asserted is what the *other* clients receive.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import random
import socket
import struct
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import jwt
import orjson

CONT, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA

IO_TIMEOUT = 5.0
"""Longest a hostile socket call waits (a send the daemon does not take, a read of
an answer that does not come). Reaching it only ends the action."""


# Wire bytes


def client_frame(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    rsv: int = 0,
    mask: bool = True,
    length: int | None = None,
) -> bytes:
    """One client frame, built by hand; ``length`` lies about the payload length."""
    n = len(payload) if length is None else length
    head = bytearray([(0x80 if fin else 0) | (rsv & 0x7) << 4 | (opcode & 0xF)])
    mask_bit = 0x80 if mask else 0
    if n < 126:
        head.append(mask_bit | n)
    elif n < 65536:
        head.append(mask_bit | 126)
        head += struct.pack("!H", n)
    else:
        head.append(mask_bit | 127)
        head += struct.pack("!Q", n)
    if not mask:
        return bytes(head) + payload
    key = os.urandom(4)
    n = len(payload)
    stream = (key * (n // 4 + 1))[:n]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(stream, "big")).to_bytes(n, "big")
    return bytes(head) + key + masked


def command(op: str, channel: str | None = None, **extra: Any) -> bytes:
    doc: dict[str, Any] = {"op": op, **extra}
    if channel is not None:
        doc["channel"] = channel
    return client_frame(TEXT, orjson.dumps(doc))


def ws_key() -> str:
    return base64.b64encode(os.urandom(16)).decode()


def handshake_request(
    host: str,
    path: str,
    *,
    headers: list[tuple[str, str]] | None = None,
    omit: tuple[str, ...] = (),
) -> bytes:
    """A client opening handshake; ``headers`` are appended (duplicates included)."""
    base = [
        ("Host", host),
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Key", ws_key()),
        ("Sec-WebSocket-Version", "13"),
    ]
    lines = [f"GET {path} HTTP/1.1"]
    lines += [f"{k}: {v}" for k, v in base if k not in omit]
    lines += [f"{k}: {v}" for k, v in headers or []]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


# A bare socket


class Hostile:
    """One misbehaving connection on a non-blocking socket. Every call that the
    daemon may refuse (reset, close, not read) ends quietly: check ``.dead``."""

    def __init__(
        self, arena: Arena, rcvbuf: int | None, address: tuple[str, int] | None = None
    ) -> None:
        self.arena = arena
        self.address = address or arena.ws_address
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.setblocking(False)
        self.dead = False
        self.closed = False
        self.status: int | None = None
        """HTTP status of the handshake answer, once read."""
        self.rest = b""
        """Bytes read after the handshake answer."""
        arena.sockets.add(self)

    async def connect(self) -> bool:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(IO_TIMEOUT):
                await loop.sock_connect(self.sock, self.address)
        except (OSError, TimeoutError):
            self.close()
        return not self.dead

    async def send(self, data: bytes) -> bool:
        """All of ``data``, unless the daemon stops taking it within IO_TIMEOUT."""
        if self.dead:
            return False
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(IO_TIMEOUT):
                await loop.sock_sendall(self.sock, data)
        except (OSError, TimeoutError):
            self.dead = True
        return not self.dead

    async def flood(self, data: bytes, step: int = 64 * 1024) -> bool:
        """Send ``data`` in slices until the daemon stops taking them for a second
        (it may stop reading a client that does not read): False then."""
        loop = asyncio.get_running_loop()
        for start in range(0, len(data), step):
            if self.dead:
                return False
            try:
                async with asyncio.timeout(1.0):
                    await loop.sock_sendall(self.sock, data[start : start + step])
            except TimeoutError:
                return False
            except OSError:
                self.dead = True
                return False
        return True

    def send_now(self, data: bytes) -> None:
        """What the kernel takes of ``data`` right now, without yielding."""
        if self.dead:
            return
        try:
            self.sock.send(data)
        except BlockingIOError:
            pass
        except OSError:
            self.dead = True

    async def recv(self, limit: int = 65536) -> bytes:
        """One read; empty at EOF, reset or timeout."""
        if self.dead:
            return b""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(IO_TIMEOUT):
                data = await loop.sock_recv(self.sock, limit)
        except (OSError, TimeoutError):
            self.dead = True
            return b""
        if not data:
            self.dead = True
        return data

    async def read_response(self) -> int | None:
        """Read the handshake answer; return its status (None if none came)."""
        buf = b""
        while b"\r\n\r\n" not in buf:
            data = await self.recv()
            if not data:
                return None
            buf += data
            if len(buf) > 65536:
                return None
        head, _, self.rest = buf.partition(b"\r\n\r\n")
        try:
            self.status = int(head.split(b" ", 2)[1])
        except (IndexError, ValueError):
            return None
        return self.status

    async def read_until_eof(self, limit: int = 4 * 1024 * 1024) -> None:
        """Read (and discard) until the daemon closes, or IO_TIMEOUT passes idle."""
        total = 0
        while total < limit:
            data = await self.recv()
            if not data:
                return
            total += len(data)

    def fin(self) -> None:
        """Half-close: no more data from us, the daemon may still write."""
        if self.closed:
            return
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self.dead = True

    def rst(self) -> None:
        """Abortive close: the daemon sees a reset, not a FIN."""
        if self.closed:
            return
        with contextlib.suppress(OSError):
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = self.dead = True
        self.sock.close()
        self.arena.sockets.discard(self)

    def end(self, rng: random.Random) -> None:
        """Finish an action the way a random client would: close, or reset."""
        if rng.random() < 0.5:
            self.rst()
        else:
            self.close()


# The arena: what the test gives the hostile clients


class Arena:
    """Where hostile clients connect, and the publisher's heartbeat they pace on.

    The publisher calls :meth:`published` after each operation, and
    :meth:`run_hooks` in the instant right after it wrote a publish request
    to the control port: the callbacks registered with :meth:`at_next_publish`
    (a FIN, a reset) then run in the same instant, without yielding.
    """

    def __init__(
        self,
        ws_address: tuple[str, int],
        channels: list[str],
        control_address: tuple[str, int] | None = None,
        token_secret: str | None = None,
    ) -> None:
        self.ws_address = ws_address
        self.control_address = control_address
        """The control port, for the actions that send it large requests."""
        self.token_secret = token_secret
        """The daemon's HS256 secret, for the actions whose tokens expire."""
        self.channels = channels
        self.host = f"{ws_address[0]}:{ws_address[1]}"
        self.ops = 0
        self.stopping = False
        self.sockets: set[Hostile] = set()
        self.actions: Counter[str] = Counter()
        self.same_instant: Counter[str] = Counter()
        """Hooks run right behind a publish write, by kind."""
        self._tick = asyncio.Event()
        self._hooks: list[tuple[str, Callable[[], None], asyncio.Future[None]]] = []

    def published(self) -> None:
        self.ops += 1
        self._tick.set()
        self._tick = asyncio.Event()

    def stop(self) -> None:
        self.stopping = True
        self._tick.set()
        for _, _, future in self._hooks:
            if not future.done():
                future.set_result(None)
        self._hooks.clear()

    async def ticks(self, n: int) -> None:
        """Wait for ``n`` more publish operations (or the end of the run)."""
        target = self.ops + n
        while self.ops < target and not self.stopping:
            await self._tick.wait()

    async def at_next_publish(self, kind: str, hook: Callable[[], None]) -> None:
        """Run ``hook`` right behind the next publish request written to the daemon."""
        if self.stopping:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._hooks.append((kind, hook, future))
        await future

    def run_hooks(self) -> None:
        hooks, self._hooks = self._hooks, []
        for kind, hook, future in hooks:
            hook()
            self.same_instant[kind] += 1
            if not future.done():
                future.set_result(None)

    def close_all(self) -> None:
        """Reset every hostile socket still open (the end of the run)."""
        for hostile in list(self.sockets):
            hostile.rst()

    # Building blocks

    def random_channels(self, rng: random.Random) -> list[str]:
        return rng.sample(self.channels, rng.randint(1, len(self.channels)))

    def subscribe_path(self, rng: random.Random, channels: list[str]) -> str:
        fmt = "?format=raw" if rng.random() < 0.2 else ""
        if rng.random() < 0.7:
            return "/" + ",".join(channels) + fmt
        query = "&".join(f"channel={c}" for c in channels)
        return "/?" + query + ("&format=raw" if fmt else "")

    async def opened(
        self, rng: random.Random, *, rcvbuf: int | None = None, subscribe: bool = True
    ) -> Hostile | None:
        """A completed handshake, subscribed (in the URL, or by command) or not."""
        client = Hostile(self, rcvbuf)
        if not await client.connect():
            return None
        channels = self.random_channels(rng)
        by_command = subscribe and rng.random() < 0.3
        path = self.subscribe_path(rng, channels) if subscribe and not by_command else "/"
        if not await client.send(handshake_request(self.host, path)):
            client.end(rng)
            return None
        if await client.read_response() != 101:
            client.end(rng)
            return None
        if by_command:
            await client.send(
                b"".join(command("subscribe", c, id=i) for i, c in enumerate(channels))
            )
        return client


# The actions


async def fin_after_subscribe(arena: Arena, rng: random.Random) -> None:
    """Subscribe, then half-close: mostly in the very instant a publish is written."""
    client = await arena.opened(rng, rcvbuf=rng.choice([None, 4096]))
    if client is None:
        return
    if rng.random() < 0.75:
        await arena.at_next_publish("fin", client.fin)
    else:
        client.fin()
    # What a half-closed client does next: read the rest, linger, or go.
    choice = rng.random()
    if choice < 0.4:
        await client.read_until_eof()
    elif choice < 0.7:
        await arena.ticks(rng.randint(1, 4))
    client.end(rng)


async def fin_during_handshake(arena: Arena, rng: random.Random) -> None:
    """The whole handshake request and a FIN in one go, before any answer."""
    client = Hostile(arena, None)
    if not await client.connect():
        return
    channels = arena.random_channels(rng)
    request = handshake_request(arena.host, arena.subscribe_path(rng, channels))
    if rng.random() < 0.5:
        request += command("ping")
    client.send_now(request)
    if rng.random() < 0.5:
        await arena.at_next_publish("fin", client.fin)
    else:
        client.fin()
    if rng.random() < 0.5:
        await client.read_until_eof()
    client.end(rng)


async def reset(arena: Arena, rng: random.Random) -> None:
    """A reset at a random point of a connection's life."""
    stage = rng.choice(
        ["connected", "mid_handshake", "handshake_sent", "subscribed", "behind_publish", "unread"]
    )
    if stage in ("connected", "mid_handshake", "handshake_sent"):
        client = Hostile(arena, None)
        if not await client.connect():
            return
        request = handshake_request(arena.host, arena.subscribe_path(rng, arena.channels[:1]))
        if stage == "mid_handshake":
            await client.send(request[: rng.randint(1, len(request) - 1)])
        elif stage == "handshake_sent":
            await client.send(request)
        if rng.random() < 0.5:
            await arena.at_next_publish("rst", client.rst)
        client.rst()
        return
    client = await arena.opened(rng, rcvbuf=4096 if stage == "unread" else None)
    if client is None:
        return
    if stage == "unread":
        await arena.ticks(rng.randint(1, 6))  # messages pile up unread, then the reset
    if rng.random() < 0.3:
        await client.send(b"".join(command("ping") for _ in range(rng.randint(1, 50))))
    if stage == "behind_publish" or rng.random() < 0.3:
        await arena.at_next_publish("rst", client.rst)
    client.rst()


async def never_read(arena: Arena, rng: random.Random) -> None:
    """Subscribe with a tiny receive buffer and never read: a slow consumer."""
    client = await arena.opened(rng, rcvbuf=rng.choice([2048, 4096, 8192]))
    if client is None:
        return
    await arena.ticks(rng.randint(5, 100))  # often long enough to be cut as a slow consumer
    if rng.random() < 0.3:
        client.fin()  # a half-close while the daemon still has plenty to write
        await arena.ticks(rng.randint(0, 2))
    client.end(rng)


async def ping_flood(arena: Arena, rng: random.Random) -> None:
    """Thousands of pings, never reading a pong."""
    client = await arena.opened(rng, rcvbuf=4096, subscribe=rng.random() < 0.5)
    if client is None:
        return
    for _ in range(rng.randint(1, 3)):
        frame = client_frame(PING, os.urandom(rng.choice([0, 16, 125])))
        if not await client.flood(frame * rng.randint(2000, 20000)):
            break
        await arena.ticks(1)
    await arena.ticks(rng.randint(0, 3))
    client.end(rng)


async def command_flood(arena: Arena, rng: random.Random) -> None:
    """Thousands of valid commands (a few invalid), never reading a reply."""
    client = await arena.opened(rng, rcvbuf=4096, subscribe=rng.random() < 0.5)
    if client is None:
        return
    channels = [*arena.channels, "fi-other", "fi-x"]
    # Unsubscribing only from channels subscribed by command keeps the flood valid,
    # so that the daemon does not end it early for too many errors (1008).
    subscribed: set[str] = set()
    frames = []
    invalid = rng.randint(0, 5)
    for i in range(rng.randint(500, 4000)):
        kind = rng.random()
        if kind < 0.4:
            frames.append(command("ping", id=i))
        elif kind < 0.7 or not subscribed:
            channel = rng.choice(channels)
            subscribed.add(channel)
            frames.append(command("subscribe", channel, id=f"s{i}"))
        else:
            channel = rng.choice(sorted(subscribed))
            subscribed.discard(channel)
            frames.append(command("unsubscribe", channel))
        if invalid and rng.random() < 0.002:
            invalid -= 1
            frames.append(client_frame(TEXT, b"{not json"))
    await client.flood(b"".join(frames))
    await arena.ticks(rng.randint(1, 5))
    client.end(rng)


def _bad_frames(rng: random.Random) -> bytes:
    """One protocol violation (sometimes behind a valid command)."""
    kind = rng.choice(
        [
            "rsv1",
            "rsv2",
            "rsv3",
            "bad_opcode",
            "unmasked",
            "oversized",
            "oversized_header_only",
            "huge_length",
            "empty_continuations",
            "too_many_fragments",
            "fragments_too_big",
            "binary",
            "invalid_utf8",
            "invalid_utf8_fragmented",
            "continuation_first",
            "fragmented_ping",
            "long_ping",
            "close_bad_code",
            "close_one_byte",
            "close_then_more",
            "text_inside_fragments",
        ]
    )
    ok = command("ping") if rng.random() < 0.5 else b""
    if kind.startswith("rsv"):
        return ok + client_frame(
            TEXT, b'{"op":"ping"}', rsv={"rsv1": 4, "rsv2": 2, "rsv3": 1}[kind]
        )
    if kind == "bad_opcode":
        return ok + client_frame(rng.choice([3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF]), b"x")
    if kind == "unmasked":
        return ok + client_frame(TEXT, b'{"op":"ping"}', mask=False)
    if kind == "oversized":
        return ok + client_frame(TEXT, b" " * rng.randint(8 * 1024 + 1, 40 * 1024))
    if kind == "oversized_header_only":
        # The header announces more than the limit; only part of the payload follows.
        head = client_frame(TEXT, b"", length=rng.randint(8 * 1024 + 1, 1 << 20))
        return ok + head + os.urandom(rng.randint(0, 4096))
    if kind == "huge_length":
        return ok + client_frame(BINARY, b"", length=(1 << 63) - 1)
    if kind == "empty_continuations":
        body = client_frame(TEXT, b'{"op":', fin=False)
        body += client_frame(CONT, b"", fin=False) * rng.randint(10, 60)
        return ok + body + client_frame(CONT, b'"ping"}')
    if kind == "too_many_fragments":
        body = client_frame(TEXT, b'{"op":', fin=False)
        body += client_frame(CONT, b"", fin=False) * rng.randint(65, 3000)
        return ok + body + client_frame(CONT, b'"ping"}')
    if kind == "fragments_too_big":
        body = client_frame(TEXT, b"[", fin=False)
        body += client_frame(CONT, b" " * 1000, fin=False) * 10
        return ok + body + client_frame(CONT, b"]")
    if kind == "binary":
        return ok + client_frame(BINARY, orjson.dumps({"op": "ping"}))
    if kind == "invalid_utf8":
        return ok + client_frame(TEXT, b'{"op":"\xff\xfe"}')
    if kind == "invalid_utf8_fragmented":
        return ok + client_frame(TEXT, b'{"op":"\xe2', fin=False) + client_frame(CONT, b'\x28"}')
    if kind == "continuation_first":
        return ok + client_frame(CONT, b"x")
    if kind == "fragmented_ping":
        return ok + client_frame(PING, b"x", fin=False)
    if kind == "long_ping":
        return ok + client_frame(PING, b"x" * 126)
    if kind == "close_bad_code":
        code = rng.choice([0, 999, 1004, 1005, 1006, 1015, 2999, 5000, 65535])
        return ok + client_frame(CLOSE, struct.pack("!H", code) + b"bye")
    if kind == "close_one_byte":
        return ok + client_frame(CLOSE, b"\x03")
    if kind == "close_then_more":
        close = client_frame(CLOSE, struct.pack("!H", 1000))
        return ok + close + command("ping") * 50 + client_frame(PING, b"late") * 50
    # text_inside_fragments: a new message starts before the last one ended
    return ok + client_frame(TEXT, b"[", fin=False) + client_frame(TEXT, b"]")


async def malformed_frames(arena: Arena, rng: random.Random) -> None:
    """A protocol violation after a valid handshake; then read the close, or not."""
    client = await arena.opened(rng, rcvbuf=rng.choice([None, 4096]), subscribe=rng.random() < 0.7)
    if client is None:
        return
    data = _bad_frames(rng)
    if rng.random() < 0.3:
        # One byte at a time for a while: the parser sees every partial state.
        for i in range(min(len(data), 40)):
            if not await client.send(data[i : i + 1]):
                break
        await client.send(data[40:])
    else:
        await client.send(data)
    after = rng.random()
    if after < 0.5:
        await client.read_until_eof()
    elif after < 0.8:
        await arena.ticks(rng.randint(1, 3))
    client.end(rng)


async def handshake_with_garbage(arena: Arena, rng: random.Random) -> None:
    """A valid handshake request with garbage right behind it, in the same write."""
    client = Hostile(arena, rng.choice([None, 4096]))
    if not await client.connect():
        return
    channels = arena.random_channels(rng)
    garbage = rng.choice(
        [
            os.urandom(rng.randint(1, 3000)),
            b"\x00" * 100,
            client_frame(TEXT, b"not json at all") * 10,
            client_frame(TEXT, b'{"op":"ping"}', mask=False),
            handshake_request(arena.host, "/" + channels[0]),
            b"GET / HTTP/1.1\r\n\r\n" * 5,
            client_frame(CLOSE, struct.pack("!H", 1000)) + os.urandom(64),
            client_frame(PING, b"p") * 500,
        ]
    )
    await client.send(handshake_request(arena.host, arena.subscribe_path(rng, channels)) + garbage)
    if rng.random() < 0.7:
        await client.read_until_eof(limit=256 * 1024)
    else:
        await arena.ticks(rng.randint(1, 3))
    client.end(rng)


async def duplicate_headers(arena: Arena, rng: random.Random) -> None:
    """Handshakes with repeated or contradictory headers."""
    client = Hostile(arena, None)
    if not await client.connect():
        return
    path = arena.subscribe_path(rng, arena.random_channels(rng))
    kind = rng.choice(["origin", "key", "version", "upgrade", "host", "connection", "bad_key"])
    headers: list[tuple[str, str]] = []
    omit: tuple[str, ...] = ()
    if kind == "origin":
        headers = [("Origin", "https://a.example"), ("Origin", "https://b.example")]
    elif kind == "key":
        headers = [("Sec-WebSocket-Key", ws_key())]
    elif kind == "version":
        headers = [("Sec-WebSocket-Version", rng.choice(["13", "8"]))]
    elif kind == "upgrade":
        headers = [("Upgrade", rng.choice(["websocket", "h2c"]))]
    elif kind == "host":
        headers = [("Host", "evil.example")]
    elif kind == "connection":
        headers = [("Connection", "close")]
    else:
        omit = ("Sec-WebSocket-Key",)
        headers = [("Sec-WebSocket-Key", rng.choice(["short", "!!!!", "a" * 40]))]
    await client.send(handshake_request(arena.host, path, headers=headers, omit=omit))
    status = await client.read_response()
    if status == 101 and rng.random() < 0.5:
        await arena.ticks(rng.randint(1, 3))
    client.end(rng)


async def half_handshake(arena: Arena, rng: random.Random) -> None:
    """Send part of a handshake request, then stall, half-close or go."""
    client = Hostile(arena, None)
    if not await client.connect():
        return
    request = handshake_request(arena.host, arena.subscribe_path(rng, arena.random_channels(rng)))
    await client.send(request[: rng.randint(1, len(request) - 2)])
    then = rng.random()
    if then < 0.3:
        client.fin()
        await client.read_until_eof()
    elif then < 0.7:
        await arena.ticks(rng.randint(1, 10))  # stall (the daemon's open timeout may fire)
    client.end(rng)


async def garbage_request(arena: Arena, rng: random.Random) -> None:
    """Something on the subscriber port that is not a WebSocket handshake."""
    client = Hostile(arena, None)
    if not await client.connect():
        return
    kind = rng.choice(
        ["random", "crlf", "long_line", "many_headers", "no_colon", "http10", "post", "h2", "tls"]
    )
    data = {
        "random": os.urandom(rng.randint(1, 4096)),
        "crlf": b"\r\n\r\n",
        "long_line": b"GET /" + b"a" * 10_000 + b" HTTP/1.1\r\n\r\n",
        "many_headers": b"GET / HTTP/1.1\r\n"
        + b"".join(b"X-%d: y\r\n" % i for i in range(200))
        + b"\r\n",
        "no_colon": b"GET / HTTP/1.1\r\nHost 127.0.0.1\r\n\r\n",
        "http10": handshake_request(arena.host, "/").replace(b"HTTP/1.1", b"HTTP/1.0"),
        "post": handshake_request(arena.host, "/").replace(b"GET", b"POST", 1),
        "h2": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + os.urandom(32),
        "tls": bytes.fromhex("160301020001") + os.urandom(500),
    }[kind]
    await client.send(data)
    if rng.random() < 0.7:
        await client.read_until_eof()
    client.end(rng)


async def expires_unread(arena: Arena, rng: random.Random) -> None:
    """Subscribe with a token that expires in a second or two, with a tiny receive
    buffer, and stop reading across the expiry: the daemon must let the client go
    at ``exp`` + leeway, whatever its socket holds."""
    if arena.token_secret is None:
        return
    claims = {"sub": f"h{rng.randrange(1000)}", "exp": int(time.time()) + rng.randint(1, 2)}
    token = jwt.encode(claims, arena.token_secret, algorithm="HS256")
    client = Hostile(arena, rng.choice([2048, 4096]))
    if not await client.connect():
        return
    query = "&".join(f"channel={c}" for c in arena.random_channels(rng))
    request = handshake_request(arena.host, f"/?{query}&token={token}")
    if not await client.send(request) or await client.read_response() != 101:
        client.end(rng)
        return
    await arena.ticks(rng.randint(20, 120))
    if rng.random() < 0.5:
        await client.read_until_eof()  # what it was sent, then 4003
    client.end(rng)


async def large_control_request(arena: Arena, rng: random.Random) -> None:
    """A large request on a fresh control connection, then close: a batch (to a
    channel no witness holds), a body that is not JSON, or one over the body limit
    (refused at its head while the rest is still coming); the answer read or not."""
    if arena.control_address is None:
        return
    client = Hostile(arena, None, arena.control_address)
    if not await client.connect():
        return
    size = rng.randint(128 * 1024, 768 * 1024)
    kind = rng.choice(["batch", "garbage", "too_large"])
    if kind == "batch":
        item = b'{"channel": "fi-x", "data": "' + b"x" * 500 + b'"}'
        body = b"[" + b",".join([item] * (size // len(item))) + b"]"
        length = len(body)
    else:
        body = rng.randbytes(size)
        length = 64 * 1024 * 1024 if kind == "too_large" else size
    head = (
        f"POST /batch HTTP/1.1\r\nHost: {arena.host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\nConnection: close\r\n\r\n"
    ).encode()
    await client.flood(head + body)
    if rng.random() < 0.6:
        await client.read_until_eof()
    client.end(rng)


async def stream_opened(arena: Arena, rng: random.Random, rcvbuf: int | None) -> Hostile | None:
    """An event stream (SSE, or ndjson) on some channels, its answer's head read."""
    client = Hostile(arena, rcvbuf)
    if not await client.connect():
        return None
    path = arena.subscribe_path(rng, arena.random_channels(rng))
    accept = rng.choice(["text/event-stream", "application/x-ndjson"])
    request = f"GET {path} HTTP/1.1\r\nHost: {arena.host}\r\nAccept: {accept}\r\n\r\n"
    if not await client.send(request.encode()) or await client.read_response() != 200:
        client.end(rng)
        return None
    return client


async def stream_never_read(arena: Arena, rng: random.Random) -> None:
    """An event stream with a tiny receive buffer that is never read: a slow consumer."""
    client = await stream_opened(arena, rng, rng.choice([2048, 4096, 8192]))
    if client is None:
        return
    await arena.ticks(rng.randint(5, 100))
    client.end(rng)


async def stream_dropped(arena: Arena, rng: random.Random) -> None:
    """An event stream read for a while, then half-closed or reset, mostly in the
    very instant a publish is written."""
    client = await stream_opened(arena, rng, None)
    if client is None:
        return
    for _ in range(rng.randint(0, 5)):
        await client.recv()
    cut = client.fin if rng.random() < 0.5 else client.rst
    if rng.random() < 0.7:
        await arena.at_next_publish("stream_" + cut.__name__, cut)
    client.end(rng)


Action = Callable[[Arena, random.Random], Awaitable[None]]

ACTIONS: list[tuple[Action, int]] = [
    (fin_after_subscribe, 12),
    (fin_during_handshake, 4),
    (reset, 10),
    (never_read, 8),
    (ping_flood, 6),
    (command_flood, 6),
    (malformed_frames, 12),
    (handshake_with_garbage, 5),
    (duplicate_headers, 4),
    (half_handshake, 5),
    (garbage_request, 5),
    (expires_unread, 4),
    (large_control_request, 3),
    (stream_never_read, 5),
    (stream_dropped, 6),
]
"""Every action with its weight in a misbehaving client's schedule."""


def chosen_actions() -> list[tuple[Action, int]]:
    """ACTIONS, or only those named in FAULT_ACTIONS (comma-separated): to find
    which action a failure comes from."""
    names = [n.strip() for n in os.environ.get("FAULT_ACTIONS", "").split(",") if n.strip()]
    if not names:
        return ACTIONS
    known = {a.__name__: (a, w) for a, w in ACTIONS}
    unknown = set(names) - set(known)
    if unknown:
        raise ValueError(f"FAULT_ACTIONS: unknown {sorted(unknown)}; known: {sorted(known)}")
    return [known[n] for n in names]


async def misbehave(arena: Arena, rng: random.Random) -> None:
    """One misbehaving client: random actions until the run ends."""
    pool = chosen_actions()
    actions = [a for a, _ in pool]
    weights = [w for _, w in pool]
    while not arena.stopping:
        action = rng.choices(actions, weights)[0]
        arena.actions[action.__name__] += 1
        await action(arena, rng)
        await arena.ticks(1)
