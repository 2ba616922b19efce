"""The conformance battery on every driver of the block core, plus driver-specific behaviour."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from blockmirror.block import threadio
from blockmirror.block.create import create_file, img_create
from blockmirror.block.driver import BlockStatus
from blockmirror.block.graph import BlockGraph
from blockmirror.block.options import close_all, open_blockdev
from blockmirror.errors import BlockIOError, BlockMirrorError
from conformance import BatteryFailure, run_battery

MiB = 1024 * 1024


async def _with_node(options: dict[str, Any], body: Any) -> None:
    graph = BlockGraph()
    try:
        node = await open_blockdev(graph, options)
        await body(node)
    finally:
        await close_all(graph)
    assert not graph.nodes


def _file(path: Path, **extra: Any) -> dict[str, Any]:
    return {"driver": "file", "filename": str(path), **extra}


def _make(path: Path, size: int = 4 * MiB) -> Path:
    asyncio.run(create_file(str(path), size))
    return path


@pytest.mark.parametrize("seed", [1, 2])
def test_battery_file(tmp_path: Path, seed: int) -> None:
    img = _make(tmp_path / "a.img")
    asyncio.run(_with_node({**_file(img), "node-name": "f", "discard": "unmap"},
                           lambda n: run_battery(n, seed=seed)))


def test_battery_raw_over_file(tmp_path: Path) -> None:
    img = _make(tmp_path / "a.img")
    asyncio.run(_with_node({"driver": "raw", "node-name": "r", "file": _file(img)},
                           lambda n: run_battery(n, seed=3)))


def test_battery_raw_window(tmp_path: Path) -> None:
    img = _make(tmp_path / "a.img")

    async def body(node: Any) -> None:
        assert node.length() == 2 * MiB
        await run_battery(node, seed=4)

    asyncio.run(_with_node({"driver": "raw", "node-name": "r", "offset": MiB,
                            "size": 2 * MiB, "file": _file(img)}, body))
    # the window never touched the bytes around it
    whole = img.read_bytes()
    assert not any(whole[:MiB]) and not any(whole[3 * MiB :])


def test_battery_file_o_direct(direct_dir: Path) -> None:
    img = _make(direct_dir / "battery-direct.img")

    async def body(node: Any) -> None:
        assert node.file.driver.request_alignment >= 512
        await run_battery(node, seed=5, rounds=40)

    asyncio.run(_with_node({"driver": "raw", "node-name": "r", "cache": {"direct": True},
                            "file": _file(img)}, body))


def test_battery_null_co() -> None:
    asyncio.run(_with_node({"driver": "null-co", "node-name": "n", "size": 8 * MiB},
                           lambda n: run_battery(n, seed=6, stores_data=False)))


def test_battery_null_read_zeroes() -> None:
    # read-zeroes nodes read back as zeroes: the model holds only for writes of zeroes, so
    # check status instead
    async def body(node: Any) -> None:
        ext = await node.block_status(0, node.length())
        assert ext.status & BlockStatus.ZERO and ext.length == node.length()
        assert not any(await node.read(4096, 4096))

    asyncio.run(_with_node({"driver": "null-aio", "node-name": "n", "read-zeroes": True}, body))


def test_battery_blkdebug(tmp_path: Path) -> None:
    img = _make(tmp_path / "a.img")
    asyncio.run(_with_node(
        {"driver": "blkdebug", "node-name": "d", "image": _file(img)},
        lambda n: run_battery(n, seed=7),
    ))


def test_battery_blkdebug_aligned(tmp_path: Path) -> None:
    """align=4096 forces the generic path's read-modify-write for every unaligned request."""
    img = _make(tmp_path / "a.img")

    async def body(node: Any) -> None:
        assert node.driver.request_alignment == 4096
        assert node.driver.max_transfer == 64 * 1024
        await run_battery(node, seed=8)

    asyncio.run(_with_node({"driver": "blkdebug", "node-name": "d", "align": 4096,
                            "max-transfer": 65536, "image": _file(img)}, body))


def test_battery_qcow2(tmp_path: Path) -> None:
    img = str(tmp_path / "a.qcow2")
    asyncio.run(img_create(img, "qcow2", 4 * MiB, quiet=True))
    asyncio.run(_with_node({"driver": "qcow2", "node-name": "q", "discard": "unmap",
                            "file": _file(Path(img))}, lambda n: run_battery(n, seed=9)))


def test_battery_detects_a_lying_driver(tmp_path: Path) -> None:
    """The battery must be able to fail: a raw window whose reads are shifted."""
    img = _make(tmp_path / "a.img")

    async def body(node: Any) -> None:
        drv = node.driver
        real = drv.preadv

        async def shifted(offset: int, length: int) -> bytes:
            return await real(min(offset + 512, node.length() - length), length)

        drv.preadv = shifted
        with pytest.raises(BatteryFailure):
            await run_battery(node, seed=10, rounds=10)

    asyncio.run(_with_node({"driver": "raw", "node-name": "r", "file": _file(img)}, body))


# --- file driver specifics ----------------------------------------------------------------


def test_file_block_status_sparse(tmp_path: Path) -> None:
    img = tmp_path / "s.img"
    with open(img, "wb") as f:
        f.truncate(4 * MiB)
        f.seek(MiB)
        f.write(b"\xaa" * 65536)

    async def body(node: Any) -> None:
        ext = await node.block_status(0, node.length())
        assert ext.status & BlockStatus.ZERO and not ext.status & BlockStatus.DATA
        assert ext.length == MiB
        ext = await node.block_status(MiB, node.length() - MiB)
        assert ext.status & BlockStatus.DATA and ext.length == 65536
        assert ext.map_offset == MiB
        await node.write_zeroes(MiB, 65536, may_unmap=True)
        ext = await node.block_status(MiB, 65536)
        assert ext.status & BlockStatus.ZERO
        assert (await threadio.fstat(node.driver.fd)).st_blocks == 0

    asyncio.run(_with_node({**_file(img), "node-name": "f", "discard": "unmap"}, body))


def test_file_unaligned_size_rounds_up(tmp_path: Path) -> None:
    img = tmp_path / "odd.img"
    img.write_bytes(b"\x01" * 1000)

    async def body(node: Any) -> None:
        assert node.length() == 1024
        data = await node.read(0, 1024)
        assert data == b"\x01" * 1000 + bytes(24)

    asyncio.run(_with_node({**_file(img), "node-name": "f"}, body))


def test_file_truncate_and_errors(tmp_path: Path) -> None:
    img = _make(tmp_path / "a.img", MiB)

    async def body(node: Any) -> None:
        await node.driver.truncate(2 * MiB)
        assert node.length() == 2 * MiB
        assert (await threadio.fstat(node.driver.fd)).st_size == 2 * MiB
        await node.driver.truncate(3 * MiB, "full")
        assert (await threadio.fstat(node.driver.fd)).st_blocks * 512 >= MiB

    asyncio.run(_with_node({**_file(img), "node-name": "f"}, body))


def test_file_read_only_refuses_writes(tmp_path: Path) -> None:
    img = _make(tmp_path / "a.img", MiB)

    async def body(node: Any) -> None:
        with pytest.raises(BlockIOError):
            await node.write(0, b"x" * 512)

    asyncio.run(_with_node({**_file(img), "node-name": "f", "read-only": True}, body))


def test_file_aio_native_needs_direct(tmp_path: Path) -> None:
    img = _make(tmp_path / "a.img", MiB)
    with pytest.raises(BlockMirrorError, match=r"aio=native was specified, but it requires "
                                               "cache.direct=on"):
        asyncio.run(_with_node({**_file(img), "node-name": "f", "aio": "native"},
                               lambda n: asyncio.sleep(0)))


def test_null_latency_and_status() -> None:
    async def body(node: Any) -> None:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await node.read(0, 512)
        assert loop.time() - t0 >= 0.009
        ext = await node.block_status(0, 4096)
        assert not ext.status & (BlockStatus.DATA | BlockStatus.ZERO)
        assert not ext.status & BlockStatus.ALLOCATED

    asyncio.run(_with_node({"driver": "null-co", "node-name": "n", "latency-ns": 10_000_000},
                           body))
