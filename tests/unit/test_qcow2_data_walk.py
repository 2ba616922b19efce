"""The qcow2 data/hole walk a mirror plans with (``ClusterMap.data_runs``) on hostile
entries: a data cluster past the end of the file or not cluster-aligned is refused with the
error (and the corrupt flag) a read of it gets, not reported as data."""

from __future__ import annotations

import asyncio
import json
import random
import struct
import subprocess
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


def _qemu_img_hosts(path: Path) -> dict[int, int]:
    """guest cluster -> host offset, from ``qemu-img map``."""
    out = subprocess.run(["qemu-img", "map", "--output=json", "-f", "qcow2", str(path)],
                         capture_output=True, text=True, check=True).stdout
    hosts: dict[int, int] = {}
    for e in json.loads(out):
        if e["data"] and "offset" in e:
            for k in range(e["length"] // CLUSTER):
                hosts[e["start"] // CLUSTER + k] = e["offset"] + k * CLUSTER
    return hosts


def test_host_runs_match_qemu_img_map_on_scattered_and_consecutive_clusters(
        tmp_path: Path) -> None:
    """``ClusterMap.host_runs`` (the file-to-file copy's map) gives each extent's host runs,
    merged where consecutive, as qemu-img map places them: clusters 0-15 written in order
    (one host run), 16-47 written in a shuffled order (scattered), 48-63 left unallocated
    (None: read those instead)."""
    path = tmp_path / "img.qcow2"
    order = list(range(16, 48))
    random.Random(3).shuffle(order)

    async def prepare() -> None:
        await create_qcow2(str(path), SIZE, cluster_size=CLUSTER)
        g = BlockGraph()
        node = await _open(g, path)
        await node.write(0, b"\x01" * (16 * CLUSTER))
        for c in order:
            await node.write(c * CLUSTER, bytes([c]) * CLUSTER)
        await close_all(g)

    asyncio.run(prepare())
    hosts = _qemu_img_hosts(path)

    def expected(offset: int, length: int) -> list[tuple[int, int]]:
        runs: list[tuple[int, int]] = []
        pos = offset
        while pos < offset + length:
            n = min(CLUSTER - pos % CLUSTER, offset + length - pos)
            host = hosts[pos // CLUSTER] + pos % CLUSTER
            if runs and runs[-1][0] + runs[-1][1] == host:
                runs[-1] = (runs[-1][0], runs[-1][1] + n)
            else:
                runs.append((host, n))
            pos += n
        return runs

    extents = [(0, 16 * CLUSTER), (CLUSTER + 100, 3 * CLUSTER), (5 * CLUSTER, 1),
               (16 * CLUSTER, 32 * CLUSTER), (20 * CLUSTER + 7, 2 * CLUSTER),
               (15 * CLUSTER, 2 * CLUSTER)]

    async def check() -> None:
        g = BlockGraph()
        node = await _open(g, path)
        cmap = node.driver.cluster_map  # type: ignore[attr-defined]
        got = await cmap.host_runs(extents)
        assert got == [expected(o, n) for o, n in extents]
        assert got[0] == [(hosts[0], 16 * CLUSTER)]
        assert len(got[3]) > 1  # the shuffled clusters are not one run
        assert await cmap.host_runs([(40 * CLUSTER, 16 * CLUSTER)]) is None
        await close_all(g)

    asyncio.run(check())


def test_host_runs_refuses_a_consecutive_run_that_ends_past_the_file(tmp_path: Path) -> None:
    """A run of consecutive entries whose last cluster lies past the end of the file is
    refused with the read's error, not mapped (the one-table shortcut checks the run's end)."""
    path = tmp_path / "img.qcow2"

    async def prepare() -> None:
        await create_qcow2(str(path), SIZE, cluster_size=CLUSTER)
        g = BlockGraph()
        node = await _open(g, path)
        await node.write(0, b"\x05" * (8 * CLUSTER))
        await close_all(g)

    asyncio.run(prepare())
    file_clusters = path.stat().st_size // CLUSTER
    with open(path, "r+b") as f:
        # shift the whole run so that its last cluster is past the end of the file
        for c in range(8):
            at = _l2_entry_offset(path, c)
            f.seek(at)
            entry = struct.unpack(">Q", f.read(8))[0]
            new_host = (file_clusters - 4 + c) * CLUSTER
            f.seek(at)
            f.write(struct.pack(">Q", (entry & ~0x00FFFFFFFFFFFE00) | new_host))

    async def walk() -> None:
        g = BlockGraph()
        node = await _open(g, path)
        cmap = node.driver.cluster_map  # type: ignore[attr-defined]
        # the first extent (inside the file) brings the L2 table in; the second is the run
        with pytest.raises(BlockIOError):
            await cmap.host_runs([(0, CLUSTER), (0, 8 * CLUSTER)])
        await close_all(g)

    asyncio.run(walk())
