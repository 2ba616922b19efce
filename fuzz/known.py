"""Findings already reported (bugs outside this helper's files).

The runners count an input whose Finding message contains the texts as known, not as a new
failure, unless FUZZ_STRICT=1; each has a strict-xfail regression test naming the bug in
tests/fuzz/test_fuzz_regressions.py.
"""

from __future__ import annotations

#: (harness, substrings that must all be in the Finding's message, the bug)
KNOWN: list[tuple[str, tuple[str, ...], str]] = [
    # (empty: the NUL-name, snapshot-offset and query-qmp-schema findings are fixed and
    # are plain tests in tests/fuzz/test_fuzz_regressions.py)
]


def known(harness: str, message: str) -> str | None:
    for h, texts, bug in KNOWN:
        if h == harness and all(t in message for t in texts):
            return bug
    return None
