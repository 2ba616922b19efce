"""A persistent bitmap written by our daemon as the base of an incremental mirror, across a
clean restart and a SIGKILL, checked with ``qemu-img info``/``check``/``compare``.

Both daemons run the same lifecycle on their own copy of the image and their replies are
compared; the mirror from a bitmap (``__org.blockmirror_bitmap``, Proxmox VE's ``bitmap``)
exists only in ours, QEMU 7.2 has no mirror bitmap argument, so:

* after a clean quit the bitmap is intact in both (same ``qemu-img info`` flags, same
  ``x-debug-block-dirty-bitmap-sha256``); ours then mirrors incrementally from it onto a
  replica taken when the bitmap was added, copying exactly the bytes it marked, and the
  replica ends equal to the image (``qemu-img compare``);
* after a SIGKILL the bitmap is ``in-use`` in the image and ``inconsistent`` once reopened, in
  both; it is refused for incremental use with QEMU's text: by our mirror (blockdev-mirror
  and drive-mirror) and, in qemu-storage-daemon 7.2, by its incremental consumer
  ``blockdev-backup sync=incremental``. Removing it recovers, and ``qemu-img check`` is clean.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from test_bitmap_persistence import _check, _cmd, _daemon, _dirty_bitmaps, _info_bitmaps, _write

from blockmirror.qmp.testing import SyncQMP
from conftest import require_tool
from qsd_diff import assert_same_log

pytestmark = pytest.mark.interop

BM = "__org.blockmirror_bitmap"
INCONSISTENT = "Bitmap 'inc' is inconsistent and cannot be used"


def _wait_status(conn: SyncQMP, job: str, status: str) -> dict[str, Any]:
    """Poll query-block-jobs (events are skipped by ``_cmd``) until ``job`` is in ``status``."""
    for _ in range(6000):
        for info in _cmd(conn, "query-block-jobs")["return"]:
            if info["device"] == job and info["status"] == status:
                return dict(info)
        time.sleep(0.01)
    raise AssertionError(f"{job} never reached {status}")


def _incremental_mirror(conn: SyncQMP, replica: Path) -> list[Any]:
    """Ours only: Proxmox VE's incremental mirror onto the replica, then the pivot."""
    seen: list[Any] = []
    seen.append(_cmd(conn, "blockdev-add", {
        "driver": "qcow2", "node-name": "t0",
        "file": {"driver": "file", "filename": str(replica)}}))
    seen.append(_cmd(conn, "blockdev-mirror", {
        "job-id": "mirror-d0", "device": "d0", "target": "t0", "sync": "incremental",
        BM: "inc", "auto-dismiss": False}))
    busy = next(b for b in _dirty_bitmaps(conn) if b["name"] == "inc")
    seen.append(("busy while mirroring", busy["busy"]))
    ready = _wait_status(conn, "mirror-d0", "ready")
    seen.append(("copied at READY", ready["offset"], ready["len"]))
    seen.append(_cmd(conn, "job-complete", {"id": "mirror-d0"}))
    _wait_status(conn, "mirror-d0", "concluded")
    seen.append(_cmd(conn, "job-dismiss", {"id": "mirror-d0"}))
    return seen


def _lifecycle(kind: str, tmp: Path) -> tuple[list[Any], list[Any]]:
    """(what both daemons must answer alike, what only ours does)."""
    image = tmp / f"{kind}.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "8M"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 8M", str(image)],
                   check=True, capture_output=True)
    replica = tmp / f"{kind}-replica.qcow2"
    shared: list[Any] = []
    ours_only: list[Any] = []
    with _daemon(kind, tmp, image) as proc, proc.connect() as conn:
        _cmd(conn, "qmp_capabilities")
        shared.append(_cmd(conn, "block-dirty-bitmap-add",
                           {"node": "d0", "name": "inc", "persistent": True}))
        # the replica is the image as of the bitmap's start (cf. a storage replication run)
        shutil.copyfile(image, replica)
        _write(tmp, kind, "write -P 0x22 1M 64k", "write -P 0x33 5M 4k", "write -P 0x44 7M 512")
        shared.append(_cmd(conn, "x-debug-block-dirty-bitmap-sha256",
                           {"node": "d0", "name": "inc"}))
        _cmd(conn, "quit")
        proc.proc.wait(20)
    shared.append(("clean quit", _info_bitmaps(image), _check(image)[0]))
    with _daemon(kind, tmp, image) as proc, proc.connect() as conn:
        _cmd(conn, "qmp_capabilities")
        shared.append(("reopened", _dirty_bitmaps(conn)))
        shared.append(_cmd(conn, "x-debug-block-dirty-bitmap-sha256",
                           {"node": "d0", "name": "inc"}))
        if kind == "ours":
            ours_only += _incremental_mirror(conn, replica)
            ours_only.append(("after on-success",
                              [(b["name"], b["count"], b["busy"])
                               for b in _dirty_bitmaps(conn) or []]))
        _cmd(conn, "quit")
        proc.proc.wait(20)
    if kind == "ours":
        r = subprocess.run(["qemu-img", "compare", str(image), str(replica)],
                           capture_output=True, text=True)
        ours_only.append(("compare", r.returncode, r.stdout.strip()))
        ours_only.append(("check replica", _check(replica)[0]))
    with _daemon(kind, tmp, image) as proc, proc.connect() as conn:
        _cmd(conn, "qmp_capabilities")
        _write(tmp, kind, "write -P 0x55 2M 4k")
        proc.proc.kill()  # SIGKILL: the bitmap stays marked in use in the image
        proc.proc.wait(20)
    shared.append(("killed", _info_bitmaps(image)))
    with _daemon(kind, tmp, image) as proc, proc.connect() as conn:
        _cmd(conn, "qmp_capabilities")
        shared.append(("inconsistent", _dirty_bitmaps(conn)))
        shared.append(_cmd(conn, "blockdev-add", {"driver": "null-co", "node-name": "n0",
                                                  "size": 8 << 20}))
        if kind == "ours":
            for command, args in [
                ("blockdev-mirror", {"job-id": "m", "device": "d0", "target": "n0",
                                     "sync": "incremental", BM: "inc"}),
                ("drive-mirror", {"job-id": "m", "device": "d0", "target": str(tmp / "dm.raw"),
                                  "format": "raw", "sync": "bitmap", BM: "inc",
                                  "__org.blockmirror_bitmap-mode": "never"}),
            ]:
                shared.append(("incremental use", _cmd(conn, command, args)))
        else:
            # QEMU 7.2's incremental consumer of a bitmap: the same refusal, as the same error
            reply = _cmd(conn, "blockdev-backup", {"job-id": "m", "device": "d0",
                                                   "target": "n0", "sync": "incremental",
                                                   "bitmap": "inc"})
            shared += [("incremental use", reply)] * 2
        shared.append(_cmd(conn, "query-block-jobs"))
        shared.append(_cmd(conn, "block-dirty-bitmap-remove", {"node": "d0", "name": "inc"}))
        _cmd(conn, "quit")
        proc.proc.wait(20)
    shared.append(("final", _info_bitmaps(image), _check(image)[0]))
    return shared, ours_only


def test_incremental_mirror_base_survives_restart_and_sigkill(tmp_path: Path) -> None:
    require_tool("qemu-storage-daemon", "qemu-img", "qemu-io")
    want, _ = _lifecycle("qsd", tmp_path)
    got, ours = _lifecycle("ours", tmp_path)
    assert_same_log(want, got)
    # what that means, spelt out
    assert got[2] == ("clean quit", [{"flags": ["auto"], "name": "inc",
                                      "granularity": 65536}], 0)
    assert got[4] == got[1]  # the bits survived the restart
    assert got[5][1][0]["flags"] == ["in-use", "auto"]
    assert got[6][1][0]["inconsistent"] is True
    for refusal in got[8:10]:
        assert refusal[1]["error"] == {"class": "GenericError", "desc": INCONSISTENT}
    assert got[-1] == ("final", None, 0)
    # ours: the mirror copied the bitmap's 64 KiB + 4 KiB + 512 B (whole 64 KiB granules)
    assert ours[0] == {"return": {}} and ours[1] == {"return": {}}, ours
    assert ours[2] == ("busy while mirroring", True)
    assert ours[3] == ("copied at READY", 3 * 65536, 3 * 65536)
    assert ours[-3] == ("after on-success", [("inc", 0, False)])
    assert ours[-2][:2] == ("compare", 0), ours[-2]
    assert ours[-1] == ("check replica", 0)
