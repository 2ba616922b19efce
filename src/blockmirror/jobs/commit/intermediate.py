"""The intermediate commit job: copy ``top``..above ``base`` into ``base``, then drop those
nodes from the chain (cf. block/commit.c: commit_start, commit_run, commit_prepare/abort/clean).

Set-up, in QEMU's order: the job (JOB_STATUS_CHANGE created) with its link on the active
node, the base reopened read-write, a ``commit_top`` filter above ``top`` (so the overlay's
backing goes through it), a job link on every node from ``top`` down to the base (nobody else
may write them, or read them consistently, while the base changes under them), a link on the
base, a handle that writes the base, and one that reads ``top``. ``run`` copies every range
allocated above the base in 512 KiB steps under the rate limit and the ``on-error`` policy;
``prepare`` moves the filter's parents to the base and records the backing file name in the
overlay's header; ``abort`` takes the filter out again; ``clean`` puts a read-only base back.
"""

from __future__ import annotations

import logging

from blockmirror.block.chain import is_allocated_above
from blockmirror.block.graph import BlockGraph
from blockmirror.block.node import BlockBackend, BlockNode, Perm
from blockmirror.block.reopen import set_read_only
from blockmirror.errors import BlockIOError, BlockMirrorError
from blockmirror.jobs.blockjob import BlockJob
from blockmirror.jobs.commit.chain import CHUNK, close_unused, drop_intermediate, grow
from blockmirror.jobs.commit.filters import CommitTopDriver, insert_filter, remove_filter
from blockmirror.jobs.commit.links import ChainPerms, JobLinks, filter_or_cow, find_overlay
from blockmirror.jobs.manager import JobManager

log = logging.getLogger(__name__)

#: how QEMU names an anonymous BlockBackend in permission conflicts (the job's handles)
_UNNAMED = "an unnamed block device"


class CommitJob(BlockJob):
    job_type = "commit"

    def __init__(self, manager: JobManager, job_id: str, *, top: BlockNode, base: BlockNode,
                 on_error: str, backing_file: str | None, auto_finalize: bool,
                 auto_dismiss: bool) -> None:
        super().__init__(manager, job_id, auto_finalize=auto_finalize,
                         auto_dismiss=auto_dismiss)
        self.graph: BlockGraph = manager.graph
        self.top = top
        self.base = base
        self.on_error = on_error
        self.backing_file = backing_file
        self.links = JobLinks(self.graph, self.job_type, job_id)
        self.chain_perms = ChainPerms(self.graph)
        self.base_read_only = False
        self.filter: BlockNode | None = None
        #: the node just above the base (what "allocated above the base" stops at)
        self.base_overlay: BlockNode | None = None
        self._base_blk: BlockBackend | None = None
        self._top_blk: BlockBackend | None = None
        #: the nodes the commit takes out of the chain (closed when nobody uses them)
        self._dropped: list[BlockNode] = []

    # --- set-up -------------------------------------------------------------------------------

    async def setup(self, active: BlockNode, filter_node_name: str | None) -> None:
        """Everything commit_start does after creating the job (undone by ``undo_setup``).

        Raises:
            BlockMirrorError: reopen, filter name, permission conflicts.
        """
        graph, top, base = self.graph, self.top, self.base
        self.links.add("main node", active, Perm.NONE, Perm.all())
        base_size, top_size = base.length(), top.length()
        base_perms = Perm.CONSISTENT_READ | Perm.WRITE
        if base_size < top_size:
            base_perms |= Perm.RESIZE
        if base.read_only:
            await set_read_only(graph, base, False)
            self.base_read_only = True
        self.filter, _link = insert_filter(graph, CommitTopDriver, top, filter_node_name, {})
        self.base_overlay = find_overlay(top, base)
        assert self.base_overlay is not None
        filtered_base = self.base_overlay.backing
        self.chain_perms.relax(top, base)
        shared = Perm.WRITE_UNCHANGED | Perm.WRITE
        node: BlockNode | None = top
        while node is not None and node is not base:
            if node is filtered_base:
                # from here down only filters on the base: they may be read
                shared |= Perm.CONSISTENT_READ
            self.links.add("intermediate node", node, Perm.NONE, shared)
            self._dropped.append(node)
            node = filter_or_cow(node)
        self.links.add("base", base, Perm.NONE, Perm.all())
        blk = BlockBackend("", _UNNAMED, base_perms,
                           Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED)
        graph.attach(blk, base, "root", blk.perm, blk.shared)
        self._base_blk = blk
        top_blk = BlockBackend("", _UNNAMED, Perm.NONE, Perm.all())
        graph.attach(top_blk, top, "root", top_blk.perm, top_blk.shared)
        self._top_blk = top_blk

    async def undo_setup(self) -> None:
        """cf. commit_start's fail path (after the job's early failure)."""
        self._release_handles()
        if self.base_read_only:
            await self._base_read_only_again()
        self.links.remove_all()
        self.chain_perms.restore()
        if self.filter is not None:
            remove_filter(self.graph, self.filter)
            self.filter = None

    def _release_handles(self) -> None:
        for blk in (self._base_blk, self._top_blk):
            if blk is not None and blk.child is not None:
                self.graph.detach(blk.child)
        self._base_blk = self._top_blk = None

    async def _base_read_only_again(self) -> None:
        self.base_read_only = False
        try:
            await set_read_only(self.graph, self.base, True)
        except BlockMirrorError:
            log.exception("making the commit base %s read-only again", self.base.name)

    # --- the run ---------------------------------------------------------------------------------

    async def run(self) -> None:
        """cf. commit_run."""
        top, base = self.top, self.base
        length = top.length()
        self.progress.set_remaining(length)
        if base.length() < length:
            await grow(base, length)
        delay = 0
        offset = 0
        while offset < length:
            await self.sleep_ns(delay)
            if self.is_cancelled:
                return
            copy = False
            error_in_source = True
            try:
                copy, n = await is_allocated_above(top, self.base_overlay, True, offset,
                                                   min(CHUNK, length - offset))
                if copy:
                    data = await top.read(offset, n)
                    error_in_source = False
                    await base.write(offset, data)
            except BlockIOError as e:
                if self.error_action(self.on_error, error_in_source, e.errno) == "report":
                    raise
                continue  # "stop" paused the job; "ignore" retries the step
            self.progress.update(n)
            delay = self.limit.calculate_delay(n) if copy else 0
            offset += n

    # --- completion ------------------------------------------------------------------------------

    async def prepare(self) -> None:
        """cf. commit_prepare: the base's writer goes, the filter's parents move to the base."""
        self._release_handles()
        self.links.remove_all()
        self.chain_perms.restore()
        assert self.filter is not None
        await drop_intermediate(self.graph, self.filter, self.base, self.backing_file)

    async def abort(self) -> None:
        """cf. commit_abort: the filter goes (its parents back onto ``top``)."""
        self._release_handles()
        self.links.remove_all()
        self.chain_perms.restore()
        if self.filter is not None and self.filter.name in self.graph.nodes \
                and self.filter.parents:
            remove_filter(self.graph, self.filter)
            self.filter = None

    async def clean(self) -> None:
        """cf. commit_clean: a read-only base becomes read-only again; unused nodes close."""
        if self.base_read_only:
            await self._base_read_only_again()
        filt = self.filter
        if filt is not None and not filt.parents:
            # the committed chain hangs below the filter only: let it go with it
            remove_filter(self.graph, filt)
            self.filter = None
            await close_unused(self.graph, self._dropped)


async def start_commit(manager: JobManager, job_id: str, *, active: BlockNode, top: BlockNode,
                       base: BlockNode, speed: int, on_error: str, backing_file: str | None,
                       filter_node_name: str | None, auto_finalize: bool,
                       auto_dismiss: bool) -> CommitJob:
    """cf. commit_start: checks, the job, the graph set-up, the start.

    Raises:
        BlockMirrorError: QEMU's texts; failures after the job exists emit created/null.
    """
    if top.skip_filters() is base.skip_filters():
        raise BlockMirrorError("Invalid files for merge: top and base are the same")
    manager.check_new_id(job_id)
    job = CommitJob(manager, job_id, top=top, base=base, on_error=on_error,
                    backing_file=backing_file, auto_finalize=auto_finalize,
                    auto_dismiss=auto_dismiss)
    manager.add(job)
    try:
        if speed < 0:
            raise BlockMirrorError("Parameter 'speed' expects a non-negative value")
        job.limit.set_speed(speed)
        await job.setup(active, filter_node_name)
    except BlockMirrorError:
        job.dispose_unstarted()
        await job.undo_setup()
        raise
    job.start()
    return job


__all__ = ["CommitJob", "start_commit"]

