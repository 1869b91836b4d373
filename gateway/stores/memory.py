"""In-process fixed-window counters: the default store, no Redis needed.

Single-threaded event loop: `hit` has no await, so it is one critical section. Windows are
appended in expiry order (one window length for all keys), so expired ones are dropped
from the front in O(1) each and memory stays proportional to live windows.
"""

from __future__ import annotations

import time
from collections import OrderedDict


class MemoryStore:
    __slots__ = ("_clock", "_windows")

    def __init__(self, clock: object = time.monotonic) -> None:
        self._windows: OrderedDict[str, list[float]] = OrderedDict()  # key -> [count, expires_at]
        self._clock = clock

    async def hit(self, key: str, window_ms: int) -> tuple[int, int]:
        now: float = self._clock()  # type: ignore[operator]
        windows = self._windows
        while windows:
            first = next(iter(windows.values()))
            if first[1] > now:
                break
            windows.popitem(last=False)
        entry = windows.get(key)
        if entry is None:
            entry = windows[key] = [0, now + window_ms / 1000]
        entry[0] += 1
        return int(entry[0]), max(1, int((entry[1] - now) * 1000))

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        self._windows.clear()

    def __len__(self) -> int:
        return len(self._windows)
