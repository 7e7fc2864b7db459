"""The auto-pipelining Redis command connection, against a real redis-server."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import shutil
import ssl
import tempfile
import time
import weakref
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any, cast

import hiredis
import pytest
from redis.exceptions import RedisError

from broadcastd.broker.commands import (
    CommandConnection,
    CommandError,
    CommandTimeout,
    ConnectionLost,
    HandshakeRefused,
)

from .conftest import cyclic_garbage_of
from .redisserver import RedisServer, RedisServerError, make_tls_files

COUNTER = """
local n = redis.call('INCR', KEYS[1])
if ARGV[1] == 'fail' then return redis.error_reply('FAILED on purpose') end
return n
"""
COUNTER_SHA = hashlib.sha1(COUNTER.encode()).hexdigest()
PASSWORD = "s3cret p@ss"


class CountingTransport:
    """The real transport, counting the writes it is given."""

    def __init__(self, transport: asyncio.BaseTransport, writes: list[int]) -> None:
        self._transport = transport
        self.writes = writes

    def write(self, data: bytes) -> None:
        self.writes.append(len(data))
        cast(asyncio.Transport, self._transport).write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class CountingConnection(CommandConnection):
    """A CommandConnection whose writes and pauses are counted."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.writes: list[int] = []
        self.pauses = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, CountingTransport(transport, self.writes))
        super().connection_made(self.transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        self.pauses += 1
        super().pause_writing()


@asynccontextmanager
async def opened(url: str, **kwargs: Any) -> AsyncIterator[CountingConnection]:
    connection = cast(CountingConnection, await CountingConnection.open(url, 10, **kwargs))
    try:
        yield connection
    finally:
        connection.close()


async def answered(future: asyncio.Future[Any]) -> Any:
    """The reply, or the exception the call failed with (the timeout only turns a
    hang into a failure)."""
    async with asyncio.timeout(10):
        try:
            return await future
        except Exception as exc:
            return exc


def stats(server: RedisServer) -> dict[str, int]:
    """Calls per command since the last CONFIG RESETSTAT (``script|load``...)."""
    info = server.client().info("commandstats")
    return {name.removeprefix("cmdstat_"): int(value["calls"]) for name, value in info.items()}


@contextmanager
def private_server(tmp_path: Path, **options: Any) -> Iterator[RedisServer]:
    with RedisServer(tmp_path / "private", persistence=False, **options) as server:
        yield server


# Pipelining


async def test_many_calls_of_one_turn_are_answered_in_order(redis_server: RedisServer) -> None:
    async with opened(redis_server.url) as connection:
        counts = [connection.call("INCR", "n") for _ in range(3000)]
        sets = [connection.call("SET", f"k{i}", f"v{i}") for i in range(500)]
        gets = [connection.call("GET", f"k{i}") for i in range(500)]
        assert connection.in_flight == 4000
        assert [await answered(f) for f in counts] == list(range(1, 3001))
        assert {await answered(f) for f in sets} == {b"OK"}
        assert [await answered(f) for f in gets] == [f"v{i}".encode() for i in range(500)]
        assert connection.in_flight == 0


async def test_the_calls_of_one_turn_leave_in_one_write(redis_server: RedisServer) -> None:
    async with opened(redis_server.url) as connection:
        first = [connection.call("INCR", "n") for _ in range(1000)]
        first += [connection.script(COUNTER_SHA, COUNTER, ["m"], ["ok"]) for _ in range(1000)]
        await asyncio.sleep(0)  # one turn: the write is made, no reply is awaited yet
        second = [connection.call("GET", "n") for _ in range(10)]
        assert [await answered(f) for f in first][999] == 1000
        assert {await answered(f) for f in second} == {b"1000"}
        assert len(connection.writes) == 2
        third = await answered(connection.call("PING"))
        assert third == b"PONG"
        assert len(connection.writes) == 3


async def test_the_handshake_is_one_write(tmp_path: Path) -> None:
    with private_server(tmp_path, password=PASSWORD) as server:
        async with opened(server.url.replace("/0", "/2")) as connection:
            assert len(connection.writes) == 1  # AUTH and SELECT together
            assert await answered(connection.call("SET", "k", "v")) == b"OK"
        assert server.client(db=2).get("k") == b"v"


# Errors of one call


async def test_an_error_reply_fails_its_own_call_only(redis_server: RedisServer) -> None:
    async with opened(redis_server.url) as connection:
        futures = [
            connection.call("SET", "text", "v"),
            connection.call("INCR", "text"),
            connection.call("GET", "text"),
            connection.call("NO-SUCH-COMMAND"),
            connection.call("LPUSH", "text", "x"),
            connection.script(COUNTER_SHA, COUNTER, ["n"], ["fail"]),
            connection.script(COUNTER_SHA, COUNTER, ["n"], ["ok"]),
            connection.call("PING"),
        ]
        replies = [await answered(f) for f in futures]
    assert replies[0] == b"OK"
    assert replies[2] == b"v"
    assert replies[6] == 2
    assert replies[7] == b"PONG"
    errors = [replies[i] for i in (1, 3, 4, 5)]
    assert all(isinstance(e, CommandError) for e in errors), errors
    assert [cast(CommandError, e).code for e in errors] == ["ERR", "ERR", "WRONGTYPE", "FAILED"]
    assert all(isinstance(e, RedisError) for e in errors)  # what the broker catches


async def test_bad_arguments_are_refused_before_anything_is_sent(
    redis_server: RedisServer,
) -> None:
    async with opened(redis_server.url) as connection:
        for bad in (None, True, [1], bytearray(b"x")):
            with pytest.raises(TypeError):
                connection.call("SET", "k", bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="at least its name"):
            connection.call()
        assert connection.in_flight == 0
        assert await answered(connection.call("SET", "k", 7)) == b"OK"
        assert await answered(connection.call("GET", "k")) == b"7"


# Scripts


async def test_a_script_is_loaded_once_per_connection(redis_server: RedisServer) -> None:
    redis_server.client().config_resetstat()
    async with opened(redis_server.url) as connection:
        for _ in range(3):
            futures = [connection.script(COUNTER_SHA, COUNTER, ["n"], ["ok"]) for _ in range(20)]
            assert [await answered(f) for f in futures][-1] > 0
        assert len(connection.writes) == 3  # the SCRIPT LOAD went with the first calls
    counted = stats(redis_server)
    assert counted["script|load"] == 1
    assert counted["evalsha"] == 60
    assert "eval" not in counted


async def test_a_flushed_script_is_sent_again_in_order(redis_server: RedisServer) -> None:
    async with opened(redis_server.url) as connection:
        assert await answered(connection.script(COUNTER_SHA, COUNTER, ["n"], ["ok"])) == 1
        redis_server.client().script_flush()
        redis_server.client().config_resetstat()
        futures = [connection.script(COUNTER_SHA, COUNTER, ["n"], ["ok"]) for _ in range(50)]
        assert [await answered(f) for f in futures] == list(range(2, 52))
        counted = stats(redis_server)
        assert counted["evalsha"] == 50  # each refused with NOSCRIPT...
        assert counted["eval"] == 50  # ...and run as EVAL, in the order called
        # Loaded again with the next call, which is EVALSHA again.
        assert await answered(connection.script(COUNTER_SHA, COUNTER, ["n"], ["ok"])) == 52
    counted = stats(redis_server)
    assert counted["script|load"] == 1
    assert counted["evalsha"] == 51


# Backpressure


async def test_calls_beyond_the_cap_wait_their_turn(redis_server: RedisServer) -> None:
    async with opened(redis_server.url, max_in_flight=10) as connection:
        futures = [connection.call("INCR", "n") for _ in range(200)]
        assert connection.in_flight == 10
        assert connection.waiting_for_room == 190
        futures[100].cancel()  # its caller gives up while it waits: never sent
        replies = [await answered(f) for i, f in enumerate(futures) if i != 100]
        assert replies == list(range(1, 200))
        assert len(connection.writes) > 1
        assert connection.waiting_for_room == 0
    assert redis_server.client().get("n") == b"199"


async def test_raising_the_cap_sends_waiting_calls(redis_server: RedisServer) -> None:
    async with opened(redis_server.url, max_in_flight=1) as connection:
        futures = [connection.script(COUNTER_SHA, COUNTER, ["n"], ["ok"]) for _ in range(50)]
        assert connection.waiting_for_room == 49
        connection.max_in_flight = 100
        assert connection.waiting_for_room == 0
        assert [await answered(f) for f in futures] == list(range(1, 51))


async def test_while_the_transport_is_paused_the_output_stays_here(
    tmp_path: Path,
) -> None:
    """A Redis that does not read: once the transport asks for a pause nothing
    more is written to it (its buffer stops growing), and everything asked for
    meanwhile is sent, in order, once Redis reads again."""
    value = b"x" * 256 * 1024
    with private_server(tmp_path) as server:
        async with opened(server.url) as connection:
            transport = connection.transport
            assert transport is not None
            transport.set_write_buffer_limits(high=64 * 1024)
            futures = []
            server.freeze()
            try:
                for i in range(200):  # the kernel's buffers take some megabytes first
                    futures.append(connection.call("SET", f"k{i}", value))
                    await asyncio.sleep(0)
                    if connection.pauses:
                        break
                assert connection.pauses == 1
                writes, buffered = len(connection.writes), transport.get_write_buffer_size()
                for _ in range(20):
                    futures.append(connection.call("INCR", "n"))
                    await asyncio.sleep(0)
                assert len(connection.writes) == writes
                assert transport.get_write_buffer_size() <= buffered
            finally:
                server.thaw()
            replies = [await answered(f) for f in futures]
            assert replies[-20:] == list(range(1, 21))
            assert set(replies[:-20]) == {b"OK"}


# The end of a connection


async def test_a_lost_connection_fails_every_waiting_call(redis_server: RedisServer) -> None:
    async with opened(redis_server.url, max_in_flight=5) as connection:
        redis_server.freeze()
        futures = [connection.call("INCR", "n") for _ in range(20)]
        await asyncio.sleep(0)  # sent, unanswered
        redis_server.kill()
        replies = [await answered(f) for f in futures]
        assert all(isinstance(r, ConnectionLost) for r in replies), replies
        assert all(isinstance(r, ConnectionError) for r in replies)  # what the broker catches
        assert len({id(r) for r in replies}) == 20  # each its own, with its own traceback
        assert connection.closed
        assert connection.in_flight == connection.waiting_for_room == 0
        reason = await connection.lost
        assert isinstance(reason, ConnectionLost)
        with pytest.raises(ConnectionLost):
            connection.call("PING")
    redis_server.start()
    async with opened(redis_server.url) as again:
        assert await answered(again.call("PING")) == b"PONG"


async def test_a_missed_deadline_fails_every_waiting_call(redis_server: RedisServer) -> None:
    async with opened(redis_server.url, call_timeout=0.2, max_in_flight=5) as connection:
        assert await answered(connection.call("PING")) == b"PONG"
        redis_server.freeze()
        try:
            futures = [connection.call("INCR", "n") for _ in range(20)]
            replies = [await answered(f) for f in futures]
        finally:
            redis_server.thaw()
        assert all(isinstance(r, CommandTimeout) for r in replies), replies
        assert all(isinstance(r, TimeoutError) for r in replies)  # what the broker catches
        assert connection.closed
        assert isinstance(await connection.lost, CommandTimeout)
        with pytest.raises(ConnectionLost):
            connection.call("PING")


async def test_a_deadline_is_per_call_not_per_connection(redis_server: RedisServer) -> None:
    """Calls answered in time, one after the other, never trip the deadline,
    however long the connection has been busy."""
    async with opened(redis_server.url, call_timeout=2.0) as connection:
        for _ in range(3):
            assert await answered(connection.call("DEBUG", "SLEEP", "0.8")) == b"OK"
        assert not connection.closed


async def test_a_loop_busy_past_the_deadline_is_not_taken_for_a_silent_redis(
    redis_server: RedisServer,
) -> None:
    """Redis answers at once, but the node's loop is busy (a storm of its own
    clients) past the deadline before it reads the reply: the deadline is judged
    after the sockets were read, so the call succeeds and the connection stays."""
    async with opened(redis_server.url, call_timeout=0.2) as connection:
        assert await answered(connection.call("PING")) == b"PONG"
        future = connection.call("PING")
        asyncio.get_running_loop().call_soon(time.sleep, 0.6)  # CPU-bound work, not a wait
        assert await answered(future) == b"PONG"
        assert not connection.closed


async def test_close_fails_waiting_calls_and_is_idempotent(redis_server: RedisServer) -> None:
    connection = await CommandConnection.open(redis_server.url, 10)
    redis_server.freeze()
    try:
        futures = [connection.call("PING") for _ in range(3)]
        connection.close()
        connection.close()
        replies = [await answered(f) for f in futures]
        assert all(isinstance(r, ConnectionLost) for r in replies), replies
        assert await connection.lost is None
    finally:
        redis_server.thaw()


async def test_what_is_not_redis_ends_the_connection() -> None:
    """A URL pointing at another service: its answer is not RESP, and the calls
    fail as with a lost connection instead of being matched to garbage."""

    async def http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)
        writer.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        await writer.drain()
        await reader.read()  # until the client closes
        writer.close()

    server = await asyncio.start_server(http, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        connection = await CommandConnection.open(f"redis://127.0.0.1:{port}/0", 10)
        reply = await answered(connection.call("PING"))
        assert isinstance(reply, ConnectionLost)
        assert "out of step" in str(reply)
        assert connection.closed


# Opening: AUTH, SELECT, Unix sockets, TLS


async def test_auth_with_the_right_and_a_wrong_password(tmp_path: Path) -> None:
    with private_server(tmp_path, password=PASSWORD) as server:
        async with opened(server.url) as connection:
            assert await answered(connection.call("PING")) == b"PONG"
        with_user = server.url.replace("redis://:", "redis://default:")
        async with opened(with_user) as connection:
            assert await answered(connection.call("PING")) == b"PONG"

        wrong = server.url.replace("s3cret", "wrong")
        with pytest.raises(HandshakeRefused, match="refused AUTH: WRONGPASS") as refused:
            await CommandConnection.open(wrong, 10)
        assert isinstance(refused.value, ConnectionError)
        assert "wrong p" not in str(refused.value)
        assert "s3cret" not in str(refused.value)

        anonymous = f"redis://127.0.0.1:{server.port}/0"
        async with opened(anonymous) as connection:
            reply = await answered(connection.call("PING"))
            assert isinstance(reply, CommandError)
            assert reply.code == "NOAUTH"
        with pytest.raises(HandshakeRefused, match="refused SELECT: NOAUTH"):
            await CommandConnection.open(anonymous.replace("/0", "/1"), 10)


async def test_select_the_url_database(redis_server: RedisServer) -> None:
    async with opened(redis_server.url.replace("/0", "/3")) as connection:
        assert await answered(connection.call("SET", "where", "three")) == b"OK"
    assert redis_server.client(db=3).get("where") == b"three"
    assert redis_server.client(db=0).get("where") is None


async def test_a_unix_socket(tmp_path: Path) -> None:
    directory = Path(tempfile.mkdtemp(prefix="redis-"))  # socket paths are short
    try:
        with private_server(tmp_path, unix_socket=directory / "redis.sock") as server:
            async with opened(server.unix_url.replace("db=0", "db=4")) as connection:
                assert await answered(connection.call("SET", "k", "v")) == b"OK"
            assert server.client(db=4).get("k") == b"v"
    finally:
        shutil.rmtree(directory, ignore_errors=True)


async def test_tls(tmp_path: Path) -> None:
    tls = make_tls_files(tmp_path / "tls")
    server = RedisServer(tmp_path / "private", persistence=False, tls=tls, password=PASSWORD)
    try:
        server.start()
    except RedisServerError as exc:
        if "tls" in str(exc).lower():
            pytest.skip(f"this redis-server has no TLS: {exc}")
        raise
    with server:
        async with opened(server.tls_url) as connection:
            assert await answered(connection.call("PING")) == b"PONG"
        untrusted = server.tls_url.split("?", 1)[0]  # the system's CAs only
        with pytest.raises(ssl.SSLCertVerificationError):
            await CommandConnection.open(untrusted, 10)


async def test_nothing_listening_and_a_bad_url() -> None:
    with pytest.raises(OSError):
        await CommandConnection.open("redis://127.0.0.1:1/0", 10)
    with pytest.raises(ValueError):
        await CommandConnection.open("http://127.0.0.1:6379/0", 10)
    with pytest.raises(ValueError, match="path"):
        await CommandConnection.open("unix://", 10)
    with pytest.raises(ValueError, match="ssl_cert_reqs"):
        await CommandConnection.open("rediss://127.0.0.1:1/0?ssl_cert_reqs=maybe", 10)


# Freed by reference counting


OURS = (
    CommandConnection,
    CommandError,
    ConnectionLost,
    CommandTimeout,
    HandshakeRefused,
    hiredis.Reader,
    asyncio.Future,
)


def cyclic_garbage() -> list[str]:
    """Objects of the connection's that only the cyclic collector would free now."""
    return cyclic_garbage_of(OURS, ("Transport",))


async def freed(refs: list[weakref.ref[Any]]) -> list[str]:
    """What of ``refs`` is still alive once the loop has run the transports' last
    callbacks (connection_lost comes in a callback of its own)."""
    for _ in range(100):
        if all(ref() is None for ref in refs) and not connections():
            break
        await asyncio.sleep(0)
    return [type(o).__qualname__ for ref in refs if (o := ref()) is not None]


def connections() -> list[str]:
    return [type(o).__qualname__ for o in gc.get_objects() if isinstance(o, CommandConnection)]


async def use_and_lose(server: RedisServer) -> list[weakref.ref[Any]]:
    """Connections through every way of ending: closed after calls, replies,
    errors and a NOSCRIPT retry; lost to a killed server while calls wait; past
    a deadline; refused at AUTH. Returns weak references to them."""
    refs: list[weakref.ref[Any]] = []
    failures: list[str] = []

    connection = await CommandConnection.open(server.url, 10, call_timeout=5, max_in_flight=3)
    refs.append(weakref.ref(connection))
    futures = [connection.call("INCR", "n") for _ in range(10)]
    futures.append(connection.call("NO-SUCH-COMMAND"))
    futures.append(connection.script(COUNTER_SHA, COUNTER, ["n"], ["ok"]))
    for future in futures:
        try:
            await future
        except CommandError as exc:
            failures.append(type(exc).__name__)
    server.client().script_flush()
    await connection.script(COUNTER_SHA, COUNTER, ["n"], ["ok"])
    connection.close()
    del connection, futures, future

    connection = await CommandConnection.open(server.url, 10, max_in_flight=2)
    refs.append(weakref.ref(connection))
    server.freeze()
    futures = [connection.call("PING") for _ in range(5)]
    await asyncio.sleep(0)
    server.kill()
    for future in futures:
        try:
            await future
        except ConnectionLost as exc:
            failures.append(type(exc).__name__)
    try:
        connection.call("PING")
    except ConnectionLost as exc:
        failures.append(type(exc).__name__)
    del connection, futures, future
    server.start()

    connection = await CommandConnection.open(server.url, 10, call_timeout=0.1)
    refs.append(weakref.ref(connection))
    server.freeze()
    try:
        await connection.call("PING")
    except CommandTimeout as exc:
        failures.append(type(exc).__name__)
    finally:
        server.thaw()
    del connection

    try:
        await CountingConnection.open(server.url.replace("/0", "/99999"), 10)
    except HandshakeRefused as exc:
        failures.append(type(exc).__name__)

    assert failures == ["CommandError"] + ["ConnectionLost"] * 6 + [
        "CommandTimeout",
        "HandshakeRefused",
    ]
    return refs


async def test_ended_connections_need_no_cyclic_collector(redis_server: RedisServer) -> None:
    """The daemon tunes the cyclic collector down: a connection that has ended
    must be freed by reference counting alone, whichever way it ended."""
    gc.collect()
    gc.disable()
    try:
        refs = await use_and_lose(redis_server)
        assert await freed(refs) == []
        assert connections() == []
        assert cyclic_garbage() == []
    finally:
        gc.enable()


async def test_the_client_benchmark_runs(redis_factory: Any) -> None:
    """benchmarks/redis_client.py builds its calls from the broker's own code:
    it must keep running (and checking every reply) as the broker changes."""
    from benchmarks.redis_client import Commands, RedisPy, bench

    server = redis_factory(persistence=False)
    rows = await bench(server, [RedisPy(), Commands()], 0.01)
    assert [(row[0], row[1], row[2]) for row in rows[:2]] == [
        ("publish", "1", "redis-py"),
        ("publish", "64", "redis-py"),
    ]
    assert len(rows) == 14
