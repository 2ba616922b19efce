"""Fault rules see every user of a node: an NBD client (qemu-io) gets the injected errno."""

from __future__ import annotations

import subprocess
from pathlib import Path

from blockmirror.testing import start_daemon
from conftest import require_tool

MIB = 1 << 20


def _qemu_io(sock: str, cmd: str) -> str:
    proc = subprocess.run(["qemu-io", "-f", "raw", "-c", cmd, f"nbd+unix:///d?socket={sock}"],
                          capture_output=True, text=True, timeout=60, check=False)
    return proc.stdout + proc.stderr


def test_nbd_client_sees_the_injected_errors(tmp_path: Path) -> None:
    require_tool("qemu-io")
    img = tmp_path / "d.img"
    img.write_bytes(b"\x5a" * (4 * MIB))
    with start_daemon([{"driver": "raw", "node-name": "d",
                        "file": {"driver": "file", "filename": str(img)}}]) as bm:
        sock = str(Path(bm.workdir) / "nbd.sock")
        bm.execute("nbd-server-start", addr={"type": "unix", "data": {"path": sock}})
        bm.execute("block-export-add", type="nbd", id="e", **{"node-name": "d"},
                   writable=True)
        bm.faults.add("d", "read", offset=MIB, length=4096)
        bm.faults.add("d", "write", errno="ENOSPC", once=True)
        assert "read 4096/4096 bytes at offset 0" in _qemu_io(sock, "read 0 4k")
        assert "read failed: Input/output error" in _qemu_io(sock, "read 1M 4k")
        assert "write failed: No space left on device" in _qemu_io(sock, "write 0 4k")
        assert "wrote 4096/4096 bytes at offset 0" in _qemu_io(sock, "write 0 4k")
        assert [(r.operation, r.fired) for r in bm.faults.list()] == [("read", 1)]
