"""The two block-layer entry points the mirror uses instead of private helpers.

``open_backing_file`` opens the backing named in an image header (drive-mirror mode=existing at
completion); ``img_create`` with fmt ``file`` makes a plain file (drive-mirror of a protocol-level
source) and with ``host_device`` only reuses a device, with QEMU 7.2's texts.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from blockmirror.block.create import img_create
from blockmirror.block.graph import BlockGraph
from blockmirror.block.options import open_backing_file, open_image
from blockmirror.errors import BlockMirrorError

MiB = 1 << 20


def test_open_backing_file_attaches_the_header_backing(tmp_path: Path) -> None:
    base, top = str(tmp_path / "base.raw"), str(tmp_path / "top.qcow2")

    async def main() -> None:
        await img_create(base, "raw", MiB, quiet=True)
        await img_create(top, "qcow2", MiB, backing_file=base, backing_fmt="raw", quiet=True)
        g = BlockGraph()
        node = await open_image(g, top, "qcow2", read_only=False, backing=False)
        assert node.backing is None
        child = await open_backing_file(g, node)
        assert child is not None and node.backing is child
        assert child.format_name == "raw" and child.read_only
        assert child.file is not None and child.file.filename == base

    asyncio.run(main())


def test_open_backing_file_without_backing_or_missing(tmp_path: Path) -> None:
    plain, top = str(tmp_path / "plain.qcow2"), str(tmp_path / "top.qcow2")
    gone = str(tmp_path / "gone.raw")

    async def main() -> None:
        await img_create(plain, "qcow2", MiB, quiet=True)
        await img_create(gone, "raw", MiB, quiet=True)
        await img_create(top, "qcow2", MiB, backing_file=gone, backing_fmt="raw", quiet=True)
        os.unlink(gone)
        g = BlockGraph()
        node = await open_image(g, plain, "qcow2", read_only=False, backing=False)
        assert await open_backing_file(g, node) is None
        node2 = await open_image(g, top, "qcow2", read_only=False, backing=False)
        before = set(g.nodes)
        with pytest.raises(BlockMirrorError) as ei:
            await open_backing_file(g, node2)
        assert str(ei.value) == (f"Could not open backing file: Could not open '{gone}': "
                                 "No such file or directory")
        assert set(g.nodes) == before  # nothing half-opened stays in the graph

    asyncio.run(main())


def test_img_create_file_format(tmp_path: Path) -> None:
    path = tmp_path / "plain.img"
    lines: list[str] = []
    asyncio.run(img_create(str(path), "file", MiB, printer=lines.append))
    assert lines == [f"Formatting '{path}', fmt=file size={MiB}"]
    assert path.stat().st_size == MiB


def test_img_create_host_device_only_reuses_devices(tmp_path: Path) -> None:
    reg, missing = tmp_path / "reg.img", tmp_path / "missing.img"
    reg.write_bytes(b"")
    fail = ("Protocol driver 'host_device' does not support image creation, and opening the "
            "image failed: ")
    cases = [
        (str(reg), f"{fail}'host_device' driver requires '{reg}' to be either a character or "
                   "block device"),
        (str(missing), f"{fail}Could not open '{missing}': No such file or directory"),
        ("/dev/null", "Cannot grow device files"),
    ]
    for path, text in cases:
        lines: list[str] = []
        with pytest.raises(BlockMirrorError) as ei:
            asyncio.run(img_create(path, "host_device", MiB, printer=lines.append))
        assert str(ei.value) == text
        # the Formatting line comes first, as in QEMU
        assert lines == [f"Formatting '{path}', fmt=host_device size={MiB}"]
