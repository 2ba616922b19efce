"""Compressed cluster writes (cf. QEMU's qcow2_co_pwritev_compressed_part and its task,
qcow2_alloc_compressed_cluster_offset and qcow2_alloc_bytes).

A compressed write covers whole guest clusters (the image's last cluster may be partial: it
is padded with zeroes), each compressed on its own. A cluster whose deflate stream would not
be smaller than the cluster is written the normal way instead, as QEMU does. A compressed
stream gets a byte range from the refcount allocator (streams share host clusters, each
holding one reference per stream that touches it) and an L2 entry with bit 62 set, the
stream's host offset and its sector count, never the COPIED flag.

Compression cannot overwrite anything: a guest cluster that already has a host cluster (data,
a preallocated zero cluster or another compressed stream) fails the write with EIO, as in
QEMU; unallocated and plain zero clusters take it. As for normal writes, the data is written
before the L2 entry points at it: the allocation happens under the driver's lock, the stream
is written without it, and the entry is linked under the lock again.
"""

from __future__ import annotations

import asyncio
import errno

from blockmirror.block import threadio
from blockmirror.block.drivers.qcow2 import compress
from blockmirror.block.drivers.qcow2.cluster_map import ClusterMap
from blockmirror.block.drivers.qcow2.data_path import DataPath
from blockmirror.block.drivers.qcow2.image_context import ImageContext
from blockmirror.block.drivers.qcow2.layout import L2E_OFFSET_MASK
from blockmirror.block.drivers.qcow2.refcount_allocator import RefcountAllocator
from blockmirror.errors import BlockIOError


class CompressedWriter:
    def __init__(
        self,
        ctx: ImageContext,
        allocator: RefcountAllocator,
        cluster_map: ClusterMap,
        data_path: DataPath,
    ) -> None:
        self._ctx = ctx
        self._allocator = allocator
        self._map = cluster_map
        self._data = data_path

    async def write(self, offset: int, data: memoryview) -> None:
        """Write whole clusters compressed (see the module docstring).

        Raises:
            BlockIOError: EINVAL for a request that is not whole clusters, EIO for a cluster
                that is allocated already, or the I/O error of the image file.
        """
        cluster_size = self._ctx.geometry.cluster_size
        length = len(data)
        if length == 0:
            return
        if offset % cluster_size or (length % cluster_size
                                     and offset + length != self._ctx.header.size):
            raise BlockIOError(errno.EINVAL)
        clusters: list[bytes | memoryview] = []
        for pos in range(0, length, cluster_size):
            chunk = data[pos : pos + cluster_size]
            # the image's last cluster may be partial: compressed with zeroes after it
            clusters.append(chunk if len(chunk) == cluster_size
                            else bytes(chunk) + bytes(cluster_size - len(chunk)))
        # deflating is CPU work: off the event loop, one hand-off for the whole request
        kind = self._ctx.header.compression_type
        if len(clusters) == 1 and cluster_size <= 4096:
            streams = compress.compress_clusters(clusters, cluster_size, kind)
        else:
            streams = await threadio.run(compress.compress_clusters, clusters, cluster_size,
                                         kind)
        for i, stream in enumerate(streams):
            pos = i * cluster_size
            guest = offset + pos
            if stream is None:
                # does not compress: stored as a normal cluster (cf. the -ENOMEM fallback)
                await self._data.write(guest, data[pos : pos + cluster_size])
            else:
                await self._write_stream(guest, stream)

    async def _write_stream(self, guest_offset: int, stream: bytes) -> None:
        geometry = self._ctx.geometry
        cluster_bits = geometry.cluster_bits
        guest_cluster = guest_offset >> cluster_bits
        l1_index = guest_cluster >> geometry.l2_bits
        l2_index = guest_cluster & (geometry.l2_size - 1)
        allocations = self._data.allocations
        while True:
            async with self._ctx.lock:
                busy = self._data.allocation_in(guest_cluster, guest_cluster)
                if busy is None:
                    _l2_offset, table = await self._map.l2_for_write(l1_index)
                    if table[l2_index] & L2E_OFFSET_MASK:
                        # compression cannot overwrite anything (cf. the same check in QEMU)
                        raise BlockIOError(errno.EIO)
                    host = await self._allocator.allocate_bytes(len(stream))
                    entry = compress.make_entry(host, len(stream), cluster_bits)
                    token = self._ctx.file.register(
                        host >> cluster_bits, ((host + len(stream) - 1) >> cluster_bits) + 1)
                    done = asyncio.Event()
                    allocations[guest_cluster] = done
                    self._ctx.file.grow_ahead(self._allocator.end * geometry.cluster_size)
                    break
            await busy.wait()
        ok = False
        try:
            await self._ctx.file.write(host, stream)
            ok = True
        finally:
            self._ctx.file.release(token)
            try:
                async with self._ctx.lock:
                    if ok:
                        self._data.forget_compressed()
                        await self._map.link([(l1_index, l2_index, entry)])
                        await self._ctx.write_back()
                    else:
                        # nothing points at the stream: its references go at the next flush
                        self._allocator.free_entry_later(entry)
            finally:
                allocations.pop(guest_cluster, None)
                done.set()


__all__ = ["CompressedWriter"]
