"""Job states and user verbs as named tables (pure; no I/O, no asyncio).

Theory of operation: a job's status only moves along ``TRANSITIONS`` (cf. QEMU ``JobSTT`` in
job.c), and ``Job._transition()`` in ``jobs/job.py`` is the single place that moves it. A user
command ("verb") is accepted only in the states ``VERBS`` lists (cf. ``JobVerbTable``); anything
else is refused with QEMU's text by ``verb_error()``.
"""

from __future__ import annotations

from blockmirror.errors import BlockMirrorError
from blockmirror.qapi.job import JobStatus, JobVerb  # the schema's enums (qapi/job.json)

S = JobStatus

#: legal status changes: from -> the statuses it may move to (cf. JobSTT)
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    S.UNDEFINED: frozenset({S.CREATED}),
    S.CREATED: frozenset({S.RUNNING, S.ABORTING, S.NULL}),
    S.RUNNING: frozenset({S.PAUSED, S.READY, S.WAITING, S.ABORTING}),
    S.PAUSED: frozenset({S.RUNNING}),
    S.READY: frozenset({S.STANDBY, S.WAITING, S.ABORTING}),
    S.STANDBY: frozenset({S.READY}),
    S.WAITING: frozenset({S.PENDING, S.ABORTING}),
    S.PENDING: frozenset({S.ABORTING, S.CONCLUDED}),
    S.ABORTING: frozenset({S.ABORTING, S.CONCLUDED}),
    S.CONCLUDED: frozenset({S.NULL}),
    S.NULL: frozenset(),
}

_ACTIVE = frozenset({S.CREATED, S.RUNNING, S.PAUSED, S.READY, S.STANDBY})

#: the statuses in which each user verb is accepted (cf. JobVerbTable)
VERBS: dict[JobVerb, frozenset[JobStatus]] = {
    JobVerb.CANCEL: _ACTIVE | {S.WAITING, S.PENDING},
    JobVerb.PAUSE: _ACTIVE,
    JobVerb.RESUME: _ACTIVE,
    JobVerb.SET_SPEED: _ACTIVE,
    JobVerb.CHANGE: _ACTIVE,
    JobVerb.COMPLETE: frozenset({S.READY, S.STANDBY}),
    JobVerb.FINALIZE: frozenset({S.PENDING}),
    JobVerb.DISMISS: frozenset({S.CONCLUDED}),
}


def can_transition(old: JobStatus, new: JobStatus) -> bool:
    return new in TRANSITIONS[old]


def verb_allowed(verb: JobVerb, status: JobStatus) -> bool:
    return status in VERBS[verb]


def verb_error(job_id: str, status: JobStatus, verb: JobVerb) -> BlockMirrorError:
    """The GenericError QEMU answers a verb the current status does not accept."""
    return BlockMirrorError(
        f"Job '{job_id}' in state '{status.value}' cannot accept command verb '{verb.value}'"
    )


__all__ = ["TRANSITIONS", "VERBS", "JobStatus", "JobVerb", "can_transition", "verb_allowed",
           "verb_error"]
