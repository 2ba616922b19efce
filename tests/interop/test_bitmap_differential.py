"""Dirty bitmaps, differential against qemu-storage-daemon 7.2: the same QMP script runs on
both daemons (same images, same NBD writes) and every reply must be byte-identical; bitmaps
are compared with x-debug-block-dirty-bitmap-sha256 and through NBD (nbdinfo --map,
qemu-img map with x-dirty-bitmap), and the resulting images with qemu-img info/check.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from blockmirror.qmp.testing import DaemonProcess, SyncQMP, daemon_argv
from conftest import require_tool

pytestmark = pytest.mark.interop

_TIMESTAMP = re.compile(rb'"timestamp": \{"seconds": -?\d+, "microseconds": -?\d+\}')


def _reply(conn: SyncQMP, execute: str, arguments: dict[str, Any] | None = None) -> bytes:
    """Send one command; return its reply line (events before it are dropped)."""
    msg: dict[str, Any] = {"execute": execute}
    if arguments is not None:
        msg["arguments"] = arguments
    conn.send(json.dumps(msg).encode())
    while True:
        line = conn.read_message()
        if b'"event"' not in line:
            return line


def _images(tmp: Path) -> tuple[Path, Path]:
    base = tmp / "base.qcow2"
    top = tmp / "top.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "4M"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 7 1M 256k", str(base)],
                   check=True, capture_output=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2",
                    str(top)], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 9 0 64k", str(top)],
                   check=True, capture_output=True)
    return base, top


def _argv(kind: str, tmp: Path, top: Path) -> list[str]:
    argv = daemon_argv(kind, str(tmp / "qmp.sock"))
    # the monitor last: our daemon serves QMP while later options are still being applied
    at = argv.index("--chardev")
    nodes = [
        "--blockdev", f"driver=file,node-name=f0,filename={top}",
        # discard=unmap: with discard ignored QEMU marks no bitmap, we do (block/io.py)
        "--blockdev", "driver=qcow2,node-name=d0,file=f0,discard=unmap",
        "--blockdev", "driver=null-co,node-name=n0,size=4194304",
        "--nbd-server", f"addr.type=unix,addr.path={tmp / 'nbd.sock'}",
    ]
    return [*argv[:at], *nodes, *argv[at:]]


def _nbd_write(sock: Path, export: str, *commands: str) -> None:
    argv = ["qemu-io", "-f", "raw"]
    for c in commands:
        argv += ["-c", c]
    subprocess.run([*argv, f"nbd+unix:///{export}?socket={sock}"], check=True,
                   capture_output=True)


def _nbdinfo_map(sock: Path, export: str, context: str) -> str:
    r = subprocess.run(["nbdinfo", f"--map={context}", "--json",
                        f"nbd+unix:///{export}?socket={sock}"], capture_output=True, text=True)
    return f"rc={r.returncode} {r.stdout}{r.stderr}"


def _qemu_img_map(sock: Path, export: str, context: str) -> str:
    opts = (f"driver=nbd,server.type=unix,server.path={sock},export={export},"
            f"x-dirty-bitmap={context}")
    r = subprocess.run(["qemu-img", "map", "--output=json", "--image-opts", opts],
                       capture_output=True, text=True)
    return f"rc={r.returncode} {r.stdout}{r.stderr}"


def _nbdinfo_list(sock: Path, export: str) -> str:
    r = subprocess.run(["nbdinfo", "--json", f"nbd+unix:///{export}?socket={sock}"],
                       capture_output=True, text=True)
    if r.returncode:
        return r.stderr
    info = json.loads(r.stdout)
    return json.dumps([e.get("contexts") for e in info["exports"]])


#: (command, arguments) run in order on both daemons; NBD steps are ("nbd-write", ...)
SCRIPT: list[tuple[str, Any]] = [
    ("block-dirty-bitmap-add", {"node": "d0", "name": "b0"}),
    ("block-dirty-bitmap-add", {"node": "d0", "name": "b1", "granularity": 512,
                                "disabled": True}),
    ("block-dirty-bitmap-add", {"node": "d0", "name": "p0", "persistent": True}),
    ("block-dirty-bitmap-add", {"node": "d0", "name": "big", "granularity": 2147483648}),
    ("block-dirty-bitmap-add", {"node": "n0", "name": "b0", "granularity": 4096}),
    # refusals
    ("block-dirty-bitmap-add", {"node": "d0", "name": "b0"}),
    ("block-dirty-bitmap-add", {"node": "d0", "name": ""}),
    ("block-dirty-bitmap-add", {"node": "zz", "name": "x"}),
    ("block-dirty-bitmap-add", {"node": "d0", "name": "x", "granularity": 1000}),
    ("block-dirty-bitmap-add", {"node": "d0", "name": "x", "granularity": 256}),
    ("block-dirty-bitmap-add", {"node": "d0", "name": "x", "granularity": 4294967296}),
    ("block-dirty-bitmap-add", {"node": "n0", "name": "x", "persistent": True}),
    ("block-dirty-bitmap-add", {"node": "f0", "name": "x", "persistent": True}),
    ("block-dirty-bitmap-add", {"node": "d0", "name": "x" * 1024}),
    ("block-dirty-bitmap-add", {"node": "d0", "name": "y" * 1024, "persistent": True}),
    ("block-dirty-bitmap-add", {"node": "d0", "name": "p0", "persistent": True}),
    ("block-dirty-bitmap-add", {"node": "d0", "name": "x", "bogus": 1}),
    ("query-named-block-nodes", {"flat": True}),
    # guest writes through a writable export
    ("block-export-add", {"type": "nbd", "id": "w", "node-name": "d0", "writable": True}),
    ("nbd-write", ["write -P 1 0 4k", "write -P 2 1M 100k", "write -z 3M 64k",
                   "discard 3200k 64k"]),
    ("x-debug-block-dirty-bitmap-sha256", {"node": "d0", "name": "b0"}),
    ("x-debug-block-dirty-bitmap-sha256", {"node": "d0", "name": "b1"}),
    ("x-debug-block-dirty-bitmap-sha256", {"node": "d0", "name": "p0"}),
    ("x-debug-block-dirty-bitmap-sha256", {"node": "d0", "name": "big"}),
    ("x-debug-block-dirty-bitmap-sha256", {"node": "d0", "name": "nope"}),
    ("x-debug-block-dirty-bitmap-sha256", {"node": "zz", "name": "b0"}),
    # enable / disable / clear
    ("block-dirty-bitmap-enable", {"node": "d0", "name": "b1"}),
    ("nbd-write", ["write -P 3 2M 1536"]),
    ("block-dirty-bitmap-disable", {"node": "d0", "name": "b1"}),
    ("block-dirty-bitmap-disable", {"node": "d0", "name": "b1"}),
    ("nbd-write", ["write -P 4 2500k 4k"]),
    ("x-debug-block-dirty-bitmap-sha256", {"node": "d0", "name": "b1"}),
    ("block-dirty-bitmap-enable", {"node": "zz", "name": "b1"}),
    ("block-dirty-bitmap-disable", {"node": "d0", "name": "zz"}),
    ("block-dirty-bitmap-clear", {"node": "d0", "name": "big"}),
    ("block-dirty-bitmap-clear", {"node": "d0", "name": "zz"}),
    ("x-debug-block-dirty-bitmap-sha256", {"node": "d0", "name": "big"}),
    # merge: local names, {node, name}, other granularities, refusals
    ("block-dirty-bitmap-add", {"node": "d0", "name": "m", "granularity": 4096}),
    ("block-dirty-bitmap-merge", {"node": "d0", "target": "m", "bitmaps": ["b0", "b1"]}),
    ("x-debug-block-dirty-bitmap-sha256", {"node": "d0", "name": "m"}),
    ("block-dirty-bitmap-merge", {"node": "d0", "target": "m",
                                  "bitmaps": [{"node": "d0", "name": "p0"}]}),
    ("block-dirty-bitmap-merge", {"node": "d0", "target": "m",
                                  "bitmaps": [{"node": "n0", "name": "b0"}]}),
    ("block-dirty-bitmap-merge", {"node": "d0", "target": "m", "bitmaps": ["nope"]}),
    ("block-dirty-bitmap-merge", {"node": "d0", "target": "nope", "bitmaps": ["b0"]}),
    ("block-dirty-bitmap-merge", {"node": "d0", "target": "m",
                                  "bitmaps": [{"node": "zz", "name": "b0"}]}),
    ("block-dirty-bitmap-merge", {"node": "d0", "target": "m", "bitmaps": [1]}),
    ("x-debug-block-dirty-bitmap-sha256", {"node": "d0", "name": "m"}),
    # NBD meta contexts: a read-only export refuses enabled bitmaps
    ("block-export-add", {"type": "nbd", "id": "e", "node-name": "d0", "bitmaps": ["b0"]}),
    ("block-export-add", {"type": "nbd", "id": "e", "node-name": "d0", "bitmaps": ["nope"]}),
    ("block-dirty-bitmap-disable", {"node": "d0", "name": "b0"}),
    ("block-export-add", {"type": "nbd", "id": "e", "node-name": "d0",
                          "bitmaps": ["b0", "b1"], "allocation-depth": True}),
    ("nbd-list", "e"),
    ("nbd-map", ["e", "qemu:dirty-bitmap:b0"]),
    ("nbd-map", ["e", "qemu:dirty-bitmap:b1"]),
    ("nbd-map", ["e", "qemu:allocation-depth"]),
    ("nbd-map", ["e", "base:allocation"]),
    ("qemu-img-map", ["e", "qemu:dirty-bitmap:b0"]),
    ("qemu-img-map", ["e", "qemu:dirty-bitmap:b1"]),
    ("qemu-img-map", ["e", "qemu:allocation-depth"]),
    ("query-named-block-nodes", {"flat": True}),
    # busy while exported
    ("block-dirty-bitmap-remove", {"node": "d0", "name": "b0"}),
    ("block-dirty-bitmap-clear", {"node": "d0", "name": "b1"}),
    ("block-dirty-bitmap-enable", {"node": "d0", "name": "b1"}),
    ("block-dirty-bitmap-merge", {"node": "d0", "target": "b1", "bitmaps": ["m"]}),
    ("block-dirty-bitmap-merge", {"node": "d0", "target": "m", "bitmaps": ["b1"]}),
    ("block-export-del", {"id": "e"}),
    ("query-named-block-nodes", {"flat": True}),
    # remove
    ("block-dirty-bitmap-remove", {"node": "d0", "name": "b1"}),
    ("block-dirty-bitmap-remove", {"node": "d0", "name": "b1"}),
    ("block-dirty-bitmap-remove", {"node": "zz", "name": "b1"}),
    ("block-dirty-bitmap-remove", {"node": "d0", "name": "p0"}),
    ("block-dirty-bitmap-add", {"node": "d0", "name": "p1", "persistent": True,
                                "granularity": 512, "disabled": True}),
    ("block-dirty-bitmap-add", {"node": "d0", "name": "p2", "persistent": True}),
    ("nbd-write", ["write -P 5 128k 8k"]),
    ("query-named-block-nodes", {"flat": True}),
    ("block-export-del", {"id": "w"}),
]


def _bitmap_view(reply: bytes) -> str:
    """The bitmap members of a query-named-block-nodes reply, verbatim (other members, such
    as the file node's size, differ between the daemons for reasons unrelated to bitmaps),
    and backing_file_depth (0 with flat=true, as QEMU fills it with backing-image)."""
    nodes = json.loads(reply)["return"]
    return json.dumps([
        [n["node-name"], n.get("dirty-bitmaps"), n["backing_file_depth"],
         n["image"].get("format-specific", {}).get("data", {}).get("bitmaps")]
        for n in nodes if not n["node-name"].startswith("#")
    ])


def _run(kind: str, tmp: Path) -> tuple[list[str], Path]:
    tmp.mkdir()
    _base, top = _images(tmp)
    sock = tmp / "nbd.sock"
    out: list[str] = []
    with DaemonProcess(_argv(kind, tmp, top), str(tmp / "qmp.sock")) as proc, \
            proc.connect() as conn:
        conn.send(b'{"execute":"qmp_capabilities"}')
        conn.read_message()
        for step, args in SCRIPT:
            if step == "nbd-write":
                _nbd_write(sock, "d0", *args)
                continue
            if step == "nbd-list":
                out.append(f"list {args}: {_nbdinfo_list(sock, args)}")
            elif step == "nbd-map":
                out.append(f"nbdinfo {args}: {_nbdinfo_map(sock, *args)}")
            elif step == "qemu-img-map":
                out.append(f"qemu-img map {args}: {_qemu_img_map(sock, *args)}")
            elif step == "query-named-block-nodes":
                out.append(f"{step}: {_bitmap_view(_reply(conn, step, args))}")
            else:
                line = _reply(conn, step, args)
                out.append(f"{step} {json.dumps(args)[:80]}: "
                           + _TIMESTAMP.sub(b"T", line).decode().strip())
        out.append(_reply(conn, "quit").decode().strip())
        proc.proc.wait(20)
    return [line.replace(str(tmp), "TMP") for line in out], top


def _image_summary(top: Path) -> str:
    info = subprocess.run(["qemu-img", "info", "--output=json", "-U", str(top)],
                          capture_output=True, text=True, check=True).stdout
    data = json.loads(info)
    check = subprocess.run(["qemu-img", "check", str(top)], capture_output=True, text=True)
    return json.dumps([data["format-specific"], data["virtual-size"], check.returncode,
                       check.stdout.splitlines()[0]])


def test_bitmap_script_matches_qsd(tmp_path: Path) -> None:
    require_tool("qemu-storage-daemon", "qemu-img", "qemu-io", "nbdinfo")
    want, want_img = _run("qsd", tmp_path / "qsd")
    got, got_img = _run("ours", tmp_path / "ours")
    assert len(want) == len(got)
    diffs = [f"  qsd:  {w}\n  ours: {g}" for w, g in zip(want, got, strict=True) if w != g]
    assert not diffs, f"{len(diffs)}/{len(want)} steps differ:\n" + "\n".join(diffs)
    # the persistent bitmaps stored on quit, as qemu-img sees them
    assert _image_summary(got_img) == _image_summary(want_img)
    assert '"p2"' in _image_summary(got_img)
