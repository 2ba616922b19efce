"""Extensions of the mirror: convergence forecast and policy, switch-over groups.

Not in QEMU; every name carries the ``x-`` prefix (types ``X...``, events ``X_...``). A mirror
started without ``x-converge`` and never grouped reports and behaves exactly as QEMU 7.2's.
The arguments that turn them on are declared with the mirror commands in ``block_core``;
docs/qmp.md explains them in prose.
"""

from __future__ import annotations

from enum import StrEnum

from blockmirror.qapi.schema import command, event, qapi_enum, struct


@qapi_enum
class XConvergeVerdict(StrEnum):
    CONVERGING = "converging"  #: the dirty data shrinks (or the job keeps up at zero)
    NOT_CONVERGING = "not-converging"  #: the guest dirties data as fast as it is copied
    THROTTLED = "throttled-by-speed"  #: as NOT_CONVERGING, with the copy at its speed limit


@qapi_enum
class XConvergePolicy(StrEnum):
    NONE = "none"  #: forecast and report only
    AUTO = "auto"  #: the least intrusive action that works: write-blocking
    WRITE_BLOCKING = "write-blocking"  #: switch the copy mode to write-blocking
    THROTTLE = "throttle"  #: slow the guest's writes to x-converge-throttle bytes/s


@qapi_enum
class XConvergeAction(StrEnum):
    WRITE_BLOCKING = "write-blocking"
    THROTTLE = "throttle"


struct("XMirrorConvergenceInfo", {
    "verdict": "XConvergeVerdict", "reason": "str", "remaining": "int", "copy-rate": "int",
    "dirty-rate": "int", "*eta": "number", "policy": "XConvergePolicy", "deadline": "int",
    "*action": "XConvergeAction", "*action-reason": "str",
})
struct("XBlockJobGroupInfo", {"group": "str", "jobs": ["str"], "state": "str"})

command("x-block-job-group", {"group": "str", "jobs": ["str"]},
        doc="(extension) group READY-able mirror jobs for an atomic switch-over; members "
            "refuse a complete of their own")
command("x-block-job-group-complete", {"group": "str"},
        doc="(extension) every member READY: cut guest writes, converge, flush, pivot all "
            "at one instant, or none if one fails")
command("x-query-block-job-groups", returns=["XBlockJobGroupInfo"],
        doc="(extension) the groups not yet switched or failed")

event("X_BLOCK_JOB_CONVERGENCE", {
    "device": "str", "verdict": "XConvergeVerdict", "reason": "str", "remaining": "int",
    "copy-rate": "int", "dirty-rate": "int", "*eta": "number",
}, doc="(extension) the forecast's verdict changed")
event("X_BLOCK_JOB_CONVERGENCE_ACTION", {"device": "str", "action": "XConvergeAction",
                                         "reason": "str"},
      doc="(extension) the convergence policy acted")
event("X_BLOCK_JOB_GROUP_COMPLETED", {"group": "str", "jobs": ["str"], "pivoted": "bool",
                                      "*error": "str"},
      doc="(extension) a group switched over (pivoted) or failed (nothing pivoted)")

__all__ = ["XConvergeAction", "XConvergePolicy", "XConvergeVerdict"]
