"""An example suite for a management stack's tests (libvirt, Nova, KubeVirt, oVirt, Proxmox):
blockmirror stands in for qemu-storage-daemon, with fault rules and a virtual clock.

Run it anywhere blockmirror is installed: ``pytest examples/``. The fixtures (``blockmirror``,
``blockmirror_factory``, ``blockmirror_qmp``) come from blockmirror's pytest plugin.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from blockmirror.testing import CommandError, DaemonHandle

MIB = 1 << 20
SEC = 1_000_000_000


def raw_file(node: str, path: Path) -> dict[str, object]:
    return {"driver": "raw", "node-name": node,
            "file": {"driver": "file", "filename": str(path)}}


def test_mirror_survives_a_target_write_error(tmp_path: Path, blockmirror_factory) -> None:
    src, dst = tmp_path / "disk.img", tmp_path / "copy.img"
    src.write_bytes(bytes(range(256)) * (32 * MIB // 256))
    dst.write_bytes(bytes(32 * MIB))
    bm: DaemonHandle = blockmirror_factory(raw_file("disk", src), raw_file("copy", dst))

    # the target's 3rd write fails once with EIO, as a flaky storage backend would
    rule = bm.faults.add("copy", "write", nth=3, once=True, errno="EIO")
    bm.execute("blockdev-mirror", **{"job-id": "mirror0", "device": "disk", "target": "copy",
                                     "sync": "full", "on-target-error": "stop"})

    error = bm.wait_event("BLOCK_JOB_ERROR")
    assert error["data"] == {"device": "mirror0", "operation": "write", "action": "stop"}
    bm.wait_event("JOB_STATUS_CHANGE", match={"status": "paused"})
    (job,) = bm.execute("query-block-jobs")
    assert job["paused"] and job["io-status"] == "failed"
    assert bm.faults.list() == []  # a once rule is gone after firing
    injected = [e for e in bm.events if e["event"] == "X_FAULT_INJECTED"]
    assert injected[0]["data"]["id"] == rule.id

    # the stack resumes the job: it retries the failed range and converges
    bm.execute("block-job-resume", device="mirror0")
    bm.wait_event("BLOCK_JOB_READY")
    bm.execute("block-job-complete", device="mirror0")
    done = bm.wait_event("BLOCK_JOB_COMPLETED")
    assert "error" not in done["data"]
    assert dst.read_bytes() == src.read_bytes()


@pytest.mark.blockmirror(clock="virtual", blockdevs=[
    {"driver": "null-co", "node-name": "src", "size": 1 << 30},
    {"driver": "null-co", "node-name": "dst", "size": 1 << 30},
])
def test_catch_a_throttled_job_in_each_state(blockmirror: DaemonHandle) -> None:
    bm = blockmirror
    bm.execute("blockdev-mirror", **{"job-id": "j", "device": "src", "target": "dst",
                                     "sync": "full", "speed": 256 * MIB,
                                     "auto-finalize": False})
    start = bm.clock.now_ns()
    # virtual time stands still: the job is "running" for as long as the test likes
    (job,) = bm.execute("query-block-jobs")
    assert job["status"] == "running" and not job["ready"]
    bm.clock.advance(2 * SEC)
    (job,) = bm.execute("query-block-jobs")
    assert job["status"] == "running" and job["offset"] < 1 << 30
    # 1 GiB at 256 MiB/s: READY after 4 virtual seconds
    bm.clock.run_until(lambda: bm.execute("query-block-jobs")[0]["ready"])
    assert 4 * SEC <= bm.clock.now_ns() - start <= 4 * SEC + SEC // 10
    bm.execute("block-job-complete", device="j")
    bm.wait_event("BLOCK_JOB_PENDING")
    bm.execute("job-finalize", id="j")
    bm.wait_event("BLOCK_JOB_COMPLETED")
    bm.wait_event("JOB_STATUS_CHANGE", match={"status": "null"})
    assert [e["data"]["status"] for e in bm.events if e["event"] == "JOB_STATUS_CHANGE"] == [
        "created", "running", "ready", "waiting", "pending", "concluded", "null"]


def test_errors_come_back_as_qemu_reports_them(blockmirror) -> None:
    with pytest.raises(CommandError) as exc:
        blockmirror.execute("block-job-resume", device="nope")
    assert exc.value.error_class == "DeviceNotActive"
    assert exc.value.desc == "Block job 'nope' not found"
    with pytest.raises(CommandError) as exc:
        blockmirror.clock.advance(SEC)
    assert "not virtual" in exc.value.desc
