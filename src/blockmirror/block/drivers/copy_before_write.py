"""The ``copy-before-write`` filter a backup job inserts above its source (cf.
block/copy-before-write.c).

Every request passes to the ``file`` child (the source). The copying itself is not done here:
the backup job hooks the source node with a write interceptor (``jobs/backup/cbw.py``), so that
writes reaching the source by any path first copy the old data to the target. The filter
exists so the source's users can be moved onto it as one (``replace_node``), and so the job
can be named in the graph (``filter-node-name``); unnamed filters are implicit and hidden from
queries, as QEMU's are.
"""

from __future__ import annotations

from blockmirror.block.drivers import register
from blockmirror.block.drivers.passthrough import PassThroughFilter


@register
class CopyBeforeWriteDriver(PassThroughFilter):
    format_name = "copy-before-write"
    role = "file"


__all__ = ["CopyBeforeWriteDriver"]
