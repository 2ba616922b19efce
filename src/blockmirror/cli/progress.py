"""Operator progress for `blockmirror mirror` and `blockmirror demo`: snapshots and rendering.

This module sits in the CLI layer, above the job core. It turns a mirror job's counters
(``jobs/progress.py``) into an immutable ``Snapshot`` and renders snapshots as a rich live
panel, a plain text line, a JSON object or a final summary. Rendering is pure (snapshot in,
text or renderable out) so it is unit-tested without a terminal; only ``ProgressDisplay``
touches the console.

Honesty rules: ``done`` and ``copied`` only grow (they are the job's forward-only counters).
A mirror's ``len`` grows while the guest writes, so we never print ``offset/len`` as a
percentage that could shrink; new guest writes show up as "re-dirtied" and "remaining".
The "in sync" bar is the clean share of the disk, which may legitimately fall when the
guest dirties more than the mirror copies, and is labelled as such.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import IO, Any, Protocol

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from blockmirror.jobs.progress import Progress


class Phase(StrEnum):
    """What the operator is waiting for (a coarser view than the QMP JobStatus)."""

    INIT = "init"  #: opening, creating the target, seeding the dirty bitmap
    COPYING = "copying"  #: the first pass: dirty data is being copied
    READY = "ready"  #: source and target in sync; writes are mirrored
    PAUSED = "paused"  #: paused by a user or an error policy of "stop"
    COMPLETING = "completing"  #: complete was requested: draining, flushing, pivoting
    CANCELLING = "cancelling"  #: a (forced) cancel is in progress
    ABORTING = "aborting"  #: the job hit an error and is cleaning up (no pivot)
    DONE = "done"  #: completed; the target is in sync (pivoted unless soft-cancelled)
    CANCELLED = "cancelled"  #: stopped without pivot; the source is untouched
    FAILED = "failed"  #: the job ended with an error

    @property
    def final(self) -> bool:
        return self in (Phase.DONE, Phase.CANCELLED, Phase.FAILED)


class JobLike(Protocol):
    """What ``snapshot_of`` reads from a job (``jobs.mirror.MirrorJob`` satisfies it)."""

    status: Any
    error: str | None
    progress: Progress

    @property
    def speed(self) -> int: ...


def phase_of(status: str, *, published: bool, complete_requested: bool,
             cancel_requested: bool) -> Phase:
    """Map a JobStatus wire value plus the CLI's own requests to a ``Phase``.

    ``published`` is False while a mirror is still seeding its bitmap (QEMU's dirty init).
    Final phases come from the job's final event, not from here (see ``final_phase``).
    """
    if status in ("created", "undefined"):
        return Phase.INIT
    if cancel_requested and status not in ("concluded", "null"):
        return Phase.CANCELLING
    if status == "aborting":
        return Phase.ABORTING
    if status in ("waiting", "pending", "concluded", "null") or complete_requested:
        return Phase.COMPLETING
    if status in ("paused", "standby"):
        return Phase.PAUSED
    if status == "ready":
        return Phase.READY
    return Phase.COPYING if published else Phase.INIT


def final_phase(event: str | None, error: str | None) -> Phase:
    """The phase a job ended in, from its final QMP event (BLOCK_JOB_COMPLETED/CANCELLED)."""
    if event == "BLOCK_JOB_CANCELLED":
        return Phase.CANCELLED
    if event == "BLOCK_JOB_COMPLETED" and error is None:
        return Phase.DONE
    return Phase.FAILED


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One observation of a mirror, everything the displays need. Sizes in bytes."""

    #: seconds since the command started
    elapsed: float
    phase: Phase
    #: the virtual size of the source
    disk_size: int
    #: bytes the job has processed: QMP ``offset`` (copy + zero + discard); only grows
    done: int
    #: bytes written to the target with data read from the source; only grows
    copied: int
    #: bytes handled without copying data (written as zeroes, discarded or skipped)
    zeroed: int
    #: bytes that had been clean and were dirtied again by new writes or failed ops
    redirtied: int
    #: dirty plus in-flight bytes still to copy: QMP ``len - offset``; may grow
    remaining: int
    #: bytes per second of ``done`` over the last few seconds
    rate: float
    #: seconds until the first pass ends at the current rate; None when unknown or in sync
    eta: float | None
    #: the job's speed limit in bytes per second (0: unlimited)
    speed: int
    #: the QMP JobStatus wire value
    status: str
    error: str | None = None
    #: the convergence forecast (extension x-converge): verdict, its reason, and what the
    #: policy did; None when the job has no forecast
    verdict: str | None = None
    reason: str | None = None
    action: str | None = None
    #: how many mirrors this snapshot adds up (a switch-over group: more than one)
    disks: int = 1

    @property
    def in_sync_fraction(self) -> float:
        """The share of the disk that is clean now (may fall while the guest writes)."""
        if self.disk_size <= 0:
            return 1.0
        return max(0.0, min(1.0, 1.0 - self.remaining / self.disk_size))


class RateMeter:
    """A sliding-window rate of a growing counter; fed ``(time, value)`` samples."""

    def __init__(self, window: float = 3.0) -> None:
        self.window = window
        self._samples: deque[tuple[float, int]] = deque()

    def add(self, t: float, value: int) -> float:
        """Record a sample and return the rate in units per second (0.0 until known)."""
        self._samples.append((t, value))
        while len(self._samples) > 2 and t - self._samples[1][0] >= self.window:
            self._samples.popleft()
        return self.rate()

    def rate(self) -> float:
        if len(self._samples) < 2:
            return 0.0
        (t0, v0), (t1, v1) = self._samples[0], self._samples[-1]
        if t1 <= t0:
            return 0.0
        return max(0.0, (v1 - v0) / (t1 - t0))


def eta_of(phase: Phase, remaining: int, rate: float) -> float | None:
    """Seconds to finish the current pass; None when it cannot be known or means nothing."""
    if phase not in (Phase.COPYING, Phase.COMPLETING) or remaining <= 0:
        return 0.0 if phase == Phase.COPYING and remaining <= 0 else None
    if rate <= 0:
        return None
    return remaining / rate


def _forecast_of(job: JobLike) -> tuple[str | None, str | None, str | None, float | None]:
    """verdict, reason, action and ETA of a job's convergence monitor (x-converge), if any."""
    mon = getattr(job, "convergence", None)
    if mon is None:
        return None, None, None, None
    f = mon.forecast
    return f.verdict.value, f.reason, mon.action, f.eta


def snapshot_of(job: JobLike, *, elapsed: float, disk_size: int, meter: RateMeter,
                phase: Phase) -> Snapshot:
    """Read a job's counters now (cf. query-block-jobs offset/len plus itemised counters)."""
    p = job.progress
    done, total = int(p.current), int(p.total)
    remaining = max(total - done, 0)
    rate = meter.add(elapsed, done)
    verdict, reason, action, forecast_eta = _forecast_of(job)
    eta = eta_of(phase, remaining, rate)
    if verdict is not None and phase == Phase.COPYING and (
            forecast_eta is not None or verdict != "converging"):
        # the forecast knows about the guest's writes, the plain rate does not (while the
        # forecast still measures, the plain rate's ETA stands in)
        eta = forecast_eta
    return Snapshot(
        elapsed=elapsed,
        phase=phase,
        disk_size=disk_size,
        done=done,
        copied=int(p.copied),
        zeroed=int(p.zeroed) + int(p.discarded) + int(p.skipped),
        redirtied=int(p.redirtied),
        remaining=remaining,
        rate=rate,
        eta=eta,
        speed=int(job.speed),
        status=str(getattr(job.status, "value", job.status)),
        error=job.error,
        verdict=verdict,
        reason=reason,
        action=action,
    )


def combine(snaps: list[Snapshot], *, elapsed: float, rate: float, phase: Phase) -> Snapshot:
    """One view of a switch-over group: sums, the slowest ETA, the worst verdict."""
    etas = [s.eta for s in snaps]
    known = [e for e in etas if e is not None]
    verdicts = [s.verdict for s in snaps if s.verdict is not None]
    worst = next((v for v in ("not-converging", "throttled-by-speed") if v in verdicts),
                 verdicts[0] if verdicts else None)
    reason = next((s.reason for s in snaps if s.verdict == worst), None)
    actions = sorted({s.action for s in snaps if s.action})
    errors = [s.error for s in snaps if s.error]
    return Snapshot(
        elapsed=elapsed, phase=phase, disk_size=sum(s.disk_size for s in snaps),
        done=sum(s.done for s in snaps), copied=sum(s.copied for s in snaps),
        zeroed=sum(s.zeroed for s in snaps), redirtied=sum(s.redirtied for s in snaps),
        remaining=sum(s.remaining for s in snaps), rate=rate,
        eta=max(known) if known and len(known) == len(etas) else None,
        speed=sum(s.speed for s in snaps),
        status=",".join(sorted({s.status for s in snaps})),
        error="; ".join(errors) or None, verdict=worst, reason=reason,
        action=",".join(actions) or None, disks=len(snaps),
    )


# --- formatting ---------------------------------------------------------------------------------

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def format_bytes(n: float) -> str:
    """IEC units with one decimal, as qemu-img prints sizes (``1.5 MiB``)."""
    value = float(n)
    for unit in _UNITS:
        if abs(value) < 1024 or unit == _UNITS[-1]:
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_rate(bps: float) -> str:
    return f"{format_bytes(bps)}/s"


def format_duration(seconds: float | None) -> str:
    """``m:ss`` (or ``h:mm:ss``); ``--`` when unknown."""
    if seconds is None:
        return "--"
    s = round(max(seconds, 0.0))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _remaining_text(snap: Snapshot) -> str:
    # before the first pass is seeded the job has not counted its dirty bytes yet
    return "--" if snap.phase == Phase.INIT else format_bytes(snap.remaining)


def _eta_text(snap: Snapshot) -> str:
    if snap.phase == Phase.READY:
        return "in sync"
    return format_duration(snap.eta)


def render_line(snap: Snapshot) -> str:
    """One plain line (non-terminal output, logs)."""
    parts = [
        f"[{snap.phase.value}]",
        f"copied {format_bytes(snap.copied)}",
        f"zero {format_bytes(snap.zeroed)}",
        f"re-dirtied {format_bytes(snap.redirtied)}",
        f"remaining {_remaining_text(snap)}",
        f"rate {format_rate(snap.rate)}",
        f"ETA {_eta_text(snap)}",
    ]
    if snap.verdict is not None:
        parts.append(f"verdict {snap.verdict}")
    if snap.action is not None:
        parts.append(f"policy: {snap.action}")
    if snap.error:
        parts.append(f"error: {snap.error}")
    return " ".join(parts)


_PHASE_STYLE = {
    Phase.INIT: "cyan", Phase.COPYING: "yellow", Phase.READY: "green", Phase.PAUSED: "magenta",
    Phase.COMPLETING: "blue", Phase.CANCELLING: "red", Phase.ABORTING: "red",
    Phase.DONE: "bold green",
    Phase.CANCELLED: "bold red", Phase.FAILED: "bold red",
}


def render_rich(snap: Snapshot, title: str = "blockmirror") -> RenderableType:
    """The live panel: a field table and the in-sync bar."""
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold", justify="right")
    table.add_column()
    table.add_column(style="bold", justify="right")
    table.add_column()
    phase = Text(snap.phase.value, style=_PHASE_STYLE[snap.phase])
    limit = format_rate(snap.speed) if snap.speed else "unlimited"
    table.add_row("phase", phase, "elapsed", format_duration(snap.elapsed))
    table.add_row("copied", format_bytes(snap.copied), "skipped as zero",
                  format_bytes(snap.zeroed))
    table.add_row("re-dirtied", format_bytes(snap.redirtied), "dirty remaining",
                  _remaining_text(snap))
    table.add_row("rate", format_rate(snap.rate), "ETA", _eta_text(snap))
    table.add_row("speed limit", limit, "job status", snap.status)
    if snap.verdict is not None:
        style = "green" if snap.verdict == "converging" else "red"
        table.add_row("verdict", Text(snap.verdict, style=style), "policy action",
                      snap.action or "none")
    bar = Table.grid(padding=(0, 1))
    bar.add_column(style="bold", justify="right")
    bar.add_column(width=40)
    bar.add_column()
    if snap.phase == Phase.INIT:
        # nothing is counted yet: a pulsing bar, not a "100% clean" that would be a lie
        bar.add_row("in sync", ProgressBar(total=None, width=40),
                    f"counting dirty bytes of {format_bytes(snap.disk_size)}")
    else:
        frac = snap.in_sync_fraction
        bar.add_row("in sync", ProgressBar(total=1000, completed=int(frac * 1000), width=40),
                    f"{format_bytes(snap.disk_size - snap.remaining)} of "
                    f"{format_bytes(snap.disk_size)} clean")
    parts: list[RenderableType] = [Text(title, style="bold"), table, bar]
    if snap.verdict is not None and snap.reason and snap.verdict != "converging":
        parts.append(Text(snap.reason, style="yellow"))
    if snap.error:
        parts.append(Text(f"error: {snap.error}", style="red"))
    return Group(*parts)


#: the fields of a ``--json`` progress line, in order (documented in docs/cli.md)
JSON_FIELDS = ("type", "elapsed", "phase", "status", "disk_size", "done", "copied", "zeroed",
               "redirtied", "remaining", "rate", "eta", "speed", "error", "verdict", "reason",
               "action", "disks")


def to_json(snap: Snapshot, kind: str = "progress") -> dict[str, Any]:
    """A ``--json`` line: ``type`` is "progress" for updates and "summary" for the last one."""
    raw = asdict(snap)
    raw["phase"] = snap.phase.value
    raw["elapsed"] = round(snap.elapsed, 3)
    raw["rate"] = int(snap.rate)
    raw["eta"] = None if snap.eta is None else round(snap.eta, 1)
    if snap.phase == Phase.INIT:
        raw["remaining"] = None  # not counted yet (see _remaining_text)
    out: dict[str, Any] = {"type": kind}
    out.update({k: raw[k] for k in JSON_FIELDS[1:]})
    return out


def render_summary(snap: Snapshot, outcome: str) -> str:
    """The final summary block printed after the job ended."""
    avg = snap.done / snap.elapsed if snap.elapsed > 0 else 0.0
    lines = [
        f"result:      {snap.phase.value}: {outcome}",
        f"elapsed:     {format_duration(snap.elapsed)} ({snap.elapsed:.1f} s)",
        f"disk size:   {format_bytes(snap.disk_size)}",
        f"copied:      {format_bytes(snap.copied)} of data",
        f"zero:        {format_bytes(snap.zeroed)} written as zeroes or skipped",
        f"re-dirtied:  {format_bytes(snap.redirtied)} dirtied again after being clean "
        "(new writes, retried errors)",
        f"processed:   {format_bytes(snap.done)} (average {format_rate(avg)})",
    ]
    if snap.action:
        lines.append(f"convergence: the policy switched to {snap.action}")
    if snap.error:
        lines.append(f"error:       {snap.error}")
    return "\n".join(lines)


# --- the display ---------------------------------------------------------------------------------


class DisplayMode(StrEnum):
    LIVE = "live"  #: rich live panel (a terminal)
    PLAIN = "plain"  #: one text line per update (not a terminal)
    JSON = "json"  #: one JSON object per line
    QUIET = "quiet"  #: errors and nothing else


def choose_mode(*, json_lines: bool, quiet: bool, stream: IO[str] | None = None) -> DisplayMode:
    if json_lines:
        return DisplayMode.JSON
    if quiet:
        return DisplayMode.QUIET
    out = stream if stream is not None else sys.stdout
    return DisplayMode.LIVE if out.isatty() else DisplayMode.PLAIN


class ProgressDisplay:
    """Shows snapshots in one of the ``DisplayMode``s; messages go above the live panel."""

    def __init__(self, mode: DisplayMode, *, title: str = "blockmirror",
                 stream: IO[str] | None = None, plain_interval: float = 1.0) -> None:
        self.mode = mode
        self.title = title
        self.stream = stream if stream is not None else sys.stdout
        self.console = Console(file=self.stream, highlight=False)
        self.plain_interval = plain_interval
        self._live: Live | None = None
        self._last_plain = -1e9
        self._last_phase: Phase | None = None
        self._closed = False

    def start(self) -> None:
        if self.mode == DisplayMode.LIVE and self._live is None:
            self._live = Live(console=self.console, refresh_per_second=8, transient=False,
                              auto_refresh=True)
            self._live.start()

    def update(self, snap: Snapshot) -> None:
        if self.mode == DisplayMode.LIVE:
            self.start()
            assert self._live is not None
            self._live.update(render_rich(snap, self.title))
        elif self.mode == DisplayMode.JSON:
            self._json(to_json(snap))
        elif self.mode == DisplayMode.PLAIN:
            now = time.monotonic()
            if snap.phase != self._last_phase or now - self._last_plain >= self.plain_interval:
                self._last_plain = now
                self._write(render_line(snap) + "\n")
        self._last_phase = snap.phase

    def message(self, text: str) -> None:
        """An informational line ("Formatting ...", export address); not shown when quiet."""
        if self.mode == DisplayMode.QUIET:
            return
        if self.mode == DisplayMode.JSON:
            self._json({"type": "message", "text": text})
        else:
            self._print(text)

    def finish(self, snap: Snapshot, outcome: str) -> None:
        """Stop the live panel (leaving its last frame) and print the summary."""
        if self.mode == DisplayMode.LIVE and self._live is not None:
            self._live.update(render_rich(snap, self.title))
        self.stop()
        if self.mode == DisplayMode.JSON:
            line = to_json(snap, "summary")
            line["outcome"] = outcome
            self._json(line)
        elif self.mode != DisplayMode.QUIET:
            if self.mode == DisplayMode.PLAIN:
                self._write(render_line(snap) + "\n")
            self._print(render_summary(snap, outcome))

    def _print(self, text: str) -> None:
        if self._closed:
            return
        try:
            self.console.print(text, markup=False, highlight=False, soft_wrap=True)
        except BrokenPipeError:
            self._silence()

    def stop(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None

    def _json(self, obj: dict[str, Any]) -> None:
        self._write(json.dumps(obj) + "\n")

    def _write(self, text: str) -> None:
        """Write and flush; a closed pipe (``| head``) silences the display, not the job."""
        if self._closed:
            return
        try:
            self.stream.write(text)
            self.stream.flush()
        except BrokenPipeError:
            self._silence()

    def _silence(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError, ValueError):
            # the interpreter flushes stdout at exit; point it at /dev/null first
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self.stream.fileno())
            os.close(devnull)


__all__ = [
    "JSON_FIELDS",
    "DisplayMode",
    "Phase",
    "ProgressDisplay",
    "RateMeter",
    "Snapshot",
    "choose_mode",
    "combine",
    "eta_of",
    "final_phase",
    "format_bytes",
    "format_duration",
    "phase_of",
    "render_line",
    "render_rich",
    "render_summary",
    "snapshot_of",
    "to_json",
]
