"""NBD export throughput: blockmirror's daemon vs qemu-storage-daemon, in the same run.

Each daemon exports the same raw image (default 1 GiB, filled with non-zero data so nothing is
skipped as a hole) over a unix socket; ``qemu-img convert`` reads the whole export into a
null-co target (no disk writes on the client side). Every measurement is repeated and the best
time kept; the ratio ours/QSD is printed (lower is better, 1.0 = as fast as QEMU).

    .venv/bin/python benchmarks/bench_nbd.py [--size-mib 1024] [--repeat 3]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

MiB = 1 << 20


def make_image(path: Path, size_mib: int) -> None:
    chunk = bytes((i * 37 + 11) & 0xFF or 1 for i in range(MiB))
    with path.open("wb") as f:
        for _ in range(size_mib):
            f.write(chunk)


@contextlib.contextmanager
def daemon(kind: str, image: Path, sock: Path) -> Iterator[None]:
    """An exporting daemon process, killed when the block ends."""
    common = [
        "--blockdev", f"driver=file,node-name=f0,filename={image}",
        "--blockdev", "driver=raw,node-name=disk,file=f0",
        "--nbd-server", f"addr.type=unix,addr.path={sock}",
        "--export", "type=nbd,id=e0,node-name=disk,name=disk",
    ]
    if kind == "qsd":
        argv = ["qemu-storage-daemon", *common]
    else:
        argv = [sys.executable, "-m", "blockmirror.cli.main", "daemon", *common]
    with contextlib.suppress(FileNotFoundError):
        sock.unlink()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            if proc.poll() is not None:
                err = proc.stderr.read().decode() if proc.stderr else ""
                raise RuntimeError(f"{kind} daemon exited: {err}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{kind} daemon did not create {sock}")
            time.sleep(0.01)
        yield
    finally:
        proc.kill()
        proc.wait()


def read_export(sock: Path, size_mib: int) -> float:
    uri = f"nbd+unix:///disk?socket={sock}"
    argv = ["qemu-img", "convert", "-f", "raw", "-n", uri,
            "--target-image-opts", f"driver=null-co,size={size_mib * MiB}"]
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    for tool in ("qemu-img", "qemu-storage-daemon"):
        if shutil.which(tool) is None:
            print(f"{tool} is not installed", file=sys.stderr)
            return 2
    with tempfile.TemporaryDirectory(prefix="bench-nbd-") as tmp:
        image = Path(tmp) / "disk.raw"
        make_image(image, args.size_mib)
        best: dict[str, float] = {}
        for kind in ("qsd", "ours"):
            sock = Path(tmp) / f"{kind}.sock"
            with daemon(kind, image, sock):
                times = [read_export(sock, args.size_mib) for _ in range(args.repeat)]
            best[kind] = min(times)
            rate = args.size_mib / best[kind]
            print(f"{kind:>5}: qemu-img convert of {args.size_mib} MiB: best {best[kind]:.2f} s "
                  f"({rate:.0f} MiB/s) of {', '.join(f'{t:.2f}' for t in times)}")
        print(f"ratio ours/qsd (time): {best['ours'] / best['qsd']:.2f}")
        os.sync()
    return 0


if __name__ == "__main__":
    sys.exit(main())
