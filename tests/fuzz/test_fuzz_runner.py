"""fuzz/run.py's bookkeeping: --jobs splits the inputs exactly, workers draw disjoint streams,
SIGTERM ends a run with an exact summary (the counts a campaign reports must be true)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

from test_fuzz_harness_checks import _harness

from conftest import ROOT

RUN = [sys.executable, "-m", "fuzz.run", "--engine", "random", "--seed", "3"]


def _lines(out: str, tag: str) -> list[dict[str, object]]:
    return [json.loads(line.split(" ", 1)[1]) for line in out.splitlines()
            if line.startswith(tag + " ")]


def test_jobs_split_the_inputs_and_add_them_up(tmp_path: Path) -> None:
    log = tmp_path / "results.log"
    proc = subprocess.run([*RUN, "--jobs", "2", "--inputs", "301", "--log", str(log), "keyval"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    parts = _lines(proc.stdout, "RESULT")
    assert sorted((p["worker"], p["inputs"]) for p in parts) == [(0, 151), (1, 150)]
    total = _lines(proc.stdout, "TOTAL")
    assert len(total) == 1 and total[0]["inputs"] == 301 and total[0]["jobs"] == 2, total
    assert [json.loads(line)["inputs"] for line in log.read_text().splitlines()] == [301]


def test_worker_streams_are_disjoint_and_worker_0_is_the_single_process_one() -> None:
    run = _harness("run")

    def first(worker: int, n: int = 200) -> list[bytes]:
        gen = run._random_inputs("keyval", 7, [b"driver="], worker)
        return [next(gen) for _ in range(n)]

    corpus = len(run._corpus("keyval"))
    w0, w1 = first(0, corpus + 200), first(1)
    assert w0 == first(0, corpus + 200)  # seeded: the same stream every time
    assert not set(w0[corpus:]) & set(w1) - {b""}
    assert w0[:corpus] == run._corpus("keyval")  # worker 0 replays the corpus first


def test_sigterm_ends_a_run_with_an_exact_summary(tmp_path: Path) -> None:
    log = tmp_path / "results.log"
    proc = subprocess.Popen([*RUN, "--jobs", "2", "--seconds", "600", "--progress", "0.2",
                             "--log", str(log), "keyval"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:  # wait for both workers to be fuzzing
        seen.append(line)
        if len({x.split(":")[0] for x in seen if x.startswith("PROGRESS")}) == 2:
            break
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=120)
    out = "".join(seen) + rest
    assert proc.returncode == 0, out
    parts, total = _lines(out, "RESULT"), _lines(out, "TOTAL")
    assert len(parts) == 2 and len(total) == 1, out
    assert total[0]["inputs"] == sum(int(p["inputs"]) for p in parts) > 0  # type: ignore[call-overload]
    assert float(total[0]["seconds"]) < 600  # type: ignore[arg-type]
    assert json.loads(log.read_text())["inputs"] == total[0]["inputs"]
