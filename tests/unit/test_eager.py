"""``start_eager``: a coroutine runs on the caller's stack until it first waits, and only the
rest of it becomes a task, which resumes it where it stopped."""

from __future__ import annotations

import asyncio

import pytest

from blockmirror.eager import start_eager


def test_a_coroutine_that_never_waits_needs_no_task() -> None:
    async def main() -> None:
        steps: list[str] = []

        async def quick() -> None:
            steps.append("ran")

        assert start_eager(quick()) is None
        assert steps == ["ran"]  # before anything else ran on the loop

    asyncio.run(main())


def test_the_rest_resumes_where_the_coroutine_waited() -> None:
    async def main() -> None:
        steps: list[str] = []
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        async def slow() -> None:
            steps.append("first")
            steps.append(f"got {await fut}")
            await asyncio.sleep(0)  # a bare yield on the way
            steps.append("end")

        task = start_eager(slow())
        assert task is not None
        assert steps == ["first"]
        await asyncio.sleep(0)
        assert steps == ["first"]  # still waiting for fut
        fut.set_result(7)
        await task
        assert steps == ["first", "got 7", "end"]

    asyncio.run(main())


def test_cancelling_the_task_cancels_the_coroutine_where_it_waits() -> None:
    async def main() -> None:
        seen: list[str] = []

        async def waits() -> None:
            try:
                await asyncio.get_running_loop().create_future()
            except asyncio.CancelledError:
                seen.append("cancelled")
                raise

        task = start_eager(waits())
        assert task is not None
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert seen == ["cancelled"]

    asyncio.run(main())


def test_errors_reach_the_caller_in_the_first_step_and_the_task_after() -> None:
    async def main() -> None:
        async def fails_at_once() -> None:
            raise ValueError("first")

        with pytest.raises(ValueError, match="first"):
            start_eager(fails_at_once())

        async def fails_later() -> None:
            await asyncio.sleep(0)
            raise ValueError("later")

        task = start_eager(fails_later())
        assert task is not None
        with pytest.raises(ValueError, match="later"):
            await task

    asyncio.run(main())
