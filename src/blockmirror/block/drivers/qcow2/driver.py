"""The qcow2 format driver: an async ``BlockDriver`` over a ``file`` child node.

Metadata lives in memory while the image is open: the whole L1 table and refcount table, and
write-back LRU caches of L2 tables and refcount blocks (``cache.py``). Nothing but guest data
reaches the file between flushes; ``flush`` writes metadata back in an order that keeps the
on-disk image consistent at every step (cf. QEMU's qcow2 cache dependencies):

  1. refcount blocks (increments only), then the refcount table entries pointing at new blocks;
  2. L2 tables, which may now point at clusters whose refcounts are durable;
  3. the L1 table, pointing at L2 tables now durable;
  4. deferred decrements (clusters freed since the last flush), now that no durable L2/L1 entry
     points at them.

A crash therefore leaves at worst leaked clusters. Deferring frees also means a cluster is never
reused before the entries that pointed at it are gone from disk.

Concurrency (cf. QEMU's s->lock and cluster_allocs): ``self.lock`` guards metadata only. A write
allocates its clusters under the lock, drops it for the data I/O, then re-takes it to link the L2
entries, so data always lands before any metadata points at it. Guest clusters being allocated
are listed in ``_allocs``; any other request that would change their entries waits for the link.
Writes to clusters we own (COPIED) take no lock at all. Host ranges under data I/O outside the
lock are listed in ``_inflight``, and a flush does not release a freed cluster still in there.
"""

from __future__ import annotations

import asyncio
import errno
import struct
import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from blockmirror.block.driver import (
    BlockDriver,
    BlockStatus,
    DriverInfo,
    Extent,
    WriteFlags,
)
from blockmirror.block.drivers.qcow2 import compress as cz
from blockmirror.block.drivers.qcow2.cache import TableCache
from blockmirror.block.drivers.qcow2.header import (
    AUTOCLEAR_BITMAPS,
    COMPAT_LAZY_REFCOUNTS,
    EXT_BITMAPS,
    INCOMPAT_CORRUPT,
    INCOMPAT_DIRTY,
    Header,
    encode_fixed,
    parse_header,
)
from blockmirror.block.drivers.qcow2.refcount import (
    decode_block,
    encode_block,
    entries_per_block,
)
from blockmirror.block.query import allocated_size
from blockmirror.errors import BlockIOError, ImageCorruptError, ImageFormatError, InternalError

#: a planned data write: host offset, length, offset in the request buffer (when ``buf`` is None,
#: the bytes are that slice of the request) and a prepared buffer (copy-on-write completions)
_Piece = tuple[int, int, int, "bytes | None"]
#: an L2 entry to set once the data is written: L1 index, L2 index, new entry
_Link = tuple[int, int, int]

if TYPE_CHECKING:
    from blockmirror.block.node import BlockNode

OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1
L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00

# cluster kinds (cf. QCow2ClusterType)
UNALLOCATED = 0
ZERO_PLAIN = 1
ZERO_ALLOC = 2
NORMAL = 3
COMPRESSED = 4

_SNAP_HDR = struct.Struct(">QIHHIIQII")


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class Qcow2Driver(BlockDriver):
    format_name = "qcow2"
    is_format = True
    supports_truncate = True
    supports_backing = True
    can_write_zeroes_with_unmap = True
    max_transfer = 16 * 1024 * 1024

    def __init__(self, node: BlockNode) -> None:
        super().__init__(node)
        self.h: Header
        self.lock = asyncio.Lock()
        self.cs = 0
        self.cb = 0
        self.l2_entries = 0
        self.l2_bits = 0
        self.rb_bits = 0
        self.epb = 0
        self.rc_max = 0
        self.size = 0
        self.l1: list[int] = []
        self.l1_dirty: set[int] = set()
        self.reftable: list[int] = []
        self.reftable_dirty = False
        self.l2_cache: TableCache = TableCache(64)
        self.rb_cache: TableCache = TableCache(64)
        #: clusters freed since the last flush: decremented only after L2/L1 reach the disk
        self.pending_free: list[int] = []
        #: host clusters holding metadata; data must never be written there
        self.meta: set[int] = set()
        #: one past the highest cluster that is in the file or allocated
        self.alloc_end = 0
        self.free_hint = 0
        self.file_len = 0
        #: how much of the file holds image data (the rest is growth headroom)
        self.used_end = 0
        self.corrupt = False
        self.snapshot_l1s: list[tuple[int, int]] = []
        self.snapshot_table_len = 0
        self._last_compressed: tuple[int, bytes] | None = None
        self._prealloc_checked = False
        #: persistent bitmaps as qemu-img info lists them (kept, never updated)
        self.bitmaps: list[dict[str, Any]] = []
        self._filename = ""
        #: guest cluster -> event set once the write allocating it has linked its L2 entry
        self._allocs: dict[int, asyncio.Event] = {}
        #: host cluster ranges [lo, hi) under data I/O outside the lock, by request token
        self._inflight: dict[int, tuple[int, int]] = {}
        self._token = 0
        #: serialises growing the file (truncate calls must not race) and sub-alignment
        #: read-modify-writes (two of them sharing a block would lose one update)
        self._grow_lock = asyncio.Lock()
        self._rmw_lock = asyncio.Lock()
        #: a resize started ahead of the writes that will need it
        self._grow_task: asyncio.Task[None] | None = None

    # --- helpers on the file child ----------------------------------------------------------

    @property
    def file(self) -> BlockNode:
        f = self.node.child("file")
        if f is None:
            raise ImageFormatError("qcow2 node has no file child")
        return f

    async def _fread(self, offset: int, length: int) -> bytes:
        """Read from the file; bytes past its end read as zeroes (as QEMU's file driver does)."""
        if length <= 0:
            return b""
        flen = self.file.length()
        avail = max(0, min(length, flen - offset))
        if avail == 0:
            return bytes(length)
        align = max(1, self.file.driver.request_alignment)
        start = offset - offset % align
        end = min(_ceil_div(offset + avail, align) * align, flen)
        if start == offset and end == offset + avail:
            data = await self.file.read(offset, avail)
        else:
            buf = await self.file.read(start, end - start)
            data = buf[offset - start : offset - start + avail]
        if avail < length:
            data = bytes(data) + bytes(length - avail)
        return data

    async def _ensure_file_size(self, end: int, used: bool = True) -> None:
        """Grow the file to hold ``end``; protocol nodes refuse requests past their length.

        Sequential allocation would otherwise resize the file on every request, so the file
        grows ahead in steps; ``close`` trims it back to what is used.
        """
        if used:
            self.used_end = max(self.used_end, end)
        if end <= self.file_len:
            return
        async with self._grow_lock:
            if end <= self.file_len:
                return
            f = self.file
            align = max(1, f.driver.request_alignment)
            # big steps: each resize waits for a slot in the I/O pool behind the data writes
            step = min(max(self.file_len // 4, 8 << 20), 256 << 20)
            target = _ceil_div(max(end, self.file_len + step), align) * align
            if f.length() < target:
                await f.driver.truncate(target)
            self.file_len = max(f.length(), end)

    async def _fwrite(self, offset: int, data: bytes | memoryview) -> None:
        """Write to the file, growing it first; unaligned pieces are read-modify-written."""
        end = offset + len(data)
        await self._ensure_file_size(end)
        f = self.file
        align = max(1, f.driver.request_alignment)
        if offset % align == 0 and len(data) % align == 0:
            await f.write(offset, data)
            return
        start = offset - offset % align
        aend = _ceil_div(end, align) * align
        async with self._rmw_lock:
            buf = bytearray(await self._fread(start, aend - start))
            buf[offset - start : end - start] = data
            await f.write(start, bytes(buf))

    # --- open -------------------------------------------------------------------------------

    async def open(self) -> None:
        f = self.file
        self._filename = self.node.options.get("file.filename") or f.filename or f.name
        fn = self._filename
        self.file_len = f.length()
        self.used_end = self.file_len
        first = await self._fread(0, min(self.file_len, 65536))
        if len(first) >= 24 and first[:4] == b"QFI\xfb":
            cbits = struct.unpack_from(">I", first, 20)[0]
            if 16 < cbits <= 21:
                first = await self._fread(0, min(self.file_len, 1 << cbits))
        h = parse_header(first, fn, self.file_len)
        self.h = h
        self.cb = h.cluster_bits
        self.cs = h.cluster_size
        self.l2_bits = self.cb - 3
        self.l2_entries = self.cs // 8
        self.epb = entries_per_block(self.cb, h.refcount_order)
        self.rb_bits = self.cb + 3 - h.refcount_order
        self.rc_max = (1 << (1 << h.refcount_order)) - 1
        self.size = h.size
        if h.incompatible & INCOMPAT_CORRUPT and not self.node.read_only:
            raise ImageFormatError(
                "qcow2: Image is corrupt; cannot be opened read/write"
            )
        budget_l2 = max(16, (32 * 1024 * 1024) // self.cs)
        budget_rb = max(16, (8 * 1024 * 1024) // self.cs)
        self.l2_cache = TableCache(budget_l2)
        self.rb_cache = TableCache(budget_rb)

        raw_l1 = await self._fread(h.l1_table_offset, h.l1_size * 8) if h.l1_size else b""
        self.l1 = list(struct.unpack(f">{h.l1_size}Q", raw_l1))
        nrt = h.refcount_table_clusters * self.cs // 8
        raw_rt = await self._fread(h.refcount_table_offset, nrt * 8)
        self.reftable = list(struct.unpack(f">{nrt}Q", raw_rt))
        self.alloc_end = _ceil_div(self.file_len, self.cs)
        await self._read_snapshots()
        self._check_metadata_layout()
        await self._read_bitmap_directory()

        if not self.node.read_only:
            changed = False
            if h.incompatible & INCOMPAT_DIRTY:
                # refcounts may be stale (lazy refcounts, or a crash): rebuild them, as QEMU's
                # automatic repair on read-write open does
                await self._rebuild_refcounts()
                h.incompatible &= ~INCOMPAT_DIRTY
                changed = True
            if h.version == 3 and h.autoclear:
                # we maintain none of the autoclear extensions (e.g. bitmaps): clearing the bits
                # tells other readers those extensions are stale
                h.autoclear = 0
                changed = True
            if changed:
                await self._write_header()
                await self.file.flush()

    async def _read_bitmap_directory(self) -> None:
        """Names, flags and granularities of persistent bitmaps, for info() only.

        The bitmaps themselves are preserved untouched; they count as consistent only while
        the bitmaps autoclear bit is set (a read-write open here clears it).
        """
        h = self.h
        if not h.has_bitmaps_ext or not h.autoclear & AUTOCLEAR_BITMAPS:
            return
        ext = next((d for t, d in h.other_extensions if t == EXT_BITMAPS), b"")
        if len(ext) < 24:
            return
        nb, _res, dir_size, dir_off = struct.unpack_from(">IIQQ", ext)
        if dir_size > 64 * 1024 * 1024 or dir_off + dir_size > self.file_len:
            return
        raw = await self._fread(dir_off, dir_size)
        pos = 0
        for _ in range(nb):
            if pos + 24 > len(raw):
                break
            _tbl, _tsize, flags, _typ, gbits, name_len, extra = struct.unpack_from(
                ">QIIBBHI", raw, pos
            )
            start = pos + 24 + extra
            name = raw[start : start + name_len].decode("utf-8", "replace")
            names = [w for bit, w in ((0, "in-use"), (1, "auto")) if flags & (1 << bit)]
            self.bitmaps.append({"flags": names, "name": name, "granularity": 1 << gbits})
            pos = (start + name_len + 7) & ~7

    async def _read_snapshots(self) -> None:
        h = self.h
        if not h.nb_snapshots:
            return
        pos = h.snapshots_offset
        for _ in range(h.nb_snapshots):
            if pos + _SNAP_HDR.size > self.file_len:
                raise ImageFormatError(
                    "Snapshot table offset invalid"
                )
            hdr = await self._fread(pos, _SNAP_HDR.size)
            l1_off, l1_size, id_len, name_len, _s, _ns, _vmc, _vms, extra = _SNAP_HDR.unpack(hdr)
            pos += _SNAP_HDR.size + extra + id_len + name_len
            pos = (pos + 7) & ~7
            if l1_size > (32 * 1024 * 1024) // 8:
                raise ImageFormatError(
                    "Snapshot L1 table too large"
                )
            if l1_off % self.cs or l1_off + l1_size * 8 > self.file_len:
                raise ImageFormatError(
                    "Snapshot L1 table offset invalid"
                )
            self.snapshot_l1s.append((l1_off, l1_size))
        self.snapshot_table_len = pos - h.snapshots_offset

    def _clusters(self, offset: int, length: int) -> range:
        return range(offset >> self.cb, _ceil_div(offset + length, self.cs))

    def _check_metadata_layout(self) -> None:
        """Refuse images whose metadata overlaps or points outside the file (before any write)."""
        h = self.h
        owners: dict[int, str] = {}

        def claim(offset: int, length: int, what: str) -> None:
            for c in self._clusters(offset, length):
                prev = owners.get(c)
                if prev is not None:
                    raise ImageFormatError(
                        f"Overlapping metadata: {what} at {offset:#x} "
                        f"overlaps {prev}"
                    )
                owners[c] = what

        claim(0, self.cs, "qcow2 header")
        claim(h.refcount_table_offset, h.refcount_table_clusters * self.cs, "refcount table")
        if h.l1_size:
            claim(h.l1_table_offset, h.l1_size * 8, "active L1 table")
        if h.nb_snapshots:
            claim(h.snapshots_offset, self.snapshot_table_len, "snapshot table")
            for off, n in self.snapshot_l1s:
                if n:
                    claim(off, n * 8, "snapshot L1 table")
        for i, e in enumerate(self.reftable):
            off = e & REFT_OFFSET_MASK
            if not off:
                continue
            if off % self.cs or off + self.cs > self.file_len:
                raise ImageFormatError(
                    f"Refcount block offset {off:#x} invalid "
                    f"(reftable index {i:#x})"
                )
            claim(off, self.cs, "refcount block")
        for i, e in enumerate(self.l1):
            off = e & L1E_OFFSET_MASK
            if not off:
                continue
            if off % self.cs:
                raise ImageFormatError(
                    f"L2 table offset {off:#x} unaligned "
                    f"(L1 index: {i:#x})"
                )
            if off + self.cs > self.file_len:
                raise ImageFormatError(
                    f"L2 table offset {off:#x} past the end of the "
                    f"image file (L1 index: {i:#x})"
                )
            claim(off, self.cs, "active L2 table")
        self.meta = set(owners)

    # --- header -----------------------------------------------------------------------------

    async def _write_header(self) -> None:
        await self._fwrite(0, encode_fixed(self.h))

    async def _mark_corrupt(self, text: str) -> ImageCorruptError:
        """cf. qcow2_signal_corruption: flag the image, stop all further I/O."""
        if not self.corrupt:
            print(
                f"qcow2: Marking image as corrupt: {text}; further corruption events will be "
                "suppressed",
                file=sys.stderr,
                flush=True,
            )
            self.corrupt = True
            self.node.corrupt = True
            if not self.node.read_only and self.h.version == 3:
                self.h.incompatible |= INCOMPAT_CORRUPT
                try:
                    await self._write_header()
                    await self.file.flush()
                except BlockIOError:
                    pass
        return ImageCorruptError(text)

    def _check_usable(self) -> None:
        if self.corrupt:
            raise BlockIOError(errno.EIO, "Input/output error")

    # --- size and info ----------------------------------------------------------------------

    def length(self) -> int:
        return self.size

    def info(self) -> DriverInfo:
        h = self.h
        data: dict[str, Any] = {"compat": "1.1" if h.version == 3 else "0.10"}
        data["compression-type"] = "zlib"
        if h.version == 3:
            data["lazy-refcounts"] = bool(h.compatible & COMPAT_LAZY_REFCOUNTS)
            if self.bitmaps and h.autoclear & AUTOCLEAR_BITMAPS:
                data["bitmaps"] = self.bitmaps
        data["refcount-bits"] = 1 << h.refcount_order
        if h.version == 3:
            data["corrupt"] = bool(h.incompatible & INCOMPAT_CORRUPT) or self.corrupt
            data["extended-l2"] = False
        return DriverInfo(
            cluster_size=self.cs,
            format_specific={"type": "qcow2", "data": data},
            dirty_flag=bool(h.incompatible & INCOMPAT_DIRTY),
            backing_filename=h.backing_file,
            backing_format=h.backing_format,
        )

    def has_zero_init(self) -> bool:
        if self.node.backing is not None or self.h.backing_file:
            return False
        preallocated = bool(self.l1) and self.l1[0] != 0
        if not preallocated:
            return True
        return self.file.driver.has_zero_init()

    # --- refcounts --------------------------------------------------------------------------

    async def _load_rb(self, r: int) -> list[int]:
        blk = self.rb_cache.get(r)
        if blk is not None:
            return blk
        off = self.reftable[r] & REFT_OFFSET_MASK
        if not off:
            raise InternalError(f"qcow2 refcount block {r} does not exist")
        raw = await self._fread(off, self.cs)
        blk = decode_block(raw, self.h.refcount_order)
        self.rb_cache.put(r, blk)
        return blk

    async def _refcount(self, c: int) -> int:
        r = c >> self.rb_bits
        if r >= len(self.reftable) or not self.reftable[r] & REFT_OFFSET_MASK:
            return 0
        blk = await self._load_rb(r)
        return blk[c & (self.epb - 1)]

    async def _rc_add(self, c: int, delta: int) -> int:
        r = c >> self.rb_bits
        blk = await self._load_rb(r)
        i = c & (self.epb - 1)
        v = blk[i] + delta
        if v < 0:
            raise await self._mark_corrupt(
                f"Preventing invalid free of cluster {c << self.cb:#x} (refcount already 0)"
            )
        if v > self.rc_max:
            raise BlockIOError(errno.ERANGE, "Reference count overflow")
        blk[i] = v
        self.rb_cache.mark_dirty(r)
        return v

    async def _rc_inc_range(self, start: int, n: int) -> None:
        """Take a reference on ``n`` free clusters (their refcount blocks exist)."""
        c, end = start, start + n
        while c < end:
            r = c >> self.rb_bits
            base = r << self.rb_bits
            hi = min(end, base + self.epb)
            blk = await self._load_rb(r)
            blk[c - base : hi - base] = [v + 1 for v in blk[c - base : hi - base]]
            self.rb_cache.mark_dirty(r, blk)
            c = hi

    async def _find_free(self, n: int) -> tuple[int, int]:
        """The first run of ``n`` free clusters at or after the free hint.

        Scans decoded refcount blocks with list primitives rather than cluster by cluster;
        everything at or past ``alloc_end`` and every range without a refcount block is free.
        """
        c = self.free_hint
        start = c
        run = 0
        first_free = -1
        epb = self.epb
        while run < n:
            if c >= self.alloc_end:
                if run == 0:
                    start = c
                break
            r = c >> self.rb_bits
            base = r << self.rb_bits
            if r >= len(self.reftable) or not self.reftable[r] & REFT_OFFSET_MASK:
                if run == 0:
                    start = c
                run += base + epb - c
                c = base + epb
                continue
            blk = await self._load_rb(r)
            i = c - base
            while i < epb and run < n:
                if run == 0:
                    try:
                        i = blk.index(0, i)
                    except ValueError:
                        i = epb
                        break
                    start = base + i
                need = min(n - run, epb - i)
                seg = blk[i : i + need]
                if not any(seg):
                    run += need
                    i += need
                else:
                    k = next(k for k, v in enumerate(seg) if v)
                    run = 0
                    i += k + 1
            c = base + i
            if first_free < 0 and run:
                first_free = start
        if first_free < 0:
            first_free = start
        return start, first_free

    async def _alloc(self, n: int) -> int:
        """Allocate ``n`` contiguous clusters (refcount 1 each); return the first index."""
        while True:
            start, first_free = await self._find_free(n)
            first_r = start >> self.rb_bits
            last_r = (start + n - 1) >> self.rb_bits
            missing = None
            for r in range(first_r, last_r + 1):
                if r >= len(self.reftable) or not self.reftable[r] & REFT_OFFSET_MASK:
                    missing = r
                    break
            if missing is None:
                await self._rc_inc_range(start, n)
                # the hint stays on the first hole when this run did not start there
                self.free_hint = start + n if start == first_free else first_free
                self.alloc_end = max(self.alloc_end, start + n)
                return start
            if missing >= len(self.reftable):
                await self._grow_reftable(missing)
                continue
            # the new block takes the first cluster of the run: either inside its own range
            # (a self-describing refcount block) or in a range whose block exists already
            p = start
            blk = [0] * self.epb
            self.rb_cache.put(missing, blk, dirty=True)
            self.reftable[missing] = p << self.cb
            self.reftable_dirty = True
            if p >> self.rb_bits == missing:
                blk[p & (self.epb - 1)] = 1
            else:
                await self._rc_add(p, 1)
            self.meta.add(p)
            self.alloc_end = max(self.alloc_end, p + 1)

    async def _grow_reftable(self, r_needed: int) -> None:
        """Move the refcount table to a bigger one at the end of the image."""
        cs = self.cs
        old = list(self.reftable)
        old_n = len(old)
        a = self.alloc_end
        want = max(r_needed + 1, old_n + max(1, old_n // 2))
        t = b = 0
        missing: list[int] = []
        while True:
            area_end = a + b + t
            entries = max(want, _ceil_div(area_end, self.epb))
            t2 = _ceil_div(entries * 8, cs)
            lo, hi = a >> self.rb_bits, (a + b + t2 - 1) >> self.rb_bits
            missing = [
                r for r in range(lo, hi + 1) if r >= old_n or not old[r] & REFT_OFFSET_MASK
            ]
            if (t2, len(missing)) == (t, b):
                break
            t, b = t2, len(missing)
        table = old + [0] * (t * cs // 8 - old_n)
        for k, r in enumerate(missing):
            table[r] = (a + k) << self.cb
            self.rb_cache.put(r, [0] * self.epb, dirty=True)
        self.reftable = table
        for c in range(a, a + b + t):
            await self._rc_add(c, 1)
            self.meta.add(c)
        self.alloc_end = a + b + t
        # new blocks first, then the table, then the header that points at it
        await self._ensure_file_size(self.alloc_end * cs)
        await self._write_dirty_refblocks()
        await self.file.flush()
        await self._fwrite((a + b) << self.cb, struct.pack(f">{len(table)}Q", *table))
        await self.file.flush()
        old_off, old_clusters = self.h.refcount_table_offset, self.h.refcount_table_clusters
        self.h.refcount_table_offset = (a + b) << self.cb
        self.h.refcount_table_clusters = t
        await self._write_header()
        await self.file.flush()
        self.reftable_dirty = False
        for c in self._clusters(old_off, old_clusters * cs):
            self.pending_free.append(c)

    async def _write_dirty_refblocks(self) -> None:
        for r in sorted(self.rb_cache.dirty):
            blk = self.rb_cache.peek(r)
            raw = encode_block(blk, self.h.refcount_order)
            await self._fwrite(self.reftable[r] & REFT_OFFSET_MASK, raw)
        self.rb_cache.clean_all()

    def _free_later(self, clusters: Iterable[int]) -> None:
        self.pending_free.extend(clusters)

    def _free_entry_later(self, entry: int) -> None:
        kind = self._kind(entry)
        if kind == COMPRESSED:
            self._free_later(cz.host_clusters(entry, self.cb))
        elif kind in (NORMAL, ZERO_ALLOC):
            self.pending_free.append((entry & L2E_OFFSET_MASK) >> self.cb)

    # --- L2 tables --------------------------------------------------------------------------

    def _kind(self, entry: int) -> int:
        if entry & OFLAG_COMPRESSED:
            return COMPRESSED
        host = entry & L2E_OFFSET_MASK
        if entry & OFLAG_ZERO and self.h.version == 3:
            return ZERO_ALLOC if host else ZERO_PLAIN
        return NORMAL if host else UNALLOCATED

    async def _load_l2(self, off: int, l1i: int) -> list[int]:
        table = self.l2_cache.get(off)
        if table is not None:
            return table
        if off % self.cs:
            raise await self._mark_corrupt(
                f"L2 table offset {off:#x} unaligned (L1 index: {l1i:#x})"
            )
        if off + self.cs > self.file_len:
            raise await self._mark_corrupt(
                f"L2 table offset {off:#x} past the end of the image (L1 index: {l1i:#x})"
            )
        raw = await self._fread(off, self.cs)
        table = list(struct.unpack(f">{self.l2_entries}Q", raw))
        self.l2_cache.put(off, table)
        return table

    async def _l2_for_read(self, l1i: int) -> list[int] | None:
        if l1i >= len(self.l1):
            return None
        off = self.l1[l1i] & L1E_OFFSET_MASK
        if not off:
            return None
        return await self._load_l2(off, l1i)

    async def _l2_for_write(self, l1i: int) -> tuple[int, list[int]]:
        e = self.l1[l1i]
        off = e & L1E_OFFSET_MASK
        if off and e & OFLAG_COPIED:
            return off, await self._load_l2(off, l1i)
        if off:
            # shared with a snapshot: copy the table, drop our reference to the old one
            old = await self._load_l2(off, l1i)
            table = list(old)
        else:
            table = [0] * self.l2_entries
        new = (await self._alloc(1)) << self.cb
        self.meta.add(new >> self.cb)
        self.l2_cache.put(new, table, dirty=True)
        self.l1[l1i] = new | OFLAG_COPIED
        self.l1_dirty.add(l1i)
        if off:
            self.l2_cache.drop(off)
            self._free_later([off >> self.cb])
        return new, table

    async def _check_data(self, host: int, l2off: int, idx: int, writing: bool) -> None:
        if host % self.cs:
            raise await self._mark_corrupt(
                f"Cluster allocation offset {host:#x} unaligned (L2 offset: {l2off:#x}, "
                f"L2 index: {idx:#x})"
            )
        c = host >> self.cb
        if c >= self.alloc_end:
            raise await self._mark_corrupt(
                f"Data cluster offset {host:#x} past the end of the image file "
                f"(L2 offset: {l2off:#x}, L2 index: {idx:#x})"
            )
        if writing and c in self.meta:
            raise await self._mark_corrupt(
                f"Preventing invalid write on metadata (data cluster {host:#x} overlaps "
                "qcow2 metadata)"
            )

    # --- reading ----------------------------------------------------------------------------

    def _data_ok(self, host: int, writing: bool) -> bool:
        """The cheap form of ``_check_data``: True when the host cluster is plainly valid."""
        c = host >> self.cb
        return not host & (self.cs - 1) and c < self.alloc_end and not (writing and c in self.meta)

    async def _map(
        self, offset: int, length: int, first_only: bool = False
    ) -> list[tuple[int, int, int, int]]:
        """Split a guest range into (kind, guest offset, length, host offset or entry).

        Neighbouring clusters of the same kind merge (data ones only when contiguous on the
        host), so a sequential read becomes one file read per host extent. ``first_only``
        stops at the first change (compressed clusters still merge), for block status.
        """
        segs: list[tuple[int, int, int, int]] = []
        pos, end = offset, offset + length
        cs, cb, l2_bits = self.cs, self.cb, self.l2_bits
        mask = self.l2_entries - 1
        v3 = self.h.version == 3
        l1 = self.l1
        cur_l1 = -1
        table: list[int] | None = None
        l2off = 0
        # the segment being grown, kept in locals and appended when it ends
        sk, so, sn, sv = -1, 0, 0, 0
        while pos < end:
            g = pos >> cb
            l1i = g >> l2_bits
            if l1i != cur_l1:
                table = await self._l2_for_read(l1i)
                l2off = l1[l1i] & L1E_OFFSET_MASK if table is not None else 0
                cur_l1 = l1i
            idx = g & mask
            entry = table[idx] if table is not None else 0
            in_off = pos & (cs - 1)
            n = min(cs - in_off, end - pos)
            # inline _kind: this loop runs once per cluster
            if entry & OFLAG_COMPRESSED:
                kind, val = COMPRESSED, entry
            else:
                host = entry & L2E_OFFSET_MASK
                if entry & OFLAG_ZERO and v3:
                    kind = ZERO_ALLOC if host else ZERO_PLAIN
                else:
                    kind = NORMAL if host else UNALLOCATED
                if host:
                    if not self._data_ok(host, False):
                        await self._check_data(host, l2off, idx, False)
                    val = host + in_off
                else:
                    val = 0
            if kind == sk and (
                kind in (UNALLOCATED, ZERO_PLAIN)
                or (kind != COMPRESSED and sv + sn == val)
                or (first_only and kind == COMPRESSED)
            ):
                sn += n
            else:
                if sk >= 0:
                    segs.append((sk, so, sn, sv))
                    if first_only:
                        return segs
                sk, so, sn, sv = kind, pos, n, val
            pos += n
        if sk >= 0:
            segs.append((sk, so, sn, sv))
        return segs

    async def _read_backing(self, offset: int, length: int) -> bytes:
        bk = self.node.backing
        if bk is None:
            return bytes(length)
        blen = bk.length()
        avail = max(0, min(length, blen - offset))
        if avail == 0:
            return bytes(length)
        data = await bk.read(offset, avail)
        if avail < length:
            data = bytes(data) + bytes(length - avail)
        return data

    async def _read_compressed(self, entry: int) -> bytes:
        if self._last_compressed is not None and self._last_compressed[0] == entry:
            return self._last_compressed[1]
        off, nbytes = cz.descriptor(entry, self.cb)
        if off >= self.file_len:
            raise await self._mark_corrupt(
                f"Compressed cluster offset {off:#x} past the end of the image file"
            )
        raw = await self._fread(off, nbytes)
        out = cz.decompress(raw, self.cs)
        if out is None:
            raise BlockIOError(errno.EIO, "Input/output error")
        self._last_compressed = (entry, out)
        return out

    async def _read_segs(self, segs: list[tuple[int, int, int, int]]) -> list[bytes]:
        parts: list[bytes] = []
        for kind, pos, n, val in segs:
            if kind == NORMAL:
                parts.append(await self._fread(val, n))
            elif kind in (ZERO_PLAIN, ZERO_ALLOC):
                parts.append(bytes(n))
            elif kind == UNALLOCATED:
                parts.append(await self._read_backing(pos, n))
            else:
                data = await self._read_compressed(val)
                in_off = pos & (self.cs - 1)
                parts.append(data[in_off : in_off + n])
        return parts

    async def preadv(self, offset: int, length: int) -> bytes:
        self._check_usable()
        async with self.lock:
            segs = await self._map(offset, length)
            # the clusters read must not be released and reused under us
            hosts = [(v, n) for k, _p, n, v in segs if k == NORMAL]
            token = 0
            if hosts:
                self._token += 1
                token = self._token
                self._inflight[token] = (
                    min(v for v, _n in hosts) >> self.cb,
                    _ceil_div(max(v + n for v, n in hosts), self.cs),
                )
        try:
            parts = await self._read_segs(segs)
        finally:
            self._inflight.pop(token, None)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def _cluster_content(self, g: int, entry: int) -> bytes:
        """The guest-visible content of cluster ``g`` before a partial overwrite."""
        kind = self._kind(entry)
        base = g << self.cb
        n = self.cs
        if kind == NORMAL:
            return await self._fread(entry & L2E_OFFSET_MASK, n)
        if kind == COMPRESSED:
            return await self._read_compressed(entry)
        if kind == UNALLOCATED:
            n_in = min(n, self.size - base)
            data = await self._read_backing(base, n_in)
            return data + bytes(n - n_in) if n_in < n else data
        return bytes(n)

    # --- writing ----------------------------------------------------------------------------

    async def _write(self, offset: int, data: memoryview) -> None:
        """Write guest data: in place where we own the cluster (COPIED), else copy-on-write.

        In-place writes to cached, owned clusters go out without the lock. Otherwise the
        clusters are planned and allocated under the lock, the data is written without it,
        and the L2 entries are linked under the lock again.
        """
        pieces = self._in_place_pieces(offset, data)
        if pieces is not None:
            token = self._register(pieces)
            try:
                await self._issue(data, pieces)
            finally:
                del self._inflight[token]
            return
        first, last = offset >> self.cb, (offset + len(data) - 1) >> self.cb
        while True:
            async with self.lock:
                busy = self._alloc_conflict(first, last)
                if busy is None:
                    pieces, links, new0, n_new = await self._plan_write(offset, data)
                    token = self._register(pieces)
                    done = asyncio.Event()
                    for l1i, idx, _e in links:
                        self._allocs[(l1i << self.l2_bits) | idx] = done
                    self._maybe_grow_ahead()
                    break
            await busy.wait()
        ok = False
        try:
            await self._issue(data, pieces)
            ok = True
        finally:
            del self._inflight[token]
            try:
                async with self.lock:
                    if ok:
                        await self._link(links)
                        await self._maybe_writeback()
                    elif n_new:
                        # nothing points at them yet: give them back at the next flush
                        self._free_later(range(new0, new0 + n_new))
            finally:
                for l1i, idx, _e in links:
                    self._allocs.pop((l1i << self.l2_bits) | idx, None)
                done.set()

    def _maybe_grow_ahead(self) -> None:
        """Start growing the file in the background when allocations near its end, so the
        resize overlaps the data writes instead of stalling the first one past the end."""
        need = self.alloc_end * self.cs
        margin = min(max(self.file_len // 4, 32 << 20), 256 << 20)
        if self._grow_task is not None or need + margin <= self.file_len:
            return
        target = need + 2 * margin

        async def grow() -> None:
            try:
                await self._ensure_file_size(target, used=False)
            except BlockIOError:
                pass  # the writes themselves grow the file (and report the error)
            finally:
                self._grow_task = None

        self._grow_task = asyncio.get_running_loop().create_task(grow())

    def _in_place_pieces(self, offset: int, data: memoryview) -> list[_Piece] | None:
        """The host pieces of a write that touches only owned, cached, settled data clusters.

        Synchronous on purpose: nothing can change the entries between this check and the
        registration of the write in ``_inflight``. None sends the write down the locked path.
        """
        cb = self.cb
        cs = self.cs
        end = offset + len(data)
        first, last = offset >> cb, (end - 1) >> cb
        l2_bits, mask = self.l2_bits, self.l2_entries - 1
        allocs = self._allocs
        l1 = self.l1
        pieces: list[_Piece] = []
        cur = -1
        table: list[int] | None = None
        for g in range(first, last + 1):
            l1i = g >> l2_bits
            if l1i != cur:
                if l1i >= len(l1):
                    return None
                l1e = l1[l1i]
                if not l1e & OFLAG_COPIED:
                    return None
                table = self.l2_cache.get(l1e & L1E_OFFSET_MASK)
                if table is None:
                    return None
                cur = l1i
            assert table is not None
            e = table[g & mask]
            if e & (OFLAG_COMPRESSED | OFLAG_ZERO) or not e & OFLAG_COPIED or g in allocs:
                return None
            host = e & L2E_OFFSET_MASK
            if not host or not self._data_ok(host, True):
                return None
            gstart = g << cb
            lo = offset if offset > gstart else gstart
            hi = min(end, gstart + cs)
            h = host + (lo - gstart)
            if pieces and pieces[-1][0] + pieces[-1][1] == h:
                ph, pn, ps, _b = pieces[-1]
                pieces[-1] = (ph, pn + hi - lo, ps, None)
            else:
                pieces.append((h, hi - lo, lo - offset, None))
        return pieces

    def _alloc_conflict(self, first: int, last: int) -> asyncio.Event | None:
        """The event of an in-flight allocation among guest clusters first..last, if any."""
        allocs = self._allocs
        if not allocs:
            return None
        if last - first + 1 <= len(allocs):
            for g in range(first, last + 1):
                ev = allocs.get(g)
                if ev is not None:
                    return ev
            return None
        for g, ev in allocs.items():
            if first <= g <= last:
                return ev
        return None

    def _register(self, pieces: list[_Piece]) -> int:
        lo = min(p[0] for p in pieces) >> self.cb if pieces else 0
        hi = _ceil_div(max(p[0] + p[1] for p in pieces), self.cs) if pieces else 0
        self._token += 1
        self._inflight[self._token] = (lo, hi)
        return self._token

    def _host_in_flight(self, c: int) -> bool:
        return any(lo <= c < hi for lo, hi in self._inflight.values())

    async def _plan_write(
        self, offset: int, data: memoryview
    ) -> tuple[list[_Piece], list[_Link], int, int]:
        """Under the lock: allocate what the write needs and lay out its data pieces.

        All clusters needing a new host cluster are allocated as one contiguous run. Partial
        clusters are completed from their old content (backing file, compressed data, a
        snapshot's shared cluster, or zeroes). Returns the pieces, the L2 entries to link
        after the data is written, and the run of new clusters (first, count).
        """
        cs, cb = self.cs, self.cb
        end = offset + len(data)
        first, last = offset >> cb, (end - 1) >> cb
        tables: dict[int, tuple[int, list[int]]] = {}
        for l1i in range(first >> self.l2_bits, (last >> self.l2_bits) + 1):
            tables[l1i] = await self._l2_for_write(l1i)
        need = 0
        for g in range(first, last + 1):
            l2off, table = tables[g >> self.l2_bits]
            idx = g & (self.l2_entries - 1)
            e = table[idx]
            kind = self._kind(e)
            if kind in (NORMAL, ZERO_ALLOC) and e & OFLAG_COPIED:
                await self._check_data(e & L2E_OFFSET_MASK, l2off, idx, True)
            else:
                need += 1
        new0 = (await self._alloc(need)) if need else 0
        nxt = new0
        pieces: list[_Piece] = []
        links: list[_Link] = []
        for g in range(first, last + 1):
            l1i = g >> self.l2_bits
            _l2off, table = tables[l1i]
            idx = g & (self.l2_entries - 1)
            e = table[idx]
            kind = self._kind(e)
            gstart = g << cb
            lo = max(offset, gstart)
            hi = min(end, gstart + cs)
            full = hi - lo == cs
            base: bytes | None = None
            if kind == NORMAL and e & OFLAG_COPIED:
                pieces.append(((e & L2E_OFFSET_MASK) + (lo - gstart), hi - lo, lo - offset, None))
                continue
            if kind == ZERO_ALLOC and e & OFLAG_COPIED:
                # keep the preallocated cluster, drop its zero flag
                host = e & L2E_OFFSET_MASK
                if not full:
                    base = bytes(cs)
            else:
                host = nxt << cb
                nxt += 1
                if not full:
                    if kind in (ZERO_PLAIN, ZERO_ALLOC):
                        base = bytes(cs)
                    else:
                        base = await self._cluster_content(g, e)
            links.append((l1i, idx, host | OFLAG_COPIED))
            if base is None:
                pieces.append((host, cs, lo - offset, None))
            else:
                buf = bytearray(base)
                buf[lo - gstart : hi - gstart] = data[lo - offset : hi - offset]
                pieces.append((host, cs, -1, bytes(buf)))
        return pieces, links, new0, need

    async def _link(self, links: list[_Link]) -> None:
        """Under the lock: point the L2 entries at data now written, freeing what they held."""
        cur = -1
        l2off, table = 0, list[int]()
        for l1i, idx, new in links:
            if l1i != cur:
                l2off, table = await self._l2_for_write(l1i)
                cur = l1i
            old = table[idx]
            table[idx] = new
            self.l2_cache.mark_dirty(l2off, table)
            if (old & L2E_OFFSET_MASK) != (new & L2E_OFFSET_MASK) or old & OFLAG_COMPRESSED:
                self._free_entry_later(old)

    async def _issue(self, data: memoryview, pieces: list[_Piece]) -> None:
        """Write pieces, merging those contiguous on the host into single large writes.

        Runs of plain request slices that are also contiguous in the request go out as one
        memoryview slice, without copying.
        """
        i = 0
        while i < len(pieces):
            host, n, src, buf = pieces[i]
            j = i + 1
            nxt = host + n
            sliceable = buf is None
            while j < len(pieces) and pieces[j][0] == nxt:
                _h, n2, s2, b2 = pieces[j]
                if b2 is not None or s2 != src + (nxt - host):
                    sliceable = False
                nxt += n2
                j += 1
            out: bytes | memoryview
            if sliceable:
                out = data[src : src + (nxt - host)]
            else:
                out = b"".join(
                    b if b is not None else data[s : s + m] for _h, m, s, b in pieces[i:j]
                )
            await self._fwrite(host, out)
            i = j

    async def pwritev(self, offset: int, data: bytes | memoryview, flags: WriteFlags) -> None:
        self._check_usable()
        if not data:
            return
        mv = memoryview(data)
        if mv.format != "B" or mv.ndim != 1:
            mv = mv.cast("B")
        await self._write(offset, mv)

    async def _maybe_writeback(self) -> None:
        # bound the dirty metadata kept in memory between guest flushes
        if len(self.l2_cache.dirty) + len(self.rb_cache.dirty) > 4096:
            await self._flush_locked()

    def _reads_as_zero(self, entry: int) -> bool:
        kind = self._kind(entry)
        if kind in (ZERO_PLAIN, ZERO_ALLOC):
            return True
        return kind == UNALLOCATED and self.node.backing is None

    async def pwrite_zeroes(self, offset: int, length: int, flags: WriteFlags) -> None:
        self._check_usable()
        unmap = bool(flags & WriteFlags.MAY_UNMAP)
        cs = self.cs
        end = offset + length
        a = _ceil_div(offset, cs) * cs
        b = (end // cs) * cs
        if end == self.size:
            # the partial last cluster of the image counts as whole
            b = _ceil_div(end, cs) * cs
        partial: list[tuple[int, int]] = []
        if a >= b:
            pos = offset
            while pos < end:
                n = min(end, (pos // cs + 1) * cs) - pos
                partial.append((pos, n))
                pos += n
        else:
            if offset < a:
                partial.append((offset, a - offset))
            if b < end:
                partial.append((b, end - b))
        for pos, n in partial:
            g = pos >> self.cb
            async with self.lock:
                table = await self._l2_for_read(g >> self.l2_bits)
                e = table[g & (self.l2_entries - 1)] if table is not None else 0
            if self._reads_as_zero(e) and g not in self._allocs:
                continue
            if flags & WriteFlags.NO_FALLBACK:
                raise BlockIOError(errno.ENOTSUP)
            await self._write(pos, memoryview(bytes(n)))
        if a < b:
            g0, g1 = a // cs, b // cs
            while True:
                async with self.lock:
                    busy = self._alloc_conflict(g0, g1 - 1)
                    if busy is None:
                        fallback = await self._zero_clusters(g0, g1, unmap, flags)
                        await self._maybe_writeback()
                        break
                await busy.wait()
            for g in fallback:
                await self._write(g << self.cb, memoryview(bytes(self.cs)))

    async def _zero_clusters(self, g0: int, g1: int, unmap: bool, flags: WriteFlags) -> list[int]:
        """Under the lock: zero clusters through their L2 entries; returns the clusters that
        need zeroes written instead (v2 images have no zero flag)."""
        v3 = self.h.version == 3
        fallback: list[int] = []
        if v3:
            await self._zero_clusters_v3(g0, g1, unmap)
            return fallback
        for g in range(g0, g1):
            l1i = g >> self.l2_bits
            idx = g & (self.l2_entries - 1)
            table = await self._l2_for_read(l1i)
            e = table[idx] if table is not None else 0
            if self._reads_as_zero(e):
                continue
            if unmap and self.node.backing is None and not self.h.backing_file:
                _, wt = await self._l2_for_write(l1i)
                self._free_entry_later(wt[idx])
                wt[idx] = 0
                self.l2_cache.mark_dirty(self.l1[l1i] & L1E_OFFSET_MASK, wt)
                continue
            if flags & WriteFlags.NO_FALLBACK:
                raise BlockIOError(errno.ENOTSUP)
            fallback.append(g)
        return fallback

    async def _zero_clusters_v3(self, g0: int, g1: int, unmap: bool) -> None:
        """Set zero flags one L2 table at a time (a mirror zeroes whole gigabytes at once)."""
        mask = self.l2_entries - 1
        g = g0
        while g < g1:
            l1i = g >> self.l2_bits
            stop = min(g1, (l1i + 1) << self.l2_bits)
            lo, hi = g & mask, ((stop - 1) & mask) + 1
            g = stop
            table = await self._l2_for_read(l1i)
            if table is not None and all(
                (e & (OFLAG_ZERO | OFLAG_COMPRESSED)) == OFLAG_ZERO
                and (not unmap or not e & L2E_OFFSET_MASK)
                for e in table[lo:hi]
            ):
                continue  # already zero clusters
            l2off, wt = await self._l2_for_write(l1i)
            for idx in range(lo, hi):
                e = wt[idx]
                kind = self._kind(e)
                if kind == ZERO_PLAIN or (kind == ZERO_ALLOC and not unmap):
                    continue
                if kind in (NORMAL, ZERO_ALLOC) and e & OFLAG_COPIED and not unmap:
                    wt[idx] = (e & L2E_OFFSET_MASK) | OFLAG_COPIED | OFLAG_ZERO
                else:
                    if kind != UNALLOCATED:
                        self._free_entry_later(e)
                    wt[idx] = OFLAG_ZERO
            self.l2_cache.mark_dirty(l2off, wt)

    async def pdiscard(self, offset: int, length: int) -> None:
        self._check_usable()
        cs, cb = self.cs, self.cb
        end = offset + length
        g0 = _ceil_div(offset, cs)
        g1 = end >> cb
        if end == self.size:
            g1 = _ceil_div(end, cs)
        if g1 <= g0:
            return
        v3 = self.h.version == 3
        has_backing = self.node.backing is not None or bool(self.h.backing_file)
        if not v3 and has_backing:
            # a v2 image cannot hide its backing file without writing zeroes; discard is
            # advisory, so keep the data
            return
        while True:
            async with self.lock:
                busy = self._alloc_conflict(g0, g1 - 1)
                if busy is None:
                    await self._discard_locked(g0, g1, v3, has_backing)
                    return
            await busy.wait()

    async def _discard_locked(self, g0: int, g1: int, v3: bool, has_backing: bool) -> None:
        """Under the lock, with no allocation in flight on g0..g1."""
        for g in range(g0, g1):
            l1i = g >> self.l2_bits
            table = await self._l2_for_read(l1i)
            idx = g & (self.l2_entries - 1)
            e = table[idx] if table is not None else 0
            new = OFLAG_ZERO if (v3 and has_backing) else 0
            if e == new or (table is None and new == 0):
                continue
            l2off, wt = await self._l2_for_write(l1i)
            e = wt[idx]
            kind = self._kind(e)
            if kind in (NORMAL, ZERO_ALLOC, COMPRESSED):
                self._free_entry_later(e)
            wt[idx] = new
            self.l2_cache.mark_dirty(l2off, wt)
        await self._maybe_writeback()

    # --- flush ------------------------------------------------------------------------------

    async def flush(self) -> None:
        if self.corrupt or self.node.read_only:
            return
        async with self.lock:
            await self._flush_locked()

    async def _flush_locked(self) -> None:
        f = self.file
        dirty = (
            self.l2_cache.dirty or self.rb_cache.dirty or self.reftable_dirty or self.l1_dirty
            or self.pending_free
        )
        if not dirty:
            await f.flush()
            return
        await self._ensure_file_size(self.alloc_end * self.cs)
        # 1. refcounts (and the data written so far) before anything that points at clusters
        if self.rb_cache.dirty:
            await self._write_dirty_refblocks()
            await f.flush()
        if self.reftable_dirty:
            t = self.reftable
            await self._fwrite(self.h.refcount_table_offset, struct.pack(f">{len(t)}Q", *t))
            self.reftable_dirty = False
            await f.flush()
        # 2. L2 tables
        if self.l2_cache.dirty:
            for off in sorted(self.l2_cache.dirty):
                table = self.l2_cache.peek(off)
                await self._fwrite(off, struct.pack(f">{self.l2_entries}Q", *table))
            self.l2_cache.clean_all()
            await f.flush()
        # 3. L1 entries, in whole 512-byte sectors
        if self.l1_dirty:
            sectors = sorted({i // 64 for i in self.l1_dirty})
            for s in sectors:
                chunk = self.l1[s * 64 : s * 64 + 64]
                await self._fwrite(
                    self.h.l1_table_offset + s * 512, struct.pack(f">{len(chunk)}Q", *chunk)
                )
            self.l1_dirty.clear()
            await f.flush()
        # 4. frees, now that nothing durable points at those clusters
        if self.pending_free:
            frees, self.pending_free = self.pending_free, []
            released: list[int] = []
            for c in frees:
                if self._inflight and self._host_in_flight(c):
                    # a write outside the lock still targets it: release it next time
                    self.pending_free.append(c)
                    continue
                if await self._rc_add(c, -1) == 0:
                    self.meta.discard(c)
                    self.free_hint = min(self.free_hint, c)
                    released.append(c)
            await self._write_dirty_refblocks()
            await f.flush()
            await self._discard_host(released)

    async def _discard_host(self, clusters: list[int]) -> None:
        """Pass freed clusters down to the file (cf. pass-discard-request), merged in runs.

        Advisory: the file node ignores it unless opened with discard=unmap, and a failure
        only means the space is not returned to the host yet.
        """
        i = 0
        clusters.sort()
        while i < len(clusters):
            j = i + 1
            while j < len(clusters) and clusters[j] == clusters[j - 1] + 1:
                j += 1
            off = clusters[i] << self.cb
            n = min((j - i) << self.cb, self.file.length() - off)
            if n > 0:
                try:
                    await self.file.discard(off, n)
                except BlockIOError:
                    pass
            i = j

    async def close(self) -> None:
        if self._grow_task is not None:
            await self._grow_task
        if not self.node.read_only and not self.corrupt:
            await self.flush()
            end = max(self.used_end, self.alloc_end * self.cs)
            if self.file_len > end and self.file.length() > end:
                await self.file.driver.truncate(end)
                self.file_len = end

    # --- block status -----------------------------------------------------------------------

    async def _detect_metadata_preallocation(self) -> bool:
        """cf. qcow2_detect_metadata_preallocation: far more clusters in use than the host
        file really allocates means clusters were preallocated over holes."""
        real = await allocated_size(self.file)
        if real is None:
            return False
        real_clusters = real // self.cs
        threshold = max(real_clusters * 10 // 9, real_clusters + 2)
        end = _ceil_div(self.file.length(), self.cs)
        used = 0
        for r in range(min(len(self.reftable), _ceil_div(end, self.epb))):
            if not self.reftable[r] & REFT_OFFSET_MASK:
                continue
            blk = await self._load_rb(r)
            n = min(self.epb, end - (r << self.rb_bits))
            used += n - blk[:n].count(0)
            if used > threshold:
                return True
        return False

    async def block_status(self, offset: int, length: int) -> Extent:
        self._check_usable()
        async with self.lock:
            if self._prealloc_checked is False:
                self._prealloc_checked = True
                self.recurse_block_status = await self._detect_metadata_preallocation()
            segs = await self._map(offset, min(length, self.l2_entries * self.cs), True)
        kind, _pos, n, val = segs[0]
        if kind == NORMAL:
            return Extent(
                n,
                BlockStatus.DATA | BlockStatus.ALLOCATED | BlockStatus.OFFSET_VALID,
                map_offset=val,
                map_node=self.file,
            )
        if kind == COMPRESSED:
            return Extent(n, BlockStatus.DATA | BlockStatus.ALLOCATED)
        if kind == ZERO_ALLOC:
            # a preallocated zero cluster keeps its host offset (qemu-img map shows it)
            return Extent(
                n,
                BlockStatus.ZERO | BlockStatus.ALLOCATED | BlockStatus.OFFSET_VALID,
                map_offset=val,
                map_node=self.file,
            )
        if kind == ZERO_PLAIN:
            return Extent(n, BlockStatus.ZERO | BlockStatus.ALLOCATED)
        return Extent(n, BlockStatus.NONE)

    # --- resize -----------------------------------------------------------------------------

    async def truncate(self, length: int, preallocation: str = "off") -> None:
        if preallocation != "off":
            raise BlockIOError(errno.ENOTSUP, f"Unsupported preallocation mode '{preallocation}'")
        if length < self.size:
            raise BlockIOError(errno.ENOTSUP, "qcow2 doesn't support shrinking images yet")
        async with self.lock:
            await self._flush_locked()
            need = _ceil_div(length, self.cs << self.l2_bits)
            if need > len(self.l1):
                if need * 8 > 32 * 1024 * 1024:
                    raise BlockIOError(errno.EFBIG, "Image is too big")
                n_clusters = _ceil_div(need * 8, self.cs)
                new = (await self._alloc(n_clusters)) << self.cb
                for c in range(new >> self.cb, (new >> self.cb) + n_clusters):
                    self.meta.add(c)
                table = self.l1 + [0] * (need - len(self.l1))
                await self._flush_locked()  # the refcounts of the new table first
                await self._fwrite(new, struct.pack(f">{need}Q", *table))
                await self.file.flush()
                old_off, old_n = self.h.l1_table_offset, len(self.l1)
                self.h.l1_table_offset, self.h.l1_size = new, need
                self.h.size = length
                await self._write_header()
                await self.file.flush()
                self.l1 = table
                if old_n:
                    self._free_later(self._clusters(old_off, old_n * 8))
                await self._flush_locked()
            else:
                self.h.size = length
                await self._write_header()
                await self.file.flush()
            self.size = length

    # --- repair -----------------------------------------------------------------------------

    async def _collect_refs(self) -> dict[int, int]:
        """Count every reference to every host cluster (cf. qemu-img check's walk)."""
        refs: dict[int, int] = {}
        limit = _ceil_div(self.file_len, self.cs)

        def add(offset: int, length: int) -> None:
            for c in self._clusters(offset, length):
                if c >= limit:
                    # a repair would have to lay out refcounts far past the file: refuse
                    raise ImageFormatError(
                        f"Cannot repair the dirty image: a reference to {offset:#x} points "
                        "past the end of the image file"
                    )
                refs[c] = refs.get(c, 0) + 1

        h = self.h
        add(0, self.cs)
        if h.nb_snapshots:
            add(h.snapshots_offset, self.snapshot_table_len)
        l1s: list[list[int]] = [self.l1]
        if h.l1_size:
            add(h.l1_table_offset, h.l1_size * 8)
        for off, n in self.snapshot_l1s:
            if n:
                add(off, n * 8)
                raw = await self._fread(off, n * 8)
                l1s.append(list(struct.unpack(f">{n}Q", raw)))
        for l1 in l1s:
            for e in l1:
                l2off = e & L1E_OFFSET_MASK
                if not l2off:
                    continue
                add(l2off, self.cs)
                raw = await self._fread(l2off, self.cs)
                for le in struct.unpack(f">{self.l2_entries}Q", raw):
                    kind = self._kind(le)
                    if kind in (NORMAL, ZERO_ALLOC):
                        add(le & L2E_OFFSET_MASK, self.cs)
                    elif kind == COMPRESSED:
                        coff, nbytes = cz.descriptor(le, self.cb)
                        add(coff, nbytes)
        return refs

    async def _rebuild_refcounts(self) -> None:
        """Lay out a fresh refcount table and blocks after the end of the image."""
        refs = await self._collect_refs()
        cs, epb = self.cs, self.epb
        a = max(self.alloc_end, max(refs, default=0) + 1)
        t = b = 0
        while True:
            end = a + t + b
            top = max(max(refs, default=0), end - 1)
            n_blocks = (top >> self.rb_bits) + 1
            t2 = _ceil_div(n_blocks * 8, cs)
            used_blocks = {c >> self.rb_bits for c in refs} | {
                c >> self.rb_bits for c in range(a, a + t2 + b)
            }
            b2 = len(used_blocks)
            if (t2, b2) == (t, b):
                break
            t, b = t2, b2
        for c in range(a, a + b + t):
            refs[c] = refs.get(c, 0) + 1
        table = [0] * (t * cs // 8)
        blocks: dict[int, list[int]] = {}
        for k, r in enumerate(sorted({c >> self.rb_bits for c in refs})):
            table[r] = (a + k) << self.cb
            blocks[r] = [0] * epb
        for c, v in refs.items():
            if v > self.rc_max:
                raise ImageFormatError(
                    "reference count overflow on repair"
                )
            blocks[c >> self.rb_bits][c & (epb - 1)] = v
        await self._ensure_file_size((a + b + t) * cs)
        for r, blk in blocks.items():
            await self._fwrite(table[r], encode_block(blk, self.h.refcount_order))
        await self._fwrite((a + b) << self.cb, struct.pack(f">{len(table)}Q", *table))
        await self.file.flush()
        self.h.refcount_table_offset = (a + b) << self.cb
        self.h.refcount_table_clusters = t
        self.reftable = table
        self.rb_cache = TableCache(self.rb_cache.budget)
        self.alloc_end = a + b + t
        self._check_metadata_layout()
