"""Validation against the schema, with QEMU's texts (cf. qapi/qobject-input-visitor.c).

One validator serves every way options come in: QMP arguments (``mode="qmp"``), command-line
keyval strings (``"keyval"``: every scalar is a string, converted as QEMU's keyval visitor
does: ``on``/``yes``/``true``/``y``, C integer syntax with ``0x`` and leading-0 octal, size
suffixes) and the block layer's option dicts (``"options"``: typed values, or strings read
the keyval way, as QEMU's bdrv_open reads -drive options). It returns the value normalised.
"""

from __future__ import annotations

from typing import Literal

from blockmirror.qapi.qdict import qdict_order
from blockmirror.qapi.schema import (
    BUILTINS,
    TYPES,
    AlternateType,
    ArgsRef,
    EnumType,
    Member,
    MemberSpec,
    TypeRef,
    UnionType,
    members_of,
    struct_members,
)

#: how scalar strings are read (see the module docstring)
Mode = Literal["qmp", "keyval", "options"]


def _mode(keyval: bool | Mode) -> Mode:
    if keyval is True:
        return "keyval"
    if keyval is False:
        return "qmp"
    return keyval


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
             keyval: bool | Mode = False) -> object:
    """Check ``value`` against type ``t``; returns it normalised (e.g. uint wrap-around).

    ``name`` is the member name QEMU's visitor passes (None for list elements: QEMU then says
    'null'), ``full`` the dotted path QEMU uses in its "missing/unexpected/type" texts.
    ``keyval``: True (or "keyval"): scalars arrive as strings (command-line keyval syntax)
    and are converted with the keyval visitor's texts ("Parameter 'x' expects integer");
    "options": strings are converted where a scalar is expected, and a string that does not
    convert gets the QMP text ("Invalid parameter type for 'x', expected: integer").

    Raises:
        SchemaError: with QEMU's exact text for the first problem in visiting order.
    """
    bare = name if name is not None else "null"
    if isinstance(t, list):
        if not isinstance(value, list):
            raise _bad_type(full, "array")
        # bdrv_open reads each element of an options list as options of its own (QemuOpts),
        # so its texts name members relative to the element
        relative = _mode(keyval) == "options"
        return [validate(t[0], v, None, "" if relative else f"{full}[{i}]", keyval)
                for i, v in enumerate(value)]
    if t in BUILTINS:
        mode = _mode(keyval)
        if mode != "qmp" and isinstance(value, str):
            value = _string_scalar(t, value, bare, full, mode)
        elif mode == "options" and t == "str" and type(value) is int:
            value = str(value)  # cf. qdict_stringify_for_keyval: numbers read as strings
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
        if _mode(keyval) != "qmp" and qt == "str":
            # no string branch: the first scalar branch parses it
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


def validate_members(
    members: tuple[Member, ...] | MemberSpec, value: dict[str, object], prefix: str = "",
    union: UnionType | None = None, keyval: bool | Mode = False,
) -> dict[str, object]:
    """Visit ``members`` of ``value`` in declaration order, then reject leftovers.

    For a union, ``members`` is its base; the branch selected by the discriminator (already
    visited as a base member) is visited next, before leftovers are looked for, as QEMU does.
    """
    if not isinstance(members, tuple):
        members = members_of(members)
    pre = f"{prefix}." if prefix else ""
    out: dict[str, object] = {}
    # QEMU keeps the not-yet-visited keys in a GHashTable and reports the first one its
    # iterator yields; the model below reproduces that table's layout.
    table = _GHashSet(qdict_order(list(value)))

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


def validate_command_args(spec: ArgsRef | MemberSpec | None, args: dict[str, object],
                          keyval: bool | Mode = False) -> dict[str, object]:
    """Validate a command's ``arguments`` object (or a boxed type's) against its declaration.

    Raises:
        SchemaError: QEMU's text for the first problem.
    """
    if spec is None:
        return validate_members((), args)
    if isinstance(spec, str):
        decl = TYPES[spec]
        if isinstance(decl, UnionType):
            return validate_members(decl.base, args, "", decl, keyval)
        return validate_members(struct_members(spec), args, "", None, keyval)
    members = spec if isinstance(spec, tuple) else members_of(spec)
    return validate_members(members, args, "", None, keyval)


def _string_scalar(t: str, text: str, bare: str, full: str, mode: Mode) -> object:
    """A string where builtin ``t`` is expected: keyval conversion, or (options) QMP's text."""
    try:
        return _keyval_scalar(t, text, full)
    except SchemaError:
        if mode == "keyval":
            raise
    expected = {"bool": "boolean", "number": "number", "null": "null"}.get(t, "integer")
    if t in _UNSIGNED:
        raise SchemaError(f"Parameter '{full}' expects uint64") from None
    raise _bad_type(full, expected) from None


__all__ = ["Mode", "SchemaError", "validate", "validate_command_args", "validate_enum_value",
           "validate_members"]
