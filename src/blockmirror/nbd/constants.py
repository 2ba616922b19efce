"""NBD wire constants: magics, handshake and transmission flags, options, commands, errnos.

Names follow the NBD protocol document (doc/proto.md) with the ``NBD_`` prefix dropped inside
each enum. Pure data plus the errno mapping shared by the server (errno -> wire) and the client
(wire -> errno); no I/O here.
"""

from __future__ import annotations

import enum
import errno

#: "NBDMAGIC": the first 8 bytes a server sends
NBD_INIT_MAGIC = 0x4E42444D41474943
#: "IHAVEOPT": newstyle greeting second magic, and the prefix of every client option
NBD_OPTS_MAGIC = 0x49484156454F5054
#: the magic of every option reply
NBD_REP_MAGIC = 0x0003E889045565A9
NBD_REQUEST_MAGIC = 0x25609513
NBD_SIMPLE_REPLY_MAGIC = 0x67446698
NBD_STRUCTURED_REPLY_MAGIC = 0x668E33EF

#: the largest payload we read or send in one request (cf. NBD_MAX_BUFFER_SIZE in QEMU)
NBD_MAX_BUFFER_SIZE = 32 * 1024 * 1024
#: the longest export name / description / option string we accept (cf. NBD_MAX_STRING_SIZE)
NBD_MAX_STRING_SIZE = 4096
#: the largest option payload a server reads before giving up on the client
NBD_MAX_OPTION_SIZE = 64 * 1024
#: QEMU's preferred block size
NBD_PREFERRED_BLOCK_SIZE = 4096
#: the context id QEMU gives base:allocation (any 32-bit value is valid on the wire)
NBD_META_ID_BASE_ALLOCATION = 0
BASE_ALLOCATION = "base:allocation"
#: QEMU's ids for its own contexts: qemu:allocation-depth, then one per exported bitmap
NBD_META_ID_ALLOCATION_DEPTH = 1
NBD_META_ID_DIRTY_BITMAP = 2
ALLOCATION_DEPTH = "qemu:allocation-depth"
DIRTY_BITMAP_PREFIX = "qemu:dirty-bitmap:"
#: qemu:dirty-bitmap:NAME status bit: the range is dirty
NBD_STATE_DIRTY = 1


class HandshakeFlag(enum.IntFlag):
    """Server handshake flags (16 bits), sent after the magics."""

    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class ClientFlag(enum.IntFlag):
    """Client flags (32 bits), the client's answer to the handshake flags."""

    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class TransmissionFlag(enum.IntFlag):
    """Per-export transmission flags (16 bits)."""

    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11


class Opt(enum.IntEnum):
    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10


NBD_REP_ERR_BIT = 1 << 31


class Rep(enum.IntEnum):
    """Option reply types; values with bit 31 set are errors."""

    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = NBD_REP_ERR_BIT | 1
    ERR_POLICY = NBD_REP_ERR_BIT | 2
    ERR_INVALID = NBD_REP_ERR_BIT | 3
    ERR_PLATFORM = NBD_REP_ERR_BIT | 4
    ERR_TLS_REQD = NBD_REP_ERR_BIT | 5
    ERR_UNKNOWN = NBD_REP_ERR_BIT | 6
    ERR_SHUTDOWN = NBD_REP_ERR_BIT | 7
    ERR_BLOCK_SIZE_REQD = NBD_REP_ERR_BIT | 8
    ERR_TOO_BIG = NBD_REP_ERR_BIT | 9


class Info(enum.IntEnum):
    """NBD_INFO_* items inside NBD_REP_INFO replies."""

    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class Cmd(enum.IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7
    RESIZE = 8


class CmdFlag(enum.IntFlag):
    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4


#: the command flags each command may carry (anything else is EINVAL)
ALLOWED_CMD_FLAGS: dict[Cmd, CmdFlag] = {
    Cmd.READ: CmdFlag.DF | CmdFlag.FUA,
    Cmd.WRITE: CmdFlag.FUA,
    Cmd.DISC: CmdFlag(0),
    Cmd.FLUSH: CmdFlag(0),
    Cmd.TRIM: CmdFlag.FUA,
    Cmd.CACHE: CmdFlag(0),
    Cmd.WRITE_ZEROES: CmdFlag.FUA | CmdFlag.NO_HOLE | CmdFlag.FAST_ZERO,
    Cmd.BLOCK_STATUS: CmdFlag.REQ_ONE,
    Cmd.RESIZE: CmdFlag(0),
}


class ReplyFlag(enum.IntFlag):
    DONE = 1 << 0


NBD_REPLY_ERR_BIT = 1 << 15


class ReplyType(enum.IntEnum):
    """Structured reply chunk types."""

    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    ERROR = NBD_REPLY_ERR_BIT | 1
    ERROR_OFFSET = NBD_REPLY_ERR_BIT | 2


class StateFlag(enum.IntFlag):
    """base:allocation status bits of a block status descriptor."""

    HOLE = 1 << 0
    ZERO = 1 << 1


class NbdErr(enum.IntEnum):
    """Errno values as the NBD wire spells them (independent of the host's errno numbering)."""

    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


_HOST_TO_WIRE: dict[int, NbdErr] = {
    errno.EPERM: NbdErr.EPERM,
    errno.EIO: NbdErr.EIO,
    errno.ENOMEM: NbdErr.ENOMEM,
    errno.EINVAL: NbdErr.EINVAL,
    errno.ENOSPC: NbdErr.ENOSPC,
    errno.EFBIG: NbdErr.ENOSPC,
    errno.EDQUOT: NbdErr.ENOSPC,
    errno.EOVERFLOW: NbdErr.EOVERFLOW,
    errno.ENOTSUP: NbdErr.ENOTSUP,
    errno.ESHUTDOWN: NbdErr.ESHUTDOWN,
}

_WIRE_TO_HOST: dict[int, int] = {
    NbdErr.EPERM: errno.EPERM,
    NbdErr.EIO: errno.EIO,
    NbdErr.ENOMEM: errno.ENOMEM,
    NbdErr.EINVAL: errno.EINVAL,
    NbdErr.ENOSPC: errno.ENOSPC,
    NbdErr.EOVERFLOW: errno.EOVERFLOW,
    NbdErr.ENOTSUP: errno.ENOTSUP,
    NbdErr.ESHUTDOWN: errno.ESHUTDOWN,
}


def errno_to_wire(err: int) -> int:
    """cf. system_errno_to_nbd_errno: everything unknown is squashed to EINVAL.

    (EROFS too: QEMU 7.2 answers a write to a read-only export with EINVAL.)
    """
    if err == 0:
        return 0
    return int(_HOST_TO_WIRE.get(err, NbdErr.EINVAL))


def wire_to_errno(err: int) -> int:
    """cf. nbd_errno_to_system_errno: unknown wire values become EINVAL."""
    if err == 0:
        return 0
    return _WIRE_TO_HOST.get(err, errno.EINVAL)


def opt_name(opt: int) -> str:
    try:
        return f"NBD_OPT_{Opt(opt).name}"
    except ValueError:
        return f"<unknown option {opt}>"


def cmd_name(cmd: int) -> str:
    try:
        return f"NBD_CMD_{Cmd(cmd).name}"
    except ValueError:
        return f"<unknown command {cmd}>"
