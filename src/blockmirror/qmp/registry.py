"""The command registry: a handler for each command the schema (``blockmirror.qapi``) declares.

    @command("block-job-cancel")
    async def block_job_cancel(ctx: CommandContext, args: Args) -> None: ...

Arguments, return type and documentation are declared in the schema, never here. The session
validates arguments against the declaration before the handler runs (QEMU's texts for
missing, unexpected and mistyped members), so handlers only read ``args``; an absent optional
argument reads as its declared default. A handler returns the ``return`` value (None becomes
``{}``) or raises a ``BlockMirrorError``. Command modules live in ``qmp/commands/`` and are
imported by ``load_commands()``, which checks that every declared command has a handler, or
one at a time by ``find_command()``: a client's first call of a command imports that command's
module only (``quit`` must not import the mirror job; start-up CPU, issue 10).
"""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from blockmirror.block.graph import BlockGraph
from blockmirror.chardev import ChardevRegistry
from blockmirror.clock import Clock
from blockmirror.events import EventBus
from blockmirror.export.nbd_server import NbdServer
from blockmirror.jobs.manager import JobManager
from blockmirror.objects import ObjectRegistry
from blockmirror.qapi import COMMANDS as DECLARED
from blockmirror.qapi import ArgsRef, TypeRef


class DaemonAPI(Protocol):
    """What the QMP layer uses of the daemon that serves it (``daemon.Daemon`` is one).

    The daemon sits above the QMP layer, so commands see it through this interface.
    """

    graph: BlockGraph
    jobs: JobManager
    events: EventBus
    nbd: NbdServer | None
    quit_requested: asyncio.Event
    clock: Clock

    #: object-add/object-del change it; everything else only looks objects up
    objects: ObjectRegistry
    #: --chardev and chardev-add chardevs
    chardevs: ChardevRegistry

    def print_stdout(self, line: str) -> None: ...

    async def shutdown(self) -> None: ...


class Args(Mapping[str, Any]):
    """Validated arguments with typed accessors; absent optional members are simply absent."""

    def __init__(self, values: Mapping[str, Any],
                 defaults: Mapping[str, Any] | None = None) -> None:
        self._v = dict(values)
        #: the declared values of absent optional arguments (the typed getters use them)
        self._defaults = dict(defaults or {})

    @classmethod
    def of(cls, command_name: str, values: Mapping[str, Any]) -> Args:
        """Validated arguments of a declared command, with its declared defaults."""
        return cls(values, DECLARED[command_name].defaults)

    def _get(self, key: str, default: Any) -> Any:
        if key in self._v:
            return self._v[key]
        return default if default is not None else self._defaults.get(key)

    def __getitem__(self, key: str) -> Any:
        return self._v[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._v)

    def __len__(self) -> int:
        return len(self._v)

    def get_str(self, key: str, default: str | None = None) -> str:
        v = self._get(key, default)
        assert isinstance(v, str), key
        return v

    def opt_str(self, key: str) -> str | None:
        v = self._v.get(key)
        return v if isinstance(v, str) else None

    def get_int(self, key: str, default: int | None = None) -> int:
        v = self._get(key, default)
        assert isinstance(v, int), key
        return v

    def opt_int(self, key: str) -> int | None:
        v = self._v.get(key)
        return v if isinstance(v, int) and not isinstance(v, bool) else None

    def get_bool(self, key: str, default: bool | None = None) -> bool:
        v = self._get(key, default)
        if v is None:
            v = False
        assert isinstance(v, bool), key
        return v

    def as_dict(self) -> dict[str, Any]:
        return dict(self._v)


@dataclass
class CommandContext:
    """What a handler may touch: the daemon, and the monitor/session it was called from."""

    daemon: DaemonAPI
    #: the session object of the calling client (qmp/session.py), or None for internal calls
    session: Any = None
    #: text written by the command for HMP output / stdout lines (e.g. "Formatting ...")
    output: list[str] = field(default_factory=list)


Handler = Callable[[CommandContext, Args], Awaitable[Any]]
H = TypeVar("H", bound=Handler)


@dataclass(frozen=True)
class CommandDef:
    """A declared command with its handler (what the session and the server use)."""

    name: str
    #: the declared argument members, or (boxed) the name of a struct/union type
    args: ArgsRef
    handler: Handler
    returns: TypeRef | None = None
    allow_oob: bool = False
    defaults: Mapping[str, Any] = field(default_factory=dict)


COMMANDS: dict[str, CommandDef] = {}


def command(name: str) -> Callable[[H], H]:
    """Bind the decorated coroutine as the handler of the declared command ``name``."""
    decl = DECLARED.get(name)
    if decl is None:
        raise ValueError(f"QMP command {name} is not declared in blockmirror.qapi")

    def deco(fn: H) -> H:
        if name in COMMANDS:
            raise ValueError(f"QMP command {name} has two handlers")
        COMMANDS[name] = CommandDef(name, decl.args, fn, decl.returns, decl.allow_oob,
                                    decl.defaults)
        return fn

    return deco


_COMMAND_MODULES = ("control", "block", "query", "jobs", "mirror", "drive_mirror",
                    "mirror_group", "nbd", "hmp",
                    "bitmaps", "objects", "block_graph", "transaction", "testkit",
                    "backup", "snapshot_internal", "amend", "chardev", "x_blockdev", "commit")

#: the commands each module defines, for ``find_command``. Left out on purpose: commands that
#: see what other modules register (query-commands and query-qmp-schema list every command,
#: ``transaction`` runs actions that backup and snapshot_internal add, human-monitor-command
#: runs HMP commands of several modules); those, and any command missing here, load every
#: module. tests/unit/test_startup_imports.py checks this table against the registrations.
_DEFINED_IN: dict[str, tuple[str, ...]] = {
    "control": ("qmp_capabilities", "query-version", "quit"),
    "block": ("blockdev-add", "blockdev-del", "blockdev-create"),
    "query": ("query-named-block-nodes", "query-block", "x-debug-query-block-graph"),
    "jobs": ("job-cancel", "job-pause", "job-resume", "job-complete", "job-finalize",
             "job-dismiss", "query-jobs", "block-job-set-speed", "block-job-cancel",
             "block-job-pause", "block-job-resume", "block-job-complete", "block-job-finalize",
             "block-job-dismiss", "block-job-change", "query-block-jobs"),
    "mirror": ("blockdev-mirror",),
    "drive_mirror": ("drive-mirror",),
    "mirror_group": ("x-block-job-group", "x-block-job-group-complete",
                     "x-query-block-job-groups"),
    "nbd": ("nbd-server-start", "nbd-server-stop", "nbd-server-add", "nbd-server-remove",
            "block-export-add", "block-export-del", "query-block-exports"),
    "bitmaps": ("block-dirty-bitmap-add", "block-dirty-bitmap-remove",
                "block-dirty-bitmap-clear", "block-dirty-bitmap-enable",
                "block-dirty-bitmap-disable", "block-dirty-bitmap-merge",
                "x-debug-block-dirty-bitmap-sha256"),
    "objects": ("object-add", "object-del", "qom-list", "qom-get", "qom-set",
                "qom-list-properties", "qom-list-types"),
    "block_graph": ("block_resize", "blockdev-snapshot-sync", "blockdev-snapshot",
                    "change-backing-file", "block-set-write-threshold", "query-blockstats",
                    "blockdev-reopen"),
    "testkit": ("x-query-clock", "x-clock-advance", "x-clock-run-to-next-timer", "x-fault-add",
                "x-fault-remove", "x-query-faults"),
    "backup": ("blockdev-backup", "drive-backup"),
    "snapshot_internal": ("blockdev-snapshot-internal-sync",
                          "blockdev-snapshot-delete-internal-sync"),
    "amend": ("x-blockdev-amend",),
    "chardev": ("query-chardev", "query-chardev-backends", "ringbuf-write", "ringbuf-read",
                "chardev-add", "chardev-change", "chardev-remove", "chardev-send-break"),
    "x_blockdev": ("x-blockdev-change", "x-blockdev-set-iothread"),
    "commit": ("block-commit", "block-stream"),
}
_MODULE_OF = {name: mod for mod, names in _DEFINED_IN.items() for name in names}


def load_commands() -> dict[str, CommandDef]:
    """Import every command module; the result is in the schema's declaration order.

    Raises:
        RuntimeError: a declared command has no handler (a bug caught at start-up).
    """
    for mod in _COMMAND_MODULES:
        importlib.import_module(f"blockmirror.qmp.commands.{mod}")
    missing = [n for n in DECLARED if n not in COMMANDS]
    if missing:
        raise RuntimeError(f"declared QMP commands without a handler: {missing}")
    if list(COMMANDS) != list(DECLARED):
        ordered = {n: COMMANDS[n] for n in DECLARED}
        COMMANDS.clear()
        COMMANDS.update(ordered)
    return COMMANDS


def find_command(name: str) -> CommandDef | None:
    """The declared command ``name`` with its handler, importing only its module when the
    table above names it (every module otherwise); None for an undeclared name."""
    if name not in DECLARED:
        return None
    mod = _MODULE_OF.get(name)
    if mod is None:
        # every module, even when this command's own module came in with another one:
        # ``transaction`` was registered before backup's actions were
        return load_commands().get(name)
    cmd = COMMANDS.get(name)
    if cmd is None:
        importlib.import_module(f"blockmirror.qmp.commands.{mod}")
        cmd = COMMANDS.get(name)
    return cmd if cmd is not None else load_commands().get(name)
