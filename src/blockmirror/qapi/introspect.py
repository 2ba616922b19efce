"""``query-qmp-schema``: the SchemaInfo list QEMU derives from its schema, from ours.

As in QEMU, non-builtin type names are masked as decimal numbers in order of first use (so "0"
is the empty argument object), builtins keep their names (every integer kind is reported as
"int"), and array types are named "[elem]".
"""

from __future__ import annotations

from collections.abc import Iterable

from blockmirror.qapi.schema import (
    BUILTINS,
    TYPES,
    CommandDecl,
    EnumType,
    EventDecl,
    Member,
    StructType,
    TypeRef,
    UnionType,
    struct_members,
)

_JSON_TYPE = {"str": "string", "bool": "boolean", "null": "null", "any": "value",
              "number": "number", "QType": "string"}


def introspect(commands: Iterable[CommandDecl], events: Iterable[EventDecl]
               ) -> list[dict[str, object]]:
    """SchemaInfo list shaped like QEMU's: commands, then events, then every type they use."""
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
    for cmd in commands:
        arg = ref(cmd.args)
        ret = ref(cmd.returns) if cmd.returns else ref(None)
        cinfo: dict[str, object] = {"name": cmd.name, "ret-type": ret, "meta-type": "command",
                                    "arg-type": arg}
        if cmd.allow_oob:
            cinfo["allow-oob"] = True
        infos.append(cinfo)
    for ev in events:
        infos.append({"name": ev.name, "meta-type": "event", "arg-type": ref(ev.data)})
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


__all__ = ["introspect"]
