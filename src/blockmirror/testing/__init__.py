"""Test support for suites that drive blockmirror: an in-process daemon over real QMP, typed
helpers for the virtual clock and fault rules, and a pytest plugin (``blockmirror.testing.
plugin``, registered through the ``pytest11`` entry point, so installing blockmirror is all a
suite needs).

Synchronous tests use ``start_daemon()`` or the fixtures; asyncio tests can use
``qmp_daemon()`` (an async context manager yielding a ``TestDaemon`` whose ``client()`` is a
``qemu.qmp.QMPClient``). Importing this package is cheap: nothing of the daemon loads until a
daemon starts.
"""

from __future__ import annotations

from typing import Any

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


def __getattr__(name: str) -> Any:
    # the asyncio helpers live with the QMP server (qmp/testing.py); load them on demand
    if name in ("qmp_daemon", "TestDaemon", "RawQMP"):
        from blockmirror.qmp import testing

        return getattr(testing, name)
    raise AttributeError(name)


__all__ = ["ClockControl", "ClockInfo", "ClockStep", "CommandError", "DaemonHandle",
           "FaultControl", "FaultRule", "RawQMP", "TestDaemon", "execute", "qmp_daemon",
           "start_daemon"]
