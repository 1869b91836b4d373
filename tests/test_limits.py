"""Token bucket, quota policy and the OpenAI header formats."""

from __future__ import annotations

import gc
import re
import tracemalloc
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.errors import KeyUnavailable, StoreUnavailable
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


def bytes_per_key(fill: Callable[[int], object], count: int) -> float:
    """What `fill(i)` for i < count leaves allocated, per key (the keys themselves are dropped)."""
    gc.collect()
    tracemalloc.start()
    try:
        for i in range(count):
            fill(i)
        gc.collect()
        return tracemalloc.get_traced_memory()[0] / count
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize(
    "long_key",
    [
        lambda i: f"key:{i:08d}" + "k" * 248,  # the longest tenant key
        lambda i: f"ip:203.0.113.{i % 250}:/v1/chat/completions/{i}/" + "p" * 4000,  # a client-chosen path
        lambda i: f"ip:{i}" + "\udcff" * 2000 + ":/p",  # a forwarded address, invalid UTF-8 included
    ],
    ids=["key", "path", "address"],
)
def test_a_bucket_costs_the_same_whatever_the_keys_length(long_key: Callable[[int], str]) -> None:
    clock = Clock()
    short, long = TokenBucket(5, 10, clock=clock), TokenBucket(5, 10, clock=clock)
    short_cost = bytes_per_key(lambda i: short.take(f"key:{i}"), 20_000)
    long_cost = bytes_per_key(lambda i: long.take(long_key(i)), 20_000)
    assert len(short) == len(long) == 20_000
    assert long_cost < short_cost * 1.1 + 8, (short_cost, long_cost)
    assert long_cost < 400


async def test_a_quota_window_costs_the_same_whatever_the_keys_length() -> None:
    short, long = MemoryStore(clock=Clock()), MemoryStore(clock=Clock())
    keys = {short: lambda i: f"quota:{i}", long: lambda i: f"quota:{i:08d}" + "k" * 250}
    costs = {}
    for store, key in keys.items():
        gc.collect()
        tracemalloc.start()
        for i in range(20_000):
            await store.hit(key(i), 60_000)
        gc.collect()
        costs[store] = tracemalloc.get_traced_memory()[0] / 20_000
        tracemalloc.stop()
    assert len(short) == len(long) == 20_000
    assert costs[long] < costs[short] * 1.1 + 8, costs
    assert costs[long] < 400


async def test_memory_store_is_bounded_under_a_flood_within_one_window() -> None:
    clock = Clock()
    store = MemoryStore(clock=clock, max_keys=1_000)
    assert (await store.hit("quota:early", 60_000))[0] == 1
    for i in range(20_000):  # all inside one window: nothing has expired
        await store.hit(f"quota:{i}" + "k" * 250, 60_000)
    assert len(store) == 1_000
    # The windows nearest their end went first (forgiven early); the newest are still counted.
    assert (await store.hit("quota:19999" + "k" * 250, 60_000))[0] == 2
    assert (await store.hit("quota:early", 60_000))[0] == 1
    assert len(store) == 1_000


def test_tables_need_room_for_one_key() -> None:
    with pytest.raises(ValueError):
        TokenBucket(5, 10, max_keys=0)
    with pytest.raises(ValueError):
        MemoryStore(max_keys=0)


async def test_keys_that_differ_only_at_the_end_are_counted_apart() -> None:
    clock = Clock()
    bucket, store = TokenBucket(1, 1, clock=clock), MemoryStore(clock=clock)
    base = "key:" + "k" * 250
    assert [bucket.take(base + c) for c in "ab"] == [0.0, 0.0]
    assert bucket.take(base + "a") > 0
    assert [(await store.hit(base + c, 60_000))[0] for c in "aba"] == [1, 1, 2]


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


class HalfStore(MemoryStore):
    """A cluster with one master down: the keys it holds fail, the others are counted."""

    def __init__(self, down: set[str]) -> None:
        super().__init__()
        self.down = down

    async def hit(self, key: str, window_ms: int) -> tuple[int, int]:
        if key in self.down:
            raise KeyUnavailable()
        return await super().hit(key, window_ms)


@pytest.mark.parametrize("fail_open", [True, False])
async def test_a_key_that_fails_does_not_fail_the_others(fail_open: bool) -> None:
    errors: list[int] = []
    store = HalfStore({"quota:doomed"})
    quota = Quota(store, 5, {}, 60, fail_open=fail_open, on_store_error=lambda: errors.append(1), retry_after_secs=60)
    for expected_remaining in (4, 3, 2):
        if fail_open:
            assert await quota.check("doomed", "doomed") is None  # admitted, not counted
        else:
            with pytest.raises(KeyUnavailable) as refused:
                await quota.check("doomed", "doomed")
            assert refused.value.status == 503
        decision = await quota.check("healthy", "healthy")  # the store is not skipped for it
        assert decision is not None and decision.allowed and decision.remaining == expected_remaining
    assert len(errors) == 3


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
        (119_500, "1m59.5s"),  # not 1m59s: a reset never reported early
        (3_600_000, "1h0m0s"),
        (3_700_000, "1h1m40s"),  # Go's time.Duration has hours (not 61m40s)
        (90_061_001, "25h1m1.001s"),
    ],
)
def test_reset_format_is_openais(ms: int, text: str) -> None:
    assert format_reset(ms) == text


_GO_DURATION = re.compile(r"(?:(\d+)h)?(?:(\d+)m(?!s))?(?:(\d+(?:\.\d+)?)s)?(?:(\d+)ms)?")


@given(st.integers(0, 10**10))
def test_reset_reads_back_as_the_same_duration(ms: int) -> None:
    """Read as Go's time.ParseDuration reads it, the header is the window's rest, to the ms."""
    match = _GO_DURATION.fullmatch(format_reset(ms))
    assert match is not None
    hours, minutes, seconds, millis = (g or "0" for g in match.groups())
    assert int(hours) * 3_600_000 + int(minutes) * 60_000 + round(float(seconds) * 1000) + int(millis) == ms


def test_retry_after_is_whole_seconds_rounded_up() -> None:
    assert retry_headers(1) == {"Retry-After": "1", "retry-after-ms": "1"}
    assert retry_headers(1001)["Retry-After"] == "2"


async def test_a_window_behind_a_longer_one_still_ends() -> None:
    # Windows of different lengths in one table: the expired one is not at the front, and
    # must still count as ended.
    clock = Clock()
    store = MemoryStore(clock=clock)
    await store.hit("quota:long", 60_000)
    assert (await store.hit("quota:short", 1_000))[0] == 1
    assert (await store.reserve("tokens:{long}", 5, 10, 60_000))[0]
    assert (await store.reserve("tokens:{short}", 10, 10, 1_000))[0]
    clock.now += 1.5
    assert (await store.hit("quota:short", 1_000)) == (1, 1000)
    assert (await store.reserve("tokens:{short}", 10, 10, 1_000))[:3] == (True, 10, 1000)


async def test_memory_token_windows_are_forgotten_and_bounded() -> None:
    clock = Clock()
    store = MemoryStore(clock=clock, max_keys=1_000)
    for i in range(5_000):  # one window length: expired ones go from the front
        await store.reserve(f"tokens:{{{i}}}", 1, 10, 1_000)
        clock.now += 0.001
    assert len(store) <= 1_001
    for i in range(5_000):  # a flood within one window: the hard cap holds
        await store.reserve(f"tokens:{{flood{i}}}" + "k" * 250, 1, 10, 60_000)
    assert len(store) == 1_000
    # The windows nearest their end went first (forgiven early); the newest are still counted.
    assert (await store.reserve("tokens:{flood4999}" + "k" * 250, 1, 10, 60_000))[:2] == (True, 2)
    _, total, _, window = await store.reserve("tokens:{flood0}" + "k" * 250, 1, 10, 60_000)
    assert total == 1
    await store.settle("tokens:{flood0}" + "k" * 250, str(int(window) - 1), 0, 9)  # not its window: no change
    assert (await store.reserve("tokens:{flood0}" + "k" * 250, 0, 10, 60_000))[:2] == (True, 1)
    assert len(store) == 1_000


async def test_a_token_window_costs_the_same_whatever_the_keys_length() -> None:
    short, long = MemoryStore(clock=Clock()), MemoryStore(clock=Clock())
    keys = {short: lambda i: f"tokens:{{{i}}}", long: lambda i: f"tokens:{{{i:08d}" + "k" * 250 + "}"}
    costs = {}
    for store, key in keys.items():
        gc.collect()
        tracemalloc.start()
        for i in range(20_000):
            await store.reserve(key(i), 100, 1000, 60_000)
        gc.collect()
        costs[store] = tracemalloc.get_traced_memory()[0] / 20_000
        tracemalloc.stop()
    assert len(short) == len(long) == 20_000
    assert costs[long] < costs[short] * 1.1 + 8, costs
    assert costs[long] < 400


@given(st.text(alphabet=st.characters(blacklist_categories=())))  # surrogates too: a header's invalid UTF-8
def test_a_key_s_digest_is_its_16_byte_blake2b(key: str) -> None:
    # Copied from one fresh hash per call (cheaper than the constructor): the same digest, and
    # a copy never carries an earlier key's bytes.
    import hashlib

    from gateway.stores import digest

    assert digest(key) == hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=16).digest()
    assert digest(key) == digest(key)
