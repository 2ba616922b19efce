"""Dirty-bitmap seeding at the start of a mirror (cf. mirror_dirty_init), and the cow setup.

sync=full pre-zeroes a target that can punch holes cheaply and otherwise marks everything
dirty; then (full and top) every range allocated in the source (its top layer for top) is
marked, so the copy loop only visits what must be copied. sync=bitmap (the extension
``__org.blockmirror_bitmap``) was seeded from the named bitmap when the job was created
(``sync_bitmap.py``) and needs nothing more here, as in Proxmox VE's QEMU.
"""

from __future__ import annotations

from blockmirror.block.dirty_bitmap import DirtyBitmap
from blockmirror.block.node import BlockNode
from blockmirror.errors import BlockMirrorError
from blockmirror.jobs.mirror.copier import Copier, JobControl
from blockmirror.jobs.mirror.dirty import DirtyState
from blockmirror.jobs.mirror.params import ZERO_INIT_STEP, align_down


def cow_setup(target: BlockNode, dirty: DirtyState) -> tuple[int, bool]:
    """cf. mirror_run's cow_bitmap setup: ``(target cluster size, target needs cow)``.

    A target that names a backing file it has not opened (drive-mirror) cannot fill a
    partly written cluster from it: with chunks smaller than its clusters, whole clusters
    are copied, tracked in ``dirty.cow``.
    """
    try:
        info = target.info()
    except BlockMirrorError:
        return 0, False
    cluster = info.cluster_size or 0
    needs_cow = bool(info.backing_filename) and target.backing is None
    if needs_cow and dirty.granularity < cluster:
        dirty.cow = DirtyBitmap(dirty.size, dirty.granularity)
    return cluster, needs_cow


async def seed_dirty(
    dirty: DirtyState,
    copier: Copier,
    control: JobControl,
    *,
    sync: str,
    target_is_zero: bool,
) -> None:
    """cf. mirror_dirty_init (QEMU 7.2's zero_target logic)."""
    if sync not in ("full", "top"):
        return
    length = dirty.size
    step = align_down(ZERO_INIT_STEP, dirty.granularity)
    target = copier.target
    if sync == "full" and not target_is_zero:
        if not (target.discard_unmap and target.driver.can_write_zeroes_with_unmap):
            dirty.bitmap.mark_all()
            return
        # pre-zero the target; not counted as progress (initial zeroing)
        offset = 0
        while offset < length:
            await control.pause_point()
            if control.is_cancelled:
                return
            n = min(length - offset, step)
            await copier.zero_initially(offset, n)
            offset += n
        await copier.inflight.wait_idle()
    top_only = sync == "top"
    offset = 0
    while offset < length:
        await control.pause_point()
        if control.is_cancelled:
            return
        n = min(length - offset, step)
        allocated, count = await copier.status.is_allocated_above(offset, n, top_only)
        if allocated:
            dirty.bitmap.set_dirty(offset, count)
        offset += count


__all__ = ["cow_setup", "seed_dirty"]
