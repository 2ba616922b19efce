"""Node management commands: blockdev-add, blockdev-del and blockdev-create (cf. blockdev.c
and block/create.c); their types are declared in ``blockmirror.qapi.block_core``.
"""

from __future__ import annotations

import logging
from typing import Any

from blockmirror.block import create as bcreate
from blockmirror.block.options import delete_blockdev, open_blockdev
from blockmirror.errors import BlockMirrorError
from blockmirror.jobs.job import Job
from blockmirror.qmp.registry import Args, CommandContext, command

log = logging.getLogger(__name__)

@command("blockdev-add")
async def blockdev_add(ctx: CommandContext, args: Args) -> None:
    await open_blockdev(ctx.daemon.graph, args.as_dict(), validated=True)


@command("blockdev-del")
async def blockdev_del(ctx: CommandContext, args: Args) -> None:
    await delete_blockdev(ctx.daemon.graph, args.get_str("node-name"))


async def _create_image(ctx: CommandContext, options: dict[str, Any]) -> None:
    """cf. bdrv_co_create: run the driver's creation with already validated options."""
    if options["driver"] == "file":
        await bcreate.create_file(options["filename"], options["size"],
                                  preallocation=options.get("preallocation", "off"),
                                  nocow=options.get("nocow", False))
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


@command("blockdev-create")
async def blockdev_create(ctx: CommandContext, args: Args) -> None:
    options: dict[str, Any] = args["options"]
    if options["driver"] not in ("file", "qcow2"):
        raise BlockMirrorError("Driver does not support blockdev-create")
    mgr = ctx.daemon.jobs
    job_id = args.get_str("job-id")
    mgr.check_new_id(job_id)
    job = CreateJob(ctx, job_id, options)
    mgr.add(job)
    job.start()
