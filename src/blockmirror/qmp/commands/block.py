"""Node management commands: blockdev-add, blockdev-del, blockdev-create, with the QAPI types
they take (cf. qapi/block-core.json, QEMU 7.2), declared once so that argument validation and
query-qmp-schema both come from here.

Only the drivers blockmirror implements get their branch declared; the driver enum is QEMU's
whole list, so a misspelt driver still gets QEMU's "does not accept value" text.
"""

from __future__ import annotations

import logging
from typing import Any

from blockmirror.errors import BlockMirrorError
from blockmirror.qmp.registry import Args, CommandContext, command
from blockmirror.qmp.schema import alternate, enum, struct, union

log = logging.getLogger(__name__)

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

enum("SocketAddressType", ["inet", "unix", "vsock", "fd"])
struct("InetSocketAddress", {
    "host": "str", "port": "str", "*numeric": "bool", "*to": "uint16", "*ipv4": "bool",
    "*ipv6": "bool", "*keep-alive": "bool", "*mptcp": "bool",
})
struct("UnixSocketAddress", {"path": "str", "*abstract": "bool", "*tight": "bool"})
struct("VsockSocketAddress", {"cid": "str", "port": "str"})
struct("String", {"str": "str"})
union("SocketAddress", {"type": "SocketAddressType"}, "type", {
    "inet": "InetSocketAddress", "unix": "UnixSocketAddress", "vsock": "VsockSocketAddress",
    "fd": "String",
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


@command("blockdev-add", "BlockdevOptions", boxed=True)
async def blockdev_add(ctx: CommandContext, args: Args) -> None:
    from blockmirror.block.options import open_blockdev

    await open_blockdev(ctx.daemon.graph, args.as_dict())


@command("blockdev-del", {"node-name": "str"})
async def blockdev_del(ctx: CommandContext, args: Args) -> None:
    from blockmirror.block.options import delete_blockdev

    await delete_blockdev(ctx.daemon.graph, args.get_str("node-name"))


async def _create_image(ctx: CommandContext, options: dict[str, Any]) -> None:
    """cf. bdrv_co_create: run the driver's creation with already validated options."""
    from blockmirror.block import create as bcreate

    if options["driver"] == "file":
        await bcreate.create_file(options["filename"], options["size"],
                                  preallocation=options.get("preallocation", "off"),
                                  nocow=options.get("nocow", False))
        return
    if options["driver"] == "rbd":
        await bcreate.create_rbd(ctx.daemon.graph, options["location"], options["size"],
                                 options.get("cluster-size"))
        return
    # qcow2 over an existing protocol node: format the file that node opened
    ref = options["file"]
    if isinstance(ref, str):
        node = ctx.daemon.graph.lookup(ref, ref)
        filename = node.filename
    else:
        filename = ref.get("filename", "")
    opts: dict[str, Any] = {}
    for key, qkey in (("cluster-size", "cluster_size"), ("preallocation", "preallocation"),
                      ("lazy-refcounts", "lazy_refcounts"), ("refcount-bits", "refcount_bits"),
                      ("compression-type", "compression_type"), ("extended-l2", "extended_l2")):
        if key in options:
            opts[qkey] = options[key]
    if "version" in options:
        opts["compat"] = "0.10" if options["version"] == "v2" else "1.1"
    await bcreate.img_create(filename, "qcow2", options["size"],
                             backing_file=options.get("backing-file"),
                             backing_fmt=options.get("backing-fmt"), options=opts,
                             quiet=True, unsafe=True)


def _create_job_class() -> type[Any]:
    from blockmirror.jobs.job import Job

    class CreateJob(Job):
        """cf. block/create.c: a job of type "create", with manual dismiss."""

        job_type = "create"
        is_block_job = False

        def __init__(self, ctx: CommandContext, job_id: str, options: dict[str, Any]) -> None:
            super().__init__(ctx.daemon.jobs, job_id, auto_dismiss=False)
            self.ctx = ctx
            self.options = options

        async def run(self) -> None:
            # cf. blockdev_create_run: one unit of progress, done when the driver returns
            self.progress.set_remaining(1)
            try:
                await _create_image(self.ctx, self.options)
            except OSError as e:
                raise BlockMirrorError(e.strerror or "Input/output error") from e
            finally:
                self.progress.update(1)  # QEMU counts the step done even when it failed

    return CreateJob


@command("blockdev-create", {"job-id": "str", "options": "BlockdevCreateOptions"})
async def blockdev_create(ctx: CommandContext, args: Args) -> None:
    options: dict[str, Any] = args["options"]
    if options["driver"] not in ("file", "qcow2", "rbd"):
        raise BlockMirrorError("Driver does not support blockdev-create")
    mgr = ctx.daemon.jobs
    job_id = args.get_str("job-id")
    mgr.check_new_id(job_id)
    job = _create_job_class()(ctx, job_id, options)
    mgr.add(job)
    job.start()
