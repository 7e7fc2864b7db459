"""Brokers carry publications between nodes.

A broker takes a publication and delivers it back to the node's
``on_message`` callback, on this node (MemoryBroker) and, with a shared
backplane, on every node. The publish path is therefore the same on one node
and on many.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from broadcastd.core.envelope import Payload
from broadcastd.core.hub import FanOut

OnMessage = Callable[[str, Payload], FanOut]


class Broker(Protocol):
    async def start(self, on_message: OnMessage) -> None:
        """Begin delivering publications to ``on_message``."""

    def publish(self, channel: str, payload: Payload) -> FanOut:
        """Publish; return what the local fan-out did."""

    def subscribe(self, channel: str) -> None:
        """This node gained its first subscriber of ``channel``."""

    def unsubscribe(self, channel: str) -> None:
        """This node lost its last subscriber of ``channel``."""

    async def close(self) -> None: ...
