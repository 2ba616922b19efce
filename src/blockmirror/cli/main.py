"""`blockmirror` entry point: dispatches to one module per subcommand.

    blockmirror daemon ...   qemu-storage-daemon compatible daemon  (cli/daemon.py)
    blockmirror mirror ...   one-shot live mirror with progress      (cli/mirror.py)
    blockmirror demo         the built-in example                    (cli/demo.py)
    blockmirror create ...   image creation, like qemu-img create    (cli/image.py)
    blockmirror info ...     image information, like qemu-img info   (cli/image.py)
    blockmirror map ...      allocation map, like qemu-img map       (cli/image.py)
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import importlib
import os
import sys

from blockmirror import __version__
from blockmirror.cli import early

SUBCOMMANDS = {
    "daemon": ("blockmirror.cli.daemon", "qemu-storage-daemon compatible storage daemon"),
    "mirror": ("blockmirror.cli.mirror", "mirror a live disk to a new destination"),
    "demo": ("blockmirror.cli.demo", "run the built-in live-mirror example"),
    "create": ("blockmirror.cli.image", "create a disk image (like qemu-img create)"),
    "info": ("blockmirror.cli.image", "show image information (like qemu-img info)"),
    "map": ("blockmirror.cli.image", "show the allocation map (like qemu-img map)"),
}


def usage() -> str:
    lines = [f"blockmirror {__version__}: live block-device mirroring, QEMU compatible", "",
             "usage: blockmirror COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<8} {desc}" for name, (_, desc) in SUBCOMMANDS.items()]
    lines += ["", "Run 'blockmirror COMMAND --help' for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; returns the exit status.

    ``argv``: the arguments after the program name; None for the process's own command line,
    and then ``blockmirror daemon`` ends the process itself after a clean shutdown (see
    ``_end_process``).
    """
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if args else 1
    if args[0] in ("-V", "--version"):
        print(f"blockmirror {__version__}")
        return 0
    name = args[0]
    if name not in SUBCOMMANDS:
        print(f"blockmirror: unknown command '{name}'\n\n{usage()}", file=sys.stderr)
        return 1
    if name == "daemon":
        # greet QMP clients while the daemon is still importing (see cli/early.py)
        early.start(args[1:])
        # Importing makes no garbage worth collecting, yet it allocates enough to trigger some
        # fifty collections; what it made (modules, classes, the schema tables) lives as long
        # as the process, so it goes to the permanent generation, which collections skip.
        gc.disable()
        try:
            module = importlib.import_module(SUBCOMMANDS[name][0])
            gc.freeze()
            gc.enable()
            rc: int = module.run(name, args[1:])
        finally:
            gc.enable()
            early.close()
        if rc == 0:
            # A clean shutdown flushed and closed every image: the collections the
            # interpreter runs on its way out would only look for cycles among objects that
            # the end of the process frees anyway (12 ms of CPU, issue 10)
            gc.freeze()
            if argv is None:
                _end_process(rc)
        return rc
    module = importlib.import_module(SUBCOMMANDS[name][0])
    rc = module.run(name, args[1:])
    return rc


def _end_process(rc: int) -> None:
    """Exit now, as the interpreter's own exit would, minus its teardown.

    Called once the daemon shut down cleanly: every image flushed and closed. The teardown
    frees every module and object one by one, 2-3 ms of CPU that the end of the process does
    at once (issue 10). What an exit does that matters is done first, in the interpreter's
    order: threading's exit hooks (the I/O pool's workers finish whatever is queued, then
    every non-daemon thread is joined), the atexit handlers (logging flushes its handlers),
    the standard streams. Returns, for the normal exit, where threading has no such hook.
    """
    import threading  # here: the early greeting (cli/early.py) does without it

    shutdown = getattr(threading, "_shutdown", None)  # what Py_FinalizeEx calls first
    if shutdown is None:
        return
    shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed or broken stream: nothing to keep
            stream.flush()
    os._exit(rc)


if __name__ == "__main__":
    sys.exit(main())
