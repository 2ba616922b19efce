"""Refcount blocks and L2 tables written in part: only the 4 KiB pieces holding changed
entries.

The allocator remembers which entries of a dirty refcount block changed and writes only the
pages that hold them (refcount_allocator.write_dirty_blocks); the L2 cache does the same for
the entries a write links (cluster_map.link, write_dirty_l2). These images make the blocks
span several pages, so that allocations cross page boundaries between flushes, across a
reopen (spans on blocks read back from disk), for three refcount widths; qemu-img check must
find every refcount right after every flush, and the data must read back as written.
"""

from __future__ import annotations

import asyncio
import random
import subprocess
from pathlib import Path

import pytest
from test_qcow2_support import assert_clean, close, open_qcow2, qemu_raw

from blockmirror.block.drivers.qcow2 import refcount_allocator
from blockmirror.block.drivers.qcow2.create import create_qcow2
from conftest import require_tool

pytestmark = pytest.mark.interop

MiB = 1 << 20


@pytest.mark.parametrize(("cluster_size", "bits"), [(65536, 64), (16384, 32), (8192, 16)])
def test_partly_written_refcount_blocks_stay_exact(tmp_path: Path, cluster_size: int,
                                                   bits: int,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    require_tool("qemu-img")
    entries_per_page = 4096 * 8 // bits
    # enough allocations to cross two page boundaries of the first refcount block
    clusters = 2 * entries_per_page + 300
    size = 2 * clusters * cluster_size
    path = tmp_path / "img.qcow2"
    asyncio.run(create_qcow2(str(path), size, cluster_size=cluster_size, refcount_bits=bits))
    encoded: list[int] = []
    real = refcount_allocator.encode_block

    def spy(values: list[int], order: int) -> bytes:
        encoded.append(len(values))
        return real(values, order)

    monkeypatch.setattr(refcount_allocator, "encode_block", spy)
    model = bytearray(size)
    rng = random.Random(bits)
    slots = rng.sample(range(size // cluster_size), clusters)

    async def write(chunk: list[int]) -> None:
        graph, node = await open_qcow2(path)
        try:
            for k, slot in enumerate(chunk):
                data = rng.randbytes(cluster_size // 2)
                off = slot * cluster_size + rng.randrange(0, cluster_size // 2, 512)
                await node.write(off, data)
                model[off:off + len(data)] = data
                if k % 37 == 36:
                    await node.flush()
                    # checked at every flush, not only at the end: a later flush rewriting
                    # the same page would hide an entry the earlier one left out
                    check = await asyncio.to_thread(
                        subprocess.run, ["qemu-img", "check", "-U", "-f", "qcow2", str(path)],
                        capture_output=True, text=True)
                    assert check.returncode == 0 and "ERROR" not in check.stdout, (
                        k, check.stdout + check.stderr)
        finally:
            await close(graph)

    half = len(slots) // 2
    asyncio.run(write(slots[:half]))
    asyncio.run(write(slots[half:]))  # reopened: spans on blocks read back from the file
    assert_clean(path)
    assert qemu_raw(path, tmp_path) == bytes(model)
    block_entries = cluster_size * 8 // bits
    # the partial path was taken: most encodes are one page's worth, not a whole block
    assert any(n < block_entries for n in encoded), encoded[:20]
