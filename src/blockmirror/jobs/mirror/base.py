"""The mirror job's state and the small services every part of it uses.

``MirrorBase`` holds what ``MirrorJob.__init__`` sets up (bitmaps, in-flight accounting, the
hooks, the filter and target handles), the wake-up pulse ops and active writes signal, the error
policy (cf. mirror_error_action), the drain barrier and the target flush. The behaviour lives in
the subclasses, one module each: ``ops`` (copy loop), ``seeding`` (dirty-bitmap seeding),
``active`` (write-blocking copies), ``pivot`` (completion) and ``job`` (wiring and the run).
"""

from __future__ import annotations

import asyncio
import errno
from typing import TYPE_CHECKING

from blockmirror.block.dirty_bitmap import DirtyBitmap
from blockmirror.block.driver import BlockStatus
from blockmirror.block.drivers.mirror_top import MirrorTopDriver
from blockmirror.errors import BlockIOError
from blockmirror.jobs.job import Job
from blockmirror.jobs.mirror.params import (
    DEFAULT_BUF_SIZE,
    MirrorParams,
    align_up,
    default_granularity,
)

if TYPE_CHECKING:
    from blockmirror.block.node import BlockBackend, BlockNode, Child
    from blockmirror.jobs.manager import JobManager
    from blockmirror.jobs.mirror.hooks import DirtyHook, Interceptor
    from blockmirror.jobs.mirror.offload import CopyOffload


class MirrorBase(Job):
    """State shared by the mirror modules; see ``MirrorJob`` for the whole job."""

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
        super().__init__(manager, job_id, auto_finalize=params.auto_finalize,
                         auto_dismiss=params.auto_dismiss, speed=0)
        self.params = params
        self.source = source
        self.target = target
        #: the source's backing for sync=top (what the target's backing becomes); None for full
        self.base = base
        self.graph = self.daemon.graph
        self.granularity = params.granularity or default_granularity(target)
        self.buf_size = align_up(params.buf_size or DEFAULT_BUF_SIZE, self.granularity)
        self.copy_mode = params.copy_mode
        self.should_complete = False
        self.actively_synced = False
        self.bdev_length = source.length()
        self.bitmap = DirtyBitmap(self.bdev_length, self.granularity)
        self.in_flight_bits = DirtyBitmap(self.bdev_length, self.granularity)
        self.cow_bitmap: DirtyBitmap | None = None
        self.target_cluster_size = 0
        self.published = False
        self.quiesced = False
        self.unquiesced = asyncio.Event()
        self.unquiesced.set()
        self.active_writers = 0
        self._in_flight = 0
        self._bytes_in_flight = 0
        self._active_bytes_in_flight = 0
        self._buf_used = 0
        self._pulse = asyncio.Event()
        self._iter_pos = 0
        self._tg: asyncio.TaskGroup | None = None
        #: (start, end, status, source write_gen) of the last block-status answer (see ops)
        self._extent_cache: tuple[int, int, BlockStatus, int] | None = None
        #: copy_file_range between plain raw files, set up by ``run`` when it applies
        self._offload: CopyOffload | None = None
        #: set by ``MirrorJob.__init__``, which is what the hooks call back
        self._hook: DirtyHook
        self._interceptor: Interceptor
        self.filter: BlockNode | None = None
        self._filter_link: Child | None = None
        self._target_blk: BlockBackend | None = None
        self._to_replace: BlockNode | None = None
        self._blocked: list[BlockNode] = []
        self._exited = False
        self._holding_pause = False
        #: bytes before an op's offset that cow alignment added (consumed by _launch)
        self._extra_head = 0
        #: the target names a backing file it has not opened (drive-mirror): see cow_bitmap
        self._target_needs_cow = False
        #: set at the pivot: where writes held at the source's drain barrier must also go
        self.pivoted_to: BlockNode | None = None

    def _remove_filter(self) -> None:
        filt, link = self.filter, self._filter_link
        if filt is None or link is None:
            return
        below = link.node
        if isinstance(filt.driver, MirrorTopDriver):
            filt.driver.redirect = below
        self.graph.replace_node(filt, below, exclude=link)
        self.graph.detach(link)
        self.graph.forget_node(filt)
        self.filter = None
        if isinstance(filt.driver, MirrorTopDriver):
            filt.driver.quiesce(False)  # held requests go on, to ``redirect``

    def on_source_write(self, offset: int, length: int) -> None:
        """A write reached the source without being copied: it is dirty now."""
        if self.bitmap.count_range(offset, length) == 0:
            self.progress.count("redirtied", min(length, self.bdev_length - offset))
        self.bitmap.set_dirty(offset, length)
        self.actively_synced = False

    def should_copy_to_target(self) -> bool:
        """cf. should_copy_to_target: write-blocking, published, healthy, not force-cancelled."""
        return (self.copy_mode == "write-blocking" and self.published and self.ret >= 0
                and not self.is_cancelled and not self._exited)

    def pulse(self) -> None:
        """Wake everything waiting for an op (or an active write) to finish."""
        self._pulse.set()
        self._pulse = asyncio.Event()

    async def _wait_pulse(self) -> None:
        await self._pulse.wait()

    async def _wait_on_conflicts(self, offset: int, length: int) -> None:
        while self.in_flight_bits.count_range(offset, length):
            await self._wait_pulse()

    # --- errors ---------------------------------------------------------------------------------

    def _error_action(self, is_read: bool, err: int) -> str:
        """cf. mirror_error_action + block_job_error_action: event, then stop/report/ignore."""
        self.actively_synced = False
        policy = self.params.on_source_error if is_read else self.params.on_target_error
        if policy in ("enospc", "auto"):
            action = "stop" if err == errno.ENOSPC else "report"
        else:
            action = policy
        self.daemon.events.emit("BLOCK_JOB_ERROR", {
            "device": self.id, "operation": "read" if is_read else "write", "action": action,
        })
        if action == "stop":
            if not self.user_paused:
                self.pause()
                self.user_paused = True
            self.iostatus_set_err(err)
        return action

    def _hold_drain(self) -> None:
        """Block new source writes until the job has exited (cf. bdrv_drained_begin)."""
        if not self.quiesced:
            self.quiesced = True
            self.unquiesced.clear()
            self._quiesce_filter(True)
        if not self._holding_pause:
            # drained jobs count as paused in query-block-jobs, as in QEMU
            self._holding_pause = True
            self.pause_count += 1

    def _release_drain(self) -> None:
        if self._holding_pause:
            self._holding_pause = False
            self.pause_count -= 1
        if self.quiesced:
            self.quiesced = False
            self.unquiesced.set()
            self._quiesce_filter(False)

    def _quiesce_filter(self, on: bool) -> None:
        if self.filter is not None and isinstance(self.filter.driver, MirrorTopDriver):
            self.filter.driver.quiesce(on)


    async def _flush_target(self) -> bool:
        try:
            await self.target.flush()
        except BlockIOError as e:
            if self._error_action(False, e.errno) == "report":
                self._record_error(-e.errno, str(e))
            return False
        return True
