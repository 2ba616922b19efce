"""Differential test of the NBD/export QMP commands: qemu-storage-daemon 7.2 vs ours.

The same command script (errors included) runs against both daemons as subprocesses; the
replies and the events, in order, must be equal once timestamps are dropped. A client connected
to an export checks safe vs hard removal.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from blockmirror.qmp.testing import DaemonProcess, SyncQMP, daemon_argv
from conftest import require_tool

pytestmark = pytest.mark.interop


def script(tmp: Path) -> list[tuple[str, dict[str, Any]]]:
    sock = str(tmp / "nbd.sock")
    addr = {"type": "unix", "data": {"path": sock}}
    export = {"type": "nbd", "id": "e0", "node-name": "n0", "writable": True}
    return [
        ("nbd-server-stop", {}),
        ("block-export-add", export),
        ("nbd-server-add", {"device": "n0"}),
        ("nbd-server-start", {"addr": addr}),
        ("nbd-server-start", {"addr": addr}),
        ("block-export-add", export),
        ("block-export-add", export),
        ("block-export-add", {**export, "id": "e1"}),
        ("block-export-add", {**export, "id": "e1", "name": "other", "node-name": "zz"}),
        ("block-export-add", {**export, "id": "1x", "name": "other"}),
        ("block-export-add", {**export, "id": "e1", "name": "other", "node-name": "ro"}),
        ("block-export-add", {"type": "nbd", "id": "e2", "node-name": "n0", "name": "third",
                              "description": "a description"}),
        ("nbd-server-add", {"device": "ro", "name": "legacy", "writable": True}),
        ("query-block-exports", {}),
        ("nbd-server-remove", {"name": "nope"}),
        ("block-export-del", {"id": "nope"}),
        ("block-export-del", {"id": "e0"}),
        ("block-export-del", {"id": "e0"}),
        ("nbd-server-remove", {"name": "legacy", "mode": "hard"}),
        ("query-block-exports", {}),
        ("nbd-server-stop", {}),
        ("query-block-exports", {}),
        ("nbd-server-stop", {}),
    ]


def _call(conn: SyncQMP, msg: dict[str, Any], out: list[Any]) -> Any:
    """Send ``msg``; events read before its reply go to ``out``; return the reply."""
    conn.send(json.dumps(msg).encode())
    while True:
        reply = json.loads(conn.read_message())
        if "event" not in reply:
            return reply
        out.append({"event": reply["event"], "data": reply.get("data")})


def _settle_exports(conn: SyncQMP, out: list[Any]) -> None:
    """Wait until no export is shutting down: a deletion that waits for its clients ends
    (with BLOCK_EXPORT_DELETED) after the command's reply, and a deleted export leaves
    query-block-exports only after its event was sent, so the events land in ``out`` in
    order. Polling with a generous deadline, never a fixed sleep."""
    deadline = time.monotonic() + 30
    while True:
        exports = _call(conn, {"execute": "query-block-exports", "id": "settle"}, out)
        if not any(e["shutting-down"] for e in exports["return"]):
            return
        assert time.monotonic() < deadline, f"exports never finished shutting down: {exports}"
        time.sleep(0.01)


def play(conn: SyncQMP, cmds: list[tuple[str, dict[str, Any]]]) -> list[Any]:
    out: list[Any] = []
    for i, (name, args) in enumerate([("qmp_capabilities", {}), *cmds,
                                      ("query-version", {})]):
        msg: dict[str, Any] = {"execute": name, "id": i}
        if args:
            msg["arguments"] = args
        reply = _call(conn, msg, out)
        if name != "query-version":
            out.append(reply)
        if name.endswith(("-del", "-remove")) or name == "nbd-server-stop":
            _settle_exports(conn, out)
    return out


def run_daemon(kind: str, tmp: Path) -> list[Any]:
    tmp.mkdir()
    qmp = str(tmp / "qmp.sock")
    argv = daemon_argv(kind, qmp, "--blockdev", "driver=null-co,node-name=n0,size=1048576",
                       "--blockdev", "driver=null-co,node-name=ro,size=1048576,read-only=on")
    with DaemonProcess(argv, qmp) as proc, proc.connect() as conn:
        return play(conn, script(tmp))


def test_nbd_qmp_commands_match_qemu_storage_daemon(tmp_path: Path) -> None:
    require_tool("qemu-storage-daemon")
    theirs = run_daemon("qsd", tmp_path / "qsd")
    ours = run_daemon("ours", tmp_path / "ours")
    for i, (a, b) in enumerate(zip(theirs, ours, strict=False)):
        assert a == b, f"message {i}: qsd {a} != ours {b}"
    assert len(theirs) == len(ours)


def test_safe_removal_refused_while_a_client_is_connected(tmp_path: Path) -> None:
    require_tool("qemu-io")
    qmp = str(tmp_path / "qmp.sock")
    sock = str(tmp_path / "nbd.sock")
    argv = daemon_argv("ours", qmp, "--blockdev", "driver=null-co,node-name=n0,size=1048576",
                       "--nbd-server", f"addr.type=unix,addr.path={sock}",
                       "--export", "type=nbd,id=e0,node-name=n0,name=disk")
    with DaemonProcess(argv, qmp) as proc, proc.connect() as conn:
        uri = f"nbd+unix:///disk?socket={sock}"
        client = subprocess.Popen(["qemu-io", "-r", "-f", "raw", uri],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT)
        try:
            # the client is connected once it has answered a read through the export
            assert client.stdin is not None and client.stdout is not None
            client.stdin.write(b"read 0 512\n")
            client.stdin.flush()
            seen = b""
            while b"read 512/512 bytes" not in seen:
                line = client.stdout.readline()  # the test's timeout bounds a hang here
                assert line, f"qemu-io exited before connecting: {seen!r}"
                seen += line
            out = play(conn, [("block-export-del", {"id": "e0"}),
                              ("block-export-del", {"id": "e0", "mode": "hard"}),
                              ("query-block-exports", {})])
        finally:
            client.kill()
            client.wait()
    assert out[1] == {"id": 1, "error": {"class": "GenericError",
                                         "desc": "export 'e0' still in use"}}
    assert out[2] == {"id": 2, "return": {}}
    assert {"event": "BLOCK_EXPORT_DELETED", "data": {"id": "e0"}} in out
    assert out[-1] == {"id": 3, "return": []}
