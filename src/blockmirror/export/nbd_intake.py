"""The transmission phase's receive side: an asyncio BufferedProtocol around ``RequestDecoder``.

After the handshake (which uses asyncio streams, TLS upgrade included) the connection's
transport is handed to ``RequestIntake``. The transport then receives straight into the
decoder's buffers and every complete request goes to the client's callback from inside the
transport's read callback: no StreamReader copy, no task woken per received piece. With a
StreamReader a 64 KiB write cost two to three loop iterations and three payload copies before
it was even parsed; here it is one receive and, at most, one copy.

The intake also carries the write side's flow control (``drain``), which the streams' writer
no longer sees once its protocol is replaced.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import cast

from blockmirror.nbd.transmission import BadRequest, Request, RequestDecoder
from blockmirror.nbd.wire import NBDProtocolError


class RequestIntake(asyncio.BufferedProtocol):
    """Feeds the transport's bytes to ``decoder`` and hands requests to ``on_request``.

    ``hold()`` stops handing out requests (and stops the transport reading) until
    ``release()``: that is how a client's in-flight limits push back on its socket. ``ended``
    resolves when no more requests will come: end of stream, connection lost, or a protocol
    error (the exception is kept in ``error``).
    """

    def __init__(self, transport: asyncio.BaseTransport, decoder: RequestDecoder,
                 on_request: Callable[[Request | BadRequest], None]) -> None:
        self.transport = transport
        self.decoder = decoder
        self._on_request = on_request
        loop = asyncio.get_running_loop()
        self.ended: asyncio.Future[None] = loop.create_future()
        self.error: NBDProtocolError | None = None
        #: resolves when the transport has closed
        self.closed: asyncio.Future[None] = loop.create_future()
        self._held = False
        self._eof = False
        self._lost = False
        self._write_paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []

    # --- taking the transport over from a StreamReader --------------------------------------

    def start(self, leftover: bytes, eof: bool) -> None:
        """Install on the transport; ``leftover`` are bytes the handshake's reader still held
        and ``eof`` whether it had seen the end of the stream."""
        # a cast, not an isinstance check: uvloop's transports do not derive from asyncio's
        transport = cast(asyncio.Transport, self.transport)
        transport.set_protocol(self)
        if leftover:
            self.decoder.receive_data(leftover)
        if eof or transport.is_closing():
            self._eof = True
        elif not transport.is_reading():
            transport.resume_reading()
        self._pump()

    # --- requests ----------------------------------------------------------------------------

    def hold(self) -> None:
        if not self._held:
            self._held = True
            if not self._eof and not self._lost:
                self._reading(False)

    def release(self) -> None:
        if self._held and not self.ended.done():
            self._held = False
            if not self._eof and not self._lost:
                self._reading(True)
            self._pump()

    def finish(self) -> None:
        """Take no more requests (DISC, a request that cannot be followed, a closing client)."""
        self._end()

    def _reading(self, on: bool) -> None:
        transport = cast(asyncio.ReadTransport, self.transport)
        if transport.is_closing():
            return
        if on:
            transport.resume_reading()
        else:
            transport.pause_reading()

    def _pump(self) -> None:
        while not self._held and not self.ended.done():
            try:
                req = self.decoder.next_request()
            except NBDProtocolError as e:
                self.error = e
                self._end()
                return
            if req is None:
                if self._eof or self._lost:
                    self._end()
                return
            self._on_request(req)

    def _end(self) -> None:
        """No more requests: stop reading for good (a client that keeps sending after DISC
        must not fill our buffers while the requests in flight finish)."""
        if not self.ended.done():
            self._held = True
            if not self._eof and not self._lost:
                self._reading(False)
            self.ended.set_result(None)

    # --- BufferedProtocol -----------------------------------------------------------------------

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.decoder.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        self.decoder.buffer_updated(nbytes)
        self._pump()

    def eof_received(self) -> bool:
        self._eof = True
        self._pump()
        return True  # keep the write side open: replies to requests in flight still go out

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._end()
        if not self.closed.done():
            self.closed.set_result(None)
        self._wake_writers()

    # --- the write side's flow control --------------------------------------------------------

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake_writers()

    def _wake_writers(self) -> None:
        waiters, self._drain_waiters = self._drain_waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    @property
    def must_drain(self) -> bool:
        """``drain()`` would wait or raise: the send buffer is full or the peer is gone."""
        return self._write_paused or self._lost

    async def drain(self) -> None:
        """Wait while the transport's send buffer is above its high-water mark."""
        while self._write_paused and not self._lost:
            w = asyncio.get_running_loop().create_future()
            self._drain_waiters.append(w)
            await w
        if self._lost:
            raise ConnectionResetError("Connection lost")


def take_buffered(reader: asyncio.StreamReader) -> bytes:
    """Bytes ``reader`` has received that nobody read yet, taken out of it without waiting.

    asyncio offers no call for this (``read()`` waits when the buffer is empty), so this looks
    into the StreamReader's buffer, as ``nbd.tls.cleartext_pending`` does.
    """
    buf = getattr(reader, "_buffer", None)
    if not isinstance(buf, bytearray) or not buf:
        return b""
    data = bytes(buf)
    buf.clear()
    return data


__all__ = ["RequestIntake", "take_buffered"]
