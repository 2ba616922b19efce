"""The qcow2 driver's resume area (``block/drivers/qcow2/resume_area.py``) against QEMU 7.2.

Made, kept and removed by our driver; checked, read and opened by QEMU's tools.
"""

from __future__ import annotations

import asyncio
import json
import struct
import subprocess
from pathlib import Path

import pytest

from blockmirror.block.drivers.qcow2.driver import Qcow2Driver
from blockmirror.block.drivers.qcow2.resume_area import AUTOCLEAR_RESUME, RESUME_BITMAP
from blockmirror.block.graph import BlockGraph
from blockmirror.block.node import BlockNode
from blockmirror.block.options import close_all, open_blockdev
from blockmirror.block.reopen import set_read_only
from conftest import require_tool

pytestmark = pytest.mark.interop

SIZE = 8 << 20


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=60)


def _autoclear(path: Path) -> int:
    return int(struct.unpack_from(">Q", path.read_bytes(), 88)[0])


async def _open(graph: BlockGraph, path: Path, read_only: bool = False) -> BlockNode:
    return await open_blockdev(graph, {"driver": "qcow2", "node-name": "q", "read-only":
                                       read_only, "file": {"driver": "file",
                                                           "filename": str(path)}})


def _area(node: BlockNode) -> Qcow2Driver:
    drv = node.driver
    assert isinstance(drv, Qcow2Driver)
    return drv


def _check_clean(path: Path) -> None:
    r = _run("qemu-img", "check", "--output=json", str(path))
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads(r.stdout).get("leaks", 0) == 0


def test_area_lifecycle_with_qemu(tmp_path: Path) -> None:
    require_tool("qemu-img", "qemu-io")
    img = tmp_path / "a.qcow2"
    assert _run("qemu-img", "create", "-q", "-f", "qcow2", str(img), str(SIZE)).returncode == 0
    assert _run("qemu-io", "-c", "write -P 9 0 1M", str(img)).returncode == 0
    data = bytes(range(256)) * 700  # three 64 KiB clusters, the last one partly
    owner = object()

    async def make() -> None:
        graph = BlockGraph()
        drv = _area(await _open(graph, img))
        await drv.resume_area.install(data, 65536, 42, owner)
        drv.resume_area.detach(owner)
        await close_all(graph)

    asyncio.run(make())
    assert _autoclear(img) & AUTOCLEAR_RESUME
    _check_clean(img)
    info = json.loads(_run("qemu-img", "info", "--output=json", str(img)).stdout)
    assert info["format-specific"]["data"]["bitmaps"] == [
        {"name": RESUME_BITMAP, "granularity": 65536, "flags": ["in-use"]}]

    # read-only, then switched to read-write: the area is current, and the first write
    # (no mirror tracks it) clears the bit before it reaches the image
    async def reopen_and_write() -> None:
        graph = BlockGraph()
        node = await _open(graph, img, read_only=True)
        drv = _area(node)
        assert drv.resume_area.current is not None
        assert await drv.resume_area.read() == data
        await set_read_only(graph, node, False)
        assert _autoclear(img) & AUTOCLEAR_RESUME
        await node.write(0, b"x" * 512)
        assert not _autoclear(img) & AUTOCLEAR_RESUME
        assert drv.resume_area.current is None
        assert drv.resume_area.stale == "it was written while no mirror tracked it"
        await close_all(graph)

    asyncio.run(reopen_and_write())
    _check_clean(img)

    # stale now: our next open says so, and removing the area leaves a clean image
    async def remove() -> None:
        graph = BlockGraph()
        drv = _area(await _open(graph, img))
        assert drv.resume_area.current is None
        assert drv.resume_area.stale is not None
        assert drv.resume_area.stale.startswith("its autoclear bit is clear")
        await drv.resume_area.remove()
        await close_all(graph)

    asyncio.run(remove())
    _check_clean(img)
    info = json.loads(_run("qemu-img", "info", "--output=json", str(img)).stdout)
    assert "bitmaps" not in info["format-specific"]["data"]
    r = _run("qemu-io", "-r", "-c", "read -P 120 0 512", "-c", "read -P 9 512 1023k", str(img))
    assert r.returncode == 0 and "Pattern verification failed" not in r.stdout, r.stdout
