"""Running backup/snapshot QMP scripts against qemu-storage-daemon 7.2 and against ours.

A step is one of:

* ``("qmp", name, args)``: a command; the events that arrived before its reply are kept;
* ``("job", name, args, job_ids[, status])``: a command that starts or ends jobs: the events
  after its reply until every job named reaches ``status`` (default ``null``) are kept too,
  so the outcome does not depend on how fast the job runs;
* ``("nbd", export, [qemu-io commands])``: guest I/O through the daemon's NBD server.

Each step's outcome is a JSON string (with the temporary directory replaced by ``T`` and
automatic node names by ``#block``), so the two daemons' transcripts compare line by line.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

from blockmirror.qmp.testing import DaemonProcess, SyncQMP, daemon_argv
from qsd_diff import command

Step = tuple[Any, ...]

#: commands whose job events QEMU emits before the reply (the job ends or resumes at once)
_SYNCHRONOUS = frozenset({"block-job-cancel", "job-cancel", "block-job-resume", "job-resume",
                          "block-job-finalize", "job-finalize"})


def nbd_io(sock: Path, export: str, *commands: str) -> str:
    argv = ["qemu-io", "-f", "raw"]
    for c in commands:
        argv += ["-c", c]
    r = subprocess.run([*argv, f"nbd+unix:///{export}?socket={sock}"], capture_output=True,
                       text=True, timeout=60)
    # qemu-io prints timings; only the verdict lines matter
    lines = [ln for ln in (r.stdout + r.stderr).splitlines()
             if "ops/sec" not in ln and not ln.startswith(("wrote ", "read "))]
    return f"rc={r.returncode} " + " | ".join(lines)


def _masked(info: dict[str, Any]) -> dict[str, Any]:
    """A SnapshotInfo without its time stamps (they differ by nature)."""
    return {k: ("N" if k.startswith(("date", "vm-clock")) else v) for k, v in info.items()}


def _wait_jobs(conn: SyncQMP, job_ids: list[str], until: str,
               before: list[dict[str, Any]], later: list[dict[str, Any]]) -> None:
    """Read events into ``later`` until the latest status of every job named (counting the
    events ``before`` the reply too) is ``until`` or ``null``."""
    while True:
        last: dict[str, str] = {}
        for e in (*before, *later):
            if e["event"] == "JOB_STATUS_CHANGE":
                last[e["data"]["id"]] = e["data"]["status"]
        if all(last.get(j) in (until, "null") for j in job_ids):
            return
        msg = json.loads(conn.read_message())
        if "event" in msg:
            msg.pop("timestamp", None)
            later.append(msg)


def run(kind: str, tmp: Path, nodes: list[str], steps: list[Step]) -> list[str]:
    """Start the daemon (``kind``: "qsd" or "ours") with ``nodes`` and run ``steps``; the
    daemon quits at the end (images are closed and flushed)."""
    sock = tmp / "qmp.sock"
    argv = daemon_argv(kind, str(sock))
    at = argv.index("--chardev")
    argv = [*argv[:at], *nodes, "--nbd-server", f"addr.type=unix,addr.path={tmp / 'nbd.sock'}",
            *argv[at:]]
    out: list[str] = []
    with DaemonProcess(argv, str(sock)) as proc, proc.connect() as conn:
        command(conn, "qmp_capabilities")
        for step in steps:
            if step[0] == "nbd":
                out.append(f"nbd {step[2]}: {nbd_io(tmp / 'nbd.sock', step[1], *step[2])}")
                continue
            name, args = step[1], step[2]
            events, reply = command(conn, name, args)
            if step[0] == "job" and "error" not in reply:
                later: list[dict[str, Any]] = []
                _wait_jobs(conn, list(step[3]), step[4] if len(step) > 4 else "null", events,
                           later)
                # where the reply falls among the events is QEMU's only for commands that
                # end or resume a job within themselves; a starting job's first events race
                # with the reply in QEMU too
                marker = [{"reply": "here"}] if name in _SYNCHRONOUS else []
                events = [*events, *marker, *later]
            if name == "query-named-block-nodes" and "return" in reply:
                # the graph and the bitmaps (file sizes differ: our qcow2 lays clusters out
                # differently; qemu-img compares the images themselves)
                reply = {"return": [[n["node-name"], n["drv"], n["ro"], n.get("backing_file"),
                                     n.get("dirty-bitmaps"),
                                     [_masked(i) for i in n["image"].get("snapshots", [])]]
                                    for n in reply["return"]]}
            if name == "blockdev-snapshot-delete-internal-sync" and "return" in reply:
                reply = {"return": _masked(reply["return"])}
            out.append(json.dumps({"cmd": name, "args": args, "events": events,
                                   "reply": reply}, sort_keys=True))
        events, reply = command(conn, "quit")
        proc.proc.wait(30)
    text = [re.sub(r"#block\d+", "#block", line.replace(str(tmp), "T")) for line in out]
    return text


def compare(want: list[str], got: list[str]) -> str:
    assert len(want) == len(got)
    bad = [f"  qsd:  {w}\n  ours: {g}" for w, g in zip(want, got, strict=True) if w != g]
    return f"{len(bad)}/{len(want)} steps differ:\n" + "\n".join(bad) if bad else ""


def img(*argv: str) -> str:
    r = subprocess.run(["qemu-img", *argv], capture_output=True, text=True, timeout=60)
    return f"rc={r.returncode} {r.stdout.strip()} {r.stderr.strip()}"


def snapshot_list(path: Path) -> list[tuple[str, ...]]:
    """``qemu-img snapshot -l`` rows as (id, tag, vm size, icount): the date and clock
    columns differ by nature."""
    r = subprocess.run(["qemu-img", "snapshot", "-l", str(path)], capture_output=True,
                       text=True, errors="replace", check=True)
    rows = []
    for line in r.stdout.splitlines()[2:]:
        # id, tag, size and unit, date, time (run into the clock when it is wide), icount
        parts = line.split()
        rows.append((parts[0], parts[1], " ".join(parts[2:4]), " ".join(parts[6:])))
    return rows


__all__ = ["compare", "img", "nbd_io", "run", "snapshot_list"]
