"""qapi/control.json (and misc.json's human-monitor-command): the monitor itself."""

from __future__ import annotations

from enum import StrEnum

from blockmirror.qapi.schema import command, enum, qapi_enum, struct, union


@qapi_enum
class QMPCapability(StrEnum):
    OOB = "oob"


struct("VersionTriple", {"major": "int", "minor": "int", "micro": "int"})
struct("VersionInfo", {"qemu": "VersionTriple", "package": "str"})
struct("CommandInfo", {"name": "str"})
# qapi/introspect.json: what query-qmp-schema returns, branch by meta-type
enum("SchemaMetaType", ["builtin", "enum", "array", "object", "alternate", "command", "event"])
enum("JSONType", ["string", "number", "int", "boolean", "null", "object", "array", "value"])
struct("SchemaInfoBuiltin", {"json-type": "JSONType"})
struct("SchemaInfoEnumMember", {"name": "str", "*features": ["str"]})
struct("SchemaInfoEnum", {"members": ["SchemaInfoEnumMember"], "values": ["str"]})
struct("SchemaInfoArray", {"element-type": "str"})
struct("SchemaInfoObjectMember", {"name": "str", "type": "str", "*default": "any",
                                  "*features": ["str"]})
struct("SchemaInfoObjectVariant", {"case": "str", "type": "str"})
struct("SchemaInfoObject", {"members": ["SchemaInfoObjectMember"], "*tag": "str",
                            "*variants": ["SchemaInfoObjectVariant"]})
struct("SchemaInfoAlternateMember", {"type": "str"})
struct("SchemaInfoAlternate", {"members": ["SchemaInfoAlternateMember"]})
struct("SchemaInfoCommand", {"arg-type": "str", "ret-type": "str", "*allow-oob": "bool"})
struct("SchemaInfoEvent", {"arg-type": "str"})
union("SchemaInfo", {"name": "str", "meta-type": "SchemaMetaType", "*features": ["str"]},
      "meta-type", {
          "builtin": "SchemaInfoBuiltin", "enum": "SchemaInfoEnum", "array": "SchemaInfoArray",
          "object": "SchemaInfoObject", "alternate": "SchemaInfoAlternate",
          "command": "SchemaInfoCommand", "event": "SchemaInfoEvent"})
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
