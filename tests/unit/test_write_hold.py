"""hold_writes: writes wait while a node is held, holds nest, reads pass; and two internal
snapshots of one node in one transaction while a guest writes (the holds must not wait for
each other)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from blockmirror.block.create import img_create
from blockmirror.block.drivers.qcow2 import Qcow2Driver
from blockmirror.block.node import BlockNode
from blockmirror.block.options import open_blockdev
from blockmirror.block.write_hold import hold_writes
from blockmirror.daemon import Daemon
from blockmirror.qmp.commands import snapshot_internal  # noqa: F401  (registers the action)
from blockmirror.qmp.commands import transaction as tx
from blockmirror.qmp.registry import CommandContext


async def _node(d: Daemon, tmp: Path) -> BlockNode:
    path = tmp / "a.qcow2"
    await img_create(str(path), "qcow2", 1 << 20, quiet=True)
    await open_blockdev(d.graph, {"driver": "qcow2", "node-name": "a", "file": {
        "driver": "file", "filename": str(path)}})
    return d.graph.nodes["a"]


def test_writes_wait_for_the_last_holder_and_reads_pass(tmp_path: Path) -> None:
    async def main() -> None:
        d = Daemon()
        node = await _node(d, tmp_path)
        async with hold_writes(node) as outer:
            write = asyncio.ensure_future(node.write(0, b"x" * 512))
            async with hold_writes(node) as inner:
                assert inner is outer and outer.holders == 2
                await asyncio.sleep(0.01)
                assert not write.done() and outer.held == 1
                assert await node.read(0, 4) == bytes(4)
            await asyncio.sleep(0.01)
            assert not write.done()  # still held by the outer holder
        await write
        assert await node.read(0, 1) == b"x"
        assert not node.interceptors
        await d.shutdown()

    asyncio.run(main())


def test_two_internal_snapshots_of_one_node_in_one_transaction(tmp_path: Path) -> None:
    async def main() -> None:
        d = Daemon()
        node = await _node(d, tmp_path)
        writes = [asyncio.ensure_future(node.write(i * 65536, b"w" * 4096)) for i in range(8)]
        await asyncio.wait_for(tx.run_transaction(CommandContext(d), [
            {"type": "blockdev-snapshot-internal-sync", "data": {"device": "a", "name": n}}
            for n in ("s1", "s2")], {}), 10)
        await asyncio.gather(*writes)
        drv = node.driver
        assert isinstance(drv, Qcow2Driver) and drv.header.nb_snapshots == 2
        await d.shutdown()

    asyncio.run(main())
