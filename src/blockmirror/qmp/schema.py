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


# -- validation (cf. qapi/qobject-input-visitor.c and qapi-visit-core.c) -------------------

_INT_RANGES: dict[str, tuple[int, int, str]] = {
    "int8": (-(1 << 7), (1 << 7) - 1, "int8_t"),
    "int16": (-(1 << 15), (1 << 15) - 1, "int16_t"),
    "int32": (-(1 << 31), (1 << 31) - 1, "int32_t"),
    "uint8": (0, (1 << 8) - 1, "uint8_t"),
    "uint16": (0, (1 << 16) - 1, "uint16_t"),
    "uint32": (0, (1 << 32) - 1, "uint32_t"),
}
_UNSIGNED = frozenset({"uint8", "uint16", "uint32", "uint64", "size"})

#: the JSON type an alternate branch of each builtin accepts
_QTYPE_OF_BUILTIN = {"str": str, "bool": bool, "null": type(None), "number": float}


class SchemaError(Exception):
    """A schema-validation failure; the dispatcher turns it into a GenericError."""

    def __init__(self, desc: str) -> None:
        super().__init__(desc)
        self.desc = desc


def _bad_type(full: str, expected: str) -> SchemaError:
    return SchemaError(f"Invalid parameter type for '{full}', expected: {expected}")


def _qtype(v: object) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, int | float):
        return "number"
    if isinstance(v, str):
        return "str"
    if isinstance(v, list):
        return "list"
    return "dict"


def _type_qtype(t: TypeRef) -> str:
    """Which JSON type a type reference is visited from (for alternate dispatch)."""
    if isinstance(t, list):
        return "list"
    if t in ("str",) or isinstance(TYPES.get(t), EnumType):
        return "str"
    if t in BUILTINS:
        return {"bool": "bool", "null": "null", "any": "any"}.get(t, "number")
    return "dict"


def validate(t: TypeRef, value: object, name: str | None = None, full: str = "",
             keyval: bool = False) -> object:
    """Check ``value`` against type ``t``; returns it normalised (e.g. uint wrap-around).

    ``name`` is the member name QEMU's visitor passes (None for list elements: QEMU then says
    'null'), ``full`` the dotted path QEMU uses in its "missing/unexpected/type" texts.
    ``keyval``: scalars arrive as strings (command-line keyval syntax) and are converted with
    the keyval visitor's texts ("Parameter 'x' expects integer").

    Raises:
        SchemaError: with QEMU's exact text for the first problem in visiting order.
    """
    bare = name if name is not None else "null"
    if isinstance(t, list):
        if not isinstance(value, list):
            raise _bad_type(full, "array")
        # the keyval visitor names list elements "rules.0", the JSON one "rules[0]"
        return [validate(t[0], v, None, f"{full}.{i}" if keyval else f"{full}[{i}]", keyval)
                for i, v in enumerate(value)]
    if t in BUILTINS:
        if keyval and isinstance(value, str):
            value = _keyval_scalar(t, value, full)
        return _validate_builtin(t, value, bare, full)
    decl = TYPES.get(t)
    if decl is None:
        raise KeyError(f"schema type {t!r} is not declared")
    if isinstance(decl, EnumType):
        if not isinstance(value, str):
            raise _bad_type(full, "string")
        if value not in decl.values:
            raise SchemaError(f"Parameter '{bare}' does not accept value '{value}'")
        return value
    if isinstance(decl, AlternateType):
        qt = _qtype(value)
        for choice in decl.choices:
            ct = _type_qtype(choice.type)
            if ct in (qt, "any"):
                return validate(choice.type, value, name, full, keyval)
        if keyval and qt == "str":  # no string branch: the first scalar branch parses it
            for choice in decl.choices:
                if _type_qtype(choice.type) in ("number", "bool", "null"):
                    return validate(choice.type, value, name, full, keyval)
        raise _bad_type(bare, decl.name)
    if not isinstance(value, dict):
        raise _bad_type(full, "object")
    if isinstance(decl, UnionType):
        return validate_members(decl.base, value, full, decl, keyval)
    return validate_members(struct_members(t), value, full, None, keyval)


def _validate_builtin(t: str, value: object, bare: str, full: str) -> object:
    if t == "any":
        return value
    if t == "str":
        if not isinstance(value, str):
            raise _bad_type(full, "string")
        return value
    if t == "bool":
        if not isinstance(value, bool):
            raise _bad_type(full, "boolean")
        return value
    if t == "null":
        if value is not None:
            raise _bad_type(full, "null")
        return None
    if t == "number":
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise _bad_type(full, "number")
        return value
    if t == "QType":
        return validate_enum_value(value, bare, full,
                                   ("none", "qnull", "qnum", "qstring", "qdict", "qlist", "qbool"))
    # integers: the value must first be representable as int64 (uint64 for unsigned kinds);
    # the unsigned visitor words every failure as a value error (qobject_input_type_uint64)
    if not isinstance(value, int) or isinstance(value, bool):
        if t in _UNSIGNED:
            raise SchemaError(f"Parameter '{full}' expects uint64")
        raise _bad_type(full, "integer")
    if t in _UNSIGNED:
        if not -(1 << 63) <= value < (1 << 64):
            raise SchemaError(f"Parameter '{full}' expects uint64")
        value &= (1 << 64) - 1  # QEMU accepts negative numbers and wraps them
    elif not -(1 << 63) <= value < (1 << 63):
        raise _bad_type(full, "integer")
    rng = _INT_RANGES.get(t)
    if rng is not None and not rng[0] <= value <= rng[1]:
        raise SchemaError(f"Parameter '{bare}' expects {rng[2]}")
    return value


_TRUE = frozenset({"on", "yes", "true", "y"})
_FALSE = frozenset({"off", "no", "false", "n"})
_SIZE_SUFFIX = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40,
                "p": 1 << 50, "e": 1 << 60}


def _c_integer(text: str) -> int | None:
    """strtoll with base 0 (decimal, 0x hex, leading-0 octal), whole string."""
    t = text.strip()
    neg = t.startswith("-")
    body = t[1:] if t[:1] in "+-" else t
    try:
        if body[:2].lower() == "0x":
            v = int(body[2:], 16)
        elif len(body) > 1 and body.startswith("0"):
            v = int(body[1:], 8)
        else:
            v = int(body, 10) if body.isdigit() else None  # type: ignore[assignment]
    except ValueError:
        return None
    if v is None:
        return None
    return -v if neg else v


def _keyval_scalar(t: str, text: str, full: str) -> object:
    """Convert a keyval string to the builtin type ``t`` (cf. the keyval input visitor)."""
    if t in ("str", "any"):
        return text
    if t == "bool":
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise SchemaError(f"Parameter '{full}' expects 'on' or 'off'")
    if t == "number":
        try:
            return float(text)
        except ValueError:
            raise SchemaError(f"Parameter '{full}' expects number") from None
    if t == "null":
        if text == "":
            return None
        raise SchemaError(f"Parameter '{full}' expects null")
    if t == "size":
        num = text.rstrip("bkmgtpeBKMGTPE")
        suffix = text[len(num):].lower()
        try:
            base = float(num) if "." in num else _c_integer(num)
        except ValueError:
            base = None
        if base is None or suffix not in _SIZE_SUFFIX or len(suffix) > 1 or base < 0:
            raise SchemaError(f"Parameter '{full}' expects size")
        return int(base * _SIZE_SUFFIX[suffix])
    if t == "QType":
        return text
    v = _c_integer(text)
    if v is None:
        raise SchemaError(f"Parameter '{full}' expects integer")
    return v


def validate_enum_value(value: object, bare: str, full: str, values: tuple[str, ...]) -> str:
    if not isinstance(value, str):
        raise _bad_type(full, "string")
    if value not in values:
        raise SchemaError(f"Parameter '{bare}' does not accept value '{value}'")
    return value


def struct_members(t: str) -> tuple[Member, ...]:
    """All members of a struct (base first) or of a union's base plus the selected branch."""
    decl = TYPES[t]
    if isinstance(decl, StructType):
        base = struct_members(decl.base) if decl.base else ()
        return base + decl.members
    if isinstance(decl, UnionType):
        return decl.base
    raise KeyError(f"{t} has no members")


def validate_members(
    members: tuple[Member, ...] | dict[str, TypeRef], value: dict[str, object], prefix: str = "",
    union: UnionType | None = None, keyval: bool = False,
) -> dict[str, object]:
    """Visit ``members`` of ``value`` in declaration order, then reject leftovers.

    For a union, ``members`` is its base; the branch selected by the discriminator (already
    visited as a base member) is visited next, before leftovers are looked for, as QEMU does.
    """
    if isinstance(members, dict):
        members = members_of(members)
    pre = f"{prefix}." if prefix else ""
    out: dict[str, object] = {}
    # QEMU keeps the not-yet-visited keys in a GHashTable and reports the first one its
    # iterator yields; the model below reproduces that table's layout.
    table = _GHashSet(_qdict_keys(value))

    def visit(ms: tuple[Member, ...]) -> None:
        for m in ms:
            if m.name in value:
                table.remove(m.name)
                out[m.name] = validate(m.type, value[m.name], m.name, pre + m.name, keyval)
            elif not m.optional:
                raise SchemaError(f"Parameter '{pre}{m.name}' is missing")

    visit(members)
    if union is not None:
        tag = out.get(union.discriminator)
        branch = union.branches.get(tag) if isinstance(tag, str) else None
        if branch is not None:
            visit(struct_members(branch))
    left = table.first()
    if left is not None:
        raise SchemaError(f"Parameter '{pre}{left}' is unexpected")
    return out


_PRIME_MOD = (1, 2, 3, 7, 13, 31, 61, 127, 251, 509, 1021, 2039, 4093, 8191, 16381, 32749,
              65521, 131071, 262139, 524287, 1048573, 2097143, 4194301, 8388593, 16777213)
_UNUSED, _TOMBSTONE = 0, 1


def _g_str_hash(key: str) -> int:
    h = 5381
    for b in key.encode("utf-8", "surrogatepass"):
        h = (h * 33 + (b - 256 if b >= 0x80 else b)) & 0xFFFFFFFF  # signed char, as GLib
    return h if h >= 2 else 2


class _GHashSet:
    """The slot layout of a GLib (2.74) GHashTable of strings: insert, remove, first.

    Only the order matters here: open addressing with quadratic probing over ``(hash * 11) %
    mod``, tombstones on removal, and GLib's in-place resize when the load leaves [1/4, 15/16].
    """

    def __init__(self, keys: list[str]) -> None:
        self._set_shift(3)
        self.hashes = [_UNUSED] * self.size
        self.keys: list[str | None] = [None] * self.size
        self.nnodes = 0
        self.noccupied = 0
        for k in keys:
            self.insert(k)

    def _set_shift(self, shift: int) -> None:
        self.size = 1 << shift
        self.mod = _PRIME_MOD[shift]
        self.mask = self.size - 1

    def _lookup(self, key: str, h: int) -> int:
        idx = ((h * 11) & 0xFFFFFFFF) % self.mod
        step = 0
        tomb = -1
        while self.hashes[idx] != _UNUSED:
            if self.hashes[idx] == h and self.keys[idx] == key:
                return idx
            if self.hashes[idx] == _TOMBSTONE and tomb < 0:
                tomb = idx
            step += 1
            idx = (idx + step) & self.mask
        return tomb if tomb >= 0 else idx

    def insert(self, key: str) -> None:
        h = _g_str_hash(key)
        idx = self._lookup(key, h)
        if self.hashes[idx] >= 2:
            return
        was_unused = self.hashes[idx] == _UNUSED
        self.hashes[idx], self.keys[idx] = h, key
        self.nnodes += 1
        if was_unused:
            self.noccupied += 1
            self._maybe_resize()

    def remove(self, key: str) -> None:
        idx = self._lookup(key, _g_str_hash(key))
        if self.hashes[idx] < 2:
            return
        self.hashes[idx], self.keys[idx] = _TOMBSTONE, None
        self.nnodes -= 1
        self._maybe_resize()

    def _maybe_resize(self) -> None:
        if (self.size > self.nnodes * 4 and self.size > 8) or \
                self.size <= self.noccupied + self.noccupied // 16:
            self._resize()

    def _resize(self) -> None:
        old_size = self.size
        n = int(self.nnodes * 1.333)
        shift = 0
        while n:
            n >>= 1
            shift += 1
        self._set_shift(max(shift, 3))
        if self.size > old_size:
            self.hashes += [_UNUSED] * (self.size - old_size)
            self.keys += [None] * (self.size - old_size)
        done = [False] * max(self.size, old_size)
        for i in range(old_size):
            h = self.hashes[i]
            if h < 2:
                self.hashes[i] = _UNUSED
                continue
            if done[i]:
                continue
            key = self.keys[i]
            self.hashes[i], self.keys[i] = _UNUSED, None
            while True:
                idx = ((h * 11) & 0xFFFFFFFF) % self.mod
                step = 0
                while done[idx]:
                    step += 1
                    idx = (idx + step) & self.mask
                done[idx] = True
                old_h, old_key = self.hashes[idx], self.keys[idx]
                self.hashes[idx], self.keys[idx] = h, key
                if old_h < 2:
                    break
                h, key = old_h, old_key
        del self.hashes[self.size:]
        del self.keys[self.size:]
        self.noccupied = self.nnodes

    def first(self) -> str | None:
        for h, key in zip(self.hashes, self.keys, strict=True):
            if h >= 2:
                return key
        return None


def _qdict_keys(value: dict[str, object]) -> list[str]:
    from blockmirror.qmp.message import qdict_order

    return qdict_order(list(value))


def validate_command_args(spec: dict[str, TypeRef] | str | None, args: dict[str, object]
                          ) -> dict[str, object]:
    """Validate a command's ``arguments`` object against its declaration.

    Raises:
        SchemaError: QEMU's text for the first problem.
    """
    if spec is None:
        return validate_members((), args)
    if isinstance(spec, str):
        decl = TYPES[spec]
        if isinstance(decl, UnionType):
            return validate_members(decl.base, args, "", decl)
        return validate_members(struct_members(spec), args)
    return validate_members(members_of(spec), args)


# -- introspection (query-qmp-schema) ------------------------------------------------------

_JSON_TYPE = {"str": "string", "bool": "boolean", "null": "null", "any": "value",
              "number": "number", "QType": "string"}


def introspect(commands: list[tuple[str, dict[str, TypeRef] | str | None, TypeRef | None, bool]],
               events: dict[str, dict[str, TypeRef]]) -> list[dict[str, object]]:
    """SchemaInfo list shaped like QEMU's: commands, then events, then every type they use.

    As in QEMU, non-builtin type names are masked as decimal numbers in order of first use
    (so "0" is the empty argument object), builtins keep their names (every integer kind is
    reported as "int"), and array types are named "[elem]".
    """
    names: dict[str, str] = {}
    infos: list[dict[str, object]] = []
    pending: list[tuple[str, object]] = []

    def ref(t: TypeRef | tuple[Member, ...] | None) -> str:
        if t is None or t == ():
            key = "{}"
        elif isinstance(t, tuple):
            key = "{" + ",".join(f"{m.name}:{m.type}:{m.optional}" for m in t) + "}"
        elif isinstance(t, list):
            return f"[{ref(t[0])}]"
        elif t in BUILTINS:
            return "int" if t not in _JSON_TYPE else t
        else:
            key = t
        if key not in names:
            names[key] = str(len(names))
            pending.append((names[key], t if t is not None else ()))
        return names[key]

    def member_info(members: tuple[Member, ...]) -> list[dict[str, object]]:
        out: list[dict[str, object]] = []
        for m in members:
            info: dict[str, object] = {"name": m.name}
            if m.optional:
                info["default"] = None
            info["type"] = ref(m.type)
            out.append(info)
        return out

    ref(None)  # "0": the empty object, as in QEMU
    for name, args, returns, allow_oob in commands:
        arg = ref(members_of(args) if isinstance(args, dict) else args)
        ret = ref(returns) if returns else ref(None)
        cinfo: dict[str, object] = {"name": name, "ret-type": ret, "meta-type": "command",
                                    "arg-type": arg}
        if allow_oob:
            cinfo["allow-oob"] = True
        infos.append(cinfo)
    for name, data in events.items():
        infos.append({"name": name, "meta-type": "event", "arg-type": ref(members_of(data))})
    done = 0
    while done < len(pending):
        masked, t = pending[done]
        done += 1
        if isinstance(t, tuple):
            infos.append({"name": masked, "members": member_info(t), "meta-type": "object"})
            continue
        assert isinstance(t, str)
        decl = TYPES[t]
        if isinstance(decl, EnumType):
            infos.append({"name": masked, "members": [{"name": v} for v in decl.values],
                          "meta-type": "enum", "values": list(decl.values)})
        elif isinstance(decl, StructType):
            infos.append({"name": masked, "members": member_info(struct_members(t)),
                          "meta-type": "object"})
        elif isinstance(decl, UnionType):
            variants = [{"case": case, "type": ref(branch)}
                        for case, branch in sorted(decl.branches.items())]
            infos.append({"name": masked, "tag": decl.discriminator, "variants": variants,
                          "members": member_info(decl.base), "meta-type": "object"})
        else:
            infos.append({"name": masked, "members": [{"type": ref(c.type)} for c in decl.choices],
                          "meta-type": "alternate"})
    arrays = sorted({n for n in _all_refs(infos) if n.startswith("[")})
    for a in arrays:
        infos.append({"name": a, "element-type": a[1:-1], "meta-type": "array"})
    for b in sorted(n for n in _all_refs(infos) if not n[:1].isdigit() and not n.startswith("[")):
        infos.append({"name": b, "json-type": _JSON_TYPE.get(b, "int"), "meta-type": "builtin"})
    return infos


def _all_refs(infos: list[dict[str, object]]) -> set[str]:
    out: set[str] = set()
    for info in infos:
        for key in ("ret-type", "arg-type", "element-type"):
            v = info.get(key)
            if isinstance(v, str):
                out.add(v)
        for lst in (info.get("members"), info.get("variants")):
            if isinstance(lst, list):
                for m in lst:
                    if isinstance(m, dict) and isinstance(m.get("type"), str):
                        out.add(m["type"])
    return out
