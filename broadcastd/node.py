"""The node: hub + broker + observer, and the publish path between them.

``publish()`` validates, hands the publication to the broker, and the broker
calls back ``_on_message`` which fans out through the hub: the same path on
one node (MemoryBroker) and on many. The node also holds the daemon's
lifecycle state that both adapters consult (ready, draining).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from broadcastd.broker import Broker
from broadcastd.broker.memory import MemoryBroker
from broadcastd.core.channels import check_channel
from broadcastd.core.envelope import Payload
from broadcastd.core.hub import FanOut, Hub
from broadcastd.core.observer import NullObserver, Observer
from broadcastd.errors import ClientError, Draining, PayloadTooLarge
from broadcastd.settings import Settings


class Node:
    """Owns the channel state of this process."""

    def __init__(
        self,
        settings: Settings,
        broker: Broker | None = None,
        observer: Observer | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.hub = Hub(settings.channels.max_channels)
        self.broker: Broker = broker if broker is not None else MemoryBroker()
        self.observer: Observer = observer if observer is not None else NullObserver()
        self.max_payload_bytes = settings.control.max_payload_bytes
        self.ready = False
        """Every listener accepts connections and the daemon is not draining."""
        self.draining = False
        self.publishing_since: float | None = None
        """When the fan-out under way began (None between fan-outs): writers woken by
        it measure delivery latency from here, at no cost per delivery."""

    async def start(self) -> None:
        await self.broker.start(self._on_message)

    async def close(self) -> None:
        await self.broker.close()

    def publish(self, channel: str, payload: Payload, form: str) -> FanOut:
        """Publish one message; raise a ClientError (nothing published) if it is refused."""
        if self.draining:
            raise Draining("the server is shutting down")
        self._check(channel, payload)
        self.publishing_since = self.clock()
        try:
            fan_out = self.broker.publish(channel, payload)
        finally:
            self.publishing_since = None
        self.observer.published(form, 1, fan_out.queued, fan_out.refused)
        return fan_out

    def _check(self, channel: str, payload: Payload) -> None:
        if channel not in self.hub:  # known channels were checked when created
            check_channel(channel)
        if len(payload.json) > self.max_payload_bytes:
            raise PayloadTooLarge(
                f"payload is {len(payload.json)} bytes; the limit is {self.max_payload_bytes}"
            )

    def publish_many(
        self, items: Iterable[tuple[str, Payload] | ClientError], form: str
    ) -> list[FanOut | ClientError]:
        """Publish each item in order; one result per item, so a bad item (or one
        already found bad, passed in as its ClientError) does not sink the rest.

        The whole call counts as accepted at one instant and is reported to the
        observer once: a batch of ten thousand costs one clock read and one report.
        """
        if self.draining:
            raise Draining("the server is shutting down")
        publish = self.broker.publish
        check = self._check
        results: list[FanOut | ClientError] = []
        published = queued = refused = 0
        self.publishing_since = self.clock()
        try:
            for item in items:
                if isinstance(item, ClientError):
                    results.append(item)
                    continue
                channel, payload = item
                try:
                    check(channel, payload)
                    fan_out = publish(channel, payload)
                except ClientError as exc:
                    results.append(exc)
                    continue
                published += 1
                queued += fan_out.queued
                refused += fan_out.refused
                results.append(fan_out)
        finally:
            self.publishing_since = None
        if published:
            self.observer.published(form, published, queued, refused)
        return results

    def _on_message(self, channel: str, payload: Payload) -> FanOut:
        return self.hub.publish(channel, payload)

    def begin_drain(self) -> None:
        self.ready = False
        self.draining = True
