"""The stream job: copy what the backing chain above the base holds into the top node, then
make the base its backing (cf. block/stream.c: stream_start, stream_run, stream_prepare,
stream_clean).

Set-up, in QEMU's order: the top reopened read-write if needed, a ``copy-on-read`` filter
above it (before the job exists: a bad filter name creates no job), the job
(JOB_STATUS_CHANGE created) with its link on the filter, a reading handle on the filter, a
link on the top that lets nobody resize it, and a link on every node between the top and the
base that lets nobody write them (an NBD export writing one of them is a permission conflict
with QEMU's text). ``run`` walks the top in 512 KiB steps and copies each range the top does
not allocate but a node above the base does (serialised with guest writes by
``RangeGuard``); ``prepare`` drops the filter, points the top's backing at the base and
records the backing file name in its header; ``clean`` restores a read-only top.
"""

from __future__ import annotations

import errno
import logging

from blockmirror.block.chain import is_allocated_above
from blockmirror.block.graph import BlockGraph
from blockmirror.block.node import BlockBackend, BlockNode, Perm
from blockmirror.block.reopen import set_read_only
from blockmirror.errors import BlockIOError, BlockMirrorError
from blockmirror.jobs.blockjob import BlockJob
from blockmirror.jobs.commit.chain import CHUNK, close_unused, update_backing_name
from blockmirror.jobs.commit.filters import (
    CopyOnReadDriver,
    check_node_name,
    insert_filter,
    remove_filter,
)
from blockmirror.jobs.commit.links import ChainPerms, JobLinks, filter_or_cow, find_overlay
from blockmirror.jobs.commit.serialise import RangeGuard
from blockmirror.jobs.manager import JobManager

log = logging.getLogger(__name__)

_BASIC = Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED


class StreamJob(BlockJob):
    job_type = "stream"

    def __init__(self, manager: JobManager, job_id: str, *, top: BlockNode,
                 base_overlay: BlockNode, above_base: BlockNode, filter_node: BlockNode,
                 on_error: str, backing_file: str | None, top_read_only: bool,
                 auto_finalize: bool, auto_dismiss: bool) -> None:
        super().__init__(manager, job_id, auto_finalize=auto_finalize,
                         auto_dismiss=auto_dismiss)
        self.graph: BlockGraph = manager.graph
        self.top = top
        self.base_overlay = base_overlay
        self.above_base = above_base
        self.filter: BlockNode | None = filter_node
        self.on_error = on_error
        self.backing_file = backing_file
        self.top_read_only = top_read_only
        self.links = JobLinks(self.graph, self.job_type, job_id)
        self.chain_perms = ChainPerms(self.graph)
        self.guard = RangeGuard()
        self._blk: BlockBackend | None = None
        self._dropped: list[BlockNode] = []

    def setup(self) -> None:
        """cf. stream_start after block_job_create.

        Raises:
            BlockMirrorError: a permission conflict on the top or an intermediate node.
        """
        graph, filt = self.graph, self.filter
        assert filt is not None
        self.links.add("main node", filt, Perm.NONE, Perm.all())
        blk = BlockBackend("", "an unnamed block device", Perm.CONSISTENT_READ,
                           _BASIC | Perm.WRITE)
        graph.attach(blk, filt, "root", blk.perm, blk.shared)
        self._blk = blk
        self.links.add("active node", self.top, Perm.NONE, _BASIC | Perm.WRITE)
        base = filter_or_cow(self.above_base)
        node = filter_or_cow(self.top)
        while node is not None and node is not base:
            self.links.add("intermediate node", node, Perm.NONE, _BASIC)
            # nobody may write it now, so its backing link no longer lets others write
            # what lies below (cf. bdrv_default_perms_for_cow)
            self.chain_perms.unshare_writes_below(node)
            self._dropped.append(node)
            node = filter_or_cow(node)
        self.top.interceptors.append(self.guard)

    # --- the run ---------------------------------------------------------------------------------

    async def run(self) -> None:
        """cf. stream_run."""
        unfiltered = self.top.skip_filters()
        if unfiltered is self.base_overlay:
            return  # nothing to stream
        self.guard.own()
        length = self.top.length()
        self.progress.set_remaining(length)
        delay = 0
        offset = 0
        error = 0
        while offset < length:
            await self.sleep_ns(delay)
            if self.is_cancelled:
                break
            copy = False
            n = 0
            try:
                step = await self._step(unfiltered, offset, length)
                n = abs(step)
                if step < 0:
                    copy = True
                    await self._populate(unfiltered, offset, n)
            except BlockIOError as e:
                action = self.error_action(self.on_error, True, e.errno)
                if action == "stop":
                    continue
                if error == 0:
                    error = e.errno
                if action == "report":
                    break
            self.progress.update(n)
            delay = self.limit.calculate_delay(n) if copy else 0
            offset += n
            if n == 0:
                break
        if error:
            # an error left behind (even an ignored one) keeps the backing file
            raise BlockIOError(error)

    async def _step(self, unfiltered: BlockNode, offset: int, length: int) -> int:
        """The next range: ``-n`` to copy ``n`` bytes, ``n`` to skip them."""
        allocated, n = await is_allocated_above(unfiltered, unfiltered, True, offset,
                                                min(CHUNK, length - offset))
        if allocated:
            return n
        below = unfiltered.backing
        if below is None:
            return n
        copy, m = await is_allocated_above(below, self.base_overlay, True, offset, n)
        if not copy and m == 0:
            return length - offset  # past the end of the backing chain
        return -m if copy else m

    async def _populate(self, unfiltered: BlockNode, offset: int, n: int) -> None:
        """cf. stream_populate through copy-on-read: what the top still lacks comes up."""
        async with self.guard.copying(offset, n):
            pos, end = offset, offset + n
            while pos < end:
                allocated, m = await is_allocated_above(unfiltered, unfiltered, True, pos,
                                                        end - pos)
                if not allocated:
                    data = await unfiltered.read(pos, m)
                    await unfiltered.write(pos, data)
                pos += m

    # --- completion ------------------------------------------------------------------------------

    def _drop_filter(self) -> None:
        filt, self.filter = self.filter, None
        if filt is not None and filt.name in self.graph.nodes:
            remove_filter(self.graph, filt)

    def _release(self) -> None:
        if self.guard in self.top.interceptors:
            self.top.interceptors.remove(self.guard)
        blk, self._blk = self._blk, None
        if blk is not None and blk.child is not None:
            self.graph.detach(blk.child)

    async def prepare(self) -> None:
        """cf. stream_prepare: the filter goes, the base becomes the top's backing."""
        self._release()
        self._drop_filter()
        unfiltered = self.top.skip_filters()
        base = filter_or_cow(self.above_base)
        self.links.remove_all()
        self.chain_perms.restore()
        if unfiltered.backing is None:
            return
        ubase = base.skip_filters() if base is not None else None
        name = ""
        if ubase is not None:
            name = self.backing_file if self.backing_file is not None else ubase.filename
        try:
            old = unfiltered.children.get("backing")
            if old is not None:
                self.graph.detach(old)
            if base is not None:
                # what a format takes on its backing (cf. bdrv_default_perms_for_cow)
                self.graph.attach(unfiltered, base, "backing", Perm.CONSISTENT_READ,
                                  Perm.all())
            if unfiltered.format_name == "qcow2":
                await update_backing_name(self.graph, unfiltered, name,
                                          ubase.format_name if ubase is not None else "")
        except BlockMirrorError as e:
            log.error("%s", e)
            raise BlockIOError(errno.EPERM) from e

    async def clean(self) -> None:
        """cf. stream_clean: the filter and handle go, a read-only top is read-only again."""
        self._release()
        self._drop_filter()
        self.links.remove_all()
        self.chain_perms.restore()
        await close_unused(self.graph, self._dropped)
        if self.top_read_only:
            try:
                await set_read_only(self.graph, self.top, True)
            except BlockMirrorError:
                log.exception("making %s read-only again", self.top.name)


def _above_base(top: BlockNode, base: BlockNode | None, bottom: BlockNode | None
                ) -> tuple[BlockNode, BlockNode]:
    """cf. stream_start: (base_overlay, above_base)."""
    if bottom is not None:
        return bottom, bottom
    overlay = find_overlay(top, base)
    if overlay is None:
        assert base is not None
        raise BlockMirrorError(f"'{base.name}' is not in the backing chain of '{top.name}'")
    above = overlay
    if overlay.backing is not base:
        nxt = overlay.backing
        while nxt is not None and nxt.filtered_child() is not base:
            nxt = nxt.filtered_child()
        if nxt is not None:
            above = nxt
    return overlay, above


async def start_stream(manager: JobManager, job_id: str | None, *, top: BlockNode,
                       base: BlockNode | None, bottom: BlockNode | None, speed: int,
                       on_error: str, backing_file: str | None, filter_node_name: str | None,
                       auto_finalize: bool, auto_dismiss: bool,
                       default_id: str) -> StreamJob:
    """cf. stream_start, in QEMU's order (``default_id``: the device name the filter gets).

    Raises:
        BlockMirrorError: QEMU's texts; failures after the job exists emit created/null.
    """
    graph = manager.graph
    base_overlay, above_base = _above_base(top, base, bottom)
    top_read_only = top.read_only
    if top_read_only:
        await set_read_only(graph, top, False)
    filt: BlockNode | None = None
    job: StreamJob | None = None
    try:
        opts: dict[str, object] = {"file": top.name, "bottom": base_overlay.name}
        if filter_node_name is not None:
            try:
                check_node_name(graph, filter_node_name)
            except BlockMirrorError as e:
                raise BlockMirrorError(f"Could not create node: {e}") from e
        filt, _link = insert_filter(graph, CopyOnReadDriver, top, filter_node_name, opts)
        jid = job_id if job_id is not None else default_id
        manager.check_new_id(jid)
        job = StreamJob(manager, jid, top=top, base_overlay=base_overlay,
                        above_base=above_base, filter_node=filt, on_error=on_error,
                        backing_file=backing_file, top_read_only=top_read_only,
                        auto_finalize=auto_finalize, auto_dismiss=auto_dismiss)
        manager.add(job)
        if speed < 0:
            raise BlockMirrorError("Parameter 'speed' expects a non-negative value")
        job.limit.set_speed(speed)
        job.setup()
    except BlockMirrorError:
        if job is not None:
            job._release()
            job.links.remove_all()
            job.chain_perms.restore()
            job.dispose_unstarted()
        if filt is not None and filt.name in graph.nodes:
            remove_filter(graph, filt)
        if top_read_only:
            try:
                await set_read_only(graph, top, True)
            except BlockMirrorError:
                pass  # the original error is the one to report
        raise
    job.start()
    return job


__all__ = ["StreamJob", "start_stream"]
