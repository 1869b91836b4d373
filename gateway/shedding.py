"""Load shedding: a count of requests in flight, from admission to their last byte."""

from __future__ import annotations


class Shedder:
    __slots__ = ("_limit", "in_flight")

    def __init__(self, limit: int) -> None:
        self._limit = limit  # 0: no limit
        self.in_flight = 0

    def try_acquire(self) -> bool:
        if self._limit and self.in_flight >= self._limit:
            return False
        self.in_flight += 1
        return True

    def release(self) -> None:
        self.in_flight -= 1
