"""QMP job commands: block-job-* and job-*, and the job queries (declared in blockmirror.qapi).

Handlers only look the job up (with the family's error: DeviceNotActive ``Block job '%s' not
found`` for block-job-*, GenericError ``Job not found`` for job-*) and call the job core
(``jobs/job.py``), which applies the verb table. HMP's block_job_complete, block_job_cancel
and ``info block-jobs`` live here too.
"""

from __future__ import annotations

from typing import Any

from blockmirror.errors import BlockMirrorError
from blockmirror.jobs.job import Job
from blockmirror.jobs.mirror import MirrorJob
from blockmirror.jobs.status import JobVerb
from blockmirror.qmp.commands.mirror import converge_policy
from blockmirror.qmp.hmp import hmp_command
from blockmirror.qmp.registry import Args, CommandContext, command


def _block_job(ctx: CommandContext, device: str) -> Job:
    return ctx.daemon.jobs.get_block_job(device)


def _job(ctx: CommandContext, job_id: str) -> Job:
    return ctx.daemon.jobs.get_job(job_id)


# --- block-job-* ----------------------------------------------------------------------------------


@command("block-job-set-speed")
async def block_job_set_speed(ctx: CommandContext, args: Args) -> None:
    _block_job(ctx, args.get_str("device")).set_speed(args.get_int("speed"))


@command("block-job-cancel")
async def block_job_cancel(ctx: CommandContext, args: Args) -> None:
    device = args.get_str("device")
    force = args.get_bool("force", False)
    job = _block_job(ctx, device)
    if job.user_paused and not force:
        raise BlockMirrorError(f"The block job for device '{device}' is currently paused")
    await job.user_cancel(force)


@command("block-job-pause")
async def block_job_pause(ctx: CommandContext, args: Args) -> None:
    _block_job(ctx, args.get_str("device")).user_pause()


@command("block-job-resume")
async def block_job_resume(ctx: CommandContext, args: Args) -> None:
    _block_job(ctx, args.get_str("device")).user_resume()


@command("block-job-complete")
async def block_job_complete(ctx: CommandContext, args: Args) -> None:
    await _block_job(ctx, args.get_str("device")).complete()


@command("block-job-finalize")
async def block_job_finalize(ctx: CommandContext, args: Args) -> None:
    await _block_job(ctx, args.get_str("id")).finalize()


@command("block-job-dismiss")
async def block_job_dismiss(ctx: CommandContext, args: Args) -> None:
    _block_job(ctx, args.get_str("id")).dismiss()


@command("block-job-change")
async def block_job_change(ctx: CommandContext, args: Args) -> None:
    """cf. qmp_block_job_change (8.2+): only the mirror's copy-mode can change."""
    if args.opt_str("copy-mode") is None and not any(k.startswith("x-converge") for k in args):
        # QEMU's mirror branch requires it (checked with the arguments, before the job)
        raise BlockMirrorError("Parameter 'copy-mode' is missing")
    job = _block_job(ctx, args.get_str("id"))
    job.apply_verb(JobVerb.CHANGE)
    if not isinstance(job, MirrorJob):
        raise BlockMirrorError("Job type does not support change")
    mode = args.opt_str("copy-mode")
    # extension: x-converge* turns the forecast on or changes its policy
    policy = converge_policy(args)
    if mode is not None:
        job.set_copy_mode(mode)
    if policy is not None:
        job.set_convergence(policy)


# --- job-* ----------------------------------------------------------------------------------------


@command("job-cancel")
async def job_cancel(ctx: CommandContext, args: Args) -> None:
    # job-cancel always forces (cf. qmp_job_cancel)
    await _job(ctx, args.get_str("id")).user_cancel(True)


@command("job-pause")
async def job_pause(ctx: CommandContext, args: Args) -> None:
    _job(ctx, args.get_str("id")).user_pause()


@command("job-resume")
async def job_resume(ctx: CommandContext, args: Args) -> None:
    _job(ctx, args.get_str("id")).user_resume()


@command("job-complete")
async def job_complete(ctx: CommandContext, args: Args) -> None:
    await _job(ctx, args.get_str("id")).complete()


@command("job-finalize")
async def job_finalize(ctx: CommandContext, args: Args) -> None:
    await _job(ctx, args.get_str("id")).finalize()


@command("job-dismiss")
async def job_dismiss(ctx: CommandContext, args: Args) -> None:
    _job(ctx, args.get_str("id")).dismiss()


# --- queries ------------------------------------------------------------------------------------


@command("query-block-jobs")
async def query_block_jobs(ctx: CommandContext, args: Args) -> list[dict[str, Any]]:
    infos = ctx.daemon.jobs.query_block_jobs()
    if args.get_bool("x-progress", False):
        # extension: every mirror's itemised counters, after QEMU's members
        jobs = [j for j in ctx.daemon.jobs.jobs.values() if j.is_block_job]
        for job, info in zip(jobs, infos, strict=True):
            extra = getattr(job, "extension_info", None)
            if extra is not None:
                info.update(extra())
    return infos


@command("query-jobs")
async def query_jobs(ctx: CommandContext, args: Args) -> list[dict[str, Any]]:
    return ctx.daemon.jobs.query_jobs()


# --- HMP ------------------------------------------------------------------------------------------


@hmp_command("block_job_complete", "device", "stop an active background block operation")
async def hmp_block_job_complete(ctx: CommandContext, argv: list[str]) -> str:
    if not argv:
        return "block_job_complete: block device name expected\n"
    await _block_job(ctx, argv[0]).complete()
    return ""


@hmp_command("block_job_cancel", "[-f] device", "stop an active background block operation")
async def hmp_block_job_cancel(ctx: CommandContext, argv: list[str]) -> str:
    force = "-f" in argv
    rest = [a for a in argv if a != "-f"]
    if not rest:
        return "block_job_cancel: block device name expected\n"
    await block_job_cancel(ctx, Args({"device": rest[0], "force": force}))
    return ""


@hmp_command("info block-jobs", "", "show progress of ongoing block device operations")
async def hmp_info_block_jobs(ctx: CommandContext, argv: list[str]) -> str:
    jobs = ctx.daemon.jobs.query_block_jobs()
    if not jobs:
        return "No active jobs\n"
    return "".join(
        f"Type {j['type']}, device {j['device']}: Completed {j['offset']} of {j['len']} bytes, "
        f"speed limit {j['speed']} bytes/s\n"
        for j in jobs
    )
