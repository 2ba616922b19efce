"""Findings already reported (bugs outside this helper's files): (harness, text, bug).

The runners count an input whose Finding message contains ``text`` as known, not as a new
failure, unless FUZZ_STRICT=1; each has a strict-xfail regression test naming the bug in
tests/fuzz/test_fuzz_regressions.py.
"""

from __future__ import annotations

KNOWN: list[tuple[str, str, str]] = [
    ("qcow2", "ValueError: embedded null byte",
     "a qcow2 backing file name with a NUL byte raises ValueError in block/options.py "
     "(_real/realpath) instead of QEMU's behaviour (the name ends at the NUL)"),
]


def known(harness: str, message: str) -> str | None:
    for h, text, bug in KNOWN:
        if h == harness and text in message:
            return bug
    return None
