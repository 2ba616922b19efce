"""Named bitmaps against set models (hypothesis).

- ``DirtyBitmap``'s serialisation (``to_bytes``/``load_bytes``: the qcow2 layout), its
  ``sha256`` (QEMU's hbitmap_sha256 over 64-bit words) and ``merge_from`` across
  granularities, each against a set of dirty granules;
- the QMP actions of ``block/bitmaps.py`` as a state machine: every action either fails with
  nothing changed, or is prepared and then committed or aborted; an abort restores exactly
  the state before it (what a transaction relies on).
"""

from __future__ import annotations

import asyncio
import hashlib

from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from blockmirror.block import bitmaps
from blockmirror.block.dirty_bitmap import DirtyBitmap
from blockmirror.block.drivers import load_all
from blockmirror.block.graph import BlockGraph
from blockmirror.block.options import open_blockdev
from blockmirror.errors import BlockMirrorError

load_all()

ranges_st = st.lists(st.tuples(st.integers(0, 300_000), st.integers(1, 40_000)), max_size=12)


def _model(size: int, granularity: int, ranges: list[tuple[int, int]]) -> set[int]:
    dirty: set[int] = set()
    for offset, length in ranges:
        end = min(offset + length, size)
        if offset < end:
            dirty |= set(range(offset // granularity, -(-end // granularity)))
    return dirty


def _bits_of(data: bytes) -> set[int]:
    return {i for i in range(len(data) * 8) if data[i // 8] >> (i % 8) & 1}


@settings(max_examples=200, deadline=None)
@given(size=st.integers(1, 300_000), shift=st.integers(9, 14), ranges=ranges_st)
def test_serialisation_and_digest_match_the_model(size: int, shift: int,
                                                   ranges: list[tuple[int, int]]) -> None:
    granularity = 1 << shift
    bitmap = DirtyBitmap(size, granularity)
    for offset, length in ranges:
        bitmap.mark(offset, length)
    model = _model(size, granularity, ranges)
    raw = bitmap.to_bytes()
    # granule i is bit i % 8 of byte i // 8 (qcow2 bitmap data, little-endian bit order)
    assert _bits_of(raw) == model
    words = max(1, -(-bitmap.granules // 64))
    packed = bytearray(words * 8)
    for granule in model:
        packed[granule // 8] |= 1 << (granule % 8)
    assert bitmap.sha256() == hashlib.sha256(bytes(packed)).hexdigest()
    # a chunk at a byte boundary loads back into a fresh bitmap at the same place
    split = (bitmap.granules // 16) * 8
    copy = DirtyBitmap(size, granularity)
    copy.load_bytes(bitmap.to_bytes(0, split), 0)
    copy.load_bytes(bitmap.to_bytes(split), split)
    assert copy.copy_bits() == bitmap.copy_bits()


@settings(max_examples=200, deadline=None)
@given(size=st.integers(1, 300_000), dest_shift=st.integers(9, 14),
       src_shift=st.integers(9, 14), dest_ranges=ranges_st, src_ranges=ranges_st)
def test_merge_across_granularities(size: int, dest_shift: int, src_shift: int,
                                    dest_ranges: list[tuple[int, int]],
                                    src_ranges: list[tuple[int, int]]) -> None:
    dest = DirtyBitmap(size, 1 << dest_shift)
    source = DirtyBitmap(size, 1 << src_shift)
    for offset, length in dest_ranges:
        dest.mark(offset, length)
    for offset, length in src_ranges:
        source.mark(offset, length)
    expected = _model(size, 1 << dest_shift, dest_ranges)
    # every destination granule overlapping a dirty source granule becomes dirty
    for granule in _model(size, 1 << src_shift, src_ranges):
        start = granule << src_shift
        end = min(start + (1 << src_shift), size)
        expected |= set(range(start >> dest_shift, -(-end >> dest_shift)))
    saved = dest.copy()
    dest.merge_from(source)
    assert _bits_of(dest.to_bytes()) == expected
    dest.restore(saved)
    assert dest.copy_bits() == saved.copy_bits()


class BitmapActions(RuleBasedStateMachine):
    """The QMP actions on a node's bitmaps, prepared then committed or aborted."""

    names = st.sampled_from(["a", "b", "c"])

    def __init__(self) -> None:
        super().__init__()
        self.graph = BlockGraph()
        asyncio.run(open_blockdev(self.graph, {"driver": "null-co", "node-name": "n0",
                                               "size": 1 << 20}))
        self.node = self.graph.nodes["n0"]

    def _state(self) -> list[tuple[str, int, bool, bytes]]:
        return [(b.name, b.granularity, b.enabled, b.bitmap.to_bytes()) for b in
                self.node.bitmaps]

    def _apply(self, make: object, commit: bool) -> None:
        before = self._state()
        try:
            prepared = make() if callable(make) else None  # type: ignore[operator]
            if asyncio.iscoroutine(prepared):
                prepared = asyncio.run(prepared)
        except BlockMirrorError:
            assert self._state() == before  # a refused action changes nothing
            return
        assert isinstance(prepared, bitmaps.Prepared)
        if commit:
            prepared.commit()
        else:
            prepared.abort()
            assert self._state() == before

    @rule(name=names, shift=st.integers(9, 16), disabled=st.booleans(), commit=st.booleans())
    def add(self, name: str, shift: int, disabled: bool, commit: bool) -> None:
        self._apply(lambda: bitmaps.prepare_add(self.graph, "n0", name, 1 << shift, False,
                                                disabled), commit)

    @rule(name=names, commit=st.booleans())
    def remove(self, name: str, commit: bool) -> None:
        self._apply(lambda: bitmaps.prepare_remove(self.graph, "n0", name), commit)

    @rule(name=names, commit=st.booleans())
    def clear(self, name: str, commit: bool) -> None:
        self._apply(lambda: bitmaps.prepare_clear(self.graph, "n0", name), commit)

    @rule(name=names, enable=st.booleans(), commit=st.booleans())
    def toggle(self, name: str, enable: bool, commit: bool) -> None:
        self._apply(lambda: bitmaps.prepare_enable(self.graph, "n0", name, enable), commit)

    @rule(destination=names, sources=st.lists(names, max_size=3), commit=st.booleans())
    def merge(self, destination: str, sources: list[str], commit: bool) -> None:
        self._apply(
            lambda: bitmaps.prepare_merge(self.graph, "n0", destination, list(sources)), commit
        )

    @rule(offset=st.integers(0, 1 << 20), length=st.integers(1, 200_000))
    def guest_write(self, offset: int, length: int) -> None:
        length = min(length, (1 << 20) - offset)
        if length <= 0:
            return
        before = {b.name: b.bitmap.copy() for b in self.node.bitmaps}
        asyncio.run(self.node.write(offset, bytes(length)))
        for named in self.node.bitmaps:
            expected = before[named.name]
            if named.enabled:
                expected.set_dirty(offset, length)
            assert named.bitmap.copy_bits() == expected.copy_bits()

    @invariant()
    def trackers_are_the_bitmaps(self) -> None:
        assert sorted(map(id, self.node.dirty_trackers)) == sorted(map(id, self.node.bitmaps))
        assert all(not b.busy for b in self.node.bitmaps)


TestBitmapActions = BitmapActions.TestCase
TestBitmapActions.settings = settings(max_examples=60, stateful_step_count=25, deadline=None)
