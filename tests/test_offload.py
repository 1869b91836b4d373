"""Turns: jobs in a worker thread, one at a time, the turn held until the thread is done."""

from __future__ import annotations

import asyncio
import threading

import pytest

from gateway.offload import Turns


async def test_a_job_whose_caller_left_keeps_the_turn_until_its_thread_is_done() -> None:
    turns = Turns()
    first_running, release, second_ran = threading.Event(), threading.Event(), threading.Event()
    done: list[str] = []

    def first() -> None:
        first_running.set()
        release.wait(5)
        done.append("first")

    def second() -> None:
        second_ran.set()
        done.append("second")

    waiting = asyncio.ensure_future(turns.run(first))
    assert await asyncio.to_thread(first_running.wait, 5)
    waiting.cancel()  # its client left: the caller goes, the thread goes on
    with pytest.raises(asyncio.CancelledError):
        await waiting
    next_job = asyncio.ensure_future(turns.run(second))
    assert not await asyncio.to_thread(second_ran.wait, 0.2)  # not beside the first
    release.set()
    await next_job
    assert done == ["first", "second"]


async def test_results_and_errors_reach_the_caller() -> None:
    turns = Turns()
    assert await turns.run(lambda: 42) == 42
    with pytest.raises(ZeroDivisionError):
        await turns.run(lambda: 1 // 0)
    assert await turns.run(lambda: "again") == "again"  # the turn was given back
