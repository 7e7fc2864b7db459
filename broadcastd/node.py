"""The node: hub + broker + observer, and every publish, subscribe and recovery
decision between them.

``publish()`` validates and hands the payload to the broker, which gives it the
channel's next position and delivers it back through ``deliver`` (the hub's
fan-out): the same path on one node (MemoryBroker, synchronously) and on many.
Subscriptions go through the node so that the broker hears of a channel's first
and last local subscriber, and recoveries are decided here from the broker's
history. The node also holds the lifecycle state both adapters consult (ready,
draining).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator

from broadcastd.auth.claims import Claims, may_subscribe
from broadcastd.broker import Broker, Health, History, Published, RemoteBroker
from broadcastd.broker.memory import MemoryBroker
from broadcastd.core.channels import check_channel
from broadcastd.core.envelope import Payload
from broadcastd.core.hub import Delivery, FanOut, Hub
from broadcastd.core.namespaces import ChannelOptions, Namespaces
from broadcastd.core.observer import NullObserver, Observer
from broadcastd.core.outbox import Outbox
from broadcastd.core.publication import Item
from broadcastd.core.stream import Last, Position, Publication, Recovery, Since, plan_recovery
from broadcastd.errors import (
    ChannelTableFull,
    ClientError,
    Draining,
    PayloadTooLarge,
    PermissionDenied,
    UnknownNamespace,
)
from broadcastd.feeds import Failed, Feeds, Joined
from broadcastd.settings import Settings, SlowConsumerPolicy


class Node:
    """Owns the channel state of this process."""

    def __init__(
        self,
        settings: Settings,
        broker: Broker | None = None,
        observer: Observer | None = None,
        clock: Callable[[], float] = time.monotonic,
        remote: RemoteBroker | None = None,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.namespaces = Namespaces(settings)
        self.hub = Hub(self._delivery_of)
        self.broker: Broker = (
            broker if broker is not None else MemoryBroker(settings, clock, self.namespaces)
        )
        self.observer: Observer = observer if observer is not None else NullObserver()
        self.remote = remote
        """The broker when it is another process (Redis); ``broker`` is then unused."""
        self.feeds = (
            None
            if remote is None
            else Feeds(
                self.hub,
                remote,
                self.observer,
                self._fan_out,
                history_on=self.recovers,
                max_recover=settings.history.max_recover,
            )
        )
        self.max_recover = settings.history.max_recover
        self.ready = False
        """Every listener accepts connections and the daemon is not draining."""
        self.draining = False
        self.publishing_since: float | None = None
        """When the fan-out under way began (None between fan-outs): writers woken by
        it measure delivery latency from here, at no cost per delivery."""

    async def start(self) -> None:
        if self.remote is not None and self.feeds is not None:
            await self.remote.start(self.feeds.deliver, self.feeds.resubscribed)
        else:
            await self.broker.start(self.hub.deliver)

    async def close(self) -> None:
        if self.remote is not None and self.feeds is not None:
            self.feeds.close()
            await self.remote.close()
        else:
            await self.broker.close()

    @property
    def broker_health(self) -> Health:
        return Health(True) if self.remote is None else self.remote.health

    def _fan_out(self, name: str, publication: Publication) -> FanOut:
        """Deliver a publication that came through the remote broker; its delivery
        latency is measured from its arrival here."""
        self.publishing_since = self.clock()
        try:
            fan_out = self.hub.deliver(name, publication)
        finally:
            self.publishing_since = None
        self.observer.delivered(fan_out.queued, fan_out.refused)
        return fan_out

    # Publishing

    def publish(
        self, channel: str, payload: Payload, form: str, key: str | None = None
    ) -> Published:
        """Publish one message; raise a ClientError (nothing published) if it is refused."""
        if self.draining:
            raise Draining("the server is shutting down")
        self._check(channel, payload)
        self.publishing_since = self.clock()
        try:
            published = self.broker.publish(channel, payload, key)
        finally:
            self.publishing_since = None
        self._report(form, (published,))
        return published

    def publish_all(
        self, channels: list[str], payload: Payload, form: str, key: str | None = None
    ) -> list[Published]:
        """Publish one payload to every channel of ``channels`` (distinct names), or
        to none: each channel, the payload and the room in the channel table are
        checked before the first publish, so a refusal (a ClientError) leaves
        nothing half done and a retry cannot duplicate a message.
        """
        if self.draining:
            raise Draining("the server is shutting down")
        for channel in channels:
            self._check(channel, payload)
        if not self.broker.has_room_for(channels):
            raise ChannelTableFull(
                f"the server holds {self.settings.channels.max_channels} channels, "
                "all with subscribers"
            )
        publish = self.broker.publish
        self.publishing_since = self.clock()
        try:
            results = [publish(channel, payload, key) for channel in channels]
        finally:
            self.publishing_since = None
        self._report(form, results)
        return results

    def publish_many(
        self, items: Iterable[Item | ClientError], form: str
    ) -> list[Published | ClientError]:
        """Publish each item in order; one result per item, so a bad item (or one
        already found bad, passed in as its ClientError) does not sink the rest.

        The whole call counts as accepted at one instant and is reported to the
        observer once: a batch of ten thousand costs one clock read and one report.
        """
        if self.draining:
            raise Draining("the server is shutting down")
        publish = self.broker.publish
        check = self._check
        results: list[Published | ClientError] = []
        self.publishing_since = self.clock()
        try:
            for item in items:
                if isinstance(item, ClientError):
                    results.append(item)
                    continue
                channel, payload, key = item
                try:
                    check(channel, payload)
                    results.append(publish(channel, payload, key))
                except ClientError as exc:
                    results.append(exc)
        finally:
            self.publishing_since = None
        self._report(form, [r for r in results if not isinstance(r, ClientError)])
        return results

    # Publishing through a remote broker: the same checks, then one round trip

    async def publish_remote(
        self, items: list[Item], form: str, *, all_or_none: bool = False
    ) -> list[Published | ClientError]:
        """Publish ``items`` through the remote broker, answered once it accepted
        them all: one result per item, a refused item's ClientError in its place
        (with ``all_or_none``, the first refusal is raised and nothing is sent).
        BrokerUnavailable is raised when the broker does not answer in time."""
        assert self.remote is not None
        if self.draining:
            raise Draining("the server is shutting down")
        results: list[Published | ClientError | None] = []
        accepted: list[Item] = []
        for item in items:
            try:
                self._check(item[0], item[1])
            except ClientError as exc:
                if all_or_none:
                    raise
                results.append(exc)
                continue
            results.append(None)
            accepted.append(item)
        published = iter(await self.remote.publish(accepted) if accepted else [])
        answers = [next(published) if r is None else r for r in results]
        messages = sum(1 for r in answers if isinstance(r, Published) and not r.duplicate)
        if messages:
            self.observer.published(form, messages, 0, 0)
        return answers

    def _check(self, channel: str, payload: Payload) -> None:
        if channel not in self.hub:  # channels with subscribers were checked already
            check_channel(channel)
        limit = self.namespaces.of(channel).max_payload_bytes
        if len(payload.json) > limit:
            raise PayloadTooLarge(f"payload is {len(payload.json)} bytes; the limit is {limit}")

    def _delivery_of(self, channel: str) -> Delivery:
        """The policy and budget of ``channel``'s namespace. A namespace that sets
        outbox bounds but no policy gets the server's (``ws.slow_consumer_policy``);
        so does every channel when the server's is ``conflate``, which needs the
        channel of each frame (untagged frames could only drop the oldest)."""
        options = self.namespaces.of(channel)
        server = self.settings.ws.slow_consumer_policy
        if options.policy is None and (
            options.budget is not None or server is SlowConsumerPolicy.CONFLATE
        ):
            return server, options.budget
        return options.policy, options.budget

    def recovers(self, channel: str) -> bool:
        """Whether ``since`` can recover anything on ``channel``: its namespace keeps
        history and allows recovery."""
        options = self.namespaces.of(channel)
        return options.recover and options.history_size > 0

    def check_subscribe(self, name: str, claims: Claims | None) -> ChannelOptions:
        """May a client holding ``claims`` subscribe to ``name``? Its options if so;
        else UnknownNamespace or PermissionDenied (with the reason as its code)."""
        check_channel(name)
        try:
            options = self.namespaces.of(name)
        except UnknownNamespace as exc:
            self.observer.subscribe_denied(exc.code)
            raise
        refusal = may_subscribe(claims, name, options.subscribe)
        if refusal is not None:
            self.observer.subscribe_denied(refusal)
            raise PermissionDenied(f"may not subscribe to {name!r}: {refusal}", str(refusal))
        return options

    def _report(self, form: str, results: Iterable[Published]) -> None:
        messages = queued = refused = 0
        for published in results:
            fan_out = published.fan_out
            if not published.duplicate:
                messages += 1
            if fan_out is not None:
                queued += fan_out.queued
                refused += fan_out.refused
        if messages:
            self.observer.published(form, messages, queued, refused)

    # Subscribing and recovering (the session's Channels)

    def subscribe(self, outbox: Outbox, name: str, raw: bool) -> Position:
        hub = self.hub
        channel = hub.get(name)
        if channel is None:
            channel = hub.add(name, self.broker.subscribe(name))
        hub.join(channel, outbox, raw)
        return channel.position

    def unsubscribe(self, outbox: Outbox, name: str) -> None:
        if self.feeds is not None:
            self.feeds.leave(outbox, name)
        elif self.hub.leave(outbox, name):
            self.broker.unsubscribe(name)

    def join(
        self,
        outbox: Outbox,
        name: str,
        raw: bool,
        since: Since | None,
        joined: Joined,
        failed: Failed,
    ) -> None:
        """Subscribe ``outbox`` (recovering from ``since`` first, if given), and call
        ``joined`` with the position and the recovery right before the live stream
        continues: at once with the memory broker, after a round trip with Redis
        (or ``failed`` if the broker cannot be reached). A refusal known at once
        is raised."""
        if self.feeds is not None:
            check_channel(name)
            self.feeds.join(outbox, name, raw, since, joined, failed)
            return
        position = self.subscribe(outbox, name, raw)
        joined(position, None if since is None else self.recover(name, since, position))

    def recover(self, name: str, since: Since, top: Position) -> Recovery:
        """The messages after ``since``, decided against the channel's ``top``."""
        if isinstance(since, Last):
            count = min(since.number, self.max_recover) if self.recovers(name) else 0
            latest = self.broker.latest(name, count).publications or []
            return Recovery(True, None, [p for p in latest if p.offset <= top.offset])
        broker = self.broker

        def read(after: int, limit: int) -> list[Publication] | None:
            return broker.history(name, after, limit).publications

        recovery = plan_recovery(
            top, since, self.max_recover, read if self.recovers(name) else None
        )
        self.observer.recovered(recovery.recovered, recovery.reason, len(recovery.replay))
        return recovery

    # What the control API shows

    def channel_names(self) -> Iterator[str]:
        """Every channel this node knows: those with local subscribers and those
        whose stream the broker keeps here (with Redis: those subscribed here)."""
        if self.feeds is not None:
            yield from self.feeds.names()
            return
        for channel in self.hub:
            yield channel.name
        for name in self.broker.channels():
            if name not in self.hub:
                yield name

    def channel_state(self, name: str) -> tuple[Position, int] | None:
        """A channel's latest position and its local subscriber count, if known."""
        channel = self.hub.get(name)
        if channel is not None:
            return channel.position, channel.subscriber_count
        position = self.broker.position(name)
        return None if position is None else (position, 0)

    def read_history(
        self, name: str, since: int, limit: int, newest_first: bool
    ) -> tuple[Position, list[Publication], bool] | None:
        """What history keeps of ``name`` after offset ``since``: the channel's latest
        position, up to ``limit`` publications (oldest or newest first), and whether
        history still reaches back to ``since + 1``. None for an unknown channel."""
        state = self.channel_state(name)
        if state is None:
            return None
        top = state[0]
        # Everything after ``since`` that the stream keeps, under its namespace's
        # own history bounds (the broker applied them when it kept it).
        kept = self.broker.latest(name, top.offset - since).publications or []
        after = [p for p in kept if p.offset > since]
        complete = since >= top.offset or bool(after and after[0].offset == since + 1)
        page = after[-limit:][::-1] if newest_first else after[:limit]
        return top, page, complete

    async def channel_state_remote(self, name: str) -> tuple[Position, int] | None:
        """What ``channel_state`` says, with the position read from the remote broker."""
        assert self.remote is not None
        position = await self.remote.position(name)
        channel = self.hub.get(name)
        count = 0 if channel is None else channel.subscriber_count
        return None if position is None else (position, count)

    async def read_history_remote(
        self, name: str, since: int, limit: int, newest_first: bool
    ) -> tuple[Position, list[Publication], bool] | None:
        """What ``read_history`` says, read from the remote broker."""
        assert self.remote is not None
        history: History = await self.remote.history(name, since, 1 if newest_first else limit)
        top = history.top
        complete = history.publications is not None
        page = history.publications or []
        if not complete and not newest_first:
            # History no longer reaches ``since + 1``: what it still keeps, as the
            # memory engine answers (bounded by the namespace's history size).
            kept = await self.remote.latest(name, self.namespaces.history_size(name))
            page = [p for p in kept.publications or [] if p.offset > since][:limit]
        if newest_first:
            latest = await self.remote.latest(name, limit)
            page = [p for p in latest.publications or [] if p.offset > since][::-1]
        if not top.epoch:
            return None
        return top, page, complete

    def begin_drain(self) -> None:
        self.ready = False
        self.draining = True
