"""block/copy.py: copying and zeroing lists of extents between nodes, batched.

Every path (host file to host file in one worker call, host file to a qcow2 node, and qcow2 to
qcow2 through ``read_many``/``write_many``) ends byte-identical to copying extent by extent;
errors name the side that failed; a node that must see each write (a dirty tracker) gets each
write; and the SEEK_DATA/SEEK_HOLE walk at a granularity reports mixed units as data.
"""

from __future__ import annotations

import asyncio
import errno
import os
import random
from pathlib import Path
from typing import Any

import pytest

from blockmirror.block import threadio
from blockmirror.block.copy import CopyError, copy_extents, map_data, zero_extents
from blockmirror.block.driver import BlockStatus
from blockmirror.block.drivers.qcow2.create import create_qcow2
from blockmirror.block.graph import BlockGraph
from blockmirror.block.node import BlockNode
from blockmirror.block.options import close_all, open_blockdev

MiB = 1 << 20
SIZE = 4 * MiB


def _sparse(path: Path, seed: int) -> bytes:
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(SIZE)
        for off in range(0, SIZE, 64 * 1024):
            if rng.random() < 0.5:
                f.seek(off)
                f.write(rng.randbytes(64 * 1024))
    return path.read_bytes()


async def _open(g: BlockGraph, name: str, path: Path, fmt: str) -> BlockNode:
    return await open_blockdev(g, {"driver": fmt, "node-name": name,
                                   "file": {"driver": "file", "filename": str(path)}})


def _extents(seed: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    out, pos = [], 0
    while pos < SIZE:
        n = rng.choice([4096, 65536, 131072])
        if rng.random() < 0.6:
            out.append((pos, min(n, SIZE - pos)))
        pos += n
    return out


@pytest.mark.parametrize(("src_fmt", "dst_fmt"), [("raw", "raw"), ("raw", "qcow2"),
                                                   ("qcow2", "qcow2"), ("qcow2", "raw")])
def test_copy_extents_equals_copying_one_by_one(tmp_path: Path, src_fmt: str,
                                                dst_fmt: str) -> None:
    raw_src = tmp_path / "src.raw"
    data = _sparse(raw_src, 1)

    async def main() -> None:
        g = BlockGraph()
        src_path = raw_src
        if src_fmt == "qcow2":
            src_path = tmp_path / "src.qcow2"
            await create_qcow2(str(src_path), SIZE)
            node = await _open(g, "tmp", src_path, "qcow2")
            await node.write(0, data)
            await close_all(g)
            g = BlockGraph()
        dst_path = tmp_path / f"dst.{dst_fmt}"
        if dst_fmt == "qcow2":
            await create_qcow2(str(dst_path), SIZE)
        else:
            dst_path.write_bytes(b"")
            os.truncate(dst_path, SIZE)
        src = await _open(g, "src", src_path, src_fmt)
        dst = await _open(g, "dst", dst_path, dst_fmt)
        await dst.write(0, b"\xee" * SIZE)  # stale content everywhere
        extents = _extents(2)
        await copy_extents(src, dst, extents)
        got = await dst.read(0, SIZE)
        expect = bytearray(b"\xee" * SIZE)
        for o, n in extents:
            expect[o : o + n] = data[o : o + n]
        assert got == bytes(expect)
        assert dst.in_flight == 0 and src.in_flight == 0
        await close_all(g)

    asyncio.run(main())


def test_errors_name_the_side(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _sparse(tmp_path / "s.raw", 3)
    (tmp_path / "d.raw").write_bytes(bytes(SIZE))

    async def main() -> None:
        g = BlockGraph()
        src = await _open(g, "src", tmp_path / "s.raw", "raw")
        dst = await _open(g, "dst", tmp_path / "d.raw", "raw")
        for side in (True, False):
            real = os.preadv if side else os.pwritev

            def broken(*a: Any, real: Any = real) -> int:
                raise OSError(errno.EIO, "boom")

            monkeypatch.setattr(os, "preadv" if side else "pwritev", broken)
            with pytest.raises(CopyError) as info:
                await copy_extents(src, dst, [(0, 65536), (131072, 65536)])
            assert info.value.is_read is side and info.value.errno == errno.EIO
            monkeypatch.setattr(os, "preadv" if side else "pwritev", real)
        await close_all(g)

    asyncio.run(main())


def test_a_node_that_tracks_writes_sees_each_of_them(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    _sparse(tmp_path / "s.raw", 4)
    (tmp_path / "d.raw").write_bytes(bytes(SIZE))
    calls: list[int] = []
    real = threadio.copy_batch_sync

    def spy(*a: Any) -> int:
        calls.append(1)
        return real(*a)

    monkeypatch.setattr(threadio, "copy_batch_sync", spy)

    class Tracker:
        def __init__(self) -> None:
            self.marked: list[tuple[int, int]] = []

        def mark(self, offset: int, length: int) -> None:
            self.marked.append((offset, length))

    async def main() -> None:
        g = BlockGraph()
        src = await _open(g, "src", tmp_path / "s.raw", "raw")
        dst = await _open(g, "dst", tmp_path / "d.raw", "raw")
        tracker = Tracker()
        dst.dirty_trackers.append(tracker)
        extents = [(0, 65536), (262144, 4096), (MiB, 131072)]
        await copy_extents(src, dst, extents)
        assert sorted(tracker.marked) == extents and calls == []
        dst.dirty_trackers.clear()
        await copy_extents(src, dst, extents)
        assert calls == [1]  # one worker call for all three
        await zero_extents(dst, extents, may_unmap=True)
        assert await dst.read(MiB, 131072) == bytes(131072)
        await close_all(g)

    asyncio.run(main())


def test_seek_walk_at_a_granularity(tmp_path: Path) -> None:
    path = tmp_path / "f.raw"
    g4, g64 = 4096, 65536
    with open(path, "wb") as f:
        f.truncate(1 * MiB)
        f.seek(0)
        f.write(b"x" * g4)  # unit 0: 4 KiB of data, then a hole: mixed
        f.seek(2 * g64)
        f.write(b"y" * (2 * g64 + g4))  # units 2-3 data, unit 4 mixed
    fd = os.open(path, os.O_RDONLY)
    try:
        fine = threadio.seek_walk_sync(fd, [(0, 8 * g64)])[0]
        coarse = threadio.seek_walk_sync(fd, [(0, 8 * g64)], g64)[0]
    finally:
        os.close(fd)
    assert fine[0] == (True, g4) and sum(n for _d, n in fine) == 8 * g64
    assert coarse == [(True, g64), (False, g64), (True, 3 * g64), (False, 3 * g64)]

    async def main() -> None:
        g = BlockGraph()
        node = await _open(g, "n", path, "raw")
        assert await map_data(node, [(0, 8 * g64)], g64) == [coarse]
        await close_all(g)

    asyncio.run(main())


def test_qcow2_data_runs_match_block_status(tmp_path: Path) -> None:
    """A qcow2 node without backing answers ``map_data`` from one L2 walk, run for run what
    ``block_status`` says: data, zero clusters and unallocated clusters."""
    path = tmp_path / "img.qcow2"
    rng = random.Random(5)
    size = 16 * MiB  # enough data that QEMU's metadata-preallocation heuristic stays off

    async def main() -> None:
        await create_qcow2(str(path), size)
        g = BlockGraph()
        node = await _open(g, "n", path, "qcow2")
        for cluster in range(size // 65536):
            r = rng.random()
            if r < 0.4:
                await node.write(cluster * 65536, rng.randbytes(65536))
            elif r < 0.6:
                await node.write_zeroes(cluster * 65536, 65536)
        await close_all(g)
        g = BlockGraph()  # as a mirror finds it: an image written before
        node = await _open(g, "n", path, "qcow2")
        ranges = [(0, size), (65536 * 3, 65536 * 5 + 4096), (size - 65536, 65536)]
        walked = await map_data(node, ranges)
        assert walked is not None
        for (offset, length), runs in zip(ranges, walked, strict=True):
            expect: list[tuple[bool, int]] = []
            pos = offset
            while pos < offset + length:
                ext = await node.block_status(pos, offset + length - pos)
                is_data = bool(ext.status & BlockStatus.DATA)
                if expect and expect[-1][0] == is_data:
                    expect[-1] = (is_data, expect[-1][1] + ext.length)
                else:
                    expect.append((is_data, ext.length))
                pos += ext.length
            assert runs == expect
        await close_all(g)

    asyncio.run(main())


def test_qcow2_zero_extents_in_one_pass(tmp_path: Path) -> None:
    """Whole-cluster zero extents on a qcow2 target go to the driver in one call and read
    back as zeroes; an unaligned one makes the batch fall back to one request each."""
    path = tmp_path / "img.qcow2"

    async def main() -> None:
        await create_qcow2(str(path), SIZE)
        g = BlockGraph()
        node = await _open(g, "n", path, "qcow2")
        await node.write(0, b"\xaa" * SIZE)
        calls: list[int] = []
        real = node.driver.zero_extents

        async def spy(extents: list[tuple[int, int]], flags: Any) -> bool:
            done = await real(extents, flags)
            calls.append(len(extents) if done else -len(extents))
            return done

        node.driver.zero_extents = spy  # type: ignore[method-assign]
        aligned = [(0, 65536), (3 * 65536, 2 * 65536), (SIZE - 65536, 65536)]
        await zero_extents(node, aligned, may_unmap=False)
        unaligned = [(10 * 65536, 65536), (20 * 65536 + 512, 4096)]
        await zero_extents(node, unaligned, may_unmap=False)
        assert calls == [3, -2]
        expect = bytearray(b"\xaa" * SIZE)
        for o, n in aligned + unaligned:
            expect[o : o + n] = bytes(n)
        assert await node.read(0, SIZE) == bytes(expect)
        await close_all(g)
        check = await asyncio.create_subprocess_exec(
            "qemu-img", "check", str(path), stdout=asyncio.subprocess.PIPE)
        out, _ = await check.communicate()
        assert check.returncode == 0, out

    asyncio.run(main())


def test_qcow2_to_qcow2_whole_clusters_move_file_to_file(tmp_path: Path) -> None:
    """Whole data clusters go from one qcow2 file to the other in one worker call (no
    Python buffers): the target allocates or reuses clusters, maps them after the data is
    written, and ends equal to copying one by one, with ``qemu-img check`` clean."""
    rng = random.Random(9)
    cluster = 65536
    size = 16 * MiB
    src_path, dst_path = tmp_path / "s.qcow2", tmp_path / "d.qcow2"
    data = bytearray(size)

    async def main() -> None:
        await create_qcow2(str(src_path), size)
        await create_qcow2(str(dst_path), size)
        g = BlockGraph()
        src = await _open(g, "src", src_path, "qcow2")
        dst = await _open(g, "dst", dst_path, "qcow2")
        for c in range(size // cluster):
            chunk = rng.randbytes(cluster)
            data[c * cluster : (c + 1) * cluster] = chunk
            await src.write(c * cluster, chunk)
            if c % 3 == 0:  # some target clusters exist already (written in place)
                await dst.write(c * cluster, b"\xee" * cluster)
        taken: list[bool] = []
        real = dst.driver.write_via

        async def spy(extents: Any, fill: Any) -> bool:
            taken.append(await real(extents, fill))
            return taken[-1]

        dst.driver.write_via = spy  # type: ignore[method-assign]
        extents = []
        pos = 0
        while pos < size:
            n = rng.choice([1, 2, 5]) * cluster
            if rng.random() < 0.6:
                extents.append((pos, min(n, size - pos)))
            pos += n
        before = await dst.read(0, size)
        await copy_extents(src, dst, extents)
        assert taken == [True]
        expect = bytearray(before)
        for o, n in extents:
            expect[o : o + n] = data[o : o + n]
        assert await dst.read(0, size) == bytes(expect)
        assert src.in_flight == 0 and dst.in_flight == 0
        await close_all(g)
        for path in (src_path, dst_path):
            check = await asyncio.create_subprocess_exec(
                "qemu-img", "check", str(path), stdout=asyncio.subprocess.PIPE)
            out, _ = await check.communicate()
            assert check.returncode == 0, out

    asyncio.run(main())


@pytest.mark.parametrize("direct, piece", [(False, 256 * 1024), (True, 1024 * 1024)])
def test_batched_copy_writes_the_page_cache_in_quarter_megabyte_pieces(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, direct: bool, piece: int) -> None:
    """copy_batch_sync moves a long extent in pieces: 256 KiB into a buffered target (1 MiB
    pieces cost several times the kernel time there, threadio._COPY_PIECE_BUFFERED), 1 MiB
    with O_DIRECT; the bytes arrive the same either way."""
    data = random.Random(5).randbytes(3 * 1024 * 1024 + 4096)
    (tmp_path / "s").write_bytes(data)
    (tmp_path / "d").write_bytes(bytes(len(data) + 8192))
    sizes: list[int] = []
    real = os.pwritev

    def spy(fd: int, buffers: Any, offset: int, *rest: Any) -> int:
        sizes.append(sum(len(b) for b in buffers))
        return real(fd, buffers, offset, *rest)

    monkeypatch.setattr(os, "pwritev", spy)
    src = os.open(tmp_path / "s", os.O_RDONLY)
    dst = os.open(tmp_path / "d", os.O_RDWR)
    try:
        assert threadio.copy_batch_sync(src, dst, [(0, 8192, len(data))], direct) == len(data)
    finally:
        os.close(src)
        os.close(dst)
    assert max(sizes) == piece and sum(sizes) == len(data)
    assert (tmp_path / "d").read_bytes()[8192:] == data
