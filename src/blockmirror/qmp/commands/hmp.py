"""``human-monitor-command`` and the HMP commands of the QMP layer (help, info block).

qemu-storage-daemon has no HMP; blockmirror offers it (like qemu-system does) because iotests
and people use ``drive_mirror``/``info block-jobs`` through it. Other modules register their
HMP commands with ``blockmirror.qmp.hmp.hmp_command``.
"""

from __future__ import annotations

from blockmirror.block.query import block_device_info
from blockmirror.qmp.hmp import help_text, hmp_command, run_hmp
from blockmirror.qmp.registry import Args, CommandContext, command


@command("human-monitor-command")
async def human_monitor_command(ctx: CommandContext, args: Args) -> str:
    return await run_hmp(ctx, args.get_str("command-line"))


@hmp_command("help", "[cmd]", "show the help")
async def hmp_help(ctx: CommandContext, argv: list[str]) -> str:
    return help_text(argv[0] if argv else "")


@hmp_command("info block", "[-n] [-v] [device]",
             "show info of one block device or all block devices "
             "(-n: show named nodes; -v: show details)")
async def hmp_info_block(ctx: CommandContext, argv: list[str]) -> str:
    # cf. hmp_info_block: without devices (as in QSD) only named nodes are listed, and only
    # with -n; one entry per node: "name: filename (driver[, read-only])" and a few details.
    nodes_flag = "-n" in argv
    names = [a for a in argv if not a.startswith("-")]
    out: list[str] = []
    graph = ctx.daemon.graph
    for blk in graph.backends:
        if not blk.name or (names and blk.name not in names):
            continue
        node = blk.node
        if node is None:
            out.append(f"{blk.name}: [not inserted]\n")
            continue
        out.append(_describe(blk.name, node.name, await block_device_info(node)))
    if nodes_flag:
        for node in graph.all_nodes():
            if node.implicit or (names and node.name not in names):
                continue
            out.append(_describe(node.name, None, await block_device_info(node)))
    return "\n".join(out)


def _describe(title: str, node_name: str | None, info: dict[str, object]) -> str:
    ro = ", read-only" if info.get("ro") else ""
    head = f"{title}" + (f" ({node_name})" if node_name else "")
    lines = [f"{head}: {info['file']} ({info['drv']}{ro})\n"]
    cache = info.get("cache")
    if isinstance(cache, dict):
        mode = "writeback" if cache.get("writeback") else "writethrough"
        if cache.get("direct"):
            mode += ", direct"
        if cache.get("no-flush"):
            mode += ", ignore flushes"
        lines.append(f"    Cache mode:       {mode}\n")
    if "backing_file" in info:
        lines.append(f"    Backing file:     {info['backing_file']} "
                     f"(chain depth: {info['backing_file_depth']})\n")
    if info.get("detect_zeroes") not in (None, "off"):
        lines.append(f"    Detect zeroes:    {info['detect_zeroes']}\n")
    return "".join(lines)
