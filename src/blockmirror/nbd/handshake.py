"""Sans-IO fixed-newstyle NBD handshake: the server role, and what both roles share.

The client role is in ``handshake_client.py``. Both roles follow the h11 pattern:
``receive_data(bytes)`` buffers what the transport read, ``next_event()`` advances the state
machine and returns an event or ``None`` (needs more data), ``data_to_send()`` drains the bytes
to write. Neither role owns a socket, a task or a clock: the asyncio shells
(export/nbd_server.py, block/drivers/nbd.py) do the I/O, the TLS upgrade when a ``StartTLS``
event asks for it, and the timeouts.

Theory of operation: the states carry libnbd's names (NEWSTYLE.OPT_GO.SEND, ...). Each role has
a ``TRANSITIONS`` table and a single ``_set_state`` that refuses any move not in the table (a bug
of ours, hence ``InternalError``). A peer that breaks the protocol gets ``NBDProtocolError``;
per-option errors the protocol allows for are answered with NBD_REP_ERR_* and negotiation
continues, as QEMU's nbd/server.c does.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Protocol

from blockmirror.errors import InternalError
from blockmirror.nbd.constants import (
    ALLOCATION_DEPTH,
    BASE_ALLOCATION,
    DIRTY_BITMAP_PREFIX,
    NBD_INIT_MAGIC,
    NBD_MAX_BUFFER_SIZE,
    NBD_MAX_OPTION_SIZE,
    NBD_MAX_STRING_SIZE,
    NBD_META_ID_ALLOCATION_DEPTH,
    NBD_META_ID_BASE_ALLOCATION,
    NBD_META_ID_DIRTY_BITMAP,
    NBD_OPTS_MAGIC,
    NBD_PREFERRED_BLOCK_SIZE,
    NBD_REP_MAGIC,
    ClientFlag,
    HandshakeFlag,
    Info,
    Opt,
    Rep,
    TransmissionFlag,
    opt_name,
)
from blockmirror.nbd.wire import NBDProtocolError, SansIOEndpoint

#: a client option header: magic, option, length
OPT_HEADER = struct.Struct(">QII")
#: an option reply header: magic, option, reply type, length
REP_HEADER = struct.Struct(">QIII")


# --- what the server knows about its exports ------------------------------------------------


@dataclass(frozen=True, slots=True)
class ExportInfo:
    """One export as the handshake advertises it."""

    name: str
    size: int
    flags: TransmissionFlag
    description: str = ""
    min_block: int = 1
    pref_block: int = NBD_PREFERRED_BLOCK_SIZE
    max_block: int = NBD_MAX_BUFFER_SIZE
    #: the export serves qemu:allocation-depth (block-export-add allocation-depth=true)
    allocation_depth: bool = False
    #: names of the bitmaps it serves as qemu:dirty-bitmap:NAME, in id order
    bitmaps: tuple[str, ...] = ()


class ExportCatalog(Protocol):
    """The server shell's view of its exports, queried during negotiation."""

    def find_export(self, name: str) -> ExportInfo | None: ...

    def list_exports(self) -> list[ExportInfo]: ...


# --- events -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StartTLS:
    """The shell must now wrap the connection in TLS, then call ``tls_established()``."""


@dataclass(frozen=True, slots=True)
class Negotiated:
    """The handshake is over; transmission starts (server and client roles)."""

    export: ExportInfo
    structured: bool
    #: selected meta contexts: context id -> name
    contexts: dict[int, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ExportList:
    """The client's answer in list mode: the exports the server advertised."""

    exports: list[tuple[str, str]]


@dataclass(frozen=True, slots=True)
class Aborted:
    """The negotiation ended without transmission (NBD_OPT_ABORT, unknown EXPORT_NAME)."""

    reason: str


HandshakeEvent = StartTLS | Negotiated | ExportList | Aborted


# --- server role -----------------------------------------------------------------------------

_SERVED_OPTS = frozenset(int(o) for o in Opt if o != Opt.PEEK_EXPORT)

S_RECV_CFLAGS = "NEWSTYLE.RECV_CFLAGS"
S_RECV_OPT = "NEWSTYLE.RECV_OPT"
S_DROP_OPT = "NEWSTYLE.DROP_OPT"
S_STARTTLS_WAIT = "NEWSTYLE.OPT_STARTTLS.WAIT"
S_READY = "READY"
S_DEAD = "DEAD"

SERVER_TRANSITIONS: dict[str, frozenset[str]] = {
    S_RECV_CFLAGS: frozenset({S_RECV_OPT, S_DEAD}),
    S_RECV_OPT: frozenset({S_RECV_OPT, S_DROP_OPT, S_STARTTLS_WAIT, S_READY, S_DEAD}),
    S_DROP_OPT: frozenset({S_RECV_OPT, S_DEAD}),
    S_STARTTLS_WAIT: frozenset({S_RECV_OPT, S_DEAD}),
    S_READY: frozenset({S_DEAD}),
    S_DEAD: frozenset(),
}


class ServerHandshake(SansIOEndpoint):
    """The server side of the fixed newstyle negotiation (cf. nbd_negotiate_options).

    Args:
        catalog: looks exports up by name.
        tls_offered: STARTTLS may be negotiated (the server has TLS credentials).
        tls_required: every option but STARTTLS and ABORT is refused until TLS is up.
    """

    def __init__(
        self, catalog: ExportCatalog, *, tls_offered: bool = False, tls_required: bool = False
    ) -> None:
        self.catalog = catalog
        self.tls_offered = tls_offered or tls_required
        self.tls_required = tls_required
        self.tls_active = False
        self.state = S_RECV_CFLAGS
        self.no_zeroes = False
        self.fixed = True
        self.structured = False
        self._meta_export: str | None = None
        self._contexts: dict[int, str] = {}
        super().__init__()
        self._drop_remaining = 0
        self._drop_reply: tuple[int, Rep, str] | None = None
        flags = HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES
        self._tx += struct.pack(">QQH", NBD_INIT_MAGIC, NBD_OPTS_MAGIC, flags)

    # --- the sans-IO surface ------------------------------------------------------------

    def tls_established(self) -> None:
        if self.state != S_STARTTLS_WAIT:
            raise InternalError(f"tls_established() in state {self.state}")
        self.tls_active = True
        # STARTTLS resets what was negotiated in clear text (proto.md, "STARTTLS")
        self.structured = False
        self._contexts = {}
        self._meta_export = None
        self._set_state(S_RECV_OPT)

    def next_event(self) -> HandshakeEvent | None:
        """Advance as far as the buffered bytes allow.

        Raises:
            NBDProtocolError: the client broke the protocol; close the connection.
        """
        while True:
            if self.state == S_RECV_CFLAGS:
                raw = self._rx.take(4)
                if raw is None:
                    return None
                (cflags,) = struct.unpack(">I", raw)
                known = int(ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES)
                if cflags & ~known:
                    self._set_state(S_DEAD)
                    raise NBDProtocolError(f"Unknown client flags 0x{cflags & ~known:x} received")
                self.fixed = bool(cflags & ClientFlag.FIXED_NEWSTYLE)
                self.no_zeroes = bool(cflags & ClientFlag.NO_ZEROES)
                self._set_state(S_RECV_OPT)
            elif self.state == S_DROP_OPT:
                self._drop_remaining -= self._rx.skip(self._drop_remaining)
                if self._drop_remaining:
                    return None
                assert self._drop_reply is not None
                opt, rep, msg = self._drop_reply
                self._drop_reply = None
                self._reply(opt, rep, msg.encode())
                self._set_state(S_RECV_OPT)
            elif self.state == S_RECV_OPT:
                hdr = self._rx.peek(OPT_HEADER.size)
                if hdr is None:
                    return None
                magic, opt, length = OPT_HEADER.unpack(hdr)
                if magic != NBD_OPTS_MAGIC:
                    self._set_state(S_DEAD)
                    raise NBDProtocolError("Bad magic received")
                refusal = self._refusal(opt, length)
                if refusal is not None:
                    self._rx.skip(OPT_HEADER.size)
                    self._drop_remaining = length
                    self._drop_reply = (opt, refusal[0], refusal[1])
                    self._set_state(S_DROP_OPT)
                    continue
                if len(self._rx) < OPT_HEADER.size + length:
                    return None
                self._rx.skip(OPT_HEADER.size)
                payload = self._rx.take(length)
                assert payload is not None
                event = self._handle_option(opt, payload)
                if event is not None:
                    return event
            else:
                return None

    # --- options --------------------------------------------------------------------------

    def _refusal(self, opt: int, length: int) -> tuple[Rep, str] | None:
        """Options answered without looking at their payload, which is then dropped."""
        if opt in (Opt.EXPORT_NAME, Opt.ABORT):
            if length > NBD_MAX_STRING_SIZE + 4:
                self._set_state(S_DEAD)
                raise NBDProtocolError(f"Bad length received for {opt_name(opt)}")
            return None
        if self.tls_required and not self.tls_active and opt != Opt.STARTTLS:
            return Rep.ERR_TLS_REQD, f"Option 0x{opt:x} not permitted before TLS"
        if length > NBD_MAX_OPTION_SIZE:
            return Rep.ERR_TOO_BIG, f"option '{opt_name(opt)}' length {length} is too large"
        if opt not in _SERVED_OPTS:
            return Rep.ERR_UNSUP, f"Unsupported option {opt} ({opt_name(opt)})"
        return None

    def _handle_option(self, opt: int, payload: bytes) -> HandshakeEvent | None:
        if opt == Opt.ABORT:
            # best effort ACK, then the connection ends (proto.md, NBD_OPT_ABORT)
            self._reply(opt, Rep.ACK)
            self._set_state(S_DEAD)
            return Aborted("client sent NBD_OPT_ABORT")
        if opt == Opt.EXPORT_NAME:
            return self._opt_export_name(payload)
        if not self.fixed:
            # an unfixed newstyle client cannot parse option replies: hang up
            self._set_state(S_DEAD)
            raise NBDProtocolError(f"Unsupported option {opt_name(opt)} from an unfixed client")
        if opt == Opt.STARTTLS:
            return self._opt_starttls(payload)
        if opt == Opt.LIST:
            if payload:
                return self._invalid_reply(opt, "no payload expected in option NBD_OPT_LIST")
            for exp in self.catalog.list_exports():
                name = exp.name.encode()
                self._reply(opt, Rep.SERVER,
                            struct.pack(">I", len(name)) + name + exp.description.encode())
            self._reply(opt, Rep.ACK)
            return None
        if opt == Opt.STRUCTURED_REPLY:
            if payload:
                return self._invalid_reply(opt, "no payload expected in option "
                                          "NBD_OPT_STRUCTURED_REPLY")
            if self.structured:
                return self._invalid_reply(opt, "structured reply already negotiated")
            self.structured = True
            self._reply(opt, Rep.ACK)
            return None
        if opt in (Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT):
            return self._opt_meta_context(opt, payload)
        if opt in (Opt.INFO, Opt.GO):
            return self._opt_info_go(opt, payload)
        raise InternalError(f"option {opt} passed _refusal but has no handler")

    def _opt_export_name(self, payload: bytes) -> HandshakeEvent:
        name = payload.decode("utf-8", "replace")
        exp = self.catalog.find_export(name)
        if exp is None or (self.tls_required and not self.tls_active):
            # this option has no error reply: the only answer is to hang up
            self._set_state(S_DEAD)
            return Aborted(f"export '{name}' not present" if exp is None else
                           "Option 0x1 not permitted before TLS")
        tail = b"" if self.no_zeroes else bytes(124)
        self._tx += struct.pack(">QH", exp.size, exp.flags) + tail
        self._set_state(S_READY)
        return Negotiated(exp, self.structured, self._selected_for(exp.name))

    def _opt_starttls(self, payload: bytes) -> HandshakeEvent | None:
        if payload:
            return self._invalid_reply(Opt.STARTTLS,
                                       "no payload expected in option NBD_OPT_STARTTLS")
        if self.tls_active:
            return self._invalid_reply(Opt.STARTTLS, "TLS already enabled")
        if not self.tls_offered:
            self._reply(Opt.STARTTLS, Rep.ERR_POLICY, b"TLS not configured")
            return None
        if len(self._rx):
            # bytes sent in clear text after STARTTLS would be taken as protected: refuse them
            self._set_state(S_DEAD)
            raise NBDProtocolError("Unexpected data after NBD_OPT_STARTTLS")
        self._reply(Opt.STARTTLS, Rep.ACK)
        self._set_state(S_STARTTLS_WAIT)
        return StartTLS()

    def _opt_info_go(self, opt: int, payload: bytes) -> HandshakeEvent | None:
        if len(payload) < 6:
            return self._invalid_reply(opt, f"Malformed option {opt_name(opt)}")
        (name_len,) = struct.unpack_from(">I", payload)
        if name_len > NBD_MAX_STRING_SIZE or 4 + name_len + 2 > len(payload):
            return self._invalid_reply(opt, f"Malformed option {opt_name(opt)}")
        name = payload[4 : 4 + name_len].decode("utf-8", "replace")
        (nreq,) = struct.unpack_from(">H", payload, 4 + name_len)
        if len(payload) != 4 + name_len + 2 + 2 * nreq:
            return self._invalid_reply(opt, f"Malformed option {opt_name(opt)}")
        requests = struct.unpack_from(f">{nreq}H", payload, 4 + name_len + 2)
        exp = self.catalog.find_export(name)
        if exp is None:
            self._reply(opt, Rep.ERR_UNKNOWN, f"export '{name}' not present".encode())
            return None
        if Info.NAME in requests:
            raw = exp.name.encode()
            self._reply(opt, Rep.INFO, struct.pack(">H", Info.NAME) + raw)
        if Info.DESCRIPTION in requests and exp.description:
            raw = exp.description.encode()
            self._reply(opt, Rep.INFO, struct.pack(">H", Info.DESCRIPTION) + raw)
        # QEMU always advertises block sizes, asked or not; a client that did not ask cannot be
        # expected to honour a minimum, so GO then promises 1 (the server pads unaligned
        # requests itself; cf. nbd_negotiate_handle_info)
        asked = opt == Opt.INFO or Info.BLOCK_SIZE in requests
        min_block = exp.min_block if asked else 1
        self._reply(opt, Rep.INFO, struct.pack(">HIII", Info.BLOCK_SIZE, min_block,
                                               max(min_block, exp.pref_block), exp.max_block))
        self._reply(opt, Rep.INFO, struct.pack(">HQH", Info.EXPORT, exp.size, exp.flags))
        if opt == Opt.INFO:
            self._reply(opt, Rep.ACK)
            return None
        self._reply(opt, Rep.ACK)
        self._set_state(S_READY)
        return Negotiated(exp, self.structured, self._selected_for(exp.name))

    def _opt_meta_context(self, opt: int, payload: bytes) -> HandshakeEvent | None:
        if not self.structured:
            return self._invalid_reply(opt, f"request option '{opt_name(opt)}' when structured "
                                      "reply is not negotiated")
        try:
            name, queries = _parse_meta_payload(payload)
        except ValueError:
            return self._invalid_reply(opt, f"Malformed option {opt_name(opt)}")
        exp = self.catalog.find_export(name)
        if exp is None:
            self._reply(opt, Rep.ERR_UNKNOWN, f"export '{name}' not present".encode())
            return None
        listing = opt == Opt.LIST_META_CONTEXT
        selected = _select_contexts(exp, queries, listing)
        for context_id, context in sorted(selected.items()):
            # a LIST reply carries no meaningful id: QEMU sends 0
            self._reply(opt, Rep.META_CONTEXT,
                        struct.pack(">I", 0 if listing else context_id) + context.encode())
        if opt == Opt.SET_META_CONTEXT:
            self._meta_export = name
            self._contexts = selected
        self._reply(opt, Rep.ACK)
        return None

    def _selected_for(self, name: str) -> dict[int, str]:
        # contexts chosen for another export do not carry over (cf. QEMU's contexts.exp)
        return dict(self._contexts) if self._meta_export == name else {}

    # --- helpers --------------------------------------------------------------------------

    def _invalid_reply(self, opt: int, msg: str) -> HandshakeEvent | None:
        """Answer NBD_REP_ERR_INVALID; negotiation goes on (hence no event)."""
        self._reply(opt, Rep.ERR_INVALID, msg.encode())
        return None

    def _reply(self, opt: int, rep: Rep, data: bytes = b"") -> None:
        self._tx += REP_HEADER.pack(NBD_REP_MAGIC, opt, rep, len(data)) + data

    def _set_state(self, new: str) -> None:
        if new not in SERVER_TRANSITIONS[self.state]:
            raise InternalError(f"NBD server handshake: {self.state} -> {new} is not allowed")
        self.state = new


def _select_contexts(exp: ExportInfo, queries: list[str], listing: bool) -> dict[int, str]:
    """The contexts ``queries`` select on ``exp`` (cf. nbd_negotiate_meta_queries): by id.

    base:allocation, then qemu:allocation-depth (if the export has it), then one
    qemu:dirty-bitmap:NAME per exported bitmap. A LIST without queries, or a LIST of a bare
    namespace ("base:", "qemu:", "qemu:dirty-bitmap:"), selects all of what it names.
    Unknown namespaces and names select nothing.
    """
    base = depth = False
    bitmaps: set[int] = set()
    if listing and not queries:
        base, depth, bitmaps = True, exp.allocation_depth, set(range(len(exp.bitmaps)))
    for query in queries:
        if query.startswith("base:"):
            rest = query[len("base:"):]
            if rest == "allocation" or (listing and not rest):
                base = True
        elif query.startswith("qemu:"):
            rest = query[len("qemu:"):]
            if not rest:
                if listing:
                    depth = depth or exp.allocation_depth
                    bitmaps.update(range(len(exp.bitmaps)))
            elif rest == "allocation-depth":
                depth = depth or exp.allocation_depth
            elif rest.startswith("dirty-bitmap:"):
                wanted = rest[len("dirty-bitmap:"):]
                if not wanted:
                    if listing:
                        bitmaps.update(range(len(exp.bitmaps)))
                elif wanted in exp.bitmaps:
                    bitmaps.add(exp.bitmaps.index(wanted))
    selected: dict[int, str] = {}
    if base:
        selected[NBD_META_ID_BASE_ALLOCATION] = BASE_ALLOCATION
    if depth:
        selected[NBD_META_ID_ALLOCATION_DEPTH] = ALLOCATION_DEPTH
    for index in sorted(bitmaps):
        selected[NBD_META_ID_DIRTY_BITMAP + index] = DIRTY_BITMAP_PREFIX + exp.bitmaps[index]
    return selected


def _parse_meta_payload(payload: bytes) -> tuple[str, list[str]]:
    """export name + queries of NBD_OPT_{LIST,SET}_META_CONTEXT; ValueError when malformed."""
    if len(payload) < 8:
        raise ValueError("short")
    (nlen,) = struct.unpack_from(">I", payload)
    if nlen > NBD_MAX_STRING_SIZE or 4 + nlen + 4 > len(payload):
        raise ValueError("name")
    name = payload[4 : 4 + nlen].decode("utf-8", "replace")
    pos = 4 + nlen
    (count,) = struct.unpack_from(">I", payload, pos)
    pos += 4
    queries = []
    for _ in range(count):
        if pos + 4 > len(payload):
            raise ValueError("query header")
        (qlen,) = struct.unpack_from(">I", payload, pos)
        pos += 4
        if qlen > NBD_MAX_STRING_SIZE or pos + qlen > len(payload):
            raise ValueError("query")
        queries.append(payload[pos : pos + qlen].decode("utf-8", "replace"))
        pos += qlen
    if pos != len(payload):
        raise ValueError("trailing")
    return name, queries


def meta_payload(export: str, queries: list[str]) -> bytes:
    raw = export.encode()
    out = struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(queries))
    for q in queries:
        qb = q.encode()
        out += struct.pack(">I", len(qb)) + qb
    return out
