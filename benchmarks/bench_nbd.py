"""NBD throughput: blockmirror's daemon vs qemu-storage-daemon, in the same run.

1. Export read: each daemon exports the same raw image (default 1 GiB, filled with non-zero
   data so nothing is skipped as a hole) over a unix socket; ``qemu-img convert`` reads the
   whole export into a null-co target (no disk writes on the client side).
2. Mirror to an NBD target: each daemon runs drive-mirror (mode=existing, sync=full) of the
   image to a fresh qemu-nbd export; the time to BLOCK_JOB_READY is measured.

Every measurement is repeated and the best time kept; the ratio ours/QSD is printed (lower is
better, 1.0 = as fast as QEMU).

    .venv/bin/python benchmarks/bench_nbd.py [--size-mib 1024] [--repeat 3] [--no-mirror]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from blockmirror.qmp.testing import DaemonProcess, SyncQMP, daemon_argv

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


def _qmp(conn: SyncQMP, name: str, args: dict[str, object] | None = None) -> dict[str, object]:
    msg: dict[str, object] = {"execute": name}
    if args:
        msg["arguments"] = args
    conn.send(json.dumps(msg).encode())
    while True:
        reply = json.loads(conn.read_message())
        if "event" not in reply:
            if "error" in reply:
                raise RuntimeError(f"{name}: {reply['error']}")
            return dict(reply)


def _wait_event(conn: SyncQMP, name: str) -> None:
    while json.loads(conn.read_message()).get("event") != name:
        pass


def mirror_to_nbd(kind: str, image: Path, tmp: Path, size_mib: int) -> float:
    """Seconds from drive-mirror to BLOCK_JOB_READY, copying ``image`` to a qemu-nbd export."""
    target = tmp / f"{kind}-target.raw"
    with target.open("wb") as f:
        f.truncate(size_mib * MiB)
    tsock = tmp / f"{kind}-target.sock"
    with contextlib.suppress(FileNotFoundError):
        tsock.unlink()
    nbd = subprocess.Popen(["qemu-nbd", "-f", "raw", "-k", str(tsock), "-x", "exp", "-t",
                            str(target)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not tsock.exists():
            time.sleep(0.01)
        qmp = str(tmp / f"{kind}-qmp.sock")
        argv = daemon_argv(kind, qmp, "--blockdev", f"driver=file,node-name=f0,filename={image}",
                           "--blockdev", "driver=raw,node-name=disk,file=f0")
        with DaemonProcess(argv, qmp) as proc, proc.connect() as conn:
            _qmp(conn, "qmp_capabilities")
            t0 = time.perf_counter()
            _qmp(conn, "drive-mirror", {
                "job-id": "m0", "device": "disk", "sync": "full", "mode": "existing",
                "format": "raw", "target": f"nbd+unix:///exp?socket={tsock}"})
            _wait_event(conn, "BLOCK_JOB_READY")
            elapsed = time.perf_counter() - t0
            _qmp(conn, "block-job-cancel", {"device": "m0"})
            _wait_event(conn, "BLOCK_JOB_COMPLETED")
        return elapsed
    finally:
        nbd.kill()
        nbd.wait()
        target.unlink()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-mirror", action="store_true", help="only the export read benchmark")
    args = ap.parse_args()
    for tool in ("qemu-img", "qemu-nbd", "qemu-storage-daemon"):
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
        print(f"export read, ratio ours/qsd (time): {best['ours'] / best['qsd']:.2f}")
        if not args.no_mirror:
            for kind in ("qsd", "ours"):
                times = [mirror_to_nbd(kind, image, Path(tmp), args.size_mib)
                         for _ in range(args.repeat)]
                best[kind] = min(times)
                print(f"{kind:>5}: drive-mirror to a qemu-nbd target, {args.size_mib} MiB: best "
                      f"{best[kind]:.2f} s ({args.size_mib / best[kind]:.0f} MiB/s) of "
                      f"{', '.join(f'{t:.2f}' for t in times)}")
            print(f"mirror to NBD, ratio ours/qsd (time): {best['ours'] / best['qsd']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
