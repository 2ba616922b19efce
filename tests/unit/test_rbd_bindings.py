"""librbd's Python bindings in the venv, the way ``make tools`` provides them.

Debian builds ``rbd`` and ``rados`` for its own python3; the Makefile links just those two
modules into ``<venv>/ceph-bindings`` and names that directory in a ``.pth`` file, so the
venv imports them without seeing the rest of dist-packages. Skipped outside a venv or
without the packages (failed under CI=true, where ``make tools`` must have set this up).
"""

from __future__ import annotations

import os
import sys
import sysconfig
from pathlib import Path

import pytest

from conftest import IN_CI


def _need(cond: bool, why: str) -> None:
    if not cond:
        if IN_CI:
            pytest.fail(f"{why} (CI=true: make tools must provide it)")
        pytest.skip(why)


def test_bindings_come_from_the_venvs_own_directory() -> None:
    _need(sys.prefix != sys.base_prefix, "not running in a venv")
    bindings = Path(sys.prefix) / "ceph-bindings"
    _need(bindings.is_dir(), f"{bindings} is missing (make tools)")
    pth = Path(sysconfig.get_paths()["purelib"]) / "blockmirror-ceph.pth"
    assert pth.read_text().strip() == str(bindings.resolve())
    import rados
    import rbd

    for mod in (rbd, rados):
        assert Path(mod.__file__).parent.resolve() == bindings.resolve(), mod.__file__
    # only those two: Debian's dist-packages as a whole stays out of the venv
    assert sorted(p.name.split(".")[0] for p in bindings.iterdir()) == ["rados", "rbd"]
    assert not any(p.rstrip(os.sep).endswith("dist-packages") for p in sys.path)
    assert rbd.RBD().version() >= (1, 12, 0)
