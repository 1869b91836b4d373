"""In-process fixed windows: the default store, no Redis needed.

Single-threaded event loop: no method has an await, so each is one critical section. Windows
are appended in expiry order (one window length for all keys of a table: request counters
in one table, token windows in another), so expired ones are dropped from the front in O(1)
each and memory stays proportional to live windows; a window found expired is started anew
whatever its place. Each window is filed under a 16-byte digest of its key, so it costs the
same whatever the key's length, and `max_keys` caps each table under a flood of distinct
keys (open mode: any key is a tenant) by dropping the windows nearest their end: that only
forgives those tenants early.
"""

from __future__ import annotations

import itertools
import time
from collections import OrderedDict
from collections.abc import Callable

from . import MAX_TOKENS, Held, digest

_COUNT, _EXPIRES = 0, 1  # a request window: [count, expires_at]
_USED, _RESERVED, _ENDS, _ID = 0, 1, 2, 3  # a token window: [used, reserved, expires_at, id]


class MemoryStore:
    __slots__ = ("_clock", "_max_keys", "_token_windows", "_window_ids", "_windows")

    def __init__(self, clock: Callable[[], float] = time.monotonic, max_keys: int = 100_000) -> None:
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        self._windows: OrderedDict[bytes, list[float]] = OrderedDict()
        self._token_windows: OrderedDict[bytes, list[float]] = OrderedDict()  # ints, but the end
        self._window_ids = itertools.count(1)
        self._clock = clock
        self._max_keys = max_keys

    async def hit(self, key: str, window_ms: int) -> tuple[int, int]:
        now = self._clock()
        slot = digest(key)
        entry = self._live(self._windows, slot, now, _EXPIRES)
        if entry is None:
            entry = self._start(self._windows, slot, [0, now + window_ms / 1000])
        entry[_COUNT] += 1
        return int(entry[_COUNT]), max(1, int((entry[_EXPIRES] - now) * 1000))

    async def reserve(self, key: str, amount: int, limit: int, window_ms: int) -> Held:
        now = self._clock()
        slot = digest(key)
        entry = self._live(self._token_windows, slot, now, _ENDS)
        if entry is None:
            entry = self._start(self._token_windows, slot, [0, 0, now + window_ms / 1000, next(self._window_ids)])
        held = entry[_USED] + entry[_RESERVED] + amount <= limit
        if held:
            entry[_RESERVED] += amount
        total = int(entry[_USED] + entry[_RESERVED])
        return held, total, max(1, int((entry[_ENDS] - now) * 1000)), str(int(entry[_ID]))

    async def settle(self, key: str, window: str, reserved: int, used: int) -> None:
        entry = self._live(self._token_windows, digest(key), self._clock(), _ENDS)
        if entry is None or str(int(entry[_ID])) != window:
            return  # that window has ended (or was dropped): a later one owes nothing
        entry[_RESERVED] = max(0, entry[_RESERVED] - reserved)
        entry[_USED] = min(MAX_TOKENS * 2, entry[_USED] + used)

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        self._windows.clear()
        self._token_windows.clear()

    def __len__(self) -> int:
        return len(self._windows) + len(self._token_windows)

    @staticmethod
    def _live(table: OrderedDict[bytes, list[float]], slot: bytes, now: float, expires: int) -> list[float] | None:
        """The live window under `slot`, or None; expired windows at the front are dropped."""
        while table:
            first = next(iter(table.values()))
            if first[expires] > now:
                break
            table.popitem(last=False)
        entry = table.get(slot)
        if entry is not None and entry[expires] <= now:  # behind a longer window: ended all the same
            del table[slot]
            return None
        return entry

    def _start(self, table: OrderedDict[bytes, list[float]], slot: bytes, entry: list[float]) -> list[float]:
        if len(table) >= self._max_keys:
            table.popitem(last=False)
        table[slot] = entry
        return entry
