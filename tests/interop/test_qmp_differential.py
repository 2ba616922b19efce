"""Differential test: the QMP corpus replayed against qemu-storage-daemon 7.2 and ours.

Invariant: for every case, the byte stream of replies is identical after normalising the
version package string and event timestamps. Each case runs in a fresh connection; after its
inputs a resync byte (0xFF, which QEMU's lexer always rejects) and a marker command are sent,
and everything up to the marker's reply is compared, so a case that leaves the parser inside
an object cannot swallow the next case.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from blockmirror.qmp.testing import DaemonProcess, daemon_argv
from conftest import IN_CI, ROOT, require_tool

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


@contextlib.contextmanager
def _daemons(tmp_path: Path, pretty: bool = False
             ) -> Iterator[tuple[DaemonProcess, DaemonProcess]]:
    """qemu-storage-daemon and ours, each with a monitor on a socket of its own."""
    qsock, osock = tmp_path / "qsd.sock", tmp_path / "bm.sock"
    with DaemonProcess(_argv("qsd", qsock, pretty), str(qsock)) as qsd, \
            DaemonProcess(_argv("ours", osock, pretty), str(osock)) as ours:
        yield qsd, ours


def _fuzz_settings() -> Any:
    """The fuzz tests' hypothesis settings: BM_DIFF_FUZZ examples (400 under CI=true, else
    120), no deadline, no example database."""
    from hypothesis import HealthCheck, settings

    examples = int(os.environ.get("BM_DIFF_FUZZ", 400 if IN_CI else 120))
    return settings(max_examples=examples, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("pretty", [False, True], ids=["compact", "pretty"])
def test_differential_against_qsd(tmp_path: Path, pretty: bool) -> None:
    require_tool("qemu-storage-daemon")
    # pretty output: the id forms exercise the pretty printer enough
    cases = CORPUS if not pretty else [c for c in CORPUS if c["name"].startswith("id-")]
    with _daemons(tmp_path, pretty) as (qsd, ours):
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


# -- differential fuzzing: random byte soups must get the same replies from both daemons ------

FRAGMENTS = [
    b"{", b"}", b"[", b"]", b":", b",", b'"', b"'", b"\\", b"\\u", b"\\ud83d", b"\\u00e9",
    b"0", b"-", b"1.5e3", b"007", b"1e400", b"true", b"null", b"nul", b"\xff", b"\x00", b"\x01",
    b"\xc3", b"\xc3\xa9", b"\n", b" ", b'"execute"', b'"exec-oob"', b'"arguments"', b'"id"',
    b'"qmp_capabilities"', b'"query-version"', b'"blockdev-del"', b'"node-name"', b'"driver"',
    b'"null-co"', b'"query-named-block-nodes"', b'"flat"', b'{"execute":"qmp_capabilities"}',
    b'{"execute":"query-version","id":1}', b'"enable":["oob"]', b'"enable":["x"]',
]


def test_differential_fuzz(tmp_path: Path) -> None:
    from hypothesis import given
    from hypothesis import strategies as st

    require_tool("qemu-storage-daemon")
    with _daemons(tmp_path) as (qsd, ours):

        @_fuzz_settings()
        @given(st.booleans(), st.lists(st.sampled_from(FRAGMENTS), max_size=25))
        def check(negotiate: bool, parts: list[bytes]) -> None:
            case = {"negotiate": negotiate, "send": [b"".join(parts).decode("latin-1")]}
            assert replay(ours, case) == replay(qsd, case)

        check()


def _json_values() -> Any:
    from hypothesis import strategies as st

    scalars = st.one_of(st.none(), st.booleans(), st.integers(-(1 << 65), 1 << 65),
                        st.sampled_from([1.5, -0.0, 1e300]),
                        st.sampled_from(["", "x", "on", "read_aio", "unix", "file", "null-co",
                                         "/nonexistent", "1", "threads", "unmap", "oob"]))
    return st.recursive(scalars, lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.sampled_from(KEYS), inner, max_size=4)), max_leaves=8)


KEYS = ["driver", "file", "filename", "backing", "cache", "direct", "no-flush", "size",
        "read-only", "discard", "detect-zeroes", "aio", "locking", "image", "inject-error",
        "event", "errno", "iotype", "server", "type", "path", "host", "port", "export",
        "offset", "latency-ns", "read-zeroes", "max-transfer", "take-child-perms", "bogus",
        "set-state", "new_state", "state", "x"]


def test_differential_fuzz_arguments(tmp_path: Path) -> None:
    """Random BlockdevOptions-like objects (without node-name, so nothing is ever opened)."""
    from hypothesis import given
    from hypothesis import strategies as st

    require_tool("qemu-storage-daemon")
    with _daemons(tmp_path) as (qsd, ours):

        @_fuzz_settings()
        @given(st.sampled_from(["null-co", "qcow2", "raw", "file", "blkdebug", "nbd", "zzz"]),
               st.dictionaries(st.sampled_from(KEYS), _json_values(), max_size=5))
        def check(driver: str, extra: dict[str, Any]) -> None:
            args = {"driver": driver, **extra}
            msg = json.dumps({"execute": "blockdev-add", "arguments": args, "id": 1})
            case = {"negotiate": True, "send": [msg]}
            assert replay(ours, case) == replay(qsd, case)

        check()
