"""Monitor control commands: qmp_capabilities, query-version, query-commands,
query-qmp-schema, quit (cf. QEMU's monitor/qmp-cmds-control.c and qapi/control.json).

``qmp_capabilities`` is answered by the session itself (qmp/session.py); it is declared here so
that it appears in query-commands and query-qmp-schema like in QEMU.
"""

from __future__ import annotations

from typing import Any

from blockmirror.qmp.registry import COMMANDS, EVENTS, Args, CommandContext, command
from blockmirror.qmp.schema import enum, introspect, struct
from blockmirror.qmp.session import version_info

enum("QMPCapability", ["oob"])
struct("VersionTriple", {"major": "int", "minor": "int", "micro": "int"})
struct("VersionInfo", {"qemu": "VersionTriple", "package": "str"})
struct("CommandInfo", {"name": "str"})
struct("SchemaInfo", {"name": "str", "meta-type": "str"})


@command("qmp_capabilities", {"*enable": ["QMPCapability"]})
async def qmp_capabilities(ctx: CommandContext, args: Args) -> None:
    # Only reached when called internally; a client's request never gets here (see session).
    return None


@command("query-version", returns="VersionInfo")
async def query_version(ctx: CommandContext, args: Args) -> dict[str, Any]:
    return version_info()


@command("query-commands", returns=["CommandInfo"])
async def query_commands(ctx: CommandContext, args: Args) -> list[dict[str, Any]]:
    return [{"name": name} for name in COMMANDS]


@command("query-qmp-schema", returns=["SchemaInfo"])
async def query_qmp_schema(ctx: CommandContext, args: Args) -> list[dict[str, object]]:
    cmds = [(c.name, c.args, c.returns, c.allow_oob) for c in COMMANDS.values()]
    return introspect(cmds, EVENTS)


@command("quit")
async def quit_(ctx: CommandContext, args: Args) -> None:
    # Jobs are force-cancelled and images closed before the reply, as QSD does; the server
    # sets quit_requested once the reply is written.
    await ctx.daemon.shutdown()
    return None
