"""A mirror's resume state kept inside its qcow2 source (docs/resume.md, "What is kept, and
where"): the clusters, and the header pieces that say whether they can be trusted.

The mirror (``jobs/mirror/image_store.py``) stores the same bytes as its sidecar file: a
header, two activity-log slots and two checkpoint slots. Here they live in one contiguous run
of clusters of the image, described three ways, each of which QEMU 7.2 leaves alone:

* a persistent bitmap named ``RESUME_BITMAP`` whose bitmap table lists the run's clusters, in
  order, and which is always flagged *in use*. ``qemu-img check`` counts the clusters as
  referenced (no leaks); QEMU loads the bitmap as inconsistent, so it never reads or writes
  its "bits", and it keeps the directory entry when it rewrites the directory;
* a header extension of type ``EXT_RESUME`` (version, offset and length of the run, and a
  nonce that the run's own header repeats). QEMU keeps unknown extensions byte for byte;
* the autoclear feature bit ``AUTOCLEAR_RESUME``. QEMU clears unknown autoclear bits when it
  opens the image read-write (``qemu-img check -r`` included), and so does this driver before
  the first write that no mirror tracks. A set bit therefore means: every write since the
  mirror set it was tracked by that mirror's activity log.

The area is made once when the mirror starts (refcount allocator, then data, flush, then the
bitmap directory and the header in one header write, flush) and removed when the mirror
pivots. Log records and checkpoints are plain overwrites of the run plus ``fdatasync``,
through a descriptor of their own (``record_fd``): never a header write.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from blockmirror.block.drivers.file import FileDriver
from blockmirror.block.drivers.qcow2.bitmaps import (
    FLAG_IN_USE,
    TABLE_ENTRY_OFFSET_MASK,
    BitmapStore,
    DirectoryEntry,
)
from blockmirror.block.drivers.qcow2.header import Header
from blockmirror.block.drivers.qcow2.image_context import ImageContext
from blockmirror.block.drivers.qcow2.layout import ceil_div
from blockmirror.block.drivers.qcow2.refcount_allocator import RefcountAllocator
from blockmirror.errors import BlockMirrorError

#: our header extension ("BMRS"): not a type the qcow2 specification assigns
EXT_RESUME = 0x424D5253
#: our autoclear bit: the highest, the farthest from the bits the specification assigns
AUTOCLEAR_RESUME = 1 << 63
AUTOCLEAR_RESUME_BIT = 63
#: the persistent bitmap that holds the area's clusters (always in use)
RESUME_BITMAP = "__org.blockmirror_resume"
EXT_VERSION = 1
#: version, reserved, area offset, area length, nonce
_EXT = struct.Struct(">IIQQQ")


@dataclass(frozen=True)
class AreaExtension:
    """Our header extension that locates the resume area in the image file."""

    offset: int
    length: int
    nonce: int

    def encode(self) -> bytes:
        return _EXT.pack(EXT_VERSION, 0, self.offset, self.length, self.nonce)


def parse_extension(header: Header) -> AreaExtension | None:
    """Our extension, if the header has a well-formed one (the bit is not looked at)."""
    data = next((d for t, d in header.other_extensions if t == EXT_RESUME), None)
    if data is None or len(data) != _EXT.size:
        return None
    version, reserved, offset, length, nonce = _EXT.unpack(data)
    if version != EXT_VERSION or reserved or not length:
        return None
    return AreaExtension(offset, length, nonce)


def _set_extension(header: Header, ext: AreaExtension | None) -> None:
    others = [(t, d) for t, d in header.other_extensions if t != EXT_RESUME]
    if ext is None:
        header.autoclear &= ~AUTOCLEAR_RESUME
    else:
        others.append((EXT_RESUME, ext.encode()))
        header.autoclear |= AUTOCLEAR_RESUME
    header.other_extensions = others


class ResumeArea:
    """The resume area of one open qcow2 image (part of ``Qcow2Driver``)."""

    def __init__(
        self, ctx: ImageContext, allocator: RefcountAllocator, bitmap_store: BitmapStore
    ) -> None:
        self._ctx = ctx
        self._allocator = allocator
        self._bitmaps = bitmap_store
        #: the area, while the header's bit says it is current (None: no usable area)
        self.current: AreaExtension | None = None
        #: why an area found in the image cannot be trusted (None: none found, or current)
        self.stale: str | None = None
        #: a mirror tracks every write of the node: writes need not clear the bit
        self.owner: object | None = None
        #: the bit is set on disk and nobody tracks writes: the next write clears it first
        self.needs_guard = False

    # --- open ---------------------------------------------------------------------------

    async def examine(self) -> int:
        """At open, before unknown autoclear bits are cleared: is there a current area?

        Returns the autoclear bits to keep (ours, when the area is current).
        """
        header = self._ctx.header
        ext = parse_extension(header)
        entry = self._entry()
        bit = bool(header.autoclear & AUTOCLEAR_RESUME) and header.version == 3
        if ext is None and entry is None:
            return 0
        if not bit:
            self.stale = (
                "its autoclear bit is clear: the image was opened read-write by another "
                "program, or written while no mirror tracked it, since the resume state was "
                "written"
            )
            return 0
        if ext is None or entry is None or not await self._matches(ext, entry):
            self.stale = (
                f"its resume state is incomplete (extension {EXT_RESUME:#x} and bitmap "
                f"'{RESUME_BITMAP}' do not describe the same clusters)"
            )
            return 0
        self.current = ext
        return AUTOCLEAR_RESUME

    def _entry(self) -> DirectoryEntry | None:
        return next((e for e in self._bitmaps.entries if e.name == RESUME_BITMAP), None)

    async def _matches(self, ext: AreaExtension, entry: DirectoryEntry) -> bool:
        cluster_size = self._ctx.geometry.cluster_size
        clusters = ceil_div(ext.length, cluster_size)
        if (not entry.flags & FLAG_IN_USE or entry.table_size != clusters
                or ext.offset % cluster_size
                or ext.offset + ext.length > self._ctx.file.length):
            return False
        raw = await self._ctx.file.read(entry.table_offset, entry.table_size * 8)
        table = struct.unpack(f">{entry.table_size}Q", raw)
        return all(value & TABLE_ENTRY_OFFSET_MASK == ext.offset + i * cluster_size
                   for i, value in enumerate(table))

    def opened(self) -> None:
        """After the bitmaps are loaded: a current area's bitmap may not be removed or used
        while this node is open (cf. a bitmap held busy by a job), and the first write
        clears the bit (also after a read-only node is switched to read-write)."""
        if self.current is None:
            return
        named = self._ctx.node.bitmaps.get(RESUME_BITMAP)
        if named is not None:
            named.users += 1
        self.needs_guard = True

    # --- reading ------------------------------------------------------------------------

    async def read(self) -> bytes:
        ext = self.current
        if ext is None:
            raise BlockMirrorError("no current resume area")
        return await self._ctx.file.read(ext.offset, ext.length)

    def record_fd(self) -> int:
        """A descriptor of the image file of its own, for record writes (the caller closes
        it). Not the driver's: that one may be O_DIRECT, and reopens replace it."""
        proto = self._ctx.file.node.driver
        if not isinstance(proto, FileDriver) or proto.fd < 0:
            raise BlockMirrorError("the image is not in a local file")
        fd = os.open(proto.filename, os.O_RDWR | os.O_CLOEXEC)
        mine, theirs = os.fstat(fd), os.fstat(proto.fd)
        if (mine.st_dev, mine.st_ino) != (theirs.st_dev, theirs.st_ino):
            os.close(fd)
            raise BlockMirrorError(f"'{proto.filename}' is no longer the open image")
        return fd

    def local_file(self) -> bool:
        proto = self._ctx.file.node.driver
        return isinstance(proto, FileDriver) and proto.fd >= 0

    # --- the owner, and the guard -------------------------------------------------------

    def attach(self, owner: object) -> None:
        self.owner = owner
        self.needs_guard = False

    def detach(self, owner: object) -> None:
        """The mirror stops tracking writes: the next write clears the bit first."""
        if self.owner is owner:
            self.owner = None
            self.needs_guard = self.current is not None

    async def guard(self) -> None:
        """Before a write no mirror tracks: clear the bit on disk (the area goes stale)."""
        if not self.needs_guard or self.owner is not None:
            return
        async with self._ctx.lock:
            if not self.needs_guard:
                return
            await self._clear_bit()
            self.stale = "it was written while no mirror tracked it"

    async def disarm(self, owner: object) -> None:
        """The owner let writes through untracked: clear the bit now."""
        if self.owner is owner:
            self.owner = None
        if self.current is None:
            return
        async with self._ctx.lock:
            await self._clear_bit()
            self.stale = "it was written while no mirror tracked it"

    async def _clear_bit(self) -> None:
        header = self._ctx.header
        header.autoclear &= ~AUTOCLEAR_RESUME
        await self._ctx.file.write_header(header)
        await self._ctx.file.flush()
        self.current = None
        self.needs_guard = False
        named = self._ctx.node.bitmaps.get(RESUME_BITMAP)
        if named is not None and named.users:
            named.users -= 1

    # --- making and removing the area ---------------------------------------------------

    async def install(self, data: bytes, granularity: int, nonce: int, owner: object) -> None:
        """Write ``data`` into new clusters and make them the current area (replacing any
        old one, which is freed). The owner tracks writes from here on.

        Raises:
            BlockMirrorError: the image cannot hold it (not qcow2 v3, I/O error).
        """
        header, geometry = self._ctx.header, self._ctx.geometry
        if header.version != 3:
            raise BlockMirrorError("Cannot store a resume state in a qcow2 v2 image")
        cluster_size, cluster_bits = geometry.cluster_size, geometry.cluster_bits
        clusters = ceil_div(len(data), cluster_size)
        async with self._ctx.lock:
            allocator = self._allocator
            first = await allocator.allocate(clusters)
            allocator.metadata_clusters.update(range(first, first + clusters))
            table_clusters = ceil_div(clusters * 8, cluster_size)
            table_first = await allocator.allocate(table_clusters)
            allocator.metadata_clusters.update(range(table_first, table_first + table_clusters))
            offset, table_offset = first << cluster_bits, table_first << cluster_bits
            await self._ctx.file.ensure_size(allocator.end * cluster_size)
            # 1. the data and its table, then their refcounts, durable
            await self._ctx.file.write(offset, data + bytes(clusters * cluster_size - len(data)))
            table = [offset + i * cluster_size for i in range(clusters)]
            await self._ctx.file.write(table_offset, struct.pack(f">{clusters}Q", *table))
            await self._ctx.flush_metadata()
            await self._ctx.file.flush()
            # 2. one header write switches the directory, our extension and our bit
            ext = AreaExtension(offset, len(data), nonce)
            old = self._entry()
            entries = [e for e in self._bitmaps.entries if e.name != RESUME_BITMAP]
            entries.append(DirectoryEntry(RESUME_BITMAP, table_offset, clusters, FLAG_IN_USE,
                                          granularity.bit_length() - 1))
            self.owner = owner
            self.needs_guard = False
            await self._bitmaps.replace_entries(
                entries, before_header=lambda: _set_extension(header, ext))
            self.current, self.stale = ext, None
            # 3. the old area's clusters, now that nothing durable points at them
            if old is not None:
                await self._bitmaps.free_table(old)
            await self._ctx.flush_metadata()
            self._hold_bitmap(granularity)

    def _hold_bitmap(self, granularity: int) -> None:
        """The node shows the area's bitmap as QEMU would after a reopen: persistent,
        inconsistent, and (here) busy, so that it cannot be removed under the mirror."""
        bitmaps = self._ctx.node.bitmaps
        bitmaps.release(RESUME_BITMAP)
        named = bitmaps.create(RESUME_BITMAP, granularity, persistent=True)
        named.inconsistent = True
        named.bitmap.enabled = False
        named.users = 1

    async def remove(self) -> None:
        """Drop the area (current or stale): bit, extension, bitmap, clusters."""
        async with self._ctx.lock:
            header = self._ctx.header
            old = self._entry()
            if old is None and parse_extension(header) is None and not (
                    header.autoclear & AUTOCLEAR_RESUME):
                return
            entries = [e for e in self._bitmaps.entries if e.name != RESUME_BITMAP]
            await self._bitmaps.replace_entries(
                entries, before_header=lambda: _set_extension(header, None))
            self.current, self.stale, self.owner, self.needs_guard = None, None, None, False
            if old is not None:
                await self._bitmaps.free_table(old)
            await self._ctx.flush_metadata()
            self._ctx.node.bitmaps.release(RESUME_BITMAP)


__all__ = [
    "AUTOCLEAR_RESUME", "AUTOCLEAR_RESUME_BIT", "EXT_RESUME", "RESUME_BITMAP", "AreaExtension",
    "ResumeArea", "parse_extension",
]
