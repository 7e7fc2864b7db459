"""The control port: publishing, statistics, health and readiness, presence and
the server API over HTTP.

Routes map HTTP onto Node calls; the request forms are parsed in
broadcastd.core.publish_forms. Every error is ``{"error": {"code", "message"}}``
(``errors.error_body``) with the status its ClientError carries (500
``internal`` for a failure of ours, answered by the HTTP layer). HEAD is served
wherever GET is.

Tokens. Once ``control.token`` or any ``control.tokens`` entry is set, every
route but the probes (/healthz, /readyz) needs ``Authorization: Bearer TOKEN``.
Each token is a Grant (broadcastd.auth.grants, which keeps only digests and
compares them in constant time): the scopes it holds (which routes) and the
channel patterns it may touch (which channels). ``control.token`` holds every
scope on every channel, as it always has. A missing or wrong token is a
401 ``unauthorized``; a valid token without the route's scope, or naming a
channel outside its patterns, is a 403 ``forbidden``, decided before anything
is read from a broker or published (and before the body is sent, where the
route and its channel say enough: ``Expect: 100-continue``).

Idempotency keys are text: the ``Idempotency-Key`` header is read as UTF-8
(a header that is not UTF-8 is a 400), so a key is the same key whether it
comes in the header or in a batch item's ``idempotency_key``.

The server API (``/connections``, ``/info`` with ``read``; ``/disconnect``,
``/unsubscribe``, ``/subscribe`` with ``admin``) reaches every node through the
engine (``Node.server_command``): the answer counts what every node did.

The API is described by ``broadcastd/openapi.json`` (OpenAPI 3.1), written by
hand as the one source of truth and served at ``GET /openapi.json``; a test
holds it and ``ControlApi.routes()`` to each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterable, Sequence
from importlib import resources
from typing import Any, cast
from urllib.parse import parse_qsl, unquote

import orjson

from broadcastd import log
from broadcastd.auth.grants import OPEN_GRANT, Grant, find_grant, load_grants
from broadcastd.broker import Published, then
from broadcastd.core.channels import is_valid_channel
from broadcastd.core.hub import page
from broadcastd.core.idempotency import check_key
from broadcastd.core.presence import MAX_CURSOR_LENGTH, PresencePage, PresenceStats
from broadcastd.core.publish_forms import (
    Item,
    body_payload,
    is_json_type,
    parse_batch,
    parse_publish,
)
from broadcastd.core.stream import MAX_OFFSET, Position, Publication, decimal, parse_since
from broadcastd.errors import (
    MAX_CLOSE_REASON_BYTES,
    SERVER_CODES,
    BadCommand,
    BadJson,
    ClientError,
    CloseReason,
    EpochMismatch,
    Forbidden,
    InternalError,
    MethodNotAllowed,
    NotFound,
    Unauthorized,
    UnsupportedMediaType,
    error_body,
)
from broadcastd.later import Later
from broadcastd.node import Node
from broadcastd.settings import ControlSettings, Scope
from broadcastd.transport.http import Api, HttpProtocol, Limits, Request, Response

_PUBLIC = frozenset(("/healthz", "/readyz"))
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PAGE_LIMIT = 1000
"""Default and largest ``limit`` of ``GET /channels``."""
LISTEN_BACKLOG = 1024
"""Connections the kernel queues for ``accept()`` on each listener (listen(2))."""


_log = log.get("broadcastd.control")
_throttle = log.Throttle(per_second=10)

_SCOPES: dict[str, Scope] = {
    "publish": Scope.PUBLISH,
    "publish_channel": Scope.PUBLISH,
    "batch": Scope.PUBLISH,
    "channels": Scope.READ,
    "channels_channel": Scope.READ,
    "stats": Scope.READ,
    "metrics": Scope.READ,
    "openapi.json": Scope.READ,
    "connections": Scope.READ,
    "info": Scope.READ,
}
"""The scope each endpoint needs. An endpoint missing here needs ``admin``, so a
route added later is closed to scoped tokens until it is given a scope (there
admin-only routes are /disconnect, /unsubscribe and /subscribe: ``admin`` is
every scope at once)."""

Handler = Callable[[Request, str, Grant], Response | Awaitable[Response]]
"""A route's handler, given the request, the rest of the path after a prefixed
route's prefix (its channel; "" on the other routes) and the grant of the
request's token."""


def openapi_document() -> bytes:
    """The OpenAPI document of the control API, as shipped in the package."""
    return resources.files("broadcastd").joinpath("openapi.json").read_bytes()


def json_response(status: int, doc: Any, headers: Sequence[tuple[str, str]] = ()) -> Response:
    return Response(status, orjson.dumps(doc), headers)


def error_response(error: ClientError | InternalError) -> Response:
    headers: list[tuple[str, str]] = []
    if isinstance(error, MethodNotAllowed):
        headers.append(("Allow", ", ".join(error.allowed)))
    elif isinstance(error, Unauthorized):
        headers.append(("WWW-Authenticate", 'Bearer realm="broadcastd"'))
    elif error.http_status == 503:
        headers.append(("Retry-After", "5"))
    return json_response(error.http_status, error_body(error.code, error.message), headers)


class ControlApi:
    """The routes of the control port, independent of how requests arrive."""

    def __init__(
        self,
        settings: ControlSettings,
        node: Node,
        client_count: Callable[[], int],
        metrics: Callable[[], bytes] | None = None,
    ) -> None:
        self.settings = settings
        self.node = node
        self.client_count = client_count
        self.metrics = metrics
        self._grants = load_grants(settings)
        self._exact: dict[str, dict[str, Handler]] = {
            "/healthz": {"GET": self._healthz},
            "/readyz": {"GET": self._readyz},
            "/publish": {"POST": self._publish},
            "/batch": {"POST": self._batch},
            "/channels": {"GET": self._channels},
            "/stats": {"GET": self._stats},
            "/openapi.json": {"GET": self._openapi},
            "/connections": {"GET": self._connections},
            "/info": {"GET": self._info},
            "/disconnect": {"POST": self._disconnect},
            "/unsubscribe": {"POST": self._unsubscribe},
            "/subscribe": {"POST": self._subscribe},
        }
        if metrics is not None:
            self._exact["/metrics"] = {"GET": self._metrics}
        self._prefixed: dict[str, tuple[str, dict[str, Handler]]] = {
            "/publish/": ("{channel}", {"POST": self._publish_channel}),
            "/channels/": ("{name}", {"GET": self._channel}),
        }
        self._openapi_body = openapi_document()

    def routes(self) -> dict[str, tuple[str, ...]]:
        """Every route served, as an OpenAPI path template -> its methods."""
        table = {path: _methods(methods) for path, methods in self._exact.items()}
        for prefix, (parameter, methods) in self._prefixed.items():
            table[prefix + parameter] = _methods(methods)
        for rest in ("history", "presence", "presence/stats"):
            table["/channels/{name}/" + rest] = table["/channels/{name}"]
        return table

    def handle(self, request: Request) -> Response | Awaitable[Response]:
        endpoint = "unknown"
        try:
            found = self._match(request.path)
            if found is None:
                raise NotFound(f"no route for {request.path[:64]!r}")
            endpoint = found[2]
            handler, grant = self._gate(request, found)
            response = handler(request, found[1], grant)
        except ClientError as error:
            response = error_response(error)
        if not isinstance(response, Response):

            def answered(response: Response) -> Response:
                self.node.observer.control_request(endpoint, response.status)
                return response

            def refused(error: BaseException) -> Response:
                if not isinstance(error, ClientError):
                    raise error  # the framing answers 500 and logs it
                return answered(error_response(error))

            return cast(Awaitable[Response], then(response, answered, refused))
        self.node.observer.control_request(endpoint, response.status)
        return response

    def check(self, request: Request) -> ClientError | None:
        """Route, token and method of a request whose body has not been sent yet."""
        found = self._match(request.path)
        if found is None:
            return NotFound(f"no route for {request.path[:64]!r}")
        try:
            self._gate(request, found)
        except ClientError as error:
            return error
        return None

    def refuse(self, error: ClientError | InternalError, request: Request | None) -> Response:
        """An error answered by the HTTP layer (malformed, too large, a failure), counted."""
        endpoint = "unknown"
        if request is not None:
            found = self._match(request.path)
            if found is not None:
                endpoint = found[2]
        response = error_response(error)
        self.node.observer.control_request(endpoint, response.status)
        return response

    def _gate(
        self, request: Request, found: tuple[dict[str, Handler], str, str]
    ) -> tuple[Handler, Grant]:
        """The handler for the request's method and the grant of its token: 401 without
        a valid token, then 405 for a method the route lacks, then 403 for a token
        without the route's scope or, on the routes that name a channel in their
        path, without that channel. Judged from the head alone."""
        methods, argument, endpoint = found
        grant = OPEN_GRANT
        if self._grants and request.path not in _PUBLIC:
            grant = self._authenticate(request, endpoint)
        method = request.method
        handler = methods.get("GET" if method == "HEAD" else method)
        if handler is None:
            raise MethodNotAllowed(f"{method[:16]} is not allowed here", _methods(methods))
        if grant is not OPEN_GRANT:
            scope = _SCOPES.get(endpoint, Scope.ADMIN)
            if not grant.allows(scope):
                held = ", ".join(sorted(grant.scopes)) or "none"
                raise self._forbidden(
                    grant,
                    endpoint,
                    "scope",
                    f"{method[:16]} {request.path[:64]} needs the {scope.value!r} scope; "
                    f"token {grant.name!r} has: {held}",
                )
            if argument and not grant.everywhere:
                channel = argument.partition("/")[0] if endpoint == "channels_channel" else argument
                if not grant.covers(channel):
                    raise self._forbidden(
                        grant,
                        endpoint,
                        "channel",
                        f"channel {channel[:64]!r} is outside the channels token "
                        f"{grant.name!r} may use",
                    )
        return handler, grant

    def _match(self, path: str) -> tuple[dict[str, Handler], str, str] | None:
        """The handlers of the route serving ``path``, the path's argument (the part
        after a prefix), and the endpoint's name (for metrics and scopes)."""
        methods = self._exact.get(path)
        if methods is not None:
            return methods, "", path.strip("/")
        for prefix, (_, prefixed) in self._prefixed.items():
            if path.startswith(prefix) and len(path) > len(prefix):
                # OpenAPI clients percent-encode path parameters (":" and "@" too).
                argument = path[len(prefix) :]
                if "%" in argument:
                    argument = unquote(argument)
                return prefixed, argument, prefix.strip("/") + "_channel"
        return None

    def _authenticate(self, request: Request, endpoint: str) -> Grant:
        """The grant of the request's bearer token (``find_grant``)."""
        given = request.headers.get("authorization")
        if given is None:
            raise self._unauthorized(endpoint, "missing bearer token")
        scheme, _, credentials = given.partition(" ")
        if scheme.lower() != "bearer":
            raise self._unauthorized(endpoint, "invalid bearer token")
        # Headers are decoded as latin-1: this gives back the bytes that were sent.
        matched = find_grant(self._grants, credentials.encode("latin-1"))
        if matched is None:
            raise self._unauthorized(endpoint, "invalid bearer token")
        return matched

    @staticmethod
    def _unauthorized(endpoint: str, message: str) -> Unauthorized:
        """A refusal logged (throttled) with what was asked for, never what was sent."""
        if _throttle.allow("unauthorized"):
            _log.warning(
                "control.refused",
                reason="unauthorized",
                endpoint=endpoint,
                detail=message,
                suppressed=_throttle.suppressed("unauthorized"),
            )
        return Unauthorized(message)

    @staticmethod
    def _forbidden(grant: Grant, endpoint: str, reason: str, message: str) -> Forbidden:
        """A valid token refused (``reason``: ``scope`` or ``channel``), logged
        (throttled) with the token's configured name: it names the backend to fix."""
        if _throttle.allow(reason):
            _log.warning(
                "control.refused",
                reason=reason,
                endpoint=endpoint,
                token_name=grant.name,
                suppressed=_throttle.suppressed(reason),
            )
        return Forbidden(message)

    def _require_channels(self, grant: Grant, channels: Iterable[str], endpoint: str) -> None:
        """Refuse a multi-channel publish naming any channel outside the grant, before
        any is published: the request stays all or nothing."""
        if grant.everywhere:
            return
        for channel in channels:
            if not grant.covers(channel):
                raise self._forbidden(
                    grant,
                    endpoint,
                    "channel",
                    f"channel {channel[:64]!r} is outside the channels token {grant.name!r} "
                    "may use: nothing was published",
                )

    def _require_items(self, grant: Grant, items: Sequence[Item | ClientError]) -> None:
        """Refuse a whole batch if an item names a channel outside the grant. Items
        already refused on their own (bad channel, bad data) publish nothing either
        way and are not judged."""
        if grant.everywhere:
            return
        for index, item in enumerate(items):
            if not isinstance(item, ClientError) and not grant.covers(item[0]):
                raise self._forbidden(
                    grant,
                    "batch",
                    "channel",
                    f"item {index} (channel {item[0][:64]!r}) is outside the channels token "
                    f"{grant.name!r} may use: the whole batch is refused, nothing was published",
                )

    # routes

    def _healthz(self, request: Request, _: str, grant: Grant) -> Response:
        return json_response(200, {"status": "ok"})

    def _readyz(self, request: Request, _: str, grant: Grant) -> Response:
        node = self.node
        health = node.broker_health
        if node.ready and health.up:
            return json_response(200, {"ready": True})
        reason = "draining" if node.draining else "starting" if not node.ready else health.reason
        return json_response(503, {"ready": False, "reason": reason}, [("Retry-After", "5")])

    # Each route answers at once on the memory engine, and once the engine has
    # answered on Redis: ``then`` runs the rest either way (broadcastd.broker).

    def _publish_channel(
        self, request: Request, channel: str, grant: Grant
    ) -> Response | Awaitable[Response]:
        payload = body_payload(request.body, request.headers.get("content-type"))
        published = self.node.publish(channel, payload, "channel", _key(request))
        if isinstance(published, Later):
            return published.then(lambda done: json_response(200, self._result(channel, done)))
        return json_response(200, self._result(channel, published))  # memory: no closure

    def _publish(self, request: Request, _: str, grant: Grant) -> Response | Awaitable[Response]:
        self._require_json(request)
        channels, payload, multi = parse_publish(request.body, self.settings.max_batch_items)
        self._require_channels(grant, channels, "publish")
        key = _key(request)
        answers = self.node.publish_all(
            [(c, payload, key) for c in channels], "json", all_or_none=True
        )

        def answer(done: list[Published | ClientError]) -> Response:
            results = [self._result(c, p) for c, p in zip(channels, done, strict=True)]
            return json_response(200, {"results": results} if multi else results[0])

        return then(answers, answer)

    def _batch(self, request: Request, _: str, grant: Grant) -> Response | Awaitable[Response]:
        self._require_json(request)
        self.node.refuse_if_draining()  # the whole batch, not item by item
        items = parse_batch(request.body, self.settings.max_batch_items, self.node.hub)
        self._require_items(grant, items)

        def answer(done: list[Published | ClientError]) -> Response:
            results: list[dict[str, Any]] = []
            failed = 0
            for item, result in zip(items, done, strict=True):
                if isinstance(result, ClientError):
                    failed += 1
                    results.append(error_body(result.code, result.message))
                else:
                    assert not isinstance(item, ClientError)
                    results.append(self._result(item[0], result))
            return json_response(
                200, {"published": len(items) - failed, "failed": failed, "results": results}
            )

        return then(self.node.publish_all(items, "batch"), answer)

    def _result(self, channel: str, published: Published | ClientError) -> dict[str, Any]:
        """One publish's answer: where the message went, and to how many here. An
        engine that delivers inside the publish (memory) counts the subscribers
        that took it; one whose publications come back later (Redis) counts the
        local subscribers as they are when the answer is sent."""
        assert isinstance(published, Published)
        epoch, offset = published.position
        fan_out = published.fan_out
        if fan_out is not None or published.duplicate:  # a duplicate went nowhere
            subscribers = 0 if fan_out is None else fan_out.queued
        else:
            local = self.node.hub.get(channel)
            subscribers = 0 if local is None else local.subscriber_count
        doc: dict[str, Any] = {
            "channel": channel,
            "epoch": epoch,
            "offset": offset,
            "subscribers": subscribers,
        }
        if published.duplicate:
            doc["duplicate"] = True
        return doc

    def _channels(self, request: Request, _: str, grant: Grant) -> Response:
        """A page of the channels this node knows (with Redis: those with
        subscribers here), of those the token covers only: a token limited to
        ``orders:*`` does not learn the names of the others."""
        after, limit = _page_query(request.query)
        known = {name: (position, count) for name, position, count in self.node.known_channels()}
        names: Iterable[str] = known
        if not grant.everywhere:
            names = filter(grant.covers, names)
        chosen, cursor = page(names, after, limit)
        channels = [_channel_doc(name, *known[name]) for name in chosen]
        return json_response(200, {"count": len(channels), "channels": channels, "next": cursor})

    def _channel(self, request: Request, name: str, grant: Grant) -> Response | Awaitable[Response]:
        name, slash, rest = name.partition("/")
        if slash:
            if rest == "presence":
                after, limit = _presence_query(request.query, self.node.max_page)
                return then(
                    self.node.presence(name, after, limit),
                    lambda found: _presence_doc(name, found),
                )
            if rest == "presence/stats":
                _no_query(request.query, "presence/stats")
                return then(self.node.presence_stats(name), lambda stats: _stats_doc(name, stats))
            if rest != "history":
                raise NotFound(f"no route for /channels/{name[:64]}/{rest[:32]}")
            since, epoch, limit, newest_first = _history_query(request.query)
            found = self.node.read_history(name, since, limit, newest_first)
            return then(found, lambda doc: self._history_doc(name, doc, epoch, newest_first))

        def answer(state: tuple[Position, int] | None) -> Response:
            if state is None:
                raise NotFound(f"no channel {name[:64]!r}")
            return json_response(200, _channel_doc(name, *state))

        return then(self.node.channel_state(name), answer)

    @staticmethod
    def _history_doc(
        name: str,
        found: tuple[Position, list[Publication], bool] | None,
        epoch: str | None,
        newest_first: bool,
    ) -> Response:
        if found is None:
            raise NotFound(f"no channel {name[:64]!r}")
        top, publications, complete = found
        if epoch is not None and epoch != top.epoch:
            raise EpochMismatch(
                f"the channel is in epoch {top.epoch!r} now: its count restarted since"
            )
        last = publications[-1].offset if publications and not newest_first else None
        return json_response(
            200,
            {
                "channel": name,
                "epoch": top.epoch,
                "offset": top.offset,
                "complete": complete,
                "next": last if last is not None and last < top.offset else None,
                "publications": [
                    {"offset": p.offset, "data": orjson.Fragment(p.payload.json)}
                    for p in publications
                ],
            },
        )

    def _stats(self, request: Request, _: str, grant: Grant) -> Response:
        hub = self.node.hub
        return json_response(
            200,
            {
                "clients": self.client_count(),
                "channels": sum(1 for _ in self.node.channel_names()),
                "subscriptions": hub.subscriptions,
                "ready": self.node.ready,
                "draining": self.node.draining,
            },
        )

    # The server API: every node, through the engine

    def _connections(
        self, request: Request, _: str, grant: Grant
    ) -> Response | Awaitable[Response]:
        """A page of the connections of every node, in client-id order. A token
        limited to some channels sees only those among each connection's channels,
        and may filter only by a channel it covers."""
        user, channel, after, limit = _connections_query(request.query, self.node.max_page)
        if channel is not None:
            self._require_channels(grant, (channel,), "connections")
        command = {
            "op": "connections",
            "user": user,
            "channel": channel,
            "after": after,
            "limit": limit + 1,
        }

        def answer(answers: list[dict[str, Any]]) -> Response:
            merged = sorted(
                (c for a in answers for c in a.get("connections", ())),
                key=lambda c: str(c["client"]),
            )
            chosen = merged[:limit]
            if not grant.everywhere:
                for connection in chosen:
                    connection["channels"] = [c for c in connection["channels"] if grant.covers(c)]
            more = len(merged) > limit and chosen
            return json_response(
                200,
                {
                    "count": len(chosen),
                    "connections": chosen,
                    "next": chosen[-1]["client"] if more else None,
                },
            )

        return then(self.node.server_command(command), answer)

    def _info(self, request: Request, _: str, grant: Grant) -> Response | Awaitable[Response]:
        _no_query(request.query, "info")

        def answer(answers: list[dict[str, Any]]) -> Response:
            nodes = sorted(answers, key=lambda a: str(a.get("node")))
            return json_response(200, {"nodes": nodes})

        return then(self.node.server_command({"op": "info"}), answer)

    def _disconnect(self, request: Request, _: str, grant: Grant) -> Response | Awaitable[Response]:
        """End connections by user or client id, on every node, with the backend's
        close code. A token limited to some channels may not: the connections it
        would end hold others."""
        self._require_json(request)
        if not grant.everywhere:
            raise self._forbidden(
                grant,
                "disconnect",
                "channel",
                f"token {grant.name!r} is limited to some channels: disconnect needs "
                "a token for every channel",
            )
        body = _server_body(request.body, ("code", "reason"))
        code = body.get("code", CloseReason.DISCONNECTED.code)
        if type(code) is float and code.is_integer():
            code = int(code)  # JSON has one number type: 4321.0 is 4321
        if type(code) is not int or not SERVER_CODES[0] <= code <= SERVER_CODES[1]:
            raise BadCommand(f"code must be an integer from {SERVER_CODES[0]} to {SERVER_CODES[1]}")
        reason = body.get("reason", CloseReason.DISCONNECTED.reason)
        if not isinstance(reason, str) or len(reason) > MAX_CLOSE_REASON_BYTES:
            raise BadCommand(
                f"reason must be a string of at most {MAX_CLOSE_REASON_BYTES} characters"
            )
        # A close frame holds 123 bytes of reason: a longer UTF-8 text is cut there.
        reason = reason.encode()[:MAX_CLOSE_REASON_BYTES].decode(errors="ignore")
        command = {"op": "disconnect", **_target(body), "code": code, "reason": reason}
        return self._count(command, "disconnected")

    def _unsubscribe(
        self, request: Request, _: str, grant: Grant
    ) -> Response | Awaitable[Response]:
        self._require_json(request)
        body = _server_body(request.body, ("channel",))
        channel = _body_channel(body)
        self._require_channels(grant, (channel,), "unsubscribe")
        command = {"op": "unsubscribe", **_target(body), "channel": channel}
        return self._count(command, "unsubscribed")

    def _subscribe(self, request: Request, _: str, grant: Grant) -> Response | Awaitable[Response]:
        self._require_json(request)
        body = _server_body(request.body, ("channel", "since"))
        channel = _body_channel(body)
        self._require_channels(grant, (channel,), "subscribe")
        self.node.namespaces.of(channel)  # an unknown namespace: 400 here, not per node
        command: dict[str, Any] = {"op": "subscribe", **_target(body), "channel": channel}
        if "since" in body:
            since = _integral(body["since"])
            parse_since(since)  # 400 here if malformed
            command["since"] = since
        return self._count(command, "subscribed")

    def _count(self, command: dict[str, Any], field: str) -> Response | Awaitable[Response]:
        def answer(answers: list[dict[str, Any]]) -> Response:
            return json_response(200, {field: sum(int(a.get("count", 0)) for a in answers)})

        return then(self.node.server_command(command), answer)

    def _metrics(self, request: Request, _: str, grant: Grant) -> Response:
        assert self.metrics is not None
        return Response(200, self.metrics(), content_type=METRICS_CONTENT_TYPE)

    def _openapi(self, request: Request, _: str, grant: Grant) -> Response:
        return Response(200, self._openapi_body)

    @staticmethod
    def _require_json(request: Request) -> None:
        content_type = request.headers.get("content-type")
        if content_type is not None and not is_json_type(content_type):
            raise UnsupportedMediaType("this endpoint takes application/json")


def _key(request: Request) -> str | None:
    """The ``Idempotency-Key`` header, read as UTF-8.

    The HTTP layer decodes headers as latin-1 (byte for byte); the key is taken
    back to its bytes and read as UTF-8, so that ``é`` sent in the header is the
    same key as ``"é"`` in a batch item's ``idempotency_key`` (JSON text, so
    UTF-8). A header that is not valid UTF-8 is a 400 ``bad_command``.
    """
    header = request.headers.get("idempotency-key")
    if header is None:
        return None
    try:
        key = header.encode("latin-1").decode("utf-8")
    except UnicodeDecodeError:
        raise BadCommand("the Idempotency-Key header must be UTF-8 text") from None
    return check_key(key)


def _presence_doc(name: str, found: PresencePage) -> Response:
    return json_response(
        200,
        {
            "channel": name,
            "clients": [orjson.Fragment(entry) for entry in found.clients],
            "next": found.next,
        },
    )


def _stats_doc(name: str, stats: PresenceStats) -> Response:
    return json_response(200, {"channel": name, "clients": stats.clients, "users": stats.users})


MAX_ID_LENGTH = 256
"""Longest user or client id a server API request may name."""


def _server_body(body: bytes, fields: tuple[str, ...]) -> dict[str, Any]:
    """A server API request body: a JSON object of ``user`` or ``client`` and
    ``fields``, nothing else (a misspelt field is a 400, not ignored)."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise BadJson("the body is not valid JSON") from None
    if not isinstance(doc, dict):
        raise BadCommand("the body must be a JSON object")
    allowed = ("user", "client", *fields)
    for name in doc:
        if name not in allowed:
            raise BadCommand(f"unknown field {name[:32]!r}; expected {', '.join(allowed)}")
    return doc


def _integral(since: Any) -> Any:
    """``since`` with its whole numbers as integers (JSON has one number type:
    ``41.0`` is 41)."""
    if not isinstance(since, dict):
        return since
    return {
        key: int(value) if type(value) is float and value.is_integer() else value
        for key, value in since.items()
    }


def _target(body: dict[str, Any]) -> dict[str, str]:
    """Exactly one of ``user`` and ``client``, a non-empty string."""
    given = [name for name in ("user", "client") if name in body]
    if len(given) != 1:
        raise BadCommand('give exactly one of "user" and "client"')
    value = body[given[0]]
    if not isinstance(value, str) or not 0 < len(value) <= MAX_ID_LENGTH:
        raise BadCommand(f"{given[0]} must be a string of 1 to {MAX_ID_LENGTH} characters")
    return {given[0]: value}


def _body_channel(body: dict[str, Any]) -> str:
    channel = body.get("channel")
    if not isinstance(channel, str) or not is_valid_channel(channel):
        raise BadCommand('"channel" must be a valid channel name')
    return channel


def _query_pairs(query: str, route: str, names: tuple[str, ...]) -> dict[str, str]:
    """The query's parameters, each at most once, only ``names``."""
    if not query:
        return {}
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True, max_num_fields=8)
    except ValueError:
        raise ClientError(f"malformed query string; {route} takes {', '.join(names)}") from None
    found: dict[str, str] = {}
    for name, value in pairs:
        if name not in names:
            raise ClientError(
                f"unknown query parameter {name[:32]!r}; {route} takes {', '.join(names)}"
            )
        if name in found:
            raise ClientError(f"query parameter {name[:32]!r} is given more than once")
        found[name] = value
    return found


def _no_query(query: str, route: str) -> None:
    if query:
        raise ClientError(f"{route} takes no query parameters")


def _limit(value: str | None, maximum: int) -> int:
    if value is None:
        return maximum
    number = decimal(value, maximum)
    if number is None or number < 1:
        raise ClientError(f"limit must be an integer from 1 to {maximum}")
    return number


def _cursor(value: str | None) -> str | None:
    if value is not None and not 0 < len(value) <= MAX_CURSOR_LENGTH:
        raise ClientError(
            f"cursor must be 1 to {MAX_CURSOR_LENGTH} characters (the next of an earlier page)"
        )
    return value


def _presence_query(query: str, maximum: int) -> tuple[str | None, int]:
    found = _query_pairs(query, "presence", ("limit", "cursor"))
    return _cursor(found.get("cursor")), _limit(found.get("limit"), maximum)


def _connections_query(query: str, maximum: int) -> tuple[str | None, str | None, str | None, int]:
    """user, channel, cursor and limit of ``GET /connections``."""
    found = _query_pairs(query, "connections", ("user", "channel", "limit", "cursor"))
    user = found.get("user")
    if user is not None and not 0 < len(user) <= MAX_ID_LENGTH:
        raise ClientError(f"user must be 1 to {MAX_ID_LENGTH} characters")
    channel = found.get("channel")
    if channel is not None and not is_valid_channel(channel):
        raise ClientError("channel must be a valid channel name")
    return user, channel, _cursor(found.get("cursor")), _limit(found.get("limit"), maximum)


def _channel_doc(name: str, position: Position, subscribers: int) -> dict[str, Any]:
    return {
        "name": name,
        "subscribers": subscribers,
        "epoch": position.epoch,
        "offset": position.offset,
    }


MAX_HISTORY_PAGE = 1000
"""Most publications one history request returns."""


def _history_query(query: str) -> tuple[int, str | None, int, bool]:
    """since (offset, default 0), epoch, limit (1..1000, default 100), order (asc|desc).

    Numbers are ASCII digits within their range (``since`` at most MAX_OFFSET), read
    by ``decimal``: a ``²`` or a number of thousands of digits is a 400, not a
    ValueError out of ``int()``."""
    since, epoch, limit, newest_first = 0, None, 100, False
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise ClientError("malformed query string") from None
    for key, value in pairs:
        number = decimal(value, MAX_OFFSET) if key in ("since", "limit") else None
        if key == "since" and number is not None:
            since = number
        elif key == "limit" and number is not None and 0 < number <= MAX_HISTORY_PAGE:
            limit = number
        elif key == "epoch" and 0 < len(value) <= 64:
            epoch = value
        elif key == "order" and value in ("asc", "desc"):
            newest_first = value == "desc"
        else:
            raise ClientError(
                f"bad query parameter {key[:32]!r}: history takes since (an offset), epoch, "
                f"limit (1 to {MAX_HISTORY_PAGE}) and order (asc or desc)"
            )
    return since, epoch, limit, newest_first


def _methods(handlers: dict[str, Handler]) -> tuple[str, ...]:
    """The methods a route answers: HEAD wherever GET."""
    return (*handlers, "HEAD") if "GET" in handlers else tuple(handlers)


def _page_query(query: str) -> tuple[str | None, int]:
    """``after`` and ``limit`` of ``GET /channels``, each at most once, nothing else."""
    after: str | None = None
    limit = PAGE_LIMIT
    if not query:
        return after, limit
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True, max_num_fields=4)
    except ValueError:
        raise ClientError("malformed query string; /channels takes limit and after") from None
    seen: set[str] = set()
    for name, value in pairs:
        if name in seen:
            raise ClientError(f"query parameter {name[:32]!r} is given more than once")
        seen.add(name)
        if name == "limit":
            number = decimal(value, PAGE_LIMIT)
            if number is None or number < 1:
                raise ClientError(f"limit must be an integer from 1 to {PAGE_LIMIT}")
            limit = number
        elif name == "after":
            if not is_valid_channel(value):
                raise ClientError("after must be a channel name (the next cursor of a page)")
            after = value
        else:
            raise ClientError(
                f"unknown query parameter {name[:32]!r}; /channels takes limit and after"
            )
    return after, limit


class MetricsApi:
    """The metrics listener: read-only, no token, so Prometheus needs no publish rights."""

    def __init__(self, render: Callable[[], bytes]) -> None:
        self.render = render

    def handle(self, request: Request) -> Response:
        if request.path not in ("/metrics", "/healthz"):
            return error_response(NotFound(f"no route for {request.path[:64]!r}; try /metrics"))
        if request.method not in ("GET", "HEAD"):
            return error_response(MethodNotAllowed("GET and HEAD only", ("GET", "HEAD")))
        if request.path == "/healthz":
            return json_response(200, {"status": "ok"})
        return Response(200, self.render(), content_type=METRICS_CONTENT_TYPE)

    def check(self, request: Request) -> ClientError | None:
        return None  # nothing here takes a body: max_body is 0

    def refuse(self, error: ClientError | InternalError, request: Request | None) -> Response:
        return error_response(error)


class HttpListener:
    """Serves one handler on TCP and, optionally, on a Unix domain socket."""

    def __init__(
        self,
        api: Api,
        host: str,
        port: int,
        limits: Limits,
        unix_path: str | None = None,
        unix_mode: int = 0o660,
        reuse_port: bool = False,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.api = api
        self.tls = tls
        """The TCP listener's TLS context (None: plain HTTP)."""
        self.host = host
        self.requested_port = port
        self.unix_path = unix_path
        self.unix_mode = unix_mode
        self.reuse_port = reuse_port
        self._limits = limits
        self._servers: list[asyncio.Server] = []
        self._connections: set[HttpProtocol] = set()

    @property
    def port(self) -> int:
        port: int = self._servers[0].sockets[0].getsockname()[1]
        return port

    def _protocol(self) -> HttpProtocol:
        return HttpProtocol(self.api, self._limits, self._connections)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._servers.append(
            await loop.create_server(
                self._protocol,
                self.host,
                self.requested_port,
                backlog=LISTEN_BACKLOG,
                reuse_port=self.reuse_port or None,
                ssl=self.tls,
            )
        )
        if self.unix_path is not None:
            _remove_stale_socket(self.unix_path)
            server = await loop.create_unix_server(
                self._protocol, self.unix_path, backlog=LISTEN_BACKLOG
            )
            os.chmod(self.unix_path, self.unix_mode)
            self._servers.append(server)

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        for connection in list(self._connections):
            connection.close()
        for server in self._servers:
            await server.wait_closed()
        if self.unix_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.unix_path)
        self._servers.clear()


def control_listener(
    settings: ControlSettings,
    api: ControlApi,
    reuse_port: bool = False,
    tls: ssl.SSLContext | None = None,
) -> HttpListener:
    limits = Limits(
        max_header=settings.max_header_bytes,
        max_body=settings.max_body_bytes,
        idle_timeout=settings.idle_timeout,
        header_timeout=settings.header_timeout,
        linger_timeout=settings.linger_timeout,
        linger_time=settings.linger_time,
        write_limit=settings.write_limit,
    )
    unix_path = None if settings.unix_path is None else str(settings.unix_path)
    return HttpListener(
        api, settings.host, settings.port, limits, unix_path, settings.unix_mode, reuse_port, tls
    )


def metrics_listener(host: str, port: int, render: Callable[[], bytes]) -> HttpListener:
    return HttpListener(MetricsApi(render), host, port, Limits(8 * 1024, 0, 60.0))


def _remove_stale_socket(path: str) -> None:
    """Remove a socket file left by an earlier run, but never steal a live one."""
    if not os.path.exists(path):
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)
    else:
        raise OSError(f"{path}: another process is listening on this socket")
    finally:
        probe.close()
