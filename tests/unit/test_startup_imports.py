"""Start-up CPU (issue 10): what a daemon imports for the configuration it was given.

Most of the CPU a short-lived daemon spends is importing modules. A daemon that opens two
images, serves QMP and exports one image over NBD, then is told to ``quit`` (the command line
of benchmarks/bench_mirror.py), must not import what only other configurations need: the job
packages, the command modules it is not asked to run, the other drivers, the object types,
and a few standard modules that load shared libraries. Checked on a real daemon process, which
writes the names in ``sys.modules`` to a file as it exits (an atexit handler: the daemon runs
those before it ends the process); no time is asserted. (Not ``-X importtime``: it does not
list the modules imported through ``importlib.import_module``, as registries do.)

The tables that let commands and drivers load one module at a time are checked against what
the modules register.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from blockmirror.block import drivers
from blockmirror.block.drivers.qcow2.create import build_image
from blockmirror.qapi import COMMANDS as DECLARED
from blockmirror.qmp import registry
from blockmirror.qmp.testing import DaemonProcess, daemon_argv

#: never needed by that daemon (prefixes: a package stands for its modules)
_NOT_AT_START = (
    "blockmirror.jobs.mirror", "blockmirror.jobs.backup", "blockmirror.jobs.commit",
    "blockmirror.jobs.amend", "blockmirror.block.create",
    *(f"blockmirror.qmp.commands.{m}" for m in registry._COMMAND_MODULES
      if m not in ("control", "nbd")),
    *(f"blockmirror.block.drivers.{m}" for m in (
        "nbd", "rbd", "blkdebug", "null", "throttle", "mirror_top", "copy_before_write")),
    "blockmirror.block.drivers.qcow2.create",
    "blockmirror.objects.factory", "blockmirror.objects.throttle", "blockmirror.qmp.hmp",
    "blockmirror.cli.progress", "rich", "xxhash", "json", "hashlib", "random",
)


def _run_recording(record: Path) -> str:
    """``-c`` code that runs ``python -m blockmirror.cli.main`` and writes the names in
    sys.modules to ``record`` at exit."""
    return ("import atexit, runpy, sys\n"
            "def _record():\n"
            f"    with open({str(record)!r}, 'w') as f:\n"
            "        f.write('\\n'.join(sorted(sys.modules)))\n"
            "atexit.register(_record)\n"
            "runpy.run_module('blockmirror.cli.main', run_name='__main__', alter_sys=True)\n")


def _image(path: Path, fmt: str) -> None:
    size = 64 << 20
    if fmt == "raw":
        with open(path, "wb") as f:
            f.truncate(size)
        return
    writes, length = build_image(size)
    with open(path, "wb") as f:
        f.truncate(length)
        for offset, data in writes:
            f.seek(offset)
            f.write(data)


def _started_and_quit(fmt: str) -> set[str]:
    """The modules a daemon with bench_mirror's command line imports from start to quit."""
    d = Path(tempfile.mkdtemp(prefix="bm-start-"))  # short: unix socket paths are limited
    src, tgt = d / f"src.{fmt}", d / f"tgt.{fmt}"
    _image(src, fmt)
    _image(tgt, fmt)
    sock, pidfile = str(d / "qmp.sock"), d / "pid"
    argv = daemon_argv(
        "ours", sock,
        "--blockdev", f"driver=file,node-name=src-file,filename={src}",
        "--blockdev", f"driver={fmt},node-name=src,file=src-file",
        "--blockdev", f"driver=file,node-name=tgt-file,filename={tgt}",
        "--blockdev", f"driver={fmt},node-name=tgt,file=tgt-file",
        "--nbd-server", f"addr.type=unix,addr.path={d / 'nbd.sock'}",
        "--export", "type=nbd,id=e0,node-name=src,name=src,writable=on",
        "--pidfile", str(pidfile))
    record = d / "modules"
    i = argv.index("-m")
    argv[i:i + 2] = ["-c", _run_recording(record)]
    with DaemonProcess(argv, sock) as proc:
        with proc.connect() as qmp:
            qmp.send(b'{"execute": "qmp_capabilities"}')
            assert b'"return"' in qmp.read_message()
            qmp.send(b'{"execute": "quit"}')
            assert b'"return"' in qmp.read_until(b'"return"')[-1]
        assert proc.proc.wait(30) == 0, proc.output(stderr=True)
        # the pid file goes once every image is closed, just before the process ends
        assert not pidfile.exists()
    mods = set(record.read_text().split())
    for p in d.iterdir():
        p.unlink()
    d.rmdir()
    return mods


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_a_daemon_imports_only_what_its_command_line_needs(fmt: str) -> None:
    mods = _started_and_quit(fmt)
    # the parse found the imports: what this configuration does need is there
    for needed in ("blockmirror.block.drivers.file", f"blockmirror.block.drivers.{fmt}",
                   "blockmirror.qmp.commands.control", "blockmirror.export.nbd_server"):
        assert needed in mods, sorted(mods)
    unneeded = {m for m in mods
                if any(m == p or m.startswith(p + ".") for p in _NOT_AT_START)}
    if fmt == "raw":
        unneeded |= {m for m in mods if m.startswith("blockmirror.block.drivers.qcow2")}
    assert not unneeded, sorted(unneeded)


def test_the_command_table_names_each_commands_module() -> None:
    commands = registry.load_commands()
    for name, mod in registry._MODULE_OF.items():
        assert commands[name].handler.__module__ == f"blockmirror.qmp.commands.{mod}", name
    # left out on purpose (they see other modules' registrations); anything else new
    # belongs in the table, or its first call imports every command module
    assert set(DECLARED) - set(registry._MODULE_OF) == {
        "query-commands", "query-qmp-schema", "transaction", "human-monitor-command"}


def test_the_driver_table_names_each_drivers_module() -> None:
    table = drivers.load_all()
    for name, mod in drivers._MODULE_OF.items():
        assert table[name].__module__.startswith(f"blockmirror.block.drivers.{mod}"), name
    # every driver of the package is in the table (copy-before-write is the backup job's, not
    # one that blockdev-add opens; tests register drivers of their own)
    ours = {name for name, cls in table.items()
            if cls.__module__.startswith("blockmirror.block.drivers.")}
    assert ours - {"copy-before-write"} <= set(drivers._MODULE_OF)


def test_lazy_lookups_in_a_fresh_interpreter() -> None:
    """find_command imports one module, except for the commands that use what others
    register; listing the commands still lists every one."""
    script = textwrap.dedent("""
        import asyncio, sys
        from blockmirror.qmp.registry import Args, CommandContext, find_command
        from blockmirror.qapi import COMMANDS as DECLARED
        from blockmirror.block import drivers
        assert find_command("quit") is not None
        assert find_command("no-such-command") is None
        assert "blockmirror.qmp.commands.jobs" not in sys.modules
        # blockdev-snapshot-sync's module imports transaction's, which registers
        # ``transaction``: running it still needs the actions other modules add
        assert find_command("blockdev-snapshot-sync") is not None
        assert "blockmirror.qmp.commands.transaction" in sys.modules
        assert "blockmirror.qmp.commands.snapshot_internal" not in sys.modules
        assert find_command("transaction") is not None
        assert "blockmirror.qmp.commands.snapshot_internal" in sys.modules
        assert drivers.load("raw") is not None and drivers.load("nosuch") is None
        listed = asyncio.run(find_command("query-commands").handler(
            CommandContext(None), Args({})))
        assert [c["name"] for c in listed] == list(DECLARED), listed
        assert "blockmirror.qmp.commands.jobs" in sys.modules
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr



def test_a_mirror_without_resume_or_ceph_loads_neither(tmp_path: Path) -> None:
    """The first blockdev-mirror imports the mirror's command module and job package; the
    crash-resume machinery (x-resume-log) and json (the rbd driver's key=value pairs, the
    resume log's headers) come only with their first use, image creation (every format's
    creation code) only with drive-mirror's, and a zeroed range on a file (fallocate) needs
    no ctypes.util (which runs ``ldconfig -p``)."""
    script = textwrap.dedent("""
        import os, sys
        import blockmirror.qmp.commands.mirror
        import blockmirror.jobs.mirror.job
        from blockmirror.block import threadio
        path = sys.argv[1]
        fd = os.open(path, os.O_RDWR | os.O_CREAT)
        os.write(fd, b"x" * 65536)
        threadio.fallocate_sync(fd, threadio.FALLOC_FL_ZERO_RANGE, 0, 4096)
        assert os.pread(fd, 8, 0) == bytes(8)
        os.close(fd)
        os.unlink(path)
        loaded = sorted(m for m in sys.modules if m in (
            "blockmirror.jobs.mirror.resume", "blockmirror.jobs.mirror.activity_log",
            "json", "random", "ctypes.util", "blockmirror.block.create",
            "blockmirror.block.drivers.qcow2", "blockmirror.qmp.commands.drive_mirror"))
        assert not loaded, loaded
        from blockmirror.jobs.mirror.resume import ResumeCoordinator
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "f")],
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
