"""QMP blockdev-mirror and what it shares with drive-mirror (cf. blockdev.c
qmp_blockdev_mirror, blockdev_mirror_common).

Every check runs in QEMU's order with QEMU's text; the job itself is built by
``jobs.mirror.start_mirror``. drive-mirror, which creates its target, is in
``drive_mirror.py``: a daemon that only runs blockdev-mirror never imports image creation
(and with it every format's creation code).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from blockmirror.block.bitmaps import Check, NamedBitmap
from blockmirror.block.graph import id_wellformed
from blockmirror.block.node import BlockBackend, BlockNode
from blockmirror.errors import BlockMirrorError
from blockmirror.jobs.mirror import BackingMode, MirrorParams, plan_resume, start_mirror
from blockmirror.jobs.mirror.converge import DEFAULT_DEADLINE_S, ConvergePolicy
from blockmirror.jobs.mirror.params import default_granularity
from blockmirror.qapi.block_core import ORG_BITMAP, ORG_BITMAP_MODE
from blockmirror.qapi.x_mirror import XConvergePolicy
from blockmirror.qmp.registry import Args, CommandContext, command

if TYPE_CHECKING:
    from blockmirror.block.graph import BlockGraph

def get_root_node(graph: BlockGraph, device: str) -> BlockNode:
    """cf. qmp_get_root_bs: a device or node name of a node only BlockBackends use."""
    node = graph.lookup(device, device)
    if any(not isinstance(c.parent, BlockBackend) for c in node.parents):
        raise BlockMirrorError("Need a root block node")
    # every node a block job uses has a job link (cf. block_job_add_bdrv), which is not a
    # root link; such nodes carry the job's op blocker
    if any(r.startswith("block device is in use by block job:")
           for r in node.blockers.get("all", [])):
        raise BlockMirrorError("Need a root block node")
    return node


def check_blocked(node: BlockNode) -> None:
    """cf. bdrv_op_is_blocked for MIRROR_SOURCE / MIRROR_TARGET."""
    for op in ("mirror-source", "mirror-target", "all"):
        reasons = node.blockers.get(op)
        if reasons:
            raise BlockMirrorError(f"Node '{node.name}' is busy: {reasons[0]}")


def _can_replace(bs: BlockNode, to_replace: BlockNode) -> bool:
    """cf. bdrv_recurse_can_replace: ``to_replace`` is ``bs`` or a filter path below it."""
    node: BlockNode | None = bs
    while node is not None:
        if node is to_replace:
            return True
        node = node.filtered_child()
    return False


def converge_policy(args: Args) -> ConvergePolicy | None:
    """The extension arguments ``x-converge*`` (None: not used, QEMU's job).

    Raises:
        BlockMirrorError: a deadline or rate out of range, or given without ``x-converge``.
    """
    mode = args.opt_str("x-converge")
    deadline = args.opt_int("x-converge-deadline")
    rate = args.opt_int("x-converge-throttle")
    if mode is None:
        for name, value in (("x-converge-deadline", deadline), ("x-converge-throttle", rate)):
            if value is not None:
                raise BlockMirrorError(f"Parameter '{name}' requires 'x-converge'")
        return None
    policy = XConvergePolicy(mode)
    if deadline is not None and deadline <= 0:
        raise BlockMirrorError("Parameter 'x-converge-deadline' expects a positive number of "
                               "seconds")
    if policy == XConvergePolicy.THROTTLE:
        if rate is None or rate <= 0:
            raise BlockMirrorError("Parameter 'x-converge-throttle' expects a positive rate "
                                   "in bytes per second")
    elif rate is not None:
        raise BlockMirrorError("Parameter 'x-converge-throttle' requires x-converge 'throttle'")
    return ConvergePolicy(policy, deadline or DEFAULT_DEADLINE_S, rate or 0)


def _sync_bitmap(args: Args, bs: BlockNode, sync: str,
                 gran: int) -> tuple[str, NamedBitmap | None, str | None]:
    """The downstream extension ``__org.blockmirror_bitmap`` / ``-bitmap-mode``: Proxmox VE's
    ``bitmap`` / ``bitmap-mode`` mirror arguments, their checks in their order and with their
    texts; returns ``(sync, bitmap, mode)`` with ``incremental`` turned into ``bitmap`` +
    ``on-success``. Neither given: nothing changes (QEMU 7.2 refuses sync bitmap/incremental).

    Raises:
        BlockMirrorError: a missing or superfluous bitmap or mode, a sync mode other than
            bitmap, a granularity, an unknown, busy or inconsistent bitmap, or a read-only one
            whose mode would change it.
    """
    name = args.opt_str(ORG_BITMAP)
    mode = args.opt_str(ORG_BITMAP_MODE)
    if name is None and mode is None:
        return sync, None, None
    if sync in ("bitmap", "incremental") and name is None:
        raise BlockMirrorError(f"Must provide a valid bitmap name for '{sync}' sync mode")
    if sync == "incremental":
        if mode is not None and mode != "on-success":
            raise BlockMirrorError("Bitmap sync mode must be 'on-success' when using sync "
                                   "mode 'incremental'")
        sync, mode = "bitmap", "on-success"
    if name is None:
        raise BlockMirrorError("Cannot specify bitmap sync mode without a bitmap")
    if sync != "bitmap":
        raise BlockMirrorError(f"Sync mode '{sync}' not supported with bitmap.")
    if gran:
        raise BlockMirrorError("Granularity and bitmap cannot both be set")
    if mode is None:
        raise BlockMirrorError("bitmap-mode must be specified if a bitmap is provided")
    named = bs.bitmaps.get(name)
    if named is None:
        raise BlockMirrorError(f"Dirty bitmap '{name}' not found")
    named.check(Check.ALLOW_READONLY)
    # cf. mirror_start_job: a mode that rewrites the bitmap needs it writable too
    if mode != "never":
        named.check(Check.DEFAULT)
    return sync, named, mode


def _default_job_id(source: BlockNode) -> str:
    """cf. bdrv_get_device_name of the filter: the name of a BlockBackend using the source."""
    for c in source.parents:
        if isinstance(c.parent, BlockBackend) and c.parent.name:
            return c.parent.name
    return ""


async def mirror_common(
    ctx: CommandContext,
    args: Args,
    bs: BlockNode,
    target: BlockNode,
    sync: str,
    params: MirrorParams,
) -> None:
    """cf. blockdev_mirror_common + mirror_start, in QEMU's order."""
    graph = ctx.daemon.graph
    gran = args.get_int("granularity")
    if gran != 0 and (gran < 512 or gran > 64 * 1024 * 1024):
        raise BlockMirrorError(
            "Parameter 'granularity' expects a value in range [512B, 64MB]"
        )
    if gran & (gran - 1):
        raise BlockMirrorError("Parameter 'granularity' expects a power of 2")
    check_blocked(bs)
    check_blocked(target)
    sync, sync_bitmap, bitmap_mode = _sync_bitmap(args, bs, sync, gran)
    if sync_bitmap is not None:
        gran = sync_bitmap.granularity
    replaces = args.opt_str("replaces")
    if replaces is None:
        inner = bs.skip_implicit_filters()
        if inner is not bs:
            replaces = inner.name
    if replaces is not None:
        to_replace = graph.find_node(replaces)
        if to_replace is None:
            raise BlockMirrorError(f"Failed to find node with node-name='{replaces}'")
        for op in ("replace", "all"):
            reasons = to_replace.blockers.get(op)
            if reasons:
                raise BlockMirrorError(f"Node '{replaces}' is busy: {reasons[0]}")
        if not _can_replace(bs, to_replace):
            raise BlockMirrorError(
                f"Cannot replace '{replaces}' by a node mirrored from '{bs.name}', because it "
                "cannot be guaranteed that doing so would not lead to an abrupt change of "
                "visible data"
            )
        if bs.length() != to_replace.length():
            raise BlockMirrorError("cannot replace image with a mirror image of different size")
    if sync in ("incremental", "bitmap") and sync_bitmap is None:
        raise BlockMirrorError(f"Sync mode '{sync}' not supported")
    base = bs.skip_filters().backing if sync == "top" else None
    params.sync = sync
    params.granularity = gran
    params.buf_size = args.get_int("buf-size")
    params.speed = args.get_int("speed")
    params.on_source_error = args.get_str("on-source-error")
    params.on_target_error = args.get_str("on-target-error")
    params.copy_mode = args.get_str("copy-mode")
    params.replaces = replaces
    params.auto_finalize = args.get_bool("auto-finalize")
    params.auto_dismiss = args.get_bool("auto-dismiss")
    params.sync_bitmap = sync_bitmap
    params.bitmap_mode = bitmap_mode
    fname = params.filter_node_name
    if fname is not None:
        if not id_wellformed(fname) or len(fname) > 31:
            raise BlockMirrorError(f"Invalid node-name: '{fname}'")
        if graph.find_node(fname) is not None:
            raise BlockMirrorError(f"Duplicate nodes with node-name='{fname}'")
    params.converge = converge_policy(args)
    job_id = args.opt_str("job-id")
    if job_id is None:
        job_id = _default_job_id(bs)
    await _mirror_extensions(args, bs, target, sync, params)
    # nothing awaits between the resume checks and the job hooking the source
    start_mirror(ctx.daemon.jobs, job_id, bs, target, params, base=base)


async def _mirror_extensions(args: Args, bs: BlockNode, target: BlockNode, sync: str,
                             params: MirrorParams) -> None:
    """x-verify and x-resume-log (docs/resume.md); absent, nothing changes."""
    params.verify = args.get_bool("x-verify", False)
    path = args.opt_str("x-resume-log")
    store = args.opt_str("x-resume-store")
    if path is None and store is None:
        return
    if store not in (None, "file", "image"):
        raise BlockMirrorError(f"Parameter 'x-resume-store' does not accept value '{store}'")
    if store == "image":
        if path is not None:
            raise BlockMirrorError("Parameter 'x-resume-log' cannot be used with "
                                   "'x-resume-store': 'image'")
        path = ""
    elif path is None:
        raise BlockMirrorError("Parameter 'x-resume-log' is missing")
    if sync != "full":
        what = "x-resume-store" if store == "image" else "x-resume-log"
        raise BlockMirrorError(f"Parameter '{what}' requires sync mode 'full'")
    params.resume = await plan_resume(
        path, bs, target, params.granularity or default_granularity(target),
        store=store or "file", restart=args.get_bool("x-resume-restart", False),
        extents=args.opt_int("x-resume-extents"),
        extent_size=args.opt_int("x-resume-extent-size"))


@command("blockdev-mirror")
async def blockdev_mirror(ctx: CommandContext, args: Args) -> None:
    graph = ctx.daemon.graph
    bs = get_root_node(graph, args.get_str("device"))
    name = args.get_str("target")
    target = graph.lookup(name, name)
    sync = args.get_str("sync")
    params = MirrorParams(
        backing_mode=BackingMode.LEAVE,
        filter_node_name=args.opt_str("filter-node-name"),
        target_is_zero=args.get_bool("target-is-zero"),
    )
    await mirror_common(ctx, args, bs, target, sync, params)
