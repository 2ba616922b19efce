"""The pure parts of block-commit and block-stream (jobs/commit): the chain helpers, the job's
links and their permission texts, the backing links a job relaxes or restricts, the filters
and the copy-on-read serialisation, on in-process qcow2 chains."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from blockmirror.block.create import img_create
from blockmirror.block.graph import BlockGraph
from blockmirror.block.node import BlockBackend, BlockNode, Perm
from blockmirror.block.options import close_all, open_blockdev
from blockmirror.errors import BlockMirrorError
from blockmirror.jobs.commit.chain import drop_intermediate
from blockmirror.jobs.commit.filters import (
    CommitTopDriver,
    CopyOnReadDriver,
    insert_filter,
    remove_filter,
)
from blockmirror.jobs.commit.links import (
    ChainPerms,
    JobLinks,
    chain_contains,
    find_base,
    find_overlay,
)
from blockmirror.jobs.commit.serialise import RangeGuard

MiB = 1 << 20


async def _chain(tmp: Path) -> tuple[BlockGraph, dict[str, BlockNode]]:
    """base <- mid <- top, qcow2 files opened by node name as blockdev-add would."""
    graph = BlockGraph()
    below = None
    nodes: dict[str, BlockNode] = {}
    for name in ("base", "mid", "top"):
        path = str(tmp / f"{name}.qcow2")
        await img_create(path, "qcow2", 4 * MiB, quiet=True)
        nodes[name] = await open_blockdev(graph, {
            "driver": "qcow2", "node-name": name, "backing": below,
            "file": {"driver": "file", "node-name": f"{name}-file", "filename": path}})
        below = name
    return graph, nodes


def _run(tmp: Path, body: Callable[[BlockGraph, dict[str, BlockNode]], Awaitable[None]]
         ) -> None:
    async def main() -> None:
        graph, nodes = await _chain(tmp)
        try:
            await body(graph, nodes)
        finally:
            await close_all(graph)

    asyncio.run(main())


def test_chain_helpers_walk_like_qemu(tmp_path: Path) -> None:
    async def body(graph: BlockGraph, n: dict[str, BlockNode]) -> None:
        top, mid, base = n["top"], n["mid"], n["base"]
        assert find_overlay(top, base) is mid
        assert find_overlay(top, mid) is top
        assert find_overlay(top, None) is base  # the last node of the chain
        assert find_overlay(mid, top) is None  # not below
        assert find_base(top) is base
        assert find_base(base) is base  # no backing: the node itself (cf. bdrv_find_base)
        assert chain_contains(top, base) and chain_contains(top, top)
        assert not chain_contains(base, top)
        assert not chain_contains(top, graph.nodes["top-file"])  # a file is no layer

    _run(tmp_path, body)


def test_job_links_refuse_a_writer_with_qemus_text_and_go_away(tmp_path: Path) -> None:
    async def body(graph: BlockGraph, n: dict[str, BlockNode]) -> None:
        base = n["base"]
        export = BlockBackend("", "an unnamed block device", Perm.CONSISTENT_READ | Perm.WRITE,
                              Perm.all() & ~Perm.RESIZE)
        graph.attach(export, base, "root", export.perm, export.shared)
        links = JobLinks(graph, "stream", "job0")
        links.add("active node", n["top"], Perm.NONE, Perm.all())
        assert n["top"].blockers["all"] == ["block device is in use by block job: stream"]
        with pytest.raises(BlockMirrorError) as exc:
            links.add("intermediate node", base, Perm.NONE,
                      Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED)
        assert str(exc.value) == (
            "Permission conflict on node 'base': permissions 'write' are both required by an "
            "unnamed block device (uses node 'base' as 'root' child) and unshared by stream "
            "job 'job0' (uses node 'base' as 'intermediate node' child).")
        assert "all" not in base.blockers  # the refused link left nothing behind
        links.remove_all()
        assert "all" not in n["top"].blockers
        assert not [c for c in n["top"].parents if isinstance(c.parent, BlockBackend)]

    _run(tmp_path, body)


def test_stream_restricts_the_backing_links_below_frozen_nodes(tmp_path: Path) -> None:
    async def body(graph: BlockGraph, n: dict[str, BlockNode]) -> None:
        mid, base = n["mid"], n["base"]
        export = BlockBackend("", "an unnamed block device", Perm.CONSISTENT_READ | Perm.WRITE,
                              Perm.all() & ~Perm.RESIZE)
        graph.attach(export, base, "root", export.perm, export.shared)
        links, perms = JobLinks(graph, "stream", "s"), ChainPerms(graph)
        links.add("intermediate node", mid, Perm.NONE,
                  Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED)
        with pytest.raises(BlockMirrorError) as exc:
            perms.unshare_writes_below(mid)
        assert "unshared by node 'mid' (uses node 'base' as 'backing' child)" in str(exc.value)
        links.remove_all()
        perms.restore()
        link = mid.children["backing"]
        assert link.shared == Perm.all()
        graph.check_perms(base)

    _run(tmp_path, body)


def test_commit_relaxes_consistent_read_inside_the_chain_and_restores_it(
        tmp_path: Path) -> None:
    async def body(graph: BlockGraph, n: dict[str, BlockNode]) -> None:
        top, mid, base = n["top"], n["mid"], n["base"]
        perms = ChainPerms(graph)
        perms.relax(top, base)
        assert not top.children["backing"].perm & Perm.CONSISTENT_READ
        assert not mid.children["backing"].perm & Perm.CONSISTENT_READ
        links = JobLinks(graph, "commit", "c")
        # nobody but the job may read mid consistently now: the link goes in
        links.add("intermediate node", mid, Perm.NONE, Perm.WRITE | Perm.WRITE_UNCHANGED)
        links.remove_all()
        perms.restore()
        assert top.children["backing"].perm == Perm.CONSISTENT_READ
        assert mid.children["backing"].perm == Perm.CONSISTENT_READ

    _run(tmp_path, body)


def test_filters_take_the_parents_and_give_them_back(tmp_path: Path) -> None:
    async def body(graph: BlockGraph, n: dict[str, BlockNode]) -> None:
        top, mid = n["top"], n["mid"]
        dev = BlockBackend("vda", "block device 'vda'", Perm.CONSISTENT_READ | Perm.WRITE,
                           Perm.all())
        graph.attach(dev, top, "root", dev.perm, dev.shared)
        cor, _ = insert_filter(graph, CopyOnReadDriver, top, None, {"file": "top"})
        assert dev.node is cor and cor.implicit and cor.name.startswith("#block")
        assert cor.filename.startswith('json:{"driver": "copy-on-read", "file": {"driver": '
                                       '"qcow2", "file": {"driver": "file", "filename": ')
        # copy-on-read passes its users' needs down to the node (a filter's default)
        assert cor.children["file"].perm == dev.perm
        await cor.write(0, b"\x5a" * 512)
        assert await top.read(0, 512) == b"\x5a" * 512
        remove_filter(graph, cor)
        assert dev.node is top and cor.name not in graph.nodes
        ctop, _ = insert_filter(graph, CommitTopDriver, mid, "ctop", {})
        assert top.backing is ctop and ctop.read_only and ctop.filename == mid.filename
        assert ctop.info().backing_filename is None
        with pytest.raises(BlockMirrorError, match="Duplicate nodes with node-name='ctop'"):
            insert_filter(graph, CommitTopDriver, mid, "ctop", {})
        with pytest.raises(BlockMirrorError, match="Invalid node-name: '1x'"):
            insert_filter(graph, CommitTopDriver, mid, "1x", {})
        remove_filter(graph, ctop)
        assert top.backing is mid

    _run(tmp_path, body)


def test_drop_intermediate_points_the_overlay_at_the_base_and_records_it(
        tmp_path: Path) -> None:
    async def body(graph: BlockGraph, n: dict[str, BlockNode]) -> None:
        top, mid, base = n["top"], n["mid"], n["base"]
        ctop, _ = insert_filter(graph, CommitTopDriver, mid, None, {})
        await drop_intermediate(graph, ctop, base, "relative/base.qcow2")
        assert top.backing is base
        assert top.info().backing_filename == "relative/base.qcow2"
        assert top.info().backing_format == "qcow2"
        assert not ctop.parents

    _run(tmp_path, body)


def test_range_guard_serialises_copies_with_overlapping_writes() -> None:
    async def main() -> None:
        guard = RangeGuard()
        order: list[str] = []
        node = BlockNode(name="n")

        async def write(tag: str, offset: int) -> None:
            async def proceed() -> None:
                order.append(f"{tag} start")
                await asyncio.sleep(0)
                order.append(f"{tag} end")
            await guard.around_write(node, "write", offset, 4096, proceed)

        async def copy() -> None:
            async with guard.copying(0, 65536):
                order.append("copy start")
                await asyncio.sleep(0.01)
                order.append("copy end")

        c = asyncio.ensure_future(copy())
        await asyncio.sleep(0)
        await asyncio.gather(write("inside", 8192), write("outside", 65536))
        await c
        # the write outside the copy ran at once; the one inside waited for the copy
        assert order.index("outside end") < order.index("copy end")
        assert order.index("inside start") > order.index("copy end")

        # a copy waits for an overlapping write in flight
        order.clear()
        started = asyncio.Event()

        async def slow_proceed() -> None:
            started.set()
            order.append("w start")
            await asyncio.sleep(0.01)
            order.append("w end")

        w = asyncio.ensure_future(guard.around_write(node, "write", 0, 512, slow_proceed))
        await started.wait()
        await copy()
        await w
        assert order == ["w start", "w end", "copy start", "copy end"]

        # the job's own writes (its task marked) are never held by its own copies
        async def own() -> None:
            guard.own()
            async with guard.copying(0, 4096):
                await write("own", 0)

        await asyncio.wait_for(own(), 5)

    asyncio.run(main())
