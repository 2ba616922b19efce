"""The cost of resumable mirrors and of the verified switch-over (issue 12).

1. Activity log: ``blockmirror daemon`` mirrors a raw image (READY, background mode) to a
   raw file and exports the source over NBD (unix socket). ``qemu-io`` writes 64 KiB at random
   offsets through the export:
   * throughput: N ``aio_write`` (queue depth up to N, one connection) then ``aio_flush``;
   * latency: N sequential ``write`` commands (queue depth 1), mean per write.
   Three configurations: no resume log, the default log (1024 x 4 MiB extents, the whole
   disk fits in it, so only first touches write the log), and a small log (``--small-extents``
   extents: most writes miss and force evictions and checkpoints, the worst case).
2. Verify pass: the seconds per GiB of the x-verify pass over an in-sync pair (READY to the
   pass's end, no guest writes), in-process, on files in the page cache.

    .venv/bin/python benchmarks/bench_resume.py [--size-mib 512] [--writes 4000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from blockmirror.qmp.testing import DaemonProcess, SyncQMP, daemon_argv

MiB = 1 << 20
GiB = 1 << 30
BLOCK = 64 * 1024


def make_image(path: Path, size: int) -> None:
    chunk = bytes((i * 37 + 11) & 0xFF or 1 for i in range(MiB))
    with path.open("wb") as f:
        for _ in range(size // MiB):
            f.write(chunk)


def cmd(q: SyncQMP, name: str, args: dict[str, Any] | None = None) -> Any:
    req: dict[str, Any] = {"execute": name}
    if args is not None:
        req["arguments"] = args
    q.send(json.dumps(req).encode() + b"\n")
    while True:
        msg = json.loads(q.read_message())
        if "return" in msg:
            return msg["return"]
        if "error" in msg:
            raise RuntimeError(f"{name}: {msg['error']}")


def wait_event(q: SyncQMP, name: str) -> None:
    while json.loads(q.read_message()).get("event") != name:
        pass


def qemu_io(uri: str, commands: list[str]) -> float:
    script = "\n".join(commands) + "\nquit\n"
    t0 = time.perf_counter()
    p = subprocess.run(["qemu-io", "-f", "raw", uri], input=script.encode(),
                       capture_output=True)
    dt = time.perf_counter() - t0
    out = p.stdout.decode()
    if p.returncode != 0 or "error" in out.lower() or "failed" in out.lower():
        raise RuntimeError(out[-2000:] + p.stderr.decode())
    return dt


def offsets(n: int, size: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(0, size // BLOCK) * BLOCK for _ in range(n)]


def writer_run(tmp: Path, size: int, writes: int, log: dict[str, Any] | None,
               seed: int) -> tuple[float, float, float]:
    """(cold MiB/s, warm MiB/s at queue depth N, mean ms per write at queue depth 1).

    Cold: the first pass, in which every extent is touched for the first time (each needs
    a log record); warm: a second pass over the same disk, the steady state."""
    src, tgt = tmp / "src.raw", tmp / "tgt.raw"
    sock, nbd = str(tmp / "qmp.sock"), str(tmp / "nbd.sock")
    with DaemonProcess(daemon_argv("ours", sock), sock) as d:
        q = d.connect(limit_s=600)
        cmd(q, "qmp_capabilities")
        for name, path in (("src", src), ("tgt", tgt)):
            cmd(q, "blockdev-add", {"driver": "raw", "node-name": name,
                                    "file": {"driver": "file", "filename": str(path)}})
        args: dict[str, Any] = {"job-id": "m", "device": "src", "target": "tgt", "sync": "full"}
        if log is not None:
            args.update(log)
        cmd(q, "blockdev-mirror", args)
        wait_event(q, "BLOCK_JOB_READY")
        cmd(q, "nbd-server-start", {"addr": {"type": "unix", "data": {"path": nbd}}})
        cmd(q, "block-export-add", {"type": "nbd", "id": "e", "node-name": "src",
                                    "name": "src", "writable": True})
        uri = f"nbd+unix:///src?socket={nbd}"
        offs = offsets(writes, size, seed)
        dt = qemu_io(uri, [f"aio_write -q -P 7 {o} {BLOCK}" for o in offs] + ["aio_flush"])
        cold = writes * BLOCK / MiB / dt
        offs = offsets(writes, size, seed + 2)
        dt = qemu_io(uri, [f"aio_write -q -P 8 {o} {BLOCK}" for o in offs] + ["aio_flush"])
        tput = writes * BLOCK / MiB / dt
        lat_offs = offsets(writes // 4, size, seed + 1)
        dt = qemu_io(uri, [f"write -q -P 9 {o} {BLOCK}" for o in lat_offs])
        lat = dt / len(lat_offs) * 1000
        cmd(q, "block-job-cancel", {"device": "m"})
        wait_event(q, "BLOCK_JOB_COMPLETED")
        q.close()
    return cold, tput, lat


async def verify_run(tmp: Path, size: int) -> float:
    """Seconds per GiB of the first verification pass over an in-sync pair."""
    from blockmirror.cli.mirror import execute
    from blockmirror.daemon import Daemon
    from blockmirror.jobs.mirror import MirrorJob

    d = Daemon()
    for name, path in (("src", tmp / "src.raw"), ("tgt", tmp / "tgt.raw")):
        await execute(d, "blockdev-add", {"driver": "raw", "node-name": name,
                                          "file": {"driver": "file", "filename": str(path)}})
    await execute(d, "blockdev-mirror", {"job-id": "v", "device": "src", "target": "tgt",
                                         "sync": "full", "x-verify": True})
    job = d.jobs.find("v")
    assert isinstance(job, MirrorJob) and job.verifier is not None
    ready = asyncio.Event()
    unsubscribe = d.events.subscribe(
        lambda ev: ready.set() if ev["event"] == "BLOCK_JOB_READY" else None)
    if not job.is_ready:
        await ready.wait()
    unsubscribe()
    t0 = time.perf_counter()
    job.verifier.start()  # already started at READY: this only returns the same task
    assert job.verifier.task is not None
    await job.verifier.task
    dt = time.perf_counter() - t0
    assert job.verifier.mismatches == 0 and job.progress.verified >= size
    await job.user_cancel(True)
    await job.wait_finished()
    await d.shutdown()
    return dt / (size / GiB)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=512)
    ap.add_argument("--writes", type=int, default=4000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--small-extents", type=int, default=8)
    opts = ap.parse_args()
    size = opts.size_mib * MiB
    with tempfile.TemporaryDirectory(prefix="bench-resume-") as t:
        tmp = Path(t)
        make_image(tmp / "src.raw", size)
        (tmp / "tgt.raw").write_bytes(b"")
        subprocess.run(["truncate", "-s", str(size), str(tmp / "tgt.raw")], check=True)
        configs: list[tuple[str, dict[str, Any] | None]] = [
            ("no resume log", None),
            ("resume log, 1024 x 4 MiB extents", {"x-resume-log": str(tmp / "a.resume")}),
            (f"resume log, {opts.small_extents} x 4 MiB extents (evictions)",
             {"x-resume-log": str(tmp / "b.resume"),
              "x-resume-extents": opts.small_extents}),
        ]
        results: dict[str, tuple[float, float, float]] = {}
        for r in range(opts.repeat):
            for name, log in configs:
                if log is not None:
                    log = {**log, "x-resume-restart": True}
                cold, tput, lat = writer_run(tmp, size, opts.writes, log, seed=r)
                best = results.get(name)
                results[name] = (max(cold, best[0]) if best else cold,
                                 max(tput, best[1]) if best else tput,
                                 min(lat, best[2]) if best else lat)
        base_c, base_t, base_l = results["no resume log"]
        print(f"64 KiB random writes through NBD, {opts.size_mib} MiB disk, mirror READY "
              f"(best of {opts.repeat}):")
        for name, (cold, tput, lat) in results.items():
            print(f"  {name:45s} cold {cold:6.1f} MiB/s ({cold / base_c:6.1%})  warm "
                  f"{tput:6.1f} MiB/s ({tput / base_t:6.1%})  QD1 {lat:6.3f} ms/write "
                  f"({lat / base_l:6.1%})")
        best_v = min(asyncio.run(verify_run(tmp, size)) for _ in range(opts.repeat))
        print(f"verify pass: {best_v:.2f} s per GiB ({opts.size_mib} MiB in sync, page cache)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
