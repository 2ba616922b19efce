"""The mirror's copy loop: one iteration picks a run of dirty chunks and launches its ops.

cf. mirror_iteration, mirror_perform, mirror_co_read and mirror_co_zero_or_discard. Dirty bits
are cleared before any I/O (a write landing meanwhile dirties the range again), the source's
block status (whole backing chain) splits the run into copy / write-zeroes / discard ops, and up
to ``MAX_IN_FLIGHT`` ops and ``buf_size`` bytes run concurrently as tasks of the job's group.
"""

from __future__ import annotations

from blockmirror.block.driver import BlockStatus
from blockmirror.block.node import BlockNode
from blockmirror.errors import BlockIOError
from blockmirror.jobs.mirror.base import MirrorBase
from blockmirror.jobs.mirror.params import (
    ALLOC_BITS,
    MAX_IN_FLIGHT,
    MAX_IO_BYTES,
    MirrorMethod,
    align_down,
    align_up,
)

#: the largest copy_file_range op (see offload.py); buf_size still bounds bytes in flight
_OFFLOAD_MAX_IO = 4 << 20
_PROGRESS_KIND = {MirrorMethod.COPY: "copied", MirrorMethod.ZERO: "zeroed",
                  MirrorMethod.DISCARD: "discarded"}


class MirrorOps(MirrorBase):
    """Block status of the source chain, iterations, and the ops themselves."""

    # --- block status ---------------------------------------------------------------------------

    async def _status_above(self, offset: int, length: int) -> tuple[int, BlockStatus]:
        """cf. bdrv_co_block_status_above(source, NULL): the whole chain's view of a range.

        One answer usually covers many ops (a SEEK_DATA/SEEK_HOLE run, a qcow2 extent), so the
        last extent is kept until the source is written again: ``write_gen`` is read before
        asking, and a write that lands (or completes) after that bumps it, so a stale answer
        is never used for a range a concurrent write may have changed.
        """
        cached = self._extent_cache
        gen = self.source.write_gen
        if cached is not None and cached[3] == gen and cached[0] <= offset < cached[1]:
            return min(length, cached[1] - offset), cached[2]
        # ask for one buffer's worth: file answers the whole run whatever the length, but
        # qcow2's cost grows with the range asked (it maps every cluster of it)
        want = max(length, min(self.bdev_length - offset, self.buf_size))
        n, status = await self._status_above_uncached(offset, want)
        self._extent_cache = (offset, offset + n, status, gen)
        return min(length, n), status

    async def _status_above_uncached(self, offset: int, length: int) -> tuple[int, BlockStatus]:
        node: BlockNode | None = self.source
        while node is not None:
            if offset >= node.length():
                return length, BlockStatus.ZERO
            ext = await node.block_status(offset, min(length, node.length() - offset))
            if ext.status & ALLOC_BITS or not node.driver.is_format:
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
            if ext.status & ALLOC_BITS or not node.driver.is_format:
                return True, ext.length
            length = ext.length
            if top_only:
                return False, length
            node = node.backing
        return False, length

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
        end = min(align_up(end, gran), self.bdev_length)
        self._iter_pos = end
        # clear before any I/O: writes that land from now on dirty the range again
        self.bitmap.clear(offset, end - offset)
        self.in_flight_bits.set_dirty(offset, end - offset)
        max_io = max(self.buf_size // MAX_IN_FLIGHT, MAX_IO_BYTES)
        if self._offload is not None and self._offload.enabled:
            # no buffer of ours holds the data: fewer, larger kernel copies cost less
            max_io = max(max_io, min(self.buf_size // 4, _OFFLOAD_MAX_IO))
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
                n = min(align_down(n, gran), end - pos)
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
        new_end = min(align_up(offset + length, cs), self.bdev_length)
        head = align_down(offset, cs)
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
                    done = 0
                    if self._offload is not None:
                        done = await self._offload.copy(offset, length)
                    if done < length:
                        try:
                            data = await self.source.read(offset + done, length - done)
                        except BlockIOError as e:
                            self._op_failed(offset, length, True, e)
                            return
                        await self.target.write(offset + done, data)
                        del data  # the buffer goes now, not when the task object does
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
                self.progress.count(_PROGRESS_KIND[method], length)
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



__all__ = ["MirrorOps"]
