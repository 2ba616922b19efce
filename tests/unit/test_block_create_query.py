"""Image creation (bdrv_img_create semantics) and the query builders / chain status walkers."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from blockmirror.block.chain import block_status_above, is_allocated_above
from blockmirror.block.create import formatting_line, img_create, parse_size
from blockmirror.block.driver import BlockStatus
from blockmirror.block.graph import BlockGraph
from blockmirror.block.options import close_all, open_blockdev, open_image
from blockmirror.block.query import image_info, query_named_block_nodes, size_to_str
from blockmirror.errors import BlockMirrorError

MiB = 1024 * 1024
K64 = 65536


@pytest.mark.parametrize(
    ("text", "value"),
    [("1M", MiB), ("1.5M", 3 * MiB // 2), ("1000", 1000), ("1k", 1024), ("2G", 2 << 30),
     ("1T", 1 << 40), ("512b", 512), (4096, 4096)],
)
def test_parse_size(text: str | int, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["1x", "-1", "", "k", "1.5.5M", "+3"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


@pytest.mark.parametrize(
    ("n", "text"),
    [(0, "0 B"), (4096, "4 KiB"), (200704, "196 KiB"), (MiB, "1 MiB"), (1000, "0.977 KiB"),
     (1023, "0.999 KiB"), (3 * MiB // 2, "1.5 MiB"), (1 << 40, "1 TiB")],
)
def test_size_to_str(n: int, text: str) -> None:
    assert size_to_str(n) == text


def test_formatting_line_orders() -> None:
    assert formatting_line("r.img", "raw", {"size": MiB}) == (
        "Formatting 'r.img', fmt=raw size=1048576")
    assert formatting_line("r.img", "raw", {"size": MiB, "preallocation": "full",
                                            "nocow": "on"}) == (
        "Formatting 'r.img', fmt=raw size=1048576 nocow=on preallocation=full")
    assert formatting_line("q.qcow2", "qcow2", {"size": MiB, "backing_file": "b.qcow2",
                                                "backing_fmt": "qcow2"}) == (
        "Formatting 'q.qcow2', fmt=qcow2 cluster_size=65536 extended_l2=off "
        "compression_type=zlib size=1048576 backing_file=b.qcow2 backing_fmt=qcow2 "
        "lazy_refcounts=off refcount_bits=16")
    assert formatting_line("q.qcow2", "qcow2", {"size": MiB, "cluster_size": "64k",
                                                "preallocation": "metadata",
                                                "lazy_refcounts": "on", "compat": "1.1"}) == (
        "Formatting 'q.qcow2', fmt=qcow2 cluster_size=65536 extended_l2=off "
        "preallocation=metadata compression_type=zlib size=1048576 compat=1.1 "
        "lazy_refcounts=on refcount_bits=16")


def test_img_create_errors(tmp_path: Path) -> None:
    base = str(tmp_path / "b.qcow2")

    async def main() -> None:
        with pytest.raises(BlockMirrorError, match=r"^Unknown file format 'foo'$"):
            await img_create(str(tmp_path / "x"), "foo", MiB, quiet=True)
        with pytest.raises(BlockMirrorError, match=r"^Image creation needs a size parameter$"):
            await img_create(str(tmp_path / "x"), "raw", None, quiet=True)
        with pytest.raises(BlockMirrorError, match=r"^Invalid parameter 'bogus'$"):
            await img_create(str(tmp_path / "x"), "raw", MiB, options={"bogus": "1"},
                             quiet=True)
        with pytest.raises(BlockMirrorError, match=r"^Error: Trying to create an image with "
                                                   r"the same filename as the backing file$"):
            await img_create(base, "qcow2", None, backing_file=base, backing_fmt="qcow2",
                             quiet=True)
        with pytest.raises(BlockMirrorError) as exc:
            await img_create(str(tmp_path / "t.qcow2"), "qcow2", None,
                             backing_file=str(tmp_path / "none.qcow2"), backing_fmt="qcow2",
                             quiet=True)
        missing = tmp_path / "none.qcow2"
        assert str(exc.value) == f"Could not open '{missing}': No such file or directory"
        assert exc.value.hint == "Could not open backing image."
        with pytest.raises(BlockMirrorError, match=r"^Could not create '/nonexistent/x': "):
            await img_create("/nonexistent/x", "raw", MiB, quiet=True)

    asyncio.run(main())


def test_img_create_size_from_backing_and_printer(tmp_path: Path) -> None:
    base, top = str(tmp_path / "b.img"), str(tmp_path / "t.qcow2")
    lines: list[str] = []

    async def main() -> None:
        await img_create(base, "raw", 3 * MiB, quiet=True)
        line = await img_create(top, "qcow2", None, backing_file="b.img", backing_fmt="raw",
                                printer=lines.append)
        assert line == lines[0]
        assert "size=3145728 backing_file=b.img backing_fmt=raw" in line
        graph = BlockGraph()
        try:
            node = await open_image(graph, top, read_only=True)
            assert node.length() == 3 * MiB and node.backing is not None
        finally:
            await close_all(graph)

    asyncio.run(main())


def test_image_info_and_named_nodes(tmp_path: Path) -> None:
    base, top = str(tmp_path / "b.img"), str(tmp_path / "t.qcow2")

    async def main() -> None:
        await img_create(base, "raw", MiB, quiet=True)
        await img_create(top, "qcow2", 2 * MiB, backing_file="b.img", backing_fmt="raw",
                         quiet=True)
        graph = BlockGraph()
        try:
            node = await open_blockdev(graph, {"driver": "qcow2", "node-name": "q",
                                               "file": {"driver": "file", "filename": top}})
            info = await image_info(node)
            assert info["format"] == "qcow2" and info["virtual-size"] == 2 * MiB
            assert info["cluster-size"] == K64 and info["dirty-flag"] is False
            assert info["backing-filename"] == "b.img"
            assert info["full-backing-filename"] == base
            assert info["backing-filename-format"] == "raw"
            assert info["backing-image"]["filename"] == base
            assert info["format-specific"]["type"] == "qcow2"
            await open_blockdev(graph, {"driver": "null-co", "node-name": "n"})
            listed = await query_named_block_nodes(graph)
            names = [d["node-name"] for d in listed]
            assert names[0] == "n" and names[-1].startswith("#block") and "q" in names
            qinfo = next(d for d in listed if d["node-name"] == "q")
            assert qinfo["backing_file"] == base and qinfo["backing_file_depth"] == 1
            assert qinfo["file"] == top and qinfo["ro"] is False
            assert qinfo["cache"] == {"writeback": True, "direct": False, "no-flush": False}
            ninfo = listed[0]
            assert ninfo["image"] == {"filename": "null-co://", "format": "null-co",
                                      "virtual-size": 1 << 30, "actual-size": 0}
            flat = await query_named_block_nodes(graph, flat=True)
            assert all("backing-image" not in d["image"] for d in flat)
            node.implicit = True
            assert "q" not in [d["node-name"] for d in await query_named_block_nodes(graph)]
        finally:
            await close_all(graph)

    asyncio.run(main())


def test_block_status_above_depths(tmp_path: Path) -> None:
    """base (raw, 1 MiB: data in the first 64 KiB) <- mid (qcow2) <- top (qcow2, 2 MiB)."""
    base, mid, top = (str(tmp_path / n) for n in ("b.img", "m.qcow2", "t.qcow2"))

    async def main() -> None:
        await img_create(base, "raw", MiB, quiet=True)
        await img_create(mid, "qcow2", MiB, backing_file=base, backing_fmt="raw", quiet=True)
        await img_create(top, "qcow2", 2 * MiB, backing_file=mid, backing_fmt="qcow2",
                         quiet=True)
        graph = BlockGraph()
        try:
            m = await open_image(graph, mid, read_only=False, backing=False)
            await m.write(K64, b"m" * K64)
            await close_all(graph)
            t = await open_image(graph, top, read_only=False)
            await t.write(2 * K64, b"t" * K64)
            mid_node = t.backing
            assert mid_node is not None
            base_node = mid_node.backing
            assert base_node is not None

            ext = await block_status_above(t, None, 2 * K64, K64)
            assert ext.depth == 1 and ext.status & BlockStatus.DATA
            ext = await block_status_above(t, None, K64, K64)
            assert ext.depth == 2 and ext.status & BlockStatus.DATA
            ext = await block_status_above(t, None, 0, 4096)  # allocated in the raw base
            assert ext.depth == 3 and ext.status & BlockStatus.ALLOCATED
            ext = await block_status_above(t, None, 3 * K64, K64)
            assert ext.depth == 3  # raw base: a hole, still allocated (raw owns every byte)
            # past the end of the 1 MiB backing: zeroes synthesised by the short layer count
            # as allocated there (cf. bdrv_co_common_block_status_above)
            ext = await block_status_above(t, None, MiB + 4096, 4096)
            assert ext.depth == 2
            assert ext.status & BlockStatus.ZERO and ext.status & BlockStatus.ALLOCATED

            # sync=top view: only the top layer (base_overlay = top, include_base)
            assert await is_allocated_above(t, t, True, 2 * K64, K64) == (True, K64)
            alloc, n = await is_allocated_above(t, t, True, K64, K64)
            assert not alloc and n == K64
            # everything above the raw base
            assert (await is_allocated_above(t, base_node, False, K64, K64))[0]
            assert not (await is_allocated_above(t, base_node, False, 0, 4096))[0]
        finally:
            await close_all(graph)

    asyncio.run(main())


def test_img_create_over_a_backing_in_use(tmp_path: Path) -> None:
    """drive-mirror sync=none creates its target backed by the (open, writable) source."""
    src, tgt = str(tmp_path / "s.qcow2"), str(tmp_path / "t.qcow2")

    async def main() -> None:
        await img_create(src, "qcow2", MiB, quiet=True)
        graph = BlockGraph()
        try:
            await open_blockdev(graph, {"driver": "qcow2", "node-name": "src",
                                        "file": {"driver": "file", "filename": src}})
            line = await img_create(tgt, "qcow2", None, backing_file=src, backing_fmt="qcow2",
                                    quiet=True)
            assert "size=1048576" in line
        finally:
            await close_all(graph)

    asyncio.run(main())
