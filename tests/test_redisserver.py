"""The RedisServer test helper does what the broker tests rely on it for."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import redis

from .redisserver import RedisServer


def test_start_ping_set_get(redis_server: RedisServer) -> None:
    client = redis_server.client()
    assert client.ping()
    client.set("greeting", "hello")
    assert client.get("greeting") == b"hello"
    assert redis_server.url == f"redis://127.0.0.1:{redis_server.port}/0"
    assert client.info("server")["process_id"] == redis_server.pid


def test_restart_with_persistence_keeps_data(redis_server: RedisServer) -> None:
    redis_server.client().set("kept", "1")
    port, pid = redis_server.port, redis_server.pid
    redis_server.restart()
    assert redis_server.port == port
    assert redis_server.pid != pid
    assert redis_server.client().get("kept") == b"1"


def test_kill_with_persistence_keeps_acknowledged_writes(redis_server: RedisServer) -> None:
    """appendfsync always: a reply means the write is on disk, even for a crash."""
    redis_server.client().set("kept", "1")
    redis_server.kill()
    redis_server.start()
    assert redis_server.client().get("kept") == b"1"


def test_restart_without_persistence_loses_data(
    redis_factory: Callable[..., RedisServer],
) -> None:
    server = redis_factory(persistence=False)
    client = server.client()
    client.set("lost", "1")
    client.save()  # even an explicit snapshot must not survive the restart
    server.restart()
    assert client.get("lost") is None
    assert client.dbsize() == 0


def test_freeze_hangs_and_thaw_answers(redis_server: RedisServer) -> None:
    client = redis_server.client(socket_timeout=0.2)
    assert client.ping()
    redis_server.freeze()
    with pytest.raises(redis.TimeoutError):
        client.ping()
    redis_server.thaw()
    assert client.ping()


def test_two_servers_get_different_ports(redis_factory: Callable[..., RedisServer]) -> None:
    first, second = redis_factory(), redis_factory()
    assert first.port != second.port
    first.client().set("shard", "first")
    assert second.client().get("shard") is None
