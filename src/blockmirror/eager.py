"""Start a coroutine at once, on the caller's stack; make it a task only if it has to wait.

Python 3.12 calls this an eager task (``asyncio.eager_task_factory``); 3.11 has no such thing.
A guest's write through the NBD export usually finishes without waiting for anything (the
write lands in the page cache or runs inline, the reply fits the socket buffer), and for
it a task costs more than the work: ``create_task``, a pass of the event loop before its
first step, and that pass's ``epoll_wait``. Measured on this machine class before this
module: two loop passes per 64 KiB write, one to read the request and one to run its task.

``start_eager(coro)`` runs ``coro`` until it first suspends. If it returned by then, there
is no task at all (``None``). Otherwise the rest of it becomes a task, which resumes the
coroutine exactly where it stopped: it hands the task the future the coroutine is waiting
on, and the task's wake-ups, results and cancellations go back into the coroutine.

What differs from a task: the first step runs inside the caller (a protocol callback, or
another task), so ``asyncio.current_task()`` there is the caller's task or ``None``, and an
exception the coroutine raises in that step reaches the caller. Callers pass coroutines that
catch their own errors and do not look at the current task in their first step.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Generator
from typing import Any


class _Rest:
    """Awaiting this resumes a coroutine that was started by hand and is suspended on
    ``pending`` (what its first ``send`` yielded: a future, or ``None`` for a bare yield)."""

    __slots__ = ("_coro", "_pending")

    def __init__(self, coro: Coroutine[Any, Any, None], pending: Any) -> None:
        self._coro = coro
        self._pending = pending

    def __await__(self) -> Generator[Any, Any, None]:
        coro, pending = self._coro, self._pending
        self._pending = None
        while True:
            try:
                sent = yield pending
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:  # a cancellation: passed on as is
                try:
                    pending = coro.throw(exc)
                except StopIteration:
                    return
            else:
                try:
                    pending = coro.send(sent)
                except StopIteration:
                    return


async def _finish(rest: _Rest) -> None:
    await rest


def start_eager(coro: Coroutine[Any, Any, None]) -> asyncio.Task[None] | None:
    """Run ``coro`` until it first waits; then (only then) the rest of it becomes a task."""
    try:
        pending = coro.send(None)
    except StopIteration:
        return None
    return asyncio.get_running_loop().create_task(_finish(_Rest(coro, pending)))


__all__ = ["start_eager"]
