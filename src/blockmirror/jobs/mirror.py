"""The mirror block job: copy a live node to a target, stay in sync, pivot (cf. block/mirror.c).

``start_mirror()`` builds the job the way ``mirror_start_job`` does: it inserts a ``mirror_top``
filter above the source, opens a root handle on the target, and hooks the source node with a
dirty tracker (every write from any parent marks the bitmap) and a write interceptor (active
mirroring in write-blocking mode, and the drain barrier at completion). ``MirrorJob.run`` is
QEMU's ``mirror_run``: seed the bitmap per sync mode, copy dirty chunks with up to 16 ops and
``buf_size`` bytes in flight (split by source block status into copy / write-zeroes / discard),
go READY once a pass leaves nothing dirty or in flight and a target flush succeeds, and on
complete (or soft cancel) converge, drain, flush and exit. ``prepare`` pivots the graph.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections import Counter
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from blockmirror.block.dirty_bitmap import DirtyBitmap
from blockmirror.block.driver import BlockStatus
from blockmirror.block.drivers.mirror_top import MirrorTopDriver, make_filter_node
from blockmirror.block.node import BlockBackend, BlockNode, Child, Perm
from blockmirror.errors import BlockIOError, BlockMirrorError
from blockmirror.jobs.job import Job
from blockmirror.jobs.ratelimit import SLICE_NS

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from blockmirror.jobs.manager import JobManager

log = logging.getLogger(__name__)

#: cf. MAX_IN_FLIGHT, MAX_IO_BYTES, DEFAULT_MIRROR_BUF_SIZE
MAX_IN_FLIGHT = 16
MAX_IO_BYTES = 1 << 20
DEFAULT_BUF_SIZE = 16 << 20
#: the op blocker reason every node used by a mirror carries
BLOCKER_REASON = "block device is in use by block job: mirror"
_ALLOC = BlockStatus.ALLOCATED | BlockStatus.DATA | BlockStatus.ZERO
_ZERO_INIT_STEP = (1 << 31) - 1


class MirrorMethod(StrEnum):
    COPY = "copy"
    ZERO = "zero"
    DISCARD = "discard"


class BackingMode(StrEnum):
    """What happens to the target's backing on success (cf. MirrorBackingMode)."""

    SOURCE = "source"  #: drive-mirror absolute-paths: attach the source's base
    OPEN = "open"  #: drive-mirror existing: open the backing named in the header
    LEAVE = "leave"  #: blockdev-mirror: never touch it


@dataclass
class MirrorParams:
    """Every argument of a mirror job, already validated by the QMP layer."""

    sync: str = "full"
    granularity: int = 0
    buf_size: int = 0
    speed: int = 0
    on_source_error: str = "report"
    on_target_error: str = "report"
    unmap: bool = True
    copy_mode: str = "background"
    filter_node_name: str | None = None
    replaces: str | None = None
    #: the target is known to read as zeroes (drive-mirror-created image, target-is-zero)
    target_is_zero: bool = False
    backing_mode: BackingMode = BackingMode.LEAVE
    auto_finalize: bool = True
    auto_dismiss: bool = True
    #: the job opened the target (drive-mirror): close it unless the pivot adopted it
    owns_target: bool = False


def default_granularity(target: BlockNode) -> int:
    """cf. bdrv_get_default_bitmap_granularity: cluster size clamped to [4K, 64K], else 64K."""
    try:
        cluster = target.info().cluster_size
    except BlockMirrorError:
        cluster = 0
    if cluster <= 0:
        return 64 * 1024
    return min(max(cluster, 4096), 64 * 1024)


def _align_up(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def _align_down(n: int, a: int) -> int:
    return n // a * a


class _DirtyHook:
    """The tracker on the source node: marks the bitmap, except ranges already synced."""

    def __init__(self, job: MirrorJob) -> None:
        self.job = job
        #: (offset, length) writes the active mirror copied itself: consume, don't mark
        self.synced: Counter[tuple[int, int]] = Counter()

    def mark(self, offset: int, length: int) -> None:
        key = (offset, length)
        if self.synced[key] > 0:
            self.synced[key] -= 1
            if not self.synced[key]:
                del self.synced[key]
            return
        self.job.on_source_write(offset, length)


class _Interceptor:
    """The source's write interceptor: the drain barrier and active (write-blocking) copies."""

    def __init__(self, job: MirrorJob) -> None:
        self.job = job

    async def around_write(
        self, node: BlockNode, kind: str, offset: int, length: int, proceed: Any
    ) -> None:
        job = self.job
        while job.quiesced:
            await job.unquiesced.wait()
        if job.pivoted_to is not None:
            # held across the pivot by a parent that addressed the source node itself: the
            # source's parents now use the target, so the write must reach it too
            await proceed()
            await job.forward_after_pivot(job.pivoted_to, kind, offset, length)
            return
        job.active_writers += 1
        try:
            if job.should_copy_to_target():
                await job.active_write(kind, offset, length, proceed)
            else:
                await proceed()
        finally:
            job.active_writers -= 1
            job.pulse()


class MirrorJob(Job):
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
        super().__init__(manager, job_id, auto_finalize=params.auto_finalize,
                         auto_dismiss=params.auto_dismiss, speed=0)
        self.params = params
        self.source = source
        self.target = target
        #: the source's backing for sync=top (what the target's backing becomes); None for full
        self.base = base
        self.graph = self.daemon.graph
        self.granularity = params.granularity or default_granularity(target)
        self.buf_size = _align_up(params.buf_size or DEFAULT_BUF_SIZE, self.granularity)
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
        self._hook = _DirtyHook(self)
        self._interceptor = _Interceptor(self)
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

    # --- hooks from the source ------------------------------------------------------------------

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

    async def active_write(
        self, kind: str, offset: int, length: int, proceed: Callable[[], Awaitable[None]]
    ) -> None:
        """cf. bdrv_mirror_top_do_write + do_sync_target_write."""
        gran = self.granularity
        start = _align_down(offset, gran)
        end = min(_align_up(offset + length, gran), self.bdev_length)
        await self._wait_on_conflicts(start, end - start)
        self.in_flight_bits.set_dirty(start, end - start)
        try:
            await proceed()
            if kind == "discard" or not self.should_copy_to_target():
                return  # left to the tracker: a discard's content is not defined
            if self._target_needs_cow and not self._subcluster_aligned(offset, length):
                # a partial cluster would be completed from a backing the target cannot
                # read yet: leave it to the background copy, which copies whole clusters
                return
            synced = await self._sync_target_write(kind, offset, length)
            if synced:
                self._hook.synced[(offset, length)] += 1
        finally:
            self.in_flight_bits.clear(start, end - start)
            self.pulse()

    async def _sync_target_write(self, kind: str, offset: int, length: int) -> bool:
        gran = self.granularity
        bm = self.bitmap
        o, n = offset, length
        # dirty unaligned heads and tails are left to the background copy
        if o % gran and bm.is_dirty(o):
            skip = _align_up(o, gran) - o
            if n <= skip:
                return False
            o, n = o + skip, n - skip
        if (o + n) % gran and bm.is_dirty(o + n - 1):
            tail = (o + n) % gran
            if n <= tail:
                return False
            n -= tail
        a, b = _align_up(o, gran), _align_down(o + n, gran)
        if o + n == self.bdev_length:
            b = self.bdev_length
        if a < b:
            bm.clear(a, b - a)
        self.progress.increase_remaining(n)
        self._active_bytes_in_flight += n
        try:
            if kind == "zero":
                await self.target.write_zeroes(o, n, may_unmap=self.params.unmap)
            else:
                data = await self.source.read(o, n)
                await self.target.write(o, data)
        except BlockIOError as e:
            bm.set_dirty(_align_down(o, gran), _align_up(o + n, gran) - _align_down(o, gran))
            self.actively_synced = False
            if self._error_action(False, e.errno) == "report":
                self._record_error(-e.errno, str(e))
            return False
        finally:
            self._active_bytes_in_flight -= n
        self.progress.update(n)
        self.progress.count("zeroed" if kind == "zero" else "copied", n)
        # the rest of the write (trimmed dirty padding) is dirty already; nothing to mark
        return True

    async def forward_after_pivot(
        self, target: BlockNode, kind: str, offset: int, length: int
    ) -> None:
        """Copy a source write that was held across the pivot to the new node."""
        if kind == "discard":
            return  # advisory: the target keeps defined content
        if kind == "zero":
            await target.write_zeroes(offset, length, may_unmap=self.params.unmap)
        else:
            await target.write(offset, await self.source.read(offset, length))

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

    # --- block status ---------------------------------------------------------------------------

    async def _status_above(self, offset: int, length: int) -> tuple[int, BlockStatus]:
        """cf. bdrv_co_block_status_above(source, NULL): the whole chain's view of a range."""
        node: BlockNode | None = self.source
        while node is not None:
            if offset >= node.length():
                return length, BlockStatus.ZERO
            ext = await node.block_status(offset, min(length, node.length() - offset))
            if ext.status & _ALLOC or not node.driver.is_format:
                return ext.length, ext.status
            length = ext.length
            nxt = node.backing
            if nxt is None:
                # an unallocated range of a format with no backing reads as zeroes
                return length, ext.status | BlockStatus.ZERO
            node = nxt
        return length, BlockStatus.ZERO

    async def _is_allocated_above(
        self, offset: int, length: int, top_only: bool
    ) -> tuple[bool, int]:
        """Allocated in the top layer (``top_only``) or anywhere in the chain."""
        node: BlockNode | None = self.source
        while node is not None:
            if offset >= node.length():
                return False, length
            ext = await node.block_status(offset, min(length, node.length() - offset))
            if ext.status & _ALLOC or not node.driver.is_format:
                return True, ext.length
            length = ext.length
            if top_only:
                return False, length
            node = node.backing
        return False, length

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

    def _setup_cow(self) -> None:
        """cf. mirror_run's cow_bitmap setup (3.8): a backing file we cannot read."""
        try:
            info = self.target.info()
        except BlockMirrorError:
            return
        self.target_cluster_size = info.cluster_size or 0
        self._target_needs_cow = bool(info.backing_filename) and self.target.backing is None
        if self._target_needs_cow and self.granularity < self.target_cluster_size:
            self.buf_size = max(self.buf_size, self.target_cluster_size)
            self.cow_bitmap = DirtyBitmap(self.bdev_length, self.granularity)

    async def _dirty_init(self) -> None:
        """cf. mirror_dirty_init (QEMU 7.2 zero_target logic)."""
        length = self.bdev_length
        if self.params.sync == "full" and not self.params.target_is_zero:
            if not (self.target.discard_unmap and self.target.driver.can_write_zeroes_with_unmap):
                self.bitmap.mark_all()
                return
            # pre-zero the target; not counted as progress (initial zeroing)
            offset = 0
            while offset < length:
                await self.pause_point()
                if self.is_cancelled:
                    return
                n = min(length - offset, _align_down(_ZERO_INIT_STEP, self.granularity))
                while self._in_flight >= MAX_IN_FLIGHT:
                    await self._wait_pulse()
                self._launch(offset, n, MirrorMethod.ZERO, initial=True)
                offset += n
            await self._wait_all_io()
        top_only = self.params.sync == "top"
        offset = 0
        while offset < length:
            await self.pause_point()
            if self.is_cancelled:
                return
            n = min(length - offset, _align_down(_ZERO_INIT_STEP, self.granularity))
            allocated, count = await self._is_allocated_above(offset, n, top_only)
            if allocated:
                self.bitmap.set_dirty(offset, count)
            offset += count

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
                if self._in_flight == 0 and cnt == 0:
                    await self.sleep_ns(SLICE_NS)
            else:
                await self.ratelimit_sleep()
            last_pause = self.clock.now_ns()

    async def _flush_target(self) -> bool:
        try:
            await self.target.flush()
        except BlockIOError as e:
            if self._error_action(False, e.errno) == "report":
                self._record_error(-e.errno, str(e))
            return False
        return True

    # --- iterations and ops -----------------------------------------------------------------------

    def _next_dirty(self) -> int | None:
        pos = self.bitmap.next_dirty(self._iter_pos)
        if pos is None:
            pos = self.bitmap.next_dirty(0)
        return pos

    async def _iteration(self) -> None:
        """cf. mirror_iteration: one run of consecutive dirty chunks, split into ops."""
        gran = self.granularity
        offset = self._next_dirty()
        if offset is None:
            return
        await self._wait_on_conflicts(offset, 1)
        await self.pause_point()
        if self.is_cancelled or not self.bitmap.is_dirty(offset):
            return
        # consecutive dirty chunks, not in flight, up to buf_size
        limit = min(offset + max(self.buf_size, gran), self.bdev_length)
        clean = self.bitmap.next_clean(offset, limit)
        end = limit if clean is None else clean
        busy = self.in_flight_bits.next_dirty(offset, end)
        if busy is not None:
            end = max(busy, offset + gran)
        end = min(_align_up(end, gran), self.bdev_length)
        self._iter_pos = end
        # clear before any I/O: writes that land from now on dirty the range again
        self.bitmap.clear(offset, end - offset)
        self.in_flight_bits.set_dirty(offset, end - offset)
        max_io = max(self.buf_size // MAX_IN_FLIGHT, MAX_IO_BYTES)
        zero_free = self.target.discard_unmap and self.target.driver.can_write_zeroes_with_unmap
        pos = end
        try:
            pos = offset
            while pos < end:
                method = MirrorMethod.COPY
                try:
                    n, status = await self._status_above(pos, end - pos)
                    ok = True
                except BlockIOError:
                    n, status, ok = min(end - pos, max_io), BlockStatus.DATA, False
                if ok and status & BlockStatus.DATA:
                    n = min(n, max_io)
                n = min(_align_down(n, gran), end - pos)
                if n < gran:
                    n = min(gran, end - pos)
                elif ok and not status & BlockStatus.DATA and self._subcluster_aligned(pos, n):
                    method = (MirrorMethod.ZERO if status & BlockStatus.ZERO
                              else MirrorMethod.DISCARD)
                while self._in_flight >= MAX_IN_FLIGHT:
                    await self._wait_pulse()
                if self.ret < 0:
                    break
                if method == MirrorMethod.COPY:
                    n = min(n, self.buf_size)
                    while self._buf_used and self._buf_used + n > self.buf_size:
                        await self._wait_pulse()
                    n = await self._cow_align(pos, n, end)
                self._launch(pos, n, method)
                self.ratelimit_processed(0 if method != MirrorMethod.COPY and zero_free else n)
                pos += n
        finally:
            if pos < end:
                # not launched (job failing): put it back
                self.bitmap.set_dirty(pos, end - pos)
                self.in_flight_bits.clear(pos, end - pos)
                self.pulse()

    def _subcluster_aligned(self, offset: int, length: int) -> bool:
        """cf. bdrv_round_to_subclusters: the range covers whole target clusters."""
        cs = self.target_cluster_size
        if cs <= 0:
            return True
        end = offset + length
        return offset % cs == 0 and (end % cs == 0 or end == self.bdev_length)

    async def _cow_align(self, offset: int, length: int, end: int) -> int:
        """cf. mirror_cow_align: copy whole target clusters the target cannot read back."""
        cow = self.cow_bitmap
        if cow is None:
            return length
        cs = self.target_cluster_size
        last = offset + length - 1
        if cow.is_dirty(offset) and cow.is_dirty(last):
            return length
        new_end = min(_align_up(offset + length, cs), self.bdev_length)
        head = _align_down(offset, cs)
        if head < offset:
            # the head cluster's start was copied by an earlier op, or will be re-copied now
            await self._wait_on_conflicts(head, offset - head)
            self.in_flight_bits.set_dirty(head, offset - head)
            self.bitmap.clear(head, offset - head)
            self._extra_head = offset - head
        if new_end > end:
            await self._wait_on_conflicts(end, new_end - end)
            self.in_flight_bits.set_dirty(end, new_end - end)
            self.bitmap.clear(end, new_end - end)
        return new_end - offset

    def _launch(self, offset: int, length: int, method: MirrorMethod,
                initial: bool = False) -> None:
        head = self._extra_head
        self._extra_head = 0
        start = offset - head
        length += head
        self._in_flight += 1
        if not initial:
            self._bytes_in_flight += length
        if method == MirrorMethod.COPY:
            self._buf_used += length
        assert self._tg is not None
        self._tg.create_task(self._op(start, length, method, initial))

    async def _op(self, offset: int, length: int, method: MirrorMethod, initial: bool) -> None:
        """One copy / zero / discard op (cf. mirror_co_read, mirror_co_zero_or_discard)."""
        ok = False
        try:
            try:
                if method == MirrorMethod.COPY:
                    try:
                        data = await self.source.read(offset, length)
                    except BlockIOError as e:
                        self._op_failed(offset, length, True, e)
                        return
                    await self.target.write(offset, data)
                elif method == MirrorMethod.ZERO:
                    await self.target.write_zeroes(offset, length, may_unmap=self.params.unmap)
                else:
                    await self.target.discard(offset, length)
            except BlockIOError as e:
                self._op_failed(offset, length, False, e)
                return
            ok = True
        finally:
            self._in_flight -= 1
            if not initial:
                self._bytes_in_flight -= length
            if method == MirrorMethod.COPY:
                self._buf_used -= length
            if not initial:
                self.in_flight_bits.clear(offset, length)
            if ok and not initial:
                self.progress.update(length)
                kind = {MirrorMethod.COPY: "copied", MirrorMethod.ZERO: "zeroed",
                        MirrorMethod.DISCARD: "discarded"}[method]
                self.progress.count(kind, length)
                if self.cow_bitmap is not None and method == MirrorMethod.COPY:
                    self.cow_bitmap.set_dirty(offset, length)
            self.pulse()

    def _op_failed(self, offset: int, length: int, is_read: bool, e: BlockIOError) -> None:
        self.bitmap.set_dirty(offset, length)
        self.progress.count("redirtied", length)
        if self._error_action(is_read, e.errno) == "report":
            self._record_error(-e.errno, str(e))

    async def _wait_all_io(self) -> None:
        while self._in_flight:
            await self._wait_pulse()

    # --- completion (cf. mirror_exit_common) ----------------------------------------------------

    async def prepare(self) -> None:
        await self._exit_common(abort=False)

    async def abort(self) -> None:
        await self._exit_common(abort=True)

    async def _exit_common(self, abort: bool) -> None:
        if self._exited:
            return
        self._exited = True
        graph = self.graph
        src, tgt = self.source, self.target
        if self._hook in src.dirty_trackers:
            src.dirty_trackers.remove(self._hook)
        if self._interceptor in src.interceptors:
            src.interceptors.remove(self._interceptor)
        if self._target_blk is not None:
            graph.remove_backend(self._target_blk)
            self._target_blk = None
        failure: BlockMirrorError | None = None
        pivoted = False
        try:
            exclude: Child | None = None
            if not abort:
                exclude = await self._fix_backing()
            if self.should_complete and not abort:
                to_replace = self._to_replace or src
                # links from the target itself stay (cf. should_update_child): no loops
                own = [c for c in to_replace.parents if c.parent is tgt]
                exclude = own[0] if own else None
                try:
                    graph.replace_node(to_replace, tgt, exclude=exclude)
                    pivoted = True
                    if to_replace is src:
                        self.pivoted_to = tgt
                except BlockMirrorError as e:
                    # QEMU reports this on stderr and fails the job with EPERM
                    log.warning("Can no longer replace '%s' by '%s', because it can no longer "
                                "be guaranteed that doing so would not lead to an abrupt "
                                "change of visible data (%s)", to_replace.name, tgt.name, e)
                    failure = BlockIOError(errno.EPERM)
        except BlockMirrorError as e:
            failure = e
        finally:
            self._remove_filter()
            for node in self._blocked:
                node.unblock("all", BLOCKER_REASON)
            self._blocked.clear()
            if self._to_replace is not None:
                self._to_replace.unblock("all", "block device is in use by block-job-complete")
            self._release_drain()
        await self._drop_unused(pivoted)
        if failure is not None:
            raise failure

    async def _fix_backing(self) -> Child | None:
        """Backing fix-ups on success; returns the new backing link (kept out of the pivot)."""
        mode = self.params.backing_mode
        tgt = self.target
        if mode == BackingMode.SOURCE:
            backing = self.source if self.params.sync == "none" else self.base
            if backing is None or tgt.backing is backing:
                return None
            old = tgt.children.get("backing")
            if old is not None:
                self.graph.detach(old)
            try:
                return self.graph.attach(tgt, backing, "backing", Perm.CONSISTENT_READ,
                                         Perm.all())
            except BlockMirrorError as e:
                raise BlockIOError(errno.EPERM) from e
        if mode == BackingMode.OPEN and tgt.backing is None:
            # cf. bdrv_open_backing_file: the backing named in the target's header
            from blockmirror.block import options

            ctx = options._OpenCtx(self.graph)
            try:
                await options._open_backing(ctx, tgt, {}, ())
            except BlockMirrorError as e:
                await ctx.rollback()
                raise BlockIOError(errno.EPERM) from e
            link = tgt.children.get("backing")
            return link if link is not None and link.node is self.source else None
        return None

    async def _drop_unused(self, pivoted: bool) -> None:
        """Close what nobody references any more: a drive-mirror target left behind, or a
        source whose every parent moved to the target."""
        from blockmirror.block import options

        candidates = [self.source] if pivoted else []
        if self.params.owns_target:
            # drive-mirror's reference goes with the job (cf. bdrv_unref(target_bs)): a
            # target no parent adopted is closed, pivot or not
            candidates.append(self.target)
        for node in candidates:
            if node.name in self.graph.nodes and self.graph.refcount(node) == 0:
                try:
                    await options.close_node(self.graph, node)
                except BlockMirrorError:
                    log.exception("closing %s after the mirror", node.name)




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


__all__ = ["DEFAULT_BUF_SIZE", "MAX_IN_FLIGHT", "MAX_IO_BYTES", "BackingMode", "MirrorJob",
           "MirrorMethod", "MirrorParams", "default_granularity", "start_mirror"]
