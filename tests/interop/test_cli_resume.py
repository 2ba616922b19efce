"""``blockmirror mirror`` after a crash (issue 12): the same command resumes and says so.

The first run is SIGKILLed once its JSON progress shows a quarter of the disk copied; the
second, identical command reuses the target, prints ``resumed: X MiB to recopy of 32.0 MiB``
and ends with an identical target; ``--restart`` starts afresh instead.
"""

from __future__ import annotations

import random
import re
import signal
import subprocess
from pathlib import Path

import pytest

from conftest import require_tool
from resume_kill_helpers import BLOCKMIRROR, killed_cli_mirror

pytestmark = pytest.mark.interop

MiB = 1 << 20
SIZE = 32 * MiB
FORMATS = ["--format", "raw", "--source-format", "raw"]


def _run(*args: str) -> str:
    p = subprocess.run([*BLOCKMIRROR, *FORMATS, *args], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout


def test_same_command_resumes_after_sigkill_and_restart_starts_afresh(tmp_path: Path) -> None:
    require_tool("qemu-img")
    src, dst = tmp_path / "src.raw", tmp_path / "dst.raw"
    log = tmp_path / "dst.raw.blockmirror-resume"
    src.write_bytes(random.Random(7).randbytes(SIZE))

    killed_cli_mirror(src, dst, SIZE, FORMATS)
    assert log.exists()
    out = _run(str(src), str(dst))
    m = re.search(r"^resumed: (\d+\.\d) MiB to recopy of 32\.0 MiB$", out, re.M)
    assert m is not None, out
    assert float(m.group(1)) < 32 * 0.9
    assert "Formatting" not in out  # the target was reused, not recreated
    assert dst.read_bytes() == src.read_bytes()
    assert not log.exists()

    killed_cli_mirror(src, dst, SIZE, FORMATS)
    out = _run("--restart", str(src), str(dst))
    assert "resumed:" not in out and "Formatting 'dst.raw'" not in out
    assert f"Formatting '{dst}'" in out
    assert dst.read_bytes() == src.read_bytes()


def test_ctrl_c_then_the_same_command_resumes_onto_a_qcow2_target(tmp_path: Path) -> None:
    """A clean stop (SIGINT) closes the qcow2 target, whose close used to trim the file it
    had grown ahead: its mtime then differed from the one the closed checkpoint recorded,
    and the rerun was refused as if something had written the target behind our back."""
    require_tool("qemu-img")
    src, dst = tmp_path / "src.qcow2", tmp_path / "dst.qcow2"
    raw = tmp_path / "data.raw"
    raw.write_bytes(random.Random(11).randbytes(SIZE))
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(src)], check=True)
    qcow2 = ["--format", "qcow2", "--source-format", "qcow2"]
    killed_cli_mirror(src, dst, SIZE, qcow2, "8M", signal.SIGINT)
    p = subprocess.run([*BLOCKMIRROR, *qcow2, str(src), str(dst)], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    m = re.search(r"^resumed: (\d+\.\d) MiB to recopy of 32\.0 MiB$", p.stdout, re.M)
    assert m is not None, p.stdout + p.stderr
    assert float(m.group(1)) < 32 * 0.9
    cmp = subprocess.run(["qemu-img", "compare", str(src), str(dst)], capture_output=True,
                         text=True)
    assert "Images are identical" in cmp.stdout, cmp.stdout + cmp.stderr
    check = subprocess.run(["qemu-img", "check", str(dst)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
