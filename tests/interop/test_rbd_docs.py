"""docs/rbd.md's recipe, run as written: a local qcow2 disk moves live into Ceph.

The shell block that starts with ``scripts/ceph-cluster start $PWD/ceph`` is extracted and run
with bash -e in an empty directory (its own cluster, started and stopped by the recipe), with
the venv's ``blockmirror`` first on the PATH; it must succeed and QEMU's rbd driver must read
the guest's write and find the images identical.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ceph_helpers import require_ceph, stop
from conftest import ROOT, require_tool

pytestmark = pytest.mark.interop


def _recipe() -> str:
    text = (ROOT / "docs" / "rbd.md").read_text()
    for block in re.findall(r"```sh\n(.*?)```", text, re.S):
        if block.startswith("scripts/ceph-cluster start $PWD/ceph"):
            return block.replace("scripts/ceph-cluster", str(ROOT / "scripts" / "ceph-cluster"))
    raise AssertionError("docs/rbd.md has no recipe block")


def test_rbd_recipe_runs_as_written(tmp_path: Path) -> None:
    require_tool("qemu-img", "qemu-io")
    require_ceph()
    script = tmp_path / "recipe.sh"
    script.write_text(_recipe())
    env = {**os.environ,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    try:
        proc = subprocess.run(["bash", "-e", str(script)], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=180)
    finally:
        stop(tmp_path / "ceph")  # in case the recipe failed before its own stop
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "read 1048576/1048576 bytes at offset 4194304" in proc.stdout
    assert "Images are identical." in proc.stdout
