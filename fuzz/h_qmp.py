"""Harness: the QMP stream through the REAL command handlers on a real block graph.

Each input builds a fresh Daemon with a few nodes (null-co, raw over a file, qcow2 over a
file), then drives one QMPSession with it: the fuzzer's bytes choose between raw bytes (the
framing) and commands generated from the QAPI schema the registry declares (names from the
registry, arguments shaped by their types, values from a vocabulary of node names, job ids,
paths in the scratch directory, edge-case integers; now and then a wrong type). Every
Execute runs ``run_command`` exactly as the server does.

Invariants: every reply is one JSON object; no handler fails with an unexpected exception
(run_command turns those into "internal error: ..."); the daemon shuts down cleanly within
its time limit afterwards. String values never name paths outside the scratch directory.

The daemon runs on a virtual clock (``--clock virtual``): a command waiting on a timer (a
fault rule's delay, a job's pause) has time jump to that timer instead of sleeping, and the
fuzzer's ``x-clock-*`` commands work; shutdown releases every timer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from typing import Any

from blockmirror.block.create import img_create
from blockmirror.block.options import open_blockdev
from blockmirror.clock import VirtualClock
from blockmirror.daemon import Daemon
from blockmirror.qapi.schema import TYPES, AlternateType, EnumType, StructType, UnionType
from blockmirror.qmp.registry import load_commands
from blockmirror.qmp.server import run_command
from blockmirror.qmp.session import Execute, QMPSession, Reply
from fuzz.common import Finding, clean_scratch, require_sandbox, run, scratch
from fuzz.provider import Input

COMMANDS = load_commands()
NAMES = sorted(COMMANDS)
DICT = [b'{"execute":"', b'"arguments":{', b'"id":', b"}", b'"}', b"qmp_capabilities",
        *[n.encode() for n in NAMES]]

INTS = [0, 1, -1, 2, 512, 4096, 65536, 1 << 20, 1 << 30, 1 << 31, (1 << 32) - 1, 1 << 32,
        (1 << 63) - 1, -(1 << 63), 1 << 64, 3, 100, 1000, 1 << 36, 1 << 20, 65536]


def _vocab() -> list[str]:
    d = scratch()
    return ["n0", "n1", "f0", "q0", "q0-file", "f0-file", "j", "j1", "mf", "e0", "disk",
            "#block000", "", "x" * 200, "a b", "1abc", f"{d}/t1.raw", f"{d}/t2.qcow2",
            f"{d}/f0.raw", f"{d}/q0.qcow2", f"{d}/nope/x", f"{d}/nbd.sock", "t3.raw",
            "raw", "qcow2", "file", "null-co", "blkdebug", "nbd", "unix", "inet",
            "127.0.0.1", "0", "info block", "info jobs", "help", "qemu-io n0 'read 0 512'",
            "base:allocation", "off", "on", "report", "stop", "ignore", "full", "top", "none",
            "existing", "absolute-paths", "write-blocking", "background", "\u00e9\0\n"]


VOCAB: list[str] = []


def _str(inp: Input) -> str:
    if not VOCAB:
        VOCAB.extend(_vocab())
    return inp.pick(VOCAB)


#: string values by argument name: valid ones most of the time, so handlers run deep
BY_KEY = {
    "device": ["n0", "n1", "f0", "q0", "j", "mf"], "node-name": ["n0", "n1", "f0", "q0", "t"],
    "target": ["n1", "f0", "q0", "t1.raw", "t2.qcow2"], "node": ["n0", "f0", "q0"],
    "job-id": ["j", "j1"], "id": ["j", "j1", "e0"], "name": ["disk", "n0", "e0"],
    "filter-node-name": ["mf"], "replaces": ["n0", "q0"], "file": ["f0-file", "q0-file"],
    "filename": ["t1.raw", "t2.qcow2", "f0.raw"], "path": ["nbd.sock"],
    "driver": ["raw", "qcow2", "file", "null-co", "blkdebug"], "format": ["raw", "qcow2"],
    "backing": ["n0", "q0"], "command-line": ["info block", "info jobs", "help"],
}
_KEY: list[str] = [""]


def gen(inp: Input, t: Any, depth: int = 0, key: str = "") -> Any:
    """A value of type ``t`` (sometimes of the wrong type: the validator must say so)."""
    if inp.below(32) == 0 or depth > 6:
        return inp.pick([None, 1, "x", True, [], {}, -1.5, _str(inp)])
    if t == "str" and key in BY_KEY and inp.below(8) != 0:
        return inp.pick(BY_KEY[key])
    if isinstance(t, list):
        return [gen(inp, t[0], depth + 1) for _ in range(inp.below(4))]
    if isinstance(t, dict):  # an inline struct (command arguments, older registry)
        return _members(inp, [(k.lstrip("*"), v, k.startswith("*")) for k, v in t.items()],
                        depth)
    if isinstance(t, tuple):  # command arguments: a tuple of Members
        return _members(inp, [(m.name, m.type, m.optional) for m in t], depth)
    if t in ("str",):
        return _str(inp)
    if t in ("int", "int64", "uint64", "size", "int8", "int16", "int32", "uint8", "uint16",
             "uint32"):
        return inp.pick(INTS) if inp.below(4) else inp.int(4) - (1 << 31)
    if t == "bool":
        return inp.bool()
    if t == "number":
        return inp.pick([0.0, 1.5, -1.0, 1e300, 0.1])
    if t == "null":
        return None
    if t == "any":
        return gen(inp, inp.pick(["str", "int", "bool", ["int"]]), depth + 1)
    st = TYPES.get(t)
    if isinstance(st, EnumType):
        return inp.pick(st.values) if inp.below(16) else _str(inp)
    if isinstance(st, StructType):
        members = [(m.name, m.type, m.optional) for m in _struct_members(st)]
        return _members(inp, members, depth)
    if isinstance(st, UnionType):
        disc = next((m for m in st.base if m.name == st.discriminator), None)
        values = sorted(st.branches) or ["x"]
        choice = inp.pick(values)
        base = [(m.name, m.type, m.optional) for m in st.base if m.name != st.discriminator]
        out = _members(inp, base, depth)
        out[st.discriminator] = choice if disc is None or inp.below(16) else _str(inp)
        branch = TYPES.get(st.branches.get(choice, ""))
        if isinstance(branch, StructType):
            out.update(_members(inp, [(m.name, m.type, m.optional)
                                      for m in _struct_members(branch)], depth))
        return out
    if isinstance(st, AlternateType):
        return gen(inp, inp.pick(st.choices).type, depth + 1)
    return _str(inp)


def _struct_members(st: StructType) -> list[Any]:
    out = list(st.members)
    base = TYPES.get(st.base) if st.base else None
    if isinstance(base, StructType):
        out = _struct_members(base) + out
    return out


def _members(inp: Input, members: list[tuple[str, Any, bool]], depth: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, typ, optional in members:
        if (inp.below(3) != 0) if optional else (inp.below(32) == 0):
            continue
        out[name] = gen(inp, typ, depth + 1, name)
    if inp.below(16) == 0:
        out[_str(inp) or "bogus"] = 1
    return out


def command(inp: Input) -> bytes:
    name = inp.pick(NAMES)
    msg: dict[str, Any] = {"execute": name}
    if inp.below(8) == 0:
        msg = {"exec-oob" if inp.bool() else "execute": name}
    spec = COMMANDS[name].args
    if spec is not None and inp.below(8) != 0:
        args = gen(inp, spec)
        if args or inp.bool():
            msg["arguments"] = args
    if inp.bool():
        msg["id"] = inp.pick([1, "x", None, [1], {"a": 1}])
    raw = json.dumps(msg).encode()
    if inp.below(16) == 0 and raw:  # a damaged command
        pos = inp.below(len(raw))
        raw = raw[:pos] + inp.bytes(inp.below(4)) + raw[pos + inp.below(4):]
    return raw


#: q0.qcow2 as img_create made it
_PRISTINE: list[bytes] = []


async def _graph(d: Daemon) -> None:
    base = scratch()
    f0, q0 = os.path.join(base, "f0.raw"), os.path.join(base, "q0.qcow2")
    if not _PRISTINE:  # made once per process; every input starts from these bytes
        await img_create(q0, "qcow2", 1 << 20, quiet=True)
        with open(q0, "rb") as f:  # noqa: ASYNC230 - once per process, on tmpfs
            _PRISTINE.append(f.read())
    else:  # an input may have written to it (a mirror, qemu-io, blockdev-create on q0-file)
        # a new inode: a daemon left over by a hang keeps its locks on the old one
        os.unlink(q0)
        with open(q0, "wb") as f:  # noqa: ASYNC230 - a few hundred KiB on tmpfs
            f.write(_PRISTINE[0])
    with contextlib.suppress(FileNotFoundError):
        os.unlink(f0)
    with open(f0, "wb") as f:  # noqa: ASYNC230 - 1 MiB on tmpfs
        f.truncate(1 << 20)
    await open_blockdev(d.graph, {"driver": "null-co", "node-name": "n0", "size": 1 << 20,
                                  "read-zeroes": True})
    await open_blockdev(d.graph, {"driver": "null-co", "node-name": "n1", "size": 1 << 20})
    await open_blockdev(d.graph, {"driver": "raw", "node-name": "f0", "file": {
        "driver": "file", "node-name": "f0-file", "filename": f0}})
    await open_blockdev(d.graph, {"driver": "qcow2", "node-name": "q0", "file": {
        "driver": "file", "node-name": "q0-file", "filename": q0}})


#: how many timers a command may wait through in virtual time before it counts as stuck
MAX_TIMERS = 10_000
#: real time a command may take beyond its timers (sockets, files: not virtual)
REAL_LIMIT_S = 20.0
#: MAX_TIMERS fired over at least this much virtual time is a long wait, not a hang (a tight
#: loop of short timers stays a Finding)
LONG_WAIT_NS = 3600 * 10**9


class _LongWait(Exception):
    """A command waits longer in virtual time than an input is worth; the input ends."""


async def _execute(d: Daemon, clock: VirtualClock, session: QMPSession, req: Execute) -> bytes:
    """run_command, with virtual time passing while the command waits on a timer.

    A fault rule's delay (``x-fault-add delay-ns``) or a job's pause holds a command for
    that long in QEMU too; here the clock jumps to the next timer whenever the loop has
    nothing else to do, so a 68 s delay costs no real time. A command still not done after
    MAX_TIMERS timers, or waiting on something that is not a timer for REAL_LIMIT_S of real
    time, is a hang.
    """
    if req.name.startswith("x-clock-"):
        # these move the clock themselves (settling the loop as they go): a second settler
        # beside them would keep both busy until their pass limit
        try:
            return await asyncio.wait_for(run_command(d, session, req), REAL_LIMIT_S)
        except TimeoutError as e:
            raise Finding(f"command hung: {req.name} ({REAL_LIMIT_S} s of real time)") from e
    task = asyncio.ensure_future(run_command(d, session, req))
    fired = 0
    started = asyncio.get_running_loop().time()
    virtual_start = clock.now_ns()
    while not task.done():
        await clock.settle()
        if task.done():
            break
        if clock.next_deadline() is not None and fired < MAX_TIMERS:
            await clock.run_to_next_timer()
            fired += 1
            continue
        if clock.next_deadline() is not None and \
                clock.now_ns() - virtual_start >= LONG_WAIT_NS:
            # still waiting on timers after hours of virtual time: a long wait the input
            # asked for (an nbd open-timeout of days retrying a missing socket, as QEMU
            # would), not a hang; the input ends here (shutdown releases the timers)
            task.cancel()
            raise _LongWait(req.name)
        # no timer to jump to: real I/O (a socket peer), bounded in real time
        left = REAL_LIMIT_S - (asyncio.get_running_loop().time() - started)
        done, _ = await asyncio.wait({task}, timeout=max(left, 0))
        if not done:
            task.cancel()
            raise Finding(f"command hung: {req.name} "
                          f"({fired} timers fired, {REAL_LIMIT_S} s of real time)")
    return task.result()


async def _session(data: bytes) -> None:
    inp = Input(data)
    clock = VirtualClock()
    d = Daemon(clock)
    try:
        await _graph(d)
        session = QMPSession(COMMANDS, oob_offered=True)
        long_wait = False
        chunks: list[bytes] = []
        if inp.below(8) != 0:
            chunks.append(b'{"execute":"qmp_capabilities"}')
        for _ in range(1 + inp.below(8)):
            if inp.below(8) == 0:
                chunks.append(inp.bytes(inp.below(64)))  # raw framing bytes
            else:
                chunks.append(command(inp))
        for chunk in chunks:
            session.receive_data(chunk)
            if long_wait:
                break
            while (req := session.next_request()) is not None:
                if isinstance(req, Reply):
                    out = req.data
                else:
                    assert isinstance(req, Execute)
                    try:
                        out = await _execute(d, clock, session, req)
                    except _LongWait:
                        long_wait = True
                        break
                reply = json.loads(out)
                if not isinstance(reply, dict):
                    raise Finding(f"reply is not an object: {out!r}")
                err = reply.get("error", {}).get("desc", "")
                if err.startswith("internal error"):
                    raise Finding(f"{chunk[:300]!r} -> {err}")
            for _ in range(inp.below(4)):
                await asyncio.sleep(0)  # let jobs make progress between commands
    finally:
        try:
            await asyncio.wait_for(d.shutdown(), 20)
        except TimeoutError as e:
            raise Finding("daemon shutdown hung") from e


def one_input(data: bytes) -> None:
    require_sandbox()
    try:
        # a fresh loop per input: each VirtualClock hooks the loop's run_in_executor once,
        # and one loop for every input would stack a hook per input
        run(_session(data), 60, fresh_loop=True)
    finally:
        clean_scratch({"q0.qcow2"})
