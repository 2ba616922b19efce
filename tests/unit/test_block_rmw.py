"""Concurrent unaligned writes on an O_DIRECT node: read-modify-write cycles must serialise
against every overlapping write, while aligned writes elsewhere still run in parallel."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from blockmirror.block.create import create_file
from blockmirror.block.graph import BlockGraph
from blockmirror.block.options import close_all, open_blockdev

MiB = 1024 * 1024


async def _open_direct(graph: BlockGraph, img: Path):  # type: ignore[no-untyped-def]
    # img lives in the direct_dir fixture's directory, which is known to allow O_DIRECT:
    # an error here is a real failure, not a reason to skip
    return await open_blockdev(graph, {
        "driver": "raw", "node-name": "r", "cache": {"direct": True},
        "file": {"driver": "file", "filename": str(img)},
    })


@pytest.mark.parametrize("seed", range(4))
def test_concurrent_unaligned_writes_sharing_sectors(direct_dir: Path, seed: int) -> None:
    img = direct_dir / f"d{seed}.img"
    asyncio.run(create_file(str(img), MiB))
    rng = random.Random(seed)
    # adjacent, non-overlapping pieces whose edges fall inside shared 512-byte sectors
    pieces: list[tuple[int, bytes]] = []
    off = 0
    while off < 256 * 1024:
        n = rng.randrange(1, 3000)
        pieces.append((off, bytes([rng.randrange(1, 256)]) * n))
        off += n + rng.choice([0, 0, 7])
    rng.shuffle(pieces)
    model = bytearray(MiB)
    for o, data in pieces:
        model[o : o + len(data)] = data

    async def main() -> bytes:
        graph = BlockGraph()
        try:
            node = await _open_direct(graph, img)
            await asyncio.gather(*(node.write(o, d) for o, d in pieces))
            return await node.read(0, MiB)
        finally:
            await close_all(graph)

    assert asyncio.run(main()) == bytes(model)
    assert img.read_bytes() == bytes(model)


def test_aligned_writes_run_concurrently(direct_dir: Path) -> None:
    img = direct_dir / "aligned.img"
    asyncio.run(create_file(str(img), 8 * MiB))

    async def main() -> int:
        graph = BlockGraph()
        try:
            node = await _open_direct(graph, img)
            drv = node.file.driver
            inner = drv.pwritev
            busy = peak = 0

            async def counting(offset, data, flags):  # type: ignore[no-untyped-def]
                nonlocal busy, peak
                busy += 1
                peak = max(peak, busy)
                try:
                    await inner(offset, data, flags)
                finally:
                    busy -= 1

            drv.pwritev = counting
            await asyncio.gather(*(node.write(i * MiB, bytes([i + 1]) * MiB) for i in range(8)))
            return peak
        finally:
            await close_all(graph)

    assert asyncio.run(main()) > 1
