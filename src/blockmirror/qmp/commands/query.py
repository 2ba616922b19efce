"""Block queries: query-named-block-nodes, query-block, x-debug-query-block-graph
(cf. QEMU's block/qapi.c and block.c bdrv_get_xdbg_block_graph).

The per-node records (BlockDeviceInfo, ImageInfo) are built by ``blockmirror.block.query``;
this module only declares the commands and builds the graph dump.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from blockmirror.block import query as bq
from blockmirror.block.node import Perm
from blockmirror.qmp.registry import Args, CommandContext, command

if TYPE_CHECKING:
    from blockmirror.block.graph import BlockGraph

_PERM_NAMES = ((Perm.CONSISTENT_READ, "consistent-read"), (Perm.WRITE, "write"),
               (Perm.WRITE_UNCHANGED, "write-unchanged"), (Perm.RESIZE, "resize"))


@command("query-named-block-nodes")
async def query_named_block_nodes(ctx: CommandContext, args: Args) -> list[dict[str, Any]]:
    return await bq.query_named_block_nodes(ctx.daemon.graph, flat=args.get_bool("flat", False))


@command("query-block")
async def query_block(ctx: CommandContext, args: Args) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for blk in ctx.daemon.graph.backends:
        if not blk.name:
            continue  # anonymous backends (jobs, exports) are not devices
        info: dict[str, Any] = {"device": blk.name, "locked": False, "removable": False,
                                "type": "unknown"}
        if blk.node is not None:
            info["inserted"] = await bq.block_device_info(blk.node)
        out.append(info)
    return out


def _perm_list(p: Perm) -> list[str]:
    return [name for flag, name in _PERM_NAMES if flag in p]


def block_graph(graph: BlockGraph) -> dict[str, Any]:
    """cf. bdrv_get_xdbg_block_graph: every backend, job backend and node, and every edge."""
    ids: dict[int, int] = {}
    nodes: list[dict[str, Any]] = []
    edges: list[dict[str, Any]] = []

    def node_id(obj: object) -> int:
        key = id(obj)
        if key not in ids:
            ids[key] = len(ids) + 1
        return ids[key]

    for blk in graph.backends:
        kind = "block-job" if blk.owner.startswith("block job") else "block-backend"
        nodes.append({"id": node_id(blk), "type": kind, "name": blk.name})
        if blk.child is not None:
            edges.append(_edge(node_id(blk), node_id(blk.child.node), blk.child.role,
                               blk.child.perm, blk.child.shared))
    for node in graph.all_nodes():
        nodes.append({"id": node_id(node), "type": "block-driver", "name": node.name})
        for role, link in node.children.items():
            edges.append(_edge(node_id(node), node_id(link.node), role, link.perm, link.shared))
    return {"nodes": nodes, "edges": edges}


def _edge(parent: int, child: int, name: str, perm: Perm, shared: Perm) -> dict[str, Any]:
    return {"parent": parent, "child": child, "name": name, "perm": _perm_list(perm),
            "shared-perm": _perm_list(shared)}


@command("x-debug-query-block-graph")
async def x_debug_query_block_graph(ctx: CommandContext, args: Args) -> dict[str, Any]:
    return block_graph(ctx.daemon.graph)


