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
from pathlib import Path
from typing import Any

import pytest

from conftest import IN_CI, require_tool
from guest_writes import QemuIoWriter, export_source, mirror_to_pivot
from nbd_helpers import peer, run

pytestmark = pytest.mark.interop

MiB = 1 << 20
SIZE = 8 * MiB


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
        uri = await export_source(qmp, tmp_path)
        async with QemuIoWriter.start(uri, initial, 2026, zeroes=False) as w:
            await w.write_some(10)
            await qmp.execute("drive-mirror", {
                "job-id": "m0", "device": "src", "target": target_uri, "format": "raw",
                "mode": "existing", "sync": "full", "speed": 2 * MiB, "buf-size": MiB})
            await mirror_to_pivot(td, qmp, w, rounds=8, pause=0.1, limit_s=60)
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
