"""The ``blkdebug`` filter: scripted I/O errors over its ``image`` child (cf. block/blkdebug.c).

Rules come from ``inject-error``/``set-state`` options or a legacy ini ``config`` file. An event
(raised by a parent format through ``BlockNode.debug_event``, or by our own write path) arms
the inject-error rules of the current state and may move the state machine; armed rules then
fail matching requests with their errno until a later event re-arms, or ``once`` removes them.
"""

from __future__ import annotations

import asyncio
import errno as _errno
import re
from dataclasses import dataclass
from typing import Any

from blockmirror.block import threadio
from blockmirror.block.driver import BlockDriver, DriverInfo, Extent, WriteFlags
from blockmirror.block.drivers import register
from blockmirror.block.node import BlockNode
from blockmirror.errors import BlockIOError, BlockMirrorError

#: BlkdebugEvent names (qapi/block-core.json); all are accepted, few are raised by us
EVENTS = frozenset(
    (
        "l1_update", "l1_grow_alloc_table", "l1_grow_write_table", "l1_grow_activate_table",
        "l2_load", "l2_update", "l2_update_compressed", "l2_alloc_cow_read", "l2_alloc_write",
        "read_aio", "read_backing_aio", "read_compressed", "write_aio", "write_compressed",
        "vmstate_load", "vmstate_save", "cow_read", "cow_write", "reftable_load", "reftable_grow",
        "reftable_update", "refblock_load", "refblock_update", "refblock_update_part",
        "refblock_alloc", "refblock_alloc_hookup", "refblock_alloc_write",
        "refblock_alloc_write_blocks", "refblock_alloc_write_table", "refblock_alloc_switch_table",
        "cluster_alloc", "cluster_alloc_bytes", "cluster_free", "flush_to_os", "flush_to_disk",
        "pwritev_rmw_head", "pwritev_rmw_after_head", "pwritev_rmw_tail", "pwritev_rmw_after_tail",
        "pwritev", "pwritev_zero", "pwritev_done", "empty_image_prepare", "l1_shrink_write_table",
        "l1_shrink_free_l2_clusters", "cor_write", "cluster_alloc_space", "none", "preadv",
    )
)
IOTYPES = ("read", "write", "write-zeroes", "discard", "flush", "block-status")
_DEFAULT_IOTYPES = frozenset({"read", "write", "write-zeroes", "discard", "flush"})


@dataclass(eq=False)
class InjectRule:
    event: str
    state: int  # 0: any state
    iotypes: frozenset[str]
    errno: int
    offset: int  # -1: any offset
    once: bool
    immediately: bool


@dataclass(eq=False)
class SetStateRule:
    event: str
    state: int
    new_state: int


def _read_text(path: str) -> str:
    with open(path) as f:
        return f.read()


def _int(v: Any, name: str) -> int:
    if isinstance(v, bool):
        raise BlockMirrorError(f"Invalid parameter type for '{name}', expected: integer")
    if isinstance(v, str):
        try:
            return int(v, 0)
        except ValueError:
            raise BlockMirrorError(f"Parameter '{name}' expects an integer") from None
    if not isinstance(v, int):
        raise BlockMirrorError(f"Invalid parameter type for '{name}', expected: integer")
    return v


def _bool(v: Any, name: str) -> bool:
    if isinstance(v, str):
        if v in ("on", "true", "yes"):
            return True
        if v in ("off", "false", "no"):
            return False
        raise BlockMirrorError(f"Parameter '{name}' expects 'on' or 'off'")
    if not isinstance(v, bool):
        raise BlockMirrorError(f"Invalid parameter type for '{name}', expected: boolean")
    return v


def _event(v: Any) -> str:
    if not isinstance(v, str) or v not in EVENTS:
        raise BlockMirrorError(f"Parameter 'event' does not accept value '{v}'")
    return v


def parse_inject(d: dict[str, Any]) -> InjectRule:
    if "event" not in d:
        raise BlockMirrorError("Parameter 'event' is missing")
    iotype = d.get("iotype")
    if iotype is None:
        iotypes = _DEFAULT_IOTYPES
    elif iotype in IOTYPES:
        iotypes = frozenset({iotype})
    else:
        raise BlockMirrorError(f"Parameter 'iotype' does not accept value '{iotype}'")
    sector = _int(d.get("sector", -1), "sector")
    err = _int(d.get("errno", _errno.EIO), "errno")
    return InjectRule(
        event=_event(d["event"]),
        state=_int(d.get("state", 0), "state"),
        iotypes=iotypes,
        errno=err,
        offset=-1 if sector < 0 else sector * 512,
        once=_bool(d.get("once", False), "once"),
        immediately=_bool(d.get("immediately", False), "immediately"),
    )


def parse_set_state(d: dict[str, Any]) -> SetStateRule:
    for key in ("event", "state", "new_state"):
        if key not in d:
            raise BlockMirrorError(f"Parameter '{key}' is missing")
    return SetStateRule(
        _event(d["event"]), _int(d["state"], "state"), _int(d["new_state"], "new_state")
    )


_SECTION = re.compile(r"^\[\s*([A-Za-z0-9_-]+)\s*\]$")
_KEYVAL = re.compile(r'^([A-Za-z0-9_-]+)\s*=\s*"?(.*?)"?$')


def parse_config(text: str, filename: str) -> tuple[list[InjectRule], list[SetStateRule]]:
    """The legacy ini format of blkdebug config files (cf. qemu_config_parse)."""
    injects: list[InjectRule] = []
    states: list[SetStateRule] = []
    sections: list[tuple[str, dict[str, Any]]] = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = _SECTION.match(line)
        if m:
            sections.append((m.group(1), {}))
            continue
        m = _KEYVAL.match(line)
        if m is None or not sections:
            raise BlockMirrorError(f"{filename}:{lineno}: parse error")
        sections[-1][1][m.group(1)] = m.group(2)
    for name, values in sections:
        if name == "inject-error":
            injects.append(parse_inject(values))
        elif name == "set-state":
            states.append(parse_set_state(values))
        else:
            raise BlockMirrorError(f"{filename}: There is no option group '{name}'")
    return injects, states


@register
class BlkdebugDriver(BlockDriver):
    format_name = "blkdebug"
    is_filter = True
    supports_truncate = True
    supports_fua = True

    def __init__(self, node: BlockNode) -> None:
        super().__init__(node)
        self.state = 1
        self.inject_rules: list[InjectRule] = []
        self.set_state_rules: list[SetStateRule] = []
        #: inject rules armed by the last event that injected
        self.active: list[InjectRule] = []

    @property
    def _image(self) -> BlockNode:
        child = self.node.child("image")
        if child is None:
            raise BlockIOError(_errno.ENOMEDIUM, "No medium")
        return child

    async def open(self) -> None:
        opts = self.node.options
        if self.node.child("image") is None:
            raise BlockMirrorError("Parameter 'image' is missing")
        config = opts.get("config")
        if config:
            try:
                text = await threadio.run(_read_text, str(config))
            except OSError as e:
                raise BlockMirrorError(
                    f"Could not read blkdebug config file: {e.strerror}"
                ) from e
            injects, states = parse_config(text, str(config))
            self.inject_rules += injects
            self.set_state_rules += states
        for d in opts.get("inject-error") or []:
            self.inject_rules.append(parse_inject(dict(d)))
        for d in opts.get("set-state") or []:
            self.set_state_rules.append(parse_set_state(dict(d)))
        child = self._image.driver
        self.can_write_zeroes_with_unmap = child.can_write_zeroes_with_unmap
        align = opts.get("align")
        if align is not None:
            a = _int(align, "align")
            if a <= 0 or a & (a - 1):
                raise BlockMirrorError("Cannot meet constraints with align " + str(a))
            self.request_alignment = max(a, child.request_alignment)
        else:
            self.request_alignment = child.request_alignment
        mt = opts.get("max-transfer")
        self.max_transfer = child.max_transfer
        if mt is not None:
            m = _int(mt, "max-transfer")
            if m < 0 or (m and m % self.request_alignment):
                raise BlockMirrorError(
                    f"Cannot meet constraints with max-transfer {m}"
                )
            if m:
                self.max_transfer = min(m, child.max_transfer)

    # --- the rule machine (cf. blkdebug_debug_event, rule_check) -------------------------------

    def debug_event(self, event: str) -> bool:
        new_state = self.state
        injected = False
        for rule in self.inject_rules:
            if rule.event == event and rule.state in (0, self.state):
                if not injected:
                    self.active = []
                    injected = True
                self.active.insert(0, rule)
        for srule in self.set_state_rules:
            if srule.event == event and srule.state == self.state:
                new_state = srule.new_state
        self.state = new_state
        return True

    async def _check(self, offset: int, length: int, iotype: str) -> None:
        for rule in self.active:
            hit = rule.offset == -1 or (length and offset <= rule.offset < offset + length)
            if hit and iotype in rule.iotypes:
                break
        else:
            return
        if not rule.errno:
            return
        if rule.once:
            self.active.remove(rule)
            if rule in self.inject_rules:
                self.inject_rules.remove(rule)
        if not rule.immediately:
            # the error arrives asynchronously, as from a real request
            await asyncio.sleep(0)
        raise BlockIOError(rule.errno)

    # --- I/O: check, then forward ------------------------------------------------------------

    def length(self) -> int:
        return self._image.length()

    def info(self) -> DriverInfo:
        return self._image.info()

    def has_zero_init(self) -> bool:
        return self._image.driver.has_zero_init()

    async def truncate(self, length: int, preallocation: str = "off") -> None:
        await self._image.driver.truncate(length, preallocation)

    async def preadv(self, offset: int, length: int) -> bytes:
        await self._check(offset, length, "read")
        return await self._image.read(offset, length)

    async def pwritev(self, offset: int, data: bytes | memoryview, flags: WriteFlags) -> None:
        self.debug_event("pwritev")
        await self._check(offset, len(data), "write")
        await self._image.write(offset, data, fua=WriteFlags.FUA in flags)
        self.debug_event("pwritev_done")

    async def pwrite_zeroes(self, offset: int, length: int, flags: WriteFlags) -> None:
        self.debug_event("pwritev_zero")
        await self._check(offset, length, "write-zeroes")
        await self._image.write_zeroes(
            offset,
            length,
            may_unmap=WriteFlags.MAY_UNMAP in flags,
            fua=WriteFlags.FUA in flags,
            no_fallback=WriteFlags.NO_FALLBACK in flags,
        )
        self.debug_event("pwritev_done")

    async def pdiscard(self, offset: int, length: int) -> None:
        await self._check(offset, length, "discard")
        await self._image.discard(offset, length)

    async def flush(self) -> None:
        await self._check(0, 0, "flush")
        await self._image.flush()

    async def block_status(self, offset: int, length: int) -> Extent:
        await self._check(offset, length, "block-status")
        ext = await self._image.block_status(offset, length)
        return Extent(ext.length, ext.status, 0, ext.map_offset, ext.map_node)
