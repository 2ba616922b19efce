"""User-creatable objects (``--object``, ``object-add``) as the lower layers see them.

The daemon owns the objects; the block layer (the nbd driver's ``tls-creds``) and the NBD
server only look them up by id. They get an ``ObjectLookup`` through their constructors
(``BlockGraph(objects=...)``), never the daemon. A plain ``dict`` of ``id -> (qom-type,
properties)`` is one; so is any object store with the same ``get``.
"""

from __future__ import annotations

from typing import Any, Protocol


class ObjectLookup(Protocol):
    def get(self, object_id: str, /) -> tuple[str, dict[str, Any]] | None:
        """``(qom-type, properties)`` of the object ``object_id``, or None."""
        ...


#: the lookup of a graph that has no objects (tests, qemu-img-like commands)
NO_OBJECTS: ObjectLookup = {}

__all__ = ["NO_OBJECTS", "ObjectLookup"]
