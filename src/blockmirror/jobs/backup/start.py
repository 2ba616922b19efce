"""Creating a backup job in QEMU 7.2's order (cf. backup_job_create), not yet started.

The caller (the QMP layer) has checked the arguments (cf. do_backup_common) and holds the
sync bitmap; from here on every failure undoes what was done, with QEMU's texts: the sizes,
the filter, the cluster size against ``max-chunk``, the job id, then (with a job already
created, so ``created``/``null`` events) the speed and the target's permissions.
"""

from __future__ import annotations

import functools

from blockmirror.block.graph import node_name_valid
from blockmirror.block.node import BlockBackend, BlockNode
from blockmirror.errors import BlockMirrorError
from blockmirror.jobs.backup.copy_state import cluster_size_for
from blockmirror.jobs.backup.job import BackupJob, BackupParams, release_unstarted
from blockmirror.jobs.backup.wiring import BackupWiring
from blockmirror.jobs.manager import JobManager


def _device_name(node: BlockNode) -> str:
    """cf. bdrv_get_device_name: the name of a BlockBackend using the node, or ''."""
    for link in node.parents:
        if isinstance(link.parent, BlockBackend) and link.parent.name:
            return link.parent.name
    return ""


def create_backup(manager: JobManager, job_id: str | None, source: BlockNode,
                  target: BlockNode, params: BackupParams) -> BackupJob:
    """The job, wired into the graph and hooked, but not started.

    Raises:
        BlockMirrorError: QEMU's text; nothing is left behind (the sync bitmap included).
    """
    try:
        if source.length() != target.length():
            raise BlockMirrorError("Source and target image have different sizes")
        name = params.filter_node_name
        if name is not None and not node_name_valid(name):
            raise BlockMirrorError(f"Could not create node: Invalid node-name: '{name}'")
        if name is not None and manager.graph.find_node(name) is not None:
            raise BlockMirrorError(
                f"Could not create node: Duplicate nodes with node-name='{name}'")
    except BlockMirrorError:
        if params.bitmap is not None:
            params.bitmap.finish(False)
        raise
    wiring = BackupWiring(manager.graph, job_id or "", source, target, name)
    try:
        filt = wiring.insert_filter()
    except BlockMirrorError:
        if params.bitmap is not None:
            params.bitmap.finish(False)
        raise
    try:
        cluster_size = cluster_size_for(target)
        if params.max_chunk and params.max_chunk < cluster_size:
            raise BlockMirrorError(
                f"Required max-chunk ({params.max_chunk}) is less than backup cluster size "
                f"({cluster_size})")
        if job_id is None:
            job_id = _device_name(filt)
        manager.check_new_id(job_id)
    except BlockMirrorError:
        wiring.detach()
        if params.bitmap is not None:
            params.bitmap.finish(False)
        raise
    wiring.job_id = job_id
    job = BackupJob(manager, job_id, source, target, params, wiring, cluster_size)
    manager.add(job)
    job.attach_at_speed(params.speed, functools.partial(release_unstarted, job))
    return job


__all__ = ["create_backup"]
