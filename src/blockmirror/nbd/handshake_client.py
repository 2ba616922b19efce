"""Sans-IO fixed-newstyle NBD handshake, client role (cf. nbd_receive_negotiate, libnbd).

Same surface as the server role in ``handshake.py`` (``receive_data`` / ``next_event`` /
``data_to_send``); used by the nbd block driver and by tests. The client sends its options in a
fixed order (STARTTLS, then LIST or STRUCTURED_REPLY, SET_META_CONTEXT, GO, with a fallback to
EXPORT_NAME for servers without GO); ``CLIENT_TRANSITIONS`` lists every allowed move. No I/O.
"""

from __future__ import annotations

import struct
from typing import NoReturn

from blockmirror.errors import InternalError
from blockmirror.nbd.constants import (
    BASE_ALLOCATION,
    NBD_INIT_MAGIC,
    NBD_MAX_BUFFER_SIZE,
    NBD_MAX_OPTION_SIZE,
    NBD_OPTS_MAGIC,
    NBD_PREFERRED_BLOCK_SIZE,
    NBD_REP_ERR_BIT,
    NBD_REP_MAGIC,
    ClientFlag,
    HandshakeFlag,
    Info,
    Opt,
    Rep,
    TransmissionFlag,
)
from blockmirror.nbd.handshake import (
    OPT_HEADER,
    REP_HEADER,
    ExportInfo,
    ExportList,
    HandshakeEvent,
    Negotiated,
    StartTLS,
    meta_payload,
)
from blockmirror.nbd.wire import NBDProtocolError, SansIOEndpoint

# --- client role -----------------------------------------------------------------------------

C_RECV_GREETING = "NEWSTYLE.RECV_GREETING"
C_STARTTLS_SEND = "NEWSTYLE.OPT_STARTTLS.SEND"
C_STARTTLS_RECV = "NEWSTYLE.OPT_STARTTLS.RECV_REPLY"
C_STARTTLS_WAIT = "NEWSTYLE.OPT_STARTTLS.HANDSHAKE"
C_LIST_SEND = "NEWSTYLE.OPT_LIST.SEND"
C_LIST_RECV = "NEWSTYLE.OPT_LIST.RECV_REPLY"
C_SR_SEND = "NEWSTYLE.OPT_STRUCTURED_REPLY.SEND"
C_SR_RECV = "NEWSTYLE.OPT_STRUCTURED_REPLY.RECV_REPLY"
C_META_SEND = "NEWSTYLE.OPT_SET_META_CONTEXT.SEND"
C_META_RECV = "NEWSTYLE.OPT_SET_META_CONTEXT.RECV_REPLY"
C_GO_SEND = "NEWSTYLE.OPT_GO.SEND"
C_GO_RECV = "NEWSTYLE.OPT_GO.RECV_REPLY"
C_EXPORT_NAME_SEND = "NEWSTYLE.OPT_EXPORT_NAME.SEND"
C_EXPORT_NAME_RECV = "NEWSTYLE.OPT_EXPORT_NAME.RECV_REPLY"
C_READY = "READY"
C_DEAD = "DEAD"

# every state that ends one option may start the next one, in this fixed order
_AFTER_TLS = frozenset({C_LIST_SEND, C_SR_SEND, C_GO_SEND})
_AFTER_SR = frozenset({C_META_SEND, C_GO_SEND})

CLIENT_TRANSITIONS: dict[str, frozenset[str]] = {
    C_RECV_GREETING: frozenset({C_STARTTLS_SEND, C_DEAD}) | _AFTER_TLS,
    C_STARTTLS_SEND: frozenset({C_STARTTLS_RECV}),
    C_STARTTLS_RECV: frozenset({C_STARTTLS_WAIT, C_DEAD}),
    C_STARTTLS_WAIT: _AFTER_TLS | {C_DEAD},
    C_LIST_SEND: frozenset({C_LIST_RECV}),
    C_LIST_RECV: frozenset({C_LIST_RECV, C_DEAD}),
    C_SR_SEND: frozenset({C_SR_RECV}),
    C_SR_RECV: _AFTER_SR | {C_DEAD},
    C_META_SEND: frozenset({C_META_RECV}),
    C_META_RECV: frozenset({C_META_RECV, C_GO_SEND, C_DEAD}),
    C_GO_SEND: frozenset({C_GO_RECV}),
    C_GO_RECV: frozenset({C_GO_RECV, C_EXPORT_NAME_SEND, C_READY, C_DEAD}),
    C_EXPORT_NAME_SEND: frozenset({C_EXPORT_NAME_RECV}),
    C_EXPORT_NAME_RECV: frozenset({C_READY, C_DEAD}),
    C_READY: frozenset({C_DEAD}),
    C_DEAD: frozenset(),
}


#: option names as QEMU's nbd_opt_lookup spells them in messages
_OPT_WORDS: dict[int, str] = {
    Opt.EXPORT_NAME: "export name", Opt.ABORT: "abort", Opt.LIST: "list",
    Opt.PEEK_EXPORT: "peek export", Opt.STARTTLS: "starttls", Opt.INFO: "info", Opt.GO: "go",
    Opt.STRUCTURED_REPLY: "structured reply", Opt.LIST_META_CONTEXT: "list meta context",
    Opt.SET_META_CONTEXT: "set meta context",
}


class ClientHandshake(SansIOEndpoint):
    """The client side (cf. nbd_receive_negotiate / libnbd's NEWSTYLE states).

    Args:
        export: the export name to open.
        tls: negotiate STARTTLS first (and fail if the server refuses it).
        structured: ask for structured replies.
        meta_contexts: contexts to select (only with structured replies).
        list_exports: list the exports, then abort (nbdinfo --list); ends with ``ExportList``.
    """

    def __init__(
        self,
        export: str = "",
        *,
        tls: bool = False,
        structured: bool = True,
        meta_contexts: tuple[str, ...] = (BASE_ALLOCATION,),
        list_exports: bool = False,
    ) -> None:
        self.export = export
        self.tls = tls
        self.want_structured = structured
        self.want_contexts = meta_contexts
        self.list_mode = list_exports
        self.state = C_RECV_GREETING
        self.structured = False
        self.no_zeroes = False
        self.contexts: dict[int, str] = {}
        super().__init__()
        self._listed: list[tuple[str, str]] = []
        self._size: int | None = None
        self._flags = TransmissionFlag(0)
        self._blocks = (1, NBD_PREFERRED_BLOCK_SIZE, NBD_MAX_BUFFER_SIZE)
        self._server_name = export
        self._description = ""

    def tls_established(self) -> None:
        if self.state != C_STARTTLS_WAIT:
            raise InternalError(f"tls_established() in state {self.state}")
        self._after_tls()

    def next_event(self) -> HandshakeEvent | None:
        """Advance as far as the buffered bytes allow.

        Raises:
            NBDProtocolError: the server broke the protocol or refused what we need.
        """
        while True:
            if self.state == C_RECV_GREETING:
                raw = self._rx.take(18)
                if raw is None:
                    return None
                magic, opts_magic, gflags = struct.unpack(">QQH", raw)
                if magic != NBD_INIT_MAGIC:
                    self._fail("Bad server magic received")
                if opts_magic != NBD_OPTS_MAGIC:
                    self._fail("Server does not support the fixed newstyle protocol")
                if not gflags & HandshakeFlag.FIXED_NEWSTYLE:
                    self._fail("Server does not support the fixed newstyle protocol")
                self.no_zeroes = bool(gflags & HandshakeFlag.NO_ZEROES)
                cflags = ClientFlag.FIXED_NEWSTYLE
                if self.no_zeroes:
                    cflags |= ClientFlag.NO_ZEROES
                self._tx += struct.pack(">I", cflags)
                if self.tls:
                    self._send_option(C_STARTTLS_SEND, C_STARTTLS_RECV, Opt.STARTTLS, b"")
                else:
                    self._after_tls()
            elif self.state == C_EXPORT_NAME_RECV:
                need = 10 if self.no_zeroes else 134
                raw = self._rx.take(need)
                if raw is None:
                    return None
                self._size, flags = struct.unpack_from(">QH", raw)
                self._flags = TransmissionFlag(flags)
                return self._ready()
            elif self.state in (C_STARTTLS_RECV, C_LIST_RECV, C_SR_RECV, C_META_RECV,
                                C_GO_RECV):
                reply = self._take_reply()
                if reply is None:
                    return None
                event = self._on_reply(*reply)
                if event is not None:
                    return event
            else:
                return None

    # --- replies --------------------------------------------------------------------------

    def _take_reply(self) -> tuple[int, int, bytes] | None:
        hdr = self._rx.peek(REP_HEADER.size)
        if hdr is None:
            return None
        magic, opt, rep, length = REP_HEADER.unpack(hdr)
        if magic != NBD_REP_MAGIC:
            self._fail("Unexpected option reply magic")
        if length > NBD_MAX_OPTION_SIZE:
            self._fail(f"Option reply length {length} is too large")
        if len(self._rx) < REP_HEADER.size + length:
            return None
        self._rx.skip(REP_HEADER.size)
        payload = self._rx.take(length)
        assert payload is not None
        expected = {C_STARTTLS_RECV: Opt.STARTTLS, C_LIST_RECV: Opt.LIST,
                    C_SR_RECV: Opt.STRUCTURED_REPLY, C_META_RECV: Opt.SET_META_CONTEXT,
                    C_GO_RECV: Opt.GO}[self.state]
        if opt != expected:
            self._fail(f"Unexpected option type {opt} (expected {int(expected)})")
        return opt, rep, payload

    def _on_reply(self, opt: int, rep: int, payload: bytes) -> HandshakeEvent | None:
        msg = payload.decode("utf-8", "replace")
        if self.state == C_STARTTLS_RECV:
            if rep == Rep.ERR_POLICY or rep == Rep.ERR_UNSUP:
                self._fail("Server don't support STARTTLS option")
            if rep != Rep.ACK:
                self._refused(opt, rep, msg)
            if len(self._rx):
                # clear-text bytes after the ACK would be read as if protected: an injection
                self._fail("Unexpected data after the NBD_OPT_STARTTLS reply")
            self._set_state(C_STARTTLS_WAIT)
            return StartTLS()
        if self.state == C_LIST_RECV:
            if rep == Rep.SERVER:
                if len(payload) < 4:
                    self._fail("Malformed NBD_REP_SERVER reply")
                (nlen,) = struct.unpack_from(">I", payload)
                if 4 + nlen > len(payload):
                    self._fail("Malformed NBD_REP_SERVER reply")
                self._listed.append((payload[4 : 4 + nlen].decode("utf-8", "replace"),
                                     payload[4 + nlen :].decode("utf-8", "replace")))
                self._set_state(C_LIST_RECV)
                return None
            if rep != Rep.ACK:
                self._refused(opt, rep, msg)
            # we are done: tell the server politely (proto.md: ABORT may be unanswered)
            self._tx += OPT_HEADER.pack(NBD_OPTS_MAGIC, Opt.ABORT, 0)
            self._set_state(C_DEAD)
            return ExportList(list(self._listed))
        if self.state == C_SR_RECV:
            if rep not in (Rep.ACK, Rep.ERR_UNSUP):
                self._refused(opt, rep, msg)
            self.structured = rep == Rep.ACK
            if self.structured and self.want_contexts:
                self._send_option(C_META_SEND, C_META_RECV, Opt.SET_META_CONTEXT,
                                  meta_payload(self.export, list(self.want_contexts)))
            else:
                self._send_go()
            return None
        if self.state == C_META_RECV:
            if rep == Rep.META_CONTEXT:
                if len(payload) < 4:
                    self._fail("Malformed NBD_REP_META_CONTEXT reply")
                (cid,) = struct.unpack_from(">I", payload)
                name = payload[4:].decode("utf-8", "replace")
                if name not in self.want_contexts:
                    self._fail(f"Unexpected context name {name!r}")
                self.contexts[cid] = name
                self._set_state(C_META_RECV)
                return None
            if rep != Rep.ACK:
                self.contexts = {}  # an error just means: no contexts
            self._send_go()
            return None
        # C_GO_RECV
        if rep == Rep.INFO:
            self._on_info(payload)
            self._set_state(C_GO_RECV)
            return None
        if rep == Rep.ACK:
            if self._size is None:
                self._fail("Server did not send NBD_INFO_EXPORT")
            return self._ready()
        if rep == Rep.ERR_UNSUP:
            # an old server: fall back to NBD_OPT_EXPORT_NAME (no structured replies then)
            self.structured = False
            self.contexts = {}
            raw = self.export.encode()
            self._send_option(C_EXPORT_NAME_SEND, C_EXPORT_NAME_RECV, Opt.EXPORT_NAME, raw)
            return None
        self._refused(opt, rep, msg)

    def _on_info(self, payload: bytes) -> None:
        if len(payload) < 2:
            self._fail("Malformed NBD_REP_INFO reply")
        (kind,) = struct.unpack_from(">H", payload)
        if kind == Info.EXPORT:
            if len(payload) != 12:
                self._fail("Invalid length in NBD_INFO_EXPORT")
            self._size, flags = struct.unpack_from(">QH", payload, 2)
            self._flags = TransmissionFlag(flags)
        elif kind == Info.BLOCK_SIZE:
            if len(payload) != 14:
                self._fail("Invalid length in NBD_INFO_BLOCK_SIZE")
            mn, pref, mx = struct.unpack_from(">III", payload, 2)
            if mn == 0 or mn & (mn - 1) or mn > 65536:
                self._fail(f"server minimum block size {mn} is not a power of two")
            if pref < mn or pref & (pref - 1):
                self._fail(f"server preferred block size {pref} is not valid")
            if mx < pref:
                self._fail(f"server maximum block size {mx} is not valid")
            self._blocks = (mn, pref, mx)
        elif kind == Info.NAME:
            self._server_name = payload[2:].decode("utf-8", "replace")
        elif kind == Info.DESCRIPTION:
            self._description = payload[2:].decode("utf-8", "replace")
        # other info kinds are ignored, as the spec asks

    def _ready(self) -> Negotiated:
        assert self._size is not None
        mn, pref, mx = self._blocks
        exp = ExportInfo(self._server_name, self._size, self._flags, self._description,
                         mn, pref, mx)
        self._set_state(C_READY)
        return Negotiated(exp, self.structured, dict(self.contexts) if self.structured else {})

    def _refused(self, opt: int, rep: int, msg: str) -> NoReturn:
        """Fail with QEMU's text for an option error (cf. nbd_handle_reply_err)."""
        what = f"option {opt} ({_OPT_WORDS.get(opt, 'unknown')})"
        texts: dict[int, str] = {
            Rep.ERR_UNSUP: f"Unsupported {what}",
            Rep.ERR_POLICY: f"Denied by server for {what}",
            Rep.ERR_INVALID: f"Invalid parameters for {what}",
            Rep.ERR_PLATFORM: f"Server lacks support for {what}",
            Rep.ERR_TLS_REQD: f"TLS negotiation required before {what}",
            Rep.ERR_UNKNOWN: "Requested export not available",
            Rep.ERR_SHUTDOWN: f"Server shutting down before {what}",
            Rep.ERR_BLOCK_SIZE_REQD: f"Server requires INFO_BLOCK_SIZE for {what}",
        }
        if rep & NBD_REP_ERR_BIT:
            text = texts.get(rep, f"Unknown error code when asking for {what}")
        else:
            text = f"Unexpected reply type {rep} for {what}"
        self.state = C_DEAD
        err = NBDProtocolError(text)
        if msg:
            err.hint = f"server reported: {msg}"
        raise err

    # --- sending --------------------------------------------------------------------------

    def _after_tls(self) -> None:
        if self.list_mode:
            self._send_option(C_LIST_SEND, C_LIST_RECV, Opt.LIST, b"")
        elif self.want_structured:
            self._send_option(C_SR_SEND, C_SR_RECV, Opt.STRUCTURED_REPLY, b"")
        else:
            self._send_go()

    def _send_go(self) -> None:
        raw = self.export.encode()
        payload = struct.pack(">I", len(raw)) + raw + struct.pack(">HH", 1, Info.BLOCK_SIZE)
        self._send_option(C_GO_SEND, C_GO_RECV, Opt.GO, payload)

    def _send_option(self, send_state: str, recv_state: str, opt: Opt, payload: bytes) -> None:
        self._set_state(send_state)
        self._tx += OPT_HEADER.pack(NBD_OPTS_MAGIC, opt, len(payload)) + payload
        self._set_state(recv_state)

    def _fail(self, msg: str) -> NoReturn:
        self.state = C_DEAD
        raise NBDProtocolError(msg)

    def _set_state(self, new: str) -> None:
        if new not in CLIENT_TRANSITIONS[self.state]:
            raise InternalError(f"NBD client handshake: {self.state} -> {new} is not allowed")
        self.state = new
