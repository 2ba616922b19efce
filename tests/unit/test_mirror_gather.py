"""After READY, guest writes that land while a copy pass runs are gathered for ``GATHER_NS``
before the next pass (``MirrorJob._gather_left``), on virtual time.

Without the gathering, a guest writing all the time made the job run one pass per write (a
chunk or two dirty whenever an op ended). The scenario holds a copy op in the target's write,
lets a second guest write land meanwhile and then lets the op finish: the second chunk must
wait for the gathering time, not be copied at once, and a ``block-job-complete`` must not
wait for it at all.
"""

from __future__ import annotations

import asyncio
from typing import Any, NamedTuple

from blockmirror.block.driver import WriteFlags
from blockmirror.block.node import BlockNode
from blockmirror.daemon import Daemon
from blockmirror.jobs.mirror import MirrorJob, MirrorParams, start_mirror
from blockmirror.jobs.mirror.params import GATHER_NS
from blockmirror.jobs.ratelimit import SLICE_NS
from mirror_scripts.memory import make_device, make_node
from mirror_scripts.vclock import VirtualClock

KIB = 1024
MIB = 1024 * KIB
SEC = 1_000_000_000
GRAN = 64 * KIB
A, B = 0, 8 * GRAN


class Held:
    """A copy op stuck in the target's write until ``release``."""

    def __init__(self, target: BlockNode) -> None:
        self.gate: asyncio.Event | None = None
        self.entered = asyncio.Event()
        drv: Any = target.driver
        original = drv.pwritev

        async def pwritev(offset: int, data: bytes | memoryview, flags: WriteFlags) -> None:
            if self.gate is not None:
                self.entered.set()
                await self.gate.wait()
            await original(offset, data, flags)

        drv.pwritev = pwritev

    def hold(self) -> None:
        self.gate = asyncio.Event()
        self.entered.clear()

    def release(self) -> None:
        assert self.gate is not None
        self.gate.set()
        self.gate = None


class Rig(NamedTuple):
    clock: VirtualClock
    job: MirrorJob
    guest: BlockNode
    src: BlockNode
    tgt: BlockNode
    held: Held


async def ready_with_a_held_copy() -> Rig:
    """A READY job (on virtual time) whose copy of a guest write of 0x0a at ``A`` is held in
    the target's write."""
    clock = VirtualClock()
    d = Daemon(clock)
    src = make_node(d.graph, "src", 4 * MIB, cluster=GRAN)
    tgt = make_node(d.graph, "tgt", 4 * MIB, cluster=GRAN)
    dev = make_device(d.graph, src)
    held = Held(tgt)
    job = start_mirror(d.jobs, "j", src, tgt, MirrorParams(granularity=GRAN))
    assert await clock.advance_until(lambda: job.is_ready, 10 * SEC)
    guest = dev.node
    assert guest is not None
    # a pass starts on the job's next wake-up and its op is held in the target's write
    held.hold()
    await guest.write(A, b"\x0a" * GRAN)
    await clock.advance(SLICE_NS)
    assert held.entered.is_set(), "no copy pass started on the job's wake-up"
    return Rig(clock, job, guest, src, tgt, held)


async def _setup() -> tuple[VirtualClock, MirrorJob, BlockNode, Held]:
    clock, job, guest, _src, tgt, held = await ready_with_a_held_copy()
    # meanwhile the guest writes another chunk; then the op ends
    await guest.write(B, b"\x0b" * GRAN)
    held.release()
    await clock.settle()
    return clock, job, tgt, held


def test_a_write_during_a_pass_waits_for_the_gathering_time() -> None:
    async def main() -> None:
        clock, job, tgt, _held = await _setup()
        assert await tgt.read(A, GRAN) == b"\x0a" * GRAN
        assert job.dirty.is_dirty(B) and job.inflight.ops == 0
        await clock.advance(GATHER_NS - 1)
        assert job.dirty.is_dirty(B), "copied before the gathering time was up"
        await clock.advance(1)
        assert not job.dirty.is_dirty(B)
        assert await tgt.read(B, GRAN) == b"\x0b" * GRAN
        await job.cancel(force=True)
        await clock.advance_until(lambda: job.is_completed, SEC)

    asyncio.run(main())


def test_complete_does_not_wait_for_the_gathering_time() -> None:
    async def main() -> None:
        clock, job, tgt, _held = await _setup()
        assert job.dirty.is_dirty(B)
        before = clock.now_ns()
        await job.complete()
        await clock.settle()
        assert job.is_completed
        assert clock.now_ns() == before
        assert await tgt.read(B, GRAN) == b"\x0b" * GRAN

    asyncio.run(main())


def test_a_ready_pass_takes_scattered_chunks_from_the_whole_disk() -> None:
    """A pass after READY takes the dirty chunks after its position and then, wrapping
    around once, those before it, all in one op: chunks farther apart than eight buffers
    used to wait for a pass each."""

    async def main() -> None:
        from blockmirror.jobs.mirror import copier

        clock = VirtualClock()
        d = Daemon(clock)
        size, buf = 64 * MIB, MIB
        src = make_node(d.graph, "src", size, cluster=GRAN)
        tgt = make_node(d.graph, "tgt", size, cluster=GRAN)
        dev = make_device(d.graph, src)
        held = Held(tgt)
        job = start_mirror(d.jobs, "j", src, tgt, MirrorParams(granularity=GRAN, buf_size=buf))
        assert await clock.advance_until(lambda: job.is_ready, 10 * SEC)
        guest = dev.node
        assert guest is not None
        # one pass copies a chunk in the middle of the disk and is held there
        held.hold()
        await guest.write(30 * MIB, b"\x01" * GRAN)
        await clock.advance(SLICE_NS)
        assert held.entered.is_set()
        spots = [40 * MIB, 60 * MIB, 2 * MIB, 20 * MIB]  # after the position, then before it
        for i, spot in enumerate(spots):
            await guest.write(spot, bytes([0x10 + i]) * GRAN)
        ops: list[list[tuple[int, int]]] = []
        original = copier.copy_extents

        async def counting(s: BlockNode, t: BlockNode, extents: Any) -> None:
            ops.append(list(extents))
            await original(s, t, extents)

        copier.copy_extents = counting  # type: ignore[assignment]
        try:
            held.release()
            await clock.advance(GATHER_NS)
            await clock.settle()
        finally:
            copier.copy_extents = original  # type: ignore[assignment]
        assert ops == [[(s, GRAN) for s in sorted(spots)]], ops
        for i, spot in enumerate(spots):
            assert await tgt.read(spot, GRAN) == bytes([0x10 + i]) * GRAN
        assert job.dirty.dirty_bytes() == 0
        await job.cancel(force=True)
        await clock.advance_until(lambda: job.is_completed, SEC)

    asyncio.run(main())
