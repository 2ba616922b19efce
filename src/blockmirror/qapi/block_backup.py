"""qapi/block-core.json, continued: backup block jobs and internal snapshots.

``blockdev-backup`` / ``drive-backup`` (handlers: ``qmp/commands/backup.py``, the job:
``jobs/backup/``) and ``blockdev-snapshot-internal-sync`` /
``blockdev-snapshot-delete-internal-sync`` (``qmp/commands/snapshot_internal.py``, the qcow2
side: ``block/drivers/qcow2/snapshot_write.py``), and ``x-blockdev-amend``, with QEMU 7.2's
members. Their transaction actions have branches in ``qapi/transaction.py``.
"""

from __future__ import annotations

from blockmirror.qapi.schema import command, enum, struct, union

# BitmapSyncMode is declared with the mirror's bitmap arguments (qapi/block_core.py)
struct("BackupPerf", {"*use-copy-range": "bool", "*max-workers": "int", "*max-chunk": "int"})
struct("BackupCommon", {
    "*job-id": "str", "device": "str", "sync": "MirrorSyncMode", "*speed": "int",
    "*bitmap": "str", "*bitmap-mode": "BitmapSyncMode", "*compress": "bool",
    "*on-source-error": "BlockdevOnError", "*on-target-error": "BlockdevOnError",
    "*auto-finalize": "bool", "*auto-dismiss": "bool", "*filter-node-name": "str",
    "*x-perf": "BackupPerf",
})
struct("DriveBackup", {"target": "str", "*format": "str", "*mode": "NewImageMode"},
       base="BackupCommon")
struct("BlockdevBackup", {"target": "str"}, base="BackupCommon")

_BACKUP_DOC = (
    "a `backup` job: point in time (guest writes copy the old data to the target first, "
    "through a `copy-before-write` filter named by `filter-node-name`); `sync` `full`, `top`, "
    "`none`, `bitmap`, `incremental` with `bitmap`/`bitmap-mode` (QEMU's checks and bitmap "
    "hand-over); `compress` writes data clusters compressed (qcow2; refused as QEMU refuses it "
    "for targets without compressed writes); `x-perf` `max-chunk`/`max-workers` are used "
    "(`use-copy-range` is accepted and ignored)")
command("blockdev-backup", "BlockdevBackup", doc=_BACKUP_DOC)
command("drive-backup", "DriveBackup",
        doc="creates the target (prints `Formatting ...`) in the source's format unless "
            "`mode=existing`; opened with `discard=unmap` and `detect-zeroes=unmap`; "
            + _BACKUP_DOC)

struct("BlockdevSnapshotInternal", {"device": "str", "name": "str"})
struct("SnapshotInfo", {
    "id": "str", "name": "str", "vm-state-size": "int", "date-sec": "int", "date-nsec": "int",
    "vm-clock-sec": "int", "vm-clock-nsec": "int", "*icount": "int",
})
command("blockdev-snapshot-internal-sync", "BlockdevSnapshotInternal",
        doc="qcow2 only: a new entry in the image's snapshot table (a copy of the L1 table, "
            "refcounts raised), listed by `qemu-img snapshot -l`")
command("blockdev-snapshot-delete-internal-sync", {"device": "str", "*id": "str", "*name": "str"},
        returns="SnapshotInfo",
        doc="by `id`, `name` or both; the clusters only the snapshot used are freed")

# --- x-blockdev-amend (qmp/commands/amend.py; the job: jobs/amend.py) ------------------------

enum("QCryptoBlockFormat", ["qcow", "luks"])
enum("QCryptoBlockLUKSKeyslotState", ["active", "inactive"])
struct("QCryptoBlockAmendOptionsLUKS", {
    "state": "QCryptoBlockLUKSKeyslotState", "*new-secret": "str", "*old-secret": "str",
    "*keyslot": "int", "*iter-time": "int", "*secret": "str",
})
union("QCryptoBlockAmendOptions", {"format": "QCryptoBlockFormat"}, "format",
      {"luks": "QCryptoBlockAmendOptionsLUKS"})
struct("BlockdevAmendOptionsLUKS", {}, base="QCryptoBlockAmendOptionsLUKS")
struct("BlockdevAmendOptionsQcow2", {"*encrypt": "QCryptoBlockAmendOptions"})
union("BlockdevAmendOptions", {"driver": "BlockdevDriver"}, "driver", {
    "luks": "BlockdevAmendOptionsLUKS", "qcow2": "BlockdevAmendOptionsQcow2",
})
command("x-blockdev-amend", {"job-id": "str", "node-name": "str",
                             "options": "BlockdevAmendOptions", "*force": "bool"},
        doc="an `amend` job (kept until dismissed, as QEMU's); qcow2 only, whose 7.2 "
            "options are only `encrypt`, refused as QEMU refuses it on an unencrypted image "
            "(`image is not encrypted, can't amend`; blockmirror opens no encrypted image)")

__all__: list[str] = []
