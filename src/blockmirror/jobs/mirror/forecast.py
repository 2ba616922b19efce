"""Will this mirror converge? Rates, the time to READY and a verdict, from sampled counters.

Pure arithmetic over ``Sample``s taken at the job's clock (no I/O, no asyncio), so virtual-
time tests and the unit tests drive it directly. Each sample holds three forward-only
counters and one level:

* ``copied``: bytes the job has written to the target (QMP ``offset``);
* ``dirtied``: bytes of guest writes the dirty tracker marked (``DirtyState.marked_bytes``);
* ``remaining``: dirty plus in-flight bytes (QMP ``len - offset``).

Rates are the slope over a sliding window (``window_ns``), which is the smoothing: a rate
limiter copies in 100 ms bursts and a guest writes in bursts, so single intervals mean
little. A copy held to ``speed`` with a large ``buf-size`` copies a whole buffer at once and
then sleeps off the debt, for seconds maybe: the window stretches to twice the longest recent
gap between copy bursts (up to ``max_window_ns``), so such a copy does not look stalled
between its bursts. The verdict is taken from the *drain rate* (how fast ``remaining``
falls), not from ``copy - dirty``: a guest rewriting data that is already dirty adds no
work, and a write the active mirror copied itself is never marked, so only ``remaining``
tells the truth. A new verdict must hold for ``confirm`` samples before it is reported, so
a single noisy interval does not flip it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from blockmirror.qapi.x_mirror import XConvergeVerdict as Verdict

SEC = 1_000_000_000


@dataclass(frozen=True, slots=True)
class Sample:
    """One measurement of the job's progress, taken at ``t_ns`` on the job's clock."""

    t_ns: int
    copied: int
    dirtied: int
    remaining: int
    #: the job's speed limit (bytes/s, 0: none) when the sample was taken
    speed: int = 0


@dataclass(frozen=True, slots=True)
class Forecast:
    """What the samples say about convergence: a verdict, the rates and the ETA."""

    verdict: Verdict
    reason: str
    remaining: int
    #: bytes per second written to the target
    copy_rate: float
    #: bytes per second of guest writes into the tracked source
    dirty_rate: float
    #: bytes per second by which ``remaining`` falls (negative: it grows)
    drain_rate: float
    #: seconds until nothing is left to copy at the current rates; None: not foreseeable
    eta: float | None
    #: the window is full: the rates cover ``window_ns`` of history
    steady: bool


def _rate(bps: float) -> str:
    """A short human rate for reasons (``12.5 MiB/s``)."""
    value = float(bps)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}/s" if unit == "B" else f"{value:.1f} {unit}/s"
        value /= 1024
    raise AssertionError("unreachable")


class Forecaster:
    """Feeds on samples; ``add`` returns the current forecast."""

    def __init__(self, *, window_ns: int = SEC, confirm: int = 3,
                 saturation: float = 0.8, margin: float = 0.1, outpaced_drain: float = 0.5,
                 max_window_ns: int = 10 * SEC) -> None:
        self.window_ns = window_ns
        self.max_window_ns = max_window_ns
        #: the last gaps between samples in which the copy made progress
        self._gaps: deque[int] = deque(maxlen=8)
        self._last_copy: tuple[int, int] | None = None
        self.confirm = confirm
        #: a copy at this share of its speed limit or more is held back by the limit
        self.saturation = saturation
        #: drains below this share of the copy rate count as "not shrinking": at the noise
        #: level of a bursty copy, and too slow to matter (10%: ten times the copy's time)
        self.margin = margin
        #: the share needed when the guest writes at least as fast as the copy copies
        self.outpaced_drain = outpaced_drain
        self._samples: deque[Sample] = deque()
        self._pending: Verdict | None = None
        self._pending_n = 0
        self.current = Forecast(Verdict.CONVERGING, "measuring the copy and dirty rates",
                                0, 0.0, 0.0, 0.0, None, False)

    def reset(self) -> None:
        """Forget the history (the copy mode or the speed changed the rates' meaning)."""
        self._samples.clear()
        self._gaps.clear()
        self._last_copy = None
        self._pending, self._pending_n = None, 0

    def _window(self, s: Sample) -> int:
        """The window for this sample: at least two copy bursts long."""
        last = self._last_copy
        if last is None or s.copied != last[1]:
            if last is not None:
                self._gaps.append(s.t_ns - last[0])
            self._last_copy = (s.t_ns, s.copied)
        gaps = list(self._gaps)
        if last is not None and s.copied == last[1] and s.remaining > 0:
            gaps.append(s.t_ns - last[0])  # no copy since: that gap is growing
        longest = max(gaps, default=0)
        return min(max(self.window_ns, 2 * longest), self.max_window_ns)

    def add(self, s: Sample) -> Forecast:
        samples = self._samples
        if samples and s.t_ns <= samples[-1].t_ns:
            return self.current
        samples.append(s)
        window = self._window(s)
        # keep one sample at or before the window's start, so the slope spans the window
        while len(samples) > 2 and samples[1].t_ns <= s.t_ns - window:
            samples.popleft()
        first = samples[0]
        span = s.t_ns - first.t_ns
        if span < window // 2:
            self.current = Forecast(self.current.verdict, self.current.reason, s.remaining,
                                    self.current.copy_rate, self.current.dirty_rate,
                                    self.current.drain_rate, self.current.eta, False)
            return self.current
        secs = span / SEC
        copy = max(0.0, (s.copied - first.copied) / secs)
        dirty = max(0.0, (s.dirtied - first.dirtied) / secs)
        drain = self._drain()
        verdict, reason, eta = self._judge(s, copy, dirty, drain)
        if verdict != self.current.verdict:
            if verdict == self._pending:
                self._pending_n += 1
            else:
                self._pending, self._pending_n = verdict, 1
            if self._pending_n < self.confirm:
                # not confirmed yet: keep the old verdict, with fresh numbers
                verdict, reason = self.current.verdict, self.current.reason
                if verdict != Verdict.CONVERGING:
                    eta = None
        else:
            self._pending, self._pending_n = None, 0
        self.current = Forecast(verdict, reason, s.remaining, copy, dirty, drain, eta,
                                span >= window)
        return self.current

    def _drain(self) -> float:
        """Bytes per second by which ``remaining`` falls: the least-squares slope over the
        window (a copy in bursts makes single samples jump by a burst)."""
        pts = [((x.t_ns - self._samples[0].t_ns) / SEC, float(x.remaining))
               for x in self._samples]
        n = len(pts)
        mt = sum(t for t, _r in pts) / n
        mr = sum(r for _t, r in pts) / n
        var = sum((t - mt) ** 2 for t, _r in pts)
        if var <= 0:
            return 0.0
        return -sum((t - mt) * (r - mr) for t, r in pts) / var

    @staticmethod
    def _growth(drain: float) -> str:
        if drain > 1.0:
            return f"shrinks by only {_rate(drain)}"
        return f"grows by {_rate(-drain)}" if drain < -1.0 else "does not shrink"

    def _judge(self, s: Sample, copy: float, dirty: float,
               drain: float) -> tuple[Verdict, str, float | None]:
        remaining = s.remaining
        touched_zero = any(x.remaining == 0 for x in self._samples)
        if remaining == 0:
            return Verdict.CONVERGING, "in sync: nothing left to copy", 0.0
        if touched_zero and drain >= -self.margin * max(copy, 1.0):
            # the job keeps reaching a clean bitmap: it copies every write soon after
            pace = drain if drain > 0 else copy
            return (Verdict.CONVERGING, f"keeping up: copying {_rate(copy)} against "
                    f"{_rate(dirty)} of guest writes", remaining / pace if pace > 0 else None)
        # a guest that writes at least as fast as the copy copies can hold the dirty data at
        # a level above zero (random writes: the clean share shrinks until the copy and the
        # fresh dirt balance), where it only drifts by chance: then a fall must be clear
        outpaced = dirty >= copy
        need = self.outpaced_drain if outpaced else self.margin
        if drain > need * max(copy, 1.0):
            return (Verdict.CONVERGING, f"the dirty data shrinks by {_rate(drain)} (copying "
                    f"{_rate(copy)}, the guest writes {_rate(dirty)})", remaining / drain)
        trend = (f"the guest writes {_rate(dirty)}, as fast as the copy copies: the dirty "
                 f"data {self._growth(drain)}" if outpaced and drain > 1.0 else
                 f"the dirty data {self._growth(drain)} with the guest writing {_rate(dirty)}")
        if s.speed > 0 and copy >= self.saturation * s.speed:
            return (Verdict.THROTTLED, f"the speed limit ({_rate(s.speed)}) holds the copy at "
                    f"{_rate(copy)}; {trend}", None)
        return (Verdict.NOT_CONVERGING, f"the copy ({_rate(copy)}) does not get ahead of the "
                f"guest: {trend}", None)


__all__ = ["SEC", "Forecast", "Forecaster", "Sample", "Verdict"]
