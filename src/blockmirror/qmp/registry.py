"""The command registry: every QMP command is declared once, with its argument schema.

    @command("block-job-cancel", {"device": "str", "*force": "bool"})
    async def block_job_cancel(ctx: CommandContext, args: Args) -> None: ...

The dispatcher validates arguments against the declaration before calling the handler (QEMU's
texts for missing, unexpected and mistyped members), so handlers only read ``args``. A handler
returns the ``return`` value (None becomes ``{}``) or raises a ``BlockMirrorError``. Command
modules live in ``qmp/commands/`` and are imported by ``load_commands()``.
"""

from __future__ import annotations

import importlib
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from blockmirror.qmp.schema import TypeRef

if TYPE_CHECKING:
    from blockmirror.daemon import Daemon


class Args(Mapping[str, Any]):
    """Validated arguments with typed accessors; absent optional members are simply absent."""

    def __init__(self, values: Mapping[str, Any]) -> None:
        self._v = dict(values)

    def __getitem__(self, key: str) -> Any:
        return self._v[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._v)

    def __len__(self) -> int:
        return len(self._v)

    def get_str(self, key: str, default: str | None = None) -> str:
        v = self._v.get(key, default)
        assert isinstance(v, str), key
        return v

    def opt_str(self, key: str) -> str | None:
        v = self._v.get(key)
        return v if isinstance(v, str) else None

    def get_int(self, key: str, default: int | None = None) -> int:
        v = self._v.get(key, default)
        assert isinstance(v, int), key
        return v

    def opt_int(self, key: str) -> int | None:
        v = self._v.get(key)
        return v if isinstance(v, int) and not isinstance(v, bool) else None

    def get_bool(self, key: str, default: bool = False) -> bool:
        v = self._v.get(key, default)
        assert isinstance(v, bool), key
        return v

    def as_dict(self) -> dict[str, Any]:
        return dict(self._v)


@dataclass
class CommandContext:
    """What a handler may touch: the daemon, and the monitor/session it was called from."""

    daemon: Daemon
    #: the session object of the calling client (qmp/session.py), or None for internal calls
    session: Any = None
    #: text written by the command for HMP output / stdout lines (e.g. "Formatting ...")
    output: list[str] = field(default_factory=list)


Handler = Callable[[CommandContext, Args], Awaitable[Any]]
H = TypeVar("H", bound=Handler)


@dataclass(frozen=True)
class CommandDef:
    name: str
    #: a member spec, or (boxed) the name of a struct/union type used as the whole argument
    args: dict[str, TypeRef] | str | None
    handler: Handler
    boxed: bool = False
    returns: TypeRef | None = None
    allow_oob: bool = False
    allow_preconfig: bool = False


COMMANDS: dict[str, CommandDef] = {}
EVENTS: dict[str, dict[str, TypeRef]] = {}


def command(
    name: str,
    args: dict[str, TypeRef] | str | None = None,
    *,
    boxed: bool = False,
    returns: TypeRef | None = None,
    allow_oob: bool = False,
) -> Callable[[H], H]:
    def deco(fn: H) -> H:
        if name in COMMANDS:
            raise ValueError(f"QMP command {name} registered twice")
        COMMANDS[name] = CommandDef(name, args, fn, boxed, returns, allow_oob)
        return fn

    return deco


def event(name: str, data: dict[str, TypeRef] | None = None) -> None:
    """Declare an event (for query-qmp-schema)."""
    EVENTS[name] = data or {}


_COMMAND_MODULES = ("control", "block", "query", "jobs", "mirror", "nbd", "hmp", "testkit")


def load_commands() -> dict[str, CommandDef]:
    for mod in _COMMAND_MODULES:
        try:
            importlib.import_module(f"blockmirror.qmp.commands.{mod}")
        except ModuleNotFoundError as e:
            if e.name != f"blockmirror.qmp.commands.{mod}":
                raise
    return COMMANDS
