"""QMP drive-mirror and HMP drive_mirror (cf. blockdev.c qmp_drive_mirror, hmp_drive_mirror).

drive-mirror creates the target image (printing the ``Formatting ...`` line on the daemon's
stdout), opens it without its backing, then runs the checks and the job blockdev-mirror runs
(``mirror.py``). Its own module because image creation imports every format's creation code,
which a daemon that only runs blockdev-mirror does without.
"""

from __future__ import annotations

from blockmirror.block.create import img_create
from blockmirror.block.options import close_node, open_image
from blockmirror.errors import BlockMirrorError
from blockmirror.jobs.mirror import BackingMode, MirrorParams
from blockmirror.qmp.commands.mirror import check_blocked, get_root_node, mirror_common
from blockmirror.qmp.hmp import hmp_command
from blockmirror.qmp.registry import Args, CommandContext, command


@command("drive-mirror")
async def drive_mirror(ctx: CommandContext, args: Args) -> None:
    """cf. qmp_drive_mirror."""
    daemon = ctx.daemon
    graph = daemon.graph
    bs = get_root_node(graph, args.get_str("device"))
    check_blocked(bs)
    mode = args.get_str("mode")
    fmt = args.opt_str("format")
    if fmt is None and mode != "existing":
        fmt = bs.format_name
    sync = args.get_str("sync")
    target_backing = bs.skip_filters().backing
    if target_backing is None and sync == "top":
        sync = "full"
    if sync == "none":
        target_backing = bs
    size = bs.length()
    if args.opt_str("replaces") is not None and args.opt_str("node-name") is None:
        raise BlockMirrorError(
            "a node-name must be provided when replacing a named node of the graph"
        )
    backing_mode = BackingMode.SOURCE if mode == "absolute-paths" else BackingMode.OPEN
    filename = args.get_str("target")
    if (sync == "full" or target_backing is None) and mode != "existing":
        assert fmt is not None
        await img_create(filename, fmt, size, printer=daemon.print_stdout)
    elif mode == "absolute-paths":
        assert fmt is not None and target_backing is not None
        explicit = target_backing.skip_implicit_filters()
        # NO_BACKING: the backing is not opened to check it (it is in use: the source)
        await img_create(filename, fmt, size, backing_file=explicit.filename,
                         backing_fmt=explicit.format_name, unsafe=True,
                         printer=daemon.print_stdout)
    target = await open_image(graph, filename, fmt, read_only=False, backing=False,
                              node_name=args.opt_str("node-name"))
    target_is_zero = mode != "existing" and target.driver.has_zero_init()
    params = MirrorParams(
        unmap=args.get_bool("unmap"),
        backing_mode=backing_mode,
        target_is_zero=target_is_zero,
        owns_target=True,
    )
    try:
        await mirror_common(ctx, args, bs, target, sync, params)
    except BlockMirrorError:
        if not target.parents:
            await close_node(graph, target)
        raise


@hmp_command("drive_mirror", "[-n] [-f] device target [format]",
             "initiates live storage migration for a device")
async def hmp_drive_mirror(ctx: CommandContext, argv: list[str]) -> str:
    """cf. hmp_drive_mirror: -n reuses an existing image, -f copies the whole chain."""
    reuse = "-n" in argv
    full = "-f" in argv
    rest = [a for a in argv if a not in ("-n", "-f")]
    # the monitor's own argument parser answers these (cf. monitor_parse_arguments)
    if not rest:
        return "drive_mirror: block device name expected\n"
    if len(rest) < 2:
        return "drive_mirror: string expected\n"
    values: dict[str, object] = {
        "device": rest[0], "target": rest[1], "sync": "full" if full else "top",
        "mode": "existing" if reuse else "absolute-paths", "unmap": True,
    }
    if len(rest) > 2:
        values["format"] = rest[2]
    await drive_mirror(ctx, Args.of("drive-mirror", values))
    return ""
