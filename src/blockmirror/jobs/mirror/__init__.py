"""The mirror block job (cf. block/mirror.c), one module per part of its life.

``params`` (arguments, limits), ``hooks`` (the source's dirty tracker and write interceptor),
``base`` (shared state, pulse, error policy, drain), ``ops`` (the copy loop), ``seeding``
(dirty-bitmap seeding), ``active`` (write-blocking copies), ``pivot`` (completion) and ``job``
(``MirrorJob`` and ``start_mirror``). Import from this package; the split is internal.
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
