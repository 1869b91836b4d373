"""Token bucket, quota policy and the OpenAI header formats."""

from __future__ import annotations

import pytest

from gateway.errors import StoreUnavailable
from gateway.limits import Quota, TokenBucket, format_reset, retry_headers
from gateway.stores.memory import MemoryStore


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_bucket_admits_burst_then_refills_at_rate() -> None:
    clock = Clock()
    bucket = TokenBucket(rate=5, burst=10, clock=clock)
    assert [bucket.take("k") for _ in range(10)] == [0.0] * 10
    wait = bucket.take("k")
    assert wait == pytest.approx(0.2)
    clock.now += 0.2
    assert bucket.take("k") == 0.0
    assert bucket.take("other") == 0.0  # keys are independent


def test_bucket_memory_is_bounded_under_key_rotation() -> None:
    clock = Clock()
    bucket = TokenBucket(rate=5, burst=10, clock=clock, max_keys=50_000)
    for i in range(200_000):  # a flood of distinct keys, 1 ms apart
        bucket.take(f"key:{i}")
        clock.now += 0.001
    # Only buckets that could still be short of tokens (the last 2 s) are kept.
    assert len(bucket) <= 2_100
    for i in range(200_000):  # the same flood all at once: the hard cap holds
        bucket.take(f"again:{i}")
    assert len(bucket) <= 50_000


async def test_memory_store_forgets_expired_windows() -> None:
    clock = Clock()
    store = MemoryStore(clock=clock)
    for i in range(200_000):
        await store.hit(f"quota:{i}", 60_000)
        clock.now += 0.001
    assert len(store) <= 60_001


class FailingStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.fail = True
        self.calls = 0

    async def hit(self, key: str, window_ms: int) -> tuple[int, int]:
        self.calls += 1
        if self.fail:
            raise StoreUnavailable()
        return await super().hit(key, window_ms)


async def test_quota_decisions_and_overrides() -> None:
    quota = Quota(MemoryStore(), 2, {"vip": 3}, 60, fail_open=True, on_store_error=lambda: None)
    decisions = [await quota.check("t", "t") for _ in range(3)]
    assert [d.allowed for d in decisions if d] == [True, True, False]
    assert [d.remaining for d in decisions if d] == [1, 0, 0]
    assert [(await quota.check("vip", "vip")).allowed for _ in range(4)] == [True, True, True, False]  # type: ignore[union-attr]


@pytest.mark.parametrize("fail_open", [True, False])
async def test_store_failure_follows_the_mode_and_backs_off(fail_open: bool) -> None:
    errors: list[int] = []
    store = FailingStore()
    quota = Quota(store, 5, {}, 60, fail_open=fail_open, on_store_error=lambda: errors.append(1), retry_after_secs=0.2)
    for _ in range(5):
        if fail_open:
            assert await quota.check("t", "t") is None
        else:
            with pytest.raises(StoreUnavailable):
                await quota.check("t", "t")
    assert len(errors) == 5
    assert store.calls == 1  # skipped while backing off: no request waits on a dead store
    store.fail = False
    import asyncio

    await asyncio.sleep(0.25)
    decision = await quota.check("t", "t")
    assert decision is not None and decision.allowed


@pytest.mark.parametrize(
    ("ms", "text"),
    [
        (12, "12ms"),
        (999, "999ms"),
        (1000, "1s"),
        (1500, "1.5s"),
        (59_999, "59.999s"),
        (360_000, "6m0s"),
        (61_000, "1m1s"),
    ],
)
def test_reset_format_is_openais(ms: int, text: str) -> None:
    assert format_reset(ms) == text


def test_retry_after_is_whole_seconds_rounded_up() -> None:
    assert retry_headers(1) == {"Retry-After": "1", "retry-after-ms": "1"}
    assert retry_headers(1001)["Retry-After"] == "2"
