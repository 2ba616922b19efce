"""Guest-to-host cluster mapping: the L1 table and L2 tables (cf. QEMU's qcow2-cluster.c).

The active L1 table is held in memory whole; L2 tables go through a write-back cache. An L2
table or data cluster shared with a snapshot (no COPIED flag) is copied before it is changed.
Every method that reads or changes entries runs under the driver's metadata lock.
"""

from __future__ import annotations

import struct
from array import array
from collections.abc import MutableSequence
from functools import reduce
from operator import or_

from blockmirror.block.drivers.qcow2.cache import TableCache
from blockmirror.block.drivers.qcow2.image_context import ImageContext
from blockmirror.block.drivers.qcow2.layout import (
    COMPRESSED,
    L1E_OFFSET_MASK,
    L2E_OFFSET_MASK,
    NORMAL,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    OFLAG_ZERO,
    UNALLOCATED,
    ZERO_ALLOC,
    ZERO_PLAIN,
    cluster_type,
)
from blockmirror.block.drivers.qcow2.refcount import decode_block, encode_block
from blockmirror.block.drivers.qcow2.refcount_allocator import (
    RefcountAllocator,
)

#: a run of guest clusters of one type: (type, guest offset, length, host offset or L2 entry)
Segment = tuple[int, int, int, int]
#: an L2 entry to set once the data is written: L1 index, L2 index, new entry
Link = tuple[int, int, int]


#: L2 entries in a 4 KiB page, the unit in which a table's changed part is written
_PAGE_ENTRIES = 4096 // 8

class ClusterMap:
    def __init__(self, ctx: ImageContext, allocator: RefcountAllocator) -> None:
        self._ctx = ctx
        self._allocator = allocator
        self.l1: list[int] = []
        self.l1_dirty: set[int] = set()
        #: L2 tables as native arrays of 64-bit entries, not lists of ints: a fully
        #: allocated 64 KiB table is 64 KiB instead of about 330 KiB (a pointer and an int
        #: object per entry), which kept a 4 GiB qcow2-to-qcow2 mirror above 40 MiB of RSS
        self.l2_cache: TableCache[MutableSequence[int]] = TableCache(
            max(16, (32 * 1024 * 1024) // ctx.geometry.cluster_size))

    async def load_l1(self) -> None:
        header = self._ctx.header
        size = header.l1_size
        raw = await self._ctx.file.read(header.l1_table_offset, size * 8) if size else b""
        self.l1 = list(struct.unpack(f">{size}Q", raw))

    @property
    def dirty(self) -> bool:
        return bool(self.l2_cache.dirty or self.l1_dirty)

    def cluster_type(self, entry: int) -> int:
        return cluster_type(entry, self._ctx.header.version)

    # --- L2 tables -----------------------------------------------------------------------

    async def load_l2(self, offset: int, l1_index: int) -> MutableSequence[int]:
        table = self.l2_cache.get(offset)
        if table is not None:
            return table
        cluster_size = self._ctx.geometry.cluster_size
        if offset % cluster_size:
            raise await self._ctx.signal_corruption(
                f"L2 table offset {offset:#x} unaligned (L1 index: {l1_index:#x})"
            )
        if offset + cluster_size > self._ctx.file.length:
            raise await self._ctx.signal_corruption(
                f"L2 table offset {offset:#x} past the end of the image (L1 index: "
                f"{l1_index:#x})"
            )
        raw = await self._ctx.file.read(offset, cluster_size)
        table = decode_l2(raw)
        self.l2_cache.put(offset, table)
        return table

    async def l2_for_read(self, l1_index: int) -> MutableSequence[int] | None:
        if l1_index >= len(self.l1):
            return None
        offset = self.l1[l1_index] & L1E_OFFSET_MASK
        if not offset:
            return None
        return await self.load_l2(offset, l1_index)

    async def l2_for_write(self, l1_index: int) -> tuple[int, MutableSequence[int]]:
        """The L2 table of ``l1_index`` ready for changes (allocated or copied if needed)."""
        entry = self.l1[l1_index]
        offset = entry & L1E_OFFSET_MASK
        if offset and entry & OFLAG_COPIED:
            return offset, await self.load_l2(offset, l1_index)
        if offset:
            # shared with a snapshot: copy the table, drop our reference to the old one
            table: MutableSequence[int] = array("Q", await self.load_l2(offset, l1_index))
        else:
            table = array("Q", bytes(8 * self._ctx.geometry.l2_size))
        cluster_bits = self._ctx.geometry.cluster_bits
        new = (await self._allocator.allocate(1)) << cluster_bits
        self._allocator.metadata_clusters.add(new >> cluster_bits)
        self.l2_cache.put(new, table, dirty=True)
        self.l1[l1_index] = new | OFLAG_COPIED
        self.l1_dirty.add(l1_index)
        if offset:
            self.l2_cache.drop(offset)
            self._allocator.free_later([offset >> cluster_bits])
        return new, table

    async def entry(self, guest_cluster: int) -> int:
        """The L2 entry of a guest cluster (0 when its L2 table is unallocated)."""
        table = await self.l2_for_read(guest_cluster >> self._ctx.geometry.l2_bits)
        if table is None:
            return 0
        return table[guest_cluster & (self._ctx.geometry.l2_size - 1)]

    # --- data cluster validation -----------------------------------------------------------

    def data_cluster_ok(self, host: int, writing: bool) -> bool:
        """The cheap form of ``check_data_cluster``: True when plainly valid."""
        cluster = host >> self._ctx.geometry.cluster_bits
        return (
            not host & (self._ctx.geometry.cluster_size - 1)
            and cluster < self._allocator.end
            and not (writing and cluster in self._allocator.metadata_clusters)
        )

    async def check_data_cluster(
        self, host: int, l2_offset: int, l2_index: int, writing: bool
    ) -> None:
        if host % self._ctx.geometry.cluster_size:
            raise await self._ctx.signal_corruption(
                f"Cluster allocation offset {host:#x} unaligned (L2 offset: {l2_offset:#x}, "
                f"L2 index: {l2_index:#x})"
            )
        cluster = host >> self._ctx.geometry.cluster_bits
        if cluster >= self._allocator.end:
            raise await self._ctx.signal_corruption(
                f"Data cluster offset {host:#x} past the end of the image file "
                f"(L2 offset: {l2_offset:#x}, L2 index: {l2_index:#x})"
            )
        if writing and cluster in self._allocator.metadata_clusters:
            raise await self._ctx.signal_corruption(
                f"Preventing invalid write on metadata (data cluster {host:#x} overlaps "
                "qcow2 metadata)"
            )

    # --- mapping ---------------------------------------------------------------------------

    async def map(self, offset: int, length: int, first_only: bool = False) -> list[Segment]:
        """Split a guest range into segments of one cluster type.

        Neighbouring clusters of the same type merge (data ones only when contiguous on the
        host), so a sequential read becomes one file read per host extent. ``first_only``
        stops at the first change (compressed clusters still merge), for block status.
        """
        segments: list[Segment] = []
        pos, end = offset, offset + length
        geometry = self._ctx.geometry
        cluster_size, cluster_bits, l2_bits = (
            geometry.cluster_size, geometry.cluster_bits, geometry.l2_bits
        )
        mask = geometry.l2_size - 1
        v3 = self._ctx.header.version == 3
        l1 = self.l1
        current_l1 = -1
        table: MutableSequence[int] | None = None
        l2_offset = 0
        # the segment being grown, kept in locals and appended when it ends
        seg_type, seg_pos, seg_len, seg_value = -1, 0, 0, 0
        while pos < end:
            guest_cluster = pos >> cluster_bits
            l1_index = guest_cluster >> l2_bits
            if l1_index != current_l1:
                table = await self.l2_for_read(l1_index)
                l2_offset = l1[l1_index] & L1E_OFFSET_MASK if table is not None else 0
                current_l1 = l1_index
            l2_index = guest_cluster & mask
            entry = table[l2_index] if table is not None else 0
            in_cluster = pos & (cluster_size - 1)
            n = min(cluster_size - in_cluster, end - pos)
            # cluster_type() inlined: this loop runs once per cluster
            if entry & OFLAG_COMPRESSED:
                kind, value = COMPRESSED, entry
            else:
                host = entry & L2E_OFFSET_MASK
                if entry & OFLAG_ZERO and v3:
                    kind = ZERO_ALLOC if host else ZERO_PLAIN
                else:
                    kind = NORMAL if host else UNALLOCATED
                if host:
                    if not self.data_cluster_ok(host, False):
                        await self.check_data_cluster(host, l2_offset, l2_index, False)
                    value = host + in_cluster
                else:
                    value = 0
            if kind == seg_type and (
                kind in (UNALLOCATED, ZERO_PLAIN)
                or (kind != COMPRESSED and seg_value + seg_len == value)
                or (first_only and kind == COMPRESSED)
            ):
                seg_len += n
            else:
                if seg_type >= 0:
                    segments.append((seg_type, seg_pos, seg_len, seg_value))
                    if first_only:
                        return segments
                seg_type, seg_pos, seg_len, seg_value = kind, pos, n, value
            pos += n
        if seg_type >= 0:
            segments.append((seg_type, seg_pos, seg_len, seg_value))
        return segments

    async def data_runs(self, offset: int, length: int) -> list[tuple[bool, int]]:
        """``map`` reduced to data (NORMAL, COMPRESSED) and hole runs, as block status sees
        an image without backing, one L2 table slice at a time with list primitives instead
        of a step per cluster (a mirror asks this for every gigabyte it copies). A slice
        with a host offset that ``map`` would refuse goes through ``map``, which signals it."""
        runs: list[tuple[bool, int]] = []
        geometry = self._ctx.geometry
        cluster_size, cluster_bits, l2_bits = (
            geometry.cluster_size, geometry.cluster_bits, geometry.l2_bits
        )
        mask = geometry.l2_size - 1
        zero_flag = OFLAG_ZERO if self._ctx.header.version == 3 else 0
        limit = self._allocator.end << cluster_bits
        in_mask = cluster_size - 1
        pos, end = offset, offset + length
        while pos < end:
            guest_cluster = pos >> cluster_bits
            l1_index = guest_cluster >> l2_bits
            stop = min(end, ((l1_index + 1) << l2_bits) << cluster_bits)
            table = await self.l2_for_read(l1_index)
            lo = guest_cluster & mask
            hi = lo + (((stop - 1) >> cluster_bits) - guest_cluster) + 1
            seg = table[lo:hi] if table is not None else None
            if not seg or not any(seg):
                _add_run(runs, False, stop - pos)
                pos = stop
                continue
            hosts = [e & L2E_OFFSET_MASK for e in seg
                     if e & L2E_OFFSET_MASK and not e & OFLAG_COMPRESSED]
            if hosts and (max(hosts) >= limit or reduce(or_, hosts) & in_mask):
                for kind, _p, n, _v in await self.map(pos, stop - pos):
                    _add_run(runs, kind in (NORMAL, COMPRESSED), n)
                pos = stop
                continue
            kinds = [1 if e & OFLAG_COMPRESSED or (e & L2E_OFFSET_MASK and not e & zero_flag)
                     else 0 for e in seg]
            # runs of equal kinds, found with list.index; the first and last cluster may be
            # partly outside [pos, stop)
            i, count = 0, len(kinds)
            base = guest_cluster << cluster_bits
            while i < count:
                kind = kinds[i]
                try:
                    j = kinds.index(1 - kind, i)
                except ValueError:
                    j = count
                run_start = max(pos, base + (i << cluster_bits))
                run_end = min(stop, base + (j << cluster_bits))
                _add_run(runs, bool(kind), run_end - run_start)
                i = j
            pos = stop
        return runs

    async def host_runs(
        self, extents: list[tuple[int, int]]
    ) -> list[list[tuple[int, int]]] | None:
        """``map`` for ranges that should be plain data clusters only: the ``(host offset,
        length)`` runs of each (contiguous clusters merged), or None at the first cluster of
        another type (the caller then reads the bytes instead). One pass, no segment tuples,
        one table lookup per L2 table: a mirror's file-to-file copy asks this for thousands
        of extents."""
        out: list[list[tuple[int, int]]] = []
        geometry = self._ctx.geometry
        cluster_size, cluster_bits, l2_bits = (
            geometry.cluster_size, geometry.cluster_bits, geometry.l2_bits
        )
        mask = geometry.l2_size - 1
        in_mask = cluster_size - 1
        zero_flag = OFLAG_ZERO if self._ctx.header.version == 3 else 0
        not_plain = OFLAG_COMPRESSED | zero_flag
        l1 = self.l1
        allocator = self._allocator
        current_l1 = -1
        table: MutableSequence[int] | None = None
        for offset, length in extents:
            runs: list[tuple[int, int]] = []
            out.append(runs)
            pos, end = offset, offset + length
            first, last = offset >> cluster_bits, (end - 1) >> cluster_bits
            if length > 0 and first >> l2_bits == last >> l2_bits == current_l1:
                # the common case, tested in C: the extent lies in the L2 table at hand (the
                # loop below fetched it for an earlier extent), and its entries are
                # consecutive host clusters with the same flags (a copied or converted image)
                assert table is not None
                lo = first & mask
                entry = table[lo]
                host = entry & L2E_OFFSET_MASK
                count = last - first + 1
                if (host and not entry & not_plain and not host & in_mask
                        and (host >> cluster_bits) + count <= allocator.end
                        and table[lo : lo + count] == array(
                            "Q", range(entry, entry + (count << cluster_bits), cluster_size))):
                    runs.append((host + (offset & in_mask), length))
                    continue
            while pos < end:
                guest_cluster = pos >> cluster_bits
                l1_index = guest_cluster >> l2_bits
                if l1_index != current_l1:
                    table = await self.l2_for_read(l1_index)
                    if table is None:
                        return None
                    current_l1 = l1_index
                assert table is not None
                entry = table[guest_cluster & mask]
                host = entry & L2E_OFFSET_MASK
                if not host or entry & not_plain:
                    return None
                if host & in_mask or host >> cluster_bits >= allocator.end:
                    await self.check_data_cluster(
                        host, l1[l1_index] & L1E_OFFSET_MASK, guest_cluster & mask, False)
                in_cluster = pos & in_mask
                n = min(cluster_size - in_cluster, end - pos)
                host += in_cluster
                pos += n
                if runs:
                    last_host, last_n = runs[-1]
                    if last_host + last_n == host:
                        runs[-1] = (last_host, last_n + n)
                        continue
                runs.append((host, n))
        return out

    async def link(self, links: list[Link]) -> None:
        """Point L2 entries at data now written, freeing what they held."""
        current = -1
        table: MutableSequence[int] = array("Q")
        holds = L2E_OFFSET_MASK | OFLAG_COMPRESSED
        l2_offset, lo, hi = 0, 0, 0
        cache = self.l2_cache
        for l1_index, l2_index, new in links:
            if l1_index != current:
                if current >= 0:
                    cache.mark_dirty(l2_offset, table, (lo, hi))
                l2_offset, table = await self.l2_for_write(l1_index)
                # dirty before the next table is fetched: a clean one may be evicted
                lo, hi = l2_index, l2_index + 1
                cache.mark_dirty(l2_offset, table, (lo, hi))
                current = l1_index
            elif l2_index < lo:
                lo = l2_index
            elif l2_index >= hi:
                hi = l2_index + 1
            old = table[l2_index]
            table[l2_index] = new
            # an entry without a host cluster (unallocated, plain zero) frees nothing
            if old & holds and (
                    (old & L2E_OFFSET_MASK) != (new & L2E_OFFSET_MASK) or old & OFLAG_COMPRESSED):
                self._allocator.free_entry_later(old)
        if current >= 0:
            cache.mark_dirty(l2_offset, table, (lo, hi))

    # --- zeroing and discarding ------------------------------------------------------------

    def reads_as_zero(self, entry: int, has_backing: bool) -> bool:
        kind = self.cluster_type(entry)
        if kind in (ZERO_PLAIN, ZERO_ALLOC):
            return True
        return kind == UNALLOCATED and not has_backing

    async def unmap_v2(self, guest_cluster: int) -> None:
        """Drop a cluster's mapping (version 2 images without a backing file)."""
        l1_index = guest_cluster >> self._ctx.geometry.l2_bits
        l2_index = guest_cluster & (self._ctx.geometry.l2_size - 1)
        l2_offset, table = await self.l2_for_write(l1_index)
        self._allocator.free_entry_later(table[l2_index])
        table[l2_index] = 0
        self.l2_cache.mark_dirty(l2_offset, table)

    async def zero_clusters_v3(self, first: int, end: int, unmap: bool) -> None:
        """Set zero flags on guest clusters [first, end), one L2 table at a time (a mirror
        zeroes whole gigabytes at once)."""
        await self.zero_spans_v3([(first, end)], unmap)

    async def zero_spans_v3(self, spans: list[tuple[int, int]], unmap: bool) -> None:
        """``zero_clusters_v3`` of every ``(first, end)`` in turn, in one pass (a mirror's
        batch of holes: thousands of short spans, mostly in the same few L2 tables)."""
        l2_bits = self._ctx.geometry.l2_bits
        mask = self._ctx.geometry.l2_size - 1
        current = -1
        table: MutableSequence[int] | None = None
        l2_offset = 0
        writable: MutableSequence[int] | None = None
        for first, end in spans:
            guest_cluster = first
            while guest_cluster < end:
                l1_index = guest_cluster >> l2_bits
                stop = min(end, (l1_index + 1) << l2_bits)
                lo, hi = guest_cluster & mask, ((stop - 1) & mask) + 1
                guest_cluster = stop
                if l1_index != current:
                    current = l1_index
                    writable = None
                    table = await self.l2_for_read(l1_index)
                source = writable if writable is not None else table
                old = source[lo:hi] if source is not None else None
                if old is not None and (old.count(OFLAG_ZERO) == hi - lo or all(
                    (e & (OFLAG_ZERO | OFLAG_COMPRESSED)) == OFLAG_ZERO
                    and (not unmap or not e & L2E_OFFSET_MASK)
                    for e in old
                )):
                    continue  # already zero clusters
                if writable is None:
                    l2_offset, writable = await self.l2_for_write(l1_index)
                    old = writable[lo:hi]
                assert old is not None
                if not any(old):
                    # all unallocated: the common case of a fresh target
                    writable[lo:hi] = array("Q", (OFLAG_ZERO,)) * (hi - lo)
                else:
                    self._zero_entries(writable, lo, hi, unmap)
                self.l2_cache.mark_dirty(l2_offset, writable)

    def _zero_entries(self, writable: MutableSequence[int], lo: int, hi: int,
                      unmap: bool) -> None:
        for l2_index in range(lo, hi):
            entry = writable[l2_index]
            kind = self.cluster_type(entry)
            if kind == ZERO_PLAIN or (kind == ZERO_ALLOC and not unmap):
                continue
            if kind in (NORMAL, ZERO_ALLOC) and entry & OFLAG_COPIED and not unmap:
                writable[l2_index] = (entry & L2E_OFFSET_MASK) | OFLAG_COPIED | OFLAG_ZERO
            else:
                if kind != UNALLOCATED:
                    self._allocator.free_entry_later(entry)
                writable[l2_index] = OFLAG_ZERO

    async def discard(self, first: int, end: int, has_backing: bool) -> None:
        """Deallocate guest clusters [first, end): they read as zeroes afterwards, or from the
        backing file on version 2 images."""
        v3 = self._ctx.header.version == 3
        l2_bits, mask = self._ctx.geometry.l2_bits, self._ctx.geometry.l2_size - 1
        for guest_cluster in range(first, end):
            l1_index = guest_cluster >> l2_bits
            table = await self.l2_for_read(l1_index)
            l2_index = guest_cluster & mask
            entry = table[l2_index] if table is not None else 0
            new = OFLAG_ZERO if (v3 and has_backing) else 0
            if entry == new or (table is None and new == 0):
                continue
            l2_offset, writable = await self.l2_for_write(l1_index)
            entry = writable[l2_index]
            if self.cluster_type(entry) in (NORMAL, ZERO_ALLOC, COMPRESSED):
                self._allocator.free_entry_later(entry)
            writable[l2_index] = new
            self.l2_cache.mark_dirty(l2_offset, writable)

    # --- write-back (steps 2 and 3 of the driver's ordered flush) ---------------------------

    async def write_dirty_l2(self, *, durable: bool = False) -> None:
        """Write the changed L2 tables; ``durable``: and flush (with what came before)."""
        cache, size = self.l2_cache, self._ctx.geometry.l2_size
        pieces = []
        for offset in sorted(cache.dirty):
            table = cache.peek(offset)
            span = cache.spans.get(offset)
            if span is None:
                pieces.append((offset, encode_l2(table, 0, size)))
                continue
            # only the 4 KiB pages (512 entries) holding the changed entries: an allocating
            # guest write links one entry, and packing all 8,192 of a 64 KiB table cost
            # 100-150 µs of that write
            first = span[0] // _PAGE_ENTRIES * _PAGE_ENTRIES
            last = min(size, -(-span[1] // _PAGE_ENTRIES) * _PAGE_ENTRIES)
            pieces.append((offset + first * 8, encode_l2(table, first, last)))
        await self._ctx.file.write_pieces(pieces, durable=durable)
        cache.clean_all()

    async def write_dirty_l1(self, *, durable: bool = False) -> None:
        """Changed L1 entries, in whole 512-byte sectors."""
        pieces = []
        for sector in sorted({i // 64 for i in self.l1_dirty}):
            chunk = self.l1[sector * 64 : sector * 64 + 64]
            pieces.append((self._ctx.header.l1_table_offset + sector * 512,
                           struct.pack(f">{len(chunk)}Q", *chunk)))
        await self._ctx.file.write_pieces(pieces, durable=durable)
        self.l1_dirty.clear()


def _add_run(runs: list[tuple[bool, int]], is_data: bool, n: int) -> None:
    if runs and runs[-1][0] == is_data:
        runs[-1] = (is_data, runs[-1][1] + n)
    else:
        runs.append((is_data, n))


# L2 entries are 64-bit big-endian integers, the layout of a refcount block of order 6: its
# codec (native arrays, a byte swap) serves both


def decode_l2(raw: bytes) -> MutableSequence[int]:
    """An L2 table's entries as a native array."""
    return decode_block(raw, 6)


def encode_l2(table: MutableSequence[int], first: int, last: int) -> bytes:
    """Entries [first, last) of an L2 table, big-endian."""
    return encode_block(table[first:last], 6)
