"""qapi/job.json: the job core's types, the job-* commands and JOB_STATUS_CHANGE.

``JobStatus`` and ``JobVerb`` are the one declaration of these enums: ``jobs/status.py`` and
the schema both take them from here.
"""

from __future__ import annotations

from enum import StrEnum

from blockmirror.qapi.schema import command, event, qapi_enum, struct


@qapi_enum
class JobType(StrEnum):
    COMMIT = "commit"
    STREAM = "stream"
    MIRROR = "mirror"
    BACKUP = "backup"
    CREATE = "create"
    AMEND = "amend"
    SNAPSHOT_LOAD = "snapshot-load"
    SNAPSHOT_SAVE = "snapshot-save"
    SNAPSHOT_DELETE = "snapshot-delete"


@qapi_enum
class JobStatus(StrEnum):
    """``.value`` is the wire string."""

    UNDEFINED = "undefined"  #: not created yet (never reported)
    CREATED = "created"  #: exists, not started
    RUNNING = "running"  #: working
    PAUSED = "paused"  #: stopped at a pause point before READY
    READY = "ready"  #: in sync, waiting for complete/cancel
    STANDBY = "standby"  #: stopped at a pause point while READY
    WAITING = "waiting"  #: finished its work, waiting for its transaction
    PENDING = "pending"  #: waiting for finalize (auto or job-finalize)
    ABORTING = "aborting"  #: failed or cancelled, rolling back
    CONCLUDED = "concluded"  #: finished, waiting for dismiss
    NULL = "null"  #: gone


@qapi_enum
class JobVerb(StrEnum):
    CANCEL = "cancel"
    PAUSE = "pause"
    RESUME = "resume"
    SET_SPEED = "set-speed"
    COMPLETE = "complete"
    DISMISS = "dismiss"
    FINALIZE = "finalize"
    CHANGE = "change"


struct("JobInfo", {
    "id": "str", "type": "JobType", "status": "JobStatus", "current-progress": "int",
    "total-progress": "int", "*error": "str",
})

command("job-cancel", {"id": "str"},
        doc="job lookup errors are GenericError `Job not found`; always forced")
command("job-pause", {"id": "str"})
command("job-resume", {"id": "str"})
command("job-complete", {"id": "str"})
command("job-finalize", {"id": "str"})
command("job-dismiss", {"id": "str"})
command("query-jobs", returns=["JobInfo"],
        doc="QEMU 7.2's members (`current-progress`/`total-progress`)")

event("JOB_STATUS_CHANGE", {"id": "str", "status": "JobStatus"})

__all__ = ["JobStatus", "JobType", "JobVerb"]
