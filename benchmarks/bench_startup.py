"""Start-up benchmark: process start to QMP greeting, blockmirror vs qemu-storage-daemon.

Each repetition starts both daemons (alternating which goes first, so neither profits from a
warm cache systematically), connects to the QMP socket as soon as it exists and times the
arrival of the greeting, then of the reply to ``qmp_capabilities`` sent right after it (the
first moment a client can do anything). Floors: ``python -c pass`` (the interpreter alone)
and ``python -c 'import asyncio'``. Prints medians, and ours against ``python -c pass`` as a
ratio and as a difference (the machine is shared: the difference is the steadier number);
the goal is a greeting within 60 ms.

Bytecode: an installed blockmirror has its modules compiled (pip compiles a wheel's modules
at install time). A source checkout run with ``PYTHONDONTWRITEBYTECODE=1`` never gets them
written, and then every start compiles our 150-odd modules (about 100 ms of CPU) before
the daemon can answer. So the benchmark first compiles the package (``compileall``, a no-op
when the bytecode is current), and ``--cold`` measures the other case: our package's
bytecode removed and none written, i.e. compiling our modules on every start.

    .venv/bin/python benchmarks/bench_startup.py [--repeat N] [--cold]
"""

from __future__ import annotations

import argparse
import compileall
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time


def _blockmirror() -> list[str]:
    """The installed ``blockmirror`` command (what users run; ``python -m`` would add runpy's
    imports), else ``python -m``."""
    script = os.path.join(os.path.dirname(sys.executable), "blockmirror")
    return [script] if os.access(script, os.X_OK) else [sys.executable, "-m",
                                                         "blockmirror.cli.main"]


def argv_for(kind: str, sock: str) -> list[str]:
    """``kind``: "qsd", "ours" (monitor only), "ours+blockdev" (a node on the command line:
    the greeting then waits for start-up, as QSD's does)."""
    chardev = f"socket,id=qmp0,path={sock},server=on,wait=off"
    base = (["qemu-storage-daemon"] if kind == "qsd" else [*_blockmirror(), "daemon"])
    extra = ["--blockdev", "driver=null-co,node-name=n0"] if kind == "ours+blockdev" else []
    return [*base, "--chardev", chardev, "--monitor", "chardev=qmp0", *extra]


def _line(s: socket.socket, kind: str) -> bytes:
    buf = b""
    while b"\n" not in buf:
        chunk = s.recv(4096)
        if not chunk:
            raise RuntimeError(f"{kind} closed the connection")
        buf += chunk
    return buf


def time_to_greeting(kind: str, tmpdir: str, env: dict[str, str] | None = None
                     ) -> tuple[float, float]:
    """Seconds from spawn to the greeting, and to the qmp_capabilities reply."""
    sock = os.path.join(tmpdir, f"{kind}.sock")
    if os.path.exists(sock):
        os.unlink(sock)
    start = time.perf_counter()
    proc = subprocess.Popen(argv_for(kind, sock), stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=None if kind == "qsd" else env)
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
            buf = _line(s, kind)
            greeting = time.perf_counter() - start
            s.sendall(b'{"execute": "qmp_capabilities"}')
            reply = _line(s, kind)
            ready = time.perf_counter() - start
    finally:
        proc.kill()
        proc.wait()
    assert buf.startswith(b'{"QMP"'), buf
    assert reply.startswith(b'{"return": {}}'), reply
    return greeting, ready


def python_floor(code: str) -> float:
    """The interpreter alone running ``code``: "pass", or "import asyncio"."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True)
    return time.perf_counter() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--cold", action="store_true",
                    help="our daemon without bytecode: it compiles its modules on every start")
    opts = ap.parse_args()
    if shutil.which("qemu-storage-daemon") is None:
        print("qemu-storage-daemon is not installed", file=sys.stderr)
        return 1
    import blockmirror

    package = os.path.dirname(blockmirror.__file__)
    env: dict[str, str] | None = None
    if opts.cold:
        # our package's bytecode goes (the standard library keeps its own), and none may
        # be written: every start compiles our modules again
        for d, _, _ in os.walk(package):
            if os.path.basename(d) == "__pycache__":
                shutil.rmtree(d, ignore_errors=True)
        env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
        print(f"bytecode: none for {package} (compiled on every start)")
    else:
        ok = compileall.compile_dir(package, quiet=1)
        print(f"bytecode: {package} compiled{'' if ok else ' (with errors)'}")
    keys = ("ours greeting", "ours ready", "ours+blockdev greeting", "ours+blockdev ready",
            "qsd greeting", "qsd ready", "python -c pass", "python -c 'import asyncio'")
    times: dict[str, list[float]] = {k: [] for k in keys}
    with tempfile.TemporaryDirectory(prefix="bm-bench-") as tmpdir:
        for i in range(opts.repeat):
            order = ("ours", "ours+blockdev", "qsd") if i % 2 == 0 else (
                "qsd", "ours+blockdev", "ours")
            for kind in order:
                greeting, ready = time_to_greeting(kind, tmpdir, env)
                times[f"{kind} greeting"].append(greeting)
                times[f"{kind} ready"].append(ready)
            times["python -c pass"].append(python_floor("pass"))
            times["python -c 'import asyncio'"].append(python_floor("import asyncio"))
    med = {k: statistics.median(v) for k, v in times.items()}
    for key in keys:
        v = times[key]
        print(f"{key:28s} median {med[key] * 1000:7.1f} ms  min {min(v) * 1000:7.1f} ms  "
              f"max {max(v) * 1000:7.1f} ms  (n={len(v)})")
    floor = med["python -c pass"]
    for key in ("ours greeting", "ours ready", "ours+blockdev greeting", "ours+blockdev ready"):
        print(f"{key:28s} = python -c pass x {med[key] / floor:5.2f}, "
              f"+ {(med[key] - floor) * 1000:6.1f} ms")
    print(f"goal: greeting within 60 ms of spawn "
          f"({'met' if med['ours greeting'] < 0.060 else 'missed'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
