"""Quota counters in Redis or Redis Cluster, through coredis.

One Lua script increments and sets the expiry atomically, so no counter can ever exist
without a TTL (it also repairs a key that somehow lost one); it takes any number of keys,
so a batch of hits costs one command. Every
call has a deadline; coredis errors and timeouts become `StoreUnavailable` here, and the
quota policy decides what that means. coredis reconnects by itself when Redis returns.
"""

from __future__ import annotations

import asyncio
from typing import Any

import coredis
from coredis.exceptions import RedisError

from ..errors import StoreUnavailable

# A string constant, so the frozen build needs no data files.
INCREMENT_WITH_EXPIRY = """
local out = {}
for i, key in ipairs(KEYS) do
  local count = redis.call('INCR', key)
  local ttl = redis.call('PTTL', key)
  if ttl < 0 then
    redis.call('PEXPIRE', key, ARGV[i])
    ttl = tonumber(ARGV[i])
  end
  out[2 * i - 1] = count
  out[2 * i] = ttl
end
return out
"""


class RedisStore:
    """Hits go to Redis in batches, one batch out at a time (group commit).

    coredis' per-command work is the costly part (~450 µs of CPU a round trip on the bench
    machine, against a few µs in Redis), so a batch is one script call with every key on a
    single Redis. A lone hit goes out at the end of its loop turn; hits that arrive while a
    batch is out wait for it and then go together, so batches grow with the load instead of
    the round trips. On a cluster the keys may live on different nodes, so each key gets its
    own call in one non-transactional pipeline, which coredis splits by node."""

    def __init__(self, url: str, *, cluster: bool, timeout: float) -> None:
        # Skip coredis' per-call argument checks: our script and PING are fixed and typed.
        coredis.Config.optimized = True
        client_cls: Any = coredis.RedisCluster if cluster else coredis.Redis
        self._client = client_cls.from_url(url, stream_timeout=timeout, connect_timeout=timeout, decode_responses=False)
        self._cluster = cluster
        self._timeout = timeout
        self._script = self._client.register_script(INCREMENT_WITH_EXPIRY)
        self._pending: list[tuple[str, int, asyncio.Future[tuple[int, int]]]] = []
        self._out: asyncio.Task[None] | None = None  # the batch Redis is working on
        self._open = False

    async def open(self) -> None:
        """Enter coredis' pool (it connects lazily, so this works while Redis is down)."""
        await self._client.__aenter__()
        self._open = True

    async def close(self) -> None:
        if self._open:
            self._open = False
            await self._client.__aexit__(None, None, None)

    async def hit(self, key: str, window_ms: int) -> tuple[int, int]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[int, int]] = loop.create_future()
        if not self._pending and self._out is None:  # nothing waiting, nothing out: go after this turn
            loop.call_soon(self._send_batch)
        self._pending.append((key, window_ms, future))
        try:
            async with asyncio.timeout(self._timeout):
                return await future
        except TimeoutError as exc:
            raise StoreUnavailable() from exc

    def _send_batch(self) -> None:
        # A request that gave up waiting (deadline, client gone) is not counted.
        batch = [hit for hit in self._pending if not hit[2].done()]
        self._pending = []
        if batch:
            self._out = asyncio.get_running_loop().create_task(self._run_batch(batch))
            self._out.add_done_callback(self._batch_done)

    def _batch_done(self, task: asyncio.Task[None]) -> None:
        self._out = None
        if self._pending:
            self._send_batch()

    async def _run_batch(self, batch: list[tuple[str, int, asyncio.Future[tuple[int, int]]]]) -> None:
        try:
            # Its own deadline too: the next batch waits for this one, so it must end.
            async with asyncio.timeout(self._timeout):
                if not self._cluster or len(batch) == 1:
                    keys, windows = [key for key, _, _ in batch], [window_ms for _, window_ms, _ in batch]
                    flat: list[Any] = await self._script(keys=keys, args=windows)
                else:
                    async with self._client.pipeline(transaction=False) as pipe:
                        calls = [
                            self._script(keys=[key], args=[window_ms], client=pipe) for key, window_ms, _ in batch
                        ]
                    flat = [value for call in calls for value in await call]
        except (TimeoutError, RedisError, OSError, RuntimeError):
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(StoreUnavailable())
            return
        for i, (_, _, future) in enumerate(batch):
            if not future.done():  # its request may have been cancelled (client gone, deadline)
                future.set_result((int(flat[2 * i]), max(1, int(flat[2 * i + 1]))))

    async def ping(self) -> bool:
        try:
            async with asyncio.timeout(self._timeout):
                await self._client.ping()
        except (TimeoutError, RedisError, OSError, RuntimeError):
            return False
        return True
