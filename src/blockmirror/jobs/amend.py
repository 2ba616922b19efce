"""The ``amend`` job of x-blockdev-amend (cf. blockdev-amend.c, QEMU 7.2).

Not a block job: no BLOCK_JOB_* events, and it stays CONCLUDED until dismissed (QEMU creates
it with JOB_MANUAL_DISMISS). Its progress is one unit, counted whatever the outcome. The only
qcow2 option 7.2 can amend is ``encrypt``, which needs an encrypted image; blockmirror opens
none, so that option always fails with QEMU's text and anything else changes nothing.
"""

from __future__ import annotations

from typing import Any

from blockmirror.block.node import BlockNode
from blockmirror.errors import BlockMirrorError
from blockmirror.jobs.job import Job
from blockmirror.jobs.manager import JobManager


class AmendJob(Job):
    job_type = "amend"
    is_block_job = False

    def __init__(self, manager: JobManager, job_id: str, node: BlockNode,
                 options: dict[str, Any], force: bool) -> None:
        super().__init__(manager, job_id, auto_finalize=True, auto_dismiss=False)
        self.node = node
        self.options = options
        self.force = force

    async def run(self) -> None:
        """cf. blockdev_amend_run over qcow2_co_amend."""
        self.progress.set_remaining(1)
        try:
            if self.options.get("encrypt") is not None:
                raise BlockMirrorError("image is not encrypted, can't amend")
        finally:
            self.progress.update(1)


__all__ = ["AmendJob"]
