"""A Ceph cluster that goes away in the middle of a mirror into it.

A local qcow2 disk is mirrored (throttled) into an image on a private cluster; once the copy
is under way the cluster's daemons are stopped. With librbd's client timeouts set in the
target's filename (``rados_osd_op_timeout``, ``rados_mon_op_timeout``, as QEMU users set
them) the pending writes fail with ETIMEDOUT and the job follows its error policy: ``report``
ends it with the error, ``stop`` pauses it (BLOCK_JOB_ERROR) until it is cancelled. The
source image is byte-for-byte what it was, the daemon keeps answering QMP, and it shuts down
in bounded time.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from pathlib import Path

import pytest

from ceph_helpers import pattern, private_cluster, sh, stop
from conftest import require_tool

pytestmark = pytest.mark.interop

MiB = 1 << 20
TIMEOUTS = ":rados_osd_op_timeout=1:rados_mon_op_timeout=1:client_mount_timeout=1"


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("policy", ["report", "stop"])
def test_cluster_stopped_mid_mirror(tmp_path: Path, policy: str) -> None:
    require_tool("qemu-img")
    raw = tmp_path / "initial.raw"
    raw.write_bytes(pattern(16 * MiB, [(8 * MiB, MiB)]))
    src = tmp_path / "src.qcow2"
    sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(src))
    before = _digest(src)

    with private_cluster(tmp_path / "ceph") as cluster:
        target = cluster.filename("rbd", "lost", TIMEOUTS)

        async def main() -> float:
            from blockmirror.qmp.testing import qmp_daemon

            async with qmp_daemon(tmp_path) as td:
                qmp = await td.client()
                await qmp.execute("blockdev-add", {
                    "driver": "qcow2", "node-name": "src",
                    "file": {"driver": "file", "filename": str(src)}})
                await qmp.execute("drive-mirror", {
                    "job-id": "m", "device": "src", "target": target, "format": "raw",
                    "sync": "full", "speed": 4 * MiB, "buf-size": MiB,
                    "on-target-error": policy})
                while True:  # the copy is under way
                    jobs = await qmp.execute("query-block-jobs")
                    if jobs[0]["offset"] > 0:
                        break
                    await asyncio.sleep(0.05)
                assert jobs[0]["offset"] < jobs[0]["len"]
                await asyncio.to_thread(stop, cluster.dir)
                if policy == "report":
                    ev = await td.next_event(qmp, "BLOCK_JOB_COMPLETED", 60)
                    assert ev["data"]["error"] == "Connection timed out", ev
                    assert ev["data"]["offset"] < ev["data"]["len"]
                else:
                    ev = await td.next_event(qmp, "BLOCK_JOB_ERROR", 60)
                    assert ev["data"]["action"] == "stop", ev
                    assert ev["data"]["operation"] == "write"
                    jobs = await qmp.execute("query-block-jobs")
                    assert jobs[0]["paused"] and jobs[0]["io-status"] == "failed", jobs
                    await qmp.execute("block-job-cancel", {"device": "m", "force": True})
                    await td.next_event(qmp, "BLOCK_JOB_CANCELLED", 60)
                # the daemon still answers, and the source is still there to use
                assert await qmp.execute("query-block-jobs") == []
                node = td.daemon.graph.find_node("src")
                assert node is not None
                assert await node.read(0, 4096) == raw.read_bytes()[:4096]
                t0 = time.monotonic()
            return time.monotonic() - t0

        shutdown_s = asyncio.run(main())
        print(f"shutdown took {shutdown_s:.1f} s")
        assert shutdown_s < 40, f"shutdown took {shutdown_s:.1f} s"
    assert _digest(src) == before
    assert "No errors were found" in sh("qemu-img", "check", str(src))
