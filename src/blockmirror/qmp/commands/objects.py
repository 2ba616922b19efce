"""QMP commands of qapi/qom.json: object-add, object-del, qom-list, qom-get, qom-list-types.

The schema (ObjectOptions: every ObjectType of QEMU 7.2, branches for the types blockmirror
creates) is in ``blockmirror.qapi.qom``; the objects live in ``blockmirror.objects``;
``--object`` goes through the same ``add_object`` (cli/daemon.py).
"""

from __future__ import annotations

from typing import Any

from blockmirror.block.graph import id_wellformed
from blockmirror.clock import Clock
from blockmirror.errors import BlockMirrorError, DeviceNotFound
from blockmirror.objects.factory import QOM_TYPES, TYPE_PROPERTIES, create_object
from blockmirror.objects.registry import ObjectRegistry, UserObject
from blockmirror.qapi import SchemaError, validate
from blockmirror.qmp.registry import Args, CommandContext, command


def add_object(objects: ObjectRegistry, clock: Clock, options: dict[str, Any]) -> UserObject:
    """object-add / --object: build the object from validated options and register it."""
    oid = str(options.get("id"))
    if not id_wellformed(oid):
        raise BlockMirrorError("Parameter 'id' expects an identifier")
    if oid in objects:
        # cf. user_creatable_add_type: the id clash is found before the object completes
        raise BlockMirrorError(
            f"attempt to add duplicate property '{options['id']}' to object (type 'container')")
    obj = create_object(objects, clock, options)
    objects.add(obj)
    return obj


@command("object-add")
async def object_add(ctx: CommandContext, args: Args) -> None:
    add_object(ctx.daemon.objects, ctx.daemon.clock, args.as_dict())


@command("object-del")
async def object_del(ctx: CommandContext, args: Args) -> None:
    ctx.daemon.objects.delete(args.get_str("id"))


# --- the QOM tree, as far as management stacks read it -------------------------------------


def _resolve(ctx: CommandContext, path: str) -> tuple[str, UserObject | None]:
    """A QOM path: "/" and "/objects" are containers, "/objects/ID" an object."""
    norm = "/" + "/".join(p for p in path.split("/") if p) if path.startswith("/") else None
    if norm in ("/", "/objects", "/chardevs"):
        return norm, None
    if norm is not None and norm.startswith("/objects/") and norm.count("/") == 2:
        obj = ctx.daemon.objects.get(norm.removeprefix("/objects/"))
        if obj is not None:
            return norm, obj
    raise DeviceNotFound(f"Device '{path}' not found")


def _props(ctx: CommandContext, path: str, obj: UserObject | None) -> dict[str, tuple[str, Any]]:
    props: dict[str, tuple[str, Any]] = {"type": ("string", obj.qom_type if obj else "container")}
    if obj is not None:
        props.update(obj.properties())
    elif path == "/":
        props["objects"] = ("child<container>", "/objects")
        props["chardevs"] = ("child<container>", "/chardevs")
    elif path == "/objects":
        for o in ctx.daemon.objects:
            props[o.id] = (f"child<{o.qom_type}>", f"/objects/{o.id}")
    return props


@command("qom-list")
async def qom_list(ctx: CommandContext, args: Args) -> list[dict[str, Any]]:
    path, obj = _resolve(ctx, args.get_str("path"))
    return [{"name": k, "type": t} for k, (t, _) in _props(ctx, path, obj).items()]


@command("qom-get")
async def qom_get(ctx: CommandContext, args: Args) -> Any:
    path, obj = _resolve(ctx, args.get_str("path"))
    name = args.get_str("property")
    props = _props(ctx, path, obj)
    if name not in props:
        owner = obj.qom_type if obj else "container"
        raise BlockMirrorError(f"Property '{owner}.{name}' not found")
    qom_type, value = props[name]
    if value is None:
        # unset string properties read as "" (cf. object_property_get_str on NULL)
        return "" if qom_type == "string" else value
    return value


@command("qom-set")
async def qom_set(ctx: CommandContext, args: Args) -> None:
    """cf. qmp_qom_set: the property's visitor checks the value, then the object takes it."""
    path, obj = _resolve(ctx, args.get_str("path"))
    name = args.get_str("property")
    owner = obj.qom_type if obj else "container"
    if obj is None or (name not in obj.settable and name not in obj.create_only):
        if name in _props(ctx, path, obj):
            raise BlockMirrorError(f"Property '{owner}.{name}' is not writable")
        raise BlockMirrorError(f"Property '{owner}.{name}' not found")
    if name in obj.create_only:
        raise BlockMirrorError("Property cannot be set after initialization")
    try:
        value = validate(obj.settable[name], args["value"], name, name)
    except SchemaError as e:
        if name in obj.emptied_on_error:
            obj.set_property(name, obj.emptied_on_error[name])
        raise BlockMirrorError(e.desc) from None
    obj.set_property(name, value)


@command("qom-list-properties")
async def qom_list_properties(ctx: CommandContext, args: Args) -> list[dict[str, Any]]:
    typename = args.get_str("typename")
    props = TYPE_PROPERTIES.get(typename)
    if props is None:
        raise DeviceNotFound(f"Class '{typename}' not found")
    return [{"name": "type", "type": "string"},
            *({"name": name, "type": qom_type} for name, qom_type in props)]


def _implements(name: str, ancestor: str) -> bool:
    cur: str | None = name
    while cur is not None:
        if cur == ancestor:
            return True
        cur = QOM_TYPES[cur][0]
    return False


@command("qom-list-types")
async def qom_list_types(ctx: CommandContext, args: Args) -> list[dict[str, Any]]:
    implements = args.opt_str("implements")
    with_abstract = args.get_bool("abstract", False)
    out: list[dict[str, Any]] = []
    for name, (parent, abstract) in QOM_TYPES.items():
        if abstract and not with_abstract:
            continue
        if implements is not None and not _implements(name, implements):
            continue
        info: dict[str, Any] = {"name": name}
        if abstract:
            info["abstract"] = True
        if parent is not None:
            info["parent"] = parent
        out.append(info)
    return out
