"""Run the fuzz harnesses: ``python -m fuzz.run [options] [harness ...]``.

Engines: ``atheris`` (coverage-guided libFuzzer, when the atheris package is installed;
the blockmirror package is instrumented) and ``random`` (a seeded, deterministic driver:
random bytes, dictionary splices and mutations of the corpus; used by CI). Each harness runs
in its own process, sandboxed (cwd in a scratch directory, RLIMIT_FSIZE 64 MiB, 4 GiB of
address space). ``--inputs N`` stops after N inputs, ``--seconds T`` after T seconds
(whichever comes first). Crashing inputs are saved in fuzz/crashes/<harness>-<sha1>; every
saved file is replayed by the CI test. A summary line per harness is printed and appended
to fuzz/results.log.

``--jobs N`` runs N worker processes per harness (the inputs split between them): worker 0
draws from the same seeded stream as a single process (so ``--jobs 1`` and CI are
unchanged) and replays the saved corpus; worker k > 0 draws from the disjoint stream
``"<seed>:<harness>:<k>"``. The summary adds the workers up. SIGTERM/SIGINT end a run early
with an exact summary (the inputs that ran, never more). ``--progress S`` prints a PROGRESS
line every S seconds. The slowest inputs (milliseconds, sha1 prefix) are in the summary.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
HARNESSES = ["keyval", "qmp", "nbd_server", "nbd_client", "qcow2"]
CRASHES = ROOT / "fuzz" / "crashes"
CORPUS = ROOT / "fuzz" / "corpus"


def _limit_memory() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))


def _load(name: str) -> object:
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "src"))
    return importlib.import_module(f"fuzz.h_{name}")


def _save(name: str, data: bytes) -> Path:
    CRASHES.mkdir(parents=True, exist_ok=True)
    path = CRASHES / f"{name}-{hashlib.sha1(data).hexdigest()[:16]}"
    path.write_bytes(data)
    return path


def _corpus(name: str) -> list[bytes]:
    out = []
    for d in (CORPUS / name, CRASHES):
        if d.is_dir():
            for p in sorted(d.iterdir()):
                if d is CORPUS / name or p.name.startswith(name + "-"):
                    out.append(p.read_bytes())
    return out


def _random_inputs(name: str, seed: int, dictionary: list[bytes], worker: int = 0) -> object:
    # worker 0's stream is the historical one (CI slices and saved results stay reproducible)
    rng = random.Random(f"{seed}:{name}" if worker == 0 else f"{seed}:{name}:{worker}")
    corpus = _corpus(name)
    if worker == 0:
        yield from corpus  # the saved ones first: regressions
    while True:
        kind = rng.randrange(4)
        if kind == 0 or not (corpus or dictionary):
            yield bytes(rng.randrange(256) for _ in range(rng.randrange(512)))
        elif kind == 1 and dictionary:
            parts = [rng.choice(dictionary) if rng.randrange(3) else
                     bytes(rng.randrange(256) for _ in range(rng.randrange(8)))
                     for _ in range(rng.randrange(12))]
            yield bytes([rng.randrange(256) for _ in range(4)]) + b"".join(parts)
        else:
            base = bytearray(rng.choice(corpus) if corpus and kind == 2 else
                             bytes(rng.randrange(256) for _ in range(rng.randrange(256))))
            for _ in range(1 + rng.randrange(8)):
                op = rng.randrange(3)
                pos = rng.randrange(len(base) + 1)
                if op == 0 and base:
                    base[min(pos, len(base) - 1)] = rng.randrange(256)
                elif op == 1 and dictionary:
                    base[pos:pos] = rng.choice(dictionary)
                else:
                    del base[pos:pos + rng.randrange(16)]
            yield bytes(base)


def child(name: str, engine: str, inputs: int, seconds: float, seed: int, worker: int = 0,
          progress: float = 0) -> int:
    import heapq
    import logging
    import signal

    logging.disable(logging.CRITICAL)
    # what the daemon emits is checked against the schema, as in the test suite: a reply or
    # event that fails its declared type is an internal error (a Finding) here
    os.environ.setdefault("BLOCKMIRROR_SCHEMA_CHECKS", "1")
    _limit_memory()
    sys.path.insert(0, str(ROOT))
    from fuzz.common import Finding, sandbox
    from fuzz.known import known

    sandbox()
    strict = os.environ.get("FUZZ_STRICT") == "1"
    # stdout of the code under test (e.g. "Formatting ..." lines) is noise here
    devnull = os.open(os.devnull, os.O_WRONLY)
    real_stdout = os.dup(1)
    os.dup2(devnull, 1)
    report = os.fdopen(real_stdout, "w", buffering=1)
    counts = {"inputs": 0, "new": 0, "known": 0}
    #: the slowest inputs so far: (seconds, sha1 prefix), a min-heap of SLOWEST entries
    slowest: list[tuple[float, str]] = []
    stop = {"now": False}

    def on_signal(signum: int, frame: object) -> None:
        stop["now"] = True  # finish the input under way, then summarize

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    def on_alarm(signum: int, frame: object) -> None:
        # the harnesses' own limits are asyncio timeouts, which a loop that never yields
        # to the event loop (a spin in synchronous code) never lets fire
        raise Finding(f"hang: one input ran {WATCHDOG_S:.0f} s (a loop that never yields)")

    signal.signal(signal.SIGALRM, on_alarm)

    def test_one(data: bytes) -> None:
        counts["inputs"] += 1
        t0 = time.perf_counter()
        try:
            signal.setitimer(signal.ITIMER_REAL, WATCHDOG_S)
            try:
                mod.one_input(data)  # type: ignore[attr-defined]
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        except Finding as e:
            if str(e).startswith("hang: one input ran"):
                from fuzz import common

                common._LOOP = None  # interrupted anywhere: the next input gets a new loop
            bug = None if strict else known(name, str(e))
            if bug is not None:
                counts["known"] += 1
                return
            counts["new"] += 1
            path = _save(name, data)
            print(f"FINDING {name}: {e} (input saved in {path})", file=report)
            if engine == "atheris":
                raise
        finally:
            took = time.perf_counter() - t0
            if len(slowest) < SLOWEST or took > slowest[0][0]:
                entry = (took, hashlib.sha1(data).hexdigest()[:12])
                if len(slowest) < SLOWEST:
                    heapq.heappush(slowest, entry)
                else:
                    heapq.heapreplace(slowest, entry)

    def summary(elapsed: float) -> None:
        _summary(report, name, engine, counts, elapsed, seed, worker,
                 sorted(slowest, reverse=True))

    if engine == "atheris":
        import atheris

        with atheris.instrument_imports(include=["blockmirror", "fuzz"]):
            mod = _load(name)
        dict_path = Path(os.getcwd()) / f"{name}.dict"
        dict_path.write_text("".join(
            '"' + "".join(f"\\x{b:02x}" for b in tok) + '"\n'
            for tok in getattr(mod, "DICT", []) if tok))
        corpus_dir = CORPUS / name
        corpus_dir.mkdir(parents=True, exist_ok=True)
        args = [sys.argv[0], f"-seed={seed * 1000 + worker}", f"-dict={dict_path}",
                f"-artifact_prefix={CRASHES}/{name}-", "-rss_limit_mb=4096", "-handle_xfsz=0",
                f"-max_total_time={int(seconds)}", str(corpus_dir)]
        if inputs:
            args.insert(1, f"-runs={inputs}")
        start = time.monotonic()
        CRASHES.mkdir(parents=True, exist_ok=True)
        atheris.Setup(args, test_one)
        try:
            atheris.Fuzz()
        finally:
            summary(time.monotonic() - start)
        return 0
    mod = _load(name)
    start = time.monotonic()
    next_progress = start + progress if progress else float("inf")
    dictionary = list(getattr(mod, "DICT", []))
    for data in _random_inputs(name, seed, dictionary, worker):  # type: ignore[attr-defined]
        if inputs and counts["inputs"] >= inputs:
            break
        if stop["now"] or (seconds and time.monotonic() - start > seconds):
            break
        test_one(data)
        if counts["new"] >= 10:
            break
        if time.monotonic() >= next_progress:
            next_progress += progress
            print(f"PROGRESS {name} worker {worker}: {counts['inputs']} inputs, "
                  f"{counts['new']} new, {time.monotonic() - start:.0f} s", file=report)
    summary(time.monotonic() - start)
    return 1 if counts["new"] else 0


#: how many of the slowest inputs a summary lists
SLOWEST = 5
#: one input running longer than this (real time) is a hang, whatever it is doing
WATCHDOG_S = 120.0


def _summary(report: object, name: str, engine: str, counts: dict[str, int], elapsed: float,
             seed: int, worker: int, slowest: list[tuple[float, str]]) -> None:
    line = {"harness": name, "engine": engine, "seed": seed, "worker": worker, **counts,
            "seconds": round(elapsed, 1),
            "slowest_ms": [[round(t * 1000, 1), h] for t, h in slowest]}
    print("RESULT " + json.dumps(line), file=report)  # type: ignore[call-overload]


def _combine(name: str, engine: str, seed: int, jobs: int, parts: list[dict[str, Any]],
             elapsed: float) -> dict[str, Any]:
    """One summary for a harness: the workers' counts added up, wall-clock seconds."""
    out: dict[str, Any] = {"harness": name, "engine": engine, "seed": seed, "jobs": jobs}
    for key in ("inputs", "new", "known"):
        out[key] = sum(int(p.get(key, 0)) for p in parts)
    out["seconds"] = round(elapsed, 1)
    out["per_second"] = round(out["inputs"] / elapsed, 1) if elapsed > 0 else 0
    slow = sorted((s for p in parts for s in p.get("slowest_ms", [])), reverse=True)
    out["slowest_ms"] = slow[:SLOWEST]
    if len(parts) != jobs:
        out["workers_without_summary"] = jobs - len(parts)
    out["when"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return out


def _run_harness(name: str, engine: str, a: argparse.Namespace) -> int:
    """Run one harness in ``a.jobs`` worker processes; print and log their summary."""
    import selectors
    import signal

    jobs = max(1, a.jobs)
    share = [a.inputs // jobs + (1 if k < a.inputs % jobs else 0) for k in range(jobs)] \
        if a.inputs else [0] * jobs
    procs = []
    start = time.monotonic()
    for k in range(jobs):
        if a.inputs and not share[k]:
            continue
        cmd = [sys.executable, "-m", "fuzz.run", "--child", "--engine", engine,
               "--inputs", str(share[k]), "--seconds", str(a.seconds), "--seed", str(a.seed),
               "--worker", str(k), "--progress", str(a.progress), name]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))

    def forward(signum: int, frame: object) -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    old = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    parts: list[dict[str, Any]] = []
    tails: dict[int, list[str]] = {id(p): [] for p in procs}
    summarized: set[int] = set()
    findings: dict[int, int] = {}
    #: libFuzzer ends its process itself after -runs (our summary never prints): its count
    done_runs: dict[int, int] = {}
    failed = 0
    try:
        sel = selectors.DefaultSelector()
        for p in procs:
            assert p.stdout is not None
            sel.register(p.stdout, selectors.EVENT_READ, p)
        open_streams = len(procs)
        while open_streams:
            for key, _ in sel.select():
                p = key.data
                line = key.fileobj.readline()  # type: ignore[union-attr]
                if not line:
                    sel.unregister(key.fileobj)
                    open_streams -= 1
                    continue
                tail = tails[id(p)]
                tail.append(line.rstrip("\n"))
                del tail[:-30]
                if line.startswith("RESULT "):
                    parts.append(json.loads(line.split(" ", 1)[1]))
                    summarized.add(id(p))
                if line.startswith("FINDING "):
                    findings[id(p)] = findings.get(id(p), 0) + 1
                if line.startswith(("RESULT", "FINDING", "PROGRESS")):
                    print(line, end="", flush=True)
                m = re.search(r"Done (\d+) runs in (\d+) second", line)
                if m:
                    done_runs[id(p)] = int(m.group(1))
                    print(f"libFuzzer: {name}: {m.group(1)} runs in {m.group(2)} s",
                          flush=True)
        for p in procs:
            if p.wait() != 0:
                failed += 1
                print(f"{name}: exit status {p.returncode}\n" + "\n".join(tails[id(p)]),
                      flush=True)
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    for k, p in enumerate(procs):
        if id(p) not in summarized and id(p) in done_runs:
            parts.append({"worker": k, "inputs": done_runs[id(p)],
                          "new": findings.get(id(p), 0), "known": 0})
    total = _combine(name, engine, a.seed, len(procs), parts, time.monotonic() - start)
    print("TOTAL " + json.dumps(total), flush=True)
    if a.log:
        with open(a.log, "a") as f:
            f.write(json.dumps(total) + "\n")
    return failed


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("harness", nargs="*", help=f"default: all of {' '.join(HARNESSES)}")
    p.add_argument("--engine", choices=["atheris", "random", "auto"], default="auto")
    p.add_argument("--inputs", type=int, default=0,
                   help="inputs per harness, split between the jobs (0: no limit)")
    p.add_argument("--seconds", type=float, default=0, help="time per harness (0: none)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--jobs", type=int, default=1, help="worker processes per harness")
    p.add_argument("--progress", type=float, default=0,
                   help="a PROGRESS line per worker every so many seconds (0: none)")
    p.add_argument("--log", default=str(ROOT / "fuzz" / "results.log"),
                   help="append each harness's summary to this file ('' for none)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)
    a = p.parse_args()
    a.harness = a.harness or HARNESSES
    unknown = [h for h in a.harness if h not in HARNESSES]
    if unknown:
        p.error(f"unknown harness {unknown}; choose from {HARNESSES}")
    if not a.inputs and not a.seconds:
        a.seconds = 60
    engine = a.engine
    if engine == "auto":
        try:
            import atheris  # noqa: F401
            engine = "atheris"
        except ImportError:
            engine = "random"
    if a.child:
        return child(a.harness[0], engine, a.inputs, a.seconds or 10 ** 9, a.seed, a.worker,
                     a.progress)
    failed = 0
    for name in a.harness:
        failed += 1 if _run_harness(name, engine, a) else 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
