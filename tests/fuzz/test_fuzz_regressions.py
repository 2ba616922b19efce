"""Regression tests for what the fuzzers found (see fuzz/known.py and fuzz/README.md).

Bugs in files this helper does not own are strict xfails naming the bug: they fail loudly
(XPASS) once fixed, so the marker must then go.
"""

from __future__ import annotations

import asyncio
import json
import struct
import subprocess
from pathlib import Path

import pytest

from blockmirror.block.graph import BlockGraph
from blockmirror.block.options import close_all, open_blockdev
from conftest import require_tool


@pytest.mark.xfail(strict=True, reason="BUG (block/options.py, qcow2 backing name): a NUL "
                   "byte in the qcow2 backing file name raises ValueError from realpath; "
                   "QEMU ends the name at the NUL (found by fuzz/h_qcow2.py)")
def test_qcow2_backing_name_with_nul_ends_at_the_nul(tmp_path: Path) -> None:
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

    async def main() -> str | None:
        graph = BlockGraph()
        try:
            node = await open_blockdev(graph, {"driver": "qcow2", "node-name": "t", "file": {
                "driver": "file", "filename": str(top)}})
            return node.backing.node.filename if node.backing else None
        finally:
            await close_all(graph)

    assert asyncio.run(main()) == str(base)


def _qmp_run(tmp_path: Path, cmds: list[tuple[str, dict[str, object]]]) -> list[object]:
    from blockmirror.qmp.testing import qmp_daemon

    async def main() -> list[object]:
        out: list[object] = []
        async with qmp_daemon(tmp_path) as td:
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


@pytest.mark.xfail(strict=True, reason="BUG (qmp/commands/mirror.py or block/create.py): "
                   "drive-mirror with a NUL in 'target' answers 'internal error: embedded "
                   "null byte'; QEMU's C code ends the file name at the NUL (found by "
                   "fuzz/h_qmp.py)")
def test_drive_mirror_target_with_a_nul_is_not_an_internal_error(tmp_path: Path) -> None:
    out = _qmp_run(tmp_path, [
        ("blockdev-add", {"driver": "null-co", "node-name": "n0", "size": 1 << 20}),
        ("drive-mirror", {"device": "n0", "target": str(tmp_path / "t.qcow2") + "\0x",
                          "format": "qcow2", "sync": "full", "job-id": "j"})])
    assert "internal error" not in json.dumps(out[1]), out


@pytest.mark.xfail(strict=True, reason="BUG (qmp/commands/block_graph.py or block/create.py): "
                   "blockdev-snapshot-sync with a NUL in 'snapshot-file' answers 'internal "
                   "error: embedded null byte'; QEMU's C code ends the file name at the NUL "
                   "(found by fuzz/h_qmp.py)")
def test_snapshot_sync_file_with_a_nul_is_not_an_internal_error(tmp_path: Path) -> None:
    out = _qmp_run(tmp_path, [
        ("blockdev-add", {"driver": "null-co", "node-name": "q0", "size": 1 << 20}),
        ("blockdev-snapshot-sync", {"node-name": "q0", "snapshot-file": "\u00e9\0\n",
                                    "snapshot-node-name": "off", "format": "qcow2"})])
    assert "internal error" not in json.dumps(out[1]), out


@pytest.mark.xfail(strict=True, reason="BUG (qapi schema of query-qmp-schema): with "
                   "BLOCKMIRROR_SCHEMA_CHECKS=1 (set for every test) query-qmp-schema's return "
                   "value fails its declared type: 'return[0].ret-type' is unexpected "
                   "(found by fuzz/h_qmp.py; present on main)")
def test_query_qmp_schema_conforms_to_its_declared_return_type(tmp_path: Path) -> None:
    out = _qmp_run(tmp_path, [("query-qmp-schema", {})])
    assert "return" in out[0], str(out[0])[:300]
