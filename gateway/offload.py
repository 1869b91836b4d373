"""Work moved off the event loop into a worker thread, one job at a time per `Turns`.

The turn is held until the thread is done, not until whoever asked stops waiting: a request
whose client leaves is cancelled at once, but its thread goes on, and the next job must not
start beside it (a client that closes the connection right after each hostile body would
otherwise run as many jobs at once as it has left behind).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class Turns:
    __slots__ = ("_turn",)

    def __init__(self) -> None:
        self._turn = asyncio.Semaphore(1)

    async def run(self, work: Callable[[], T]) -> T:
        """`work()` in the loop's default executor once no other job of these turns runs."""
        await self._turn.acquire()  # cancelled while waiting: never started, nothing held
        done = asyncio.get_running_loop().run_in_executor(None, work)
        done.add_done_callback(self._finished)
        return await asyncio.shield(done)  # cancelled: the thread goes on, and keeps the turn

    def _finished(self, done: asyncio.Future[T]) -> None:
        self._turn.release()
        if not done.cancelled():
            done.exception()  # retrieved: a job nobody waits for any more logs no "never retrieved" error
