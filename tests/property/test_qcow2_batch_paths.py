"""Property: the qcow2 paths a mirror batches through (``copy_extents`` from another qcow2
image, which plans and links a whole batch of clusters at once through ``write_via``, and
``zero_extents`` over many spans in one L2 pass) leave the bytes of the model whatever the
target held before: data clusters we own, zero clusters with and without a host cluster,
unallocated ones, clusters shared with an internal snapshot, free space with holes in it.
``qemu-img check`` stays clean and the snapshot keeps its content. The data/hole walk a
mirror plans with (``data_runs``) says, run for run, what ``map`` says of the same ranges."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "interop"))
from test_qcow2_support import apply, assert_clean, close, open_qcow2, qemu_raw

from blockmirror.block.copy import copy_extents, zero_extents
from blockmirror.block.drivers.qcow2.create import create_qcow2
from blockmirror.block.drivers.qcow2.layout import COMPRESSED, NORMAL
from conftest import require_tool

CLUSTERS = 40
EXAMPLES = int(os.environ.get("QCOW2_PROPERTY_EXAMPLES", "25"))

#: what the target goes through first: (op, first cluster, clusters, byte offset inside)
pre_st = st.tuples(
    st.sampled_from(["write", "write", "zero", "zero_unmap", "discard", "flush"]),
    st.integers(0, CLUSTERS - 1),
    st.integers(1, 6),
    st.sampled_from([0, 0, 512, 1000]),
)
#: a batch: its kind and (gap before, clusters) pairs, laid out in increasing order
batch_st = st.tuples(
    st.sampled_from(["copy", "copy", "zero", "zero_unmap"]),
    st.lists(st.tuples(st.integers(0, 3), st.integers(1, 4)), min_size=1, max_size=10),
)


async def _mapped_runs(node: Any, offset: int, length: int) -> list[tuple[bool, int]]:
    """Data/hole runs of a range from the cluster map's segments (NORMAL, COMPRESSED:
    data), neighbours of one kind merged."""
    runs: list[tuple[bool, int]] = []
    for kind, _pos, n, _value in await node.driver.cluster_map.map(offset, length):
        is_data = kind in (NORMAL, COMPRESSED)
        if runs and runs[-1][0] == is_data:
            runs[-1] = (is_data, runs[-1][1] + n)
        else:
            runs.append((is_data, n))
    return runs


def _extents(pairs: list[tuple[int, int]], cs: int) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    pos = 0
    for gap, n in pairs:
        pos += gap
        n = min(n, CLUSTERS - pos)
        if n <= 0:
            break
        out.append((pos * cs, n * cs))
        pos += n
    return out


@pytest.mark.interop
@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(
    cs=st.sampled_from([4096, 65536]),
    snapshot=st.booleans(),
    pre=st.lists(pre_st, max_size=14),
    batches=st.lists(batch_st, min_size=1, max_size=5),
    probes=st.lists(st.tuples(st.integers(0, 10**9), st.integers(1, 10**9)), max_size=6),
)
def test_batched_copies_and_zeroes_match_model(
    cs: int, snapshot: bool, pre: list[tuple[str, int, int, int]],
    batches: list[tuple[str, list[tuple[int, int]]]], probes: list[tuple[int, int]],
) -> None:
    require_tool("qemu-img")
    size = CLUSTERS * cs
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        src_path, dst_path = tmp / "src.qcow2", tmp / "dst.qcow2"
        asyncio.run(create_qcow2(str(src_path), size, cluster_size=cs))
        asyncio.run(create_qcow2(str(dst_path), size, cluster_size=cs))
        source = bytes((c * 37 + i) & 0xFF for c in range(CLUSTERS) for i in range(cs))
        model = bytearray(size)

        async def prepare() -> None:
            graph, src = await open_qcow2(src_path)
            try:
                await src.write(0, source)
            finally:
                await close(graph)
            graph, dst = await open_qcow2(dst_path)
            try:
                for i, (op, first, n, inside) in enumerate(pre):
                    off = first * cs + inside
                    await apply(dst, model, op, off, min(n * cs, size - off), i, cs)
                # the discarded clusters become free space before the batches
                await dst.flush()
            finally:
                await close(graph)

        asyncio.run(prepare())
        if snapshot:
            subprocess.run(["qemu-img", "snapshot", "-c", "s1", str(dst_path)], check=True)
        before = bytes(model)
        taken: list[tuple[str, bool]] = []

        async def run() -> None:
            sgraph, src = await open_qcow2(src_path, read_only=True)
            dgraph, dst = await open_qcow2(dst_path)
            real_via, real_zero = dst.driver.write_via, dst.driver.zero_extents

            async def via(extents: Any, fill: Any) -> bool:
                taken.append(("copy", await real_via(extents, fill)))
                return taken[-1][1]

            async def zero(extents: Any, flags: Any) -> bool:
                taken.append(("zero", await real_zero(extents, flags)))
                return taken[-1][1]

            dst.driver.write_via = via  # type: ignore[method-assign]
            dst.driver.zero_extents = zero  # type: ignore[method-assign]
            try:
                for kind, pairs in batches:
                    extents = _extents(pairs, cs)
                    if not extents:
                        continue
                    if kind == "copy":
                        await copy_extents(src, dst, extents)
                        for o, n in extents:
                            model[o : o + n] = source[o : o + n]
                    else:
                        await zero_extents(dst, extents, may_unmap=kind == "zero_unmap")
                        for o, n in extents:
                            model[o : o + n] = bytes(n)
                assert await dst.read(0, size) == bytes(model)
                ranges = [(0, size)]
                for a, b in probes:
                    start = a % size
                    ranges.append((start, 1 + b % (size - start)))
                # the cluster map's walk itself: the driver's ``data_runs`` declines on an
                # image that looks preallocated (a small one full of data, here)
                for o, n in ranges:
                    walked = await dst.driver.cluster_map.data_runs(o, n)
                    assert walked == await _mapped_runs(dst, o, n), (o, n)
            finally:
                await close(dgraph)
                await close(sgraph)

        asyncio.run(run())
        # every batch went through the batched driver paths under test
        assert all(done for _kind, done in taken), taken
        assert_clean(dst_path)
        assert qemu_raw(dst_path, tmp) == bytes(model)
        if snapshot:
            subprocess.run(["qemu-img", "snapshot", "-a", "s1", str(dst_path)], check=True)
            assert qemu_raw(dst_path, tmp) == before
            assert_clean(dst_path)
