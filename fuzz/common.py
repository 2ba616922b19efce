"""What every harness shares: one event loop per process, a scratch directory, findings."""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class Finding(AssertionError):
    """A bug: an unexpected exception type, a hang, a broken invariant."""


_LOOP: asyncio.AbstractEventLoop | None = None


def run(coro: Coroutine[Any, Any, T], limit_s: float = 30.0, fresh_loop: bool = False) -> T:
    """Run ``coro`` on the process's loop (a new one with ``fresh_loop``); a hang past
    ``limit_s`` is a Finding."""
    global _LOOP
    if fresh_loop and _LOOP is not None and not _LOOP.is_closed():
        _LOOP.close()
    if _LOOP is None or _LOOP.is_closed():
        _LOOP = asyncio.new_event_loop()
        asyncio.set_event_loop(_LOOP)

    async def bounded() -> T:
        try:
            return await asyncio.wait_for(coro, limit_s)
        except TimeoutError as e:
            raise Finding(f"hang: no result within {limit_s} s") from e

    return _LOOP.run_until_complete(bounded())


_SCRATCH: str | None = None
#: the largest file a harness process may write (RLIMIT_FSIZE): a fuzzed blockdev-create
#: with preallocation=full and a size of 2^36 must fail with EFBIG, not fill the disk
MAX_FILE = 64 << 20


def sandbox() -> str:
    """Confine this process (call once, in the fuzzing process only, never in pytest's):
    cwd becomes a fresh scratch directory, files are capped at MAX_FILE (SIGXFSZ ignored,
    so writes past it fail with EFBIG), file I/O runs inline (InlineExecutor)."""
    import resource
    import signal

    d = scratch()
    os.chdir(d)
    inline_io()
    resource.setrlimit(resource.RLIMIT_FSIZE, (MAX_FILE, MAX_FILE))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    return d


def scratch() -> str:
    """A per-process directory on tmpfs when there is one (fast), else in the temp dir."""
    global _SCRATCH
    if _SCRATCH is None:
        base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) \
            else None
        _SCRATCH = tempfile.mkdtemp(prefix="bm-fuzz-", dir=base)
    return _SCRATCH


def clean_scratch(keep: set[str]) -> None:
    """Remove what an input left in the scratch directory (but the harness's base files)."""
    import shutil

    d = scratch()
    for name in os.listdir(d):
        if name not in keep:
            path = os.path.join(d, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                try:
                    os.unlink(path)
                except OSError:
                    pass


def require_sandbox() -> None:
    """Harnesses that create files refuse to run outside the sandbox."""
    import resource

    if resource.getrlimit(resource.RLIMIT_FSIZE)[0] > MAX_FILE or \
            os.path.realpath(os.getcwd()) != os.path.realpath(scratch()):
        raise RuntimeError("call fuzz.common.sandbox() first: this harness creates files")


class InlineExecutor:
    """A thread-pool stand-in that runs each blocking call at once, in the caller's thread.

    The harnesses' files live on tmpfs, where a read or write takes microseconds and
    handing it to a worker thread costs far more (the GIL hand-off dominated the qcow2
    harness's profile). A request still completes through an asyncio future, so the
    awaiting coroutine yields to the loop as before; the only difference is that I/O
    completes in submission order, which makes every input replay identically.
    """

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        import concurrent.futures

        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
        try:
            fut.set_result(fn(*args, **kwargs))
        except BaseException as e:  # handed to the awaiting coroutine, as a pool would
            fut.set_exception(e)
        return fut

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        return None


def inline_io() -> None:
    """Make blockmirror's file I/O pool run its calls inline (see InlineExecutor); for
    the sandboxed fuzzing process only."""
    from blockmirror.block import threadio

    threadio._executor = InlineExecutor()  # type: ignore[assignment]
