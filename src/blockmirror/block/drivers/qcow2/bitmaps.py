"""Persistent dirty bitmaps in the qcow2 bitmaps extension (docs/interop/qcow2.txt,
"Bitmaps extension"; cf. QEMU's block/qcow2-bitmap.c).

On disk: the header extension gives the number of bitmaps and the offset and size of the
bitmap directory; each directory entry names a bitmap, its flags (in-use, auto), granularity
and its bitmap table, whose entries point at data clusters holding the bits (0 = all zeroes,
1 = all ones). The extension counts only while the "bitmaps" autoclear bit is set: a program
that does not know bitmaps clears it on a read-write open, and the bitmaps are then ignored.

What QEMU does, and so do we:

- open read-write: every bitmap is loaded; those not marked in-use get the in-use flag on disk
  at once (the directory is rewritten in place with the autoclear bit dropped meanwhile), so a
  crash leaves them in-use; bitmaps already in-use load as *inconsistent* (their bits are
  meaningless and every use is refused) and stay in the directory as they are;
- open read-only: bitmaps load read-only and nothing is written;
- close: every persistent, consistent bitmap of the node is written (data clusters, table), a
  new directory replaces the old one in the header, and the old tables are freed;
- remove: a persistent bitmap leaves the directory immediately.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from blockmirror.block.bitmaps import NodeBitmaps
from blockmirror.block.drivers.qcow2.header import AUTOCLEAR_BITMAPS, EXT_BITMAPS
from blockmirror.block.drivers.qcow2.image_context import ImageContext
from blockmirror.block.drivers.qcow2.layout import ceil_div
from blockmirror.block.drivers.qcow2.refcount_allocator import RefcountAllocator
from blockmirror.errors import BlockMirrorError, ImageFormatError

FLAG_IN_USE = 1 << 0
FLAG_AUTO = 1 << 1
RESERVED_FLAGS = 0xFFFFFFFC
TYPE_DIRTY_TRACKING = 1
MAX_BITMAPS = 65535
MAX_DIRECTORY_SIZE = 1024 * MAX_BITMAPS
MAX_TABLE_SIZE = 0x8000000
MAX_PHYSICAL_SIZE = 0x20000000
MIN_GRANULARITY_BITS = 9
MAX_GRANULARITY_BITS = 31
MAX_NAME_SIZE = 1023
TABLE_ENTRY_RESERVED_MASK = 0xFF000000000001FE
TABLE_ENTRY_OFFSET_MASK = 0x00FFFFFFFFFFFE00
TABLE_ENTRY_ALL_ONES = 1

#: the bitmaps header extension: nb_bitmaps, reserved, bitmap_directory_size,
#: bitmap_directory_offset
_EXTENSION = struct.Struct(">IIQQ")
#: a directory entry: bitmap_table_offset, bitmap_table_size, flags, type, granularity_bits,
#: name_size, extra_data_size (then extra data, then the name, padded to 8 bytes)
_ENTRY = struct.Struct(">QIIBBHI")


@dataclass
class DirectoryEntry:
    """One entry of the bitmap directory (the bitmaps extension)."""

    name: str
    table_offset: int
    table_size: int
    flags: int
    granularity_bits: int

    def encode(self) -> bytes:
        name = self.name.encode()
        raw = _ENTRY.pack(
            self.table_offset, self.table_size, self.flags, TYPE_DIRTY_TRACKING,
            self.granularity_bits, len(name), 0,
        ) + name
        return raw + bytes(-len(raw) % 8)


def entry_size(name: str) -> int:
    return (_ENTRY.size + len(name.encode()) + 7) & ~7


def table_size_for(length: int, granularity: int, cluster_size: int) -> int:
    """Bitmap table entries (data clusters) a bitmap over ``length`` bytes needs."""
    granules = ceil_div(length, granularity)
    serialized = ceil_div(granules, 64) * 8
    return ceil_div(serialized, cluster_size)


class BitmapStore:
    """The bitmaps extension of one open image, and the node's persistent bitmaps."""

    def __init__(self, ctx: ImageContext, allocator: RefcountAllocator) -> None:
        self._ctx = ctx
        self._allocator = allocator
        self.directory_offset = 0
        self.directory_size = 0
        #: the directory as it is on disk
        self.entries: list[DirectoryEntry] = []
        self._expected_count = 0

    # --- reading -------------------------------------------------------------------------

    def read_extension(self) -> bool:
        """Take the extension from the header, if the autoclear bit says it is valid.

        Returns True when a stale extension was dropped: a read-write open then rewrites the
        header without it, as QEMU does (its clusters are leaked until a repair).
        """
        header = self._ctx.header
        data = next((d for t, d in header.other_extensions if t == EXT_BITMAPS), None)
        if data is None:
            return False
        if not header.autoclear & AUTOCLEAR_BITMAPS:
            # stale: written before a program without bitmap support opened the image
            self._drop_extension()
            return True
        if len(data) != _EXTENSION.size:
            raise ImageFormatError("bitmaps_ext: Invalid extension length")
        count, reserved, size, offset = _EXTENSION.unpack(data)
        if reserved:
            raise ImageFormatError("bitmaps_ext: Reserved field is not zero")
        if count > MAX_BITMAPS:
            raise ImageFormatError(
                f"bitmaps_ext: File has {count} bitmaps, exceeding the QEMU supported "
                f"maximum of {MAX_BITMAPS}"
            )
        if count == 0:
            raise ImageFormatError("found bitmaps extension with zero bitmaps")
        if offset % self._ctx.geometry.cluster_size:
            raise ImageFormatError("bitmaps_ext: invalid bitmap directory offset")
        if size > MAX_DIRECTORY_SIZE:
            raise ImageFormatError(
                f"bitmaps_ext: bitmap directory size ({size}) exceeds the maximum supported "
                f"size ({MAX_DIRECTORY_SIZE})"
            )
        self.directory_offset, self.directory_size = offset, size
        self._expected_count = count
        return False

    def _drop_extension(self) -> None:
        self._ctx.header.other_extensions = [
            (t, d) for t, d in self._ctx.header.other_extensions if t != EXT_BITMAPS
        ]
        self._ctx.header.has_bitmaps_ext = False
        self._ctx.header.autoclear &= ~AUTOCLEAR_BITMAPS

    async def read_directory(self) -> None:
        if not self.directory_size:
            return
        if self.directory_offset + self.directory_size > self._ctx.file.length:
            raise ImageFormatError("Failed to read bitmap directory")
        raw = await self._ctx.file.read(self.directory_offset, self.directory_size)
        entries: list[DirectoryEntry] = []
        pos = 0
        while pos < len(raw):
            if pos + _ENTRY.size > len(raw):
                raise ImageFormatError("Broken bitmap directory")
            if len(entries) + 1 > self._expected_count:
                raise ImageFormatError("More bitmaps found than specified in header extension")
            offset, size, flags, kind, bits, name_size, extra = _ENTRY.unpack_from(raw, pos)
            end = (pos + _ENTRY.size + extra + name_size + 7) & ~7
            if end > len(raw):
                raise ImageFormatError("Broken bitmap directory")
            name_at = pos + _ENTRY.size + extra
            name = raw[name_at : name_at + name_size].decode("utf-8", "replace")
            if extra:
                raise ImageFormatError("Bitmap extra data is not supported")
            entry = DirectoryEntry(name, offset, size, flags, bits)
            if not self._entry_ok(entry, kind, name_size):
                raise ImageFormatError(f"Bitmap '{name}' doesn't satisfy the constraints")
            entries.append(entry)
            pos = end
        if len(entries) != self._expected_count:
            raise ImageFormatError("Less bitmaps found than specified in header extension")
        self.entries = entries

    def _entry_ok(self, entry: DirectoryEntry, kind: int, name_size: int) -> bool:
        """cf. check_dir_entry."""
        cluster_size = self._ctx.geometry.cluster_size
        if (
            entry.table_size == 0
            or entry.table_offset == 0
            or entry.table_offset % cluster_size
            or entry.table_size > MAX_TABLE_SIZE
            or not MIN_GRANULARITY_BITS <= entry.granularity_bits <= MAX_GRANULARITY_BITS
            or entry.flags & RESERVED_FLAGS
            or name_size > MAX_NAME_SIZE
            or kind != TYPE_DIRTY_TRACKING
        ):
            return False
        physical = entry.table_size * cluster_size
        if physical > MAX_PHYSICAL_SIZE:
            return False
        covered = (physical * 8) << entry.granularity_bits
        return bool(entry.flags & FLAG_IN_USE) or self._ctx.header.size <= covered

    async def _read_table(self, entry: DirectoryEntry) -> list[int]:
        raw = await self._ctx.file.read(entry.table_offset, entry.table_size * 8)
        table = list(struct.unpack(f">{entry.table_size}Q", raw))
        cluster_size = self._ctx.geometry.cluster_size
        for value in table:
            offset = value & TABLE_ENTRY_OFFSET_MASK
            if value & TABLE_ENTRY_RESERVED_MASK or (
                offset and (value & TABLE_ENTRY_ALL_ONES or offset % cluster_size)
            ):
                raise ImageFormatError(
                    f"Could not read bitmap_table table from image for bitmap '{entry.name}': "
                    "Invalid argument"
                )
        return table

    def metadata_ranges(self) -> list[tuple[int, int]]:
        """(offset, length) of the directory and of every bitmap table (not data)."""
        ranges = []
        if self.directory_size:
            ranges.append((self.directory_offset, self.directory_size))
        ranges.extend((e.table_offset, e.table_size * 8) for e in self.entries)
        return ranges

    async def referenced_ranges(self) -> list[tuple[int, int]]:
        """Everything the extension references, data clusters included (for a repair)."""
        ranges = self.metadata_ranges()
        for entry in self.entries:
            try:
                table = await self._read_table(entry)
            except ImageFormatError:
                # a broken table of a bitmap left in use is never read (QEMU does not
                # either): its clusters keep their references, they are just not listed
                continue
            for value in table:
                if value & TABLE_ENTRY_OFFSET_MASK:
                    ranges.append(
                        (value & TABLE_ENTRY_OFFSET_MASK, self._ctx.geometry.cluster_size)
                    )
        return ranges

    def info(self) -> list[dict[str, Any]]:
        """The bitmaps as qemu-img info lists them (Qcow2BitmapInfo), from the directory."""
        out = []
        for entry in self.entries:
            flags = [
                word for flag, word in ((FLAG_IN_USE, "in-use"), (FLAG_AUTO, "auto"))
                if entry.flags & flag
            ]
            out.append({"name": entry.name, "granularity": 1 << entry.granularity_bits,
                        "flags": flags})
        return out

    # --- loading into the node ----------------------------------------------------------

    async def load(self, bitmaps: NodeBitmaps, writable: bool) -> None:
        """cf. qcow2_load_dirty_bitmaps: create the node's bitmaps from the directory."""
        if not self.entries:
            return
        needs_update = False
        length = self._ctx.node.length()
        for entry in self.entries:
            granularity = 1 << entry.granularity_bits
            named = bitmaps.create(entry.name, granularity, persistent=True)
            if entry.flags & FLAG_IN_USE:
                # cf. bdrv_dirty_bitmap_set_inconsistent: it also stops recording
                named.inconsistent = True
                named.bitmap.enabled = False
            else:
                try:
                    await self._load_bits(entry, named.bitmap, length)
                except ImageFormatError:
                    bitmaps.release(entry.name)
                    raise
                if writable:
                    entry.flags |= FLAG_IN_USE
                    needs_update = True
            if not entry.flags & FLAG_AUTO:
                named.bitmap.enabled = False
            if not writable:
                named.readonly = True
        if needs_update and writable:
            await self._rewrite_directory_in_place()

    async def _load_bits(self, entry: DirectoryEntry, bitmap: Any, length: int) -> None:
        cluster_size = self._ctx.geometry.cluster_size
        granularity = 1 << entry.granularity_bits
        if table_size_for(length, granularity, cluster_size) != entry.table_size:
            raise ImageFormatError(
                f"Could not read bitmap '{entry.name}' from image: Invalid argument"
            )
        table = await self._read_table(entry)
        per_cluster = cluster_size * 8
        for index, value in enumerate(table):
            first = index * per_cluster
            offset = value & TABLE_ENTRY_OFFSET_MASK
            if offset:
                bitmap.load_bytes(await self._ctx.file.read(offset, cluster_size), first)
            elif value & TABLE_ENTRY_ALL_ONES:
                bitmap.set_granules(first, per_cluster)

    # --- writing ------------------------------------------------------------------------

    async def _write_header(self) -> None:
        await self._ctx.file.write_header_cluster(self._ctx.header, self._ctx.geometry.cluster_size)
        await self._ctx.file.flush()

    def _set_extension(self, count: int, size: int, offset: int) -> None:
        header = self._ctx.header
        others = [(t, d) for t, d in header.other_extensions if t != EXT_BITMAPS]
        if count:
            others.insert(0, (EXT_BITMAPS, _EXTENSION.pack(count, 0, size, offset)))
            header.autoclear |= AUTOCLEAR_BITMAPS
            header.has_bitmaps_ext = True
        else:
            header.autoclear &= ~AUTOCLEAR_BITMAPS
            header.has_bitmaps_ext = False
        header.other_extensions = others
        self.directory_offset, self.directory_size = offset, size

    def _encode_directory(self, entries: list[DirectoryEntry]) -> bytes:
        return b"".join(entry.encode() for entry in entries)

    async def _rewrite_directory_in_place(self) -> None:
        """cf. update_ext_header_and_dir_in_place: autoclear off, directory, autoclear on."""
        header = self._ctx.header
        header.autoclear &= ~AUTOCLEAR_BITMAPS
        await self._write_header()
        await self._ctx.file.write(self.directory_offset, self._encode_directory(self.entries))
        await self._write_header()
        header.autoclear |= AUTOCLEAR_BITMAPS
        await self._write_header()

    async def replace_entries(self, entries: list[DirectoryEntry],
                              before_header: Callable[[], None]) -> None:
        """A new directory of ``entries`` (under the driver's lock); ``before_header``
        changes the in-memory header just before the one header write that switches to it,
        so that other header fields change in the same write (``resume_area.py``)."""
        await self._replace_directory(entries, before_header)

    async def free_table(self, entry: DirectoryEntry) -> None:
        """Free a bitmap's table and data clusters (an entry no longer in the directory)."""
        await self._free_table(entry)

    async def _replace_directory(self, entries: list[DirectoryEntry],
                                 before_header: Callable[[], None] | None = None) -> None:
        """cf. update_ext_header_and_dir: write a new directory, point the header at it, free
        the old one. Runs under the driver's lock."""
        old_offset, old_size = self.directory_offset, self.directory_size
        if entries:
            raw = self._encode_directory(entries)
            if len(raw) > MAX_DIRECTORY_SIZE or len(entries) > MAX_BITMAPS:
                raise BlockMirrorError("Failed to update bitmap extension: Invalid argument")
            offset = await self._allocate(len(raw))
            await self._ctx.file.write(offset, raw)
            await self._ctx.flush_metadata()
            self._set_extension(len(entries), len(raw), offset)
        else:
            self._set_extension(0, 0, 0)
        if before_header is not None:
            before_header()
        await self._write_header()
        self.entries = entries
        if old_size:
            self._free(old_offset, old_size)

    async def _allocate(self, length: int) -> int:
        clusters = ceil_div(length, self._ctx.geometry.cluster_size)
        first = await self._allocator.allocate(clusters)
        self._allocator.metadata_clusters.update(range(first, first + clusters))
        return first << self._ctx.geometry.cluster_bits

    def _free(self, offset: int, length: int) -> None:
        self._allocator.free_later(self._ctx.geometry.clusters(offset, length))

    async def _free_table(self, entry: DirectoryEntry) -> None:
        """cf. free_bitmap_clusters: the data clusters and the table itself (a table that
        cannot be read leaks its data clusters, as in QEMU)."""
        try:
            table = await self._read_table(entry)
        except ImageFormatError:
            return
        for value in table:
            offset = value & TABLE_ENTRY_OFFSET_MASK
            if offset:
                self._free(offset, self._ctx.geometry.cluster_size)
        self._free(entry.table_offset, entry.table_size * 8)

    async def remove(self, name: str) -> None:
        """cf. qcow2_co_remove_persistent_dirty_bitmap (absence is not an error)."""
        entry = next((e for e in self.entries if e.name == name), None)
        if entry is None:
            return
        try:
            await self._replace_directory([e for e in self.entries if e is not entry])
        except BlockMirrorError as e:
            raise BlockMirrorError(f"Failed to update bitmap extension: {e.desc}") from None
        await self._free_table(entry)
        await self._ctx.flush_metadata()

    def check_new(self, bitmaps: NodeBitmaps, name: str, granularity: int) -> None:
        """cf. qcow2_co_can_store_new_dirty_bitmap, without the error prefix."""
        if self._ctx.header.version < 3:
            raise BlockMirrorError("Cannot store dirty bitmaps in qcow2 v2 files")
        self.check_constraints(name, granularity)
        count = 1
        size = entry_size(name)
        for named in bitmaps:
            if named.persistent:
                count += 1
                size += entry_size(named.name)
        if count > MAX_BITMAPS:
            raise BlockMirrorError("Maximum number of persistent bitmaps is already reached")
        if size > MAX_DIRECTORY_SIZE:
            raise BlockMirrorError("Not enough space in the bitmap directory")

    def check_constraints(self, name: str, granularity: int) -> None:
        """cf. check_constraints_on_bitmap."""
        bits = granularity.bit_length() - 1
        if bits > MAX_GRANULARITY_BITS:
            raise BlockMirrorError(
                f"Granularity exceeds maximum ({1 << MAX_GRANULARITY_BITS} bytes)"
            )
        if bits < MIN_GRANULARITY_BITS:
            raise BlockMirrorError(
                f"Granularity is under minimum ({1 << MIN_GRANULARITY_BITS} bytes)"
            )
        needed = ceil_div(ceil_div(self._ctx.node.length(), granularity), 8)
        if needed > MAX_PHYSICAL_SIZE or needed > MAX_TABLE_SIZE * self._ctx.geometry.cluster_size:
            raise BlockMirrorError(
                "Too much space will be occupied by the bitmap. Use larger granularity"
            )
        if len(name.encode()) > MAX_NAME_SIZE:
            raise BlockMirrorError(f"Name length exceeds maximum ({MAX_NAME_SIZE} characters)")

    async def store(self, bitmaps: NodeBitmaps) -> None:
        """cf. qcow2_store_persistent_dirty_bitmaps: write every persistent, consistent,
        writable bitmap and a new directory. Runs under the driver's lock."""
        entries = list(self.entries)
        by_name = {e.name: e for e in entries}
        to_write = []
        for named in bitmaps:  # newest first: new ones join the directory in this order
            if not named.persistent or named.inconsistent or named.readonly:
                continue
            self.check_constraints(named.name, named.granularity)
            to_write.append(named)
        if not to_write:
            return
        old_tables: list[DirectoryEntry] = []
        for named in to_write:
            existing = by_name.get(named.name)
            if existing is not None:
                if not existing.flags & FLAG_IN_USE:
                    raise BlockMirrorError(f"Bitmap '{named.name}' already exists in the image")
                old_tables.append(
                    DirectoryEntry(existing.name, existing.table_offset, existing.table_size,
                                   existing.flags, existing.granularity_bits)
                )
                entry = existing
            else:
                entry = DirectoryEntry(named.name, 0, 0, 0, 0)
                entries.append(entry)
                by_name[named.name] = entry
            entry.table_offset, entry.table_size = await self._store_bits(named.bitmap)
            entry.flags = FLAG_AUTO if named.enabled else 0
            entry.granularity_bits = named.granularity.bit_length() - 1
        await self._replace_directory(entries)
        for entry in old_tables:
            await self._free_table(entry)
        await self._ctx.flush_metadata()

    async def _store_bits(self, bitmap: Any) -> tuple[int, int]:
        """cf. store_bitmap_data and store_bitmap: data clusters for every chunk with a dirty
        granule, then the table; returns (table offset, table size)."""
        cluster_size = self._ctx.geometry.cluster_size
        size = table_size_for(bitmap.size, bitmap.granularity, cluster_size)
        if size > MAX_TABLE_SIZE or size * cluster_size > MAX_PHYSICAL_SIZE:
            raise BlockMirrorError("Bitmap is too big")
        per_cluster = cluster_size * 8
        table = [0] * size
        for index in range(size):
            first = index * per_cluster
            if bitmap.next_dirty(first * bitmap.granularity,
                                 (first + per_cluster) * bitmap.granularity) is None:
                continue
            data = bitmap.to_bytes(first, per_cluster)
            offset = await self._allocate(cluster_size)
            await self._ctx.file.write(offset, data + bytes(cluster_size - len(data)))
            table[index] = offset
        table_offset = await self._allocate(size * 8)
        await self._ctx.file.write(table_offset, struct.pack(f">{size}Q", *table))
        return table_offset, size
