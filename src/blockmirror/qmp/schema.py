"""The QMP schema, declared in Python the way qapi/*.json declares it.

Types are declared with ``enum()``, ``struct()``, ``union()`` and ``alternate()``; a type
reference is a type name (builtin or declared) or a one-element list for arrays, and a member
name with a leading ``*`` is optional, exactly as in QAPI JSON::

    enum("MirrorSyncMode", ["top", "full", "none", "incremental", "bitmap"])
    struct("BlockdevOptionsFile", {"filename": "str", "*aio": "BlockdevAioOptions"})

Argument validation (with QEMU's error texts), ``query-commands`` and ``query-qmp-schema`` are
all derived from these declarations; no command checks its own argument types.
"""

from __future__ import annotations

from dataclasses import dataclass, field

TypeRef = str | list[str]

BUILTINS = frozenset(
    {
        "str", "int", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
        "size", "number", "bool", "null", "any", "QType",
    }
)


@dataclass(frozen=True)
class Member:
    name: str
    type: TypeRef
    optional: bool = False


@dataclass(frozen=True)
class EnumType:
    name: str
    values: tuple[str, ...]


@dataclass(frozen=True)
class StructType:
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
    name: str
    choices: tuple[Member, ...]


SchemaType = EnumType | StructType | UnionType | AlternateType

TYPES: dict[str, SchemaType] = {}


def members_of(spec: dict[str, TypeRef]) -> tuple[Member, ...]:
    out = []
    for key, typ in spec.items():
        optional = key.startswith("*")
        out.append(Member(key.lstrip("*"), typ, optional))
    return tuple(out)


def _declare(t: SchemaType) -> SchemaType:
    if t.name in TYPES and TYPES[t.name] != t:
        raise ValueError(f"schema type {t.name} declared twice, differently")
    TYPES[t.name] = t
    return t


def enum(name: str, values: list[str]) -> EnumType:
    t = EnumType(name, tuple(values))
    _declare(t)
    return t


def struct(name: str, members: dict[str, TypeRef], base: str | None = None) -> StructType:
    t = StructType(name, members_of(members), base)
    _declare(t)
    return t


def union(
    name: str, base: dict[str, TypeRef], discriminator: str, branches: dict[str, str]
) -> UnionType:
    t = UnionType(name, members_of(base), discriminator, dict(branches))
    _declare(t)
    return t


def alternate(name: str, choices: dict[str, TypeRef]) -> AlternateType:
    t = AlternateType(name, members_of(choices))
    _declare(t)
    return t
