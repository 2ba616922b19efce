"""The QMP schema: every type, command and event blockmirror knows, declared once.

A leaf package (it imports only the standard library): the layers above validate QMP
arguments, command-line options and block-node options through it, the QMP layer binds a
handler to each declared command and introspects it, and the StrEnums the code uses are the
schema's own. Declarations are grouped by QEMU's qapi modules; importing this package
declares all of them, so nothing needs to be loaded in a particular order.
"""

from __future__ import annotations

from blockmirror.qapi import (  # noqa: F401  (declaring is importing)
    block_backup,
    block_core,
    block_export,
    char,
    control,
    job,
    misc,
    qom,
    sockets,
    testkit,
    transaction,
    x_mirror,
)
from blockmirror.qapi.checks import check_event, check_return
from blockmirror.qapi.schema import (
    COMMANDS,
    ENUM_CLASSES,
    EVENTS,
    TYPES,
    ArgsRef,
    CommandDecl,
    EventDecl,
    TypeRef,
    enum_values,
    struct_members,
)
from blockmirror.qapi.schema import in_module_order as _in_module_order
from blockmirror.qapi.validate import (
    Mode,
    SchemaError,
    validate,
    validate_command_args,
    validate_members,
)

# monitor control first, then the block layer, as QEMU's qapi-schema.json includes them
_in_module_order([f"blockmirror.qapi.{m}" for m in
                  ("control", "job", "block_core", "block_backup", "block_export", "char",
                   "misc", "qom",
                   "transaction", "x_mirror")])

__all__ = [
    "COMMANDS", "ENUM_CLASSES", "EVENTS", "TYPES", "ArgsRef", "CommandDecl", "EventDecl", "Mode",
    "SchemaError", "TypeRef", "check_event", "check_return", "enum_values", "struct_members",
    "validate", "validate_command_args", "validate_members",
]
