"""A blocking MLLP client on a plain socket, for tests, benchmarks and scripts (the service never uses it)."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator

from hl7bridge.mllp.framing import CARRIAGE_RETURN, END_BLOCK, START_BLOCK, frame


class BlockingClient:
    """A plain-socket MLLP client, one message in flight: for tests, benchmarks and scripts."""

    def __init__(
        self,
        host: str,
        port: int,
        timeout: float = 10.0,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
    ) -> None:
        sock = socket.create_connection((host, port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if ssl_context is not None:
            sock = ssl_context.wrap_socket(sock, server_hostname=server_hostname or host)
        self.sock = sock
        self._buffer = bytearray()

    def send(self, payload: bytes) -> None:
        self.sock.sendall(frame(payload))

    def receive(self) -> bytes:
        """The next frame's payload; raises ``ConnectionError`` if the peer closes first."""
        return next(self.frames())

    def frames(self) -> Iterator[bytes]:
        while True:
            start = self._buffer.find(START_BLOCK)
            end = self._buffer.find(END_BLOCK, start + 1) if start >= 0 else -1
            if start >= 0 and end >= 0:
                payload = bytes(self._buffer[start + 1 : end])
                cut = end + 2 if self._buffer[end + 1 : end + 2] == CARRIAGE_RETURN else end + 1
                del self._buffer[:cut]
                yield payload
                continue
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("the peer closed the connection before a complete frame")
            self._buffer += chunk

    def request(self, payload: bytes) -> bytes:
        self.send(payload)
        return self.receive()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> BlockingClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
