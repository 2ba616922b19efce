"""In-process QMP test helpers: a Daemon plus a unix-socket QMP server in the current loop.

Usage, in any async test (pytest-asyncio is not used: wrap in ``asyncio.run``)::

    from blockmirror.qmp.testing import qmp_daemon

    def test_something(tmp_path):
        async def main():
            async with qmp_daemon(tmp_path) as td:
                qmp = await td.client()                 # a negotiated qemu.qmp.QMPClient
                await qmp.execute("blockdev-add", {"driver": "null-co", "node-name": "n0"})
                ev = await td.next_event(qmp, "JOB_STATUS_CHANGE")
                raw = await td.raw()                    # exact bytes: RawQMP
                await raw.send(b'{"execute": "qmp_capabilities"}')
                assert await raw.recv() == {"return": {}}
        asyncio.run(main())

``td.daemon`` is the Daemon (``td.daemon.graph``, ``.jobs``, ``.events.history``...). Every
client is disconnected and the daemon shut down (jobs cancelled, images closed) on exit.
``qmp_daemon(tmp_path, daemon=my_daemon)`` serves an existing Daemon instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from blockmirror.daemon import Daemon
from blockmirror.qmp.server import QMPServer


class RawQMP:
    """A byte-level QMP connection: send exact bytes, read replies line by line."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.greeting: dict[str, Any] = {}

    async def send(self, data: bytes | str) -> None:
        self.writer.write(data.encode() if isinstance(data, str) else data)
        await self.writer.drain()

    async def recv_line(self, limit_s: float = 5.0) -> bytes:
        return await asyncio.wait_for(self.reader.readline(), limit_s)

    async def recv(self, limit_s: float = 5.0) -> Any:
        line = await self.recv_line(limit_s)
        if not line:
            raise EOFError("QMP connection closed")
        return json.loads(line)

    async def cmd(self, name: str, args: dict[str, Any] | None = None, **extra: Any) -> Any:
        """Send a command and return the first non-event message."""
        msg: dict[str, Any] = {"execute": name, **extra}
        if args is not None:
            msg["arguments"] = args
        await self.send(json.dumps(msg))
        while True:
            rsp = await self.recv()
            if "event" not in rsp:
                return rsp

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


class TestDaemon:
    """What ``qmp_daemon`` yields: the daemon, its socket path, and client factories."""

    __test__ = False  # not a pytest class

    def __init__(self, daemon: Daemon, server: QMPServer, path: str) -> None:
        self.daemon = daemon
        self.server = server
        self.path = path
        self._clients: list[Any] = []
        self._raws: list[RawQMP] = []

    async def client(self, negotiate: bool = True) -> Any:
        """A connected (and by default negotiated) ``qemu.qmp.QMPClient``."""
        from qemu.qmp import QMPClient

        qmp = QMPClient("test", readbuflen=1 << 24)
        if not negotiate:
            qmp.await_greeting = True
            qmp.negotiate = False
        await qmp.connect(self.path)
        self._clients.append(qmp)
        return qmp

    async def raw(self, negotiate: bool = False) -> RawQMP:
        """A RawQMP connection whose greeting has been read (and optionally negotiated)."""
        reader, writer = await asyncio.open_unix_connection(self.path, limit=1 << 24)
        conn = RawQMP(reader, writer)
        conn.greeting = await conn.recv()
        if negotiate:
            rsp = await conn.cmd("qmp_capabilities")
            assert rsp == {"return": {}}, rsp
        self._raws.append(conn)
        return conn

    @staticmethod
    async def next_event(qmp: Any, name: str, limit_s: float = 10.0) -> dict[str, Any]:
        """The next event called ``name`` from a QMPClient (others are skipped)."""

        async def wait() -> dict[str, Any]:
            async for ev in qmp.events:
                if ev["event"] == name:
                    return dict(ev)
            raise EOFError

        return await asyncio.wait_for(wait(), limit_s)

    async def aclose(self) -> None:
        for qmp in self._clients:
            with contextlib.suppress(Exception):
                await qmp.disconnect()
        for raw in self._raws:
            await raw.close()
        await self.server.close()
        await self.daemon.shutdown()


@contextlib.asynccontextmanager
async def qmp_daemon(
    tmp_path: Path | str | None = None, daemon: Daemon | None = None
) -> AsyncIterator[TestDaemon]:
    """Start a Daemon (or serve ``daemon``) on a unix socket; see the module docstring."""
    tmpdir = None
    if tmp_path is None:
        tmpdir = tempfile.mkdtemp(prefix="bm-qmp-")
        tmp_path = tmpdir
    path = os.path.join(str(tmp_path), "qmp.sock")
    d = daemon if daemon is not None else Daemon()
    server = d.qmp_server()
    await server.listen_unix(path)
    td = TestDaemon(d, server, path)
    try:
        yield td
    finally:
        await td.aclose()
        if tmpdir is not None:
            with contextlib.suppress(OSError):
                os.rmdir(tmpdir)





# -- daemons as subprocesses (for interop and differential tests) ----------------------------

QSD = "qemu-storage-daemon"


def daemon_argv(kind: str, sock_path: str, *extra: str) -> list[str]:
    """Command line of a QSD-compatible daemon serving QMP on ``sock_path``.

    ``kind`` is "qsd" (the real qemu-storage-daemon) or "ours" (``python -m`` blockmirror).
    """
    chardev = f"socket,id=qmp0,path={sock_path},server=on,wait=off"
    base = [QSD] if kind == "qsd" else [sys.executable, "-m", "blockmirror.cli.main", "daemon"]
    return [*base, "--chardev", chardev, "--monitor", "chardev=qmp0", *extra]


def _listening(path: str) -> bool:
    """The unix socket at ``path`` is listening (Linux: /proc/net/unix's accept-connections
    flag; elsewhere, a connect that is not refused)."""
    try:
        with open("/proc/net/unix") as f:
            for line in f:
                fields = line.split()
                if (len(fields) >= 8 and fields[7] in (path, os.path.abspath(path))
                        and int(fields[3], 16) & 0x10000):
                    return True
        return False
    except OSError:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(path)
                return True
            except ConnectionRefusedError:
                return False


class DaemonProcess:
    """A daemon subprocess bound to a ``with`` block: killed (and reaped) on exit, always."""

    def __init__(self, argv: list[str], sock_path: str, limit_s: float = 20.0) -> None:

        self.sock_path = sock_path
        with contextlib.suppress(FileNotFoundError):
            os.unlink(sock_path)
        # Output goes to files, not pipes: a pipe nobody drains could block the daemon.
        # (closed in kill(), which every path reaches)
        self.stdout = tempfile.TemporaryFile()  # noqa: SIM115
        self.stderr = tempfile.TemporaryFile()  # noqa: SIM115
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self.stdout,
                                     stderr=self.stderr)
        deadline = time.monotonic() + limit_s
        while not os.path.exists(sock_path):
            if self.proc.poll() is not None:
                err = self.output(stderr=True)
                self.kill()
                raise RuntimeError(f"daemon exited early ({self.proc.returncode}): {err}")
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(f"{argv[0]} did not create {sock_path}")
            time.sleep(0.005)
        # the path exists from bind() on; wait for listen() too, so callers can connect at
        # once. Not by connecting: a one-client monitor (qemu-storage-daemon's) that sees
        # the probe's hang-up and the caller's connection in one loop turn drops the caller.
        while not _listening(sock_path):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                err = self.output(stderr=True)
                self.kill()
                raise TimeoutError(f"{argv[0]} never listened on {sock_path}: {err}")
            time.sleep(0.005)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self, stderr: bool = False) -> str:
        """What the daemon printed so far on stdout (or stderr)."""
        f = self.stderr if stderr else self.stdout
        f.seek(0)
        return f.read().decode(errors="replace")

    def connect(self, limit_s: float = 10.0) -> SyncQMP:
        return SyncQMP(self.sock_path, limit_s)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(Exception):
            self.proc.wait(10)
        self.stdout.close()
        self.stderr.close()

    def __enter__(self) -> DaemonProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


class SyncQMP:
    """A blocking byte-level QMP connection (for subprocess daemons)."""

    def __init__(self, path: str, limit_s: float = 10.0) -> None:

        # the path appears at bind(), a moment before listen(): retry a refused connect
        deadline = time.monotonic() + limit_s
        while True:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(limit_s)
            try:
                self.sock.connect(path)
                break
            except ConnectionRefusedError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.005)
        self._buf = b""
        self.greeting = self.read_message()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_line(self) -> bytes:
        while b"\n" not in self._buf:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise EOFError("QMP connection closed")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line + b"\n"

    def read_message(self) -> bytes:
        """One server message: a line, or a pretty-printed block from "{" to "}"."""
        msg = self.read_line()
        if msg == b"{\r\n":
            while True:
                line = self.read_line()
                msg += line
                if line == b"}\r\n":
                    break
        return msg

    def read_until(self, marker: bytes) -> list[bytes]:
        """Every message up to and including the first one containing ``marker``."""
        msgs = []
        while True:
            msg = self.read_message()
            msgs.append(msg)
            if marker in msg:
                return msgs

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> SyncQMP:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

__all__ = ["QSD", "DaemonProcess", "RawQMP", "SyncQMP", "TestDaemon", "daemon_argv", "qmp_daemon"]
