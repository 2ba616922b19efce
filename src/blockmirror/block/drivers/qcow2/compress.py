"""qcow2 compressed clusters: descriptor decoding and zlib (raw deflate) codec, sans-IO.

A compressed L2 entry packs the host byte offset of the stream and the number of 512-byte
sectors it spans. The header's compression type says what the stream is: raw deflate (no
zlib header; type 0, zlib) or one zstd frame (type 1), as ``qemu-img convert -c`` writes
them. ``compress_cluster`` makes the stream QEMU's compressed writes make (cf.
qcow2_zlib_compress: default level, a 4 KiB window, memory level 9; qcow2_zstd_compress: the
default level, one frame) and gives up, as QEMU does, when it would not fit in one byte less
than a cluster: such a cluster is stored uncompressed. A stream is read up to the cluster's
size and no further: the sector padding after it is not part of it.
"""

from __future__ import annotations

import io
import zlib
from typing import Any

SECTOR = 512
#: the header's compression types
ZLIB = 0
ZSTD = 1


def _zstd() -> Any:
    """The zstandard module, imported on first use (only zstd images need it)."""
    import zstandard

    return zstandard


def descriptor(entry: int, cluster_bits: int) -> tuple[int, int]:
    """(host offset, bytes to read) of a compressed L2 entry."""
    x = 62 - (cluster_bits - 8)
    offset = entry & ((1 << x) - 1)
    sectors = ((entry >> x) & ((1 << (cluster_bits - 8)) - 1)) + 1
    return offset, sectors * SECTOR - (offset & (SECTOR - 1))


def host_clusters(entry: int, cluster_bits: int) -> range:
    """The host clusters a compressed stream touches (each holds a reference for it)."""
    offset, nbytes = descriptor(entry, cluster_bits)
    return range(offset >> cluster_bits, ((offset + nbytes - 1) >> cluster_bits) + 1)


def decompress(data: bytes, cluster_size: int, kind: int = ZLIB) -> bytes | None:
    """Inflate one cluster; None when the stream is damaged or too short."""
    out: bytes
    if kind == ZSTD:
        zstd = _zstd()
        try:
            reader = zstd.ZstdDecompressor().stream_reader(io.BytesIO(data))
            out = reader.read(cluster_size)
        except zstd.ZstdError:
            return None
    else:
        try:
            d = zlib.decompressobj(-15)
            out = d.decompress(data, cluster_size)
        except zlib.error:
            return None
    if len(out) != cluster_size:
        return None
    return out


def compress(data: bytes | memoryview) -> bytes:
    c = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -12, 9)
    return c.compress(data) + c.flush()


def compress_cluster(data: bytes | memoryview, cluster_size: int,
                     kind: int = ZLIB) -> bytes | None:
    """The stream of one whole cluster, or None when it takes ``cluster_size`` bytes or more
    (QEMU's output buffer is one byte less than a cluster; a stream that does not fit
    means "write it uncompressed")."""
    out: bytes = _zstd().ZstdCompressor().compress(data) if kind == ZSTD else compress(data)
    return out if len(out) <= cluster_size - 1 else None


def compress_clusters(clusters: list[bytes | memoryview], cluster_size: int,
                      kind: int = ZLIB) -> list[bytes | None]:
    """``compress_cluster`` of each (one worker-thread call for a whole request)."""
    return [compress_cluster(c, cluster_size, kind) for c in clusters]


def make_entry(host_offset: int, nbytes: int, cluster_bits: int) -> int:
    """The L2 entry for a stream of ``nbytes`` at ``host_offset`` (bit 62 set)."""
    x = 62 - (cluster_bits - 8)
    end_sector = (host_offset + nbytes - 1) >> 9
    sectors = end_sector - (host_offset >> 9)  # additional sectors beyond the first
    return (1 << 62) | (sectors << x) | host_offset
