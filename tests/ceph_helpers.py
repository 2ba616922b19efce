"""Helpers for the tests that need a Ceph cluster (the rbd driver's tests).

``cluster_session(dir)`` runs ``scripts/ceph-cluster start`` once per test session (the
``ceph_cluster`` fixture in conftest.py) and stops it at the end; a test that needs a cluster
it may break (stop mid-mirror) starts a private one with ``private_cluster``. Missing Ceph
tools or bindings skip the tests, except under CI=true, where they fail.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import IN_CI, ROOT

SCRIPT = ROOT / "scripts" / "ceph-cluster"
TOOLS = ("ceph-mon", "ceph-osd", "ceph", "rbd", "ceph-authtool", "monmaptool")
#: the pools every session cluster has
POOLS = ("rbd", "rbd2")


def _missing() -> str | None:
    for tool in TOOLS:
        if shutil.which(tool) is None:
            return f"ceph tool {tool!r} is missing"
    if importlib.util.find_spec("rbd") is None or importlib.util.find_spec("rados") is None:
        return "librbd's Python bindings (python3-rbd, python3-rados) are not importable"
    return None


def require_ceph() -> None:
    """Skip (fail under CI=true) when the cluster cannot be built here."""
    why = _missing()
    if why is not None:
        if IN_CI:
            pytest.fail(f"{why} (CI=true requires it; make tools installs it)")
        pytest.skip(f"{why} (make tools installs it)")


@dataclass
class Cluster:
    """A running cluster: its directory and how clients reach it."""

    dir: Path

    @property
    def conf(self) -> str:
        return str(self.dir / "ceph.conf")

    @property
    def user_key(self) -> str:
        """The base64 key of client.blockmirror (rbd profile)."""
        return (self.dir / "blockmirror.key").read_text().strip()

    def filename(self, pool: str, image: str, extra: str = "") -> str:
        """QEMU's ``rbd:`` filename of an image on this cluster."""
        return f"rbd:{pool}/{image}:conf={self.conf}{extra}"

    def blockdev(self, pool: str, image: str, **extra: object) -> dict[str, object]:
        """BlockdevOptionsRbd for an image on this cluster."""
        return {"driver": "rbd", "pool": pool, "image": image, "conf": self.conf, **extra}

    def rbd(self, *args: str, check: bool = True) -> str:
        """Run the rbd CLI against this cluster."""
        proc = subprocess.run(["rbd", "-c", self.conf, *args], capture_output=True,
                              check=False, timeout=120)
        if check and proc.returncode != 0:
            raise AssertionError(f"rbd {' '.join(args)}: {proc.stderr.decode()}")
        return proc.stdout.decode(errors="replace")

    def rbd_bytes(self, *args: str) -> bytes:
        proc = subprocess.run(["rbd", "-c", self.conf, *args], capture_output=True,
                              check=True, timeout=120)
        return proc.stdout

    def export(self, pool: str, image: str) -> bytes:
        """The image's bytes as ``rbd export`` writes them."""
        return self.rbd_bytes("export", f"{pool}/{image}", "-")

    def diff(self, pool: str, image: str) -> list[tuple[int, int]]:
        """``rbd diff`` of an image: its (offset, length) data extents."""
        out = self.rbd("diff", "--format", "plain", f"{pool}/{image}")
        extents = []
        for line in out.splitlines()[1:]:
            off, length, kind = line.split()
            if kind == "data":
                extents.append((int(off), int(length)))
        return extents

    def unique(self, prefix: str) -> str:
        return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _script(*args: str) -> None:
    proc = subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, check=False,
                          timeout=180)
    if proc.returncode != 0:
        raise RuntimeError(f"ceph-cluster {' '.join(args)} failed:\n{proc.stderr}")


def start(d: Path, pools: tuple[str, ...] = POOLS) -> Cluster:
    args = ["start", str(d)]
    for p in pools:
        args += ["--pool", p]
    _script(*args)
    return Cluster(d)


def stop(d: Path) -> None:
    _script("stop", str(d))


def cluster_session(d: Path) -> Iterator[Cluster]:
    """The body of the session fixture: start, hand out, stop (also after failures)."""
    require_ceph()
    try:
        cluster = start(d)
    except RuntimeError as e:
        stop(d)
        pytest.fail(str(e))
    try:
        yield cluster
    finally:
        stop(d)


@contextlib.contextmanager
def private_cluster(d: Path, pools: tuple[str, ...] = ("rbd",)) -> Iterator[Cluster]:
    """A cluster of one's own (to stop in the middle of a test)."""
    require_ceph()
    try:
        yield start(d, pools)
    finally:
        stop(d)


def sh(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=120).stdout


def pattern(size: int, holes: list[tuple[int, int]]) -> bytes:
    """Non-repeating data of ``size`` bytes with zeroed ``(offset, length)`` holes."""
    block = bytes((i * 131 + 7) & 0xFF for i in range(4093))
    data = bytearray((block * (size // len(block) + 1))[:size])
    for off, length in holes:
        data[off : off + length] = bytes(length)
    return bytes(data)


def env_with_conf(cluster: Cluster) -> dict[str, str]:
    return {**os.environ, "CEPH_CONF": cluster.conf}


__all__ = ["POOLS", "Cluster", "cluster_session", "env_with_conf", "pattern",
           "private_cluster", "require_ceph", "sh", "start", "stop"]
