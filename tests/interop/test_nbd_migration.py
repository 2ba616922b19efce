"""Live storage migration under a writing NBD client (issue 5, acceptance 2 and 3).

A guest-like writer (an interactive ``qemu-io`` process, one NBD connection for its whole life)
writes through our export while drive-mirror copies the exported node to a qemu-nbd target on
another address. After job-complete the export follows the target (mirror pivot) and the
writer carries on through the same connection. In the end the target image must equal the
writer's model byte for byte, and ``qemu-img compare`` must agree.

The two-host variant puts qemu-nbd in a second network namespace joined by a veth pair on
private test addresses (needs root and ``ip netns``; skipped with the reason otherwise).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from conftest import IN_CI, require_tool
from nbd_helpers import peer, run

pytestmark = pytest.mark.interop

MiB = 1 << 20
SIZE = 8 * MiB


class Writer:
    """qemu-io in interactive mode: one NBD connection, commands fed on stdin."""

    def __init__(self, proc: asyncio.subprocess.Process, size: int, seed: int) -> None:
        self.proc = proc
        self.model = bytearray(size)
        self.rng = random.Random(seed)
        self.writes = 0

    @classmethod
    @contextlib.asynccontextmanager
    async def start(cls, uri: str, initial: bytes, seed: int) -> AsyncIterator[Writer]:
        proc = await asyncio.create_subprocess_exec(
            "qemu-io", "-f", "raw", uri, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        w = cls(proc, len(initial), seed)
        w.model[:] = initial
        try:
            yield w
        finally:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()

    async def command(self, line: str, expect: str) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line.encode() + b"\n")
        await self.proc.stdin.drain()
        seen = b""
        while expect.encode() not in seen:
            chunk = await asyncio.wait_for(self.proc.stdout.read(4096), 30)
            if not chunk:
                raise AssertionError(f"qemu-io exited during {line!r}: {seen.decode()}")
            seen += chunk
            if b"error" in seen.lower() or b"failed" in seen.lower():
                raise AssertionError(f"qemu-io: {line!r}: {seen.decode()}")
        return seen.decode()

    async def write_some(self, n: int) -> None:
        for _ in range(n):
            length = self.rng.choice([512, 4096, 65536, 3 * 4096 + 512])
            offset = self.rng.randrange(0, len(self.model) - length)
            value = self.rng.randrange(1, 256)
            await self.command(f"write -P {value} {offset} {length}", "wrote")
            self.model[offset : offset + length] = bytes([value]) * length
            self.writes += 1


def initial_image(path: Path) -> bytes:
    data = bytes((i * 131 + 7) & 0xFF for i in range(4096)) * (SIZE // 4096)
    # a sparse region in the middle, to be mirrored as zeroes
    data = data[: 3 * MiB] + bytes(MiB) + data[4 * MiB :]
    path.write_bytes(data)
    return data


async def migrate(tmp_path: Path, target_uri: str, target_img: Path,
                  stop_target: Any) -> None:
    from blockmirror.qmp.testing import qmp_daemon

    src_img = tmp_path / "src.raw"
    initial = initial_image(src_img)
    async with qmp_daemon(tmp_path) as td:
        qmp = await td.client()
        await qmp.execute("blockdev-add", {
            "driver": "raw", "node-name": "src",
            "file": {"driver": "file", "filename": str(src_img)}})
        sock = str(tmp_path / "export.sock")
        await qmp.execute("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
        await qmp.execute("block-export-add", {"type": "nbd", "id": "e0", "node-name": "src",
                                               "name": "disk", "writable": True})
        async with Writer.start(f"nbd+unix:///disk?socket={sock}", initial, 2026) as w:
            await w.write_some(10)
            await qmp.execute("drive-mirror", {
                "job-id": "m0", "device": "src", "target": target_uri, "format": "raw",
                "mode": "existing", "sync": "full", "speed": 2 * MiB, "buf-size": MiB})
            ready = asyncio.create_task(td.next_event(qmp, "BLOCK_JOB_READY", 60))
            copying = 0
            for _ in range(8):  # writes while the throttled mirror copies
                await w.write_some(3)
                jobs = await qmp.execute("query-block-jobs")
                copying += jobs[0]["offset"] < jobs[0]["len"]
                await asyncio.sleep(0.05)
            assert copying, "no write happened during the copy phase"
            # unthrottled, the mirror converges between the writer's bursts
            await qmp.execute("block-job-set-speed", {"device": "m0", "speed": 0})
            while not ready.done():
                await w.write_some(2)
                await asyncio.sleep(0.1)
            await ready
            await w.write_some(10)  # while READY: mirrored by the dirty bitmap
            done = asyncio.create_task(td.next_event(qmp, "BLOCK_JOB_COMPLETED", 60))
            await qmp.execute("job-complete", {"id": "m0"})
            ev = await done
            assert "error" not in ev["data"], ev
            exports = await qmp.execute("query-block-exports")
            assert len(exports) == 1 and exports[0]["node-name"] != "src", exports
            before_pivot = w.writes
            await w.write_some(20)  # the same connection, now served by the target
            await w.command("flush", "qemu-io>")
            assert w.writes == before_pivot + 20
            # the source file is frozen at the pivot: later writes are only in the target
            assert await asyncio.to_thread(src_img.read_bytes) != bytes(w.model)
            await w.command("quit", "")
            model = bytes(w.model)
        await qmp.execute("block-export-del", {"id": "e0", "mode": "hard"})
        await qmp.execute("nbd-server-stop")
    await stop_target()
    assert await asyncio.to_thread(target_img.read_bytes) == model
    expected = tmp_path / "model.raw"
    await asyncio.to_thread(expected.write_bytes, model)
    out = await run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(expected),
                    str(target_img))
    assert "Images are identical" in out


def test_live_migration_to_qemu_nbd(tmp_path: Path) -> None:
    require_tool("qemu-io", "qemu-nbd", "qemu-img")

    async def main() -> None:
        tgt = tmp_path / "tgt.raw"
        tgt.write_bytes(bytes(SIZE))
        tsock = str(tmp_path / "target.sock")
        async with peer("qemu-nbd", "-f", "raw", "-k", tsock, "-x", "exp", "-t",
                        str(tgt), ready=tsock) as proc:

            async def stop() -> None:
                proc.terminate()
                await proc.wait()

            await migrate(tmp_path, f"nbd+unix:///exp?socket={tsock}", tgt, stop)

    asyncio.run(main())


def _netns_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root for ip netns"
    if shutil.which("ip") is None:
        return "the ip tool is not installed"
    probe = f"bmprobe{uuid.uuid4().hex[:6]}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if r.returncode != 0:
        return f"ip netns add failed: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


@contextlib.contextmanager
def second_host() -> Any:
    """A network namespace reachable at 10.213.x.2 through a veth pair (10.213.x.1 here)."""
    tag = uuid.uuid4().hex[:6]
    ns, here, there = f"bmtgt{tag}", f"bmh{tag}", f"bmt{tag}"
    net = f"10.213.{random.randrange(1, 250)}"

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True)

    ip("netns", "add", ns)
    try:
        ip("link", "add", here, "type", "veth", "peer", "name", there)
        ip("link", "set", there, "netns", ns)
        ip("addr", "add", f"{net}.1/24", "dev", here)
        ip("link", "set", here, "up")
        ip("netns", "exec", ns, "ip", "addr", "add", f"{net}.2/24", "dev", there)
        ip("netns", "exec", ns, "ip", "link", "set", there, "up")
        ip("netns", "exec", ns, "ip", "link", "set", "lo", "up")
        yield ns, f"{net}.2"
    finally:
        subprocess.run(["ip", "link", "del", here], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_live_migration_to_a_second_host(tmp_path: Path) -> None:
    require_tool("qemu-io", "qemu-nbd", "qemu-img")
    reason = _netns_unavailable()
    if reason is not None:
        print(f"two-host migration skipped: {reason}")
        if IN_CI:
            pytest.fail(f"two-host migration cannot run: {reason}")
        pytest.skip(reason)

    async def main() -> None:
        tgt = tmp_path / "tgt.raw"
        tgt.write_bytes(bytes(SIZE))
        with second_host() as (ns, addr):
            async with peer("ip", "netns", "exec", ns, "qemu-nbd", "-f", "raw", "-b", addr,
                            "-p", "10809", "-x", "exp", "-t", str(tgt),
                            ready=None) as proc:
                # the port lives in the other namespace: probe from here until it answers
                deadline = time.monotonic() + 30
                while True:
                    try:
                        _, wr = await asyncio.open_connection(addr, 10809)
                    except OSError:
                        assert proc.returncode is None, "qemu-nbd in the namespace exited"
                        assert time.monotonic() < deadline, "qemu-nbd did not listen in 30 s"
                        await asyncio.sleep(0.05)
                        continue
                    wr.close()
                    break

                async def stop() -> None:
                    proc.terminate()
                    await proc.wait()

                await migrate(tmp_path, f"nbd://{addr}:10809/exp", tgt, stop)

    asyncio.run(main())
