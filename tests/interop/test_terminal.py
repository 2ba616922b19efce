"""The live display in a real terminal: `blockmirror mirror` inside tmux.

A slow (``--speed``-limited) mirror runs in a detached tmux session on its own server socket;
the pane is captured twice a second apart. The screen must show every field of the live
panel, and the two captures must differ (the panel updates in place while copying). The
session is killed at test end whatever happens.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from conftest import require_tool

pytestmark = pytest.mark.interop

FIELDS = ("phase", "copying", "copied", "skipped as zero", "re-dirtied", "dirty remaining",
          "rate", "ETA", "speed limit", "1.0 MiB/s", "in sync", "clean")


def capture(server: str, session: str) -> str:
    return subprocess.run(["tmux", "-L", server, "capture-pane", "-p", "-t", session],
                          capture_output=True, text=True, timeout=10, check=True).stdout


def test_live_display_updates_in_a_terminal(tmp_path: Path) -> None:
    require_tool("tmux", "qemu-img", "qemu-io")
    src, dst = tmp_path / "src.qcow2", tmp_path / "dst.qcow2"
    subprocess.run(["qemu-img", "create", "-f", "qcow2", str(src), "8M"], check=True,
                   capture_output=True, timeout=30)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x42 0 8M", str(src)],
                   check=True, capture_output=True, timeout=30)
    cmd = " ".join(shlex.quote(a) for a in (
        sys.executable, "-m", "blockmirror.cli.main", "mirror", str(src), str(dst),
        "--speed", "1M", "--buf-size", "512k"))
    server = f"bm-{uuid.uuid4().hex[:8]}"
    session = "mirror"
    env = {**os.environ, "TERM": "xterm-256color"}
    subprocess.run(["tmux", "-L", server, "new-session", "-d", "-s", session, "-x", "110",
                    "-y", "30", f"{cmd}; sleep 60"], check=True, env=env, timeout=10)
    try:
        deadline = time.monotonic() + 30
        first = ""
        while time.monotonic() < deadline:
            first = capture(server, session)
            if "copying" in first and "copied" in first:
                break
            time.sleep(0.2)
        # wait for the display to change (progress moves at 1 MiB/s), not a fixed time
        deadline = time.monotonic() + 30
        second = capture(server, session)
        while second == first and time.monotonic() < deadline:
            time.sleep(0.1)
            second = capture(server, session)
        print("--- first capture ---\n" + first + "\n--- second capture ---\n" + second)
        for text in FIELDS:
            assert text in first, (text, first)
        assert "copied" in second and "dirty remaining" in second
        assert first != second
        # the panel is redrawn in place, not appended: one panel on screen
        assert second.count("dirty remaining") == 1
    finally:
        subprocess.run(["tmux", "-L", server, "kill-server"], capture_output=True, timeout=10,
                       check=False)
