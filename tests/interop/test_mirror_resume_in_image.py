"""The resume log kept inside the qcow2 source (``x-resume-store: "image"``, issue 12).

* SIGKILL of a live mirror with a writer at seeded moments: 24 kill points by default,
  4 seeds x {copy, READY, write-blocking} x {file, NBD (qemu-nbd)} targets, all with a
  qcow2 source (the store needs one). The restarted mirror resumes from the state in the
  source, plans exactly what that state says (checkpoint dirty + hot extents), and that
  plan is within what was dirty or in flight at the kill plus the hot extents, measured per
  run as in the sidecar matrix (``test_mirror_resume_kill.py``); the run ends with a target
  equal to the writer's model, byte for byte. ``qemu-img check`` of the source after each
  kill finds no corruption and does not count the area as leaked; after the pivot the area
  is gone and both images check clean. ``RESUME_KILL_CASES=N`` runs a seeded slice of N
  kill points while developing (as in the sidecar matrix).
* A read-write open by QEMU in between (``qemu-io``, even one that only reads) clears our
  autoclear bit: the resume is refused, and the error says why. So is a write through our own
  daemon while no mirror tracks the source.
* ``qemu-img info`` shows the area's bitmap (in use) while it exists, and nothing after.
"""

from __future__ import annotations

import json
import os
import random
import re
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest

from blockmirror.block.drivers.qcow2.resume_area import (
    AUTOCLEAR_RESUME,
    EXT_RESUME,
    RESUME_BITMAP,
)
from blockmirror.jobs.mirror.activity_log import Recovered
from blockmirror.jobs.mirror.image_store import read_image_log
from conftest import IN_CI, require_tool
from resume_kill_helpers import (
    BLOCKMIRROR,
    GRAN,
    PHASES,
    SIZE,
    MiB,
    Monitor,
    Writer,
    assert_model,
    assert_recopy_within_bound,
    export,
    killed_cli_mirror,
    mirror_args,
    node,
    phase_args,
    prepare_images,
    quit_daemon,
    recopy_bound,
    resume_to_pivot,
    serve_target,
    sh,
    start_daemon,
    write_until_kill,
)

pytestmark = pytest.mark.interop

TARGETS = ("file", "nbd")
ALL_CASES = [(phase, seed, tkind) for seed in (1, 2, 3, 4) for tkind in TARGETS
             for phase in PHASES]
SLICE = int(os.environ.get("RESUME_KILL_CASES", "0"))
CASES = random.Random(12).sample(ALL_CASES, SLICE) if SLICE else ALL_CASES


def _args(**extra: Any) -> dict[str, Any]:
    return mirror_args(**{"x-resume-store": "image", **extra})


def test_the_in_image_kill_matrix_covers_the_acceptance() -> None:
    """At least 20 kill points over copy, READY and write-blocking, with file and NBD
    targets (issue 12; the source is qcow2, which the in-image store needs); a development
    slice is reported, not hidden."""
    if SLICE:
        if IN_CI:
            pytest.fail(f"RESUME_KILL_CASES={SLICE} under CI=true: CI runs the whole matrix")
        pytest.skip(f"RESUME_KILL_CASES={SLICE}: a development slice, not the acceptance run")
    assert len(set(CASES)) >= 20
    assert {(p, t) for p, _, t in CASES} == {(p, t) for p in PHASES for t in TARGETS}


def _state(image: str) -> Recovered:
    found = read_image_log(image)
    assert found is not None, "no resume state in the source"
    rec, current = found
    assert current, "the resume state's autoclear bit is clear"
    return rec


def _header(path: str) -> tuple[int, list[int]]:
    """(autoclear bits, header extension types) of a qcow2 file."""
    data = Path(path).read_bytes()[:65536]
    autoclear = struct.unpack_from(">Q", data, 88)[0]
    pos = struct.unpack_from(">I", data, 100)[0]
    types = []
    while True:
        t, n = struct.unpack_from(">II", data, pos)
        if t == 0:
            return autoclear, types
        types.append(t)
        pos += 8 + (n + 7) // 8 * 8


def _check(path: str, *, leaks_ok: bool = False) -> dict[str, Any]:
    p = subprocess.run(["qemu-img", "check", "--output=json", path], capture_output=True,
                       text=True)
    out: dict[str, Any] = json.loads(p.stdout)
    assert out.get("corruptions", 0) == 0 and out.get("check-errors", 0) == 0, out
    assert p.returncode in ((0, 3) if leaks_ok else (0,)), (p.returncode, out)
    return out


def _bitmaps(path: str, *extra: str) -> list[dict[str, Any]]:
    info = json.loads(sh("qemu-img", "info", *extra, "--output=json", path))
    data = info["format-specific"]["data"]
    return list(data.get("bitmaps", []))


def _wait_area(m: Monitor, path: str) -> None:
    """The job writes its area when it starts, just after blockdev-mirror returned."""
    for _ in range(10000):
        if _header(path)[0] & AUTOCLEAR_RESUME:
            return
        m.job()  # a round trip to the daemon between looks
    raise AssertionError("the mirror did not write its resume state into the source")


def _case(tmp: Path, phase: str, seed: int, tkind: str) -> dict[str, int]:
    rng = random.Random(f"in-image{tkind}{phase}{seed}")
    initial, model_path, src_path, tgt_path = prepare_images(tmp, "qcow2", rng)
    src = node("src", "qcow2", {"driver": "file", "filename": src_path})
    tgt = node("tgt", "qcow2", {"driver": "file", "filename": tgt_path})
    nbd_srv: subprocess.Popen[bytes] | None = None
    if tkind == "nbd":
        nbd_srv, tgt = serve_target(tmp, "qcow2", tgt_path)
    try:
        return _run_case(tmp, phase, rng, initial, model_path, src_path, tgt_path, src, tgt,
                         nbd_srv)
    finally:
        if nbd_srv is not None and nbd_srv.poll() is None:
            nbd_srv.terminate()
            nbd_srv.wait(10)


def _run_case(tmp: Path, phase: str, rng: random.Random, initial: bytearray, model_path: Path,
              src_path: str, tgt_path: str, src: dict[str, Any], tgt: dict[str, Any],
              nbd_srv: subprocess.Popen[bytes] | None) -> dict[str, int]:
    model = bytearray(initial)
    # --- run 1: mirror, write, SIGKILL -----------------------------------------------------
    d, m = start_daemon(tmp, 1, src, tgt)
    try:
        m.cmd("blockdev-mirror", _args(**phase_args(phase)))
        _wait_area(m, src_path)
        # mid-mirror, QEMU shows the area's bitmap, in use (-U: the daemon holds the lock)
        assert _bitmaps(src_path, "-U") == [
            {"name": RESUME_BITMAP, "granularity": GRAN, "flags": ["in-use"]}]
        autoclear, exts = _header(src_path)
        assert autoclear & AUTOCLEAR_RESUME and EXT_RESUME in exts, (autoclear, exts)
        w = Writer(export(m, tmp, 1), model, rng)
        done, _ = write_until_kill(d, m, w, phase, rng, look_each_write=True)
    finally:
        d.kill()
    # what the daemon had copied (QEMU's offset) and left to copy, just before the kill
    done_at_kill = done["offset"]
    remaining_at_kill = done["len"] - done["offset"]
    not_counted = w.not_counted()
    pending = w.pending
    # the write sent but not acknowledged at the kill may have made its chunks dirty
    unacked = 65536 + GRAN if pending else 0
    # after the kill: no corruption; leaks only from the guest's last allocations (a
    # read-write repair would clear our bit, so it waits until after the pivot)
    check = _check(src_path, leaks_ok=True)
    killed_leaks = check.get("leaks", 0)
    assert _bitmaps(src_path) == [
        {"name": RESUME_BITMAP, "granularity": GRAN, "flags": ["in-use"]}]
    rec = _state(src_path)
    bound, hot = recopy_bound(rec)
    # copied after the last durable checkpoint's snapshot (its meta.offset): not yet made
    # durable on the target by a flush, so the checkpoint still lists it
    lag = max(0, done_at_kill - rec.meta["offset"])
    if nbd_srv is None:
        sh("qemu-img", "check", "-q", "-r", "leaks", tgt_path)
    # --- run 2: resume ---------------------------------------------------------------------
    d, m = start_daemon(tmp, 2, src, tgt)
    try:
        recopy = resume_to_pivot(m, _args(), bound, pending, rng,
                                 lambda: Writer(export(m, tmp, 2), model, rng))
        # the area is gone from the source, which is still open
        assert _bitmaps(src_path, "-U") == []
        quit_daemon(d, m)
    finally:
        d.kill()
    autoclear, exts = _header(src_path)
    assert not autoclear & AUTOCLEAR_RESUME and EXT_RESUME not in exts, (autoclear, exts)
    assert read_image_log(src_path) is None
    if killed_leaks:
        sh("qemu-img", "check", "-q", "-r", "leaks", src_path)
    _check(src_path)
    if nbd_srv is not None:
        nbd_srv.terminate()
        nbd_srv.wait(10)
    assert_model(model_path, model, "qcow2", tgt_path)
    _check(tgt_path)
    return {"recopy": recopy, "bound": bound, "hot": hot, "lag": lag, "unacked": unacked,
            "not_counted": not_counted, "remaining_at_kill": remaining_at_kill,
            "leaks": killed_leaks}


@pytest.mark.parametrize(("phase", "seed", "tkind"), CASES,
                         ids=[f"{p}-{s}-{t}" for p, s, t in CASES])
def test_sigkill_then_resume_from_the_image(tmp_path: Path, phase: str, seed: int,
                                            tkind: str) -> None:
    require_tool("qemu-io", "qemu-img", "qemu-nbd")
    stats = _case(tmp_path, phase, seed, tkind)
    assert_recopy_within_bound(stats, f"in-image resume {phase}/{seed}/{tkind}",
                               f"; source leaks after the kill {stats['leaks']}")


def _setup(tmp: Path) -> tuple[str, str, dict[str, Any], dict[str, Any]]:
    src_path, tgt_path = str(tmp / "src.qcow2"), str(tmp / "tgt.qcow2")
    raw = tmp / "data.raw"
    raw.write_bytes(random.Random(5).randbytes(SIZE))
    sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), src_path)
    sh("qemu-img", "create", "-q", "-f", "qcow2", tgt_path, str(SIZE))
    return (src_path, tgt_path, node("src", "qcow2", {"driver": "file", "filename": src_path}),
            node("tgt", "qcow2", {"driver": "file", "filename": tgt_path}))


def _to_ready(m: Monitor) -> None:
    m.cmd("blockdev-mirror", _args())
    m.wait_event("BLOCK_JOB_READY")


def test_resume_refused_after_a_foreign_read_write_open(tmp_path: Path) -> None:
    require_tool("qemu-io", "qemu-img")
    src_path, tgt_path, src, tgt = _setup(tmp_path)
    stale = (f"Cannot resume the mirror: the resume state in the qcow2 source '{src_path}' "
             "is stale: its autoclear bit is clear: the image was opened read-write by "
             "another program, or written while no mirror tracked it, since the resume state "
             "was written. Use a full restart instead")
    for run, end in ((1, "kill"), (3, "cancel")):
        d, m = start_daemon(tmp_path, run, src, tgt)
        try:
            _to_ready(m)
            if end == "cancel":
                m.cancel()
                quit_daemon(d, m)
        finally:
            d.kill()
        assert _header(src_path)[0] & AUTOCLEAR_RESUME
        # QEMU opens it read-write and only reads: that clears our bit, keeps the rest
        sh("qemu-io", "-c", "read 0 512", src_path)
        autoclear, exts = _header(src_path)
        assert not autoclear & AUTOCLEAR_RESUME and EXT_RESUME in exts, (autoclear, exts)
        assert _bitmaps(src_path) == [
            {"name": RESUME_BITMAP, "granularity": GRAN, "flags": ["in-use"]}]
        _check(src_path)
        d, m = start_daemon(tmp_path, run + 1, src, tgt)
        try:
            rsp = m.try_cmd("blockdev-mirror", _args())
            assert rsp["error"]["class"] == "GenericError", rsp
            assert rsp["error"]["desc"] == stale, rsp
            assert m.cmd("query-block-jobs") == []
            # the full restart the error offers replaces the stale area
            m.cmd("blockdev-mirror", _args(**{"x-resume-restart": True}))
            assert m.job()["x-resumed"] == 0
            m.wait_event("BLOCK_JOB_READY")
            m.pivot()
            quit_daemon(d, m)
        finally:
            d.kill()
        assert _bitmaps(src_path) == []
        autoclear, exts = _header(src_path)
        assert not autoclear & AUTOCLEAR_RESUME and EXT_RESUME not in exts, (autoclear, exts)
        _check(src_path)
        _check(tgt_path)


def test_clean_stop_resumes_and_untracked_write_refuses(tmp_path: Path) -> None:
    """Cancelled cleanly, reopened by our daemon only: resumes with nothing to recopy. In
    the same daemon, a write while no mirror tracks the source clears the bit first."""
    require_tool("qemu-io", "qemu-img")
    src_path, _, src, _ = _setup(tmp_path)
    # a raw target: closing a qcow2 target after the closed checkpoint moves its
    # modification time (a limit of the sidecar's clean-stop check, not of this store)
    raw = tmp_path / "tgt.raw"
    raw.write_bytes(bytes(SIZE))
    tgt = node("tgt", "raw", {"driver": "file", "filename": str(raw)})
    d, m = start_daemon(tmp_path, 1, src, tgt)
    try:
        _to_ready(m)
        m.cancel()
        quit_daemon(d, m)
    finally:
        d.kill()
    _check(src_path)
    d, m = start_daemon(tmp_path, 2, src, tgt)
    try:
        m.cmd("blockdev-mirror", _args())
        assert m.job()["x-resumed"] == SIZE
        # the area's bitmap cannot be removed while the source is open
        rsp = m.try_cmd("block-dirty-bitmap-remove", {"node": "src", "name": RESUME_BITMAP})
        assert rsp["error"]["desc"] == (f"Bitmap '{RESUME_BITMAP}' is currently in use by "
                                        "another operation and cannot be used"), rsp
        m.wait_event("BLOCK_JOB_READY")
        m.cancel()
        assert _header(src_path)[0] & AUTOCLEAR_RESUME
        uri = export(m, tmp_path, 2)
        sh("qemu-io", "-f", "raw", "-c", "write -P 7 4096 512", uri)
        assert not _header(src_path)[0] & AUTOCLEAR_RESUME
        rsp = m.try_cmd("blockdev-mirror", _args())
        assert rsp["error"]["desc"] == (
            f"Cannot resume the mirror: the resume state in the qcow2 source '{src_path}' is "
            "stale: it was written while no mirror tracked it. Use a full restart instead"), rsp
        m.cmd("block-export-del", {"id": "e0"})
        quit_daemon(d, m)
    finally:
        d.kill()
    _check(src_path)


def test_image_store_argument_errors(tmp_path: Path) -> None:
    require_tool("qemu-img")
    src_path, _, src, tgt = _setup(tmp_path)
    raw = tmp_path / "r.raw"
    raw.write_bytes(bytes(SIZE))
    d, m = start_daemon(tmp_path, 1, src, tgt)
    try:
        m.cmd("blockdev-add", node("r", "raw", {"driver": "file", "filename": str(raw)}))
        v2 = str(tmp_path / "v2.qcow2")
        sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=0.10", v2, str(SIZE))
        m.cmd("blockdev-add", node("v2", "qcow2", {"driver": "file", "filename": v2}))
        cases = [
            (_args(**{"x-resume-log": str(tmp_path / "x")}),
             "Parameter 'x-resume-log' cannot be used with 'x-resume-store': 'image'"),
            (_args(**{"x-resume-store": "disk"}),
             "Parameter 'x-resume-store' does not accept value 'disk'"),
            (_args(**{"x-resume-store": "file"}), "Parameter 'x-resume-log' is missing"),
            (_args(device="r"),
             "Parameter 'x-resume-store': 'image' needs a qcow2 source in a local file"),
            (_args(device="v2"),
             "Parameter 'x-resume-store': 'image' needs a qcow2 v3 (compat=1.1) source"),
        ]
        for args, want in cases:
            rsp = m.try_cmd("blockdev-mirror", args)
            assert rsp["error"]["desc"] == want, rsp
        assert m.cmd("query-block-jobs") == []
    finally:
        d.kill()
    _check(src_path)


def test_cli_resume_store_image(tmp_path: Path) -> None:
    """``blockmirror mirror --resume-store image``: SIGKILLed mid-copy, the same command
    resumes from the state in the qcow2 source and says so; afterwards the area is gone."""
    require_tool("qemu-img")
    size = 32 * MiB
    raw = tmp_path / "data.raw"
    raw.write_bytes(random.Random(7).randbytes(size))
    src, dst = str(tmp_path / "src.qcow2"), str(tmp_path / "dst.raw")
    sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), src)
    options = ["--source-format", "qcow2", "--format", "raw", "--resume-store", "image"]
    killed_cli_mirror(src, dst, size, options)
    assert _header(src)[0] & AUTOCLEAR_RESUME
    assert not Path(f"{dst}.blockmirror-resume").exists()  # no sidecar
    _check(src, leaks_ok=True)
    p = subprocess.run([*BLOCKMIRROR, *options, src, dst], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    m = re.search(r"^resumed: (\d+\.\d) MiB to recopy of 32\.0 MiB$", p.stdout, re.M)
    assert m is not None, p.stdout
    assert float(m.group(1)) < 32 * 0.9
    assert Path(dst).read_bytes() == raw.read_bytes()
    assert _bitmaps(src) == []
    autoclear, exts = _header(src)
    assert not autoclear & AUTOCLEAR_RESUME and EXT_RESUME not in exts


def _drop_extension(path: str) -> None:
    """Rewrite the header's extensions without ours (the bit stays set)."""
    with open(path, "r+b") as f:
        data = bytearray(f.read(65536))
        pos = start = struct.unpack_from(">I", data, 100)[0]
        kept = b""
        while True:
            t, n = struct.unpack_from(">II", data, pos)
            step = 8 + (n + 7) // 8 * 8
            if t == 0:
                break
            if t != EXT_RESUME:
                kept += bytes(data[pos:pos + step])
            pos += step
        assert not struct.unpack_from(">Q", data, 8)[0], "a backing file would move"
        data[start:pos + 8] = (kept + bytes(8)).ljust(pos + 8 - start, b"\0")
        f.seek(0)
        f.write(data)


def test_resume_refused_when_the_state_is_incomplete(tmp_path: Path) -> None:
    """The bit without our extension (a tool rewrote the header): refused, and the bit is
    cleared by our read-write open, as an unknown bit."""
    require_tool("qemu-img")
    src_path, tgt_path, src, tgt = _setup(tmp_path)
    assert Path(tgt_path).exists()
    d, m = start_daemon(tmp_path, 1, src, tgt)
    try:
        _to_ready(m)
    finally:
        d.kill()
    _drop_extension(src_path)
    autoclear, exts = _header(src_path)
    assert autoclear & AUTOCLEAR_RESUME and EXT_RESUME not in exts
    d, m = start_daemon(tmp_path, 2, src, tgt)
    try:
        assert not _header(src_path)[0] & AUTOCLEAR_RESUME
        rsp = m.try_cmd("blockdev-mirror", _args())
        assert rsp["error"]["desc"] == (
            f"Cannot resume the mirror: the resume state in the qcow2 source '{src_path}' is "
            f"stale: its resume state is incomplete (extension {EXT_RESUME:#x} and bitmap "
            f"'{RESUME_BITMAP}' do not describe the same clusters). Use a full restart "
            "instead"), rsp
        m.cmd("blockdev-mirror", _args(**{"x-resume-restart": True}))
        m.wait_event("BLOCK_JOB_READY")
        m.pivot()
        quit_daemon(d, m)
    finally:
        d.kill()
    assert _bitmaps(src_path) == []
    _check(src_path)
