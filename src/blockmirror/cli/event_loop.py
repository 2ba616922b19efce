"""Which asyncio event loop a long-running command runs on: uvloop's where it can.

A guest's request through the NBD export crosses the event loop two or three times (the
socket wakes it, the request's task starts, the reply goes out), and in CPython's own loop
that machinery (selector, handles, transports) costs more Python than the request itself.
uvloop implements the same asyncio API in C over libuv. Measured on this project's machine
class, qemu-io writing 64 KiB at queue depth 1 through the export of a ``null-co`` node
(4 interleaved runs of 15,000 writes): 73-78 µs of user CPU per write on CPython's loop,
56-62 µs on uvloop; under a READY qcow2 mirror 1,694 against 1,807 guest writes/s (medians
of 3, qemu-storage-daemon 2,290).

CPython's loop stays in two cases:

- ``--clock virtual``: the virtual clock (clock.py) looks at CPython's ready queue to tell
  when nothing is runnable before it moves time, and uvloop's loop has no such queue to
  look at;
- ``BLOCKMIRROR_EVENT_LOOP=asyncio`` in the environment: an escape hatch for comparing the
  two or for working around a problem in uvloop, without a rebuild.

Without uvloop installed (it is a dependency, but a hand-made environment may lack it),
CPython's loop is used as well.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

#: the environment variable that picks CPython's loop ("asyncio"); anything else or unset:
#: the default choice
ENV = "BLOCKMIRROR_EVENT_LOOP"


def loop_factory(*, virtual_clock: bool = False) -> Callable[[], asyncio.AbstractEventLoop]:
    """The factory ``asyncio.Runner`` should create the command's loop with."""
    if virtual_clock or os.environ.get(ENV) == "asyncio":
        return asyncio.new_event_loop
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop
    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T], *, virtual_clock: bool = False) -> T:
    """``asyncio.run(main)`` on the loop ``loop_factory`` picks."""
    with asyncio.Runner(loop_factory=loop_factory(virtual_clock=virtual_clock)) as runner:
        return runner.run(main)


__all__ = ["ENV", "loop_factory", "run"]
