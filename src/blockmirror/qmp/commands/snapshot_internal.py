"""QMP blockdev-snapshot-internal-sync and blockdev-snapshot-delete-internal-sync, and the
transaction action (cf. internal_snapshot_prepare/abort and
qmp_blockdev_snapshot_delete_internal_sync in blockdev.c, QEMU 7.2).

Checks run in QEMU's order with its texts; the node's writes are held while the snapshot
table changes (QEMU drains the node). The qcow2 work is ``block/drivers/qcow2/
snapshot_write.py``; other formats have no internal snapshots.
"""

from __future__ import annotations

import os
import time
from typing import Any

from blockmirror.block.drivers.qcow2 import Qcow2Driver
from blockmirror.block.drivers.qcow2.snapshot_write import (
    SnapshotEntry,
    create_snapshot,
    delete_snapshot,
    find,
    list_snapshots,
)
from blockmirror.block.node import BlockNode
from blockmirror.block.write_hold import hold_writes
from blockmirror.errors import BlockIOError, BlockMirrorError
from blockmirror.qmp.commands.mirror import get_root_node
from blockmirror.qmp.commands.transaction import (
    Action,
    TransactionProperties,
    register_action,
    run_transaction,
)
from blockmirror.qmp.registry import Args, CommandContext, command


def _check_blocked(node: BlockNode, op: str, device: str) -> None:
    for name in (op, "all"):
        reasons = node.blockers.get(name)
        if reasons:
            raise BlockMirrorError(f"Node '{device}' is busy: {reasons[0]}")


async def _prepare_internal(ctx: CommandContext, data: dict[str, Any],
                            props: TransactionProperties) -> Action:
    """cf. internal_snapshot_prepare: the snapshot is taken here; abort deletes it."""
    device, name = str(data["device"]), str(data["name"])
    bs = get_root_node(ctx.daemon.graph, device)
    hold = hold_writes(bs)
    await hold.__aenter__()
    try:
        _check_blocked(bs, "internal-snapshot", device)
        if bs.read_only:
            raise BlockMirrorError(f"Device '{device}' is read only")
        drv = bs.driver
        if not isinstance(drv, Qcow2Driver):
            raise BlockMirrorError(f"Block format '{bs.format_name}' used by device "
                                   f"'{device}' does not support internal snapshots")
        if not name:
            raise BlockMirrorError("Name is empty")
        if find(await list_snapshots(drv), None, name) is not None:
            raise BlockMirrorError(
                f"Snapshot with name '{name}' already exists on device '{device}'")
        now = time.time_ns()
        sec, usec = now // 1_000_000_000, now // 1000 % 1_000_000
        try:
            entry = await create_snapshot(drv, name, sec, usec * 1000,
                                          sec * 1_000_000_000 + usec * 1000)
        except BlockIOError as e:
            raise BlockMirrorError(f"Failed to create snapshot '{name}' on device '{device}': "
                                   f"{os.strerror(e.errno)}") from e
    except BaseException:
        await hold.__aexit__(None, None, None)
        raise

    async def abort() -> None:
        assert isinstance(drv, Qcow2Driver)
        try:
            await delete_snapshot(drv, entry.id_str, entry.name)
        except BlockMirrorError as e:
            print(f"Failed to delete snapshot with id '{entry.id_str}' and name "
                  f"'{entry.name}' on device '{device}' in abort: {e}", flush=True)

    async def clean() -> None:
        await hold.__aexit__(None, None, None)

    return Action(abort=abort, clean=clean)


register_action("blockdev-snapshot-internal-sync", _prepare_internal)


@command("blockdev-snapshot-internal-sync")
async def blockdev_snapshot_internal_sync(ctx: CommandContext, args: Args) -> None:
    await run_transaction(
        ctx, [{"type": "blockdev-snapshot-internal-sync", "data": args.as_dict()}], {})


@command("blockdev-snapshot-delete-internal-sync")
async def blockdev_snapshot_delete_internal_sync(ctx: CommandContext,
                                                 args: Args) -> dict[str, int | str]:
    """cf. qmp_blockdev_snapshot_delete_internal_sync."""
    device = args.get_str("device")
    snap_id, name = args.opt_str("id"), args.opt_str("name")
    bs = get_root_node(ctx.daemon.graph, device)
    if snap_id is None and name is None:
        raise BlockMirrorError("Name or id must be provided")
    _check_blocked(bs, "internal-snapshot-delete", device)
    drv = bs.driver
    if not isinstance(drv, Qcow2Driver):
        raise BlockMirrorError("Failed to get a snapshot list: Operation not supported")
    async with hold_writes(bs):
        entries = await list_snapshots(drv)
        index = find(entries, snap_id, name)
        if index is None:
            raise BlockMirrorError(
                f"Snapshot with id '{snap_id if snap_id is not None else 'null'}' and name "
                f"'{name if name is not None else 'null'}' does not exist on device "
                f"'{device}'")
        found: SnapshotEntry = entries[index]
        try:
            await delete_snapshot(drv, found.id_str, found.name)
        except BlockIOError as e:
            raise BlockMirrorError(f"Failed to delete snapshot: {e}") from e
    return found.info()
