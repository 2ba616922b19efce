"""Consistency checks and repair (cf. QEMU's qcow2_check_refcounts and its repair).

``check_metadata_layout`` refuses, before any write, an image whose metadata overlaps or
points outside the file; ``rebuild_refcounts`` recounts every reference and lays out a fresh
refcount structure after the end of the image (the automatic repair of a dirty image on
read-write open); ``metadata_preallocated`` recognises images whose clusters were preallocated
over holes of the host file.
"""

from __future__ import annotations

import struct

from blockmirror.block.drivers.qcow2 import compress
from blockmirror.block.drivers.qcow2.header import Header
from blockmirror.block.drivers.qcow2.image_file import ImageFile
from blockmirror.block.drivers.qcow2.layout import (
    COMPRESSED,
    L1E_OFFSET_MASK,
    L2E_OFFSET_MASK,
    NORMAL,
    REFT_OFFSET_MASK,
    ZERO_ALLOC,
    Geometry,
    ceil_div,
    cluster_type,
)
from blockmirror.block.drivers.qcow2.refcount import encode_block
from blockmirror.block.drivers.qcow2.refcount_allocator import RefcountAllocator
from blockmirror.block.drivers.qcow2.snapshots import SnapshotTable
from blockmirror.errors import ImageFormatError


def check_metadata_layout(
    geometry: Geometry,
    header: Header,
    file_length: int,
    l1: list[int],
    refcount_table: list[int],
    snapshots: SnapshotTable,
) -> set[int]:
    """The host clusters holding metadata; refuses overlapping or out-of-file metadata."""
    cluster_size = geometry.cluster_size
    owners: dict[int, str] = {}

    def claim(offset: int, length: int, what: str) -> None:
        for cluster in geometry.clusters(offset, length):
            previous = owners.get(cluster)
            if previous is not None:
                raise ImageFormatError(
                    f"Overlapping metadata: {what} at {offset:#x} overlaps {previous}"
                )
            owners[cluster] = what

    claim(0, cluster_size, "qcow2 header")
    claim(
        header.refcount_table_offset,
        header.refcount_table_clusters * cluster_size,
        "refcount table",
    )
    if header.l1_size:
        claim(header.l1_table_offset, header.l1_size * 8, "active L1 table")
    if header.nb_snapshots:
        claim(header.snapshots_offset, snapshots.length, "snapshot table")
        for offset, entries in snapshots.l1_tables:
            if entries:
                claim(offset, entries * 8, "snapshot L1 table")
    for index, entry in enumerate(refcount_table):
        offset = entry & REFT_OFFSET_MASK
        if not offset:
            continue
        if offset % cluster_size or offset + cluster_size > file_length:
            raise ImageFormatError(
                f"Refcount block offset {offset:#x} invalid (reftable index {index:#x})"
            )
        claim(offset, cluster_size, "refcount block")
    for index, entry in enumerate(l1):
        offset = entry & L1E_OFFSET_MASK
        if not offset:
            continue
        if offset % cluster_size:
            raise ImageFormatError(
                f"L2 table offset {offset:#x} unaligned (L1 index: {index:#x})"
            )
        if offset + cluster_size > file_length:
            raise ImageFormatError(
                f"L2 table offset {offset:#x} past the end of the image file "
                f"(L1 index: {index:#x})"
            )
        claim(offset, cluster_size, "active L2 table")
    return set(owners)


async def collect_references(
    geometry: Geometry,
    header: Header,
    image_file: ImageFile,
    l1: list[int],
    snapshots: SnapshotTable,
    other_ranges: list[tuple[int, int]],
) -> dict[int, int]:
    """Count every reference to every host cluster (cf. qemu-img check's walk);
    ``other_ranges`` are further (offset, length) references (the bitmaps extension)."""
    cluster_size = geometry.cluster_size
    references: dict[int, int] = {}
    limit = ceil_div(image_file.length, cluster_size)

    def add(offset: int, length: int) -> None:
        for cluster in geometry.clusters(offset, length):
            if cluster >= limit:
                # a repair would have to lay out refcounts far past the file: refuse
                raise ImageFormatError(
                    f"Cannot repair the dirty image: a reference to {offset:#x} points "
                    "past the end of the image file"
                )
            references[cluster] = references.get(cluster, 0) + 1

    add(0, cluster_size)
    if header.nb_snapshots:
        add(header.snapshots_offset, snapshots.length)
    l1_tables: list[list[int]] = [l1]
    if header.l1_size:
        add(header.l1_table_offset, header.l1_size * 8)
    for offset, entries in snapshots.l1_tables:
        if entries:
            add(offset, entries * 8)
            raw = await image_file.read(offset, entries * 8)
            l1_tables.append(list(struct.unpack(f">{entries}Q", raw)))
    for table in l1_tables:
        for l1_entry in table:
            l2_offset = l1_entry & L1E_OFFSET_MASK
            if not l2_offset:
                continue
            add(l2_offset, cluster_size)
            raw = await image_file.read(l2_offset, cluster_size)
            for entry in struct.unpack(f">{geometry.l2_size}Q", raw):
                kind = cluster_type(entry, header.version)
                if kind in (NORMAL, ZERO_ALLOC):
                    add(entry & L2E_OFFSET_MASK, cluster_size)
                elif kind == COMPRESSED:
                    add(*compress.descriptor(entry, geometry.cluster_bits))
    for offset, length in other_ranges:
        add(offset, length)
    return references


async def rebuild_refcounts(
    geometry: Geometry,
    header: Header,
    image_file: ImageFile,
    allocator: RefcountAllocator,
    references: dict[int, int],
) -> None:
    """Lay out a fresh refcount table and blocks after the end of the image, holding
    ``references``, and point the header and the allocator at them."""
    cluster_size, block_size = geometry.cluster_size, geometry.refcount_block_size
    block_bits = geometry.refcount_block_bits
    area = max(allocator.end, max(references, default=0) + 1)
    table_clusters = block_count = 0
    while True:
        end = area + table_clusters + block_count
        top = max(max(references, default=0), end - 1)
        new_table_clusters = ceil_div(((top >> block_bits) + 1) * 8, cluster_size)
        used_blocks = {c >> block_bits for c in references} | {
            c >> block_bits for c in range(area, area + new_table_clusters + block_count)
        }
        if (new_table_clusters, len(used_blocks)) == (table_clusters, block_count):
            break
        table_clusters, block_count = new_table_clusters, len(used_blocks)
    for cluster in range(area, area + block_count + table_clusters):
        references[cluster] = references.get(cluster, 0) + 1
    table = [0] * (table_clusters * cluster_size // 8)
    blocks: dict[int, list[int]] = {}
    for k, index in enumerate(sorted({c >> block_bits for c in references})):
        table[index] = (area + k) << geometry.cluster_bits
        blocks[index] = [0] * block_size
    for cluster, count in references.items():
        if count > geometry.refcount_max:
            raise ImageFormatError("reference count overflow on repair")
        blocks[cluster >> block_bits][cluster & (block_size - 1)] = count
    await image_file.ensure_size((area + block_count + table_clusters) * cluster_size)
    for index, block in blocks.items():
        await image_file.write(table[index], encode_block(block, header.refcount_order))
    table_offset = (area + block_count) << geometry.cluster_bits
    await image_file.write(table_offset, struct.pack(f">{len(table)}Q", *table))
    await image_file.flush()
    header.refcount_table_offset = table_offset
    header.refcount_table_clusters = table_clusters
    allocator.replace_table(table, area + block_count + table_clusters)


async def metadata_preallocated(
    geometry: Geometry, image_file: ImageFile, allocator: RefcountAllocator, real_bytes: int
) -> bool:
    """cf. qcow2_detect_metadata_preallocation: far more clusters in use than the host file
    really allocates means clusters were preallocated over holes."""
    real_clusters = real_bytes // geometry.cluster_size
    threshold = max(real_clusters * 10 // 9, real_clusters + 2)
    end = ceil_div(image_file.node.length(), geometry.cluster_size)
    return await allocator.used_clusters_exceed(end, threshold)
