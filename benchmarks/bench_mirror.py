"""Mirror benchmark: qemu-storage-daemon and blockmirror side by side, in the same run.

For each source (1 GiB raw and qcow2; 4 GiB too with BENCH_MIRROR_4G=1, off by default because
each 4 GiB pair takes minutes on a small machine), half allocated by a seeded generator, both
daemons are started with the same command line, the same ``blockdev-mirror sync=full`` is sent
over QMP, and we measure the time to BLOCK_JOB_READY, the daemon's CPU seconds and its peak RSS
(from wait4's rusage), idle and under a paced guest writer (qemu-io over the NBD export);
idle copies are checked with ``qemu-img compare`` after a soft cancel.
Prints one row per run and the ours/QSD ratio. ``BENCH_MIRROR_SIZES=64M,256M`` overrides sizes,
``BENCH_MIRROR_FMTS=raw`` and ``BENCH_MIRROR_LOADS=idle`` narrow the matrix,
``BENCH_MIRROR_REPEAT=N`` runs each case N times (QSD and ours interleaved, so drifting page
cache and writeback hit both alike) and prints the medians, and ``BENCH_MIRROR_DIRECT=1`` opens
every file node with cache.direct=on for a steadier disk-bound figure.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

MiB = 1 << 20
GiB = 1 << 30
CHUNK = 4 * MiB


@dataclass
class Result:
    ready_s: float
    cpu_s: float
    rss_mib: float


def _parse_size(text: str) -> int:
    mult = {"K": 1 << 10, "M": MiB, "G": GiB}
    return int(text[:-1]) * mult[text[-1].upper()] if text[-1].isalpha() else int(text)


def make_source(work: str, size: int, fmt: str, seed: int = 42) -> str:
    """A raw file with half of its 4 MiB chunks filled (seeded), converted to ``fmt``."""
    raw = os.path.join(work, f"src-{size}.raw")
    if not os.path.exists(raw):
        rng = random.Random(seed)
        chunks = list(range(size // CHUNK))
        rng.shuffle(chunks)
        with open(raw, "wb") as f:
            f.truncate(size)
            block = rng.randbytes(CHUNK)
            for i in sorted(chunks[: len(chunks) // 2]):
                f.seek(i * CHUNK)
                f.write(block[i % 7 :] + block[: i % 7])
    if fmt == "raw":
        return raw
    out = os.path.join(work, f"src-{size}.{fmt}")
    if not os.path.exists(out):
        subprocess.run(["qemu-img", "convert", "-O", fmt, raw, out], check=True)
    return out


def _daemon_argv(which: str, work: str, src: str, tgt: str, fmt: str) -> list[str]:
    prog = (["qemu-storage-daemon"] if which == "qsd"
            else [sys.executable, "-m", "blockmirror.cli.main", "daemon"])
    cache = ",cache.direct=on" if os.environ.get("BENCH_MIRROR_DIRECT") == "1" else ""
    return [
        *prog,
        "--blockdev", f"driver=file,node-name=src-file,filename={src}{cache}",
        "--blockdev", f"driver={fmt},node-name=src,file=src-file",
        "--blockdev", f"driver=file,node-name=tgt-file,filename={tgt}{cache}",
        "--blockdev", f"driver={fmt},node-name=tgt,file=tgt-file",
        "--chardev", f"socket,id=m0,path={work}/{which}.sock,server=on,wait=off",
        "--monitor", "chardev=m0",
        "--nbd-server", f"addr.type=unix,addr.path={work}/{which}-nbd.sock",
        "--export", "type=nbd,id=e0,node-name=src,name=src,writable=on",
        "--pidfile", f"{work}/{which}.pid",
    ]


def _writer(work: str, which: str, size: int) -> subprocess.Popen[bytes]:
    """qemu-io over NBD: 64 KiB writes at seeded offsets, ~6 MB/s (a 10 ms sleep each)."""
    rng = random.Random(7)
    cmds: list[str] = []
    for _ in range(3000):
        off = rng.randrange(0, size // 65536) * 65536
        cmds += ["-c", f"write -P 0x{rng.randrange(1, 255):02x} {off} 64k", "-c", "sleep 10"]
    url = f"nbd+unix:///src?socket={work}/{which}-nbd.sock"
    return subprocess.Popen(["qemu-io", "-f", "raw", *cmds, url], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def _prewarm(path: str) -> None:
    """Read the source once and write back dirty pages, so both daemons start alike."""
    with open(path, "rb") as f:
        while f.read(16 * MiB):
            pass
    os.sync()


def run_one(which: str, work: str, src: str, fmt: str, size: int, busy: bool) -> Result:
    """Start one daemon, mirror, measure; blocking parts here, QMP in ``_drive``."""
    tgt = os.path.join(work, f"tgt-{which}.{fmt}")
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, tgt, str(size)], check=True)
    _prewarm(src)
    pidfile = os.path.join(work, f"{which}.pid")
    if os.path.exists(pidfile):
        os.unlink(pidfile)
    proc = subprocess.Popen(_daemon_argv(which, work, src, tgt, fmt), stdout=subprocess.DEVNULL)
    writer: subprocess.Popen[bytes] | None = None
    try:
        for _ in range(3000):
            if os.path.exists(pidfile):
                break
            time.sleep(0.01)
        if busy:
            writer = _writer(work, which, size)
            time.sleep(0.3)
        ready_s = asyncio.run(_drive(os.path.join(work, f"{which}.sock")))
    finally:
        if writer is not None:
            writer.kill()
            writer.wait()
        # reap it ourselves: wait4 gives the daemon's own CPU time and peak RSS
        deadline = time.monotonic() + 60
        while True:
            pid, _, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
            time.sleep(0.01)
        proc.returncode = 0  # reaped above; keep Popen from waiting again
    if not busy:
        # a soft cancel after READY leaves a point-in-time copy: it must equal the source
        out = subprocess.run(["qemu-img", "compare", "-f", fmt, "-F", fmt, src, tgt],
                             capture_output=True, text=True)
        if "Images are identical" not in out.stdout:
            raise SystemExit(f"{which}: target differs from source: {out.stdout}{out.stderr}")
    os.unlink(tgt)
    return Result(ready_s, ru.ru_utime + ru.ru_stime, ru.ru_maxrss / 1024)


async def _drive(sock: str) -> float:
    """blockdev-mirror, time to READY, soft cancel, quit; returns the seconds to READY."""
    from qemu.qmp import QMPClient

    qmp = QMPClient("bench")
    await qmp.connect(sock)
    try:
        t0 = time.monotonic()
        ready = asyncio.ensure_future(_wait_event(qmp, "BLOCK_JOB_READY"))
        await qmp.execute("blockdev-mirror", {"job-id": "m", "device": "src", "target": "tgt",
                                              "sync": "full"})
        await asyncio.wait_for(ready, 3600)
        ready_s = time.monotonic() - t0
        done = asyncio.ensure_future(_wait_event(qmp, "BLOCK_JOB_COMPLETED"))
        await qmp.execute("block-job-cancel", {"device": "m"})
        await done
        with contextlib.suppress(Exception):
            await qmp.execute("quit")
    finally:
        with contextlib.suppress(Exception):
            await qmp.disconnect()
    return ready_s


async def _wait_event(qmp: Any, name: str) -> None:
    async for ev in qmp.events:
        if ev["event"] == name:
            return


def _median(rs: list[Result]) -> Result:
    return Result(statistics.median(r.ready_s for r in rs), statistics.median(r.cpu_s for r in rs),
                  statistics.median(r.rss_mib for r in rs))


def _row(size: int, fmt: str, busy: bool, r_q: Result, r_o: Result, tag: str) -> None:
    print(f"{size // MiB:>5}M {fmt:>5} {'busy' if busy else 'idle':>5} | "
          f"{r_q.ready_s:>8.2f}s {r_q.cpu_s:>5.1f}s {r_q.rss_mib:>5.0f}M | "
          f"{r_o.ready_s:>9.2f}s {r_o.cpu_s:>5.1f}s {r_o.rss_mib:>5.0f}M | "
          f"{r_o.ready_s / max(r_q.ready_s, 1e-6):>5.1f}x{tag}", flush=True)


def main() -> int:
    for tool in ("qemu-storage-daemon", "qemu-img", "qemu-io"):
        if shutil.which(tool) is None:
            print(f"skipping: {tool} is not installed")
            return 0
    sizes = [GiB]
    if os.environ.get("BENCH_MIRROR_4G") == "1":
        sizes.append(4 * GiB)
    if os.environ.get("BENCH_MIRROR_SIZES"):
        sizes = [_parse_size(s) for s in os.environ["BENCH_MIRROR_SIZES"].split(",")]
    fmts = os.environ.get("BENCH_MIRROR_FMTS", "raw,qcow2").split(",")
    loads = [x == "busy" for x in os.environ.get("BENCH_MIRROR_LOADS", "idle,busy").split(",")]
    repeat = max(1, int(os.environ.get("BENCH_MIRROR_REPEAT", "1")))
    work = tempfile.mkdtemp(prefix="bench-mirror-", dir=os.environ.get("BENCH_DIR"))
    print(f"{'size':>6} {'fmt':>5} {'load':>5} | {'QSD ready':>9} {'cpu':>6} {'rss':>6} | "
          f"{'ours ready':>10} {'cpu':>6} {'rss':>6} | {'ratio':>6}")
    try:
        for size in sizes:
            for fmt in fmts:
                src = make_source(work, size, fmt)
                for busy in loads:
                    qs: list[Result] = []
                    os_: list[Result] = []
                    for _ in range(repeat):
                        # one daemon at a time; wait4 needs each daemon reaped by us
                        qs.append(run_one("qsd", work, src, fmt, size, busy))
                        os_.append(run_one("ours", work, src, fmt, size, busy))
                        _row(size, fmt, busy, qs[-1], os_[-1], "")
                    if repeat > 1:
                        _row(size, fmt, busy, _median(qs), _median(os_), " median")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
