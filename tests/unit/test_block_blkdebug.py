"""blkdebug: events arm inject-error rules, set-state moves the state machine, config files."""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from blockmirror.block.create import create_file
from blockmirror.block.graph import BlockGraph
from blockmirror.block.node import BlockNode
from blockmirror.block.options import close_all, open_blockdev, open_image
from blockmirror.errors import BlockIOError, BlockMirrorError

MiB = 1024 * 1024


def with_raw_over_blkdebug(
    tmp_path: Path, dbg: dict[str, Any], body: Callable[[BlockNode], Awaitable[None]]
) -> None:
    img = str(tmp_path / "a.img")

    async def main() -> None:
        await create_file(img, 2 * MiB)
        graph = BlockGraph()
        try:
            node = await open_blockdev(graph, {
                "driver": "raw", "node-name": "r",
                "file": {"driver": "blkdebug", "node-name": "dbg",
                         "image": {"driver": "file", "filename": img}, **dbg},
            })
            await body(node)
        finally:
            await close_all(graph)

    asyncio.run(main())


def test_read_aio_error_every_time(tmp_path: Path) -> None:
    async def body(node: BlockNode) -> None:
        await node.write(0, b"x" * 512)  # writes are not read_aio: no error
        for _ in range(3):
            with pytest.raises(BlockIOError) as exc:
                await node.read(0, 512)
            assert exc.value.errno == errno.EIO
            assert str(exc.value) == "Input/output error"

    with_raw_over_blkdebug(tmp_path, {"inject-error": [{"event": "read_aio"}]}, body)


def test_once_sector_and_errno(tmp_path: Path) -> None:
    async def body(node: BlockNode) -> None:
        await node.read(0, 4096)  # not the sector: fine, but the rule is now armed
        with pytest.raises(BlockIOError) as exc:
            await node.read(MiB - 512, 1024)
        assert exc.value.errno == errno.ENOSPC
        await node.read(MiB, 512)  # once: gone

    with_raw_over_blkdebug(tmp_path, {"inject-error": [
        {"event": "read_aio", "errno": errno.ENOSPC, "sector": MiB // 512, "once": True}
    ]}, body)


def test_iotype_write_and_flush_to_disk(tmp_path: Path) -> None:
    async def body(node: BlockNode) -> None:
        await node.read(0, 512)
        with pytest.raises(BlockIOError):
            await node.write(0, b"y" * 512)
        await node.read(0, 512)  # the write rule does not touch reads
        with pytest.raises(BlockIOError) as exc:
            await node.flush()
        assert exc.value.errno == errno.EROFS

    with_raw_over_blkdebug(tmp_path, {"inject-error": [
        {"event": "write_aio", "iotype": "write"},
        {"event": "flush_to_disk", "errno": errno.EROFS, "iotype": "flush"},
    ]}, body)


def test_state_machine_from_config_file(tmp_path: Path) -> None:
    """The 041 TestReadErrors script: fail once in state 1, toggle states on every read."""
    conf = tmp_path / "dbg.conf"
    conf.write_text(
        '\n[inject-error]\nstate = "1"\nevent = "read_aio"\nerrno = "5"\n'
        'immediately = "off"\nonce = "on"\nsector = "2048"\n\n'
        '[set-state]\nstate = "1"\nevent = "read_aio"\nnew_state = "2"\n\n'
        '[set-state]\nstate = "2"\nevent = "read_aio"\nnew_state = "1"\n'
    )

    async def body(node: BlockNode) -> None:
        dbg = node.file
        assert dbg is not None
        assert dbg.driver.state == 1  # type: ignore[attr-defined]
        await node.read(0, 512)  # event in state 1: armed, moves to 2; offset 0 is not hit
        assert dbg.driver.state == 2  # type: ignore[attr-defined]
        # event in state 2 arms nothing new, but the rule armed in state 1 stays active
        # until an event injects again: this read hits its sector and fails (once)
        with pytest.raises(BlockIOError):
            await node.read(MiB, 512)
        assert dbg.driver.state == 1  # type: ignore[attr-defined]
        await node.read(MiB, 512)  # once: the rule is gone for good
        await node.read(MiB, 512)

    with_raw_over_blkdebug(tmp_path, {"config": str(conf)}, body)


def test_legacy_filename_and_probe(tmp_path: Path) -> None:
    img = str(tmp_path / "b.img")
    conf = tmp_path / "c.conf"
    conf.write_text('[inject-error]\nevent = "read_aio"\n')

    async def main() -> None:
        await create_file(img, MiB)
        graph = BlockGraph()
        try:
            node = await open_image(graph, f"blkdebug:{conf}:{img}", "raw", read_only=True)
            with pytest.raises(BlockIOError):
                await node.read(0, 512)
        finally:
            await close_all(graph)

    asyncio.run(main())


@pytest.mark.parametrize(
    ("dbg", "text"),
    [
        ({"inject-error": [{"event": "nope"}]}, "Parameter 'event' does not accept value 'nope'"),
        ({"inject-error": [{"event": "read_aio", "iotype": "x"}]},
         "Parameter 'iotype' does not accept value 'x'"),
        ({"set-state": [{"event": "read_aio", "state": 1}]}, "Parameter 'new_state' is missing"),
        ({"config": "/nonexistent.conf"},
         "Could not read blkdebug config file: No such file or directory"),
        ({"align": 3000}, "Cannot meet constraints with align 3000"),
    ],
)
def test_bad_options(tmp_path: Path, dbg: dict[str, Any], text: str) -> None:
    async def body(node: BlockNode) -> None:
        raise AssertionError("opened")

    with pytest.raises(BlockMirrorError) as exc:
        with_raw_over_blkdebug(tmp_path, dbg, body)
    assert str(exc.value) == text


def test_child_perms_options(tmp_path: Path) -> None:
    """unshare-child-perms makes a second user of the image conflict (041 orphaned source)."""
    img = str(tmp_path / "a.img")

    async def main() -> None:
        await create_file(img, MiB)
        graph = BlockGraph()
        try:
            await open_blockdev(graph, {"driver": "file", "node-name": "f", "filename": img,
                                        "locking": "off"})
            await open_blockdev(graph, {"driver": "blkdebug", "node-name": "d1", "image": "f",
                                        "unshare-child-perms": ["write"]})
            with pytest.raises(BlockMirrorError, match="Permission conflict on node 'f'"):
                await open_blockdev(graph, {"driver": "blkdebug", "node-name": "d2",
                                            "image": "f", "take-child-perms": ["write"]})
        finally:
            await close_all(graph)

    asyncio.run(main())


def test_flush_without_new_writes_skips_flush_to_disk(tmp_path: Path) -> None:
    """cf. flushed_gen: QEMU only raises flush_to_disk when something was written."""

    async def body(node: BlockNode) -> None:
        await node.flush()  # nothing written yet: no event, no error
        await node.write(0, b"z" * 512)
        with pytest.raises(BlockIOError):
            await node.flush()
        await node.flush()  # once: gone

    with_raw_over_blkdebug(tmp_path, {"inject-error": [
        {"event": "flush_to_disk", "once": True}]}, body)
