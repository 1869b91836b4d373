"""Per-request deadlines on one shared timer.

`asyncio.timeout` arms and cancels an event-loop timer for every request, which costs more
than everything else the gateway adds to a request but redaction. Every request here has
the same time limit, so deadlines expire in the order they were set: they wait in one
ordered table, and one timer, armed for the oldest, cancels whatever is overdue. A
deadline may fire up to one tick (at most 50 ms) late.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from types import TracebackType


class Deadlines:
    __slots__ = ("_pending", "_seconds", "_tick", "_timer")

    def __init__(self, seconds: float) -> None:
        self._seconds = seconds
        self._tick = max(0.005, min(0.05, seconds / 20))
        self._pending: OrderedDict[Deadline, None] = OrderedDict()  # oldest first = due first
        self._timer: asyncio.TimerHandle | None = None

    def __call__(self) -> Deadline:
        """`async with deadlines():` raises TimeoutError when the time is up, like asyncio.timeout."""
        return Deadline(self)

    def _add(self, deadline: Deadline) -> None:
        self._pending[deadline] = None
        if self._timer is None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_at(deadline.due + self._tick, self._expire, loop)

    def _remove(self, deadline: Deadline) -> None:
        self._pending.pop(deadline, None)

    def _expire(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        now = loop.time()
        pending = self._pending
        while pending:
            oldest = next(iter(pending))
            if oldest.due > now:
                self._timer = loop.call_at(max(oldest.due, now + self._tick), self._expire, loop)
                return
            pending.popitem(last=False)
            oldest.expire()


class Deadline:
    __slots__ = ("_cancelling", "_owner", "_task", "due", "expired")

    def __init__(self, owner: Deadlines) -> None:
        self._owner = owner
        self._task: asyncio.Task[object] | None = None
        self._cancelling = 0
        self.due = 0.0
        self.expired = False

    async def __aenter__(self) -> Deadline:
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        self._cancelling = task.cancelling()
        self.due = asyncio.get_running_loop().time() + self._owner._seconds
        self._owner._add(self)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._owner._remove(self)
        # Our cancellation, and no other one pending (the client leaving wins): a timeout.
        if self.expired and exc_type is asyncio.CancelledError:
            assert self._task is not None
            if self._task.uncancel() <= self._cancelling:
                raise TimeoutError from exc

    def expire(self) -> None:
        self.expired = True
        if self._task is not None:
            self._task.cancel()
