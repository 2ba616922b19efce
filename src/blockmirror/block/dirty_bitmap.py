"""Dirty bitmaps: one bit per ``granularity`` bytes of a node, over C-backed ``bitarray``.

A ``DirtyBitmap`` implements ``node.DirtyTracker``: attach it to a node's ``dirty_trackers`` and
the generic request path (``block/io.py``) marks every written range. Jobs read it with
``next_dirty``/``runs``/``dirty_count`` and clear what they copy. All scans use bitarray's
search primitives; nothing loops over single bits in Python. Memory is about one bit per granule.
The small ``BitmapStore`` interface is what a future persistent (resumable) bitmap implements.

Bits are kept little-endian within bytes: granule ``i`` is bit ``i % 8`` of byte ``i // 8``,
the layout QEMU serialises (qcow2 bitmap data clusters) and hashes
(x-debug-block-dirty-bitmap-sha256), so ``to_bytes``/``load_bytes`` need no conversion.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from bitarray import bitarray


class BitmapStore(Protocol):
    """What jobs need from a dirty bitmap (in-memory now; persistent later)."""

    granularity: int
    size: int

    def mark(self, offset: int, length: int) -> None: ...

    def clear(self, offset: int, length: int) -> None: ...

    def is_dirty(self, offset: int) -> bool: ...

    def next_dirty(self, offset: int, end: int | None = None) -> int | None: ...

    def dirty_count(self) -> int: ...


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


class DirtyBitmap:
    """A granularity-based bitmap over ``[0, size)`` (cf. BdrvDirtyBitmap over HBitmap).

    Byte ranges are widened to whole granules when marking: a partly written granule is dirty.
    ``clear`` clears every granule the range touches; callers pass granule-aligned ranges (the
    end of the node may be unaligned), as QEMU's bdrv_reset_dirty_bitmap requires.
    """

    def __init__(self, size: int, granularity: int) -> None:
        if not _is_pow2(granularity):
            raise ValueError(f"granularity must be a power of two, not {granularity}")
        self.granularity = granularity
        self.size = size
        self._shift = granularity.bit_length() - 1
        self._bits = bitarray(self._nbits(size), endian="little")
        self._bits.setall(0)
        #: False stops mark() from recording anything (cf. a disabled bitmap)
        self.enabled = True

    def _nbits(self, size: int) -> int:
        return (size + self.granularity - 1) >> self._shift

    def _span(self, offset: int, length: int) -> tuple[int, int]:
        """Indices of the granules touched by ``[offset, offset+length)``, clipped to size."""
        end = min(offset + length, self.size)
        offset = max(offset, 0)
        if end <= offset:
            return 0, 0
        return offset >> self._shift, (end + self.granularity - 1) >> self._shift

    # --- DirtyTracker ---------------------------------------------------------------------

    def mark(self, offset: int, length: int) -> None:
        if not self.enabled:
            return
        self.set_dirty(offset, length)

    # --- direct manipulation -----------------------------------------------------------------

    def set_dirty(self, offset: int, length: int) -> None:
        """Mark a range even while disabled (jobs re-dirtying their own failed ranges)."""
        a, b = self._span(offset, length)
        if a < b:
            self._bits[a:b] = 1

    def clear(self, offset: int, length: int) -> None:
        a, b = self._span(offset, length)
        if a < b:
            self._bits[a:b] = 0

    def mark_all(self) -> None:
        self._bits.setall(1)

    def clear_all(self) -> None:
        self._bits.setall(0)

    def resize(self, size: int) -> None:
        """Grow or shrink with the node; new granules start clean."""
        n = self._nbits(size)
        old = len(self._bits)
        if n > old:
            self._bits.extend(bitarray(n - old, endian="little"))
            self._bits[old:] = 0
        else:
            del self._bits[n:]
        self.size = size

    # --- queries ---------------------------------------------------------------------------

    def is_dirty(self, offset: int) -> bool:
        if not 0 <= offset < self.size:
            return False
        return bool(self._bits[offset >> self._shift])

    def dirty_granules(self) -> int:
        return int(self._bits.count(1))

    def dirty_count(self) -> int:
        """Dirty bytes as QEMU counts them: whole granules (cf. bdrv_get_dirty_count)."""
        return self.dirty_granules() << self._shift

    def count_range(self, offset: int, length: int) -> int:
        """Dirty granules inside a range."""
        a, b = self._span(offset, length)
        return int(self._bits.count(1, a, b)) if a < b else 0

    def next_dirty(self, offset: int, end: int | None = None) -> int | None:
        """The start of the first dirty granule at or after ``offset``'s granule, before ``end``."""
        a, b = self._span(offset, (self.size if end is None else end) - offset)
        if a >= b:
            return None
        i = self._bits.find(1, a, b)
        return None if i < 0 else i << self._shift

    def next_clean(self, offset: int, end: int | None = None) -> int | None:
        a, b = self._span(offset, (self.size if end is None else end) - offset)
        if a >= b:
            return None
        i = self._bits.find(0, a, b)
        return None if i < 0 else i << self._shift

    def runs(self, offset: int = 0, end: int | None = None) -> Iterator[tuple[int, int]]:
        """Maximal dirty byte ranges ``(offset, length)`` overlapping ``[offset, end)``.

        Ranges are granule-aligned, except that the last one is clipped to ``size``.
        """
        stop = self.size if end is None else min(end, self.size)
        pos: int | None = offset
        while pos is not None and pos < stop:
            start = self.next_dirty(pos, stop)
            if start is None:
                return
            clean = self.next_clean(start, stop)
            run_end = stop if clean is None else clean
            if clean is None:
                # the run reaches ``stop``; extend to the end of its last granule
                run_end = min(((stop + self.granularity - 1) >> self._shift) << self._shift,
                              self.size)
            yield start, run_end - start
            pos = clean

    def copy_bits(self) -> bitarray:
        """A snapshot of the raw bits (tests, persistence)."""
        return self._bits.copy()

    @property
    def granules(self) -> int:
        """How many granules the bitmap has (bits)."""
        return len(self._bits)

    # --- serialisation and merging -------------------------------------------------------

    def to_bytes(self, first_granule: int = 0, count: int | None = None) -> bytes:
        """Granules ``[first, first + count)`` packed 8 per byte, lowest granule in the least
        significant bit (qcow2 bitmap data; ``first`` must be a multiple of 8)."""
        end = len(self._bits) if count is None else min(len(self._bits), first_granule + count)
        return self._bits[first_granule:end].tobytes()

    def load_bytes(self, data: bytes, first_granule: int = 0) -> None:
        """Set granules from ``first`` on from packed bytes (the inverse of ``to_bytes``);
        bits past the end of the bitmap are ignored."""
        chunk = bitarray(endian="little")
        chunk.frombytes(data)
        end = min(len(self._bits), first_granule + len(chunk))
        if end > first_granule:
            self._bits[first_granule:end] = chunk[: end - first_granule]

    def set_granules(self, first_granule: int, count: int) -> None:
        end = min(len(self._bits), first_granule + count)
        if end > first_granule:
            self._bits[first_granule:end] = 1

    def sha256(self) -> str:
        """The digest QEMU's x-debug-block-dirty-bitmap-sha256 reports (cf. hbitmap_sha256):
        the bits as an array of little-endian 64-bit words, at least one word."""
        import hashlib  # here: loading OpenSSL costs every daemon start 1 ms (issue 10)

        data = self._bits.tobytes()
        words = max(1, -(-len(self._bits) // 64))
        return hashlib.sha256(data.ljust(words * 8, b"\0")).hexdigest()

    def merge_from(self, other: DirtyBitmap) -> None:
        """Dirty every granule of ours that overlaps a dirty granule of ``other`` (cf.
        hbitmap_merge; granularities may differ, sizes must be equal)."""
        if other.granularity == self.granularity and len(other._bits) == len(self._bits):
            self._bits |= other._bits
            return
        for offset, length in other.runs():
            self.set_dirty(offset, length)

    def copy(self) -> DirtyBitmap:
        clone = DirtyBitmap(self.size, self.granularity)
        clone._bits = self._bits.copy()
        clone.enabled = self.enabled
        return clone

    def restore(self, saved: DirtyBitmap) -> None:
        """Take the bits of a copy made earlier (transaction rollback)."""
        self._bits = saved._bits.copy()


__all__ = ["BitmapStore", "DirtyBitmap"]
