"""blockmirror's extensions for test authors: the virtual clock and run-time fault rules
(qmp/commands/testkit.py; the prose is in docs/qmp.md). Every name has the ``x-`` prefix
(``X_`` for the event)."""

from __future__ import annotations

from enum import StrEnum

from blockmirror.qapi.schema import command, event, qapi_enum, struct


@qapi_enum
class XFaultOperation(StrEnum):
    READ = "read"
    WRITE = "write"
    ZERO = "zero"
    DISCARD = "discard"
    FLUSH = "flush"
    BLOCK_STATUS = "block-status"


@qapi_enum
class XFaultErrno(StrEnum):
    EIO = "EIO"
    ENOSPC = "ENOSPC"
    EPERM = "EPERM"
    EACCES = "EACCES"
    EROFS = "EROFS"
    EINVAL = "EINVAL"
    ENOMEDIUM = "ENOMEDIUM"
    ENOTSUP = "ENOTSUP"
    EDQUOT = "EDQUOT"
    EFBIG = "EFBIG"
    ENOMEM = "ENOMEM"
    EAGAIN = "EAGAIN"
    ETIMEDOUT = "ETIMEDOUT"
    ESHUTDOWN = "ESHUTDOWN"
    ECONNRESET = "ECONNRESET"


struct("XClockInfo", {"virtual": "bool", "now-ns": "int", "timers": "int", "fired": "int",
                      "*next-deadline-ns": "int"})
struct("XClockStep", {"now-ns": "int", "fired": "int"})
struct("XFaultRule", {
    "id": "str", "node-name": "str", "operation": "XFaultOperation", "offset": "int",
    "*length": "int", "*nth": "int", "*probability": "number", "*seed": "int",
    "*errno": "XFaultErrno", "delay-ns": "int", "once": "bool", "matched": "int",
    "fired": "int",
})

command("x-query-clock", returns="XClockInfo",
        doc="extension: the daemon's clock (`--clock virtual` or real time)")
command("x-clock-advance", {"ns": "int"}, returns="XClockStep",
        doc="extension: move a virtual clock `ns` forward, firing due timers in order")
command("x-clock-run-to-next-timer", returns="XClockStep",
        doc="extension: jump a virtual clock to its earliest timer and fire it")
command("x-fault-add", {
    "node-name": "str", "operation": "XFaultOperation", "*id": "str", "*offset": "int",
    "*length": "int", "*nth": "int", "*probability": "number", "*seed": "int",
    "*errno": "XFaultErrno", "*delay-ns": "int", "*once": "bool",
}, returns="XFaultRule", doc="extension: fail or delay requests on a node at run time")
command("x-fault-remove", {"id": "str"}, doc="extension: remove a fault rule")
command("x-query-faults", {"*node-name": "str"}, returns=["XFaultRule"],
        doc="extension: the fault rules, with their match and fire counts")

event("X_FAULT_INJECTED", {"id": "str", "node-name": "str", "operation": "XFaultOperation",
                           "offset": "int", "length": "int", "*errno": "XFaultErrno",
                           "delay-ns": "int"},
      doc="extension: a fault rule fired (before its delay)")
