"""Acceptance: 50 well-behaved clients and 5 misbehaving ones against one daemon process.

The misbehaving ones send garbage, hang up in the middle of a message, hang up in the middle
of a command, flood without reading, and send one 64 MiB JSON token. Invariants: every
well-behaved client gets every reply, in order; the daemon still answers afterwards; its RSS
(read from /proc) grows by less than RSS_BOUND -- both at the end and at its peak (VmHWM,
reset through /proc/PID/clear_refs after the warm-up). The bound (16 MiB) is a quarter of
the token: only a bounded input buffer passes.
"""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path

import pytest

from blockmirror.qmp.testing import DaemonProcess, daemon_argv

pytestmark = pytest.mark.interop

RSS_BOUND = 16 << 20


def rss(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field}")


def reset_peak(pid: int) -> None:
    """Reset VmHWM to the current RSS (Linux: "5" to clear_refs)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


async def connect(path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_unix_connection(path, limit=1 << 20)
    await reader.readline()  # greeting
    return reader, writer


async def good_client(path: str, n: int) -> None:
    reader, writer = await connect(path)
    writer.write(b'{"execute":"qmp_capabilities"}')
    assert json.loads(await reader.readline()) == {"return": {}}
    for i in range(10):
        writer.write(json.dumps({"execute": "query-version", "id": [n, i]}).encode())
    writer.write(json.dumps({"execute": "blockdev-add", "id": "add", "arguments": {
        "driver": "null-co", "node-name": f"c{n}"}}).encode())
    writer.write(json.dumps({"execute": "blockdev-del", "id": "del",
                             "arguments": {"node-name": f"c{n}"}}).encode())
    for i in range(10):
        assert json.loads(await reader.readline())["id"] == [n, i]
    for tag in ("add", "del"):
        assert json.loads(await reader.readline()) == {"return": {}, "id": tag}
    writer.close()


async def garbage(path: str) -> None:
    _, writer = await connect(path)
    rnd = random.Random(1)
    for _ in range(16):
        writer.write(bytes(rnd.getrandbits(8) for _ in range(4096)))
        await asyncio.sleep(0)
    writer.close()


async def hangup_mid_message(path: str) -> None:
    _, writer = await connect(path)
    writer.write(b'{"execute":"qmp_capabilities"}{"execute":"query-ver')
    await writer.drain()
    writer.close()


async def hangup_mid_command(path: str) -> None:
    _, writer = await connect(path)
    writer.write(b'{"execute":"qmp_capabilities"}{"execute":"query-named-block-nodes"}' * 50)
    await writer.drain()
    writer.transport.abort()


async def flood_without_reading(path: str) -> None:
    _, writer = await connect(path)
    writer.write(b'{"execute":"query-version"}' * 20000)
    await asyncio.sleep(0.5)
    writer.transport.abort()


async def huge_token(path: str) -> str:
    reader, writer = await connect(path)
    chunk = b"a" * (1 << 20)
    writer.write(b'{"execute":"query-version","id":"')
    for _ in range(65):
        writer.write(chunk)
        await writer.drain()
    writer.write(b'"}')
    await writer.drain()
    line = await asyncio.wait_for(reader.readline(), 60)
    writer.close()
    return str(json.loads(line)["error"]["desc"])


def test_many_clients_and_misbehaviour(tmp_path: Path) -> None:
    sock = str(tmp_path / "s.sock")
    with DaemonProcess(daemon_argv("ours", sock), sock) as proc:
        async def main() -> str:
            await good_client(sock, -1)  # warm up: every module imported
            before = rss(proc.pid)
            reset_peak(proc.pid)
            results = await asyncio.gather(
                *(good_client(sock, n) for n in range(50)),
                garbage(sock), hangup_mid_message(sock), hangup_mid_command(sock),
                flood_without_reading(sock), huge_token(sock))
            await good_client(sock, 99)  # still answering
            after = rss(proc.pid)
            peak = rss(proc.pid, "VmHWM")
            print(f"daemon RSS before {before >> 20} MiB, after {after >> 20} MiB, "
                  f"peak {peak >> 20} MiB")
            assert after - before < RSS_BOUND
            assert peak - before < RSS_BOUND
            return str(results[-1])

        desc = asyncio.run(main())
        assert desc == "JSON token size limit exceeded"
        assert proc.proc.poll() is None
