"""A QMP monitor on the process's stdin/stdout (``--chardev stdio,id=X --monitor X``).

stdin may be a pipe, a terminal or a regular file (a shell here-document), which asyncio's
pipe transports do not all accept, so a daemon thread reads it and feeds a StreamReader (a
thread blocked in read() must never hold up the exit). stdout gets a small write transport
that writes through at once: the daemon's other stdout lines ("Formatting ...") go through
``print`` on the same descriptor, and both must stay in order and on a blocking descriptor.
"""

from __future__ import annotations

import asyncio
import os
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from blockmirror.qmp.server import QMPServer

READ_CHUNK = 64 * 1024


class _WriteThrough(asyncio.WriteTransport):
    """Writes each buffer to ``fd`` before returning (a blocking descriptor)."""

    def __init__(self, fd: int) -> None:
        super().__init__()
        self._fd = fd
        self._closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing:
            return
        view = memoryview(bytes(data))
        try:
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
        except OSError:
            self._closing = True  # the reader went away: drop output, as for a socket

    def get_write_buffer_size(self) -> int:
        return 0

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        self._closing = True

    def abort(self) -> None:
        self._closing = True

    def can_write_eof(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


def _feed_from(fd: int, loop: asyncio.AbstractEventLoop, reader: asyncio.StreamReader) -> None:
    while True:
        try:
            data = os.read(fd, READ_CHUNK)
        except OSError:
            data = b""
        if loop.is_closed():
            return
        try:
            if not data:
                loop.call_soon_threadsafe(reader.feed_eof)
                return
            loop.call_soon_threadsafe(reader.feed_data, data)
        except RuntimeError:  # the loop closed meanwhile
            return


def attach_stdio(server: QMPServer, *, pretty: bool | None = None,
                 in_fd: int = 0, out_fd: int = 1) -> None:
    """Serve one QMP session on ``in_fd``/``out_fd`` (stdin/stdout by default)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=READ_CHUNK, loop=loop)
    protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
    transport = _WriteThrough(out_fd)
    writer = asyncio.StreamWriter(transport, protocol, reader, loop)
    threading.Thread(target=_feed_from, args=(in_fd, loop, reader), name="qmp-stdin",
                     daemon=True).start()
    server.attach_streams(reader, writer, pretty=pretty)


__all__ = ["attach_stdio"]
