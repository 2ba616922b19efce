"""Shared test helpers.

``require_tool(name)`` skips a test when a peer tool (qemu-img, qemu-nbd, nbdkit, ...) is not
installed, except under CI=true, where a missing peer is a failure: CI must prove interop.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from blockmirror.qapi import checks as schema_checks

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

# Every event a daemon emits and every command result is checked against the schema, in this
# process and in the daemons the tests spawn (they inherit the environment and append what
# they find to the log file); see blockmirror.qapi.checks.
_VIOLATION_LOG = Path(tempfile.mkstemp(prefix="blockmirror-schema-", suffix=".log")[1])
os.environ[schema_checks.ENV_SWITCH] = "1"
os.environ[schema_checks.ENV_LOG] = str(_VIOLATION_LOG)
atexit.register(_VIOLATION_LOG.unlink, missing_ok=True)


@pytest.fixture(autouse=True)
def _schema_conformance() -> Iterator[None]:
    """Fail the test when something it made a daemon emit violates the schema."""
    schema_checks.VIOLATIONS.clear()
    _VIOLATION_LOG.write_text("")
    yield
    found = schema_checks.VIOLATIONS + _VIOLATION_LOG.read_text().splitlines()
    assert not found, "schema violations:\n" + "\n".join(found)


def require_tool(*names: str) -> None:
    for name in names:
        if shutil.which(name) is None:
            if IN_CI:
                pytest.fail(f"peer tool {name!r} is missing (CI=true requires it)")
            pytest.skip(f"peer tool {name!r} is not installed")


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    return tmp_path


@pytest.fixture(scope="session")
def ceph_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One single-node Ceph cluster (scripts/ceph-cluster) for the session's rbd tests:
    pools ``rbd`` and ``rbd2``; skipped without Ceph, failed under CI=true."""
    from ceph_helpers import cluster_session

    yield from cluster_session(tmp_path_factory.mktemp("ceph"))


def _o_direct_works(directory: Path) -> bool:
    probe = directory / ".o_direct_probe"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_RDWR | os.O_DIRECT, 0o600)
    except OSError:
        return False
    os.close(fd)
    probe.unlink()
    return True


@pytest.fixture
def direct_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory on a filesystem with O_DIRECT (tmpfs has none).

    tmp_path first; else a fresh directory under /var/tmp or the repository (both usually on
    disk). When none allows O_DIRECT the test is skipped with the reason, and fails under CI.
    """

    if _o_direct_works(tmp_path):
        yield tmp_path
        return
    for base in ("/var/tmp", str(ROOT)):
        try:
            d = Path(tempfile.mkdtemp(prefix="bm-odirect-", dir=base))
        except OSError:
            continue
        try:
            if _o_direct_works(d):
                yield d
                return
        finally:
            shutil.rmtree(d, ignore_errors=True)
    msg = "no directory here allows O_DIRECT (tried tmp_path, /var/tmp, the repository)"
    if IN_CI:
        pytest.fail(msg + " (CI=true requires it)")
    pytest.skip(msg)
