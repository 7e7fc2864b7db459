"""The control port's HTTP protocol driven in process, against a fake transport and
a fake API whose answers the test gives when it likes: pipelined requests whose
answers wait (publishes through Redis) are all under way at once, and answered
in request order whichever answer comes first."""

from __future__ import annotations

import asyncio
import re
from typing import Any

from broadcastd.errors import ClientError, InternalError
from broadcastd.transport.http import MAX_IN_FLIGHT, HttpProtocol, Limits, Request, Response


class FakeTransport(asyncio.Transport):
    """What the protocol writes, and whether it closed or paused reading."""

    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closed = False
        self.reading = True

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += data

    def get_write_buffer_size(self) -> int:
        return 0

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        pass

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_reading(self) -> bool:
        return self.reading


class LaterApi:
    """``/wait/N`` answers when the test resolves it; anything else at once."""

    def __init__(self) -> None:
        self.asked: list[str] = []
        self.later: dict[str, asyncio.Future[Response]] = {}

    def handle(self, request: Request) -> Response | asyncio.Future[Response]:
        self.asked.append(request.path)
        if request.path.startswith("/wait/"):
            future: asyncio.Future[Response] = asyncio.get_running_loop().create_future()
            self.later[request.path] = future
            return future
        return Response(200, request.path.encode())

    def check(self, request: Request) -> ClientError | None:
        return None

    def refuse(self, error: ClientError | InternalError, request: Request | None) -> Response:
        return Response(error.http_status, error.code.encode())


def connect(api: LaterApi) -> tuple[HttpProtocol, FakeTransport]:
    protocol = HttpProtocol(api, Limits(max_header=8192, max_body=65536, idle_timeout=60), set())
    transport = FakeTransport()
    protocol.connection_made(transport)
    return protocol, transport


def requests(*paths: str, close_last: bool = False) -> bytes:
    heads = []
    for i, path in enumerate(paths):
        close = "Connection: close\r\n" if close_last and i == len(paths) - 1 else ""
        heads.append(f"GET {path} HTTP/1.1\r\nHost: x\r\n{close}\r\n")
    return "".join(heads).encode()


def bodies(transport: FakeTransport) -> list[str]:
    return [m.decode() for m in re.findall(rb"\r\n\r\n(/[a-z0-9/]+)", bytes(transport.written))]


async def settle() -> None:
    """Let done callbacks run: one loop turn each, a few at most."""
    for _ in range(5):
        await asyncio.sleep(0)


async def test_pipelined_waiting_answers_are_all_under_way_and_written_in_order() -> None:
    api = LaterApi()
    protocol, transport = connect(api)
    protocol.data_received(requests("/wait/1", "/now/2", "/wait/3", "/now/4"))
    # Every request reached the API before the first answer came.
    assert api.asked == ["/wait/1", "/now/2", "/wait/3", "/now/4"]
    assert transport.written == b""
    api.later["/wait/3"].set_result(Response(200, b"/wait/3"))
    await settle()
    assert transport.written == b""  # the first answer is still to come
    api.later["/wait/1"].set_result(Response(200, b"/wait/1"))
    await settle()
    assert bodies(transport) == ["/wait/1", "/now/2", "/wait/3", "/now/4"]


async def test_a_request_after_the_answers_waiting_is_answered_after_them() -> None:
    api = LaterApi()
    protocol, transport = connect(api)
    protocol.data_received(requests("/wait/1"))
    protocol.data_received(requests("/now/2"))
    assert api.asked == ["/wait/1", "/now/2"]
    api.later["/wait/1"].set_result(Response(200, b"/wait/1"))
    await settle()
    protocol.data_received(requests("/now/3"))
    assert bodies(transport) == ["/wait/1", "/now/2", "/now/3"]


async def test_a_failed_answer_is_a_500_in_its_place() -> None:
    api = LaterApi()
    protocol, transport = connect(api)
    protocol.data_received(requests("/wait/1", "/now/2"))
    api.later["/wait/1"].set_exception(RuntimeError("bug"))
    await settle()
    written = bytes(transport.written)
    assert written.startswith(b"HTTP/1.1 500")
    assert bodies(transport) == ["/now/2"]


async def test_connection_close_waits_for_the_answers_before_it() -> None:
    api = LaterApi()
    protocol, transport = connect(api)
    protocol.data_received(requests("/wait/1", "/now/2", close_last=True))
    assert not transport.closed
    api.later["/wait/1"].set_result(Response(200, b"/wait/1"))
    await settle()
    assert bodies(transport) == ["/wait/1", "/now/2"]
    assert transport.closed


async def test_at_most_max_in_flight_answers_are_under_way() -> None:
    api = LaterApi()
    protocol, transport = connect(api)
    paths = [f"/wait/{i}" for i in range(MAX_IN_FLIGHT + 20)]
    protocol.data_received(requests(*paths))
    assert len(api.asked) == MAX_IN_FLIGHT  # the rest waits, parsed or not
    for path in paths[:10]:
        api.later[path].set_result(Response(200, path.encode()))
    await settle()
    assert len(api.asked) == MAX_IN_FLIGHT + 10
    for path in paths[10:]:
        api.later[path].set_result(Response(200, path.encode()))
        await settle()
    assert bodies(transport) == paths
    assert transport.reading


async def test_answers_to_a_closed_connection_are_dropped(caplog: Any) -> None:
    api = LaterApi()
    protocol, transport = connect(api)
    protocol.data_received(requests("/wait/1", "/now/2"))
    protocol.connection_lost(None)
    api.later["/wait/1"].set_result(Response(200, b"/wait/1"))
    await settle()
    assert transport.written == b""
