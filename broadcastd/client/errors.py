"""What the clients raise: the daemon's own error code, and whether to retry.

Every refusal the daemon sends is ``{"error": {"code": ..., "message": ...}}``
with an HTTP status; the exception carries all three, so callers match on the
stable ``code`` and decide on retrying from the class alone: a
:class:`RequestRefused` (4xx) fails again if sent again unchanged, an
:class:`Unavailable` (503) or a :class:`NetworkError` may succeed later.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec

if TYPE_CHECKING:
    from broadcastd.client.events import CommandFailed, Missed, Recovered, Resync


class BroadcastdError(Exception):
    """The daemon refused, failed or could not be reached.

    ``code`` is the daemon's machine-readable error code (``bad_channel``,
    ``unauthorized``, ``draining``...) or, where no answer came, one of the
    client's own (``network``); ``status`` the HTTP status (None without an
    HTTP answer); ``body`` the answer's text as received, for messages and logs.
    """

    def __init__(self, code: str, message: str, status: int | None = None, body: str = "") -> None:
        super().__init__(f"{code}: {message}" if status is None else f"{status} {code}: {message}")
        self.code = code
        self.message = message
        self.status = status
        self.body = body


class RequestRefused(BroadcastdError):
    """A 4xx answer: the request itself is at fault (a bad channel name, a missing
    token, a payload too large). Retrying it unchanged fails the same way."""


class Unavailable(BroadcastdError):
    """A 503: the daemon cannot take the request now (``draining``,
    ``channel_table_full``, ``broker_unavailable``, ``cap``). ``retry_after`` is
    the daemon's ``Retry-After`` in seconds, when it sent one.

    With ``broker_unavailable`` the message may still have been published: only a
    retry with the same idempotency key is safe.
    """

    def __init__(
        self,
        code: str,
        message: str,
        status: int | None = 503,
        body: str = "",
        retry_after: float | None = None,
    ) -> None:
        super().__init__(code, message, status, body)
        self.retry_after = retry_after


class ServerError(BroadcastdError):
    """Any other failure status (500 ``internal``, or a proxy's 502): not the
    request's fault, but not known to be temporary either."""


class NetworkError(BroadcastdError):
    """No answer: the connection failed, broke or timed out (code ``network``).
    A publish sent before the failure may have been published."""

    def __init__(self, message: str) -> None:
        super().__init__("network", message)


class ClosedByServer(BroadcastdError):
    """The daemon closed a subscriber connection for a reason that a reconnection
    would meet again: close codes 1003, 1007, 1008, 1009, or 4001/4002/4003 (no
    token, a refused one, an expired one) when there is no ``get_token`` to get
    another. ``close_code`` is the WebSocket close code; ``code`` the daemon's
    error code when it sent one before closing (``token_expired``...), else a
    name for the close code."""

    def __init__(self, code: str, message: str, close_code: int) -> None:
        super().__init__(code, message or f"connection closed with {close_code}")
        self.close_code = close_code


class MessageTooBig(BroadcastdError):
    """The daemon sent a message larger than the subscriber's ``max_size``: the
    subscriber failed the connection with close code 1009 (``close_code``) as
    soon as a frame header announced it (or fragments added up to it), and does
    not reconnect, since a reconnection would be sent the same message again (it
    is replayed from history). Code ``message_too_big``. Either ``max_size`` is
    below what the daemon may send (its ``control.max_payload_bytes`` plus 256
    bytes of envelope), or the peer is not a daemon that keeps to its own
    bounds."""

    def __init__(self, message: str) -> None:
        super().__init__("message_too_big", message)
        self.close_code = 1009


class CommandRefused(BroadcastdError):
    """A subscriber command failed (a subscribe refused with ``bad_channel`` or
    ``channel_not_allowed``, a refresh with ``token_expired``), raised by a stream
    whose ``events`` leave out :class:`~broadcastd.client.CommandFailed`."""

    def __init__(self, event: CommandFailed) -> None:
        super().__init__(event.code, event.message)
        self.event = event


class MessagesLost(Exception):
    """Messages were lost and the stream was not asked to yield the event that says
    so: raised instead of it, so that a loss is never silent. ``event`` is the
    :class:`~broadcastd.client.Recovered` (with ``recovered`` False),
    :class:`~broadcastd.client.Resync` or :class:`~broadcastd.client.Missed`.

    The stream stays usable: catch this, reload what the lost messages would have
    told you, and iterate the same stream again.
    """

    def __init__(self, event: Recovered | Resync | Missed) -> None:
        super().__init__(f"messages lost: {event!r}")
        self.event = event


def refusal(
    status: int, body: bytes | str, reason: str, retry_after: str | None
) -> BroadcastdError:
    """The daemon's ``{"error": {"code", "message"}}`` answer (to a request or a
    handshake), typed by status: 4xx RequestRefused, 503 Unavailable, anything
    else ServerError. An answer that is not the daemon's (a proxy's HTML page)
    keeps its status, with code ``http_STATUS`` and the status's reason."""
    text = body if isinstance(body, str) else body.decode("utf-8", "replace")
    code, message = f"http_{status}", reason
    try:
        error = msgspec.json.decode(text)["error"]
        code, message = str(error["code"]), str(error["message"])
    except (msgspec.DecodeError, KeyError, TypeError):
        pass
    if status == 503:
        return Unavailable(code, message, status, text, _seconds(retry_after))
    if 400 <= status < 500:
        return RequestRefused(code, message, status, text)
    return ServerError(code, message, status, text)


def _seconds(value: str | None) -> float | None:
    """A ``Retry-After`` in seconds (an HTTP date is not worth parsing here: ignored)."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if seconds >= 0 else None
