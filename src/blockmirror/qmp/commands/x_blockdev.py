"""x-blockdev-change and x-blockdev-set-iothread (cf. QEMU's blockdev.c), with QEMU's checks
in QEMU's order.

No driver here adds or removes children at run time (QEMU's quorum does; blockmirror has no
quorum driver), so x-blockdev-change ends in QEMU's refusal for such a node. blockmirror
serves every node from one event loop: x-blockdev-set-iothread checks what QEMU checks and
then has nothing to move.
"""

from __future__ import annotations

from blockmirror.block.node import BlockNode
from blockmirror.errors import BlockMirrorError
from blockmirror.objects.event_loop import IOThread
from blockmirror.qmp.registry import Args, CommandContext, DaemonAPI, command


def _device_or_node_name(daemon: DaemonAPI, node: BlockNode) -> str:
    """``bdrv_get_device_or_node_name``: the name of a device on the node, else its own."""
    for blk in daemon.graph.root_backends(node):
        if blk.name:
            return blk.name
    return node.name


@command("x-blockdev-change")
async def x_blockdev_change(ctx: CommandContext, args: Args) -> None:
    graph = ctx.daemon.graph
    parent_name = args.get_str("parent")
    parent = graph.lookup(parent_name, parent_name)
    child, node = args.opt_str("child"), args.opt_str("node")
    if (child is None) == (node is None):
        raise BlockMirrorError("The parameters child and node are in conflict" if child
                               is not None else "Either child or node must be specified")
    who = _device_or_node_name(ctx.daemon, parent)
    if child is not None:
        if child not in parent.children:
            raise BlockMirrorError(
                f"Node '{parent_name}' does not have child '{child}'")
        raise BlockMirrorError(f"The node {who} does not support removing a child")
    assert node is not None
    if graph.find_node(node) is None:
        raise BlockMirrorError(f"Node '{node}' not found")
    raise BlockMirrorError(f"The node {who} does not support adding a child")


@command("x-blockdev-set-iothread")
async def x_blockdev_set_iothread(ctx: CommandContext, args: Args) -> None:
    name = args.get_str("node-name")
    node = ctx.daemon.graph.find_node(name)
    if node is None:
        raise BlockMirrorError(f"Failed to find node with node-name='{name}'")
    if not args.get_bool("force") and ctx.daemon.graph.root_backends(node):
        raise BlockMirrorError(
            f"Node {name} is associated with a BlockBackend and could be in use (use "
            "force=true to override this check)")
    iothread = args["iothread"]
    if iothread is not None and ctx.daemon.objects.find(iothread, IOThread) is None:
        raise BlockMirrorError(f"Cannot find iothread {iothread}")
    # one event loop serves every node: the node is already where it is asked to be
