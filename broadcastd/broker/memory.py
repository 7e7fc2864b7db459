"""The single-node broker: a publication loops straight back to this node."""

from __future__ import annotations

from broadcastd.broker import OnMessage
from broadcastd.core.envelope import Payload
from broadcastd.core.hub import FanOut


class MemoryBroker:
    """Channels live in this process only."""

    def __init__(self) -> None:
        self._on_message: OnMessage | None = None

    async def start(self, on_message: OnMessage) -> None:
        self._on_message = on_message

    def publish(self, channel: str, payload: Payload) -> FanOut:
        assert self._on_message is not None, "publish before start"
        return self._on_message(channel, payload)

    def subscribe(self, channel: str) -> None:
        return None

    def unsubscribe(self, channel: str) -> None:
        return None

    async def close(self) -> None:
        self._on_message = None
