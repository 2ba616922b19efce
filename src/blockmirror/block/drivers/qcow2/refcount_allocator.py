"""Host cluster management: the refcount table, refcount blocks and cluster allocation
(cf. QEMU's qcow2-refcount.c).

The whole refcount table is held in memory; refcount blocks go through a write-back cache.
Increments may reach the disk at any flush, but decrements are deferred (``free_later``) to
step 4 of the driver's ordered flush, when no durable L2/L1 entry points at the cluster any
more: a crash leaves at worst leaked clusters, and a cluster is never reused before the
entries that pointed at it are gone from disk.

Clusters taken ahead (``reserve_tail``): a flush that writes refcount blocks anyway also
takes the next few clusters at the end of the image, so that the allocations after it find
their refcounts on disk already and the next flush has only L2 entries to write (one sync,
not two). Nothing points at a reserved cluster; ``release_reserve`` gives the unused ones
back before the image is closed, and a crash leaves them as leaked clusters, which a crash
between the two syncs of an ordinary allocation leaves too (in QEMU as here).
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Iterable

from blockmirror.block.drivers.qcow2 import compress
from blockmirror.block.drivers.qcow2.cache import TableCache
from blockmirror.block.drivers.qcow2.image_context import ImageContext
from blockmirror.block.drivers.qcow2.layout import (
    COMPRESSED,
    L2E_OFFSET_MASK,
    NORMAL,
    REFT_OFFSET_MASK,
    ZERO_ALLOC,
    ceil_div,
    cluster_type,
)
from blockmirror.block.drivers.qcow2.refcount import (
    RefcountBlock,
    decode_block,
    encode_block,
    new_block,
)
from blockmirror.errors import BlockIOError, InternalError

#: how many bytes of clusters a flush takes ahead at the end of the image (see
#: ``reserve_tail``); between 2 and ``RESERVE_MAX_CLUSTERS`` clusters
RESERVE_BYTES = 1 << 20
RESERVE_MAX_CLUSTERS = 256

#: the unit in which changed parts of a refcount block are written (a page; every sector
#: size and O_DIRECT alignment we meet divides it)
_PIECE = 4096


class RefcountAllocator:
    def __init__(self, ctx: ImageContext) -> None:
        self._ctx = ctx
        self.table: list[int] = []
        self.table_dirty = False
        self.blocks: TableCache[RefcountBlock] = TableCache(
            max(16, (8 * 1024 * 1024) // ctx.geometry.cluster_size))
        #: the entries [lo, hi) changed in a dirty block since it was last written; a dirty
        #: block without a span is written whole (see write_dirty_blocks)
        self._spans: dict[int, tuple[int, int]] = {}
        #: clusters freed since the last flush: decremented only after L2/L1 reach the disk
        self.pending_free: list[int] = []
        #: host clusters holding metadata; guest data must never be written there
        self.metadata_clusters: set[int] = set()
        #: one past the highest cluster that is in the file or allocated
        self.end = 0
        self.free_hint = 0
        #: where the next compressed stream may go: the free tail of the host cluster the
        #: last one ended in (0: none; never cluster-aligned otherwise), cf. free_byte_offset
        self.free_byte_offset = 0
        #: clusters [reserve_start, reserve_end) hold a reference taken ahead of need
        #: (``reserve_tail``) and are handed out by ``allocate`` before any other
        self.reserve_start = self.reserve_end = 0
        #: allocations so far (tail_reserve.py watches it for a reserve in use)
        self.allocations = 0
        #: clusters a flush may take ahead; 0 while the image is being closed
        self.reserve_clusters = max(2, min(RESERVE_MAX_CLUSTERS,
                                           RESERVE_BYTES // ctx.geometry.cluster_size))

    async def load_table(self) -> None:
        header = self._ctx.header
        entries = header.refcount_table_clusters * self._ctx.geometry.cluster_size // 8
        raw = await self._ctx.file.read(header.refcount_table_offset, entries * 8)
        self.table = list(struct.unpack(f">{entries}Q", raw))
        self.end = ceil_div(self._ctx.file.length, self._ctx.geometry.cluster_size)

    def replace_table(self, table: list[int], end: int) -> None:
        """Adopt a refcount structure written by a repair."""
        self.table = table
        self.table_dirty = False
        self.blocks = TableCache(self.blocks.budget)
        self._spans.clear()
        self.end = end
        self.free_byte_offset = 0
        self.reserve_start = self.reserve_end = 0

    @property
    def has_reserve(self) -> bool:
        """Clusters taken ahead are left to hand out."""
        return self.reserve_start < self.reserve_end

    @property
    def used_end(self) -> int:
        """``end`` without a reserve at the tail: where the file must reach."""
        if self.has_reserve and self.reserve_end == self.end:
            return self.reserve_start
        return self.end

    @property
    def dirty(self) -> bool:
        return bool(self.blocks.dirty or self.table_dirty or self.pending_free)

    def has_block(self, index: int) -> bool:
        return index < len(self.table) and bool(self.table[index] & REFT_OFFSET_MASK)

    async def load_block(self, index: int) -> RefcountBlock:
        block = self.blocks.get(index)
        if block is not None:
            return block
        offset = self.table[index] & REFT_OFFSET_MASK
        if not offset:
            raise InternalError(f"qcow2 refcount block {index} does not exist")
        raw = await self._ctx.file.read(offset, self._ctx.geometry.cluster_size)
        block = decode_block(raw, self._ctx.header.refcount_order)
        self.blocks.put(index, block)
        return block

    async def refcount(self, cluster: int) -> int:
        geometry = self._ctx.geometry
        index = cluster >> geometry.refcount_block_bits
        if not self.has_block(index):
            return 0
        block = await self.load_block(index)
        return block[cluster & (geometry.refcount_block_size - 1)]

    async def add(self, cluster: int, delta: int) -> int:
        """Change one refcount; returns the new value."""
        geometry = self._ctx.geometry
        index = cluster >> geometry.refcount_block_bits
        block = await self.load_block(index)
        i = cluster & (geometry.refcount_block_size - 1)
        value = block[i] + delta
        if value < 0:
            raise await self._ctx.signal_corruption(
                f"Preventing invalid free of cluster {cluster << geometry.cluster_bits:#x} "
                "(refcount already 0)"
            )
        if value > geometry.refcount_max:
            raise BlockIOError(errno.ERANGE, "Reference count overflow")
        block[i] = value
        self._note_change(index, i, i + 1)
        self.blocks.mark_dirty(index)
        return value

    def _note_change(self, index: int, lo: int, hi: int) -> None:
        """Record that entries [lo, hi) of block ``index`` change (before marking it dirty)."""
        span = self._spans.get(index)
        if span is not None:
            self._spans[index] = (min(span[0], lo), max(span[1], hi))
        elif index not in self.blocks.dirty:
            self._spans[index] = (lo, hi)
        # else: dirty as a whole already (a new block), and it stays whole

    async def _take(self, start: int, count: int) -> None:
        """Take a reference on ``count`` free clusters (their refcount blocks exist)."""
        await self._adjust(start, count, 1)

    async def _adjust(self, start: int, count: int, delta: int) -> None:
        """Add ``delta`` to the refcounts of ``count`` clusters from ``start`` (their blocks
        exist; the caller knows no count leaves its range)."""
        bits, size = self._ctx.geometry.refcount_block_bits, self._ctx.geometry.refcount_block_size
        cluster, end = start, start + count
        while cluster < end:
            index = cluster >> bits
            base = index << bits
            hi = min(end, base + size)
            block = await self.load_block(index)
            for i in range(cluster - base, hi - base):
                block[i] += delta
            self._note_change(index, cluster - base, hi - base)
            self.blocks.mark_dirty(index, block)
            cluster = hi

    async def _find_free(self, count: int) -> tuple[int, int]:
        """The first run of ``count`` free clusters at or after the free hint, and the first
        free cluster seen.

        Scans decoded refcount blocks with list primitives rather than cluster by cluster;
        everything at or past ``end`` and every range without a refcount block is free.
        """
        bits, size = self._ctx.geometry.refcount_block_bits, self._ctx.geometry.refcount_block_size
        cluster = self.free_hint
        start = cluster
        run = 0
        first_free = -1
        while run < count:
            if cluster >= self.end:
                if run == 0:
                    start = cluster
                break
            index = cluster >> bits
            base = index << bits
            if not self.has_block(index):
                if run == 0:
                    start = cluster
                run += base + size - cluster
                cluster = base + size
                continue
            block = await self.load_block(index)
            i = cluster - base
            while i < size and run < count:
                if run == 0:
                    try:
                        i = block.index(0, i)
                    except ValueError:
                        i = size
                        break
                    start = base + i
                need = min(count - run, size - i)
                segment = block[i : i + need]
                if not any(segment):
                    run += need
                    i += need
                else:
                    k = next(k for k, v in enumerate(segment) if v)
                    run = 0
                    i += k + 1
            cluster = base + i
            if first_free < 0 and run:
                first_free = start
        if first_free < 0:
            first_free = start
        return start, first_free

    async def allocate(self, count: int) -> int:
        """Allocate ``count`` contiguous clusters (refcount 1 each); return the first index."""
        self.allocations += 1
        start = self.reserve_start
        if count <= self.reserve_end - start and self.free_hint >= start:
            # no free cluster before the reserve: where _find_free would have looked
            self.reserve_start = start + count
            return start
        geometry = self._ctx.geometry
        bits = geometry.refcount_block_bits
        while True:
            start, first_free = await self._find_free(count)
            # refcounts of 0 on metadata (a refcount table entry without its block, a
            # zeroed refcount) make metadata look free: QEMU's overlap check refuses the
            # write and marks the image corrupt; here, too (the header cluster taken for a
            # new refcount block re-read as "no block" and allocated forever)
            overlap = next((c for c in range(start, start + count)
                            if c in self.metadata_clusters), None)
            if overlap is not None:
                raise await self._ctx.signal_corruption(
                    "Preventing invalid write on metadata (overlaps with "
                    f"{self._metadata_name(overlap)})")
            missing = None
            for index in range(start >> bits, ((start + count - 1) >> bits) + 1):
                if not self.has_block(index):
                    missing = index
                    break
            if missing is None:
                await self._take(start, count)
                # the hint stays on the first hole when this run did not start there
                self.free_hint = start + count if start == first_free else first_free
                self.end = max(self.end, start + count)
                return start
            if missing >= len(self.table):
                await self._grow_table(missing)
                continue
            # the new block takes the first cluster of the run: either inside its own range
            # (a self-describing refcount block) or in a range whose block exists already
            block = new_block(geometry.refcount_block_size, self._ctx.header.refcount_order)
            self._spans.pop(missing, None)  # new: written whole
            self.blocks.put(missing, block, dirty=True)
            self.table[missing] = start << geometry.cluster_bits
            self.table_dirty = True
            if start >> bits == missing:
                block[start & (geometry.refcount_block_size - 1)] = 1
            else:
                await self.add(start, 1)
            self.metadata_clusters.add(start)
            self.end = max(self.end, start + 1)

    async def reserve_tail(self) -> None:
        """Take a reference on the next ``reserve_clusters`` clusters at the end of the image
        (as far as the refcount block there reaches), unless a reserve is left or free
        clusters before the end would be allocated first. Called by a flush about to write
        the refcount blocks: these changes go to disk with the same write and sync."""
        count, start = self.reserve_clusters, self.end
        if not count or self.has_reserve or self.free_hint < start:
            return
        bits = self._ctx.geometry.refcount_block_bits
        index = start >> bits
        if not self.has_block(index):
            return  # a new refcount block is the allocation that makes one, not this
        stop = min(start + count, (index + 1) << bits)
        await self._take(start, stop - start)
        self.reserve_start, self.reserve_end = start, stop
        self.end = self.free_hint = stop

    async def release_reserve(self) -> None:
        """Give back the clusters taken ahead and not handed out (refcounts to 0; written at
        the next flush). The image's end moves back when they were its last clusters."""
        start, stop = self.reserve_start, self.reserve_end
        self.reserve_start = self.reserve_end = 0
        if start >= stop:
            return
        await self._adjust(start, stop - start, -1)
        self.free_hint = min(self.free_hint, start)
        if self.end == stop:
            self.end = start

    def _metadata_name(self, cluster: int) -> str:
        """QEMU's name for the metadata structure at ``cluster`` (its overlap-check texts)."""
        header, cluster_size = self._ctx.header, self._ctx.geometry.cluster_size
        offset = cluster * cluster_size
        if cluster == 0:
            return "qcow2_header"
        reftable = header.refcount_table_offset
        if reftable <= offset < reftable + header.refcount_table_clusters * cluster_size:
            return "refcount table"
        l1 = header.l1_table_offset
        if l1 <= offset < l1 + max(header.l1_size * 8, 1):
            return "active L1 table"
        return "qcow2 metadata"

    async def allocate_bytes(self, size: int) -> int:
        """Room for a compressed stream of ``size`` bytes (0 < size < a cluster): the host
        byte offset, with one more reference on every host cluster the stream touches (cf.
        qcow2_alloc_bytes). Streams are packed back to back: one goes after the previous one
        in the same cluster, or runs on into the next cluster when that is the one allocated
        next; otherwise it starts a fresh cluster and the old tail stays unused."""
        geometry = self._ctx.geometry
        bits, cluster_size = geometry.cluster_bits, geometry.cluster_size
        assert 0 < size <= cluster_size
        offset = self.free_byte_offset
        if offset:
            cluster = offset >> bits
            # a tail whose cluster was freed meanwhile (or is full of references) is gone
            if cluster >= self.end or await self.refcount(cluster) in (0, geometry.refcount_max):
                offset = 0
        free_in_cluster = cluster_size - (offset & (cluster_size - 1))
        if not offset or free_in_cluster < size:
            new_cluster = await self.allocate(1)  # its reference is the stream's
            if new_cluster == 0:
                raise await self._ctx.signal_corruption(
                    "Preventing invalid allocation of compressed cluster at offset 0")
            if offset and ((offset >> bits) + 1) == new_cluster:
                await self.add(offset >> bits, 1)  # the stream starts in the old tail
            else:
                offset = new_cluster << bits
        else:
            await self.add(offset >> bits, 1)
        end = offset + size
        self.free_byte_offset = end if end & (cluster_size - 1) else 0
        return offset

    async def _grow_table(self, index_needed: int) -> None:
        """Move the refcount table to a bigger one at the end of the image."""
        geometry = self._ctx.geometry
        cluster_size = geometry.cluster_size
        old = list(self.table)
        old_entries = len(old)
        area = self.end
        want = max(index_needed + 1, old_entries + max(1, old_entries // 2))
        table_clusters = block_count = 0
        missing: list[int] = []
        while True:
            area_end = area + block_count + table_clusters
            entries = max(want, ceil_div(area_end, geometry.refcount_block_size))
            new_table_clusters = ceil_div(entries * 8, cluster_size)
            lo = area >> geometry.refcount_block_bits
            hi = (area + block_count + new_table_clusters - 1) >> geometry.refcount_block_bits
            missing = [
                r for r in range(lo, hi + 1)
                if r >= old_entries or not old[r] & REFT_OFFSET_MASK
            ]
            if (new_table_clusters, len(missing)) == (table_clusters, block_count):
                break
            table_clusters, block_count = new_table_clusters, len(missing)
        table = old + [0] * (table_clusters * cluster_size // 8 - old_entries)
        for k, index in enumerate(missing):
            table[index] = (area + k) << geometry.cluster_bits
            self._spans.pop(index, None)  # new: written whole
            self.blocks.put(index, new_block(geometry.refcount_block_size,
                                             self._ctx.header.refcount_order), dirty=True)
        self.table = table
        for cluster in range(area, area + block_count + table_clusters):
            await self.add(cluster, 1)
            self.metadata_clusters.add(cluster)
        self.end = area + block_count + table_clusters
        # new blocks first, then the table, then the header that points at it
        await self._ctx.file.ensure_size(self.end * cluster_size)
        await self.write_dirty_blocks()
        await self._ctx.file.flush()
        table_offset = (area + block_count) << geometry.cluster_bits
        await self._ctx.file.write(table_offset, struct.pack(f">{len(table)}Q", *table))
        await self._ctx.file.flush()
        header = self._ctx.header
        old_offset, old_clusters = header.refcount_table_offset, header.refcount_table_clusters
        header.refcount_table_offset = table_offset
        header.refcount_table_clusters = table_clusters
        await self._ctx.file.write_header(header)
        await self._ctx.file.flush()
        self.table_dirty = False
        self.pending_free.extend(geometry.clusters(old_offset, old_clusters * cluster_size))

    async def write_dirty_blocks(self, *, durable: bool = False) -> None:
        """Write the changed refcount blocks; ``durable``: and flush (with what came before).

        Of a block whose changes are known (a span), only the 4 KiB pieces holding them are
        encoded and written: an allocating guest write changes one entry, and encoding a
        whole 64 KiB block of 32,768 entries cost 230 µs of that write (measured, cProfile).
        """
        order = self._ctx.header.refcount_order
        block_bytes = self._ctx.geometry.cluster_size
        pieces = []
        for index in sorted(self.blocks.dirty):
            offset = self.table[index] & REFT_OFFSET_MASK
            block = self.blocks.peek(index)
            span = self._spans.get(index)
            if span is None:
                pieces.append((offset, encode_block(block, order)))
                continue
            # bytes [lo, hi) holding the changed entries, widened to whole 4 KiB pieces
            lo = (span[0] << order) // 8 // _PIECE * _PIECE
            hi = min(block_bytes, -(-((span[1] << order) // 8 + 1) // _PIECE) * _PIECE)
            first, last = (lo * 8) >> order, (hi * 8) >> order
            pieces.append((offset + lo, encode_block(block[first:last], order)))
        await self._ctx.file.write_pieces(pieces, durable=durable)
        self.blocks.clean_all()
        self._spans.clear()

    async def write_table(self, *, durable: bool = False) -> None:
        table = self.table
        piece = (self._ctx.header.refcount_table_offset, struct.pack(f">{len(table)}Q", *table))
        await self._ctx.file.write_pieces([piece], durable=durable)
        self.table_dirty = False

    # --- freeing -------------------------------------------------------------------------

    def free_later(self, clusters: Iterable[int]) -> None:
        self.pending_free.extend(clusters)

    def free_entry_later(self, entry: int) -> None:
        """Drop, at the next flush, the references an L2 entry holds."""
        kind = cluster_type(entry, self._ctx.header.version)
        if kind == COMPRESSED:
            self.pending_free.extend(compress.host_clusters(entry, self._ctx.geometry.cluster_bits))
        elif kind in (NORMAL, ZERO_ALLOC):
            self.pending_free.append((entry & L2E_OFFSET_MASK) >> self._ctx.geometry.cluster_bits)

    async def release_pending(self) -> list[int]:
        """Apply the deferred decrements (flush step 4); returns the clusters now free."""
        frees, self.pending_free = self.pending_free, []
        released: list[int] = []
        image_file = self._ctx.file
        for cluster in frees:
            if image_file.any_in_flight and image_file.in_flight(cluster):
                # a request outside the lock still uses it: release it next time
                self.pending_free.append(cluster)
                continue
            if await self.add(cluster, -1) == 0:
                if self.free_byte_offset >> self._ctx.geometry.cluster_bits == cluster:
                    self.free_byte_offset = 0  # its tail must not take streams any more
                self.metadata_clusters.discard(cluster)
                self.free_hint = min(self.free_hint, cluster)
                released.append(cluster)
        await self.write_dirty_blocks()
        return released

    async def used_clusters_exceed(self, end: int, threshold: int) -> bool:
        """Whether more than ``threshold`` clusters below ``end`` have a reference."""
        geometry = self._ctx.geometry
        used = 0
        blocks = min(len(self.table), ceil_div(end, geometry.refcount_block_size))
        for index in range(blocks):
            if not self.table[index] & REFT_OFFSET_MASK:
                continue
            block = await self.load_block(index)
            n = min(geometry.refcount_block_size, end - (index << geometry.refcount_block_bits))
            used += n - block[:n].count(0)
            if used > threshold:
                return True
        return False
