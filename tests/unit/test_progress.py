"""Unit tests of cli/progress.py: phases, rates, snapshots and the pure renderers.

Invariant under test: whatever a mirror's counters do (``len`` growing with new writes),
the snapshots never show ``done`` or ``copied`` going backwards, ``remaining`` is exactly
``len - offset``, and every display mode prints the documented fields.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console

from blockmirror.cli.progress import (
    JSON_FIELDS,
    DisplayMode,
    Phase,
    ProgressDisplay,
    RateMeter,
    Snapshot,
    eta_of,
    final_phase,
    format_bytes,
    format_duration,
    phase_of,
    render_line,
    render_rich,
    render_summary,
    snapshot_of,
    to_json,
)
from blockmirror.jobs.progress import Progress

MiB = 1 << 20


@dataclass
class FakeStatus:
    value: str


@dataclass
class FakeJob:
    status: FakeStatus = field(default_factory=lambda: FakeStatus("running"))
    error: str | None = None
    progress: Progress = field(default_factory=Progress)
    limit: int = 0

    @property
    def speed(self) -> int:
        return self.limit


def snap(**kw: Any) -> Snapshot:
    base = Snapshot(elapsed=12.5, phase=Phase.COPYING, disk_size=64 * MiB, done=40 * MiB,
                    copied=30 * MiB, zeroed=10 * MiB, redirtied=2 * MiB, remaining=26 * MiB,
                    rate=4 * MiB, eta=6.5, speed=8 * MiB, status="running")
    return replace(base, **kw)


# --- phases -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("status", "published", "complete", "cancel", "expected"), [
    ("created", False, False, False, Phase.INIT),
    ("running", False, False, False, Phase.INIT),
    ("running", True, False, False, Phase.COPYING),
    ("ready", True, False, False, Phase.READY),
    ("standby", True, False, False, Phase.PAUSED),
    ("paused", True, False, False, Phase.PAUSED),
    ("ready", True, True, False, Phase.COMPLETING),
    ("waiting", True, False, False, Phase.COMPLETING),
    ("pending", True, False, False, Phase.COMPLETING),
    ("running", True, False, True, Phase.CANCELLING),
    ("aborting", True, False, True, Phase.CANCELLING),
    ("aborting", True, False, False, Phase.ABORTING),
])
def test_phase_of(status: str, published: bool, complete: bool, cancel: bool,
                  expected: Phase) -> None:
    assert phase_of(status, published=published, complete_requested=complete,
                    cancel_requested=cancel) == expected


def test_final_phase_follows_the_final_event() -> None:
    assert final_phase("BLOCK_JOB_COMPLETED", None) == Phase.DONE
    assert final_phase("BLOCK_JOB_COMPLETED", "Input/output error") == Phase.FAILED
    assert final_phase("BLOCK_JOB_CANCELLED", None) == Phase.CANCELLED
    assert final_phase(None, None) == Phase.FAILED
    assert {p for p in Phase if p.final} == {Phase.DONE, Phase.CANCELLED, Phase.FAILED}


# --- rate and ETA -----------------------------------------------------------------------------


def test_rate_meter_sliding_window() -> None:
    m = RateMeter(window=2.0)
    assert m.add(0.0, 0) == 0.0
    assert m.add(1.0, 10 * MiB) == pytest.approx(10 * MiB)
    m.add(2.0, 20 * MiB)
    # a stall: the window forgets the fast seconds, the rate falls
    m.add(3.0, 20 * MiB)
    m.add(4.0, 20 * MiB)
    assert m.rate() < 5 * MiB
    m.add(6.0, 20 * MiB)
    assert m.rate() == 0.0


def test_eta() -> None:
    assert eta_of(Phase.COPYING, 10 * MiB, 2 * MiB) == pytest.approx(5.0)
    assert eta_of(Phase.COPYING, 10 * MiB, 0.0) is None
    assert eta_of(Phase.READY, 0, 2 * MiB) is None
    assert eta_of(Phase.INIT, 10 * MiB, 2 * MiB) is None
    assert eta_of(Phase.COPYING, 0, 0.0) == 0.0


# --- snapshots over a live Progress -----------------------------------------------------------


def test_growing_len_is_shown_as_remaining_not_as_lost_progress() -> None:
    job = FakeJob()
    meter = RateMeter()
    job.progress.set_remaining(8 * MiB)
    job.progress.update(4 * MiB)
    job.progress.count("copied", 4 * MiB)
    s1 = snapshot_of(job, elapsed=1.0, disk_size=8 * MiB, meter=meter, phase=Phase.COPYING)
    # the guest writes 2 MiB of new data; QEMU's len grows, offset stays
    job.progress.increase_remaining(2 * MiB)
    job.progress.count("redirtied", 2 * MiB)
    s2 = snapshot_of(job, elapsed=2.0, disk_size=8 * MiB, meter=meter, phase=Phase.COPYING)
    assert (s1.done, s1.remaining) == (4 * MiB, 4 * MiB)
    assert (s2.done, s2.remaining, s2.redirtied) == (4 * MiB, 6 * MiB, 2 * MiB)
    assert s2.copied == s1.copied
    assert s2.in_sync_fraction < s1.in_sync_fraction
    assert "re-dirtied 2.0 MiB" in render_line(s2)
    assert "remaining 6.0 MiB" in render_line(s2)
    assert "%" not in render_line(s2)


_ops = st.lists(st.tuples(st.sampled_from(["update", "remaining", "increase", "copied",
                                           "zeroed", "redirtied"]),
                          st.integers(0, 64 * MiB)), max_size=40)


@settings(max_examples=150, deadline=None)
@given(_ops)
def test_snapshots_never_go_backwards(ops: list[tuple[str, int]]) -> None:
    job = FakeJob()
    meter = RateMeter()
    prev: Snapshot | None = None
    for i, (op, n) in enumerate(ops):
        p = job.progress
        if op == "update":
            p.update(n)
        elif op == "remaining":
            p.set_remaining(n)
        elif op == "increase":
            p.increase_remaining(n)
        else:
            p.count(op, n)
        s = snapshot_of(job, elapsed=float(i), disk_size=64 * MiB, meter=meter,
                        phase=Phase.COPYING)
        assert s.remaining == p.total - p.current >= 0
        assert 0.0 <= s.in_sync_fraction <= 1.0
        assert s.rate >= 0.0
        if prev is not None:
            assert s.done >= prev.done
            assert s.copied >= prev.copied
            assert s.redirtied >= prev.redirtied
        prev = s


# --- rendering --------------------------------------------------------------------------------


def test_format_helpers() -> None:
    assert format_bytes(0) == "0 B"
    assert format_bytes(1023) == "1023 B"
    assert format_bytes(1536) == "1.5 KiB"
    assert format_bytes(64 * MiB) == "64.0 MiB"
    assert format_bytes(3 << 40) == "3.0 TiB"
    assert format_duration(None) == "--"
    assert format_duration(5.4) == "0:05"
    assert format_duration(125) == "2:05"
    assert format_duration(3725) == "1:02:05"


def test_render_line_fields() -> None:
    line = render_line(snap())
    assert line == ("[copying] copied 30.0 MiB zero 10.0 MiB re-dirtied 2.0 MiB remaining "
                    "26.0 MiB rate 4.0 MiB/s ETA 0:06")
    assert "remaining --" in render_line(snap(phase=Phase.INIT))
    assert "ETA in sync" in render_line(snap(phase=Phase.READY, remaining=0, eta=None))
    assert render_line(snap(error="Input/output error")).endswith("error: Input/output error")


def _rendered(s: Snapshot) -> str:
    console = Console(record=True, width=100, file=io.StringIO())
    console.print(render_rich(s, "title here"))
    return console.export_text()


def test_render_rich_shows_every_field() -> None:
    text = _rendered(snap())
    for label in ("title here", "phase", "copying", "copied", "30.0 MiB", "skipped as zero",
                  "10.0 MiB", "re-dirtied", "2.0 MiB", "dirty remaining", "26.0 MiB", "rate",
                  "4.0 MiB/s", "ETA", "0:06", "speed limit", "8.0 MiB/s", "in sync",
                  "38.0 MiB of 64.0 MiB clean"):
        assert label in text, label
    assert "unlimited" in _rendered(snap(speed=0))
    init = _rendered(snap(phase=Phase.INIT, remaining=0))
    assert "counting dirty bytes of 64.0 MiB" in init and "clean" not in init
    assert "error: boom" in _rendered(snap(error="boom"))


def test_json_lines_have_the_documented_fields() -> None:
    obj = to_json(snap())
    assert tuple(obj) == JSON_FIELDS
    assert obj["type"] == "progress" and obj["phase"] == "copying"
    assert obj["copied"] == 30 * MiB and obj["remaining"] == 26 * MiB
    assert obj["rate"] == 4 * MiB and obj["eta"] == 6.5
    json.dumps(obj)
    assert to_json(snap(eta=None))["eta"] is None
    assert to_json(snap(phase=Phase.INIT, remaining=0))["remaining"] is None


def test_summary() -> None:
    text = render_summary(snap(phase=Phase.DONE, remaining=0, eta=None, elapsed=10.0,
                               done=64 * MiB), "pivoted")
    assert text.splitlines()[0] == "result:      done: pivoted"
    assert "average 6.4 MiB/s" in text
    assert "re-dirtied:  2.0 MiB" in text


# --- the display in each mode -----------------------------------------------------------------


def test_display_json_mode() -> None:
    out = io.StringIO()
    d = ProgressDisplay(DisplayMode.JSON, stream=out)
    d.message("Formatting 'x'")
    d.update(snap())
    d.finish(snap(phase=Phase.DONE), "ok")
    lines = [json.loads(x) for x in out.getvalue().splitlines()]
    assert [x["type"] for x in lines] == ["message", "progress", "summary"]
    assert lines[0]["text"] == "Formatting 'x'"
    assert lines[2]["outcome"] == "ok" and lines[2]["phase"] == "done"


def test_display_plain_mode_rate_limits_lines() -> None:
    out = io.StringIO()
    d = ProgressDisplay(DisplayMode.PLAIN, stream=out, plain_interval=3600)
    d.update(snap())
    d.update(snap(copied=31 * MiB))  # same phase, too soon: not printed
    d.update(snap(phase=Phase.READY))  # a phase change is always printed
    d.finish(snap(phase=Phase.DONE), "all good")
    text = out.getvalue()
    assert text.count("[copying]") == 1
    assert text.count("[ready]") == 1
    assert "result:      done: all good" in text


def test_display_quiet_mode_prints_nothing() -> None:
    out = io.StringIO()
    d = ProgressDisplay(DisplayMode.QUIET, stream=out)
    d.message("hello")
    d.update(snap())
    d.finish(snap(phase=Phase.DONE), "ok")
    assert out.getvalue() == ""
