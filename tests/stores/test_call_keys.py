"""The Redis store's call keys and repairs (stores/redis.py), against real redis-servers: what
they must never do (apply a settlement twice), and what they must not break (a Redis user
allowed the documented keys only)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from gateway.errors import StoreUnavailable
from gateway.stores import redis as redis_store
from gateway.stores.redis import RedisStore

from ..harness import RedisCluster, RedisServer, free_port


class Proxy:
    """A TCP relay in front of a redis-server that can lose the next script answer (the
    connection stays up, silent) and refuse new connections (Redis unreachable)."""

    def __init__(self, server: RedisServer) -> None:
        self.server = server
        self.port = free_port()
        self.lose_answers = 0
        self.refusing = False
        self.evalshas = 0  # script calls that reached Redis
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []
        self._listener: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def __aenter__(self) -> Proxy:
        self._listener = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._listener is not None
        self._listener.close()
        for task in self._tasks:
            task.cancel()
        for writer in self._writers:
            writer.close()

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        if self.refusing:
            client_writer.transport.abort()
            return
        server_reader, server_writer = await asyncio.open_connection("127.0.0.1", self.server.port)
        self._writers.extend((client_writer, server_writer))
        silent: list[bool] = []
        self._tasks.add(asyncio.create_task(self._up(client_reader, server_writer, silent)))
        self._tasks.add(asyncio.create_task(self._down(server_reader, client_writer, silent)))

    async def _up(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, silent: list[bool]) -> None:
        while data := await reader.read(65536):
            if b"EVALSHA" in data.upper():
                self.evalshas += 1
                if self.lose_answers:
                    self.lose_answers -= 1
                    silent.append(True)
            writer.write(data)

    async def _down(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, silent: list[bool]) -> None:
        while data := await reader.read(65536):
            if not silent:
                writer.write(data)


async def wait_until(check: Callable[[], bool], within: float) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


@pytest.fixture
async def proxy(redis_server: RedisServer) -> AsyncIterator[Proxy]:
    async with Proxy(redis_server) as relay:
        yield relay


async def test_a_settlement_is_not_applied_again_once_its_call_key_has_expired(
    redis_server: RedisServer, proxy: Proxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A settlement runs and its answer is lost (a middlebox that forgot the connection); then
    # Redis cannot be reached for a while. The repair that gets through at last must find the
    # call's key: if it has expired (it was set when the call ran, a deadline before the
    # failure, and the repairs went on for as long as its TTL after the failure), the repair
    # cannot tell a call that ran from one that never came, and applies the settlement again
    # (the tokens counted twice, and another request's reservation released). Shortened here:
    # the call key lives 1.2 s (timeout 0.3 s x 4), repairs every 0.1 s.
    monkeypatch.setattr(redis_store, "CALL_KEY_MIN_MS", 1000)
    monkeypatch.setattr(redis_store, "REPAIR_RETRY_SECS", 0.1)
    loop = asyncio.get_running_loop()
    store = RedisStore(proxy.url, cluster=False, timeout=0.3)
    await store.open()
    try:
        _, _, _, window = await store.reserve("tokens:{twice}", 100, 1000, 60_000)
        proxy.lose_answers = 1
        ran = loop.time()
        with pytest.raises(StoreUnavailable):
            await store.settle("tokens:{twice}", window, 100, 30)
        assert redis_server.cli("HMGET", "tokens:{twice}", "used", "reserved").split() == ["30", "0"]
        proxy.refusing = True  # the repairs fail, until the call's key is gone
        await wait_until(lambda: redis_server.cli("--scan", "--pattern", "call:*") == "", within=3.0)
        assert loop.time() - ran < 1.5, "the key expired later than its TTL: nothing was shown"
        proxy.refusing = False
        # Nothing to wait for: no repair may come. Repairs went on up to a TTL (1.2 s) after
        # the failure, which came a timeout (0.3 s) after the call ran; wait that long.
        await asyncio.sleep(ran + 0.3 + 1.2 + 0.3 - loop.time())
        assert redis_server.cli("HMGET", "tokens:{twice}", "used", "reserved").split() == ["30", "0"]
    finally:
        await store.close()


@pytest.mark.parametrize("deployment", ["redis", "cluster"])
async def test_a_redis_user_allowed_only_the_quota_and_token_keys_is_still_served(
    tmp_path: Path, deployment: str, caplog: pytest.LogCaptureFixture
) -> None:
    # A least-privilege Redis user for the keys the README names (`quota:<tenant>`,
    # `tokens:{<tenant>}`): it was served before the call keys came, and then every call was
    # refused (NOPERM on the call's own key): with QUOTA_FAIL_MODE=open every request admitted
    # and counted nowhere, with closed every request 503. The calls go without their keys
    # instead, as before them, and the log says what the user lacks.
    servers = [RedisServer(tmp_path)] if deployment == "redis" else RedisCluster(tmp_path).nodes
    try:
        for server in servers:
            assert server.cli("ACL", "SETUSER", "gateway", "on", ">pw", "~quota:*", "~tokens:*", "+@all") == "OK"
        url = f"redis://gateway:pw@127.0.0.1:{servers[0].port}/0"
        store = RedisStore(url, cluster=deployment == "cluster", timeout=1.0)
        await store.open()
        try:
            for count in (1, 2):
                assert (await store.hit("quota:acl", 60_000))[0] == count
            held, total, _, window = await store.reserve("tokens:{acl}", 100, 1000, 60_000)
            assert (held, total) == (True, 100)
            await store.settle("tokens:{acl}", window, 100, 30)
            hits, used = await asyncio.gather(
                store.hit("quota:acl", 60_000), store.reserve("tokens:{acl}", 0, 1000, 60_000)
            )
            assert (hits[0], used[1]) == (3, 30)
        finally:
            await store.close()
        assert any("call:" in record.getMessage() for record in caplog.records), "nothing said why"
    finally:
        for server in servers:
            server.stop()


async def test_a_reservation_held_by_redis_stalled_longer_than_the_call_keys_is_given_back(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Redis stalls (SIGSTOP: a paused VM, a long fork) with a reservation sent to it, for
    # longer than a call key lives: no repair reaches it meanwhile, and it runs the call when
    # it resumes. Undoing a reservation can never apply anything twice, so its repairs go on
    # (to the window's end, after which it holds nothing anyway): the first one after the
    # stall gives it back. They stopped with the call key's TTL: the tenant lost the estimate
    # to the window's end. Shortened: call keys live 1.2 s, repairs every 0.1 s.
    import signal

    monkeypatch.setattr(redis_store, "CALL_KEY_MIN_MS", 1000)
    monkeypatch.setattr(redis_store, "REPAIR_RETRY_SECS", 0.1)
    store = RedisStore(redis_server.url, cluster=False, timeout=0.3)
    await store.open()
    assert redis_server.process is not None
    try:
        await store.hit("quota:long", 60_000)  # connected, the script loaded
        redis_server.process.signal(signal.SIGSTOP)
        try:
            with pytest.raises(StoreUnavailable):
                await store.reserve("tokens:{long}", 100, 1000, 60_000)
            await asyncio.sleep(2.0)  # the stall, past the call key's TTL and the repairs of old
        finally:
            redis_server.process.signal(signal.SIGCONT)
        await wait_until(lambda: redis_server.cli("HGET", "tokens:{long}", "window") != "", within=3.0)  # it ran
        await wait_until(lambda: redis_server.cli("HGET", "tokens:{long}", "reserved") == "0", within=3.0)
    finally:
        await store.close()


async def test_repairs_waiting_through_a_long_outage_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    # Redis out of reach and a day's token window: each failed reservation's undo goes again
    # every second for a day, so through a long outage the repairs (and the work of sending them
    # every second) grew with it. Past MAX_REPAIRS a failed call goes unrepaired, as before
    # repairs existed. Counted: the distinct repairs sent, while every one of them fails.
    monkeypatch.setattr(redis_store, "REPAIR_RETRY_SECS", 0.05)
    monkeypatch.setattr(redis_store, "MAX_REPAIRS", 5)
    sent: set[str] = set()
    original = RedisStore._send_repair

    def counted(self: RedisStore, key: str, repair: str, give_up: float) -> None:
        sent.add(repair)
        original(self, key, repair, give_up)

    monkeypatch.setattr(RedisStore, "_send_repair", counted)
    store = RedisStore(f"redis://127.0.0.1:{free_port()}/0", cluster=False, timeout=0.05)  # nothing listens
    await store.open()
    try:
        for _ in range(40):  # one failed call each, a reservation in a day's window
            with pytest.raises(StoreUnavailable):
                await store.reserve("tokens:t", 10, 1000, 86_400_000)
        deadline = asyncio.get_running_loop().time() + 5
        while len(sent) < 5 and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.3)  # six retry periods more: any repair past the bound would have gone
        assert len(sent) == 5
    finally:
        await store.close()
