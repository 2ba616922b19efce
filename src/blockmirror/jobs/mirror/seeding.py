"""Dirty-bitmap seeding at the start of a mirror (cf. mirror_dirty_init) and the cow setup.

sync=full pre-zeroes a target that can punch holes cheaply and otherwise marks everything dirty;
then (full and top) every range allocated in the source (its top layer for top) is marked, so the
copy loop in ``ops`` only visits what must be copied.
"""

from __future__ import annotations

from blockmirror.block.dirty_bitmap import DirtyBitmap
from blockmirror.errors import BlockMirrorError
from blockmirror.jobs.mirror.ops import MirrorOps
from blockmirror.jobs.mirror.params import (
    MAX_IN_FLIGHT,
    ZERO_INIT_STEP,
    MirrorMethod,
    align_down,
)


class MirrorSeeding(MirrorOps):
    """What the job does before its first copy pass."""

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
                n = min(length - offset, align_down(ZERO_INIT_STEP, self.granularity))
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
            n = min(length - offset, align_down(ZERO_INIT_STEP, self.granularity))
            allocated, count = await self._is_allocated_above(offset, n, top_only)
            if allocated:
                self.bitmap.set_dirty(offset, count)
            offset += count


__all__ = ["MirrorSeeding"]
