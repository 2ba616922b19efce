"""Test support for suites that drive blockmirror: an in-process daemon over real QMP, typed
helpers for the virtual clock and fault rules, and a pytest plugin (``blockmirror.testing.
plugin``, registered through the ``pytest11`` entry point, so installing blockmirror is all a
suite needs).

Synchronous tests use ``start_daemon()`` or the fixtures; asyncio tests can use
``qmp_daemon()`` (an async context manager yielding a ``TestDaemon`` whose ``client()`` is a
``qemu.qmp.QMPClient``).

pytest imports the plugin, and so this package, in every run of every project that has
blockmirror installed: the names below are therefore loaded on first use (PEP 562), so that a
run that never starts a daemon does not pay for importing one.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from blockmirror.qmp.testing import RawQMP, TestDaemon, qmp_daemon
    from blockmirror.testing.daemon import (
        ClockControl,
        ClockInfo,
        ClockStep,
        CommandError,
        DaemonHandle,
        FaultControl,
        FaultRule,
        execute,
        start_daemon,
    )

_WHERE = {
    **dict.fromkeys(("ClockControl", "ClockInfo", "ClockStep", "CommandError", "DaemonHandle",
                     "FaultControl", "FaultRule", "execute", "start_daemon"),
                    "blockmirror.testing.daemon"),
    **dict.fromkeys(("RawQMP", "TestDaemon", "qmp_daemon"), "blockmirror.qmp.testing"),
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'blockmirror.testing' has no attribute '{name}'")
    return getattr(importlib.import_module(module), name)


__all__ = ["ClockControl", "ClockInfo", "ClockStep", "CommandError", "DaemonHandle",
           "FaultControl", "FaultRule", "RawQMP", "TestDaemon", "execute", "qmp_daemon",
           "start_daemon"]
