"""Found by the crash matrix: our monitor answers while --blockdev options are still being
opened, and a query then sees a node whose driver is half open.

qemu-storage-daemon processes its whole command line before its main loop runs, so a
client that connects early simply waits. Here the qcow2 node's file is an NBD export whose
server completes the handshake and then never answers a read: the qcow2 open hangs in the
header read, and query-named-block-nodes is sent meanwhile.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
from pathlib import Path

import pytest

from blockmirror.qmp.testing import DaemonProcess, daemon_argv
from conftest import require_tool

pytestmark = pytest.mark.interop

REP_MAGIC = 0x3E889045565A9


def _stalling_server(path: str, stop: threading.Event) -> None:
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(1)
    srv.settimeout(30)
    try:
        conn, _ = srv.accept()
    except OSError:
        return
    conn.settimeout(30)

    def recv(n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = conn.recv(n - len(out))
            if not chunk:
                raise ConnectionError
            out += chunk
        return out

    try:
        conn.sendall(b"NBDMAGICIHAVEOPT" + struct.pack(">H", 3))
        recv(4)
        while True:
            _, opt, length = struct.unpack(">QII", recv(16))
            recv(length)
            if opt == 7:  # GO: the export, then ACK
                info = struct.pack(">HQH", 0, 1 << 20, 1 | 4)
                conn.sendall(struct.pack(">QIII", REP_MAGIC, opt, 3, len(info)) + info)
                conn.sendall(struct.pack(">QIII", REP_MAGIC, opt, 1, 0))
                break
            conn.sendall(struct.pack(">QIII", REP_MAGIC, opt, (1 << 31) | 1, 0))
        stop.wait(60)  # requests are read by nobody: the qcow2 header read never ends
    except (OSError, ConnectionError):
        pass
    finally:
        conn.close()
        srv.close()


def _early_answer(kind: str, tmp_path: Path) -> object:
    """What the monitor answers to query-named-block-nodes while a --blockdev is opening
    (None: no answer within 5 s)."""
    nbd, qmp = str(tmp_path / f"{kind}-stall.sock"), str(tmp_path / f"{kind}-qmp.sock")
    stop = threading.Event()
    t = threading.Thread(target=_stalling_server, args=(nbd, stop), daemon=True)
    t.start()
    argv = daemon_argv(kind, qmp, "--blockdev",
                       f"driver=qcow2,node-name=q,file.driver=nbd,file.server.type=unix,"
                       f"file.server.path={nbd}")
    try:
        with DaemonProcess(argv, qmp):
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(5)
            s.connect(qmp)
            f = s.makefile("rb")
            try:
                f.readline()  # greeting
                s.sendall(b'{"execute":"qmp_capabilities"}'
                          b'{"execute":"query-named-block-nodes"}')
                f.readline()
                return json.loads(f.readline())
            except OSError:
                return None
            finally:
                s.close()
    finally:
        stop.set()
        t.join(10)


def test_qsd_does_not_answer_during_startup(tmp_path: Path) -> None:
    require_tool("qemu-storage-daemon")
    assert _early_answer("qsd", tmp_path) is None


def test_ours_does_not_answer_during_startup(tmp_path: Path) -> None:
    assert _early_answer("ours", tmp_path) is None
