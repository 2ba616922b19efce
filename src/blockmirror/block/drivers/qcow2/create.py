"""qcow2 image creation (cf. qcow2_co_create), called by ``block/create.py``'s img_create.

The layout follows qemu-img's: header cluster, refcount table, refcount block(s), L1 table;
with preallocation, the L2 tables and then the data clusters follow, all referenced and
refcounted, so ``qemu-img check`` finds the new image clean. The layout is computed in memory
and written with a few large writes in a worker thread.
"""

from __future__ import annotations

import asyncio
import errno
import os
import struct

from blockmirror.block.drivers.qcow2.header import (
    COMPAT_LAZY_REFCOUNTS,
    EXT_BACKING_FORMAT,
    EXT_END,
    EXT_FEATURE_TABLE,
    INCOMPAT_COMPRESSION,
    MAX_BACKING_NAME,
    MAX_L1_BYTES,
    V2_HEADER_LEN,
    V3_HEADER_LEN,
    Header,
    encode_extension,
    encode_fixed,
    feature_table,
)
from blockmirror.block.drivers.qcow2.refcount import encode_block, entries_per_block
from blockmirror.errors import BlockMirrorError

_COPIED = 1 << 63
_PREALLOC_MODES = ("off", "metadata", "falloc", "full")


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _validate(
    size: int,
    cluster_size: int,
    version: str,
    refcount_bits: int,
    preallocation: str,
    lazy_refcounts: bool,
    backing_file: str | None,
    extended_l2: bool,
    compression_type: str,
    data_file: str | None,
) -> tuple[int, int]:
    """QEMU's checks, in QEMU's order; returns (qcow2 version number, refcount_order)."""
    if version in ("v3", "1.1"):
        ver = 3
    elif version in ("v2", "0.10"):
        ver = 2
    else:
        raise BlockMirrorError(f"Parameter 'version' does not accept value '{version}'")
    if (
        cluster_size < 512
        or cluster_size > 2 * 1024 * 1024
        or cluster_size & (cluster_size - 1)
    ):
        raise BlockMirrorError("Cluster size must be a power of two between 512 and 2048k")
    if preallocation not in _PREALLOC_MODES:
        raise BlockMirrorError(
            f"Parameter 'preallocation' does not accept value '{preallocation}'"
        )
    if compression_type not in ("zlib", "zstd"):
        raise BlockMirrorError(
            f"Parameter 'compression-type' does not accept value '{compression_type}'"
        )
    if lazy_refcounts and ver < 3:
        raise BlockMirrorError(
            "Lazy refcounts only supported with compatibility level 1.1 and above "
            "(use version=v3 or greater)"
        )
    if refcount_bits > 64 or refcount_bits < 1 or refcount_bits & (refcount_bits - 1):
        raise BlockMirrorError(
            "Refcount width must be a power of two and may not exceed 64 bits"
        )
    if ver < 3 and refcount_bits != 16:
        raise BlockMirrorError(
            "Different refcount widths than 16 bits require compatibility level 1.1 or "
            "above (use version=v3 or greater)"
        )
    if backing_file and preallocation != "off" and not extended_l2:
        raise BlockMirrorError(
            "Backing file and preallocation can only be used at the same time if "
            "extended_l2 is on"
        )
    if extended_l2:
        raise BlockMirrorError("Extended L2 entries are not supported by this qcow2 driver")
    if compression_type != "zlib" and ver < 3:
        raise BlockMirrorError(
            "Non-zlib compression type is only supported with compatibility level 1.1 and "
            "above (use version=v3 or greater)"
        )
    if data_file:
        raise BlockMirrorError("External data files are not supported by this qcow2 driver")
    if backing_file is not None and len(backing_file.encode()) > MAX_BACKING_NAME:
        raise BlockMirrorError(
            f"Could not assign backing file '{backing_file}': File name too long"
        )
    cluster_bits = cluster_size.bit_length() - 1
    l1_entries = _ceil_div(size, cluster_size << (cluster_bits - 3))
    if size >= 1 << 61 or l1_entries * 8 > MAX_L1_BYTES:
        raise BlockMirrorError(
            "The image size is too large for file format 'qcow2' (try using a larger "
            "cluster size)"
        )
    return ver, refcount_bits.bit_length() - 1


def build_image(
    size: int,
    *,
    cluster_size: int = 65536,
    version: int = 3,
    refcount_order: int = 4,
    backing_file: str | None = None,
    backing_fmt: str | None = None,
    lazy_refcounts: bool = False,
    preallocate: bool = False,
    compression_type: int = 0,
) -> tuple[list[tuple[int, bytes]], int]:
    """The metadata writes of a new image and its final file length (sans-IO)."""
    cluster_bits = cluster_size.bit_length() - 1
    l2_entries = cluster_size // 8
    l1_size = _ceil_div(size, cluster_size * l2_entries)
    data_clusters = _ceil_div(size, cluster_size) if preallocate else 0
    l2_tables = _ceil_div(data_clusters, l2_entries)
    l1_clusters = _ceil_div(l1_size * 8, cluster_size)
    refcount_block_size = entries_per_block(cluster_bits, refcount_order)
    table_clusters, block_count = 1, 1
    while True:
        total = 1 + table_clusters + block_count + l1_clusters + l2_tables + data_clusters
        new_block_count = _ceil_div(total, refcount_block_size)
        new_table_clusters = _ceil_div(new_block_count * 8, cluster_size)
        if (new_table_clusters, new_block_count) == (table_clusters, block_count):
            break
        table_clusters = max(table_clusters, new_table_clusters)
        block_count = max(block_count, new_block_count)
    reftable_offset = cluster_size
    first_refcount_block = 1 + table_clusters
    first_l1_cluster = first_refcount_block + block_count
    first_l2_cluster = first_l1_cluster + l1_clusters
    first_data_cluster = first_l2_cluster + l2_tables

    header = Header(
        version=version,
        backing_file_offset=0,
        backing_file_size=0,
        cluster_bits=cluster_bits,
        size=size,
        crypt_method=0,
        l1_size=l1_size,
        l1_table_offset=(first_l1_cluster * cluster_size) if l1_size else 0,
        refcount_table_offset=reftable_offset,
        refcount_table_clusters=table_clusters,
        nb_snapshots=0,
        snapshots_offset=0,
        refcount_order=refcount_order,
        header_length=V3_HEADER_LEN if version == 3 else V2_HEADER_LEN,
    )
    if lazy_refcounts:
        header.compatible |= COMPAT_LAZY_REFCOUNTS
    if compression_type:
        header.compression_type = compression_type
        header.incompatible |= INCOMPAT_COMPRESSION
    exts = b""
    if backing_fmt:
        exts += encode_extension(EXT_BACKING_FORMAT, backing_fmt.encode())
    if version == 3 and cluster_size > 4096:
        # qemu-img adds the feature name table only where it leaves room in the header cluster
        exts += encode_extension(EXT_FEATURE_TABLE, feature_table())
    exts += struct.pack(">II", EXT_END, 0)
    name = backing_file.encode() if backing_file else b""
    if name:
        header.backing_file_offset = header.header_length + len(exts)
        header.backing_file_size = len(name)
        if header.backing_file_offset + len(name) > cluster_size:
            raise BlockMirrorError(
                f"Could not assign backing file '{backing_file}': File name too long"
            )
    first_cluster = encode_fixed(header) + exts + name

    writes: list[tuple[int, bytes]] = [(0, first_cluster)]
    reftable = [(first_refcount_block + k) * cluster_size for k in range(block_count)]
    writes.append((reftable_offset, struct.pack(f">{len(reftable)}Q", *reftable)))
    total = 1 + table_clusters + block_count + l1_clusters + l2_tables + data_clusters
    for k in range(block_count):
        lo = k * refcount_block_size
        n = max(0, min(refcount_block_size, total - lo))
        block = [1] * n + [0] * (refcount_block_size - n)
        raw = encode_block(block, refcount_order)
        # only the used prefix matters: the rest of a fresh file reads as zeroes
        used = _ceil_div(n << refcount_order, 8)
        writes.append(((first_refcount_block + k) * cluster_size, raw[:used]))
    if l1_size:
        l1 = [0] * l1_size
        for i in range(l2_tables):
            l1[i] = ((first_l2_cluster + i) * cluster_size) | _COPIED
        writes.append((first_l1_cluster * cluster_size, struct.pack(f">{l1_size}Q", *l1)))
    for i in range(l2_tables):
        first = i * l2_entries
        n = min(l2_entries, data_clusters - first)
        entries = [((first_data_cluster + first + j) * cluster_size) | _COPIED for j in range(n)]
        entries += [0] * (l2_entries - n)
        writes.append(
            ((first_l2_cluster + i) * cluster_size, struct.pack(f">{l2_entries}Q", *entries))
        )
    written_end = max(off + len(data) for off, data in writes)
    end = (first_data_cluster + data_clusters) * cluster_size if preallocate else written_end
    return writes, end


def _write_image(
    filename: str, writes: list[tuple[int, bytes]], end: int, preallocation: str, data_start: int
) -> None:
    try:
        fd = os.open(filename, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise BlockMirrorError(
            f"Could not create '{filename}': {os.strerror(e.errno or errno.EIO)}"
        ) from e
    try:
        if preallocation == "falloc" and end > data_start:
            os.posix_fallocate(fd, data_start, end - data_start)
        elif preallocation == "full" and end > data_start:
            step = 1 << 20
            zeroes = bytes(step)
            pos = data_start
            while pos < end:
                n = min(step, end - pos)
                os.pwrite(fd, zeroes[:n], pos)
                pos += n
        for off, data in writes:
            os.pwrite(fd, data, off)
        os.ftruncate(fd, end)
        os.fsync(fd)
    except OSError as e:
        raise BlockMirrorError(
            f"Could not write qcow2 image '{filename}': {os.strerror(e.errno or errno.EIO)}"
        ) from e
    finally:
        os.close(fd)


async def create_qcow2(
    filename: str,
    size: int,
    *,
    cluster_size: int = 65536,
    backing_file: str | None = None,
    backing_fmt: str | None = None,
    version: str | None = None,
    compat: str | None = None,
    refcount_bits: int = 16,
    preallocation: str = "off",
    lazy_refcounts: bool = False,
    extended_l2: bool = False,
    compression_type: str = "zlib",
    data_file: str | None = None,
    data_file_raw: bool = False,
    nocow: bool = False,
) -> None:
    """Create a qcow2 image file (``version``/``compat``: "v3"/"1.1" or "v2"/"0.10").

    Raises:
        BlockMirrorError: QEMU's texts for invalid options; the file is not created then.
    """
    ver, order = _validate(
        size, cluster_size, version or compat or "v3", refcount_bits, preallocation,
        lazy_refcounts, backing_file, extended_l2, compression_type, data_file,
    )
    size = _ceil_div(size, 512) * 512
    writes, end = build_image(
        size,
        cluster_size=cluster_size,
        version=ver,
        refcount_order=order,
        backing_file=backing_file,
        backing_fmt=backing_fmt,
        lazy_refcounts=lazy_refcounts,
        preallocate=preallocation != "off",
        compression_type=1 if compression_type == "zstd" else 0,
    )
    data_start = max(off + len(data) for off, data in writes)
    data_start = _ceil_div(data_start, cluster_size) * cluster_size
    await asyncio.to_thread(_write_image, filename, writes, end, preallocation, data_start)
