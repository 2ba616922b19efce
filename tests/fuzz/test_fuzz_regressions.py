"""Regression tests for what the fuzzers found (see fuzz/known.py and fuzz/README.md).

Bugs in files this helper does not own are strict xfails naming the bug: they fail loudly
(XPASS) once fixed, so the marker must then go.
"""

from __future__ import annotations

import asyncio
import struct
import subprocess
from pathlib import Path

import pytest

from blockmirror.block.graph import BlockGraph
from blockmirror.block.options import close_all, open_blockdev
from conftest import require_tool


@pytest.mark.xfail(strict=True, reason="BUG (block/options.py, qcow2 backing name): a NUL "
                   "byte in the qcow2 backing file name raises ValueError from realpath; "
                   "QEMU ends the name at the NUL (found by fuzz/h_qcow2.py)")
def test_qcow2_backing_name_with_nul_ends_at_the_nul(tmp_path: Path) -> None:
    require_tool("qemu-img")
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "1M"], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b",
                    str(base) + "x", "-F", "qcow2", str(top), "1M"], check=True)
    img = bytearray(top.read_bytes())
    off, size = struct.unpack_from(">QI", img, 8)
    img[off + size - 1] = 0  # "...base.qcow2x" -> "...base.qcow2\0"
    top.write_bytes(img)
    # qemu-img info reports backing file: .../base.qcow2 and qemu-io reads through it

    async def main() -> str | None:
        graph = BlockGraph()
        try:
            node = await open_blockdev(graph, {"driver": "qcow2", "node-name": "t", "file": {
                "driver": "file", "filename": str(top)}})
            return node.backing.node.filename if node.backing else None
        finally:
            await close_all(graph)

    assert asyncio.run(main()) == str(base)
