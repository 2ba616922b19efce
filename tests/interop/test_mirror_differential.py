"""Acceptance 2: the same QMP mirror scripts against qemu-storage-daemon and blockmirror.

Each scenario of ``mirror_scripts.scripts`` runs on fresh images against both daemons; the
normalised replies (incl. every query-block-jobs / query-jobs field) and the event sequences
must be identical.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from conftest import require_tool
from mirror_scripts.differential import (
    Transcript,
    make_images,
    our_client,
    qsd_client,
    run_script,
)
from mirror_scripts.scripts import SCRIPTS

pytestmark = pytest.mark.interop


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda s: s.__name__)
def test_same_events_and_replies(script: Any, tmp_path: Path) -> None:
    require_tool("qemu-storage-daemon", "qemu-img", "qemu-io")

    async def one(name: str, factory: Any) -> Transcript:
        work = tmp_path / name
        work.mkdir()
        paths = make_images(str(work))
        async with factory(str(work)) as qmp:
            return await run_script(qmp, script(paths), limit_s=60, workdir=str(work))

    async def main() -> None:
        # both daemons run the script at the same time: they share nothing
        theirs, ours = await asyncio.gather(one("qsd", qsd_client), one("ours", our_client))
        assert ours.replies == theirs.replies
        assert ours.events == theirs.events
        # the scenario really ran a job: every script sees it created
        assert ("JOB_STATUS_CHANGE", {"status": "created", "id": "j"}) in ours.events or \
            ("JOB_STATUS_CHANGE", {"id": "j", "status": "created"}) in ours.events

    asyncio.run(main())
