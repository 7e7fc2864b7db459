"""The control port: publishing, statistics, health and readiness over HTTP.

Routes map HTTP onto Node calls; the request forms are parsed in
broadcastd.core.publication. Every error is ``{"error": {"code", "message"}}``
with the status its ClientError carries. A bearer token, when set, is required
on every route except the probes (/healthz, /readyz) and is compared in
constant time.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import os
import socket
from collections.abc import Callable
from typing import Any

import orjson

from broadcastd.broker import Published
from broadcastd.core.publication import (
    body_payload,
    check_key,
    is_json_type,
    parse_batch,
    parse_publish,
)
from broadcastd.core.stream import Position
from broadcastd.errors import (
    ClientError,
    Draining,
    MethodNotAllowed,
    NotFound,
    Unauthorized,
    UnsupportedMediaType,
)
from broadcastd.node import Node
from broadcastd.settings import ControlSettings
from broadcastd.transport.http import HttpProtocol, Limits, Request, Response

Route = Callable[[Request, str], Response]
_PUBLIC = frozenset(("/healthz", "/readyz"))
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def json_response(status: int, doc: Any, headers: list[tuple[str, str]] | None = None) -> Response:
    return Response(status, orjson.dumps(doc), headers or [])


def error_response(error: ClientError) -> Response:
    headers: list[tuple[str, str]] = []
    if isinstance(error, MethodNotAllowed):
        headers.append(("Allow", ", ".join(error.allowed)))
    elif isinstance(error, Unauthorized):
        headers.append(("WWW-Authenticate", 'Bearer realm="broadcastd"'))
    elif error.http_status == 503:
        headers.append(("Retry-After", "5"))
    body = {"error": {"code": error.code, "message": error.message}}
    return json_response(error.http_status, body, headers)


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
        token = settings.token
        self._token = None if token is None else f"Bearer {token.get_secret_value()}".encode()
        self._exact: dict[str, dict[str, Route]] = {
            "/healthz": {"GET": self._healthz},
            "/readyz": {"GET": self._readyz},
            "/publish": {"POST": self._publish},
            "/batch": {"POST": self._batch},
            "/channels": {"GET": self._channels},
            "/stats": {"GET": self._stats},
        }
        if metrics is not None:
            self._exact["/metrics"] = {"GET": self._metrics}
        self._prefixed: dict[str, dict[str, Route]] = {
            "/publish/": {"POST": self._publish_channel},
            "/channels/": {"GET": self._channel},
        }

    def handle(self, request: Request) -> Response:
        endpoint = "unknown"
        try:
            methods, argument, endpoint = self._route(request.path)
            if request.path not in _PUBLIC:
                self._authorize(request)
            route = methods.get(request.method)
            if route is None:
                raise MethodNotAllowed(f"{request.method} is not allowed here", tuple(methods))
            response = route(request, argument)
        except ClientError as error:
            response = error_response(error)
        self.node.observer.control_request(endpoint, response.status)
        return response

    def _route(self, path: str) -> tuple[dict[str, Route], str, str]:
        methods = self._exact.get(path)
        if methods is not None:
            return methods, "", path.strip("/")
        for prefix, prefixed in self._prefixed.items():
            if path.startswith(prefix) and len(path) > len(prefix):
                return prefixed, path[len(prefix) :], prefix.strip("/") + "_channel"
        raise NotFound(f"no route for {path[:64]!r}")

    def _authorize(self, request: Request) -> None:
        if self._token is None:
            return
        given = request.headers.get("authorization")
        if given is None:
            raise Unauthorized("missing bearer token")
        if not hmac.compare_digest(given.encode("latin-1"), self._token):
            raise Unauthorized("invalid bearer token")

    # routes

    def _healthz(self, request: Request, _: str) -> Response:
        return json_response(200, {"status": "ok"})

    def _readyz(self, request: Request, _: str) -> Response:
        node = self.node
        if node.ready:
            return json_response(200, {"ready": True})
        reason = "draining" if node.draining else "starting"
        return json_response(503, {"ready": False, "reason": reason}, [("Retry-After", "5")])

    def _publish_channel(self, request: Request, channel: str) -> Response:
        payload = body_payload(request.body, request.headers.get("content-type"))
        published = self.node.publish(channel, payload, "channel", _key(request))
        return json_response(200, _result(channel, published))

    def _publish(self, request: Request, _: str) -> Response:
        self._require_json(request)
        channels, payload, multi = parse_publish(request.body, self.settings.max_batch_items)
        key = _key(request)
        results = [
            _result(channel, self.node.publish(channel, payload, "json", key))
            for channel in channels
        ]
        return json_response(200, {"results": results} if multi else results[0])

    def _batch(self, request: Request, _: str) -> Response:
        self._require_json(request)
        if self.node.draining:  # refuse the whole batch, not item by item
            raise Draining("the server is shutting down")
        items = parse_batch(request.body, self.settings.max_batch_items, self.node.hub)
        results: list[dict[str, Any]] = []
        failed = 0
        for item, result in zip(items, self.node.publish_many(items, "batch"), strict=True):
            if isinstance(result, ClientError):
                failed += 1
                results.append({"error": {"code": result.code, "message": result.message}})
            else:
                assert not isinstance(item, ClientError)
                results.append(_result(item[0], result))
        return json_response(
            200, {"published": len(items) - failed, "failed": failed, "results": results}
        )

    def _channels(self, request: Request, _: str) -> Response:
        node = self.node
        channels = []
        for name in node.channel_names():
            state = node.channel_state(name)
            if state is not None:
                channels.append(_channel_doc(name, *state))
        return json_response(200, {"count": len(channels), "channels": channels})

    def _channel(self, request: Request, name: str) -> Response:
        state = self.node.channel_state(name)
        if state is None:
            raise NotFound(f"no channel {name[:64]!r}")
        return json_response(200, _channel_doc(name, *state))

    def _stats(self, request: Request, _: str) -> Response:
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

    def _metrics(self, request: Request, _: str) -> Response:
        assert self.metrics is not None
        return Response(200, self.metrics(), content_type=METRICS_CONTENT_TYPE)

    @staticmethod
    def _require_json(request: Request) -> None:
        content_type = request.headers.get("content-type")
        if content_type is not None and not is_json_type(content_type):
            raise UnsupportedMediaType("this endpoint takes application/json")


def _key(request: Request) -> str | None:
    key = request.headers.get("idempotency-key")
    return None if key is None else check_key(key)


def _result(channel: str, published: Published) -> dict[str, Any]:
    """One publish's answer: where the message went, and to how many here."""
    epoch, offset = published.position
    fan_out = published.fan_out
    doc: dict[str, Any] = {
        "channel": channel,
        "epoch": epoch,
        "offset": offset,
        "subscribers": 0 if fan_out is None else fan_out.queued,
    }
    if published.duplicate:
        doc["duplicate"] = True
    return doc


def _channel_doc(name: str, position: Position, subscribers: int) -> dict[str, Any]:
    return {
        "name": name,
        "subscribers": subscribers,
        "epoch": position.epoch,
        "offset": position.offset,
    }


class MetricsApi:
    """The metrics listener: read-only, no token, so Prometheus needs no publish rights."""

    def __init__(self, render: Callable[[], bytes]) -> None:
        self.render = render

    def handle(self, request: Request) -> Response:
        if request.path == "/metrics":
            if request.method != "GET":
                return error_response(MethodNotAllowed("GET only", ("GET",)))
            return Response(200, self.render(), content_type=METRICS_CONTENT_TYPE)
        if request.path == "/healthz":
            return json_response(200, {"status": "ok"})
        return error_response(NotFound(f"no route for {request.path[:64]!r}; try /metrics"))


class HttpListener:
    """Serves one handler on TCP and, optionally, on a Unix domain socket."""

    def __init__(
        self,
        handler: Callable[[Request], Response],
        host: str,
        port: int,
        limits: Limits,
        unix_path: str | None = None,
        unix_mode: int = 0o660,
    ) -> None:
        self.handler = handler
        self.host = host
        self.requested_port = port
        self.unix_path = unix_path
        self.unix_mode = unix_mode
        self._limits = limits
        self._servers: list[asyncio.Server] = []
        self._connections: set[HttpProtocol] = set()

    @property
    def port(self) -> int:
        port: int = self._servers[0].sockets[0].getsockname()[1]
        return port

    def _protocol(self) -> HttpProtocol:
        return HttpProtocol(self.handler, error_response, self._limits, self._connections)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._servers.append(
            await loop.create_server(self._protocol, self.host, self.requested_port, backlog=1024)
        )
        if self.unix_path is not None:
            _remove_stale_socket(self.unix_path)
            server = await loop.create_unix_server(self._protocol, self.unix_path, backlog=1024)
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


def control_listener(settings: ControlSettings, api: ControlApi) -> HttpListener:
    limits = Limits(settings.max_header_bytes, settings.max_body_bytes, settings.idle_timeout)
    unix_path = None if settings.unix_path is None else str(settings.unix_path)
    return HttpListener(
        api.handle, settings.host, settings.port, limits, unix_path, settings.unix_mode
    )


def metrics_listener(host: str, port: int, render: Callable[[], bytes]) -> HttpListener:
    return HttpListener(MetricsApi(render).handle, host, port, Limits(8 * 1024, 0, 60.0))


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
