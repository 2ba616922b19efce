"""QMP commands of qapi/block-export.json: the NBD server and block exports.

The functions taking a daemon are the entry points (the handlers below, and the command line's
--nbd-server and --export, call them with arguments the schema validated); they apply QEMU's
checks, in QEMU's order and with its texts (cf. blockdev-nbd.c and block/export/export.c),
and hand typed values to ``blockmirror.export.nbd_server``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from blockmirror.block.bitmaps import find_export_bitmaps
from blockmirror.block.graph import id_wellformed
from blockmirror.block.node import BlockNode
from blockmirror.errors import BlockMirrorError
from blockmirror.export.nbd_server import NbdServer
from blockmirror.nbd.constants import NBD_MAX_STRING_SIZE
from blockmirror.nbd.tls import server_context
from blockmirror.qmp.registry import Args, CommandContext, DaemonAPI, command


def _flat_address(addr: Mapping[str, Any]) -> dict[str, Any]:
    """The legacy SocketAddress {"type": .., "data": {..}} as the flat one."""
    data = addr.get("data")
    if isinstance(data, Mapping):
        return {"type": addr["type"], **data}
    return dict(addr)


async def nbd_server_start(daemon: DaemonAPI, args: Mapping[str, Any]) -> None:
    """nbd-server-start (cf. nbd_server_start in blockdev-nbd.c)."""
    if daemon.nbd is not None:
        raise BlockMirrorError("NBD server already running")
    addr = _flat_address(args["addr"])
    tls_creds = args.get("tls-creds")
    tls = server_context(daemon.objects, tls_creds) if tls_creds else None
    server = NbdServer(daemon.graph, daemon.events, tls=tls, tls_creds=tls_creds,
                       tls_authz=args.get("tls-authz"),
                       max_connections=args.get("max-connections", 0))
    await server.listen(addr)
    daemon.nbd = server


async def nbd_server_stop(daemon: DaemonAPI) -> None:
    if daemon.nbd is None:
        raise BlockMirrorError("NBD server not running")
    server, daemon.nbd = daemon.nbd, None
    await server.stop()


def _find_node(daemon: DaemonAPI, node_name: str) -> BlockNode:
    node = daemon.graph.find_node(node_name)
    if node is None:
        raise BlockMirrorError(f"Cannot find device='' nor node-name='{node_name}'")
    return node


async def block_export_add(daemon: DaemonAPI, args: Mapping[str, Any]) -> None:
    """block-export-add for type nbd (cf. blk_exp_add + nbd_export_create)."""
    export_id: str = args["id"]
    if not id_wellformed(export_id):
        raise BlockMirrorError("Invalid block export id")
    server = daemon.nbd
    if server is not None and export_id in server.exports:
        raise BlockMirrorError(f"Block export id '{export_id}' is already in use")
    if args.get("type", "nbd") != "nbd":
        raise BlockMirrorError("No driver found for the requested export type")
    node_name: str = args["node-name"]
    node = _find_node(daemon, node_name)
    writable = bool(args.get("writable", False))
    if writable and node.read_only:
        raise BlockMirrorError("Cannot export read-only node as writable")
    if server is None:
        raise BlockMirrorError("NBD server not running")
    name: str = args.get("name") or node_name
    description: str = args.get("description") or ""
    if len(name.encode()) > NBD_MAX_STRING_SIZE:
        raise BlockMirrorError(f"export name '{name}' too long")
    if len(description.encode()) > NBD_MAX_STRING_SIZE:
        raise BlockMirrorError(f"description '{description}' too long")
    if server.export_by_name(name) is not None:
        raise BlockMirrorError(f"NBD server already has export named '{name}'")
    names = args.get("bitmaps") or ([args["bitmap"]] if args.get("bitmap") else [])
    bitmaps = find_export_bitmaps(node, [str(n) for n in names], writable)
    exp = server.add_export(export_id, node, name=name, description=description,
                            writable=writable)
    exp.bitmaps = bitmaps
    exp.allocation_depth = bool(args.get("allocation-depth", False))


async def nbd_server_add(daemon: DaemonAPI, args: Mapping[str, Any]) -> None:
    """The deprecated nbd-server-add: a block export whose id is the export name."""
    device: str = args["device"]
    node = daemon.graph.lookup(device, device)
    name: str = args.get("name") or device
    writable = bool(args.get("writable", False)) and not node.read_only
    opts: dict[str, Any] = {"type": "nbd", "id": name, "node-name": node.name, "name": name,
                            "writable": writable}
    if "description" in args:
        opts["description"] = args["description"]
    if "bitmap" in args:
        opts["bitmap"] = args["bitmap"]
    await block_export_add(daemon, opts)


async def block_export_del(daemon: DaemonAPI, export_id: str, mode: str = "safe") -> None:
    server = daemon.nbd
    exp = server.exports.get(export_id) if server is not None else None
    if server is None or exp is None:
        raise BlockMirrorError(f"Export '{export_id}' is not found")
    if not exp.user_owned:
        raise BlockMirrorError(f"Export '{export_id}' is already shutting down")
    if mode == "safe" and exp.clients:
        err = BlockMirrorError(f"export '{export_id}' still in use")
        err.hint = "Use mode='hard' to force client disconnect"
        raise err
    await server.request_shutdown(exp, hard=mode == "hard")


def query_block_exports(daemon: DaemonAPI) -> list[dict[str, Any]]:
    server = daemon.nbd
    if server is None:
        return []
    out = []
    # newest first, like QEMU's list of block exports (QLIST_INSERT_HEAD)
    for exp in reversed(server.exports.values()):
        node = exp.blk.node
        out.append({"id": exp.id, "type": "nbd", "node-name": node.name if node else "",
                    "shutting-down": not exp.user_owned})
    return out


# --- handlers ----------------------------------------------------------------------------------


@command("nbd-server-start")
async def qmp_nbd_server_start(ctx: CommandContext, args: Args) -> None:
    await nbd_server_start(ctx.daemon, args)


@command("nbd-server-stop")
async def qmp_nbd_server_stop(ctx: CommandContext, args: Args) -> None:
    await nbd_server_stop(ctx.daemon)


@command("nbd-server-add")
async def qmp_nbd_server_add(ctx: CommandContext, args: Args) -> None:
    await nbd_server_add(ctx.daemon, args)


@command("nbd-server-remove")
async def qmp_nbd_server_remove(ctx: CommandContext, args: Args) -> None:
    await block_export_del(ctx.daemon, args.get_str("name"), args.get_str("mode"))


@command("block-export-add")
async def qmp_block_export_add(ctx: CommandContext, args: Args) -> None:
    await block_export_add(ctx.daemon, args)


@command("block-export-del")
async def qmp_block_export_del(ctx: CommandContext, args: Args) -> None:
    await block_export_del(ctx.daemon, args.get_str("id"), args.get_str("mode"))


@command("query-block-exports")
async def qmp_query_block_exports(ctx: CommandContext, args: Args) -> list[dict[str, Any]]:
    return query_block_exports(ctx.daemon)


__all__ = ["block_export_add", "block_export_del", "nbd_server_add", "nbd_server_start",
           "nbd_server_stop", "query_block_exports"]
