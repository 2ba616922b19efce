"""qapi/control.json (and misc.json's human-monitor-command): the monitor itself."""

from __future__ import annotations

from enum import StrEnum

from blockmirror.qapi.schema import command, enum, qapi_enum, struct


@qapi_enum
class QMPCapability(StrEnum):
    OOB = "oob"


struct("VersionTriple", {"major": "int", "minor": "int", "micro": "int"})
struct("VersionInfo", {"qemu": "VersionTriple", "package": "str"})
struct("CommandInfo", {"name": "str"})
struct("SchemaInfo", {"name": "str", "meta-type": "str"})
enum("MonitorMode", ["readline", "control"])
struct("MonitorOptions", {"*id": "str", "*mode": "MonitorMode", "*pretty": "bool",
                          "chardev": "str"})

command("qmp_capabilities", {"*enable": ["QMPCapability"]},
        doc="`enable: [\"oob\"]` accepted")
command("query-version", returns="VersionInfo",
        doc="QEMU 7.2.22's version triple; `package` names blockmirror")
command("query-commands", returns=["CommandInfo"])
command("query-qmp-schema", returns=["SchemaInfo"],
        doc="the schema describes our commands, types and events only")
command("quit", doc="cancels jobs (force), stops exports, flushes and closes images, then exits")
