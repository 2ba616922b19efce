"""`blockmirror mirror --converge auto` end to end: a real guest (qemu-io over the NBD export)
writes faster than the 1 MiB/s copy; the mirror says it switched to write-blocking, goes READY
and completes with a target identical to the source."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import require_tool

pytestmark = pytest.mark.interop

BLOCKMIRROR = [sys.executable, "-m", "blockmirror.cli.main"]
SIZE = 4 << 20
CHUNK = 64 << 10


class Guest(threading.Thread):
    """qemu-io on the export, fed random 64 KiB writes at about 4 MiB/s until stopped."""

    def __init__(self, uri: str) -> None:
        super().__init__(daemon=True)
        self.proc = subprocess.Popen(["qemu-io", "-f", "raw", uri], stdin=subprocess.PIPE,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True)
        self.stop = threading.Event()
        self.sent = 0

    def run(self) -> None:
        rng = random.Random(5)
        assert self.proc.stdin is not None
        start = time.monotonic()
        while not self.stop.is_set():
            off = rng.randrange(SIZE // CHUNK) * CHUNK
            self.proc.stdin.write(f"write -P {rng.randrange(1, 255)} {off} {CHUNK}\n")
            self.proc.stdin.flush()
            self.sent += CHUNK
            ahead = self.sent / (4 << 20) - (time.monotonic() - start)
            if ahead > 0:
                self.stop.wait(ahead)

    def finish(self) -> int:
        self.stop.set()
        self.join(10)
        assert self.proc.stdin is not None
        self.proc.stdin.write("quit\n")
        self.proc.stdin.close()
        return self.proc.wait(30)


def test_converge_auto_switches_to_write_blocking(tmp_path: Path) -> None:
    require_tool("qemu-io")
    src, dst = tmp_path / "src.raw", tmp_path / "dst.raw"
    src.write_bytes(random.Random(1).randbytes(SIZE))
    sock = tmp_path / "export.sock"
    uri = f"nbd+unix:///vm?socket={sock}"
    proc = subprocess.Popen(
        [*BLOCKMIRROR, "mirror", "--json", "--wait", "--speed", "1M", "--buf-size", "256k",
         "--granularity", "64k", "--interval", "0.1", "--converge", "auto",
         "--source-format", "raw", "--format", "raw", "--export", f"unix:{sock}",
         "--export-name", "vm", str(src), str(dst)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[dict[str, Any]] = []
    guest: Guest | None = None

    def read_until(pred: Any, limit_s: float = 40) -> dict[str, Any]:
        assert proc.stdout is not None
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                raise AssertionError(f"mirror exited: {proc.wait()} {lines[-5:]}")
            obj = json.loads(line)
            lines.append(obj)
            if pred(obj):
                return obj
        raise AssertionError(f"not seen within {limit_s} s: {lines[-5:]}")

    try:
        read_until(lambda o: o["type"] == "message" and o["text"].startswith("exporting"))
        guest = Guest(uri)
        guest.start()
        switched = read_until(lambda o: o["type"] == "message"
                              and "switched to write-blocking" in o["text"])
        assert "drive0" in switched["text"]
        ready = read_until(lambda o: o["type"] == "progress" and o["phase"] == "ready")
        assert ready["action"] == "write-blocking", ready
        # still READY while the guest keeps writing for a while
        in_sync = read_until(lambda o: o["type"] == "progress" and o["elapsed"]
                             >= ready["elapsed"] + 1.0)
        assert in_sync["phase"] == "ready" and in_sync["verdict"] == "converging", in_sync
        assert guest.finish() == 0
        guest = None
        proc.send_signal(signal.SIGUSR1)
        out, err = proc.communicate(timeout=60)
        lines += [json.loads(x) for x in out.splitlines() if x.strip()]
        assert proc.returncode == 0, err
    finally:
        if guest is not None:
            guest.finish()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    summary = lines[-1]
    assert summary["type"] == "summary" and summary["phase"] == "done", summary
    assert summary["action"] == "write-blocking"
    # every guest write happened before the pivot: the old source and the target agree
    assert src.read_bytes() == dst.read_bytes()
    # the forecast said why (the policy acts in the tick the verdict turns, so the
    # display sees it just after the switch, until the rates reflect write-blocking)
    said = [x for x in lines if x["type"] == "progress"
            and x["verdict"] in ("not-converging", "throttled-by-speed")]
    assert said and said[0]["reason"], [x.get("verdict") for x in lines
                                        if x["type"] == "progress"]
