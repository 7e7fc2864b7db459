"""Python clients for broadcastd: a WebSocket subscriber and HTTP publishers.

::

    from broadcastd.client import AsyncPublisher, Message, Recovered, Subscriber

    async with Subscriber("ws://127.0.0.1:8765") as sub:
        async for item in sub.subscribe("news"):
            if isinstance(item, Message):
                print(item.channel, item.offset, item.data)
            elif isinstance(item, Recovered) and not item.recovered:
                ...  # messages were lost while disconnected: reload

    async with AsyncPublisher("http://127.0.0.1:8766") as pub:
        await pub.publish("news", {"price": 42}, idempotency_key="order-17")

:class:`Subscriber` keeps one connection up, reconnecting with backoff and
resuming each channel after its last message; what could not be resumed is told
as an event of the stream, never dropped. :class:`Publisher` (blocking) and
:class:`AsyncPublisher` speak the control API with pooled keep-alive
connections, typed answers and typed errors, retrying only what cannot be
published twice. ``broadcastd subscribe`` and ``broadcastd publish`` are built on
them.
"""

from typing import TYPE_CHECKING, Any

from broadcastd.client.backoff import Backoff
from broadcastd.client.errors import (
    BroadcastdError,
    ClosedByServer,
    CommandRefused,
    MessagesLost,
    MessageTooBig,
    NetworkError,
    RequestRefused,
    ServerError,
    Unavailable,
)
from broadcastd.client.events import (
    ALL_EVENTS,
    DEFAULT_EVENTS,
    Authenticated,
    CommandFailed,
    Event,
    Expiring,
    Join,
    Leave,
    Message,
    Missed,
    Other,
    Position,
    Recovered,
    Resync,
    State,
    StateChanged,
    Subscribed,
    Unsubscribed,
)
from broadcastd.client.presence import ConnectionPage, PresencePage, PresenceStats
from broadcastd.client.subscriber import Stream, Subscriber, TokenSource

if TYPE_CHECKING:
    from broadcastd.client.publisher import (
        AsyncPublisher,
        BatchItem,
        BatchResult,
        ChannelInfo,
        History,
        ItemFailed,
        Publication,
        Published,
        Publisher,
    )

_PUBLISHER_NAMES = frozenset(
    (
        "AsyncPublisher",
        "BatchItem",
        "BatchResult",
        "ChannelInfo",
        "History",
        "ItemFailed",
        "Publication",
        "Published",
        "Publisher",
    )
)


def __getattr__(name: str) -> Any:
    """The publishers' names, imported on first use: httpx takes a while to import,
    and the daemon (which imports the CLI, which imports the subscriber) never
    publishes over HTTP."""
    if name in _PUBLISHER_NAMES:
        from broadcastd.client import publisher

        return getattr(publisher, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ALL_EVENTS",
    "DEFAULT_EVENTS",
    "AsyncPublisher",
    "Authenticated",
    "Backoff",
    "BatchItem",
    "BatchResult",
    "BroadcastdError",
    "ChannelInfo",
    "ClosedByServer",
    "CommandFailed",
    "CommandRefused",
    "ConnectionPage",
    "Event",
    "Expiring",
    "History",
    "ItemFailed",
    "Join",
    "Leave",
    "Message",
    "MessageTooBig",
    "MessagesLost",
    "Missed",
    "NetworkError",
    "Other",
    "Position",
    "PresencePage",
    "PresenceStats",
    "Publication",
    "Published",
    "Publisher",
    "Recovered",
    "RequestRefused",
    "Resync",
    "ServerError",
    "State",
    "StateChanged",
    "Stream",
    "Subscribed",
    "Subscriber",
    "TokenSource",
    "Unavailable",
    "Unsubscribed",
]
