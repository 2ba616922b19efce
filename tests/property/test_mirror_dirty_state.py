"""The mirror's DirtyState against a model: a set of dirty chunks and a set of chunks in flight.

Hypothesis drives guest writes (``mark``), writes the active mirror copied itself
(``expect_synced`` then ``mark``), the copier taking runs (``run_end`` + ``take``) and
finishing them (``release``, failed or not), and checks after every step that the bitmap, the
in-flight bits, the dirty byte count and the redirtied bytes reported to the job all agree
with the model.
"""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from blockmirror.jobs.mirror.dirty import DirtyState

GRAN = 4096
CHUNKS = 32
SIZE = GRAN * CHUNKS - 1000  # the last chunk is partial, as at the end of a real disk


def _chunks(offset: int, length: int) -> set[int]:
    end = min(offset + length, SIZE)
    if end <= offset:
        return set()
    return set(range(offset // GRAN, (end - 1) // GRAN + 1))


class DirtyStateMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.newly: list[int] = []
        self.state = DirtyState(SIZE, GRAN, self.newly.append)
        self.dirty: set[int] = set()
        self.busy: set[int] = set()
        #: runs taken by the copier and not released yet
        self.taken: list[tuple[int, int]] = []
        self.expected_newly: list[int] = []

    @rule(offset=st.integers(0, SIZE - 1), length=st.integers(1, 3 * GRAN))
    def guest_write(self, offset: int, length: int) -> None:
        touched = _chunks(offset, length)
        self.expected_newly.append(
            0 if touched & self.dirty else min(length, SIZE - offset))
        self.dirty |= touched
        self.state.mark(offset, length)

    @rule(offset=st.integers(0, SIZE - 1), length=st.integers(1, 3 * GRAN))
    def active_write(self, offset: int, length: int) -> None:
        # the active mirror copied it: the tracker must not mark it
        self.state.expect_synced(offset, length)
        self.state.mark(offset, length)

    @rule(start=st.integers(0, CHUNKS - 1), max_chunks=st.integers(1, 8))
    def copier_takes_a_run(self, start: int, max_chunks: int) -> None:
        offset = self.state.next_dirty(start * GRAN)
        if offset is None:
            assert not self.dirty
            return
        chunk = offset // GRAN
        # next_dirty wraps around to 0 like the copier's iteration position
        later = sorted(c for c in self.dirty if c >= start)
        assert chunk == (later[0] if later else min(self.dirty))
        if chunk in self.busy:
            return  # the copier waits for the conflict first
        end = self.state.run_end(offset, max_chunks * GRAN)
        run = _chunks(offset, end - offset)
        # a run: consecutive dirty chunks, none in flight, at most max_chunks
        assert run and min(run) == chunk
        assert run <= self.dirty and not run & self.busy
        assert len(run) <= max_chunks
        assert run == set(range(chunk, chunk + len(run)))
        self.state.take(offset, end - offset)
        self.dirty -= run
        self.busy |= run
        self.taken.append((offset, end - offset))

    @precondition(lambda self: self.taken)
    @rule(index=st.integers(0, 100), failed=st.booleans())
    def copier_finishes_a_run(self, index: int, failed: bool) -> None:
        offset, length = self.taken.pop(index % len(self.taken))
        run = _chunks(offset, length)
        self.state.release(offset, length, failed=failed)
        self.busy -= run
        if failed:
            self.dirty |= run

    @invariant()
    def agrees_with_the_model(self) -> None:
        bits = self.state.bitmap.copy_bits()
        assert {i for i in range(CHUNKS) if bits[i]} == self.dirty
        busy = self.state.in_flight.copy_bits()
        assert {i for i in range(CHUNKS) if busy[i]} == self.busy
        assert self.state.dirty_bytes() == len(self.dirty) * GRAN
        assert self.newly == self.expected_newly


DirtyStateMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40,
                                              deadline=None)
TestDirtyState = DirtyStateMachine.TestCase
