"""DirtyBitmap: granule rounding, scans and counts."""

from __future__ import annotations

import pytest

from blockmirror.block.dirty_bitmap import DirtyBitmap


def test_mark_rounds_out_to_granules() -> None:
    bm = DirtyBitmap(1 << 20, 4096)
    bm.mark(4095, 2)
    assert list(bm.runs()) == [(0, 8192)]
    assert bm.dirty_count() == 8192
    assert bm.is_dirty(0) and bm.is_dirty(8191) and not bm.is_dirty(8192)


def test_clear_next_dirty_and_clean() -> None:
    bm = DirtyBitmap(100 * 4096, 4096)
    bm.mark(10 * 4096, 5 * 4096)
    bm.mark(50 * 4096, 1)
    assert bm.next_dirty(0) == 10 * 4096
    assert bm.next_dirty(15 * 4096) == 50 * 4096
    assert bm.next_dirty(51 * 4096) is None
    assert bm.next_clean(10 * 4096) == 15 * 4096
    bm.clear(10 * 4096, 4096)
    assert bm.next_dirty(0) == 11 * 4096
    assert bm.dirty_granules() == 5
    assert bm.count_range(0, 20 * 4096) == 4


def test_unaligned_size_last_run_is_clipped() -> None:
    bm = DirtyBitmap(10_000, 4096)
    bm.mark_all()
    assert list(bm.runs()) == [(0, 10_000)]
    assert bm.dirty_count() == 3 * 4096  # QEMU counts whole granules


def test_disabled_bitmap_ignores_mark_but_set_dirty_works() -> None:
    bm = DirtyBitmap(65536, 512)
    bm.enabled = False
    bm.mark(0, 512)
    assert bm.dirty_count() == 0
    bm.set_dirty(0, 512)
    assert bm.dirty_count() == 512


def test_out_of_range_is_ignored_and_resize_keeps_bits() -> None:
    bm = DirtyBitmap(8192, 4096)
    bm.mark(8192, 4096)
    assert bm.dirty_count() == 0
    bm.mark(4096, 1)
    bm.resize(16384)
    assert list(bm.runs()) == [(4096, 4096)]
    bm.resize(4096)
    assert bm.dirty_count() == 0


def test_granularity_must_be_power_of_two() -> None:
    with pytest.raises(ValueError):
        DirtyBitmap(4096, 3000)


def test_memory_is_about_one_bit_per_granule() -> None:
    bm = DirtyBitmap(1 << 40, 65536)  # 1 TiB at 64 KiB: 16 Mi bits = 2 MiB
    assert bm.copy_bits().nbytes <= (1 << 24) // 8 + 8
