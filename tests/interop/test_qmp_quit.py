"""Interop: `quit` with a running mirror job, against qemu-storage-daemon.

QSD force-cancels running jobs during quit and sends their events before quit's
{"return": {}}; then it hangs up and exits 0. The sequence of (event, status) pairs must be
the same for both daemons.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from blockmirror.qmp.testing import DaemonProcess, daemon_argv
from conftest import require_tool

pytestmark = pytest.mark.interop

SETUP = [
    {"execute": "qmp_capabilities"},
    {"execute": "blockdev-add", "arguments": {"driver": "null-co", "node-name": "src",
                                              "size": 1 << 30, "read-zeroes": True}},
    {"execute": "blockdev-add", "arguments": {"driver": "null-co", "node-name": "tgt",
                                              "size": 1 << 30}},
    {"execute": "blockdev-mirror", "arguments": {"job-id": "m0", "device": "src",
                                                 "target": "tgt", "sync": "full",
                                                 "speed": 1 << 20}},
]


def quit_sequence(kind: str, tmp_path: Path) -> list[tuple[str, str]]:
    sock = str(tmp_path / f"{kind}.sock")
    with DaemonProcess(daemon_argv(kind, sock), sock) as proc, proc.connect() as conn:
        for cmd in SETUP:
            conn.send(json.dumps(cmd).encode())
            while "event" in json.loads(conn.read_line()):
                pass
        # wait (on the job's own state, not a fixed sleep) until the job runs: its
        # "created"/"running" events, which may trail blockdev-mirror's reply, are then read
        deadline = time.monotonic() + 30
        while True:
            conn.send(b'{"execute":"query-jobs"}')
            while "event" in (reply := json.loads(conn.read_line())):
                pass
            if reply["return"] and reply["return"][0]["status"] == "running":
                break
            assert time.monotonic() < deadline, reply
            time.sleep(0.01)
        conn.send(b'{"execute":"quit"}')
        seq = []
        while True:
            msg = json.loads(conn.read_line())
            if "return" in msg:
                seq.append(("return", ""))
                break
            seq.append((msg["event"], msg["data"].get("status", "")))
        assert proc.proc.wait(20) == 0
    return seq


def test_quit_cancels_jobs_before_returning(tmp_path: Path) -> None:
    require_tool("qemu-storage-daemon")
    want = quit_sequence("qsd", tmp_path)
    assert want[-1] == ("return", "") and ("BLOCK_JOB_CANCELLED", "") in want
    assert quit_sequence("ours", tmp_path) == want


def create_sequence(kind: str, tmp_path: Path) -> list[tuple[str, str]]:
    sock = str(tmp_path / f"c-{kind}.sock")
    img = tmp_path / f"{kind}.img"
    seq: list[tuple[str, str]] = []
    with DaemonProcess(daemon_argv(kind, sock), sock) as proc, proc.connect() as conn:
        conn.send(b'{"execute":"qmp_capabilities"}')
        conn.read_line()
        conn.send(json.dumps({"execute": "blockdev-create", "arguments": {
            "job-id": "c0", "options": {"driver": "file", "filename": str(img),
                                        "size": 1 << 20}}}).encode())
        while True:
            msg = json.loads(conn.read_line())
            seq.append((msg.get("event", "return"), msg.get("data", {}).get("status", "")))
            if seq[-1] == ("JOB_STATUS_CHANGE", "concluded"):
                break
        conn.send(b'{"execute":"job-dismiss","arguments":{"id":"c0"}}')
        while seq[-1][0] != "return":
            msg = json.loads(conn.read_line())
            seq.append((msg.get("event", "return"), msg.get("data", {}).get("status", "")))
    assert img.stat().st_size == 1 << 20
    return seq


def test_blockdev_create_job_events(tmp_path: Path) -> None:
    require_tool("qemu-storage-daemon")
    want = create_sequence("qsd", tmp_path)
    assert [s for _, s in want if s] == ["created", "running", "waiting", "pending",
                                         "concluded", "null"]
    assert create_sequence("ours", tmp_path) == want
