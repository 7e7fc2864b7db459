"""A WebSocket client on a bare socket, for what polite clients never do.

It drives websockets' sans-I/O ClientProtocol (a strict RFC 6455 parser) over a
socket whose receive buffer is made small, so a test can stop reading and let
the server's buffers fill, or send bytes no library would send.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

from websockets.client import ClientProtocol
from websockets.frames import Close, Frame, Opcode
from websockets.http11 import Response
from websockets.uri import parse_uri


class RawClient:
    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, protocol: ClientProtocol
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.protocol = protocol
        self.frames: list[Frame] = []
        self.response: Response | None = None

    @classmethod
    async def connect(cls, url: str, rcvbuf: int | None = 4096) -> RawClient:
        uri = parse_uri(url)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (uri.host, uri.port))
        reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
        protocol = ClientProtocol(uri, max_size=None)
        client = cls(reader, writer, protocol)
        protocol.send_request(protocol.connect())
        client.flush()
        return client

    def flush(self) -> None:
        for data in self.protocol.data_to_send():
            if data:
                self.writer.write(data)

    async def read_events(self, timeout: float = 30) -> list[Any]:
        """Read once from the socket; return the events parsed (empty at EOF)."""
        async with asyncio.timeout(timeout):
            data = await self.reader.read(65536)
        if data:
            self.protocol.receive_data(data)
        else:
            self.protocol.receive_eof()
        events = self.protocol.events_received()
        self.flush()
        for event in events:
            if isinstance(event, Response):
                self.response = event
            else:
                self.frames.append(event)
        return events

    async def handshake(self) -> Response:
        while self.response is None:
            await self.read_events()
            if self.protocol.state.name == "CLOSED":
                break
        assert self.response is not None
        return self.response

    async def read_until_closed(self, timeout: float = 30) -> Close | None:
        """Read every frame until the connection ends; return the close frame received."""
        while not self.reader.at_eof():
            await self.read_events(timeout)
        return self.protocol.close_rcvd

    def text_frames(self) -> list[str]:
        return [bytes(f.data).decode() for f in self.frames if f.opcode is Opcode.TEXT]

    def send_raw(self, data: bytes) -> None:
        """Bytes straight onto the socket, bypassing the protocol's checks."""
        self.writer.write(data)

    def close(self) -> None:
        self.writer.close()
