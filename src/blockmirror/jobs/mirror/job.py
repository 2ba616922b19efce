"""The mirror block job itself: wiring, QMP-facing hooks, the main loop (cf. block/mirror.c).

``start_mirror()`` builds the job the way ``mirror_start_job`` does: it inserts a ``mirror_top``
filter above the source, opens a root handle on the target, and hooks the source node with a
dirty tracker (every write from any parent marks the bitmap) and a write interceptor (active
mirroring in write-blocking mode, and the drain barrier at completion). ``MirrorJob.run`` is
QEMU's ``mirror_run``: seed the bitmap per sync mode (``seeding``), copy dirty chunks with up to
16 ops and ``buf_size`` bytes in flight (``ops``), go READY once a pass leaves nothing dirty or in
flight and a target flush succeeds, and on complete (or soft cancel) converge, drain, flush and
exit. ``prepare`` pivots the graph (``pivot``).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from blockmirror.block.drivers.mirror_top import make_filter_node
from blockmirror.block.node import BlockBackend, BlockNode, Perm
from blockmirror.errors import BlockMirrorError
from blockmirror.jobs.mirror.hooks import DirtyHook, Interceptor
from blockmirror.jobs.mirror.offload import CopyOffload
from blockmirror.jobs.mirror.params import BLOCKER_REASON, MAX_IN_FLIGHT, MirrorParams
from blockmirror.jobs.mirror.pivot import MirrorPivot
from blockmirror.jobs.ratelimit import SLICE_NS

if TYPE_CHECKING:
    from blockmirror.jobs.manager import JobManager


class MirrorJob(MirrorPivot):
    job_type = "mirror"

    def __init__(
        self,
        manager: JobManager,
        job_id: str,
        source: BlockNode,
        target: BlockNode,
        params: MirrorParams,
        *,
        base: BlockNode | None = None,
    ) -> None:
        super().__init__(manager, job_id, source, target, params, base=base)
        self._hook = DirtyHook(self)
        self._interceptor = Interceptor(self)

    # --- wiring (cf. mirror_start_job) ---------------------------------------------------------

    def attach(self) -> None:
        """Insert the filter, take the target, hook the source. Undone by ``_exit_common``.

        Raises:
            BlockMirrorError: permission conflicts, duplicate filter name.
        """
        graph = self.graph
        name = self.params.filter_node_name
        implicit = name is None
        filt = make_filter_node(name or graph.new_auto_name(), self.source, implicit)
        graph.add_node(filt)
        try:
            self._filter_link = graph.attach(
                filt, self.source, "backing", Perm.CONSISTENT_READ | Perm.WRITE, Perm.all()
            )
            graph.replace_node(self.source, filt, exclude=self._filter_link)
        except BlockMirrorError:
            if self._filter_link is not None:
                graph.detach(self._filter_link)
            graph.forget_node(filt)
            raise
        self.filter = filt
        blk = BlockBackend("", f"block job '{self.id}'", Perm.WRITE, Perm.WRITE_UNCHANGED)
        try:
            graph.attach(blk, self.target, "root", blk.perm, blk.shared)
        except BlockMirrorError:
            self._remove_filter()
            raise
        graph.add_backend(blk)
        self._target_blk = blk
        for node in (filt, self.source, self.target):
            node.block("all", BLOCKER_REASON)
            self._blocked.append(node)
        self.source.dirty_trackers.append(self._hook)
        self.source.interceptors.append(self._interceptor)

    # --- job hooks ------------------------------------------------------------------------------

    def on_cancel(self, force: bool) -> bool:
        """cf. mirror_cancel: before READY every cancel is forced."""
        return force or not self.is_ready

    def supports_complete(self) -> bool:
        return True

    async def on_complete(self) -> None:
        """cf. mirror_complete."""
        if self.params.replaces is not None:
            node = self.graph.find_node(self.params.replaces)
            if node is None:
                raise BlockMirrorError(f"Node name '{self.params.replaces}' not found")
            node.block("all", "block device is in use by block-job-complete")
            self._to_replace = node
        self.should_complete = True
        if not self.paused:
            self._enter()

    async def on_pause(self) -> None:
        """cf. mirror_pause: a paused job has no I/O of its own in flight."""
        await self._wait_all_io()

    def set_copy_mode(self, mode: str) -> None:
        """cf. mirror_change (block-job-change): only background -> write-blocking."""
        if mode == self.copy_mode:
            return
        if mode != "write-blocking":
            raise BlockMirrorError(f"Change to copy mode '{mode}' is not implemented")
        if self.copy_mode != "background":
            raise BlockMirrorError(
                f"Expected current copy mode 'background', got '{self.copy_mode}'"
            )
        self.copy_mode = mode

    # --- the run ----------------------------------------------------------------------------------

    async def run(self) -> None:
        """cf. mirror_run."""
        if self.target.length() != self.bdev_length:
            raise BlockMirrorError("Source and target image have different sizes")
        if self.bdev_length == 0:
            self.published = True
            self.transition_to_ready()
            self.actively_synced = True
            while not self.cancel_requested and not self.should_complete:
                await self._yield(None)
                await self.pause_point()
            self._hold_drain()
            return
        self._setup_cow()
        self._offload = CopyOffload.for_nodes(self.source, self.target)
        drained = False
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            try:
                if self.params.sync != "none":
                    await self._dirty_init()
                    if self.is_cancelled or self.ret < 0:
                        return
                self.published = True
                drained = await self._loop()
            finally:
                await self._wait_all_io()
                self._tg = None
        if not drained:
            # failed or force-cancelled: still hold writes off until the filter is gone
            self._hold_drain()

    async def _loop(self) -> bool:
        """The main loop; True when it exited drained and in sync (cf. mirror_run's loop)."""
        last_pause = self.clock.now_ns()
        while True:
            if self.ret < 0:
                return False
            await self.pause_point()
            if self.is_cancelled:
                return False
            cnt = self.bitmap.dirty_count()
            self.progress.set_remaining(
                self._bytes_in_flight + cnt + self._active_bytes_in_flight
            )
            delta = self.clock.now_ns() - last_pause
            if delta < SLICE_NS and self.io_status == "ok":
                if (self._in_flight >= MAX_IN_FLIGHT or self._buf_used >= self.buf_size
                        or (cnt == 0 and self._in_flight > 0)):
                    await self._wait_pulse()
                    continue
                if cnt:
                    await self._iteration()
            should_complete = False
            if self._in_flight == 0 and cnt == 0:
                if not self.is_ready:
                    if not await self._flush_target():
                        await self.ratelimit_sleep()
                        continue
                    self.transition_to_ready()
                if self.copy_mode != "background":
                    self.actively_synced = True
                should_complete = self.should_complete or self.cancel_requested
                cnt = self.bitmap.dirty_count()
            if cnt == 0 and should_complete:
                self._hold_drain()
                while self.active_writers:
                    await self._wait_pulse()
                if (self.bitmap.dirty_count() == 0 and await self._flush_target()
                        and self.bitmap.dirty_count() == 0 and not self.active_writers):
                    return True
                self._release_drain()
                continue
            if self.is_ready and not should_complete:
                # idle: poll once a slice; busy: still yield, so writers and the monitor run
                # between passes (cf. job_sleep_ns(0) in mirror_run)
                await self.sleep_ns(SLICE_NS if self._in_flight == 0 and cnt == 0 else 0)
            else:
                await self.ratelimit_sleep()
            last_pause = self.clock.now_ns()


def start_mirror(
    manager: JobManager,
    job_id: str,
    source: BlockNode,
    target: BlockNode,
    params: MirrorParams,
    *,
    base: BlockNode | None = None,
) -> MirrorJob:
    """Validate, create, wire and start a mirror job (cf. mirror_start_job), QEMU's order.

    Raises:
        BlockMirrorError: buf-size, mirror into itself, filter over the source chain, job id,
            speed, permission conflicts. Failures after the job exists emit created/null.
    """
    if params.buf_size < 0:
        raise BlockMirrorError("Invalid parameter 'buf-size'")
    if source.skip_filters() is target.skip_filters():
        raise BlockMirrorError("Can't mirror node into itself")
    if target.driver.is_filter and target.skip_filters() in source.backing_chain():
        raise BlockMirrorError(
            "Cannot mirror to a filter on top of a node in the source's backing chain"
        )
    manager.check_new_id(job_id)
    job = MirrorJob(manager, job_id, source, target, params, base=base)
    manager.add(job)
    try:
        if params.speed < 0:
            raise BlockMirrorError("Parameter 'speed' expects a non-negative value")
        job.limit.set_speed(params.speed)
        job.attach()
    except BlockMirrorError:
        job.dispose_unstarted()
        raise
    job.start()
    return job


__all__ = ["MirrorJob", "start_mirror"]
