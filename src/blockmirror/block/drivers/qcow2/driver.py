"""The qcow2 format driver: an async ``BlockDriver`` composed of the format's parts.

- ``image_file.ImageFile``: bytes of the ``file`` child, its growth, host I/O in flight;
- ``refcount_allocator.RefcountAllocator``: refcount table and blocks, cluster allocation;
- ``cluster_map.ClusterMap``: L1 and L2 tables, guest-to-host mapping, zeroing, discard;
- ``data_path.DataPath``: guest reads and writes (copy-on-write, in-place writes);
- ``bitmaps.BitmapStore``: persistent dirty bitmaps (the bitmaps extension);
- ``snapshots``, ``check`` (layout validation, repair), ``corruption.CorruptionGuard``.

The parts share one ``image_context.ImageContext`` (node, header, geometry, image file, lock,
the driver's flush callbacks), built in ``open`` once the header is known.

Metadata lives in memory while the image is open: the whole L1 table and refcount table, and
write-back LRU caches of L2 tables and refcount blocks (``cache.py``). Nothing but guest data
reaches the file between flushes; ``flush`` writes metadata back in an order that keeps the
on-disk image consistent at every step (cf. QEMU's qcow2 cache dependencies):

  1. refcount blocks (increments only), then the refcount table entries pointing at new blocks;
  2. L2 tables, which may now point at clusters whose refcounts are durable;
  3. the L1 table, pointing at L2 tables now durable;
  4. deferred decrements (clusters freed since the last flush), now that no durable L2/L1 entry
     points at them.

A crash therefore leaves at worst leaked clusters. ``self.lock`` guards metadata only (see
``data_path`` for how data I/O runs outside it).
"""

from __future__ import annotations

import asyncio
import errno
import struct
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from blockmirror.block.driver import (
    BlockDriver,
    BlockStatus,
    DriverInfo,
    Extent,
    WriteFlags,
)
from blockmirror.block.drivers.qcow2.bitmaps import BitmapStore
from blockmirror.block.drivers.qcow2.check import (
    check_metadata_layout,
    collect_references,
    metadata_preallocated,
    rebuild_refcounts,
)
from blockmirror.block.drivers.qcow2.cluster_map import ClusterMap
from blockmirror.block.drivers.qcow2.compressed_write import CompressedWriter
from blockmirror.block.drivers.qcow2.corruption import CorruptionGuard
from blockmirror.block.drivers.qcow2.data_path import DataPath
from blockmirror.block.drivers.qcow2.header import (
    AUTOCLEAR_BITMAPS,
    COMPAT_LAZY_REFCOUNTS,
    INCOMPAT_CORRUPT,
    INCOMPAT_DIRTY,
    MAGIC,
    Header,
    parse_header,
)
from blockmirror.block.drivers.qcow2.image_context import ImageContext
from blockmirror.block.drivers.qcow2.image_file import ImageFile
from blockmirror.block.drivers.qcow2.layout import (
    COMPRESSED,
    L1E_OFFSET_MASK,
    MAX_L1_BYTES,
    NORMAL,
    UNALLOCATED,
    ZERO_ALLOC,
    Geometry,
    ceil_div,
)
from blockmirror.block.drivers.qcow2.refcount_allocator import RefcountAllocator
from blockmirror.block.drivers.qcow2.resume_area import ResumeArea
from blockmirror.block.drivers.qcow2.snapshot_write import list_snapshots
from blockmirror.block.drivers.qcow2.snapshots import SnapshotTable, read_snapshot_table
from blockmirror.block.drivers.qcow2.tail_reserve import TailReserve
from blockmirror.block.query import allocated_size
from blockmirror.errors import BlockIOError, BlockMirrorError, ImageFormatError

if TYPE_CHECKING:
    from blockmirror.block.node import BlockNode

#: bound on dirty metadata tables kept in memory between guest flushes
_WRITE_BACK_TABLES = 4096


class Qcow2Driver(BlockDriver):
    format_name = "qcow2"
    is_format = True
    supports_truncate = True
    supports_backing = True
    can_write_zeroes_with_unmap = True
    supports_compressed_writes = True
    max_transfer = 16 * 1024 * 1024

    def __init__(self, node: BlockNode) -> None:
        super().__init__(node)
        self.lock = asyncio.Lock()
        self.image_file = ImageFile(node)
        # the parts are built in open(), once the header is known
        self.header: Header
        self.geometry: Geometry
        self.corruption: CorruptionGuard
        self.allocator: RefcountAllocator
        self.cluster_map: ClusterMap
        self.data_path: DataPath
        self.compressed: CompressedWriter
        self.snapshots = SnapshotTable()
        self.bitmap_store: BitmapStore
        #: a mirror's resume state kept in the image (resume_area.py)
        self.resume_area: ResumeArea
        #: clusters taken ahead at guest flushes (tail_reserve.py)
        self.reserve: TailReserve
        self._preallocation_checked = False

    # --- open -------------------------------------------------------------------------------

    async def open(self) -> None:
        image_file = self.image_file
        image_file.open()
        filename = (
            self.node.options.get("file.filename") or image_file.node.filename
            or image_file.node.name
        )
        first = await image_file.read(0, min(image_file.length, 65536))
        if len(first) >= 24 and first[:4] == MAGIC:
            cluster_bits = struct.unpack_from(">I", first, 20)[0]
            if 16 < cluster_bits <= 21:
                first = await image_file.read(0, min(image_file.length, 1 << cluster_bits))
        header = parse_header(first, filename, image_file.length)
        if header.incompatible & INCOMPAT_CORRUPT and not self.node.read_only:
            raise ImageFormatError("qcow2: Image is corrupt; cannot be opened read/write")
        self.header = header
        self.geometry = geometry = Geometry.of(header)
        self.corruption = CorruptionGuard(self.node, header, image_file)
        ctx = ImageContext(
            self.node, header, geometry, image_file, self.lock, self.corruption.signal,
            write_back=self._write_back, flush_metadata=self._flush_locked,
        )
        self.allocator = allocator = RefcountAllocator(ctx)
        self.cluster_map = ClusterMap(ctx, allocator)
        self.data_path = DataPath(ctx, allocator, self.cluster_map)
        self.compressed = CompressedWriter(ctx, allocator, self.cluster_map, self.data_path)
        self.bitmap_store = BitmapStore(ctx, allocator)
        self.resume_area = ResumeArea(ctx, allocator, self.bitmap_store)
        self.reserve = TailReserve(
            allocator, self.lock, self._flush_locked,
            lambda: not (self.corruption.corrupt or self.node.read_only))
        await self.cluster_map.load_l1()
        await self.allocator.load_table()
        self.snapshots = await read_snapshot_table(header, image_file, geometry.cluster_size)
        stale_bitmaps = self.bitmap_store.read_extension()
        await self.bitmap_store.read_directory()
        await self._check_metadata_layout()

        # a current resume area keeps its bit until a write nobody tracks
        keep = AUTOCLEAR_BITMAPS | await self.resume_area.examine()
        writable = not self.node.read_only
        if writable:
            changed = False
            if header.incompatible & INCOMPAT_DIRTY:
                # refcounts may be stale (lazy refcounts, or a crash): rebuild them, as QEMU's
                # automatic repair on read-write open does
                references = await collect_references(
                    geometry, header, image_file, self.cluster_map.l1, self.snapshots,
                    await self.bitmap_store.referenced_ranges(),
                )
                await rebuild_refcounts(geometry, header, image_file, self.allocator, references)
                await self._check_metadata_layout()
                header.incompatible &= ~INCOMPAT_DIRTY
                changed = True
            if header.version == 3 and header.autoclear & ~keep:
                # the other autoclear extensions are not maintained here: clearing their
                # bits tells other readers they are stale
                header.autoclear &= keep
                changed = True
            if stale_bitmaps:
                await image_file.write_header_cluster(header, geometry.cluster_size)
                await image_file.flush()
            elif changed:
                await image_file.write_header(header)
                await image_file.flush()
        # persistent bitmaps become the node's named bitmaps (marked in use on disk)
        async with self.lock:
            await self.bitmap_store.load(self.node.bitmaps, writable)
        self.resume_area.opened()

    async def _check_metadata_layout(self) -> None:
        clusters = check_metadata_layout(
            self.geometry, self.header, self.image_file.length, self.cluster_map.l1,
            self.allocator.table, self.snapshots,
        )
        # bitmap clusters are not overlap-checked (QEMU checks only the directory), but guest
        # data must never land there
        for offset, length in await self.bitmap_store.referenced_ranges():
            clusters.update(self.geometry.clusters(offset, length))
        self.allocator.metadata_clusters = clusters

    # --- size and info ----------------------------------------------------------------------

    def length(self) -> int:
        return self.header.size

    def info(self) -> DriverInfo:
        header = self.header
        data: dict[str, Any] = {"compat": "1.1" if header.version == 3 else "0.10"}
        data["compression-type"] = "zstd" if header.compression_type == 1 else "zlib"
        if header.version == 3:
            data["lazy-refcounts"] = bool(header.compatible & COMPAT_LAZY_REFCOUNTS)
            if self.bitmap_store.entries and header.autoclear & AUTOCLEAR_BITMAPS:
                data["bitmaps"] = self.bitmap_store.info()
        data["refcount-bits"] = 1 << header.refcount_order
        if header.version == 3:
            data["corrupt"] = (
                bool(header.incompatible & INCOMPAT_CORRUPT) or self.corruption.corrupt
            )
            data["extended-l2"] = False
        return DriverInfo(
            cluster_size=self.geometry.cluster_size,
            format_specific={"type": "qcow2", "data": data},
            dirty_flag=bool(header.incompatible & INCOMPAT_DIRTY),
            backing_filename=header.backing_file,
            backing_format=header.backing_format,
        )

    def has_zero_init(self) -> bool:
        if self.node.backing is not None or self.header.backing_file:
            return False
        l1 = self.cluster_map.l1
        preallocated = bool(l1) and l1[0] != 0
        if not preallocated:
            return True
        return self.image_file.node.driver.has_zero_init()

    def _has_backing(self) -> bool:
        return self.node.backing is not None or bool(self.header.backing_file)

    # --- guest data ---------------------------------------------------------------------------

    async def preadv(self, offset: int, length: int) -> bytes:
        self.corruption.check_usable()
        return await self.data_path.read(offset, length)

    async def pwritev(self, offset: int, data: bytes | memoryview, flags: WriteFlags) -> None:
        self.corruption.check_usable()
        if not data:
            return
        if self.resume_area.needs_guard:
            await self.resume_area.guard()
        view = memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        await self.data_path.write(offset, view)

    async def pwritev_compressed(self, offset: int, data: bytes | memoryview) -> None:
        self.corruption.check_usable()
        if self.resume_area.needs_guard:
            await self.resume_area.guard()
        view = memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        await self.compressed.write(offset, view)

    async def read_extents(self, extents: list[tuple[int, int]]) -> list[bytes] | None:
        self.corruption.check_usable()
        return await self.data_path.read_many(extents)

    async def write_extents(self, pieces: list[tuple[int, memoryview]]) -> bool:
        self.corruption.check_usable()
        if self.resume_area.needs_guard:
            await self.resume_area.guard()
        views: list[tuple[int, memoryview]] = []
        for offset, data in pieces:
            view = data if data.format == "B" and data.ndim == 1 else data.cast("B")
            views.append((offset, view))
        await self.data_path.write_many(views)
        return True

    def data_file_node(self) -> BlockNode | None:
        return self.image_file.node  # (external data files are refused at open)

    async def host_segments(
        self, extents: list[tuple[int, int]]
    ) -> tuple[list[list[tuple[int, int]]], int] | None:
        self.corruption.check_usable()
        return await self.data_path.host_segments(extents)

    def release_host(self, token: int) -> None:
        self.data_path.release_host(token)

    async def write_via(
        self,
        extents: list[tuple[int, int]],
        fill: Callable[[list[tuple[int, int, int]]], Awaitable[None]],
    ) -> bool:
        self.corruption.check_usable()
        if self.resume_area.needs_guard:
            await self.resume_area.guard()
        return await self.data_path.write_via(extents, fill)

    async def zero_extents(self, extents: list[tuple[int, int]], flags: WriteFlags) -> bool:
        # whole clusters only, and none with an allocation in flight: the mirror's zero
        # ops; anything else goes through pwrite_zeroes one range at a time
        if self.header.version != 3 or flags & WriteFlags.NO_FALLBACK:
            return False
        self.corruption.check_usable()
        if self.resume_area.needs_guard:
            await self.resume_area.guard()
        cluster_size, size = self.geometry.cluster_size, self.header.size
        spans: list[tuple[int, int]] = []
        for offset, length in extents:
            end = offset + length
            if offset % cluster_size or (end % cluster_size and end != size):
                return False
            spans.append((offset // cluster_size, ceil_div(end, cluster_size)))
        unmap = bool(flags & WriteFlags.MAY_UNMAP)
        async with self.lock:
            if self.data_path.allocations and any(
                    self.data_path.allocation_in(first, stop - 1) is not None
                    for first, stop in spans):
                return False
            await self.cluster_map.zero_spans_v3(spans, unmap)
            await self._write_back()
        return True

    async def data_runs(self, ranges: list[tuple[int, int]]) -> list[list[tuple[bool, int]]] | None:
        if self.node.backing is not None:
            return None
        self.corruption.check_usable()
        out: list[list[tuple[bool, int]]] = []
        async with self.lock:
            if not self._preallocation_checked:
                self._preallocation_checked = True
                self.recurse_block_status = await self._detect_metadata_preallocation()
            if self.recurse_block_status:
                return None  # data clusters may read as zeroes: block_status asks the file
            for offset, length in ranges:
                out.append(await self.cluster_map.data_runs(offset, length))
        return out

    async def _write_back(self) -> None:
        """Under the lock: bound the dirty metadata kept in memory between guest flushes."""
        dirty = len(self.cluster_map.l2_cache.dirty) + len(self.allocator.blocks.dirty)
        if dirty > _WRITE_BACK_TABLES:
            await self._flush_locked()

    async def pwrite_zeroes(self, offset: int, length: int, flags: WriteFlags) -> None:
        self.corruption.check_usable()
        if self.resume_area.needs_guard:
            await self.resume_area.guard()
        unmap = bool(flags & WriteFlags.MAY_UNMAP)
        cluster_size, cluster_bits = self.geometry.cluster_size, self.geometry.cluster_bits
        end = offset + length
        first_full = ceil_div(offset, cluster_size) * cluster_size
        end_full = (end // cluster_size) * cluster_size
        if end == self.header.size:
            # the partial last cluster of the image counts as whole
            end_full = ceil_div(end, cluster_size) * cluster_size
        partial: list[tuple[int, int]] = []
        if first_full >= end_full:
            pos = offset
            while pos < end:
                n = min(end, (pos // cluster_size + 1) * cluster_size) - pos
                partial.append((pos, n))
                pos += n
        else:
            if offset < first_full:
                partial.append((offset, first_full - offset))
            if end_full < end:
                partial.append((end_full, end - end_full))
        has_backing = self.node.backing is not None
        for pos, n in partial:
            guest_cluster = pos >> cluster_bits
            async with self.lock:
                entry = await self.cluster_map.entry(guest_cluster)
            if (
                self.cluster_map.reads_as_zero(entry, has_backing)
                and guest_cluster not in self.data_path.allocations
            ):
                continue
            if flags & WriteFlags.NO_FALLBACK:
                raise BlockIOError(errno.ENOTSUP)
            await self.data_path.write(pos, memoryview(bytes(n)))
        if first_full < end_full:
            first, stop = first_full // cluster_size, end_full // cluster_size
            while True:
                async with self.lock:
                    busy = self.data_path.allocation_in(first, stop - 1)
                    if busy is None:
                        fallback = await self._zero_clusters(first, stop, unmap, flags)
                        await self._write_back()
                        break
                await busy.wait()
            for guest_cluster in fallback:
                await self.data_path.write(
                    guest_cluster << cluster_bits, memoryview(bytes(cluster_size))
                )

    async def _zero_clusters(
        self, first: int, stop: int, unmap: bool, flags: WriteFlags
    ) -> list[int]:
        """Under the lock: zero clusters through their L2 entries; returns the clusters that
        need zeroes written instead (version 2 images have no zero flag)."""
        cluster_map = self.cluster_map
        if self.header.version == 3:
            await cluster_map.zero_clusters_v3(first, stop, unmap)
            return []
        fallback: list[int] = []
        has_backing = self.node.backing is not None
        for guest_cluster in range(first, stop):
            entry = await cluster_map.entry(guest_cluster)
            if cluster_map.reads_as_zero(entry, has_backing):
                continue
            if unmap and not self._has_backing():
                await cluster_map.unmap_v2(guest_cluster)
                continue
            if flags & WriteFlags.NO_FALLBACK:
                raise BlockIOError(errno.ENOTSUP)
            fallback.append(guest_cluster)
        return fallback

    async def pdiscard(self, offset: int, length: int) -> None:
        self.corruption.check_usable()
        if self.resume_area.needs_guard:
            await self.resume_area.guard()
        cluster_size, cluster_bits = self.geometry.cluster_size, self.geometry.cluster_bits
        end = offset + length
        first = ceil_div(offset, cluster_size)
        stop = end >> cluster_bits
        if end == self.header.size:
            stop = ceil_div(end, cluster_size)
        if stop <= first:
            return
        has_backing = self._has_backing()
        if self.header.version != 3 and has_backing:
            # a v2 image cannot hide its backing file without writing zeroes; discard is
            # advisory, so keep the data
            return
        while True:
            async with self.lock:
                busy = self.data_path.allocation_in(first, stop - 1)
                if busy is None:
                    await self.cluster_map.discard(first, stop, has_backing)
                    await self._write_back()
                    return
            await busy.wait()

    # --- flush ------------------------------------------------------------------------------

    async def flush(self) -> None:
        if self.corruption.corrupt or self.node.read_only:
            return
        async with self.lock:
            await self._flush_locked(guest=True)

    async def _flush_locked(self, guest: bool = False) -> None:
        image_file, allocator, cluster_map = self.image_file, self.allocator, self.cluster_map
        if not (allocator.dirty or cluster_map.dirty):
            await image_file.flush()
            return
        await image_file.ensure_size(allocator.used_end * self.geometry.cluster_size)
        # 1. refcounts (and the data written so far) before anything that points at clusters;
        # a guest's flush may take clusters ahead with them (tail_reserve.py)
        if guest:
            await self.reserve.at_flush()
        if allocator.blocks.dirty:
            await allocator.write_dirty_blocks(durable=True)
        if allocator.table_dirty:
            await allocator.write_table(durable=True)
        # 2. L2 tables
        if cluster_map.l2_cache.dirty:
            await cluster_map.write_dirty_l2(durable=True)
        # 3. L1 entries
        if cluster_map.l1_dirty:
            await cluster_map.write_dirty_l1(durable=True)
        # 4. frees, now that nothing durable points at those clusters
        if allocator.pending_free:
            released = await allocator.release_pending()
            await image_file.flush()
            await image_file.discard_clusters(released, self.geometry.cluster_bits)

    async def trim_headroom(self) -> None:
        # close trims too; done here first, the trim at close has nothing left to cut and
        # the file's mtime (part of a resume log's identity of the image) stays as recorded
        if self.corruption.corrupt or self.node.read_only:
            return
        async with self.lock:
            await self.reserve.release()  # before the trim: its clusters may be the last
            await self.image_file.trim(self.allocator.end * self.geometry.cluster_size)

    async def before_read_only(self) -> None:
        """A reopen to read-only: the clusters taken ahead go back while it can write."""
        if not self.corruption.corrupt:
            async with self.lock:
                await self.reserve.release()

    async def close(self) -> None:
        await self.image_file.settle()
        reserve = getattr(self, "reserve", None)  # None: closed after a failed open
        if reserve is not None:
            await reserve.stop()
        if not self.node.read_only and not self.corruption.corrupt:
            async with self.lock:
                if reserve is not None:
                    await reserve.release()
                try:
                    await self.bitmap_store.store(self.node.bitmaps)
                except BlockMirrorError as e:
                    print(
                        "Lost persistent bitmaps during inactivation of node "
                        f"'{self.node.name}': {e.desc}",
                        file=sys.stderr, flush=True,
                    )
            await self.flush()
            await self.image_file.trim(self.allocator.end * self.geometry.cluster_size)

    # --- persistent bitmaps (block/bitmaps.PersistentBitmapStore) ---------------------------

    def check_new_persistent_bitmap(self, name: str, granularity: int) -> None:
        self.bitmap_store.check_new(self.node.bitmaps, name, granularity)

    async def remove_persistent_bitmap(self, name: str) -> None:
        async with self.lock:
            await self.bitmap_store.remove(name)

    # --- internal snapshots (written by snapshot_write.py) ------------------------------------

    async def snapshot_infos(self) -> list[dict[str, Any]]:
        """QEMU's SnapshotInfo of every internal snapshot, for ImageInfo's ``snapshots``."""
        return [entry.info() for entry in await list_snapshots(self)]

    # --- block status -----------------------------------------------------------------------

    async def block_status(self, offset: int, length: int) -> Extent:
        self.corruption.check_usable()
        async with self.lock:
            if not self._preallocation_checked:
                self._preallocation_checked = True
                self.recurse_block_status = await self._detect_metadata_preallocation()
            segments = await self.cluster_map.map(
                offset, min(length, self.geometry.l2_size * self.geometry.cluster_size), True
            )
        kind, _pos, n, value = segments[0]
        if kind == UNALLOCATED:
            return Extent(n, BlockStatus.NONE)
        status = BlockStatus.DATA if kind in (NORMAL, COMPRESSED) else BlockStatus.ZERO
        if kind in (NORMAL, ZERO_ALLOC):
            # a data cluster, or a preallocated zero cluster: it keeps its host offset (as
            # qemu-img map shows it)
            return Extent(n, status | BlockStatus.ALLOCATED | BlockStatus.OFFSET_VALID,
                          map_offset=value, map_node=self.image_file.node)
        return Extent(n, status | BlockStatus.ALLOCATED)

    async def _detect_metadata_preallocation(self) -> bool:
        real = await allocated_size(self.image_file.node)
        if real is None:
            return False
        return await metadata_preallocated(self.geometry, self.image_file, self.allocator, real)

    # --- resize -----------------------------------------------------------------------------

    async def _shrink(self, length: int) -> None:
        """cf. the shrinking half of qcow2_co_truncate: the clusters past the new end are
        discarded for good (unallocated, even over a backing file), the L2 tables wholly past
        it freed and their L1 entries cleared (the L1 table keeps its size, as QEMU's does),
        then the header gets the new size. Requests are drained by the caller."""
        header, geometry, cluster_map = self.header, self.geometry, self.cluster_map
        # internal snapshots keep their own tables: clusters they share only lose our reference
        self.corruption.check_usable()
        cluster_size = geometry.cluster_size
        async with self.lock:
            first = ceil_div(length, cluster_size)
            stop = ceil_div(header.size, cluster_size)
            if stop > first:
                await cluster_map.discard(first, stop, has_backing=False)
            keep = ceil_div(length, cluster_size << geometry.l2_bits)
            for index in range(keep, len(cluster_map.l1)):
                l2_offset = cluster_map.l1[index] & L1E_OFFSET_MASK
                if not l2_offset:
                    continue
                # the table is gone: its (now all-unallocated) contents are never written
                cluster_map.l2_cache.drop(l2_offset)
                self.allocator.free_later([l2_offset >> geometry.cluster_bits])
                cluster_map.l1[index] = 0
                cluster_map.l1_dirty.add(index)
            await self._flush_locked()
            header.size = length
            await self.image_file.write_header(header)
            await self.image_file.flush()

    async def truncate(self, length: int, preallocation: str = "off") -> None:
        if preallocation != "off":
            raise BlockIOError(errno.ENOTSUP, f"Unsupported preallocation mode '{preallocation}'")
        header = self.header
        if self.resume_area.needs_guard:
            await self.resume_area.guard()
        if length < header.size:
            await self._shrink(length)
            return
        geometry, image_file, cluster_map = self.geometry, self.image_file, self.cluster_map
        async with self.lock:
            await self._flush_locked()
            need = ceil_div(length, geometry.cluster_size << geometry.l2_bits)
            if need <= len(cluster_map.l1):
                header.size = length
                await image_file.write_header(header)
                await image_file.flush()
                return
            if need * 8 > MAX_L1_BYTES:
                raise BlockIOError(errno.EFBIG, "Image is too big")
            table_clusters = ceil_div(need * 8, geometry.cluster_size)
            first = await self.allocator.allocate(table_clusters)
            self.allocator.metadata_clusters.update(range(first, first + table_clusters))
            new_offset = first << geometry.cluster_bits
            table = cluster_map.l1 + [0] * (need - len(cluster_map.l1))
            await self._flush_locked()  # the refcounts of the new table first
            await image_file.write(new_offset, struct.pack(f">{need}Q", *table))
            await image_file.flush()
            old_offset, old_entries = header.l1_table_offset, len(cluster_map.l1)
            header.l1_table_offset, header.l1_size = new_offset, need
            header.size = length
            await image_file.write_header(header)
            await image_file.flush()
            cluster_map.l1 = table
            if old_entries:
                self.allocator.free_later(geometry.clusters(old_offset, old_entries * 8))
            await self._flush_locked()
