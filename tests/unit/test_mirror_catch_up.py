"""A soft cancel (or a completion) in READY closes the drain gate to new guest writes while
the job copies what is left (``MirrorJob._catch_up``), on virtual time.

Without it, the job waited for a moment with nothing dirty and nothing in flight while the
guest kept writing; a guest at queue depth 1 could re-dirty a chunk as each copy ended, and
the cancel then waited on the event loop's scheduling (0.6-0.9 s under a max-rate writer on
uvloop). The scenario holds a copy op in the target's write, asks for the soft cancel,
lets the guest write once more, then releases the op: the next pass copies that write and
closes the gate, so a third write waits until the job has ended, and the target stays the
point-in-time copy without it.
"""

from __future__ import annotations

import asyncio

from test_mirror_gather import GRAN, SEC, A, B, ready_with_a_held_copy

C = 16 * GRAN


def test_guest_writes_wait_while_a_soft_cancel_catches_up() -> None:
    async def main() -> None:
        clock, job, guest, src, tgt, held = await ready_with_a_held_copy()
        # the soft cancel arrives while A's copy is in flight, and the guest writes B
        await job.cancel(force=False)
        await guest.write(B, b"\x0b" * GRAN)
        assert not job.gate.closed
        # A's copy ends; the next pass copies B (held again) and closes the gate
        held.release()
        held.hold()
        await clock.settle()
        assert held.entered.is_set(), "B was not copied"
        assert job.gate.closed, "the soft cancel did not close the gate for its catch-up"
        late = asyncio.ensure_future(guest.write(C, b"\x0c" * GRAN))
        await clock.settle()
        assert not late.done(), "a guest write went through during the catch-up"
        held.release()
        await clock.advance_until(lambda: job.is_completed, SEC)
        await clock.settle()
        assert late.done() and late.exception() is None
        assert not job.gate.closed
        assert await tgt.read(A, GRAN) == b"\x0a" * GRAN
        assert await tgt.read(B, GRAN) == b"\x0b" * GRAN
        assert await tgt.read(C, GRAN) == bytes(GRAN), "the target is not a point-in-time copy"
        assert await src.read(C, GRAN) == b"\x0c" * GRAN

    asyncio.run(main())
