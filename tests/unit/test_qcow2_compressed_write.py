"""qcow2 compressed cluster writes in process: packing of the streams into shared host
clusters with their references counted right (against a walk of the L2 tables), the
uncompressed fallback, QEMU's refusals (EINVAL, EIO), the partial last cluster, reads back
before and after a reopen, and which nodes take compressed writes at all."""

from __future__ import annotations

import asyncio
import errno
import random
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from blockmirror.block import io
from blockmirror.block.create import create_file, img_create
from blockmirror.block.drivers.qcow2 import compress
from blockmirror.block.drivers.qcow2.check import collect_references
from blockmirror.block.drivers.qcow2.driver import Qcow2Driver
from blockmirror.block.drivers.qcow2.layout import (
    COMPRESSED,
    NORMAL,
    OFLAG_COPIED,
    REFT_OFFSET_MASK,
)
from blockmirror.block.graph import BlockGraph
from blockmirror.block.node import BlockNode
from blockmirror.block.options import close_all, open_blockdev
from blockmirror.errors import BlockIOError

CS = 4096  # small clusters: many streams share each host cluster


def _compressible(seed: int, n: int = CS) -> bytes:
    """Text-like data of varying redundancy: streams of many different lengths."""
    rng = random.Random(seed)
    words = [bytes(rng.choice(b"abcdefghij") for _ in range(rng.randint(2, 9)))
             for _ in range(rng.randint(4, 60))]
    out = bytearray()
    while len(out) < n:
        out += rng.choice(words) + b" "
    return bytes(out[:n])


async def _qcow2(path: Path, size: int, body: Callable[[BlockNode], Awaitable[None]],
                 compression: str = "zlib") -> None:
    if not path.exists():  # noqa: ASYNC240 (a test's own temporary file)
        await img_create(str(path), "qcow2", size, quiet=True, options={
            "cluster_size": CS, "compression_type": compression})
    graph = BlockGraph()
    try:
        node = await open_blockdev(graph, {"driver": "qcow2", "node-name": "q",
                                           "file": {"driver": "file", "filename": str(path)}})
        await body(node)
    finally:
        await close_all(graph)


async def _refcounts_match(node: BlockNode) -> dict[int, int]:
    """Flush, then compare every refcount with the references the tables hold."""
    await node.flush()
    drv = node.driver
    assert isinstance(drv, Qcow2Driver)
    g, header = drv.geometry, drv.header
    # the walk counts what the tables reference; the refcount structures count themselves
    own = [(header.refcount_table_offset, header.refcount_table_clusters * g.cluster_size)]
    own += [(e & REFT_OFFSET_MASK, g.cluster_size) for e in drv.allocator.table
            if e & REFT_OFFSET_MASK]
    refs = await collect_references(g, header, drv.image_file, drv.cluster_map.l1,
                                    drv.snapshots, own)
    end = max(drv.allocator.end, max(refs) + 1)
    counts = {c: await drv.allocator.refcount(c) for c in range(end)}
    assert {c: n for c, n in counts.items() if n} == refs
    return refs


async def _entry(node: BlockNode, guest_offset: int) -> int:
    drv = node.driver
    assert isinstance(drv, Qcow2Driver)
    return await drv.cluster_map.entry(guest_offset // CS)


@pytest.mark.parametrize("compression", ["zlib", "zstd"])
def test_streams_pack_into_shared_clusters_with_right_refcounts(
        tmp_path: Path, compression: str) -> None:
    clusters = [_compressible(i) for i in range(64)]
    kind = compress.ZSTD if compression == "zstd" else compress.ZLIB

    async def write(node: BlockNode) -> None:
        for i, data in enumerate(clusters):
            await node.write_compressed(i * CS, data)
        spans = []
        for i in range(64):
            entry = await _entry(node, i * CS)
            drv = node.driver
            assert isinstance(drv, Qcow2Driver)
            assert drv.cluster_map.cluster_type(entry) == COMPRESSED
            assert not entry & OFLAG_COPIED  # compressed clusters never have it
            spans.append(list(compress.host_clusters(entry, 12)))
            # the stream is the image's kind (zstd frames start with their magic)
            host, nbytes = compress.descriptor(entry, 12)
            raw = await drv.image_file.read(host, nbytes)
            assert (raw[:4] == b"\x28\xb5\x2f\xfd") == (kind == compress.ZSTD)
            assert compress.decompress(raw, CS, kind) == clusters[i]
        # packed: far fewer host clusters than guest clusters, some streams run on into
        # the next host cluster, and such a cluster is referenced by several streams
        used = {c for s in spans for c in s}
        assert len(used) < 40, len(used)
        assert any(len(s) == 2 for s in spans)
        refs = await _refcounts_match(node)
        assert max(refs[c] for c in used) > 2
        for i, data in enumerate(clusters):
            assert await node.read(i * CS, CS) == data

    async def reread(node: BlockNode) -> None:
        for i, data in enumerate(clusters):
            assert await node.read(i * CS, CS) == data
        await _refcounts_match(node)

    path = tmp_path / "c.qcow2"
    asyncio.run(_qcow2(path, 1 << 20, write, compression))
    asyncio.run(_qcow2(path, 1 << 20, reread))


def test_incompressible_cluster_is_stored_as_is_and_a_request_spans_clusters(
        tmp_path: Path) -> None:
    noise = random.Random(3).randbytes(CS)
    assert compress.compress_cluster(noise, CS) is None  # QEMU's fallback case

    async def body(node: BlockNode) -> None:
        data = _compressible(1) + noise + _compressible(2)
        await node.write_compressed(0, data)  # three clusters in one request
        kinds = []
        drv = node.driver
        assert isinstance(drv, Qcow2Driver)
        for i in range(3):
            kinds.append(drv.cluster_map.cluster_type(await _entry(node, i * CS)))
        assert kinds == [COMPRESSED, NORMAL, COMPRESSED]
        assert await node.read(0, 3 * CS) == data
        await _refcounts_match(node)

    asyncio.run(_qcow2(tmp_path / "n.qcow2", 1 << 20, body))


def test_refusals_as_qemu(tmp_path: Path) -> None:
    async def body(node: BlockNode) -> None:
        data = _compressible(5)
        for offset, buf in ((512, data), (0, data[:1024]), (CS, data + data[:512])):
            with pytest.raises(BlockIOError) as e:
                await node.write_compressed(offset, buf)
            assert e.value.errno == errno.EINVAL
        await node.write(8 * CS, b"x" * CS)           # a data cluster
        await node.write_compressed(9 * CS, data)     # a compressed one
        await node.write_zeroes(10 * CS, CS)          # a plain zero cluster (no host)
        for taken in (8, 9):
            with pytest.raises(BlockIOError) as e:
                await node.write_compressed(taken * CS, _compressible(6))
            assert e.value.errno == errno.EIO
        await node.write_compressed(10 * CS, data)    # takes it
        assert await node.read(8 * CS, 3 * CS) == b"x" * CS + data + data
        await _refcounts_match(node)

    asyncio.run(_qcow2(tmp_path / "r.qcow2", 1 << 20, body))


def test_partial_last_cluster_is_padded(tmp_path: Path) -> None:
    size = 8 * CS + 1536

    async def body(node: BlockNode) -> None:
        tail = _compressible(7, 1536)
        await node.write_compressed(8 * CS, tail)
        assert await node.read(8 * CS, 1536) == tail
        await _refcounts_match(node)

    asyncio.run(_qcow2(tmp_path / "p.qcow2", size, body))


def test_overwritten_streams_release_their_clusters(tmp_path: Path) -> None:
    async def body(node: BlockNode) -> None:
        for i in range(6):
            await node.write_compressed(i * CS, _compressible(20 + i))
        # overwriting compressed clusters drops their streams' references
        for i in range(6):
            await node.write(i * CS, bytes([i + 1]) * CS)
        await _refcounts_match(node)
        drv = node.driver
        assert isinstance(drv, Qcow2Driver)
        # the tail the last stream left was in a cluster freed now: not reused
        assert drv.allocator.free_byte_offset == 0
        for i in range(6, 12):
            await node.write_compressed(i * CS, _compressible(30 + i))
        await _refcounts_match(node)
        for i in range(6):
            assert await node.read(i * CS, CS) == bytes([i + 1]) * CS
        for i in range(6, 12):
            assert await node.read(i * CS, CS) == _compressible(30 + i)

    asyncio.run(_qcow2(tmp_path / "o.qcow2", 1 << 20, body))


def test_which_nodes_take_compressed_writes(tmp_path: Path) -> None:
    async def main() -> None:
        await img_create(str(tmp_path / "a.qcow2"), "qcow2", 1 << 20, quiet=True)
        await create_file(str(tmp_path / "b.raw"), 1 << 20)
        graph = BlockGraph()
        try:
            def add(opts: dict[str, Any]) -> Awaitable[BlockNode]:
                return open_blockdev(graph, opts)
            qf = await add({"driver": "file", "node-name": "qf",
                            "filename": str(tmp_path / "a.qcow2")})
            q = await add({"driver": "qcow2", "node-name": "q", "file": "qf"})
            raw = await add({"driver": "raw", "node-name": "r", "file": {
                "driver": "file", "filename": str(tmp_path / "b.raw")}})
            null = await add({"driver": "null-co", "node-name": "n", "size": 1 << 20})
            dbg = await add({"driver": "blkdebug", "node-name": "d", "image": "q"})
            assert [io.supports_compressed_writes(n) for n in (q, qf, raw, null, dbg)] == [
                True, False, False, False, False]
            with pytest.raises(BlockIOError) as e:
                await raw.write_compressed(0, bytes(65536))
            assert e.value.errno == errno.ENOTSUP
        finally:
            await close_all(graph)

    asyncio.run(main())


def test_a_new_stream_with_a_freed_streams_descriptor_reads_its_own_data(
        tmp_path: Path) -> None:
    async def body(node: BlockNode) -> None:
        first, second = b"A" * CS, b"B" * CS  # same stream length
        assert len(compress.compress(first)) == len(compress.compress(second))
        await node.write_compressed(0, first)
        old = await _entry(node, 0)
        assert await node.read(0, CS) == first
        await node.write(0, b"x" * CS)  # frees the stream's cluster at the flush
        await node.flush()
        await node.write_compressed(CS, second)
        # the same host bytes and length: the same descriptor, other data
        assert await _entry(node, CS) == old
        assert await node.read(CS, CS) == second

    asyncio.run(_qcow2(tmp_path / "d.qcow2", 1 << 20, body))
