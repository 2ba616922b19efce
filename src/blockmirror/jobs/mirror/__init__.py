"""The mirror block job (cf. block/mirror.c), built from parts: see ``job.py`` for the map.

Import from this package; the modules are internal.
"""

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

__all__ = ["BLOCKER_REASON", "DEFAULT_BUF_SIZE", "MAX_IN_FLIGHT", "MAX_IO_BYTES", "BackingMode",
           "MirrorJob", "MirrorMethod", "MirrorParams", "default_granularity", "start_mirror"]
