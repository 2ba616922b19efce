"""The mirror block job (cf. block/mirror.c), built from parts: see ``job.py`` for the map.

Import from this package; the modules are internal.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from blockmirror.jobs.mirror.job import MirrorJob, start_mirror
from blockmirror.jobs.mirror.params import (
    BLOCKER_REASON,
    DEFAULT_BUF_SIZE,
    MAX_IN_FLIGHT,
    MAX_IO_BYTES,
    BackingMode,
    MirrorMethod,
    MirrorParams,
    default_granularity,
)

if TYPE_CHECKING:
    from blockmirror.block.node import BlockNode
    from blockmirror.jobs.mirror.resume import ResumePlan


async def plan_resume(path: str, source: BlockNode, target: BlockNode, granularity: int, *,
                      store: str, restart: bool, extents: int | None,
                      extent_size: int | None) -> ResumePlan:
    """x-resume-log's plan (``resume.plan_resume``); ``extents`` and ``extent_size`` None
    take the log's defaults.

    The resume machinery (its log formats, json, random: 4-5 ms of CPU) is imported here, on
    first use, not by every mirror's first start.
    """
    from blockmirror.jobs.mirror import resume

    opts = resume.ResumeOptions(
        path, store=store, restart=restart,
        extents=resume.DEFAULT_EXTENTS if extents is None else extents,
        extent_size=resume.DEFAULT_EXTENT_SIZE if extent_size is None else extent_size)
    return await resume.plan_resume(opts, source, target, granularity)


__all__ = ["BLOCKER_REASON", "DEFAULT_BUF_SIZE", "MAX_IN_FLIGHT", "MAX_IO_BYTES", "BackingMode",
           "MirrorJob", "MirrorMethod", "MirrorParams", "default_granularity", "plan_resume",
           "start_mirror"]
