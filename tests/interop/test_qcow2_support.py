"""Helpers shared by the qcow2 tests (no tests here): open images through the real option
parser, apply operations to a node and to a bytearray model, run qemu-img."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path
from typing import Any

from blockmirror.block.drivers import load_all
from blockmirror.block.graph import BlockGraph
from blockmirror.block.node import BlockNode
from blockmirror.block.options import close_all, open_image

load_all()


async def open_qcow2(
    path: str | Path, *, read_only: bool = False, **options: Any
) -> tuple[BlockGraph, BlockNode]:
    graph = BlockGraph()
    opts: dict[str, Any] = {"discard": "unmap"}
    opts.update(options)
    node = await open_image(graph, str(path), "qcow2", read_only=read_only, options=opts)
    return graph, node


async def close(graph: BlockGraph) -> None:
    await close_all(graph)


def qemu_check(path: str | Path) -> tuple[int, str]:
    r = subprocess.run(
        ["qemu-img", "check", "-f", "qcow2", str(path)], capture_output=True, text=True
    )
    return r.returncode, r.stdout + r.stderr


def assert_clean(path: str | Path, allow_leaks: bool = False) -> None:
    rc, out = qemu_check(path)
    if allow_leaks:
        assert rc in (0, 3), out
        assert "ERROR" not in out and "corrupt" not in out.lower(), out
    else:
        assert rc == 0, out
        assert "No errors were found" in out and "leaked" not in out, out


def qemu_raw(path: str | Path, tmp: Path) -> bytes:
    out = tmp / "converted.raw"
    subprocess.run(
        ["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(path), str(out)], check=True
    )
    return out.read_bytes()


def qemu_img(*args: str) -> str:
    r = subprocess.run(["qemu-img", *args], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout


def sha(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def discard_model(model: bytearray, off: int, ln: int, cs: int, size: int) -> None:
    """qcow2 discards whole clusters only (the image's last partial cluster counts as whole);
    on v3 or without a backing file they read back as zeroes."""
    a = -(-off // cs) * cs
    b = (off + ln) // cs * cs
    if off + ln == size:
        b = size
    if a < b:
        model[a:b] = bytes(b - a)


async def apply(
    node: BlockNode, model: bytearray, op: str, off: int, ln: int, seed: int, cs: int
) -> None:
    size = len(model)
    if op == "write":
        data = bytes((seed + i * 7) & 0xFF for i in range(min(ln, 251))) * (ln // 251 + 1)
        data = data[:ln]
        await node.write(off, data)
        model[off : off + ln] = data
    elif op == "zero":
        await node.write_zeroes(off, ln, may_unmap=False)
        model[off : off + ln] = bytes(ln)
    elif op == "zero_unmap":
        await node.write_zeroes(off, ln, may_unmap=True)
        model[off : off + ln] = bytes(ln)
    elif op == "discard":
        await node.discard(off, ln)
        discard_model(model, off, ln, cs, size)
    elif op == "flush":
        await node.flush()
    else:
        raise AssertionError(op)
