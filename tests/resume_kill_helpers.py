"""What the resume kill matrices share (issue 12): the sidecar one
(``interop/test_mirror_resume_kill.py``) and the in-image one
(``interop/test_mirror_resume_in_image.py``), and the killed ``blockmirror mirror`` command
of ``interop/test_cli_resume.py``.

A case prepares a source with some data and holes and an empty target (a file, or an NBD
export of one by ``qemu-nbd``), runs the daemon with a mirror of the source while a
``qemu-io`` writes through an NBD export of it (``Writer``: a write is in the model once
acknowledged), SIGKILLs the daemon at a seeded point of the phase (``write_until_kill``),
then restarts it and resumes (``resume_to_pivot``). Every random choice comes from the case's
one ``random.Random``, in the same order on every run, so a case is reproducible by its seed.
"""

from __future__ import annotations

import json
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from blockmirror.block.dirty_bitmap import DirtyBitmap
from blockmirror.jobs.mirror.activity_log import Recovered
from blockmirror.qmp.testing import DaemonProcess, SyncQMP, daemon_argv

MiB = 1 << 20
SIZE = 16 * MiB
GRAN = 64 * 1024
EXTENT = 1 * MiB
EXTENTS = 4

PHASES = ("copy", "ready", "write-blocking")
#: in the copy phase, the writer writes once per this many bytes the job copies
COPY_PER_WRITE = 256 * 1024


class Monitor:
    """A blocking QMP client that keeps the events it reads."""

    def __init__(self, daemon: DaemonProcess) -> None:
        self.conn: SyncQMP = daemon.connect(limit_s=60)
        self.events: list[dict[str, Any]] = []
        self.cmd("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        msg: dict[str, Any] = json.loads(self.conn.read_message())
        if "event" in msg:
            self.events.append(msg)
        return msg

    def try_cmd(self, name: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
        req: dict[str, Any] = {"execute": name}
        if args is not None:
            req["arguments"] = args
        self.conn.send(json.dumps(req).encode() + b"\n")
        while True:
            msg = self._read()
            if "return" in msg or "error" in msg:
                return msg

    def cmd(self, name: str, args: dict[str, Any] | None = None) -> Any:
        rsp = self.try_cmd(name, args)
        assert "return" in rsp, f"{name}: {rsp}"
        return rsp["return"]

    def wait_event(self, name: str) -> dict[str, Any]:
        for ev in self.events:
            if ev["event"] == name:
                self.events.remove(ev)
                return ev
        while True:
            msg = self._read()
            if msg.get("event") == name:
                self.events.remove(msg)
                return msg

    def job(self) -> dict[str, Any]:
        jobs = self.cmd("query-block-jobs")
        assert len(jobs) == 1, jobs
        return dict(jobs[0])

    def pivot(self) -> None:
        """Complete the (ready) job ``m`` and wait for its end, which must be a success."""
        self.cmd("block-job-complete", {"device": "m"})
        ev = self.wait_event("BLOCK_JOB_COMPLETED")
        assert "error" not in ev["data"], ev

    def cancel(self) -> None:
        """Cancel the job ``m`` and wait for its end."""
        self.cmd("block-job-cancel", {"device": "m"})
        self.wait_event("BLOCK_JOB_COMPLETED")


class Writer:
    """qemu-io on the export; ``pending`` is a write sent but not acknowledged."""

    def __init__(self, uri: str, model: bytearray, rng: random.Random) -> None:
        self.proc = subprocess.Popen(["qemu-io", "-f", "raw", uri], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.model = model
        self.rng = rng
        self.pending: tuple[int, int] | None = None
        #: bytes of whole chunks the acknowledged writes touched (what they can re-dirty)
        self.chunk_bytes = 0
        #: (looks at the job before it, bytes of whole chunks) of every acknowledged write
        self.spans: list[tuple[int, int]] = []
        #: the job's ``len`` at each look (``Looks``)
        self.lens: list[int] = []

    def _send(self, offset: int, length: int, value: int) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"write -P {value} {offset} {length}\n".encode())
        self.proc.stdin.flush()

    def _ack(self) -> None:
        assert self.proc.stdout is not None
        seen = b""
        while b"wrote" not in seen:
            line = self.proc.stdout.readline()
            assert line, f"qemu-io exited: {seen.decode()}"
            assert b"error" not in line.lower() and b"failed" not in line.lower(), line
            seen += line

    def write(self, offset: int, length: int, value: int) -> None:
        self._send(offset, length, value)
        self._ack()
        self.model[offset:offset + length] = bytes([value]) * length
        span = (-(-(offset + length) // GRAN) - offset // GRAN) * GRAN
        self.chunk_bytes += span
        self.spans.append((len(self.lens), span))

    def look(self, m: Monitor) -> dict[str, Any]:
        """query-block-jobs, noting ``len`` (see ``not_counted``)."""
        job = m.job()
        self.lens.append(job["len"])
        return job

    def not_counted(self) -> int:
        """Chunk bytes of the writes the job's ``len`` at the last look may not include yet.

        ``len`` is recomputed once per pass of the job's loop (every 100 ms when idle, as in
        QEMU), so it lags the dirty bitmap. If ``len`` changed between looks j - 1 and j,
        a pass ran after look j - 1, so every write acknowledged before look j - 1 is in it;
        the writes since may not be. Without such a change, every write counts.
        """
        lens = self.lens
        j = next((j for j in range(len(lens) - 1, 0, -1) if lens[j] != lens[j - 1]), 0)
        return sum(span for before, span in self.spans if before >= j - 1 or j == 0)

    def random_write(self) -> None:
        length = self.rng.choice([4096, 65536, 65536, 3 * 4096 + 512, 256 * 1024])
        offset = self.rng.randrange(0, SIZE - length) // 512 * 512
        self.write(offset, length, self.rng.randrange(1, 256))

    def send_unacked(self) -> None:
        length = 65536
        offset = self.rng.randrange(0, SIZE - length) // 512 * 512
        self._send(offset, length, self.rng.randrange(1, 256))
        self.pending = (offset, length)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


def node(name: str, fmt: str, proto: dict[str, Any]) -> dict[str, Any]:
    return {"driver": fmt, "node-name": name, "file": proto}


def start_daemon(tmp: Path, run: int, src: dict[str, Any], tgt: dict[str, Any]
                 ) -> tuple[DaemonProcess, Monitor]:
    sock = str(tmp / f"qmp{run}.sock")
    d = DaemonProcess(daemon_argv("ours", sock), sock)
    m = Monitor(d)
    m.cmd("blockdev-add", src)
    m.cmd("blockdev-add", tgt)
    return d, m


def quit_daemon(d: DaemonProcess, m: Monitor) -> None:
    """A clean exit of the daemon."""
    m.cmd("quit")
    d.proc.wait(30)


def export(m: Monitor, tmp: Path, run: int) -> str:
    sock = str(tmp / f"nbd{run}.sock")
    m.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
    m.cmd("block-export-add", {"type": "nbd", "id": "e0", "node-name": "src", "name": "src",
                               "writable": True})
    return f"nbd+unix:///src?socket={sock}"


def mirror_args(**extra: Any) -> dict[str, Any]:
    """blockdev-mirror of ``src`` to ``tgt`` with a small resume geometry; ``extra`` names
    the store (``x-resume-log`` or ``x-resume-store``) and anything else."""
    return {"job-id": "m", "device": "src", "target": "tgt", "sync": "full",
            "granularity": GRAN, "x-resume-extents": EXTENTS, "x-resume-extent-size": EXTENT,
            **extra}


def phase_args(phase: str) -> dict[str, Any]:
    """What the first run's mirror adds for ``phase``."""
    if phase == "copy":
        # slow, and a disk many times the buffer, as in real life
        return {"speed": 8 * MiB, "buf-size": MiB}
    if phase == "write-blocking":
        return {"copy-mode": "write-blocking"}
    return {}


def sh(*cmd: str) -> str:
    p = subprocess.run(cmd, capture_output=True, text=True)
    assert p.returncode == 0, f"{cmd}: {p.stdout}{p.stderr}"
    return p.stdout


def wait_socket(path: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 20
    while True:
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.connect(path)
                return
            except (FileNotFoundError, ConnectionRefusedError):
                assert proc.poll() is None, "qemu-nbd exited"
                assert time.monotonic() < deadline, "qemu-nbd did not listen"
                time.sleep(0.01)  # polling for the peer's socket, not synchronising our own


def prepare_images(tmp: Path, fmt: str, rng: random.Random
                   ) -> tuple[bytearray, Path, str, str]:
    """A source with some data and some holes, and an empty target, both in ``fmt``.

    Returns the source's content, the path of a raw copy of it (the model's file), and the
    paths of the source and the target.
    """
    initial = bytearray(SIZE)
    for _ in range(24):
        o = rng.randrange(0, SIZE - MiB) // GRAN * GRAN
        n = rng.randrange(1, 16) * GRAN
        initial[o:o + n] = rng.randbytes(n)
    model_path = tmp / "model.raw"
    model_path.write_bytes(initial)
    src_path, tgt_path = str(tmp / f"src.{fmt}"), str(tmp / f"tgt.{fmt}")
    if fmt == "qcow2":
        sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(model_path), src_path)
    else:
        Path(src_path).write_bytes(initial)
    sh("qemu-img", "create", "-q", "-f", fmt, tgt_path, str(SIZE))
    return initial, model_path, src_path, tgt_path


def serve_target(tmp: Path, fmt: str, tgt_path: str
                 ) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    """``qemu-nbd`` serving the target once it listens, and the node that reaches it."""
    tsock = str(tmp / "target-nbd.sock")
    proc = subprocess.Popen(["qemu-nbd", "-t", "-f", fmt, "-k", tsock, "-x", "tgt",
                             "--cache=writeback", tgt_path])
    try:
        wait_socket(tsock, proc)
    except BaseException:
        proc.kill()
        proc.wait(10)
        raise
    return proc, node("tgt", "raw", {"driver": "nbd", "export": "tgt",
                                     "server": {"type": "unix", "path": tsock}})


def write_until_kill(d: DaemonProcess, m: Monitor, w: Writer, phase: str, rng: random.Random,
                     *, look_each_write: bool) -> tuple[dict[str, Any], int | None]:
    """Write through the export up to the seeded kill point of ``phase``, look at the job a
    last time, send a write that stays unacknowledged half of the time, SIGKILL ``d`` and
    close the writer.

    copy: until QEMU's offset passes a random fraction of the disk, before READY, one
    write per ``COPY_PER_WRITE`` bytes copied;
    ready: some writes after READY; write-blocking: the same, or (half of the cases) some
    writes while still copying. ``look_each_write``: look at the job after each of those
    last writes (``Writer.not_counted`` needs the looks).

    Returns the job at the last look, and the writer's chunk bytes before the write during
    which READY was seen (None: killed before READY).
    """
    ready_mark: int | None = None
    try:
        if phase == "copy":
            frac = rng.uniform(0.3, 0.85)
            # one write per COPY_PER_WRITE bytes the job copies: the writer follows the
            # copy's pace, not the machine's. A writer as fast as qemu-io can go re-dirtied
            # nearly all of this small disk before the kill (a recopy of SIZE - 64 KiB was
            # seen), so "never the whole disk" depended on the machine's speed.
            next_write = 0
            while (offset := w.look(m)["offset"]) < frac * SIZE:
                if offset >= next_write:
                    w.random_write()
                    next_write = offset + COPY_PER_WRITE
            assert not m.job()["ready"]
        else:
            kill_in_copy = phase == "write-blocking" and rng.random() < 0.5
            before_last = w.chunk_bytes
            while not kill_in_copy and not w.look(m)["ready"]:
                before_last = w.chunk_bytes
                w.random_write()
            if not kill_in_copy:
                ready_mark = before_last
            for _ in range(rng.randrange(2, 40)):
                w.random_write()
                if look_each_write:
                    w.look(m)
        done = w.look(m)
        if rng.random() < 0.5:
            w.send_unacked()
        d.kill()
    finally:
        w.close()
    return done, ready_mark


def assert_recopy_within_bound(stats: dict[str, int], label: str, extra: str = "") -> None:
    """The bound both kill matrices hold each run to: never the whole disk, and at most what
    was dirty at the kill (len - offset at the last look, the writes len did not count yet,
    the write in flight) plus what was copied but not yet durable (after the snapshot of
    the last durable checkpoint, measured per run) plus the hot extents."""
    assert stats["recopy"] < SIZE, stats
    dirty = stats["remaining_at_kill"] + stats["not_counted"] + stats["unacked"]
    strict = dirty + stats["lag"] + stats["hot"]
    assert stats["recopy"] <= strict, stats
    print(f"{label}: recopy {stats['recopy']} of {SIZE} <= {strict} (dirty {dirty} = "
          f"len - offset {stats['remaining_at_kill']} + not yet in len "
          f"{stats['not_counted']} + unacked {stats['unacked']}; copied after the "
          f"checkpoint {stats['lag']}; hot {stats['hot']}{extra})")


def recopy_bound(rec: Recovered) -> tuple[int, int]:
    """What a resume state says must be recopied: (checkpoint dirty chunks plus hot extents,
    hot extents), in bytes."""
    bm = DirtyBitmap(SIZE, GRAN)
    g = rec.geometry.granularity
    for i in range(SIZE // g):
        if rec.bitmap[i // 8] & (1 << (i % 8)):
            bm.set_dirty(i * g, g)
    for e in rec.hot:
        bm.set_dirty(e * rec.geometry.extent_size, rec.geometry.extent_size)
    return bm.dirty_count(), len(rec.hot) * rec.geometry.extent_size


def resume_to_pivot(m: Monitor, args: dict[str, Any], bound: int,
                    pending: tuple[int, int] | None, rng: random.Random,
                    new_writer: Callable[[], Writer]) -> int:
    """The second run: the mirror resumes and plans exactly ``bound``; a new writer retries
    the write in flight at the kill (as a guest retries a request that failed with the
    connection) and writes some more; at READY the job has copied no more than the plan
    plus what those writes re-dirtied; then the pivot, and a write after it (to the target
    now). Returns the bytes the resumed mirror planned to recopy."""
    m.cmd("blockdev-mirror", args)
    recopy = SIZE - m.job()["x-resumed"]
    assert recopy == bound, (recopy, bound)
    w = new_writer()
    try:
        if pending is not None:
            w.write(*pending, rng.randrange(1, 256))
        for _ in range(rng.randrange(0, 10)):
            w.random_write()
        m.wait_event("BLOCK_JOB_READY")
        info = m.job()
        moved = info["x-copied"] + info["x-zero-skipped"]
        assert moved <= recopy + w.chunk_bytes, (moved, recopy, w.chunk_bytes)
        assert info["x-redirtied"] <= w.chunk_bytes, info
        m.pivot()
        w.random_write()
    finally:
        w.close()
    return recopy


def assert_model(model_path: Path, model: bytearray, fmt: str, tgt_path: str) -> None:
    """The target holds exactly what the writer's model says."""
    model_path.write_bytes(model)
    sh("qemu-img", "compare", "-q", "-f", "raw", "-F", fmt, str(model_path), tgt_path)


BLOCKMIRROR = [sys.executable, "-m", "blockmirror.cli.main", "mirror"]


def killed_cli_mirror(src: Path | str, dst: Path | str, size: int, options: list[str],
                      speed: str = "16M", sig: int = signal.SIGKILL) -> None:
    """``blockmirror mirror`` with ``options``, stopped by ``sig`` once its JSON progress
    shows a quarter of ``size`` copied (SIGKILL: a crash; SIGINT: a clean stop, which leaves
    the resume log closed)."""
    proc = subprocess.Popen([*BLOCKMIRROR, *options, "--speed", speed, "--buf-size", "1M",
                             "--json", str(src), str(dst)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            msg = json.loads(line)
            if msg.get("type") == "progress" and msg["done"] >= size // 4:
                break
        else:
            raise AssertionError(f"the mirror ended early: {proc.wait()}")
        proc.send_signal(sig)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
    # a clean stop exits 130, as after Ctrl-C at a shell
    assert proc.returncode == (-9 if sig == signal.SIGKILL else 130), proc.returncode
