"""QMP extension commands for switch-over groups of mirror jobs (``jobs/mirror/group.py``).

``x-block-job-group`` names READY-able mirror jobs that must switch over together;
``x-block-job-group-complete`` starts the switch-over (its end is announced by
``X_BLOCK_JOB_GROUP_COMPLETED`` and each member's BLOCK_JOB_COMPLETED or _CANCELLED);
``x-query-block-job-groups`` lists the groups still pending.
"""

from __future__ import annotations

from typing import Any

from blockmirror.errors import BlockMirrorError
from blockmirror.jobs.mirror import MirrorJob
from blockmirror.jobs.mirror.group import groups, make_group
from blockmirror.qmp.registry import Args, CommandContext, command


@command("x-block-job-group")
async def x_block_job_group(ctx: CommandContext, args: Args) -> None:
    manager = ctx.daemon.jobs
    members: list[MirrorJob] = []
    for job_id in args["jobs"]:
        job = manager.get_block_job(job_id)
        if not isinstance(job, MirrorJob):
            raise BlockMirrorError(f"Job '{job_id}' is not a mirror job")
        members.append(job)
    make_group(manager, args.get_str("group"), members)


@command("x-block-job-group-complete")
async def x_block_job_group_complete(ctx: CommandContext, args: Args) -> None:
    name = args.get_str("group")
    group = groups(ctx.daemon.jobs).get(name)
    if group is None:
        raise BlockMirrorError(f"Group '{name}' not found")
    await group.complete()


@command("x-query-block-job-groups")
async def x_query_block_job_groups(ctx: CommandContext, args: Args) -> list[dict[str, Any]]:
    return [g.info() for g in groups(ctx.daemon.jobs).values()]
