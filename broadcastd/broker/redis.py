"""The Redis broker: many nodes, one set of channels, no silent loss.

Positions, history and idempotency keys live in Redis, changed only by the Lua
scripts of ``broadcastd.broker.scripts`` (one atomic step per publish). Every node
subscribes, on one pub/sub connection per Redis shard, to the channels it has
local subscribers for, and hands what arrives to the node, which fans it out
exactly as with the memory broker and checks that offsets follow each other.

What this module promises the node:

- a publish is answered only once Redis has accepted it, and fails with
  BrokerUnavailable (503) within ``broker.redis.timeout`` otherwise;
- a pub/sub connection is either subscribed to every wanted channel or being
  rebuilt: after every (re)connection the node hears ``resubscribed`` with the
  channels concerned, and reads what it may have missed from history;
- a probe message goes round each shard's pub/sub path every
  ``probe_interval``; when one has not come back within ``probe_timeout`` the
  connection is taken for wedged, health goes down and the connection is rebuilt;
- an offset is never given out twice: the node remembers the highest position
  it has seen of each channel it has subscribers of, and of the last
  ``SEEN_CHANNELS`` others it published to or read, and the scripts begin a new
  epoch where Redis went back behind it (``broadcastd.broker.scripts``).

A pub/sub connection that ended is freed by reference counting alone (the
daemon tunes the cyclic collector down): shards hold no reference back to the
broker, a connection lets go of its callback when it ends, and the reason it
ended is kept without a traceback through the frames that hold it. redis-py's
pool reconnects its connection objects in place, so Redis restarts leave none
of them behind either; they are let go with the broker, when it closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, TypeVar, cast

import orjson
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.maint_notifications import MaintNotificationsConfig

from broadcastd import log
from broadcastd.broker import BrokerHandler, Health, History, HistoryStats, Published
from broadcastd.broker.feeds import Feeds
from broadcastd.broker.memory import new_epoch
from broadcastd.broker.pubsub import PubSubConnection
from broadcastd.broker.scripts import HISTORY, POSITION, PUBLISH, RESTART
from broadcastd.core.envelope import Payload, channel_prefix
from broadcastd.core.namespaces import Namespaces
from broadcastd.core.observer import Observer
from broadcastd.core.publication import Item
from broadcastd.core.stream import Position, Publication
from broadcastd.errors import BrokerUnavailable, ClientError
from broadcastd.settings import RedisSettings, Settings, mask_url

_log = log.get("broadcastd.broker")
_throttle = log.Throttle(per_second=10)
T = TypeVar("T")

FAILURES = (RedisError, OSError, TimeoutError, ConnectionError)
SEEN_CHANNELS = 10_000
"""Channels without a subscriber here whose highest position a node remembers
(those it published to or read most recently), besides every channel it has
subscribers of: a few hundred bytes each."""
NOTHING_SEEN = Position("", 0)


def payload_from_json(text: bytes) -> Payload:
    """A payload as kept in Redis (its JSON text, validated when it was published)."""
    if text[:1] == b'"':
        value = orjson.loads(text)
        return Payload(text, value.encode())
    return Payload(text, text)


def jump_hash(key: int, buckets: int) -> int:
    """Jump consistent hash (Lamping and Veach): adding a shard moves 1/n of the keys."""
    b, j = -1, 0
    while j < buckets:
        b = j
        key = (key * 2862933555777941757 + 1) & 0xFFFFFFFFFFFFFFFF
        j = int((b + 1) * ((1 << 31) / ((key >> 33) + 1)))
    return b


def shard_of(channel: str, shards: int) -> int:
    """The shard of ``channel``: the same on every node, whatever its Python hash seed."""
    if shards == 1:
        return 0
    digest = hashlib.blake2b(channel.encode(), digest_size=8).digest()
    return jump_hash(int.from_bytes(digest, "big"), shards)


class Shard:
    """One Redis server: a command client and the pub/sub connection of this node.

    It holds no reference to the broker (which holds it), so that nothing of it
    waits for the cyclic collector once the broker is dropped.
    """

    def __init__(self, index: int, url: str, settings: RedisSettings) -> None:
        self.index = index
        self.url = url
        self.where = mask_url(url)
        self.client: Redis = Redis.from_url(
            url,
            socket_timeout=settings.timeout,
            socket_connect_timeout=settings.connect_timeout,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
            # Redis Enterprise's maintenance notices would make redis-py relax
            # timeouts that must hold (a publish fails fast, with 503); and their
            # handlers tie the pool and each connection into reference cycles.
            maint_notifications_config=MaintNotificationsConfig(enabled=False),
        )
        self.publish_script = self.client.register_script(PUBLISH)
        self.position_script = self.client.register_script(POSITION)
        self.history_script = self.client.register_script(HISTORY)
        self.restart_script = self.client.register_script(RESTART)
        self.topics: set[bytes] = set()
        """Pub/sub channels wanted on this shard (the probe's included)."""
        self.queue: list[tuple[Item, asyncio.Future[Published]]] = []
        """Publishes asked for in this turn of the event loop, sent together."""
        self.joining: list[tuple[str, bytes]] = []
        """Channels subscribed in this turn of the event loop, subscribed together."""
        self.pubsub: PubSubConnection | None = None
        self.subscribed = False
        """Every wanted channel is confirmed on a live pub/sub connection."""
        self.up = False
        self.last_probe = 0.0
        """Loop time the last probe came back."""
        self.reason = "connecting"
        self.task: asyncio.Task[None] | None = None


class RedisBroker:
    """Channels shared by every node on the same Redis (or the same shards)."""

    def __init__(self, settings: Settings, observer: Observer) -> None:
        self.settings = settings.broker.redis
        self.namespaces = Namespaces(settings)
        """Each channel's history size and TTL (its namespace's)."""
        self.meta_ttl_ms = int(self.settings.meta_ttl * 1000)
        self.key_ttl_ms = int(settings.publish.idempotency_ttl * 1000)
        self.observer = observer
        prefix = self.settings.prefix
        self._key_prefix = "{" + prefix + ":"
        self._topic_prefix = f"{prefix}:p:".encode()
        self.node_id = os.urandom(6).hex()
        self.probe_topic = f"{prefix}:probe:{self.node_id}".encode()
        urls = self.settings.shards or [self.settings.url]
        self.shards = [Shard(i, url, self.settings) for i, url in enumerate(urls)]
        for shard in self.shards:
            shard.topics.add(self.probe_topic)
        self._prefixes: dict[str, bytes] = {}
        self._heard: dict[str, Position] = {}
        """The highest position seen of each channel subscribed here."""
        self._recent: dict[str, Position] = {}
        """The highest position seen of other channels, least recently used first
        (at most SEEN_CHANNELS)."""
        self._feeds: Feeds | None = None
        """What this node subscribes to, in order (``broadcastd.broker.feeds``)."""
        self._probe_timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        """Probes and publish flushes under way (cancelled at close)."""
        self._up = False
        self._changed = asyncio.Event()

    # Lifecycle

    async def start(self, handler: BrokerHandler) -> None:
        """Begin connecting (in the background: a Redis that is down at start makes
        the node unready, never stops it from starting)."""
        self._feeds = Feeds(self, handler, self.observer)
        self.observer.broker_up(False)
        _log.info(
            "broker.start",
            broker="redis",
            shards=[shard.where for shard in self.shards],
            node=self.node_id,
        )
        for shard in self.shards:
            shard.task = asyncio.create_task(self._run(shard), name=f"redis-shard-{shard.index}")
        self._probe()

    async def close(self) -> None:
        if self._probe_timer is not None:
            self._probe_timer.cancel()
            self._probe_timer = None
        for task in self._tasks:
            task.cancel()
        for shard in self.shards:
            if shard.task is not None:
                shard.task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await shard.task
                shard.task = None
            await shard.client.aclose()
        if self._feeds is not None:
            self._feeds.close()
            self._feeds = None

    # The pub/sub connection's life

    async def _run(self, shard: Shard) -> None:
        """Connect, subscribe everything, wait for the end; again, with backoff."""
        settings = self.settings
        failures = 0
        while True:
            outcome = await self._connect(shard, failures)
            if isinstance(outcome, PubSubConnection):
                failures = 0
                try:
                    await outcome.lost
                finally:
                    shard.pubsub = None
                    shard.subscribed = False
                    outcome.close()
                error: BaseException | None = outcome.lost.result()
            else:
                error = outcome
            failures += 1
            self._shard_lost(shard, error)
            ceiling = min(settings.backoff_max, settings.backoff_min * 2 ** min(failures, 30))
            await asyncio.sleep(random.uniform(0, ceiling))  # noqa: S311 - full jitter, not secrets

    async def _connect(self, shard: Shard, failures: int) -> PubSubConnection | Exception:
        """A pub/sub connection subscribed to every wanted channel, or why not.

        The failure is returned, not raised: its traceback then ends in this
        frame, and holding it in ``_run`` makes no cycle through ``_run``'s frame.
        """
        settings = self.settings
        connection: PubSubConnection | None = None
        try:
            connection = await PubSubConnection.open(
                shard.url, settings.connect_timeout, self._on_messages
            )
            topics = sorted(shard.topics)
            async with asyncio.timeout(settings.timeout):
                await asyncio.gather(*connection.subscribe(topics))
            # Pooled command connections from before are likely dead too.
            await shard.client.connection_pool.disconnect(inuse_connections=False)
        except asyncio.CancelledError:
            if connection is not None:
                connection.close()
            raise
        except Exception as exc:
            if connection is not None:
                connection.close()
            return exc
        shard.pubsub = connection
        shard.subscribed = True
        shard.last_probe = asyncio.get_running_loop().time()
        self._shard_connected(shard, failures)
        return connection

    def _rebuild(self, shard: Shard, reason: str) -> None:
        """Drop the pub/sub connection (wedged): ``_run`` makes a new one."""
        if shard.pubsub is not None:
            shard.pubsub.close(ConnectionError(reason))

    async def _call(self, shard: Shard, step: Callable[[], Awaitable[T]]) -> T:
        """One Redis round trip, bounded by ``broker.redis.timeout``, timed; a
        failure of any kind is BrokerUnavailable (nothing is known to be done)."""
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.settings.timeout):
                result = await step()
        except FAILURES as exc:
            raise BrokerUnavailable(
                f"Redis did not answer ({type(exc).__name__}); nothing was published"
            ) from None
        self.observer.broker_command(time.perf_counter() - started)
        return result

    @property
    def health(self) -> Health:
        for shard in self.shards:
            if not shard.up:
                return Health(False, "broker")
        return Health(True)

    # Keys

    def _keys(self, channel: str) -> tuple[str, str]:
        tag = self._key_prefix + channel + "}"
        return tag + ":m", tag + ":s"

    def _shard(self, channel: str) -> Shard:
        return self.shards[shard_of(channel, len(self.shards))]

    # Publishing

    async def publish(self, items: Sequence[Item]) -> list[Published | ClientError]:
        """Publish every item; answered once Redis accepted them all.

        Publishes are coalesced: everything asked for in one turn of the event
        loop (the pipelined requests of one read, a batch) goes to each shard in
        one pipeline, so a busy node makes one round trip per shard per turn, not
        one per message. Items of one channel keep their order.
        """
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[Published]] = []
        shards = len(self.shards)
        for item in items:
            shard = self.shards[shard_of(item[0], shards)]
            future: asyncio.Future[Published] = loop.create_future()
            shard.queue.append((item, future))
            if len(shard.queue) == 1:
                loop.call_soon(self._flush, shard)
            futures.append(future)
        results = await asyncio.gather(*futures, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return cast(list[Published | ClientError], results)

    def _flush(self, shard: Shard) -> None:
        batch, shard.queue = shard.queue, []
        task = asyncio.get_running_loop().create_task(self._send(shard, batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(
        self, shard: Shard, batch: list[tuple[Item, asyncio.Future[Published]]]
    ) -> None:
        script = shard.publish_script
        try:
            if len(batch) == 1:
                keys, argv = self._publish_args(*batch[0][0])
                answers = [await self._call(shard, lambda: script(keys=keys, args=argv))]
            else:

                async def pipelined() -> list[Any]:
                    async with shard.client.pipeline(transaction=False) as pipe:
                        for item, _ in batch:
                            keys, argv = self._publish_args(*item)
                            await script(keys=keys, args=argv, client=pipe)
                        return await pipe.execute()

                answers = await self._call(shard, pipelined)
        except asyncio.CancelledError:  # the broker closes: nobody waits in vain
            for _, future in batch:
                future.cancel()
            raise
        except Exception as exc:  # BrokerUnavailable (or a failure of ours) for each
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (item, future), answer in zip(batch, answers, strict=True):
            epoch, _, offset = answer[0].partition(b" ")
            position = Position(epoch.decode(), int(offset))
            duplicate = answer[1] == 1
            if not duplicate:  # a first publish's answer may be of an epoch since left
                self._saw(item[0], position)
            if not future.done():
                future.set_result(Published(position, None, duplicate))

    def _publish_args(
        self, channel: str, payload: Payload, key: str | None
    ) -> tuple[list[str], list[Any]]:
        meta, stream = self._keys(channel)
        # A key of the channel's slot even without an idempotency key: Cluster-safe.
        seen = f"{self._key_prefix}{channel}}}:k:{'' if key is None else key}"
        known = self._known(channel)
        return [meta, stream, seen], [
            payload.json,
            self.namespaces.history_size(channel),
            int(self.namespaces.history_ttl(channel) * 1000),
            self.meta_ttl_ms,
            new_epoch(),
            self.key_ttl_ms,
            self._topic_prefix + channel.encode(),
            "0" if key is None else "1",
            known.epoch,
            known.offset,
        ]

    # What this node has seen: the highest position of each channel

    def _known(self, channel: str) -> Position:
        """The highest position of ``channel`` seen here (epoch empty if none)."""
        return self._heard.get(channel) or self._recent.get(channel) or NOTHING_SEEN

    def _saw(self, channel: str, position: Position) -> None:
        """Remember ``position`` of ``channel`` if it is the highest seen here.

        Any position Redis answered was given out; within one epoch the highest
        is kept (Redis may have gone back, this node has not), and a position of
        another epoch replaces it (epochs are not ordered; a channel begun again
        only ever moves on to a new one).
        """
        if not position.epoch:
            return
        if channel in self._prefixes:
            heard = self._heard.get(channel)
            if heard is None or heard.epoch != position.epoch or heard.offset < position.offset:
                self._heard[channel] = position
            return
        recent = self._recent
        known = recent.pop(channel, None)
        if known is not None and known.epoch == position.epoch and known.offset > position.offset:
            position = known
        recent[channel] = position
        if len(recent) > SEEN_CHANNELS:
            del recent[next(iter(recent))]

    # Subscriptions

    def subscribe(self, channel: str) -> None:
        """Subscribe this node to ``channel``; once Redis confirms, its position
        (begun in a new epoch if the channel has none) goes to the handler's
        ``subscribed``, and every later publication to its ``deliver``."""
        feeds = self._feeds
        assert feeds is not None, "subscribe before start"
        shard = self._shard(channel)
        topic = self._topic_prefix + channel.encode()
        if shard.pubsub is None or not shard.subscribed:
            raise BrokerUnavailable("Redis is not reachable; try again shortly")
        shard.topics.add(topic)
        self._prefixes[channel] = channel_prefix(channel)
        seen = self._recent.pop(channel, None)
        if seen is not None:
            self._heard.setdefault(channel, seen)
        feeds.want(channel)
        shard.joining.append((channel, topic))
        if len(shard.joining) == 1:
            asyncio.get_running_loop().call_soon(self._join_flush, shard)

    def _join_flush(self, shard: Shard) -> None:
        """Everything subscribed in one turn of the event loop goes to Redis as one
        SUBSCRIBE and one pipeline of position reads: a storm of new channels costs
        two round trips per turn, not two per channel."""
        batch, shard.joining = shard.joining, []
        task = asyncio.get_running_loop().create_task(self._join(shard, batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _join(self, shard: Shard, batch: list[tuple[str, bytes]]) -> None:
        script = shard.position_script
        try:
            pubsub = shard.pubsub
            if pubsub is None or not shard.subscribed:
                raise BrokerUnavailable("Redis is not reachable; try again shortly")
            confirmations = pubsub.subscribe([topic for _, topic in batch])
            await self._call(shard, lambda: asyncio.gather(*confirmations))

            async def positions() -> list[Any]:
                async with shard.client.pipeline(transaction=False) as pipe:
                    for channel, _ in batch:
                        known = self._known(channel)
                        args: list[str | int] = [new_epoch(), self.meta_ttl_ms, *known]
                        await script(keys=list(self._keys(channel)), args=args, client=pipe)
                    return await pipe.execute()

            answers = await self._call(shard, positions)
        except asyncio.CancelledError:
            raise
        except ClientError as exc:
            self._not_joined(shard, batch, exc)
            return
        except Exception as exc:  # a failure of ours: these channels alone
            _log.error("broker.subscribe_failed", error=f"{type(exc).__name__}"[:200], exc_info=exc)
            self._not_joined(shard, batch, BrokerUnavailable("the subscription failed"))
            return
        feeds = self._feeds
        for (channel, _), (epoch, offset) in zip(batch, answers, strict=True):
            position = Position(epoch.decode(), int(offset))
            self._saw(channel, position)
            if feeds is not None:
                feeds.opened(channel, position)

    def _not_joined(self, shard: Shard, batch: list[tuple[str, bytes]], error: ClientError) -> None:
        for channel, topic in batch:
            if self._feeds is not None:
                self._feeds.failed(channel, error)  # before _forget, which drops the feed
            if channel in self._prefixes:
                self._forget(shard, channel, topic)

    def unsubscribe(self, channel: str) -> None:
        shard = self._shard(channel)
        topic = self._topic_prefix + channel.encode()
        self._forget(shard, channel, topic)
        if shard.pubsub is not None and shard.subscribed:
            with contextlib.suppress(ConnectionError):
                shard.pubsub.unsubscribe([topic])

    def _forget(self, shard: Shard, channel: str, topic: bytes) -> None:
        if self._feeds is not None:
            self._feeds.forget(channel)
        shard.topics.discard(topic)
        self._prefixes.pop(channel, None)
        heard = self._heard.pop(channel, None)
        if heard is not None:
            self._saw(channel, heard)

    def _on_messages(self, messages: list[tuple[bytes, bytes]]) -> None:
        """Publications (and probes) as they arrive, in the order Redis sent them."""
        feeds = self._feeds
        if feeds is None:
            return
        deliver = feeds.deliver
        skip = len(self._topic_prefix)
        prefixes = self._prefixes
        heard = self._heard
        now = time.monotonic()
        for topic, data in messages:
            if topic == self.probe_topic:
                self._probe_back(data)
                continue
            name = topic[skip:].decode()
            prefix = prefixes.get(name)
            if prefix is None:
                continue  # unsubscribed since: Redis may still send a few
            try:
                epoch_b, offset_b, text = data.split(b" ", 2)
                epoch, offset = epoch_b.decode(), int(offset_b)
                known = heard.get(name)
                if known is None or known.epoch != epoch or known.offset < offset:
                    heard[name] = Position(epoch, offset)
                deliver(name, Publication(prefix, epoch, offset, payload_from_json(text), now))
            except Exception as exc:  # one bad message (or a bug) ends nobody's delivery
                if _throttle.allow("broker.message"):
                    _log.error(
                        "broker.message_failed",
                        channel=name,
                        error=f"{type(exc).__name__}: {exc}"[:200],
                        exc_info=exc,
                    )

    # Reading

    async def begin(self, channel: str) -> Position:
        return await self._position(self._shard(channel), channel, create=True)

    async def restart(self, channel: str, epoch: str) -> Position:
        shard = self._shard(channel)
        keys = list(self._keys(channel))
        args: list[str | int] = [epoch, new_epoch(), self.meta_ttl_ms]
        script = shard.restart_script
        new, offset = await self._call(shard, lambda: script(keys=keys, args=args))
        position = Position(new.decode(), int(offset))
        self._saw(channel, position)
        return position

    async def position(self, channel: str) -> Position | None:
        position = await self._position(self._shard(channel), channel, create=False)
        return position if position.epoch else None

    async def _position(self, shard: Shard, channel: str, *, create: bool) -> Position:
        keys = list(self._keys(channel))
        known = self._known(channel)
        args: list[str | int] = [new_epoch() if create else "", self.meta_ttl_ms, *known]
        script = shard.position_script
        epoch, offset = await self._call(shard, lambda: script(keys=keys, args=args))
        position = Position(epoch.decode(), int(offset))
        self._saw(channel, position)
        return position

    async def history(self, channel: str, since: int, limit: int) -> History:
        top, publications = await self._read(channel, since, limit, newest=False)
        if since >= top.offset:
            return History(top, [])
        if not publications or publications[0].offset != since + 1:
            return History(top, None)
        return History(top, publications)

    async def latest(self, channel: str, count: int) -> History:
        top, publications = await self._read(channel, 0, count, newest=True)
        publications.reverse()
        return History(top, publications)

    async def _read(
        self, channel: str, since: int, count: int, *, newest: bool
    ) -> tuple[Position, list[Publication]]:
        shard = self._shard(channel)
        keys = list(self._keys(channel))
        ttl = max(1, int(self.namespaces.history_ttl(channel)))
        args: list[str | int] = [f"0-{since + 1}", max(count, 0), ttl, "1" if newest else "0"]
        script = shard.history_script
        epoch_b, offset_b, rows = await self._call(shard, lambda: script(keys=keys, args=args))
        top = Position(epoch_b.decode(), int(offset_b))
        self._saw(channel, top)
        if count <= 0 or self.namespaces.history_size(channel) == 0:
            return top, []
        prefix = self._prefixes.get(channel) or channel_prefix(channel)
        now = time.monotonic()
        publications = [
            Publication(
                prefix,
                top.epoch,
                int(rows[i].partition(b"-")[2]),
                payload_from_json(rows[i + 1]),
                now,
            )
            for i in range(0, len(rows), 2)
        ]
        return top, publications

    # Health: the probe of every shard's pub/sub path

    def _probe(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        timeout = self.settings.probe_timeout
        for shard in self.shards:
            if shard.subscribed:
                if now - shard.last_probe > timeout:
                    self.observer.broker_probe(None)
                    self._set(shard, False, "probe_timeout")
                    self._rebuild(shard, "no probe came back within broker.redis.probe_timeout")
                else:
                    task = loop.create_task(self._send_probe(shard))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
        self._probe_timer = loop.call_later(self.settings.probe_interval, self._probe)

    async def _send_probe(self, shard: Shard) -> None:
        stamp = b"%d %r" % (shard.index, time.perf_counter())
        client = shard.client
        try:
            await self._call(shard, lambda: client.publish(self.probe_topic, stamp))
        except BrokerUnavailable:
            self.observer.broker_probe(None)
            self._set(shard, False, "unreachable")

    def _probe_back(self, data: bytes) -> None:
        index, _, sent = data.partition(b" ")
        shard = self.shards[int(index)]
        shard.last_probe = asyncio.get_running_loop().time()
        self.observer.broker_probe(time.perf_counter() - float(sent))
        if shard.subscribed:
            self._set(shard, True, "")

    # State changes: logged once each, counted, and told to the node

    def _shard_connected(self, shard: Shard, failures: int) -> None:
        if failures:
            self.observer.broker_reconnected()
        self._set(shard, True, "")
        names = [topic[len(self._topic_prefix) :].decode() for topic in shard.topics]
        if self._feeds is not None:
            self._feeds.resubscribed([name for name in names if name in self._prefixes])

    def _shard_lost(self, shard: Shard, error: BaseException | None) -> None:
        if shard.up or shard.reason == "connecting":  # once per outage, not per attempt
            self._set(shard, False, "unreachable", error)

    def _set(self, shard: Shard, up: bool, reason: str, error: BaseException | None = None) -> None:
        if shard.up == up and (up or shard.reason == reason):
            return
        shard.up = up
        shard.reason = reason
        if up:
            _log.info("broker.up", shard=shard.where)
        else:
            _log.warning(
                "broker.down",
                shard=shard.where,
                reason=reason,
                error=None if error is None else f"{type(error).__name__}: {error}"[:200],
            )
        was = self._up
        self._up = all(s.up for s in self.shards)
        if self._up != was:
            self.observer.broker_up(self._up)
            self._changed.set()
            self._changed = asyncio.Event()

    async def health_changed(self) -> None:
        """Return once ``health`` next changes (tests and tools wait on it)."""
        await self._changed.wait()

    def channels(self) -> Iterable[tuple[str, Position]]:
        """The channels this node subscribes to (GET /channels lists this node's)."""
        heard = self._heard
        return ((name, heard.get(name, NOTHING_SEEN)) for name in self._prefixes)

    def has_room_for(self, channels: list[str]) -> bool:
        return True  # Redis holds the channels; its memory is its operator's to size

    def stats(self) -> HistoryStats:
        return HistoryStats()  # history lives in Redis, not in this process
