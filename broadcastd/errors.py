"""The error tree and the one enum of close reasons.

Every error a client can cause carries a stable machine-readable ``code`` (what
clients match on) and a human ``message``; the adapters map them onto their wire
(a JSON error reply on the WebSocket, an HTTP status with a JSON body on the
control port). Every way a subscriber connection can end is a CloseReason, so
logs, metrics and the protocol document speak of the same set.

Over HTTP (the control port, a refused WebSocket handshake) every error is one
document, ``{"error": {"code": ..., "message": ...}}``, built by ``error_body``
and nowhere else, so each port answers in the shape the clients parse.
"""

from __future__ import annotations

from enum import Enum
from typing import cast

import orjson


class BroadcastdError(Exception):
    """Root of everything broadcastd raises on purpose."""


class ConfigError(BroadcastdError):
    """The configuration is invalid; the message names each field and why."""


class ClientError(BroadcastdError):
    """A request or command that the client got wrong. Nothing was changed."""

    code: str = "bad_request"
    http_status: int = 400

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class BadJson(ClientError):
    code = "bad_json"


class BadCommand(ClientError):
    code = "bad_command"


class UnknownOp(ClientError):
    code = "unknown_op"


class BadChannel(ClientError):
    code = "bad_channel"


class TooManyChannels(ClientError):
    """This client already holds as many subscriptions as it may."""

    code = "too_many_channels"


class NotSubscribed(ClientError):
    code = "not_subscribed"


class ChannelTableFull(ClientError):
    """Every remembered channel has subscribers; no room for a new one."""

    code = "channel_table_full"
    http_status = 503


class PayloadTooLarge(ClientError):
    code = "payload_too_large"
    http_status = 413


class BadEncoding(ClientError):
    code = "bad_encoding"


class TooManyItems(ClientError):
    code = "too_many_items"


class Unauthorized(ClientError):
    code = "unauthorized"
    http_status = 401


class NotFound(ClientError):
    code = "not_found"
    http_status = 404


class MethodNotAllowed(ClientError):
    code = "method_not_allowed"
    http_status = 405

    def __init__(self, message: str, allowed: tuple[str, ...]) -> None:
        super().__init__(message)
        self.allowed = allowed


class UnsupportedMediaType(ClientError):
    code = "unsupported_media_type"
    http_status = 415


class HeadersTooLarge(ClientError):
    code = "headers_too_large"
    http_status = 431


class EpochMismatch(ClientError):
    """The position asked about belongs to another epoch of the channel."""

    code = "epoch_mismatch"
    http_status = 409


class Draining(ClientError):
    code = "draining"
    http_status = 503


class BrokerUnavailable(ClientError):
    """The broker (Redis) did not accept the request in time: nothing is known to be
    published. Safe to retry, with an Idempotency-Key to be sure."""

    code = "broker_unavailable"
    http_status = 503


class Forbidden(ClientError):
    """The token is valid but does not allow this (a scope, a channel)."""

    code = "forbidden"
    http_status = 403


class PermissionDenied(ClientError):
    """A subscriber may not subscribe to this channel (its token does not allow it)."""

    code = "permission_denied"
    http_status = 403


class UnknownNamespace(ClientError):
    """The channel's namespace (before the first ``:``) is not declared."""

    code = "unknown_namespace"


class PresenceDisabled(ClientError):
    """Presence was asked of a channel whose namespace does not track it."""

    code = "presence_disabled"
    http_status = 404


class PresenceNotAllowed(ClientError):
    """A subscriber asked for presence where ``presence_for_subscribers`` is off."""

    code = "presence_not_allowed"
    http_status = 403


class RecoveryDisabled(ClientError):
    """``since`` was asked for in a namespace that does not allow recovery."""

    code = "recovery_disabled"


class TokenError(ClientError):
    """A subscriber token was refused; ``code`` says why (the README lists them)."""

    code = "token_invalid"
    http_status = 401


class CloseReason(Enum):
    """Every close broadcastd itself initiates: (RFC 6455 close code, reason text).

    Closes the peer starts, and the ones websockets' parser makes on protocol
    errors (1002, 1009), are read off the protocol; ABNORMAL names a connection
    that ended with no close frame at all.
    """

    SHUTDOWN = (1001, "server shutting down")
    UNSUPPORTED_DATA = (1003, "binary frames are not accepted")
    ABNORMAL = (1006, "connection lost")
    INVALID_UTF8 = (1007, "invalid UTF-8")
    POLICY = (1008, "too many invalid commands")
    TOO_MANY_FRAGMENTS = (1009, "message in too many fragments")
    KEEPALIVE_TIMEOUT = (1011, "keepalive ping timeout")
    SLOW_CONSUMER = (1013, "slow consumer")
    NO_SUBSCRIPTION = (4000, "no subscription")
    AUTH_REQUIRED = (4001, "authentication required")
    TOKEN_INVALID = (4002, "invalid token")
    TOKEN_EXPIRED = (4003, "token expired")
    DISCONNECTED = (4010, "disconnected by the server")
    """The server API's disconnect, without a code of its own."""

    def __init__(self, code: int, reason: str) -> None:
        self.code = code
        self.reason = reason

    @classmethod
    def server(cls, code: int, reason: str) -> CloseReason:
        """The close a backend asked for (``POST /disconnect``): its own code in
        4000-4999 and reason. A code and reason of a member give the member; any
        other pair is a close reason of its own, named ``SERVER``, and is
        everything a member is to the code that closes and counts (its ``code``
        and ``reason``)."""
        member = cls._value2member_map_.get((code, reason))
        if member is not None:
            return cast(CloseReason, member)
        made = cls._missing_((code, reason))
        if made is None:
            raise ValueError(f"close code {code} is outside {SERVER_CODES}")
        return made

    @classmethod
    def _missing_(cls, value: object) -> CloseReason | None:
        if (
            isinstance(value, tuple)
            and len(value) == 2
            and type(value[0]) is int
            and SERVER_CODES[0] <= value[0] <= SERVER_CODES[1]
            and isinstance(value[1], str)
        ):
            made = object.__new__(cls)
            made._name_ = "SERVER"
            made._value_ = value
            made.__init__(value[0], value[1])  # type: ignore[misc]
            return made
        return None


SERVER_CODES = (4000, 4999)
"""The close codes a backend may choose for its disconnects (RFC 6455's private range)."""
MAX_CLOSE_REASON_BYTES = 123
"""The longest close reason a close frame holds (125 bytes less the code's two)."""


class RequestTimeout(ClientError):
    """A control request's line and headers did not arrive within control.header_timeout."""

    code = "request_timeout"
    http_status = 408


class InternalError(BroadcastdError):
    """broadcastd failed while serving a request (a bug): the request is answered
    500 with this code, the failure is logged, and nothing else is affected."""

    code = "internal"
    http_status = 500

    def __init__(self, message: str = "internal error; the failure is logged") -> None:
        super().__init__(message)
        self.message = message


def error_body(code: str, message: str) -> dict[str, dict[str, str]]:
    """The error document an HTTP answer carries (and a refused batch item)."""
    return {"error": {"code": code, "message": message}}


def error_json(code: str, message: str) -> bytes:
    """``error_body`` as the bytes of a response body."""
    return orjson.dumps(error_body(code, message))
