"""block-commit and block-stream through an in-process daemon's QMP: file names are C strings
(a NUL ends them, as QEMU's code sees them), never an internal error (the QMP fuzzer sends
such names to every command)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from blockmirror.block.create import img_create
from blockmirror.qmp.testing import qmp_daemon

MiB = 1 << 20


def _run(tmp_path: Path, cmds: list[tuple[str, dict[str, Any]]]) -> list[Any]:
    async def main() -> list[Any]:
        below = None
        for name in ("base", "top"):
            await img_create(str(tmp_path / f"{name}.qcow2"), "qcow2", MiB, quiet=True,
                             backing_file=below, backing_fmt="qcow2" if below else None)
            below = str(tmp_path / f"{name}.qcow2")
        out: list[Any] = []
        async with qmp_daemon(tmp_path) as td:
            raw = await td.raw()
            await raw.cmd("qmp_capabilities")
            await raw.cmd("blockdev-add", {"driver": "qcow2", "node-name": "top", "file": {
                "driver": "file", "filename": str(tmp_path / "top.qcow2")}})
            for name, args in cmds:
                out.append(await raw.cmd(name, args))
            await raw.close()
        return out

    return asyncio.run(main())


def test_file_names_end_at_a_nul(tmp_path: Path) -> None:
    out = _run(tmp_path, [
        ("block-commit", {"device": "top", "top": "x\0y", "job-id": "c"}),
        ("block-commit", {"device": "top", "base": "nosuch\0.qcow2", "job-id": "c"}),
        ("block-stream", {"device": "top", "base": "nosuch\0.qcow2", "job-id": "s"}),
        ("block-stream", {"device": "top", "backing-file": "\0", "job-id": "s"}),
    ])
    text = json.dumps(out)
    assert "internal error" not in text, text
    assert out[0]["error"]["desc"] == "Top image file x not found"
    assert out[1]["error"]["desc"] == "Can't find 'nosuch' in the backing chain"
    assert out[2]["error"]["desc"] == "Can't find 'nosuch' in the backing chain"
    assert out[3]["error"]["desc"] == "backing file specified, but streaming the entire chain"
