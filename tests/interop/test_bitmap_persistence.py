"""Persistent dirty bitmaps in qcow2 images, against QEMU's tools: a bitmap written by our
daemon survives a clean quit intact and a SIGKILL as in-use/inconsistent (as QEMU's would:
both daemons are run through the same steps and their replies compared), qemu-img bitmap
edits what we stored and we read what it wrote, and qemu-img check stays clean.
"""

from __future__ import annotations

import asyncio
import json
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest
from test_qcow2_support import close, open_qcow2

from blockmirror.block import bitmaps
from blockmirror.qmp.testing import DaemonProcess, SyncQMP, daemon_argv
from conftest import require_tool
from qsd_diff import command

pytestmark = pytest.mark.interop


def _cmd(conn: SyncQMP, execute: str, arguments: dict[str, Any] | None = None) -> Any:
    """Run one command; its reply (the events before it are dropped)."""
    return command(conn, execute, arguments)[1]


def _daemon(kind: str, tmp: Path, image: Path) -> DaemonProcess:
    argv = daemon_argv(kind, str(tmp / f"{kind}.sock"))
    at = argv.index("--chardev")
    nodes = [
        "--blockdev", f"driver=file,node-name=f0,filename={image}",
        "--blockdev", "driver=qcow2,node-name=d0,file=f0",
        "--nbd-server", f"addr.type=unix,addr.path={tmp / f'{kind}.nbd'}",
        "--export", "type=nbd,id=w,node-name=d0,name=w,writable=on",
    ]
    return DaemonProcess([*argv[:at], *nodes, *argv[at:]], str(tmp / f"{kind}.sock"))


def _write(tmp: Path, kind: str, *commands: str) -> None:
    argv = ["qemu-io", "-f", "raw"]
    for c in commands:
        argv += ["-c", c]
    subprocess.run([*argv, f"nbd+unix:///w?socket={tmp / f'{kind}.nbd'}"], check=True,
                   capture_output=True)


def _info_bitmaps(image: Path) -> Any:
    out = subprocess.run(["qemu-img", "info", "-U", "--output=json", str(image)],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)["format-specific"]["data"].get("bitmaps")


def _check(image: Path) -> tuple[int, str]:
    r = subprocess.run(["qemu-img", "check", str(image)], capture_output=True, text=True)
    return r.returncode, r.stdout + r.stderr


def _dirty_bitmaps(conn: SyncQMP) -> Any:
    reply = _cmd(conn, "query-named-block-nodes", {"flat": True})
    found = [n for n in reply.get("return", []) if n["node-name"] == "d0"]
    assert found, f"no node d0 in {reply}"
    return found[0].get("dirty-bitmaps")


def _fresh(tmp: Path, name: str) -> Path:
    image = tmp / name
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "8M"], check=True)
    return image


def _lifecycle(kind: str, tmp: Path) -> list[Any]:
    """Add persistent bitmaps, write, quit; reopen, check; write, SIGKILL; reopen."""
    image = _fresh(tmp, f"{kind}.qcow2")
    seen: list[Any] = []
    with _daemon(kind, tmp, image) as proc, proc.connect() as conn:
        _cmd(conn, "qmp_capabilities")
        seen.append(_cmd(conn, "block-dirty-bitmap-add",
                         {"node": "d0", "name": "inc", "persistent": True}))
        seen.append(_cmd(conn, "block-dirty-bitmap-add",
                         {"node": "d0", "name": "fine", "persistent": True,
                          "granularity": 512, "disabled": True}))
        _write(tmp, kind, "write -P 1 0 64k", "write -P 2 3M 4k", "write -P 3 7M 1536")
        seen.append(_cmd(conn, "x-debug-block-dirty-bitmap-sha256",
                         {"node": "d0", "name": "inc"}))
        seen.append(_info_bitmaps(image))  # in use while we hold them
        _cmd(conn, "quit")
        proc.proc.wait(20)
    seen.append(("clean quit", _info_bitmaps(image), _check(image)[0]))
    with _daemon(kind, tmp, image) as proc, proc.connect() as conn:
        _cmd(conn, "qmp_capabilities")
        seen.append(_dirty_bitmaps(conn))
        seen.append(_cmd(conn, "x-debug-block-dirty-bitmap-sha256",
                         {"node": "d0", "name": "inc"}))
        seen.append(_info_bitmaps(image))
        _write(tmp, kind, "write -P 4 5M 64k")
        seen.append(_cmd(conn, "x-debug-block-dirty-bitmap-sha256",
                         {"node": "d0", "name": "inc"}))
        proc.proc.kill()  # SIGKILL: nothing is stored
        proc.proc.wait(20)
    seen.append(("killed", _info_bitmaps(image)))
    with _daemon(kind, tmp, image) as proc, proc.connect() as conn:
        _cmd(conn, "qmp_capabilities")
        seen.append(_dirty_bitmaps(conn))
        for command, args in [
            ("block-dirty-bitmap-clear", {"node": "d0", "name": "inc"}),
            ("block-dirty-bitmap-enable", {"node": "d0", "name": "inc"}),
            ("block-dirty-bitmap-merge", {"node": "d0", "target": "fine", "bitmaps": ["inc"]}),
            ("block-dirty-bitmap-add", {"node": "d0", "name": "inc", "persistent": True}),
            ("block-export-add", {"type": "nbd", "id": "e", "node-name": "d0",
                                  "bitmaps": ["inc"], "writable": True}),
            ("x-debug-block-dirty-bitmap-sha256", {"node": "d0", "name": "fine"}),
            # removing the inconsistent bitmap is how one recovers from it
            ("block-dirty-bitmap-remove", {"node": "d0", "name": "inc"}),
        ]:
            seen.append((command, _cmd(conn, command, args)))
        seen.append(_info_bitmaps(image))
        _cmd(conn, "quit")
        proc.proc.wait(20)
    seen.append(("final", _info_bitmaps(image), _check(image)[0]))
    return seen


def test_restart_and_sigkill_like_qsd(tmp_path: Path) -> None:
    require_tool("qemu-storage-daemon", "qemu-img", "qemu-io")
    want = _lifecycle("qsd", tmp_path)
    got = _lifecycle("ours", tmp_path)
    assert got == want
    # and what that means, spelt out
    clean = got[4]
    # stored newest first, as QEMU walks the node's bitmaps
    assert clean[1] == [{"flags": [], "name": "fine", "granularity": 512},
                        {"flags": ["auto"], "name": "inc", "granularity": 65536}]
    assert clean[2] == 0
    assert got[6] == got[2]  # the bitmap came back with the bits it had at quit
    killed = got[9]
    assert killed[1][1]["flags"] == ["in-use", "auto"]
    inconsistent = got[10]
    assert {"name": "inc", "recording": False, "persistent": True, "busy": False,
            "granularity": 65536, "count": 0, "inconsistent": True} in inconsistent
    refusals = dict(got[11:18])
    text = "Bitmap 'inc' is inconsistent and cannot be used"
    assert refusals["block-dirty-bitmap-clear"]["error"]["desc"] == text
    assert refusals["block-export-add"]["error"]["desc"] == text
    assert got[-1][2] == 0


def test_qemu_img_bitmap_edits_ours(tmp_path: Path) -> None:
    """Bitmaps written by our driver are edited by qemu-img bitmap, and we read the result."""
    require_tool("qemu-img")
    image = _fresh(tmp_path, "edit.qcow2")

    async def write_ours() -> None:
        graph, node = await open_qcow2(image)
        try:
            bitmaps.prepare_add(graph, node.name, "a", 65536, True).commit()
            bitmaps.prepare_add(graph, node.name, "b", 4096, True).commit()
            await node.write(0, b"\x01" * 4096)
            await node.write(5 << 20, b"\x02" * 70000)
        finally:
            await close(graph)

    asyncio.run(write_ours())
    assert _check(image)[0] == 0
    for args in (["--add", "-g", "1024", "c"], ["--merge", "a", "c"], ["--disable", "a"],
                 ["--remove", "b"], ["--enable", "c"], ["--clear", "a"]):
        subprocess.run(["qemu-img", "bitmap", *args[:-1], str(image), args[-1]], check=True)
    assert _check(image)[0] == 0
    # qemu-img convert --bitmaps copies them with QEMU's own reader: a second opinion
    copy = tmp_path / "copy.qcow2"
    subprocess.run(["qemu-img", "convert", "--bitmaps", "-O", "qcow2", str(image), str(copy)],
                   check=True)

    async def read_ours(path: Path) -> dict[str, tuple[int, int, bool, str]]:
        graph, node = await open_qcow2(path, read_only=True)
        try:
            return {b.name: (b.granularity, b.bitmap.dirty_count(), b.enabled,
                             b.bitmap.sha256()) for b in node.bitmaps}
        finally:
            await close(graph)

    ours = asyncio.run(read_ours(image))
    assert set(ours) == {"a", "c"}
    assert ours["a"][:3] == (65536, 0, False)
    # c (1 KiB granules) took a's 64 KiB granules: 0..64k and 5M..5M+128k
    assert ours["c"][:3] == (1024, 3 * 65536, True)
    assert asyncio.run(read_ours(copy)) == ours
    info = _info_bitmaps(image)
    assert [(b["name"], b["flags"]) for b in info] == [("a", []), ("c", ["auto"])]


def test_stale_extension_dropped_like_qemu(tmp_path: Path) -> None:
    """An image whose bitmaps autoclear bit was cleared by a program without bitmap support:
    the bitmaps are ignored, and a read-write open drops the extension from the header (its
    clusters leak until a repair), as QEMU does."""
    require_tool("qemu-img", "qemu-io")
    images = {}
    for kind in ("qemu", "ours"):
        image = _fresh(tmp_path, f"stale-{kind}.qcow2")
        subprocess.run(["qemu-img", "bitmap", "--add", str(image), "b0"], check=True)
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write 0 64k", str(image)], check=True,
                       capture_output=True)
        raw = bytearray(image.read_bytes())
        raw[88:96] = bytes(8)  # autoclear: nothing
        image.write_bytes(bytes(raw))
        images[kind] = image
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write 1M 4k", str(images["qemu"])],
                   check=True, capture_output=True)

    async def write_ours() -> None:
        graph, node = await open_qcow2(images["ours"])
        try:
            assert len(node.bitmaps) == 0
            await node.write(1 << 20, bytes(4096))
        finally:
            await close(graph)

    asyncio.run(write_ours())
    assert _info_bitmaps(images["ours"]) is None
    want, got = _check(images["qemu"]), _check(images["ours"])
    assert got[0] == want[0] == 3  # leaks only
    assert got[1].replace("ours", "qemu") == want[1]
    assert images["ours"].read_bytes()[:4096] == images["qemu"].read_bytes()[:4096]


def _directory_entry_at(image: Path) -> tuple[int, int]:
    """(directory offset, its first entry's table offset) of an image with one bitmap."""
    raw = image.read_bytes()
    header_length = struct.unpack_from(">I", raw, 100)[0]
    pos = header_length
    while True:
        kind, length = struct.unpack_from(">II", raw, pos)
        if kind == 0x23852875:
            directory = struct.unpack_from(">Q", raw, pos + 8 + 16)[0]
            return directory, struct.unpack_from(">Q", raw, directory)[0]
        pos += 8 + ((length + 7) & ~7)


def test_broken_table_of_an_in_use_bitmap(tmp_path: Path) -> None:
    """A bitmap left in use whose table is damaged is never read: the image opens, the bitmap
    is inconsistent, and removing it works, as with qemu-img bitmap --remove."""
    require_tool("qemu-img")
    images = []
    for kind in ("qemu", "ours"):
        image = _fresh(tmp_path, f"broken-{kind}.qcow2")
        subprocess.run(["qemu-img", "bitmap", "--add", str(image), "b0"], check=True)
        directory, table = _directory_entry_at(image)
        with image.open("r+b") as f:
            f.seek(directory + 12)
            f.write(struct.pack(">I", 3))  # flags: in-use, auto
            f.seek(table)
            f.write(struct.pack(">Q", 1 << 1))  # a reserved bit
        images.append(image)
    subprocess.run(["qemu-img", "bitmap", "--remove", str(images[0]), "b0"], check=True)

    async def remove_ours() -> None:
        graph, node = await open_qcow2(images[1])
        try:
            named = node.bitmaps.get("b0")
            assert named is not None and named.inconsistent
            prepared = await bitmaps.prepare_remove(graph, node.name, "b0")
            prepared.commit()
        finally:
            await close(graph)

    asyncio.run(remove_ours())
    want, got = _check(images[0]), _check(images[1])
    assert got[0] == want[0]
    assert got[1].replace("ours", "qemu") == want[1]
    assert _info_bitmaps(images[1]) is None


def test_cli_export_serves_a_stored_bitmap_like_qsd(tmp_path: Path) -> None:
    """--export ...,bitmaps.0=NAME,allocation-depth=on on the command line, for a bitmap
    qemu-img stored in the image: nbdinfo sees the same maps from both daemons."""
    require_tool("qemu-storage-daemon", "qemu-img", "qemu-io", "nbdinfo")
    image = _fresh(tmp_path, "cli.qcow2")
    subprocess.run(["qemu-img", "bitmap", "--add", str(image), "b0"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write 1M 64k", "-c", "write 6M 512",
                    str(image)], check=True, capture_output=True)
    subprocess.run(["qemu-img", "bitmap", "--disable", str(image), "b0"], check=True)
    maps = []
    for kind in ("qsd", "ours"):
        sock, nbd = tmp_path / f"{kind}-cli.sock", tmp_path / f"{kind}-cli.nbd"
        argv = daemon_argv(kind, str(sock))
        at = argv.index("--chardev")
        nodes = [
            "--blockdev", f"driver=file,node-name=f0,filename={image}",
            "--blockdev", "driver=qcow2,node-name=d0,file=f0",
            "--nbd-server", f"addr.type=unix,addr.path={nbd}",
            "--export", "type=nbd,id=e,node-name=d0,bitmaps.0=b0,allocation-depth=on",
        ]
        with DaemonProcess([*argv[:at], *nodes, *argv[at:]], str(sock)) as proc, \
                proc.connect() as conn:
            _cmd(conn, "qmp_capabilities")
            seen = [_dirty_bitmaps(conn)]
            for context in ("qemu:dirty-bitmap:b0", "qemu:allocation-depth"):
                r = subprocess.run(["nbdinfo", f"--map={context}",
                                    f"nbd+unix:///d0?socket={nbd}"],
                                   capture_output=True, text=True)
                seen.append((r.returncode, r.stdout, r.stderr))
            _cmd(conn, "quit")
            proc.proc.wait(20)
        maps.append(seen)
    assert maps[1] == maps[0]
    assert "dirty" in maps[1][1][1]
    assert maps[1][0][0]["busy"] is True
