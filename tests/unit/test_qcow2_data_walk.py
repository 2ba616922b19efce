"""The qcow2 data/hole walk a mirror plans with (``ClusterMap.data_runs``) on hostile
entries: a data cluster past the end of the file or not cluster-aligned is refused with the
error (and the corrupt flag) a read of it gets, not reported as data."""

from __future__ import annotations

import asyncio
import struct
from pathlib import Path

import pytest

from blockmirror.block.drivers.qcow2.create import create_qcow2
from blockmirror.block.graph import BlockGraph
from blockmirror.block.node import BlockNode
from blockmirror.block.options import close_all, open_blockdev
from blockmirror.errors import BlockIOError

CLUSTER = 65536
SIZE = 64 * CLUSTER


async def _open(g: BlockGraph, path: Path) -> BlockNode:
    return await open_blockdev(g, {"driver": "qcow2", "node-name": "n",
                                   "file": {"driver": "file", "filename": str(path)}})


def _l2_entry_offset(path: Path, guest_cluster: int) -> int:
    raw = path.read_bytes()
    l1_offset = struct.unpack(">Q", raw[40:48])[0]
    l1_entry = struct.unpack(">Q", raw[l1_offset : l1_offset + 8])[0]
    return (l1_entry & 0x00FFFFFFFFFFFE00) + 8 * guest_cluster


def _clear_corrupt_bit(path: Path) -> None:
    with open(path, "r+b") as f:
        f.seek(72)  # incompatible features; bit 1: corrupt
        features = struct.unpack(">Q", f.read(8))[0]
        f.seek(72)
        f.write(struct.pack(">Q", features & ~2))


@pytest.mark.parametrize("bad", ["past_end", "unaligned"])
def test_hostile_data_entry_is_refused_like_a_read(tmp_path: Path, bad: str) -> None:
    path = tmp_path / "img.qcow2"

    async def prepare() -> None:
        await create_qcow2(str(path), SIZE, cluster_size=CLUSTER)
        g = BlockGraph()
        node = await _open(g, path)
        for c in range(0, 64, 3):
            await node.write(c * CLUSTER, bytes([c + 1]) * CLUSTER)
        await close_all(g)

    asyncio.run(prepare())
    at = _l2_entry_offset(path, 9)
    with open(path, "r+b") as f:
        f.seek(at)
        entry = struct.unpack(">Q", f.read(8))[0]
        host = entry & 0x00FFFFFFFFFFFE00
        new_host = host + 1024 * CLUSTER if bad == "past_end" else host + 512
        f.seek(at)
        f.write(struct.pack(">Q", (entry & ~0x00FFFFFFFFFFFE00) | new_host))

    async def walk() -> tuple[str, str]:
        messages = []
        for probe in ("read", "walk"):
            g = BlockGraph()
            node = await _open(g, path)
            with pytest.raises(BlockIOError) as err:
                if probe == "read":
                    await node.read(0, SIZE)
                else:
                    # the walk itself: the driver may decline to use it on an image that
                    # looks preallocated (map_data then asks block status instead)
                    await node.driver.cluster_map.data_runs(0, SIZE)  # type: ignore[attr-defined]
            messages.append(str(err.value))
            assert node.corrupt
            await close_all(g)
            # the first probe marked the image corrupt on disk: undo it for the second
            _clear_corrupt_bit(path)
        return messages[0], messages[1]

    read_error, walk_error = asyncio.run(walk())
    assert walk_error == read_error
