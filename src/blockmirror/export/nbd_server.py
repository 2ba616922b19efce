"""The NBD server: asyncio shell around the sans-IO codec in ``blockmirror.nbd``.

``NbdServer`` listens on one unix or inet address (nbd-server-start / --nbd-server) and serves
the ``NbdExport``s added by block-export-add / nbd-server-add / --export. Each export holds a
``BlockBackend`` attached to its node and resolves ``blk.node`` on every request, so a mirror
pivot (``BlockGraph.replace_node``) silently moves live clients to the new node; every write
goes through the node's generic request path and so marks the mirror's dirty bitmaps.

Each client connection is a task owned by the server: a bounded handshake (timeout) on
asyncio streams, then the transmission phase, where ``RequestIntake`` (nbd_intake.py) receives
requests straight from the transport and the client runs up to ``MAX_IN_FLIGHT`` of them at
once. A bad client is logged and disconnected; it never affects other clients or the
exported node.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import ssl
import stat
import sys
from collections.abc import Coroutine
from typing import Any

from blockmirror.block.bitmaps import NamedBitmap, release_export_bitmaps
from blockmirror.block.chain import block_status_above
from blockmirror.block.driver import BlockStatus
from blockmirror.block.graph import BlockGraph
from blockmirror.block.node import BlockBackend, BlockNode, Perm
from blockmirror.errors import BlockIOError, BlockMirrorError
from blockmirror.events import EventBus
from blockmirror.export.nbd_intake import RequestIntake, take_buffered
from blockmirror.export.nbd_meta import (
    MAX_CONTEXT_EXTENTS,
    allocation_depth_extents,
    bitmap_extents,
)
from blockmirror.nbd.constants import (
    NBD_META_ID_ALLOCATION_DEPTH,
    NBD_META_ID_BASE_ALLOCATION,
    NBD_META_ID_DIRTY_BITMAP,
    Cmd,
    CmdFlag,
    ReplyType,
    StateFlag,
    TransmissionFlag,
    errno_to_wire,
)
from blockmirror.nbd.handshake import (
    Aborted,
    ExportInfo,
    Negotiated,
    ServerHandshake,
    StartTLS,
)
from blockmirror.nbd.tls import cleartext_pending, peer_dn
from blockmirror.nbd.transmission import (
    BadRequest,
    Request,
    RequestDecoder,
    encode_block_status,
    encode_chunk_header,
    encode_error_chunk,
    encode_none_chunk,
    encode_offset_hole,
    encode_simple_reply,
    validate_request,
)
from blockmirror.nbd.wire import NBDProtocolError
from blockmirror.objects.authz import is_allowed_by_id
from blockmirror.unixsock import bind_unix

log = logging.getLogger(__name__)

#: requests of one client processed at the same time (cf. QEMU's MAX_NBD_REQUESTS)
MAX_IN_FLIGHT = 16
#: WRITE payload bytes one client may have in flight (beyond one request, which may always
#: run): QEMU holds up to MAX_IN_FLIGHT x 32 MiB per client; we bound a client's buffers to
#: this plus the one request being received
MAX_IN_FLIGHT_BYTES = 32 * 1024 * 1024
#: seconds a client may take to finish the handshake (cf. handshake-max-seconds)
HANDSHAKE_TIMEOUT = 10.0
#: extents in one BLOCK_STATUS reply (bounds the work a single request can ask for)
MAX_EXTENTS = 2048


# --- exports -----------------------------------------------------------------------------------


class NbdExport:
    """One NBD export (a BlockExport of type nbd in QEMU's terms)."""

    def __init__(self, export_id: str, name: str, description: str, writable: bool,
                 blk: BlockBackend) -> None:
        self.id = export_id
        self.name = name
        self.description = description
        self.writable = writable
        self.blk = blk
        #: False once deletion was requested (query-block-exports' shutting-down)
        self.user_owned = True
        self.clients: set[_Client] = set()
        #: served as qemu:dirty-bitmap:NAME (held busy while exported), and whether
        #: qemu:allocation-depth is served (block-export-add bitmaps / allocation-depth)
        self.bitmaps: list[NamedBitmap] = []
        self.allocation_depth = False

    @property
    def node(self) -> BlockNode:
        node = self.blk.node
        if node is None:
            raise BlockIOError(errno.ESHUTDOWN, "export has no node")
        return node

    @property
    def flags(self) -> TransmissionFlag:
        return _WRITABLE_FLAGS if self.writable else _READ_ONLY_FLAGS

    def info(self) -> ExportInfo:
        node = self.node
        return ExportInfo(self.name, node.length(), self.flags, self.description,
                          min_block=max(1, node.driver.request_alignment),
                          allocation_depth=self.allocation_depth,
                          bitmaps=tuple(b.name for b in self.bitmaps))


_COMMON_FLAGS = (TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_FLUSH
                 | TransmissionFlag.SEND_FUA | TransmissionFlag.SEND_DF
                 | TransmissionFlag.SEND_CACHE | TransmissionFlag.CAN_MULTI_CONN)
#: computed once: enum arithmetic per request was a measurable share of a write's CPU
_WRITABLE_FLAGS = (_COMMON_FLAGS | TransmissionFlag.SEND_TRIM
                   | TransmissionFlag.SEND_WRITE_ZEROES | TransmissionFlag.SEND_FAST_ZERO)
_READ_ONLY_FLAGS = _COMMON_FLAGS | TransmissionFlag.READ_ONLY
_FUA = int(CmdFlag.FUA)


class TlsAuthzDenied(BlockMirrorError):
    """A TLS client whose certificate the server's ``tls-authz`` object does not allow."""


class NbdServer:
    """The daemon's NBD server (one per daemon, ``daemon.nbd``)."""

    def __init__(self, graph: BlockGraph, events: EventBus, *, tls: ssl.SSLContext | None = None,
                 tls_creds: str | None = None, tls_authz: str | None = None,
                 max_connections: int = 0, handshake_timeout: float = HANDSHAKE_TIMEOUT) -> None:
        self.graph = graph
        self.events = events
        self.tls = tls
        self.tls_creds = tls_creds
        self.tls_authz = tls_authz
        self.max_connections = max_connections
        self.handshake_timeout = handshake_timeout
        #: exports by export id (names are looked up by scanning: there are few)
        self.exports: dict[str, NbdExport] = {}
        self._server: asyncio.AbstractServer | None = None
        self._clients: set[_Client] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._unix_path: str | None = None
        self.address: tuple[str, int] | str | None = None

    # --- the listener ---------------------------------------------------------------------

    async def listen(self, addr: dict[str, Any]) -> None:
        kind = addr.get("type")
        if kind == "unix":
            # QEMU hands the path to the C library: it ends at the first NUL byte
            path = str(addr["path"]).split("\0", 1)[0]
            if _is_socket(path):
                os.unlink(path)  # cf. QEMU: a stale socket file is replaced
            try:
                # mode 0600 before listen() (see unixsock.py), unlike QEMU's umask
                sock = bind_unix(path)
                try:
                    self._server = await asyncio.start_unix_server(self._accept, sock=sock)
                except BaseException:
                    sock.close()
                    raise
            except OSError as e:
                raise BlockMirrorError(
                    f"Failed to bind socket to {path}: {os.strerror(e.errno or errno.EIO)}"
                ) from e
            self._unix_path = path
            self.address = path
        elif kind == "inet":
            host = str(addr.get("host", "")) or "0.0.0.0"
            port = str(addr.get("port", "10809"))
            try:
                self._server = await asyncio.start_server(self._accept, host, int(port),
                                                          reuse_address=True)
            except OSError as e:
                # cf. inet_listen_saddr, which tries the port range before giving up
                raise BlockMirrorError("Failed to find an available port: "
                                       f"{os.strerror(e.errno or errno.EADDRINUSE)}") from e
            except ValueError as e:
                raise BlockMirrorError(f"Parameter 'port' expects a port number: {e}") from e
            sock = self._server.sockets[0].getsockname()
            self.address = (str(sock[0]), int(sock[1]))
        else:
            raise BlockMirrorError(f"Unsupported NBD server address type '{kind}'")

    async def stop(self) -> None:
        """nbd-server-stop: shut every export down (with its events), then stop listening."""
        # newest first, the order in which QEMU closes them
        for exp in reversed(list(self.exports.values())):
            await self.request_shutdown(exp, hard=True)
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        if self._server is not None:
            self._server.close()
            for c in list(self._clients):
                c.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)
            self._server = None
        if self._unix_path and _is_socket(self._unix_path):
            with contextlib.suppress(OSError):
                os.unlink(self._unix_path)

    # --- exports ----------------------------------------------------------------------------

    def find_export(self, name: str) -> ExportInfo | None:
        for exp in self.exports.values():
            if exp.name == name and exp.user_owned and exp.blk.node is not None:
                return exp.info()
        return None

    def list_exports(self) -> list[ExportInfo]:
        return [e.info() for e in self.exports.values() if e.user_owned and e.blk.node]

    def export_by_name(self, name: str) -> NbdExport | None:
        for exp in self.exports.values():
            if exp.name == name and exp.user_owned:
                return exp
        return None

    def add_export(self, export_id: str, node: BlockNode, *, name: str, description: str,
                   writable: bool) -> NbdExport:
        perm = Perm.CONSISTENT_READ | (Perm.WRITE if writable else Perm.NONE)
        blk = BlockBackend("", "an unnamed block device", perm, Perm.all() & ~Perm.RESIZE)
        self.graph.attach(blk, node, "root", perm, blk.shared)
        self.graph.add_backend(blk)
        exp = NbdExport(export_id, name, description, writable, blk)
        self.exports[export_id] = exp
        return exp

    async def request_shutdown(self, exp: NbdExport, *, hard: bool) -> None:
        """Stop advertising ``exp``; delete it (and emit the event) once its clients are gone.

        Without clients the export goes at once, so BLOCK_EXPORT_DELETED precedes the command's
        reply as in QEMU; otherwise it goes when the last client has disconnected.
        """
        if not exp.user_owned:
            return
        exp.user_owned = False
        if hard:
            for c in list(exp.clients):
                c.close()
        if not exp.clients:
            await self._finish_delete(exp)
            return
        task = asyncio.get_running_loop().create_task(self._finish_delete(exp))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _finish_delete(self, exp: NbdExport) -> None:
        while exp.clients:
            await asyncio.gather(*(c.done.wait() for c in list(exp.clients)))
        self.exports.pop(exp.id, None)
        release_export_bitmaps(exp.bitmaps)
        node = exp.blk.node
        if node is not None:
            with contextlib.suppress(BlockMirrorError):
                await node.drain()
        self.graph.remove_backend(exp.blk)
        self.events.emit("BLOCK_EXPORT_DELETED", {"id": exp.id})

    # --- clients ------------------------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.max_connections and len(self._clients) >= self.max_connections:
            log.info("NBD client refused: max-connections=%d reached", self.max_connections)
            writer.close()
            return
        client = _Client(self, reader, writer)
        self._clients.add(client)
        try:
            await client.run()
        finally:
            self._clients.discard(client)


class _Client:
    """One client connection: handshake, then transmission."""

    def __init__(self, server: NbdServer, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.export: NbdExport | None = None
        self.done = asyncio.Event()
        #: set when serving the client hit an exception nobody expected (a bug of ours)
        self.crashed = False
        self._task = asyncio.current_task()
        #: set once the handshake is done: the transmission phase's receive side
        self._intake: RequestIntake | None = None
        #: requests being served (each a task), and the WRITE payload bytes they hold
        #: (see MAX_IN_FLIGHT_BYTES)
        self._inflight: set[asyncio.Task[None]] = set()
        self._payload_bytes = 0
        #: a WRITE read in full but not started: its payload does not fit the budget yet
        self._waiting: Request | None = None
        #: an unexpected exception serving a request (a bug of ours); it ends the connection
        self._failure: Exception | None = None
        self.structured = False
        self.contexts: dict[int, str] = {}
        peer = writer.get_extra_info("peername")
        self.log = log.getChild(f"client{id(self) & 0xFFFF:04x}")
        self.log.debug("connection from %s", peer)

    def close(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()

    async def run(self) -> None:
        try:
            trailing = await asyncio.wait_for(self._handshake(), self.server.handshake_timeout)
            if trailing is not None:
                await self._transmission(trailing)
        except asyncio.CancelledError:
            self.log.debug("connection closed by the server")
        except TimeoutError:
            self.log.info("handshake timed out")
        except TlsAuthzDenied as e:
            # QEMU reports it with error_report, and its client sees the connection end
            # without a TLS close_notify (a premature termination, not a clean EOF)
            self.log.warning("option negotiation failed: %s", e)
            prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
            if not prog or prog.endswith(".py"):
                prog = "blockmirror"
            print(f"{prog}: option negotiation failed: {e}", file=sys.stderr, flush=True)
            self.writer.transport.abort()
        except NBDProtocolError as e:
            self.log.info("protocol error: %s", e)
        except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError) as e:
            self.log.info("connection lost: %s", e)
        except Exception:
            self.crashed = True
            self.log.exception("unexpected error serving an NBD client")
        finally:
            if self.export is not None:
                self.export.clients.discard(self)
            self.writer.close()
            # once the intake holds the transport, the writer's own protocol never hears of
            # the connection's end
            closed = self._intake.closed if self._intake is not None else self.writer.wait_closed()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(closed, 1)
            self.done.set()

    async def _handshake(self) -> bytes | None:
        srv = self.server
        hs = ServerHandshake(srv, tls_offered=srv.tls is not None, tls_required=srv.tls is not None)
        while True:
            event = hs.next_event()
            out = hs.data_to_send()
            if out:
                if self.writer.is_closing():
                    raise ConnectionResetError("Connection lost")
                self.writer.write(out)
                await self.writer.drain()
            if event is None:
                data = await self.reader.read(65536)
                if not data:
                    return None
                hs.receive_data(data)
            elif isinstance(event, StartTLS):
                assert srv.tls is not None
                if cleartext_pending(self.reader):
                    raise NBDProtocolError("Unexpected data after NBD_OPT_STARTTLS")
                await self.writer.start_tls(srv.tls)
                self._check_authz()
                hs.tls_established()
            elif isinstance(event, Negotiated):
                exp = srv.export_by_name(event.export.name)
                if exp is None:
                    return None
                self.export = exp
                exp.clients.add(self)
                self.structured = event.structured
                self.contexts = event.contexts
                return hs.trailing_data()
            elif isinstance(event, Aborted):
                self.log.debug("negotiation ended: %s", event.reason)
                return None

    def _check_authz(self) -> None:
        """cf. qcrypto_tls_session_check_certificate: with verify-peer, the certificate's
        DN must be allowed by the ``tls-authz`` object, else the handshake fails."""
        srv = self.server
        if srv.tls_authz is None or srv.tls is None or srv.tls.verify_mode != ssl.CERT_REQUIRED:
            return
        sslobj = self.writer.get_extra_info("ssl_object")
        der = sslobj.getpeercert(binary_form=True) if sslobj is not None else None
        if not der:
            raise TlsAuthzDenied("No certificate peers")
        dn = peer_dn(der)
        try:
            allowed = is_allowed_by_id(srv.graph.objects, srv.tls_authz, dn)
        except BlockMirrorError as e:
            raise TlsAuthzDenied(str(e)) from e
        if not allowed:
            raise TlsAuthzDenied(f"TLS x509 authz check for {dn} is denied")

    async def _transmission(self, trailing: bytes) -> None:
        """Serve requests until the client disconnects; up to MAX_IN_FLIGHT run at once."""
        dec = RequestDecoder()
        dec.receive_data(trailing)
        leftover = take_buffered(self.reader)
        intake = RequestIntake(self.writer.transport, dec, self._admit)
        self._intake = intake
        intake.start(leftover, self.reader.at_eof())
        try:
            await intake.ended
            # the requests in flight finish (or fail) before the connection ends
            while self._inflight:
                await asyncio.wait(list(self._inflight))
        except asyncio.CancelledError:
            for t in self._inflight:
                t.cancel()
            await asyncio.gather(*self._inflight, return_exceptions=True)
            raise
        if self._failure is not None:
            raise self._failure
        if intake.error is not None:
            raise intake.error

    def _admit(self, req: Request | BadRequest) -> None:
        """The intake's callback: start serving ``req``, or end the connection."""
        intake = self._intake
        assert intake is not None
        if isinstance(req, BadRequest):
            # its payload was not read: answer, then stop following the stream
            intake.finish()
            self._spawn(self._refuse(req))
            return
        if req.type == Cmd.DISC:
            intake.finish()
            return
        held = len(req.data)
        if held and not self._payload_fits(held):
            # stop reading until the payloads in flight fit the budget (bounded memory)
            self._waiting = req
            intake.hold()
            return
        self._start(req, held)

    def _start(self, req: Request, held: int) -> None:
        self._payload_bytes += held
        self._spawn(self._serve(req, held))
        if len(self._inflight) >= MAX_IN_FLIGHT:
            assert self._intake is not None
            self._intake.hold()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._inflight.add(task)

    def _forget_current(self) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._inflight.discard(task)

    async def _refuse(self, req: BadRequest) -> None:
        try:
            await self._send_error(req.cookie, req.errno, req.message)
        except (ConnectionError, ssl.SSLError) as e:
            self.log.info("connection lost while replying: %s", e)
        finally:
            self._forget_current()

    def _payload_fits(self, n: int) -> bool:
        return self._payload_bytes == 0 or self._payload_bytes + n <= MAX_IN_FLIGHT_BYTES

    async def _serve(self, req: Request, held: int) -> None:
        try:
            try:
                await self._dispatch(req)
            except BlockIOError as e:
                await self._send_error(req.cookie, e.errno, str(e))
            except BlockMirrorError as e:
                await self._send_error(req.cookie, errno.EIO, str(e))
        except (ConnectionError, ssl.SSLError) as e:
            # the transport is gone: end the whole connection, not just this request
            self.log.info("connection lost while replying: %s", e)
            self.close()
        except Exception as e:
            # a bug of ours: end the connection and report it (run() logs it)
            if self._failure is None:
                self._failure = e
            if self._intake is not None:
                self._intake.finish()
        finally:
            self._forget_current()
            self._payload_bytes -= held
            self._after_request()

    def _after_request(self) -> None:
        intake = self._intake
        if intake is None:
            return
        waiting = self._waiting
        if waiting is not None:
            if not self._payload_fits(len(waiting.data)):
                return
            self._waiting = None
            self._start(waiting, len(waiting.data))
        if len(self._inflight) < MAX_IN_FLIGHT and self._waiting is None:
            intake.release()

    async def _dispatch(self, req: Request) -> None:
        exp = self.export
        assert exp is not None
        node = exp.node  # resolved per request: follows a mirror pivot
        bad = validate_request(req, node.length(), exp.flags, structured=self.structured,
                               contexts=self.contexts)
        if bad is not None:
            await self._send_error(req.cookie, bad[0], bad[1])
            return
        cmd, off, n = req.type, req.offset, req.length
        if cmd == Cmd.READ:
            await self._read(node, req)
            return
        if cmd == Cmd.WRITE:
            await node.write(off, req.data, fua=bool(req.flags & _FUA))
            await self._send(encode_simple_reply(req.cookie, 0))
            return
        flags = CmdFlag(req.flags)
        if cmd == Cmd.WRITE_ZEROES:
            await node.write_zeroes(off, n, may_unmap=not flags & CmdFlag.NO_HOLE,
                                    fua=bool(flags & CmdFlag.FUA),
                                    no_fallback=bool(flags & CmdFlag.FAST_ZERO))
        elif cmd == Cmd.TRIM:
            await node.discard(off, n)
            if flags & CmdFlag.FUA:
                await node.flush()
        elif cmd == Cmd.FLUSH:
            await node.flush()
        elif cmd == Cmd.CACHE:
            pass  # a hint; our drivers have no read-ahead to warm
        elif cmd == Cmd.BLOCK_STATUS:
            await self._block_status(node, req)
            return
        await self._send(encode_simple_reply(req.cookie, 0))

    async def _read(self, node: BlockNode, req: Request) -> None:
        if req.length == 0:
            # nothing to send, but a structured client still gets a structured answer
            await self._send(encode_none_chunk(req.cookie) if self.structured
                             else encode_simple_reply(req.cookie, 0))
            return
        if not self.structured:
            data = await node.read(req.offset, req.length)
            await self._send(encode_simple_reply(req.cookie, 0), data)
            return
        # structured: zero ranges travel as holes unless the client forbids fragmenting (DF)
        pieces: list[tuple[int, int, bytes | None]] = []
        if req.flags & CmdFlag.DF:
            pieces.append((req.offset, req.length, await node.read(req.offset, req.length)))
        else:
            off, end = req.offset, req.offset + req.length
            while off < end:
                ext = await block_status_above(node, None, off, end - off)
                n = min(ext.length, end - off)
                if ext.status & BlockStatus.ZERO:
                    pieces.append((off, n, None))
                elif pieces and pieces[-1][2] is not None:
                    prev_off, prev_n, _ = pieces[-1]
                    pieces[-1] = (prev_off, prev_n + n, b"")
                else:
                    pieces.append((off, n, b""))
                off += n
            pieces = [(o, n, await node.read(o, n) if d is not None else None)
                      for o, n, d in pieces]
        parts: list[bytes] = []
        for i, (o, n, payload) in enumerate(pieces):
            done = i == len(pieces) - 1
            if payload is None:
                parts.append(encode_offset_hole(req.cookie, o, n, done=done))
            else:
                parts.append(encode_chunk_header(req.cookie, ReplyType.OFFSET_DATA, 8 + n,
                                                 done=done))
                parts.append(o.to_bytes(8, "big"))
                parts.append(payload)
        await self._send(*parts)

    async def _block_status(self, node: BlockNode, req: Request) -> None:
        extents: list[tuple[int, int]] = []
        off, end = req.offset, req.offset + req.length
        while off < end and len(extents) < MAX_EXTENTS:
            ext = await block_status_above(node, None, off, end - off)
            n = min(ext.length, end - off)
            flags = (0 if ext.status & BlockStatus.DATA else StateFlag.HOLE) | (
                StateFlag.ZERO if ext.status & BlockStatus.ZERO else 0)
            if extents and extents[-1][1] == flags:
                extents[-1] = (extents[-1][0] + n, flags)
            else:
                if req.flags & CmdFlag.REQ_ONE and extents:
                    break
                extents.append((n, int(flags)))
            off += n
        ids = sorted(self.contexts)
        replies = []
        for i, cid in enumerate(ids):
            per_context = extents
            if cid != NBD_META_ID_BASE_ALLOCATION:
                per_context = await self._qemu_context_extents(node, cid, req)
            replies.append(encode_block_status(req.cookie, cid, per_context,
                                               done=i == len(ids) - 1))
        await self._send(*replies)

    async def _qemu_context_extents(self, node: BlockNode, context_id: int,
                                    req: Request) -> list[tuple[int, int]]:
        """Extents of qemu:allocation-depth or qemu:dirty-bitmap:NAME (export/nbd_meta.py)."""
        limit = 1 if req.flags & CmdFlag.REQ_ONE else MAX_CONTEXT_EXTENTS
        if context_id == NBD_META_ID_ALLOCATION_DEPTH:
            return await allocation_depth_extents(node, req.offset, req.length, limit)
        assert self.export is not None
        named = self.export.bitmaps[context_id - NBD_META_ID_DIRTY_BITMAP]
        return bitmap_extents(named, req.offset, req.length, limit)

    async def _send_error(self, cookie: int, err: int, message: str) -> None:
        wire = errno_to_wire(err)
        self.log.debug("request 0x%x failed: %s", cookie, message)
        if self.structured:
            await self._send(encode_error_chunk(cookie, wire, message))
        else:
            await self._send(encode_simple_reply(cookie, wire))

    async def _send(self, *parts: bytes) -> None:
        """Send one reply. Its parts are written with no await between them, so replies of
        requests running at once never interleave; then wait while the socket is backed up."""
        transport = self.writer.transport
        if transport.is_closing():
            raise ConnectionResetError("Connection lost")
        for p in parts:
            transport.write(p)
        intake = self._intake
        if intake is None:
            await self.writer.drain()
        elif intake.must_drain:  # the usual case needs no coroutine
            await intake.drain()


def _is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


__all__ = ["NbdExport", "NbdServer"]
