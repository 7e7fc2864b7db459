"""The Python subscriber's bound on message size, against servers that ignore it.

Each hostile server here is a real listener on port 0, written with asyncio
streams: it completes the WebSocket opening handshake as a daemon would, then
sends what no daemon sends (a frame that announces a terabyte, a message in
fragments that never end) and records what the client answers. Memory is
measured with tracemalloc over the whole process, the hostile server included.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import tracemalloc
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import pytest

from broadcastd.client import (
    Message,
    MessageTooBig,
    State,
    StateChanged,
    Stream,
    Subscribed,
    Subscriber,
)

MiB = 1024 * 1024
MAX_SIZE = MiB
"""The subscriber's default max_size."""
SENT_AT_MOST = 32 * MAX_SIZE
"""What a hostile server sends before it gives up and drops the connection: far
more than the bound, so a client that does not enforce it holds it all."""
CHUNK = 64 * 1024
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

Attack = Callable[[asyncio.StreamWriter, list[int]], Coroutine[Any, Any, None]]
"""What a hostile server does after the handshake; the list: bytes sent so far."""


def server_frame_head(first: int, length: int) -> bytes:
    """The header of an unmasked server frame announcing ``length`` bytes."""
    if length < 126:
        return bytes((first, length))
    if length < 65536:
        return bytes((first, 126)) + length.to_bytes(2, "big")
    return bytes((first, 127)) + length.to_bytes(8, "big")


def close_code_sent(data: bytes) -> int | None:
    """The code of the first close frame among the client's (masked) frames."""
    pos = 0
    while len(data) - pos >= 6:
        first, length = data[pos], data[pos + 1] & 0x7F
        start = pos + 2
        if length == 126:
            length, start = int.from_bytes(data[start : start + 2], "big"), start + 2
        elif length == 127:
            length, start = int.from_bytes(data[start : start + 8], "big"), start + 8
        mask, payload = data[start : start + 4], data[start + 4 : start + 4 + length]
        if first & 0x0F == 0x8:
            unmasked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            return int.from_bytes(unmasked[:2], "big")
        pos = start + 4 + length
    return None


class HostileServer:
    """Accepts WebSocket connections, answers each handshake with 101, then runs
    ``act`` (which writes whatever it likes) while reading all that the client
    sends until it closes. ``answers`` holds, per connection, the bytes the client
    sent after its handshake; ``sent``, per connection, how many ``act`` got
    written before the client went."""

    def __init__(self, act: Attack) -> None:
        self.act = act
        self.answers: asyncio.Queue[bytes] = asyncio.Queue()
        self.connections = 0
        self.sent: list[int] = []
        self.url = ""

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        head = await reader.readuntil(b"\r\n\r\n")
        key = next(
            line.split(b":", 1)[1].strip()
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"sec-websocket-key:")
        )
        accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
        )
        acting = asyncio.create_task(self.act(writer, self.sent))
        received = bytearray()
        with contextlib.suppress(OSError):
            while chunk := await reader.read(65536):
                received += chunk
        # The client is gone (or the act gave up and closed): stop writing.
        acting.cancel()
        with contextlib.suppress(asyncio.CancelledError, OSError):
            await acting
        writer.close()
        self.answers.put_nowait(bytes(received))

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[HostileServer]:
        server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        self.url = f"ws://127.0.0.1:{port}"
        async with server:
            yield self


async def announce_a_terabyte(writer: asyncio.StreamWriter, sent: list[int]) -> None:
    """One text frame of 2**40 bytes, its payload streamed for as long as the
    client takes it (up to SENT_AT_MOST, then the connection is dropped)."""
    writer.write(server_frame_head(0x81, 2**40))
    await stream_until_refused(writer, bytes(CHUNK), sent)


async def endless_fragments(writer: asyncio.StreamWriter, sent: list[int]) -> None:
    """A text message begun in one frame and continued in 4 KiB frames that never
    end it (up to SENT_AT_MOST, then the connection is dropped)."""
    fragment = b"a" * 4096
    writer.write(server_frame_head(0x01, len(fragment)) + fragment)
    continuation = server_frame_head(0x00, len(fragment)) + fragment
    await stream_until_refused(writer, continuation * (CHUNK // len(continuation)), sent)


async def announce_a_terabyte_ping(writer: asyncio.StreamWriter, sent: list[int]) -> None:
    """A ping (a control frame: 125 bytes at most) that announces 2**40 bytes."""
    writer.write(server_frame_head(0x89, 2**40))
    await stream_until_refused(writer, bytes(CHUNK), sent)


async def stream_until_refused(writer: asyncio.StreamWriter, chunk: bytes, sent: list[int]) -> None:
    total = 0
    sent.append(total)
    try:
        while total < SENT_AT_MOST:
            writer.write(chunk)
            await writer.drain()
            total += len(chunk)
            sent[-1] = total
    finally:
        writer.close()


async def first_disconnect(stream: Stream) -> StateChanged:
    """The stream's first DISCONNECTED event; the timeout only turns a hang into a
    failure."""
    async with asyncio.timeout(60):
        async for item in stream:
            if isinstance(item, StateChanged) and item.state is State.DISCONNECTED:
                return item
    raise AssertionError("the stream ended without a disconnection")


async def read_to_the_end(stream: Stream, into: list[Any]) -> None:
    """Append what the stream yields to ``into`` until it ends or raises."""
    async with asyncio.timeout(60):
        async for item in stream:
            into.append(item)


@contextlib.contextmanager
def peak_memory() -> Any:
    """Trace allocations in the block; ``peak[0]``: the most held at once."""
    peak = [0]
    tracemalloc.start()
    try:
        yield peak
        peak[0] = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize(
    ("act", "peak_below"),
    [
        # Refused from its header: nothing of the payload is kept.
        pytest.param(announce_a_terabyte, MAX_SIZE // 2, id="a frame of 2**40 bytes"),
        # Kept up to the bound (that much is a legitimate message), not past it:
        # the bound, plus a few reads of the socket.
        pytest.param(endless_fragments, 3 * MAX_SIZE, id="endless continuation frames"),
    ],
)
async def test_a_message_over_max_size_fails_the_connection_with_1009_and_ends_the_stream(
    act: Attack, peak_below: int
) -> None:
    server = HostileServer(act)
    async with server.serving():
        with peak_memory() as peak:
            async with Subscriber(server.url, max_backoff=0.1) as sub:
                stream = sub.subscribe("news", events={StateChanged})
                lost = await first_disconnect(stream)
                assert lost.close_code == 1009
                assert lost.retry_in is None  # not retried: the same message would come again
                answer = await server.answers.get()
                assert close_code_sent(answer) == 1009
                rest: list[Any] = []
                with pytest.raises(MessageTooBig) as raised:
                    await read_to_the_end(stream, rest)
    assert rest == [StateChanged(State.CLOSED)]
    assert lost.error is raised.value
    assert (raised.value.code, raised.value.close_code) == ("message_too_big", 1009)
    assert server.connections == 1
    assert server.sent[0] < SENT_AT_MOST  # the client went before the server gave up
    assert peak[0] < peak_below, f"{peak[0]} bytes held at the peak"


async def test_a_control_frame_announcing_more_than_125_bytes_fails_at_its_header() -> None:
    """A ping of 2**40 bytes breaks the protocol (1002) as soon as its header is
    read, instead of being gathered until it is whole; a protocol error is retried."""
    server = HostileServer(announce_a_terabyte_ping)
    async with server.serving():
        with peak_memory() as peak:
            async with Subscriber(server.url, max_backoff=0.1) as sub:
                lost = await first_disconnect(sub.subscribe("news", events={StateChanged}))
                answer = await server.answers.get()
    assert close_code_sent(answer) == 1002
    assert lost.close_code == 1006  # no close frame came from the peer
    assert lost.retry_in is not None
    assert server.sent[0] < SENT_AT_MOST
    assert peak[0] < MAX_SIZE // 2, f"{peak[0]} bytes held at the peak"


def envelope_overhead(message: Message, payload: str) -> int:
    """The bytes of ``message``'s frame around its string payload."""
    assert message.data == payload
    return len(message.frame.encode()) - len(payload)


async def test_a_message_of_exactly_max_size_is_received_and_one_byte_more_is_not(
    daemon_factory: Any,
) -> None:
    settings = {"control__max_payload_bytes": 2 * MiB, "ws__outbox_bytes": 4 * MiB}
    async with daemon_factory(**settings) as d, Subscriber(d.ws_url) as sub:
        stream = sub.subscribe("big", events={Subscribed, StateChanged})
        async with asyncio.timeout(30):
            async for item in stream:
                if isinstance(item, Subscribed):
                    break
            await d.publish("big", "x")
            first = await anext(stream)
        assert isinstance(first, Message)
        # Offsets 1 to 3 have one digit: every frame has the same envelope.
        fits = "y" * (MAX_SIZE - envelope_overhead(first, "x"))
        await d.publish("big", fits)
        async with asyncio.timeout(30):
            at_the_bound = await anext(stream)
        assert isinstance(at_the_bound, Message)
        assert (at_the_bound.offset, len(at_the_bound.frame.encode())) == (2, MAX_SIZE)
        assert at_the_bound.data == fits

        await d.publish("big", fits + "y")
        async with asyncio.timeout(30):
            lost = await anext(stream)
            assert isinstance(lost, StateChanged)
            assert (lost.state, lost.close_code) == (State.DISCONNECTED, 1009)
            rest: list[Any] = []
            with pytest.raises(MessageTooBig):
                await read_to_the_end(stream, rest)
            assert rest == [StateChanged(State.CLOSED)]


def test_max_size_below_one_byte_is_refused() -> None:
    with pytest.raises(ValueError, match="max_size"):
        Subscriber("ws://127.0.0.1:8765", max_size=0)


async def test_a_larger_max_size_takes_a_larger_message(daemon_factory: Any) -> None:
    settings = {"control__max_payload_bytes": 2 * MiB, "ws__outbox_bytes": 4 * MiB}
    async with daemon_factory(**settings) as d, Subscriber(d.ws_url, max_size=2 * MiB) as sub:
        stream = sub.subscribe("big", events={Subscribed})
        payload = "z" * (MAX_SIZE + 1)
        async with asyncio.timeout(30):
            assert isinstance(await anext(stream), Subscribed)
            await d.publish("big", payload)
            message = await anext(stream)
        assert isinstance(message, Message)
        assert message.data == payload
