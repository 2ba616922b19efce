"""QMP x-blockdev-amend (cf. qmp_x_blockdev_amend in block/amend.c, QEMU 7.2): QEMU's checks,
then an ``amend`` job that runs to its end before the reply, as QEMU's does."""

from __future__ import annotations

from blockmirror.errors import BlockMirrorError
from blockmirror.jobs.amend import AmendJob
from blockmirror.qmp.registry import Args, CommandContext, command

#: the drivers whose nodes can be amended (QEMU 7.2: luks, qcow2; blockmirror has qcow2)
_AMENDABLE = frozenset({"qcow2"})


@command("x-blockdev-amend")
async def x_blockdev_amend(ctx: CommandContext, args: Args) -> None:
    daemon = ctx.daemon
    name = args.get_str("node-name")
    node = daemon.graph.find_node(name)
    if node is None:
        raise BlockMirrorError(f"Cannot find device='' nor node-name='{name}'")
    options = dict(args["options"])
    if node.format_name != options["driver"]:
        raise BlockMirrorError("x-blockdev-amend doesn't support changing the block driver")
    if node.format_name not in _AMENDABLE:
        raise BlockMirrorError("Driver does not support x-blockdev-amend")
    manager = daemon.jobs
    job_id = args.get_str("job-id")
    manager.check_new_id(job_id)
    job = AmendJob(manager, job_id, node, options, args.get_bool("force", False))
    manager.add(job)
    job.start()
    await job.wait_finished()
