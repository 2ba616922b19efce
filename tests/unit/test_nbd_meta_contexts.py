"""QEMU's NBD meta contexts: which queries select what (sans-IO handshake), and the extents
of qemu:dirty-bitmap:NAME, including NBD_CMD_FLAG_REQ_ONE's single extent."""

from __future__ import annotations

import pytest

from blockmirror.block.bitmaps import NamedBitmap
from blockmirror.block.dirty_bitmap import DirtyBitmap
from blockmirror.export.nbd_meta import bitmap_extents
from blockmirror.nbd.constants import TransmissionFlag
from blockmirror.nbd.handshake import ExportInfo, _select_contexts

EXPORT = ExportInfo("e", 1 << 20, TransmissionFlag.HAS_FLAGS, allocation_depth=True,
                    bitmaps=("b0", "b1"))
PLAIN = ExportInfo("p", 1 << 20, TransmissionFlag.HAS_FLAGS)

ALL = {0: "base:allocation", 1: "qemu:allocation-depth", 2: "qemu:dirty-bitmap:b0",
       3: "qemu:dirty-bitmap:b1"}


@pytest.mark.parametrize(("queries", "listing", "want"), [
    ([], True, ALL),
    ([], False, {}),
    (["base:"], True, {0: ALL[0]}),
    (["base:"], False, {}),
    (["qemu:"], True, {k: v for k, v in ALL.items() if k}),
    (["qemu:"], False, {}),
    (["qemu:dirty-bitmap:"], True, {2: ALL[2], 3: ALL[3]}),
    (["qemu:dirty-bitmap:b1", "base:allocation"], False, {0: ALL[0], 3: ALL[3]}),
    (["qemu:allocation-depth"], False, {1: ALL[1]}),
    (["qemu:dirty-bitmap:nope", "other:x", "qemu:bogus"], False, {}),
])
def test_context_selection(queries: list[str], listing: bool, want: dict[int, str]) -> None:
    assert _select_contexts(EXPORT, queries, listing) == want


def test_no_qemu_contexts_without_bitmaps_or_depth() -> None:
    assert _select_contexts(PLAIN, [], True) == {0: "base:allocation"}
    assert _select_contexts(PLAIN, ["qemu:allocation-depth", "qemu:"], True) == {}


def test_bitmap_extents_cover_the_range() -> None:
    named = NamedBitmap("b", DirtyBitmap(1 << 20, 65536))
    named.bitmap.mark(65536, 1)
    named.bitmap.mark(3 * 65536, 2 * 65536)
    assert bitmap_extents(named, 0, 1 << 20) == [
        (65536, 0), (65536, 1), (65536, 0), (131072, 1), ((1 << 20) - 5 * 65536, 0)]
    # clipped to the request, which need not be granule-aligned
    assert bitmap_extents(named, 70000, 200000) == [
        (131072 - 70000, 1), (65536, 0), (270000 - 196608, 1)]
    # REQ_ONE: one extent
    assert bitmap_extents(named, 0, 1 << 20, limit=1) == [(65536, 0)]
    assert bitmap_extents(named, 65536, 1 << 19, limit=1) == [(65536, 1)]
