"""Fuzzing the QMP session, and a daemon over its socket.

Invariant (cf. h11's fuzz/afl-server.py): whatever bytes arrive, in whatever chunking, the
session never raises; every reply it produces is one CRLF-terminated line of ASCII JSON
holding exactly one of "return"/"error"; and the same bytes fed whole or one at a time give
the same replies. 10,000 examples under CI=true, fewer locally.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blockmirror.qmp.registry import load_commands
from blockmirror.qmp.session import Execute, QMPSession, Reply
from blockmirror.qmp.testing import qmp_daemon

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
COMMANDS = load_commands()

# Interesting fragments, so random inputs reach deep states instead of dying at byte one.
FRAGMENTS = [
    b"{", b"}", b"[", b"]", b":", b",", b'"', b"'", b"\\", b"\\u", b"\\ud83d", b"0", b"-",
    b"1.5e3", b"007", b"true", b"null", b"nul", b"\xff", b"\x00", b"\x01", b"\xc3", b"\n",
    b'"execute"', b'"exec-oob"', b'"arguments"', b'"id"', b'"qmp_capabilities"',
    b'"query-version"', b'"blockdev-add"', b'"blockdev-del"', b'"node-name"', b'"driver"',
    b'"null-co"', b'{"execute":"qmp_capabilities"}', b'{"execute":"query-version","id":1}',
    b'{"execute":"blockdev-del","arguments":{"node-name":"x"}}', b'"enable":["oob"]',
]
inputs = st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.binary(max_size=8)), max_size=40)


def drive(chunks: list[bytes]) -> list[bytes]:
    s = QMPSession(COMMANDS)
    out = [s.greeting()]
    for chunk in chunks:
        s.receive_data(chunk)
        while (req := s.next_request()) is not None:
            if isinstance(req, Reply):
                out.append(req.data)
            else:
                assert isinstance(req, Execute)
                out.append(s.reply_return(req, None))
    return out


def well_formed(line: bytes) -> None:
    assert line.endswith(b"\r\n") and line.count(b"\n") == 1
    line.decode("ascii")
    msg = json.loads(line)
    assert isinstance(msg, dict)
    assert len({"return", "error", "QMP"} & set(msg)) == 1, msg
    if "error" in msg:
        assert set(msg["error"]) == {"class", "desc"}


@settings(max_examples=10_000 if IN_CI else 600, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(inputs)
def test_session_never_crashes(chunks: list[bytes]) -> None:
    replies = drive(chunks)
    for line in replies:
        well_formed(line)
    whole = b"".join(chunks)
    assert drive([whole]) == replies
    assert drive([whole[i:i + 1] for i in range(len(whole))]) == replies


@settings(max_examples=300 if IN_CI else 100, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(inputs)
def test_daemon_survives_fuzz(tmp_path: Path, chunks: list[bytes]) -> None:
    async def main() -> None:
        async with qmp_daemon(tmp_path) as td:
            bad = await td.raw()
            for chunk in chunks:
                await bad.send(chunk)
            await bad.send(b'\xff{"execute":"qmp_capabilities","id":"end"}')
            await bad.send(b'{"execute":"query-version","id":"end2"}')
            while True:
                line = await bad.recv_line()
                assert line, "daemon closed the fuzzing connection"
                well_formed(line)
                if b'"end2"' in line:
                    break
            # and a well-behaved client still gets service
            good = await td.raw(negotiate=True)
            assert "return" in await good.cmd("query-version")

    asyncio.run(main())
