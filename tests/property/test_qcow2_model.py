"""Property: any sequence of writes, zero-writes and discards on a qcow2 chain (qcow2 over a
qcow2 backing) reads back like a bytearray model, here and through qemu-img, and
`qemu-img check` stays clean."""

from __future__ import annotations

import asyncio
import itertools
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "interop"))
from test_qcow2_support import apply, assert_clean, close, discard_model, open_qcow2, qemu_raw

from blockmirror.block.drivers.qcow2.create import create_qcow2
from conftest import require_tool

SIZE = 256 * 1024 + 512  # not cluster aligned on purpose
EXAMPLES = int(os.environ.get("QCOW2_PROPERTY_EXAMPLES", "25"))

op_st = st.tuples(
    st.sampled_from(["write", "zero", "zero_unmap", "discard", "flush"]),
    st.integers(0, SIZE - 1),
    st.integers(1, 70000),
)


@pytest.mark.interop
@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(
    cs=st.sampled_from([512, 4096, 65536]),
    bits=st.sampled_from([1, 8, 16, 64]),
    version=st.sampled_from(["v2", "v3"]),
    snapshot=st.booleans(),
    ops=st.lists(op_st, min_size=1, max_size=25),
)
def test_chain_matches_model(
    cs: int, bits: int, version: str, snapshot: bool, ops: list[tuple[str, int, int]]
) -> None:
    if version == "v2" or (snapshot and bits == 1):
        bits = 16  # v2 knows 16-bit refcounts only; a snapshot needs refcounts above 1
    require_tool("qemu-img")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        base, top = tmp / "base.qcow2", tmp / "top.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), str(SIZE)],
                       check=True)
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x77 0 100000", str(base)],
                       check=True, capture_output=True)
        asyncio.run(create_qcow2(str(top), SIZE, cluster_size=cs, refcount_bits=bits,
                                 backing_file="base.qcow2", backing_fmt="qcow2",
                                 version=version))
        model = bytearray(b"\x77" * 100000 + bytes(SIZE - 100000))
        if snapshot:
            # clusters shared with an internal snapshot must be copied on write
            subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x66 30000 150000",
                            str(top)], check=True, capture_output=True)
            model[30000:180000] = b"\x66" * 150000
            subprocess.run(["qemu-img", "snapshot", "-c", "s1", str(top)], check=True)
        before = bytes(model)

        async def run() -> None:
            graph, node = await open_qcow2(top)
            try:
                for i, (op, off, ln) in enumerate(ops):
                    ln = min(ln, SIZE - off)
                    if op == "discard" and version == "v2":
                        continue  # v2 over a backing file keeps discarded data (advisory)
                    await apply(node, model, op, off, ln, i, cs)
                    if i % 5 == 4:
                        assert await node.read(0, SIZE) == bytes(model)
                assert await node.read(0, SIZE) == bytes(model)
            finally:
                await close(graph)

        asyncio.run(run())
        assert_clean(top)
        assert qemu_raw(top, tmp) == bytes(model)
        if snapshot:
            subprocess.run(["qemu-img", "snapshot", "-a", "s1", str(top)], check=True)
            assert qemu_raw(top, tmp) == before
            assert_clean(top)


# --- concurrency -------------------------------------------------------------------------------

CSIZE = 96 * 1024 + 512  # a few clusters of every size tried, last one partial

cop_st = st.tuples(
    st.integers(0, 15),  # slot (modulo the number of slots)
    st.sampled_from(["write", "write", "write", "zero", "zero_unmap", "discard", "flush"]),
)


def _pieces(s0: int, s1: int, cs: int) -> list[tuple[int, int]]:
    """The parts of [s0, s1) that fall in distinct clusters."""
    out = []
    pos = s0
    while pos < s1:
        nxt = min(s1, (pos // cs + 1) * cs)
        out.append((pos, nxt))
        pos = nxt
    return out


@pytest.mark.interop
@settings(max_examples=max(5, EXAMPLES // 2), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(
    cs=st.sampled_from([512, 4096, 65536]),
    version=st.sampled_from(["v2", "v3"]),
    snapshot=st.booleans(),
    cuts=st.lists(st.integers(1, CSIZE - 1), min_size=1, max_size=7, unique=True),
    rounds=st.lists(st.lists(cop_st, min_size=2, max_size=12), min_size=1, max_size=3),
)
def test_concurrent_ops_match_some_order(
    cs: int, version: str, snapshot: bool, cuts: list[int],
    rounds: list[list[tuple[int, str]]],
) -> None:
    """Requests issued together with asyncio.gather, several per slot and slots sharing
    clusters (so two writers may need the same unallocated cluster at once): each part of a
    slot inside one cluster must end up as the result of one of the requests on that slot
    (a lost or torn write fails), and the image must stay clean for qemu-img."""
    require_tool("qemu-img")
    bounds = [0, *sorted(cuts), CSIZE]
    slots = list(itertools.pairwise(bounds))
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        img = tmp / "c.qcow2"
        asyncio.run(create_qcow2(str(img), CSIZE, cluster_size=cs, version=version))
        model = bytearray(CSIZE)
        if snapshot:
            # shared clusters take the copy-on-write path, the others are written in place
            subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x66 1000 60000", str(img)],
                           check=True, capture_output=True)
            model[1000:61000] = b"\x66" * 60000
            subprocess.run(["qemu-img", "snapshot", "-c", "s1", str(img)], check=True)
        before = bytes(model)

        async def run() -> None:
            graph, node = await open_qcow2(img)
            try:
                for r, ops in enumerate(rounds):
                    prev = bytes(model)
                    outcomes: dict[int, list[bytes]] = {}
                    reqs = []
                    for i, (si, op) in enumerate(ops):
                        s = si % len(slots)
                        s0, s1 = slots[s]
                        fill = 1 + (r * 20 + i) % 250
                        result = bytearray(prev)
                        if op == "flush":
                            reqs.append(node.flush())
                            continue
                        if op == "write":
                            reqs.append(node.write(s0, bytes([fill]) * (s1 - s0)))
                            result[s0:s1] = bytes([fill]) * (s1 - s0)
                        elif op == "discard":
                            reqs.append(node.discard(s0, s1 - s0))
                            discard_model(result, s0, s1 - s0, cs, CSIZE)
                        else:
                            unmap = op == "zero_unmap"
                            reqs.append(node.write_zeroes(s0, s1 - s0, may_unmap=unmap))
                            result[s0:s1] = bytes(s1 - s0)
                        outcomes.setdefault(s, []).append(bytes(result))
                    await asyncio.gather(*reqs)
                    got = await node.read(0, CSIZE)
                    for s, (s0, s1) in enumerate(slots):
                        cands = outcomes.get(s, [prev])
                        for p0, p1 in _pieces(s0, s1, cs):
                            assert any(got[p0:p1] == c[p0:p1] for c in cands), (r, s, p0, p1)
                    model[:] = got
            finally:
                await close(graph)

        asyncio.run(run())
        assert_clean(img)
        assert qemu_raw(img, tmp) == bytes(model)
        if snapshot:
            subprocess.run(["qemu-img", "snapshot", "-a", "s1", str(img)], check=True)
            assert qemu_raw(img, tmp) == before
            assert_clean(img)


@pytest.mark.interop
@pytest.mark.parametrize("version", ["v2", "v3"])
def test_concurrent_writers_share_one_new_cluster(tmp_path: Path, version: str) -> None:
    """64 writers to distinct sectors of the same unallocated clusters at once: only one may
    allocate each cluster, the others must wait for its L2 entry and write in place."""
    require_tool("qemu-img")
    img = tmp_path / "s.qcow2"
    size = 256 * 1024
    asyncio.run(create_qcow2(str(img), size, cluster_size=65536, version=version))
    order = [(k * 37) % 64 for k in range(64)]  # interleave the clusters

    async def run() -> bytes:
        graph, node = await open_qcow2(img)
        try:
            await asyncio.gather(*(
                node.write(k * 4096, bytes([k + 1]) * 4096) for k in order
            ))
            return await node.read(0, size)
        finally:
            await close(graph)

    got = asyncio.run(run())
    want = b"".join(bytes([k + 1]) * 4096 for k in range(64))
    assert got == want
    assert qemu_raw(img, tmp_path) == want
    assert_clean(img)
