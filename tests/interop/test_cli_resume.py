"""``blockmirror mirror`` after a crash (issue 12): the same command resumes and says so.

The first run is SIGKILLed once its JSON progress shows a quarter of the disk copied; the
second, identical command reuses the target, prints ``resumed: X MiB to recopy of 32.0 MiB``
and ends with an identical target; ``--restart`` starts afresh instead.
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import require_tool

pytestmark = pytest.mark.interop

MiB = 1 << 20
SIZE = 32 * MiB
BLOCKMIRROR = [sys.executable, "-m", "blockmirror.cli.main", "mirror"]
FORMATS = ["--format", "raw", "--source-format", "raw"]


def _killed_mirror(src: Path, dst: Path) -> None:
    proc = subprocess.Popen([*BLOCKMIRROR, *FORMATS, "--speed", "16M", "--buf-size", "1M",
                             "--json", str(src), str(dst)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            msg = json.loads(line)
            if msg.get("type") == "progress" and msg["done"] >= SIZE // 4:
                break
        else:
            raise AssertionError(f"the mirror ended early: {proc.wait()}")
        proc.kill()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
    assert proc.returncode == -9


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

    _killed_mirror(src, dst)
    assert log.exists()
    out = _run(str(src), str(dst))
    m = re.search(r"^resumed: (\d+\.\d) MiB to recopy of 32\.0 MiB$", out, re.M)
    assert m is not None, out
    assert float(m.group(1)) < 32 * 0.9
    assert "Formatting" not in out  # the target was reused, not recreated
    assert dst.read_bytes() == src.read_bytes()
    assert not log.exists()

    _killed_mirror(src, dst)
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
    proc = subprocess.Popen([*BLOCKMIRROR, *qcow2, "--speed", "8M", "--buf-size", "1M",
                             "--json", str(src), str(dst)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            msg = json.loads(line)
            if msg.get("type") == "progress" and msg["done"] >= SIZE // 4:
                break
        else:
            raise AssertionError(f"the mirror ended early: {proc.wait()}")
        proc.send_signal(2)  # SIGINT: a clean stop that leaves the resume log closed
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 130, proc.stderr.read() if proc.stderr else ""
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
