"""qapi/block-export.json: the NBD server and block exports (and the command line's options)."""

from __future__ import annotations

from enum import StrEnum

from blockmirror.qapi.schema import command, enum, event, qapi_enum, struct, union

enum("BlockExportType", ["nbd", "vhost-user-blk", "fuse", "vduse-blk"])


@qapi_enum
class BlockExportRemoveMode(StrEnum):
    SAFE = "safe"
    HARD = "hard"


struct("BlockExportOptionsNbdBase", {"*name": "str", "*description": "str"})
struct("BlockExportOptionsNbd", {"*bitmaps": ["str"], "*allocation-depth": "bool"},
       base="BlockExportOptionsNbdBase")
union("BlockExportOptions", {
    "type": "BlockExportType", "id": "str", "*fixed-iothread": "bool", "*iothread": "str",
    "node-name": "str", "*writable": "bool", "*writethrough": "bool",
}, "type", {"nbd": "BlockExportOptionsNbd"})
struct("NbdServerAddOptions", {"device": "str", "*writable": "bool", "*bitmap": "str"},
       base="BlockExportOptionsNbdBase")
struct("BlockExportInfo", {"id": "str", "type": "BlockExportType", "node-name": "str",
                           "shutting-down": "bool"})
#: --nbd-server (the flat SocketAddress; nbd-server-start takes the legacy one)
struct("NbdServerOptions", {"addr": "SocketAddress", "*tls-creds": "str", "*tls-authz": "str",
                            "*max-connections": "uint32"})

command("nbd-server-start", {"addr": "SocketAddressLegacy", "*tls-creds": "str",
                             "*tls-authz": "str", "*max-connections": "uint32"},
        defaults={"max-connections": 0},
        doc="`addr` (legacy SocketAddress: `unix` or `inet`), `tls-creds`, `tls-authz`, "
            "`max-connections`")
command("nbd-server-stop")
command("nbd-server-add", "NbdServerAddOptions", defaults={"writable": False},
        doc="deprecated: a block export whose id is the export name")
command("nbd-server-remove", {"name": "str", "*mode": "BlockExportRemoveMode"},
        defaults={"mode": BlockExportRemoveMode.SAFE})
command("block-export-add", "BlockExportOptions", defaults={"writable": False},
        doc="type `nbd`; an export follows its node through a mirror pivot; `bitmaps` serves "
            "`qemu:dirty-bitmap:NAME` (held busy while exported), `allocation-depth` serves "
            "`qemu:allocation-depth`")
command("block-export-del", {"id": "str", "*mode": "BlockExportRemoveMode"},
        defaults={"mode": BlockExportRemoveMode.SAFE})
command("query-block-exports", returns=["BlockExportInfo"])

event("BLOCK_EXPORT_DELETED", {"id": "str"})

__all__ = ["BlockExportRemoveMode"]
