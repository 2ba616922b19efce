"""Monitor control commands: qmp_capabilities, query-version, query-commands,
query-qmp-schema, quit (cf. QEMU's monitor/qmp-cmds-control.c and qapi/control.json).

``qmp_capabilities`` is answered by the session itself (qmp/session.py); it is declared here so
that it appears in query-commands and query-qmp-schema like in QEMU.
"""

from __future__ import annotations

from typing import Any

from blockmirror.qapi import COMMANDS as DECLARED
from blockmirror.qapi import EVENTS
from blockmirror.qapi.introspect import introspect
from blockmirror.qmp.registry import Args, CommandContext, command, load_commands
from blockmirror.qmp.session import version_info


@command("qmp_capabilities")
async def qmp_capabilities(ctx: CommandContext, args: Args) -> None:
    # Only reached when called internally; a client's request never gets here (see session).
    return None


@command("query-version")
async def query_version(ctx: CommandContext, args: Args) -> dict[str, Any]:
    return version_info()


@command("query-commands")
async def query_commands(ctx: CommandContext, args: Args) -> list[dict[str, Any]]:
    # every command module, not just those a client used so far (find_command loads lazily)
    return [{"name": name} for name in load_commands()]


@command("query-qmp-schema")
async def query_qmp_schema(ctx: CommandContext, args: Args) -> list[dict[str, object]]:
    return introspect((DECLARED[name] for name in load_commands()), EVENTS.values())


@command("quit")
async def quit_(ctx: CommandContext, args: Args) -> None:
    # Jobs are force-cancelled and images closed before the reply, as QSD does; the server
    # sets quit_requested once the reply is written.
    await ctx.daemon.shutdown()
    return None
