"""Interop: qemu.qmp's QMPClient (unix and TCP) and qmp-shell (through a pty) against us.

The daemon runs as our real command line (a subprocess) for the TCP and qmp-shell cases, and
in-process for the event case, so both the CLI wiring and the server are exercised.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pty
import select
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from blockmirror.qmp.testing import DaemonProcess, daemon_argv, qmp_daemon
from conftest import ROOT

pytestmark = pytest.mark.interop


def test_qmpclient_unix_events(tmp_path: Path) -> None:
    async def main() -> None:
        async with qmp_daemon(tmp_path) as td:
            qmp = await td.client()
            version = await qmp.execute("query-version")
            assert version["qemu"]["major"] == 7
            await qmp.execute("blockdev-add", {"driver": "null-co", "node-name": "n0"})
            nodes = await qmp.execute("query-named-block-nodes")
            assert [n["node-name"] for n in nodes] == ["n0"]
            img = tmp_path / "c.img"
            await qmp.execute("blockdev-create", {"job-id": "c0", "options": {
                "driver": "file", "filename": str(img), "size": 1 << 20}})
            seen = []
            async for ev in qmp.events:
                if ev["event"] == "JOB_STATUS_CHANGE":
                    seen.append(ev["data"]["status"])
                    if ev["data"]["status"] == "concluded":
                        break
            assert seen[-3:] == ["waiting", "pending", "concluded"]
            assert img.stat().st_size == 1 << 20
            # a second client gets its own session; the first keeps working
            other = await td.client()
            assert (await other.execute("query-block")) == []
            await qmp.execute("blockdev-del", {"node-name": "n0"})

    asyncio.run(main())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_qmpclient_tcp_via_cli(tmp_path: Path) -> None:
    from qemu.qmp import QMPClient

    port = _free_port()
    argv = [sys.executable, "-m", "blockmirror.cli.main", "daemon",
            "--chardev", f"socket,id=t,host=127.0.0.1,port={port},server=on,wait=off",
            "--monitor", "chardev=t",
            "--chardev", f"socket,id=u,path={tmp_path / 'u.sock'},server=on,wait=off",
            "--monitor", "chardev=u", "--pidfile", str(tmp_path / "pid")]
    with DaemonProcess(argv, str(tmp_path / "u.sock")) as proc:
        deadline = time.monotonic() + 10
        while not (tmp_path / "pid").exists():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert int((tmp_path / "pid").read_text()) == proc.pid

        async def main() -> None:
            qmp = QMPClient("tcp")
            await qmp.connect(("127.0.0.1", port))
            assert (await qmp.execute("query-version"))["qemu"]["minor"] == 2
            await qmp.execute("blockdev-add", {"driver": "null-co", "node-name": "t0"})
            await qmp.execute("quit")
            # the daemon hangs up after quit's reply, as QEMU does; the client reports that EOF
            with contextlib.suppress(EOFError):
                await qmp.disconnect()

        asyncio.run(main())
        assert proc.proc.wait(10) == 0
        assert not (tmp_path / "pid").exists()


def _read_until(fd: int, marker: bytes, limit_s: float = 15.0) -> bytes:
    buf = b""
    deadline = time.monotonic() + limit_s
    while marker not in buf:
        left = deadline - time.monotonic()
        assert left > 0, f"timed out waiting for {marker!r}; got {buf!r}"
        r, _, _ = select.select([fd], [], [], left)
        if r:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            buf += chunk
    return buf


def test_qmp_shell_through_pty(tmp_path: Path) -> None:
    shell = Path(sys.executable).parent / "qmp-shell"
    if not shell.exists():
        pytest.fail("qmp-shell is part of the qemu.qmp test dependency and must be installed")
    sock = str(tmp_path / "s.sock")
    with DaemonProcess(daemon_argv("ours", sock), sock):
        master, slave = pty.openpty()
        proc = subprocess.Popen([str(shell), sock], stdin=slave, stdout=slave, stderr=slave,
                                cwd=ROOT, close_fds=True)
        os.close(slave)
        try:
            _read_until(master, b"(QEMU)")
            os.write(master, b"query-version\n")
            out = _read_until(master, b"(QEMU)")
            assert b'"major": 7' in out, out
            os.write(master, b"blockdev-add driver=null-co node-name=sh0\n")
            out = _read_until(master, b"(QEMU)")
            assert b'"return": {}' in out, out
            os.write(master, b"query-named-block-nodes\n")
            out = _read_until(master, b"(QEMU)")
            assert b'"node-name": "sh0"' in out, out
        finally:
            proc.kill()
            proc.wait(10)
            os.close(master)
