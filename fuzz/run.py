"""Run the fuzz harnesses: ``python -m fuzz.run [options] [harness ...]``.

Engines: ``atheris`` (coverage-guided libFuzzer, when the atheris package is installed;
the blockmirror package is instrumented) and ``random`` (a seeded, deterministic driver:
random bytes, dictionary splices and mutations of the corpus; used by CI). Each harness runs
in its own process, sandboxed (cwd in a scratch directory, RLIMIT_FSIZE 64 MiB, 4 GiB of
address space). ``--inputs N`` stops after N inputs, ``--seconds T`` after T seconds
(whichever comes first). Crashing inputs are saved in fuzz/crashes/<harness>-<sha1>; every
saved file is replayed by the CI test. A summary line per harness is printed and appended
to fuzz/results.log.
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


def _random_inputs(name: str, seed: int, dictionary: list[bytes]) -> object:
    rng = random.Random(f"{seed}:{name}")
    corpus = _corpus(name)
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


def child(name: str, engine: str, inputs: int, seconds: float, seed: int) -> int:
    import logging

    logging.disable(logging.CRITICAL)
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

    def test_one(data: bytes) -> None:
        counts["inputs"] += 1
        try:
            mod.one_input(data)  # type: ignore[attr-defined]
        except Finding as e:
            bug = None if strict else known(name, str(e))
            if bug is not None:
                counts["known"] += 1
                return
            counts["new"] += 1
            path = _save(name, data)
            print(f"FINDING {name}: {e} (input saved in {path})", file=report)
            if engine == "atheris":
                raise

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
        args = [sys.argv[0], f"-seed={seed}", f"-dict={dict_path}",
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
            _summary(report, name, engine, counts, time.monotonic() - start, seed)
        return 0
    mod = _load(name)
    start = time.monotonic()
    dictionary = list(getattr(mod, "DICT", []))
    for data in _random_inputs(name, seed, dictionary):  # type: ignore[attr-defined]
        if inputs and counts["inputs"] >= inputs:
            break
        if seconds and time.monotonic() - start > seconds:
            break
        test_one(data)
        if counts["new"] >= 10:
            break
    _summary(report, name, engine, counts, time.monotonic() - start, seed)
    return 1 if counts["new"] else 0


def _summary(report: object, name: str, engine: str, counts: dict[str, int], elapsed: float,
             seed: int) -> None:
    line = {"harness": name, "engine": engine, "seed": seed, **counts,
            "seconds": round(elapsed, 1), "when": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                 time.gmtime())}
    print("RESULT " + json.dumps(line), file=report)  # type: ignore[call-overload]
    with open(ROOT / "fuzz" / "results.log", "a") as f:
        f.write(json.dumps(line) + "\n")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("harness", nargs="*", help=f"default: all of {' '.join(HARNESSES)}")
    p.add_argument("--engine", choices=["atheris", "random", "auto"], default="auto")
    p.add_argument("--inputs", type=int, default=0, help="inputs per harness (0: no limit)")
    p.add_argument("--seconds", type=float, default=0, help="time per harness (0: none)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
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
        return child(a.harness[0], engine, a.inputs, a.seconds or 10 ** 9, a.seed)
    failed = 0
    for name in a.harness:
        cmd = [sys.executable, "-m", "fuzz.run", "--child", "--engine", engine,
               "--inputs", str(a.inputs), "--seconds", str(a.seconds), "--seed", str(a.seed),
               name]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        out = proc.stdout + proc.stderr
        for line in out.splitlines():
            if line.startswith(("RESULT", "FINDING")):
                print(line, flush=True)
        m = re.search(r"Done (\d+) runs in (\d+) second", out)
        if m:
            print(f"libFuzzer: {name}: {m.group(1)} runs in {m.group(2)} s", flush=True)
        if proc.returncode != 0:
            failed += 1
            tail = "\n".join(out.splitlines()[-30:])
            print(f"{name}: exit status {proc.returncode}\n{tail}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
