"""Shared test helpers.

``require_tool(name)`` skips a test when a peer tool (qemu-img, qemu-nbd, nbdkit, ...) is not
installed, except under CI=true, where a missing peer is a failure: CI must prove interop.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_tool(*names: str) -> None:
    for name in names:
        if shutil.which(name) is None:
            if IN_CI:
                pytest.fail(f"peer tool {name!r} is missing (CI=true requires it)")
            pytest.skip(f"peer tool {name!r} is not installed")


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    return tmp_path


@pytest.fixture(scope="session")
def ceph_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One single-node Ceph cluster (scripts/ceph-cluster) for the session's rbd tests:
    pools ``rbd`` and ``rbd2``; skipped without Ceph, failed under CI=true."""
    from ceph_helpers import cluster_session

    yield from cluster_session(tmp_path_factory.mktemp("ceph"))
