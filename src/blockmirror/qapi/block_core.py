"""qapi/block-core.json: block nodes, their options and queries, block jobs and the mirror.

Only the drivers blockmirror implements get their BlockdevOptions branch declared; the driver
enum is QEMU's whole list, so a misspelt driver still gets QEMU's "does not accept value" text.
The StrEnums below are the schema enums the code uses by member.
"""

from __future__ import annotations

from enum import StrEnum

from blockmirror.qapi.schema import alternate, command, enum, event, qapi_enum, struct, union

BLOCKDEV_DRIVERS = [
    "blkdebug", "blklogwrites", "blkreplay", "blkverify", "bochs", "cloop", "compress",
    "copy-before-write", "copy-on-read", "dmg", "file", "snapshot-access", "ftp", "ftps",
    "gluster", "host_cdrom", "host_device", "http", "https", "iscsi", "luks", "nbd", "nfs",
    "null-aio", "null-co", "nvme", "parallels", "preallocate", "qcow", "qcow2", "qed",
    "quorum", "raw", "rbd", "replication", "ssh", "throttle", "vdi", "vhdx", "vmdk", "vpc",
    "vvfat",
]
enum("BlockdevDriver", BLOCKDEV_DRIVERS)
enum("BlockdevDiscardOptions", ["ignore", "unmap"])
enum("BlockdevDetectZeroesOptions", ["off", "on", "unmap"])
enum("BlockdevAioOptions", ["threads", "native", "io_uring"])
enum("OnOffAuto", ["auto", "on", "off"])
enum("BlockPermission", ["consistent-read", "write", "write-unchanged", "resize"])
struct("BlockdevCacheOptions", {"*direct": "bool", "*no-flush": "bool"})

struct("BlockdevOptionsFile", {
    "filename": "str", "*pr-manager": "str", "*locking": "OnOffAuto",
    "*aio": "BlockdevAioOptions", "*aio-max-batch": "int", "*drop-cache": "bool",
    "*x-check-cache-dropped": "bool",
})
struct("BlockdevOptionsGenericFormat", {"file": "BlockdevRef"})
struct("BlockdevOptionsGenericCOWFormat", {"*backing": "BlockdevRefOrNull"},
       base="BlockdevOptionsGenericFormat")
struct("BlockdevOptionsRaw", {"*offset": "int", "*size": "int"},
       base="BlockdevOptionsGenericFormat")
enum("Qcow2OverlapCheckMode", ["none", "constant", "cached", "all"])
struct("Qcow2OverlapCheckFlags", {
    "*template": "Qcow2OverlapCheckMode", "*main-header": "bool", "*active-l1": "bool",
    "*active-l2": "bool", "*refcount-table": "bool", "*refcount-block": "bool",
    "*snapshot-table": "bool", "*inactive-l1": "bool", "*inactive-l2": "bool",
    "*bitmap-directory": "bool",
})
alternate("Qcow2OverlapChecks", {"flags": "Qcow2OverlapCheckFlags",
                                 "mode": "Qcow2OverlapCheckMode"})
struct("BlockdevOptionsQcow2", {
    "*lazy-refcounts": "bool", "*pass-discard-request": "bool",
    "*pass-discard-snapshot": "bool", "*pass-discard-other": "bool",
    "*overlap-check": "Qcow2OverlapChecks", "*cache-size": "int", "*l2-cache-size": "int",
    "*l2-cache-entry-size": "int", "*refcount-cache-size": "int",
    "*cache-clean-interval": "int", "*data-file": "BlockdevRef",
}, base="BlockdevOptionsGenericCOWFormat")
struct("BlockdevOptionsThrottle", {"throttle-group": "str", "file": "BlockdevRef"})
struct("BlockdevOptionsNull", {"*size": "int", "*latency-ns": "uint64", "*read-zeroes": "bool"})

enum("BlkdebugEvent", [
    "l1_update", "l1_grow_alloc_table", "l1_grow_write_table", "l1_grow_activate_table",
    "l2_load", "l2_update", "l2_update_compressed", "l2_alloc_cow_read", "l2_alloc_write",
    "read_aio", "read_backing_aio", "read_compressed", "write_aio", "write_compressed",
    "vmstate_load", "vmstate_save", "cow_read", "cow_write", "reftable_load",
    "reftable_grow", "reftable_update", "refblock_load", "refblock_update",
    "refblock_update_part", "refblock_alloc", "refblock_alloc_hookup", "refblock_alloc_write",
    "refblock_alloc_write_blocks", "refblock_alloc_write_table",
    "refblock_alloc_switch_table", "cluster_alloc", "cluster_alloc_bytes", "cluster_free",
    "flush_to_os", "flush_to_disk", "pwritev_rmw_head", "pwritev_rmw_after_head",
    "pwritev_rmw_tail", "pwritev_rmw_after_tail", "pwritev", "pwritev_zero", "pwritev_done",
    "empty_image_prepare", "l1_shrink_write_table", "l1_shrink_free_l2_clusters",
    "cor_write", "cluster_alloc_space", "none",
])
enum("BlkdebugIOType", ["read", "write", "write-zeroes", "discard", "flush", "block-status"])
struct("BlkdebugInjectErrorOptions", {
    "event": "BlkdebugEvent", "*state": "int", "*iotype": "BlkdebugIOType", "*errno": "int",
    "*sector": "int", "*once": "bool", "*immediately": "bool",
})
struct("BlkdebugSetStateOptions", {"event": "BlkdebugEvent", "*state": "int",
                                   "new_state": "int"})
struct("BlockdevOptionsBlkdebug", {
    "image": "BlockdevRef", "*config": "str", "*align": "int", "*max-transfer": "int32",
    "*opt-write-zero": "int32", "*max-write-zero": "int32", "*opt-discard": "int32",
    "*max-discard": "int32", "*inject-error": ["BlkdebugInjectErrorOptions"],
    "*set-state": ["BlkdebugSetStateOptions"], "*take-child-perms": ["BlockPermission"],
    "*unshare-child-perms": ["BlockPermission"],
})

struct("BlockdevOptionsNbd", {
    "server": "SocketAddress", "*export": "str", "*bitmap": "str", "*tls-creds": "str",
    "*tls-hostname": "str", "*x-dirty-bitmap": "str", "*reconnect-delay": "uint32",
    "*open-timeout": "uint32",
})

enum("RbdAuthMode", ["cephx", "none"])
struct("InetSocketAddressBase", {"host": "str", "port": "str"})
struct("BlockdevOptionsRbd", {
    "pool": "str", "*namespace": "str", "image": "str", "*conf": "str", "*snapshot": "str",
    "*user": "str", "*auth-client-required": ["RbdAuthMode"], "*key-secret": "str",
    "*server": ["InetSocketAddressBase"],
})

union("BlockdevOptions", {
    "driver": "BlockdevDriver", "*node-name": "str", "*discard": "BlockdevDiscardOptions",
    "*cache": "BlockdevCacheOptions", "*read-only": "bool", "*auto-read-only": "bool",
    "*force-share": "bool", "*detect-zeroes": "BlockdevDetectZeroesOptions",
}, "driver", {
    "blkdebug": "BlockdevOptionsBlkdebug", "file": "BlockdevOptionsFile",
    "host_device": "BlockdevOptionsFile", "nbd": "BlockdevOptionsNbd",
    "null-aio": "BlockdevOptionsNull", "null-co": "BlockdevOptionsNull",
    "qcow2": "BlockdevOptionsQcow2", "raw": "BlockdevOptionsRaw",
    "throttle": "BlockdevOptionsThrottle",
    "rbd": "BlockdevOptionsRbd",
})
alternate("BlockdevRef", {"definition": "BlockdevOptions", "reference": "str"})
alternate("BlockdevRefOrNull", {"definition": "BlockdevOptions", "reference": "str",
                                "null": "null"})

# blockdev-create
enum("PreallocMode", ["off", "metadata", "falloc", "full"])
enum("BlockdevQcow2Version", ["v2", "v3"])
enum("Qcow2CompressionType", ["zlib", "zstd"])
struct("BlockdevCreateOptionsFile", {
    "filename": "str", "size": "size", "*preallocation": "PreallocMode", "*nocow": "bool",
    "*extent-size-hint": "size",
})
struct("BlockdevCreateOptionsQcow2", {
    "file": "BlockdevRef", "*data-file": "BlockdevRef", "*data-file-raw": "bool",
    "*extended-l2": "bool", "size": "size", "*version": "BlockdevQcow2Version",
    "*backing-file": "str", "*backing-fmt": "BlockdevDriver", "*cluster-size": "size",
    "*preallocation": "PreallocMode", "*lazy-refcounts": "bool", "*refcount-bits": "int",
    "*compression-type": "Qcow2CompressionType",
})
struct("BlockdevCreateOptionsRbd", {
    "location": "BlockdevOptionsRbd", "size": "size", "*cluster-size": "size",
})
union("BlockdevCreateOptions", {"driver": "BlockdevDriver"}, "driver", {
    "file": "BlockdevCreateOptionsFile", "qcow2": "BlockdevCreateOptionsQcow2",
    "rbd": "BlockdevCreateOptionsRbd",
})

# --- dirty bitmaps (handlers: qmp/commands/bitmaps.py) ---------------------------------------

struct("BlockDirtyInfo", {
    "*name": "str", "count": "int", "granularity": "uint32", "recording": "bool",
    "busy": "bool", "persistent": "bool", "*inconsistent": "bool",
})
struct("BlockDirtyBitmap", {"node": "str", "name": "str"})
struct("BlockDirtyBitmapAdd", {
    "*granularity": "uint32", "*persistent": "bool", "*disabled": "bool",
}, base="BlockDirtyBitmap")
alternate("BlockDirtyBitmapOrStr", {"local": "str", "external": "BlockDirtyBitmap"})
struct("BlockDirtyBitmapMerge", {
    "node": "str", "target": "str", "bitmaps": ["BlockDirtyBitmapOrStr"],
})
struct("BlockDirtyBitmapSha256", {"sha256": "str"})
command("block-dirty-bitmap-add", "BlockDirtyBitmapAdd",
        defaults={"persistent": False, "disabled": False},
        doc="granularity defaults to the cluster size within [4k, 64k]; `persistent` bitmaps "
            "live in the qcow2 bitmaps extension: loaded on open, marked in use while open, "
            "stored on close; left in use by a crash they load as `inconsistent`")
command("block-dirty-bitmap-remove", "BlockDirtyBitmap",
        doc="a persistent bitmap leaves the image at once")
command("block-dirty-bitmap-clear", "BlockDirtyBitmap")
command("block-dirty-bitmap-enable", "BlockDirtyBitmap")
command("block-dirty-bitmap-disable", "BlockDirtyBitmap")
command("block-dirty-bitmap-merge", "BlockDirtyBitmapMerge",
        doc="sources by name (on `node`) or `{node, name}`, any granularity, equal sizes")
command("x-debug-block-dirty-bitmap-sha256", "BlockDirtyBitmap",
        returns="BlockDirtyBitmapSha256")

# --- queries ----------------------------------------------------------------------------------

struct("BlockdevCacheInfo", {"writeback": "bool", "direct": "bool", "no-flush": "bool"})
struct("ImageInfo", {
    "filename": "str", "format": "str", "*dirty-flag": "bool", "*actual-size": "int",
    "virtual-size": "int", "*cluster-size": "int", "*encrypted": "bool",
    "*compressed": "bool", "*backing-filename": "str", "*full-backing-filename": "str",
    "*backing-filename-format": "str", "*snapshots": ["SnapshotInfo"],
    "*format-specific": "any", "*backing-image": "ImageInfo",
})
struct("BlockDeviceInfo", {
    "file": "str", "*node-name": "str", "ro": "bool", "drv": "str", "*backing_file": "str",
    "backing_file_depth": "int", "encrypted": "bool", "detect_zeroes": "str", "bps": "int",
    "bps_rd": "int", "bps_wr": "int", "iops": "int", "iops_rd": "int", "iops_wr": "int",
    "image": "ImageInfo", "cache": "BlockdevCacheInfo", "write_threshold": "int",
    "*dirty-bitmaps": ["BlockDirtyInfo"],
})
struct("BlockInfo", {"device": "str", "*qdev": "str", "type": "str", "removable": "bool",
                     "locked": "bool", "*inserted": "BlockDeviceInfo", "*tray_open": "bool"})
enum("XDbgBlockGraphNodeType", ["block-backend", "block-job", "block-driver"])
struct("XDbgBlockGraphNode", {"id": "uint64", "type": "XDbgBlockGraphNodeType", "name": "str"})
struct("XDbgBlockGraphEdge", {"parent": "uint64", "child": "uint64", "name": "str",
                              "perm": ["BlockPermission"], "shared-perm": ["BlockPermission"]})
struct("XDbgBlockGraph", {"nodes": ["XDbgBlockGraphNode"], "edges": ["XDbgBlockGraphEdge"]})


# --- block jobs ---------------------------------------------------------------------------------


@qapi_enum
class MirrorSyncMode(StrEnum):
    TOP = "top"
    FULL = "full"
    NONE = "none"
    INCREMENTAL = "incremental"
    BITMAP = "bitmap"


@qapi_enum
class BitmapSyncMode(StrEnum):
    """What a job's sync bitmap holds when the job ends (qapi/block-core.json)."""

    ON_SUCCESS = "on-success"
    NEVER = "never"
    ALWAYS = "always"


@qapi_enum
class NewImageMode(StrEnum):
    EXISTING = "existing"
    ABSOLUTE_PATHS = "absolute-paths"


@qapi_enum
class BlockdevOnError(StrEnum):
    REPORT = "report"
    IGNORE = "ignore"
    ENOSPC = "enospc"
    STOP = "stop"
    AUTO = "auto"


@qapi_enum
class MirrorCopyMode(StrEnum):
    BACKGROUND = "background"
    WRITE_BLOCKING = "write-blocking"


@qapi_enum
class BlockErrorAction(StrEnum):
    IGNORE = "ignore"
    REPORT = "report"
    STOP = "stop"


@qapi_enum
class BlockDeviceIoStatus(StrEnum):
    OK = "ok"
    FAILED = "failed"
    NOSPACE = "nospace"


enum("IoOperationType", ["read", "write"])
struct("BlockJobInfo", {
    "type": "JobType", "device": "str", "len": "int", "offset": "int", "busy": "bool",
    "paused": "bool", "speed": "int", "io-status": "BlockDeviceIoStatus", "ready": "bool",
    "status": "JobStatus", "auto-finalize": "bool", "auto-dismiss": "bool", "*error": "str",
    # QEMU 8.2+ (BlockJobInfoMirror, the branch of mirror jobs): a write-blocking mirror is
    # in sync and every guest write since reached the target
    "*actively-synced": "bool",
    # extensions (qapi/x_mirror.py), after QEMU's members: only for mirrors that use them
    "*x-convergence": "XMirrorConvergenceInfo", "*x-group": "str",
    # extension (mirror jobs): itemised byte counters that never go backwards
    "*x-copied": "int", "*x-zero-skipped": "int", "*x-redirtied": "int", "*x-verified": "int",
    "*x-resumed": "int", "*x-active-written": "int",
    # extension (mirror jobs with x-verify)
    "*x-verify-mismatches": "int", "*x-verify-unrepaired": "int", "*x-verify-digest": "str",
})

# --- commands ---------------------------------------------------------------------------------

command("blockdev-add", "BlockdevOptions",
        doc="drivers `file`, `host_device`, `raw`, `qcow2`, `null-co`, `null-aio`, `blkdebug`, "
            "`nbd`, `throttle`; nested or by-reference children; a qcow2's backing is opened "
            "from its header unless `backing: null`")
command("blockdev-del", {"node-name": "str"},
        doc="QEMU's checks and texts (in use, busy, not owned by the monitor)")
command("blockdev-create", {"job-id": "str", "options": "BlockdevCreateOptions"},
        doc="a job, for drivers `file` and `qcow2`; others: `Driver does not support "
            "blockdev-create`")
command("query-named-block-nodes", {"*flat": "bool"}, returns=["BlockDeviceInfo"],
        defaults={"flat": False})
command("query-block", returns=["BlockInfo"])
command("x-debug-query-block-graph", returns="XDbgBlockGraph")

#: the arguments drive-mirror and blockdev-mirror share, and their values when absent
_MIRROR_COMMON = {
    "*speed": "int", "*granularity": "uint32", "*buf-size": "int",
    "*on-source-error": "BlockdevOnError", "*on-target-error": "BlockdevOnError",
}
#: extension arguments of both mirror commands (docs/resume.md); absent: QEMU's behaviour
_MIRROR_EXTENSIONS = {
    "*x-resume-log": "str", "*x-resume-restart": "bool", "*x-resume-extents": "int",
    "*x-resume-extent-size": "int", "*x-verify": "bool", "*x-resume-store": "str",
}
#: downstream extension (Proxmox VE's mirror bitmap arguments, under our prefix): the job
#: starts from a named bitmap of the source (sync=bitmap, or incremental = bitmap + on-success)
ORG_BITMAP = "__org.blockmirror_bitmap"
ORG_BITMAP_MODE = "__org.blockmirror_bitmap-mode"
_MIRROR_BITMAP = {"*" + ORG_BITMAP: "str", "*" + ORG_BITMAP_MODE: "BitmapSyncMode"}
_MIRROR_BITMAP_DOC = (
    "; downstream extension (Proxmox VE's `bitmap`/`bitmap-mode`): `__org.blockmirror_bitmap` "
    "names a bitmap of the source that seeds the job (`sync` `bitmap`, or `incremental` = "
    "`bitmap` with mode `on-success`), busy while the job runs; "
    "`__org.blockmirror_bitmap-mode` (`never`, `on-success`, `always`) says what it holds "
    "afterwards")
_MIRROR_EXTENSIONS_DOC = (
    "; extensions: `x-resume-log` (path of the crash-safe resume sidecar: an existing one is "
    "resumed after identity checks, or refused), `x-resume-store` (`file`, the default: the "
    "sidecar at `x-resume-log`; `image`: kept inside the qcow2 source, without "
    "`x-resume-log`), `x-resume-restart` (start afresh over it), "
    "`x-resume-extents` / `x-resume-extent-size` (the activity log's bound, default 1024 x "
    "4 MiB), `x-verify` (compare source and target after READY, repair, digest; see "
    "docs/resume.md)")
MIRROR_DEFAULTS: dict[str, object] = {
    "speed": 0,
    "granularity": 0,  # 0: the target's cluster size, clamped to [4K, 64K]
    "buf-size": 0,  # 0: DEFAULT_MIRROR_BUF_SIZE
    "on-source-error": BlockdevOnError.REPORT,
    "on-target-error": BlockdevOnError.REPORT,
    "copy-mode": MirrorCopyMode.BACKGROUND,
    "auto-finalize": True,
    "auto-dismiss": True,
}
command("block-job-set-speed", {"device": "str", "speed": "int"})
command("block-job-cancel", {"device": "str", "*force": "bool"}, defaults={"force": False},
        doc="block-job lookup errors are DeviceNotActive `Block job '%s' not found`")
command("block-job-pause", {"device": "str"})
command("block-job-resume", {"device": "str"})
command("block-job-complete", {"device": "str"})
command("block-job-finalize", {"id": "str"})
command("block-job-dismiss", {"id": "str"})
#: extension arguments (qapi/x_mirror.py): the convergence forecast and policy of a mirror
_X_CONVERGE = {"*x-converge": "XConvergePolicy", "*x-converge-deadline": "int",
               "*x-converge-throttle": "int"}
command("block-job-change", {"id": "str", "type": "JobType", "*copy-mode": "MirrorCopyMode",
                             **_X_CONVERGE},
        doc="(QEMU 8.2) `type: mirror`, `copy-mode`: only `background` -> `write-blocking`; "
            "extension: `x-converge*` as for blockdev-mirror")
command("query-block-jobs", {"*x-progress": "bool"}, returns=["BlockJobInfo"],
        doc="QEMU 7.2's members (`offset`/`len`), and QEMU 8.2's `actively-synced` for mirror "
            "jobs; extension `x-progress: true` adds a mirror's "
            "monotonic byte counters after them (`x-copied`, `x-zero-skipped`, `x-redirtied`, "
            "`x-verified`, `x-resumed`, `x-active-written`), shown anyway for mirrors started "
            "with `x-resume-log` or `x-verify` (docs/resume.md)")
command("blockdev-mirror", {
    "*job-id": "str", "device": "str", "target": "str", "*replaces": "str",
    "sync": "MirrorSyncMode", **_MIRROR_COMMON, "*filter-node-name": "str",
    "*copy-mode": "MirrorCopyMode", "*auto-finalize": "bool", "*auto-dismiss": "bool",
    "*target-is-zero": "bool", **_MIRROR_EXTENSIONS, **_X_CONVERGE, **_MIRROR_BITMAP,
}, defaults={**MIRROR_DEFAULTS, "target-is-zero": False},
    doc="the drive-mirror job on an existing target node; plus `filter-node-name` and "
        "`target-is-zero` (QEMU 10.1)" + _MIRROR_EXTENSIONS_DOC
        + "; extension `x-converge`: forecast and policy" + _MIRROR_BITMAP_DOC)
command("drive-mirror", {
    "*job-id": "str", "device": "str", "target": "str", "*format": "str", "*node-name": "str",
    "*replaces": "str", "sync": "MirrorSyncMode", "*mode": "NewImageMode", **_MIRROR_COMMON,
    "*unmap": "bool", "*copy-mode": "MirrorCopyMode", "*auto-finalize": "bool",
    "*auto-dismiss": "bool", **_MIRROR_EXTENSIONS, **_X_CONVERGE, **_MIRROR_BITMAP,
}, defaults={**MIRROR_DEFAULTS, "unmap": True, "mode": NewImageMode.ABSOLUTE_PATHS},
    doc="creates the target (prints `Formatting ...` on stdout) in `raw` or `qcow2`; `mode` "
        "`absolute-paths` or `existing`; `sync` `full`, `top`, `none` (`top` without a backing "
        "becomes `full`); `replaces` needs `node-name`" + _MIRROR_EXTENSIONS_DOC
        + _MIRROR_BITMAP_DOC)

# --- commit and stream (qmp/commands/commit.py, jobs/commit/) ------------------------------------

command("block-commit", {
    "*job-id": "str", "device": "str", "*base-node": "str", "*base": "str",
    "*top-node": "str", "*top": "str", "*backing-file": "str", "*speed": "int",
    "*on-error": "BlockdevOnError", "*filter-node-name": "str", "*auto-finalize": "bool",
    "*auto-dismiss": "bool",
}, defaults={"speed": 0, "on-error": BlockdevOnError.REPORT, "auto-finalize": True,
             "auto-dismiss": True},
    doc="(QEMU 7.2) `top` below the active layer: a `commit` job that copies `top`..`base` "
        "into `base` and drops the nodes in between, writing `backing-file` (or the base's "
        "filename) into the overlay's header; `top` the active layer (or written by "
        "someone): active commit, a mirror job of type `commit` that goes READY and pivots "
        "to `base` on block-job-complete; `base`/`top` by filename (deprecated in QEMU)")
command("block-stream", {
    "*job-id": "str", "device": "str", "*base": "str", "*base-node": "str",
    "*backing-file": "str", "*bottom": "str", "*speed": "int", "*on-error": "BlockdevOnError",
    "*filter-node-name": "str", "*auto-finalize": "bool", "*auto-dismiss": "bool",
}, defaults={"speed": 0, "on-error": BlockdevOnError.REPORT, "auto-finalize": True,
             "auto-dismiss": True},
    doc="(QEMU 7.2) copies what the backing chain above `base` (or down to `bottom`) holds "
        "into `device` through a `copy-on-read` filter, then makes `base` its backing and "
        "writes `backing-file` (or the base's filename) into its header")

# --- events -------------------------------------------------------------------------------------

event("BLOCK_JOB_COMPLETED", {"type": "JobType", "device": "str", "len": "int", "offset": "int",
                              "speed": "int", "*error": "str"})
event("BLOCK_JOB_CANCELLED", {"type": "JobType", "device": "str", "len": "int", "offset": "int",
                              "speed": "int"})
event("BLOCK_JOB_ERROR", {"device": "str", "operation": "IoOperationType",
                          "action": "BlockErrorAction"})
event("BLOCK_JOB_READY", {"type": "JobType", "device": "str", "len": "int", "offset": "int",
                          "speed": "int"})
event("BLOCK_JOB_PENDING", {"type": "JobType", "id": "str"})
event("X_BLOCK_JOB_VERIFIED", {"device": "str", "verified": "int", "mismatches": "int",
                               "repaired": "int", "unrepaired": "int", "digest": "str"},
      doc="extension: a mirror with `x-verify` finished its final verification, under the "
          "drain just before the pivot; `digest` is XXH3-128 over the XXH3-64 digests of the "
          "target's chunks ('' if not every chunk could be checked)")

__all__ = ["BLOCKDEV_DRIVERS", "MIRROR_DEFAULTS", "ORG_BITMAP", "ORG_BITMAP_MODE",
           "BitmapSyncMode", "BlockDeviceIoStatus", "BlockErrorAction", "BlockdevOnError",
           "MirrorCopyMode", "MirrorSyncMode", "NewImageMode"]

# --- graph edits, node commands, statistics (qmp/commands/block_graph.py) ---------------------

struct("BlockdevSnapshotSync", {
    "*device": "str", "*node-name": "str", "snapshot-file": "str",
    "*snapshot-node-name": "str", "*format": "str", "*mode": "NewImageMode",
})
struct("BlockdevSnapshot", {"node": "str", "overlay": "str"})
struct("BlockDeviceTimedStats", {
    "interval_length": "int", "min_rd_latency_ns": "int", "max_rd_latency_ns": "int",
    "avg_rd_latency_ns": "int", "min_wr_latency_ns": "int", "max_wr_latency_ns": "int",
    "avg_wr_latency_ns": "int", "min_flush_latency_ns": "int", "max_flush_latency_ns": "int",
    "avg_flush_latency_ns": "int", "avg_rd_queue_depth": "number",
    "avg_wr_queue_depth": "number",
})
struct("BlockDeviceStats", {
    "rd_bytes": "int", "wr_bytes": "int", "unmap_bytes": "int", "rd_operations": "int",
    "wr_operations": "int", "unmap_operations": "int", "flush_operations": "int",
    "rd_total_time_ns": "int", "wr_total_time_ns": "int", "unmap_total_time_ns": "int",
    "flush_total_time_ns": "int", "wr_highest_offset": "int", "rd_merged": "int",
    "wr_merged": "int", "unmap_merged": "int", "*idle_time_ns": "int",
    "failed_rd_operations": "int", "failed_wr_operations": "int",
    "failed_unmap_operations": "int", "failed_flush_operations": "int",
    "invalid_rd_operations": "int", "invalid_wr_operations": "int",
    "invalid_unmap_operations": "int", "invalid_flush_operations": "int",
    "account_invalid": "bool", "account_failed": "bool",
    "timed_stats": ["BlockDeviceTimedStats"],
})
struct("BlockStatsSpecificFile", {"discard-nb-ok": "uint64", "discard-nb-failed": "uint64",
                                  "discard-bytes-ok": "uint64"})
union("BlockStatsSpecific", {"driver": "BlockdevDriver"}, "driver", {
    "file": "BlockStatsSpecificFile", "host_device": "BlockStatsSpecificFile",
})
struct("BlockStats", {
    "*device": "str", "*qdev": "str", "*node-name": "str", "stats": "BlockDeviceStats",
    "*driver-specific": "BlockStatsSpecific", "*parent": "BlockStats",
    "*backing": "BlockStats",
})

command("block_resize", {"*device": "str", "*node-name": "str", "size": "int"},
        doc="raw and qcow2 grow and shrink (qcow2: the clusters past the end are "
            "discarded); QEMU's errors")
command("blockdev-snapshot-sync", "BlockdevSnapshotSync",
        doc="a transaction of one action: the new overlay goes on top, its `backing` is the "
            "node, the node's users move to it, the old top becomes read-only")
command("blockdev-snapshot", "BlockdevSnapshot",
        doc="the same with an overlay added earlier (without a backing)")
command("change-backing-file", {"device": "str", "image-node-name": "str",
                                "backing-file": "str"},
        doc="rewrites the qcow2 header's backing file name and format; the graph stays")
command("block-set-write-threshold", {"node-name": "str", "write-threshold": "uint64"},
        doc="event `BLOCK_WRITE_THRESHOLD` once, then the threshold is 0")
command("query-blockstats", {"*query-nodes": "bool", "*__org.blockmirror_counters": "bool"},
        returns=["BlockStats"],
        defaults={"query-nodes": False, "__org.blockmirror_counters": False},
        doc="as QSD 7.2 (node counters 0 but `wr_highest_offset`); "
            "`__org.blockmirror_counters` gives the real per-node counters")
command("blockdev-reopen", {"options": ["BlockdevOptions"]},
        doc="`read-only` switches and `backing` changes (node name or null); runtime options "
            "are stored; another `file` child is refused")
event("BLOCK_WRITE_THRESHOLD", {"node-name": "str", "amount-exceeded": "uint64",
                                "write-threshold": "uint64"})

# the x-blockdev family (qmp/commands/x_blockdev.py)
alternate("StrOrNull", {"s": "str", "n": "null"})
command("x-blockdev-change", {"parent": "str", "*child": "str", "*node": "str"},
        doc="QEMU's checks and texts; no driver here takes or gives up children at run time "
            "(QEMU: quorum), so the last step always refuses, as QEMU does for other drivers")
command("x-blockdev-set-iothread", {"node-name": "str", "iothread": "StrOrNull",
                                    "*force": "bool"},
        defaults={"force": False},
        doc="an `--object iothread` id or null, with QEMU's checks; blockmirror runs every "
            "node in its one event loop, so a node changes nothing else")
