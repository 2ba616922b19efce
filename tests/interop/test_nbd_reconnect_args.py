"""blockdev-add driver=nbd: reconnect-delay and open-timeout arguments, against
qemu-storage-daemon 7.2 (QMP and --blockdev), replies and error texts compared as they are."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import require_tool
from qsd_diff import diff, transcript

pytestmark = pytest.mark.interop

BAD_VALUES: list[Any] = [-1, "5", 4294967296, 1.5, True, None, {}, [1]]


def test_blockdev_add_arguments_match_qsd(tmp_path: Path) -> None:
    require_tool("qemu-storage-daemon")
    server = {"type": "unix", "path": str(tmp_path / "nobody.sock")}
    steps: list[tuple[str, dict[str, Any]]] = []
    for key in ("reconnect-delay", "open-timeout"):
        for value in BAD_VALUES:
            steps.append(("blockdev-add", {"driver": "nbd", "node-name": "n",
                                           "server": server, key: value}))
        # valid values: the open itself fails (nobody listens), with the connect error
        steps.append(("blockdev-add", {"driver": "nbd", "node-name": "n", "server": server,
                                       key: 0}))
    steps.append(("blockdev-add", {"driver": "nbd", "node-name": "n", "server": server,
                                   "reconnect-delay": 4294967295, "open-timeout": 1}))
    want = transcript("qsd", str(tmp_path / "qsd.qmp"), steps)
    got = transcript("ours", str(tmp_path / "ours.qmp"), steps)
    assert not diff(want, got), diff(want, got)
    assert want[0]["reply"]["error"]["desc"] == "Parameter 'reconnect-delay' expects uint32_t"


@pytest.mark.parametrize("option", [
    "reconnect-delay=-1", "reconnect-delay=abc", "reconnect-delay=4294967296",
    "open-timeout=1.5", "open-timeout=", "reconnect-delay=0x10", "open-timeout=1"])
def test_blockdev_option_texts_match_qsd(tmp_path: Path, option: str) -> None:
    require_tool("qemu-storage-daemon")
    blockdev = (f"driver=nbd,node-name=n,server.type=unix,"
                f"server.path={tmp_path / 'nobody.sock'},{option}")
    out = {}
    for name, argv in (("qsd", ["qemu-storage-daemon"]),
                       ("ours", [sys.executable, "-m", "blockmirror.cli.main", "daemon"])):
        res = subprocess.run([*argv, "--blockdev", blockdev], capture_output=True, text=True,
                             timeout=60, check=False)
        assert res.returncode == 1, (name, res)
        out[name] = res.stderr.split(": ", 1)[1]
    assert out["ours"] == out["qsd"], out
