"""Clusters taken ahead at a writethrough guest's flushes (qcow2/tail_reserve.py): fewer
syncs per allocating write, the same image layout, and nothing left behind.

Each case writes the same random 64 KiB FUA writes into an empty qcow2 image through our
driver, once with reserves and once with them turned off (``reserve_clusters = 0``), and
compares: the number of ``fdatasync`` calls, the host layout (``qemu-img map``), the guest
data, and ``qemu-img check`` (clean after close; while open with a reserve outstanding,
leaks and nothing else, as after a crash). The idle release is kept out of every test but
its own (``IDLE_S`` an hour), so what each looks at cannot change under it on a slow machine.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
from pathlib import Path
from typing import Any

import pytest
from test_qcow2_support import assert_clean, close, open_qcow2, qemu_raw

from blockmirror.block.drivers.qcow2 import tail_reserve
from blockmirror.block.drivers.qcow2.driver import Qcow2Driver
from blockmirror.block.drivers.qcow2.refcount_allocator import RefcountAllocator
from blockmirror.block.node import BlockNode
from blockmirror.block.reopen import set_read_only
from conftest import require_tool

pytestmark = pytest.mark.interop

KiB, MiB = 1 << 10, 1 << 20
WRITES = 64


def _create(path: Path) -> None:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "64M"], check=True)


def _driver(node: BlockNode) -> Qcow2Driver:
    drv = node.driver
    assert isinstance(drv, Qcow2Driver)
    return drv


def _map(path: Path) -> list[dict[str, Any]]:
    out = subprocess.run(["qemu-img", "map", "--output=json", str(path)], capture_output=True,
                         text=True, check=True).stdout
    return list(json.loads(out))


def _check_live(path: Path) -> tuple[int, str]:
    r = subprocess.run(["qemu-img", "check", "-U", str(path)], capture_output=True, text=True)
    return r.returncode, r.stdout + r.stderr


def _offsets() -> list[int]:
    rng = random.Random(11)
    return [rng.randrange(1024) * 64 * KiB for _ in range(WRITES)]


async def _write_all(path: Path, reserve: bool, probe: Any = None) -> None:
    graph, node = await open_qcow2(path)
    try:
        drv = _driver(node)
        if not reserve:
            drv.allocator.reserve_clusters = 0
        for k, off in enumerate(_offsets()):
            await node.write(off, bytes([k + 1]) * (64 * KiB), fua=True)
        if probe is not None:
            await probe(drv)
    finally:
        await close(graph)


@pytest.fixture
def count_syncs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls = [0]
    real = os.fdatasync

    def counting(fd: int) -> None:
        calls[0] += 1
        real(fd)

    monkeypatch.setattr(os, "fdatasync", counting)  # threadio calls os.fdatasync
    return calls


def test_reserve_halves_the_syncs_and_keeps_the_layout(
        tmp_path: Path, count_syncs: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    require_tool("qemu-img")
    monkeypatch.setattr(tail_reserve, "IDLE_S", 3600.0)  # no idle release between writes
    runs = {}
    for reserve in (False, True):
        path = tmp_path / f"reserve-{reserve}.qcow2"
        _create(path)
        before = count_syncs[0]
        asyncio.run(_write_all(path, reserve))
        runs[reserve] = (count_syncs[0] - before, path)
    (plain, plain_path), (ahead, ahead_path) = runs[False], runs[True]
    # without: two syncs per allocating write (refcount, then L2); with: about one
    assert plain >= 2 * WRITES - 4, plain
    assert ahead <= plain * 2 // 3, (ahead, plain)
    for path in (plain_path, ahead_path):
        assert_clean(path)
    assert _map(plain_path) == _map(ahead_path)
    assert qemu_raw(plain_path, tmp_path) == qemu_raw(ahead_path, tmp_path)
    assert plain_path.stat().st_size == ahead_path.stat().st_size


@pytest.fixture
def kept_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A new image whose reserves are never given back for being idle (IDLE_S an hour):
    only what the test does can release them."""
    require_tool("qemu-img")
    monkeypatch.setattr(tail_reserve, "IDLE_S", 3600.0)
    path = tmp_path / "img.qcow2"
    _create(path)
    return path


def test_an_open_reserve_shows_only_as_leaks(kept_image: Path) -> None:
    path = kept_image
    seen: dict[str, Any] = {}

    async def probe(drv: Qcow2Driver) -> None:
        seen["reserved"] = drv.allocator.reserve_end - drv.allocator.reserve_start
        seen["open"] = await asyncio.to_thread(_check_live, path)

    asyncio.run(_write_all(path, True, probe))
    assert seen["reserved"] > 0
    rc, out = seen["open"]
    assert rc == 3 and "ERROR" not in out and "leaked clusters were found" in out, out
    assert_clean(path)  # given back at close


def test_an_idle_reserve_is_given_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    require_tool("qemu-img")
    monkeypatch.setattr(tail_reserve, "IDLE_S", 0.01)
    taken = [0]
    real = RefcountAllocator.reserve_tail

    async def counting(self: RefcountAllocator) -> None:
        await real(self)
        taken[0] += self.has_reserve

    monkeypatch.setattr(RefcountAllocator, "reserve_tail", counting)
    path = tmp_path / "img.qcow2"
    _create(path)
    seen: dict[str, Any] = {}

    async def probe(drv: Qcow2Driver) -> None:
        # wait (on the condition, with a deadline) for the release to be done and written
        for _ in range(2000):
            if not drv.allocator.has_reserve and drv.reserve._task is None:
                break
            await asyncio.sleep(0.005)
        seen["released"] = not drv.allocator.has_reserve
        seen["idle"] = await asyncio.to_thread(_check_live, path)

    asyncio.run(_write_all(path, True, probe))
    assert taken[0] > 0
    assert seen["released"]
    assert seen["idle"][0] == 0, seen["idle"][1]


def test_a_reopen_to_read_only_gives_the_reserve_back(kept_image: Path) -> None:
    path = kept_image  # only the reopen gives the reserve back
    seen: dict[str, int] = {}

    async def probe(drv: Qcow2Driver) -> None:
        seen["before"] = drv.allocator.reserve_end - drv.allocator.reserve_start
        await set_read_only(drv.node.graph, drv.node, True)
        seen["after"] = drv.allocator.reserve_end - drv.allocator.reserve_start

    asyncio.run(_write_all(path, True, probe))
    assert seen["before"] > 0 and seen["after"] == 0, seen
    assert_clean(path)  # closed read-only: nothing could have been given back at close
