"""Issue 15, security: bounded input per QMP and NBD client, owner-only unix sockets.

A daemon subprocess gets input that QEMU refuses -- a JSON token over 64 MiB, a value over
QEMU's 2M-token limit, an NBD WRITE announcing more than NBD_MAX_BUFFER_SIZE (32 MiB) with
its payload streamed behind it, an NBD READ over that size -- and must refuse each the way
QEMU does (same error text / errno; the NBD WRITE also ends the connection, as the stream
cannot be followed) while its peak RSS (VmHWM, read from /proc after a reset through
clear_refs) grows by less than 16 MiB. The sockets are checked to be mode 0600 even under a
permissive umask (a deliberate difference from QEMU, which uses the umask: see unixsock.py).
"""

from __future__ import annotations

import json
import os
import socket
import stat
import struct
import time
from pathlib import Path

import pytest
from test_qmp_stress import RSS_BOUND, reset_peak, rss

from blockmirror.nbd.constants import NBD_OPTS_MAGIC, NBD_REQUEST_MAGIC, Cmd, Opt
from blockmirror.qmp.testing import DaemonProcess, daemon_argv

pytestmark = pytest.mark.interop

MiB = 1 << 20


def _daemon(tmp_path: Path, *extra: str) -> DaemonProcess:
    qmp = str(tmp_path / "qmp.sock")
    return DaemonProcess(daemon_argv("ours", qmp, *extra), qmp)


def _qmp(path: str) -> tuple[socket.socket, object]:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(60)
    s.connect(path)
    f = s.makefile("rb")
    assert json.loads(f.readline())["QMP"]
    s.sendall(b'{"execute":"qmp_capabilities"}')
    assert json.loads(f.readline()) == {"return": {}}
    return s, f


def _ask(s: socket.socket, f: object, cmd: bytes) -> dict[str, object]:
    s.sendall(cmd)
    line = f.readline()  # type: ignore[attr-defined]
    return dict(json.loads(line))


def test_qmp_huge_token_and_token_flood_refused_with_bounded_rss(tmp_path: Path) -> None:
    with _daemon(tmp_path) as proc:
        s, f = _qmp(str(tmp_path / "qmp.sock"))
        assert "return" in _ask(s, f, b'{"execute":"query-version"}')  # warm
        before = rss(proc.pid)
        reset_peak(proc.pid)
        # one string token of 65 MiB: over QEMU's 64 MiB MAX_TOKEN_SIZE
        s.sendall(b'{"execute":"query-version","id":"')
        chunk = b"a" * MiB
        for _ in range(65):
            s.sendall(chunk)
        s.sendall(b'"}')
        err = _ask(s, f, b"")
        assert err == {"error": {"class": "GenericError",
                                 "desc": "JSON token size limit exceeded"}}, err
        # the rest of the cut token is lexed as QEMU would (an invalid keyword, then a
        # stray quote that opens a string): this connection is out of step, use a new one
        s.close()
        s, f = _qmp(str(tmp_path / "qmp.sock"))
        assert "return" in _ask(s, f, b'{"execute":"query-version"}')
        peak_token = rss(proc.pid, "VmHWM") - before
        # 2M + 1 tokens (4 MB): over QEMU's MAX_TOKEN_COUNT (2M); the prefix is 8 tokens
        before = rss(proc.pid)
        reset_peak(proc.pid)
        s.sendall(b'{"execute":"query-version","arguments":[')
        pairs = ((2 << 20) - 8) // 2
        for _ in range(pairs // 100_000):
            s.sendall(b"1," * 100_000)
        s.sendall(b"1," * (pairs % 100_000) + b"1 ")  # the space ends the last token
        err = _ask(s, f, b"")
        assert err == {"error": {"class": "GenericError",
                                 "desc": "JSON token count limit exceeded"}}, err
        # a value refused as a whole leaves the stream in step
        assert _ask(s, f, b'{"execute":"query-version","id":"sync"}')["id"] == "sync"
        peak_count = rss(proc.pid, "VmHWM") - before
        print(f"QMP peak RSS growth: 65 MiB token {peak_token >> 10} KiB, "
              f"2M+1 tokens {peak_count >> 10} KiB")
        assert peak_token < RSS_BOUND
        assert peak_count < RSS_BOUND
        s.close()
        assert proc.proc.poll() is None


def _wait_path(path: str) -> None:
    deadline = time.monotonic() + 30  # the NBD socket comes after the QMP one
    while not os.path.exists(path):
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)


def _wait_listening(path: str) -> None:
    """Until ``path`` accepts connections: the file appears at bind(), before the daemon
    narrows its mode and listens, so its mode is only final once a connect succeeds."""
    _wait_path(path)
    deadline = time.monotonic() + 30
    while True:
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.connect(path)
                return
            except (ConnectionRefusedError, FileNotFoundError):
                assert time.monotonic() < deadline, f"{path} never listened"
        time.sleep(0.01)


def _nbd_connect(path: str) -> socket.socket:
    _wait_listening(path)
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(60)
    s.connect(path)
    greeting = _recv(s, 18)
    assert greeting[:16] == b"NBDMAGICIHAVEOPT"
    s.sendall(struct.pack(">I", 3))  # FIXED_NEWSTYLE | NO_ZEROES
    name = b"disk"
    payload = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
    s.sendall(struct.pack(">QII", NBD_OPTS_MAGIC, Opt.GO, len(payload)) + payload)
    while True:
        _, _, rep, length = struct.unpack(">QIII", _recv(s, 20))
        _recv(s, length)
        if rep == 1:  # NBD_REP_ACK
            return s
        assert rep == 3, rep  # NBD_REP_INFO


def _recv(s: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        got = s.recv(n - len(out))
        assert got, "connection closed"
        out += got
    return out


def _simple_reply(s: socket.socket) -> tuple[int, int]:
    magic, err, cookie = struct.unpack(">IIQ", _recv(s, 16))
    assert magic == 0x67446698
    return err, cookie


def test_nbd_oversized_requests_refused_with_bounded_rss(tmp_path: Path) -> None:
    sock = str(tmp_path / "nbd.sock")
    with _daemon(tmp_path, "--blockdev", "driver=null-co,node-name=n0,size=268435456",
                 "--nbd-server", f"addr.type=unix,addr.path={sock}",
                 "--export", "type=nbd,id=e0,node-name=n0,name=disk,writable=on") as proc:
        s = _nbd_connect(sock)
        # a READ over 32 MiB: EINVAL, and the connection goes on
        s.sendall(struct.pack(">IHHQQI", NBD_REQUEST_MAGIC, 0, Cmd.READ, 1, 0, 33 * MiB))
        assert _simple_reply(s) == (22, 1)
        s.sendall(struct.pack(">IHHQQI", NBD_REQUEST_MAGIC, 0, Cmd.READ, 2, 0, 4096))
        assert _simple_reply(s) == (0, 2)
        assert _recv(s, 4096) == bytes(4096)
        before = rss(proc.pid)
        reset_peak(proc.pid)
        # a WRITE announcing 64 MiB, its payload streamed behind it: EINVAL, then hang-up
        s.sendall(struct.pack(">IHHQQI", NBD_REQUEST_MAGIC, 0, Cmd.WRITE, 3, 0, 64 * MiB))
        sent = 0
        try:
            for _ in range(64):
                s.sendall(b"\xab" * MiB)
                sent += MiB
        except (BrokenPipeError, ConnectionResetError):
            pass
        assert _simple_reply(s) == (22, 3)
        s.settimeout(30)
        try:
            rest = s.recv(1)
        except ConnectionResetError:
            rest = b""
        assert rest == b"", "the connection must end after an unreadable WRITE"
        s.close()
        peak = rss(proc.pid, "VmHWM") - before
        print(f"NBD peak RSS growth for a refused 64 MiB WRITE: {peak >> 10} KiB "
              f"({sent >> 20} MiB of payload sent before the hang-up)")
        assert peak < RSS_BOUND
        # the daemon still serves
        s = _nbd_connect(sock)
        s.sendall(struct.pack(">IHHQQI", NBD_REQUEST_MAGIC, 0, Cmd.READ, 4, 0, 512))
        assert _simple_reply(s) == (0, 4)
        s.close()
        assert proc.proc.poll() is None


def test_unix_sockets_are_owner_only_whatever_the_umask(tmp_path: Path) -> None:
    sock = str(tmp_path / "nbd.sock")
    old = os.umask(0)
    try:
        d = _daemon(tmp_path, "--blockdev", "driver=null-co,node-name=n0",
                    "--nbd-server", f"addr.type=unix,addr.path={sock}")
    finally:
        os.umask(old)
    with d:
        _wait_listening(sock)
        mode = os.stat(sock).st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600, oct(mode)
        s, f = _qmp(str(tmp_path / "qmp.sock"))
        qmp2 = str(tmp_path / "nbd2.sock")
        assert _ask(s, f, b'{"execute":"nbd-server-stop"}') == {"return": {}}
        r = _ask(s, f, json.dumps({"execute": "nbd-server-start", "arguments": {
            "addr": {"type": "unix", "data": {"path": qmp2}}}}).encode())
        assert r == {"return": {}}, r
        s.close()
        for path in (str(tmp_path / "qmp.sock"), qmp2):
            mode = os.stat(path).st_mode
            assert stat.S_ISSOCK(mode)
            assert stat.S_IMODE(mode) == 0o600, (path, oct(mode))
