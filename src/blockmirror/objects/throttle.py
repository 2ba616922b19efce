"""``throttle-group`` objects and QEMU's leaky-bucket I/O throttling (cf. util/throttle.c,
block/throttle-groups.c).

A group has six buckets (bytes and operations; total, read, write), each with an average rate
``avg``, an optional burst rate ``max`` held for ``burst_length`` seconds, and a fill level
that leaks at ``avg`` per second. A request waits until no bucket it fills is over its size,
then is accounted. Every throttle node naming the group shares its buckets; requests of one
direction are served in arrival order (QEMU additionally round-robins between the group's
members: with one queue per direction, arrival order already keeps every member moving).

Time is read only through the injected clock, so tests run it virtually.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from blockmirror.errors import BlockMirrorError
from blockmirror.objects.registry import UserObject

if TYPE_CHECKING:
    from blockmirror.clock import Clock

NS_PER_S = 1_000_000_000
#: cf. THROTTLE_VALUE_MAX
VALUE_MAX = 1_000_000_000_000_000
_UINT_MAX = (1 << 32) - 1

#: bucket names in QEMU's order (cf. BucketType)
BUCKETS = ("bps-total", "bps-read", "bps-write", "iops-total", "iops-read", "iops-write")
#: the ThrottleLimits members, in QAPI order
LIMIT_KEYS = (
    *(f"{unit}-{kind}{suffix}"
      for unit in ("iops", "bps") for kind in ("total", "read", "write")
      for suffix in ("", "-max", "-max-length")),
    "iops-size",
)


@dataclass
class LeakyBucket:
    avg: int = 0
    max: int = 0
    burst_length: int = 1
    level: float = 0.0
    burst_level: float = 0.0

    def leak(self, delta_ns: int) -> None:
        """cf. throttle_leak_bucket."""
        self.level = max(self.level - self.avg * delta_ns / NS_PER_S, 0.0)
        if self.burst_length > 1:
            self.burst_level = max(self.burst_level - self.max * delta_ns / NS_PER_S, 0.0)

    def wait_ns(self) -> int:
        """cf. throttle_compute_wait: how long until this bucket accepts a request."""
        if not self.avg:
            return 0
        if not self.max:
            # without a burst rate a tenth of a second of I/O may still pass at once
            bucket_size, burst_size = self.avg / 10, 0.0
        else:
            bucket_size, burst_size = float(self.max * self.burst_length), self.max / 10
        extra = self.level - bucket_size
        if extra > 0:
            return int(extra * NS_PER_S / self.avg)
        if self.burst_length > 1:
            extra = self.burst_level - burst_size
            if extra > 0:
                return int(extra * NS_PER_S / self.max)
        return 0

    def fill(self, amount: float) -> None:
        self.level += amount
        if self.burst_length > 1:
            self.burst_level += amount


class ThrottleConfig:
    """The six buckets and ``iops-size`` (cf. ThrottleConfig)."""

    def __init__(self) -> None:
        self.buckets = {name: LeakyBucket() for name in BUCKETS}
        self.op_size = 0

    def set_limit(self, key: str, value: int) -> None:
        """One ThrottleLimits member, e.g. "bps-read-max" (no validation: see ``check``)."""
        if key == "iops-size":
            self.op_size = value
            return
        unit, kind, *rest = key.split("-", 2)
        bucket = self.buckets[f"{unit}-{kind}"]
        if not rest:
            bucket.avg = value
        elif rest[0] == "max":
            bucket.max = value
        else:
            bucket.burst_length = value

    def limits(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for key in LIMIT_KEYS:
            if key == "iops-size":
                out[key] = self.op_size
                continue
            unit, kind, *rest = key.split("-", 2)
            b = self.buckets[f"{unit}-{kind}"]
            out[key] = b.avg if not rest else b.max if rest[0] == "max" else b.burst_length
        return out

    def check(self) -> None:
        """cf. throttle_is_valid, with its texts and order."""
        b = self.buckets

        def mixed(unit: str, attr: str) -> bool:
            return bool(getattr(b[f"{unit}-total"], attr)) and bool(
                getattr(b[f"{unit}-read"], attr) or getattr(b[f"{unit}-write"], attr))

        if any(mixed(u, a) for a in ("avg", "max") for u in ("bps", "iops")):
            raise BlockMirrorError(
                "bps/iops/max total values and read/write values cannot be used at the same time")
        if self.op_size and not (b["iops-total"].avg or b["iops-read"].avg
                                 or b["iops-write"].avg):
            raise BlockMirrorError("iops size requires an iops value to be set")
        for bkt in b.values():
            if not (0 <= bkt.avg <= VALUE_MAX and 0 <= bkt.max <= VALUE_MAX):
                raise BlockMirrorError(
                    f"bps/iops/max values must be within [0, {VALUE_MAX}]")
            if not bkt.burst_length:
                raise BlockMirrorError("the burst length cannot be 0")
            if bkt.burst_length > 1 and not bkt.max:
                raise BlockMirrorError("burst length set without burst rate")
            if bkt.max and bkt.burst_length > VALUE_MAX // bkt.max:
                raise BlockMirrorError("burst length too high for this burst rate")
            if bkt.max and not bkt.avg:
                raise BlockMirrorError("bps_max/iops_max require corresponding bps/iops values")
            if bkt.max and bkt.max < bkt.avg:
                raise BlockMirrorError("bps_max/iops_max cannot be lower than bps/iops")

    def enabled(self) -> bool:
        return any(bkt.avg for bkt in self.buckets.values())


class ThrottleState:
    """Buckets that leak over time; ``wait_ns``/``account`` for a request of one direction."""

    def __init__(self, clock: Clock, config: ThrottleConfig) -> None:
        self.clock = clock
        self.config = config
        self.previous_leak = clock.now_ns()

    def reconfigure(self, config: ThrottleConfig) -> None:
        """cf. throttle_config: new limits start from empty buckets."""
        for bkt in config.buckets.values():
            bkt.level = bkt.burst_level = 0.0
        self.config = config
        self.previous_leak = self.clock.now_ns()

    def _leak(self) -> None:
        now = self.clock.now_ns()
        delta = now - self.previous_leak
        self.previous_leak = now
        if delta > 0:
            for bkt in self.config.buckets.values():
                bkt.leak(delta)

    def wait_ns(self, is_write: bool) -> int:
        """cf. throttle_compute_wait_for, after leaking up to now."""
        self._leak()
        kind = "write" if is_write else "read"
        b = self.config.buckets
        return max(b[name].wait_ns()
                   for name in ("bps-total", "iops-total", f"bps-{kind}", f"iops-{kind}"))

    def account(self, is_write: bool, size: int) -> None:
        """cf. throttle_account: bytes into the bps buckets, operations into the iops ones."""
        op_size = self.config.op_size
        units = size / op_size if op_size and size > op_size else 1.0
        kind = "write" if is_write else "read"
        b = self.config.buckets
        for name in ("bps-total", f"bps-{kind}"):
            b[name].fill(size)
        for name in ("iops-total", f"iops-{kind}"):
            b[name].fill(units)


class ThrottleGroup(UserObject):
    """cf. ThrottleGroup: shared limits of every throttle node that names it."""

    qom_type = "throttle-group"
    settable = {"limits": "ThrottleLimits"}
    create_only = frozenset(f"x-{k}" for k in LIMIT_KEYS)

    def __init__(self, oid: str, clock: Clock, *, limits: dict[str, int] | None = None,
                 props: dict[str, int] | None = None) -> None:
        super().__init__(oid)
        config = ThrottleConfig()
        # the limits struct first, then the x- properties, as QOM sets them
        for key, value in (limits or {}).items():
            _set_checked(config, key, value)
        for key, value in (props or {}).items():
            if value < 0:
                raise BlockMirrorError("Property values cannot be negative")
            _set_checked(config, key.removeprefix("x-"), value)
        config.check()
        self.state = ThrottleState(clock, config)
        self._queues = {False: asyncio.Lock(), True: asyncio.Lock()}

    @property
    def config(self) -> ThrottleConfig:
        return self.state.config

    def set_limits(self, config: ThrottleConfig) -> None:
        """block_set_io_throttle / qom-set limits: checked, then in force from now."""
        config.check()
        self.state.reconfigure(config)

    def set_property(self, name: str, value: Any) -> None:
        """qom-set limits: the given members change, the others keep their value; the
        result must be valid, and is in force from now on (cf. throttle_group_set_limits)."""
        config = ThrottleConfig()
        for key, current in self.config.limits().items():
            config.set_limit(key, current)
        for key, new in dict(value).items():
            _set_checked(config, key, new)
        self.set_limits(config)

    async def intercept(self, is_write: bool, size: int) -> None:
        """Wait until the group lets a request of ``size`` bytes through, then account it
        (cf. throttle_group_co_io_limits_intercept)."""
        if not self.config.enabled():
            return
        async with self._queues[is_write]:
            while (wait := self.state.wait_ns(is_write)) > 0:
                await self.state.clock.sleep_ns(wait)
            self.state.account(is_write, size)

    def properties(self) -> dict[str, tuple[str, Any]]:
        limits = self.config.limits()
        props: dict[str, tuple[str, Any]] = {"limits": ("ThrottleLimits", limits)}
        for key, value in limits.items():
            props[f"x-{key}"] = ("int", value)
        return props


def _set_checked(config: ThrottleConfig, key: str, value: int) -> None:
    if key.endswith("-max-length") and not 0 <= value <= _UINT_MAX:
        raise BlockMirrorError(f"{key} value must be in the range [0, {_UINT_MAX}]")
    if key.endswith("-max-length") or key == "iops-size":
        config.set_limit(key, value)
        return
    # avg/max are uint64 in QEMU: a negative value wraps far above the limit
    config.set_limit(key, value if value >= 0 else VALUE_MAX + 1)


__all__ = [
    "BUCKETS",
    "LIMIT_KEYS",
    "VALUE_MAX",
    "LeakyBucket",
    "ThrottleConfig",
    "ThrottleGroup",
    "ThrottleState",
]
