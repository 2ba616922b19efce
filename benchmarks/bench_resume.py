"""The cost of resumable mirrors and of the verified switch-over (issue 12).

1. Activity log. ``blockmirror daemon`` mirrors a raw image (READY, background mode) to a
   raw file and exports the source over NBD (unix socket); ``qemu-io`` writes 64 KiB blocks
   through the export. The disk is a sparse ``--size-gib`` image; the default log holds
   1024 x 4 MiB extents = 4 GiB, so a 16 GiB disk is four times the log. Six writer phases
   (``phase_offsets``): first touch (every write in an extent never written before), steady
   (random writes in 256 recently written extents) and random (anywhere on the disk), each
   at queue depth 16 (``aio_write``: qemu-io's NBD client keeps up to 16 requests in flight,
   ending with ``aio_flush``) and at depth 1 (``write``, one at a time). A qemu-io that only
   connects and quits is timed in the same daemon and subtracted. Configurations: no resume
   log, the default log, and (``--small-extents N``) a log of N extents.

   Runs are interleaved (each phase in slices, the configuration order alternating per
   slice and per round) and the report gives medians and the median of the per-round
   ratios (with log / without), which cancels most of the drift of a shared machine. It
   names the filesystem that holds the sidecar (``--dir`` chooses it: tmpfs has no
   durable writes at all, so measure on a disk).

   ``--stores``: the in-image store's cost, side by side with the sidecar's. The sources
   are sparse qcow2 images (the in-image store needs one; ``qemu-img create``, 64 KiB
   clusters, so a first touch also allocates a cluster, in every configuration), and the
   configurations are: no resume store, the sidecar (``x-resume-log``, next to the images),
   and the in-image store (``x-resume-store: "image"``), both with the default log, run
   interleaved in the same way. The report adds the in-image / sidecar ratios.
2. Verify pass: seconds per GiB of the x-verify pass over an in-sync pair (READY to the
   pass's end), in-process, on files in the page cache: with no writer, and with a
   concurrent writer (random 64 KiB writes through the job's source at ``--verify-qd``).

    .venv/bin/python benchmarks/bench_resume.py [--size-gib 16] [--rounds 5] [--dir /var/tmp]
    .venv/bin/python benchmarks/bench_resume.py --stores --skip-verify [...]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from blockmirror.qmp.testing import DaemonProcess, SyncQMP, daemon_argv

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
BLOCK = 64 * KiB
EXTENT = 4 * MiB
#: slices of each phase, run alternately by every configuration
SLICES = 4
#: the configuration of ``--stores`` that keeps the log inside the qcow2 source
IN_IMAGE = "in-image store (1024 x 4 MiB)"


def make_sparse(path: Path, size: int, data_mib: int = 0) -> None:
    """A sparse image of ``size`` bytes; its first ``data_mib`` MiB hold a pattern."""
    chunk = bytes((i * 37 + 11) & 0xFF or 1 for i in range(MiB))
    with path.open("wb") as f:
        for _ in range(data_mib):
            f.write(chunk)
        f.truncate(size)


#: events read while waiting for a command's return, per connection
_events: dict[int, list[dict[str, Any]]] = {}


def _read(q: SyncQMP) -> dict[str, Any]:
    msg: dict[str, Any] = json.loads(q.read_message())
    if "event" in msg:
        _events.setdefault(id(q), []).append(msg)
    return msg


def cmd(q: SyncQMP, name: str, args: dict[str, Any] | None = None) -> Any:
    req: dict[str, Any] = {"execute": name}
    if args is not None:
        req["arguments"] = args
    q.send(json.dumps(req).encode() + b"\n")
    while True:
        msg = _read(q)
        if "return" in msg:
            return msg["return"]
        if "error" in msg:
            raise RuntimeError(f"{name}: {msg['error']}")


def wait_event(q: SyncQMP, name: str) -> dict[str, Any]:
    """The oldest unconsumed event ``name`` (read before or after this call)."""
    seen = _events.setdefault(id(q), [])
    while True:
        for ev in seen:
            if ev["event"] == name:
                seen.remove(ev)
                return ev
        _read(q)


def qemu_io(uri: str, commands: list[str]) -> float:
    script = "\n".join(commands) + "\nquit\n"
    t0 = time.perf_counter()
    p = subprocess.run(["qemu-io", "-f", "raw", uri], input=script.encode(),
                       capture_output=True)
    dt = time.perf_counter() - t0
    out = p.stdout.decode()
    if p.returncode != 0 or "error" in out.lower() or "failed" in out.lower():
        raise RuntimeError(out[-2000:] + p.stderr.decode())
    return dt


def random_offsets(n: int, size: int, rng: random.Random) -> list[int]:
    return [rng.randrange(size // BLOCK) * BLOCK for _ in range(n)]


def in_extents(extents: list[int], rng: random.Random) -> list[int]:
    """One 64 KiB-aligned offset at random in each of ``extents``, in that order."""
    return [e * EXTENT + rng.randrange(EXTENT // BLOCK) * BLOCK for e in extents]


def phase_offsets(size: int, first: int, writes: int, rng: random.Random
                  ) -> list[tuple[str, list[int], bool]]:
    """The phases of a round: (name, offsets, queue depth 16?), run in this order.

    * ``first16``/``first1``: one write per extent never written before (distinct extents,
      random order): every write needs a new log entry, and once the log is full, room
      (evictions, each a checkpoint);
    * ``steady16``/``steady1``: random writes in the 256 extents written last (hot);
    * ``random16``/``random1``: random writes anywhere on the disk (on a disk larger than
      the log, most of them land in a cold extent).
    """
    exts = list(range(size // EXTENT))
    rng.shuffle(exts)
    n1 = max(first // 4, 1)
    f16, f1 = exts[:first], exts[first:first + n1]
    recent = (f16 + f1)[-256:]
    return [("first16", in_extents(f16, rng), True),
            ("first1", in_extents(f1, rng), False),
            ("steady16", in_extents([rng.choice(recent) for _ in range(writes)], rng), True),
            ("steady1", in_extents([rng.choice(recent) for _ in range(writes // 4)], rng),
             False),
            ("random16", random_offsets(writes, size, rng), True),
            ("random1", random_offsets(writes // 4, size, rng), False)]


PHASES = ("first16", "first1", "steady16", "steady1", "random16", "random1")


def wait_ready(q: SyncQMP, jobs: list[str]) -> None:
    """Until every job is READY; a job that ended instead (an error) stops the benchmark
    with its event, not with a read timeout."""
    while True:
        infos = {j["device"]: j for j in cmd(q, "query-block-jobs")}
        for j in jobs:
            if j not in infos:
                ended = [e for e in _events.get(id(q), [])
                         if e["event"] == "BLOCK_JOB_COMPLETED" and e["data"]["device"] == j]
                raise RuntimeError(f"job {j} ended before READY: {ended}")
        if all(infos[j]["ready"] for j in jobs):
            return
        time.sleep(0.05)  # polling a peer process, not synchronising our own code


def wait_in_sync(q: SyncQMP, jobs: list[str]) -> None:
    """Until every named job has copied everything the last writes made dirty."""
    while True:
        infos = {j["device"]: j for j in cmd(q, "query-block-jobs")}
        if all(infos[j]["offset"] == infos[j]["len"] for j in jobs):
            return
        time.sleep(0.01)  # polling a peer process, not synchronising our own code


def make_source(path: Path, size: int, fmt: str) -> None:
    """An empty sparse source: raw, or qcow2 (64 KiB clusters, as ``qemu-img`` makes it)."""
    if fmt == "raw":
        make_sparse(path, size)
        return
    p = subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(path), str(size)],
                       capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(p.stderr)


def paired_rounds(tmp: Path, size: int, first: int, writes: int,
                  configs: list[tuple[str, dict[str, Any]]], rounds: int,
                  src_fmt: str = "raw") -> dict[str, list[dict[str, float]]]:
    """Every configuration mirrors its own disk in one daemon; each phase runs on every disk
    back to back (the order alternates per round), the others idle and in sync meanwhile.
    The sources are ``src_fmt`` images, the targets raw."""
    sock, nbd = str(tmp / "qmp.sock"), str(tmp / "nbd.sock")
    runs: dict[str, list[dict[str, float]]] = {name: [] for name, _ in configs}
    with DaemonProcess(daemon_argv("ours", sock), sock) as d:
        q = d.connect(limit_s=600)
        cmd(q, "qmp_capabilities")
        cmd(q, "nbd-server-start", {"addr": {"type": "unix", "data": {"path": nbd}}})
        for r in range(rounds):
            rng = random.Random(r)
            uris: dict[str, str] = {}
            for i, (name, extra) in enumerate(configs):
                src, tgt = tmp / f"src{i}.{src_fmt}", tmp / f"tgt{i}.raw"
                make_source(src, size, src_fmt)
                make_sparse(tgt, size)
                for node, path, fmt in ((f"s{i}", src, src_fmt), (f"t{i}", tgt, "raw")):
                    # discard=unmap: the copy's zero writes punch holes, so the sparse
                    # 16 GiB target stays sparse (with "ignore" it allocates all of it)
                    cmd(q, "blockdev-add", {"driver": fmt, "node-name": node,
                                            "discard": "unmap",
                                            "file": {"driver": "file", "filename": str(path)}})
                args = {"job-id": f"m{i}", "device": f"s{i}", "target": f"t{i}",
                        "sync": "full", **extra}
                cmd(q, "blockdev-mirror", args)
                cmd(q, "block-export-add", {"type": "nbd", "id": f"e{i}", "node-name": f"s{i}",
                                            "name": f"s{i}", "writable": True})
                uris[name] = f"nbd+unix:///s{i}?socket={nbd}"
            jobs = [f"m{i}" for i in range(len(configs))]
            wait_ready(q, jobs)
            wait_in_sync(q, jobs)
            startup = min(qemu_io(uris[name], []) for name, _ in configs for _ in range(2))
            res: dict[str, dict[str, float]] = {name: {} for name, _ in configs}
            # each phase in SLICES slices, the configurations alternating slice by slice
            # (ABBA...), so that the load of a shared machine drifts the same for all
            spent: dict[tuple[str, str], float] = {}
            k = 0
            phases = phase_offsets(size, first, writes, rng)
            for phase, offs, deep in phases:
                # aio_write: qemu-io's NBD client keeps up to 16 requests in flight
                fmt = ("aio_write" if deep else "write") + " -q -P 7 {} " + str(BLOCK)
                for part in range(SLICES):
                    piece = offs[part::SLICES]
                    order = configs if (k + r) % 2 == 0 else configs[::-1]
                    k += 1
                    for name, _ in order:
                        script = [fmt.format(o) for o in piece] + (["aio_flush"] if deep
                                                                   else [])
                        dt = max(qemu_io(uris[name], script) - startup, 1e-6)
                        spent[name, phase] = spent.get((name, phase), 0.0) + dt
                        wait_in_sync(q, jobs)
            for name, _ in configs:
                for phase, offs, _deep in phases:
                    res[name][phase] = len(offs) * BLOCK / MiB / spent[name, phase]
            for i, (name, _) in enumerate(configs):
                runs[name].append(res[name])
                print(f"  round {r} {name}: " + "  ".join(
                    f"{key} {v:.2f}" for key, v in res[name].items()), file=sys.stderr)
                cmd(q, "block-export-del", {"id": f"e{i}"})
                cmd(q, "block-job-cancel", {"device": f"m{i}"})
                wait_event(q, "BLOCK_JOB_COMPLETED")
            for i in range(len(configs)):
                while True:  # the export lets go of its node once its last client left
                    try:
                        cmd(q, "blockdev-del", {"node-name": f"s{i}"})
                        break
                    except RuntimeError:
                        time.sleep(0.05)
                cmd(q, "blockdev-del", {"node-name": f"t{i}"})
        q.close()
    return runs


async def verify_run(tmp: Path, size: int, writer_qd: int) -> float:
    """Seconds per GiB of the first verification pass; ``writer_qd`` > 0 adds a writer."""
    from blockmirror.cli.mirror import execute
    from blockmirror.daemon import Daemon
    from blockmirror.jobs.mirror import MirrorJob

    src, tgt = tmp / "vsrc.raw", tmp / "vtgt.raw"
    make_sparse(src, size, size // MiB)
    make_sparse(tgt, size)
    d = Daemon()
    for name, path in (("src", src), ("tgt", tgt)):
        await execute(d, "blockdev-add", {"driver": "raw", "node-name": name,
                                          "file": {"driver": "file", "filename": str(path)}})
    await execute(d, "blockdev-mirror", {"job-id": "v", "device": "src", "target": "tgt",
                                         "sync": "full", "x-verify": True})
    job = d.jobs.find("v")
    assert isinstance(job, MirrorJob) and job.verifier is not None
    ready = asyncio.Event()
    unsubscribe = d.events.subscribe(
        lambda ev: ready.set() if ev["event"] == "BLOCK_JOB_READY" else None)
    if not job.is_ready:
        await ready.wait()
    unsubscribe()
    t0 = time.perf_counter()
    job.verifier.start()  # already started at READY: this only returns the same task
    assert job.verifier.task is not None
    stop = asyncio.Event()
    rng = random.Random(size)
    source = job.source
    data = b"\x5a" * BLOCK

    async def writer() -> None:
        while not stop.is_set():
            await source.write(rng.randrange(size // BLOCK) * BLOCK, data)

    writers = [asyncio.ensure_future(writer()) for _ in range(writer_qd)]
    await job.verifier.task
    dt = time.perf_counter() - t0
    stop.set()
    await asyncio.gather(*writers)
    assert job.verifier.unrepaired == 0 and job.progress.verified > 0
    if not writer_qd:
        assert job.verifier.mismatches == 0 and job.progress.verified >= size
    await job.user_cancel(True)
    await job.wait_finished()
    await d.shutdown()
    return dt / (size / GiB)


def hot_path_us(tmp: Path, n: int = 200_000) -> float:
    """Microseconds of CPU per guest write to a hot extent: what the log adds in steady state
    (``ActivityLog.begin`` + ``end``, no I/O), in-process and free of the machine's noise."""
    from blockmirror.jobs.mirror import activity_log as al

    geo = al.Geometry(16 * GiB, 64 * KiB, EXTENT, 1024)
    path = tmp / "micro.resume"
    al.create(str(path), geo, {}, bytes(geo.bitmap_bytes), {"closed": False})

    async def run() -> float:
        async def no_ckpt(_victims: list[int]) -> None:
            pass

        log = al.ActivityLog(str(path), geo, log_seq=1, ckpt_seq=1, on_evict=no_ckpt)
        offs = [(i * 7919 % 256) * EXTENT + (i % 64) * BLOCK for i in range(4096)]
        for o in offs[:256]:
            await log.begin(o, BLOCK)
            log.end(o, BLOCK)
        records = log.records
        t0 = time.perf_counter()
        for i in range(n):
            o = offs[i % 4096]
            await log.begin(o, BLOCK)
            log.end(o, BLOCK)
        dt = time.perf_counter() - t0
        assert log.records == records  # hot: no record written
        await log.close()
        return dt / n * 1e6

    return asyncio.run(run())


def durable_write_ms(tmp: Path, n: int = 200) -> tuple[float, float]:
    """Median and 90th percentile (ms) of one log record's durable write (8 KiB,
    ``pwritev2(RWF_DSYNC)``) on the sidecar's filesystem, from the calling thread."""
    path = tmp / "dsync.probe"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.pwrite(fd, bytes(2 * 8192), 0)
        os.fsync(fd)
        rec, times = b"\x5a" * 8192, []
        for i in range(n):
            t0 = time.perf_counter()
            os.pwritev(fd, [rec], 8192 * (i % 2), os.RWF_DSYNC)
            times.append((time.perf_counter() - t0) * 1000)
    finally:
        os.close(fd)
        path.unlink()
    times.sort()
    return statistics.median(times), times[n * 9 // 10]


def fs_type(path: Path) -> str:
    """The filesystem holding ``path`` (where the sidecar lives), as ``stat -f`` names it."""
    p = subprocess.run(["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True)
    return p.stdout.strip() or "?"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gib", type=int, default=4)
    ap.add_argument("--first", type=int, default=1024,
                    help="first-touch writes at depth 16 (a quarter of it at depth 1)")
    ap.add_argument("--writes", type=int, default=4000,
                    help="steady and random writes at depth 16 (a quarter at depth 1)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dir", default=None,
                    help="where images and sidecars live (default: the system's temp dir)")
    ap.add_argument("--log-dir", default=None,
                    help="where the sidecars live, if not with the images (e.g. /dev/shm: "
                         "a log without durable writes, to separate their cost)")
    ap.add_argument("--small-extents", type=int, default=0,
                    help="also measure a log of this many extents (evictions); 0: no")
    ap.add_argument("--verify-mib", type=int, default=1024)
    ap.add_argument("--verify-qd", type=int, default=4)
    ap.add_argument("--stores", action="store_true",
                    help="qcow2 sources; compare no store, the sidecar and the in-image store")
    ap.add_argument("--skip-log", action="store_true")
    ap.add_argument("--skip-verify", action="store_true")
    opts = ap.parse_args()
    size = opts.size_gib * GiB
    first = min(opts.first, size // EXTENT * 4 // 5)
    with tempfile.TemporaryDirectory(prefix="bench-resume-", dir=opts.dir) as t:
        tmp = Path(t)
        logs = Path(opts.log_dir) if opts.log_dir else tmp
        src_fmt = "qcow2" if opts.stores else "raw"
        if not opts.skip_log:
            configs: list[tuple[str, dict[str, Any]]] = [
                ("no resume log", {}),
                ("resume log (1024 x 4 MiB)", {"x-resume-log": str(logs / f"a{os.getpid()}.resume"),
                                               "x-resume-restart": True}),
            ]
            if opts.stores:
                configs.append((IN_IMAGE, {"x-resume-store": "image",
                                           "x-resume-restart": True}))
            if opts.small_extents:
                configs.append((f"resume log ({opts.small_extents} x 4 MiB, evictions)",
                                {"x-resume-log": str(logs / f"b{os.getpid()}.resume"),
                                 "x-resume-restart": True,
                                 "x-resume-extents": opts.small_extents}))
            dsync = durable_write_ms(logs)
            try:
                runs = paired_rounds(tmp, size, first, opts.writes, configs, opts.rounds,
                                     src_fmt)
            finally:
                for _name, extra in configs[1:]:  # a cancelled mirror leaves its sidecar
                    if "x-resume-log" in extra:
                        Path(extra["x-resume-log"]).unlink(missing_ok=True)
            dsync2 = durable_write_ms(logs)
            base = runs["no resume log"]
            print(f"64 KiB writes through NBD, {opts.size_gib} GiB sparse {src_fmt} disk, mirror "
                  f"READY, images on {fs_type(tmp)}, sidecar on {fs_type(logs)}, "
                  f"{opts.rounds} interleaved "
                  "rounds; MiB/s (median) and, in brackets, the median of the per-round "
                  "ratios with log / without:")
            for name, rs in runs.items():
                line = [f"  {name:34s}"]
                for key in PHASES:
                    med = statistics.median(r[key] for r in rs)
                    ratio = statistics.median(
                        r[key] / b[key] for r, b in zip(rs, base, strict=True))
                    line.append(f"{key} {med:6.1f} ({ratio:6.1%})")
                print("  ".join(line))
            if opts.stores:
                side = runs["resume log (1024 x 4 MiB)"]
                line = [f"  {'in-image / sidecar':34s}"]
                for key in PHASES:
                    ratio = statistics.median(
                        r[key] / b[key] for r, b in zip(runs[IN_IMAGE], side, strict=True))
                    line.append(f"{key}        ({ratio:6.1%})")
                print("  ".join(line))
            nolog = {key: statistics.median(r[key] for r in base) for key in PHASES}
            print(f"  one log record's durable write on {fs_type(logs)}: median "
                  f"{dsync[0]:.3f} / {dsync2[0]:.3f} ms, p90 {dsync[1]:.3f} / {dsync2[1]:.3f} ms "
                  "(before / after the rounds); a write at depth 1 without the log: "
                  f"{BLOCK / MiB / nolog['first1'] * 1000:.2f} ms (first1), "
                  f"{BLOCK / MiB / nolog['steady1'] * 1000:.2f} ms (steady1)")
            print(f"  the log's CPU per write to a hot extent (steady state, no I/O): "
                  f"{hot_path_us(tmp):.2f} us; a write at depth 16 without the log: "
                  f"{BLOCK / MiB / nolog['steady16'] * 1e6:.0f} us of wall time")
        if not opts.skip_verify:
            vsize = opts.verify_mib * MiB
            idle, busy = [], []
            for _ in range(opts.rounds):
                idle.append(asyncio.run(verify_run(tmp, vsize, 0)))
                busy.append(asyncio.run(verify_run(tmp, vsize, opts.verify_qd)))
            print(f"verify pass over {opts.verify_mib} MiB in sync (page cache), median of "
                  f"{opts.rounds}: {statistics.median(idle):.2f} s/GiB without a writer, "
                  f"{statistics.median(busy):.2f} s/GiB with {opts.verify_qd} concurrent "
                  "64 KiB writers")
    return 0


if __name__ == "__main__":
    sys.exit(main())
