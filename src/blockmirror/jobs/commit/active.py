"""Active commit: a mirror of the active layer into its base, of job type ``commit``
(cf. block/mirror.c commit_active_start and mirror_start_job's ``target_is_backing`` parts).

The mirror engine does the work: ``MirrorJob`` with the target being the base, background
copy mode, both error policies set to ``on-error``, the backing chain left as it is, and
``target_is_backing`` (the base keeps its other readers; a shorter base is grown). What this
module adds is what QEMU's active commit has beyond a mirror: the job links on the nodes
between the top and the base (they disappear from the chain after the pivot), the initial
bitmap (everything allocated above the base, not only in the top layer), and the base opened
read-write for the duration of the start.
"""

from __future__ import annotations

from blockmirror.block.chain import is_allocated_above
from blockmirror.block.node import BlockNode, Perm
from blockmirror.block.reopen import set_read_only
from blockmirror.errors import BlockMirrorError
from blockmirror.jobs.commit.chain import grow
from blockmirror.jobs.commit.links import ChainPerms, JobLinks, filter_or_cow, find_overlay
from blockmirror.jobs.manager import JobManager
from blockmirror.jobs.mirror import BackingMode, MirrorJob, MirrorParams
from blockmirror.jobs.mirror.params import ZERO_INIT_STEP, align_down


class ActiveCommitJob(MirrorJob):
    job_type = "commit"

    def __init__(self, manager: JobManager, job_id: str, top: BlockNode, base: BlockNode,
                 params: MirrorParams) -> None:
        super().__init__(manager, job_id, top, base, params, base=base)
        self.links = JobLinks(manager.graph, self.job_type, job_id)
        self.chain_perms = ChainPerms(manager.graph)
        self.base_overlay = find_overlay(top, base)

    def add_intermediate_links(self) -> None:
        """cf. mirror_start_job: every node between the top and the base is the job's.

        Raises:
            BlockMirrorError: another user reads or writes one of them.
        """
        top, base = self.source, self.target
        overlay = self.base_overlay
        filtered_base = overlay.backing if overlay is not None else None
        self.chain_perms.relax(top, base)
        shared = Perm.WRITE_UNCHANGED | Perm.WRITE
        node = filter_or_cow(top)
        while node is not None and node is not base:
            if node is filtered_base:
                shared |= Perm.CONSISTENT_READ
            self.links.add("intermediate node", node, Perm.NONE, shared)
            node = filter_or_cow(node)

    def drop_links(self) -> None:
        self.links.remove_all()
        self.chain_perms.restore()

    async def run(self) -> None:
        """Grow a shorter base, mark what lies above it, then the mirror's run (cf. mirror_run
        and mirror_dirty_init with a base)."""
        if self.is_cancelled:
            return
        if self.target.length() < self.bdev_length:
            await grow(self.target, self.bdev_length)
        if self.bdev_length:
            await self._seed_above_base()
            if self.is_cancelled:
                return
        await super().run()

    async def _seed_above_base(self) -> None:
        step = align_down(ZERO_INIT_STEP, self.granularity)
        offset, length = 0, self.bdev_length
        while offset < length:
            await self.pause_point()
            if self.is_cancelled:
                return
            allocated, n = await is_allocated_above(self.source, self.base_overlay, True,
                                                    offset, min(step, length - offset))
            if allocated:
                self.dirty.bitmap.set_dirty(offset, n)
            offset += n

    async def prepare(self) -> None:
        self.drop_links()
        await super().prepare()

    async def abort(self) -> None:
        self.drop_links()
        await super().abort()


async def start_active_commit(manager: JobManager, job_id: str, *, top: BlockNode,
                              base: BlockNode, speed: int, on_error: str,
                              filter_node_name: str | None, auto_finalize: bool,
                              auto_dismiss: bool) -> ActiveCommitJob:
    """cf. commit_active_start + mirror_start_job, in QEMU's order.

    Raises:
        BlockMirrorError: QEMU's texts; failures after the job exists emit created/null.
    """
    base_read_only = base.read_only
    if base_read_only:
        await set_read_only(manager.graph, base, False)
    try:
        return await _start(manager, job_id, top, base, MirrorParams(
            sync="none", speed=speed, on_source_error=on_error, on_target_error=on_error,
            unmap=True, copy_mode="background", filter_node_name=filter_node_name,
            backing_mode=BackingMode.LEAVE, auto_finalize=auto_finalize,
            auto_dismiss=auto_dismiss, job_type="commit", target_is_backing=True))
    except BlockMirrorError:
        if base_read_only:
            try:
                await set_read_only(manager.graph, base, True)
            except BlockMirrorError:
                pass  # the original error is the one to report
        raise


async def _start(manager: JobManager, job_id: str, top: BlockNode, base: BlockNode,
                 params: MirrorParams) -> ActiveCommitJob:
    if top.skip_filters() is base.skip_filters():
        raise BlockMirrorError("Can't mirror node into itself")
    manager.check_new_id(job_id)
    job = ActiveCommitJob(manager, job_id, top, base, params)
    manager.add(job)
    job.attach_at_speed(params.speed)
    try:
        job.add_intermediate_links()
    except BlockMirrorError:
        job.drop_links()
        job.dispose_unstarted()
        await job.wiring.exit(pivot=False, release=lambda _redirect: None)
        raise
    job.start()
    return job


__all__ = ["ActiveCommitJob", "start_active_commit"]
