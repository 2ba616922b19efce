"""Regression tests for what the fuzzers found (see fuzz/known.py and fuzz/README.md).

Each found input that broke us is pinned here as a plain test of QEMU 7.2's behaviour.
"""

from __future__ import annotations

import asyncio
import json
import os
import struct
import subprocess
from pathlib import Path

import pytest

from blockmirror.block.graph import BlockGraph
from blockmirror.block.options import close_all, open_blockdev
from conftest import require_tool


def test_qcow2_backing_name_with_nul_ends_at_the_nul(tmp_path: Path) -> None:
    """Found by fuzz/h_qcow2.py: a NUL in the backing file name raised ValueError from
    realpath; QEMU reads the name as a C string, so it ends at the NUL (qemu-img info shows
    the cut name and qemu-io reads through it)."""
    require_tool("qemu-img")
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "1M"], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b",
                    str(base) + "x", "-F", "qcow2", str(top), "1M"], check=True)
    img = bytearray(top.read_bytes())
    off, size = struct.unpack_from(">QI", img, 8)
    img[off + size - 1] = 0  # "...base.qcow2x" -> "...base.qcow2\0"
    top.write_bytes(img)
    # qemu-img info reports backing file: .../base.qcow2 and qemu-io reads through it

    async def main() -> tuple[str | None, str | None]:
        graph = BlockGraph()
        try:
            node = await open_blockdev(graph, {"driver": "qcow2", "node-name": "t", "file": {
                "driver": "file", "filename": str(top)}})
            return (node.backing.filename if node.backing else None,
                    node.info().backing_filename)
        finally:
            await close_all(graph)

    # the name as qemu-img info --output=json shows it in backing-filename
    assert asyncio.run(main()) == (str(base), str(base))


def _qmp_run(tmp_path: Path, cmds: list[tuple[str, dict[str, object]]],
             clock: str | None = None) -> list[object]:
    from blockmirror.daemon import Daemon
    from blockmirror.qmp.testing import qmp_daemon

    async def main() -> list[object]:
        out: list[object] = []
        async with qmp_daemon(tmp_path, Daemon(clock) if clock else None) as td:
            raw = await td.raw()
            await raw.cmd("qmp_capabilities")
            for name, args in cmds:
                out.append(await raw.cmd(name, args))
            await raw.close()
        return out

    return asyncio.run(main())


def test_nbd_server_start_path_ends_at_a_nul(tmp_path: Path) -> None:
    """Found by fuzz/h_qmp.py: a NUL in the socket path was an internal error (ValueError
    from bind); QEMU's C code ends the path at the NUL."""
    sock = tmp_path / "s.sock"
    out = _qmp_run(tmp_path, [
        ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": f"{sock}\0junk"}}}),
        ("nbd-server-stop", {})])
    assert out[0] == {"return": {}}, out
    assert out[1] == {"return": {}}, out


def test_drive_mirror_target_with_a_nul_is_not_an_internal_error(tmp_path: Path) -> None:
    """Found by fuzz/h_qmp.py: drive-mirror with a NUL in 'target' answered 'internal error:
    embedded null byte'. qemu-storage-daemon 7.2 keeps U+0000 from JSON as the bytes C0 80
    (its parser's modified UTF-8): it creates 't.qcow2<C0 80>x', starts the job and shows the
    name back with \\u0000; opening a missing such name is a plain 'Could not open'."""
    target = str(tmp_path / "t.qcow2") + "\0x"
    out = _qmp_run(tmp_path, [
        ("blockdev-add", {"driver": "null-co", "node-name": "n0", "size": 1 << 20}),
        ("drive-mirror", {"device": "n0", "target": target, "node-name": "t0",
                          "format": "qcow2", "sync": "full", "job-id": "j"}),
        ("query-named-block-nodes", {"flat": True}),
        ("blockdev-add", {"driver": "file", "node-name": "f", "filename": target + "y"})])
    assert out[1] == {"return": {}}, out[1]
    assert b"t.qcow2\xc0\x80x" in os.listdir(bytes(tmp_path))
    names = {n["node-name"]: n["file"] for n in out[2]["return"]}  # type: ignore[index]
    assert names["t0"] == target
    assert out[3] == {"error": {"class": "GenericError", "desc":
                      f"Could not open '{target}y': No such file or directory"}}, out[3]


def test_snapshot_sync_file_with_a_nul_is_not_an_internal_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the relative snapshot-file is created in the cwd
    out = _qmp_run(tmp_path, [
        ("blockdev-add", {"driver": "null-co", "node-name": "q0", "size": 1 << 20}),
        ("blockdev-snapshot-sync", {"node-name": "q0", "snapshot-file": "\u00e9\0\n",
                                    "snapshot-node-name": "off", "format": "qcow2"})])
    assert "internal error" not in json.dumps(out[1]), out


def test_query_qmp_schema_conforms_to_its_declared_return_type(tmp_path: Path) -> None:
    """Found by fuzz/h_qmp.py: with BLOCKMIRROR_SCHEMA_CHECKS=1 (set for every test) the
    reply failed its declared type ('return[0].ret-type' is unexpected): SchemaInfo was a
    two-member struct; now the flat union of qapi/introspect.json, as in QEMU 7.2."""
    out = _qmp_run(tmp_path, [("query-qmp-schema", {})])
    assert "return" in out[0], str(out[0])[:300]
    infos = {i["name"]: i for i in out[0]["return"]}  # type: ignore[index]
    # the reply describes its own type as QEMU's does: the union tagged by meta-type
    ret = infos[infos[infos["query-qmp-schema"]["ret-type"]]["element-type"]]
    assert ret["tag"] == "meta-type"
    assert {v["case"] for v in ret["variants"]} == {
        "builtin", "enum", "array", "object", "alternate", "command", "event"}


INT64_MAX = (1 << 63) - 1


def test_x_clock_advance_saturates_at_int64(tmp_path: Path) -> None:
    """Found by fuzz/h_qmp.py (once its daemon ran on the virtual clock): x-clock-advance
    with ns=2^63-1 moved the clock past int64, so its reply failed its declared type
    ('return.now-ns' expects an integer, QMP's int64) and came back as an internal error.
    Virtual time now stops at the largest int64, as QEMU's int64_t nanoseconds do."""
    out = _qmp_run(tmp_path, [("x-clock-advance", {"ns": INT64_MAX}),
                              ("x-clock-advance", {"ns": 5}),
                              ("x-query-clock", {})], clock="virtual")
    assert out[0] == {"return": {"now-ns": INT64_MAX, "fired": 0}}, out
    assert out[1] == {"return": {"now-ns": INT64_MAX, "fired": 0}}, out
    assert out[2]["return"]["now-ns"] == INT64_MAX, out  # type: ignore[index]


def test_virtual_timer_past_int64_fires_at_int64() -> None:
    """The same overflow through a timer: a fault rule's delay-ns of 2^63-1 put the deadline
    past int64 (x-query-clock's next-deadline-ns, then now-ns, out of their type)."""
    from blockmirror.clock import MAX_NS, VirtualClock

    async def main() -> tuple[int | None, int, bool]:
        clock = VirtualClock()
        sleeper = asyncio.ensure_future(clock.sleep_ns(INT64_MAX))
        await clock.settle()
        deadline = clock.next_deadline()
        await clock.run_to_next_timer()
        return deadline, clock.now_ns(), sleeper.done()

    assert MAX_NS == INT64_MAX
    assert asyncio.run(main()) == (INT64_MAX, INT64_MAX, True)


def test_null_co_latency_waits_on_the_virtual_clock() -> None:
    """Found by fuzz/h_qmp.py: blockdev-add of qcow2 over a null-co with latency-ns=2^64-1
    hung for real (the header read slept on asyncio's clock, not the daemon's), so the
    harness saw a command waiting 20 s with no timer to move. The latency now waits on the
    graph's clock: under a virtual clock it passes when the clock is moved.
    Input: fuzz/crashes/qmp-ef00436c80c071bf."""
    from blockmirror.clock import VirtualClock

    async def main() -> tuple[bool, bool, int]:
        clock = VirtualClock()
        graph = BlockGraph(clock=clock)
        try:
            node = await open_blockdev(graph, {"driver": "null-co", "node-name": "n",
                                               "latency-ns": 2**64 - 1, "read-zeroes": True})
            read = asyncio.ensure_future(node.read(0, 512))
            await clock.settle()
            waiting = not read.done() and clock.next_deadline() is not None
            await clock.run_to_next_timer()
            await clock.settle()
            return waiting, read.done(), len(read.result()) if read.done() else -1
        finally:
            await close_all(graph)

    async def bounded() -> tuple[bool, bool, int]:
        return await asyncio.wait_for(main(), 30)  # before the fix: a hang, now a failure

    assert asyncio.run(bounded()) == (True, True, 512)


def test_nbd_connection_closed_before_its_reader_ran_hangs_up() -> None:
    """Found by fuzz/h_nbd_client.py (with its check that closing a node hangs up every
    connection it made): a reconnect installed a connection and the node was closed before
    the connection's reader task had run a step. Cancelling a task that never started skips
    its ``finally``, so the socket was never closed (a leaked fd the server saw as a live
    client) and close() sat out wait_closed's 1 s. QEMU's nbd_client_close always shuts the
    channel down. Minimized input: fuzz/crashes/nbd_client-66e44135b448b3ec."""
    import socket

    from blockmirror.block.drivers.nbd import _Connection
    from blockmirror.nbd.handshake import ExportInfo, Negotiated, TransmissionFlag

    async def main() -> tuple[bytes, bool]:
        ours, theirs = socket.socketpair()
        theirs.setblocking(False)
        reader, writer = await asyncio.open_unix_connection(sock=ours)
        conn = _Connection(reader, writer, Negotiated(
            ExportInfo("disk", 1 << 20, TransmissionFlag.HAS_FLAGS), structured=True), b"")
        await conn.close()  # at once: the reader task has not started
        loop = asyncio.get_running_loop()
        got = b""
        while chunk := await asyncio.wait_for(loop.sock_recv(theirs, 4096), 10):
            got += chunk  # until end-of-file: the peer sees the hang-up
        theirs.close()
        return got, writer.transport.is_closing()

    got, closing = asyncio.run(main())
    assert closing
    assert got[4:8] == b"\x00\x00\x00\x02"  # the NBD_CMD_DISC request, then end-of-file


_REFTABLE_HOLE_WRITE = """
import asyncio, sys
from blockmirror.block.graph import BlockGraph
from blockmirror.block.options import close_all, open_blockdev
from blockmirror.errors import BlockMirrorError

async def main() -> str:
    graph = BlockGraph()
    node = await open_blockdev(graph, {"driver": "qcow2", "node-name": "q", "file": {
        "driver": "file", "filename": sys.argv[1]}})
    try:
        await node.write(3 << 20, b"Z" * 4096)
        return "written"
    except BlockMirrorError as e:
        return f"refused: {e}"
    finally:
        try:
            await close_all(graph)
        except BlockMirrorError:
            pass

print(asyncio.run(main()))
"""


def test_qcow2_write_with_a_refcount_table_hole_over_metadata_fails_not_spins(
        tmp_path: Path) -> None:
    """Found by fuzz/h_qcow2.py (its worker stuck for 10 minutes, then the watchdog in
    fuzz/run.py): refcount table entry 0 with only a reserved bit set (0x1) leaves the
    clusters of the header, refcount table and L1 without a refcount block, so they look free.
    A write needing a cluster took cluster 0 (the header) for a new refcount block, stored
    offset 0 in the table (= "no block") and allocated again, forever, in code that never
    yields. qemu-io's write fails with EIO and marks the image corrupt ("Preventing invalid
    write on metadata (overlaps with refcount table)"); ours now refuses the allocation the
    same way (the overlapped structure QEMU names differs: its allocator starts elsewhere).
    Minimized input: fuzz/crashes/qcow2-e9d8274a5421c91b."""
    import sys

    require_tool("qemu-img", "qemu-io")
    base = tmp_path / "b.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o",
                    "cluster_size=4096,refcount_bits=1", str(base), "4M"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 64k", str(base)],
                   check=True, capture_output=True)
    img = bytearray(base.read_bytes())
    reftable = struct.unpack_from(">Q", img, 48)[0]
    struct.pack_into(">Q", img, reftable, 1)  # entry 0: a reserved bit, no offset
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    ours.write_bytes(img)
    theirs.write_bytes(img)

    q = subprocess.run(["qemu-io", "-c", f"write -P 0x5a {3 << 20} 4096", str(theirs)],
                       capture_output=True, text=True, timeout=60)
    assert "write failed: Input/output error" in q.stdout + q.stderr, q
    assert "Preventing invalid write on metadata" in q.stderr, q.stderr

    # a subprocess: without the fix this spins without yielding (no asyncio timeout fires)
    r = subprocess.run([sys.executable, "-c", _REFTABLE_HOLE_WRITE, str(ours)],
                       capture_output=True, text=True, timeout=120)
    assert r.stdout.startswith("refused: Preventing invalid write on metadata"), r
    for path in (ours, theirs):  # both marked corrupt in the header
        info = json.loads(subprocess.run(
            ["qemu-img", "info", "--output=json", str(path)], check=True,
            capture_output=True, text=True).stdout)
        assert info["format-specific"]["data"]["corrupt"] is True, (path, info)


def test_write_threshold_past_int64_shows_as_qemu_shows_it(tmp_path: Path) -> None:
    """Found by fuzz/h_qmp.py: block-set-write-threshold takes a uint64 and (as QEMU's input
    visitor does) accepts -1 as 2^64-1; query-named-block-nodes then returned 2^64-1 for
    write_threshold, an 'int' (int64) in BlockDeviceInfo, so the reply failed its type (an
    internal error under the schema checks). qemu-storage-daemon 7.2 shows -1 (and -5 for -5):
    the uint64 read back as int64."""
    out = _qmp_run(tmp_path, [
        ("blockdev-add", {"driver": "null-co", "node-name": "n0", "size": 1 << 20}),
        ("block-set-write-threshold", {"node-name": "n0", "write-threshold": -1}),
        ("query-named-block-nodes", {}),
        ("block-set-write-threshold", {"node-name": "n0", "write-threshold": -5}),
        ("query-named-block-nodes", {}),
        ("block-set-write-threshold", {"node-name": "n0", "write-threshold": 1 << 30}),
        ("query-named-block-nodes", {})])
    assert out[1] == {"return": {}}, out
    shown = [o["return"][0]["write_threshold"] for o in (out[2], out[4], out[6])]  # type: ignore[index]
    assert shown == [-1, -5, 1 << 30], out


def test_secret_file_with_a_nul_is_not_an_internal_error(tmp_path: Path) -> None:
    """Found by fuzz/h_qmp.py: object-add secret with a NUL in 'file' answered 'internal
    error: embedded null byte'. qemu-storage-daemon 7.2 opens the name with the NUL as the
    bytes C0 80 and quotes glib: 'Unable to read é\\u0000\\n: Failed to open file
    “é\\ufffd\\ufffd\\n”: No such file or directory'; a file by that name is read."""
    d = str(tmp_path)
    out = _qmp_run(tmp_path, [
        ("object-add", {"qom-type": "secret", "id": "s0", "file": f"{d}/\u00e9\0\n"}),
        ("object-add", {"qom-type": "secret", "id": "s1", "file": f"{d}/k\0y"})])
    assert out[0] == {"error": {"class": "GenericError", "desc":
                      f"Unable to read {d}/\u00e9\0\n: Failed to open file "
                      f"\u201c{d}/\u00e9\ufffd\ufffd\n\u201d: No such file or directory"}}, out
    assert "internal error" not in json.dumps(out[1]), out
    os.close(os.open(bytes(tmp_path) + b"/k\xc0\x80y", os.O_CREAT | os.O_WRONLY))
    out = _qmp_run(tmp_path, [
        ("object-add", {"qom-type": "secret", "id": "s2", "file": f"{tmp_path}/k\0y"})])
    assert out[0] == {"return": {}}, out


def test_authz_listfile_with_a_nul_is_not_an_internal_error(tmp_path: Path) -> None:
    """Found by fuzz/h_qmp.py: object-add authz-listfile with a NUL in 'filename' answered
    'internal error: embedded null byte'. As for every file name QEMU takes from JSON, the
    NUL is the bytes C0 80 on the host (the qsd here lacks authz-listfile to compare the
    text; glib's g_file_get_contents message shows C0 80 as two U+FFFD, as in the secret
    case above)."""
    d = str(tmp_path)
    os.close(os.open(bytes(tmp_path) + b"/a\xc0\x80l", os.O_CREAT | os.O_WRONLY))
    out = _qmp_run(tmp_path, [
        ("object-add", {"qom-type": "authz-listfile", "id": "z0",
                        "filename": f"{d}/\u00e9\0\n", "refresh": True}),
        ("object-add", {"qom-type": "authz-listfile", "id": "z1",
                        "filename": f"{d}/a\0l", "refresh": True})])
    assert out[0] == {"error": {"class": "GenericError", "desc":
                      f"Failed to open file \u201c{d}/\u00e9\ufffd\ufffd\n\u201d: "
                      "No such file or directory"}}, out
    assert out[1] == {"return": {}}, out  # an empty list file, by its C0 80 name
