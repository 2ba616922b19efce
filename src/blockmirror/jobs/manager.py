"""The job manager: ids, lookup, queries and verb dispatch for every job of a daemon.

(Placeholder until the job core lands; owned by the jobs layer.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from blockmirror.daemon import Daemon


class JobManager:
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    async def cancel_all_for_shutdown(self) -> None:
        return None
