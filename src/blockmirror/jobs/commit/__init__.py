"""block-commit and block-stream (cf. block/commit.c, block/stream.c, and mirror.c's
commit_active_start): intermediate commit (``intermediate.py``), active commit on the mirror
engine (``active.py``), streaming (``stream.py``), and what they share: the job's links on
the nodes of the chain (``links.py``), the filters they insert (``filters.py``), the chain
rewiring (``chain.py``) and the copy-on-read serialisation (``serialise.py``).

Import from this package; the modules are internal.
"""

from blockmirror.jobs.commit.active import ActiveCommitJob, start_active_commit
from blockmirror.jobs.commit.intermediate import CommitJob, start_commit
from blockmirror.jobs.commit.links import chain_contains, filter_or_cow, find_base, find_overlay
from blockmirror.jobs.commit.stream import StreamJob, start_stream

__all__ = ["ActiveCommitJob", "CommitJob", "StreamJob", "chain_contains", "filter_or_cow",
           "find_base", "find_overlay", "start_active_commit", "start_commit", "start_stream"]
