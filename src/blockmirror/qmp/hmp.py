"""The HMP (human monitor) command registry, used by ``human-monitor-command``.

Any module registers a command with::

    @hmp_command("drive_mirror", "[-n] [-f] device target [format]", "initiates live mirroring")
    async def hmp_drive_mirror(ctx: CommandContext, argv: list[str]) -> str: ...

``argv`` is the command line split on blanks, without the command name; the handler returns
exactly the text HMP prints (usually "" or lines ending in "\\n"). ``info`` subcommands are
registered as ``"info block"``. Errors are raised as ``BlockMirrorError``; the dispatcher prints
them as HMP does ("Error: <desc>\\n"). Lines are split like QEMU's monitor: one level of
quoting with '"' is honoured.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from blockmirror.errors import BlockMirrorError

if TYPE_CHECKING:
    from blockmirror.qmp.registry import CommandContext

HmpHandler = Callable[["CommandContext", list[str]], Awaitable[str]]
F = TypeVar("F", bound=HmpHandler)


@dataclass(frozen=True)
class HmpCommand:
    """One human-monitor command: its usage line, help text and handler."""

    name: str
    args_usage: str
    help: str
    handler: HmpHandler


HMP_COMMANDS: dict[str, HmpCommand] = {}


def hmp_command(name: str, args_usage: str = "", help: str = "") -> Callable[[F], F]:
    """Register an HMP command (``name`` may be ``"info <sub>"``)."""

    def deco(fn: F) -> F:
        if name in HMP_COMMANDS:
            raise ValueError(f"HMP command {name} registered twice")
        HMP_COMMANDS[name] = HmpCommand(name, args_usage, help, fn)
        return fn

    return deco


def split_line(line: str) -> list[str]:
    """Split an HMP command line on blanks, honouring double quotes."""
    out: list[str] = []
    cur: list[str] = []
    quoted = False
    have = False
    for ch in line:
        if ch == '"':
            quoted = not quoted
            have = True
        elif ch.isspace() and not quoted:
            if have:
                out.append("".join(cur))
                cur, have = [], False
        else:
            cur.append(ch)
            have = True
    if have:
        out.append("".join(cur))
    return out


def help_text(prefix: str = "") -> str:
    lines = []
    for cmd in sorted(HMP_COMMANDS.values(), key=lambda c: c.name):
        if prefix == "info" and not cmd.name.startswith("info "):
            continue
        if prefix and prefix != "info" and cmd.name != prefix:
            continue
        usage = f"{cmd.name} {cmd.args_usage}".rstrip()
        lines.append(f"{usage} -- {cmd.help}\n")
    return "".join(lines)


async def run_hmp(ctx: CommandContext, line: str) -> str:
    """Execute one HMP command line; returns the monitor output."""
    argv = split_line(line)
    if not argv:
        return ""
    name, rest = argv[0], argv[1:]
    if name == "info":
        if not rest:
            return help_text("info")
        name, rest = f"info {rest[0]}", rest[1:]
    cmd = HMP_COMMANDS.get(name)
    if cmd is None:
        if name.startswith("info "):
            return help_text("info")
        return f"unknown command: '{name}'\n"
    try:
        return await cmd.handler(ctx, rest)
    except BlockMirrorError as e:
        return f"Error: {e.desc}\n"


__all__ = ["HMP_COMMANDS", "HmpCommand", "help_text", "hmp_command", "run_hmp", "split_line"]
