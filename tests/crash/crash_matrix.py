"""The daemon killed (SIGKILL) during live mirrors: one scenario, checked end to end.

A ``blockmirror daemon`` subprocess serves a source image (raw or qcow2) over NBD while a
writer thread (tests/nbd_writer.py) writes and flushes through the export, and mirrors it
with drive-mirror to a file (created by the daemon) or to a qemu-nbd export. At a seeded
random point of the chosen phase the daemon is SIGKILLed:

    copy            during the rate-limited copy phase
    ready           after BLOCK_JOB_READY, the writer still writing
    write-blocking  copy-mode=write-blocking, during the copy phase
    pivot           right after block-job-complete (before, during or after the switch)
    cancel          right after a forced block-job-cancel during the copy

Then: ``qemu-img check`` finds no corruption in the source (nor in a qcow2 target; leaked
clusters are allowed, QEMU leaks them on crashes too); every block of the source holds
content the writer may have left there (the last write made durable by an acknowledged
flush, or a later one) -- after a completed pivot the target is checked instead, and when
the pivot was in flight a block may match on either; and a new daemon opens both images.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from blockmirror.qmp.testing import DaemonProcess, SyncQMP, daemon_argv
from nbd_writer import BLOCK, NbdWriter

MiB = 1 << 20
SIZE = 8 * MiB
PHASES = ("copy", "ready", "write-blocking", "pivot", "cancel")


def sh(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120)


def _wait_path(path: str, limit_s: float = 30) -> None:
    deadline = time.monotonic() + limit_s
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} never appeared")
        time.sleep(0.01)


class QMP:
    """A tiny blocking QMP client that keeps the events it reads."""

    def __init__(self, path: str) -> None:
        self.conn = SyncQMP(path, 60)
        self.events: list[dict[str, Any]] = []
        self.cmd("qmp_capabilities")

    def cmd(self, name: str, args: dict[str, Any] | None = None) -> Any:
        msg: dict[str, Any] = {"execute": name}
        if args:
            msg["arguments"] = args
        self.conn.send(json.dumps(msg).encode())
        while True:
            reply = json.loads(self.conn.read_message())
            if "event" in reply:
                self.events.append(reply)
                continue
            if "error" in reply:
                raise AssertionError(f"{name}: {reply['error']}")
            return reply["return"]

    def wait_event(self, name: str, limit_s: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + limit_s
        while True:
            for ev in self.events:
                if ev["event"] == name:
                    return ev
            assert time.monotonic() < deadline, f"no {name} within {limit_s} s"
            self.cmd("query-block-jobs")  # reading a reply also reads the events before it
            time.sleep(0.02)

    def seen(self, name: str) -> bool:
        return any(ev["event"] == name for ev in self.events)


def run_scenario(tmp: Path, seed: int, fmt: str, target: str, phase: str) -> dict[str, Any]:
    rng = random.Random(seed)
    src = tmp / f"src.{fmt}"
    sh("qemu-img", "create", "-q", "-f", fmt, str(src), str(SIZE))
    r = sh("qemu-io", "-f", fmt, "-c", "write -P 0x11 0 3M", "-c", "write -P 0x22 5M 2M",
           str(src))
    assert r.returncode == 0, r.stderr
    initial = _read_raw(src, fmt, tmp / "initial.raw")
    qmp_sock, nbd_sock = str(tmp / "qmp.sock"), str(tmp / "nbd.sock")
    nbd_tgt: subprocess.Popen[bytes] | None = None
    if target == "file":
        tgt, tgt_fmt = tmp / f"tgt.{fmt}", fmt
        mirror_target: dict[str, Any] = {"target": str(tgt), "format": fmt,
                                         "mode": "absolute-paths"}
    else:
        tgt, tgt_fmt = tmp / "tgt.raw", "raw"
        sh("qemu-img", "create", "-q", "-f", "raw", str(tgt), str(SIZE))
        tsock = str(tmp / "qemu-nbd.sock")
        nbd_tgt = subprocess.Popen(["qemu-nbd", "-f", "raw", "-x", "exp", "-k", tsock, "-t",
                                    str(tgt)], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        _wait_path(tsock)
        mirror_target = {"target": f"nbd+unix:///exp?socket={tsock}", "format": "raw",
                         "mode": "existing"}
    argv = daemon_argv("ours", qmp_sock,
                       "--blockdev", f"driver=file,node-name=src-file,filename={src}",
                       "--blockdev", f"driver={fmt},node-name=src,file=src-file",
                       "--nbd-server", f"addr.type=unix,addr.path={nbd_sock}",
                       "--export", "type=nbd,id=e0,node-name=src,name=disk,writable=on")
    out: dict[str, Any] = {"seed": seed, "fmt": fmt, "target": target, "phase": phase}
    try:
        with DaemonProcess(argv, qmp_sock) as proc:
            _wait_path(nbd_sock)
            qmp = QMP(qmp_sock)
            writer = NbdWriter(nbd_sock, SIZE, seed, flush_every=rng.choice([1, 3, 8]))
            writer.start()
            assert writer.started_writing.wait(60), "the writer never started"
            args = {"job-id": "m0", "device": "src", "sync": "full", **mirror_target}
            if phase in ("copy", "write-blocking", "cancel"):
                args["speed"] = 4 * MiB  # ~2 s of copying for 8 MiB
            if phase == "write-blocking":
                args["copy-mode"] = "write-blocking"
            qmp.cmd("drive-mirror", args)
            complete_sent = False
            if phase in ("copy", "write-blocking"):
                time.sleep(rng.uniform(0.05, 1.5))  # the kill point (not a sync)
            elif phase == "ready":
                qmp.wait_event("BLOCK_JOB_READY")
                time.sleep(rng.uniform(0.0, 0.5))
            elif phase == "pivot":
                qmp.wait_event("BLOCK_JOB_READY")
                time.sleep(rng.uniform(0.0, 0.2))
                qmp.cmd("block-job-complete", {"device": "m0"})
                complete_sent = True
                time.sleep(rng.choice([0.0, 0.001, 0.005, 0.02, 0.1]))
            elif phase == "cancel":
                time.sleep(rng.uniform(0.05, 0.8))
                qmp.cmd("block-job-cancel", {"device": "m0", "force": True})
                time.sleep(rng.choice([0.0, 0.001, 0.005, 0.02, 0.1]))
            # what has happened by the kill: read what the daemon already sent
            try:
                qmp.conn.sock.settimeout(0.2)
                while True:
                    msg = json.loads(qmp.conn.read_message())
                    if "event" in msg:
                        qmp.events.append(msg)
            except Exception:
                pass
            proc.proc.send_signal(signal.SIGKILL)
            proc.proc.wait(30)
            writer.stop.set()
            writer.join(30)
            pivoted = qmp.seen("BLOCK_JOB_COMPLETED") and phase == "pivot"
            in_doubt = complete_sent and not pivoted
            out.update(writes=len(writer.log.writes), durable=writer.log.durable_count(),
                       pivoted=pivoted, in_doubt=in_doubt, writer_error=writer.log.error)
    finally:
        if nbd_tgt is not None:
            nbd_tgt.terminate()
            nbd_tgt.wait(30)
    # 1. no corruption (leaks allowed)
    for img, f in ((src, fmt), (tgt, tgt_fmt)):
        if f == "qcow2" and img.exists():
            r = sh("qemu-img", "check", "-f", "qcow2", str(img))
            assert r.returncode in (0, 3), f"{img.name}: {r.stdout}{r.stderr}"
            out[f"check_{img.stem}"] = "leaks" if r.returncode == 3 else "clean"
    # 2. every block holds acceptable content
    src_now = _read_raw(src, fmt, tmp / "src-now.raw")
    tgt_now = _read_raw(tgt, tgt_fmt, tmp / "tgt-now.raw") if tgt.exists() else None
    bad = []
    for off in range(0, SIZE, BLOCK):
        ok = writer.log.acceptable(initial, off)
        s_ok = src_now[off:off + BLOCK] in ok
        t_ok = tgt_now is not None and tgt_now[off:off + BLOCK] in ok
        if (out["pivoted"] and not t_ok) or (out["in_doubt"] and not (s_ok or t_ok)) or \
                (not out["pivoted"] and not out["in_doubt"] and not s_ok):
            bad.append(off)
    assert not bad, f"{len(bad)} blocks hold content no write left there, first at {bad[0]}: " \
                    f"{out}"
    # 3. a new daemon opens both images
    qmp_sock2 = str(tmp / "qmp2.sock")
    argv2 = daemon_argv("ours", qmp_sock2,
                        "--blockdev", f"driver=file,node-name=s-file,filename={src}",
                        "--blockdev", f"driver={fmt},node-name=s,file=s-file")
    if tgt.exists():
        argv2 += ["--blockdev", f"driver=file,node-name=t-file,filename={tgt}",
                  "--blockdev", f"driver={tgt_fmt},node-name=t,file=t-file"]
    pidfile = tmp / "daemon2.pid"
    argv2 += ["--pidfile", str(pidfile)]
    with DaemonProcess(argv2, qmp_sock2) as proc2:
        # the pid file is written once every option is processed; our monitor already
        # answers before that, and a query then can see a node still opening (reported bug:
        # "internal error: 'Qcow2Driver' object has no attribute 'h'"), so wait for it
        deadline = time.monotonic() + 60
        while not pidfile.exists():
            assert proc2.proc.poll() is None, proc2.output(stderr=True)
            assert time.monotonic() < deadline, "the new daemon did not finish starting"
            time.sleep(0.02)
        q2 = QMP(qmp_sock2)
        want = {"s", "t"} if tgt.exists() else {"s"}
        names = {n["node-name"] for n in q2.cmd("query-named-block-nodes")}
        assert want <= names, names
        q2.cmd("quit")
        assert proc2.proc.wait(30) == 0
    return out


def _read_raw(img: Path, fmt: str, out: Path) -> bytes:
    if fmt == "raw":
        data = img.read_bytes()
        return data + bytes(SIZE - len(data))
    r = sh("qemu-img", "convert", "-U", "-f", fmt, "-O", "raw", str(img), str(out))
    assert r.returncode == 0, r.stderr
    return out.read_bytes()
