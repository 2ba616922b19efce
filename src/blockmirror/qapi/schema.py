"""The schema's building blocks, declared in Python the way qapi/*.json declares them.

Types are declared with ``enum()``, ``struct()``, ``union()`` and ``alternate()``; a type
reference is a type name (builtin or declared) or a one-element list for arrays, and a member
name with a leading ``*`` is optional, exactly as in QAPI JSON::

    enum("MirrorSyncMode", ["top", "full", "none", "incremental", "bitmap"])
    struct("BlockdevOptionsFile", {"filename": "str", "*aio": "BlockdevAioOptions"})

Commands and events are declared here too (``command()``, ``event()``): their argument and
data types, return types and one line of documentation. The QMP layer binds a handler to each
command by name; validation, introspection, the documentation and the StrEnums the code uses
(``qapi_enum``) all come from these declarations, and each is declared exactly once.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TypeVar

TypeRef = str | list[str]
#: a member spec: name (``*`` prefix: optional) -> type
MemberSpec = Mapping[str, TypeRef]

BUILTINS = frozenset(
    {
        "str", "int", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
        "size", "number", "bool", "null", "any", "QType",
    }
)


@dataclass(frozen=True)
class Member:
    """One member of a struct, union base or event: its name, type and whether it may be absent."""

    name: str
    type: TypeRef
    optional: bool = False


@dataclass(frozen=True)
class EnumType:
    """A QAPI enum: its name and its values in declaration order."""

    name: str
    values: tuple[str, ...]


@dataclass(frozen=True)
class StructType:
    """A QAPI struct: its own members and, if any, the struct it extends."""

    name: str
    members: tuple[Member, ...]
    base: str | None = None


@dataclass(frozen=True)
class UnionType:
    """A flat union: the base's members, a discriminator enum member, a struct per value."""

    name: str
    base: tuple[Member, ...]
    discriminator: str
    branches: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class AlternateType:
    """A QAPI alternate: a value of any one of ``choices``, told apart by its JSON type."""

    name: str
    choices: tuple[Member, ...]


SchemaType = EnumType | StructType | UnionType | AlternateType

#: the argument of a command: a member spec, or (boxed) a struct or union type name
ArgsRef = tuple[Member, ...] | str


@dataclass(frozen=True)
class CommandDecl:
    """A declared QMP command: its arguments, return type and documented defaults."""

    name: str
    args: ArgsRef
    returns: TypeRef | None = None
    allow_oob: bool = False
    #: the documented value of each optional argument when it is absent
    defaults: Mapping[str, object] = field(default_factory=dict)
    doc: str = ""
    #: the qapi module (ours: blockmirror.qapi.<module>) that declares it
    module: str = ""


@dataclass(frozen=True)
class EventDecl:
    """A declared QMP event: the members of its ``data``."""

    name: str
    data: tuple[Member, ...]
    doc: str = ""
    module: str = ""


TYPES: dict[str, SchemaType] = {}
COMMANDS: dict[str, CommandDecl] = {}
EVENTS: dict[str, EventDecl] = {}
#: enum name -> the StrEnum class the code uses for it (see ``qapi_enum``)
ENUM_CLASSES: dict[str, type[StrEnum]] = {}


def members_of(spec: MemberSpec) -> tuple[Member, ...]:
    out = []
    for key, typ in spec.items():
        optional = key.startswith("*")
        out.append(Member(key.lstrip("*"), typ, optional))
    return tuple(out)


def _declare(t: SchemaType) -> None:
    if t.name in TYPES:
        raise ValueError(f"schema type {t.name} declared twice")
    TYPES[t.name] = t


def enum(name: str, values: list[str]) -> EnumType:
    t = EnumType(name, tuple(values))
    _declare(t)
    return t


E = TypeVar("E", bound=type[StrEnum])


def qapi_enum(cls: E) -> E:
    """Declare the schema enum named like ``cls`` from its members, in their order.

    The class is the one declaration: code imports it, the schema is derived from it, so the
    two cannot disagree.
    """
    enum(cls.__name__, [m.value for m in cls])
    ENUM_CLASSES[cls.__name__] = cls
    return cls


def struct(name: str, members: MemberSpec, base: str | None = None) -> StructType:
    t = StructType(name, members_of(members), base)
    _declare(t)
    return t


def union(name: str, base: MemberSpec, discriminator: str, branches: dict[str, str]
          ) -> UnionType:
    t = UnionType(name, members_of(base), discriminator, dict(branches))
    _declare(t)
    return t


def alternate(name: str, choices: MemberSpec) -> AlternateType:
    t = AlternateType(name, members_of(choices))
    _declare(t)
    return t


def command(
    name: str,
    args: MemberSpec | str | None = None,
    *,
    returns: TypeRef | None = None,
    allow_oob: bool = False,
    defaults: Mapping[str, object] | None = None,
    doc: str = "",
) -> CommandDecl:
    """Declare a QMP command; ``args`` is a member spec or (boxed) a type name."""
    if name in COMMANDS:
        raise ValueError(f"QMP command {name} declared twice")
    ref: ArgsRef = args if isinstance(args, str) else members_of(args or {})
    decl = CommandDecl(name, ref, returns, allow_oob, dict(defaults or {}), doc,
                       _caller_module())
    COMMANDS[name] = decl
    return decl


def event(name: str, data: MemberSpec | None = None, *, doc: str = "") -> EventDecl:
    if name in EVENTS:
        raise ValueError(f"QMP event {name} declared twice")
    decl = EventDecl(name, members_of(data or {}), doc, _caller_module())
    EVENTS[name] = decl
    return decl


def _caller_module() -> str:
    """The module that called command() or event() (frame 0 is here, 1 the declarer)."""
    return str(sys._getframe(2).f_globals.get("__name__", ""))


def in_module_order(order: list[str]) -> None:
    """Reorder COMMANDS and EVENTS by declaring module (``order``), keeping the order within
    a module: query-commands and the documentation list them so."""
    rank = {m: i for i, m in enumerate(order)}
    for table in (COMMANDS, EVENTS):
        items = sorted(table.items(), key=lambda kv: rank.get(kv[1].module, len(rank)))
        table.clear()
        table.update(items)  # type: ignore[arg-type]


def struct_members(t: str) -> tuple[Member, ...]:
    """All members of a struct (base first), or a union's base members."""
    decl = TYPES[t]
    if isinstance(decl, StructType):
        base = struct_members(decl.base) if decl.base else ()
        return base + decl.members
    if isinstance(decl, UnionType):
        return decl.base
    raise KeyError(f"{t} has no members")


def enum_values(name: str) -> tuple[str, ...]:
    decl = TYPES[name]
    if not isinstance(decl, EnumType):
        raise KeyError(f"{name} is not an enum")
    return decl.values


def type_refs(t: TypeRef) -> list[str]:
    """The declared (non-builtin) type names a type reference names directly."""
    name = t[0] if isinstance(t, list) else t
    return [] if name in BUILTINS else [name]


def walk_types(roots: list[str], visit: Callable[[str], None]) -> None:
    """Call ``visit`` once for every type reachable from ``roots`` (members, bases, branches)."""
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        visit(name)
        decl = TYPES[name]
        refs: list[TypeRef] = []
        if isinstance(decl, StructType):
            refs = [m.type for m in decl.members] + ([decl.base] if decl.base else [])
        elif isinstance(decl, UnionType):
            refs = [m.type for m in decl.base] + list(decl.branches.values())
        elif isinstance(decl, AlternateType):
            refs = [m.type for m in decl.choices]
        for r in refs:
            todo += type_refs(r)


__all__ = [
    "BUILTINS", "COMMANDS", "ENUM_CLASSES", "EVENTS", "TYPES", "AlternateType", "ArgsRef",
    "CommandDecl", "EnumType", "EventDecl", "Member", "MemberSpec", "SchemaType", "StructType",
    "TypeRef", "UnionType", "alternate", "command", "enum", "enum_values", "event",
    "members_of", "qapi_enum", "struct", "struct_members", "type_refs", "union", "walk_types",
]
