"""Sequential 1 MiB I/O on a fresh qcow2 image: our driver vs qemu-io, same run, interleaved.

Both sides use O_DIRECT (our cache.direct=on, qemu-io -t none) so the figures are disk-bound
and comparable. Each round creates a fresh image per side, writes it front to back in 1 MiB
requests, then reads it back; the median over rounds is printed with the ratio ours/qemu.

    .venv/bin/python benchmarks/bench_qcow2_io.py [--size 1G] [--rounds 3] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from blockmirror.block.drivers import load_all
from blockmirror.block.drivers.qcow2.create import create_qcow2
from blockmirror.block.graph import BlockGraph
from blockmirror.block.options import close_all, open_image

MiB = 1 << 20


def _parse_size(text: str) -> int:
    units = {"k": 1 << 10, "m": MiB, "g": 1 << 30}
    t = text.strip().lower()
    if t[-1] in units:
        return int(float(t[:-1]) * units[t[-1]])
    return int(t)


def _make_raw(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        f.truncate(size)


async def ours(path: Path, size: int, fmt: str = "qcow2") -> tuple[float, float]:
    if fmt == "qcow2":
        await create_qcow2(str(path), size)
    else:
        await asyncio.to_thread(_make_raw, path, size)
    graph = BlockGraph()
    node = await open_image(
        graph, str(path), fmt, read_only=False, options={"cache": {"direct": True}}
    )
    buf = os.urandom(MiB)
    try:
        t0 = time.perf_counter()
        for off in range(0, size, MiB):
            await node.write(off, buf)
        await node.flush()
        t1 = time.perf_counter()
        for off in range(0, size, MiB):
            await node.read(off, MiB)
        t2 = time.perf_counter()
    finally:
        await close_all(graph)
    return t1 - t0, t2 - t1


def _qemu_io(path: Path, verb: str, size: int) -> float:
    args = ["qemu-io", "-f", "qcow2", "-t", "none"]
    for off in range(0, size, MiB):
        args += ["-c", f"{verb} {off} {MiB}"]
    if verb == "write":
        args += ["-c", "flush"]
    args.append(str(path))
    t0 = time.perf_counter()
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def qemu(path: Path, size: int) -> tuple[float, float]:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size)], check=True)
    return _qemu_io(path, "write", size), _qemu_io(path, "read", size)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1G")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", default=None, help="scratch directory (default: a temp dir)")
    a = ap.parse_args()
    size = _parse_size(a.size)
    load_all()
    # "floor": our raw driver over our file driver, the same path minus qcow2; it shows how
    # much of the gap to qemu-io is the qcow2 layer and how much the protocol layer below
    results: dict[str, list[tuple[float, float]]] = {"ours": [], "qemu": [], "floor": []}
    with tempfile.TemporaryDirectory(dir=a.dir) as d:
        for r in range(a.rounds):
            # alternate who goes first so page-cache and disk warm-up effects even out
            order = ["ours", "qemu", "floor"] if r % 2 == 0 else ["qemu", "ours", "floor"]
            for who in order:
                p = Path(d) / f"{who}.img"
                if who == "qemu":
                    res = qemu(p, size)
                else:
                    res = asyncio.run(ours(p, size, "qcow2" if who == "ours" else "raw"))
                p.unlink()
                results[who].append(res)
                print(f"round {r} {who:5s} write {size / MiB / res[0]:8.1f} MiB/s  "
                      f"read {size / MiB / res[1]:8.1f} MiB/s", flush=True)
    med = {
        who: (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v))
        for who, v in results.items()
    }
    for i, verb in enumerate(("write", "read")):
        o, q, f = med["ours"][i], med["qemu"][i], med["floor"][i]
        print(f"{verb}: ours {size / MiB / o:.1f} MiB/s, qemu-io {size / MiB / q:.1f} MiB/s, "
              f"time ratio ours/qemu = {o / q:.2f}x (raw-over-file floor "
              f"{size / MiB / f:.1f} MiB/s; qcow2 layer costs {o / f:.2f}x of it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
