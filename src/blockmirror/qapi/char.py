"""qapi/char.json: character devices (chardev-add/-change/-remove, query-chardev, the
ringbuf commands), as qemu-storage-daemon 7.2 has them (qmp/commands/chardev.py)."""

from __future__ import annotations

from enum import StrEnum

from blockmirror.qapi.schema import command, event, qapi_enum, struct, union


@qapi_enum
class DataFormat(StrEnum):
    UTF8 = "utf8"
    BASE64 = "base64"


@qapi_enum
class ChardevBackendKind(StrEnum):
    """QEMU's whole list: the kinds a storage daemon has not get its "not a valid char driver
    name" text from chardev-add rather than a schema error."""

    FILE = "file"
    SERIAL = "serial"
    PARALLEL = "parallel"
    PIPE = "pipe"
    SOCKET = "socket"
    UDP = "udp"
    PTY = "pty"
    NULL = "null"
    MUX = "mux"
    MSMOUSE = "msmouse"
    WCTABLET = "wctablet"
    BRAILLE = "braille"
    TESTDEV = "testdev"
    STDIO = "stdio"
    CONSOLE = "console"
    SPICEVMC = "spicevmc"
    SPICEPORT = "spiceport"
    QEMU_VDAGENT = "qemu-vdagent"
    DBUS = "dbus"
    VC = "vc"
    RINGBUF = "ringbuf"
    MEMORY = "memory"


struct("ChardevInfo", {"label": "str", "filename": "str", "frontend-open": "bool"})
struct("ChardevBackendInfo", {"name": "str"})
struct("ChardevCommon", {"*logfile": "str", "*logappend": "bool"})
struct("ChardevFile", {"*in": "str", "out": "str", "*append": "bool"}, base="ChardevCommon")
struct("ChardevHostdev", {"device": "str"}, base="ChardevCommon")
struct("ChardevSocket", {
    "addr": "SocketAddressLegacy", "*tls-creds": "str", "*tls-authz": "str", "*server": "bool",
    "*wait": "bool", "*nodelay": "bool", "*telnet": "bool", "*tn3270": "bool",
    "*websocket": "bool", "*reconnect": "int",
}, base="ChardevCommon")
struct("ChardevUdp", {"remote": "SocketAddressLegacy", "*local": "SocketAddressLegacy"},
       base="ChardevCommon")
struct("ChardevMux", {"chardev": "str"}, base="ChardevCommon")
struct("ChardevStdio", {"*signal": "bool"}, base="ChardevCommon")
struct("ChardevSpiceChannel", {"type": "str"}, base="ChardevCommon")
struct("ChardevSpicePort", {"fqdn": "str"}, base="ChardevCommon")
struct("ChardevDBus", {"name": "str"}, base="ChardevCommon")
struct("ChardevVC", {"*width": "int", "*height": "int", "*cols": "int", "*rows": "int"},
       base="ChardevCommon")
struct("ChardevRingbuf", {"*size": "int"}, base="ChardevCommon")
struct("ChardevQemuVDAgent", {"*mouse": "bool", "*clipboard": "bool"}, base="ChardevCommon")

_WRAPPED = {
    "ChardevFile": "file", "ChardevHostdev": "serial", "ChardevSocket": "socket",
    "ChardevUdp": "udp", "ChardevCommon": "null", "ChardevMux": "mux",
    "ChardevStdio": "stdio", "ChardevSpiceChannel": "spicevmc",
    "ChardevSpicePort": "spiceport", "ChardevQemuVDAgent": "qemu-vdagent",
    "ChardevDBus": "dbus", "ChardevVC": "vc", "ChardevRingbuf": "ringbuf",
}
for _inner in _WRAPPED:
    struct(f"{_inner}Wrapper", {"data": _inner})

#: the struct each backend kind's ``data`` is (QEMU's simple union, flattened)
BACKEND_DATA = {
    "file": "ChardevFile", "serial": "ChardevHostdev", "parallel": "ChardevHostdev",
    "pipe": "ChardevHostdev", "socket": "ChardevSocket", "udp": "ChardevUdp",
    "pty": "ChardevCommon", "null": "ChardevCommon", "mux": "ChardevMux",
    "msmouse": "ChardevCommon", "wctablet": "ChardevCommon", "braille": "ChardevCommon",
    "testdev": "ChardevCommon", "stdio": "ChardevStdio", "console": "ChardevCommon",
    "spicevmc": "ChardevSpiceChannel", "spiceport": "ChardevSpicePort",
    "qemu-vdagent": "ChardevQemuVDAgent", "dbus": "ChardevDBus", "vc": "ChardevVC",
    "ringbuf": "ChardevRingbuf", "memory": "ChardevRingbuf",
}
union("ChardevBackend", {"type": "ChardevBackendKind"}, "type",
      {kind: f"{inner}Wrapper" for kind, inner in BACKEND_DATA.items()})
struct("ChardevReturn", {"*pty": "str"})

command("query-chardev", returns=["ChardevInfo"],
        doc="the command line's chardevs and those chardev-add made; QEMU lists them in "
            "hash-table order, we in creation order")
command("query-chardev-backends", returns=["ChardevBackendInfo"],
        doc="the backends qemu-storage-daemon 7.2 has")
command("ringbuf-write", {"device": "str", "data": "str", "*format": "DataFormat"},
        defaults={"format": DataFormat.UTF8},
        doc="`utf8` writes the string's (modified) UTF-8 bytes; `base64` glib's lenient "
            "decoding after QEMU's character check")
command("ringbuf-read", {"device": "str", "size": "int", "*format": "DataFormat"},
        returns="str", defaults={"format": DataFormat.UTF8},
        doc="`utf8` stops at a NUL byte and shows invalid sequences as U+FFFD, as QEMU's "
            "JSON writer does")
command("chardev-add", {"id": "str", "backend": "ChardevBackend"}, returns="ChardevReturn",
        doc="`ringbuf`, `memory`, `null`, `file`, `pipe`, `serial`, `parallel`, `pty`, "
            "`socket` (unix, inet, vsock; server or client, `reconnect`), `udp`, `stdio`, "
            "`mux`; no frontend uses them (no monitor on a chardev added at run time)")
command("chardev-change", {"id": "str", "backend": "ChardevBackend"},
        returns="ChardevReturn",
        doc="a chardev without a user is replaced (removed first, as QEMU does); a "
            "monitor's refuses hotswap, a mux refuses")
command("chardev-remove", {"id": "str"}, doc="refuses a chardev in use (a monitor, a mux)")
command("chardev-send-break", {"id": "str"},
        doc="no frontend listens for a break: it is accepted and has no effect")

event("VSERPORT_CHANGE", {"id": "str", "open": "bool"},
      doc="declared as in QEMU; a storage daemon has no virtio-serial port and never sends it")

__all__ = ["BACKEND_DATA", "ChardevBackendKind", "DataFormat"]
