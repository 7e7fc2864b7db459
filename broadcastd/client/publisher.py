"""Publishers: the control API over HTTP, blocking (:class:`Publisher`) or async
(:class:`AsyncPublisher`).

Each publisher holds one httpx client, so requests reuse keep-alive connections
(a pool) instead of paying a TCP handshake each. Both classes build their
requests and read the answers with the same functions below; only the sending
differs.

Retries are made only where a retry cannot publish a message twice: reads
(``GET``) always, publishes only when every message carries an idempotency key
(the daemon then answers a repeat with the first publish's position and
``duplicate: true``). They are made on a 503 and on a network failure, with
exponential backoff and full jitter, waiting at least the daemon's
``Retry-After`` (capped by ``max_backoff``).
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar
from urllib.parse import quote

import httpx
import msgspec

from broadcastd import __version__
from broadcastd.client.backoff import Backoff
from broadcastd.client.errors import (
    BroadcastdError,
    NetworkError,
    ServerError,
    Unavailable,
    refusal,
)
from broadcastd.client.presence import (
    ConnectionPage,
    PresencePage,
    PresenceStats,
    connection_page,
    presence_page,
    presence_stats,
)

T = TypeVar("T")

_decode = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode

PAGE = 1000
"""Channels asked for per request of :meth:`Publisher.channels` (the daemon's most)."""


# what the daemon answers


@dataclass(frozen=True, slots=True)
class Published:
    """Where a message went: its position in the channel (``epoch``, ``offset``),
    how many subscribers of this daemon it was queued for, and whether it was a
    repeat of an idempotency key (then nothing was published: the position is the
    first publish's and ``subscribers`` is 0). ``epoch`` is None only from a
    daemon that sends none."""

    channel: str
    epoch: str | None
    offset: int
    subscribers: int
    duplicate: bool = False


@dataclass(frozen=True, slots=True)
class ItemFailed:
    """One item of a batch that the daemon refused (the others were published)."""

    channel: str
    code: str
    message: str


@dataclass(frozen=True, slots=True)
class BatchResult:
    """The answer to :meth:`Publisher.batch`: one result per item, in order."""

    published: int
    failed: int
    results: tuple[Published | ItemFailed, ...]


@dataclass(frozen=True, slots=True)
class BatchItem:
    """One message of a batch. A plain ``(channel, data)`` or ``(channel, data,
    idempotency_key)`` tuple does as well."""

    channel: str
    data: Any
    idempotency_key: str | None = None


@dataclass(frozen=True, slots=True)
class Publication:
    """A message kept in a channel's history."""

    offset: int
    data: Any


@dataclass(frozen=True, slots=True)
class History:
    """A page of a channel's history: its latest position (``epoch``,
    ``offset``), whether history still reaches back to the ``since`` asked
    (``complete``), the ``since`` of the next page (``next``, None at the latest)
    and the messages."""

    channel: str
    epoch: str
    offset: int
    complete: bool
    next: int | None
    publications: tuple[Publication, ...]


@dataclass(frozen=True, slots=True)
class ChannelInfo:
    """A channel the daemon holds: its subscribers here and its latest position."""

    name: str
    subscribers: int
    epoch: str
    offset: int


Item = BatchItem | tuple[str, Any] | tuple[str, Any, str | None]


# requests, built and read the same way by both publishers


@dataclass(frozen=True, slots=True)
class _Call(Generic[T]):
    method: str
    path: str
    read: Callable[[Any], T]
    body: bytes | None = None
    headers: dict[str, str] | None = None
    params: dict[str, str | int] | None = None
    retry: bool = False
    """Whether sending it again cannot publish anything twice."""


def _channel_path(channel: str) -> str:
    # ":" and "@" belong to channel names and are legal in a path: sent as they
    # are (the daemon takes names literally). What a name cannot hold is
    # percent-encoded, so the daemon answers bad_channel instead of bad_request.
    return quote(channel, safe=":@")


def _publish_call(
    channel: str, data: Any, idempotency_key: str | None, content_type: str | None
) -> _Call[Published]:
    if content_type is None:
        body = _encode(data)
        content_type = "application/json"
    elif isinstance(data, bytes | bytearray | memoryview):
        body = bytes(data)
    elif isinstance(data, str):
        body = data.encode()
    else:
        raise TypeError("with a content_type, data must be bytes or str: the body as it is")
    headers = {"Content-Type": content_type}
    if idempotency_key is not None:
        headers["Idempotency-Key"] = idempotency_key
    return _Call(
        "POST",
        f"/publish/{_channel_path(channel)}",
        _published,
        body,
        headers,
        retry=idempotency_key is not None,
    )


def _publish_many_call(
    channels: Sequence[str], data: Any, idempotency_key: str | None
) -> _Call[list[Published]]:
    headers = {"Content-Type": "application/json"}
    if idempotency_key is not None:
        headers["Idempotency-Key"] = idempotency_key
    body = _encode({"channels": list(channels), "data": data})

    def read(doc: Any) -> list[Published]:
        return [_published(result) for result in doc["results"]]

    return _Call("POST", "/publish", read, body, headers, retry=idempotency_key is not None)


def _batch_call(items: Iterable[Item]) -> _Call[BatchResult]:
    wire: list[dict[str, Any]] = []
    channels: list[str] = []
    keyed = True
    for item in items:
        if isinstance(item, BatchItem):
            channel, data, key = item.channel, item.data, item.idempotency_key
        elif len(item) == 3:
            channel, data, key = item
        else:
            channel, data = item
            key = None
        doc: dict[str, Any] = {"channel": channel, "data": data}
        if key is not None:
            doc["idempotency_key"] = key
        else:
            keyed = False
        wire.append(doc)
        channels.append(channel)

    def read(doc: Any) -> BatchResult:
        results: list[Published | ItemFailed] = []
        for channel, result in zip(channels, doc["results"], strict=True):
            error = result.get("error")
            if error is not None:
                results.append(ItemFailed(channel, str(error["code"]), str(error["message"])))
            else:
                results.append(_published(result))
        return BatchResult(int(doc["published"]), int(doc["failed"]), tuple(results))

    return _Call(
        "POST",
        "/batch",
        read,
        _encode(wire),
        {"Content-Type": "application/json"},
        retry=keyed and bool(wire),
    )


def _history_call(
    channel: str, since: int, epoch: str | None, limit: int, newest_first: bool
) -> _Call[History]:
    params: dict[str, str | int] = {"since": since, "limit": limit}
    if epoch is not None:
        params["epoch"] = epoch
    if newest_first:
        params["order"] = "desc"

    def read(doc: Any) -> History:
        return History(
            doc["channel"],
            doc["epoch"],
            doc["offset"],
            doc["complete"],
            doc["next"],
            tuple(Publication(p["offset"], p["data"]) for p in doc["publications"]),
        )

    return _Call(
        "GET", f"/channels/{_channel_path(channel)}/history", read, params=params, retry=True
    )


def _channel_call(name: str) -> _Call[ChannelInfo]:
    return _Call("GET", f"/channels/{_channel_path(name)}", _channel_info, retry=True)


def _channels_call(after: str | None) -> _Call[tuple[list[ChannelInfo], str | None]]:
    params: dict[str, str | int] = {"limit": PAGE}
    if after is not None:
        params["after"] = after

    def read(doc: Any) -> tuple[list[ChannelInfo], str | None]:
        return [_channel_info(c) for c in doc["channels"]], doc["next"]

    return _Call("GET", "/channels", read, params=params, retry=True)


def _page_params(cursor: str | None, limit: int | None) -> dict[str, str | int]:
    params: dict[str, str | int] = {}
    if cursor is not None:
        params["cursor"] = cursor
    if limit is not None:
        params["limit"] = limit
    return params


def _presence_call(channel: str, cursor: str | None, limit: int | None) -> _Call[PresencePage]:
    path = f"/channels/{_channel_path(channel)}/presence"
    return _Call("GET", path, presence_page, params=_page_params(cursor, limit), retry=True)


def _presence_stats_call(channel: str) -> _Call[PresenceStats]:
    path = f"/channels/{_channel_path(channel)}/presence/stats"
    return _Call("GET", path, presence_stats, retry=True)


def _connections_call(
    user: str | None, channel: str | None, cursor: str | None, limit: int | None
) -> _Call[ConnectionPage]:
    params = _page_params(cursor, limit)
    if user is not None:
        params["user"] = user
    if channel is not None:
        params["channel"] = channel
    return _Call("GET", "/connections", connection_page, params=params, retry=True)


def _disconnect_call(
    user: str | None, client: str | None, code: int | None, reason: str | None
) -> _Call[int]:
    # Whatever is given goes as given: the daemon judges it (one of user and
    # client, a code from 4000 to 4999) and its refusal says what is wrong.
    request = {"user": user, "client": client, "code": code, "reason": reason}
    body = _encode({k: v for k, v in request.items() if v is not None})

    def read(doc: Any) -> int:
        return int(doc["disconnected"])

    # Not retried: a repeat would close nothing more, but would answer 0.
    return _Call("POST", "/disconnect", read, body, {"Content-Type": "application/json"})


def _info_call() -> _Call[list[dict[str, Any]]]:
    def read(doc: Any) -> list[dict[str, Any]]:
        return list(doc["nodes"])

    return _Call("GET", "/info", read, retry=True)


def _published(doc: Any) -> Published:
    return Published(
        doc["channel"],
        doc.get("epoch"),
        doc["offset"],
        doc.get("subscribers", 0),
        doc.get("duplicate", False) is True,
    )


def _channel_info(doc: Any) -> ChannelInfo:
    return ChannelInfo(doc["name"], doc["subscribers"], doc["epoch"], doc["offset"])


def _answer(call: _Call[T], response: httpx.Response) -> T:
    """The typed answer of a 200, or the typed error of anything else."""
    if response.status_code == 200:
        try:
            return call.read(_decode(response.content))
        except (msgspec.DecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ServerError(
                "bad_answer", f"unexpected answer: {exc}", 200, response.text
            ) from None
    raise _error(response)


def _error(response: httpx.Response) -> BroadcastdError:
    return refusal(
        response.status_code,
        response.text,
        response.reason_phrase,
        response.headers.get("Retry-After"),
    )


def _network_error(exc: httpx.TransportError) -> NetworkError:
    error = NetworkError(str(exc) or type(exc).__name__)
    error.__cause__ = exc
    return error


class _Retries:
    """When and how long to wait before sending a call again."""

    def __init__(self, retries: int, min_backoff: float, max_backoff: float) -> None:
        self.retries = retries
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff

    def delay(self, call: _Call[Any], error: BroadcastdError, backoff: Backoff) -> float | None:
        """Seconds before the next attempt, or None: raise ``error``."""
        if not call.retry or not isinstance(error, Unavailable | NetworkError):
            return None
        if backoff.failures >= self.retries:
            return None
        delay = backoff.next_delay(0.0)
        retry_after = getattr(error, "retry_after", None)
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.max_backoff))
        return delay

    def backoff(self) -> Backoff:
        return Backoff(self.min_backoff, self.max_backoff, float("inf"))


class _Base:
    def __init__(
        self,
        url: str,
        token: str | None,
        timeout: float,
        retries: int,
        min_backoff: float,
        max_backoff: float,
    ) -> None:
        self.url = url.rstrip("/")
        self._headers = {"User-Agent": f"broadcastd-client/{__version__}"}
        if token is not None:
            self._headers["Authorization"] = f"Bearer {token}"
        self._timeout = httpx.Timeout(timeout)
        self._retries = _Retries(retries, min_backoff, max_backoff)


class Publisher(_Base):
    """The control API, blocking: publish, read history, list channels, and the
    server API (presence, connections, disconnect, node info).

    ``url`` is the control port (``http://127.0.0.1:8766`` by default), or with
    ``unix`` the daemon's control socket (``control.unix_path``) is used
    instead and ``url`` only names the host. ``token`` is the control token (sent
    as ``Authorization: Bearer``). ``timeout`` bounds each attempt; ``retries``
    the attempts after the first, for the calls that may be retried (see the
    module); ``on_retry`` hears of each.

    Errors are :class:`~broadcastd.client.BroadcastdError`: ``RequestRefused``
    (4xx), ``Unavailable`` (503), ``ServerError``, ``NetworkError``. Use it as
    a context manager, or call :meth:`close`, to close its connections.
    """

    def __init__(
        self,
        url: str = "http://127.0.0.1:8766",
        *,
        token: str | None = None,
        unix: str | None = None,
        timeout: float = 10.0,
        retries: int = 3,
        min_backoff: float = 0.1,
        max_backoff: float = 5.0,
        on_retry: Callable[[int, BroadcastdError, float], None] | None = None,
    ) -> None:
        super().__init__(url, token, timeout, retries, min_backoff, max_backoff)
        self._on_retry = on_retry
        # No proxies from the environment: the control port is an internal address.
        self._client = httpx.Client(
            base_url=self.url,
            headers=self._headers,
            timeout=self._timeout,
            transport=httpx.HTTPTransport(uds=unix) if unix is not None else None,
            trust_env=False,
        )

    def publish(
        self,
        channel: str,
        data: Any,
        *,
        idempotency_key: str | None = None,
        content_type: str | None = None,
    ) -> Published:
        """Publish ``data`` (any value msgspec encodes as JSON; a ``msgspec.Raw``
        is sent as the JSON text it holds) to ``channel``.

        With ``content_type`` the body is ``data`` itself (bytes or str) with that
        type: a JSON type embeds it verbatim, any other as a string. With an
        ``idempotency_key`` a failed attempt is retried with the same key.
        """
        return self._run(_publish_call(channel, data, idempotency_key, content_type))

    def publish_many(
        self, channels: Sequence[str], data: Any, *, idempotency_key: str | None = None
    ) -> list[Published]:
        """Publish one message to several channels, all or none (one request)."""
        return self._run(_publish_many_call(channels, data, idempotency_key))

    def batch(self, items: Iterable[Item]) -> BatchResult:
        """Publish many messages in one request, item by item: a refused item
        (an :class:`ItemFailed` in its place) does not stop the others. Retried
        only when every item has an idempotency key."""
        return self._run(_batch_call(items))

    def history(
        self,
        channel: str,
        *,
        since: int = 0,
        epoch: str | None = None,
        limit: int = 100,
        newest_first: bool = False,
    ) -> History:
        """What history keeps of ``channel`` after offset ``since`` (at most
        ``limit``, 1 to 1000). With ``epoch``, a channel now in another epoch is
        a ``RequestRefused`` with code ``epoch_mismatch``."""
        return self._run(_history_call(channel, since, epoch, limit, newest_first))

    def channel(self, name: str) -> ChannelInfo:
        """One channel (``RequestRefused`` ``not_found`` if the daemon holds none)."""
        return self._run(_channel_call(name))

    def channels(self) -> list[ChannelInfo]:
        """Every channel the daemon holds (that the token may read), in name order,
        fetched a page at a time."""
        found: list[ChannelInfo] = []
        after: str | None = None
        while True:
            page, after = self._run(_channels_call(after))
            found.extend(page)
            if after is None:
                return found

    def presence(
        self, channel: str, *, cursor: str | None = None, limit: int | None = None
    ) -> PresencePage:
        """A page of who subscribes to ``channel``, on every node (a namespace with
        ``presence``; else ``RequestRefused`` ``presence_disabled``): at most
        ``limit`` entries (default and most: the daemon's ``presence.max_page``),
        after ``cursor`` (the ``next`` of the page before)."""
        return self._run(_presence_call(channel, cursor, limit))

    def presence_stats(self, channel: str) -> PresenceStats:
        """How many clients and distinct users subscribe to ``channel``."""
        return self._run(_presence_stats_call(channel))

    def connections(
        self,
        *,
        user: str | None = None,
        channel: str | None = None,
        cursor: str | None = None,
        limit: int | None = None,
    ) -> ConnectionPage:
        """A page of the open connections of every node, of one ``user`` or on one
        ``channel`` if given, paged as :meth:`presence` is."""
        return self._run(_connections_call(user, channel, cursor, limit))

    def disconnect(
        self,
        *,
        user: str | None = None,
        client: str | None = None,
        code: int | None = None,
        reason: str | None = None,
    ) -> int:
        """Close every connection of ``user``, or the one of ``client``, on every
        node, with close ``code`` (4000 to 4999; the daemon's default 4010) and
        ``reason``; return how many were closed. Needs the ``admin`` scope.
        Not retried."""
        return self._run(_disconnect_call(user, client, code, reason))

    def info(self) -> list[dict[str, Any]]:
        """Each node's ``node`` id, ``version``, ``uptime``, ``clients``,
        ``subscriptions`` and ``channels``."""
        return self._run(_info_call())

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _run(self, call: _Call[T]) -> T:
        backoff = self._retries.backoff()
        while True:
            try:
                response = self._client.request(
                    call.method,
                    call.path,
                    content=call.body,
                    headers=call.headers,
                    params=call.params,
                )
            except httpx.TransportError as exc:
                error: BroadcastdError = _network_error(exc)
            else:
                try:
                    return _answer(call, response)
                except BroadcastdError as exc:
                    error = exc
            delay = self._retries.delay(call, error, backoff)
            if delay is None:
                raise error
            if self._on_retry is not None:
                self._on_retry(backoff.failures, error, delay)
            time.sleep(delay)


class AsyncPublisher(_Base):
    """The control API for asyncio programs: :class:`Publisher`'s methods, awaited.
    ``on_retry`` may be a coroutine function (it is awaited)."""

    def __init__(
        self,
        url: str = "http://127.0.0.1:8766",
        *,
        token: str | None = None,
        unix: str | None = None,
        timeout: float = 10.0,
        retries: int = 3,
        min_backoff: float = 0.1,
        max_backoff: float = 5.0,
        on_retry: Callable[[int, BroadcastdError, float], Awaitable[None] | None] | None = None,
    ) -> None:
        super().__init__(url, token, timeout, retries, min_backoff, max_backoff)
        self._on_retry = on_retry
        self._client = httpx.AsyncClient(
            base_url=self.url,
            headers=self._headers,
            timeout=self._timeout,
            transport=httpx.AsyncHTTPTransport(uds=unix) if unix is not None else None,
            trust_env=False,
        )

    async def publish(
        self,
        channel: str,
        data: Any,
        *,
        idempotency_key: str | None = None,
        content_type: str | None = None,
    ) -> Published:
        """See :meth:`Publisher.publish`."""
        return await self._run(_publish_call(channel, data, idempotency_key, content_type))

    async def publish_many(
        self, channels: Sequence[str], data: Any, *, idempotency_key: str | None = None
    ) -> list[Published]:
        """See :meth:`Publisher.publish_many`."""
        return await self._run(_publish_many_call(channels, data, idempotency_key))

    async def batch(self, items: Iterable[Item]) -> BatchResult:
        """See :meth:`Publisher.batch`."""
        return await self._run(_batch_call(items))

    async def history(
        self,
        channel: str,
        *,
        since: int = 0,
        epoch: str | None = None,
        limit: int = 100,
        newest_first: bool = False,
    ) -> History:
        """See :meth:`Publisher.history`."""
        return await self._run(_history_call(channel, since, epoch, limit, newest_first))

    async def channel(self, name: str) -> ChannelInfo:
        """See :meth:`Publisher.channel`."""
        return await self._run(_channel_call(name))

    async def channels(self) -> list[ChannelInfo]:
        """See :meth:`Publisher.channels`."""
        found: list[ChannelInfo] = []
        after: str | None = None
        while True:
            page, after = await self._run(_channels_call(after))
            found.extend(page)
            if after is None:
                return found

    async def presence(
        self, channel: str, *, cursor: str | None = None, limit: int | None = None
    ) -> PresencePage:
        """See :meth:`Publisher.presence`."""
        return await self._run(_presence_call(channel, cursor, limit))

    async def presence_stats(self, channel: str) -> PresenceStats:
        """See :meth:`Publisher.presence_stats`."""
        return await self._run(_presence_stats_call(channel))

    async def connections(
        self,
        *,
        user: str | None = None,
        channel: str | None = None,
        cursor: str | None = None,
        limit: int | None = None,
    ) -> ConnectionPage:
        """See :meth:`Publisher.connections`."""
        return await self._run(_connections_call(user, channel, cursor, limit))

    async def disconnect(
        self,
        *,
        user: str | None = None,
        client: str | None = None,
        code: int | None = None,
        reason: str | None = None,
    ) -> int:
        """See :meth:`Publisher.disconnect`."""
        return await self._run(_disconnect_call(user, client, code, reason))

    async def info(self) -> list[dict[str, Any]]:
        """See :meth:`Publisher.info`."""
        return await self._run(_info_call())

    async def close(self) -> None:
        await self._client.aclose()

    async def __aenter__(self) -> AsyncPublisher:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _run(self, call: _Call[T]) -> T:
        backoff = self._retries.backoff()
        while True:
            try:
                response = await self._client.request(
                    call.method,
                    call.path,
                    content=call.body,
                    headers=call.headers,
                    params=call.params,
                )
            except httpx.TransportError as exc:
                error: BroadcastdError = _network_error(exc)
            else:
                try:
                    return _answer(call, response)
                except BroadcastdError as exc:
                    error = exc
            delay = self._retries.delay(call, error, backoff)
            if delay is None:
                raise error
            if self._on_retry is not None:
                heard = self._on_retry(backoff.failures, error, delay)
                if inspect.isawaitable(heard):
                    await heard
            await asyncio.sleep(delay)
