"""The mirror's background copy: one iteration takes dirty runs and launches their ops.

cf. mirror_iteration, mirror_perform, mirror_co_read and mirror_co_zero_or_discard. Dirty
chunks are cleared before any I/O (a write landing meanwhile dirties them again); the source
chain's block status splits each run into copy / write-zeroes / discard pieces; and up to
``MAX_IN_FLIGHT`` ops and ``buf-size`` bytes run at once as tasks of the copier's group.

Unlike QEMU, where an op is one extent, one op here is a *batch*: the copy pieces of many
runs (up to ``batch_bytes``) go to ``block/copy.copy_extents`` together, which moves them in
one thread-pool hop where the nodes allow it, and the zero pieces to ``zero_extents``. On a
fragmented disk (thousands of small extents) that is what keeps Python's per-request cost
from dominating. A target that needs copy-on-write alignment (``cow``) gets QEMU's
one-op-per-piece behaviour.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol

from blockmirror.block.copy import (
    CopyError,
    copy_extents,
    kernel_copy_files,
    map_data,
    zero_extents,
)
from blockmirror.block.driver import BlockStatus
from blockmirror.block.node import BlockNode
from blockmirror.errors import BlockIOError
from blockmirror.jobs.mirror.dirty import DirtyState
from blockmirror.jobs.mirror.inflight import InFlight
from blockmirror.jobs.mirror.params import (
    MAX_IN_FLIGHT,
    MAX_IO_BYTES,
    MirrorMethod,
    align_down,
    align_up,
)
from blockmirror.jobs.mirror.status import ChainStatus, MappedStatus
from blockmirror.jobs.progress import Progress

_PROGRESS_KIND = {MirrorMethod.COPY: "copied", MirrorMethod.ZERO: "zeroed",
                  MirrorMethod.DISCARD: "discarded"}
#: the most runs one iteration gathers (bounds the planning work between pause points)
_MAX_RUNS = 1024
#: the most pieces one zero or discard op carries
_MAX_ZERO_PIECES = 256
#: batches in flight at once when the data passes through Python buffers (see _budget)
_BUFFERED_IN_FLIGHT = 2
#: how a copy moves its data (``Copier._copy_kind``)
_THROUGH_PYTHON, _KERNEL_BUFFERED, _KERNEL_DIRECT = "python", "kernel", "kernel-direct"


class JobControl(Protocol):
    """What the copier needs from its job."""

    @property
    def is_cancelled(self) -> bool: ...

    @property
    def failed(self) -> bool: ...

    @property
    def slice_quota(self) -> float:
        """Bytes the rate limit allows per slice; 0: no limit."""
        ...

    async def pause_point(self) -> None: ...

    def ratelimit_processed(self, nbytes: int) -> None: ...


@dataclass
class CopierConfig:
    """The copy's sizes and options, fixed when the job starts."""

    granularity: int
    buf_size: int
    #: zero ops may unmap on the target (the mirror's ``unmap`` argument)
    unmap: bool
    #: the target's cluster size (0: none); zero/discard ops must cover whole clusters
    target_cluster_size: int = 0


@dataclass
class _Batch:
    """The pieces of one op being gathered: one method, adjacent pieces merged."""

    method: MirrorMethod
    pieces: list[tuple[int, int]]
    nbytes: int = 0

    def add(self, offset: int, length: int) -> None:
        last = self.pieces[-1] if self.pieces else None
        if last is not None and last[0] + last[1] == offset:
            self.pieces[-1] = (last[0], last[1] + length)
        else:
            self.pieces.append((offset, length))
        self.nbytes += length


class Copier:
    """Iterations over the dirty state and the ops that copy (cf. mirror_iteration)."""

    def __init__(
        self,
        source: BlockNode,
        target: BlockNode,
        dirty: DirtyState,
        inflight: InFlight,
        progress: Progress,
        config: CopierConfig,
        control: JobControl,
        on_error: Callable[[bool, BlockIOError], None],
    ) -> None:
        self.source = source
        self.target = target
        self.dirty = dirty
        self.inflight = inflight
        self.progress = progress
        self.config = config
        self.control = control
        self.on_error = on_error
        self.length = dirty.size
        self.status = ChainStatus(source, self.length, config.buf_size)
        self._iter_pos = 0
        self._tg: asyncio.TaskGroup | None = None
        #: bytes before a piece's offset that cow alignment added (consumed by the launch)
        self._extra_head = 0
        self._copy_kind_answer: str | None = None

    @property
    def batch_bytes(self) -> int:
        """How much data one copy op carries.

        Where the data passes through Python objects (qcow2 through the request path, NBD):
        1 MiB, two in flight. Where it stays in the kernel (one worker-thread buffer, reused):
        a quarter of the buffer, so that several ops keep the disk and the cores busy (QEMU:
        at most max(buf/16, 1 MiB) per op); but between buffered host files, as long as
        nothing has written the source, the whole buffer, one op at a time.

        Why the exception: several ops at once are several workers' buffered writes to one
        target file, taking turns at its inode lock while the kernel spins for it. With an
        idle source one op of 16 MiB against four of 4 MiB (1 GiB mirrors, medians of 6
        interleaved, raw and qcow2, 64 KiB to 4 MiB extents): whole-life CPU 11-18% lower,
        job CPU 15-26% lower, READY 8% sooner to 4% later. With a guest writing, the
        pipeline matters more than the lock: READY came 4-14% later in those A/Bs and
        1.1-1.5x qemu-storage-daemon's in the 4 KiB and qcow2 64 KiB cells of a benchmark
        table (0.7-0.95x with four ops), so the first write to the source ends it.
        """
        cfg = self.config
        kind = self._copy_kind()
        if kind == _THROUGH_PYTHON:
            return max(cfg.granularity, min(self.budget() // _BUFFERED_IN_FLIGHT, MAX_IO_BYTES))
        if kind == _KERNEL_BUFFERED and self.dirty.writes_seen == 0:
            return max(cfg.granularity, cfg.buf_size)
        return max(cfg.granularity, min(cfg.buf_size // 4, 4 * MAX_IO_BYTES))

    def _buffered(self) -> bool:
        """The copy's data passes through Python buffers (not one host file to another,
        either directly or between the data files of two formats such as qcow2)."""
        return self._copy_kind() == _THROUGH_PYTHON

    def _copy_kind(self) -> str:
        """How the copy moves data; asked once: the nodes of a running copy do not change."""
        if self._copy_kind_answer is None:
            files = kernel_copy_files(self.source, self.target)
            self._copy_kind_answer = (
                _THROUGH_PYTHON if files is None
                else _KERNEL_DIRECT if files[0].direct or files[1].direct
                else _KERNEL_BUFFERED)
        return self._copy_kind_answer

    def budget(self) -> int:
        """Bytes that may be in flight. Buffered copies hold their data in fresh objects;
        two batches keep a reader and a writer busy, and more only raise the peak RSS
        (measured: 16 MiB in flight cost 16-20 MiB of RSS and no speed on 2 cores)."""
        if self._buffered():
            return min(self.config.buf_size, _BUFFERED_IN_FLIGHT * MAX_IO_BYTES)
        return self.config.buf_size

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """The task group every op runs in; leaving it waits for them all."""
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            try:
                yield
            finally:
                await self.inflight.wait_idle()
                self._tg = None

    # --- the initial zeroing (cf. mirror_dirty_init) ---------------------------------------------

    async def zero_initially(self, offset: int, length: int) -> None:
        """Launch one op that zeroes the target before the copy (not counted as progress)."""
        while self.inflight.ops >= MAX_IN_FLIGHT:
            await self.inflight.wait_pulse()
        self._launch(_Batch(MirrorMethod.ZERO, [(offset, length)], length), initial=True)

    # --- iterations -----------------------------------------------------------------------------

    async def iteration(self, *, wide: bool = False) -> None:
        """Take dirty runs from the iteration position and launch their ops.

        ``wide``: take dirty runs from the whole disk (wrapping around once) rather than
        only near the position. In READY, a guest's scattered writes leave one chunk here
        and one there; a pass limited to a stretch of the disk copied a few chunks per op,
        and a copy op of one 64 KiB chunk costs about five times its share of an op of
        twenty (block status, allocation, the worker hop and the finish are per op).
        """
        dirty, gran = self.dirty, self.config.granularity
        offset = dirty.next_dirty(self._iter_pos)
        if offset is None:
            return
        await self.inflight.wait_no_conflict(dirty, offset, 1)
        await self.control.pause_point()
        if self.control.is_cancelled or not dirty.is_dirty(offset):
            return
        cow = dirty.cow is not None
        budget = self.config.buf_size  # whole target clusters fit (a 4 MiB rbd object)
        # with a speed limit, gather no more than a slice's quota (one run may still be
        # longer, as in QEMU): a whole buffer at once would make the limit very bursty
        gather = min(budget, int(self.control.slice_quota)) if self.control.slice_quota else budget
        runs: list[tuple[int, int]] = []
        total = 0
        pos: int | None = offset
        wrapped = False
        while pos is not None:
            end = dirty.run_end(pos, budget - total)
            dirty.take(pos, end - pos)
            runs.append((pos, end - pos))
            total += end - pos
            self._iter_pos = end
            if cow or total >= gather or len(runs) >= _MAX_RUNS:
                break
            # more runs after this one go into the same iteration, unless one is being
            # copied right now (QEMU would wait for it; we take it next time)
            pos = dirty.next_dirty_after(end)
            if pos is None and wide and not wrapped:
                wrapped = True
                pos = dirty.next_dirty_after(0)
            if wrapped and pos is not None and pos >= offset:
                break  # around once
            if pos is not None and (dirty.busy(pos, gran)
                                    or (not wide and pos - offset >= 8 * self.config.buf_size)):
                break
        if wrapped:
            runs.sort()  # block status and the batches go in disk order
        await self._launch_runs(runs)

    async def _launch_runs(self, runs: list[tuple[int, int]]) -> None:
        mapped: MappedStatus | None = None
        if self.dirty.cow is None:
            try:
                walk = await map_data(self.source, runs, self.config.granularity)
            except BlockIOError:
                walk = None
            if walk is not None:
                mapped = MappedStatus(runs, walk)
        zero_free = (self.target.discard_unmap
                     and self.target.driver.can_write_zeroes_with_unmap)
        gran = self.config.granularity
        max_io = self.batch_bytes if self.dirty.cow is None else max(
            self.config.buf_size // MAX_IN_FLIGHT, MAX_IO_BYTES)
        copy = _Batch(MirrorMethod.COPY, [])
        zero = _Batch(MirrorMethod.ZERO, [])
        discard = _Batch(MirrorMethod.DISCARD, [])
        remaining = list(runs)
        # the first run not yet launched in full is remaining[ri]
        ri = 0
        control = self.control
        # the rate limit is charged once per stretch without an await (time stands still
        # in between), not once per piece: thousands of pieces on a fragmented disk
        charge = 0
        cow = self.dirty.cow is not None
        answer = mapped.answer_data if mapped is not None else None
        try:
            while ri < len(remaining):
                pos, left = remaining[ri]
                end = pos + left
                method = MirrorMethod.COPY
                if answer is not None:
                    n, is_data = answer(pos, left)
                    is_zero = not is_data
                    ok = True
                else:
                    if charge:
                        control.ratelimit_processed(charge)
                        charge = 0
                    try:
                        n, status = await self.status.status_above(pos, left)
                        is_data = bool(status & BlockStatus.DATA)
                        is_zero = bool(status & BlockStatus.ZERO)
                        ok = True
                    except BlockIOError:
                        n, is_data, is_zero, ok = min(left, max_io), True, False, False
                if ok and is_data and n > max_io:
                    n = max_io
                n = min(n - n % gran, left)
                if n < gran:
                    n = min(gran, left)
                elif ok and not is_data and self._cluster_aligned(pos, n):
                    method = MirrorMethod.ZERO if is_zero else MirrorMethod.DISCARD
                if control.failed:
                    break
                if method == MirrorMethod.COPY:
                    if cow:
                        if charge:
                            control.ratelimit_processed(charge)
                            charge = 0
                        await self._wait_for_room(n)
                        n = await self._cow_align(pos, n, end)
                        self._launch(_Batch(method, [(pos, n)], n))
                    else:
                        if copy.nbytes + n > max_io:
                            if charge:
                                control.ratelimit_processed(charge)
                                charge = 0
                            await self._flush_batch(copy)
                        copy.add(pos, n)
                    charge += n
                else:
                    batch = zero if method == MirrorMethod.ZERO else discard
                    batch.add(pos, n)
                    if not zero_free:
                        charge += n
                    if len(batch.pieces) >= _MAX_ZERO_PIECES:
                        control.ratelimit_processed(charge)
                        charge = 0
                        await self._flush_batch(batch)
                if n < left:
                    remaining[ri] = (pos + n, left - n)
                else:
                    ri += 1
            if charge:
                control.ratelimit_processed(charge)
                charge = 0
            for batch in (copy, zero, discard):
                if batch.pieces and not control.failed:
                    await self._flush_batch(batch)
        finally:
            if charge:  # the pieces gathered before a failure were charged before, too
                control.ratelimit_processed(charge)
            del remaining[:ri]
            # not launched (the job is failing): put it back
            for batch in (copy, zero, discard):
                for o, n in batch.pieces:
                    self.dirty.release(o, n, failed=True)
            for o, n in remaining:
                self.dirty.release(o, n, failed=True)
            if remaining or any(b.pieces for b in (copy, zero, discard)):
                self.inflight.pulse()

    async def _wait_for_room(self, nbytes: int) -> None:
        # No fewer batches while the guest writes. One batch at a time was tried (a guest's
        # request competes with every worker thread for the interpreter lock), but once a
        # FUA write became one hop, a max-rate writer measured both a later READY and a
        # slower guest with it: raw 0.71 s / 25.9 MB/s against 0.64 s / 40.7 MB/s without,
        # qcow2 0.93 s / 30.6 MB/s against 0.72 s / 30.4 MB/s (medians of 6 and 8 runs).
        inflight = self.inflight
        while (inflight.ops >= MAX_IN_FLIGHT
               or (inflight.buf_used and inflight.buf_used + nbytes > self.budget())):
            await inflight.wait_pulse()

    async def _flush_batch(self, batch: _Batch) -> None:
        """Launch a gathered batch once there is room for it."""
        if batch.method == MirrorMethod.COPY:
            await self._wait_for_room(batch.nbytes)
        else:
            while self.inflight.ops >= MAX_IN_FLIGHT:
                await self.inflight.wait_pulse()
        if self.control.failed:
            return  # the caller's finally puts the pieces back
        self._launch(_Batch(batch.method, list(batch.pieces), batch.nbytes))
        batch.pieces = []
        batch.nbytes = 0

    def _cluster_aligned(self, offset: int, length: int) -> bool:
        """cf. bdrv_round_to_subclusters: the range covers whole target clusters."""
        cs = self.config.target_cluster_size
        if cs <= 0:
            return True
        end = offset + length
        return offset % cs == 0 and (end % cs == 0 or end == self.length)

    async def _cow_align(self, offset: int, length: int, end: int) -> int:
        """cf. mirror_cow_align: copy whole target clusters the target cannot read back."""
        cow = self.dirty.cow
        assert cow is not None
        cs = self.config.target_cluster_size
        last = offset + length - 1
        if cow.is_dirty(offset) and cow.is_dirty(last):
            return length
        new_end = min(align_up(offset + length, cs), self.length)
        head = align_down(offset, cs)
        if head < offset:
            # the head cluster's start was copied by an earlier op, or will be re-copied now
            await self.inflight.wait_no_conflict(self.dirty, head, offset - head)
            self.dirty.take(head, offset - head)
            self._extra_head = offset - head
        if new_end > end:
            await self.inflight.wait_no_conflict(self.dirty, end, new_end - end)
            self.dirty.take(end, new_end - end)
        return new_end - offset

    # --- ops --------------------------------------------------------------------------------------

    def _launch(self, batch: _Batch, initial: bool = False) -> None:
        head = self._extra_head
        self._extra_head = 0
        if head:
            o, n = batch.pieces[0]
            batch.pieces[0] = (o - head, n + head)
            batch.nbytes += head
        inflight = self.inflight
        inflight.ops += 1
        if not initial:
            inflight.bytes += batch.nbytes
        if batch.method == MirrorMethod.COPY:
            inflight.buf_used += batch.nbytes
            inflight.copy_ops += 1
        assert self._tg is not None
        self._tg.create_task(self._op(batch, initial))

    async def _op(self, batch: _Batch, initial: bool) -> None:
        """One copy / zero / discard op (cf. mirror_co_read, mirror_co_zero_or_discard)."""
        ok = False
        try:
            try:
                if batch.method == MirrorMethod.COPY:
                    await copy_extents(self.source, self.target, batch.pieces)
                elif batch.method == MirrorMethod.ZERO:
                    await zero_extents(self.target, batch.pieces, may_unmap=self.config.unmap)
                else:
                    for o, n in batch.pieces:
                        await self.target.discard(o, n)
            except CopyError as e:
                self._failed(batch, e.is_read, e)
                return
            except BlockIOError as e:
                self._failed(batch, False, e)
                return
            ok = True
        finally:
            self._finish(batch, initial, ok)

    def _finish(self, batch: _Batch, initial: bool, ok: bool) -> None:
        inflight = self.inflight
        inflight.ops -= 1
        if not initial:
            inflight.bytes -= batch.nbytes
        if batch.method == MirrorMethod.COPY:
            inflight.buf_used -= batch.nbytes
            inflight.copy_ops -= 1
        if not initial:
            for o, n in batch.pieces:
                self.dirty.release(o, n)
        if ok and not initial:
            self.progress.update(batch.nbytes)
            self.progress.count(_PROGRESS_KIND[batch.method], batch.nbytes)
            if self.dirty.cow is not None and batch.method == MirrorMethod.COPY:
                for o, n in batch.pieces:
                    self.dirty.cow.set_dirty(o, n)
        inflight.pulse()

    def _failed(self, batch: _Batch, is_read: bool, e: BlockIOError) -> None:
        for o, n in batch.pieces:
            self.dirty.redirty(o, n)
        self.progress.count("redirtied", batch.nbytes)
        self.on_error(is_read, e)


__all__ = ["Copier", "CopierConfig", "JobControl"]
