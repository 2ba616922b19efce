"""The job state machine tables against QEMU's JobSTT / JobVerbTable, entry by entry."""

from __future__ import annotations

import itertools

import pytest

from blockmirror.errors import BlockMirrorError
from blockmirror.jobs.status import (
    TRANSITIONS,
    VERBS,
    JobStatus,
    JobVerb,
    can_transition,
    verb_allowed,
    verb_error,
)

# QEMU job.c, transcribed as QEMU writes them (rows: from; columns: U C R P Y S W D X E N)
_ORDER = "undefined created running paused ready standby waiting pending aborting concluded null"
_COLS = [JobStatus(s) for s in _ORDER.split()]
_JOB_STT = {
    "undefined": "0 1 0 0 0 0 0 0 0 0 0",
    "created": "0 0 1 0 0 0 0 0 1 0 1",
    "running": "0 0 0 1 1 0 1 0 1 0 0",
    "paused": "0 0 1 0 0 0 0 0 0 0 0",
    "ready": "0 0 0 0 0 1 1 0 1 0 0",
    "standby": "0 0 0 0 1 0 0 0 0 0 0",
    "waiting": "0 0 0 0 0 0 0 1 1 0 0",
    "pending": "0 0 0 0 0 0 0 0 1 1 0",
    "aborting": "0 0 0 0 0 0 0 0 1 1 0",
    "concluded": "0 0 0 0 0 0 0 0 0 0 1",
    "null": "0 0 0 0 0 0 0 0 0 0 0",
}
_VERB_TABLE = {
    "cancel": "0 1 1 1 1 1 1 1 0 0 0",
    "pause": "0 1 1 1 1 1 0 0 0 0 0",
    "resume": "0 1 1 1 1 1 0 0 0 0 0",
    "set-speed": "0 1 1 1 1 1 0 0 0 0 0",
    "complete": "0 0 0 0 1 1 0 0 0 0 0",
    "finalize": "0 0 0 0 0 0 0 1 0 0 0",
    "dismiss": "0 0 0 0 0 0 0 0 0 1 0",
    "change": "0 1 1 1 1 1 0 0 0 0 0",
}


@pytest.mark.parametrize(("old", "new"), list(itertools.product(_COLS, _COLS)))
def test_transition_matches_qemu(old: JobStatus, new: JobStatus) -> None:
    expected = _JOB_STT[old.value].split()[_COLS.index(new)] == "1"
    assert can_transition(old, new) is expected


@pytest.mark.parametrize(("verb", "status"), list(itertools.product(JobVerb, _COLS)))
def test_verb_matches_qemu(verb: JobVerb, status: JobStatus) -> None:
    expected = _VERB_TABLE[verb.value].split()[_COLS.index(status)] == "1"
    assert verb_allowed(verb, status) is expected


def test_tables_cover_every_member() -> None:
    assert set(TRANSITIONS) == set(JobStatus)
    assert set(VERBS) == set(JobVerb)


def test_verb_error_text() -> None:
    err = verb_error("j1", JobStatus.RUNNING, JobVerb.COMPLETE)
    assert isinstance(err, BlockMirrorError)
    assert err.qmp_class == "GenericError"
    assert str(err) == "Job 'j1' in state 'running' cannot accept command verb 'complete'"
