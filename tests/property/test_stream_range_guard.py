"""Property: the stream's RangeGuard never lets a copy and an overlapping guest write run at
the same time, and every request finishes (no deadlock), whatever the interleaving."""

from __future__ import annotations

import asyncio

from hypothesis import given, settings
from hypothesis import strategies as st

from blockmirror.block.node import BlockNode
from blockmirror.jobs.commit.serialise import RangeGuard

_REQ = st.tuples(st.sampled_from(["copy", "write"]), st.integers(0, 15), st.integers(1, 4),
                 st.integers(0, 3))


@settings(max_examples=200, deadline=None)
@given(st.lists(_REQ, min_size=1, max_size=12))
def test_copies_and_overlapping_writes_never_run_together(
        reqs: list[tuple[str, int, int, int]]) -> None:
    async def main() -> None:
        guard = RangeGuard()
        node = BlockNode(name="n")
        active: list[tuple[str, int, int]] = []

        def enter(kind: str, start: int, end: int) -> None:
            for k, s, e in active:
                if k != kind and s < end and start < e:
                    raise AssertionError(f"{kind} {start}-{end} overlaps {k} {s}-{e}")
            active.append((kind, start, end))

        async def hold(yields: int) -> None:
            for _ in range(yields):
                await asyncio.sleep(0)

        async def one(kind: str, start: int, length: int, yields: int, delay: int) -> None:
            await hold(delay)
            end = start + length
            if kind == "copy":
                async with guard.copying(start, length):
                    enter(kind, start, end)
                    await hold(yields)
                    active.remove((kind, start, end))
            else:
                async def proceed() -> None:
                    enter(kind, start, end)
                    await hold(yields)
                    active.remove((kind, start, end))
                await guard.around_write(node, "write", start, length, proceed)

        await asyncio.wait_for(asyncio.gather(
            *(one(k, s, n, y, i % 3) for i, (k, s, n, y) in enumerate(reqs))), 10)
        assert not active

    asyncio.run(main())
