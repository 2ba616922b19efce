"""The mirror's parts, each built alone: no Daemon, no job, only a graph and memory nodes.

The copier copies what is dirty and re-dirties what fails; while the guest writes it runs one
copy batch at a time; the active writer copies a write-blocking write itself and keeps the
tracker from marking it; the drain gate holds writes until it opens; the wiring inserts the
filter on attach and its exit either pivots every parent to the target or puts them back.
"""

from __future__ import annotations

import asyncio
import errno
import random
from typing import Any

import pytest

from blockmirror.block.graph import BlockGraph
from blockmirror.block.node import BlockNode
from blockmirror.errors import BlockIOError
from blockmirror.jobs.mirror import copier as copier_mod
from blockmirror.jobs.mirror.active import ActiveWriter
from blockmirror.jobs.mirror.copier import Copier, CopierConfig
from blockmirror.jobs.mirror.dirty import DirtyState
from blockmirror.jobs.mirror.gate import DrainGate
from blockmirror.jobs.mirror.inflight import InFlight
from blockmirror.jobs.mirror.params import MirrorParams
from blockmirror.jobs.mirror.wiring import MirrorWiring
from blockmirror.jobs.progress import Progress
from mirror_scripts.memory import drv, make_device, make_node

GRAN = 4096
SIZE = 256 * GRAN


class Control:
    """A stand-in for the job: never paused, cancelled or failed unless told."""

    def __init__(self) -> None:
        self.is_cancelled = False
        self.failed = False
        self.guest_busy = False
        self.slice_quota = 0.0
        self.charged = 0

    async def pause_point(self) -> None:
        await asyncio.sleep(0)

    def ratelimit_processed(self, nbytes: int) -> None:
        self.charged += nbytes


def _pair() -> tuple[BlockGraph, BlockNode, BlockNode]:
    g = BlockGraph()
    return g, make_node(g, "src", SIZE, cluster=GRAN), make_node(g, "tgt", SIZE, cluster=GRAN)


def _copier(src: BlockNode, tgt: BlockNode, control: Control,
            errors: list[tuple[bool, int]]) -> tuple[Copier, DirtyState, Progress]:
    dirty = DirtyState(SIZE, GRAN)
    progress = Progress()
    copier = Copier(src, tgt, dirty, InFlight(), progress, CopierConfig(GRAN, 64 * GRAN, True),
                    control, lambda is_read, e: errors.append((is_read, e.errno)))
    return copier, dirty, progress


async def _drain(copier: Copier, dirty: DirtyState, rounds: int = 200) -> None:
    for _ in range(rounds):
        if dirty.dirty_bytes() == 0:
            break
        await copier.iteration()
        await copier.inflight.wait_idle()


def test_copier_copies_what_is_dirty_and_zeroes_holes() -> None:
    async def main() -> None:
        _g, src, tgt = _pair()
        rng = random.Random(3)
        for i in range(0, SIZE, 2 * GRAN):  # every other chunk holds data
            await src.write(i, rng.randbytes(GRAN))
        await tgt.write(GRAN, b"\xee" * GRAN)  # stale data on the target, over a source hole
        control, errors = Control(), []
        copier, dirty, progress = _copier(src, tgt, control, errors)
        dirty.bitmap.mark_all()
        async with copier.running():
            await _drain(copier, dirty)
        assert errors == []
        assert await tgt.read(0, SIZE) == await src.read(0, SIZE)
        assert progress.copied == SIZE // 2 and progress.zeroed == SIZE // 2
        assert progress.current == SIZE
        assert control.charged == SIZE // 2  # zeroing an unmap-capable target is free

    asyncio.run(main())


def test_copier_redirties_a_failed_batch_and_reports_the_side() -> None:
    async def main() -> None:
        _g, src, tgt = _pair()
        await src.write(0, b"\x11" * SIZE)
        control, errors = Control(), []
        copier, dirty, progress = _copier(src, tgt, control, errors)
        dirty.bitmap.set_dirty(0, 8 * GRAN)
        drv(tgt).fail["write"] = errno.ENOSPC
        async with copier.running():
            await copier.iteration()
        assert errors == [(False, errno.ENOSPC)]
        assert dirty.dirty_bytes() == 8 * GRAN  # all of the batch is dirty again
        assert progress.redirtied == 8 * GRAN and progress.current == 0
        async with copier.running():  # the failure was once: the next pass copies it
            await _drain(copier, dirty)
        assert await tgt.read(0, 8 * GRAN) == b"\x11" * 8 * GRAN

    asyncio.run(main())


@pytest.mark.parametrize(("kind", "source_written", "cap"), [
    (copier_mod._KERNEL_BUFFERED, False, 1), (copier_mod._KERNEL_BUFFERED, True, 4),
    (copier_mod._KERNEL_DIRECT, False, 4), (copier_mod._THROUGH_PYTHON, False, 2)])
def test_copier_batches_in_flight(kind: str, source_written: bool, cap: int) -> None:
    """How many copy batches run at once: between buffered host files one of the whole
    buffer while nothing wrote the source (several would queue on the target's inode lock),
    a quarter of it each once something did (the pipeline keeps READY close under a busy
    guest), the same quarter with O_DIRECT, and through Python half of a 2 MiB budget (one
    reads while the other writes). The job's own guest flag changes none of it (copier.py)."""
    async def main() -> None:
        _g, src, tgt = _pair()
        await src.write(0, random.Random(1).randbytes(SIZE))
        control, errors = Control(), []
        copier, dirty, _progress = _copier(src, tgt, control, errors)
        copier._copy_kind = lambda: kind  # type: ignore[method-assign]
        if source_written:
            dirty.mark(0, GRAN)  # what a write to the source does (its dirty tracker)
        copier.config.buf_size = 16 * GRAN
        dirty.bitmap.mark_all()
        peak = {True: 0, False: 0}
        real_launch = copier._launch

        def launch(batch: Any, initial: bool = False) -> None:
            real_launch(batch, initial)
            busy = control.guest_busy
            peak[busy] = max(peak[busy], copier.inflight.copy_ops)

        copier._launch = launch  # type: ignore[method-assign]
        async with copier.running():
            control.guest_busy = True
            for _ in range(8):
                await copier.iteration()
            control.guest_busy = False
            await _drain(copier, dirty)
        assert peak[True] == cap
        assert peak[False] == cap
        assert await tgt.read(0, SIZE) == await src.read(0, SIZE)

    asyncio.run(main())


class Policy:
    def __init__(self) -> None:
        self.copy = True
        self.errors: list[int] = []

    def should_copy_to_target(self) -> bool:
        return self.copy

    def on_active_error(self, e: BlockIOError) -> None:
        self.errors.append(e.errno)


def _active(src: BlockNode, tgt: BlockNode) -> tuple[ActiveWriter, DirtyState, DrainGate,
                                                     list[bool]]:
    dirty = DirtyState(SIZE, GRAN)
    changes: list[bool] = []
    gate = DrainGate(changes.append)
    active = ActiveWriter(src, tgt, dirty, InFlight(), gate, Progress(), Policy(), unmap=True)
    src.dirty_trackers.append(dirty)
    src.interceptors.append(active)
    return active, dirty, gate, changes


def test_active_writer_copies_write_blocking_writes_itself() -> None:
    async def main() -> None:
        _g, src, tgt = _pair()
        active, dirty, _gate, _changes = _active(src, tgt)
        await src.write(3 * GRAN, b"\x42" * (2 * GRAN))
        assert await tgt.read(3 * GRAN, 2 * GRAN) == b"\x42" * (2 * GRAN)
        assert dirty.dirty_bytes() == 0  # synced: the tracker did not mark it
        assert active.progress.copied == 2 * GRAN
        assert isinstance(active.policy, Policy)
        active.policy.copy = False  # background mode: the tracker marks it instead
        await src.write(9 * GRAN, b"\x43" * GRAN)
        assert dirty.is_dirty(9 * GRAN) and await tgt.read(9 * GRAN, GRAN) == bytes(GRAN)

    asyncio.run(main())


def test_active_writer_sends_the_guests_bytes_without_reading_the_source() -> None:
    """Write-blocking copies the request's own payload (unaligned head and tail trimmed to
    what the dirty bitmap allows), not a read of the source."""
    async def main() -> None:
        _g, src, tgt = _pair()
        _active_writer, dirty, _gate, _changes = _active(src, tgt)
        reads: list[tuple[int, int]] = []
        real_read = src.driver.preadv

        async def spy(offset: int, length: int) -> bytes:
            reads.append((offset, length))
            return await real_read(offset, length)

        src.driver.preadv = spy  # type: ignore[method-assign]
        payload = bytes(range(256)) * (3 * GRAN // 256)
        await src.write(2 * GRAN, payload)
        dirty.bitmap.set_dirty(6 * GRAN, GRAN)  # a dirty tail chunk: left to the copy
        await src.write(5 * GRAN + 100, payload[: GRAN + 50])
        assert reads == []
        assert await tgt.read(2 * GRAN, 3 * GRAN) == payload
        assert await tgt.read(5 * GRAN + 100, GRAN - 100) == payload[: GRAN - 100]
        assert dirty.is_dirty(6 * GRAN)

    asyncio.run(main())


@pytest.mark.parametrize("inline", [True, False])
def test_write_blocking_writes_the_target_first_when_its_write_runs_inline(inline: bool) -> None:
    """A target write that will run on the loop thread goes first, in the guest's request;
    any other is overlapped with the source's write in a task of its own (which starts
    only once the source's write is under way)."""
    async def main() -> None:
        _g, src, tgt = _pair()
        active, dirty, _gate, _changes = _active(src, tgt)
        asked: list[tuple[BlockNode, int]] = []

        def target_inline(node: BlockNode, nbytes: int) -> bool:
            asked.append((node, nbytes))
            return inline

        active.target_inline = target_inline
        order: list[str] = []
        for name, node in (("source", src), ("target", tgt)):
            real = node.driver.pwritev

            async def spy(offset: int, data: Any, flags: Any, name: str = name,
                          real: Any = real) -> None:
                order.append(name)
                await real(offset, data, flags)

            node.driver.pwritev = spy  # type: ignore[method-assign]
        await src.write(4 * GRAN, b"\x51" * (2 * GRAN))
        assert asked == [(tgt, 2 * GRAN)]
        assert order == (["target", "source"] if inline else ["source", "target"])
        assert await tgt.read(4 * GRAN, 2 * GRAN) == b"\x51" * (2 * GRAN)
        assert dirty.dirty_bytes() == 0

    asyncio.run(main())


@pytest.mark.parametrize("inline", [True, False])
def test_a_failed_source_write_leaves_its_range_dirty(inline: bool) -> None:
    """Write-blocking writes the target beside (or before) the source: when the source's
    write fails, the target may hold bytes the source does not, so the range must be copied
    again from the source (the tracker marks only writes that succeed)."""
    async def main() -> None:
        _g, src, tgt = _pair()
        active, dirty, _gate, _changes = _active(src, tgt)
        active.target_inline = lambda _node, _n: inline

        async def failing(offset: int, data: Any, flags: Any) -> None:
            raise BlockIOError(errno.EIO, "injected")

        src.driver.pwritev = failing  # type: ignore[method-assign]
        with pytest.raises(BlockIOError):
            await src.write(4 * GRAN, b"\x77" * (2 * GRAN))
        assert await tgt.read(4 * GRAN, 2 * GRAN) == b"\x77" * (2 * GRAN)
        assert await src.read(4 * GRAN, 2 * GRAN) == bytes(2 * GRAN)
        assert dirty.is_dirty(4 * GRAN) and dirty.is_dirty(5 * GRAN)
        assert dirty.dirty_bytes() == 2 * GRAN

    asyncio.run(main())


def test_drain_gate_holds_writes_until_it_opens() -> None:
    async def main() -> None:
        _g, src, tgt = _pair()
        active, _dirty, gate, changes = _active(src, tgt)
        assert isinstance(active.policy, Policy)
        active.policy.copy = False
        gate.close()
        write = asyncio.ensure_future(src.write(0, b"\x01" * GRAN))
        for _ in range(20):
            await asyncio.sleep(0)
        assert not write.done() and await src.read(0, GRAN) == bytes(GRAN)
        gate.redirect = tgt  # as at the pivot: the held write reaches the target too
        gate.open()
        await write
        assert await src.read(0, GRAN) == await tgt.read(0, GRAN) == b"\x01" * GRAN
        assert changes == [True, False]

    asyncio.run(main())


def test_wiring_attach_and_exit_with_and_without_the_pivot() -> None:
    async def main() -> None:
        for pivot in (False, True):
            g, src, tgt = _pair()
            dev = make_device(g, src)
            wiring = MirrorWiring(g, "j", src, tgt, MirrorParams(), None)
            dirty = DirtyState(SIZE, GRAN)
            gate = DrainGate(wiring.quiesce_filter)
            active = ActiveWriter(src, tgt, dirty, InFlight(), gate, Progress(), Policy(),
                                  unmap=True)
            wiring.attach(dirty, active)
            assert wiring.filter is not None and dev.node is wiring.filter
            assert src.dirty_trackers == [dirty] and src.interceptors == [active]
            assert src.blockers and tgt.blockers
            released: list[BlockNode | None] = []
            await wiring.exit(pivot=pivot, release=released.append)
            assert wiring.filter is None and not src.dirty_trackers and not src.interceptors
            assert not src.blockers and not tgt.blockers
            assert dev.node is (tgt if pivot else src)
            assert released == [tgt if pivot else None]

    asyncio.run(main())
