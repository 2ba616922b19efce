"""The generic request path (block/io.py) over an in-memory driver that checks its contract."""

from __future__ import annotations

import asyncio
import errno

import pytest

from blockmirror.block.driver import BlockStatus
from blockmirror.errors import BlockIOError
from conformance import mem_node, run_battery


def test_battery_on_aligned_memory() -> None:
    node, _ = mem_node()
    asyncio.run(run_battery(node, seed=11, rounds=80))


def test_unaligned_write_is_read_modify_write() -> None:
    node, drv = mem_node()

    async def main() -> None:
        drv.buf[:8192] = b"\x11" * 8192
        await node.write(100, b"\x22" * 10)
        assert drv.buf[:100] == b"\x11" * 100 and drv.buf[100:110] == b"\x22" * 10
        assert drv.buf[110:8192] == b"\x11" * (8192 - 110)
        assert drv.calls == [("read", 0, 4096), ("write", 0, 4096)]

    asyncio.run(main())


def test_concurrent_unaligned_writes_do_not_lose_data() -> None:
    node, drv = mem_node()

    async def main() -> None:
        await asyncio.gather(*(node.write(i * 100, bytes([i + 1]) * 100) for i in range(40)))
        for i in range(40):
            assert drv.buf[i * 100 : i * 100 + 100] == bytes([i + 1]) * 100

    asyncio.run(main())


def test_zeroes_edges_discard_inner_and_fallback() -> None:
    node, drv = mem_node()

    async def main() -> None:
        drv.buf[:] = b"\xff" * len(drv.buf)
        await node.write_zeroes(1000, 10000)
        assert not any(drv.buf[1000:11000]) and drv.buf[999] == 0xFF and drv.buf[11000] == 0xFF
        assert ("zero", 4096, 4096) in drv.calls
        drv.calls.clear()
        await node.discard(1000, 10000)  # only [4096, 8192) is a whole aligned block
        assert [c for c in drv.calls if c[0] == "discard"] == [("discard", 4096, 4096)]

    asyncio.run(main())

    node2, drv2 = mem_node(zeroes=False)

    async def fallback() -> None:
        drv2.buf[:] = b"\xff" * len(drv2.buf)
        await node2.write_zeroes(0, 200 * 1024)
        assert not any(drv2.buf[: 200 * 1024])
        with pytest.raises(BlockIOError) as exc:
            await node2.write_zeroes(0, 4096, no_fallback=True)
        assert exc.value.errno == errno.ENOTSUP

    asyncio.run(fallback())


def test_dirty_tracking_detect_zeroes_and_drain() -> None:
    node, drv = mem_node()
    marks: list[tuple[int, int]] = []

    class Tracker:
        def mark(self, offset: int, length: int) -> None:
            marks.append((offset, length))

    node.dirty_trackers.append(Tracker())
    node.detect_zeroes = "on"

    async def main() -> None:
        await node.write(0, bytes(8192))
        assert ("zero", 0, 8192) in drv.calls and ("write", 0, 8192) not in drv.calls
        await node.write(8192, b"a" * 4096)
        assert marks == [(0, 8192), (8192, 4096)]
        task = asyncio.ensure_future(node.write(0, b"b" * 65536))
        await asyncio.sleep(0)
        assert node.in_flight == 1
        await node.drain()
        assert node.in_flight == 0 and task.done()

    asyncio.run(main())


@pytest.mark.parametrize("kind", ["write", "zero", "discard"])
@pytest.mark.parametrize("hooked", [False, True])
def test_a_failed_change_still_marks_the_dirty_trackers(kind: str, hooked: bool) -> None:
    """As QEMU's bdrv_co_write_req_finish: a write, zero or discard that fails may have
    changed part of its range, so the trackers (a mirror's, a user's bitmap) see it; the
    request still fails, and is marked before the node counts it as finished (a drain that
    ends sees the mark). With and without an interceptor (the short path and the hooked
    one)."""
    node, drv = mem_node()
    seen: list[tuple[int, int, int]] = []

    class Tracker:
        def mark(self, offset: int, length: int) -> None:
            seen.append((offset, length, node.in_flight))

    class Passing:
        async def around_write(self, node: object, kind: str, offset: int, length: int,
                               proceed: object) -> None:
            await proceed()  # type: ignore[operator]

    async def failing(*_args: object) -> None:
        raise BlockIOError(errno.EIO, "injected")

    for name in ("pwritev", "pwrite_zeroes", "pdiscard"):
        setattr(drv, name, failing)
    node.dirty_trackers.append(Tracker())
    if hooked:
        node.interceptors.append(Passing())  # type: ignore[arg-type]

    async def main() -> None:
        gen = node.write_gen
        with pytest.raises(BlockIOError):
            if kind == "write":
                await node.write(4096, b"x" * 8192)
            elif kind == "zero":
                await node.write_zeroes(4096, 8192)
            else:
                await node.discard(4096, 8192)
        assert seen == [(4096, 8192, 1)]
        assert node.in_flight == 0 and node.write_gen == gen + 1

    asyncio.run(main())


def test_block_status_adds_allocated_and_eof() -> None:
    node, _ = mem_node(size=8192)

    async def main() -> None:
        ext = await node.block_status(4096, 4096)
        assert ext.status & BlockStatus.ALLOCATED and ext.status & BlockStatus.EOF
        ext = await node.block_status(0, 4096)
        assert not ext.status & BlockStatus.EOF
        with pytest.raises(BlockIOError):
            await node.block_status(8192, 1)

    asyncio.run(main())


def test_alignment_larger_than_a_short_node() -> None:
    """A 1.5 KiB node on a 4 KiB-aligned driver: the tail block is partial."""
    node, drv = mem_node(size=1536, align=512)
    drv.request_alignment = 4096  # as blkdebug align=4096 over a short file

    async def main() -> None:
        await node.write(100, b"\x77" * 1400)
        assert len(drv.buf) == 1536
        assert await node.read(0, 1536) == bytes(100) + b"\x77" * 1400 + bytes(36)
        assert await node.read(1500, 36) == bytes(36)

    asyncio.run(main())
