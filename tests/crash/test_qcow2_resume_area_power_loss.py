"""Power loss while the qcow2 driver makes or removes a mirror's in-image resume area.

Over the recording protocol driver of ``test_qcow2_power_loss.py`` (only flushed writes are
durable; a random subset of the others survives), the power fails at every flush of
``ResumeArea.install`` (over an existing area, as a resumed mirror does) and of
``ResumeArea.remove``. After each cut:

- ``qemu-img check`` finds no corruption (leaks allowed: an allocation interrupted);
- whenever our autoclear bit survived, the header extension and the bitmap describe an area
  that holds exactly what one of the two installs wrote: the bit never points at garbage;
- our driver reopens the image read-write and ``qemu-img check`` stays free of corruption.
"""

from __future__ import annotations

import asyncio
import random
import struct
import subprocess
from pathlib import Path

import pytest
from test_qcow2_power_loss import _DRIVERS, _IMAGES, PowerLossFile

from blockmirror.block.drivers.qcow2.driver import Qcow2Driver
from blockmirror.block.drivers.qcow2.resume_area import AUTOCLEAR_RESUME
from blockmirror.block.graph import BlockGraph
from blockmirror.block.options import check_options, close_all, open_blockdev
from conftest import require_tool

pytestmark = pytest.mark.interop

SIZE = 8 << 20


class PowerCut(Exception):
    pass


def _sh(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120)


async def _scenario(key: str, cut_at: int, rng: random.Random, keep: float,
                    areas: list[bytes]) -> tuple[int, bytes | None]:
    """Install ``areas[0]``, install ``areas[1]`` over it, remove; the power fails at flush
    number ``cut_at`` (never, if past the end). Returns (flushes seen, image at the cut)."""
    graph = BlockGraph()
    opts = check_options({"driver": "qcow2", "node-name": "q", "file": {
        "driver": "file", "node-name": "pl", "filename": key}})
    opts["file"] = {**opts["file"], "driver": PowerLossFile.format_name}
    node = await open_blockdev(graph, opts, validated=True)
    proto = _DRIVERS[key]
    seen = 0
    image: bytes | None = None
    real_flush = proto.flush

    async def flush() -> None:
        nonlocal seen, image
        if seen == cut_at:
            image = proto.power_loss(rng, keep)
            raise PowerCut
        seen += 1
        await real_flush()

    proto.flush = flush  # type: ignore[method-assign]
    drv = node.driver
    assert isinstance(drv, Qcow2Driver)
    owner = object()
    try:
        for i, data in enumerate(areas):
            await drv.resume_area.install(data, 65536, 1000 + i, owner)
        drv.resume_area.detach(owner)
        await drv.resume_area.remove()
    except PowerCut:
        return seen, image
    proto.flush = real_flush  # type: ignore[method-assign]
    await close_all(graph)
    return seen, None


async def _reopen(path: str) -> bytes | None:
    graph = BlockGraph()
    node = await open_blockdev(graph, {"driver": "qcow2", "node-name": "r", "file": {
        "driver": "file", "filename": path}})
    drv = node.driver
    assert isinstance(drv, Qcow2Driver)
    area = await drv.resume_area.read() if drv.resume_area.current is not None else None
    await close_all(graph)
    return area


def test_power_loss_during_install_and_remove(tmp_path: Path) -> None:
    require_tool("qemu-img")
    base = tmp_path / "base.qcow2"
    assert _sh("qemu-img", "create", "-q", "-f", "qcow2", str(base), str(SIZE)).returncode == 0
    rng = random.Random(12)
    areas = [rng.randbytes(3 * 65536 + 100), rng.randbytes(2 * 65536 + 7)]
    _IMAGES["area"] = base.read_bytes()
    total, _ = asyncio.run(_scenario("area", 10**9, rng, 0.0, areas))
    assert total >= 6, total
    outcomes: dict[str, int] = {}
    for cut in range(total):
        for keep in (0.0, 0.5, 1.0):
            _IMAGES["area"] = base.read_bytes()
            _, image = asyncio.run(_scenario("area", cut, rng, keep, areas))
            assert image is not None
            crashed = tmp_path / f"cut{cut}-{keep}.qcow2"
            crashed.write_bytes(image)
            r = _sh("qemu-img", "check", str(crashed))
            assert r.returncode in (0, 3), (cut, keep, r.stdout + r.stderr)
            bit = struct.unpack_from(">Q", image, 88)[0] & AUTOCLEAR_RESUME
            found = asyncio.run(_reopen(str(crashed)))
            if bit:
                assert found in areas, (cut, keep, "the bit survived without its area")
            outcome = "none" if found is None else f"area{areas.index(found)}"
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
            r = _sh("qemu-img", "check", str(crashed))
            assert r.returncode in (0, 3), (cut, keep, r.stdout + r.stderr)
    print(f"{total} flushes, outcomes {outcomes}")
    # every state was reached by some cut: the test cuts inside each step
    assert set(outcomes) == {"none", "area0", "area1"}, outcomes
