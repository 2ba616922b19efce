"""`blockmirror demo` (what `make demo` runs): it must prove the target identical to the
source as the guest saw it, after a visible live progress display, in under 30 seconds.

Run without a terminal, the display falls back to one line per update; the test checks that
those lines show the copy moving (copying, then ready, then done) and that every proof
(in-process byte comparison, export following the pivot, qemu-img compare/check) passed.
"""

from __future__ import annotations

import asyncio
import io
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import require_tool

pytestmark = pytest.mark.interop


def test_demo_proves_the_target_identical() -> None:
    require_tool("qemu-img")
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "blockmirror.cli.main", "demo"],
                          capture_output=True, text=True, timeout=60, check=False)
    elapsed = time.monotonic() - t0
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert elapsed < 30, elapsed
    # the live display: progress lines in each phase, with growing copied bytes
    copying = re.findall(r"^\[copying\] copied ([\d.]+ \w+)", out, re.M)
    assert len(copying) >= 3, out
    assert re.search(r"^\[ready\] .* ETA in sync$", out, re.M), out
    assert re.search(r"^\[done\] ", out, re.M), out
    assert "result:      done: the target is in sync and is now the active image (pivoted)" \
        in out
    # the guest wrote in every phase, and the export followed the target
    m = re.search(r"guest writes: (\d+) while copying, (\d+) while ready, (\d+) while "
                  r"after-pivot", out)
    assert m is not None, out
    assert all(int(n) > 0 for n in m.groups()), m.group(0)
    assert "the NBD export now use node" in out
    for proof in ("the disk read through NBD equals the guest's model",
                  "mirror.qcow2 on disk equals the guest's model",
                  "qemu-img compare guest-model.raw mirror.qcow2: Images are identical.",
                  "qemu-img check mirror.qcow2: No errors were found on the image."):
        assert f"[ok] {proof}" in out, proof
    assert re.search(r"^   \[ok\] none of the \d+ writes after the pivot reached the old source",
                     out, re.M), out
    assert "FAIL" not in out
    assert out.rstrip().endswith("PROVEN: the target is identical to the disk the guest saw.")


def _prove_case(tmp_path: Path, *, flip_model: bool, leak: bool) -> tuple[int, str]:
    """Run the demo's proof step on hand-made images; returns (status, printed text)."""
    from blockmirror.block.create import img_create
    from blockmirror.block.graph import BlockGraph
    from blockmirror.block.options import close_all, open_image
    from blockmirror.cli.demo import Guest, prove
    from blockmirror.cli.progress import DisplayMode, ProgressDisplay

    target, overlay = tmp_path / "mirror.qcow2", tmp_path / "overlay.qcow2"
    size = 1 << 20
    post_pivot = (4096, b"\x5a" * 4096)

    async def main() -> tuple[int, str]:
        graph = BlockGraph()
        try:
            for path in (target, overlay):
                await img_create(str(path), "qcow2", size, quiet=True)
            t = await open_image(graph, str(target), "qcow2", read_only=False)
            await t.write(*post_pivot)
            if leak:
                o = await open_image(graph, str(overlay), "qcow2", read_only=False)
                await o.write(*post_pivot)
        finally:
            await close_all(graph)
        model = bytearray(size)
        model[4096:8192] = post_pivot[1]
        if flip_model:
            model[size - 1] ^= 1
        guest = Guest(node=None, model=model, rng=random.Random(0))  # type: ignore[arg-type]
        guest.after_pivot.append(post_pivot)
        out = io.StringIO()
        display = ProgressDisplay(DisplayMode.PLAIN, stream=out)
        rc = await prove(str(tmp_path), str(overlay), str(target), guest, bytes(model),
                         display)
        return rc, out.getvalue()

    return asyncio.run(main())


def test_demo_proof_can_fail(tmp_path: Path) -> None:
    require_tool("qemu-img")
    rc, text = _prove_case(tmp_path, flip_model=False, leak=False)
    assert rc == 0 and "PROVEN" in text and "FAIL" not in text, text
    rc, text = _prove_case(tmp_path, flip_model=True, leak=False)
    assert rc == 2, text
    assert "[FAIL] mirror.qcow2 on disk equals the guest's model: differs at 1044480" in text
    assert "[FAIL] qemu-img compare" in text and "FAILED" in text
    rc, text = _prove_case(tmp_path, flip_model=False, leak=True)
    assert rc == 2, text
    assert "[FAIL] none of the 1 writes after the pivot reached the old source" in text
