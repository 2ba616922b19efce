"""A backup's sync bitmap and its successor (cf. bdrv_dirty_bitmap_create_successor,
bdrv_dirty_bitmap_abdicate, bdrv_reclaim_dirty_bitmap and backup_cleanup_sync_bitmap).

While the job runs the user's bitmap is frozen (busy, not recording) and a successor records
the writes in its place. At the end, by ``bitmap-mode``:

* the job succeeded (``on-success``, ``always``) or it failed with ``always``: the bitmap
  becomes its successor (only the writes made during the job stay), and with ``always`` after
  a failure the clusters the job did not copy are added back;
* otherwise (failure, ``never``): the successor is merged back, nothing is lost.
"""

from __future__ import annotations

from blockmirror.block.bitmaps import NamedBitmap
from blockmirror.block.dirty_bitmap import DirtyBitmap
from blockmirror.block.node import BlockNode
from blockmirror.qapi.block_core import BitmapSyncMode


class SyncBitmap:
    """The frozen bitmap of one backup and the successor recording meanwhile."""

    def __init__(self, node: BlockNode, named: NamedBitmap, mode: BitmapSyncMode) -> None:
        self.node = node
        self.named = named
        self.mode = mode
        parent = named.bitmap
        self.successor = DirtyBitmap(parent.size, parent.granularity)
        self.successor.enabled = parent.enabled
        parent.enabled = False
        named.users += 1
        node.dirty_trackers.append(self.successor)
        self.done = False

    def finish(self, success: bool, uncopied: DirtyBitmap | None = None) -> None:
        """Hand the bitmap back (once): ``success`` is the job's outcome; ``uncopied`` the
        job's copy bitmap (what it did not copy)."""
        if self.done:
            return
        self.done = True
        parent, successor = self.named.bitmap, self.successor
        if self.successor in self.node.dirty_trackers:
            self.node.dirty_trackers.remove(self.successor)
        self.named.users -= 1
        sync = (success or self.mode == BitmapSyncMode.ALWAYS) and (
            self.mode != BitmapSyncMode.NEVER)
        if sync:
            parent.restore(successor)
        else:
            parent.merge_from(successor)
        parent.enabled = successor.enabled
        if not success and self.mode == BitmapSyncMode.ALWAYS and uncopied is not None:
            parent.merge_from(uncopied)


__all__ = ["SyncBitmap"]
