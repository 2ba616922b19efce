"""RBD benchmark: time to READY of a local qcow2 -> Ceph RBD mirror, QSD vs blockmirror.

The source is a 1 GiB qcow2 image half allocated in 64 KiB extents at seeded random offsets
(``BENCH_RBD_SIZE=256M`` for a quicker run). A private single-node cluster
(``scripts/ceph-cluster``, memstore OSD) is started for the run; for each repetition
(``BENCH_RBD_REPEAT``, default 3), qemu-storage-daemon and blockmirror are run in turn
(interleaved) with the same command line: the qcow2 source, a ``driver=rbd`` target on a
freshly created image, and the same ``blockdev-mirror sync=full`` over QMP. We time from the
command to BLOCK_JOB_READY, soft-cancel, quit, check the copy with ``qemu-img compare`` through
QEMU's rbd driver, and remove the image. Prints each run, the medians and ours/QSD.
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
from pathlib import Path
from typing import Any

MiB = 1 << 20
EXTENT = 64 * 1024
ROOT = Path(__file__).resolve().parent.parent


def _size() -> int:
    text = os.environ.get("BENCH_RBD_SIZE", "1G")
    mult = {"K": 1 << 10, "M": MiB, "G": 1 << 30}
    return int(text[:-1]) * mult[text[-1].upper()] if text[-1].isalpha() else int(text)


def make_source(work: str, size: int, seed: int = 16) -> str:
    """Half of the 64 KiB extents filled with seeded random bytes, as qcow2."""
    raw = os.path.join(work, "src.raw")
    rng = random.Random(seed)
    extents = list(range(size // EXTENT))
    rng.shuffle(extents)
    block = rng.randbytes(4 * MiB)
    with open(raw, "wb") as f:
        f.truncate(size)
        for n, i in enumerate(sorted(extents[: len(extents) // 2])):
            f.seek(i * EXTENT)
            start = (n * 4099) % (len(block) - EXTENT)
            f.write(block[start : start + EXTENT])
    out = os.path.join(work, "src.qcow2")
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, out], check=True)
    os.unlink(raw)
    return out


def _argv(which: str, work: str, src: str, conf: str, image: str) -> list[str]:
    prog = (["qemu-storage-daemon"] if which == "qsd"
            else [sys.executable, "-m", "blockmirror.cli.main", "daemon"])
    return [
        *prog,
        "--blockdev", f"driver=file,node-name=src-file,filename={src}",
        "--blockdev", "driver=qcow2,node-name=src,file=src-file",
        "--blockdev", f"driver=rbd,node-name=tgt,pool=rbd,image={image},conf={conf}",
        "--chardev", f"socket,id=m0,path={work}/{which}.sock,server=on,wait=off",
        "--monitor", "chardev=m0",
        "--pidfile", f"{work}/{which}.pid",
    ]


async def _wait_event(qmp: Any, name: str) -> None:
    async for ev in qmp.events:
        if ev["event"] == name:
            return


async def _drive(sock: str) -> float:
    from qemu.qmp import QMPClient

    qmp = QMPClient("bench")
    await qmp.connect(sock)
    try:
        ready = asyncio.ensure_future(_wait_event(qmp, "BLOCK_JOB_READY"))
        t0 = time.monotonic()
        await qmp.execute("blockdev-mirror", {"job-id": "m", "device": "src", "target": "tgt",
                                              "sync": "full"})
        await asyncio.wait_for(ready, 1800)
        ready_s = time.monotonic() - t0
        done = asyncio.ensure_future(_wait_event(qmp, "BLOCK_JOB_COMPLETED"))
        await qmp.execute("block-job-cancel", {"device": "m"})
        await asyncio.wait_for(done, 120)
        with contextlib.suppress(Exception):
            await qmp.execute("quit")
    finally:
        with contextlib.suppress(Exception):
            await qmp.disconnect()
    return ready_s


def run_one(which: str, work: str, src: str, conf: str, size: int, n: int) -> float:
    image = f"bench-{which}-{n}"
    rbd = ["rbd", "-c", conf]
    subprocess.run([*rbd, "create", "--size", f"{size // MiB}", f"rbd/{image}"], check=True)
    pidfile = os.path.join(work, f"{which}.pid")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(pidfile)
    proc = subprocess.Popen(_argv(which, work, src, conf, image), stdout=subprocess.DEVNULL)
    try:
        for _ in range(3000):
            if os.path.exists(pidfile):
                break
            time.sleep(0.01)
        ready_s = asyncio.run(_drive(os.path.join(work, f"{which}.sock")))
    finally:
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    out = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", src,
                          f"rbd:rbd/{image}:conf={conf}"], capture_output=True, text=True)
    if "Images are identical" not in out.stdout:
        raise SystemExit(f"{which}: target differs from source: {out.stdout}{out.stderr}")
    subprocess.run([*rbd, "rm", "--no-progress", f"rbd/{image}"], check=True,
                   capture_output=True)
    return ready_s


def main() -> int:
    for tool in ("qemu-storage-daemon", "qemu-img", "rbd", "ceph-mon", "ceph-osd"):
        if shutil.which(tool) is None:
            print(f"skipping: {tool} is not installed (make tools)")
            return 0
    size = _size()
    repeat = int(os.environ.get("BENCH_RBD_REPEAT", "3"))
    work = tempfile.mkdtemp(prefix="bm-bench-rbd-")
    cluster = os.path.join(work, "ceph")
    script = str(ROOT / "scripts" / "ceph-cluster")
    try:
        subprocess.run([script, "start", cluster], check=True)
        conf = os.path.join(cluster, "ceph.conf")
        src = make_source(work, size)
        print(f"source: {size // MiB} MiB qcow2, half allocated in 64 KiB extents; "
              f"target: rbd (memstore OSD); {repeat} runs each, interleaved")
        times: dict[str, list[float]] = {"qsd": [], "ours": []}
        for n in range(repeat):
            for which in ("qsd", "ours"):
                t = run_one(which, work, src, conf, size, n)
                times[which].append(t)
                print(f"  run {n + 1} {which:>4}: READY after {t:6.2f} s", flush=True)
        q, o = statistics.median(times["qsd"]), statistics.median(times["ours"])
        print(f"median time to READY: qsd {q:.2f} s, ours {o:.2f} s, ours/qsd {o / q:.2f}")
    finally:
        subprocess.run([script, "stop", cluster], check=False)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
