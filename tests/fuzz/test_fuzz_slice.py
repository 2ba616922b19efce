"""CI slice of the fuzz harnesses (fuzz/): a short, seeded, deterministic run of each.

``make fuzz`` runs them for a set time (coverage-guided with atheris when installed) and
``make fuzz FUZZ_INPUTS=1000000`` a million inputs each. Here every harness gets a fixed
number of inputs from the seeded random engine (saved crash inputs first: they are the
regression corpus), in a subprocess (the harnesses sandbox their process: cwd, file size
limit), and must report no new finding. Known findings (fuzz/known.py) have strict-xfail
tests in test_fuzz_regressions.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from blockmirror.qapi import checks as schema_checks
from conftest import ROOT, require_tool

SLICE = {"keyval": 5000, "qmp": 1500, "nbd_server": 3000, "qcow2": 1500, "nbd_client": 200}


@pytest.mark.parametrize("harness", sorted(SLICE))
def test_seeded_fuzz_slice(harness: str) -> None:
    if harness == "qcow2":
        require_tool("qemu-img", "qemu-io")  # the bases are qemu-img-made
    n = SLICE[harness]
    # the schema checks stay on (a violation is an internal error: a Finding), but the
    # harness reports them itself, not through the conftest's shared violation log
    env = {k: v for k, v in os.environ.items() if k != schema_checks.ENV_LOG}
    proc = subprocess.run(
        [sys.executable, "-m", "fuzz.run", "--engine", "random", "--inputs", str(n),
         "--seed", "15", "--log", "", harness],  # the campaign log is not CI's
        cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    out = proc.stdout + proc.stderr
    results = [json.loads(line.split(" ", 1)[1]) for line in out.splitlines()
               if line.startswith("RESULT ")]
    assert proc.returncode == 0, out
    assert len(results) == 1, out
    assert results[0]["inputs"] >= n, results
    assert results[0]["new"] == 0, out


def test_saved_crash_inputs_are_replayed() -> None:
    """Every saved crash input is part of the corpus the slice replays first."""
    crashes = Path(ROOT, "fuzz", "crashes")
    for path in sorted(crashes.glob("*")) if crashes.is_dir() else []:
        harness = path.name.rsplit("-", 1)[0]
        assert harness in SLICE, f"{path.name}: unknown harness"
