"""Backup with ``compress: true``, differential against qemu-storage-daemon 7.2.

The same script runs on both daemons over identical images: the refusals for targets that
take no compressed writes (raw, a protocol node, null-co, drive-backup's raw target) with
QEMU's text, a compressed backup to a qcow2 target whose size ends in a partial cluster,
one through a throttle filter, one to an image whose compression type is zstd (zstd frames
then), and one to a target that already holds data (compression cannot overwrite: the job
fails with EIO). Both daemons read the compressed targets back
through their NBD servers. Then the images each daemon wrote are checked with the QEMU tools:
``qemu-img check`` clean with the same share of compressed clusters, ``compare`` equal to the
source, ``map`` showing the compressed clusters as data without a host offset while the
incompressible (random) cluster keeps one, a file smaller than the data, and QEMU's reads.
"""

from __future__ import annotations

import json
import random
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest

from backup_script import compare, img, run
from conftest import require_tool

pytestmark = pytest.mark.interop

K = 1 << 10
M = 1 << 20
#: not a whole number of 64 KiB clusters: the last one is compressed with zero padding
SIZE = 4 * M + 12 * K
#: a 64 KiB cluster of random bytes: does not compress, so it is stored as a normal cluster
RANDOM_AT = 3 * M


def _source_bytes() -> bytes:
    buf = bytearray(SIZE)
    buf[0:M] = b"\x41" * M
    buf[2 * M : 2 * M + 64 * K] = b"\x42" * (64 * K)
    text = b"".join(b"line %06d of a compressible log\n" % i for i in range(8000))
    buf[M + 512 * K : M + 512 * K + len(text)] = text
    buf[RANDOM_AT : RANDOM_AT + 64 * K] = random.Random(14).randbytes(64 * K)
    buf[SIZE - 12 * K :] = b"\x43" * (12 * K)
    return bytes(buf)


def _setup(d: Path) -> list[str]:
    d.mkdir()
    (d / "src.raw").write_bytes(_source_bytes())
    (d / "orig.raw").write_bytes(_source_bytes())  # the source changes at the end
    for name in ("t0", "t1", "t2", "t3", "tz", "t4"):
        zstd = ["-o", "compression_type=zstd"] if name == "tz" else []
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", *zstd,
                        str(d / f"{name}.qcow2"), str(SIZE)], check=True)
    # t3 holds data already: a compressed write there must fail
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x99 64k 64k",
                    str(d / "t3.qcow2")], check=True, capture_output=True)
    (d / "t_raw.raw").write_bytes(bytes(SIZE))
    nodes = [
        "--blockdev", f"driver=file,node-name=src-f,filename={d / 'src.raw'}",
        "--blockdev", "driver=raw,node-name=src,file=src-f",
        "--blockdev", f"driver=file,node-name=t_raw-f,filename={d / 't_raw.raw'}",
        "--blockdev", "driver=raw,node-name=t_raw,file=t_raw-f",
        "--blockdev", f"driver=null-co,node-name=t_null,size={SIZE}",
        "--object", "throttle-group,id=tg",
    ]
    for name in ("t0", "t1", "t2", "t3", "tz", "t4"):
        nodes += ["--blockdev", f"driver=file,node-name={name}-f,filename={d / (name + '.qcow2')}",
                  "--blockdev", f"driver=qcow2,node-name={name},file={name}-f"]
    nodes += ["--blockdev", "driver=throttle,node-name=thr2,throttle-group=tg,file=t2",
              "--blockdev", "driver=throttle,node-name=thr_raw,throttle-group=tg,file=t_raw"]
    return nodes


def _bb(job: str, target: str, **extra: Any) -> dict[str, Any]:
    return {"job-id": job, "device": "src", "target": target, "sync": "full",
            "compress": True, **extra}


def _reads() -> list[str]:
    return ["read -P 0x41 0 1M", "read -P 0 1M 512k", "read -P 0x42 2M 64k",
            "read -P 0x43 4M 12k", "read -v 3M 16"]


def _steps(d: Path) -> list[tuple[Any, ...]]:
    return [
        # targets without compressed writes: QEMU's refusal
        ("qmp", "blockdev-backup", _bb("e", "t_raw")),
        ("qmp", "blockdev-backup", _bb("e", "t_raw-f")),
        ("qmp", "blockdev-backup", _bb("e", "t_null")),
        ("qmp", "blockdev-backup", _bb("e", "thr_raw")),
        ("qmp", "drive-backup", {"job-id": "e", "device": "src", "sync": "full",
                                 "target": str(d / "d_raw.raw"), "format": "raw",
                                 "compress": True}),
        # qcow2, directly and through a filter that forwards compressed writes
        ("job", "blockdev-backup", _bb("c1", "t1"), ["c1"]),
        ("job", "blockdev-backup", _bb("c2", "thr2", **{"x-perf": {"max-workers": 1}}),
         ["c2"]),
        # an image whose compression type is zstd gets zstd streams
        ("job", "blockdev-backup", _bb("cz", "tz"), ["cz"]),
        # compression cannot overwrite an allocated cluster
        # (one worker: which clusters QEMU copies before it stops is otherwise timing)
        ("job", "blockdev-backup", _bb("c3", "t3", **{"x-perf": {"max-workers": 1}}), ["c3"]),
        # uncompressed, for comparison (and the progress of the partial last cluster)
        ("job", "blockdev-backup", _bb("c0", "t0", compress=False), ["c0"]),
        ("job", "drive-backup", {"job-id": "d1", "device": "src", "sync": "full",
                                 "target": str(d / "d1.qcow2"), "format": "qcow2",
                                 "compress": True}, ["d1"]),
        # each daemon reads the compressed clusters back
        ("qmp", "block-export-add", {"type": "nbd", "id": "x1", "node-name": "t1",
                                     "name": "t1", "writable": True}),
        ("nbd", "t1", _reads()),
        ("qmp", "block-export-add", {"type": "nbd", "id": "xz", "node-name": "tz",
                                     "name": "tz", "writable": True}),
        ("nbd", "tz", _reads()),
        # sync=none: a guest write first copies the old data, compressed, to the target
        # (the export first: QEMU refuses a writable one on a source under a backup filter)
        ("qmp", "block-export-add", {"type": "nbd", "id": "xs", "node-name": "src",
                                     "name": "src", "writable": True}),
        ("qmp", "blockdev-backup", {"job-id": "n1", "device": "src", "target": "t4",
                                    "sync": "none", "compress": True}),
        ("nbd", "src", ["write -P 0x77 32k 64k"]),
        ("job", "block-job-cancel", {"device": "n1"}, ["n1"]),
    ]


def _check(path: Path) -> tuple[str, str]:
    r = subprocess.run(["qemu-img", "check", "--output=json", str(path)], capture_output=True,
                       text=True, timeout=60)
    info = json.loads(r.stdout)
    frag = info.get("compressed-clusters", 0), info.get("allocated-clusters")
    return (f"rc={r.returncode} corruptions={info.get('corruptions', 0)} "
            f"leaks={info.get('leaks', 0)}", f"{frag}")


def _first_stream(path: Path) -> bytes:
    """The bytes of guest cluster 0's compressed stream, found through the L1 and L2
    tables (64 KiB clusters)."""
    raw = path.read_bytes()
    l1_offset = struct.unpack_from(">Q", raw, 40)[0]
    l2_offset = struct.unpack_from(">Q", raw, l1_offset)[0] & 0x00FFFFFFFFFFFE00
    entry = struct.unpack_from(">Q", raw, l2_offset)[0]
    assert entry & (1 << 62), hex(entry)
    host = entry & ((1 << 54) - 1)  # 62 - (16 - 8) bits of offset
    return raw[host : host + 16]


def _map(path: Path) -> list[dict[str, Any]]:
    r = subprocess.run(["qemu-img", "map", "--output=json", str(path)], capture_output=True,
                       text=True, check=True, timeout=60)
    out: list[dict[str, Any]] = json.loads(r.stdout)
    return out


def test_compressed_backup_matches_qemu(tmp_path: Path) -> None:
    require_tool("qemu-storage-daemon", "qemu-img", "qemu-io")
    want = run("qsd", tmp_path / "qsd", _setup(tmp_path / "qsd"), _steps(tmp_path / "qsd"))
    got = run("ours", tmp_path / "ours", _setup(tmp_path / "ours"), _steps(tmp_path / "ours"))
    assert not compare(want, got), compare(want, got)
    # the transcript itself says what happened (not only that both did the same)
    text = "\n".join(got)
    assert text.count("Compression is not supported for this drive ") == 5, text
    assert '"error": "Input/output error"' in text and text.count("BLOCK_JOB_COMPLETED") == 6
    assert text.count("BLOCK_JOB_CANCELLED") == 1
    # the uncompressed copy of the same data is bigger
    assert (tmp_path / "ours" / "t1.qcow2").stat().st_size < (
        tmp_path / "ours" / "t0.qcow2").stat().st_size
    reads = [line for line in got if line.startswith("nbd ")]
    assert len(reads) == 3
    for nbd in reads:
        assert "rc=0" in nbd and "Pattern verification failed" not in nbd, nbd
    src = tmp_path / "ours" / "orig.raw"
    for kind in ("qsd", "ours"):
        d = tmp_path / kind
        for name in ("t1", "t2", "d1", "tz"):
            path = d / f"{name}.qcow2"
            verdict, counts = _check(path)
            assert verdict == "rc=0 corruptions=0 leaks=0", (kind, name, verdict)
            if kind == "ours":
                # the same clusters compressed as QEMU's: all but the random one
                assert counts == _check(tmp_path / "qsd" / f"{name}.qcow2")[1], (name, counts)
            assert img("compare", "-q", "-f", "raw", "-F", "qcow2", str(src),
                       str(path)).startswith("rc=0"), (kind, name)
            extents = _map(path)
            data = [e for e in extents if e["data"]]
            # compressed data has no host offset; the random cluster was stored as is
            assert [e["start"] for e in data if "offset" in e] == [RANDOM_AT], (kind, data)
            assert any(e["start"] == 0 and "offset" not in e for e in data)
            # 1 MiB of 0x41 alone would take 16 clusters uncompressed
            assert path.stat().st_size < SIZE // 2, (kind, name, path.stat().st_size)
        # QEMU reads what we wrote
        argv = ["qemu-io", "-r", "-f", "qcow2"]
        for c in _reads()[:4]:
            argv += ["-c", c]
        for name in ("t1", "tz"):
            r = subprocess.run([*argv, str(d / f"{name}.qcow2")], capture_output=True,
                               text=True, timeout=60)
            assert r.returncode == 0 and "verification failed" not in r.stdout, r.stdout
        # sync=none: the two clusters the guest write touched, as they were, compressed
        t4 = d / "t4.qcow2"
        assert _check(t4) == ("rc=0 corruptions=0 leaks=0", "(2, 2)"), (kind, _check(t4))
        data = [e for e in _map(t4) if e["data"]]
        assert data == [{"start": 0, "length": 128 * K, "depth": 0, "present": True,
                         "zero": False, "data": True}], (kind, data)
        assert img("compare", "-q", "-f", "raw", "-F", "qcow2", str(src), str(t4)).startswith(
            "rc=1"), kind  # (the rest of t4 was never copied)
        r = subprocess.run(["qemu-io", "-r", "-f", "qcow2", "-c", "read -P 0x41 0 128k",
                            str(t4)], capture_output=True, text=True, timeout=60)
        assert "verification failed" not in r.stdout, (kind, r.stdout)
        # the target with data before: the failed job left it consistent
        verdict, _ = _check(d / "t3.qcow2")
        assert verdict == "rc=0 corruptions=0 leaks=0", (kind, verdict)
    assert (tmp_path / "ours" / "d_raw.raw").exists() == (tmp_path / "qsd" / "d_raw.raw").exists()
    r = subprocess.run(["qemu-img", "info", "--output=json", str(tmp_path / "ours" / "t1.qcow2")],
                       capture_output=True, text=True, check=True, timeout=60)
    assert json.loads(r.stdout)["format-specific"]["data"]["compression-type"] == "zlib"
    # the zstd target's streams are zstd frames (magic 28 b5 2f fd), not deflate
    tz = tmp_path / "ours" / "tz.qcow2"
    first = next(e for e in _map(tz) if e["data"])
    assert first["start"] == 0 and "offset" not in first
    assert _first_stream(tz)[:4] == b"\x28\xb5\x2f\xfd"
