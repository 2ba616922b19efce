"""The mirror's downstream bitmap arguments (``__org.blockmirror_bitmap`` / ``-bitmap-mode``,
Proxmox VE's ``bitmap`` / ``bitmap-mode``): checks and texts, incremental copy, the bitmap
busy while the job runs and rewritten per mode when it ends; and QEMU 8.2's
``actively-synced`` member."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from blockmirror.qmp.testing import qmp_daemon

KiB = 1 << 10
MiB = 1 << 20
SIZE = 4 * MiB
BM = "__org.blockmirror_bitmap"
MODE = "__org.blockmirror_bitmap-mode"


async def _ok(raw: Any, name: str, args: dict[str, Any] | None = None) -> Any:
    rsp = await raw.cmd(name, args or {})
    assert "return" in rsp, (name, args, rsp)
    return rsp["return"]


def _make_file(path: Path, fill: bytes) -> None:
    path.write_bytes(fill.ljust(SIZE, b"\0"))


async def _raw_node(raw: Any, path: Path, name: str, fill: bytes = b"") -> None:
    _make_file(path, fill)
    await _ok(raw, "blockdev-add", {"driver": "raw", "node-name": name,
                                    "file": {"driver": "file", "filename": str(path)}})


async def _bitmap(raw: Any, node: str, name: str) -> dict[str, Any]:
    for info in await _ok(raw, "query-named-block-nodes"):
        if info["node-name"] == node:
            for bm in info.get("dirty-bitmaps", []):
                if bm["name"] == name:
                    return dict(bm)
    raise AssertionError(f"no bitmap {name} on {node}")


async def _wait_status(raw: Any, job: str, statuses: tuple[str, ...]) -> dict[str, Any]:
    for _ in range(2000):
        for info in await _ok(raw, "query-block-jobs"):
            if info["device"] == job and info["status"] in statuses:
                return dict(info)
        if "absent" in statuses and not any(
                i["device"] == job for i in await _ok(raw, "query-block-jobs")):
            return {}
        await asyncio.sleep(0.01)
    raise AssertionError(f"{job} never reached {statuses}")


async def _null_source_and_target(raw: Any) -> None:
    """Nodes ``s`` and ``t``: null-co of SIZE bytes."""
    for n in ("s", "t"):
        await _ok(raw, "blockdev-add", {"driver": "null-co", "node-name": n, "size": SIZE})


def test_argument_checks_in_order(tmp_path: Path) -> None:
    async def main() -> None:
        async with qmp_daemon(tmp_path) as td:
            raw = await td.raw(negotiate=True)
            await _null_source_and_target(raw)
            await _ok(raw, "block-dirty-bitmap-add", {"node": "s", "name": "b0",
                                                      "granularity": 65536})
            base = {"job-id": "j", "device": "s", "target": "t"}
            cases = [
                # not using the extension: QEMU 7.2's refusal
                ({"sync": "bitmap"}, "Sync mode 'bitmap' not supported"),
                ({"sync": "incremental"}, "Sync mode 'incremental' not supported"),
                ({"sync": "bitmap", MODE: "never"},
                 "Must provide a valid bitmap name for 'bitmap' sync mode"),
                ({"sync": "incremental", MODE: "on-success"},
                 "Must provide a valid bitmap name for 'incremental' sync mode"),
                ({"sync": "incremental", BM: "nope", MODE: "always"},
                 "Bitmap sync mode must be 'on-success' when using sync mode 'incremental'"),
                ({"sync": "incremental", BM: "nope"}, "Dirty bitmap 'nope' not found"),
                ({"sync": "full", MODE: "never"},
                 "Cannot specify bitmap sync mode without a bitmap"),
                ({"sync": "full", BM: "b0", MODE: "never"},
                 "Sync mode 'full' not supported with bitmap."),
                ({"sync": "top", BM: "b0"}, "Sync mode 'top' not supported with bitmap."),
                ({"sync": "none", BM: "b0", MODE: "always"},
                 "Sync mode 'none' not supported with bitmap."),
                ({"sync": "bitmap", BM: "b0", MODE: "never", "granularity": 65536},
                 "Granularity and bitmap cannot both be set"),
                ({"sync": "bitmap", BM: "b0"},
                 "bitmap-mode must be specified if a bitmap is provided"),
                ({"sync": "bitmap", BM: "b1", MODE: "never"}, "Dirty bitmap 'b1' not found"),
                ({"sync": "bitmap", BM: "b0", MODE: "sometimes"},
                 f"Parameter '{MODE}' does not accept value 'sometimes'"),
            ]
            for extra, desc in cases:
                rsp = await raw.cmd("blockdev-mirror", {**base, **extra})
                assert rsp.get("error") == {"class": "GenericError", "desc": desc}, (extra, rsp)
            assert await _ok(raw, "query-block-jobs") == []
            assert (await _bitmap(raw, "s", "b0"))["busy"] is False

    asyncio.run(main())


def test_incremental_copy_and_modes(tmp_path: Path) -> None:
    """Only what the bitmap marks (plus writes during the job) is copied; the mode decides
    what the bitmap holds afterwards; the bitmap is busy meanwhile."""

    async def main() -> None:
        async with qmp_daemon(tmp_path) as td:
            raw = await td.raw(negotiate=True)
            await _raw_node(raw, tmp_path / "s.raw", "s", b"\xaa" * (64 * KiB))
            graph = td.daemon.graph
            src = graph.find_node("s")
            assert src is not None
            await _ok(raw, "block-dirty-bitmap-add", {"node": "s", "name": "b0",
                                                      "granularity": 65536})
            await src.write(2 * MiB, b"\xcc" * (64 * KiB))  # recorded by b0
            for mode, expect_count in (("never", 64 * KiB), ("on-success", 0)):
                tgt_path = tmp_path / f"t-{mode}.raw"
                await _raw_node(raw, tgt_path, f"t-{mode}")
                if mode == "on-success":
                    # incremental = bitmap + on-success
                    extra: dict[str, Any] = {"sync": "incremental", BM: "b0"}
                else:
                    extra = {"sync": "bitmap", BM: "b0", MODE: mode}
                await _ok(raw, "blockdev-mirror", {"job-id": "j", "device": "s",
                                                   "target": f"t-{mode}", **extra})
                bm = await _bitmap(raw, "s", "b0")
                assert bm["busy"] is True, bm
                rsp = await raw.cmd("block-dirty-bitmap-remove", {"node": "s", "name": "b0"})
                assert rsp["error"]["desc"] == ("Bitmap 'b0' is currently in use by another "
                                                "operation and cannot be used"), rsp
                await _raw_node(raw, tmp_path / "other.raw", "other")
                rsp = await raw.cmd("blockdev-mirror", {
                    "job-id": "j2", "device": "other", "target": "other",
                    "sync": "bitmap", BM: "b0", MODE: "never"})
                assert "error" in rsp, rsp
                await _ok(raw, "blockdev-del", {"node-name": "other"})
                info = await _wait_status(raw, "j", ("ready",))
                assert info["actively-synced"] is False, info
                # a granule that was never copied by this job: len counts only the bitmap's
                assert info["len"] == 64 * KiB, info
                await _ok(raw, "block-job-cancel", {"device": "j"})  # soft: no pivot
                await _wait_status(raw, "j", ("absent",))
                bm = await _bitmap(raw, "s", "b0")
                assert bm["busy"] is False and bm["count"] == expect_count, (mode, bm)
                data = tgt_path.read_bytes()
                assert data[2 * MiB:2 * MiB + 64 * KiB] == b"\xcc" * (64 * KiB)
                # the range the bitmap did not mark was not copied: incremental
                assert data[:64 * KiB] == b"\0" * (64 * KiB), mode
                await _ok(raw, "blockdev-del", {"node-name": f"t-{mode}"})
                if mode == "never":
                    continue

    asyncio.run(main())


def test_always_keeps_what_was_not_copied(tmp_path: Path) -> None:
    """Mode always after a forced cancel: every granule the bitmap marked is either on the
    target already or still dirty in the bitmap (a later mirror resumes from it)."""

    async def main() -> None:
        async with qmp_daemon(tmp_path) as td:
            raw = await td.raw(negotiate=True)
            await _raw_node(raw, tmp_path / "s.raw", "s")
            src = td.daemon.graph.find_node("s")
            assert src is not None
            await _ok(raw, "block-dirty-bitmap-add", {"node": "s", "name": "b0",
                                                      "granularity": 65536})
            for i in range(0, SIZE, 256 * KiB):
                await src.write(i, bytes([1 + i // (256 * KiB)]) * (64 * KiB))
            before = (await _bitmap(raw, "s", "b0"))["count"]
            assert before == 16 * 64 * KiB
            tgt_path = tmp_path / "t.raw"
            await _raw_node(raw, tgt_path, "t")
            await _ok(raw, "blockdev-mirror", {"job-id": "j", "device": "s", "target": "t",
                                               "sync": "bitmap", BM: "b0", MODE: "always",
                                               "speed": 64 * KiB, "buf-size": 64 * KiB})
            await _ok(raw, "block-job-cancel", {"device": "j", "force": True})
            await _wait_status(raw, "j", ("absent",))
            bm = await _bitmap(raw, "s", "b0")
            assert bm["busy"] is False and 0 < bm["count"] <= before, bm
            named = src.bitmaps.get("b0")
            assert named is not None
            data = tgt_path.read_bytes()
            for i in range(0, SIZE, 256 * KiB):
                copied = data[i:i + 64 * KiB] == bytes([1 + i // (256 * KiB)]) * (64 * KiB)
                assert copied or named.bitmap.is_dirty(i), i
            await _ok(raw, "blockdev-del", {"node-name": "t"})

    asyncio.run(main())


def test_readonly_bitmap_needs_mode_never(tmp_path: Path) -> None:
    async def main() -> None:
        async with qmp_daemon(tmp_path) as td:
            raw = await td.raw(negotiate=True)
            await _null_source_and_target(raw)
            await _ok(raw, "block-dirty-bitmap-add", {"node": "s", "name": "b0"})
            src = td.daemon.graph.find_node("s")
            assert src is not None
            named = src.bitmaps.get("b0")
            assert named is not None
            named.readonly = True  # as loaded from a read-only image
            rsp = await raw.cmd("blockdev-mirror", {"job-id": "j", "device": "s", "target": "t",
                                                    "sync": "bitmap", BM: "b0",
                                                    MODE: "on-success"})
            assert rsp["error"]["desc"] == "Bitmap 'b0' is readonly and cannot be modified"
            named.inconsistent = True
            rsp = await raw.cmd("blockdev-mirror", {"job-id": "j", "device": "s", "target": "t",
                                                    "sync": "bitmap", BM: "b0", MODE: "never"})
            assert rsp["error"]["desc"] == "Bitmap 'b0' is inconsistent and cannot be used"
            named.inconsistent = False
            await _ok(raw, "blockdev-mirror", {"job-id": "j", "device": "s", "target": "t",
                                               "sync": "bitmap", BM: "b0", MODE: "never"})
            await _wait_status(raw, "j", ("ready",))
            await _ok(raw, "block-job-cancel", {"device": "j"})
            await _wait_status(raw, "j", ("absent",))

    asyncio.run(main())


def test_actively_synced_after_block_job_change(tmp_path: Path) -> None:
    """QEMU 8.2: false in background mode; true once write-blocking and in sync; back to
    false when a write reaches the source without being copied."""

    async def main() -> None:
        async with qmp_daemon(tmp_path) as td:
            raw = await td.raw(negotiate=True)
            await _raw_node(raw, tmp_path / "s.raw", "s", b"\x11" * MiB)
            await _raw_node(raw, tmp_path / "t.raw", "t")
            await _ok(raw, "blockdev-mirror", {"job-id": "j", "device": "s", "target": "t",
                                               "sync": "full", "auto-dismiss": False})
            info = await _wait_status(raw, "j", ("ready",))
            assert info["actively-synced"] is False
            await asyncio.sleep(0.3)
            info = await _wait_status(raw, "j", ("ready",))
            assert info["actively-synced"] is False  # background mode never is
            rsp = await raw.cmd("block-job-change", {"id": "j", "type": "mirror",
                                                     "copy-mode": "background"})
            assert rsp == {"return": {}}, rsp  # the same mode: nothing to do
            await _ok(raw, "block-job-change", {"id": "j", "type": "mirror",
                                                "copy-mode": "write-blocking"})
            for _ in range(1000):
                info = await _wait_status(raw, "j", ("ready",))
                if info["actively-synced"]:
                    break
                await asyncio.sleep(0.01)
            assert info["actively-synced"] is True, info
            rsp = await raw.cmd("block-job-change", {"id": "j", "type": "mirror",
                                                     "copy-mode": "background"})
            assert rsp["error"]["desc"] == "Change to copy mode 'background' is not implemented"
            await _ok(raw, "block-job-complete", {"device": "j"})
            info = await _wait_status(raw, "j", ("concluded",))
            assert "actively-synced" in info
            await _ok(raw, "job-dismiss", {"id": "j"})
            assert (tmp_path / "t.raw").read_bytes()[:MiB] == b"\x11" * MiB

    asyncio.run(main())


def test_drive_mirror_incremental_to_existing(tmp_path: Path) -> None:
    """Proxmox VE's older path (qemu_drive_mirror): drive-mirror, mode existing, a format,
    sync incremental with the bitmap; the target file is not re-created."""

    async def main() -> None:
        async with qmp_daemon(tmp_path) as td:
            raw = await td.raw(negotiate=True)
            await _raw_node(raw, tmp_path / "s.raw", "s", b"\x11" * MiB)
            src = td.daemon.graph.find_node("s")
            assert src is not None
            await _ok(raw, "block-dirty-bitmap-add", {"node": "s", "name": "repl"})
            await src.write(3 * MiB, b"\x22" * 4096)
            tgt = tmp_path / "t.raw"
            _make_file(tgt, b"\x11" * MiB)  # the replica
            await _ok(raw, "drive-mirror", {"job-id": "drive-scsi0", "device": "s",
                                            "target": str(tgt), "format": "raw",
                                            "mode": "existing", "sync": "incremental",
                                            BM: "repl", "auto-dismiss": False})
            info = await _wait_status(raw, "drive-scsi0", ("ready",))
            assert info["len"] == 65536, info
            await _ok(raw, "block-job-complete", {"device": "drive-scsi0"})
            await _wait_status(raw, "drive-scsi0", ("concluded",))
            await _ok(raw, "job-dismiss", {"id": "drive-scsi0"})
            assert (await _bitmap(raw, "s", "repl"))["count"] == 0
            assert tgt.read_bytes() == (tmp_path / "s.raw").read_bytes()

    asyncio.run(main())


def test_mode_never_leaves_the_bitmap_alone(tmp_path: Path) -> None:
    """A disabled bitmap keeps its exact bits through a mirror with mode never (its digest is
    unchanged though the guest wrote meanwhile); an enabled one goes on recording."""

    async def main() -> None:
        async with qmp_daemon(tmp_path) as td:
            raw = await td.raw(negotiate=True)
            await _raw_node(raw, tmp_path / "s.raw", "s")
            src = td.daemon.graph.find_node("s")
            assert src is not None
            for name in ("off", "on"):
                await _ok(raw, "block-dirty-bitmap-add", {"node": "s", "name": name})
            await src.write(MiB, b"\x01" * 4096)
            await _ok(raw, "block-dirty-bitmap-disable", {"node": "s", "name": "off"})
            digest = await _ok(raw, "x-debug-block-dirty-bitmap-sha256",
                               {"node": "s", "name": "off"})
            for name in ("off", "on"):
                await _raw_node(raw, tmp_path / f"t-{name}.raw", f"t-{name}")
                await _ok(raw, "blockdev-mirror", {"job-id": name, "device": "s",
                                                   "target": f"t-{name}", "sync": "bitmap",
                                                   BM: name, MODE: "never"})
                await _wait_status(raw, name, ("ready",))
                await src.write(3 * MiB, b"\x02" * 4096)  # copied: the job is in sync
                await _ok(raw, "block-job-complete", {"device": name})
                await _wait_status(raw, name, ("absent",))
            assert await _ok(raw, "x-debug-block-dirty-bitmap-sha256",
                             {"node": "s", "name": "off"}) == digest
            assert (await _bitmap(raw, "s", "off"))["count"] == 65536
            assert (await _bitmap(raw, "s", "on"))["count"] == 2 * 65536

    asyncio.run(main())
