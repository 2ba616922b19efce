"""The QMP session state machine, sans-IO: one per client connection.

Theory of operation. Bytes go in with ``receive_data()``; the server then pulls requests one at
a time with ``next_request()``, which returns either a finished ``Reply`` (parse errors, envelope
errors, unknown commands, argument errors, and ``qmp_capabilities`` itself, all handled here) or
an ``Execute`` for the server to run; its result goes back through ``reply_return()`` /
``reply_error()``. Pulling one request at a time matters: a ``qmp_capabilities`` followed by a
command in the same read must see the new mode. Events are turned into bytes by ``event()``,
which returns None while the client is still negotiating (cf. monitor_qapi_event_emit).

States (``Mode``): NEGOTIATION (only ``qmp_capabilities`` exists; any other command gets QEMU's
"Expecting capabilities negotiation" text) and COMMAND. The checks and their order follow
monitor/qmp.c handle_qmp_command and qapi/qmp-dispatch.c qmp_dispatch. This module owns no
socket, task or clock.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from blockmirror import QEMU_COMPAT_PACKAGE, QEMU_COMPAT_VERSION
from blockmirror.qapi import COMMANDS as DECLARED
from blockmirror.qapi import SchemaError, validate_command_args
from blockmirror.qmp.message import JSONParseError, JSONStreamer, encode, qdict_order
from blockmirror.qmp.registry import CommandDef

NEGOTIATION_HINT = "Expecting capabilities negotiation with 'qmp_capabilities'"
ALREADY_NEGOTIATED = "Capabilities negotiation is already complete, command ignored"

_NO_ID = object()



class Mode(Enum):
    #: greeting sent; only qmp_capabilities is accepted
    NEGOTIATION = "negotiation"
    #: capabilities negotiated; all commands and events
    COMMAND = "command"


@dataclass(frozen=True)
class Reply:
    """A reply the session produced itself; the server writes ``data`` as is."""

    data: bytes


@dataclass
class Execute:
    """A validated command for the server to run; answer with reply_return/reply_error."""

    name: str
    command: CommandDef
    arguments: dict[str, Any]
    id: Any = field(default=_NO_ID)
    oob: bool = False

    @property
    def has_id(self) -> bool:
        return self.id is not _NO_ID


Request = Reply | Execute


def version_info() -> dict[str, Any]:
    major, minor, micro = QEMU_COMPAT_VERSION
    # member order as QEMU's visitor inserts them; the printer reorders like a QDict
    return {"qemu": {"major": major, "minor": minor, "micro": micro},
            "package": QEMU_COMPAT_PACKAGE}


class QMPSession:
    """One client's protocol state. ``commands`` is the registry (name -> CommandDef)."""

    def __init__(
        self,
        commands: Mapping[str, CommandDef],
        *,
        oob_offered: bool = True,
        pretty: bool = False,
    ) -> None:
        self.commands = commands
        self.oob_offered = oob_offered
        self.pretty = pretty
        self.mode = Mode.NEGOTIATION
        self.oob_enabled = False
        self._streamer = JSONStreamer()
        self._parsed: deque[Any] = deque()

    # -- output ----------------------------------------------------------------------------

    def _encode(self, obj: dict[str, Any]) -> bytes:
        return encode(obj, self.pretty)

    def greeting(self) -> bytes:
        caps = ["oob"] if self.oob_offered else []
        return self._encode({"QMP": {"version": version_info(), "capabilities": caps}})

    def _error(self, cls: str, desc: str, id_: Any = _NO_ID) -> bytes:
        rsp: dict[str, Any] = {"error": {"class": cls, "desc": desc}}
        if id_ is not _NO_ID:
            rsp["id"] = id_
        return self._encode(rsp)

    def reply_return(self, req: Execute, value: Any) -> bytes:
        rsp: dict[str, Any] = {"return": {} if value is None else value}
        if req.has_id:
            rsp["id"] = req.id
        return self._encode(rsp)

    def reply_error(self, req: Execute, cls: str, desc: str) -> bytes:
        if self.mode is Mode.NEGOTIATION and cls == "CommandNotFound":
            desc = NEGOTIATION_HINT
        return self._error(cls, desc, req.id)

    def event(self, ev: Mapping[str, Any]) -> bytes | None:
        if self.mode is not Mode.COMMAND:
            return None
        return self._encode({"event": ev["event"], "data": ev["data"],
                             "timestamp": ev["timestamp"]})

    # -- input -----------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        self._parsed.extend(self._streamer.feed(data))

    @property
    def pending(self) -> int:
        """Parsed inputs not yet pulled by next_request()."""
        return len(self._parsed)

    @property
    def buffered(self) -> int:
        return self._streamer.buffered

    def next_request(self) -> Request | None:
        if not self._parsed:
            return None
        return self._classify(self._parsed.popleft())

    def _classify(self, obj: Any) -> Request:
        if isinstance(obj, JSONParseError):
            return Reply(self._error("GenericError", obj.desc))
        if not isinstance(obj, dict):
            return Reply(self._error("GenericError", "QMP input must be a JSON object"))
        id_ = obj.get("id", _NO_ID)
        allow_oob = self.oob_enabled

        def fail(desc: str, cls: str = "GenericError") -> Reply:
            if self.mode is Mode.NEGOTIATION and cls == "CommandNotFound":
                desc = NEGOTIATION_HINT
            return Reply(self._error(cls, desc, id_))

        exec_key: str | None = None
        for key in qdict_order(list(obj)):
            val = obj[key]
            if key == "execute" or (key == "exec-oob" and allow_oob):
                if not isinstance(val, str):
                    return fail(f"QMP input member '{key}' must be a string")
                if exec_key is not None:
                    return fail(f"QMP input member '{key}' clashes with '{exec_key}'")
                exec_key = key
            elif key == "arguments":
                if not isinstance(val, dict):
                    return fail("QMP input member 'arguments' must be an object")
            elif key != "id":
                return fail(f"QMP input member '{key}' is unexpected")
        if exec_key is None:
            return fail("QMP input lacks member 'execute'")
        name: str = obj[exec_key]
        oob = exec_key == "exec-oob"
        raw_args: dict[str, Any] = obj.get("arguments", {})

        if name == "qmp_capabilities":
            return self._capabilities(raw_args, id_, oob)
        cmd = self.commands.get(name) if self.mode is Mode.COMMAND else None
        if cmd is None:
            return fail(f"The command {name} has not been found", "CommandNotFound")
        if oob and not cmd.allow_oob:
            return fail(f"The command {name} does not support OOB")
        try:
            args = validate_command_args(cmd.args, raw_args)
        except SchemaError as e:
            return fail(e.desc)
        return Execute(name, cmd, args, id_, oob)

    def _capabilities(self, raw_args: dict[str, Any], id_: Any, oob: bool) -> Reply:
        def answer(rsp: dict[str, Any]) -> Reply:
            if id_ is not _NO_ID:
                rsp["id"] = id_
            return Reply(self._encode(rsp))

        if oob:
            return answer({"error": {"class": "GenericError",
                                     "desc": "The command qmp_capabilities does not support OOB"}})
        try:
            args = validate_command_args(DECLARED["qmp_capabilities"].args, raw_args)
        except SchemaError as e:
            return answer({"error": {"class": "GenericError", "desc": e.desc}})
        if self.mode is Mode.COMMAND:
            return answer({"error": {"class": "CommandNotFound", "desc": ALREADY_NEGOTIATED}})
        enable = args.get("enable", [])
        assert isinstance(enable, list)
        if "oob" in enable and not self.oob_offered:
            return answer({"error": {"class": "GenericError",
                                     "desc": "Capability oob not available"}})
        self.oob_enabled = "oob" in enable
        self.mode = Mode.COMMAND
        return answer({"return": {}})


__all__ = ["Execute", "Mode", "QMPSession", "Reply", "Request", "version_info"]
