"""blockmirror.testing: the pytest plugin's fixtures (loaded through the pytest11 entry point)
and the in-process daemon handle they return."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from blockmirror.testing import CommandError, DaemonHandle, start_daemon

MIB = 1 << 20
SEC = 1_000_000_000


@pytest.mark.blockmirror(clock="virtual", blockdevs=[
    {"driver": "null-co", "node-name": "a", "size": 8 * MIB}])
def test_marker_configures_the_fixture(blockmirror: DaemonHandle, blockmirror_qmp: object) -> None:
    assert blockmirror_qmp is blockmirror.qmp
    info = blockmirror.clock.info()
    assert info.virtual and info.timers == 0
    nodes = blockmirror.execute("query-named-block-nodes", flat=True)
    assert [n["node-name"] for n in nodes] == ["a"]
    rule = blockmirror.faults.add("a", "read", nth=2, errno="ENOSPC", id="r1")
    assert rule.id == "r1" and rule.nth == 2 and rule.errno == "ENOSPC" and rule.fired == 0
    assert blockmirror.faults.list("a") == [rule]
    assert blockmirror.faults.list("other") == []
    blockmirror.faults.remove(rule)
    assert blockmirror.faults.list() == []
    with pytest.raises(CommandError) as exc:
        blockmirror.faults.remove("r1")
    assert exc.value.desc == "Fault rule 'r1' not found"


def test_factory_daemons_are_independent_and_closed(blockmirror_factory) -> None:
    one = blockmirror_factory({"driver": "null-co", "node-name": "x"})
    two = blockmirror_factory(clock="virtual")
    assert [n["node-name"] for n in two.execute("query-named-block-nodes")] == []
    assert not one.clock.info().virtual and two.clock.info().virtual
    other = two.client()
    assert other.cmd_obj({"execute": "query-version"})["return"]["package"].startswith(
        "blockmirror")


def test_start_is_fast_and_close_cleans_up() -> None:
    start_daemon().close()  # warm the imports once: what a suite pays only for its first
    t0 = time.monotonic()
    bm = start_daemon([{"driver": "null-co", "node-name": "n"}])
    started = time.monotonic() - t0
    sock = Path(bm.socket_path)
    assert sock.exists()
    bm.close()
    assert not sock.exists() and not Path(bm.workdir).exists()
    assert started < 0.5, started  # milliseconds in practice (about 10 ms here)


def test_bad_blockdev_fails_the_start_cleanly() -> None:
    with pytest.raises(CommandError) as exc:
        start_daemon([{"driver": "null-co", "node-name": "n", "size": -1}])
    assert exc.value.error_class == "GenericError"


def test_wait_event_times_out_with_a_clear_error(blockmirror: DaemonHandle) -> None:
    with pytest.raises(TimeoutError, match=r"no BLOCK_JOB_READY event within 0\.2 s"):
        blockmirror.wait_event("BLOCK_JOB_READY", timeout=0.2)


def test_virtual_clock_follows_file_io(tmp_path: Path) -> None:
    # thread-pool I/O under virtual time: a file mirror paced by speed, deterministic
    src, dst = tmp_path / "s.img", tmp_path / "d.img"
    src.write_bytes(b"\xa5" * (8 * MIB))
    dst.write_bytes(bytes(8 * MIB))
    raw = [{"driver": "raw", "node-name": n, "file": {"driver": "file", "filename": str(p)}}
           for n, p in (("s", src), ("d", dst))]
    with start_daemon(raw, clock="virtual") as bm:
        t0 = bm.clock.now_ns()
        bm.execute("blockdev-mirror", **{"job-id": "j", "device": "s", "target": "d",
                                         "sync": "full", "speed": 4 * MIB})
        offsets = []
        while not bm.execute("query-block-jobs")[0]["ready"]:
            step = bm.clock.run_to_next_timer()
            assert step.fired
            offsets.append((step.now_ns - t0, bm.execute("query-block-jobs")[0]["offset"]))
        assert offsets == sorted(offsets)
        for t, off in offsets:
            assert off <= 4 * MIB * (t + SEC // 10) // SEC + 2 * MIB
        assert 2 * SEC - SEC // 5 <= bm.clock.now_ns() - t0 <= 2 * SEC + SEC // 5
        bm.execute("block-job-complete", device="j")
        bm.wait_event("BLOCK_JOB_COMPLETED")
    assert dst.read_bytes() == src.read_bytes()
