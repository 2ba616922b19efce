"""Job progress: QEMU's current/total pair plus itemised counters that never go backwards.

``current`` and ``total`` are what query-jobs (current-progress/total-progress) and
query-block-jobs (offset/len) report; QEMU derives ``total`` as ``current + remaining``, so it
may grow while a mirror keeps receiving writes (cf. util/qemu-progress-meter / job_progress_*).
The itemised counters (copied, zeroed, discarded, re-dirtied, verified, resumed,
active-written) are for the operator CLI and the mirror's ``x-`` query-block-jobs members.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


class ProgressView(Protocol):
    """The read-only face of a job's progress, for queries and displays."""

    @property
    def current(self) -> int: ...

    @property
    def total(self) -> int: ...


@dataclass
class Progress:
    """Progress counters of one job (cf. ProgressMeter). Only ever moves forward."""

    _current: int = 0
    _total: int = 0
    #: bytes written to the target with data, with zeroes, and discarded there
    copied: int = 0
    zeroed: int = 0
    discarded: int = 0
    #: bytes that had been cleaned and were marked dirty again (failed ops, new writes)
    redirtied: int = 0
    #: bytes skipped because they were already known to be zero on the target
    skipped: int = 0
    #: bytes a verification found equal on source and target (re-verified chunks count again)
    verified: int = 0
    #: bytes a resumed mirror did not copy again (in sync according to its resume log)
    resumed: int = 0
    #: bytes of guest writes the write-blocking mode copied to the target itself
    active_written: int = 0

    @property
    def current(self) -> int:
        return self._current

    @property
    def total(self) -> int:
        return self._total

    def update(self, done: int) -> None:
        """``done`` more bytes were processed (cf. job_progress_update)."""
        assert done >= 0
        self._current += done
        self._total = max(self._total, self._current)

    def set_remaining(self, remaining: int) -> None:
        """cf. job_progress_set_remaining: total := current + remaining."""
        self._total = self._current + max(remaining, 0)

    def increase_remaining(self, delta: int) -> None:
        """cf. job_progress_increase_remaining (active mirror writes)."""
        self._total += max(delta, 0)

    def count(self, kind: str, nbytes: int) -> None:
        """Add ``nbytes`` to one itemised counter ("copied", "zeroed", ...)."""
        assert nbytes >= 0
        setattr(self, kind, getattr(self, kind) + nbytes)


__all__ = ["Progress", "ProgressView"]
