"""Extensions for test authors: the virtual clock and run-time fault rules (docs/qmp.md;
declared in qapi/testkit.py).

    x-query-clock               {"virtual", "now-ns", "timers", "fired", "*next-deadline-ns"}
    x-clock-advance ns          move a virtual clock forward, firing due timers in order
    x-clock-run-to-next-timer   jump to the earliest timer and fire it
    x-fault-add ...             add a fault rule to a node (block/faults.py)
    x-fault-remove id           remove one
    x-query-faults              list them
    X_FAULT_INJECTED            (event) a rule fired

None of these changes anything unless called: a daemon that never receives them behaves as
qemu-storage-daemon does.
"""

from __future__ import annotations

import math
from typing import Any

from blockmirror.block import faults
from blockmirror.clock import VirtualClock
from blockmirror.errors import BlockMirrorError
from blockmirror.qmp.registry import Args, CommandContext, command


def _virtual(ctx: CommandContext) -> VirtualClock:
    clock = ctx.daemon.clock
    if not isinstance(clock, VirtualClock):
        raise BlockMirrorError(
            "The clock is not virtual (start the daemon with --clock virtual)")
    return clock


@command("x-query-clock")
async def x_query_clock(ctx: CommandContext, args: Args) -> dict[str, Any]:
    clock = ctx.daemon.clock
    if not isinstance(clock, VirtualClock):
        return {"virtual": False, "now-ns": clock.now_ns(), "timers": 0, "fired": 0}
    out: dict[str, Any] = {"virtual": True, "now-ns": clock.now_ns(),
                           "timers": len(clock.pending()), "fired": clock.fired}
    nxt = clock.next_deadline()
    if nxt is not None:
        out["next-deadline-ns"] = nxt
    return out


@command("x-clock-advance")
async def x_clock_advance(ctx: CommandContext, args: Args) -> dict[str, Any]:
    clock = _virtual(ctx)
    ns = args.get_int("ns")
    if ns < 0:
        raise BlockMirrorError("Parameter 'ns' expects a non-negative value")
    fired = await clock.advance(ns)
    return {"now-ns": clock.now_ns(), "fired": fired}


@command("x-clock-run-to-next-timer")
async def x_clock_run_to_next_timer(ctx: CommandContext, args: Args) -> dict[str, Any]:
    clock = _virtual(ctx)
    before = clock.fired
    await clock.run_to_next_timer()
    return {"now-ns": clock.now_ns(), "fired": clock.fired - before}


# --- fault rules -------------------------------------------------------------------------------


def _all_rules(ctx: CommandContext) -> list[faults.FaultRule]:
    return [r for node in ctx.daemon.graph.all_nodes() for r in node.fault_rules]


def _nonneg(args: Args, key: str) -> int | None:
    v = args.opt_int(key)
    if v is not None and v < 0:
        raise BlockMirrorError(f"Parameter '{key}' expects a non-negative value")
    return v


@command("x-fault-add")
async def x_fault_add(ctx: CommandContext, args: Args) -> dict[str, Any]:
    daemon = ctx.daemon
    node_name = args.get_str("node-name")
    node = daemon.graph.find_node(node_name)
    if node is None:
        raise BlockMirrorError(f"Cannot find node '{node_name}'")
    existing = {r.id for r in _all_rules(ctx)}
    rule_id = args.opt_str("id")
    if rule_id is None:
        n = 0
        while f"fault{n}" in existing:
            n += 1
        rule_id = f"fault{n}"
    elif rule_id in existing:
        raise BlockMirrorError(f"Fault rule '{rule_id}' already exists")
    nth = args.opt_int("nth")
    if nth is not None and nth < 1:
        raise BlockMirrorError("Parameter 'nth' expects a value of at least 1")
    prob = args.get("probability")
    if prob is not None and not (math.isfinite(prob) and 0.0 <= prob <= 1.0):
        raise BlockMirrorError("Parameter 'probability' expects a number from 0 to 1")
    length = _nonneg(args, "length")
    if length == 0:
        raise BlockMirrorError("Parameter 'length' expects a positive value")
    delay = _nonneg(args, "delay-ns") or 0
    err_name = args.opt_str("errno")
    # a rule that only delays names no errno; one that does nothing else fails with EIO
    errno = faults.ERRNOS[err_name] if err_name is not None else (None if delay else
                                                                 faults.ERRNOS["EIO"])
    events = daemon.events

    def notify(rule: faults.FaultRule, operation: str, offset: int, length: int) -> None:
        data: dict[str, Any] = {"id": rule.id, "node-name": rule.node_name,
                                "operation": operation, "offset": offset, "length": length,
                                "delay-ns": rule.delay_ns}
        if rule.errno is not None:
            data["errno"] = faults.ERRNO_NAMES.get(rule.errno, str(rule.errno))
        events.emit("X_FAULT_INJECTED", data)

    rule = faults.FaultRule(
        id=rule_id, node_name=node_name, operation=args.get_str("operation"),
        offset=_nonneg(args, "offset") or 0, length=length, nth=nth,
        probability=None if prob is None else float(prob), seed=args.opt_int("seed") or 0,
        errno=errno, delay_ns=delay, once=args.get_bool("once", False),
        clock=daemon.clock, notify=notify,
    )
    faults.add_rule(node, rule)
    return rule.describe()


@command("x-fault-remove")
async def x_fault_remove(ctx: CommandContext, args: Args) -> None:
    rule_id = args.get_str("id")
    for node in ctx.daemon.graph.all_nodes():
        for rule in list(node.fault_rules):
            if rule.id == rule_id:
                faults.remove_rule(node, rule)
                return None
    raise BlockMirrorError(f"Fault rule '{rule_id}' not found")


@command("x-query-faults")
async def x_query_faults(ctx: CommandContext, args: Args) -> list[dict[str, Any]]:
    name = args.opt_str("node-name")
    return [r.describe() for r in _all_rules(ctx) if name is None or r.node_name == name]
