"""Mirroring real image files through QMP, checked with ``qemu-img compare``.

Source chains are raw or qcow2 images over a raw base, made and filled by qemu-img/qemu-io;
the mirror runs in our daemon (drive-mirror creating the target, sync full/top/none) while the
test keeps writing to the source through the graph; after completion and a clean shutdown
``qemu-img compare`` must call the two images identical.
"""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path
from typing import Any

import pytest

from blockmirror.qmp.testing import qmp_daemon
from conftest import require_tool

pytestmark = pytest.mark.interop
MiB = 1 << 20


def _sh(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def _images(tmp: Path, fmt: str) -> tuple[str, str]:
    base = str(tmp / "base.raw")
    src = str(tmp / f"src.{fmt}")
    _sh("qemu-img", "create", "-q", "-f", "raw", base, str(8 * MiB))
    _sh("qemu-io", "-f", "raw", "-c", "write -P 0x11 1M 2M", "-c", "write -P 0x12 6M 1M", base)
    if fmt == "qcow2":
        _sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", src)
        _sh("qemu-io", "-f", "qcow2", "-c", "write -P 0x21 2M 1M", "-c", "write -z 6M 64k",
            "-c", "write -P 0x22 7M 64k", src)
    else:
        _sh("qemu-img", "create", "-q", "-f", "raw", src, str(8 * MiB))
        _sh("qemu-io", "-f", "raw", "-c", "write -P 0x31 0 3M", "-c", "write -P 0x32 5M 1M",
            src)
    return base, src


@pytest.mark.parametrize(("fmt", "sync"), [("raw", "full"), ("qcow2", "full"),
                                           ("qcow2", "top"), ("qcow2", "none")])
def test_drive_mirror_then_qemu_img_compare(tmp_path: Path, fmt: str, sync: str) -> None:
    require_tool("qemu-img", "qemu-io")
    base, src = _images(tmp_path, fmt)
    tgt = str(tmp_path / f"tgt.{fmt}")

    async def main() -> None:
        async with qmp_daemon(tmp_path) as td:
            qmp = await td.client()
            opts: dict[str, Any] = {"driver": fmt, "node-name": "src",
                                    "file": {"driver": "file", "filename": src}}
            await qmp.execute("blockdev-add", opts)
            await qmp.execute("drive-mirror", {"job-id": "m", "device": "src", "target": tgt,
                                               "sync": sync, "granularity": 65536})
            assert td.daemon.stdout_lines[-1].startswith(f"Formatting '{tgt}', fmt={fmt}")
            node = td.daemon.graph.find_node("src")
            assert node is not None
            await node.write(512 * 1024, b"\x41" * 100_000)  # before READY
            await td.next_event(qmp, "BLOCK_JOB_READY")
            await node.write(3 * MiB + 7, b"\x42" * 70_000)  # after READY
            await node.write_zeroes(1 * MiB, 64 * 1024)
            rsp = await qmp.execute("human-monitor-command",
                                    {"command-line": "info block-jobs"})
            assert rsp.startswith("Type mirror, device m: Completed ")
            await qmp.execute("job-complete", {"id": "m"})
            ev = await td.next_event(qmp, "BLOCK_JOB_COMPLETED")
            assert "error" not in ev["data"]
            assert ev["data"]["offset"] == ev["data"]["len"]

    asyncio.run(main())
    if sync != "full":
        # the target's header names the source's base (top) or the source (none)
        info = _sh("qemu-img", "info", "--output=json", tgt)
        assert (base if sync == "top" else src) in info
    out = _sh("qemu-img", "compare", src, tgt)
    assert "Images are identical" in out


def test_drive_mirror_existing_target_opens_its_backing(tmp_path: Path) -> None:
    """mode=existing: after the pivot the target's own backing (from its header) is open."""
    require_tool("qemu-img", "qemu-io")
    base, src = _images(tmp_path, "qcow2")
    tgt = str(tmp_path / "tgt.qcow2")
    _sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", tgt)

    async def main() -> None:
        async with qmp_daemon(tmp_path) as td:
            qmp = await td.client()
            await qmp.execute("blockdev-add", {"driver": "qcow2", "node-name": "src",
                                               "file": {"driver": "file", "filename": src}})
            # an export is a parent of the source: the pivot hands it the target, which
            # therefore stays open (an unadopted drive-mirror target is closed, as in QEMU)
            sock = str(tmp_path / "nbd.sock")
            await qmp.execute("nbd-server-start",
                              {"addr": {"type": "unix", "data": {"path": sock}}})
            await qmp.execute("block-export-add", {"type": "nbd", "id": "e0",
                                                   "node-name": "src"})
            await qmp.execute("drive-mirror", {"job-id": "m", "device": "src", "target": tgt,
                                               "sync": "top", "mode": "existing",
                                               "format": "qcow2", "node-name": "new"})
            await td.next_event(qmp, "BLOCK_JOB_READY")
            await qmp.execute("job-complete", {"id": "m"})
            ev = await td.next_event(qmp, "BLOCK_JOB_COMPLETED")
            assert "error" not in ev["data"]
            new = td.daemon.graph.find_node("new")
            assert new is not None and new.backing is not None
            assert new.backing.filename == base
            got = await new.read(0, 8 * MiB)
            assert got[1 * MiB : 2 * MiB] == b"\x11" * MiB  # only in the base: via backing
            exports = await qmp.execute("query-block-exports")
            assert exports[0]["node-name"] == "new"
            await qmp.execute("block-export-del", {"id": "e0", "mode": "hard"})

    asyncio.run(main())
    assert "Images are identical" in _sh("qemu-img", "compare", src, tgt)


def test_hmp_drive_mirror_info_and_cancel(tmp_path: Path) -> None:
    """HMP: drive_mirror -f, info block-jobs, block_job_cancel -f, block_job_complete."""
    require_tool("qemu-img", "qemu-io")
    _, src = _images(tmp_path, "raw")
    tgt = str(tmp_path / "hmp.raw")

    async def hmp(qmp: Any, line: str) -> str:
        out = await qmp.execute("human-monitor-command", {"command-line": line})
        assert isinstance(out, str)
        return out

    async def main() -> None:
        async with qmp_daemon(tmp_path) as td:
            qmp = await td.client()
            await qmp.execute("blockdev-add", {"driver": "raw", "node-name": "src",
                                               "file": {"driver": "file", "filename": src}})
            assert await hmp(qmp, "info block-jobs") == "No active jobs\n"
            # no BlockBackend carries the node, so the default job id is '' (as on QSD); the
            # target is created before that check fails, as in qmp_drive_mirror
            assert await hmp(qmp, "drive_mirror -f src " + tgt + " raw") == (
                "Error: Invalid job ID ''\n")
            assert td.daemon.stdout_lines[-1].startswith(f"Formatting '{tgt}', fmt=raw")
            assert await hmp(qmp, "drive_mirror -n src") == "drive_mirror: string expected\n"
            await qmp.execute("drive-mirror", {"job-id": "h", "device": "src", "target": tgt,
                                               "sync": "full", "speed": 1,
                                               "buf-size": 65536, "granularity": 65536})
            line = await hmp(qmp, "info block-jobs")
            assert line.startswith("Type mirror, device h: Completed ")
            assert line.endswith(" bytes, speed limit 1 bytes/s\n")
            assert await hmp(qmp, "block_job_complete h") == (
                "Error: Job 'h' in state 'running' cannot accept command verb 'complete'\n")
            assert await hmp(qmp, "block_job_cancel -f h") == ""
            ev = await td.next_event(qmp, "BLOCK_JOB_CANCELLED")
            assert ev["data"]["device"] == "h"
            assert await hmp(qmp, "block_job_cancel h") == (
                "Error: Block job 'h' not found\n")

    asyncio.run(main())
