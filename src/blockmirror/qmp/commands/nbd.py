"""QMP commands of qapi/block-export.json: the NBD server and block exports.

Thin handlers over ``blockmirror.export.nbd_server``, which the command line (--nbd-server,
--export) calls directly as well. Schema types are declared here the way QAPI spells them;
SocketAddress and its members come from qmp/commands/block.py.
"""

from __future__ import annotations

from typing import Any

from blockmirror.export import nbd_server
from blockmirror.qmp.registry import Args, CommandContext, command, event
from blockmirror.qmp.schema import enum, struct, union

# the legacy ("simple union") SocketAddress of nbd-server-start
enum("SocketAddressLegacyType", ["inet", "unix", "vsock", "fd"])
struct("InetSocketAddressWrapper", {"data": "InetSocketAddress"})
struct("UnixSocketAddressWrapper", {"data": "UnixSocketAddress"})
struct("VsockSocketAddressWrapper", {"data": "VsockSocketAddress"})
struct("StringWrapper", {"data": "String"})
union("SocketAddressLegacy", {"type": "SocketAddressLegacyType"}, "type", {
    "inet": "InetSocketAddressWrapper", "unix": "UnixSocketAddressWrapper",
    "vsock": "VsockSocketAddressWrapper", "fd": "StringWrapper",
})

enum("BlockExportType", ["nbd", "vhost-user-blk", "fuse", "vduse-blk"])
enum("BlockExportRemoveMode", ["safe", "hard"])
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

event("BLOCK_EXPORT_DELETED", {"id": "str"})


@command("nbd-server-start", {"addr": "SocketAddressLegacy", "*tls-creds": "str",
                              "*tls-authz": "str", "*max-connections": "uint32"})
async def nbd_server_start(ctx: CommandContext, args: Args) -> None:
    await nbd_server.nbd_server_start(ctx.daemon, args.as_dict())


@command("nbd-server-stop")
async def nbd_server_stop(ctx: CommandContext, args: Args) -> None:
    await nbd_server.nbd_server_stop(ctx.daemon)


@command("nbd-server-add", "NbdServerAddOptions", boxed=True)
async def nbd_server_add(ctx: CommandContext, args: Args) -> None:
    await nbd_server.nbd_server_add(ctx.daemon, args.as_dict())


@command("nbd-server-remove", {"name": "str", "*mode": "BlockExportRemoveMode"})
async def nbd_server_remove(ctx: CommandContext, args: Args) -> None:
    await nbd_server.block_export_del(ctx.daemon, args.get_str("name"),
                                      args.get_str("mode", "safe"))


@command("block-export-add", "BlockExportOptions", boxed=True)
async def block_export_add(ctx: CommandContext, args: Args) -> None:
    await nbd_server.block_export_add(ctx.daemon, args.as_dict())


@command("block-export-del", {"id": "str", "*mode": "BlockExportRemoveMode"})
async def block_export_del(ctx: CommandContext, args: Args) -> None:
    await nbd_server.block_export_del(ctx.daemon, args.get_str("id"),
                                      args.get_str("mode", "safe"))


@command("query-block-exports", returns=["BlockExportInfo"])
async def query_block_exports(ctx: CommandContext, args: Args) -> list[dict[str, Any]]:
    return nbd_server.query_block_exports(ctx.daemon)
