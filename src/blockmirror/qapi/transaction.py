"""qapi/transaction.json: ``transaction`` and its actions.

Each action kind that blockmirror implements has a branch here (its data type declared by the
module of its command) and a prepare function in the action table of
``qmp/commands/transaction.py``. A kind without a branch is refused by the handler.
"""

from __future__ import annotations

from blockmirror.qapi.schema import command, enum, struct, union

#: QEMU 7.2's TransactionActionKind, in its order
ACTION_KINDS = [
    "abort", "block-dirty-bitmap-add", "block-dirty-bitmap-remove", "block-dirty-bitmap-clear",
    "block-dirty-bitmap-enable", "block-dirty-bitmap-disable", "block-dirty-bitmap-merge",
    "blockdev-backup", "blockdev-snapshot", "blockdev-snapshot-internal-sync",
    "blockdev-snapshot-sync", "drive-backup",
]

enum("TransactionActionKind", ACTION_KINDS)
enum("ActionCompletionMode", ["individual", "grouped"])
struct("Abort", {})
struct("AbortWrapper", {"data": "Abort"})
struct("BlockdevSnapshotWrapper", {"data": "BlockdevSnapshot"})
struct("BlockdevSnapshotSyncWrapper", {"data": "BlockdevSnapshotSync"})
struct("BlockDirtyBitmapAddWrapper", {"data": "BlockDirtyBitmapAdd"})
struct("BlockDirtyBitmapWrapper", {"data": "BlockDirtyBitmap"})
struct("BlockDirtyBitmapMergeWrapper", {"data": "BlockDirtyBitmapMerge"})
struct("BlockdevBackupWrapper", {"data": "BlockdevBackup"})
struct("DriveBackupWrapper", {"data": "DriveBackup"})
struct("BlockdevSnapshotInternalWrapper", {"data": "BlockdevSnapshotInternal"})
struct("TransactionProperties", {"*completion-mode": "ActionCompletionMode"})
union("TransactionAction", {"type": "TransactionActionKind"}, "type", {
    "abort": "AbortWrapper",
    "block-dirty-bitmap-add": "BlockDirtyBitmapAddWrapper",
    "block-dirty-bitmap-remove": "BlockDirtyBitmapWrapper",
    "block-dirty-bitmap-clear": "BlockDirtyBitmapWrapper",
    "block-dirty-bitmap-enable": "BlockDirtyBitmapWrapper",
    "block-dirty-bitmap-disable": "BlockDirtyBitmapWrapper",
    "block-dirty-bitmap-merge": "BlockDirtyBitmapMergeWrapper",
    "blockdev-snapshot": "BlockdevSnapshotWrapper",
    "blockdev-snapshot-sync": "BlockdevSnapshotSyncWrapper",
    "blockdev-backup": "BlockdevBackupWrapper",
    "drive-backup": "DriveBackupWrapper",
    "blockdev-snapshot-internal-sync": "BlockdevSnapshotInternalWrapper",
})

command("transaction", {"actions": ["TransactionAction"],
                        "*properties": "TransactionProperties"},
        doc="actions `abort`, `block-dirty-bitmap-*`, `blockdev-snapshot`, "
            "`blockdev-snapshot-sync` (more register in the action table); all or nothing; "
            "`completion-mode`")

__all__ = ["ACTION_KINDS"]
