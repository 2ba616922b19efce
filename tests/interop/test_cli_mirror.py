"""End-to-end tests of `blockmirror mirror` as a subprocess, against real QEMU tools.

Invariants: exit codes are 0 (completed), 1 (usage/open error), 2 (job failed), 130
(cancelled); a completed mirror's target equals what the writers produced (qemu-img compare);
SIGINT leaves the source byte-for-byte unchanged and pivots nothing; ``--json`` progress is
monotonic in copied and processed bytes. Writers are real qemu-io processes talking NBD to
our export while the mirror runs; NBD targets are served by qemu-nbd.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import require_tool
from nbd_helpers import free_port

pytestmark = pytest.mark.interop

BLOCKMIRROR = [sys.executable, "-m", "blockmirror.cli.main"]
MiB = 1 << 20


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=60, check=check)


def mirror(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*BLOCKMIRROR, "mirror", *args], capture_output=True, text=True,
                          timeout=timeout, check=False)


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def make_source(path: Path, size: str = "16M", *writes: str) -> None:
    sh("qemu-img", "create", "-f", "qcow2", str(path), size)
    cmds = [c for w in writes for c in ("-c", w)]
    if cmds:
        sh("qemu-io", "-f", "qcow2", *cmds, str(path))


def identical(a: Path, fa: str, b: Path | str, fb: str) -> bool:
    proc = sh("qemu-img", "compare", "-f", fa, "-F", fb, str(a), str(b), check=False)
    assert proc.returncode in (0, 1), proc.stderr
    return proc.returncode == 0


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def assert_monotonic(lines: list[dict[str, Any]]) -> None:
    progress = [x for x in lines if x["type"] in ("progress", "summary")]
    assert len(progress) >= 2
    for key in ("copied", "done", "redirtied"):
        values = [x[key] for x in progress]
        assert values == sorted(values), (key, values)


class Mirror:
    """A running `blockmirror mirror --json` whose stdout is read line by line."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen([*BLOCKMIRROR, "mirror", "--json", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: list[dict[str, Any]] = []

    def wait_phase(self, *phases: str, limit_s: float = 30) -> dict[str, Any]:
        """Read lines until a progress line in one of ``phases``."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise AssertionError(f"mirror exited early: {self.proc.wait()} "
                                     f"{self.proc.stderr.read() if self.proc.stderr else ''}")
            obj = json.loads(line)
            self.lines.append(obj)
            if obj["type"] == "progress" and obj["phase"] in phases:
                return obj
        raise AssertionError(f"no phase {phases} within {limit_s} s")

    def finish(self, limit_s: float = 30) -> int:
        out, err = self.proc.communicate(timeout=limit_s)
        self.lines += json_lines(out)
        self.stderr = err
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()


@pytest.fixture
def running() -> Iterator[list[Mirror]]:
    procs: list[Mirror] = []
    try:
        yield procs
    finally:
        for p in procs:
            p.kill()


@pytest.fixture
def qemu_nbd(tmp_path: Path) -> Iterator[Any]:
    """Start qemu-nbd on a unix socket; every server is killed at test end."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(image: Path, fmt: str) -> str:
        sock = tmp_path / f"qemu-nbd-{len(procs)}.sock"
        proc = subprocess.Popen(["qemu-nbd", "-f", fmt, "-k", str(sock), "-t", str(image)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        procs.append(proc)
        deadline = time.monotonic() + 10
        while not sock.exists():
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else b""
            assert time.monotonic() < deadline, "qemu-nbd did not start"
            time.sleep(0.02)
        return f"nbd+unix:///?socket={sock}"

    def stop() -> None:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()

    start.stop = stop  # type: ignore[attr-defined]
    try:
        yield start
    finally:
        stop()


# --- usage and open errors -------------------------------------------------------------------


def test_help_documents_exit_codes() -> None:
    proc = mirror("--help")
    assert proc.returncode == 0
    for text in ("Exit status:", "130", "--speed", "--copy-mode", "--export", "--json",
                 "--on-target-error", "--no-unmap", "SIGUSR1"):
        assert text in proc.stdout, text


def test_usage_and_open_errors_exit_1(tmp_path: Path) -> None:
    require_tool("qemu-img")
    src = tmp_path / "src.qcow2"
    make_source(src, "1M")
    proc = mirror(str(src))
    assert proc.returncode == 1 and "required" in proc.stderr
    proc = mirror(str(src), str(tmp_path / "t.qcow2"), "--sync", "sideways")
    assert proc.returncode == 1
    proc = mirror(str(tmp_path / "missing.qcow2"), str(tmp_path / "t.qcow2"))
    assert proc.returncode == 1
    assert "Could not open" in proc.stderr and "No such file or directory" in proc.stderr
    proc = mirror(str(src), str(tmp_path / "t.qcow2"), "--granularity", "1000")
    assert proc.returncode == 1
    assert "Parameter 'granularity' expects a power of 2" in proc.stderr
    proc = mirror(str(src), str(tmp_path / "t.qcow2"), "--export", "nonsense")
    assert proc.returncode == 1 and "--export" in proc.stderr


def test_job_failure_exits_2(tmp_path: Path) -> None:
    require_tool("qemu-img")
    src = tmp_path / "src.qcow2"
    make_source(src, "4M", "write -P 0x11 0 4M")
    sh("qemu-img", "create", "-f", "raw", str(tmp_path / "small.raw"), "1M")
    # an existing target of the wrong size: the job starts, then fails in QEMU's words
    proc = mirror(str(src), str(tmp_path / "small.raw"), "--mode", "existing", "--format", "raw",
                  "--json")
    assert proc.returncode == 2, proc.stderr
    summary = json_lines(proc.stdout)[-1]
    assert summary["type"] == "summary" and summary["phase"] == "failed"
    assert summary["error"] == "Source and target image have different sizes"


# --- completed mirrors ------------------------------------------------------------------------


def test_mirror_to_a_file_full(tmp_path: Path) -> None:
    require_tool("qemu-img", "qemu-io")
    src, dst = tmp_path / "src.qcow2", tmp_path / "dst.qcow2"
    make_source(src, "16M", "write -P 0x33 0 3M", "write -P 0x44 9M 1M", "write -z 12M 1M")
    before = md5(src)
    proc = mirror(str(src), str(dst), "--json", "--speed", "32M", "--interval", "0.05")
    assert proc.returncode == 0, proc.stderr
    lines = json_lines(proc.stdout)
    assert lines[0]["type"] == "message" and lines[0]["text"].startswith("Formatting")
    assert_monotonic(lines)
    summary = lines[-1]
    assert summary["type"] == "summary" and summary["phase"] == "done"
    assert "pivoted" in summary["outcome"]
    assert summary["copied"] >= 4 * MiB and summary["remaining"] == 0
    assert identical(src, "qcow2", dst, "qcow2")
    assert md5(src) == before
    assert sh("qemu-img", "check", str(dst)).returncode == 0


def test_mirror_sync_top_keeps_the_backing(tmp_path: Path) -> None:
    require_tool("qemu-img", "qemu-io")
    base, top, dst = tmp_path / "base.qcow2", tmp_path / "top.qcow2", tmp_path / "dst.qcow2"
    make_source(base, "8M", "write -P 0x01 0 8M")
    sh("qemu-img", "create", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top))
    sh("qemu-io", "-f", "qcow2", "-c", "write -P 0x02 1M 1M", str(top))
    proc = mirror(str(top), str(dst), "--sync", "top", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    info = json.loads(sh("qemu-img", "info", "--output=json", str(dst)).stdout)
    assert info["backing-filename"] == str(base)
    assert identical(top, "qcow2", dst, "qcow2")
    # only the top layer was copied: the target's own allocation is the 1 MiB written there
    mapped = json.loads(sh("qemu-img", "map", "--output=json", str(dst)).stdout)
    own = sum(e["length"] for e in mapped if e["depth"] == 0 and e["data"])
    assert own == 1 * MiB


def test_mirror_to_a_qemu_nbd_target(tmp_path: Path, qemu_nbd: Any) -> None:
    require_tool("qemu-img", "qemu-io", "qemu-nbd")
    src, dst = tmp_path / "src.qcow2", tmp_path / "dst.raw"
    make_source(src, "8M", "write -P 0x5a 1M 2M", "write -P 0xa5 7M 1M")
    sh("qemu-img", "create", "-f", "raw", str(dst), "8M")
    sh("qemu-io", "-f", "raw", "-c", "write -P 0xee 0 8M", str(dst))  # garbage to overwrite
    uri = qemu_nbd(dst, "raw")
    proc = mirror(str(src), uri, "--json")
    assert proc.returncode == 0, proc.stderr
    assert_monotonic(json_lines(proc.stdout))
    qemu_nbd.stop()
    assert identical(src, "qcow2", dst, "raw")


# --- live writers through our export -----------------------------------------------------------

WRITES_WHILE_COPYING = ["write -P 0x71 1M 64k", "write -P 0x72 15M 1M", "write -z 4M 512k"]
WRITES_WHILE_READY = ["write -P 0x73 2M 128k", "write -P 0x74 8M 4k", "write -P 0x75 0 4k"]


def qemu_io_nbd(uri: str, cmds: list[str]) -> None:
    args = [c for w in cmds for c in ("-c", w)]
    proc = sh("qemu-io", "-f", "raw", *args, uri, check=False)
    assert proc.returncode == 0 and "error" not in proc.stdout.lower(), proc.stdout + proc.stderr


@pytest.mark.parametrize(("target_kind", "export_kind", "copy_mode"), [
    ("file", "unix", "background"),
    ("qemu-nbd", "unix", "background"),
    ("file", "tcp", "write-blocking"),
])
def test_live_writer_through_the_export(tmp_path: Path, running: list[Mirror], qemu_nbd: Any,
                                        target_kind: str, export_kind: str,
                                        copy_mode: str) -> None:
    require_tool("qemu-img", "qemu-io", "qemu-nbd")
    src, expected = tmp_path / "src.qcow2", tmp_path / "expected.qcow2"
    make_source(src, "16M", "write -P 0x10 0 6M", "write -P 0x20 10M 6M")
    sh("cp", str(src), str(expected))
    if target_kind == "file":
        dst: Path = tmp_path / "dst.qcow2"
        target, dst_fmt = str(dst), "qcow2"
    else:
        dst = tmp_path / "dst.raw"
        sh("qemu-img", "create", "-f", "raw", str(dst), "16M")
        target, dst_fmt = qemu_nbd(dst, "raw"), "raw"
    if export_kind == "unix":
        sock = tmp_path / "export.sock"
        export, uri = f"unix:{sock}", f"nbd+unix:///vm?socket={sock}"
    else:
        port = free_port()
        export, uri = f"127.0.0.1:{port}", f"nbd://127.0.0.1:{port}/vm"
    m = Mirror(str(src), target, "--wait", "--export", export, "--export-name", "vm",
               "--speed", "8M", "--buf-size", "1M", "--interval", "0.05",
               "--copy-mode", copy_mode)
    running.append(m)
    first = m.wait_phase("copying")
    assert first["remaining"] > 0
    assert any(x["type"] == "message" and x["text"] == f"exporting the disk at {uri}"
               for x in m.lines)
    qemu_io_nbd(uri, WRITES_WHILE_COPYING)
    m.wait_phase("ready")
    qemu_io_nbd(uri, WRITES_WHILE_READY)
    m.wait_phase("ready")  # a progress line drawn after the writes (they are acknowledged)
    m.proc.send_signal(signal.SIGUSR1)
    assert m.finish() == 0, m.stderr
    assert_monotonic(m.lines)
    phases = [x["phase"] for x in m.lines if x["type"] == "progress"]
    assert "copying" in phases and "ready" in phases
    summary = m.lines[-1]
    assert summary["phase"] == "done" and "pivoted" in summary["outcome"]
    if copy_mode == "background":
        # writes to already-copied areas dirty them again
        assert summary["redirtied"] > 0
    else:
        # write-blocking copies each guest write itself before acknowledging it
        assert summary["redirtied"] == 0
    # the writes the guest made, replayed on a copy of the original: must equal the target
    sh("qemu-io", "-f", "qcow2",
       *[c for w in WRITES_WHILE_COPYING + WRITES_WHILE_READY for c in ("-c", w)],
       str(expected))
    qemu_nbd.stop()
    assert identical(expected, "qcow2", dst, dst_fmt)


def test_sigint_cancels_and_leaves_the_source_alone(tmp_path: Path,
                                                    running: list[Mirror]) -> None:
    require_tool("qemu-img", "qemu-io")
    src, dst = tmp_path / "src.qcow2", tmp_path / "dst.qcow2"
    make_source(src, "16M", "write -P 0x61 0 16M")
    before = md5(src)
    m = Mirror(str(src), str(dst), "--speed", "1M", "--buf-size", "1M", "--interval", "0.05")
    running.append(m)
    m.wait_phase("copying")
    m.proc.send_signal(signal.SIGINT)
    assert m.finish() == 130, m.stderr
    summary = m.lines[-1]
    assert summary["type"] == "summary" and summary["phase"] == "cancelled"
    assert "not pivoted" in summary["outcome"]
    assert summary["done"] < 16 * MiB
    assert_monotonic(m.lines)
    assert md5(src) == before
    # the copy stopped early: the target is an incomplete copy, never used in place of the source
    assert not identical(src, "qcow2", dst, "qcow2")


def test_sigint_while_waiting_in_ready(tmp_path: Path, running: list[Mirror]) -> None:
    require_tool("qemu-img", "qemu-io")
    src, dst = tmp_path / "src.qcow2", tmp_path / "dst.qcow2"
    make_source(src, "4M", "write -P 0x62 0 1M")
    before = md5(src)
    m = Mirror(str(src), str(dst), "--wait", "--interval", "0.05")
    running.append(m)
    m.wait_phase("ready")
    m.proc.send_signal(signal.SIGINT)
    assert m.finish() == 130, m.stderr
    assert m.lines[-1]["phase"] == "cancelled"
    assert md5(src) == before


def test_complete_over_qmp(tmp_path: Path, running: list[Mirror]) -> None:
    require_tool("qemu-img", "qemu-io")
    from blockmirror.qmp.testing import SyncQMP

    src, dst = tmp_path / "src.qcow2", tmp_path / "dst.qcow2"
    make_source(src, "4M", "write -P 0x63 0 2M")
    qmp_sock = tmp_path / "qmp.sock"
    m = Mirror(str(src), str(dst), "--wait", "--qmp", str(qmp_sock), "--interval", "0.05")
    running.append(m)
    m.wait_phase("ready")
    with SyncQMP(str(qmp_sock)) as q:
        assert b'"QMP"' in q.greeting
        q.send(b'{"execute": "qmp_capabilities"}')
        assert b'"return"' in q.read_until(b'"return"')[-1]
        q.send(b'{"execute": "query-block-jobs"}')
        jobs = json.loads(q.read_until(b'"return"')[-1])["return"]
        assert [(j["device"], j["status"], j["ready"]) for j in jobs] == [("drive0", "ready",
                                                                           True)]
        q.send(b'{"execute": "block-job-complete", "arguments": {"device": "drive0"}}')
        assert q.read_until(b'"return"')[-1].strip() == b'{"return": {}}'
    assert m.finish() == 0, m.stderr
    assert m.lines[-1]["phase"] == "done"
    assert identical(src, "qcow2", dst, "qcow2")
    assert not os.path.exists(qmp_sock)


def test_mirror_from_an_nbd_source(tmp_path: Path, qemu_nbd: Any) -> None:
    require_tool("qemu-img", "qemu-io", "qemu-nbd")
    src, dst = tmp_path / "src.raw", tmp_path / "dst.raw"
    sh("qemu-img", "create", "-f", "raw", str(src), "4M")
    sh("qemu-io", "-f", "raw", "-c", "write -P 0x3c 512k 1M", str(src))
    uri = qemu_nbd(src, "raw")
    proc = mirror(uri, str(dst), "--format", "raw", "--quiet")
    assert proc.returncode == 0, proc.stderr
    qemu_nbd.stop()
    assert identical(src, "raw", dst, "raw")


def _blkdebug_target(image: Path, errno_: int, once: bool) -> str:
    rule = {"event": "write_aio", "errno": errno_, "once": once}
    return "json:" + json.dumps({"driver": "raw", "file": {
        "driver": "blkdebug", "inject-error": [rule],
        "image": {"driver": "file", "filename": str(image)}}})


def test_target_io_error_fails_the_job(tmp_path: Path) -> None:
    require_tool("qemu-img", "qemu-io")
    src, dst = tmp_path / "src.qcow2", tmp_path / "dst.raw"
    make_source(src, "4M", "write -P 0x64 0 4M")
    sh("qemu-img", "create", "-f", "raw", str(dst), "4M")
    proc = mirror(str(src), _blkdebug_target(dst, 5, False), "--mode", "existing", "--json")
    assert proc.returncode == 2, proc.stderr
    lines = json_lines(proc.stdout)
    assert {"type": "message", "text": "I/O error on write: action report"} in lines
    assert lines[-1]["phase"] == "failed" and lines[-1]["error"] == "Input/output error"
    assert "failed" in lines[-1]["outcome"]


def test_stop_policy_pauses_until_resumed_over_qmp(tmp_path: Path,
                                                   running: list[Mirror]) -> None:
    require_tool("qemu-img", "qemu-io")
    from blockmirror.qmp.testing import SyncQMP

    src, dst = tmp_path / "src.qcow2", tmp_path / "dst.raw"
    make_source(src, "4M", "write -P 0x65 0 4M")
    sh("qemu-img", "create", "-f", "raw", str(dst), "4M")
    qmp_sock = tmp_path / "qmp.sock"
    m = Mirror(str(src), _blkdebug_target(dst, 28, True), "--mode", "existing",
               "--on-target-error", "enospc", "--qmp", str(qmp_sock), "--interval", "0.05")
    running.append(m)
    m.wait_phase("paused")
    with SyncQMP(str(qmp_sock)) as q:
        q.send(b'{"execute": "qmp_capabilities"}')
        q.read_until(b'"return"')
        q.send(b'{"execute": "query-block-jobs"}')
        job = json.loads(q.read_until(b'"return"')[-1])["return"][0]
        assert (job["status"], job["io-status"]) == ("paused", "nospace")
        q.send(b'{"execute": "block-job-resume", "arguments": {"device": "drive0"}}')
        assert q.read_until(b'"return"')[-1].strip() == b'{"return": {}}'
    assert m.finish() == 0, m.stderr
    texts = [x["text"] for x in m.lines if x["type"] == "message"]
    assert "I/O error on write: action stop" in texts
    assert any("block-job-resume device=drive0" in t for t in texts)
    assert m.lines[-1]["phase"] == "done"
    assert identical(src, "qcow2", dst, "raw")
