"""QMP blockdev-backup and drive-backup, and their transaction actions (cf. blockdev.c
blockdev_backup_prepare, drive_backup_prepare and do_backup_common, QEMU 7.2).

Like QEMU, a plain command is a transaction of one action: prepare drains the source (our
emulation: a job created while its source is drained is paused before it starts), commit
starts the job, which stops at its first pause point, and clean ends the drain, resuming the
jobs in QEMU's order. Hence a backup starts with ``created``, ``running``, ``paused``,
``running`` before the reply, as QEMU's does. With ``completion-mode=grouped`` the jobs of one
transaction share a ``BackupTxn``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from blockmirror.block import bitmaps, io
from blockmirror.block.create import img_create
from blockmirror.block.node import BlockNode, Perm
from blockmirror.block.options import close_node, open_image
from blockmirror.errors import BlockMirrorError
from blockmirror.jobs.backup import BackupJob, BackupParams, BackupTxn, SyncBitmap, create_backup
from blockmirror.qapi.block_core import BitmapSyncMode
from blockmirror.qmp.commands.transaction import (
    Action,
    TransactionProperties,
    register_action,
    run_transaction,
)
from blockmirror.qmp.registry import Args, CommandContext, command

# --- the drained section (cf. bdrv_drained_begin/end on the source) ---------------------------


@dataclass
class _Drain:
    count: int = 0
    #: jobs created while the node was drained: paused until the drain ends
    jobs: list[BackupJob] = field(default_factory=list)


_DRAINS: dict[int, _Drain] = {}


def _drained_begin(node: BlockNode) -> None:
    _DRAINS.setdefault(id(node), _Drain()).count += 1


def _drain_adopt(node: BlockNode, job: BackupJob) -> None:
    drain = _DRAINS.get(id(node))
    if drain is not None:
        job.pause()
        drain.jobs.append(job)


async def _drained_end(node: BlockNode) -> None:
    drain = _DRAINS.get(id(node))
    if drain is None:
        return
    drain.count -= 1
    if drain.count:
        return
    del _DRAINS[id(node)]
    # the most recently attached job is resumed first, as QEMU walks a node's parents
    for job in reversed(drain.jobs):
        if job.status.value == "null":
            continue
        job.resume()
        if job.started:
            # the job leaves its pause point before the command returns
            for _ in range(10000):
                if not job.paused:
                    break
                await asyncio.sleep(0)


# --- do_backup_common -----------------------------------------------------------------------


def _check_blocked(node: BlockNode, op: str) -> None:
    """cf. bdrv_op_is_blocked for BACKUP_SOURCE / BACKUP_TARGET."""
    for name in (op, "all"):
        reasons = node.blockers.get(name)
        if reasons:
            raise BlockMirrorError(f"Node '{node.name}' is busy: {reasons[0]}")


def _sync_bitmap(ctx: CommandContext, data: dict[str, Any], bs: BlockNode
                 ) -> tuple[str, bitmaps.NamedBitmap | None, BitmapSyncMode | None]:
    """The checks of do_backup_common on ``sync``, ``bitmap`` and ``bitmap-mode``."""
    sync = str(data["sync"])
    name = data.get("bitmap")
    mode = data.get("bitmap-mode")
    if sync in ("bitmap", "incremental") and name is None:
        raise BlockMirrorError(f"must provide a valid bitmap name for '{sync}' sync mode")
    if sync == "incremental":
        if mode is not None and mode != BitmapSyncMode.ON_SUCCESS:
            raise BlockMirrorError(
                "Bitmap sync mode must be 'on-success' when using sync mode 'incremental'")
        sync, mode = "bitmap", BitmapSyncMode.ON_SUCCESS
    named: bitmaps.NamedBitmap | None = None
    if name is not None:
        named = bs.bitmaps.get(name)
        if named is None:
            raise BlockMirrorError(f"Bitmap '{name}' could not be found")
        if mode is None:
            raise BlockMirrorError("Bitmap sync mode must be given when providing a bitmap")
        named.check(bitmaps.Check.ALLOW_READONLY)
        if sync == "none":
            raise BlockMirrorError(
                f"sync mode '{sync}' does not produce meaningful bitmap outputs")
        if mode == BitmapSyncMode.NEVER and sync != "bitmap":
            raise BlockMirrorError(
                f"Bitmap sync mode '{mode}' has no meaningful effect when combined with sync "
                f"mode '{sync}'")
    if name is None and mode is not None:
        raise BlockMirrorError("Cannot specify bitmap sync mode without a bitmap")
    return sync, named, None if mode is None else BitmapSyncMode(mode)


def _do_backup_common(ctx: CommandContext, data: dict[str, Any], bs: BlockNode,
                      target: BlockNode, txn: BackupTxn | None, *,
                      owns_target: bool = False) -> BackupJob:
    """cf. do_backup_common + the checks of backup_job_create before the job exists."""
    perf = dict(data.get("x-perf") or {})
    max_workers = int(perf.get("max-workers", 64))
    max_chunk = int(perf.get("max-chunk", 0))
    sync, named, mode = _sync_bitmap(ctx, data, bs)
    if bs is target:
        raise BlockMirrorError("Source and target cannot be the same")
    compress = bool(data.get("compress", False))
    if compress and not io.supports_compressed_writes(target):
        # cf. bdrv_supports_compressed_writes; the name is the target's device name ('')
        raise BlockMirrorError("Compression is not supported for this drive ")
    _check_blocked(bs, "backup-source")
    _check_blocked(target, "backup-target")
    if max_workers < 1 or max_workers > 2**31 - 1:
        raise BlockMirrorError("max-workers must be between 1 and 2147483647")
    if max_chunk < 0:
        raise BlockMirrorError("max-chunk must be zero (which means no limit) or positive")
    sync_bitmap: SyncBitmap | None = None
    if named is not None:
        assert mode is not None
        if mode != BitmapSyncMode.NEVER:
            named.check(bitmaps.Check.DEFAULT)
        sync_bitmap = SyncBitmap(bs, named, mode)
    params = BackupParams(
        sync=sync, speed=int(data.get("speed", 0)),
        on_source_error=str(data.get("on-source-error", "report")),
        on_target_error=str(data.get("on-target-error", "report")),
        auto_finalize=bool(data.get("auto-finalize", True)),
        auto_dismiss=bool(data.get("auto-dismiss", True)),
        compress=compress, filter_node_name=data.get("filter-node-name"),
        max_chunk=max_chunk, max_workers=max_workers, bitmap=sync_bitmap, owns_target=owns_target,
    )
    job = create_backup(ctx.daemon.jobs, data.get("job-id"), bs, target, params)
    if txn is not None:
        txn.add(job)
    return job


# --- the actions --------------------------------------------------------------------------------

#: completion-mode=grouped: the BackupTxn of each running transaction (by its properties)
_GROUPS: dict[int, BackupTxn] = {}


def _group(props: TransactionProperties) -> BackupTxn | None:
    if props.completion_mode != "grouped":
        return None
    return _GROUPS.setdefault(id(props), BackupTxn())


def _forget_empty_group(props: TransactionProperties) -> None:
    """A prepare failed: a group with no job yet has no clean step to drop it."""
    txn = _GROUPS.get(id(props))
    if txn is not None and not txn.jobs:
        del _GROUPS[id(props)]


def _action(bs: BlockNode, job: BackupJob, props: TransactionProperties) -> Action:
    async def commit() -> None:
        job.start()
        await job.wait_quiet()  # at its first pause point (the drain holds it)

    async def abort() -> None:
        if not job.is_completed:  # a grouped job may have gone with another one
            await job.cancel(True)

    async def clean() -> None:
        _GROUPS.pop(id(props), None)
        await _drained_end(bs)

    return Action(commit=commit, abort=abort, clean=clean)


async def _prepare_blockdev_backup(ctx: CommandContext, data: dict[str, Any],
                                   props: TransactionProperties) -> Action:
    """cf. blockdev_backup_prepare."""
    graph = ctx.daemon.graph
    bs = graph.lookup(data["device"], data["device"])
    target = graph.lookup(data["target"], data["target"])

    async def create() -> BackupJob:
        return _do_backup_common(ctx, data, bs, target, _group(props))

    return await _prepare_drained(bs, props, create)


async def _prepare_drive_backup(ctx: CommandContext, data: dict[str, Any],
                                props: TransactionProperties) -> Action:
    """cf. drive_backup_prepare: create (unless mode=existing) and open the target."""
    bs = ctx.daemon.graph.lookup(data["device"], data["device"])
    return await _prepare_drained(bs, props, lambda: _drive_backup(ctx, data, bs, props))


async def _prepare_drained(bs: BlockNode, props: TransactionProperties,
                           create: Callable[[], Awaitable[BackupJob]]) -> Action:
    """The job ``create`` makes while ``bs`` is drained; a failure ends the drain."""
    _drained_begin(bs)
    try:
        job = await create()
    except BaseException:
        _forget_empty_group(props)
        await _drained_end(bs)
        raise
    _drain_adopt(bs, job)
    return _action(bs, job, props)


async def _drive_backup(ctx: CommandContext, data: dict[str, Any], bs: BlockNode,
                        props: TransactionProperties) -> BackupJob:
    daemon = ctx.daemon
    graph = daemon.graph
    mode = str(data.get("mode", "absolute-paths"))
    _check_blocked(bs, "backup-source")
    fmt = data.get("format")
    if fmt is None and mode != "existing":
        fmt = bs.format_name
    sync = str(data["sync"])
    source: BlockNode | None = None
    if sync == "top":
        source = bs.skip_filters().backing
        if source is None:
            sync = "full"
    if sync == "none":
        source = bs
    size = bs.length()
    filename = str(data["target"])
    if mode != "existing":
        assert fmt is not None
        if source is not None:
            explicit = source.skip_implicit_filters()
            await img_create(filename, fmt, size, backing_file=explicit.filename,
                             backing_fmt=explicit.format_name, unsafe=True,
                             printer=daemon.print_stdout)
        else:
            await img_create(filename, fmt, size, printer=daemon.print_stdout)
    # the target's backing chain is opened from its header, but with sync=none, where the
    # source itself becomes its backing (cf. BDRV_O_NO_BACKING and bdrv_set_backing_hd)
    target = await open_image(graph, filename, fmt, read_only=False, backing=sync != "none",
                              options={"discard": "unmap", "detect-zeroes": "unmap"})
    try:
        if sync == "none":
            graph.attach(target, bs, "backing", Perm.CONSISTENT_READ, Perm.all())
        return _do_backup_common(ctx, {**data, "sync": sync}, bs, target, _group(props),
                                 owns_target=True)
    except BaseException:
        if not any(True for _ in target.parents):
            await _close_unused(ctx, target)
        raise


async def _close_unused(ctx: CommandContext, node: BlockNode) -> None:
    backing = node.children.get("backing")
    if backing is not None:
        ctx.daemon.graph.detach(backing)
    await close_node(ctx.daemon.graph, node)


register_action("blockdev-backup", _prepare_blockdev_backup, grouped=True)
register_action("drive-backup", _prepare_drive_backup, grouped=True)


@command("blockdev-backup")
async def blockdev_backup(ctx: CommandContext, args: Args) -> None:
    await run_transaction(ctx, [{"type": "blockdev-backup", "data": args.as_dict()}], {})


@command("drive-backup")
async def drive_backup(ctx: CommandContext, args: Args) -> None:
    await run_transaction(ctx, [{"type": "drive-backup", "data": args.as_dict()}], {})
