"""Namespaces: the options of a channel, chosen by the part of its name before the first ``:``.

``private:room1`` is in namespace ``private``; ``news`` (no ``:``) uses the
top-level options. When any namespace is declared, a name whose namespace is
not declared is refused (``unknown_namespace``) for publishing and subscribing
alike, so a typo cannot create an open channel. With none declared, every name
uses the top-level options, as before namespaces existed.

Options a namespace leaves unset are the top-level ones. The default of
``subscribe`` follows authentication: ``public`` when no ``[auth]`` key is
configured, ``token`` once one is, so that turning auth on cannot leave
channels open by accident.
"""

from __future__ import annotations

from dataclasses import dataclass

from broadcastd.core.outbox import Budget
from broadcastd.errors import UnknownNamespace
from broadcastd.settings import NamespaceSettings, Settings, SlowConsumerPolicy, SubscribeRule


@dataclass(frozen=True, slots=True)
class ChannelOptions:
    """What applies to one channel."""

    namespace: str
    """"" for channels without one."""
    subscribe: SubscribeRule
    recover: bool
    policy: SlowConsumerPolicy | None
    """None: the connection's own (``ws.slow_consumer_policy``)."""
    budget: Budget | None
    """The namespace's own outbox bounds, within each client's outbox; None: only
    the outbox's (``ws.outbox_messages``, ``ws.outbox_bytes``)."""
    history_size: int
    history_ttl: float
    max_payload_bytes: int
    presence: bool = False
    """Presence can be asked of its channels."""
    join_leave: bool = False
    """Its channels' subscribers get join and leave events."""
    presence_for_subscribers: bool = False
    join_leave_max: int = 0
    """Subscribers beyond which join and leave are not sent."""

    @property
    def tracked(self) -> bool:
        """Its channels' subscribers have presence entries (for presence, or for the
        leave of a client whose node crashed)."""
        return self.presence or self.join_leave


class Namespaces:
    """Channel name -> its options; one dict lookup per call."""

    __slots__ = ("_by_name", "declared", "top")

    def __init__(self, settings: Settings) -> None:
        default_rule = settings.channels.subscribe or (
            SubscribeRule.TOKEN if settings.auth.enabled else SubscribeRule.PUBLIC
        )
        self.top = ChannelOptions(
            namespace="",
            subscribe=default_rule,
            recover=settings.channels.recover,
            policy=None,
            budget=None,
            history_size=settings.history.size,
            history_ttl=settings.history.ttl,
            max_payload_bytes=settings.control.max_payload_bytes,
        )
        self._by_name = {n.name: _merge(self.top, n, settings) for n in settings.namespaces}
        self.declared = bool(self._by_name)

    def of(self, channel: str) -> ChannelOptions:
        """The options of ``channel``; UnknownNamespace if namespaces are declared
        and its namespace is not one of them."""
        name, colon, _ = channel.partition(":")
        if not colon:
            return self.top
        options = self._by_name.get(name)
        if options is not None:
            return options
        if self.declared:
            raise UnknownNamespace(f"namespace {name[:64]!r} is not declared")
        return self.top

    def history_size(self, channel: str) -> int:
        """History size of ``channel`` (the top-level one for an unknown namespace:
        such a channel is refused before anything is kept)."""
        try:
            return self.of(channel).history_size
        except UnknownNamespace:
            return self.top.history_size

    def history_ttl(self, channel: str) -> float:
        try:
            return self.of(channel).history_ttl
        except UnknownNamespace:
            return self.top.history_ttl

    @property
    def max_history_size(self) -> int:
        return max([self.top.history_size, *(o.history_size for o in self._by_name.values())])


def _merge(top: ChannelOptions, n: NamespaceSettings, settings: Settings) -> ChannelOptions:
    return ChannelOptions(
        namespace=n.name,
        subscribe=n.subscribe or top.subscribe,
        recover=top.recover if n.recover is None else n.recover,
        policy=n.slow_consumer_policy,
        budget=_budget(n, settings),
        history_size=top.history_size if n.history_size is None else n.history_size,
        history_ttl=top.history_ttl if n.history_ttl is None else n.history_ttl,
        max_payload_bytes=min(
            settings.control.max_payload_bytes,
            n.max_payload_bytes or settings.control.max_payload_bytes,
        ),
        presence=n.presence,
        join_leave=n.join_leave,
        presence_for_subscribers=n.presence_for_subscribers,
        join_leave_max=n.join_leave_max_subscribers,
    )


def _budget(n: NamespaceSettings, settings: Settings) -> Budget | None:
    """The namespace's outbox bounds, if it sets either; the other is the outbox's."""
    if n.outbox_messages is None and n.outbox_bytes is None:
        return None
    return Budget(
        n.name,
        n.outbox_messages or settings.ws.outbox_messages,
        n.outbox_bytes or settings.ws.outbox_bytes,
    )
