"""qapi/misc.json: human-monitor-command (qemu-storage-daemon has no HMP; blockmirror does)."""

from __future__ import annotations

from blockmirror.qapi.schema import command

command("human-monitor-command", {"command-line": "str", "*cpu-index": "int"}, returns="str",
        doc="an HMP subset: `drive_mirror [-n] [-f]`, `block_job_complete`, "
            "`block_job_cancel [-f]`, `info block-jobs`, `info block`, `help`")
