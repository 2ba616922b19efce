"""The nbd protocol driver (blockdev-add driver=nbd): a node backed by a remote NBD export.

The driver owns one connection: a reader task routes replies to the requests in flight (up to
``MAX_IN_FLIGHT``, told apart by cookie), so reads, writes and block-status calls from many
coroutines share the socket. Handshake and framing come from the sans-IO ``blockmirror.nbd``
codec; this module only moves bytes, keeps the pending table, and reconnects.
``parse_nbd_uri`` turns an NBD URI into options for this driver (drive-mirror targets).
cf. QEMU's block/nbd.c and nbd/client-connection.c.

Connection states follow QEMU's (``_State``): after an unexpected disconnect the driver is
CONNECTING_WAIT when ``reconnect-delay`` is set (requests wait for a reconnect, those that were
in flight are sent again on it) and CONNECTING_NOWAIT otherwise or once the delay has run out
(requests fail with EIO at once); in both, reconnect attempts go on in the background, with
QEMU's pauses of 1, 2, 4, 8 and then 16 seconds between them, until one succeeds. A server
that breaks the protocol (bad magic, an unknown cookie, a malformed chunk) puts the driver in
QUIT: no reconnect, every request fails. ``open-timeout`` retries the first connection the same
way for that many seconds. Every wait is on the graph's clock, so tests can run it virtually.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import logging
import os
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from blockmirror.block.driver import BlockDriver, BlockStatus, DriverInfo, Extent, WriteFlags
from blockmirror.block.drivers import register
from blockmirror.block.optsyntax import nbd_filename
from blockmirror.clock import Clock, MonotonicClock
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
#: pauses between connection attempts, in seconds: doubled after each failure up to the
#: maximum (cf. connect_thread_func)
_RETRY_FIRST_S = 1
_RETRY_MAX_S = 16
#: a bound on one handshake when nothing else bounds it (QEMU's connect thread would wait
#: for ever on a server that accepts and then says nothing; a node should not)
_HANDSHAKE_GUARD_S = 30.0
_NS = 1_000_000_000


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


class _State(enum.Enum):
    """cf. NBDClientState."""

    CONNECTING_WAIT = "connecting-wait"
    CONNECTING_NOWAIT = "connecting-nowait"
    CONNECTED = "connected"
    QUIT = "quit"


#: told when a connection ends on its own: (the connection, whether the server broke the
#: protocol)
LostHook = Callable[["_Connection", bool], None]


class _Connection:
    """One negotiated connection and its reader task."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 negotiated: Negotiated, trailing: bytes,
                 on_lost: LostHook | None = None) -> None:
        self.on_lost = on_lost
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
        reason = "server dropped connection"
        fatal = False
        cancelled = False
        try:
            while True:
                reply = self.decoder.next_reply()
                if reply is None:
                    data = await self.reader.read(_READ_CHUNK)
                    if not data:
                        if self.pending:
                            log.warning("nbd: connection lost: %s", reason)
                        break
                    self.decoder.receive_data(data)
                    continue
                self._route(reply)
        except asyncio.CancelledError:
            reason = "Connection closed by the client"
            cancelled = True
            raise
        except NBDProtocolError as e:
            # cf. nbd_channel_error with an error other than EIO: the server is broken
            reason, fatal = str(e), True
            log.warning("nbd: protocol error, giving up the connection: %s", e)
        except (ConnectionError, ssl.SSLError, OSError) as e:
            reason = str(e)
            log.warning("nbd: connection lost: %s", e)
        finally:
            self._end(reason, fatal, tell=not cancelled)

    def _end(self, reason: str, fatal: bool, *, tell: bool = True) -> None:
        """The connection is over: tell the owner first (so that a request woken below sees
        the new state), then fail every request in flight. Idempotent."""
        if not self.alive:
            return
        self.alive = False
        if tell and self.on_lost is not None:
            self.on_lost(self, fatal)
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
                    if self.writer.is_closing():
                        # the reader has not seen the loss yet; uvloop's transport refuses a
                        # write after it (RuntimeError) where CPython's drops it silently
                        raise ConnectionResetError("Connection lost")
                    self.writer.write(encode_request(cmd, cookie, offset, length, flags))
                    if data:
                        # no copy of the caller's buffer: the transport either sends it or
                        # copies the rest, and the server cannot answer before it has every
                        # byte, so the buffer is no longer referenced when we return
                        self.writer.write(data)
                    await self.writer.drain()
            except (ConnectionError, ssl.SSLError, OSError) as e:
                self.pending.pop(cookie, None)
                self._end(str(e), False)
                raise _Disconnected(str(e)) from e
            return await fut

    async def close(self) -> None:
        self.on_lost = None  # a requested close is no loss
        if self.alive:
            with contextlib.suppress(Exception):
                async with self.wlock:
                    self.writer.write(encode_request(Cmd.DISC, 0))
                    await self.writer.drain()
        self.task.cancel()
        with contextlib.suppress(BaseException):
            await self.task
        # a reader task cancelled before its first step never ran its finally: end (and
        # close the socket) here, or the socket stays open and wait_closed runs out its second
        self._end("Connection closed by the client", False, tell=False)
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
                if writer.is_closing():
                    raise ConnectionResetError("Connection lost")
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


async def _cancel(task: asyncio.Future[Any]) -> None:
    if not task.done():
        task.cancel()
        with contextlib.suppress(BaseException):
            await task


async def _first(work: asyncio.Future[Any], deadline: asyncio.Future[Any]) -> bool:
    """Wait for ``work`` or ``deadline``; True when ``work`` finished (it wins a tie), else
    ``work`` is cancelled."""
    try:
        await asyncio.wait({work, deadline}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not work.done():
            await _cancel(work)
    return not work.cancelled()


@register
class NbdDriver(BlockDriver):
    """cf. bdrv_nbd: every request goes to the server; nothing is cached locally."""

    format_name = "nbd"

    def __init__(self, node: Any) -> None:
        super().__init__(node)
        self._conn: _Connection | None = None
        self._info: ExportInfo | None = None
        self._base_allocation = False
        self._server: dict[str, Any] = {}
        self._export = ""
        self._tls: ssl.SSLContext | None = None
        #: seconds (QAPI uint32); 0: no waiting for a reconnect
        self._reconnect_delay = 0
        self._open_timeout = 0
        self._clock: Clock = MonotonicClock()
        self._state = _State.CONNECTING_WAIT
        self._reconnect_task: asyncio.Task[None] | None = None
        #: wakes requests waiting for a reconnect: set while CONNECTED, and when waiting is
        #: over for another reason (close, cancel_in_flight); they look at the state then
        self._wake = asyncio.Event()
        #: clock time (ns) at which waiting for a reconnect ends (cf. reconnect_delay_timer);
        #: armed by the first request that finds the connection lost
        self._delay_deadline: int | None = None
        self._closing = False
        #: connections made, reconnects included (for tests and diagnostics)
        self.connects = 0

    # --- life cycle -----------------------------------------------------------------------

    async def open(self) -> None:
        opts = self.node.options
        self._server = _server_options(opts)
        self._export = str(opts.get("export", ""))
        # the schema checked both as uint32; 0 (the default) disables them
        self._reconnect_delay = int(opts.get("reconnect-delay") or 0)
        self._open_timeout = int(opts.get("open-timeout") or 0)
        graph = self.node.graph
        clock = getattr(graph, "clock", None) if graph is not None else None
        if clock is not None:
            self._clock = clock
        creds = opts.get("tls-creds")
        if creds:
            # the credentials (and the secret of an encrypted key, resolved when the object
            # was created) come from the graph's object lookup
            objects = self.node.graph.objects if self.node.graph else NO_OBJECTS
            host = self._server.get("host") if self._server.get("type") == "inet" else None
            self._tls = client_context(objects, str(creds), opts.get("tls-hostname") or host)
        if self._open_timeout:
            conn = await self._connect_until(self._open_timeout * _NS)
        else:
            conn = await self._attempt(_HANDSHAKE_GUARD_S)
        self._install(conn)
        if not self.node.filename:
            self.node.filename = nbd_filename(self._server, self._export)

    async def _attempt(self, guard_s: float | None) -> _Connection:
        """One connection attempt: connect, negotiate, check the export (cf. nbd_connect)."""
        reader, writer, event, trailing = await nbd_connect(
            self._server, self._export, tls=self._tls, open_timeout=guard_s)
        assert isinstance(event, Negotiated)
        conn = _Connection(reader, writer, event, trailing, on_lost=self._lost)
        if self._info is not None and conn.info.size != self._info.size:
            await conn.close()
            raise BlockMirrorError("Export size changed across a reconnect")
        return conn

    async def _connect_until(self, limit_ns: int) -> _Connection:
        """open-timeout: attempts with QEMU's pauses until one succeeds or ``limit_ns`` of
        the clock have passed; then the last attempt's error, or QEMU's text when the first
        attempt is still under way (cf. open_timer_cb, nbd_co_establish_connection)."""
        clock = self._clock
        timer = asyncio.ensure_future(clock.sleep_ns(limit_ns))
        last: BlockMirrorError | None = None
        pause_s = _RETRY_FIRST_S
        try:
            while True:
                attempt = asyncio.ensure_future(self._attempt(_HANDSHAKE_GUARD_S))
                if not await _first(attempt, timer):
                    raise last or BlockMirrorError("Connection attempt cancelled by timeout")
                error = attempt.exception()
                if error is None:
                    return attempt.result()
                if not isinstance(error, BlockMirrorError):
                    raise error
                last = error
                if not await _first(asyncio.ensure_future(
                        clock.sleep_ns(pause_s * _NS)), timer):
                    raise last
                pause_s = min(pause_s * 2, _RETRY_MAX_S)
        finally:
            await _cancel(timer)

    def _install(self, conn: _Connection) -> None:
        self._conn = conn
        self._info = conn.info
        self._base_allocation = conn.status_id is not None
        info = conn.info
        self.request_alignment = max(1, info.min_block)
        self.max_transfer = max(self.request_alignment, min(info.max_block, NBD_MAX_BUFFER_SIZE))
        self.supports_fua = bool(info.flags & TransmissionFlag.SEND_FUA)
        self.can_write_zeroes_with_unmap = bool(info.flags & TransmissionFlag.SEND_WRITE_ZEROES)
        self._state = _State.CONNECTED
        self._delay_deadline = None
        self.connects += 1
        self._wake.set()

    def cancel_in_flight(self) -> None:
        """Stop waiting for a reconnect: requests waiting fail now, as after the delay (cf.
        nbd_cancel_in_flight, which QEMU's mirror calls on a forced cancel). The background
        attempts go on."""
        if self._state is _State.CONNECTING_WAIT:
            self._state = _State.CONNECTING_NOWAIT
            self._wake.set()

    async def close(self) -> None:
        self._closing = True
        self._state = _State.QUIT
        self._wake.set()  # requests waiting for a reconnect fail now
        if self._reconnect_task is not None:
            self._reconnect_task.cancel()
            with contextlib.suppress(BaseException):
                await self._reconnect_task
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    # --- connection management ----------------------------------------------------------

    @property
    def state(self) -> str:
        """The connection state (QEMU's names, lower case): for tests and diagnostics."""
        return self._state.value

    def _lost(self, conn: _Connection, fatal: bool) -> None:
        """cf. nbd_channel_error: a lost connection reconnects, a broken server does not."""
        if conn is not self._conn or self._closing:
            return
        self._wake.clear()
        if fatal:
            self._state = _State.QUIT
        elif self._state is _State.CONNECTED:
            self._state = (_State.CONNECTING_WAIT if self._reconnect_delay
                           else _State.CONNECTING_NOWAIT)

    def _kick_reconnect(self) -> None:
        """Start the background attempts unless they run already (cf. the connect thread,
        started by the first request after a loss and retrying until it succeeds)."""
        if self._reconnect_task is None or self._reconnect_task.done():
            self._reconnect_task = asyncio.get_running_loop().create_task(
                self._reconnect(), name=f"nbd-reconnect-{self.node.name}")

    async def _reconnect(self) -> None:
        pause_s = _RETRY_FIRST_S
        while self._state in (_State.CONNECTING_WAIT, _State.CONNECTING_NOWAIT):
            try:
                conn = await self._attempt(_HANDSHAKE_GUARD_S)
            except BlockMirrorError as e:
                log.debug("nbd: reconnect failed: %s", e)
                await self._clock.sleep_ns(pause_s * _NS)
                pause_s = min(pause_s * 2, _RETRY_MAX_S)
                continue
            if self._state not in (_State.CONNECTING_WAIT, _State.CONNECTING_NOWAIT):
                await conn.close()  # closed (or given up) meanwhile
                return
            old = self._conn
            self._install(conn)
            if old is not None:
                await old.close()
            log.info("nbd: reconnected to %s", nbd_filename(self._server, self._export))
            return

    async def _wait_connected(self, limit_ns: int) -> None:
        """Until connected (or told to stop waiting) or ``limit_ns`` of the clock have
        passed, whichever comes first."""
        timer = asyncio.ensure_future(self._clock.sleep_ns(limit_ns))
        try:
            await _first(asyncio.ensure_future(self._wake.wait()), timer)
        finally:
            await _cancel(timer)

    async def _live(self) -> _Connection:
        """The current connection, or one a reconnect brings within the delay (cf.
        nbd_co_send_request, nbd_reconnect_attempt, reconnect_delay_timer_cb).

        Raises:
            BlockIOError: EIO, when not connected and not (or no longer) waiting.
        """
        conn = self._conn
        if self._state is _State.CONNECTED and conn is not None and conn.alive:
            return conn
        if self._state is _State.QUIT or self._closing:
            raise BlockIOError(errno.EIO)
        self._kick_reconnect()
        if self._state is _State.CONNECTING_WAIT:
            now = self._clock.now_ns()
            if self._delay_deadline is None:
                self._delay_deadline = now + self._reconnect_delay * _NS
            if self._delay_deadline > now:
                await self._wait_connected(self._delay_deadline - now)
            if self._state is _State.CONNECTING_WAIT and \
                    self._clock.now_ns() >= self._delay_deadline:
                log.warning("nbd: no reconnect within reconnect-delay=%d s; requests fail "
                            "until one succeeds", self._reconnect_delay)
                self._state = _State.CONNECTING_NOWAIT
        conn = self._conn
        if self._state is _State.CONNECTED and conn is not None and conn.alive:
            return conn
        raise BlockIOError(errno.EIO)

    async def _request(self, cmd: Cmd, offset: int = 0, length: int = 0,
                       flags: CmdFlag = CmdFlag(0), data: bytes | memoryview = b"") -> Any:
        # a request cut by a disconnect is sent again on the next connection as long as the
        # driver waits for one (cf. nbd_co_request's loop on nbd_client_will_reconnect)
        while True:
            conn = await self._live()
            try:
                return await conn.request(cmd, offset, length, flags, data)
            except _Disconnected:
                # the news of the loss can reach a request after the reconnect is done
                # (one waiting for a slot on the old connection hears of it only when it
                # gets one): a newer live connection takes it as well
                if self._state is _State.CONNECTING_WAIT or (
                        self._state is _State.CONNECTED and self._conn is not conn):
                    continue
                raise BlockIOError(errno.EIO) from None

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
        if not self._base_allocation:
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
