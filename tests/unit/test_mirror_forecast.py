"""The convergence forecast as pure arithmetic: scripted counters in, verdict and ETA out."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from blockmirror.jobs.mirror.forecast import SEC, Forecast, Forecaster, Sample, Verdict

MIB = 1 << 20
TICK = SEC // 10


def _feed(f: Forecaster, *, seconds: float, copy: float, dirty: float, drain: float,
          remaining: float, speed: int = 0, t0: int = 0, copied: float = 0.0,
          dirtied: float = 0.0) -> tuple[Forecast, int, float, float, float]:
    """Steady rates for ``seconds``; returns the last forecast and the counters' end state."""
    t = t0
    out = f.current
    for _ in range(int(seconds * 10)):
        t += TICK
        copied += copy / 10
        dirtied += dirty / 10
        remaining = max(0.0, remaining - drain / 10)
        out = f.add(Sample(t, int(copied), int(dirtied), int(remaining), speed))
    return out, t, copied, dirtied, remaining


def test_measuring_until_half_a_window() -> None:
    f = Forecaster()
    out = f.add(Sample(TICK, 0, 0, 10 * MIB))
    assert out.verdict == Verdict.CONVERGING and out.eta is None and not out.steady
    assert "measuring" in out.reason


def test_shrinking_dirty_data_converges_with_an_exact_eta() -> None:
    f = Forecaster()
    out, *_ , remaining = _feed(f, seconds=3, copy=4 * MIB, dirty=1 * MIB, drain=3 * MIB,
                                remaining=30 * MIB)
    assert out.verdict == Verdict.CONVERGING and out.steady
    assert out.eta is not None
    assert abs(out.eta - remaining / (3 * MIB)) < 0.01
    assert abs(out.copy_rate - 4 * MIB) < 0.01 * MIB
    assert abs(out.dirty_rate - 1 * MIB) < 0.01 * MIB


def test_growing_dirty_data_does_not_converge() -> None:
    f = Forecaster()
    out, *_ = _feed(f, seconds=3, copy=2 * MIB, dirty=3 * MIB, drain=-1 * MIB,
                    remaining=10 * MIB)
    assert out.verdict == Verdict.NOT_CONVERGING and out.eta is None
    assert "grows" in out.reason


def test_a_copy_at_its_speed_limit_is_throttled_by_speed() -> None:
    f = Forecaster()
    out, *_ = _feed(f, seconds=3, copy=2 * MIB, dirty=3 * MIB, drain=-1 * MIB,
                    remaining=10 * MIB, speed=2 * MIB)
    assert out.verdict == Verdict.THROTTLED and out.eta is None
    assert "speed limit" in out.reason


def test_a_job_that_keeps_reaching_zero_converges() -> None:
    f = Forecaster()
    out = f.current
    for i in range(30):
        # in sync every other sample, one chunk dirty in between: a writer the copy keeps up with
        out = f.add(Sample((i + 1) * TICK, i * 65536, i * 65536, 65536 * (i % 2)))
    assert out.verdict == Verdict.CONVERGING


def test_one_noisy_interval_does_not_flip_the_verdict() -> None:
    f = Forecaster()
    out, t, c, d, r = _feed(f, seconds=3, copy=4 * MIB, dirty=1 * MIB, drain=3 * MIB,
                            remaining=30 * MIB)
    assert out.verdict == Verdict.CONVERGING
    # one sample reads high (a write landed just before it, the copy took it just after)
    out = f.add(Sample(t + TICK, int(c + 0.4 * MIB), int(d + 0.1 * MIB), int(r + 4 * MIB)))
    assert out.verdict == Verdict.CONVERGING
    out, *_ = _feed(f, seconds=0.5, copy=4 * MIB, dirty=1 * MIB, drain=3 * MIB,
                    remaining=r - 0.3 * MIB, t0=t + TICK, copied=c + 0.4 * MIB,
                    dirtied=d + 0.1 * MIB)
    assert out.verdict == Verdict.CONVERGING


def test_the_verdict_follows_a_change_of_rates_within_two_seconds() -> None:
    f = Forecaster()
    out, t, c, d, r = _feed(f, seconds=3, copy=4 * MIB, dirty=1 * MIB, drain=3 * MIB,
                            remaining=30 * MIB)
    assert out.verdict == Verdict.CONVERGING
    flipped_after = None
    for i in range(1, 31):
        out, t, c, d, r = _feed(f, seconds=0.1, copy=4 * MIB, dirty=6 * MIB, drain=-2 * MIB,
                                remaining=r, t0=t, copied=c, dirtied=d)
        if out.verdict == Verdict.NOT_CONVERGING:
            flipped_after = i / 10
            break
    assert flipped_after is not None and flipped_after <= 2.0, flipped_after


def test_out_of_order_samples_are_ignored() -> None:
    f = Forecaster()
    _feed(f, seconds=2, copy=4 * MIB, dirty=0, drain=4 * MIB, remaining=30 * MIB)
    before = f.current
    assert f.add(Sample(TICK, 0, 0, 0)) == before


@settings(deadline=None)
@given(copy=st.integers(1, 64), dirty=st.integers(0, 64), start=st.integers(64, 4096))
def test_steady_rates_give_the_right_verdict_and_eta(copy: int, dirty: int, start: int) -> None:
    """Fresh writes only (each dirtied byte is new work): drain = copy - dirty."""
    f = Forecaster()
    drain = (copy - dirty) * MIB
    out, *_, remaining = _feed(f, seconds=2, copy=copy * MIB, dirty=dirty * MIB,
                               drain=drain, remaining=start * MIB)
    if remaining == 0:
        assert out.verdict == Verdict.CONVERGING and out.eta == 0.0
    elif copy - dirty > 0.11 * copy:
        assert out.verdict == Verdict.CONVERGING
        assert out.eta is not None and abs(out.eta - remaining / drain) <= 0.01 * out.eta + 0.1
    elif copy <= dirty:
        assert out.verdict == Verdict.NOT_CONVERGING
        assert out.eta is None
    # in between (a drain under 10% of the copy rate) either verdict is an honest answer


def test_a_guest_outpacing_the_copy_needs_a_clear_fall() -> None:
    # random writes at 4 MiB/s against a 1 MiB/s copy: the dirty data hovers, and a chance
    # fall of 30% of the copy rate is not a forecast of convergence ...
    f = Forecaster()
    out, *_ = _feed(f, seconds=2, copy=1 * MIB, dirty=4 * MIB, drain=0.3 * MIB,
                    remaining=3 * MIB, speed=1 * MIB)
    assert out.verdict == Verdict.THROTTLED and "as fast as the copy" in out.reason
    # ... but a bulk copy that clearly shrinks the dirty data under a hot-spot writer is
    f = Forecaster()
    out, *_ = _feed(f, seconds=2, copy=8 * MIB, dirty=10 * MIB, drain=6 * MIB,
                    remaining=300 * MIB)
    assert out.verdict == Verdict.CONVERGING and out.eta is not None
