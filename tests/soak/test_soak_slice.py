"""CI slice of the soak (``make soak DURATION=3600`` runs the long one): SOAK_SECONDS
(default 60) of randomized mirror rounds against one daemon; every outcome is checked
(see soak.py) and no round may fail."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, require_tool

pytestmark = pytest.mark.interop


def test_soak_slice(tmp_path: object) -> None:
    require_tool("qemu-img", "qemu-io")
    seconds = float(os.environ.get("SOAK_SECONDS", "60"))
    seed = int(os.environ.get("SOAK_SEED", "11"))
    proc = subprocess.run(
        [sys.executable, "-m", "tests.soak.run", "--duration", str(seconds), "--seed",
         str(seed), "--workdir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
        timeout=seconds + 600)
    out = proc.stdout + proc.stderr
    summary = [json.loads(line[5:]) for line in out.splitlines() if line.startswith("SOAK ")]
    print(out[-3000:])
    assert proc.returncode == 0, out[-5000:]
    assert summary and summary[0]["failures"] == 0, out[-5000:]
    assert summary[0]["rounds"] >= 3, summary
