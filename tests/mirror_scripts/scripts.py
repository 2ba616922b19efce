"""The differential mirror scenarios (acceptance 2), as data for ``differential.run_script``.

Each function takes the image paths from ``make_images`` and returns the steps. Pre-READY
states are made observable with a tiny ``speed`` and one-granule ``buf-size`` (the first
chunk goes out at once, the next only after a very long sleep); errors come from blkdebug.
"""

from __future__ import annotations

from typing import Any

from mirror_scripts.differential import Step

SLOW = {"speed": 1, "buf-size": 65536, "granularity": 65536}


def _setup(p: dict[str, str], *, src_error: dict[str, Any] | None = None,
           tgt_error: dict[str, Any] | None = None) -> list[Step]:
    def node(name: str, path: str, error: dict[str, Any] | None) -> Step:
        if error is None:
            return ("cmd", "blockdev-add", {"driver": "file", "node-name": name,
                                            "filename": path})
        return ("cmd", "blockdev-add", {
            "driver": "raw", "node-name": name,
            "file": {"driver": "blkdebug", "node-name": f"{name}-dbg",
                     "inject-error": [error],
                     "image": {"driver": "file", "node-name": f"{name}-file",
                               "filename": path}},
        })

    return [node("src", p["src"], src_error), node("tgt", p["tgt"], tgt_error)]


def _mirror(**extra: Any) -> Step:
    args: dict[str, Any] = {"job-id": "j", "device": "src", "target": "tgt", "sync": "full"}
    args.update(extra)
    return ("cmd", "blockdev-mirror", args)


Q: Step = ("cmd", "query-block-jobs")
QJ: Step = ("cmd", "query-jobs")
# the job has reached a state it keeps until told otherwise (its trailing events sent)
END: list[Step] = [("settle",), Q, QJ]
# a SLOW job has copied its first chunk and sleeps in its rate limit (its "created" and
# "running" events are out); QSD's quit pauses a job still busy copying around its drain
RUNNING: Step = ("progress", "j", 65536)


def complete_after_ready(p: dict[str, str]) -> list[Step]:
    return [*_setup(p), _mirror(), ("wait", "BLOCK_JOB_READY"), Q,
            ("cmd", "block-job-complete", {"device": "j"}), ("wait", "BLOCK_JOB_COMPLETED"),
            *END]


def cancel_before_ready(p: dict[str, str]) -> list[Step]:
    return [*_setup(p), _mirror(**SLOW), RUNNING, Q, QJ,
            ("cmd", "block-job-complete", {"device": "j"}),
            ("cmd", "block-job-cancel", {"device": "j"}), ("wait", "BLOCK_JOB_CANCELLED"),
            *END]


def soft_cancel_after_ready(p: dict[str, str]) -> list[Step]:
    return [*_setup(p), _mirror(), ("wait", "BLOCK_JOB_READY"),
            ("cmd", "block-job-cancel", {"device": "j"}), ("wait", "BLOCK_JOB_COMPLETED"),
            *END]


def forced_cancel_after_ready(p: dict[str, str]) -> list[Step]:
    return [*_setup(p), _mirror(**{"auto-dismiss": False}), ("wait", "BLOCK_JOB_READY"),
            ("cmd", "block-job-cancel", {"device": "j", "force": True}),
            ("wait", "BLOCK_JOB_CANCELLED"), *END, ("cmd", "job-dismiss", {"id": "j"}),
            ("cmd", "job-dismiss", {"id": "j"}), *END]


def job_cancel_after_ready(p: dict[str, str]) -> list[Step]:
    return [*_setup(p), _mirror(), ("wait", "BLOCK_JOB_READY"),
            ("cmd", "job-cancel", {"id": "j"}), ("wait", "BLOCK_JOB_CANCELLED"), *END]


def pause_resume(p: dict[str, str]) -> list[Step]:
    return [*_setup(p), _mirror(**SLOW), RUNNING,
            ("cmd", "block-job-pause", {"device": "j"}), ("wait", "JOB_STATUS_CHANGE", 3), Q,
            ("cmd", "block-job-pause", {"device": "j"}),
            ("cmd", "block-job-cancel", {"device": "j"}),
            ("cmd", "block-job-resume", {"device": "j"}), ("wait", "JOB_STATUS_CHANGE", 4),
            ("cmd", "block-job-resume", {"device": "j"}),
            ("cmd", "block-job-set-speed", {"device": "j", "speed": 0}),
            ("wait", "BLOCK_JOB_READY"),
            ("cmd", "job-pause", {"id": "j"}), ("wait", "JOB_STATUS_CHANGE", 6), Q,
            # a window in which the paused job must not complete (nothing to wait for)
            ("cmd", "job-complete", {"id": "j"}), ("sleep", 0.2), Q,
            ("cmd", "job-resume", {"id": "j"}), ("wait", "BLOCK_JOB_COMPLETED"), *END]


def manual_finalize_dismiss(p: dict[str, str]) -> list[Step]:
    return [*_setup(p), _mirror(**{"auto-finalize": False, "auto-dismiss": False}),
            ("wait", "BLOCK_JOB_READY"), ("cmd", "job-complete", {"id": "j"}),
            ("wait", "BLOCK_JOB_PENDING"), Q, QJ, ("cmd", "job-dismiss", {"id": "j"}),
            ("cmd", "job-finalize", {"id": "j"}), ("wait", "BLOCK_JOB_COMPLETED"),
            ("settle",), Q, QJ, ("cmd", "job-finalize", {"id": "j"}),
            ("cmd", "job-dismiss", {"id": "j"}), *END]


def cancel_while_pending(p: dict[str, str]) -> list[Step]:
    return [*_setup(p), _mirror(**{"auto-finalize": False, "auto-dismiss": False}),
            ("wait", "BLOCK_JOB_READY"), ("cmd", "job-complete", {"id": "j"}),
            ("wait", "BLOCK_JOB_PENDING"), ("cmd", "job-cancel", {"id": "j"}),
            ("wait", "BLOCK_JOB_CANCELLED"), *END, ("cmd", "job-dismiss", {"id": "j"}), *END]


def _err(event: str, err: int = 5) -> dict[str, Any]:
    return {"event": event, "errno": err, "once": True}


def target_error(policy: str, err: int = 5) -> Any:
    def script(p: dict[str, str]) -> list[Step]:
        steps = [*_setup(p, tgt_error=_err("write_aio", err)),
                 _mirror(**{"on-target-error": policy}), ("wait", "BLOCK_JOB_ERROR")]
        return steps + _after_error(policy, err)

    script.__name__ = f"target_error_{policy}_{err}"
    return script


def source_error(policy: str, err: int = 5) -> Any:
    def script(p: dict[str, str]) -> list[Step]:
        steps = [*_setup(p, src_error=_err("read_aio", err)),
                 _mirror(**{"on-source-error": policy}), ("wait", "BLOCK_JOB_ERROR")]
        return steps + _after_error(policy, err)

    script.__name__ = f"source_error_{policy}_{err}"
    return script


def _after_error(policy: str, err: int) -> list[Step]:
    stops = policy == "stop" or (policy in ("enospc", "auto") and err == 28)
    if stops:
        return [("status", "j", ("paused", "standby")), Q,
                ("cmd", "block-job-cancel", {"device": "j"}),
                ("cmd", "block-job-resume", {"device": "j"}), ("wait", "BLOCK_JOB_READY"), Q,
                ("cmd", "block-job-complete", {"device": "j"}),
                ("wait", "BLOCK_JOB_COMPLETED"), *END]
    if policy == "ignore":
        return [("wait", "BLOCK_JOB_READY"), ("cmd", "block-job-complete", {"device": "j"}),
                ("wait", "BLOCK_JOB_COMPLETED"), *END]
    return [("wait", "BLOCK_JOB_COMPLETED"), *END]


SCRIPTS = [
    complete_after_ready, cancel_before_ready, soft_cancel_after_ready,
    forced_cancel_after_ready, job_cancel_after_ready, pause_resume, manual_finalize_dismiss,
    cancel_while_pending,
    target_error("report"), target_error("ignore"), target_error("stop"),
    target_error("enospc", 28), target_error("enospc", 5), target_error("auto", 28),
    source_error("report"), source_error("ignore"), source_error("stop"),
]

__all__ = ["SCRIPTS"]


def invalid_arguments(p: dict[str, str]) -> list[Step]:
    """Acceptance 3: every invalid argument combination answers with QEMU's class and text."""
    import os

    work = os.path.dirname(p["src"])
    dm = os.path.join(work, "dm.raw")

    def bm(**kw: Any) -> Step:
        args: dict[str, Any] = {"job-id": "j", "device": "src", "target": "tgt", "sync": "full"}
        args.update(kw)
        return ("cmd", "blockdev-mirror", {k: v for k, v in args.items() if v is not None})

    def dmirror(**kw: Any) -> Step:
        args: dict[str, Any] = {"job-id": "d", "device": "src", "target": dm, "sync": "full"}
        args.update(kw)
        return ("cmd", "drive-mirror", {k: v for k, v in args.items() if v is not None})

    return [
        *_setup(p),
        ("cmd", "blockdev-add", {"driver": "null-co", "node-name": "small", "size": 1 << 20}),
        ("cmd", "blockdev-add", {"driver": "null-co", "node-name": "other",
                                 "size": 4 << 20}),
        bm(sync=None), bm(sync="bogus"), bm(granularity=100), bm(granularity=1000),
        bm(granularity=1 << 27), bm(granularity=-1), bm(granularity=3 << 20),
        bm(**{"buf-size": -1}), bm(speed=-1), bm(speed="fast"), bm(device="nope"),
        bm(target="nope"), bm(target="src"), bm(sync="incremental"), bm(sync="bitmap"),
        bm(**{"job-id": "1abc"}), bm(**{"job-id": None}), bm(**{"job-id": "a b"}),
        bm(replaces="nope"), bm(replaces="tgt"), bm(**{"filter-node-name": "tgt"}),
        bm(**{"on-source-error": "bogus"}), bm(**{"copy-mode": "bogus"}), bm(bogus=1),
        bm(unmap=True), bm(format="raw"), bm(mode="existing"),
        bm(**{"job-id": "j2", "target": "small"}), ("wait", "BLOCK_JOB_COMPLETED"),
        bm(**SLOW), bm(**SLOW), bm(**{"device": "other", **SLOW}),
        bm(**{"device": "other", "job-id": "j3", **SLOW}),
        ("cmd", "block-job-set-speed", {"device": "j", "speed": -1}),
        ("cmd", "block-job-set-speed", {"device": "nope", "speed": 1}),
        ("cmd", "block-job-cancel", {"device": "nope"}),
        ("cmd", "block-job-complete", {"device": "j"}),
        ("cmd", "block-job-resume", {"device": "j"}),
        ("cmd", "block-job-finalize", {"id": "j"}),
        ("cmd", "block-job-dismiss", {"id": "j"}),
        ("cmd", "job-complete", {"id": "nope"}), ("cmd", "job-finalize", {"id": "nope"}),
        ("cmd", "job-dismiss", {"id": "j"}), ("cmd", "job-pause", {"id": "nope"}),
        ("cmd", "blockdev-del", {"node-name": "src"}),
        ("cmd", "blockdev-del", {"node-name": "tgt"}),
        ("cmd", "job-cancel", {"id": "j"}), ("wait", "BLOCK_JOB_CANCELLED"),
        ("status", "j", ("absent",)),
        dmirror(device="nope"), dmirror(replaces="tgt"), dmirror(format="bogus"),
        dmirror(mode="existing", target=os.path.join(work, "missing.raw")),
        dmirror(mode="bogus"), dmirror(granularity=1000), dmirror(**{"buf-size": -1}),
        dmirror(**{"job-id": "2x"}), dmirror(sync="incremental"),
        dmirror(**{"filter-node-name": "f"}), dmirror(**{"target-is-zero": True}),
        dmirror(mode="existing", target=p["tgt"], format="raw", speed=-1),
        ("settle",), Q, QJ,
    ]


SCRIPTS.append(invalid_arguments)


def quit_while_running(p: dict[str, str]) -> list[Step]:
    """quit force-cancels running jobs, with all their events before the reply."""
    return [*_setup(p), _mirror(**SLOW), RUNNING, ("cmd", "quit")]


def quit_while_ready(p: dict[str, str]) -> list[Step]:
    return [*_setup(p), _mirror(**{"auto-dismiss": False}), ("wait", "BLOCK_JOB_READY"),
            ("cmd", "quit")]


SCRIPTS.extend([quit_while_running, quit_while_ready])


def write_blocking_complete(p: dict[str, str]) -> list[Step]:
    return [*_setup(p), _mirror(**{"copy-mode": "write-blocking", "granularity": 4096}),
            ("wait", "BLOCK_JOB_READY"), Q, ("cmd", "job-complete", {"id": "j"}),
            ("wait", "BLOCK_JOB_COMPLETED"), *END]


def named_filter_is_busy(p: dict[str, str]) -> list[Step]:
    return [*_setup(p), _mirror(**{"filter-node-name": "mf", **SLOW}), RUNNING,
            ("cmd", "blockdev-del", {"node-name": "mf"}),
            ("cmd", "blockdev-del", {"node-name": "src"}),
            ("cmd", "blockdev-mirror", {"job-id": "k", "device": "mf", "target": "tgt",
                                        "sync": "full"}),
            ("cmd", "block-job-cancel", {"device": "j", "force": True}),
            ("wait", "BLOCK_JOB_CANCELLED"), ("status", "j", ("absent",)),
            ("cmd", "blockdev-del", {"node-name": "src"}), *END]


def target_flush_error(policy: str) -> Any:
    def script(p: dict[str, str]) -> list[Step]:
        steps = [*_setup(p, tgt_error={"event": "flush_to_disk", "errno": 5, "once": True}),
                 _mirror(**{"on-target-error": policy}), ("wait", "BLOCK_JOB_ERROR")]
        return steps + _after_error(policy, 5)

    script.__name__ = f"target_flush_error_{policy}"
    return script


def sync_modes_on_a_chain(sync: str) -> Any:
    def script(p: dict[str, str]) -> list[Step]:
        import os
        import subprocess

        work = os.path.dirname(p["src"])
        top = os.path.join(work, "top.qcow2")
        tq = os.path.join(work, "tq.qcow2")
        if not os.path.exists(top):
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", p["src"], "-F",
                            "raw", top], check=True)
            subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x77 1M 64k", top],
                           check=True, capture_output=True)
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", tq, "4M"], check=True)
        return [
            ("cmd", "blockdev-add", {"driver": "qcow2", "node-name": "top",
                                     "file": {"driver": "file", "filename": top}}),
            ("cmd", "blockdev-add", {"driver": "qcow2", "node-name": "tq",
                                     "file": {"driver": "file", "filename": tq}}),
            ("cmd", "blockdev-mirror", {"job-id": "j", "device": "top", "target": "tq",
                                        "sync": sync}),
            ("wait", "BLOCK_JOB_READY"), Q, ("cmd", "job-complete", {"id": "j"}),
            ("wait", "BLOCK_JOB_COMPLETED"), *END,
        ]

    script.__name__ = f"sync_{sync}_on_a_chain"
    return script


SCRIPTS.extend([write_blocking_complete, named_filter_is_busy, target_flush_error("report"),
                target_flush_error("ignore"), target_flush_error("stop"),
                sync_modes_on_a_chain("full"), sync_modes_on_a_chain("top"),
                sync_modes_on_a_chain("none")])


def replaces_below_a_filter(p: dict[str, str]) -> list[Step]:
    """replaces= a node under a filter: after completion the filter uses the target."""
    return [
        *_setup(p),
        ("cmd", "blockdev-add", {"driver": "blkdebug", "node-name": "dbg", "image": "src"}),
        ("cmd", "blockdev-mirror", {"job-id": "j", "device": "dbg", "target": "tgt",
                                    "sync": "full", "replaces": "src"}),
        ("cmd", "blockdev-mirror", {"job-id": "j", "device": "dbg", "target": "tgt",
                                    "sync": "full", "replaces": "dbg"}),
        ("wait", "BLOCK_JOB_READY"), ("cmd", "job-complete", {"id": "j"}),
        ("wait", "BLOCK_JOB_COMPLETED"), ("status", "j", ("absent",)),
        ("cmd", "blockdev-del", {"node-name": "tgt"}),
        ("cmd", "blockdev-del", {"node-name": "src"}),
        ("cmd", "blockdev-del", {"node-name": "dbg"}),
        ("cmd", "blockdev-del", {"node-name": "tgt"}), *END,
    ]


SCRIPTS.append(replaces_below_a_filter)


def read_only_target(p: dict[str, str]) -> list[Step]:
    """A read-only target is refused when the job takes it (after creation: created/null)."""
    return [*_setup(p),
            ("cmd", "blockdev-add", {"driver": "file", "node-name": "ro", "read-only": True,
                                     "filename": p["tgt"]}),
            ("cmd", "blockdev-mirror", {"job-id": "j", "device": "src", "target": "ro",
                                        "sync": "full"}), *END]


SCRIPTS.append(read_only_target)
