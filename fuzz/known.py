"""Findings already reported (bugs outside this helper's files).

The runners count an input whose Finding message contains the texts as known, not as a new
failure, unless FUZZ_STRICT=1; each has a strict-xfail regression test naming the bug in
tests/fuzz/test_fuzz_regressions.py.
"""

from __future__ import annotations

#: (harness, substrings that must all be in the Finding's message, the bug)
KNOWN: list[tuple[str, tuple[str, ...], str]] = [
    ("qcow2", ("ValueError: embedded null byte",),
     "a qcow2 backing file name with a NUL byte raises ValueError in block/options.py "
     "(_real/realpath) instead of QEMU's behaviour (the name ends at the NUL)"),
    ("qmp", ('"execute": "drive-mirror"', "internal error: embedded null byte"),
     "drive-mirror with a NUL byte in 'target' fails with 'internal error: embedded null "
     "byte' (ValueError from the path functions); QEMU's C code ends the name at the NUL"),
    ("qmp", ('"execute": "blockdev-snapshot-sync"', "internal error: embedded null byte"),
     "blockdev-snapshot-sync with a NUL byte in 'snapshot-file' fails with 'internal error: "
     "embedded null byte' (ValueError from the path functions); QEMU's C code ends the name "
     "at the NUL (the seeded slice reaches it once block-commit/block-stream are declared)"),
    ("qmp", ('"execute": "query-qmp-schema"', "Parameter 'return[0].ret-type' is unexpected"),
     "with BLOCKMIRROR_SCHEMA_CHECKS=1 (as under pytest) query-qmp-schema's own return value "
     "fails its declared type (SchemaInfo member ret-type); present on main too"),
]


def known(harness: str, message: str) -> str | None:
    for h, texts, bug in KNOWN:
        if h == harness and all(t in message for t in texts):
            return bug
    return None
