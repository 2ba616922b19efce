"""Interop: `blockmirror daemon` command-line behaviour against qemu-storage-daemon's.

Error texts must match QSD's once the program name is replaced, with the same exit status;
SIGTERM and --daemonize behave like QSD's.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from blockmirror.qmp.testing import DaemonProcess, daemon_argv
from conftest import require_tool

pytestmark = pytest.mark.interop

OURS = [sys.executable, "-m", "blockmirror.cli.main", "daemon"]

BAD_ARGS = [
    ["--blockdev", "foo"],
    ["--blockdev", "driver=foo,node-name=x"],
    ["--blockdev", "driver=null-co"],
    ["--blockdev", "driver=null-co,node-name=n,bogus=1"],
    ["--blockdev", '{"driver":"null-co"'],
    ["--blockdev", "driver=null-co,node-name=n,size=abc"],
    ["--blockdev", "driver=null-co,node-name=n,size=1k"],
    ["--blockdev", "driver=null-co,node-name=n,read-only=maybe"],
    ["--blockdev", "driver=null-co,node-name=n,cache.direct=x"],
    ["--blockdev", "driver=file,node-name=n,filename=/nonexistent/x"],
    ["--blockdev", "driver=null-co,node-name=n", "--blockdev", "driver=null-co,node-name=n"],
    ["--blockdev", "driver=null-co,node-name=1x"],
    ["--chardev", "socket,id=m"],
    ["--chardev", "socket,path=/tmp/unused.sock,server=on,wait=off"],
    ["--chardev", "bogus,id=x"],
    ["--monitor", "foo"],
    ["--monitor", "chardev=foo"],
    ["--nbd-server", "addr.type=unix"],
    ["--object", "iothread"],
    ["--object", "foo,id=x"],
    ["--object", "iothread,id=io0", "--object", "iothread,id=io0"],
    ["--bogus"],
    ["-d"],
    ["--pidfile"],
    ["--blockdev"],
    ["foo"],
    ["--blockdev", "foo", "bar"],
    ["bar", "--blockdev", "foo"],
    ["--blockdev", "foo", "--bogus"],
    ["--chardev", "socket,id=m,host=127.0.0.1,port=abc,server=on,wait=off"],
    ["--monitor", "chardev=m,mode=readline", "--chardev",
     "socket,id=m,path=/tmp/unused.sock,server=on,wait=off"],
    ["--nbd-server", "addr.type=inet,addr.host=127.0.0.1"],
    ["--nbd-server", "addr.type=unix,addr.path=/tmp/bm-cli-n1.sock,max-connections=x"],
    ["--nbd-server", "addr.type=unix,addr.path=/tmp/bm-cli-n1.sock,bogus=1"],
    ["--nbd-server", "addr.type=unix,addr.path=/tmp/bm-cli-n2.sock",
     "--nbd-server", "addr.type=unix,addr.path=/tmp/bm-cli-n3.sock"],
    ["--export", "type=nbd,id=e"],
    ["--export", "nbd,id=e,node-name=x,writable=maybe"],
    ["--export", "bogus,id=e,node-name=x"],
    ["--blockdev", "driver=null-co,node-name=n", "--export", "type=nbd,id=e,node-name=n"],
    ["--object", "iothread,id=io0,poll-max-ns=x"],
    ["--object", "tls-creds-x509,id=t,endpoint=bad"],
    ["--object", "iothread,id=io0,bogus=1"],
    ["--object", "id=x"],
    ["--monitor", "chardev=m,bogus=1"],
    ["--chardev", "socket,id=m,path=/tmp/unused.sock,server=maybe"],
    ["--blockdev", "null-co,size=1,help"],
    ["--blockdev", "driver=null-co,a.0=1,a.b=2"],
]


def run(argv: list[str]) -> tuple[int, str]:
    p = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=20,
                       check=False)
    return p.returncode, p.stderr.decode()


@pytest.mark.parametrize("args", BAD_ARGS, ids=lambda a: " ".join(a))
def test_errors_match_qsd(args: list[str]) -> None:
    require_tool("qemu-storage-daemon")
    want_rc, want = run(["qemu-storage-daemon", *args])
    got_rc, got = run([*OURS, *args])
    assert (got_rc, got.replace("blockmirror: ", "P: ")) == \
        (want_rc, want.replace("qemu-storage-daemon: ", "P: "))


def test_version_and_help() -> None:
    p = subprocess.run([*OURS, "-V"], capture_output=True, timeout=20, check=True)
    assert b"version 7.2.22" in p.stdout
    p = subprocess.run([*OURS, "--help"], capture_output=True, timeout=20, check=True)
    assert b"--blockdev" in p.stdout and b"--nbd-server" in p.stdout
    assert b"BLOCKMIRROR_EVENT_LOOP=asyncio" in p.stdout


def test_sigterm_closes_images(tmp_path: Path) -> None:
    img = tmp_path / "d.raw"
    img.write_bytes(b"\0" * (1 << 20))
    sock = str(tmp_path / "s.sock")
    argv = daemon_argv("ours", sock, "--blockdev",
                       f"driver=file,node-name=f0,filename={img}")
    with DaemonProcess(argv, sock) as proc, proc.connect() as conn:
        conn.send(b'{"execute":"qmp_capabilities"}')
        assert conn.read_line() == b'{"return": {}}\r\n'
        proc.proc.send_signal(signal.SIGTERM)
        assert proc.proc.wait(20) == 0
        assert not os.path.exists(sock)


def test_daemonize_and_pidfile(tmp_path: Path) -> None:
    sock = str(tmp_path / "s.sock")
    pidfile = tmp_path / "pid"
    p = subprocess.run(daemon_argv("ours", sock, "--daemonize", "--pidfile", str(pidfile)),
                       capture_output=True, timeout=20, check=False)
    assert p.returncode == 0, p.stderr
    # the parent exits only once the child listens and has written its pid file
    pid = int(pidfile.read_text())
    try:
        assert os.path.exists(sock)
        os.kill(pid, 0)
    finally:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while pidfile.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
    assert not pidfile.exists()


def test_nbd_server_and_export_options(tmp_path: Path) -> None:
    """QSD's worked example: --nbd-server/--export from the command line, written by qemu-io."""
    require_tool("qemu-io")
    img = tmp_path / "disk.raw"
    img.write_bytes(b"\0" * (4 << 20))
    sock, nbd = str(tmp_path / "qmp.sock"), str(tmp_path / "nbd.sock")
    argv = daemon_argv(
        "ours", sock,
        "--blockdev", f"driver=file,node-name=disk-file,filename={img}",
        "--blockdev", "driver=raw,node-name=disk,file=disk-file",
        "--nbd-server", f"addr.type=unix,addr.path={nbd}",
        "--export", "type=nbd,id=exp0,node-name=disk,name=disk,writable=on")
    with DaemonProcess(argv, sock) as proc:
        deadline = time.monotonic() + 10
        while not os.path.exists(nbd):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0xab 0 1M",
                        f"nbd+unix:///disk?socket={nbd}"], check=True, capture_output=True,
                       timeout=20)
        proc.proc.send_signal(signal.SIGTERM)
        assert proc.proc.wait(20) == 0
    assert img.read_bytes()[: 1 << 20] == b"\xab" * (1 << 20)


def test_client_chardev_serves_qmp(tmp_path: Path) -> None:
    """--chardev socket without server=on connects out and serves QMP on that connection."""
    import socket

    path = str(tmp_path / "listen.sock")
    with socket.socket(socket.AF_UNIX) as lsock:
        lsock.bind(path)
        lsock.listen(1)
        lsock.settimeout(20)
        proc = subprocess.Popen([*OURS, "--chardev", f"socket,id=c,path={path}",
                                 "--monitor", "chardev=c"], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            conn, _ = lsock.accept()
            with conn:
                conn.settimeout(20)
                f = conn.makefile("rb")
                assert f.readline().startswith(b'{"QMP":')
                conn.sendall(b'{"execute":"qmp_capabilities"}{"execute":"quit"}')
                assert f.readline() == b'{"return": {}}\r\n'
                assert f.readline() == b'{"return": {}}\r\n'
            assert proc.wait(20) == 0
        finally:
            proc.kill()
            proc.wait()
            if proc.stderr is not None:
                proc.stderr.close()


@pytest.mark.parametrize("kind", ["qsd", "ours"])
def test_server_wait_blocks_startup(tmp_path: Path, kind: str) -> None:
    """server=on without wait=off: start-up waits for the first client, as QSD does."""
    require_tool("qemu-storage-daemon")
    import socket

    sock, pidfile = str(tmp_path / "w.sock"), tmp_path / "pid"
    prog = ["qemu-storage-daemon"] if kind == "qsd" else OURS
    chardev = f"socket,id=m,path={sock},server=on"
    proc = subprocess.Popen([*prog, "--chardev", chardev, "--monitor", "chardev=m",
                             "--pidfile", str(pidfile)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert proc.stderr is not None
        info = proc.stderr.readline().decode()
        assert info.split(": ", 1)[1] == (f"--chardev {chardev}: info: QEMU waiting for "
                                          f"connection on: disconnected:unix:{sock},server=on\n")
        time.sleep(0.2)  # a window in which the daemon must not detach (not a sync point)
        assert not pidfile.exists()  # still waiting
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(20)
            s.connect(sock)
            assert s.makefile("rb").readline().startswith(b'{"QMP":')
            deadline = time.monotonic() + 20
            while not pidfile.exists():
                assert time.monotonic() < deadline
                time.sleep(0.01)
    finally:
        proc.kill()
        proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


def test_blockdev_keyval_fuzz_matches_qsd() -> None:
    """Random --blockdev keyval strings (no node-name: nothing opens) give QSD's texts."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    require_tool("qemu-storage-daemon")
    keys = ["driver", "file", "file.driver", "file.filename", "cache.direct", "size",
            "read-only", "discard", "detect-zeroes", "aio", "image", "inject-error.0.event",
            "inject-error.0.errno", "inject-error.1.event", "server.type", "server.path",
            "latency-ns", "read-zeroes", "max-transfer", "bogus", "cache"]
    values = ["", "on", "off", "yes", "x", "0", "-1", "0x10", "1k", "1.5", "null-co", "qcow2",
              "file", "blkdebug", "nbd", "unix", "read_aio", "unmap", "threads", "010"]
    item = st.one_of(st.tuples(st.sampled_from(keys), st.sampled_from(values)).map(
        lambda kv: f"{kv[0]}={kv[1]}"), st.sampled_from(["", "x", "a..b", "=v", "k=v,,w"]))
    examples = int(os.environ.get("BM_DIFF_FUZZ", 20))

    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(item, min_size=1, max_size=5))
    def check(items: list[str]) -> None:
        arg = ",".join(items)
        want_rc, want = run(["qemu-storage-daemon", "--blockdev", arg])
        got_rc, got = run([*OURS, "--blockdev", arg])
        assert (got_rc, got.replace("blockmirror: ", "P: ")) == \
            (want_rc, want.replace("qemu-storage-daemon: ", "P: "))

    check()


def test_inherited_fd_chardev(tmp_path: Path) -> None:
    """-chardev socket,fd=N: QMP over an inherited, already connected socket (as iotests do)."""
    import socket

    ours, theirs = socket.socketpair()
    with ours:
        proc = subprocess.Popen([*OURS, "--chardev", f"socket,id=m,fd={theirs.fileno()}",
                                 "--monitor", "chardev=m"], pass_fds=[theirs.fileno()],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        theirs.close()
        try:
            ours.settimeout(20)
            f = ours.makefile("rb")
            assert f.readline().startswith(b'{"QMP":')
            ours.sendall(b'{"execute":"qmp_capabilities"}{"execute":"query-block"}')
            assert f.readline() == b'{"return": {}}\r\n'
            assert f.readline() == b'{"return": []}\r\n'
            ours.sendall(b'{"execute":"quit"}')
            assert f.readline() == b'{"return": {}}\r\n'
            assert proc.wait(20) == 0
        finally:
            proc.kill()
            proc.wait()
