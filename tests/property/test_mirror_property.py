"""Acceptance 1: after a mirror completes, the target reads exactly like the source.

Random source chains (a top over an optional backing, on the in-memory format driver with
data, zero and unallocated clusters), sync modes, granularities, buffer sizes and copy modes,
with random concurrent writes, zero-writes and discards before READY, after READY and during
completion. For sync=top the target gets the source's backing, for sync=none the source itself (the
drive-mirror backing fix-up at completion); full mode starts from a target full of garbage.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blockmirror.block.node import BlockBackend, Perm
from blockmirror.daemon import Daemon
from blockmirror.jobs.mirror import BackingMode, MirrorParams, start_mirror
from mirror_scripts.memory import make_device, make_node

PHASES = ("before", "after", "completion")

op_st = st.tuples(
    st.sampled_from(PHASES),
    st.booleans(),  # through the device above the filter, or a parent added on the source
    st.sampled_from(("write", "write", "zero", "discard")),
    st.integers(0, 1 << 20),  # offset, reduced modulo the size
    st.integers(1, 40_000),  # length
    st.integers(1, 255),  # pattern byte
)

scenario_st = st.fixed_dictionaries({
    "size": st.sampled_from([64 << 10, 200 << 10, (256 << 10) + 1000, 512 << 10]),
    "cluster": st.sampled_from([4096, 65536]),
    "backing": st.booleans(),
    "sync": st.sampled_from(("full", "top", "none")),
    "granularity": st.sampled_from([512, 4096, 65536]),
    "buf_mult": st.sampled_from([0, 1, 3, 16]),
    "copy_mode": st.sampled_from(("background", "write-blocking")),
    "src_unmap": st.booleans(),
    "tgt_unmap": st.booleans(),
    "seed": st.integers(0, 2**32 - 1),
    "ops": st.lists(op_st, max_size=12),
})


async def _apply(node: Any, op: tuple[str, bool, str, int, int, int], size: int) -> None:
    _, _, kind, off, length, byte = op
    off %= size
    length = min(length, size - off)
    if kind == "write":
        await node.write(off, bytes([byte]) * length)
    elif kind == "zero":
        await node.write_zeroes(off, length, may_unmap=byte % 2 == 0)
    else:
        await node.discard(off, length)


async def _chain(g: Any, prefix: str, sc: dict[str, Any], rng: random.Random) -> Any:
    """The source chain; built twice from the same seed (the real one and a shadow)."""
    size, cluster = sc["size"], sc["cluster"]
    base = None
    if sc["backing"]:
        base = make_node(g, f"{prefix}base", size, cluster=cluster)
        for _ in range(3):
            off = rng.randrange(size)
            await base.write(off, rng.randbytes(min(rng.randrange(1, 30000), size - off)))
    src = make_node(g, f"{prefix}src", size, cluster=cluster, backing=base,
                    discard_unmap=sc["src_unmap"])
    for _ in range(4):
        off = rng.randrange(size)
        n = min(rng.randrange(1, 50000), size - off)
        if rng.random() < 0.25:
            await src.write_zeroes(off, n)
        else:
            await src.write(off, rng.randbytes(n))
    return base, src


async def _run(sc: dict[str, Any]) -> None:
    d = Daemon()
    g = d.graph
    size, cluster = sc["size"], sc["cluster"]
    base, src = await _chain(g, "", sc, random.Random(sc["seed"]))
    # the shadow gets every guest operation too, and is never mirrored: the expected content
    _, shadow = await _chain(g, "shadow-", sc, random.Random(sc["seed"]))
    # the guest writes through a device, whose node the pivot replaces
    dev = make_device(g, src)
    sync = sc["sync"]
    tgt_backing = base if sync == "top" else None
    # sync=none: like a drive-mirror target, the header names a backing file that is not
    # opened during the job (the cow_bitmap path when granularity < cluster size)
    tgt = make_node(g, "tgt", size, cluster=cluster, backing=tgt_backing,
                    backing_name="src" if sync == "none" else None,
                    discard_unmap=sc["tgt_unmap"])
    if sync == "full":
        await tgt.write(0, random.Random(sc["seed"] + 1).randbytes(size))  # must not survive
    params = MirrorParams(sync=sync, granularity=sc["granularity"],
                          buf_size=sc["buf_mult"] * sc["granularity"],
                          copy_mode=sc["copy_mode"],
                          # sync=none: the job gives the target the source as backing
                          backing_mode=BackingMode.SOURCE if sync == "none" else BackingMode.LEAVE)
    events: list[dict[str, Any]] = []
    d.events.subscribe(events.append)
    job = start_mirror(d.jobs, "j", src, tgt, params, base=base if sync == "top" else None)
    # a parent that attaches to the source node after the job started (e.g. a new export):
    # its writes bypass the filter but must be tracked, drained and follow the pivot too
    late = BlockBackend("", "export 'late'", Perm.CONSISTENT_READ | Perm.WRITE, Perm.all())
    g.attach(late, src, "root", late.perm, late.shared)
    g.add_backend(late)
    by_phase = {p: [o for o in sc["ops"] if o[0] == p] for p in PHASES}
    # a discard leaves content undefined, and after the pivot it lands on a different chain
    by_phase["completion"] = [(p, v, "zero" if k == "discard" else k, o, n, b)
                              for p, v, k, o, n, b in by_phase["completion"]]

    async def writer(ops: list[Any]) -> None:
        for op in ops:
            node = dev.node if op[1] else late.node
            assert node is not None
            await _apply(node, op, size)
            await _apply(shadow, op, size)
            await asyncio.sleep(0)

    w = asyncio.ensure_future(writer(by_phase["before"]))
    for _ in range(5000):
        if job.status.value == "ready":
            break
        await asyncio.sleep(0.001)
    assert job.status.value == "ready", job.status
    await w
    await writer(by_phase["after"])
    w = asyncio.ensure_future(writer(by_phase["completion"]))
    await job.complete()
    await asyncio.wait_for(job.wait_finished(), 10)
    await w
    names = [e["event"] for e in events]
    assert "BLOCK_JOB_COMPLETED" in names, names
    done = next(e for e in events if e["event"] == "BLOCK_JOB_COMPLETED")["data"]
    assert "error" not in done and done["offset"] == done["len"]
    assert dev.node is tgt and late.node is tgt  # the pivot moved both parents
    assert await tgt.read(0, size) == await shadow.read(0, size)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sc=scenario_st)
def test_target_equals_source_at_completion(sc: dict[str, Any]) -> None:
    asyncio.run(_run(sc))
