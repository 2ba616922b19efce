"""A replay of what libvirt sends for ``virsh snapshot-create --disk-only`` followed by
``virsh blockcommit --active --pivot`` (issue 11), against qemu-storage-daemon 7.2 and against
ours, with identical outcomes.

The sequence follows libvirt's blockdev-era qemuDomainBlockCommit and its job handling, in our
own code: the disk is ``libvirt-1-format`` over ``libvirt-1-storage``, an NBD export stands in
for the guest device; the snapshot adds the overlay ``libvirt-2-format`` with
``transaction``/``blockdev-snapshot``; the commit names both ends by node name with
``auto-dismiss=false``; at BLOCK_JOB_READY libvirt pivots with ``block-job-complete``, waits for
``concluded``, reads ``query-jobs``, dismisses the job and deletes the overlay's nodes. The
guest writes before the snapshot, into the overlay, while the job is READY, and after the
pivot; every write must end up in the base, which must check clean and have no backing.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from test_libvirt_replays import _run, _wait_event

from blockmirror.qmp.testing import DaemonProcess, daemon_argv
from conftest import require_tool
from qsd_diff import assert_same_log, drop_host_sizes

pytestmark = pytest.mark.interop

JOB = "commit-vda-libvirt-1-format"
WRITES = [(0x11, "0", "1M"), (0x22, "1M", "1M"), (0x33, "2M", "512k"), (0x44, "3M", "256k")]


def _active_commit(kind: str, tmp: Path) -> list[Any]:
    d = tmp / f"commit-{kind}"
    d.mkdir()
    base, overlay = d / "base.qcow2", d / "overlay.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "4M"], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base),
                    str(overlay)], check=True)
    sock = d / "nbd.sock"
    log: list[Any] = []

    def guest_write(i: int) -> None:
        pattern, off, length = WRITES[i]
        subprocess.run(["qemu-io", "-f", "raw", "-c", f"write -P {pattern:#x} {off} {length}",
                        f"nbd+unix:///vda?socket={sock}"], check=True, capture_output=True,
                       timeout=60)

    argv = ["--nbd-server", f"addr.type=unix,addr.path={sock}"]
    with DaemonProcess(daemon_argv(kind, str(d / "qmp"), *argv), str(d / "qmp")) as proc, \
            proc.connect() as conn:
        _run(conn, "qmp_capabilities")
        for name, args in [
            ("blockdev-add", {"driver": "file", "node-name": "libvirt-1-storage",
                              "filename": str(base), "auto-read-only": True,
                              "discard": "unmap"}),
            ("blockdev-add", {"driver": "qcow2", "node-name": "libvirt-1-format",
                              "file": "libvirt-1-storage", "read-only": False,
                              "backing": None}),
            ("block-export-add", {"type": "nbd", "id": "vda", "node-name": "libvirt-1-format",
                                  "name": "vda", "writable": True}),
        ]:
            _run(conn, name, args, log)
        guest_write(0)
        # virsh snapshot-create --disk-only (cf. qemuSnapshotDiskPrepareOne + transaction)
        for name, args in [
            ("blockdev-add", {"driver": "file", "node-name": "libvirt-2-storage",
                              "filename": str(overlay), "auto-read-only": True,
                              "discard": "unmap"}),
            ("blockdev-add", {"driver": "qcow2", "node-name": "libvirt-2-format",
                              "file": "libvirt-2-storage", "read-only": False,
                              "backing": None}),
            ("transaction", {"actions": [{"type": "blockdev-snapshot", "data": {
                "node": "libvirt-1-format", "overlay": "libvirt-2-format"}}]}),
        ]:
            _run(conn, name, args, log)
        guest_write(1)
        # virsh blockcommit vda --active --pivot (cf. qemuBlockCommit)
        _run(conn, "block-commit", {"job-id": JOB, "device": "libvirt-2-format",
                                    "top-node": "libvirt-2-format",
                                    "base-node": "libvirt-1-format", "auto-finalize": True,
                                    "auto-dismiss": False}, log)
        _wait_event(conn, log, "BLOCK_JOB_READY", device=JOB)
        _run(conn, "query-jobs", {}, log)
        guest_write(2)
        _run(conn, "block-job-complete", {"device": JOB}, log)
        _wait_event(conn, log, "JOB_STATUS_CHANGE", id=JOB, status="concluded")
        _run(conn, "query-jobs", {}, log)
        _run(conn, "job-dismiss", {"id": JOB}, log)
        _run(conn, "query-block-exports", {}, log)
        guest_write(3)
        # the overlay left the chain: libvirt removes its nodes
        _run(conn, "blockdev-del", {"node-name": "libvirt-2-format"}, log)
        _run(conn, "blockdev-del", {"node-name": "libvirt-2-storage"}, log)
        _run(conn, "query-named-block-nodes", {"flat": True}, log)
        _run(conn, "quit")
    cmds = ["qemu-io", "-f", "qcow2"]
    for pattern, off, length in WRITES:
        cmds += ["-c", f"read -P {pattern:#x} {off} {length}"]
    r = subprocess.run([*cmds, str(base)], capture_output=True, text=True)
    assert "Pattern verification failed" not in r.stdout and r.returncode == 0, r.stdout
    check = subprocess.run(["qemu-img", "check", str(base)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout
    info = subprocess.run(["qemu-img", "info", "--backing-chain", str(base)],
                          capture_output=True, text=True, check=True).stdout
    log.append({"base": re.sub(r"disk size: .*", "", info.replace(str(d), "T"))})
    return _normalise(log, d)


def _normalise(log: list[Any], d: Path) -> list[Any]:
    return list(drop_host_sizes(json.loads(json.dumps(log).replace(str(d), "T"))))


def test_libvirt_active_commit_same_as_qsd(tmp_path: Path) -> None:
    require_tool("qemu-storage-daemon", "qemu-img", "qemu-io")
    want = _active_commit("qsd", tmp_path)
    got = _active_commit("ours", tmp_path)
    assert_same_log(want, got)
    assert any(e.get("event") == "BLOCK_JOB_READY" and e["data"]["type"] == "commit"
               for e in want)
