"""The object registry: the daemon's user-created objects by id, with a typed lookup.

Kept deliberately small: ``add``, ``delete``, ``get`` and ``find(id, kind)``. Everything a user
of an object needs beyond that is a method of the object's own class.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar, TypeVar

from blockmirror.errors import BlockMirrorError


class UserObject:
    """One object created by ``--object``/``object-add``.

    ``qom_type`` is the QOM type name (what ``qom-list`` shows in ``child<...>``), ``qom_parent``
    its parent class (``qom-list-types``). ``props`` are the QOM properties as ``qom-get``
    returns them, with their QOM type names, in declaration order.
    """

    qom_type: str = "object"
    qom_parent: ClassVar[str] = "object"

    def __init__(self, oid: str) -> None:
        self.id = oid
        #: references held by users (a throttle node on its group): object-del refuses then
        self.users = 0

    #: properties qom-set may change after creation: name -> the QAPI type its value has
    settable: ClassVar[dict[str, Any]] = {}
    #: properties only object-add may set (qom-set: "cannot be set after initialization")
    create_only: ClassVar[frozenset[str]] = frozenset()
    #: properties a rejected qom-set value leaves empty (QEMU frees the old value before its
    #: visitor reads the new one): name -> the empty value
    emptied_on_error: ClassVar[dict[str, Any]] = {}

    def properties(self) -> dict[str, tuple[str, Any]]:
        """QOM property name -> (QOM type name, value)."""
        return {}

    def set_property(self, name: str, value: Any) -> None:
        """qom-set of a property in ``settable`` (``value`` already validated); the default
        stores it in the attribute of the same name (dashes as underscores)."""
        setattr(self, name.replace("-", "_"), value)

    def close(self) -> None:
        """Release what the object holds (files, watches); called by ``delete``."""


T = TypeVar("T", bound=UserObject)


class ObjectRegistry:
    """The objects of one daemon (cf. the QOM ``/objects`` container)."""

    def __init__(self) -> None:
        self._objects: dict[str, UserObject] = {}

    def add(self, obj: UserObject) -> None:
        if obj.id in self._objects:
            raise BlockMirrorError(
                f"attempt to add duplicate property '{obj.id}' to object (type 'container')")
        self._objects[obj.id] = obj

    def delete(self, oid: str) -> UserObject:
        """cf. user_creatable_del: refused while a user holds the object."""
        obj = self._objects.get(oid)
        if obj is None:
            raise BlockMirrorError(f"object '{oid}' not found")
        if obj.users:
            raise BlockMirrorError(f"object '{oid}' is in use, can not be deleted")
        del self._objects[oid]
        obj.close()
        return obj

    def get(self, oid: str, /) -> UserObject | None:
        return self._objects.get(oid)

    def find(self, oid: str, kind: type[T], /) -> T | None:
        """The object ``oid`` if it is a ``kind`` (None when absent or of another type)."""
        obj = self._objects.get(oid)
        return obj if isinstance(obj, kind) else None

    def __contains__(self, oid: object) -> bool:
        return oid in self._objects

    def __iter__(self) -> Iterator[UserObject]:
        return iter(list(self._objects.values()))

    def __len__(self) -> int:
        return len(self._objects)


__all__ = ["ObjectRegistry", "UserObject"]
