"""The stdio chardev (``--chardev stdio,id=X --monitor X``), as QEMU's iotests (qsd-jobs) use it:
the same output as qemu-storage-daemon for a script on stdin (a file or a pipe), commands only
after start-up, the same start-up errors."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import require_tool

SCRIPT = b"""{"execute":"qmp_capabilities"}
{"execute":"query-block-jobs"}
{"execute":"query-named-block-nodes","arguments":{"flat":true}}
{"execute":"no-such-command"}
{"execute":"blockdev-add","arguments":{"driver":"null-co","node-name":"n1","size":1048576}}
{"execute":"blockdev-add","arguments":{"driver":"null-co","node-name":"n1"}}
{"execute":"quit"}
"""

OURS = [sys.executable, "-m", "blockmirror.cli.main", "daemon"]


def _argv(kind: str) -> list[str]:
    base = ["qemu-storage-daemon"] if kind == "qsd" else OURS
    return [*base, "--chardev", "stdio,id=stdio", "--monitor", "chardev=stdio",
            "--blockdev", "driver=null-co,node-name=n0,size=65536"]


def _run(kind: str, stdin_file: Path | None) -> str:
    if stdin_file is not None:
        with open(stdin_file, "rb") as f:
            out = subprocess.run(_argv(kind), stdin=f, capture_output=True, timeout=60,
                                 check=True).stdout
    else:
        out = subprocess.run(_argv(kind), input=SCRIPT, capture_output=True, timeout=60,
                             check=True).stdout
    text = out.decode()
    return re.sub(r'"package": "[^"]*"', '"package": "PKG"', text)


@pytest.mark.parametrize("how", ["file", "pipe"])
def test_script_on_stdin_matches_qsd(tmp_path: Path, how: str) -> None:
    require_tool("qemu-storage-daemon")
    script = tmp_path / "script.json"
    script.write_bytes(SCRIPT)
    stdin = script if how == "file" else None
    ours, theirs = _run("ours", stdin), _run("qsd", stdin)
    assert ours == theirs
    lines = ours.splitlines()
    assert lines[0].startswith('{"QMP": ') and lines[1] == '{"return": {}}'
    assert len(lines) == 8  # greeting and seven replies: every command ran, after start-up
    assert '"node-name": "n0"' in lines[3]  # the --blockdev was open before the first command


@pytest.mark.parametrize(("args", "err"), [
    (["--chardev", "stdio,id=a", "--chardev", "stdio,id=b"],
     "--chardev stdio,id=b: cannot use stdio by multiple character devices"),
    (["--chardev", "stdio,id=a,signal=maybe"],
     "--chardev stdio,id=a,signal=maybe: Parameter 'signal' expects 'on' or 'off'"),
])
def test_stdio_option_errors_match_qsd(args: list[str], err: str) -> None:
    require_tool("qemu-storage-daemon")
    for argv, prog in ((["qemu-storage-daemon", *args], "qemu-storage-daemon"),
                       ([*OURS, *args], "blockmirror")):
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                              timeout=60, check=False)
        assert proc.returncode == 1
        assert proc.stderr.decode() == f"{prog}: {err}\n"


def test_daemon_outlives_stdin_eof(tmp_path: Path) -> None:
    # as QSD: end of input ends the session, not the daemon (a quit or a signal does)
    proc = subprocess.Popen([*OURS, "--chardev", "stdio,id=s", "--monitor", "s"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline().startswith(b'{"QMP": ')
        proc.stdin.close()
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(1.0)
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
