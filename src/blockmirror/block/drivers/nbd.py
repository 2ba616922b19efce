"""The nbd protocol driver (blockdev-add driver=nbd): a node backed by a remote NBD export.

The driver owns one connection: a reader task routes replies to the requests in flight (up to
``MAX_IN_FLIGHT``, told apart by cookie), so reads, writes and block-status calls from many
coroutines share the socket. Handshake and framing come from the sans-IO ``blockmirror.nbd``
codec; this module only moves bytes, keeps the pending table, and reconnects when
``reconnect-delay`` asks for it. ``parse_nbd_uri`` turns an NBD URI into options for this driver
(drive-mirror targets). cf. QEMU's block/nbd.c.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import ssl
from dataclasses import dataclass, field
from typing import Any

from blockmirror.block.driver import BlockDriver, BlockStatus, DriverInfo, Extent, WriteFlags
from blockmirror.block.drivers import register
from blockmirror.errors import BlockIOError, BlockMirrorError
from blockmirror.nbd.constants import (
    BASE_ALLOCATION,
    NBD_MAX_BUFFER_SIZE,
    Cmd,
    CmdFlag,
    StateFlag,
    TransmissionFlag,
    wire_to_errno,
)
from blockmirror.nbd.handshake import ExportInfo, ExportList, Negotiated, StartTLS
from blockmirror.nbd.handshake_client import ClientHandshake
from blockmirror.nbd.tls import cleartext_pending, client_context
from blockmirror.nbd.transmission import (
    DataChunk,
    ErrorChunk,
    HoleChunk,
    NoneChunk,
    ReplyDecoder,
    SimpleReply,
    StatusChunk,
    encode_request,
)
from blockmirror.nbd.wire import NBDProtocolError
from blockmirror.objects import NO_OBJECTS

log = logging.getLogger(__name__)

#: requests in flight on one connection (cf. MAX_NBD_REQUESTS in block/nbd.c)
MAX_IN_FLIGHT = 16
_READ_CHUNK = 256 * 1024
#: the largest block-status range asked at once (the wire length is 32 bits)
_MAX_STATUS_LEN = 1 << 31


def parse_nbd_uri(uri: str) -> dict[str, Any]:
    """Blockdev options (driver=nbd) for an NBD URI, as QEMU's nbd_parse_uri reads it.

    Accepts ``nbd://host[:port]/name``, ``nbd+tcp://...``, ``nbd+unix:///name?socket=PATH`` and
    the legacy ``nbd:unix:PATH[:exportname=NAME]`` / ``nbd:HOST:PORT[:exportname=NAME]``.

    Raises:
        BlockMirrorError: the URI is not one of those forms.
    """
    if uri.startswith("nbd:") and not uri.startswith("nbd://"):
        parts = uri.split(":")
        export = None
        rest = []
        for p in parts[1:]:
            if p.startswith("exportname="):
                export = p[len("exportname="):]
            else:
                rest.append(p)
        if len(rest) == 2 and rest[0] == "unix":
            server: dict[str, Any] = {"type": "unix", "path": rest[1]}
        elif len(rest) == 2 and rest[0]:
            server = {"type": "inet", "host": rest[0], "port": rest[1]}
        else:
            raise BlockMirrorError("No valid URL specified")
        opts: dict[str, Any] = {"driver": "nbd", "server": server}
        if export is not None:
            opts["export"] = export
        return opts
    # urllib.parse (and ipaddress under it) only when an nbd:// filename is parsed (start-up)
    from urllib.parse import parse_qs, unquote, urlparse

    u = urlparse(uri)
    if u.scheme not in ("nbd", "nbd+tcp", "nbd+unix"):
        raise BlockMirrorError("No valid URL specified")
    export = unquote(u.path[1:] if u.path.startswith("/") else u.path)
    query = parse_qs(u.query)
    if u.scheme == "nbd+unix":
        sockets = query.get("socket")
        if not sockets or u.netloc or set(query) != {"socket"}:
            raise BlockMirrorError("No valid URL specified")
        server = {"type": "unix", "path": sockets[0]}
    else:
        if query or not u.hostname:
            raise BlockMirrorError("No valid URL specified")
        server = {"type": "inet", "host": u.hostname, "port": str(u.port or 10809)}
    opts = {"driver": "nbd", "server": server}
    if export:
        opts["export"] = export
    return opts


def nbd_filename(server: dict[str, Any], export: str) -> str:
    """The filename QEMU reports for an nbd node (cf. nbd_refresh_filename)."""
    if server.get("type") == "unix":
        return f"nbd+unix:///{export}?socket={server.get('path', '')}"
    host, port = server.get("host", ""), server.get("port", "10809")
    return f"nbd://{host}:{port}/{export}"


def _server_options(opts: dict[str, Any]) -> dict[str, Any]:
    server = opts.get("server")
    if isinstance(server, dict):
        flat = dict(server)
    else:  # still dotted keys (server.type=...)
        flat = {k[len("server."):]: v for k, v in opts.items() if k.startswith("server.")}
    if "data" in flat and isinstance(flat["data"], dict):  # the legacy form, tolerated
        flat = {"type": flat.get("type"), **flat["data"]}
    if not flat:
        raise BlockMirrorError("Parameter 'server' is missing")
    if flat.get("type") not in ("unix", "inet"):
        raise BlockMirrorError(f"Parameter 'server.type' does not accept value "
                               f"'{flat.get('type')}'")
    return flat


@dataclass(eq=False)
class _Pending:
    cmd: Cmd
    offset: int
    length: int
    future: asyncio.Future[Any]
    #: the read payload: one piece as received, or assembled from chunks (holes stay zero)
    data: bytes | None = None
    buf: bytearray | None = None
    extents: list[tuple[int, int]] = field(default_factory=list)
    error: BlockIOError | None = None


class _Disconnected(Exception):
    """The connection ended with this request in flight (it may be retried after reconnect)."""


class _Connection:
    """One negotiated connection and its reader task."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 negotiated: Negotiated, trailing: bytes) -> None:
        self.reader = reader
        self.writer = writer
        self.info: ExportInfo = negotiated.export
        self.structured = negotiated.structured
        self.status_id: int | None = next(
            (cid for cid, name in negotiated.contexts.items() if name == BASE_ALLOCATION), None)
        self.pending: dict[int, _Pending] = {}
        self.decoder = ReplyDecoder(self._expected_length)
        self.decoder.receive_data(trailing)
        self.wlock = asyncio.Lock()
        self.slots = asyncio.Semaphore(MAX_IN_FLIGHT)
        self.cookie = 0
        self.alive = True
        self.task = asyncio.get_running_loop().create_task(self._read_loop())

    def _expected_length(self, cookie: int) -> int | None:
        p = self.pending.get(cookie)
        if p is None:
            return None
        return p.length if p.cmd == Cmd.READ else 0

    async def _read_loop(self) -> None:
        reason: str = "Connection closed"
        try:
            while True:
                reply = self.decoder.next_reply()
                if reply is None:
                    data = await self.reader.read(_READ_CHUNK)
                    if not data:
                        break
                    self.decoder.receive_data(data)
                    continue
                self._route(reply)
        except asyncio.CancelledError:
            reason = "Connection closed by the client"
            raise
        except (NBDProtocolError, ConnectionError, ssl.SSLError, OSError) as e:
            reason = str(e)
            log.warning("nbd: connection lost: %s", e)
        finally:
            self.alive = False
            for p in self.pending.values():
                if not p.future.done():
                    p.future.set_exception(_Disconnected(reason))
            self.pending.clear()
            self.writer.close()

    def _route(self, reply: Any) -> None:
        p = self.pending[reply.cookie]
        done = True
        if isinstance(reply, SimpleReply):
            if reply.error:
                p.error = BlockIOError(wire_to_errno(reply.error))
            elif p.cmd == Cmd.READ:
                p.data = reply.data
        else:
            done = reply.done
            if isinstance(reply, DataChunk | HoleChunk):
                n = len(reply.data) if isinstance(reply, DataChunk) else reply.length
                rel = reply.offset - p.offset
                if p.cmd != Cmd.READ or rel < 0 or rel + n > p.length:
                    raise NBDProtocolError("server sent chunk exceeding requested region")
                if isinstance(reply, DataChunk) and rel == 0 and n == p.length and not done \
                        and p.buf is None and p.data is None:
                    p.buf = bytearray(p.length)  # more chunks follow: assemble
                if isinstance(reply, DataChunk) and rel == 0 and n == p.length and p.buf is None:
                    p.data = reply.data  # the common case: one chunk, no copy
                else:
                    if p.buf is None:
                        p.buf = bytearray(p.length)
                        if p.data is not None:
                            p.buf[:] = p.data
                            p.data = None
                    if isinstance(reply, DataChunk):
                        p.buf[rel : rel + n] = reply.data
            elif isinstance(reply, StatusChunk):
                if p.cmd != Cmd.BLOCK_STATUS:
                    raise NBDProtocolError("unexpected block status chunk")
                if reply.context_id == self.status_id:
                    p.extents.extend(reply.extents)
            elif isinstance(reply, ErrorChunk):
                if p.error is None:
                    p.error = BlockIOError(wire_to_errno(reply.error), reply.message or None)
            elif not isinstance(reply, NoneChunk):
                raise NBDProtocolError("unexpected reply")
        if done:
            del self.pending[reply.cookie]
            if not p.future.done():
                if p.error is not None:
                    p.future.set_exception(p.error)
                elif p.cmd == Cmd.READ:
                    if p.data is not None:
                        p.future.set_result(p.data)
                    else:
                        p.future.set_result(bytes(p.buf) if p.buf is not None
                                            else bytes(p.length))
                elif p.cmd == Cmd.BLOCK_STATUS:
                    p.future.set_result(list(p.extents))
                else:
                    p.future.set_result(None)

    async def request(self, cmd: Cmd, offset: int = 0, length: int = 0,
                      flags: CmdFlag = CmdFlag(0), data: bytes | memoryview = b"") -> Any:
        async with self.slots:
            if not self.alive:
                raise _Disconnected("Connection closed")
            self.cookie += 1
            cookie = self.cookie
            fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            p = _Pending(cmd, offset, length, fut)
            self.pending[cookie] = p
            try:
                async with self.wlock:
                    self.writer.write(encode_request(cmd, cookie, offset, length, flags))
                    if data:
                        # no copy of the caller's buffer: the transport either sends it or
                        # copies the rest, and the server cannot answer before it has every
                        # byte, so the buffer is no longer referenced when we return
                        self.writer.write(data)
                    await self.writer.drain()
            except (ConnectionError, ssl.SSLError, OSError) as e:
                self.pending.pop(cookie, None)
                raise _Disconnected(str(e)) from e
            return await fut

    async def close(self) -> None:
        if self.alive:
            with contextlib.suppress(Exception):
                async with self.wlock:
                    self.writer.write(encode_request(Cmd.DISC, 0))
                    await self.writer.drain()
        self.task.cancel()
        with contextlib.suppress(BaseException):
            await self.task
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.writer.wait_closed(), 1)


def _eof_text(received: bool, tls_up: bool) -> str:
    """QEMU's text for a connection that ended during the handshake, by phase (cf.
    nbd_receive_negotiate). A server that refuses a TLS client (tls-authz) drops the
    connection without a TLS close_notify: QEMU's client reports a premature termination."""
    if tls_up:
        return ("Failed to read option reply: Cannot read from TLS channel: Software caused "
                "connection abort")
    if received:
        return "Failed to read option reply: Unexpected end-of-file before all data were read"
    return "Failed to read initial magic: Unexpected end-of-file before all data were read"


async def nbd_connect(
    server: dict[str, Any], export: str, *, tls: ssl.SSLContext | None = None,
    open_timeout: float | None = None, list_exports: bool = False,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, Negotiated | ExportList, bytes]:
    """Connect and negotiate; returns the streams, the outcome and bytes read past it.

    Raises:
        BlockMirrorError: QEMU's texts for connection and negotiation failures.
    """
    kind = server.get("type")
    try:
        if kind == "unix":
            path = str(server.get("path", ""))
            target = path
            reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(path),
                                                    open_timeout)
            hostname = None
        else:
            host, port = str(server.get("host", "")), str(server.get("port", "10809"))
            target = f"{host}:{port}"
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, int(port)), open_timeout)
            hostname = host
    except (OSError, ValueError, TimeoutError) as e:
        err = e.errno if isinstance(e, OSError) and e.errno else errno.ETIMEDOUT
        raise BlockMirrorError(f"Failed to connect to '{target}': {os.strerror(err)}") from e
    hs = ClientHandshake(export, tls=tls is not None, list_exports=list_exports)
    received = tls_up = False
    try:
        while True:
            event = hs.next_event()
            out = hs.data_to_send()
            if out:
                writer.write(out)
                await writer.drain()
            if event is None:
                data = await asyncio.wait_for(reader.read(65536), open_timeout)
                if not data:
                    raise NBDProtocolError(_eof_text(received, tls_up))
                received = True
                hs.receive_data(data)
            elif isinstance(event, StartTLS):
                assert tls is not None
                if cleartext_pending(reader):
                    raise NBDProtocolError("Unexpected data after the NBD_OPT_STARTTLS reply")
                await writer.start_tls(tls, server_hostname=hostname if tls.check_hostname
                                       else None)
                tls_up = True
                hs.tls_established()
            elif isinstance(event, Negotiated | ExportList):
                return reader, writer, event, hs.trailing_data()
    except BaseException as e:
        writer.close()
        if isinstance(e, ssl.SSLError | ConnectionError | TimeoutError):
            raise BlockMirrorError(f"Failed to negotiate with '{target}': {e}") from e
        raise


@register
class NbdDriver(BlockDriver):
    """cf. bdrv_nbd: every request goes to the server; nothing is cached locally."""

    format_name = "nbd"

    def __init__(self, node: Any) -> None:
        super().__init__(node)
        self._conn: _Connection | None = None
        self._info: ExportInfo | None = None
        self._server: dict[str, Any] = {}
        self._export = ""
        self._tls: ssl.SSLContext | None = None
        self._reconnect_delay = 0.0
        self._open_timeout: float | None = None
        self._reconnect_task: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        #: loop time at which the connection was found lost (None while connected)
        self._lost_at: float | None = None
        self._closing = False

    # --- life cycle -----------------------------------------------------------------------

    async def open(self) -> None:
        opts = self.node.options
        self._server = _server_options(opts)
        self._export = str(opts.get("export", ""))
        self._reconnect_delay = float(opts.get("reconnect-delay", 0) or 0)
        timeout = opts.get("open-timeout")
        self._open_timeout = float(timeout) if timeout else None
        creds = opts.get("tls-creds")
        if creds:
            # the credentials (and the secret of an encrypted key, resolved when the object
            # was created) come from the graph's object lookup
            objects = self.node.graph.objects if self.node.graph else NO_OBJECTS
            host = self._server.get("host") if self._server.get("type") == "inet" else None
            self._tls = client_context(objects, str(creds), opts.get("tls-hostname") or host)
        await self._connect()
        if not self.node.filename:
            self.node.filename = nbd_filename(self._server, self._export)

    async def _connect(self) -> None:
        reader, writer, event, trailing = await nbd_connect(
            self._server, self._export, tls=self._tls, open_timeout=self._open_timeout or 30.0)
        assert isinstance(event, Negotiated)
        conn = _Connection(reader, writer, event, trailing)
        if self._info is not None and conn.info.size != self._info.size:
            await conn.close()
            raise BlockMirrorError("Export size changed across a reconnect")
        self._conn = conn
        self._info = conn.info
        info = conn.info
        self.request_alignment = max(1, info.min_block)
        self.max_transfer = max(self.request_alignment, min(info.max_block, NBD_MAX_BUFFER_SIZE))
        self.supports_fua = bool(info.flags & TransmissionFlag.SEND_FUA)
        self.can_write_zeroes_with_unmap = bool(info.flags & TransmissionFlag.SEND_WRITE_ZEROES)
        self._lost_at = None
        self._connected.set()

    async def close(self) -> None:
        self._closing = True
        if self._reconnect_task is not None:
            self._reconnect_task.cancel()
            with contextlib.suppress(BaseException):
                await self._reconnect_task
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    # --- connection management ----------------------------------------------------------

    async def _live(self) -> _Connection:
        """The current connection, or wait for a reconnect (cf. block/nbd.c reconnect).

        After an unexpected disconnect the driver always reconnects in the background; requests
        wait for it during the first ``reconnect-delay`` seconds after the loss and fail with
        EIO after that (at once with the default delay of 0), until a reconnect succeeds.
        """
        conn = self._conn
        if conn is not None and conn.alive:
            return conn
        if self._closing:
            raise BlockIOError(errno.EIO)
        loop = asyncio.get_running_loop()
        if self._lost_at is None:
            self._lost_at = loop.time()
            self._connected.clear()
        if self._reconnect_task is None or self._reconnect_task.done():
            self._reconnect_task = loop.create_task(self._reconnect())
        remaining = self._reconnect_delay - (loop.time() - self._lost_at)
        if remaining <= 0:
            raise BlockIOError(errno.EIO)
        try:
            await asyncio.wait_for(self._connected.wait(), remaining)
        except TimeoutError:
            raise BlockIOError(errno.EIO) from None
        assert self._conn is not None
        return self._conn

    async def _reconnect(self) -> None:
        pause = 0.05
        while not self._closing:
            try:
                await self._connect()
                log.info("nbd: reconnected to %s", nbd_filename(self._server, self._export))
                return
            except BlockMirrorError as e:
                log.debug("nbd: reconnect failed: %s", e)
                await asyncio.sleep(pause)
                pause = min(pause * 2, 2.0)

    async def _request(self, cmd: Cmd, offset: int = 0, length: int = 0,
                       flags: CmdFlag = CmdFlag(0), data: bytes | memoryview = b"") -> Any:
        # a request cut by the disconnect is sent again once, after the reconnect
        for _attempt in range(2 if self._reconnect_delay > 0 else 1):
            conn = await self._live()
            try:
                return await conn.request(cmd, offset, length, flags, data)
            except _Disconnected:
                continue
        raise BlockIOError(errno.EIO)

    def _flags(self) -> TransmissionFlag:
        return self._info.flags if self._info else TransmissionFlag(0)

    # --- size and info --------------------------------------------------------------------

    def length(self) -> int:
        return self._info.size if self._info else 0

    def info(self) -> DriverInfo:
        return DriverInfo()

    # --- I/O ------------------------------------------------------------------------------

    async def preadv(self, offset: int, length: int) -> bytes:
        data: bytes = await self._request(Cmd.READ, offset, length)
        return data

    async def pwritev(self, offset: int, data: bytes | memoryview, flags: WriteFlags) -> None:
        if self._flags() & TransmissionFlag.READ_ONLY:
            raise BlockIOError(errno.EPERM)
        cflags = CmdFlag.FUA if flags & WriteFlags.FUA and self.supports_fua else CmdFlag(0)
        await self._request(Cmd.WRITE, offset, len(data), cflags, data)

    async def pwrite_zeroes(self, offset: int, length: int, flags: WriteFlags) -> None:
        tflags = self._flags()
        if not tflags & TransmissionFlag.SEND_WRITE_ZEROES:
            raise BlockIOError(errno.ENOTSUP)
        cflags = CmdFlag(0) if flags & WriteFlags.MAY_UNMAP else CmdFlag.NO_HOLE
        if flags & WriteFlags.FUA and self.supports_fua:
            cflags |= CmdFlag.FUA
        if flags & WriteFlags.NO_FALLBACK:
            if not tflags & TransmissionFlag.SEND_FAST_ZERO:
                raise BlockIOError(errno.ENOTSUP)
            cflags |= CmdFlag.FAST_ZERO
        await self._request(Cmd.WRITE_ZEROES, offset, length, cflags)

    async def pdiscard(self, offset: int, length: int) -> None:
        if not self._flags() & TransmissionFlag.SEND_TRIM:
            raise BlockIOError(errno.ENOTSUP)
        await self._request(Cmd.TRIM, offset, length)

    async def flush(self) -> None:
        if self._flags() & TransmissionFlag.SEND_FLUSH:
            await self._request(Cmd.FLUSH)

    async def block_status(self, offset: int, length: int) -> Extent:
        conn = self._conn
        if conn is None or conn.status_id is None:
            return Extent(length, BlockStatus.DATA | BlockStatus.ALLOCATED
                          | BlockStatus.OFFSET_VALID, map_offset=offset, map_node=self.node)
        ask = min(length, _MAX_STATUS_LEN)
        extents: list[tuple[int, int]] = await self._request(
            Cmd.BLOCK_STATUS, offset, ask, CmdFlag.REQ_ONE)
        if not extents or extents[0][0] == 0:
            raise BlockIOError(errno.EIO, "Protocol error: invalid block status reply")
        n, state = extents[0]
        status = BlockStatus.OFFSET_VALID
        if not state & StateFlag.HOLE:
            status |= BlockStatus.DATA
        if state & StateFlag.ZERO:
            status |= BlockStatus.ZERO
        if status & (BlockStatus.DATA | BlockStatus.ZERO):
            status |= BlockStatus.ALLOCATED
        return Extent(min(n, length), status, map_offset=offset, map_node=self.node)
