"""Unit tests of the HMP registry and human-monitor-command (qmp/hmp.py)."""

from __future__ import annotations

import asyncio

from blockmirror.daemon import Daemon
from blockmirror.qmp.hmp import HMP_COMMANDS, hmp_command, run_hmp, split_line
from blockmirror.qmp.registry import CommandContext, load_commands


def test_split_line() -> None:
    assert split_line('drive_mirror -n  drive0 "/tmp/a b.qcow2" qcow2') == [
        "drive_mirror", "-n", "drive0", "/tmp/a b.qcow2", "qcow2"]
    assert split_line("   ") == []


def test_registry_and_dispatch() -> None:
    load_commands()

    @hmp_command("x_test_echo", "args...", "echo the arguments")
    async def echo(ctx: CommandContext, argv: list[str]) -> str:
        return " ".join(argv) + "\n"

    async def main() -> None:
        ctx = CommandContext(Daemon())
        assert await run_hmp(ctx, "x_test_echo a  b") == "a b\n"
        assert await run_hmp(ctx, "nope") == "unknown command: 'nope'\n"
        helptext = await run_hmp(ctx, "help")
        assert "x_test_echo args... -- echo the arguments" in helptext
        assert "info block" in helptext
        assert await run_hmp(ctx, "info block") == ""
        from blockmirror.block.options import open_blockdev

        await open_blockdev(ctx.daemon.graph, {"driver": "null-co", "node-name": "n0"})
        out = await run_hmp(ctx, "info block -n")
        assert out.startswith("n0: null-co:// (null-co)\n"), out
        await ctx.daemon.shutdown()

    try:
        asyncio.run(main())
    finally:
        del HMP_COMMANDS["x_test_echo"]
