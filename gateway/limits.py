"""Admission policy: the per-key token bucket and the per-tenant fixed-window quota.

Both return values (`Decision`, a retry delay); only middlewares.py turns them into HTTP.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping

from .models import Decision
from .stores import QuotaStore, StoreGuard, digest


class TokenBucket:
    """RPS/BURST per key, in process memory, with bounded size.

    A bucket idle long enough to have refilled is the same as no bucket, so buckets are
    kept in LRU order and dropped from the cold end once full again; `max_keys` caps the
    table even under a flood of distinct keys (evicting a cold bucket only forgives it).
    Buckets are filed under a 16-byte digest of the key, so each costs the same few hundred
    bytes however long the key (a client-chosen path or forwarded address inside it).
    """

    __slots__ = ("_buckets", "_burst", "_clock", "_max_keys", "_rate", "_refill_secs")

    def __init__(
        self, rate: float, burst: int, max_keys: int = 100_000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        self._rate = rate
        self._burst = float(burst)
        self._buckets: OrderedDict[bytes, list[float]] = OrderedDict()  # digest -> [tokens, updated]
        self._max_keys = max_keys
        self._refill_secs = burst / rate if rate > 0 else 0.0
        self._clock = clock

    @property
    def enabled(self) -> bool:
        return self._rate > 0

    def take(self, key: str) -> float:
        """Spend one token; return 0.0 if admitted, else seconds until a token is due."""
        now = self._clock()
        buckets = self._buckets
        slot = digest(key)
        bucket = buckets.get(slot)
        if bucket is None:
            bucket = buckets[slot] = [self._burst, now]
            self._evict(now)
        else:
            buckets.move_to_end(slot)
            bucket[0] = min(self._burst, bucket[0] + (now - bucket[1]) * self._rate)
            bucket[1] = now
        if bucket[0] >= 1.0:
            bucket[0] -= 1.0
            return 0.0
        return (1.0 - bucket[0]) / self._rate

    def _evict(self, now: float) -> None:
        buckets = self._buckets
        while len(buckets) > self._max_keys:
            buckets.popitem(last=False)
        # Drop a few refilled buckets per call: amortised O(1), never a long pause.
        for _ in range(2):
            oldest = next(iter(buckets.values()))
            if now - oldest[1] < self._refill_secs:
                break
            buckets.popitem(last=False)

    def __len__(self) -> int:
        return len(self._buckets)


class Quota:
    """Fixed-window request quota per tenant over a `QuotaStore`; the fail mode is the
    guard's (shared with the token budget: one outage, handled once)."""

    __slots__ = ("_default", "_guard", "_overrides", "_store", "_window_ms")

    def __init__(
        self,
        store: QuotaStore,
        default_limit: int,
        overrides: Mapping[str, int],
        window_secs: int,
        fail_open: bool = True,
        on_store_error: Callable[[], None] = lambda: None,
        retry_after_secs: float = 1.0,
        guard: StoreGuard | None = None,
    ) -> None:
        self._store = store
        self._default = default_limit
        self._overrides = overrides
        self._window_ms = window_secs * 1000
        self._guard = guard if guard is not None else StoreGuard(fail_open, on_store_error, retry_after_secs)

    def limit_for(self, tenant: str) -> int:
        return self._overrides.get(tenant, self._default)

    async def check(self, tenant: str, public_id: str) -> Decision | None:
        """The verdict, or None when the store is down and the mode is fail-open."""
        limit = self.limit_for(tenant)
        counted = await self._guard.call(self._store.hit, "quota:" + public_id, self._window_ms)
        if counted is None:
            return None
        count, ttl_ms = counted
        return Decision(count <= limit, limit, max(0, limit - count), ttl_ms)


# ".5", ".25", ".125" ... by milliseconds ("" for none): looked up, not formatted, per response.
_FRACTIONS = ("", *(f".{ms:03d}".rstrip("0") for ms in range(1, 1000)))


def format_reset(ms: int) -> str:
    """OpenAI's duration format for x-ratelimit-reset-* (Go's time.Duration): 12ms, 1s, 1.5s,
    6m0s, 1m59.5s, 1h1m40s; the milliseconds kept at every size (never early)."""
    if ms < 1000:
        return f"{ms}ms"
    seconds, fraction = divmod(ms, 1000)  # integers: round() and :g on a float cost 5x more
    if seconds < 60:
        return f"{seconds}{_FRACTIONS[fraction]}s"
    minutes, rest = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{rest}{_FRACTIONS[fraction]}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes}m{rest}{_FRACTIONS[fraction]}s"


def retry_headers(ms: int) -> dict[str, str]:
    """Retry-After in whole seconds (rounded up, at least 1) and OpenAI's retry-after-ms."""
    return {"Retry-After": str(max(1, math.ceil(ms / 1000))), "retry-after-ms": str(ms)}
