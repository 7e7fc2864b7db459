"""The node: hub + engine + observer, and every publish, subscribe and recovery
decision between them.

The node holds one engine and calls it one way, whichever runs
(``broadcastd.broker``; ARCHITECTURE.md, "The engine seam"). ``publish()``
checks the items and hands them to the engine, which gives each its channel's
next position and delivers it back through ``deliver`` (the hub's fan-out): on
the memory engine inside the publish call, on Redis when the publication comes
back over pub/sub. A subscriber joins through the node, so that the engine
hears of a channel's first and last local subscriber; a subscriber that gives a
position recovers from the engine's history, merged with the live stream so
that nothing is doubled or skipped. Each engine answer may be there at once or
later; ``then`` runs the rest either way, so the memory engine's hot paths
never wait. The node also holds the lifecycle state both adapters consult
(ready, draining).

Presence and the server API go through the same engine: a subscriber of a
tracked channel (a namespace with ``presence`` or ``join_leave``) gets an entry
in the engine as it joins and loses it as it leaves, and the engine announces
joins and leaves back through ``presence_event``, on every node. A server API
command (disconnect, unsubscribe, subscribe, the connection listing, info) is
handed to the engine, which carries it to every node, this one included, each
running it on its own connections (``execute``): one path on both engines.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any, TypeVar, cast

from broadcastd import __version__, log
from broadcastd.auth.claims import Claims, may_subscribe
from broadcastd.background import Background
from broadcastd.broker import (
    Broker,
    Health,
    History,
    MaybeAwaitable,
    Published,
    pending,
    then,
)
from broadcastd.broker.memory import MemoryBroker
from broadcastd.core.announcements import Announcements
from broadcastd.core.channels import check_channel
from broadcastd.core.envelope import Payload, reply_frame
from broadcastd.core.forms import Form
from broadcastd.core.hub import Channel, Delivery, FanOut, Hub
from broadcastd.core.ids import new_node_id
from broadcastd.core.namespaces import ChannelOptions, Namespaces
from broadcastd.core.observer import NullObserver, Observer
from broadcastd.core.outbox import Outbox
from broadcastd.core.presence import (
    PresencePage,
    PresenceStats,
    entry_json,
    event_frame,
)
from broadcastd.core.publish_forms import Item
from broadcastd.core.session import Session
from broadcastd.core.stream import (
    Last,
    Position,
    Publication,
    Recovery,
    Since,
    parse_since,
    plan_recovery,
)
from broadcastd.errors import (
    BrokerUnavailable,
    ClientError,
    CloseReason,
    Draining,
    PayloadTooLarge,
    PermissionDenied,
    PresenceDisabled,
    PresenceNotAllowed,
    UnknownNamespace,
)
from broadcastd.later import Later, every
from broadcastd.settings import Settings, SlowConsumerPolicy

_log = log.get("broadcastd.node")
T = TypeVar("T")

Joined = Callable[[Position, Recovery | None], None]
Failed = Callable[[ClientError], None]
Answers = list[Published | ClientError]


class Joiner:
    """A subscriber on its way into a channel (perhaps recovering first)."""

    __slots__ = ("cancelled", "failed", "form", "joined", "member", "outbox", "since")

    def __init__(
        self,
        outbox: Outbox,
        form: Form,
        since: Since | None,
        joined: Joined,
        failed: Failed,
        member: Session | None = None,
    ) -> None:
        self.outbox = outbox
        self.member = member
        self.form = form
        self.since = since
        self.joined = joined
        self.failed = failed
        self.cancelled = False


class Node:
    """Owns the channel state of this process; the engine's handler."""

    def __init__(
        self,
        settings: Settings,
        broker: Broker | None = None,
        observer: Observer | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.wall_clock = wall_clock
        """Unix time, for what clients and operators read (``connected_at``)."""
        self.started = clock()
        self.id = new_node_id()
        """This process's name among the nodes of a deployment (new at each start)."""
        self.namespaces = Namespaces(settings)
        self.hub = Hub(self._delivery_of)
        self.broker: Broker = (
            broker if broker is not None else MemoryBroker(settings, clock, self.namespaces)
        )
        self.observer: Observer = observer if observer is not None else NullObserver()
        self.max_recover = settings.history.max_recover
        self._waiting: dict[str, list[Joiner]] = {}
        """Channels asked of the engine and not subscribed yet: who waits for each."""
        self._background = Background("broadcastd.node", "node.error")
        """Joins waiting for the engine's answer."""
        self.ready = False
        """Every listener accepts connections and the daemon is not draining."""
        self.draining = False
        self.publishing_since: float | None = None
        """When the fan-out under way began (None between fan-outs): writers woken by
        it measure delivery latency from here, at no cost per delivery."""
        self.sessions: dict[str, Session] = {}
        """This node's connections by client id, for the server API (a plain dict:
        registering is on the path of every connection of a reconnect storm; the
        transport ends each session, which takes it out)."""
        self.max_page = settings.presence.max_page
        self.announcements = Announcements(self.hub.get)
        """Join and leave events waiting to be told, a slice per loop turn."""

    async def start(self) -> None:
        await self.broker.start(self)

    async def close(self) -> None:
        self._background.cancel()
        await self.broker.close()

    @property
    def broker_health(self) -> Health:
        return self.broker.health

    # What the engine calls back (BrokerHandler)

    def subscribed(self, channel: str, position: Position) -> None:
        waiting = [j for j in self._waiting.pop(channel, ()) if not j.cancelled]
        if not waiting:  # everyone left meanwhile
            self.broker.unsubscribe(channel)
            return
        joined = self.hub.add(channel, position)
        for joiner in waiting:
            self._admit(joined, joiner)

    def unavailable(self, channel: str, error: ClientError) -> None:
        for joiner in self._waiting.pop(channel, ()):
            if not joiner.cancelled:
                joiner.failed(error)

    def deliver(self, channel: str, publication: Publication) -> FanOut:
        """Fan a publication out here. Inside a publish (the memory engine) it is
        reported with the publish; one that came from another process is reported
        here, its delivery latency measured from its arrival."""
        if self.announcements.queues:
            self._tell_waiting(channel)
        if self.publishing_since is not None:
            return self.hub.deliver(channel, publication)
        self.publishing_since = self.clock()
        try:
            fan_out = self.hub.deliver(channel, publication)
        finally:
            self.publishing_since = None
        self.observer.delivered(fan_out.queued, fan_out.refused)
        return fan_out

    def resync(self, channel: str, position: Position, reason: str) -> None:
        """Tell every subscriber of the channel that what it missed cannot be had,
        and where the channel continues from."""
        joined = self.hub.get(channel)
        _log.warning(
            "channel.resync",
            channel=channel,
            reason=reason,
            epoch=position.epoch,
            offset=position.offset,
            subscribers=0 if joined is None else joined.subscriber_count,
        )
        if joined is None:
            return
        if self.announcements.queues:
            self._tell_waiting(channel)
        joined.epoch, joined.offset = position
        frame = reply_frame(
            {
                "type": "resync",
                "channel": channel,
                "epoch": position.epoch,
                "offset": position.offset,
                "reason": reason,
            }
        )
        for outbox in joined.outboxes():
            outbox.push(frame)

    # Publishing

    def publish(
        self, channel: str, payload: Payload, form: str, key: str | None = None
    ) -> Published | Later[Published]:
        """Publish one message (``POST /publish/{channel}``), answered at once
        (memory) or once the engine accepted it (Redis; BrokerUnavailable if it
        cannot be reached); a refusal is raised, and nothing is published then."""
        if self.draining:
            self.refuse_if_draining()
        self._check(channel, payload)
        self.publishing_since = self.clock()
        try:
            published = self.broker.publish(channel, payload, key)
        finally:
            self.publishing_since = None
        if isinstance(published, Later):
            return published.then(lambda done: self._counted_one(form, done))
        return self._counted_one(form, published)  # the memory engine: no closure

    def _counted_one(self, form: str, published: Published) -> Published:
        if not published.duplicate:
            fan_out = published.fan_out
            if fan_out is None:
                self.observer.published(form, 1, 0, 0)
            else:
                self.observer.published(form, 1, fan_out.queued, fan_out.refused)
        return published

    def publish_all(
        self, items: Sequence[Item | ClientError], form: str, *, all_or_none: bool = False
    ) -> MaybeAwaitable[Answers]:
        """Publish each item in order: one answer per item, a refused item's
        ClientError in its place (and an item already found bad, passed in as its
        ClientError, stays so), so one bad item does not sink the rest. With
        ``all_or_none`` every item, and the engine's room for them, is checked
        before the first is published, and a refusal is raised: nothing is left
        half done, and a retry cannot duplicate a message. An engine that cannot
        be reached refuses the whole call (BrokerUnavailable), before any item.

        The answers come at once (memory) or once the engine answered every item
        (Redis). The whole call counts as accepted at one instant and is reported
        to the observer once.
        """
        if self.draining:
            self.refuse_if_draining()
        check = self._check
        if all_or_none:
            for item in items:
                if isinstance(item, ClientError):
                    raise item
                check(item[0], item[1])
        refusal = self.broker.refusal([i[0] for i in items if not isinstance(i, ClientError)])
        if refusal is not None and (all_or_none or isinstance(refusal, BrokerUnavailable)):
            raise refusal
        publish = self.broker.publish
        answers: list[Published | Later[Published] | ClientError] = []
        later = False
        self.publishing_since = self.clock()
        try:
            for item in items:
                if isinstance(item, ClientError):
                    answers.append(item)
                    continue
                channel, payload, key = item
                try:
                    if not all_or_none:
                        check(channel, payload)
                    answer = publish(channel, payload, key)
                except ClientError as exc:  # this item alone
                    if all_or_none:  # not met: the room was checked for every item
                        raise
                    answers.append(exc)
                    continue
                if not later and type(answer) is Later:
                    later = True
                answers.append(answer)
        finally:
            self.publishing_since = None
        if later:
            # Once the engine answered every item; if it failed any, the whole call
            # fails as one (BrokerUnavailable: it is not known what was published).
            return every(answers).then(lambda done: self._counted(form, cast(Answers, done)))
        return self._counted(form, cast(Answers, answers))

    def _counted(self, form: str, answers: Answers) -> Answers:
        """The engine's answers, reported to the observer once."""
        messages = queued = dropped = 0
        for answer in answers:
            if type(answer) is Published and not answer.duplicate:
                messages += 1
                fan_out = answer.fan_out
                if fan_out is not None:
                    queued += fan_out.queued
                    dropped += fan_out.refused
        if messages:
            self.observer.published(form, messages, queued, dropped)
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

    # Subscribing and recovering (the session's Membership)

    def join(
        self,
        outbox: Outbox,
        name: str,
        form: Form,
        since: Since | None,
        joined: Joined,
        failed: Failed,
        member: Session | None = None,
    ) -> None:
        """Subscribe ``outbox`` (recovering from ``since`` first, if given), and call
        ``joined`` with the position and the recovery right before the live stream
        continues: at once with the memory engine, after a round trip with Redis
        (or ``failed`` if the engine cannot be reached). A refusal known at once
        is raised. A ``member`` (its session) enters the channel's presence as
        it joins, where the namespace tracks it."""
        joiner = Joiner(outbox, form, since, joined, failed, member)
        channel = self.hub.get(name)
        if channel is not None:
            self._admit(channel, joiner)
            return
        waiting = self._waiting.get(name)
        if waiting is not None:
            waiting.append(joiner)
            return
        self._waiting[name] = [joiner]
        try:
            self.broker.subscribe(name)  # may answer (``subscribed``) at once
        except ClientError:
            self._waiting.pop(name, None)
            raise

    def unsubscribe(self, outbox: Outbox, name: str, member: Session | None = None) -> None:
        waiting = self._waiting.get(name)
        if waiting is not None:
            for joiner in waiting:
                if joiner.outbox is outbox:
                    joiner.cancelled = True
            return
        channel = self.hub.get(name)
        if channel is not None:
            for joiner in channel.recovering:
                if joiner.outbox is outbox:
                    joiner.cancelled = True
        left = self.hub.leave(outbox, name)
        if member is not None and self._tracked(name):
            self.broker.remove_presence(name, member.id)
        if left:
            self.broker.unsubscribe(name)

    def _admit(self, channel: Channel, joiner: Joiner) -> None:
        """Join now if nothing must be read first; else recover, then join."""
        since = joiner.since
        if since is None:
            self._join_now(channel, joiner, None)
            return
        name = channel.name
        recovers = self.recovers(name)
        if isinstance(since, Last):
            count = min(since.number, self.max_recover) if recovers else 0
            if count == 0 or channel.offset == 0:
                self._join_now(channel, joiner, Recovery(True, None, []))
                return
            epoch = channel.epoch

            def got_latest(latest: History) -> None:
                got = [p for p in latest.publications or () if p.epoch == epoch]
                got = [p for p in got if p.offset <= channel.offset]
                cursor = got[-1].offset if got else channel.offset
                self._read_on(channel, joiner, epoch, cursor, got)

            self._recovering(channel, joiner, self.broker.latest(name, count), got_latest)
            return
        missed = channel.offset - since.offset
        if 0 < missed <= self.max_recover and since.epoch == channel.epoch and recovers:
            self._read_on(channel, joiner, channel.epoch, since.offset, [])
            return
        read = _nothing_read if recovers else None  # not called in these cases
        recovery = plan_recovery(channel.position, since, self.max_recover, read)
        self.observer.recovered(recovery.recovered, recovery.reason, 0)
        self._join_now(channel, joiner, recovery)

    def _read_on(
        self, channel: Channel, joiner: Joiner, epoch: str, cursor: int, got: list[Publication]
    ) -> None:
        """Read what ``joiner`` missed until the read reaches what this node has
        delivered; then join it in the same step (nothing can come between)."""
        if joiner.cancelled or self.hub.get(channel.name) is not channel:
            return
        if channel.epoch != epoch:  # the channel was resynced meanwhile: decide again
            self._admit(channel, joiner)
            return
        if cursor >= channel.offset:
            self._recovered(channel, joiner, got, complete=True)
            return
        limit = min(channel.offset - cursor, self.max_recover)

        def got_page(history: History) -> None:
            page = [p for p in history.publications or () if p.offset <= channel.offset]
            if history.top.epoch != epoch or not page:
                self._recovered(channel, joiner, got, complete=False)
                return
            got.extend(page)
            self._read_on(channel, joiner, epoch, page[-1].offset, got)

        self._recovering(
            channel, joiner, self.broker.history(channel.name, cursor, limit), got_page
        )

    def _recovered(
        self, channel: Channel, joiner: Joiner, got: list[Publication], *, complete: bool
    ) -> None:
        if joiner.cancelled or self.hub.get(channel.name) is not channel:
            return
        since = joiner.since
        if isinstance(since, Last):
            recovery = Recovery(True, None, got if complete else [])
        else:
            assert since is not None
            kept = got if complete else None
            recovery = plan_recovery(
                channel.position, since, self.max_recover, lambda after, limit: kept
            )
            self.observer.recovered(recovery.recovered, recovery.reason, len(recovery.replay))
        self._join_now(channel, joiner, recovery)

    def _recovering(
        self,
        channel: Channel,
        joiner: Joiner,
        answer: MaybeAwaitable[History],
        step: Callable[[History], None],
    ) -> None:
        """Run ``step`` on a history read: at once if the engine answered, else when
        it does. Meanwhile the channel stays in the hub (and subscribed at the
        engine) for the joiner, even if its other subscribers leave."""
        if not pending(answer):
            step(cast(History, answer))
            return
        channel.recovering.add(joiner)

        def done(history: History) -> None:
            channel.recovering.discard(joiner)
            try:
                step(history)  # which may read on (and hold the channel again), or join
            finally:
                self._let_go(channel)

        def failed(error: ClientError) -> None:
            channel.recovering.discard(joiner)
            self._let_go(channel)
            if not joiner.cancelled:
                joiner.failed(error)

        self._when(answer, done, failed)

    def _let_go(self, channel: Channel) -> None:
        """The channel goes if nobody holds it any more (its last subscriber left
        while a joiner recovered)."""
        if self.hub.forget_if_idle(channel):
            self.broker.unsubscribe(channel.name)

    def _join_now(self, channel: Channel, joiner: Joiner, recovery: Recovery | None) -> None:
        self.hub.join(channel, joiner.outbox, joiner.form)
        member = joiner.member
        if member is not None and self._tracked(channel.name):
            self.broker.add_presence(channel.name, member.id, member.user, self._entry(member))
        joiner.joined(channel.position, recovery)

    def _when(
        self,
        answer: Awaitable[T],
        step: Callable[[T], None],
        failed: Callable[[ClientError], None],
    ) -> None:
        """Run ``step`` on an engine's answer once it comes; ``failed`` if it cannot
        be had. A failure of ours in ``step`` is logged once and ends that step only."""

        async def wait() -> None:
            try:
                value = await answer
            except ClientError as exc:
                failed(exc)
                return
            step(value)

        self._background.spawn(wait())

    # Presence

    def _tracked(self, name: str) -> bool:
        try:
            return self.namespaces.of(name).tracked
        except UnknownNamespace:
            return False

    def _entry(self, member: Session) -> bytes:
        entry = member.entry
        if entry is None:
            entry = member.entry = entry_json(
                member.id, member.user, self.id, member.connected_at, member.info
            )
        return entry

    def presence_event(self, channel: str, kind: str, client: str, user: str | None) -> None:
        """A join or leave from the engine: to every local subscriber of the channel
        told events (not raw WebSockets) but the client itself, in slices of
        bounded work per loop turn (``core.announcements``)."""
        joined = self.hub.get(channel)
        if joined is None:
            return
        own = self.sessions.get(client)
        skip = None if own is None else own.outbox
        if self.announcements.add(joined, event_frame(kind, channel, client, user), skip):
            asyncio.get_running_loop().call_soon(self._announce)

    def _announce(self) -> None:
        """One slice of the waiting join and leave events; the next one is due in
        the next turn, after whatever else the loop has to do."""
        try:
            more = self.announcements.run()
        except Exception as exc:  # a fault of ours: the events wait no longer
            self._lose_announcements(exc)
            return
        if more:
            asyncio.get_running_loop().call_soon(self._announce)

    def _tell_waiting(self, name: str) -> None:
        """The waiting events of channel ``name``, told before what is queued next."""
        joined = self.hub.get(name)
        if joined is None or joined not in self.announcements:
            return
        try:
            self.announcements.tell(joined)
        except Exception as exc:
            self._lose_announcements(exc)

    def _lose_announcements(self, exc: Exception) -> None:
        _log.error("presence.announce_failed", exc_info=exc)
        self.announcements = Announcements(self.hub.get)

    def join_leave(self, name: str) -> bool | None:
        options = self.namespaces.of(name)
        if not options.join_leave:
            return None
        return self.broker.presence_count(name) <= options.join_leave_max

    def _presence_options(self, name: str) -> None:
        check_channel(name)
        if not self.namespaces.of(name).presence:
            raise PresenceDisabled(f"namespace of {name[:64]!r} does not track presence")

    def presence(self, name: str, after: str | None, limit: int) -> MaybeAwaitable[PresencePage]:
        """A page of ``name``'s presence (every node's clients), at most
        ``presence.max_page`` entries."""
        self._presence_options(name)
        return self.broker.presence(name, after, min(limit, self.max_page))

    def presence_stats(self, name: str) -> MaybeAwaitable[PresenceStats]:
        self._presence_options(name)
        return self.broker.presence_stats(name)

    def _for_subscribers(self, name: str) -> None:
        self._presence_options(name)
        if not self.namespaces.of(name).presence_for_subscribers:
            raise PresenceNotAllowed(
                f"subscribers may not ask for the presence of {name[:64]!r} "
                "(the namespace's presence_for_subscribers is off)"
            )

    def ask_presence(
        self,
        name: str,
        cursor: str | None,
        answered: Callable[[PresencePage], None],
        failed: Failed,
    ) -> None:
        self._for_subscribers(name)
        self._answer(self.broker.presence(name, cursor, self.max_page), answered, failed)

    def ask_presence_stats(
        self, name: str, answered: Callable[[PresenceStats], None], failed: Failed
    ) -> None:
        self._for_subscribers(name)
        self._answer(self.broker.presence_stats(name), answered, failed)

    def _answer(self, answer: MaybeAwaitable[T], step: Callable[[T], None], failed: Failed) -> None:
        if pending(answer):
            self._when(answer, step, failed)
        else:
            step(cast(T, answer))

    # Connections and the server API

    def connected(self, session: Session) -> None:
        session.connected_at = self.wall_clock()
        self.sessions[session.id] = session

    def disconnected(self, session: Session) -> None:
        if self.sessions.get(session.id) is session:
            del self.sessions[session.id]

    def server_command(self, command: dict[str, Any]) -> MaybeAwaitable[list[dict[str, Any]]]:
        """Run a server API command on every node (through the engine): each node's
        answer."""
        return self.broker.command(command)

    def execute(self, command: dict[str, Any]) -> dict[str, Any]:
        """A server API command, from any node: run on this node's connections."""
        op = command.get("op")
        answer: dict[str, Any] = {"node": self.id}
        if op == "info":
            answer.update(self.info())
        elif op == "connections":
            answer["connections"] = self._connections(command)
        elif op == "disconnect":
            reason = CloseReason.server(int(command["code"]), str(command["reason"]))
            answer["count"] = sum(s.disconnect(reason) for s in self._matching(command))
        elif op == "unsubscribe":
            channel = str(command["channel"])
            answer["count"] = sum(s.unsubscribe_by_server(channel) for s in self._matching(command))
        elif op == "subscribe":
            channel = str(command["channel"])
            given = command.get("since")
            since = None if given is None else parse_since(given)
            answer["count"] = sum(
                s.subscribe_by_server(channel, since) for s in self._matching(command)
            )
        else:
            raise ValueError(f"unknown server command {op!r}")
        return answer

    def _matching(self, command: dict[str, Any]) -> list[Session]:
        """The open sessions a command names, by client id or by user."""
        client, user = command.get("client"), command.get("user")
        if client is not None:
            session = self.sessions.get(client)
            found = [] if session is None else [session]
        else:
            found = [s for s in self.sessions.values() if s.user == user]
        return [s for s in found if s.outbox.closed is None]

    def _connections(self, command: dict[str, Any]) -> list[dict[str, Any]]:
        """A page of this node's open connections in client-id order."""
        user, channel = command.get("user"), command.get("channel")
        after, limit = command.get("after"), int(command["limit"])
        chosen = [
            s
            for s in self.sessions.values()
            if s.outbox.closed is None
            and (user is None or s.user == user)
            and (channel is None or channel in s.channels)
            and (after is None or s.id > after)
        ]
        chosen.sort(key=lambda s: s.id)
        return [_listed(s, self.id) for s in chosen[:limit]]

    def info(self) -> dict[str, Any]:
        """This node, as ``GET /info`` lists it."""
        return {
            "node": self.id,
            "version": __version__,
            "uptime": round(self.clock() - self.started, 3),
            "clients": sum(1 for s in self.sessions.values() if s.outbox.closed is None),
            "subscriptions": self.hub.subscriptions,
            "channels": len(self.hub),
        }

    # What the control API shows

    def channel_names(self) -> Iterator[str]:
        """Every channel this node knows: those with local subscribers, and those
        whose streams the engine holds here (Redis: those subscribed here)."""
        for channel in self.hub:
            yield channel.name
        for name, _ in self.broker.channels():
            if name not in self.hub:
                yield name

    def known_channels(self) -> Iterator[tuple[str, Position, int]]:
        """Every channel this node knows, with the position known here and its
        local subscriber count (for listings: no round trip)."""
        hub = self.hub
        for channel in hub:
            yield channel.name, channel.position, channel.subscriber_count
        for name, position in self.broker.channels():
            if name not in hub:
                yield name, position, 0

    def channel_state(self, name: str) -> MaybeAwaitable[tuple[Position, int] | None]:
        """A channel's latest position (the engine's) and its local subscriber count."""

        def state(position: Position | None) -> tuple[Position, int] | None:
            if position is None or not position.epoch:
                return None
            channel = self.hub.get(name)
            return position, 0 if channel is None else channel.subscriber_count

        return then(self.broker.position(name), state)

    def read_history(
        self, name: str, since: int, limit: int, newest_first: bool
    ) -> MaybeAwaitable[tuple[Position, list[Publication], bool] | None]:
        """What history keeps of ``name`` after offset ``since``: the channel's latest
        position, up to ``limit`` publications (oldest or newest first), and whether
        history still reaches back to ``since + 1``. None for an unknown channel.
        Where it no longer does, what it still keeps is given (bounded by the
        namespace's history size)."""
        broker = self.broker

        def found(
            history: History,
        ) -> MaybeAwaitable[tuple[Position, list[Publication], bool] | None]:
            top = history.top
            if not top.epoch:
                return None
            complete = history.publications is not None
            if complete and not newest_first:
                return top, history.publications or [], True
            count = limit if newest_first else self.namespaces.history_size(name)

            def kept(latest: History) -> tuple[Position, list[Publication], bool]:
                after = [p for p in latest.publications or () if p.offset > since]
                page = after[::-1] if newest_first else after[:limit]
                return top, page, complete

            return then(broker.latest(name, count), kept)

        return then(broker.history(name, since, limit), found)

    def begin_drain(self) -> None:
        self.ready = False
        self.draining = True

    def refuse_if_draining(self) -> None:
        """Raise Draining (503) once the drain has begun: from then on nothing new is
        accepted (no publish, no new subscriber), while what was accepted before
        still reaches the subscribers."""
        if self.draining:
            raise Draining("the server is shutting down")


def _nothing_read(after: int, limit: int) -> list[Publication] | None:
    """History not read: recovery was decided without it (see ``_admit``)."""
    return []


def _listed(session: Session, node: str) -> dict[str, Any]:
    """A connection as ``GET /connections`` lists it (with the token's ``info``, if any)."""
    entry = {
        "client": session.id,
        "user": session.user,
        "node": node,
        "remote": session.remote,
        "connected_at": int(session.connected_at),
        "channels": list(session.channels),
        "transport": session.transport,
    }
    info = session.info
    if info is not None:
        entry["info"] = info
    return entry
