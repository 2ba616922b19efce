"""`blockmirror daemon --clock virtual|monotonic` (an extension option; QSD has no --clock)."""

from __future__ import annotations

import json
import subprocess
import sys

OURS = [sys.executable, "-m", "blockmirror.cli.main", "daemon"]
SCRIPT = b"""{"execute":"qmp_capabilities"}
{"execute":"x-query-clock"}
{"execute":"x-clock-advance","arguments":{"ns":1000}}
{"execute":"quit"}
"""


def _replies(*extra: str) -> list[dict[str, object]]:
    out = subprocess.run([*OURS, *extra, "--chardev", "stdio,id=s", "--monitor", "s"],
                         input=SCRIPT, capture_output=True, timeout=60, check=True).stdout
    return [json.loads(line) for line in out.decode().splitlines()[1:]]


def test_virtual_clock_from_the_command_line() -> None:
    _, info, step, _ = _replies("--clock", "virtual")
    assert info["return"]["virtual"] is True  # type: ignore[index]
    now = info["return"]["now-ns"]  # type: ignore[index]
    assert step == {"return": {"now-ns": now + 1000, "fired": 0}}


def test_default_clock_is_real_time() -> None:
    _, info, step, _ = _replies()
    assert info["return"]["virtual"] is False  # type: ignore[index]
    assert step["error"]["class"] == "GenericError"  # type: ignore[index]


def test_bad_clock_value() -> None:
    proc = subprocess.run([*OURS, "--clock", "sundial"], stdin=subprocess.DEVNULL,
                          capture_output=True, timeout=60, check=False)
    assert proc.returncode == 1
    assert proc.stderr.decode() == ("blockmirror: --clock sundial: Parameter 'clock' does not "
                                    "accept value 'sundial'\n")
