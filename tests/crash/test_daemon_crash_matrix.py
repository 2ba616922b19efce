"""Crash matrix (issue 15): SIGKILL of the daemon at seeded random points of live mirrors.

Every combination of source format (raw, qcow2), target (a file the daemon creates, a
qemu-nbd export) and phase (copy, READY, write-blocking copy, pivot, cancel) runs once per
seed; CRASH_SEEDS=N runs N seeds each (default 1, the CI slice). See crash_matrix.py for
what is checked.
"""

from __future__ import annotations

import os
import sys
import zlib
from pathlib import Path

import pytest

from conftest import require_tool

sys.path.insert(0, str(Path(__file__).resolve().parent))
from crash_matrix import PHASES, run_scenario

pytestmark = pytest.mark.interop

SEEDS = range(int(os.environ.get("CRASH_SEEDS", "1")))
BASE_SEED = int(os.environ.get("CRASH_SEED", "2026"))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("target", ["file", "nbd"])
@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_daemon_killed_during_mirror(tmp_path: Path, fmt: str, target: str, phase: str,
                                     seed: int) -> None:
    require_tool("qemu-img", "qemu-io", "qemu-nbd")
    s = zlib.crc32(f"{BASE_SEED}:{fmt}:{target}:{phase}:{seed}".encode())
    out = run_scenario(tmp_path, s, fmt, target, phase)
    print(f"CRASH {out}")
    assert out["writes"] > 0, out
