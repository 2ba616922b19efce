"""The sans-IO NBD codec: handshake roles talking to each other in memory, and the
transmission encoders/decoders. No sockets, no event loop."""

from __future__ import annotations

import errno
import struct

import pytest

from blockmirror.nbd.constants import (
    NBD_INIT_MAGIC,
    NBD_OPTS_MAGIC,
    NBD_REP_MAGIC,
    Cmd,
    CmdFlag,
    Opt,
    Rep,
    ReplyType,
    TransmissionFlag,
    errno_to_wire,
    wire_to_errno,
)
from blockmirror.nbd.handshake import (
    SERVER_TRANSITIONS,
    Aborted,
    ExportInfo,
    ExportList,
    HandshakeEvent,
    Negotiated,
    ServerHandshake,
    StartTLS,
)
from blockmirror.nbd.handshake_client import CLIENT_TRANSITIONS, ClientHandshake
from blockmirror.nbd.transmission import (
    BadRequest,
    DataChunk,
    ErrorChunk,
    HoleChunk,
    ReplyDecoder,
    Request,
    RequestDecoder,
    SimpleReply,
    StatusChunk,
    encode_block_status,
    encode_chunk_header,
    encode_error_chunk,
    encode_offset_hole,
    encode_request,
    encode_simple_reply,
    validate_request,
)
from blockmirror.nbd.wire import NBDProtocolError

RW = (TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_FLUSH | TransmissionFlag.SEND_FUA
      | TransmissionFlag.SEND_TRIM | TransmissionFlag.SEND_WRITE_ZEROES)


class Catalog:
    def __init__(self, *exports: ExportInfo) -> None:
        self.exports = {e.name: e for e in exports}

    def find_export(self, name: str) -> ExportInfo | None:
        return self.exports.get(name)

    def list_exports(self) -> list[ExportInfo]:
        return list(self.exports.values())


DISK = ExportInfo("disk", 1 << 20, RW, "the disk")


def converse(
    client: ClientHandshake, server: ServerHandshake, *, byte_at_a_time: bool = False
) -> tuple[list[HandshakeEvent], list[HandshakeEvent]]:
    """Pump bytes both ways until neither side makes progress; TLS is 'established' at once."""
    cev: list[HandshakeEvent] = []
    sev: list[HandshakeEvent] = []
    for _ in range(200):
        progressed = False
        out = server.data_to_send()
        if out:
            progressed = True
            for piece in ([out[i : i + 1] for i in range(len(out))] if byte_at_a_time else [out]):
                client.receive_data(piece)
        while (e := client.next_event()) is not None:
            cev.append(e)
            if isinstance(e, StartTLS):
                client.tls_established()
            progressed = True
        out = client.data_to_send()
        if out:
            progressed = True
            server.receive_data(out)
        while (e := server.next_event()) is not None:
            sev.append(e)
            if isinstance(e, StartTLS):
                server.tls_established()
            progressed = True
        if not progressed:
            break
    return cev, sev


@pytest.mark.parametrize("byte_at_a_time", [False, True])
def test_go_negotiates_structured_replies_and_base_allocation(byte_at_a_time: bool) -> None:
    client = ClientHandshake("disk")
    server = ServerHandshake(Catalog(DISK))
    cev, sev = converse(client, server, byte_at_a_time=byte_at_a_time)
    assert [type(e) for e in cev] == [Negotiated]
    assert [type(e) for e in sev] == [Negotiated]
    got = cev[0]
    assert isinstance(got, Negotiated)
    assert got.export.size == 1 << 20
    assert got.export.flags == RW
    assert got.structured
    assert got.contexts == {0: "base:allocation"}
    assert (got.export.min_block, got.export.pref_block, got.export.max_block) == (
        1, 4096, 32 << 20)
    assert client.state == server.state == "READY"


def test_unknown_export_is_refused_with_qemu_text() -> None:
    client = ClientHandshake("nope")
    server = ServerHandshake(Catalog(DISK))
    with pytest.raises(NBDProtocolError) as ei:
        converse(client, server)
    assert str(ei.value) == "Requested export not available"
    assert ei.value.hint == "server reported: export 'nope' not present"


def test_list_mode_returns_names_and_descriptions() -> None:
    other = ExportInfo("b", 512, RW)
    client = ClientHandshake(list_exports=True)
    server = ServerHandshake(Catalog(DISK, other))
    cev, sev = converse(client, server)
    assert cev == [ExportList([("disk", "the disk"), ("b", "")])]
    assert isinstance(sev[-1], Aborted)


def test_starttls_then_go() -> None:
    client = ClientHandshake("disk", tls=True)
    server = ServerHandshake(Catalog(DISK), tls_required=True)
    cev, sev = converse(client, server)
    assert [type(e) for e in cev] == [StartTLS, Negotiated]
    assert [type(e) for e in sev] == [StartTLS, Negotiated]
    assert server.tls_active


def test_clear_text_injected_after_starttls_is_refused() -> None:
    server = ServerHandshake(Catalog(DISK), tls_required=True)
    server.receive_data(struct.pack(">I", 3) + struct.pack(">QII", NBD_OPTS_MAGIC,
                                                           Opt.STARTTLS, 0)
                        + struct.pack(">QII", NBD_OPTS_MAGIC, Opt.STRUCTURED_REPLY, 0))
    with pytest.raises(NBDProtocolError, match="after NBD_OPT_STARTTLS"):
        server.next_event()
    client = ClientHandshake("disk", tls=True)
    client.receive_data(struct.pack(">QQH", NBD_INIT_MAGIC, NBD_OPTS_MAGIC, 3)
                        + struct.pack(">QIII", NBD_REP_MAGIC, Opt.STARTTLS, Rep.ACK, 0)
                        + b"injected")
    with pytest.raises(NBDProtocolError, match="after the NBD_OPT_STARTTLS reply"):
        client.next_event()


def test_tls_required_refuses_plain_go() -> None:
    client = ClientHandshake("disk")
    server = ServerHandshake(Catalog(DISK), tls_required=True)
    with pytest.raises(NBDProtocolError,
                       match=r"TLS negotiation required before option 8 \(structured reply\)"):
        converse(client, server)


def test_starttls_without_server_credentials() -> None:
    client = ClientHandshake("disk", tls=True)
    server = ServerHandshake(Catalog(DISK))
    with pytest.raises(NBDProtocolError, match="Server don't support STARTTLS option"):
        converse(client, server)


def test_go_unsupported_falls_back_to_export_name() -> None:
    """A server answering ERR_UNSUP to NBD_OPT_GO: the client uses NBD_OPT_EXPORT_NAME."""
    client = ClientHandshake("disk", structured=False)
    client.receive_data(struct.pack(">QQH", NBD_INIT_MAGIC, NBD_OPTS_MAGIC, 3))
    assert client.next_event() is None
    sent = client.data_to_send()
    assert sent[:4] == struct.pack(">I", 3)
    magic, opt, _ = struct.unpack_from(">QII", sent, 4)
    assert (magic, opt) == (NBD_OPTS_MAGIC, Opt.GO)
    client.receive_data(struct.pack(">QIII", NBD_REP_MAGIC, Opt.GO, Rep.ERR_UNSUP, 0))
    assert client.next_event() is None
    sent = client.data_to_send()
    assert struct.unpack_from(">QII", sent) == (NBD_OPTS_MAGIC, Opt.EXPORT_NAME, 4)
    assert sent[16:] == b"disk"
    client.receive_data(struct.pack(">QH", 4096, 3))  # NO_ZEROES was negotiated
    ev = client.next_event()
    assert isinstance(ev, Negotiated)
    assert ev.export.size == 4096 and not ev.structured


def test_export_name_option_on_server() -> None:
    server = ServerHandshake(Catalog(DISK))
    server.data_to_send()
    server.receive_data(struct.pack(">I", 1))  # fixed, zeroes wanted
    server.receive_data(struct.pack(">QII", NBD_OPTS_MAGIC, Opt.EXPORT_NAME, 4) + b"disk")
    ev = server.next_event()
    assert isinstance(ev, Negotiated)
    out = server.data_to_send()
    assert len(out) == 10 + 124
    assert struct.unpack_from(">QH", out) == (1 << 20, RW)


def test_server_rejects_bad_option_magic_and_unknown_flags() -> None:
    server = ServerHandshake(Catalog(DISK))
    server.receive_data(struct.pack(">I", 1) + b"X" * 16)
    with pytest.raises(NBDProtocolError, match="Bad magic"):
        server.next_event()
    server = ServerHandshake(Catalog(DISK))
    server.receive_data(struct.pack(">I", 0x80))
    with pytest.raises(NBDProtocolError, match="Unknown client flags"):
        server.next_event()


def test_server_answers_unknown_and_oversized_options_and_carries_on() -> None:
    server = ServerHandshake(Catalog(DISK))
    server.data_to_send()
    server.receive_data(struct.pack(">I", 3))
    server.receive_data(struct.pack(">QII", NBD_OPTS_MAGIC, 99, 3) + b"abc")
    server.receive_data(struct.pack(">QII", NBD_OPTS_MAGIC, Opt.INFO, 1 << 20))
    server.receive_data(bytes(1 << 20))
    server.receive_data(struct.pack(">QII", NBD_OPTS_MAGIC, Opt.STRUCTURED_REPLY, 0))
    assert server.next_event() is None
    out = server.data_to_send()
    replies = []
    pos = 0
    while pos < len(out):
        magic, opt, rep, n = struct.unpack_from(">QIII", out, pos)
        assert magic == NBD_REP_MAGIC
        replies.append((opt, rep))
        pos += 20 + n
    assert replies == [(99, Rep.ERR_UNSUP), (Opt.INFO, Rep.ERR_TOO_BIG),
                       (Opt.STRUCTURED_REPLY, Rep.ACK)]


def _info_replies(out: bytes) -> dict[int, bytes]:
    infos: dict[int, bytes] = {}
    pos = 0
    while pos < len(out):
        _, _, rep, n = struct.unpack_from(">QIII", out, pos)
        if rep == Rep.INFO:
            (kind,) = struct.unpack_from(">H", out, pos + 20)
            infos[kind] = out[pos + 22 : pos + 20 + n]
        pos += 20 + n
    return infos


@pytest.mark.parametrize(("opt", "asks", "minimum"),
                         [(Opt.GO, True, 4096), (Opt.GO, False, 1), (Opt.INFO, False, 4096)])
def test_block_size_minimum_only_for_clients_that_asked(opt: int, asks: bool,
                                                        minimum: int) -> None:
    aligned = ExportInfo("a", 1 << 20, RW, min_block=4096)
    server = ServerHandshake(Catalog(aligned))
    server.data_to_send()
    infos = struct.pack(">HH", 1, 3) if asks else struct.pack(">H", 0)
    server.receive_data(struct.pack(">I", 3) + struct.pack(">QII", NBD_OPTS_MAGIC, opt,
                                                           4 + 1 + len(infos))
                        + struct.pack(">I", 1) + b"a" + infos)
    server.next_event()
    sizes = struct.unpack(">III", _info_replies(server.data_to_send())[3])
    assert sizes == (minimum, 4096, 32 << 20)


def test_transition_tables_are_closed() -> None:
    for table in (SERVER_TRANSITIONS, CLIENT_TRANSITIONS):
        for targets in table.values():
            assert targets <= set(table)
        assert table["DEAD"] == frozenset()


# --- transmission ---------------------------------------------------------------------------


def test_request_decoder_round_trip_and_write_payload() -> None:
    dec = RequestDecoder()
    raw = (encode_request(Cmd.WRITE, 7, 4096, 5, CmdFlag.FUA, b"hello")
           + encode_request(Cmd.READ, 8, 0, 512))
    for i in range(len(raw)):  # a byte at a time
        dec.receive_data(raw[i : i + 1])
    assert dec.next_request() == Request(CmdFlag.FUA, Cmd.WRITE, 7, 4096, 5, b"hello")
    assert dec.next_request() == Request(0, Cmd.READ, 8, 0, 512)
    assert dec.next_request() is None


def test_oversized_write_is_a_bad_request_and_bad_magic_an_error() -> None:
    dec = RequestDecoder()
    dec.receive_data(encode_request(Cmd.WRITE, 1, 0, (32 << 20) + 1))
    bad = dec.next_request()
    assert isinstance(bad, BadRequest) and bad.errno == errno.EINVAL
    dec = RequestDecoder()
    dec.receive_data(b"\x00" * 28)
    with pytest.raises(NBDProtocolError, match="invalid magic"):
        dec.next_request()


@pytest.mark.parametrize(
    ("req", "tflags", "expect"),
    [
        (Request(0, Cmd.READ, 1, 0, 512), RW, None),
        (Request(0, Cmd.READ, 1, 1024, 1), RW, errno.EINVAL),
        (Request(0, Cmd.WRITE, 1, 1000, 100, bytes(100)), RW, errno.EINVAL),
        (Request(0, Cmd.WRITE, 1, 0, 1, b"x"), RW | TransmissionFlag.READ_ONLY, errno.EROFS),
        (Request(CmdFlag.NO_HOLE, Cmd.READ, 1, 0, 1), RW, errno.EINVAL),
        (Request(0, 42, 1, 0, 1), RW, errno.EINVAL),
        (Request(0x100, Cmd.WRITE, 1, 0, 1, b"x"), RW, errno.EINVAL),
        (Request(0, Cmd.BLOCK_STATUS, 1, 0, 0), RW, errno.EINVAL),
        (Request(CmdFlag.FAST_ZERO, Cmd.WRITE_ZEROES, 1, 0, 8), RW, errno.EINVAL),
        (Request(CmdFlag.FAST_ZERO, Cmd.WRITE_ZEROES, 1, 0, 8),
         RW | TransmissionFlag.SEND_FAST_ZERO, None),
    ],
)
def test_validate_request(req: Request, tflags: TransmissionFlag, expect: int | None) -> None:
    bad = validate_request(req, 1024, tflags, structured=True, contexts={0: "base:allocation"})
    assert (bad[0] if bad else None) == expect


def test_reply_decoder_simple_and_structured() -> None:
    lengths = {1: 4, 2: 0, 3: 16, 4: 0}
    dec = ReplyDecoder(lengths.get)
    stream = (
        encode_simple_reply(1, 0, b"abcd")
        + encode_simple_reply(2, errno_to_wire(errno.EPERM))
        + encode_chunk_header(3, ReplyType.OFFSET_DATA, 8 + 8, done=False)
        + (100).to_bytes(8, "big") + b"12345678"
        + encode_offset_hole(3, 108, 8, done=True)
        + encode_block_status(4, 0, [(4096, 3), (512, 0)], done=False)
        + encode_error_chunk(4, errno_to_wire(errno.EIO), "boom")
    )
    dec.receive_data(stream)
    got = []
    while (r := dec.next_reply()) is not None:
        got.append(r)
    assert got == [
        SimpleReply(1, 0, b"abcd"),
        SimpleReply(2, 1),
        DataChunk(3, False, 100, b"12345678"),
        HoleChunk(3, True, 108, 8),
        StatusChunk(4, False, 0, [(4096, 3), (512, 0)]),
        ErrorChunk(4, True, 5, "boom"),
    ]


def test_reply_decoder_rejects_unknown_cookie_and_magic() -> None:
    empty: dict[int, int] = {}
    dec = ReplyDecoder(empty.get)
    dec.receive_data(encode_simple_reply(9, 0))
    with pytest.raises(NBDProtocolError, match="Unexpected cookie"):
        dec.next_reply()
    dec = ReplyDecoder({1: 0}.get)
    dec.receive_data(b"\xde\xad\xbe\xef" + bytes(20))
    with pytest.raises(NBDProtocolError, match="invalid reply magic"):
        dec.next_reply()


def test_errno_mapping_squashes_unknown_to_einval() -> None:
    assert errno_to_wire(errno.EIO) == 5
    assert errno_to_wire(errno.EROFS) == 22  # as QEMU 7.2
    assert errno_to_wire(errno.EPERM) == 1
    assert errno_to_wire(errno.EDQUOT) == 28
    assert errno_to_wire(errno.EBADF) == 22
    assert wire_to_errno(95) == errno.ENOTSUP
    assert wire_to_errno(12345) == errno.EINVAL
