"""Mirror job parameters, constants and the small helpers every mirror module shares.

``MirrorParams`` is what the QMP layer (``qmp/commands/mirror.py``) hands to ``start_mirror``;
the constants are QEMU's (block/mirror.c) limits on ops and bytes in flight.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

from blockmirror.block.driver import BlockStatus
from blockmirror.errors import BlockMirrorError

if TYPE_CHECKING:
    from blockmirror.block.bitmaps import NamedBitmap
    from blockmirror.block.node import BlockNode
    from blockmirror.jobs.mirror.converge import ConvergePolicy
    from blockmirror.jobs.mirror.resume import ResumePlan


#: cf. MAX_IN_FLIGHT, MAX_IO_BYTES, DEFAULT_MIRROR_BUF_SIZE
MAX_IN_FLIGHT = 16
MAX_IO_BYTES = 1 << 20
#: after READY, how long a trickle of guest writes is gathered before the next copy pass
#: (see MirrorJob._gather_left); half a job slice: in paired runs under a max-rate random
#: writer, 50 ms against 10 ms measured 3-5% more guest writes and 5-10% less CPU per write
GATHER_NS = 50_000_000
DEFAULT_BUF_SIZE = 16 << 20
#: the op blocker reason every node used by a mirror carries
BLOCKER_REASON = "block device is in use by block job: mirror"
#: any of these means the layer answers for the range itself (cf. BDRV_BLOCK_ALLOCATED)
ALLOC_BITS = BlockStatus.ALLOCATED | BlockStatus.DATA | BlockStatus.ZERO
#: the largest range one block-status or zero-init step covers (cf. mirror_dirty_init)
ZERO_INIT_STEP = (1 << 31) - 1


class MirrorMethod(StrEnum):
    COPY = "copy"
    ZERO = "zero"
    DISCARD = "discard"


class BackingMode(StrEnum):
    """What happens to the target's backing on success (cf. MirrorBackingMode)."""

    SOURCE = "source"  #: drive-mirror absolute-paths: attach the source's base
    OPEN = "open"  #: drive-mirror existing: open the backing named in the header
    LEAVE = "leave"  #: blockdev-mirror: never touch it


@dataclass
class MirrorParams:
    """Every argument of a mirror job, already validated by the QMP layer."""

    sync: str = "full"
    granularity: int = 0
    buf_size: int = 0
    speed: int = 0
    on_source_error: str = "report"
    on_target_error: str = "report"
    unmap: bool = True
    copy_mode: str = "background"
    filter_node_name: str | None = None
    replaces: str | None = None
    #: the target is known to read as zeroes (drive-mirror-created image, target-is-zero)
    target_is_zero: bool = False
    backing_mode: BackingMode = BackingMode.LEAVE
    auto_finalize: bool = True
    auto_dismiss: bool = True
    #: the job opened the target (drive-mirror): close it unless the pivot adopted it
    owns_target: bool = False
    #: extension x-converge: forecast (and a policy); None: QEMU's job, no forecast
    converge: ConvergePolicy | None = None
    #: x-resume-log: the checked resume plan (None: no resume log)
    resume: ResumePlan | None = None
    #: x-verify: compare source and target after READY, before the pivot
    verify: bool = False
    #: the JobType the job reports and names in its op blockers: "commit" for active commit
    job_type: str = "mirror"
    #: the target is in the source's backing chain (active commit, cf. target_is_backing):
    #: others may keep reading and writing it, and a shorter target is grown to the source
    target_is_backing: bool = False
    #: __org.blockmirror_bitmap (sync=bitmap): the named bitmap that seeds the job, already
    #: checked and looked up on the source (None: QEMU's job)
    sync_bitmap: NamedBitmap | None = None
    #: __org.blockmirror_bitmap-mode: what the sync bitmap holds after the job (BitmapSyncMode)
    bitmap_mode: str | None = None


def default_granularity(target: BlockNode) -> int:
    """cf. bdrv_get_default_bitmap_granularity: cluster size clamped to [4K, 64K], else 64K."""
    try:
        cluster = target.info().cluster_size
    except BlockMirrorError:
        cluster = 0
    if cluster <= 0:
        return 64 * 1024
    return min(max(cluster, 4096), 64 * 1024)


def align_up(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def align_down(n: int, a: int) -> int:
    return n // a * a


__all__ = ["ALLOC_BITS", "BLOCKER_REASON", "DEFAULT_BUF_SIZE", "GATHER_NS", "MAX_IN_FLIGHT",
           "MAX_IO_BYTES", "ZERO_INIT_STEP", "BackingMode", "MirrorMethod", "MirrorParams",
           "align_down", "align_up", "default_granularity"]
