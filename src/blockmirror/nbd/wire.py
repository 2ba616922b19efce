"""Byte-level helpers shared by the NBD handshake and transmission codecs.

``ReceiveBuffer`` accumulates what the transport delivered and hands out exact-sized frames;
``NBDProtocolError`` is what any codec raises when the peer breaks the protocol. No I/O here.
"""

from __future__ import annotations

from blockmirror.errors import ProtocolError


class NBDProtocolError(ProtocolError):
    """The peer sent something the NBD protocol does not allow; the connection must end."""


class ReceiveBuffer:
    """An append-at-the-end, consume-at-the-front byte buffer.

    Consuming moves a read position instead of deleting from the front each time, so a 32 MiB
    write payload arriving in many small pieces costs linear time; the consumed prefix is dropped
    once it is at least half of the buffer.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0

    def __len__(self) -> int:
        return len(self._buf) - self._pos

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self._buf += data

    def peek(self, n: int) -> bytes | None:
        if len(self) < n:
            return None
        return bytes(self._buf[self._pos : self._pos + n])

    def take(self, n: int) -> bytes | None:
        """Consume exactly ``n`` bytes, or nothing (None) when fewer are buffered."""
        if len(self) < n:
            return None
        # one copy (slicing the bytearray first would make two); the view is released at once
        with memoryview(self._buf) as view:
            out = bytes(view[self._pos : self._pos + n])
        self._advance(n)
        return out

    def skip(self, n: int) -> int:
        """Drop up to ``n`` bytes; returns how many were dropped."""
        k = min(n, len(self))
        self._advance(k)
        return k

    def take_all(self) -> bytes:
        out = bytes(self._buf[self._pos :])
        self._buf = bytearray()
        self._pos = 0
        return out

    def _advance(self, n: int) -> None:
        self._pos += n
        if self._pos == len(self._buf):
            self._buf = bytearray()
            self._pos = 0
        elif self._pos > 65536 and self._pos * 2 >= len(self._buf):
            del self._buf[: self._pos]
            self._pos = 0


class SansIOEndpoint:
    """The byte surface both handshake roles share: feed received bytes in, take bytes out."""

    def __init__(self) -> None:
        self._rx = ReceiveBuffer()
        self._tx = bytearray()

    def receive_data(self, data: bytes) -> None:
        self._rx.feed(data)

    def data_to_send(self) -> bytes:
        out = bytes(self._tx)
        self._tx.clear()
        return out

    def trailing_data(self) -> bytes:
        """Bytes received after the handshake ended: the first transmission requests."""
        return self._rx.take_all()
