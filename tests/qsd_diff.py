"""Running one QMP script against qemu-storage-daemon 7.2 and against ours, for differential
tests of whole command sequences (replies, error classes and texts, events).

``transcript(kind, sock, steps, argv)`` starts the daemon, runs each step (a command name and
its arguments) and returns one entry per step: the reply, preceded by the events that arrived
before it (timestamps dropped). ``normalise`` sorts lists whose order is a hash-table accident
in QEMU (qom-list, qom-list-types) so they compare as sets.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from typing import Any

from blockmirror.qmp.testing import DaemonProcess, SyncQMP, daemon_argv

#: commands whose list replies QEMU orders by a GHashTable walk
UNORDERED = frozenset({"qom-list", "qom-list-types", "qom-list-properties"})

Step = tuple[str, dict[str, Any]]

_TAGS = itertools.count()


def command(conn: SyncQMP, name: str, args: dict[str, Any] | None = None, *,
            regreeting_ok: bool = False) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run one command; returns (events seen before the reply, reply).

    The command carries an ``id`` (both daemons echo it; it is taken off the reply again) so
    a reply that is not this command's is reported as such instead of being read as its
    answer. ``regreeting_ok``: a second copy of the connection's greeting is skipped (see
    ``transcript``); any other stray message still fails.
    """
    tag = f"diff-{next(_TAGS)}"
    msg: dict[str, Any] = {"execute": name, "id": tag}
    if args:
        msg["arguments"] = args
    conn.send(json.dumps(msg).encode())
    events = []
    while True:
        raw = conn.read_message()
        reply = json.loads(raw)
        if "event" in reply:
            reply.pop("timestamp", None)
            events.append(reply)
            continue
        if regreeting_ok and raw == conn.greeting:
            continue
        if reply.pop("id", None) != tag:
            raise AssertionError(f"{name}: a message that is not its reply: {raw!r}")
        return events, reply


def normalise(name: str, reply: dict[str, Any]) -> dict[str, Any]:
    ret = reply.get("return")
    if name in UNORDERED and isinstance(ret, list):
        reply = {**reply, "return": sorted(ret, key=lambda x: json.dumps(x, sort_keys=True))}
    return reply


def transcript(kind: str, sock: str, steps: list[Step], argv: list[str] | None = None,
               between: Callable[[int], None] | None = None) -> list[Any]:
    """The normalised outcome of every step on one daemon (``kind``: "qsd" or "ours")."""
    out: list[Any] = []
    # qemu-storage-daemon 7.2 greeted a connection twice once in CI (the second greeting
    # came where the qmp_capabilities reply was expected; not reproduced in 12 runs): likely
    # a connection that races the monitor's set-up in its I/O thread, which then sees two
    # "opened" events. The reference side tolerates that; ours must greet once.
    regreeting_ok = kind == "qsd"
    with DaemonProcess(daemon_argv(kind, sock, *(argv or [])), sock) as proc, \
            proc.connect() as conn:
        command(conn, "qmp_capabilities", regreeting_ok=regreeting_ok)
        for i, (name, args) in enumerate(steps):
            if between is not None:
                between(i)
            events, reply = command(conn, name, args, regreeting_ok=regreeting_ok)
            out.append({"step": i, "cmd": name, "args": args, "events": events,
                        "reply": normalise(name, reply)})
    return out


def diff(want: list[Any], got: list[Any]) -> str:
    """A readable list of the steps whose outcome differs ('' when none)."""
    lines = []
    for w, g in zip(want, got, strict=True):
        if w != g:
            lines.append(f"step {w['step']} {w['cmd']} {json.dumps(w['args'])}:\n"
                         f"  qsd:  {json.dumps(w['events'])} {json.dumps(w['reply'])}\n"
                         f"  ours: {json.dumps(g['events'])} {json.dumps(g['reply'])}")
    return "\n".join(lines)


def assert_same_log(want: list[Any], got: list[Any]) -> None:
    """``got`` (ours) equals ``want`` (qemu-storage-daemon's), entry by entry; the failure
    lists the entries that differ."""
    assert got == want, "\n".join(f"qsd:  {w}\nours: {g}"
                                  for w, g in zip(want, got, strict=False) if w != g)


def drop_host_sizes(v: Any) -> Any:
    """``v`` (a reply, or a part of one) without what the host files' sizes say: every
    ``actual-size`` (how many host bytes an image takes), and the ``virtual-size`` of a
    protocol node's image (its host file's length, which our qcow2 driver grows ahead of its
    writes where QEMU grows it per cluster)."""
    if isinstance(v, dict):
        if v.get("drv") == "file" and isinstance(v.get("image"), dict):
            v = {**v, "image": {k: x for k, x in v["image"].items() if k != "virtual-size"}}
        return {k: drop_host_sizes(x) for k, x in v.items() if k != "actual-size"}
    if isinstance(v, list):
        return [drop_host_sizes(x) for x in v]
    return v


__all__ = ["assert_same_log", "command", "diff", "drop_host_sizes", "normalise",
           "transcript"]
