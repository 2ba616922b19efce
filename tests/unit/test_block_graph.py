"""Permission propagation through pass-through links (raw, filters) and graph surgery."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from blockmirror.block.create import create_file
from blockmirror.block.graph import BlockGraph
from blockmirror.block.node import BlockBackend, Perm
from blockmirror.block.options import attach_backend, close_all, open_blockdev
from blockmirror.errors import BlockMirrorError

MiB = 1024 * 1024


def test_users_flow_down_to_the_file(tmp_path: Path) -> None:
    img = str(tmp_path / "a.img")

    async def main() -> None:
        await create_file(img, MiB)
        graph = BlockGraph()
        try:
            dbg = await open_blockdev(graph, {
                "driver": "blkdebug", "node-name": "d",
                "image": {"driver": "raw", "node-name": "r",
                          "file": {"driver": "file", "node-name": "f", "filename": img}},
            })
            f = graph.nodes["f"]
            assert graph.cumulative_perms(f) == (Perm.NONE, Perm.all())
            blk = attach_backend(graph, dbg, write=True, no_share=True)
            perm, shared = graph.cumulative_perms(f)
            assert perm == Perm.CONSISTENT_READ | Perm.WRITE | Perm.RESIZE
            assert shared == Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED
            # a second writer anywhere above the file conflicts, naming QEMU's words
            other = await open_blockdev(graph, {"driver": "raw", "node-name": "r2", "file": "f"})
            with pytest.raises(BlockMirrorError) as exc:
                attach_backend(graph, other, write=True)
            assert str(exc.value) == (
                "Permission conflict on node 'f': permissions 'write, resize' are both "
                "required by node 'r2' (uses node 'f' as 'file' child) and unshared by node "
                "'r' (uses node 'f' as 'file' child).")
            assert graph.cumulative_perms(f)[0] == perm  # the refusal changed nothing
            graph.remove_backend(blk)
            assert graph.cumulative_perms(f) == (Perm.NONE, Perm.all())
            attach_backend(graph, other, write=True)
        finally:
            await close_all(graph)

    asyncio.run(main())


def test_replace_node_moves_users_and_their_permissions(tmp_path: Path) -> None:
    a, b = str(tmp_path / "a.img"), str(tmp_path / "b.img")

    async def main() -> None:
        await create_file(a, MiB)
        await create_file(b, MiB)
        graph = BlockGraph()
        try:
            src = await open_blockdev(graph, {"driver": "raw", "node-name": "src",
                                              "file": {"driver": "file", "filename": a}})
            tgt = await open_blockdev(graph, {"driver": "raw", "node-name": "tgt",
                                              "file": {"driver": "file", "filename": b}})
            blk = BlockBackend("drive0", "block device 'drive0'", Perm.CONSISTENT_READ |
                               Perm.WRITE, Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED)
            graph.attach(blk, src, "root", blk.perm, blk.shared)
            graph.add_backend(blk)
            assert src.file is not None and tgt.file is not None
            assert graph.cumulative_perms(src.file)[0] & Perm.WRITE
            graph.replace_node(src, tgt)
            assert blk.node is tgt
            assert not graph.cumulative_perms(src.file)[0] & Perm.WRITE
            assert graph.cumulative_perms(tgt.file)[0] & Perm.WRITE
        finally:
            await close_all(graph)

    asyncio.run(main())
