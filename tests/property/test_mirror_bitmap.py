"""The mirror's dirty bitmap against a set-of-granules model (hypothesis)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from blockmirror.block.dirty_bitmap import DirtyBitmap

ops_st = st.lists(st.tuples(st.sampled_from(("mark", "clear")), st.integers(0, 70_000),
                            st.integers(0, 20_000)), max_size=40)


@settings(max_examples=300, deadline=None)
@given(size=st.integers(1, 66_000), gran_shift=st.integers(9, 13), ops=ops_st,
       probe=st.integers(0, 70_000))
def test_bitmap_matches_set_model(size: int, gran_shift: int, ops: list[tuple[str, int, int]],
                                  probe: int) -> None:
    gran = 1 << gran_shift
    bm = DirtyBitmap(size, gran)
    model: set[int] = set()
    for kind, off, length in ops:
        end = min(off + length, size)
        granules = set(range(off // gran, (end + gran - 1) // gran)) if off < end else set()
        if kind == "mark":
            bm.mark(off, length)
            model |= granules
        else:
            bm.clear(off, length)
            model -= granules
    assert bm.dirty_granules() == len(model)
    assert bm.dirty_count() == len(model) * gran
    expect = min((g for g in model if g >= probe // gran), default=None)
    got = bm.next_dirty(probe)
    assert got == (None if expect is None or probe >= size else expect * gran)
    covered: set[int] = set()
    for start, length in bm.runs():
        assert start % gran == 0 and length > 0
        assert start + length <= size
        covered |= set(range(start // gran, (start + length + gran - 1) // gran))
    assert covered == model
