"""User-creatable objects (cf. QEMU's QOM ``-object``/``object-add``): secrets, TLS credentials,
authorization lists and throttle groups.

The lowest layer, next to ``errors``: ``registry.py`` holds the daemon's objects by id,
``factory.py`` builds them from validated ``object-add`` options, and one module per family
holds the objects themselves. The block layer (the nbd driver's ``tls-creds``, the throttle
driver's group) and the NBD server (``tls-creds``, ``tls-authz``) receive an ``ObjectLookup``
through their constructors (``BlockGraph(objects=...)``), never the daemon, and ask it for an
object of the class they need.
"""

from __future__ import annotations

from typing import Protocol, TypeVar

from blockmirror.objects.registry import ObjectRegistry, UserObject

T = TypeVar("T", bound=UserObject)


class ObjectLookup(Protocol):
    """What users of objects need: a lookup by id, optionally of one class."""

    def get(self, object_id: str, /) -> UserObject | None:
        """The object ``object_id``, or None."""
        ...

    def find(self, object_id: str, kind: type[T], /) -> T | None:
        """The object ``object_id`` if it is a ``kind``, else None."""
        ...


#: the lookup of a graph that has no objects (tests, qemu-img-like commands)
NO_OBJECTS: ObjectLookup = ObjectRegistry()

__all__ = ["NO_OBJECTS", "ObjectLookup", "ObjectRegistry", "UserObject"]
