"""In-process fixed-window counters: the default store, no Redis needed.

Single-threaded event loop: `hit` has no await, so it is one critical section. Windows are
appended in expiry order (one window length for all keys), so expired ones are dropped
from the front in O(1) each and memory stays proportional to live windows. Each window is
filed under a 16-byte digest of its key, so it costs the same whatever the key's length,
and `max_keys` caps the table under a flood of distinct keys (open mode: any key is a
tenant) by dropping the windows nearest their end: that only forgives those tenants early.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from . import digest


class MemoryStore:
    __slots__ = ("_clock", "_max_keys", "_windows")

    def __init__(self, clock: Callable[[], float] = time.monotonic, max_keys: int = 100_000) -> None:
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        self._windows: OrderedDict[bytes, list[float]] = OrderedDict()  # digest -> [count, expires_at]
        self._clock = clock
        self._max_keys = max_keys

    async def hit(self, key: str, window_ms: int) -> tuple[int, int]:
        now = self._clock()
        windows = self._windows
        while windows:
            first = next(iter(windows.values()))
            if first[1] > now:
                break
            windows.popitem(last=False)
        slot = digest(key)
        entry = windows.get(slot)
        if entry is None:
            if len(windows) >= self._max_keys:
                windows.popitem(last=False)
            entry = windows[slot] = [0, now + window_ms / 1000]
        entry[0] += 1
        return int(entry[0]), max(1, int((entry[1] - now) * 1000))

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        self._windows.clear()

    def __len__(self) -> int:
        return len(self._windows)
