"""Block jobs: a job that works on block nodes, with error policies and an I/O status.

cf. blockjob.c. Every block job (mirror today; commit, stream and backup later) reports I/O
errors the same way: ``error_action`` turns the job's ``on-source-error``/``on-target-error``
policy into an action (``enospc``/``auto`` mean "stop on ENOSPC, else report"), emits
BLOCK_JOB_ERROR, and for ``stop`` pauses the job as a user pause with the I/O status set, so
``block-job-resume`` (which clears the status) continues it.
"""

from __future__ import annotations

import errno
from collections.abc import Callable

from blockmirror.errors import BlockMirrorError
from blockmirror.jobs.job import Job


def policy_action(policy: str, err: int) -> str:
    """cf. block_job_error_action's choice: the action a policy takes for one errno."""
    if policy in ("enospc", "auto"):
        return "stop" if err == errno.ENOSPC else "report"
    return policy


class BlockJob(Job):
    """A job with QEMU's block-job error handling (cf. BlockJob)."""

    def error_action(self, policy: str, is_read: bool, err: int) -> str:
        """Apply ``policy`` to an I/O error; returns "report", "ignore" or "stop".

        The caller records the error when the action is "report".
        """
        action = policy_action(policy, err)
        self.events.emit("BLOCK_JOB_ERROR", {
            "device": self.id, "operation": "read" if is_read else "write", "action": action,
        })
        if action == "stop":
            if not self.user_paused:
                self.pause()
                self.user_paused = True
            self.iostatus_set_err(err)
        return action

    def attach(self) -> None:
        """Join the graph (filters, blockers, handles); ``dispose_unstarted`` undoes it."""

    def attach_at_speed(self, speed: int, on_failure: Callable[[], None] | None = None) -> None:
        """cf. the block job start functions: refuse a negative speed, set the limit and
        attach; on failure the job is disposed unstarted (after ``on_failure``)."""
        try:
            if speed < 0:
                raise BlockMirrorError("Parameter 'speed' expects a non-negative value")
            self.limit.set_speed(speed)
            self.attach()
        except BlockMirrorError:
            if on_failure is not None:
                on_failure()
            self.dispose_unstarted()
            raise


__all__ = ["BlockJob", "policy_action"]
