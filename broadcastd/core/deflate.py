"""permessage-deflate (RFC 7692), compressed once per message for every subscriber.

Why not websockets' own extension for sending: it compresses per connection,
with a compressor (and its window, tens of KiB) per connection, so a message
fanned out to N subscribers is compressed N times. A server may always tell
its clients ``server_no_context_takeover`` (RFC 7692 7.1.1.1): each message
is then compressed on its own, its bytes depend on nothing sent before, and
the same compressed frame suits every subscriber, as the uncompressed frame
does. One compressor, fully flushed after each message, serves the process.

``client_no_context_takeover`` is told too (RFC 7692 7.1.1.2), so what a
client sends (its commands) is inflated message by message with no state kept
per connection either: websockets' extension object does that, and nothing
else, for the protocol.

An offer is declined (the connection goes uncompressed) when it asks for a
``server_max_window_bits`` below 15, which the shared frames cannot honour, or
names a parameter RFC 7692 does not define.
"""

from __future__ import annotations

import zlib

from websockets.exceptions import InvalidHandshake
from websockets.extensions.permessage_deflate import PerMessageDeflate
from websockets.headers import parse_extension

from broadcastd.core.envelope import frame_payload, text_frame

NAME = "permessage-deflate"
RESPONSE = f"{NAME}; server_no_context_takeover; client_no_context_takeover"
"""The only answer given to an accepted offer."""
WINDOW_BITS = 15
LEVEL = 6
_PARAMETERS = frozenset(
    (
        "server_no_context_takeover",
        "client_no_context_takeover",
        "server_max_window_bits",
        "client_max_window_bits",
    )
)
_SYNC_TAIL = b"\x00\x00\xff\xff"
_TEXT_FIN_RSV1 = 0xC1


def accepts(offers: list[str]) -> bool:
    """Whether one of the ``Sec-WebSocket-Extensions`` values offers permessage-deflate
    in a form the shared frames can serve; ValueError for a malformed header."""
    try:
        parsed = [item for value in offers for item in parse_extension(value)]
    except InvalidHandshake as exc:
        raise ValueError(str(exc)) from None
    for name, parameters in parsed:
        if name != NAME:
            continue
        names = {key for key, _ in parameters}
        if not names <= _PARAMETERS or len(names) != len(parameters):
            continue
        window = dict(parameters).get("server_max_window_bits")
        if window is not None and window != str(WINDOW_BITS):
            continue
        return True
    return False


def receiving_extension() -> PerMessageDeflate:
    """The protocol's extension for an accepted offer: it inflates what the client
    sends (each message on its own); the daemon writes compressed frames itself."""
    return PerMessageDeflate(
        remote_no_context_takeover=True,
        local_no_context_takeover=True,
        remote_max_window_bits=WINDOW_BITS,
        local_max_window_bits=WINDOW_BITS,
    )


class Deflater:
    """Compressed frames of the frames being written, each made once.

    A fan-out queues the same frame object in every subscriber's outbox, and the
    writers' pass writes them all: the compressed frame is kept by the frame's
    identity until the pass ends (``forget``). A frame below ``min_bytes``, or
    one that compression would not make smaller, is sent as it is (RSV1 unset).
    """

    __slots__ = ("_cache", "_compressor", "compressed", "min_bytes")

    def __init__(self, min_bytes: int) -> None:
        self.min_bytes = min_bytes
        self._compressor = zlib.compressobj(LEVEL, zlib.DEFLATED, -WINDOW_BITS)
        self._cache: dict[int, tuple[bytes, bytes]] = {}
        """id(frame) -> (frame, what to write): the frame is held so its id stays its own."""
        self.compressed = 0
        """Messages compressed so far (each once, whatever its subscribers)."""

    def frame(self, frame: bytes) -> bytes:
        cached = self._cache.get(id(frame))
        if cached is not None and cached[0] is frame:
            return cached[1]
        result = self._deflate(frame)
        self._cache[id(frame)] = (frame, result)
        return result

    def forget(self) -> None:
        """The writers' pass ended: nothing queued now shares a frame written in it."""
        self._cache.clear()

    def _deflate(self, frame: bytes) -> bytes:
        payload = frame_payload(frame)
        if len(payload) < self.min_bytes:
            return frame
        compressor = self._compressor
        data = compressor.compress(payload) + compressor.flush(zlib.Z_FULL_FLUSH)
        self.compressed += 1
        if data.endswith(_SYNC_TAIL):
            data = data[:-4]
        if len(data) >= len(payload):
            return frame
        return text_frame(data, _TEXT_FIN_RSV1)
