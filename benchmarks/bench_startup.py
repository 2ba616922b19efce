"""Start-up benchmark: process start to QMP greeting, blockmirror vs qemu-storage-daemon.

Each repetition starts both daemons (alternating which goes first, so neither profits from a
warm cache systematically), connects to the QMP socket as soon as it exists and times the
arrival of the greeting. Prints the medians and their ratio (ours / QSD).

    .venv/bin/python benchmarks/bench_startup.py [--repeat N]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time


def argv_for(kind: str, sock: str) -> list[str]:
    chardev = f"socket,id=qmp0,path={sock},server=on,wait=off"
    base = (["qemu-storage-daemon"] if kind == "qsd"
            else [sys.executable, "-m", "blockmirror.cli.main", "daemon"])
    return [*base, "--chardev", chardev, "--monitor", "chardev=qmp0"]


def time_to_greeting(kind: str, tmpdir: str) -> float:
    sock = os.path.join(tmpdir, f"{kind}.sock")
    if os.path.exists(sock):
        os.unlink(sock)
    start = time.perf_counter()
    proc = subprocess.Popen(argv_for(kind, sock), stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{kind} exited with {proc.returncode}")
            try:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(sock)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                s.close()
                time.sleep(0.0005)
        with s:
            s.settimeout(10)
            buf = b""
            while b"\n" not in buf:
                chunk = s.recv(4096)
                if not chunk:
                    raise RuntimeError(f"{kind} closed before its greeting")
                buf += chunk
        elapsed = time.perf_counter() - start
    finally:
        proc.kill()
        proc.wait()
    assert buf.startswith(b'{"QMP"'), buf
    return elapsed


def python_floor() -> float:
    """The interpreter alone starting and importing asyncio: our lower bound."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import asyncio"], check=True)
    return time.perf_counter() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=15)
    opts = ap.parse_args()
    if shutil.which("qemu-storage-daemon") is None:
        print("qemu-storage-daemon is not installed", file=sys.stderr)
        return 1
    times: dict[str, list[float]] = {"ours": [], "qsd": [], "floor": []}
    with tempfile.TemporaryDirectory(prefix="bm-bench-") as tmpdir:
        for i in range(opts.repeat):
            order = ("ours", "qsd") if i % 2 == 0 else ("qsd", "ours")
            for kind in order:
                times[kind].append(time_to_greeting(kind, tmpdir))
            times["floor"].append(python_floor())
    med = {k: statistics.median(v) for k, v in times.items()}
    for kind in ("ours", "qsd", "floor"):
        v = times[kind]
        print(f"{kind:5s} median {med[kind] * 1000:7.1f} ms  min {min(v) * 1000:7.1f} ms  "
              f"max {max(v) * 1000:7.1f} ms  (n={len(v)})")
    print(f"ratio ours/qsd: {med['ours'] / med['qsd']:.2f}  "
          f"(floor = python -c 'import asyncio'; ours - floor = "
          f"{(med['ours'] - med['floor']) * 1000:.1f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
