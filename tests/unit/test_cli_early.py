"""cli/early.py: the QMP greeting goes out before the daemon finished importing, and the
event loop takes the greeted connections over without greeting them twice."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from blockmirror.cli import early
from blockmirror.daemon import Daemon
from blockmirror.qmp.session import QMPSession
from blockmirror.qmp.testing import DaemonProcess, daemon_argv


@pytest.fixture(autouse=True)
def _reset() -> Iterator[None]:
    yield
    early.close()


def _short_dir() -> str:
    import tempfile

    return tempfile.mkdtemp(prefix="bm-early-")


def test_greeting_bytes_are_the_sessions() -> None:
    assert early.greeting_bytes() == QMPSession({}, oob_offered=True).greeting()


def _recv_line(s: socket.socket) -> bytes:
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = s.recv(4096)
        if not chunk:
            raise EOFError(buf)
        buf += chunk
    return buf


def test_greeted_early_then_served_by_the_loop() -> None:
    d = _short_dir()
    path = os.path.join(d, "qmp.sock")
    chardev = f"socket,id=m0,path={path},server=on,wait=off"
    early.start(["--chardev", chardev, "--monitor", "chardev=m0", "--pidfile", "p",
                 "-T", "x", "--object", "iothread,id=io0"])
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(5)
    client.connect(path)
    assert _recv_line(client) == early.greeting_bytes()
    # a command sent before the loop exists waits in the socket
    client.sendall(b'{"execute": "qmp_capabilities", "id": 1}')

    async def main() -> None:
        daemon = Daemon()
        server = daemon.qmp_server()
        sock = early.take_listener(chardev)
        assert sock is not None
        await server.listen_socket(sock)
        conns = early.take_greeted("m0")
        assert len(conns) == 1
        for conn in conns:
            server.attach_connected(conn, greeted=True)
        loop = asyncio.get_running_loop()
        line = await loop.run_in_executor(None, _recv_line, client)
        assert json.loads(line) == {"return": {}, "id": 1}  # no second greeting first
        # later clients are greeted by the loop itself
        late = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        late.settimeout(5)
        await loop.run_in_executor(None, late.connect, path)
        assert await loop.run_in_executor(None, _recv_line, late) == early.greeting_bytes()
        late.close()
        client.close()
        await server.close()
        await daemon.shutdown()

    asyncio.run(main())


@pytest.mark.parametrize("extra", [
    ["--daemonize"],
    ["--blockdev", "driver=null-co,node-name=n"],
    ["--nbd-server", "addr.type=unix,addr.path=/tmp/x.sock"],
    ["--export", "type=nbd,id=e,node-name=n"],
    ["-h"],
    ["stray"],
    # a file chardev creates its file, a pty prints its name
    ["--chardev", "file,id=f,path=/tmp/bm-early-never"],
    ["--chardev", "pty,id=p"],
])
def test_a_greeting_must_wait_for_visible_options(extra: list[str]) -> None:
    # QSD greets after start-up: a client may then rely on nodes, the NBD server, exports
    d = _short_dir()
    path = os.path.join(d, "qmp.sock")
    early.start(["--chardev", f"socket,id=m0,path={path},server=on,wait=off",
                 "--monitor", "m0", *extra])
    assert early.take_greeted("m0") == []
    assert not os.path.exists(path)


def test_chardevs_only_qmp_can_see_do_not_hold_the_greeting_back() -> None:
    d = _short_dir()
    path = os.path.join(d, "qmp.sock")
    early.start(["--chardev", "ringbuf,id=r0,size=4k", "--chardev", "null,id=n0",
                 "--chardev", f"socket,id=m0,path={path},server=on,wait=off",
                 "--monitor", "m0"])
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
            c.settimeout(10)
            c.connect(path)
            assert c.recv(4096).startswith(b'{"QMP"')
    finally:
        early.close()


def test_unusual_monitors_stay_on_the_normal_path() -> None:
    d = _short_dir()
    path = os.path.join(d, "qmp.sock")
    early.start(["--chardev", f"socket,id=m0,path={path},server=on,wait=off",
                 "--monitor", "chardev=m0,pretty=on"])
    assert early.take_greeted("m0") == []


def test_close_removes_sockets_nobody_took() -> None:
    d = _short_dir()
    path = os.path.join(d, "qmp.sock")
    early.start(["--chardev", f"socket,id=m0,path={path},server=on,wait=off",
                 "--monitor", "m0"])
    assert os.path.exists(path)
    early.close()
    assert not os.path.exists(path)


def test_greeting_means_the_nbd_server_is_up(tmp_path: Path) -> None:
    d = _short_dir()
    sock = os.path.join(d, "qmp.sock")
    nbd = os.path.join(d, "nbd.sock")
    argv = daemon_argv("ours", sock, "--blockdev", "driver=null-co,node-name=n0",
                       "--nbd-server", f"addr.type=unix,addr.path={nbd}",
                       "--export", "type=nbd,id=e0,node-name=n0")
    with DaemonProcess(argv, sock) as proc, proc.connect() as qmp:
        assert qmp.greeting.startswith(b'{"QMP": ')
        assert os.path.exists(nbd)


def test_daemon_process_greets_fast_and_works(tmp_path: Path) -> None:
    d = _short_dir()
    sock = os.path.join(d, "qmp.sock")
    t0 = time.monotonic()
    with DaemonProcess(daemon_argv("ours", sock), sock) as proc, proc.connect() as qmp:
        assert json.loads(qmp.greeting)["QMP"]["version"]["package"].startswith("blockmirror")
        qmp.send(b'{"execute": "qmp_capabilities"}{"execute": "query-version"}')
        assert qmp.read_message() == b'{"return": {}}\r\n'
        assert b'"package": "blockmirror' in qmp.read_message()
        qmp.send(b'{"execute": "quit"}')
        assert qmp.read_message() == b'{"return": {}}\r\n'
        proc.proc.wait(10)
        assert proc.proc.returncode == 0
    assert time.monotonic() - t0 < 20
    assert not os.path.exists(sock)
