"""The node graph: naming, lookup, linking with permission checks, and replacing a node.

``BlockGraph`` owns every node and root handle of one daemon (many graphs can live in one test
process; nothing here is global). Opening nodes from QMP/CLI options lives in
``block/options.py``; the request path in ``block/io.py``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from blockmirror.block.node import BlockBackend, BlockNode, Child, Perm
from blockmirror.clock import Clock, MonotonicClock
from blockmirror.errors import BlockMirrorError
from blockmirror.objects import NO_OBJECTS, ObjectLookup

_NODE_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,30}$")
# cf. id_wellformed(): job ids and device ids
_ID_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]*$")


def node_name_valid(name: str) -> bool:
    return bool(_NODE_NAME_RE.match(name))


def id_wellformed(name: str) -> bool:
    return bool(_ID_RE.match(name))


class BlockGraph:
    def __init__(self, *, objects: ObjectLookup = NO_OBJECTS, clock: Clock | None = None) -> None:
        self.nodes: dict[str, BlockNode] = {}
        self.backends: list[BlockBackend] = []
        #: nodes created by blockdev-add / --blockdev (the monitor holds a reference)
        self.monitor_owned: set[str] = set()
        self._auto_counter = 0
        #: the daemon's --object/object-add objects (a typed lookup: objects/__init__.py), so
        #: drivers (nbd: tls-creds, throttle: throttle-group) find them through ``node.graph``
        self.objects = objects
        #: the daemon's clock, for drivers that wait (nbd: reconnect-delay, open-timeout)
        self.clock: Clock = clock if clock is not None else MonotonicClock()

    # --- names and lookup ---------------------------------------------------------------

    def new_auto_name(self) -> str:
        """cf. bdrv_assign_node_name: '#block' + a counter, never reused."""
        name = f"#block{self._auto_counter:03d}"
        self._auto_counter += 1
        return name

    def find_node(self, name: str) -> BlockNode | None:
        return self.nodes.get(name)

    def find_backend(self, name: str) -> BlockBackend | None:
        if not name:
            return None
        for blk in self.backends:
            if blk.name == name:
                return blk
        return None

    def lookup(self, device: str | None, node_name: str | None = None) -> BlockNode:
        """cf. bdrv_lookup_bs: a device (BlockBackend) name first, then a node name."""
        if device is not None:
            blk = self.find_backend(device)
            if blk is not None:
                if blk.node is None:
                    raise BlockMirrorError(f"Device '{device}' has no medium")
                return blk.node
        if node_name is not None:
            node = self.nodes.get(node_name)
            if node is not None:
                return node
        # QEMU quotes both values, an absent one as ''
        raise BlockMirrorError(
            f"Cannot find device='{device or ''}' nor node-name='{node_name or ''}'"
        )

    def all_nodes(self) -> Iterator[BlockNode]:
        return iter(list(self.nodes.values()))

    # --- membership -----------------------------------------------------------------------

    def add_node(self, node: BlockNode) -> None:
        if node.name in self.nodes:
            raise BlockMirrorError(f"Duplicate nodes with node-name='{node.name}'")
        self.nodes[node.name] = node
        node.graph = self

    def forget_node(self, node: BlockNode) -> None:
        self.nodes.pop(node.name, None)
        self.monitor_owned.discard(node.name)

    def add_backend(self, blk: BlockBackend) -> None:
        self.backends.append(blk)

    def remove_backend(self, blk: BlockBackend) -> None:
        if blk.child is not None:
            self.detach(blk.child)
        if blk in self.backends:
            self.backends.remove(blk)

    # --- links and permissions ------------------------------------------------------------

    def check_perms(self, node: BlockNode, extra: Child | None = None) -> None:
        """Refuse a set of parents in which one needs what another does not share."""
        links = list(node.parents)
        if extra is not None:
            links.append(extra)
        for a in links:
            for b in links:
                if a is b:
                    continue
                conflict = a.perm & ~b.shared
                if conflict:
                    raise BlockMirrorError(
                        f"Permission conflict on node '{node.name}': permissions "
                        f"'{conflict.describe()}' are both required by {a.parent_description()} "
                        f"(uses node '{node.name}' as '{a.role}' child) and unshared by "
                        f"{b.parent_description()} (uses node '{node.name}' as '{b.role}' child)."
                    )
        for link in links:
            if link.perm & Perm.WRITE and node.read_only:
                raise BlockMirrorError("Block node is read-only")

    def attach(
        self,
        parent: BlockNode | BlockBackend,
        node: BlockNode,
        role: str,
        perm: Perm,
        shared: Perm,
        *,
        passthrough: bool = False,
        take: Perm = Perm.NONE,
        unshare: Perm = Perm.NONE,
    ) -> Child:
        """Link ``parent`` to ``node``; ``passthrough`` links derive their permissions from the
        parent's users (``perm``/``shared`` are then ignored), see ``Child``.

        Raises:
            BlockMirrorError: a permission conflict, or WRITE on a read-only node.
        """
        link = Child(parent, node, role, perm, shared, passthrough, take, unshare)
        if passthrough and isinstance(parent, BlockNode):
            link.perm, link.shared = self._passthrough_perms(parent, link)
        self.check_perms(node, link)
        node.parents.append(link)
        try:
            self.refresh_perms(node)
        except BlockMirrorError:
            node.parents.remove(link)
            self.refresh_perms(node, best_effort=True)
            raise
        if isinstance(parent, BlockBackend):
            parent.child = link
        else:
            parent.children[role] = link
        return link

    def refresh_perms(self, node: BlockNode, *, best_effort: bool = False) -> None:
        """Tell the node's driver what its parents now need in total (cf. bdrv_refresh_perms).

        ``best_effort`` swallows a refusal (used when dropping permissions, which cannot fail
        in QEMU either).
        """
        perm, shared = self.cumulative_perms(node)
        drv = getattr(node, "driver", None)
        if drv is not None:
            try:
                drv.set_perm(perm, shared)
            except BlockMirrorError:
                if not best_effort:
                    raise
        # what this node's users need flows on through its filter-like links
        for link in list(node.children.values()):
            if not link.passthrough:
                continue
            new = self._passthrough_perms(node, link)
            if new == (link.perm, link.shared):
                continue
            link.perm, link.shared = new
            if not best_effort:
                self.check_perms(link.node)
            self.refresh_perms(link.node, best_effort=best_effort)

    @staticmethod
    def cumulative_perms(node: BlockNode) -> tuple[Perm, Perm]:
        """What all parents of ``node`` need, and what all of them share."""
        perm, shared = Perm.NONE, Perm.all()
        for link in node.parents:
            perm |= link.perm
            shared &= link.shared
        return perm, shared

    def _passthrough_perms(self, parent: BlockNode, link: Child) -> tuple[Perm, Perm]:
        perm, shared = self.cumulative_perms(parent)
        return perm | link.take, shared & ~link.unshare

    def detach(self, link: Child) -> None:
        if link in link.node.parents:
            link.node.parents.remove(link)
            self.refresh_perms(link.node, best_effort=True)
        parent = link.parent
        if isinstance(parent, BlockBackend):
            if parent.child is link:
                parent.child = None
        elif parent.children.get(link.role) is link:
            del parent.children[link.role]

    def replace_node(
        self, old: BlockNode, new: BlockNode, *, exclude: Child | None = None
    ) -> None:
        """Point every parent of ``old`` (but ``exclude``) at ``new``, all at once.

        cf. bdrv_replace_node: used to insert a filter above a node and for the mirror's pivot.
        Permissions are checked on ``new`` with all the moved links before anything moves.
        """
        moving = [c for c in old.parents if c is not exclude]
        for c in moving:
            if c.parent is new:
                raise BlockMirrorError("Cannot replace a node by one of its own parents' links")
        saved = list(new.parents)
        new.parents.extend(moving)
        try:
            self.check_perms(new)
            self.refresh_perms(new)
        except BlockMirrorError:
            new.parents[:] = saved
            self.refresh_perms(new, best_effort=True)
            raise
        for c in moving:
            old.parents.remove(c)
            c.node = new
        self.refresh_perms(old, best_effort=True)

    def refcount(self, node: BlockNode) -> int:
        return len(node.parents) + (1 if node.name in self.monitor_owned else 0)

    def root_backends(self, node: BlockNode) -> list[BlockBackend]:
        return [c.parent for c in node.parents if isinstance(c.parent, BlockBackend)]
