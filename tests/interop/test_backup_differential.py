"""blockdev-backup, drive-backup, internal snapshots and their transactions, differential
against qemu-storage-daemon 7.2: the same script (QMP steps and guest writes through NBD)
runs on both daemons over identical images; every reply, error class and text and the events
of every step must be identical, then the images each daemon left are compared with
``qemu-img compare``/``check``/``snapshot -l``, and point-in-time contents are checked.

Jobs are waited for within their step (``backup_script``), so no event's place depends on
timing; a job left running (``sync=none``) gets only guest I/O until it is cancelled.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from backup_script import compare, img, nbd_io, run, snapshot_list
from conftest import require_tool

pytestmark = pytest.mark.interop

M = 1 << 20
K = 1 << 10
TARGETS = ("t_full", "t_bm", "t_none", "t_none2", "t_full2", "t_raw")


def _qemu_io(path: Path, fmt: str, *commands: str) -> str:
    argv = ["qemu-io", "-f", fmt]
    for c in commands:
        argv += ["-c", c]
    r = subprocess.run([*argv, str(path)], capture_output=True, text=True, timeout=60)
    return f"rc={r.returncode} " + " | ".join(
        ln for ln in (r.stdout + r.stderr).splitlines()
        if "ops/sec" not in ln and not ln.startswith(("wrote ", "read ")))


def _setup(d: Path) -> list[str]:
    d.mkdir()

    def create(name: str, *extra: str, size: str = "8M") -> None:
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", *extra, str(d / name),
                        size], check=True)

    create("base.qcow2")
    _qemu_io(d / "base.qcow2", "qcow2", "write -P 0x11 0 2M")
    create("src.qcow2", "-b", str(d / "base.qcow2"), "-F", "qcow2")
    _qemu_io(d / "src.qcow2", "qcow2", "write -P 0x22 1M 1M", "write -P 0x33 5M 512k")
    for t in TARGETS[:-1]:
        create(f"{t}.qcow2")
    create("t_top.qcow2", "-b", str(d / "base.qcow2"), "-F", "qcow2")
    create("d_exist.qcow2", "-b", str(d / "base.qcow2"), "-F", "qcow2")
    create("small.qcow2", size="4M")
    create("ro.qcow2")
    (d / "t_raw.raw").write_bytes(bytes(8 * M))
    nodes = [
        "--blockdev", f"driver=file,node-name=base-f,filename={d / 'base.qcow2'}",
        "--blockdev", "driver=qcow2,node-name=base,file=base-f,read-only=on",
        "--blockdev", f"driver=file,node-name=src-f,filename={d / 'src.qcow2'}",
        "--blockdev", "driver=qcow2,node-name=src,file=src-f,backing=base",
        "--blockdev", f"driver=file,node-name=t_top-f,filename={d / 't_top.qcow2'}",
        "--blockdev", "driver=qcow2,node-name=t_top,file=t_top-f,backing=base",
        "--blockdev", f"driver=file,node-name=t_raw-f,filename={d / 't_raw.raw'}",
        "--blockdev", "driver=raw,node-name=t_raw,file=t_raw-f",
        "--blockdev", f"driver=file,node-name=ro-f,filename={d / 'ro.qcow2'},read-only=on",
        "--blockdev", "driver=qcow2,node-name=ro,file=ro-f,read-only=on",
        "--blockdev", f"driver=file,node-name=small-f,filename={d / 'small.qcow2'}",
        "--blockdev", "driver=qcow2,node-name=small,file=small-f",
    ]
    for t in TARGETS[:-1]:
        nodes += ["--blockdev", f"driver=file,node-name={t}-f,filename={d / (t + '.qcow2')}",
                  "--blockdev", f"driver=qcow2,node-name={t},file={t}-f"]
    return nodes


def _bb(job: str | None, target: str, sync: str, **extra: Any) -> dict[str, Any]:
    args: dict[str, Any] = {"device": "src", "target": target, "sync": sync, **extra}
    if job is not None:
        args["job-id"] = job
    return args


def _steps(d: Path) -> list[tuple[Any, ...]]:
    sha = ("qmp", "x-debug-block-dirty-bitmap-sha256", {"node": "src", "name": "b0"})
    return [
        # refusals, in QEMU's order of checks
        ("qmp", "blockdev-backup", _bb(None, "t_full", "full")),
        ("qmp", "blockdev-backup", _bb("1j", "t_full", "full")),
        ("qmp", "blockdev-backup", _bb("e", "nope", "full")),
        ("qmp", "blockdev-backup", _bb("e", "src", "full")),
        ("qmp", "blockdev-backup", _bb("e", "small", "full")),
        ("qmp", "blockdev-backup", _bb("e", "t_raw", "full", compress=True)),
        ("qmp", "blockdev-backup", _bb("e", "t_full", "bitmap")),
        ("qmp", "blockdev-backup", _bb("e", "t_full", "incremental")),
        ("qmp", "blockdev-backup", _bb("e", "t_full", "full", bitmap="nope")),
        ("qmp", "blockdev-backup", _bb("e", "t_full", "full", **{"bitmap-mode": "never"})),
        ("qmp", "blockdev-backup", _bb("e", "t_full", "full", **{"x-perf": {"max-chunk": 1}})),
        ("qmp", "blockdev-backup", _bb("e", "t_full", "full", **{"x-perf": {"max-chunk": -1}})),
        ("qmp", "blockdev-backup", _bb("e", "t_full", "full",
                                       **{"x-perf": {"max-workers": 0}})),
        ("qmp", "blockdev-backup", _bb("e", "t_full", "full", **{"filter-node-name": "9"})),
        ("qmp", "blockdev-backup", _bb("e", "t_full", "full", **{"filter-node-name": "base"})),
        ("qmp", "blockdev-backup", _bb("e", "t_full", "full", speed=-1)),
        ("qmp", "blockdev-backup", _bb("e", "t_full", "sideways")),
        ("qmp", "drive-backup", {"device": "nope", "target": str(d / "x.qcow2"),
                                 "sync": "full"}),
        # a dirty bitmap, guest writes
        ("qmp", "block-dirty-bitmap-add", {"node": "src", "name": "b0"}),
        ("qmp", "block-export-add", {"type": "nbd", "id": "e0", "node-name": "src",
                                     "name": "src", "writable": True}),
        ("nbd", "src", ["write -P 0x44 2M 128k", "write -P 0x55 7M 64k"]),
        ("qmp", "blockdev-backup", _bb("e", "t_full", "incremental", bitmap="b0",
                                       **{"bitmap-mode": "never"})),
        ("qmp", "blockdev-backup", _bb("e", "t_full", "top", bitmap="b0",
                                       **{"bitmap-mode": "never"})),
        ("qmp", "blockdev-backup", _bb("e", "t_full", "none", bitmap="b0",
                                       **{"bitmap-mode": "always"})),
        # full, with the bitmap handed over on success: only later writes stay in it
        ("job", "blockdev-backup", _bb("f1", "t_full", "full"), ["f1"]),
        sha,
        ("job", "blockdev-backup", _bb("bm1", "t_bm", "bitmap", bitmap="b0",
                                       **{"bitmap-mode": "never"}), ["bm1"]),
        sha,
        ("nbd", "src", ["write -P 0x66 3M 64k"]),
        ("job", "blockdev-backup", _bb("bm2", "t_bm", "incremental", bitmap="b0",
                                       speed=1 << 30, **{"filter-node-name": "cbw"}), ["bm2"]),
        sha,
        ("nbd", "src", ["write -P 0x67 4M 64k"]),
        ("job", "blockdev-backup", _bb("bm3", "t_bm", "bitmap", bitmap="b0",
                                       **{"bitmap-mode": "always"}), ["bm3"]),
        sha,
        ("job", "blockdev-backup", _bb("tp", "t_top", "top"), ["tp"]),
        # sync=none: only the guest's writes copy (the old data) to the target
        ("qmp", "blockdev-backup", _bb("n1", "t_none", "none")),
        ("nbd", "src", ["write -P 0x77 0 64k", "write -P 0x78 1056k 64k"]),
        ("qmp", "query-block-jobs", {}),
        ("job", "block-job-cancel", {"device": "n1"}, ["n1"]),
        # manual finalize and dismiss
        ("job", "blockdev-backup", _bb("mf", "t_full2", "full", **{
            "auto-finalize": False, "auto-dismiss": False}), ["mf"], "pending"),
        ("qmp", "query-jobs", {}),
        ("job", "block-job-finalize", {"id": "mf"}, ["mf"], "concluded"),
        ("qmp", "block-job-dismiss", {"id": "mf"}),
        # a group: the none job never ends by itself, so the full one waits for it, and
        # cancelling the first cancels the group
        ("job", "transaction", {"actions": [
            {"type": "blockdev-backup", "data": _bb("g1", "t_none2", "none")},
            {"type": "blockdev-backup", "data": _bb("g2", "t_full2", "full")},
        ], "properties": {"completion-mode": "grouped"}}, ["g2"], "waiting"),
        ("job", "block-job-cancel", {"device": "g1"}, ["g1", "g2"]),
        ("qmp", "transaction", {"actions": [
            {"type": "blockdev-backup", "data": _bb("a1", "t_full2", "full")},
            {"type": "abort", "data": {}}]}),
        ("qmp", "transaction", {"actions": [
            {"type": "block-dirty-bitmap-add", "data": {"node": "src", "name": "b9"}},
            {"type": "blockdev-backup", "data": _bb("a1", "t_full2", "full")}],
            "properties": {"completion-mode": "grouped"}}),
        # the completion mode is checked as each action prepares; abort accepts any
        ("qmp", "transaction", {"actions": [
            {"type": "blockdev-backup", "data": _bb("a2", "t_full2", "full")},
            {"type": "block-dirty-bitmap-add", "data": {"node": "src", "name": "b9"}}],
            "properties": {"completion-mode": "grouped"}}),
        ("qmp", "transaction", {"actions": [{"type": "abort", "data": {}}],
                                "properties": {"completion-mode": "grouped"}}),
        ("qmp", "transaction", {"actions": [
            {"type": "blockdev-snapshot-internal-sync", "data": {"device": "src",
                                                                 "name": "g"}}],
            "properties": {"completion-mode": "grouped"}}),
        # drive-backup: creates its target
        ("job", "drive-backup", {"device": "src", "target": str(d / "d_full.qcow2"),
                                 "sync": "full", "job-id": "d1"}, ["d1"]),
        ("job", "drive-backup", {"device": "src", "target": str(d / "d_top.qcow2"),
                                 "sync": "top", "job-id": "d2", "format": "qcow2"}, ["d2"]),
        ("job", "drive-backup", {"device": "src", "target": str(d / "d_full.qcow2"),
                                 "sync": "full", "job-id": "d3", "mode": "existing"}, ["d3"]),
        ("job", "drive-backup", {"device": "src", "target": str(d / "d_exist.qcow2"),
                                 "sync": "full", "job-id": "d4", "mode": "existing",
                                 "format": "qcow2"}, ["d4"]),
        ("qmp", "query-named-block-nodes", {"flat": True}),
        # internal snapshots
        ("qmp", "blockdev-snapshot-internal-sync", {"device": "src", "name": "s1"}),
        ("nbd", "src", ["write -P 0x88 0 64k"]),
        ("qmp", "blockdev-snapshot-internal-sync", {"device": "src", "name": "s2"}),
        ("nbd", "src", ["write -P 0x99 0 128k", "write -z 6M 1M"]),
        ("qmp", "blockdev-snapshot-internal-sync", {"device": "src", "name": "s2"}),
        ("qmp", "blockdev-snapshot-internal-sync", {"device": "src", "name": ""}),
        ("qmp", "blockdev-snapshot-internal-sync", {"device": "t_raw", "name": "x"}),
        ("qmp", "blockdev-snapshot-internal-sync", {"device": "src-f", "name": "x"}),
        ("qmp", "blockdev-snapshot-internal-sync", {"device": "base", "name": "x"}),
        ("qmp", "blockdev-snapshot-internal-sync", {"device": "nope", "name": "x"}),
        ("qmp", "blockdev-snapshot-internal-sync", {"device": "ro", "name": "x"}),
        ("qmp", "blockdev-snapshot-internal-sync", {"device": "t_full2", "name": "L" * 300}),
        ("qmp", "blockdev-snapshot-internal-sync", {"device": "t_full2", "name": "L" * 300}),
        ("qmp", "blockdev-snapshot-internal-sync", {"device": "t_full2", "name": "L" * 255}),
        ("qmp", "blockdev-snapshot-internal-sync", {"device": "t_full2", "name": "é" * 200}),
        ("qmp", "blockdev-snapshot-delete-internal-sync", {"device": "ro", "name": "x"}),
        ("qmp", "transaction", {"actions": [
            {"type": "blockdev-snapshot-internal-sync", "data": {"device": "src",
                                                                 "name": "s3"}},
            {"type": "abort", "data": {}}]}),
        ("qmp", "transaction", {"actions": [
            {"type": "blockdev-snapshot-internal-sync", "data": {"device": "t_full",
                                                                 "name": "tx"}},
            {"type": "blockdev-snapshot-internal-sync", "data": {"device": "t_bm",
                                                                 "name": "tx"}}]}),
        ("qmp", "blockdev-snapshot-delete-internal-sync", {"device": "src"}),
        ("qmp", "blockdev-snapshot-delete-internal-sync", {"device": "src", "name": "zz"}),
        ("qmp", "blockdev-snapshot-delete-internal-sync", {"device": "src", "id": "7"}),
        ("qmp", "blockdev-snapshot-delete-internal-sync", {"device": "src", "id": "1",
                                                           "name": "s2"}),
        ("qmp", "blockdev-snapshot-delete-internal-sync", {"device": "t_raw", "id": "1"}),
        ("qmp", "blockdev-snapshot-delete-internal-sync", {"device": "src", "id": "1"}),
        ("qmp", "blockdev-snapshot-internal-sync", {"device": "src", "name": "s4"}),
        ("nbd", "src", ["write -P 0xaa 64k 64k"]),
        ("qmp", "blockdev-snapshot-internal-sync", {"device": "src", "name": "s5"}),
        ("qmp", "blockdev-snapshot-delete-internal-sync", {"device": "src", "name": "s4"}),
        ("qmp", "query-named-block-nodes", {"flat": True}),
        ("qmp", "block-export-del", {"id": "e0"}),
        # x-blockdev-amend: an amend job kept until dismissed
        ("qmp", "x-blockdev-amend", {"job-id": "am", "node-name": "src",
                                     "options": {"driver": "qcow2"}}),
        ("qmp", "query-jobs", {}),
        ("qmp", "job-dismiss", {"id": "am"}),
        ("qmp", "x-blockdev-amend", {"job-id": "am", "node-name": "src", "force": True,
                                     "options": {"driver": "qcow2", "encrypt": {
                                         "format": "luks", "state": "active",
                                         "new-secret": "s"}}}),
        ("qmp", "query-jobs", {}),
        ("qmp", "job-dismiss", {"id": "am"}),
        ("qmp", "x-blockdev-amend", {"job-id": "am", "node-name": "t_raw",
                                     "options": {"driver": "raw"}}),
        ("qmp", "x-blockdev-amend", {"job-id": "am", "node-name": "t_raw",
                                     "options": {"driver": "qcow2"}}),
        ("qmp", "x-blockdev-amend", {"job-id": "am", "node-name": "src",
                                     "options": {"driver": "luks"}}),
        ("qmp", "x-blockdev-amend", {"job-id": "am", "node-name": "nope",
                                     "options": {"driver": "qcow2"}}),
        ("qmp", "x-blockdev-amend", {"job-id": "9", "node-name": "src",
                                     "options": {"driver": "qcow2"}}),
    ]


def test_backup_and_snapshot_script_matches_qsd(tmp_path: Path) -> None:
    require_tool("qemu-storage-daemon", "qemu-img", "qemu-io")
    dirs = {kind: tmp_path / kind for kind in ("qsd", "ours")}
    results = {}
    for kind, d in dirs.items():
        nodes = _setup(d)
        results[kind] = run(kind, d, nodes, _steps(d))
    problem = compare(results["qsd"], results["ours"])
    assert not problem, problem
    q, o = dirs["qsd"], dirs["ours"]
    # every image the jobs and snapshots wrote: same contents, clean, same snapshots
    for name in ("t_full", "t_bm", "t_top", "t_none", "t_none2", "t_full2", "d_full",
                 "d_top", "d_exist", "src", "ro"):
        path = f"{name}.qcow2"
        assert img("compare", str(q / path), str(o / path)).startswith(
            "rc=0 Images are identical."), name
        check = img("check", str(o / path))
        assert check.startswith("rc=0 No errors were found on the image."), (name, check)
        assert snapshot_list(o / path) == snapshot_list(q / path), name
    assert [r[1] for r in snapshot_list(o / "src.qcow2")] == ["s2", "s5"]
    assert [r[1] for r in snapshot_list(o / "t_bm.qcow2")] == ["tx"]
    # point in time: the sync=none target holds the data as it was before the guest wrote
    assert _qemu_io(o / "t_none.qcow2", "qcow2", "read -P 0x22 0 64k").startswith(
        "rc=0") is False  # base data (0x11) was there, not 0x22
    assert _qemu_io(o / "t_none.qcow2", "qcow2", "read -P 0x11 0 64k",
                    "read -P 0x22 1M 128k", "read -P 0 128k 896k") == "rc=0 "
    # the full backup is the source as it was when it started
    assert _qemu_io(o / "t_full.qcow2", "qcow2", "read -P 0x44 2M 128k",
                    "read -P 0x55 7M 64k", "read -P 0x33 5M 512k") == "rc=0 "


def test_internal_snapshots_restore_with_qemu_img(tmp_path: Path) -> None:
    """Our snapshots, applied by ``qemu-img snapshot -a``, give back the data of their time;
    deleting every snapshot leaves a clean image with no leaked cluster."""
    require_tool("qemu-img", "qemu-io")
    d = tmp_path / "ours"
    nodes = _setup(d)
    # a snapshot QEMU wrote: ours must keep it, and can delete it
    subprocess.run(["qemu-img", "snapshot", "-c", "q", str(d / "src.qcow2")], check=True)
    steps: list[tuple[Any, ...]] = [
        ("qmp", "block-export-add", {"type": "nbd", "id": "e0", "node-name": "src",
                                     "name": "src", "writable": True}),
        ("qmp", "blockdev-snapshot-internal-sync", {"device": "src", "name": "a"}),
        ("nbd", "src", ["write -P 0xa1 0 3M", "write -z 5M 64k"]),
        ("qmp", "blockdev-snapshot-internal-sync", {"device": "src", "name": "b"}),
        ("nbd", "src", ["write -P 0xb1 1M 1M", "discard 0 64k"]),
        ("qmp", "block-export-del", {"id": "e0"}),
    ]
    out = run("ours", d, nodes, steps)
    assert all('"error"' not in line for line in out), out
    src = d / "src.qcow2"
    assert img("check", str(src)).startswith("rc=0 No errors")
    assert _qemu_io(src, "qcow2", "read -P 0xb1 1M 1M", "read -P 0xa1 2M 1M") == "rc=0 "
    subprocess.run(["qemu-img", "snapshot", "-a", "b", str(src)], check=True)
    assert _qemu_io(src, "qcow2", "read -P 0xa1 0 3M", "read -P 0 5M 64k",
                    "read -P 0x33 5308416 448k") == "rc=0 "
    subprocess.run(["qemu-img", "snapshot", "-a", "a", str(src)], check=True)
    assert _qemu_io(src, "qcow2", "read -P 0x11 0 1M", "read -P 0x22 1M 1M",
                    "read -P 0x33 5M 512k") == "rc=0 "
    assert img("check", str(src)).startswith("rc=0 No errors")
    # our delete of every snapshot, then QEMU's check: no leaks, no errors
    assert [r[:2] for r in snapshot_list(src)] == [("1", "q"), ("2", "a"), ("3", "b")]
    out = run("ours", d, nodes, [
        ("qmp", "blockdev-snapshot-delete-internal-sync", {"device": "src", "name": "a"}),
        ("qmp", "blockdev-snapshot-delete-internal-sync", {"device": "src", "id": "1"}),
        ("qmp", "blockdev-snapshot-delete-internal-sync", {"device": "src", "name": "b"}),
    ])
    assert all('"return"' in line for line in out), out
    assert snapshot_list(src) == []
    check = img("check", str(src))
    assert check.startswith("rc=0 No errors"), check
    assert _qemu_io(src, "qcow2", "read -P 0x11 0 1M", "read -P 0x22 1M 1M") == "rc=0 "
    _ = nbd_io  # (the helper also serves the differential script)


def _error_nodes(d: Path) -> list[str]:
    d.mkdir()
    src = d / "src.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(src), "4M"], check=True)
    _qemu_io(src, "qcow2", "write -P 0x42 0 4M")
    nodes = ["--blockdev", f"driver=file,node-name=src-f,filename={src}",
             "--blockdev", "driver=qcow2,node-name=src,file=src-f"]
    raw = d / "src.raw"
    raw.write_bytes(b"\x24" * (4 * M))
    nodes += ["--blockdev", "driver=raw,node-name=rsrc,file.driver=blkdebug,"
              "file.node-name=rsrc-dbg,file.inject-error.0.event=read_aio,"
              "file.inject-error.0.once=on,file.inject-error.0.iotype=read,"
              f"file.image.driver=file,file.image.filename={raw}"]
    for name, errno_, once in (("report", 5, False), ("stop", 5, True), ("ignore", 5, True),
                               ("enospc", 28, True)):
        path = d / f"bad_{name}.raw"
        path.write_bytes(bytes(4 * M))
        rule = (f"file.inject-error.0.event=write_aio,file.inject-error.0.errno={errno_}"
                + (",file.inject-error.0.once=on" if once else ""))
        nodes += ["--blockdev", f"driver=raw,node-name=bad_{name},file.driver=blkdebug,"
                  f"file.node-name=dbg_{name},{rule},file.image.driver=file,"
                  f"file.image.filename={path}"]
    plain = d / "plain.raw"
    plain.write_bytes(bytes(4 * M))
    nodes += ["--blockdev", f"driver=raw,node-name=plain,file.driver=file,"
              f"file.filename={plain}"]
    return nodes


def _error_steps() -> list[tuple[Any, ...]]:
    def bb(job: str, target: str, **extra: Any) -> dict[str, Any]:
        return {"device": "src", "target": target, "sync": "full", "job-id": job, **extra}

    return [
        ("job", "blockdev-backup", bb("r", "bad_report"), ["r"]),
        ("job", "blockdev-backup", bb("i", "bad_ignore", **{"on-target-error": "ignore"}),
         ["i"]),
        ("job", "blockdev-backup", bb("s", "bad_stop", **{"on-target-error": "stop"}), ["s"],
         "paused"),
        ("qmp", "query-jobs", {}),
        ("job", "block-job-resume", {"device": "s"}, ["s"]),
        ("job", "blockdev-backup", bb("n", "bad_enospc", **{"on-target-error": "enospc"}),
         ["n"], "paused"),
        ("job", "block-job-cancel", {"device": "n"}, ["n"]),
        ("job", "blockdev-backup", {"device": "rsrc", "target": "plain", "sync": "full",
                                    "job-id": "rs", "on-source-error": "ignore"}, ["rs"]),
    ]


def test_backup_error_policies_match_qsd(tmp_path: Path) -> None:
    """on-source-error / on-target-error: BLOCK_JOB_ERROR, pauses, io-status, outcomes."""
    require_tool("qemu-storage-daemon", "qemu-img", "qemu-io")
    results = {}
    for kind in ("qsd", "ours"):
        d = tmp_path / kind
        results[kind] = run(kind, d, _error_nodes(d), _error_steps())
    problem = compare(results["qsd"], results["ours"])
    assert not problem, problem
    # what the ignore and stop policies retried reached the targets in full
    for name in ("ignore", "stop"):
        r = subprocess.run(["qemu-io", "-f", "raw", "-c", "read -P 0x42 0 4M",
                            str(tmp_path / "ours" / f"bad_{name}.raw")], capture_output=True,
                           text=True)
        assert "Pattern verification failed" not in r.stdout, name
