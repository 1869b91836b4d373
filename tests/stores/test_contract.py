"""One contract, every backend: memory, a real redis-server, a real 3-master cluster."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import pytest

from gateway.errors import StoreUnavailable
from gateway.stores import QuotaStore, store_from_url
from gateway.stores.redis import RedisStore

from ..harness import RedisCluster, RedisServer


@pytest.fixture(scope="module", params=["memory", "redis", "cluster"])
def backend(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str | None, bool]]:
    """(url, cluster) of a real server per backend, shared by the module's tests."""
    if request.param == "memory":
        yield None, False
        return
    tmp = tmp_path_factory.mktemp(request.param)
    server = RedisServer(tmp) if request.param == "redis" else RedisCluster(tmp)
    yield server.url, request.param == "cluster"
    server.stop()


@pytest.fixture
def store(backend: tuple[str | None, bool]) -> Callable[[], AbstractAsyncContextManager[QuotaStore]]:
    """Opened and closed inside the test's own task (coredis' pool is task-scoped)."""

    @asynccontextmanager
    async def opened() -> AsyncIterator[QuotaStore]:
        url, cluster = backend
        store = store_from_url(url, cluster=cluster, timeout=0.5)
        if isinstance(store, RedisStore):
            await store.open()
        try:
            yield store
        finally:
            await store.close()

    return opened


StoreFactory = Callable[[], AbstractAsyncContextManager[QuotaStore]]


def unique(prefix: str) -> str:
    return f"quota:{prefix}:{uuid.uuid4().hex}"


async def test_counts_within_a_window(store: StoreFactory) -> None:
    key_a, key_b = unique("a"), unique("b")
    async with store() as s:
        assert (await s.hit(key_a, 60_000))[0] == 1
        count, ttl = await s.hit(key_a, 60_000)
        assert count == 2
        assert 0 < ttl <= 60_000
        assert (await s.hit(key_b, 60_000))[0] == 1


async def test_window_ends(store: StoreFactory) -> None:
    key = unique("w")
    async with store() as s:
        await s.hit(key, 300)
        await s.hit(key, 300)
        await asyncio.sleep(0.45)
        assert (await s.hit(key, 300))[0] == 1


async def test_concurrent_hits_are_counted_exactly_once(store: StoreFactory) -> None:
    # Several keys (in a cluster: several slots and nodes), all hit in the same loop turn:
    # the Redis store sends them as one pipeline, and each key must still count 1..40.
    keys = [unique(f"c{i}") for i in range(5)]
    async with store() as s:
        counts = await asyncio.gather(*(s.hit(key, 60_000) for _ in range(40) for key in keys))
    for i in range(5):
        assert sorted(c for c, _ in counts[i::5]) == list(range(1, 41))


async def test_long_keys_that_differ_only_at_the_end_are_counted_apart(store: StoreFactory) -> None:
    # A tenant may be a 256-byte key: each is its own counter, however a backend files it.
    base = unique("long") + "k" * 256
    async with store() as s:
        counts = [(await s.hit(base + suffix, 60_000))[0] for suffix in ("a", "b", "a", "a")]
    assert counts == [1, 1, 2, 3]


async def test_ping(store: StoreFactory) -> None:
    async with store() as s:
        assert await s.ping() is True


async def test_redis_key_always_has_a_ttl(redis_server: RedisServer) -> None:
    store = RedisStore(redis_server.url, cluster=False, timeout=0.5)
    await store.open()
    try:
        await store.hit("quota:demo", 60_000)
        assert redis_server.cli("GET", "quota:demo") == "1"
        assert 0 < int(redis_server.cli("TTL", "quota:demo")) <= 60
        # A counter that somehow lost its TTL is repaired by the next hit.
        redis_server.cli("PERSIST", "quota:demo")
        await store.hit("quota:demo", 60_000)
        assert 0 < int(redis_server.cli("TTL", "quota:demo")) <= 60
        # Hits sent together in one script call: each key gets its own window.
        await asyncio.gather(store.hit("quota:long", 600_000), store.hit("quota:short", 5_000))
        assert 60 < int(redis_server.cli("TTL", "quota:long")) <= 600
        assert 0 < int(redis_server.cli("TTL", "quota:short")) <= 5
    finally:
        await store.close()


def script_calls(server: RedisServer) -> int:
    stats = server.cli("INFO", "commandstats")
    line = next((row for row in stats.splitlines() if row.startswith("cmdstat_evalsha:")), "")
    return int(line.split("calls=")[1].split(",")[0]) if line else 0


async def test_hits_that_arrive_while_a_batch_is_out_go_together(redis_server: RedisServer) -> None:
    # 100 hits, one per loop turn. A round trip takes several turns, so hits that come
    # while one batch is out wait and go in the next: far fewer calls than hits, and every
    # count still exact.
    store = RedisStore(redis_server.url, cluster=False, timeout=0.5)
    await store.open()
    try:
        await store.hit("quota:warm", 60_000)  # connected, script loaded
        before = script_calls(redis_server)

        async def hit_after(turns: int) -> int:
            for _ in range(turns):
                await asyncio.sleep(0)
            return (await store.hit("quota:spread", 60_000))[0]

        counts = await asyncio.gather(*(hit_after(i) for i in range(100)))
        assert sorted(counts) == list(range(1, 101))
        assert script_calls(redis_server) - before <= 50
    finally:
        await store.close()


async def test_a_hit_given_up_before_its_batch_goes_out_is_not_counted(redis_server: RedisServer) -> None:
    store = RedisStore(redis_server.url, cluster=False, timeout=0.5)
    await store.open()
    try:
        first = asyncio.create_task(store.hit("quota:first", 60_000))
        await asyncio.sleep(0)
        await asyncio.sleep(0)  # the first hit's batch is out
        waiting = asyncio.create_task(store.hit("quota:gave-up", 60_000))
        await asyncio.sleep(0)  # queued behind it
        waiting.cancel()  # its request went away (client gone, deadline)
        assert (await first)[0] == 1
        assert (await store.hit("quota:next", 60_000))[0] == 1  # a batch after the one it was in
        assert redis_server.cli("EXISTS", "quota:gave-up") == "0"
    finally:
        await store.close()


async def test_unreachable_redis_raises_store_unavailable_then_recovers(
    redis_factory: Callable[[], RedisServer],
) -> None:
    server = redis_factory()
    store = RedisStore(server.url, cluster=False, timeout=0.3)
    await store.open()
    try:
        assert (await store.hit("quota:r", 60_000))[0] == 1
        server.kill()
        with pytest.raises(StoreUnavailable):
            await store.hit("quota:r", 60_000)
        # A whole batch of waiting requests fails together, and promptly.
        failures = await asyncio.gather(*(store.hit(f"quota:r{i}", 60_000) for i in range(20)), return_exceptions=True)
        assert all(isinstance(f, StoreUnavailable) for f in failures)
        assert await store.ping() is False
        server.start()
        assert (await store.hit("quota:r", 60_000))[0] == 1  # a fresh server: counting again
    finally:
        await store.close()


async def test_redis_down_at_start_is_not_fatal(tmp_path: Path) -> None:
    from ..harness import free_port

    store = RedisStore(f"redis://127.0.0.1:{free_port()}/0", cluster=False, timeout=0.3)
    await store.open()
    with pytest.raises(StoreUnavailable):
        await store.hit("quota:x", 1000)
    await store.close()
