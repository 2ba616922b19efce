"""Active mirroring: source writes copied synchronously to the target (write-blocking mode).

cf. bdrv_mirror_top_do_write / do_sync_target_write. Called from ``hooks.Interceptor`` around
each source write while the job is in write-blocking copy mode, and for writes held across the
pivot, which must reach the new node too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from blockmirror.errors import BlockIOError
from blockmirror.jobs.mirror.params import align_down, align_up
from blockmirror.jobs.mirror.seeding import MirrorSeeding

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from blockmirror.block.node import BlockNode


class MirrorActive(MirrorSeeding):
    """Write-blocking copies done on behalf of the source's writers."""

    async def active_write(
        self, kind: str, offset: int, length: int, proceed: Callable[[], Awaitable[None]]
    ) -> None:
        """cf. bdrv_mirror_top_do_write + do_sync_target_write."""
        gran = self.granularity
        start = align_down(offset, gran)
        end = min(align_up(offset + length, gran), self.bdev_length)
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
            skip = align_up(o, gran) - o
            if n <= skip:
                return False
            o, n = o + skip, n - skip
        if (o + n) % gran and bm.is_dirty(o + n - 1):
            tail = (o + n) % gran
            if n <= tail:
                return False
            n -= tail
        a, b = align_up(o, gran), align_down(o + n, gran)
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
            bm.set_dirty(align_down(o, gran), align_up(o + n, gran) - align_down(o, gran))
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


__all__ = ["MirrorActive"]
