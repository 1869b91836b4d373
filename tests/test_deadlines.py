"""The shared deadline timer behaves like asyncio.timeout, a tick late at most."""

from __future__ import annotations

import asyncio
import time

import pytest

from gateway.deadlines import Deadlines


async def test_work_that_overruns_gets_a_timeout_about_on_time() -> None:
    deadlines = Deadlines(0.2)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        async with deadlines():
            await asyncio.sleep(5)
    assert 0.2 <= time.monotonic() - started < 0.2 + 0.2  # due + one tick, with slack for a busy machine


async def test_work_in_time_is_untouched_and_forgotten() -> None:
    deadlines = Deadlines(0.2)
    for _ in range(3):
        async with deadlines():
            await asyncio.sleep(0.01)
    await asyncio.sleep(0.3)  # past every due time: nothing fires into a finished task
    assert not deadlines._pending


async def test_each_request_has_its_own_deadline() -> None:
    deadlines = Deadlines(0.3)

    async def work(delay: float) -> str:
        async with deadlines():
            await asyncio.sleep(delay)
        return "done"

    slow = asyncio.create_task(work(5))
    await asyncio.sleep(0.2)
    fast = asyncio.create_task(work(0.05))  # due after the slow one: must not be cut with it
    assert await fast == "done"
    with pytest.raises(TimeoutError):
        await slow


async def test_a_cancellation_from_outside_stays_a_cancellation() -> None:
    deadlines = Deadlines(0.1)

    async def work() -> None:
        async with deadlines():
            await asyncio.sleep(5)

    task = asyncio.create_task(work())
    await asyncio.sleep(0.02)
    task.cancel()  # the client hung up before the deadline
    with pytest.raises(asyncio.CancelledError):
        await task
