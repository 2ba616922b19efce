"""The backup's pure parts: the copy bitmap's claims, the sync bitmap hand-over, and the
qcow2 snapshot table codec."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blockmirror.block.bitmaps import NamedBitmap
from blockmirror.block.dirty_bitmap import DirtyBitmap
from blockmirror.block.drivers.qcow2.snapshot_write import (
    SnapshotEntry,
    encode_table,
    find,
    new_id,
    parse_entries,
)
from blockmirror.jobs.backup.copy_state import BlockCopyState
from blockmirror.jobs.backup.sync_bitmap import SyncBitmap
from blockmirror.qapi.block_core import BitmapSyncMode

K = 1024
CS = 64 * K


class _Node:
    """What the copy state and the sync bitmap read of a node."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.dirty_trackers: list[Any] = []

    def length(self) -> int:
        return self.size


def _state(size: int = 16 * CS) -> BlockCopyState:
    progress: list[int] = []
    st_ = BlockCopyState(_Node(size), _Node(size), CS, progress.append,  # type: ignore[arg-type]
                         lambda n: None)
    st_.bitmap.mark_all()
    return st_


def test_claims_take_runs_and_clear_their_bits_before_any_io() -> None:
    s = _state()
    a = s.claim_next(4 * CS)
    assert a is not None and (a.first, a.end) == (0, 4)
    assert s.bitmap.dirty_count() == 12 * CS and s.remaining() == 16 * CS
    b = s.claim_next(100 * CS)
    assert b is not None and (b.first, b.end) == (4, 16)
    assert s.claim_next(CS) is None and s.busy
    s.abandon(a)  # failed: dirty again, nobody holds it
    assert s.bitmap.dirty_count() == 4 * CS and a.done.is_set()
    c = s.claim_next(CS)
    assert c is not None and (c.first, c.end) == (0, 1)


def test_a_write_waits_for_the_copy_of_its_clusters_then_copies_only_what_is_left() -> None:
    async def main() -> None:
        s = _state()
        bg = s.claim_next(2 * CS)  # clusters 0 and 1 are being copied by the job
        assert bg is not None
        got: list[list[tuple[int, int]]] = []

        async def guest_write() -> None:
            claims = await s.claim_range(CS + 10, 2 * CS)  # touches clusters 1..3
            got.append([(c.first, c.end) for c in claims])

        task = asyncio.ensure_future(guest_write())
        await asyncio.sleep(0)
        assert not task.done()  # waiting for the job's copy of cluster 1
        s._release(bg, failed=False)
        await task
        assert got == [[(2, 4)]]  # cluster 1 was copied by the job; 2 and 3 remain

    asyncio.run(main())


def test_reset_skips_clusters_and_updates_remaining() -> None:
    seen: list[int] = []
    s = BlockCopyState(_Node(8 * CS), _Node(8 * CS), CS, lambda n: None,  # type: ignore[arg-type]
                       seen.append)
    s.bitmap.mark_all()
    s.reset(2 * CS, 3 * CS)
    assert seen == [5 * CS] and not s.bitmap.is_dirty(3 * CS) and s.bitmap.is_dirty(5 * CS)


@given(st.lists(st.tuples(st.integers(0, 15), st.integers(1, 6), st.booleans()),
                max_size=40))
def test_every_cluster_is_copied_once_whatever_the_order(
        ops: list[tuple[int, int, bool]]) -> None:
    """Guest writes and job runs interleave; failures re-dirty; in the end each cluster was
    copied successfully exactly once."""

    async def main() -> None:
        s = _state()
        copied: list[int] = []

        async def copy(claims: Any, fail: bool) -> None:
            for c in claims:
                await asyncio.sleep(0)
                if fail:
                    s.abandon(c)
                else:
                    copied.extend(range(c.first, c.end))
                    s._release(c, failed=False)

        tasks = []
        for first, n, fail in ops:
            claims = await s.claim_range(first * CS, n * CS)
            tasks.append(asyncio.ensure_future(copy(claims, fail)))
            job = s.claim_next(2 * CS)
            if job is not None:
                tasks.append(asyncio.ensure_future(copy([job], False)))
        await asyncio.gather(*tasks)
        while (job := s.claim_next(4 * CS)) is not None:
            await copy([job], False)
        assert sorted(copied) == list(range(16))
        assert s.remaining() == 0

    asyncio.run(main())


# --- the sync bitmap ------------------------------------------------------------------------


def _sync(mode: BitmapSyncMode) -> tuple[_Node, NamedBitmap, SyncBitmap]:
    node = _Node(16 * CS)
    named = NamedBitmap("b0", DirtyBitmap(node.size, CS))
    named.bitmap.set_dirty(0, 4 * CS)  # what the user's bitmap held
    node.dirty_trackers.append(named)
    sb = SyncBitmap(node, named, mode)  # type: ignore[arg-type]
    return node, named, sb


@pytest.mark.parametrize(("mode", "success", "expect"), [
    # (writes during the job dirty cluster 8; the job left clusters 2..3 uncopied)
    (BitmapSyncMode.ON_SUCCESS, True, {8}),
    (BitmapSyncMode.ON_SUCCESS, False, {0, 1, 2, 3, 8}),
    (BitmapSyncMode.NEVER, True, {0, 1, 2, 3, 8}),
    (BitmapSyncMode.NEVER, False, {0, 1, 2, 3, 8}),
    (BitmapSyncMode.ALWAYS, True, {8}),
    (BitmapSyncMode.ALWAYS, False, {2, 3, 8}),
])
def test_bitmap_modes_hand_the_bitmap_back_as_qemu(mode: BitmapSyncMode, success: bool,
                                                  expect: set[int]) -> None:
    node, named, sb = _sync(mode)
    assert named.busy and not named.bitmap.enabled
    assert sb.successor in node.dirty_trackers
    for tracker in node.dirty_trackers:  # a guest write during the job
        tracker.mark(8 * CS, 100)
    uncopied = DirtyBitmap(node.size, CS)
    uncopied.set_dirty(2 * CS, 2 * CS)
    sb.finish(success, uncopied)
    sb.finish(not success, None)  # once only
    got = {o // CS for o, n in named.bitmap.runs() for o in range(o, o + n, CS)}
    assert got == expect
    assert not named.busy and named.bitmap.enabled
    assert sb.successor not in node.dirty_trackers


# --- the qcow2 snapshot table --------------------------------------------------------------

_names = st.text(st.characters(min_codepoint=33, max_codepoint=0x2FF), min_size=1,
                 max_size=20)
_entries = st.builds(
    SnapshotEntry, st.integers(0, 1 << 40).map(lambda x: x << 16), st.integers(0, 1 << 20),
    st.integers(1, 99999).map(str), _names, st.integers(0, 2**32 - 1),
    st.integers(0, 999_999_999), st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1),
    st.binary(max_size=40))


@given(st.lists(_entries, max_size=8))
def test_snapshot_table_round_trips_byte_for_byte(entries: list[SnapshotEntry]) -> None:
    raw = encode_table(entries)
    assert len(raw) % 8 == 0
    back = parse_entries(raw, len(entries))
    assert back == entries
    assert encode_table(back) == raw


def test_ids_names_and_lookups_follow_qemu() -> None:
    def e(ident: str, name: str) -> SnapshotEntry:
        return SnapshotEntry(0, 0, ident, name, 0, 0, 0, 0, b"")

    entries = [e("1", "a"), e("7", "b"), e("x", "c")]
    assert new_id([]) == "1" and new_id(entries) == "8"
    assert find(entries, None, "b") == 1 and find(entries, "7", None) == 1
    assert find(entries, "1", "b") is None and find(entries, None, None) is None
    info = SnapshotEntry(0, 0, "3", "n", 5, 6, 3_000_000_007, 0,
                         bytes(16) + b"\xff" * 8).info()
    assert info == {"id": "3", "name": "n", "vm-state-size": 0, "date-sec": 5,
                    "date-nsec": 6, "vm-clock-sec": 3, "vm-clock-nsec": 7}
