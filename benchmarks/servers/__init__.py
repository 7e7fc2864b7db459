"""Servers under test: how to start each one and how its protocol differs."""

from benchmarks.servers.adapters import (
    SERVERS,
    Broadcastd,
    BroadcastdRedis,
    BroadcastdRedis2,
    Naive,
    Nchan,
)
from benchmarks.servers.base import HOST, Server, ServerError

__all__ = [
    "HOST",
    "SERVERS",
    "Broadcastd",
    "BroadcastdRedis",
    "BroadcastdRedis2",
    "Naive",
    "Nchan",
    "Server",
    "ServerError",
]
