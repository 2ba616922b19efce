"""What a mirror still has to copy: its dirty bitmap, the ranges in flight, and the ledger of
writes the active mirror copied itself.

``DirtyState`` is the source node's dirty tracker (``mark``): every write that reaches the
source and was not already copied by a write-blocking active write marks its chunks dirty.
The copier ``take``s runs of dirty chunks (clearing them *before* any I/O, so a write that
lands during the copy dirties them again) and ``release``s them when its op ends, re-dirtying
them if the op failed. Pure bookkeeping over ``DirtyBitmap``; no I/O, no asyncio.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from blockmirror.block.dirty_bitmap import DirtyBitmap


def _ignore(_newly: int) -> None:
    pass


class DirtyState:
    """The mirror's dirty chunks (cf. MirrorBlockJob.dirty_bitmap and in_flight_bitmap)."""

    def __init__(self, size: int, granularity: int,
                 on_dirty: Callable[[int], None] = _ignore) -> None:
        self.size = size
        self.granularity = granularity
        self.bitmap = DirtyBitmap(size, granularity)
        self.in_flight = DirtyBitmap(size, granularity)
        #: chunks of a target that cannot read its backing yet that were copied whole
        self.cow: DirtyBitmap | None = None
        #: (offset, length) of writes the active mirror copied: consumed, not marked, by mark()
        self._synced: Counter[tuple[int, int]] = Counter()
        #: called by mark() with the bytes that were clean before it (0: already dirty)
        self._on_dirty = on_dirty
        #: bytes of guest writes marked since the start (the forecast's dirty rate)
        self.marked_bytes = 0
        #: writes to the source since the start, those the active mirror copied included
        self.writes_seen = 0

    # --- the node's DirtyTracker --------------------------------------------------------------

    def mark(self, offset: int, length: int) -> None:
        self.writes_seen += 1
        key = (offset, length)
        if self._synced[key] > 0:
            self._synced[key] -= 1
            if not self._synced[key]:
                del self._synced[key]
            return
        newly = 0
        if self.bitmap.count_range(offset, length) == 0:
            newly = max(0, min(length, self.size - offset))
        self.bitmap.set_dirty(offset, length)
        self.marked_bytes += max(0, min(length, self.size - offset))
        self._on_dirty(newly)

    def expect_synced(self, offset: int, length: int) -> None:
        """The next ``mark(offset, length)`` is a write the active mirror already copied."""
        self._synced[(offset, length)] += 1

    # --- queries --------------------------------------------------------------------------------

    def dirty_bytes(self) -> int:
        return self.bitmap.dirty_count()

    def is_dirty(self, offset: int) -> bool:
        return self.bitmap.is_dirty(offset)

    def busy(self, offset: int, length: int) -> bool:
        """Part of the range is being copied right now."""
        return self.in_flight.count_range(offset, length) > 0

    def next_dirty(self, start: int) -> int | None:
        """The first dirty chunk at or after ``start``, wrapping around to 0."""
        pos = self.bitmap.next_dirty(start)
        return self.bitmap.next_dirty(0) if pos is None else pos

    def next_dirty_after(self, start: int) -> int | None:
        """The first dirty chunk at or after ``start`` (no wrapping)."""
        return self.bitmap.next_dirty(start) if start < self.size else None

    def run_end(self, offset: int, max_bytes: int) -> int:
        """The end of the run of dirty chunks at ``offset`` that are not in flight.

        At most ``max_bytes`` (at least one chunk), chunk-aligned or the end of the node.
        """
        gran = self.granularity
        limit = min(offset + max(max_bytes, gran), self.size)
        clean = self.bitmap.next_clean(offset, limit)
        end = limit if clean is None else clean
        busy = self.in_flight.next_dirty(offset, end)
        if busy is not None:
            end = max(busy, offset + gran)
        return min(-(-end // gran) * gran, self.size)

    # --- changes --------------------------------------------------------------------------------

    def take(self, offset: int, length: int) -> None:
        """Start copying a range: clean now, in flight until ``release``."""
        self.bitmap.clear(offset, length)
        self.in_flight.set_dirty(offset, length)

    def release(self, offset: int, length: int, *, failed: bool = False) -> None:
        self.in_flight.clear(offset, length)
        if failed:
            self.bitmap.set_dirty(offset, length)

    def redirty(self, offset: int, length: int) -> None:
        self.bitmap.set_dirty(offset, length)


__all__ = ["DirtyState"]
