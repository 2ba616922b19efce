"""Per-node accounting (query-blockstats) and write thresholds on the generic request path."""

from __future__ import annotations

import asyncio
from typing import Any

from blockmirror.block.graph import BlockGraph
from blockmirror.block.write_threshold import set_write_threshold
from nbd_helpers import ram_node


def test_counters_and_highest_offset() -> None:
    async def main() -> None:
        g = BlockGraph()
        n = ram_node(g, "n", 1 << 20)
        await n.write(4096, b"x" * 8192)
        await n.write_zeroes(65536, 4096)
        await n.read(0, 512)
        await n.read(0, 100)
        await n.discard(0, 4096)
        await n.flush()
        s = n.stats.to_qapi(counters=True)
        assert (s["wr_bytes"], s["wr_operations"]) == (8192 + 4096, 2)
        assert (s["rd_bytes"], s["rd_operations"]) == (612, 2)
        assert (s["unmap_bytes"], s["unmap_operations"]) == (4096, 1)
        assert s["flush_operations"] == 1
        assert s["wr_highest_offset"] == 65536 + 4096
        # what QEMU shows for a node: only the highest offset
        q = n.stats.to_qapi()
        assert q["wr_bytes"] == q["rd_operations"] == 0
        assert q["wr_highest_offset"] == 65536 + 4096

    asyncio.run(main())


def test_write_threshold_fires_once() -> None:
    async def main() -> None:
        g = BlockGraph()
        n = ram_node(g, "n", 1 << 20, discard_unmap=False)
        events: list[tuple[str, dict[str, Any]]] = []
        set_write_threshold(n, 65536, lambda name, data: events.append((name, data)))
        await n.write(0, b"a" * 65536)  # ends exactly at the threshold: nothing
        await n.discard(65536, 4096)  # ignored by the node (discard=ignore): nothing
        assert events == [] and n.write_threshold == 65536
        await n.write_zeroes(60000, 10000)
        assert events == [("BLOCK_WRITE_THRESHOLD", {
            "node-name": "n", "amount-exceeded": 70000 - 65536, "write-threshold": 65536})]
        assert n.write_threshold == 0 and n.interceptors == []
        await n.write(900000, b"b")
        assert len(events) == 1
        set_write_threshold(n, -1, lambda name, data: events.append((name, data)))
        assert n.write_threshold == (1 << 64) - 1

    asyncio.run(main())
