"""Memory probe for a soak's daemon (``python -m tests.soak.run --probe DIR``).

Loaded by the daemon's interpreter through PYTHONPATH (``sitecustomize``), only when
BM_PROBE_DIR is set and the process is the blockmirror daemon. Every BM_PROBE_PERIOD seconds
(default 30) a thread writes ``DIR/dump-N.json``: RSS, smaps RSS by kind of mapping, live
objects by class (after a collection), ``gc.garbage``, asyncio tasks, threads, glibc's
mallinfo2, and ``DIR/minfo-N.xml`` (``malloc_info``: one entry per arena). BM_PROBE_TM=<frames>
also starts tracemalloc and saves a snapshot per dump (``snap-N.tm``; compare them with
``tracemalloc.Snapshot.load(...).compare_to(...)``); BM_PROBE_TRIM=1 calls ``malloc_trim(0)``
after each dump and records the RSS after it.
"""

from __future__ import annotations

import collections
import ctypes
import gc
import json
import os
import threading
import time
import tracemalloc


def _rss_mib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) // 1024
    return 0


def _smaps_mib() -> dict[str, int]:
    kinds: collections.Counter[str] = collections.Counter()
    kind = "?"
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if "-" in fields[0] and not fields[0].endswith(":"):
                path = fields[5] if len(fields) > 5 else ""
                kind = ("heap (brk)" if path == "[heap]" else path if path.startswith("[")
                        else "file" if path else "anonymous")
            elif fields[0] == "Rss:":
                kinds[kind] += int(fields[1])
    return {k: v // 1024 for k, v in kinds.items() if v >= 1024}


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def _probe(out: str, period: float) -> None:
    import asyncio.tasks

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    libc.fopen.restype = ctypes.c_void_p
    n = 0
    while True:
        time.sleep(period)
        n += 1
        gc.collect()
        by_class = collections.Counter(f"{type(o).__module__}.{type(o).__qualname__}"
                                       for o in gc.get_objects())
        mi = libc.mallinfo2()
        dump = {"n": n, "time": time.time(), "rss_mib": _rss_mib(), "smaps_mib": _smaps_mib(),
                "gc_garbage": len(gc.garbage), "threads": threading.active_count(),
                "asyncio_tasks": len(asyncio.tasks._all_tasks),  # type: ignore[attr-defined]
                "main_arena_mib": mi.arena >> 20, "malloc_in_use_mib": mi.uordblks >> 20,
                "malloc_free_mib": mi.fordblks >> 20, "malloc_mmap_mib": mi.hblkhd >> 20,
                "blockmirror": {k: v for k, v in by_class.items() if "blockmirror" in k},
                "top": by_class.most_common(40)}
        if tracemalloc.is_tracing():
            tracemalloc.take_snapshot().dump(os.path.join(out, f"snap-{n}.tm"))
            dump["traced_mib"] = tracemalloc.get_traced_memory()[0] / 2**20
        fp = libc.fopen(os.path.join(out, f"minfo-{n}.xml").encode(), b"w")
        libc.malloc_info(0, ctypes.c_void_p(fp))
        libc.fclose(ctypes.c_void_p(fp))
        if os.environ.get("BM_PROBE_TRIM"):
            libc.malloc_trim(0)
            dump["rss_after_trim_mib"] = _rss_mib()
        with open(os.path.join(out, f"dump-{n}.json"), "w") as f:
            json.dump(dump, f)


def _start() -> None:
    out = os.environ.get("BM_PROBE_DIR")
    if not out:
        return
    with open("/proc/self/cmdline", "rb") as f:
        if b"blockmirror.cli.main" not in f.read():
            return
    if os.environ.get("BM_PROBE_TM"):
        tracemalloc.start(int(os.environ["BM_PROBE_TM"]))
    period = float(os.environ.get("BM_PROBE_PERIOD", "30"))
    threading.Thread(target=_probe, args=(out, period), daemon=True,
                     name="memprobe").start()


_start()
