"""The Redis broker: many nodes, one set of channels, no silent loss.

Positions, history and idempotency keys live in Redis, changed only by the Lua
scripts of ``broadcastd.broker.scripts`` (one atomic step per publish). Each node
has two connections per Redis shard: one for commands
(``broadcastd.broker.commands``: every call of one loop turn leaves in one
write, replies parsed by hiredis), and one for pub/sub
(``broadcastd.broker.pubsub``), subscribed to the channels it has local
subscribers for. What arrives goes through the feeds
(``broadcastd.broker.feeds``), which hand it to the node in order, and the node
fans it out exactly as with the memory engine.

What this module promises the node:

- a publish is answered only once Redis has accepted it, and fails with
  BrokerUnavailable (503) when Redis has been silent for ``broker.redis.timeout``
  (judged by Redis's replies, not by how late a busy node reads them);
- a pub/sub connection is either subscribed to every wanted channel or being
  rebuilt: after every (re)connection the feeds check every channel against
  history, and fill or tell what was missed;
- a probe message goes round each shard's pub/sub path every
  ``probe_interval``; when one has not come back within ``probe_timeout`` (and
  the sockets were read once more since) the connections are taken for wedged,
  health goes down and they are rebuilt;
- an offset is never given out twice: the node remembers the highest position
  it has seen of each channel it has subscribers of, and of the last
  ``SEEN_CHANNELS`` others it published to or read, and the scripts begin a new
  epoch where Redis went back behind it (``broadcastd.broker.scripts``).

Presence lives in Redis beside each channel's stream (``broadcastd.broker.scripts``):
each node adds and removes its clients' entries as they join and leave (the
changes of one loop turn in one script call per shard), and renews its own
liveness every third of ``presence.ttl`` (one call per shard, whatever its
entries), so that the entries of a node that died are swept by the others'
heartbeats within ``presence.ttl`` and one more; whichever script removes an
entry publishes its leave on the channel's topic, where every node with
subscribers of the channel hears it. Server API commands go to every node over pub/sub:
each node listens on ``PREFIX:ctl`` and on its own ``PREFIX:ctl:NODE``; a
command is published on the first, and the number of listeners Redis answers
is the number of answers to wait for (on the second), up to
``broker.redis.timeout``. A node that is down misses nothing that matters: its
connections are gone with it.

A pub/sub connection that ended is freed by reference counting alone (the
daemon tunes the cyclic collector down): shards hold no reference back to the
broker, a connection lets go of its callback when it ends, and the reason it
ended is kept without a traceback through the frames that hold it; so does a
command connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import itertools
import os
import random
import time
from collections.abc import Awaitable, Iterable, Sequence
from typing import Any, TypeVar, cast

import orjson
from redis.exceptions import RedisError

from broadcastd import log
from broadcastd.broker import BrokerHandler, Health, History, HistoryStats, Published
from broadcastd.broker.commands import CommandConnection
from broadcastd.broker.feeds import Feeds
from broadcastd.broker.memory import Epochs
from broadcastd.broker.pubsub import PubSubConnection
from broadcastd.broker.scripts import (
    HISTORY,
    POSITION,
    PRESENCE_CHANGE,
    PRESENCE_HEARTBEAT,
    PRESENCE_KEYS,
    PRESENCE_PAGE,
    PRESENCE_STATS,
    PUBLISH,
    RESTART,
)
from broadcastd.core.envelope import Payload, channel_prefix
from broadcastd.core.namespaces import Namespaces
from broadcastd.core.observer import Observer
from broadcastd.core.presence import PresencePage, PresenceStats
from broadcastd.core.stream import Position, Publication
from broadcastd.errors import BrokerUnavailable, ClientError
from broadcastd.later import Later
from broadcastd.settings import RedisSettings, Settings, mask_url

_log = log.get("broadcastd.broker")
_throttle = log.Throttle(per_second=10)
T = TypeVar("T")

FAILURES = (RedisError, OSError, TimeoutError, ConnectionError)
PUBLISH_SHA, POSITION_SHA, HISTORY_SHA, RESTART_SHA = (
    hashlib.sha1(script.encode()).hexdigest()  # noqa: S324 - Redis names scripts by SHA-1
    for script in (PUBLISH, POSITION, HISTORY, RESTART)
)
CHANGE_SHA, HEARTBEAT_SHA, PAGE_SHA, STATS_SHA = (
    hashlib.sha1(script.encode()).hexdigest()  # noqa: S324
    for script in (PRESENCE_CHANGE, PRESENCE_HEARTBEAT, PRESENCE_PAGE, PRESENCE_STATS)
)
HEARTBEATS_PER_TTL = 3
"""A node's presence heartbeats per ``presence.ttl``: its entries survive two
missed heartbeats, and a dead node's entries go within ``ttl`` plus one."""
SWEEP_BUDGET = 1000
"""Entries of dead nodes one heartbeat call removes at most (it calls again at
once while any remain): no single script holds Redis for long."""
PRESENCE_BATCH = 100
"""Channels whose presence changes go in one script call at most: a storm's
changes take a few calls, so that no single script holds Redis for long."""
SEEN_CHANNELS = 10_000
"""Channels without a subscriber here whose highest position a node remembers
(those it published to or read most recently), besides every channel it has
subscribers of: a few hundred bytes each."""
NOTHING_SEEN = Position("", 0)
_PublishKeys = tuple[str, str, str, int, int, bytes]
"""A channel's meta key, stream key, idempotency key prefix, history size,
history TTL in ms, and pub/sub topic."""


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
    """One Redis server: this node's command connection and pub/sub connection.

    It holds no reference to the broker (which holds it), so that nothing of it
    waits for the cyclic collector once the broker is dropped.
    """

    def __init__(self, index: int, url: str, settings: RedisSettings) -> None:
        self.index = index
        self.url = url
        self.where = mask_url(url)
        self.topics: set[bytes] = set()
        """Pub/sub channels wanted on this shard (the probe's included)."""
        self.joining: list[tuple[str, bytes]] = []
        """Channels subscribed since the last batch left, to be subscribed together."""
        self.join_running = False
        """A batch is under way (the next waits for it)."""
        self.presence: dict[str, list[tuple[bytes | str, ...]]] = {}
        """This loop turn's presence changes of the shard's channels, in order:
        ``("+", CLIENT, USER_JSON, ENTRY)`` or ``("-", CLIENT)``, sent together."""
        self.stale = False
        """Redis may not hold this node's entries as they are (a call failed, or
        changes found the connection ended): the next heartbeat puts it right
        (``_resync``)."""
        self.commands: CommandConnection | None = None
        """Scripts and reads: every call of one loop turn leaves in one write."""
        self.pubsub: PubSubConnection | None = None
        self.subscribed = False
        """Every wanted channel is confirmed on a live pub/sub connection."""
        self.up = False
        self.probe_sent: float | None = None
        """When the probe under way was sent (``time.monotonic``; None: none is)."""
        self.reason = "connecting"
        self.task: asyncio.Task[None] | None = None


class RedisBroker:
    """Channels shared by every node on the same Redis (or the same shards)."""

    def __init__(self, settings: Settings, observer: Observer) -> None:
        self.settings = settings.broker.redis
        self.namespaces = Namespaces(settings)
        """Each channel's history size and TTL (its namespace's)."""
        self.meta_ttl_ms = int(self.settings.meta_ttl * 1000)
        self._new_epoch = Epochs()
        self.key_ttl_ms = int(settings.publish.idempotency_ttl * 1000)
        self.observer = observer
        prefix = self.settings.prefix
        self._key_prefix = "{" + prefix + ":"
        self._node_prefix = "{" + prefix + "}:"
        """Keys of the presence node registry (``scripts``), one set per shard."""
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
        self._publish_keys: dict[str, _PublishKeys] = {}
        """What a publish to each channel sends besides its payload, for the last
        channels published to (at most SEEN_CHANNELS)."""
        self._turn_started: float | None = None
        """When the first publish of this loop turn was sent (its round trip is
        timed, one per turn, as the others share it)."""
        self._probe_timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        """Probes and publish flushes under way (cancelled at close)."""
        self._up = False
        self._changed = asyncio.Event()
        presence = settings.presence
        self.presence_ttl_ms = max(1, int(presence.ttl * 1000))
        self.heartbeat_interval = presence.ttl / HEARTBEATS_PER_TTL
        self._entries: dict[str, dict[str, tuple[str | None, bytes]]] = {}
        """This node's presence entries: channel -> client -> (user, entry)."""
        self._counts: dict[str, int] = {}
        """Each channel's entry count, as Redis last answered (channels with entries here)."""
        self._heartbeat_timer: asyncio.TimerHandle | None = None
        self._handler: BrokerHandler | None = None
        self.control_topic = f"{prefix}:ctl".encode()
        self.reply_topic = b""
        """This node's answers topic (``PREFIX:ctl:NODE``), known at start."""
        self._requests: dict[str, _Gathering] = {}
        self._request_ids = itertools.count(1)

    # Lifecycle

    async def start(self, handler: BrokerHandler) -> None:
        """Begin connecting (in the background: a Redis that is down at start makes
        the node unready, never stops it from starting)."""
        self._feeds = Feeds(self, handler, self.observer)
        self._handler = handler
        self.reply_topic = f"{self.settings.prefix}:ctl:{handler.id}".encode()
        self.shards[0].topics.update((self.control_topic, self.reply_topic))
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
        self._heartbeat_timer = asyncio.get_running_loop().call_later(
            self.heartbeat_interval, self._heartbeat
        )

    async def close(self) -> None:
        if self._probe_timer is not None:
            self._probe_timer.cancel()
            self._probe_timer = None
        if self._heartbeat_timer is not None:
            self._heartbeat_timer.cancel()
            self._heartbeat_timer = None
        for request in self._requests.values():
            request.finish()
        self._requests.clear()
        self._handler = None
        for shard in self.shards:
            self._send_changes(shard)  # before the connections close (a drain's leaves)
        for task in self._tasks:
            task.cancel()
        for shard in self.shards:
            if shard.task is not None:
                shard.task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await shard.task
                shard.task = None
            if shard.commands is not None:
                shard.commands.close()
                shard.commands = None
        if self._feeds is not None:
            self._feeds.close()
            self._feeds = None
        # The calls the close failed run their callbacks (a probe's, a waiting
        # publish's) in the next turn: let them, so that nothing of the broker
        # is still referenced from the loop once this returns.
        await asyncio.sleep(0)

    # The pub/sub connection's life

    async def _run(self, shard: Shard) -> None:
        """Connect, subscribe everything, wait for the end; again, with backoff."""
        settings = self.settings
        failures = 0
        while True:
            outcome = await self._connect(shard, failures)
            if isinstance(outcome, tuple):
                failures = 0
                commands, pubsub = outcome
                try:
                    await asyncio.wait(
                        (commands.lost, pubsub.lost), return_when=asyncio.FIRST_COMPLETED
                    )
                finally:
                    shard.pubsub = None
                    shard.commands = None
                    shard.subscribed = False
                    shard.probe_sent = None
                    commands.close()
                    pubsub.close()
                error: BaseException | None = pubsub.lost.result() or commands.lost.result()
                del commands, pubsub, outcome
            else:
                error = outcome
            failures += 1
            self._shard_lost(shard, error)
            ceiling = min(settings.backoff_max, settings.backoff_min * 2 ** min(failures, 30))
            await asyncio.sleep(random.uniform(0, ceiling))  # noqa: S311 - full jitter, not secrets

    async def _connect(
        self, shard: Shard, failures: int
    ) -> tuple[CommandConnection, PubSubConnection] | Exception:
        """A command connection, and a pub/sub connection subscribed to every
        wanted channel; or why not.

        The failure is returned, not raised: its traceback then ends in this
        frame, and holding it in ``_run`` makes no cycle through ``_run``'s frame.
        """
        settings = self.settings
        commands: CommandConnection | None = None
        pubsub: PubSubConnection | None = None
        try:
            commands = await CommandConnection.open(
                shard.url, settings.connect_timeout, call_timeout=settings.timeout
            )
            pubsub = await PubSubConnection.open(
                shard.url, settings.connect_timeout, self._on_messages
            )
            topics = sorted(shard.topics)
            async with asyncio.timeout(settings.timeout):
                await asyncio.gather(*pubsub.subscribe(topics))
        except asyncio.CancelledError:
            for connection in (commands, pubsub):
                if connection is not None:
                    connection.close()
            raise
        except Exception as exc:
            for connection in (commands, pubsub):
                if connection is not None:
                    connection.close()
            return exc
        shard.commands = commands
        shard.pubsub = pubsub
        shard.subscribed = True
        shard.probe_sent = None
        self._beat(shard)  # before any presence change: Redis knows this node first
        self._resync(shard)
        self._shard_connected(shard, failures)
        return commands, pubsub

    def _rebuild(self, shard: Shard, reason: str) -> None:
        """Drop the connections (wedged): ``_run`` makes new ones."""
        if shard.pubsub is not None:
            shard.pubsub.close(ConnectionError(reason))
        if shard.commands is not None:
            shard.commands.close()

    @staticmethod
    def _commands(shard: Shard) -> CommandConnection:
        """The shard's command connection, or BrokerUnavailable while it has none."""
        commands = shard.commands
        if commands is None or commands.closed:
            raise BrokerUnavailable("Redis is not reachable; try again shortly")
        return commands

    async def _answer(self, call: Awaitable[T], unknown: str) -> T:
        """The answer of ``call``, timed; a failure of any kind is BrokerUnavailable
        (``unknown`` says what is not known then). The connection bounds each call
        by ``broker.redis.timeout`` of Redis's silence."""
        started = time.perf_counter()
        try:
            answer = await call
        except FAILURES as exc:
            name = type(exc).__name__
            del exc  # no traceback of it outlives this frame
            raise BrokerUnavailable(f"Redis did not answer ({name}); {unknown}") from None
        self.observer.broker_command(time.perf_counter() - started)
        return answer

    async def _wait(self, calls: Sequence[Awaitable[T]]) -> list[T]:
        """The answers of ``calls`` (a turn's subscriptions), timed once; a failure
        of any kind is BrokerUnavailable."""
        started = time.perf_counter()
        answers = await asyncio.gather(*calls, return_exceptions=True)
        failed = next((a for a in answers if isinstance(a, BaseException)), None)
        if failed is not None:
            name = type(failed).__name__
            del answers, failed  # no traceback of them outlives this frame
            raise BrokerUnavailable(f"Redis did not answer ({name})")
        self.observer.broker_command(time.perf_counter() - started)
        return cast(list[T], answers)

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

    def publish(self, channel: str, payload: Payload, key: str | None) -> Later[Published]:
        """Publish one payload; answered once Redis accepted it.

        The command is written at once, with every other call of this turn of the
        event loop (the pipelined requests of one read, a batch), in one write per
        shard: a busy node makes one round trip per shard per turn, not one per
        message. Publications of one channel keep their order.
        """
        shards = self.shards
        commands = self._commands(shards[0] if len(shards) == 1 else self._shard(channel))
        keys, argv = self._publish_args(channel, payload, key)
        call: Later[Any] = commands.script(PUBLISH_SHA, PUBLISH, keys, argv, Later())
        started = self._turn_started
        if started is None:  # the turn's round trip: timed once
            started = self._turn_started = time.perf_counter()
            asyncio.get_running_loop().call_soon(self._turn_ended)
        else:
            started = None

        def published(answer: Any) -> Published:
            if started is not None:
                self.observer.broker_command(time.perf_counter() - started)
            epoch, _, offset = answer[0].partition(b" ")
            position = Position(epoch.decode(), int(offset))
            duplicate = answer[1] == 1
            if not duplicate:  # a first publish's answer may be of an epoch since left
                self._saw(channel, position)
            return Published(position, None, duplicate)

        return call.then(published, _not_published)

    def _turn_ended(self) -> None:
        self._turn_started = None

    def refusal(self, channels: Sequence[str]) -> ClientError | None:
        # Redis holds the channels (its memory is its operator's to size): the only
        # refusal is a shard that cannot be reached.
        shards = self.shards
        for index in {shard_of(channel, len(shards)) for channel in channels}:
            commands = shards[index].commands
            if commands is None or commands.closed:
                return BrokerUnavailable("Redis is not reachable; try again shortly")
        return None

    def _publish_args(
        self, channel: str, payload: Payload, key: str | None
    ) -> tuple[list[str], list[Any]]:
        fixed = self._publish_keys.get(channel)
        if fixed is None:
            fixed = self._publish_keys_of(channel)
        meta, stream, seen, size, ttl_ms, topic = fixed
        known = self._known(channel)
        return [meta, stream, seen if key is None else seen + key], [
            payload.json,
            size,
            ttl_ms,
            self.meta_ttl_ms,
            self._new_epoch(),
            self.key_ttl_ms,
            topic,
            "0" if key is None else "1",
            known.epoch,
            known.offset,
        ]

    def _publish_keys_of(self, channel: str) -> _PublishKeys:
        meta, stream = self._keys(channel)
        # A key of the channel's slot even without an idempotency key: Cluster-safe.
        seen = f"{self._key_prefix}{channel}}}:k:"
        fixed = (
            meta,
            stream,
            seen,
            self.namespaces.history_size(channel),
            int(self.namespaces.history_ttl(channel) * 1000),
            self._topic_prefix + channel.encode(),
        )
        keys = self._publish_keys
        if len(keys) >= SEEN_CHANNELS:
            del keys[next(iter(keys))]
        keys[channel] = fixed
        return fixed

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
        if len(shard.joining) == 1 and not shard.join_running:
            asyncio.get_running_loop().call_soon(self._join_flush, shard)

    def _join_flush(self, shard: Shard) -> None:
        """Everything subscribed since the last batch left goes to Redis as one
        SUBSCRIBE and one pipeline of position reads, one batch at a time per
        shard: in a storm of new channels, those that arrive while a batch is
        under way wait for it and leave together (two round trips per batch, not
        two per channel, and few writes)."""
        if shard.join_running or not shard.joining:
            return
        batch, shard.joining = shard.joining, []
        shard.join_running = True
        task = asyncio.get_running_loop().create_task(self._join(shard, batch))
        self._tasks.add(task)
        task.add_done_callback(lambda done: self._joined(shard, done))

    def _joined(self, shard: Shard, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        shard.join_running = False
        if shard.joining:
            self._join_flush(shard)

    async def _join(self, shard: Shard, batch: list[tuple[str, bytes]]) -> None:
        try:
            pubsub = shard.pubsub
            if pubsub is None or not shard.subscribed:
                raise BrokerUnavailable("Redis is not reachable; try again shortly")
            commands = self._commands(shard)
            confirmations = pubsub.subscribe([topic for _, topic in batch])
            await self._wait(confirmations)
            calls = []
            for channel, _ in batch:
                args: list[str | int] = [self._new_epoch(), self.meta_ttl_ms, *self._known(channel)]
                keys = list(self._keys(channel))
                calls.append(commands.script(POSITION_SHA, POSITION, keys, args))
            answers = await self._wait(calls)
        except asyncio.CancelledError:
            raise
        except ClientError as exc:
            self._not_joined(shard, batch, exc)
            return
        except Exception as exc:  # a failure of ours: these channels alone
            _log.error("broker.subscribe_failed", error=type(exc).__name__, exc_info=exc)
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
            if topic == self.control_topic or topic == self.reply_topic:
                self._on_control(topic, data)
                continue
            name = topic[skip:].decode()
            prefix = prefixes.get(name)
            if prefix is None:
                continue  # unsubscribed since: Redis may still send a few
            if data[:1] == b"!":
                self._on_event(name, data)
                continue
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

    # Presence

    def _presence_keys(self, channel: str) -> list[str]:
        tag = self._key_prefix + channel + "}"
        return [tag + suffix for suffix in PRESENCE_KEYS]

    def _node_keys(self) -> list[str]:
        """This shard's node registry, its sweep list, and this node's entries."""
        head = self._node_prefix
        return [head + "pnodes", head + "pdead", head + "pn:" + self.node_id]

    def _tell_max(self, channel: str) -> int:
        """The most entries for which joins and leaves are told (-1: never)."""
        try:
            options = self.namespaces.of(channel)
        except ClientError:
            return -1
        return options.join_leave_max if options.join_leave else -1

    def add_presence(self, channel: str, client: str, user: str | None, entry: bytes) -> None:
        entries = self._entries.setdefault(channel, {})
        if client not in entries:  # counted now; Redis's answer corrects it
            self._counts[channel] = self._counts.get(channel, 0) + 1
        entries[client] = (user, entry)
        self._send_add(channel, client, user, entry)

    def _send_add(self, channel: str, client: str, user: str | None, entry: bytes) -> None:
        self._change(channel, ("+", client, orjson.dumps(user), entry))

    def remove_presence(self, channel: str, client: str) -> None:
        entries = self._entries.get(channel)
        if entries is not None:
            entries.pop(client, None)
            if not entries:
                del self._entries[channel]
                self._counts.pop(channel, None)
        self._change(channel, ("-", client))

    def _change(self, channel: str, change: tuple[bytes | str, ...]) -> None:
        """Queue a presence change until this loop turn ends: the turn's changes of
        a shard (a join batch's adds, a drain's removes) leave as one script call,
        as its subscriptions leave as one batch. A read of the shard's presence
        sends them first, so the node reads its own changes."""
        shard = self._shard(channel)
        if shard.commands is None or shard.commands.closed:
            return  # Redis is out of reach: ``_resync`` puts it right once it is back
        pending = shard.presence
        if not pending:
            asyncio.get_running_loop().call_soon(self._send_changes, shard)
        changes = pending.get(channel)
        if changes is None:
            pending[channel] = [change]
        else:
            changes.append(change)

    def _send_changes(self, shard: Shard) -> None:
        """The turn's presence changes of ``shard``: one PRESENCE_CHANGE call per
        PRESENCE_BATCH channels, each channel's changes in the order they came."""
        pending = shard.presence
        if not pending:
            return  # sent already, before a read of the same shard
        shard.presence = {}
        commands = shard.commands
        if commands is None or commands.closed:
            shard.stale = True  # the connection ended this turn: as in _change
            return
        channels = list(pending)
        head: list[bytes | str | int] = [self.node_id, self.presence_ttl_ms, self._topic_prefix]
        for first in range(0, len(channels), PRESENCE_BATCH):
            batch = channels[first : first + PRESENCE_BATCH]
            keys = self._node_keys()
            args = list(head)
            for channel in batch:
                changes = pending[channel]
                keys += self._presence_keys(channel)
                args += (channel, self._tell_max(channel), len(changes))
                for change in changes:
                    args += change
            call = commands.script(CHANGE_SHA, PRESENCE_CHANGE, keys, args)
            call.add_done_callback(functools.partial(self._counted, shard, batch))

    def _counted(self, shard: Shard, channels: list[str], done: asyncio.Future[Any]) -> None:
        """A presence script's answer: whether Redis knew this node, and each
        channel's count, kept while this node has entries there. After a failure
        (Redis may or may not have run it), the next heartbeat puts Redis right."""
        if done.cancelled() or done.exception() is not None:
            shard.stale = True
            return
        lost, *answer = done.result()
        if lost:
            self._restore(shard)
        counts = self._counts
        entries = self._entries
        for channel, count in zip(channels, answer, strict=True):
            if channel in entries:
                counts[channel] = int(count)

    def _resync(self, shard: Shard) -> None:
        """Put Redis right about this node's entries after it may have missed
        changes (a reconnect, a failed call) or gone back in time (a restart or
        failover that lost writes): every entry is added again, and whatever
        Redis lists under this node that the node no longer holds is removed,
        with its leave (``_reconcile``)."""
        shard.stale = False
        self._restore(shard)
        task = asyncio.get_running_loop().create_task(self._reconcile(shard))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reconcile(self, shard: Shard) -> None:
        """Remove the entries Redis holds for this node that it no longer has: read
        the node's entry set (``{PREFIX}:pn:NODE``) 1000 at a time. An entry
        removed or added meanwhile is harmless either way (a remove of what is
        gone does nothing; what is held is kept)."""
        commands = shard.commands
        if commands is None or commands.closed:
            return
        key = self._node_keys()[2]
        cursor: bytes | str = "0"
        try:
            while True:
                cursor, members = await commands.call("SSCAN", key, cursor, "COUNT", 1000)
                for member in members:
                    fields = member.decode().split("\n")  # TELL_MAX, CHANNEL, CLIENT
                    if len(fields) != 3:
                        continue  # not one of ours: the sweep skips it too
                    _, channel, client = fields
                    if client not in self._entries.get(channel, ()):
                        self._change(channel, ("-", client))
                if cursor in (b"0", "0"):
                    return
        except FAILURES:
            shard.stale = True  # the next heartbeat tries again

    def _restore(self, shard: Shard) -> None:
        """Redis did not know this node (it lost its data, or swept the node's
        entries after a pause longer than ``presence.ttl``): add them all again.
        Those still there are not told again; those swept join again."""
        for channel, entries in self._entries.items():
            if self._shard(channel) is shard:
                for client, (user, entry) in entries.items():
                    self._send_add(channel, client, user, entry)

    def _heartbeat(self) -> None:
        """This node lives ``presence.ttl`` more on every shard: one call each,
        whatever the entries it holds. The call also sweeps the nodes that died."""
        self._heartbeat_timer = asyncio.get_running_loop().call_later(
            self.heartbeat_interval, self._heartbeat
        )
        for shard in self.shards:
            self._send_changes(shard)
            self._beat(shard)
            if shard.stale:
                self._resync(shard)

    def _beat(self, shard: Shard) -> None:
        commands = shard.commands
        if commands is None or commands.closed:
            return
        keys = self._node_keys()[:2]
        args: list[bytes | str | int] = [
            self.node_id,
            self.presence_ttl_ms,
            self._node_prefix + "pn:",
            self._key_prefix,
            self._topic_prefix,
            SWEEP_BUDGET,
        ]
        call = commands.script(HEARTBEAT_SHA, PRESENCE_HEARTBEAT, keys, args)
        call.add_done_callback(functools.partial(self._beaten, shard))

    def _beaten(self, shard: Shard, done: asyncio.Future[Any]) -> None:
        if done.cancelled() or done.exception() is not None:
            return
        lost, sweeping = done.result()
        if lost:
            self._restore(shard)
        if sweeping:  # dead nodes' entries remain: sweep on, a bounded call a turn
            asyncio.get_running_loop().call_soon(self._beat, shard)

    async def presence(self, channel: str, after: str | None, limit: int) -> PresencePage:
        shard = self._shard(channel)
        commands = self._commands(shard)
        self._send_changes(shard)  # a read sees this node's changes before it
        start = "-" if after is None else "(" + after
        ph, pl, _ = self._presence_keys(channel)
        call = commands.script(PAGE_SHA, PRESENCE_PAGE, [ph, pl], [start, limit])
        rows = await self._answer(call, "nothing was read")
        clients: list[bytes] = []
        last = None
        for i in range(0, min(len(rows), 2 * limit), 2):
            value = rows[i + 1]
            last = rows[i].decode()
            if value:
                clients.append(value.partition(b"\n")[2])
        return PresencePage(clients, last if len(rows) > 2 * limit else None)

    async def presence_stats(self, channel: str) -> PresenceStats:
        shard = self._shard(channel)
        commands = self._commands(shard)
        self._send_changes(shard)
        ph, _, pu = self._presence_keys(channel)
        call = commands.script(STATS_SHA, PRESENCE_STATS, [ph, pu], [])
        clients, users = await self._answer(call, "nothing was read")
        if channel in self._entries:
            self._counts[channel] = int(clients)
        return PresenceStats(int(clients), int(users))

    def presence_count(self, channel: str) -> int:
        return self._counts.get(channel, 0)

    def _on_event(self, channel: str, data: bytes) -> None:
        """``! join|leave CLIENT USER_JSON`` from a presence script."""
        handler = self._handler
        if handler is None:
            return
        try:
            kind, client, user = data[2:].split(b" ", 2)
            handler.presence_event(channel, kind.decode(), client.decode(), orjson.loads(user))
        except Exception as exc:  # one bad event ends nobody's delivery
            if _throttle.allow("broker.event"):
                _log.error("broker.event_failed", channel=channel, exc_info=exc)

    # Control: server API commands to every node

    async def command(self, command: dict[str, Any]) -> list[dict[str, Any]]:
        """Publish ``command`` to every node; their answers, as many as Redis says
        listen, or those that came within ``broker.redis.timeout``."""
        commands = self._commands(self.shards[0])
        request_id = f"{self.reply_topic.decode()}:{next(self._request_ids)}"
        gathering = self._requests[request_id] = _Gathering()
        message = orjson.dumps(
            {"id": request_id, "reply": self.reply_topic.decode(), "command": command}
        )
        try:
            listeners = await self._answer(
                commands.call("PUBLISH", self.control_topic, message),
                "the command may have reached some nodes",
            )
            gathering.expect(int(listeners))
            try:
                async with asyncio.timeout(self.settings.timeout):
                    await gathering.done
            except TimeoutError:
                _log.warning(
                    "control.partial",
                    op=command.get("op"),
                    nodes=int(listeners),
                    answered=len(gathering.answers),
                )
        finally:
            self._requests.pop(request_id, None)
        return gathering.answers

    def _on_control(self, topic: bytes, data: bytes) -> None:
        try:
            message = orjson.loads(data)
            if topic == self.reply_topic:
                gathering = self._requests.get(message["id"])
                if gathering is not None:
                    gathering.add(message["answer"])
                return
            handler = self._handler
            if handler is None:
                return
            answer = handler.execute(message["command"])
            commands = self._commands(self.shards[0])
            reply = orjson.dumps({"id": message["id"], "answer": answer})
            commands.call("PUBLISH", message["reply"], reply).add_done_callback(_let_go)
        except Exception as exc:  # a command that fails here fails for no one else
            if _throttle.allow("broker.control"):
                _log.error("broker.control_failed", exc_info=exc)

    # Reading

    async def begin(self, channel: str) -> Position:
        return await self._position(self._shard(channel), channel, create=True)

    async def restart(self, channel: str, epoch: str) -> Position:
        commands = self._commands(self._shard(channel))
        keys = list(self._keys(channel))
        args: list[str | int] = [epoch, self._new_epoch(), self.meta_ttl_ms]
        call = commands.script(RESTART_SHA, RESTART, keys, args)
        new, offset = await self._answer(call, "the channel may have begun again")
        position = Position(new.decode(), int(offset))
        self._saw(channel, position)
        return position

    async def position(self, channel: str) -> Position | None:
        position = await self._position(self._shard(channel), channel, create=False)
        return position if position.epoch else None

    async def _position(self, shard: Shard, channel: str, *, create: bool) -> Position:
        commands = self._commands(shard)
        keys = list(self._keys(channel))
        known = self._known(channel)
        args: list[str | int] = [self._new_epoch() if create else "", self.meta_ttl_ms, *known]
        call = commands.script(POSITION_SHA, POSITION, keys, args)
        epoch, offset = await self._answer(call, "its position is not known")
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
        commands = self._commands(self._shard(channel))
        keys = list(self._keys(channel))
        ttl = max(1, int(self.namespaces.history_ttl(channel)))
        args: list[str | int] = [f"0-{since + 1}", max(count, 0), ttl, "1" if newest else "0"]
        call = commands.script(HISTORY_SHA, HISTORY, keys, args)
        epoch_b, offset_b, rows = await self._answer(call, "nothing was read")
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
        """Every ``probe_interval``: a probe through each shard's pub/sub path, unless
        one is still under way; one under way for longer than ``probe_timeout``
        is judged after the next read of the sockets, not before (a loop busy with
        a storm of its own clients may simply not have read it yet)."""
        loop = asyncio.get_running_loop()
        now = time.monotonic()  # fresh: the loop's time is that of its turn's start
        timeout = self.settings.probe_timeout
        for shard in self.shards:
            if not shard.subscribed:
                continue
            sent = shard.probe_sent
            if sent is None:
                self._send_probe(shard)
            elif now - sent > timeout:
                loop.call_later(0, self._probe_overdue, shard, sent)
        self._probe_timer = loop.call_later(self.settings.probe_interval, self._probe)

    def _probe_overdue(self, shard: Shard, sent: float) -> None:
        if shard.probe_sent == sent and shard.subscribed:  # still not back, sockets read
            self.observer.broker_probe(None)
            self._set(shard, False, "probe_timeout")
            self._rebuild(shard, "no probe came back within broker.redis.probe_timeout")

    def _send_probe(self, shard: Shard) -> None:
        commands = shard.commands
        if commands is None or commands.closed:
            return
        shard.probe_sent = time.monotonic()
        stamp = b"%d %r" % (shard.index, time.perf_counter())
        commands.call("PUBLISH", self.probe_topic, stamp).add_done_callback(self._probe_sent)

    def _probe_sent(self, published: asyncio.Future[Any]) -> None:
        """A probe's PUBLISH was answered, or failed: the command path is down then
        (the connection ends, and ``_run`` makes it again)."""
        if not published.cancelled() and published.exception() is not None:
            self.observer.broker_probe(None)

    def _probe_back(self, data: bytes) -> None:
        index, _, sent = data.partition(b" ")
        shard = self.shards[int(index)]
        shard.probe_sent = None
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

    def stats(self) -> HistoryStats:
        return HistoryStats()  # history lives in Redis, not in this process


class _Gathering:
    """The answers to one server API command, and when they are all in."""

    __slots__ = ("answers", "done", "expected")

    def __init__(self) -> None:
        self.answers: list[dict[str, Any]] = []
        self.expected: int | None = None
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def expect(self, count: int) -> None:
        self.expected = count
        self._check()

    def add(self, answer: dict[str, Any]) -> None:
        self.answers.append(answer)
        self._check()

    def _check(self) -> None:
        if self.expected is not None and len(self.answers) >= self.expected:
            self.finish()

    def finish(self) -> None:
        if not self.done.done():
            self.done.set_result(None)


def _let_go(done: asyncio.Future[Any]) -> None:
    """A reply nobody waits for: its failure is retrieved (the answer is lost with
    the connection, and the asking node's deadline covers it)."""
    if not done.cancelled():
        done.exception()


def _not_published(error: BaseException) -> Published:
    """A publish Redis did not confirm: BrokerUnavailable (503)."""
    if isinstance(error, FAILURES):
        raise BrokerUnavailable(
            f"Redis did not answer ({type(error).__name__}); nothing is known to be published"
        ) from None
    raise error
