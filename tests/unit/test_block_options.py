"""open_blockdev / open_image / close / blockdev-del: options, errors, links, locks, loops."""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from blockmirror.block.create import create_file, img_create
from blockmirror.block.graph import BlockGraph
from blockmirror.block.node import BlockBackend, Perm
from blockmirror.block.options import (
    attach_backend,
    close_all,
    delete_blockdev,
    open_blockdev,
    open_image,
    parse_filename,
    unflatten,
)
from blockmirror.errors import BlockIOError, BlockMirrorError

MiB = 1024 * 1024


def run(body: Callable[[BlockGraph], Awaitable[None]]) -> BlockGraph:
    graph = BlockGraph()

    async def main() -> None:
        try:
            await body(graph)
        finally:
            await close_all(graph)

    asyncio.run(main())
    return graph


def raw_img(tmp_path: Path, name: str = "a.img", size: int = MiB) -> str:
    p = str(tmp_path / name)
    asyncio.run(create_file(p, size))
    return p


def test_unflatten_dotted_keys_and_lists() -> None:
    got = unflatten({"driver": "raw", "file.driver": "file", "file.filename": "/x",
                     "cache.direct": "on", "inject-error.0.event": "read_aio",
                     "inject-error.1.event": "write_aio"})
    assert got == {"driver": "raw", "file": {"driver": "file", "filename": "/x"},
                   "cache": {"direct": "on"},
                   "inject-error": [{"event": "read_aio"}, {"event": "write_aio"}]}
    with pytest.raises(BlockMirrorError):
        unflatten({"file": "x", "file.driver": "file"})


@pytest.mark.parametrize(
    ("options", "text"),
    [
        ({"driver": "null-co"}, "'node-name' must be specified for the root node"),
        ({"driver": "null-co", "node-name": "1x"}, "Invalid node-name: '1x'"),
        ({"driver": "null-co", "node-name": "a" * 32}, "Invalid node-name: '" + "a" * 32 + "'"),
        ({"driver": "zzz", "node-name": "n"}, "Parameter 'driver' does not accept value 'zzz'"),
        ({"node-name": "n"}, "Parameter 'driver' is missing"),
        ({"driver": "null-co", "node-name": "n", "bogus": 1}, "Parameter 'bogus' is unexpected"),
        ({"driver": "file", "node-name": "n", "filename": "/nonexistent/p"},
         "Could not open '/nonexistent/p': No such file or directory"),
        ({"driver": "raw", "node-name": "n", "file": "nope"},
         "Cannot find device='nope' nor node-name='nope'"),
        ({"driver": "null-co", "node-name": "n", "detect-zeroes": "unmap"},
         "setting detect-zeroes to unmap is not allowed without setting discard operation to "
         "unmap"),
        ({"driver": "null-co", "node-name": "n", "force-share": True},
         "force-share=on can only be used with read-only images"),
        ({"driver": "null-co", "node-name": "n", "discard": "maybe"}, "Invalid discard option"),
        ({"driver": "null-co", "node-name": "n", "size": "x"},
         "Invalid parameter type for 'size', expected: integer"),
    ],
)
def test_option_errors(options: dict[str, Any], text: str) -> None:
    async def body(graph: BlockGraph) -> None:
        with pytest.raises(BlockMirrorError) as exc:
            await open_blockdev(graph, options)
        assert str(exc.value) == text
        assert not graph.nodes  # nothing half-open is left behind

    run(body)


def test_duplicate_node_name_and_no_leftovers(tmp_path: Path) -> None:
    img = raw_img(tmp_path)

    async def body(graph: BlockGraph) -> None:
        await open_blockdev(graph, {"driver": "null-co", "node-name": "n0"})
        with pytest.raises(BlockMirrorError, match=r"^Duplicate nodes with node-name='n0'$"):
            await open_blockdev(graph, {"driver": "raw", "node-name": "n0",
                                        "file": {"driver": "file", "filename": img}})
        # a failing child after a good one: the good one is closed again
        with pytest.raises(BlockMirrorError, match=r"^Offset \(2097152\) cannot be greater"):
            await open_blockdev(graph, {"driver": "raw", "node-name": "r", "offset": 2 * MiB,
                                        "file": {"driver": "file", "filename": img}})
        assert sorted(graph.nodes) == ["n0"]

    run(body)


def test_inline_children_are_auto_named_and_listed(tmp_path: Path) -> None:
    img = raw_img(tmp_path)

    async def body(graph: BlockGraph) -> None:
        node = await open_blockdev(graph, {"driver": "raw", "node-name": "r",
                                           "file.driver": "file", "file.filename": img,
                                           "cache.direct": "off", "read-only": "on"})
        child = node.file
        assert child is not None and child.name.startswith("#block")
        assert not child.implicit and child.read_only  # read-only is inherited
        assert node.filename == img and child.filename == img
        assert node.options["file"] == child.name
        assert graph.monitor_owned == {"r"}
        # queries list nodes newest first; the file child was named before its parent
        assert list(graph.nodes) == [child.name, "r"]

    run(body)


def test_references_and_blockdev_del(tmp_path: Path) -> None:
    img = raw_img(tmp_path)

    async def body(graph: BlockGraph) -> None:
        f = await open_blockdev(graph, {"driver": "file", "node-name": "f", "filename": img})
        r = await open_blockdev(graph, {"driver": "raw", "node-name": "r", "file": "f"})
        assert r.file is f
        with pytest.raises(BlockMirrorError, match=r"^Block device f is in use$"):
            await delete_blockdev(graph, "f")
        with pytest.raises(BlockMirrorError, match=r"^Failed to find node with node-name='x'$"):
            await delete_blockdev(graph, "x")
        blk = BlockBackend("", "export 'e'", Perm.CONSISTENT_READ, Perm.all())
        graph.add_backend(blk)
        graph.attach(blk, r, "root", blk.perm, blk.shared)
        with pytest.raises(BlockMirrorError, match=r"^Node r is in use$"):
            await delete_blockdev(graph, "r")
        graph.remove_backend(blk)
        r.block("drive_del", "block device is in use by block job: mirror")
        with pytest.raises(BlockMirrorError, match=r"^Node 'r' is busy: block device is in use"):
            await delete_blockdev(graph, "r")
        r.unblock("drive_del", "block device is in use by block job: mirror")
        await delete_blockdev(graph, "r")
        assert sorted(graph.nodes) == ["f"]  # the referenced file stays: the monitor owns it
        await delete_blockdev(graph, "f")
        assert not graph.nodes

    run(body)


def test_not_owned_by_monitor(tmp_path: Path) -> None:
    img = raw_img(tmp_path)

    async def body(graph: BlockGraph) -> None:
        node = await open_image(graph, img, "raw", read_only=False, node_name="t")
        with pytest.raises(BlockMirrorError, match=r"^Node t is not owned by the monitor$"):
            await delete_blockdev(graph, "t")
        assert node.format_name == "raw"

    run(body)


def test_write_lock_conflict_in_process(tmp_path: Path) -> None:
    img = raw_img(tmp_path)

    def raw(name: str, **extra: Any) -> dict[str, Any]:
        file: dict[str, Any] = {"driver": "file", "filename": img}
        file.update(extra.pop("file_extra", {}))
        return {"driver": "raw", "node-name": name, "file": file, **extra}

    async def body(graph: BlockGraph) -> None:
        a = await open_blockdev(graph, raw("a"))
        # raw passes its users' permissions through: no user, no lock (as in QEMU)
        b = await open_blockdev(graph, raw("b"))
        attach_backend(graph, a, write=True, no_share=True)  # a guest disk
        with pytest.raises(BlockMirrorError) as exc:
            attach_backend(graph, b, write=True)
        assert str(exc.value) == 'Failed to get "write" lock'
        assert exc.value.hint == f"Is another process using the image [{img}]?"
        attach_backend(graph, b)  # a reader that shares everything is fine (qemu-img map)
        # a second writer that shares everything, and a reader that refuses writers
        c = await open_blockdev(graph, raw("c"))
        for blk in list(graph.backends):
            if blk.node is a:
                graph.remove_backend(blk)
        attach_backend(graph, a, write=True)
        with pytest.raises(BlockMirrorError, match=r'^Failed to get shared "write" lock$'):
            attach_backend(graph, c, no_share=True)
        assert not c.parents  # the refused user left nothing behind
        # force-share and locking=off get through
        d = await open_blockdev(graph, raw("d", **{"read-only": True, "force-share": True}))
        attach_backend(graph, d)
        e = await open_blockdev(graph, raw("e", file_extra={"locking": "off"}))
        attach_backend(graph, e, write=True, no_share=True)
        # and the lock goes away with its user
        for blk in list(graph.backends):
            if blk.node is a:
                graph.remove_backend(blk)
        attach_backend(graph, c, no_share=True)

    run(body)


def test_lock_taken_by_a_format_at_open(tmp_path: Path) -> None:
    img = str(tmp_path / "q.qcow2")

    async def body(graph: BlockGraph) -> None:
        await img_create(img, "qcow2", MiB, quiet=True)
        await open_blockdev(graph, {"driver": "qcow2", "node-name": "a",
                                    "file": {"driver": "file", "filename": img}})
        with pytest.raises(BlockMirrorError, match=r'^Failed to get "write" lock$'):
            await open_blockdev(graph, {"driver": "qcow2", "node-name": "b",
                                        "file": {"driver": "file", "filename": img}})
        assert set(graph.nodes) == {"a", graph.nodes["a"].file.name}  # type: ignore[union-attr]

    run(body)


def test_read_only_child_under_writable_parent(tmp_path: Path) -> None:
    img = raw_img(tmp_path)

    async def body(graph: BlockGraph) -> None:
        await open_blockdev(graph, {"driver": "file", "node-name": "f", "filename": img,
                                    "read-only": True})
        # QEMU opens it (raw needs nothing while unused) but refuses a writer
        r = await open_blockdev(graph, {"driver": "raw", "node-name": "r", "file": "f"})
        with pytest.raises(BlockMirrorError, match=r"^Block node is read-only$"):
            attach_backend(graph, r, write=True)
        assert not r.parents and graph.nodes["f"].parents[0].perm == Perm.NONE
        # a writable qcow2 takes WRITE on its file at open
        with pytest.raises(BlockMirrorError, match=r"^Block node is read-only$"):
            await open_blockdev(graph, {"driver": "qcow2", "node-name": "q", "file": "f"})
        attach_backend(graph, r)
        assert graph.nodes["f"].parents[0].perm == Perm.CONSISTENT_READ

    run(body)


def test_qcow2_backing_from_header_and_null(tmp_path: Path) -> None:
    base = str(tmp_path / "base.img")
    top = str(tmp_path / "top.qcow2")

    async def body(graph: BlockGraph) -> None:
        await create_file(base, MiB)
        await img_create(top, "qcow2", None, backing_file="base.img", backing_fmt="raw",
                         quiet=True)
        node = await open_blockdev(graph, {"driver": "qcow2", "node-name": "q",
                                           "file": {"driver": "file", "filename": top}})
        assert node.length() == MiB
        backing = node.backing
        assert backing is not None and backing.read_only and backing.format_name == "raw"
        assert backing.filename == base
        nob = await open_blockdev(graph, {"driver": "qcow2", "node-name": "q2",
                                          "read-only": True, "force-share": True,
                                          "backing": None,
                                          "file": {"driver": "file", "filename": top}})
        assert nob.backing is None

    run(body)


def test_backing_loop_is_refused(tmp_path: Path) -> None:
    a, b = str(tmp_path / "a.qcow2"), str(tmp_path / "b.qcow2")

    async def body(graph: BlockGraph) -> None:
        await img_create(a, "qcow2", MiB, backing_file=b, backing_fmt="qcow2", quiet=True,
                         unsafe=True)
        await img_create(b, "qcow2", MiB, backing_file=a, backing_fmt="qcow2", quiet=True,
                         unsafe=True)
        with pytest.raises(BlockMirrorError, match=r"creates an infinite loop") as exc:
            await open_image(graph, a, read_only=True)
        assert "a.qcow2" in str(exc.value)
        assert not graph.nodes

    run(body)


def test_missing_backing_file_text(tmp_path: Path) -> None:
    top = str(tmp_path / "top.qcow2")

    async def body(graph: BlockGraph) -> None:
        await img_create(top, "qcow2", MiB, backing_file="/nonexistent/base.qcow2",
                         backing_fmt="qcow2", quiet=True, unsafe=True)
        with pytest.raises(BlockMirrorError) as exc:
            await open_image(graph, top, read_only=True)
        assert str(exc.value) == ("Could not open backing file: Could not open "
                                  "'/nonexistent/base.qcow2': No such file or directory")
        assert not graph.nodes

    run(body)


def test_legacy_filenames(tmp_path: Path) -> None:
    img = raw_img(tmp_path)
    conf = tmp_path / "dbg.conf"
    conf.write_text("[inject-error]\nevent = \"read_aio\"\n")
    assert parse_filename(f"blkdebug:{conf}:{img}") == {
        "driver": "blkdebug", "config": str(conf),
        "image": {"driver": "file", "filename": img}}
    assert parse_filename("nbd+unix:///exp?socket=/tmp/s") == {
        "driver": "nbd", "server": {"type": "unix", "path": "/tmp/s"}, "export": "exp"}
    assert parse_filename("nbd://h:1234/e") == {
        "driver": "nbd", "server": {"type": "inet", "host": "h", "port": "1234"},
        "export": "e"}

    async def body(graph: BlockGraph) -> None:
        node = await open_image(graph, f"blkdebug:{conf}:{img}", "raw", read_only=True)
        assert node.format_name == "raw"
        dbg = node.file
        assert dbg is not None and dbg.format_name == "blkdebug"
        assert dbg.filename == f"blkdebug:{conf}:{img}"
        j = await open_image(graph, 'json:{"driver": "null-co", "read-zeroes": true}',
                             read_only=False)
        assert j.format_name == "null-co"
        assert j.filename == 'json:{"read-zeroes": true, "driver": "null-co"}'

    run(body)


def test_filenames_follow_qemu(tmp_path: Path) -> None:
    img = raw_img(tmp_path)

    async def body(graph: BlockGraph) -> None:
        n = await open_blockdev(graph, {"driver": "null-co", "node-name": "n"})
        assert n.filename == "null-co://"
        r = await open_blockdev(graph, {"driver": "raw", "node-name": "r", "offset": 0,
                                        "file": {"driver": "file", "filename": img}})
        assert r.filename == ('json:{"offset": 0, "driver": "raw", "file": '
                              f'{{"driver": "file", "filename": "{img}"}}}}')

    run(body)


def test_close_all_flushes_and_empties(tmp_path: Path) -> None:
    img = raw_img(tmp_path)

    async def body(graph: BlockGraph) -> None:
        node = await open_blockdev(graph, {"driver": "raw", "node-name": "r",
                                           "file": {"driver": "file", "filename": img}})
        await node.write(0, b"\x5a" * 4096)
        await close_all(graph)
        assert not graph.nodes and not graph.monitor_owned

    run(body)
    assert Path(img).read_bytes()[:4096] == b"\x5a" * 4096


def test_probed_raw_guards_sector_zero(tmp_path: Path) -> None:
    img = raw_img(tmp_path)
    other = raw_img(tmp_path, "b.img")
    warnings: list[str] = []

    async def body(graph: BlockGraph) -> None:
        node = await open_image(graph, img, read_only=False, warn=warnings.append)
        assert node.format_name == "raw"
        await node.write(0, b"plain data")
        with pytest.raises(BlockIOError) as exc:
            await node.write(0, b"QFI\xfb" + bytes(508))
        assert exc.value.errno == errno.EPERM
        await node.write(0, b"QF")  # harmless on its own...
        with pytest.raises(BlockIOError):
            await node.write(2, b"I\xfb")  # ...but this completes a qcow2 magic
        await node.write(512, b"QFI\xfb")  # beyond sector 0: allowed
        explicit = await open_image(graph, other, "raw", read_only=False)
        await explicit.write(0, b"QFI\xfb")  # format given: no restriction

    run(body)
    assert warnings == [
        f"WARNING: Image format was not specified for '{img}' and probing guessed raw.\n"
        "         Automatically detecting the format is dangerous for raw images, write "
        "operations on block 0 will be restricted.\n"
        "         Specify the 'raw' format explicitly to remove the restrictions."
    ]


def test_drive_style_child_options_merge(tmp_path: Path) -> None:
    """-drive file=top.qcow2,node-name=top,backing.node-name=base,file.node-name=f"""
    base, top = str(tmp_path / "b.qcow2"), str(tmp_path / "t.qcow2")

    async def body(graph: BlockGraph) -> None:
        await img_create(base, "qcow2", MiB, quiet=True)
        await img_create(top, "qcow2", None, backing_file=base, backing_fmt="qcow2",
                         quiet=True)
        node = await open_image(graph, top, "qcow2", read_only=False, node_name="top",
                                options={"backing.node-name": "base", "file.node-name": "f",
                                         "file.locking": "off"})
        assert node.name == "top" and node.file is not None and node.file.name == "f"
        assert node.file.options["locking"] == "off"
        assert node.file.filename == top  # the merged file dict kept its filename
        assert node.backing is not None and node.backing.name == "base"
        assert node.backing.read_only and node.backing.file is not None

    run(body)
