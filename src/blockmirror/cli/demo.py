"""`blockmirror demo`: the built-in example of a live mirror with a guest writing all along.

CLI layer; everything runs in one asyncio loop with no external tool needed. It builds a small
qcow2 chain (base + overlay, seeded data) in a temporary directory, opens the overlay behind
the ``drive0`` device in an in-process Daemon, exports it over NBD, and starts a simulated
guest: an NBD client (our nbd block driver, in its own graph, like a separate VM) that writes
random patterns and keeps a byte-exact model of its disk. The mirror is started with QMP
``drive-mirror`` (the same path as `blockmirror mirror`), shown live, completed at READY
(pivot), and the guest keeps writing through the export, which now follows the target. Then
the proofs: the target read back equals the guest's model, the pivot moved the export, the
source never saw post-pivot writes, and ``qemu-img compare``/``check`` agree when installed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field

from blockmirror.block import threadio
from blockmirror.block.create import img_create
from blockmirror.block.graph import BlockGraph
from blockmirror.block.node import BlockNode
from blockmirror.block.options import close_all, open_image
from blockmirror.cli.mirror import (
    EXIT_JOB_FAILED,
    EXIT_OK,
    CliDaemon,
    JobWatcher,
    execute,
    open_source,
    start_export,
)
from blockmirror.cli.progress import Phase, ProgressDisplay, choose_mode
from blockmirror.errors import BlockMirrorError

MiB = 1 << 20
KiB = 1 << 10
DISK_SIZE = 16 * MiB
#: rate limit of the demo mirror: slow enough to watch the copy, fast enough to end in seconds
DEMO_SPEED = 3 * MiB
#: seconds the guest keeps writing while READY, and after the pivot
READY_HOLD = 1.5
AFTER_PIVOT = 1.0
SEED = 20261125


@dataclass
class Guest:
    """A simulated guest: random writes through NBD, and a model of what it wrote."""

    node: BlockNode
    model: bytearray
    rng: random.Random
    phase: str = "copying"
    writes: dict[str, int] = field(default_factory=dict)
    #: (offset, data) of writes issued after the pivot
    after_pivot: list[tuple[int, bytes]] = field(default_factory=list)
    seq: int = 0

    async def run(self, stop: asyncio.Event) -> None:
        size = len(self.model)
        while not stop.is_set():
            self.seq += 1
            length = self.rng.choice((4, 8, 16, 32)) * KiB
            offset = self.rng.randrange(0, (size - length) // (4 * KiB) + 1) * 4 * KiB
            phase = self.phase
            if self.seq % 7 == 0 and phase != "after-pivot":
                await self.node.write_zeroes(offset, length)
                self.model[offset:offset + length] = bytes(length)
            else:
                # every write is distinguishable: its sequence number fills the block
                stamp = f"guest write {self.seq:08d} {phase:<12}|".encode()
                data = (stamp * (length // len(stamp) + 1))[:length]
                await self.node.write(offset, data)
                self.model[offset:offset + length] = data
                if phase == "after-pivot":
                    self.after_pivot.append((offset, data))
            self.writes[phase] = self.writes.get(phase, 0) + 1
            await asyncio.sleep(self.rng.uniform(0.02, 0.05))


def _seed_writes(rng: random.Random, count: int, tag: int) -> list[tuple[int, bytes]]:
    out = []
    for _ in range(count):
        length = rng.choice((64, 128, 256)) * KiB
        offset = rng.randrange(0, (DISK_SIZE - length) // (64 * KiB) + 1) * 64 * KiB
        out.append((offset, bytes([tag ^ (offset >> 16) & 0xFF]) * length))
    return out


async def build_chain(tmp: str, say: ProgressDisplay) -> tuple[str, bytearray]:
    """base.qcow2 <- overlay.qcow2 with seeded data; returns the overlay and its contents."""
    rng = random.Random(SEED)
    base = os.path.join(tmp, "base.qcow2")
    overlay = os.path.join(tmp, "overlay.qcow2")
    expected = bytearray(DISK_SIZE)
    await img_create(base, "qcow2", DISK_SIZE, printer=say.message)
    await img_create(overlay, "qcow2", None, backing_file=base, backing_fmt="qcow2",
                     printer=say.message)
    for path, tag, count in ((base, 0xA5, 24), (overlay, 0x3C, 12)):
        graph = BlockGraph()
        try:
            node = await open_image(graph, path, "qcow2", read_only=False, backing=False)
            for offset, data in _seed_writes(rng, count, tag):
                await node.write(offset, data)
                expected[offset:offset + len(data)] = data
        finally:
            await close_all(graph)
    return overlay, expected


def _diff_offset(a: bytes | bytearray, b: bytes | bytearray) -> int | None:
    if a == b:
        return None
    for i in range(0, min(len(a), len(b)), 4096):
        if a[i:i + 4096] != b[i:i + 4096]:
            return i
    return min(len(a), len(b))


async def _read_image(path: str, fmt: str) -> bytes:
    graph = BlockGraph()
    try:
        node = await open_image(graph, path, fmt, read_only=True)
        return await node.read(0, node.length())
    finally:
        await close_all(graph)


async def _qemu_img(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        "qemu-img", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode(errors="replace").strip()


def _write_file(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


async def demo(tmp: str, display: ProgressDisplay) -> int:
    say = display.message
    started = time.monotonic()
    say(f"== 1. a qcow2 chain (base + overlay, {DISK_SIZE // MiB} MiB) in {tmp}")
    overlay, expected = await build_chain(tmp, display)
    daemon = CliDaemon(say)
    guest_graph = BlockGraph()
    stop = asyncio.Event()
    guest_task: asyncio.Task[None] | None = None
    try:
        device = await open_source(daemon, overlay, "qcow2", say)
        sock = os.path.join(tmp, "nbd.sock")
        uri = await start_export(daemon, {"type": "unix", "path": sock}, "disk")
        say(f"== 2. the overlay is device {device.name}, exported writable at {uri}")
        gnode = await open_image(guest_graph, uri, None, read_only=False)
        seen = bytearray(await gnode.read(0, gnode.length()))
        if seen != expected:
            say(f"FAILED: the guest does not read the seeded chain (offset "
                f"{_diff_offset(seen, expected)})")
            return EXIT_JOB_FAILED
        guest = Guest(gnode, seen, random.Random(SEED + 1))
        guest_task = asyncio.get_running_loop().create_task(guest.run(stop), name="guest")
        say("== 3. a guest writes through NBD; drive-mirror to mirror.qcow2 (sync=full, "
            f"speed={DEMO_SPEED // MiB}M)")
        target_path = os.path.join(tmp, "mirror.qcow2")
        await execute(daemon, "drive-mirror", {"device": device.name, "target": target_path,
                                               "sync": "full", "speed": DEMO_SPEED})
        job = daemon.jobs.find(device.name)
        assert job is not None
        watcher = JobWatcher(daemon, job, display, device=device, wait=True, interval=0.1,
                             started=started, disk_size=DISK_SIZE)
        loop = asyncio.get_running_loop()

        def on_ready() -> None:
            guest.phase = "ready"
            say(f"READY: source and target in sync; the guest writes on for {READY_HOLD} s, "
                "then block-job-complete")
            loop.call_later(READY_HOLD, watcher.request_complete)

        watcher.on_ready = on_ready
        watcher.ready_hint = False
        outcome = await watcher.run()
        guest.phase = "after-pivot"
        display.finish(outcome.snapshot, outcome.text)
        if outcome.phase != Phase.DONE or not outcome.pivoted:
            say(f"FAILED: {outcome.text}")
            return EXIT_JOB_FAILED
        target = watcher.target
        assert target is not None and daemon.nbd is not None
        export_node = daemon.nbd.exports["export0"].blk.node
        say(f"== 4. pivoted: {device.name} and the NBD export now use node '{target.name}' "
            f"({target.filename}); the guest keeps writing for {AFTER_PIVOT:.0f} s")
        if export_node is not target:
            say("FAILED: the export did not follow the target")
            return EXIT_JOB_FAILED
        await asyncio.sleep(AFTER_PIVOT)
        stop.set()
        await guest_task
        say("   guest writes: " + ", ".join(f"{n} while {p}" for p, n in guest.writes.items()))
        through_nbd = await gnode.read(0, DISK_SIZE)
        await close_all(guest_graph)
    finally:
        stop.set()
        if guest_task is not None and not guest_task.done():
            guest_task.cancel()
            await asyncio.gather(guest_task, return_exceptions=True)
        await close_all(guest_graph)
        await daemon.shutdown()
    return await prove(tmp, overlay, target_path, guest, through_nbd, display)


async def prove(tmp: str, overlay: str, target_path: str, guest: Guest, through_nbd: bytes,
                display: ProgressDisplay) -> int:
    """Check the mirror against the guest's model; print each proof."""
    msg = display.message
    msg("== 5. proofs")
    model = bytes(guest.model)
    ok = True
    bad = _diff_offset(through_nbd, model)
    msg(f"   [{'ok' if bad is None else 'FAIL'}] the disk read through NBD equals the guest's "
        f"model ({len(model)} bytes)" + ("" if bad is None else f": differs at {bad}"))
    ok &= bad is None
    on_disk = await _read_image(target_path, "qcow2")
    bad = _diff_offset(on_disk, model)
    msg(f"   [{'ok' if bad is None else 'FAIL'}] mirror.qcow2 on disk equals the guest's model"
        + ("" if bad is None else f": differs at {bad}"))
    ok &= bad is None
    source = await _read_image(overlay, "qcow2")
    leaked = sum(1 for off, data in guest.after_pivot if source[off:off + len(data)] == data)
    msg(f"   [{'ok' if leaked == 0 else 'FAIL'}] none of the {len(guest.after_pivot)} writes "
        f"after the pivot reached the old source (overlay.qcow2)")
    ok &= leaked == 0 and len(guest.after_pivot) > 0
    if shutil.which("qemu-img"):
        model_path = os.path.join(tmp, "guest-model.raw")
        await threadio.run(_write_file, model_path, model)
        rc, text = await _qemu_img("compare", "-f", "raw", "-F", "qcow2", model_path, target_path)
        msg(f"   [{'ok' if rc == 0 else 'FAIL'}] qemu-img compare guest-model.raw "
            f"mirror.qcow2: {text}")
        ok &= rc == 0
        rc, text = await _qemu_img("check", "-f", "qcow2", target_path)
        first = text.splitlines()[0] if text else ""
        msg(f"   [{'ok' if rc == 0 else 'FAIL'}] qemu-img check mirror.qcow2: {first}")
        ok &= rc == 0
    else:
        msg("   [skip] qemu-img is not installed: no cross-check with QEMU's tools")
    if ok:
        msg("PROVEN: the target is identical to the disk the guest saw.")
        return EXIT_OK
    msg("FAILED: the target differs from the guest's disk.")
    return EXIT_JOB_FAILED


def run(name: str, argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog=f"blockmirror {name}",
        description="Run the built-in example: a qcow2 chain, a guest writing over NBD, a "
                    "live mirror with progress, the pivot, and the proof that the target "
                    "equals what the guest saw. Needs no external tool; uses qemu-img for a "
                    "cross-check when installed. Exit status: 0 proven, 2 failed, "
                    "130 interrupted.")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary directory (its path is printed)")
    try:
        opts = parser.parse_args(argv)
    except SystemExit as e:
        return 0 if e.code == 0 else 1
    tmp = tempfile.mkdtemp(prefix="blockmirror-demo-")
    display = ProgressDisplay(choose_mode(json_lines=False, quiet=False),
                              title="demo: live mirror of overlay.qcow2 -> mirror.qcow2")
    try:
        return asyncio.run(demo(tmp, display))
    except KeyboardInterrupt:
        display.stop()
        return 130
    except BlockMirrorError as e:
        display.stop()
        print(f"blockmirror demo: {e}", file=sys.stderr)
        return EXIT_JOB_FAILED
    finally:
        if opts.keep:
            print(f"(kept {tmp})")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


__all__ = ["Guest", "build_chain", "demo", "prove", "run"]
