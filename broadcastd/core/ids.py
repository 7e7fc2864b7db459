"""Identities of nodes and of their clients.

A client id must be unique across every node of a deployment and across
restarts (presence, the server API and the logs name a connection by it), and
cheap: a connection storm makes thousands per second, where a ``uuid4`` costs a
``getrandom`` system call each. So each process draws one random node id from
the OS when it starts, and its client ids are that node id and a counter:
unique while node ids are, which 48 random bits make certain for any fleet
that restarts.
"""

from __future__ import annotations

import itertools
import os

NODE_ID_BYTES = 6
"""48 random bits: twelve hexadecimal digits."""


def new_node_id() -> str:
    """A fresh node id: twelve hexadecimal digits from the OS's random source."""
    return os.urandom(NODE_ID_BYTES).hex()


class ClientIds:
    """Client ids of one node: ``NODEID-N``, with N a hexadecimal counter from 1."""

    __slots__ = ("_counter", "node_id")

    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        self._counter = itertools.count(1)

    def __call__(self) -> str:
        return f"{self.node_id}-{next(self._counter):x}"
