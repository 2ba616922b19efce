"""Hostile qcow2 images cross-checked against QEMU (issue 15).

Every corrupted image -- the 32 hand-made cases of test_qcow2_hostile.py and 80 generated
ones (seeded edits of header fields, L1/L2 entries and refcount entries of a qemu-img-made
base) -- is opened read-only by us and by ``qemu-img info``; where the two disagree,
``qemu-img check`` and a ``qemu-io`` read of the written data say whether QEMU also finds
the image broken (only later, when the table is used).

Rules:
- we refuse, QEMU refuses: agreement (the texts are compared in test_qcow2_hostile.py);
- we accept, QEMU refuses: never allowed (we must not be more lenient than QEMU);
- we refuse, QEMU opens: allowed only with a written justification below, and only if QEMU
  itself fails the image (``qemu-img check`` exit 1/2: check failed or corruptions, or the
  data cannot be read by qemu-io) -- refusing at open what QEMU would trip over at first use
  is stricter, not different, and keeps a mirror from copying half an image.
"""

from __future__ import annotations

import asyncio
import random
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest
from test_qcow2_hostile import CASES, _base, _l1_offset, _l2_offset, hostile_image
from test_qcow2_support import close, open_qcow2

from blockmirror.errors import BlockMirrorError
from conftest import require_tool

pytestmark = pytest.mark.interop

#: hand-made cases qemu-img info opens but we refuse at open, and why that is right
JUSTIFIED = {
    "l1_past_eof": "QEMU reads the L1 table past EOF as zeroes, so the written data vanishes "
                   "(qemu-io reads zeroes or fails; check reports corruptions)",
    "reftable_past_eof": "refcounts past EOF: check finds refcount-0 clusters in use "
                         "(corruptions); the first allocation would overwrite live data",
    "crypt_aes": "QEMU opens it only to ask for a key; without one every read fails (we do "
                 "not support encryption at all)",
    # (crypt_luks: qemu-img 7.2 info dies of SIGSEGV on it; counted as a refusal)
    "data_file": "the external data file bit without the extension: QEMU needs 'data-file' "
                 "to do anything (check refuses it); unsupported here",
    "extended_l2": "the extended-L2 bit on a normal image: every L2 entry is misread, so "
                   "qemu-io cannot read the data; unsupported here",
    "refblock_past_eof": "a refcount block past EOF: check reports corruptions",
    "refblock_unaligned": "an unaligned refcount block: check fails",
    "refblock_on_l1": "a refcount block on the L1 table: check reports corruptions",
    "l2_unaligned": "an unaligned L2 table: QEMU marks the image corrupt on first read",
    "l2_past_eof": "an L2 table past EOF: check reports corruptions, reads fail",
    "l2_on_l1": "an L2 table on the L1 table: check reports corruptions, reads fail",
    "l2_on_reftable": "an L2 table on the refcount table: check reports corruptions",
}
#: a generated case we refuse while qemu-img info opens it is justified by QEMU failing it
GENERATED_REASON = "QEMU fails the image itself at first use (check or the qemu-io read)"


def _qemu(img: Path) -> dict[str, Any]:
    info = subprocess.run(["qemu-img", "info", "-f", "qcow2", str(img)],
                          capture_output=True, text=True, timeout=60)
    check = subprocess.run(["qemu-img", "check", "-f", "qcow2", str(img)],
                           capture_output=True, text=True, timeout=60)
    io = subprocess.run(["qemu-io", "-r", "-f", "qcow2", "-c", "read -P 0x5a 0 128k", str(img)],
                        capture_output=True, text=True, timeout=60)
    io_out = io.stdout + io.stderr
    return {"opens": info.returncode == 0, "check": check.returncode,
            "reads": io.returncode == 0 and "error" not in io_out.lower()
            and "fail" not in io_out.lower(),
            "text": (info.stderr or "").strip()}


def _ours(img: Path) -> str | None:
    """None if we open it read-only (and can close it), else our error text."""
    async def main() -> None:
        graph, _node = await open_qcow2(img, read_only=True)
        await close(graph)

    try:
        asyncio.run(main())
    except BlockMirrorError as e:
        return str(e)
    return None


def _verdict(name: str, img: Path, justified: str | None) -> tuple[str, str]:
    ours = _ours(img)
    q = _qemu(img)
    if ours is not None and not q["opens"]:
        return "agree-refuse", ""
    if ours is None and q["opens"]:
        return "agree-accept", ""
    if ours is None:
        return "LENIENT", f"{name}: we open what qemu-img refuses: {q['text']}"
    if justified is None:
        return "UNJUSTIFIED", f"{name}: we refuse ({ours}) what qemu-img opens"
    if q["check"] not in (1, 2) and q["reads"]:
        return "UNJUSTIFIED", (f"{name}: we refuse ({ours}) but QEMU neither fails the check "
                               f"(exit {q['check']}) nor the read: {justified}")
    return "stricter", ""


@pytest.mark.parametrize(("name", "where", "fmt", "value", "text"), CASES,
                         ids=[c[0] for c in CASES])
def test_hand_made_case_cross_checked(tmp_path: Path, name: str, where: object, fmt: str,
                                      value: int, text: str) -> None:
    require_tool("qemu-img", "qemu-io")
    img = hostile_image(tmp_path, name, where, fmt, value)
    verdict, why = _verdict(name, img, JUSTIFIED.get(name))
    assert verdict in ("agree-refuse", "stricter"), why
    # the justification list is exact: no stale entry for a case QEMU now refuses
    assert (verdict == "stricter") == (name in JUSTIFIED), (name, verdict)


# header fields (offset, format) and tables the generated cases edit
FIELDS = [(4, ">I"), (8, ">Q"), (16, ">I"), (20, ">I"), (24, ">Q"), (32, ">I"), (36, ">I"),
          (40, ">Q"), (48, ">Q"), (56, ">I"), (60, ">I"), (64, ">Q"), (72, ">Q"), (80, ">Q"),
          (88, ">Q"), (96, ">I"), (100, ">I")]
VALUES = [0, 1, 2, 3, 7, 9, 16, 21, 0x200, 0x10000, 0x10001, 0x30000, 0x7FFFFFFF, 0xFFFFFFFF,
          1 << 32, 1 << 40, 1 << 62, (1 << 64) - 1]


def _generated(seed: int) -> tuple[str, list[tuple[Any, str, int]]]:
    rng = random.Random(seed)
    edits: list[tuple[Any, str, int]] = []
    for _ in range(rng.choice([1, 1, 2])):
        kind = rng.randrange(4)
        if kind < 2:
            off, fmt = rng.choice(FIELDS)
        elif kind == 2:
            off, fmt = "l1", ">Q"
        else:
            off, fmt = "l2+" + str(8 * rng.randrange(4)), ">Q"
        value = rng.choice(VALUES)
        if off == "l1" or str(off).startswith("l2"):
            value = rng.choice([0, 1 << 63, 1]) | (rng.choice(VALUES) & 0x00FFFFFFFFFFFE00
                                                   if rng.randrange(2) else rng.choice(VALUES))
        limit = (1 << (8 * struct.calcsize(fmt))) - 1
        edits.append((off, fmt, value & limit))
    return f"gen{seed}", edits


GENERATED = [_generated(s) for s in range(80)]


def test_generated_cases_cross_checked(tmp_path: Path) -> None:
    require_tool("qemu-img", "qemu-io")
    tally: dict[str, int] = {}
    problems: list[str] = []
    for name, edits in GENERATED:
        work = tmp_path / name
        work.mkdir()
        img = _base(work)
        for where, fmt, value in edits:
            if where == "l1":
                off = _l1_offset(img)
            elif isinstance(where, str):
                off = _l2_offset(img) + int(where[3:])
            else:
                off = where
            with img.open("r+b") as f:
                f.seek(off)
                f.write(struct.pack(fmt, value))
        verdict, why = _verdict(name, img, GENERATED_REASON)
        tally[verdict] = tally.get(verdict, 0) + 1
        if verdict in ("LENIENT", "UNJUSTIFIED"):
            problems.append(f"{why} edits={edits}")
    print(f"generated hostile images vs qemu-img: {tally}")
    assert not problems, "\n".join(problems)
    assert tally.get("agree-refuse", 0) and tally.get("agree-accept", 0), tally


def test_unaligned_snapshot_table_offset_refused_like_qemu(tmp_path: Path) -> None:
    """QEMU validates the snapshot table offset (aligned, below INT64_MAX) even when
    nb_snapshots is 0; we once checked it only with snapshots (a leniency found here)."""
    require_tool("qemu-img", "qemu-io")
    img = _base(tmp_path)
    with img.open("r+b") as f:
        f.seek(64)  # snapshots_offset; nb_snapshots stays 0
        f.write(struct.pack(">Q", 0x10001))
    assert not _qemu(img)["opens"]
    assert _ours(img) is not None and "Snapshot table offset invalid" in str(_ours(img))
