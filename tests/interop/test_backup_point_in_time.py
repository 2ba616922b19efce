"""A backup is the source as it was when the job started, whatever the guest writes meanwhile
(copy-before-write): a writer hammers the source through a writable NBD export while a
speed-limited full backup runs, and the target must equal a copy of the image taken before
the job started. Run against both daemons (qemu-storage-daemon 7.2 shows the test is right).
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from blockmirror.qmp.testing import DaemonProcess, SyncQMP, daemon_argv
from conftest import require_tool
from qsd_diff import command

pytestmark = pytest.mark.interop

M = 1 << 20
SIZE = 32 * M


def _events_until(conn: SyncQMP, job_id: str, status: str) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []
    while True:
        msg = json.loads(conn.read_message())
        if "event" not in msg:
            continue
        seen.append(msg)
        if (msg["event"] == "JOB_STATUS_CHANGE" and msg["data"]["id"] == job_id
                and msg["data"]["status"] == status):
            return seen


def _writer_commands(seed: int) -> list[str]:
    """Unaligned writes of several sizes all over the disk, some crossing clusters."""
    rng = random.Random(seed)
    cmds = []
    for i in range(150):
        length = rng.choice([512, 4096, 65536, 100_000, 300_000])
        offset = rng.randrange(0, SIZE - length) // 512 * 512
        cmds.append(f"write -P {0x10 + i % 200} {offset} {length}")
    cmds += ["write -z 0 1M", f"discard {SIZE - 2 * M} 1M"]
    return cmds


def _run(kind: str, d: Path) -> None:
    d.mkdir()
    src, tgt, ref = d / "src.qcow2", d / "t.qcow2", d / "ref.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(src), str(SIZE)], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P 0x5a 0 {SIZE - 4 * M}",
                    str(src)], check=True, capture_output=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(tgt), str(SIZE)], check=True)
    shutil.copyfile(src, ref)
    sock = d / "qmp.sock"
    nbd = d / "nbd.sock"
    argv = daemon_argv(kind, str(sock))
    at = argv.index("--chardev")
    argv = [*argv[:at],
            "--blockdev", f"driver=file,node-name=sf,filename={src}",
            "--blockdev", "driver=qcow2,node-name=src,file=sf,discard=unmap",
            "--blockdev", f"driver=file,node-name=tf,filename={tgt}",
            "--blockdev", "driver=qcow2,node-name=tgt,file=tf",
            "--nbd-server", f"addr.type=unix,addr.path={nbd}",
            "--export", "type=nbd,id=e0,node-name=src,name=src,writable=on",
            *argv[at:]]
    with DaemonProcess(argv, str(sock)) as proc, proc.connect(limit_s=60) as conn:
        command(conn, "qmp_capabilities")
        _ev, reply = command(conn, "blockdev-backup", {
            "device": "src", "target": "tgt", "sync": "full", "job-id": "b",
            "speed": 4 * M})
        assert reply == {"return": {}}, reply
        io = ["qemu-io", "-f", "raw"]
        for c in _writer_commands(7):
            io += ["-c", c]
        r = subprocess.run([*io, f"nbd+unix:///src?socket={nbd}"], capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0 and "error" not in r.stdout + r.stderr, r.stdout + r.stderr
        # the writes overlapped the job: it has not finished copying yet
        _ev, jobs = command(conn, "query-block-jobs")
        (job,) = jobs["return"]
        assert job["status"] == "running" and job["offset"] < job["len"], job
        command(conn, "block-job-set-speed", {"device": "b", "speed": 0})
        events = _events_until(conn, "b", "null")
        done = [e for e in events if e["event"] == "BLOCK_JOB_COMPLETED"]
        assert done and "error" not in done[0]["data"], events
        command(conn, "quit")
        proc.proc.wait(30)
    cmp_ref = subprocess.run(["qemu-img", "compare", str(ref), str(tgt)], capture_output=True,
                             text=True)
    assert cmp_ref.returncode == 0, cmp_ref.stdout + cmp_ref.stderr
    cmp_src = subprocess.run(["qemu-img", "compare", str(ref), str(src)], capture_output=True,
                             text=True)
    assert cmp_src.returncode == 1, "the guest's writes did not reach the source"
    check = subprocess.run(["qemu-img", "check", str(tgt)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout


@pytest.mark.parametrize("kind", ["qsd", "ours"])
def test_backup_target_is_the_source_at_job_start(tmp_path: Path, kind: str) -> None:
    require_tool("qemu-storage-daemon", "qemu-img", "qemu-io")
    _run(kind, tmp_path / kind)
