"""Soak (issue 15): randomized mirrors, cancels, pauses and error policies with writers.

One ``blockmirror daemon`` process lives for the whole soak. Each round (seeded) adds a
source (raw or qcow2, sometimes under blkdebug injecting a read error) and a target
(sometimes under blkdebug injecting a write or flush error), exports the source over NBD
with a writer thread writing and flushing through it, starts blockdev-mirror with random
speed, granularity, buffer, copy mode and error policies, pauses and resumes it, changes its
speed, and ends it one way: complete (pivot), soft cancel at READY, or forced cancel. Every
outcome is checked:

- the events are the ones the error policy calls for (report: the job ends with an error;
  stop: BLOCK_JOB_ERROR then a paused job that a resume continues; ignore: it goes on);
- after a pivot or a soft cancel (writer stopped first) the target equals the source;
- every write the writer saw acknowledged is in the live image (the target after a pivot);
- ``qemu-img check`` finds no corruption in any qcow2 once the round's nodes are deleted;
- the daemon stays up, and its RSS is sampled every round (reported, bounded at the end).
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "crash"))

from crash_matrix import QMP, _wait_path  # noqa: E402

from blockmirror.qmp.testing import DaemonProcess, daemon_argv  # noqa: E402
from nbd_writer import BLOCK, NbdWriter  # noqa: E402

MiB = 1 << 20


def sh(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=300)


@dataclass
class Stats:
    rounds: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    writes: int = 0
    failures: list[str] = field(default_factory=list)
    rss: list[int] = field(default_factory=list)
    #: (seconds since the start, RSS in MiB) every ``rss_every_s``
    rss_samples: list[tuple[int, int]] = field(default_factory=list)

    def count(self, what: str) -> None:
        self.outcomes[what] = self.outcomes.get(what, 0) + 1


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


class Round:
    def __init__(self, qmp: QMP, work: Path, nbd_sock: str, n: int, rng: random.Random) -> None:
        self.qmp, self.work, self.nbd_sock, self.n, self.rng = qmp, work, nbd_sock, n, rng
        self.job = f"j{n}"
        self.mark = len(qmp.events)
        self.resumed = 0
        self.desc = ""

    def events(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.qmp.events[self.mark:] if e["event"] == name
                and e.get("data", {}).get("device", e.get("data", {}).get("id")) == self.job]

    def wait(self, names: tuple[str, ...], limit_s: float = 120) -> dict[str, Any]:
        """The first event of ``names`` for this job since the round began (not consumed).

        A job stopped by an error (action "stop") is resumed while waiting: the injected
        errors fire once, so a resume always gets it going again.
        """
        deadline = time.monotonic() + limit_s
        while True:
            stops = 0
            for e in self.qmp.events[self.mark:]:
                d = e.get("data", {})
                if d.get("device", d.get("id")) != self.job:
                    continue
                if e["event"] in names:
                    return e
                if e["event"] == "BLOCK_JOB_ERROR" and d.get("action") == "stop":
                    stops += 1
            if stops > self.resumed and self.status() in ("paused", "standby"):
                self.qmp.cmd("block-job-resume", {"device": self.job})
                self.resumed = stops
            if time.monotonic() > deadline:
                raise AssertionError(f"round {self.n}: none of {names} in {limit_s} s "
                                     f"({self.desc}; jobs {self.qmp.cmd('query-block-jobs')})")
            self.qmp.cmd("query-block-jobs")
            time.sleep(0.02)

    def try_cmd(self, name: str, args: dict[str, Any], expected: tuple[str, ...]) -> bool:
        """Run a command; False if it failed with one of the ``expected`` texts."""
        try:
            self.qmp.cmd(name, args)
        except AssertionError as e:
            if any(t in str(e) for t in expected):
                return False
            raise
        return True

    def status(self) -> str | None:
        for j in self.qmp.cmd("query-jobs"):
            if j["id"] == self.job:
                return str(j["status"])
        return None

    def wait_status(self, want: tuple[str, ...], limit_s: float = 120) -> str | None:
        deadline = time.monotonic() + limit_s
        while (st := self.status()) not in want:
            assert time.monotonic() < deadline, f"round {self.n}: status {st}, want {want}"
            time.sleep(0.02)
        return st


def _image(work: Path, name: str, fmt: str, size: int, pattern: bool) -> Path:
    path = work / f"{name}.{fmt}"
    r = sh("qemu-img", "create", "-q", "-f", fmt, str(path), str(size))
    assert r.returncode == 0, f"qemu-img create {path.name}: {r.stderr}"
    if pattern:
        r = sh("qemu-io", "-f", fmt, "-c", "write -P 0x31 0 1M", "-c",
               f"write -P 0x32 {size // 2} 512k", str(path))
        assert r.returncode == 0, f"qemu-io {path.name}: {r.stdout}{r.stderr}"
    return path


def _node(name: str, path: Path, fmt: str, error: dict[str, Any] | None) -> dict[str, Any]:
    proto: dict[str, Any] = {"driver": "file", "filename": str(path)}
    if error is not None:
        proto = {"driver": "blkdebug", "inject-error": [error], "image": proto}
    return {"driver": fmt, "node-name": name, "file": proto}


def _read(path: Path, fmt: str, out: Path) -> bytes:
    r = sh("qemu-img", "convert", "-U", "-f", fmt, "-O", "raw", str(path), str(out))
    assert r.returncode == 0, f"qemu-img convert {path.name}: {r.stdout}{r.stderr}"
    return out.read_bytes()


def _check_acked(writer: NbdWriter, initial: bytes, image: bytes, what: str) -> None:
    last: dict[int, bytes] = {}
    with writer.log.lock:
        for w in writer.log.writes:
            if w.acked:
                last[w.offset] = w.data
    for off, data in last.items():
        if image[off:off + BLOCK] != data:
            raise AssertionError(f"{what}: acknowledged write at {off} is missing")


def one_round(qmp: QMP, work: Path, nbd_sock: str, n: int, rng: random.Random,
              stats: Stats) -> None:
    r = Round(qmp, work, nbd_sock, n, rng)
    fmt, tfmt = rng.choice(["raw", "qcow2"]), rng.choice(["raw", "qcow2"])
    size = rng.choice([2, 4, 8]) * MiB
    mode = rng.choice(["none", "none", "none", "tgt-report", "tgt-stop", "tgt-ignore",
                       "src-stop", "src-report", "tgt-enospc", "flush-stop"])
    src = _image(work, f"s{n}", fmt, size, True)
    tgt = _image(work, f"t{n}", tfmt, size, False)
    initial = _read(src, fmt, work / f"i{n}.raw")
    src_err = {"event": "read_aio", "errno": 5, "once": True} if mode.startswith("src") \
        else None
    tgt_err = None
    if mode.startswith("tgt"):
        tgt_err = {"event": "write_aio", "errno": 28 if mode == "tgt-enospc" else 5,
                   "once": True}
    elif mode == "flush-stop":
        tgt_err = {"event": "flush_to_disk", "errno": 5, "once": True}
    qmp.cmd("blockdev-add", _node(f"s{n}", src, fmt, src_err))
    qmp.cmd("blockdev-add", _node(f"t{n}", tgt, tfmt, tgt_err))
    qmp.cmd("block-export-add", {"type": "nbd", "id": f"e{n}", "node-name": f"s{n}",
                                 "name": f"d{n}", "writable": True})
    writer = NbdWriter(nbd_sock, size, rng.randrange(1 << 30),
                       flush_every=rng.choice([1, 4, 16]), pace_s=0.002, export=f"d{n}")
    policy = {"tgt-report": ("report", "target"), "tgt-stop": ("stop", "target"),
              "tgt-ignore": ("ignore", "target"), "src-stop": ("stop", "source"),
              "src-report": ("report", "source"), "tgt-enospc": ("enospc", "target"),
              "flush-stop": ("stop", "target")}.get(mode)
    args: dict[str, Any] = {"job-id": r.job, "device": f"s{n}", "target": f"t{n}",
                            "sync": "full",
                            "speed": rng.choice([0, 0, 16 * MiB, 64 * MiB]),
                            "granularity": rng.choice([65536, 65536, 4096, 1 << 20]),
                            "copy-mode": rng.choice(["background", "background",
                                                     "write-blocking"])}
    if rng.random() < 0.3:
        args["buf-size"] = rng.choice([1 << 20, 4 << 20])
    if policy:
        args[f"on-{policy[1]}-error"] = policy[0]
    r.desc = f"fmt={fmt} tfmt={tfmt} size={size >> 20}M mode={mode} args={args}"
    writer.start()
    writer.started_writing.wait(60)
    qmp.cmd("blockdev-mirror", args)
    outcome = ""
    live = (src, fmt)
    try:
        # the job may end or be stopped by an injected error at any moment: those answers
        # (QEMU's texts) are expected, anything else fails the round
        racy = ("Job is already paused", "not found", "Job is not paused",
                "Can't resume a job that was not paused")
        if rng.random() < 0.4 and r.status() == "running" and \
                r.try_cmd("block-job-pause", {"device": r.job}, racy):
            r.wait_status(("paused", "standby", "concluded", "null", None))
            r.try_cmd("block-job-resume", {"device": r.job}, racy)
            stats.count("paused+resumed")
        # a writer can outpace a rate limit forever (as with QEMU: no READY then), so the
        # limit is lifted once the early actions are done
        r.try_cmd("block-job-set-speed", {"device": r.job, "speed": 0}, racy)
        if policy and policy[0] in ("stop", "enospc"):
            ev = r.wait(("BLOCK_JOB_ERROR", "BLOCK_JOB_READY", "BLOCK_JOB_COMPLETED"))
            if ev["event"] == "BLOCK_JOB_ERROR":
                stats.count(f"{mode}:error-{ev['data'].get('action')}")
        if policy and policy[0] == "report":
            ev = r.wait(("BLOCK_JOB_COMPLETED", "BLOCK_JOB_READY"))
            if ev["event"] == "BLOCK_JOB_COMPLETED":
                assert ev["data"].get("error"), f"round {n}: report policy without error"
                outcome = "failed-as-reported"
        if not outcome:
            end = rng.choice(["complete", "complete", "soft-cancel", "force-cancel"])
            if end == "force-cancel" and rng.random() < 0.5:
                qmp.cmd("block-job-cancel", {"device": r.job, "force": True})
                r.wait(("BLOCK_JOB_CANCELLED", "BLOCK_JOB_COMPLETED"))
                outcome = "force-cancelled-copying"
            else:
                r.wait(("BLOCK_JOB_READY",))
                writer.stop.set()
                writer.join(60)
                if end == "complete":
                    qmp.cmd("block-job-complete", {"device": r.job})
                    ev = r.wait(("BLOCK_JOB_COMPLETED",))
                    assert not ev["data"].get("error"), ev
                    live = (tgt, tfmt)
                    outcome = "pivoted"
                elif end == "soft-cancel":
                    qmp.cmd("block-job-cancel", {"device": r.job})
                    r.wait(("BLOCK_JOB_COMPLETED",))
                    outcome = "soft-cancelled"
                else:
                    qmp.cmd("block-job-cancel", {"device": r.job, "force": True})
                    r.wait(("BLOCK_JOB_CANCELLED",))
                    outcome = "force-cancelled-ready"
    finally:
        writer.stop.set()
        writer.join(60)
    if writer.log.error and outcome != "failed-as-reported":
        raise AssertionError(f"round {n}: writer: {writer.log.error}")
    stats.count(outcome or "unknown")
    stats.writes += len(writer.log.writes)
    # tear down: the export (it may serve the target after a pivot), then every node
    qmp.cmd("block-export-del", {"id": f"e{n}", "mode": "hard"})
    deadline = time.monotonic() + 60
    while any(e["id"] == f"e{n}" for e in qmp.cmd("query-block-exports")):
        assert time.monotonic() < deadline, f"round {n}: export never went away"
        time.sleep(0.02)
    while r.status() is not None:
        st = r.status()
        if st == "concluded":
            qmp.cmd("job-dismiss", {"id": r.job})
        assert time.monotonic() < deadline, f"round {n}: job stuck in {st}"
        time.sleep(0.02)
    for name in (f"s{n}", f"t{n}"):
        qmp.cmd("blockdev-del", {"node-name": name})
    # the images are closed (flushed) now: compare them
    image = _read(live[0], live[1], work / f"l{n}.raw")
    _check_acked(writer, initial, image, f"round {n} ({outcome}, {mode})")
    if outcome in ("pivoted", "soft-cancelled"):
        other = (src, fmt) if live[0] == tgt else (tgt, tfmt)
        # after a pivot the writer kept writing to the target only before it was stopped:
        # it was stopped before completion, so both hold the same bytes
        assert image == _read(other[0], other[1], work / f"o{n}.raw"), \
            f"round {n}: target differs from source after {outcome}"
    for path, f in ((src, fmt), (tgt, tfmt)):
        if f == "qcow2":
            c = sh("qemu-img", "check", str(path))
            assert c.returncode == 0, f"round {n}: {path.name}: {c.stdout}{c.stderr}"
    for p in work.glob(f"*{n}.*"):
        p.unlink()


def run_soak(duration_s: float, seed: int, work: Path, log: Any = print,
             only_round: int | None = None, rss_every_s: float = 60) -> Stats:
    stats = Stats()
    rng = random.Random(seed)
    work.mkdir(parents=True, exist_ok=True)
    qmp_sock, nbd_sock = str(work / "qmp.sock"), str(work / "nbd.sock")
    argv = daemon_argv("ours", qmp_sock, "--nbd-server",
                       f"addr.type=unix,addr.path={nbd_sock}")
    start = time.monotonic()
    with DaemonProcess(argv, qmp_sock) as proc:
        _wait_path(nbd_sock)
        qmp = QMP(qmp_sock)
        n = 0
        while time.monotonic() - start < duration_s:
            n += 1
            round_seed = rng.randrange(1 << 62) if only_round is None else only_round
            try:
                one_round(qmp, work, nbd_sock, n, random.Random(round_seed), stats)
            except AssertionError as e:
                stats.failures.append(str(e))
                where = traceback.extract_tb(e.__traceback__)[-1]
                log(f"FAILURE round {n} (--round-seed {round_seed}) at "
                    f"{Path(where.filename).name}:{where.lineno}: {e}")
                if proc.proc.poll() is not None or len(stats.failures) >= 5:
                    break
                qmp.events.clear()
            stats.rounds = n
            stats.rss.append(_rss(proc.pid))
            elapsed = time.monotonic() - start
            if not stats.rss_samples or elapsed >= stats.rss_samples[-1][0] + rss_every_s:
                stats.rss_samples.append((int(elapsed), stats.rss[-1] >> 20))
                log(f"RSS t={int(elapsed)}s round={n} rss_mib={stats.rss[-1] >> 20}")
            assert proc.proc.poll() is None, "the daemon died"
            if only_round is not None:
                break
        qmp.cmd("quit")
        proc.proc.wait(60)
    shutil.rmtree(work, ignore_errors=True)
    log("SOAK " + json.dumps({"seconds": round(time.monotonic() - start, 1), "seed": seed,
                             "rounds": stats.rounds, "writes": stats.writes,
                             "outcomes": stats.outcomes, "failures": len(stats.failures),
                             "rss_first_mib": stats.rss[0] >> 20 if stats.rss else 0,
                             "rss_last_mib": stats.rss[-1] >> 20 if stats.rss else 0,
                             "rss_max_mib": max(stats.rss) >> 20 if stats.rss else 0,
                             "rss_samples_mib": stats.rss_samples}))
    return stats


def main() -> int:
    import argparse
    import functools

    p = argparse.ArgumentParser(description="blockmirror soak (issue 15)")
    p.add_argument("--duration", type=float, default=600)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--workdir", default=None)
    p.add_argument("--round-seed", type=int, default=None, help="replay one round")
    p.add_argument("--rss-every", type=float, default=60, help="RSS sample period (s)")
    p.add_argument("--probe", default=None, metavar="DIR",
                   help="load memprobe/ into the daemon: dumps in DIR (see README.md)")
    a = p.parse_args()
    if a.probe:
        import os

        os.makedirs(a.probe, exist_ok=True)
        os.environ["BM_PROBE_DIR"] = os.path.abspath(a.probe)
        os.environ["PYTHONPATH"] = os.pathsep.join(
            [str(HERE / "memprobe"), *filter(None, [os.environ.get("PYTHONPATH")])])
    import tempfile

    work = Path(a.workdir or tempfile.mkdtemp(prefix="bm-soak-"))
    stats = run_soak(a.duration, a.seed, work, log=functools.partial(print, flush=True),
                     only_round=a.round_seed, rss_every_s=a.rss_every)
    return 1 if stats.failures else 0


if __name__ == "__main__":
    sys.exit(main())
