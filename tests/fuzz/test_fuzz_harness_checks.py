"""The fuzz harnesses' own invariant checks can fail (a check that cannot fail finds nothing).

The harnesses were made faster (fuzz/README.md); these pin that the faster checks still
see what the slow ones saw.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType

import pytest

from conftest import ROOT


def _harness(name: str) -> ModuleType:
    """fuzz/<name>.py: ``fuzz`` here names tests/fuzz (a namespace package on the path), so
    the top-level fuzz package is imported aside and the names restored afterwards."""
    saved = {k: v for k, v in sys.modules.items() if k == "fuzz" or k.startswith("fuzz.")}
    for k in saved:
        del sys.modules[k]
    sys.path.insert(0, str(ROOT))
    try:
        return importlib.import_module(f"fuzz.{name}")
    finally:
        sys.path.remove(str(ROOT))
        for k in [k for k in sys.modules if k == "fuzz" or k.startswith("fuzz.")]:
            del sys.modules[k]
        sys.modules.update(saved)


_NS = _harness("h_nbd_server")
Finding, PATTERN, SIZE, check_changes = _NS.Finding, _NS.PATTERN, _NS.SIZE, _NS.check_changes


def test_nbd_server_change_outside_an_acknowledged_write_is_a_finding() -> None:
    after = bytearray(PATTERN)
    after[70000] ^= 0xFF
    with pytest.raises(Finding, match="byte 70000 changed"):
        check_changes(PATTERN, bytes(after), [(0, 65536), (70001, 10)])


@pytest.mark.parametrize("covered", [[(69632, 4096)], [(0, SIZE)], [(70000, 1)],
                                     [(65536, 1 << 40)]])
def test_nbd_server_change_inside_an_acknowledged_write_is_fine(
        covered: list[tuple[int, int]]) -> None:
    after = bytearray(PATTERN)
    after[70000] = 0
    check_changes(PATTERN, bytes(after), covered)


def test_nbd_server_last_byte_checked() -> None:
    after = bytearray(PATTERN)
    after[SIZE - 1] ^= 1
    with pytest.raises(Finding, match=f"byte {SIZE - 1} changed"):
        check_changes(PATTERN, bytes(after), [(0, SIZE - 1)])
