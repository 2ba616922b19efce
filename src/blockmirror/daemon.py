"""The daemon: one block graph, one job manager, the NBD server, the event bus, the monitors.

This is the wiring layer. Everything stateful hangs off a ``Daemon`` instance, so tests can run
several daemons in one process. The command line (``cli/daemon.py``) builds one and runs it;
``qmp/testing.py`` serves one in-process for tests. Shutdown (``quit``, signals) goes through
``shutdown()``, which is idempotent.
"""

from __future__ import annotations

import asyncio
import logging

from blockmirror.block.graph import BlockGraph
from blockmirror.block.options import close_all
from blockmirror.chardev import ChardevRegistry
from blockmirror.clock import Clock, make_clock
from blockmirror.events import EventBus
from blockmirror.export.nbd_server import NbdServer
from blockmirror.jobs.manager import JobManager
from blockmirror.objects import ObjectRegistry
from blockmirror.qapi import checks as schema_checks
from blockmirror.qmp.server import QMPServer

log = logging.getLogger(__name__)
# library logging stays silent unless the application configures it (set here, not in the
# package's __init__, which holds version constants only)
logging.getLogger("blockmirror").addHandler(logging.NullHandler())


class Daemon:
    def __init__(self, clock: Clock | str | None = None) -> None:
        """``clock``: a Clock, or "virtual"/"monotonic" (what ``--clock`` takes)."""
        if clock is None or isinstance(clock, str):
            clock = make_clock(clock or "monotonic")
        #: --object / object-add objects by id (secrets, TLS credentials, authz, throttle
        #: groups); the graph looks them up for its drivers, the NBD server through the graph
        self.objects = ObjectRegistry()
        self.graph = BlockGraph(objects=self.objects, clock=clock)
        #: --chardev and chardev-add chardevs by label
        self.chardevs = ChardevRegistry(self.objects)
        self.events = EventBus(check=schema_checks.report_event if schema_checks.enabled()
                               else None)
        self.clock: Clock = clock
        self.jobs: JobManager = JobManager(self.events, self.clock, self.graph)
        #: the NBD server, once nbd-server-start / --nbd-server ran
        self.nbd: NbdServer | None = None
        #: set by `quit` or a signal; the CLI waits on it
        self.quit_requested = asyncio.Event()
        #: lines the daemon prints on stdout (e.g. "Formatting ..."), for the CLI and tests
        self.stdout_lines: list[str] = []
        #: the QMP monitors (one server object serves every --monitor listener)
        self.qmp: QMPServer | None = None
        self._shut_down = False

    def print_stdout(self, line: str) -> None:
        self.stdout_lines.append(line)
        print(line, flush=True)

    def qmp_server(self, *, pretty: bool = False) -> QMPServer:
        """The daemon's QMP server, created on first use (commands are loaded then)."""
        if self.qmp is None:
            self.qmp = QMPServer(self, pretty=pretty)
        return self.qmp

    async def shutdown(self) -> None:
        """Cancel jobs, stop exports, flush and close every node (on quit and signals).

        Idempotent: ``quit`` runs it before its reply, and the CLI runs it again on exit.
        """
        if self._shut_down:
            return
        self._shut_down = True
        # a virtual clock lets go: jobs and delayed requests must not wait for an
        # x-clock-advance that can no longer come
        release = getattr(self.clock, "release", None)
        if release is not None:
            release()
        await self.jobs.cancel_all_for_shutdown()
        if self.nbd is not None:
            await self.nbd.stop()
            self.nbd = None
        await close_all(self.graph)
        self.chardevs.close_all()
