"""Differential test: the QMP corpus replayed against qemu-storage-daemon 7.2 and ours.

Invariant: for every case, the byte stream of replies is identical after normalising the
version package string and event timestamps. Each case runs in a fresh connection; after its
inputs a resync byte (0xFF, which QEMU's lexer always rejects) and a marker command are sent,
and everything up to the marker's reply is compared, so a case that leaves the parser inside
an object cannot swallow the next case.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from blockmirror.qmp.testing import DaemonProcess, daemon_argv
from conftest import ROOT, require_tool

pytestmark = pytest.mark.interop

CORPUS = json.loads((ROOT / "tests" / "qmp_corpus" / "corpus.json").read_text())["cases"]
SYNC = b'\xff{"execute":"query-version","id":"__sync__"}'

_PACKAGE = re.compile(rb'"package": "[^"]*"')
_TIMESTAMP = re.compile(rb'"timestamp": \{"seconds": -?\d+, "microseconds": -?\d+\}')


def normalise(line: bytes) -> bytes:
    line = _PACKAGE.sub(b'"package": "P"', line)
    return _TIMESTAMP.sub(b'"timestamp": T', line)


def replay(proc: DaemonProcess, case: dict[str, Any]) -> list[bytes]:
    try:
        return _replay(proc, case)
    except (OSError, EOFError) as e:
        return [f"<{type(e).__name__}: {e}>".encode()]


def _replay(proc: DaemonProcess, case: dict[str, Any]) -> list[bytes]:
    with proc.connect() as conn:
        out = [normalise(conn.greeting)]
        if case["negotiate"]:
            conn.send(b'{"execute":"qmp_capabilities"}')
            out.append(conn.read_message())
        for chunk in case["send"]:
            if isinstance(chunk, list):  # [text, count]: a long input without a long file
                text, count = chunk
                conn.send(text.encode("latin-1") * count)
            else:
                conn.send(chunk.encode("latin-1"))
        conn.send(SYNC)
        out += [normalise(line) for line in conn.read_until(b'"__sync__"')]
    return out


def test_corpus_size() -> None:
    assert len(CORPUS) >= 60
    assert len({c["name"] for c in CORPUS}) == len(CORPUS)


def _argv(kind: str, sock: Path, pretty: bool) -> list[str]:
    argv = daemon_argv(kind, str(sock))
    if pretty:  # the monitor option is the last argument
        argv[-1] += ",pretty=on"
    return argv


@pytest.mark.parametrize("pretty", [False, True], ids=["compact", "pretty"])
def test_differential_against_qsd(tmp_path: Path, pretty: bool) -> None:
    require_tool("qemu-storage-daemon")
    # pretty output: the id forms exercise the pretty printer enough
    cases = CORPUS if not pretty else [c for c in CORPUS if c["name"].startswith("id-")]
    with DaemonProcess(_argv("qsd", tmp_path / "qsd.sock", pretty),
                       str(tmp_path / "qsd.sock")) as qsd, \
            DaemonProcess(_argv("ours", tmp_path / "bm.sock", pretty),
                          str(tmp_path / "bm.sock")) as ours:
        mismatches = []
        for case in cases:
            want = replay(qsd, case)
            got = replay(ours, case)
            if want != got:
                mismatches.append((case["name"], want, got))
        report = "\n".join(
            f"{name}:\n  qsd:  {b''.join(w)!r}\n  ours: {b''.join(g)!r}"
            for name, w, g in mismatches)
        assert not mismatches, f"{len(mismatches)}/{len(cases)} cases differ:\n{report}"
