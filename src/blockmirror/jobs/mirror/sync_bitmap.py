"""The named bitmap a mirror starts from (extension ``__org.blockmirror_bitmap``, sync=bitmap).

Proxmox VE's QEMU carries this for incremental re-mirroring (upstream QEMU has no mirror
bitmap argument up to 11.0): the job's own dirty bitmap starts as a copy of the named bitmap
instead of being seeded from block status, the named bitmap is busy while the job runs, and
when the job ends its ``bitmap-mode`` decides what the named bitmap holds:

* ``never``: left as it is (it went on recording guest writes if enabled);
* ``always``: exactly what the job had not copied, whatever the outcome (a failed or
  cancelled mirror resumes from it later);
* ``on-success``: the same, but only if the job succeeded (then: nothing left to copy).

The job calls ``seed`` when it is created, ``hold`` once it is wired into the graph,
``finish`` when it leaves the graph, before held guest writes go on (cf. mirror_exit_common,
which does it drained), and ``release`` in its clean-up (cf. mirror_clean).
"""

from __future__ import annotations

from blockmirror.block.bitmaps import NamedBitmap
from blockmirror.block.dirty_bitmap import DirtyBitmap


class SyncBitmap:
    """One job's hold on its sync bitmap."""

    def __init__(self, named: NamedBitmap, mode: str) -> None:
        self.named = named
        self.mode = mode
        self._held = False
        self._finished = False

    def seed(self, job_bitmap: DirtyBitmap) -> None:
        """The job's dirty bitmap starts with the named bitmap's bits (same granularity)."""
        job_bitmap.merge_from(self.named.bitmap)

    def hold(self) -> None:
        """Busy from now on: not removable, clearable or usable by another job."""
        if not self._held:
            self._held = True
            self.named.users += 1

    def finish(self, remaining: list[DirtyBitmap], success: bool) -> None:
        """Apply the bitmap mode, once; ``remaining`` is what the job had not (surely)
        copied."""
        if self._finished:
            return
        self._finished = True
        if self.mode == "always" or (self.mode == "on-success" and success):
            bits = self.named.bitmap
            bits.clear_all()
            for part in remaining:
                bits.merge_from(part)

    def release(self) -> None:
        if self._held:
            self._held = False
            self.named.users -= 1


__all__ = ["SyncBitmap"]
