"""Quota counters and token windows in Redis or Redis Cluster, through coredis.

One Lua script does every operation, each atomically: a request counter's increment with its
expiry (no counter can ever exist without a TTL; it also repairs one that somehow lost it),
a token reservation (the window's hash created with its TTL when there is none, the check
and the hold in one step) and a token settlement. It takes any number of keys, so a batch
of operations of any kinds costs one command. Every call has a deadline; coredis errors and
timeouts become `StoreUnavailable` here, and the policies decide what that means. coredis
reconnects by itself when Redis returns.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from typing import Any

import coredis
from coredis.exceptions import RedisError

from ..errors import StoreUnavailable

# A string constant, so the frozen build needs no data files. Each key comes with five
# arguments, the first naming the operation, and each operation answers four values:
#   h  window_ms                           -> count, ms left, 0, ''
#   r  amount, limit, window_ms, new id    -> held (1/0), used + reserved, ms left, window id
#   s  window id, reserved, used           -> applied (1/0), 0, 0, ''
# A token window is a hash {used, reserved, window}. Its id is chosen by the caller that
# starts it (unique per process and call), so a settle names the window it reserved in and
# changes nothing in a later one under the same key. Nothing here raises on a key of another
# type: a reservation starts a window over it, a settlement leaves it alone. Amounts are kept
# below 2^53 by the caller; `%d` writes them back as integers (a Lua number may print as 2e+15).
OPERATIONS = """
local out = {}
local function int(n) return string.format('%d', n) end
for i, key in ipairs(KEYS) do
  local a = 5 * i - 4
  local op = ARGV[a]
  if op == 'h' then
    local count = redis.call('INCR', key)
    local ttl = redis.call('PTTL', key)
    if ttl < 0 then
      redis.call('PEXPIRE', key, ARGV[a + 1])
      ttl = tonumber(ARGV[a + 1])
    end
    out[#out + 1] = count; out[#out + 1] = ttl; out[#out + 1] = 0; out[#out + 1] = ''
  elseif op == 'r' then
    local amount, limit, window_ms = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), ARGV[a + 3]
    local held = redis.pcall('HMGET', key, 'used', 'reserved', 'window')
    local used, reserved, window = 0, 0, false
    if held.err == nil then
      used, reserved, window = tonumber(held[1]) or 0, tonumber(held[2]) or 0, held[3]
    end
    local ttl = redis.call('PTTL', key)
    if not window then
      window, used, reserved = ARGV[a + 4], 0, 0
      redis.call('DEL', key)
      redis.call('HSET', key, 'used', 0, 'reserved', 0, 'window', window)
      redis.call('PEXPIRE', key, window_ms)
      ttl = tonumber(window_ms)
    elseif ttl < 0 then
      redis.call('PEXPIRE', key, window_ms)
      ttl = tonumber(window_ms)
    end
    local ok = 0
    if used + reserved + amount <= limit then
      reserved = reserved + amount
      redis.call('HSET', key, 'reserved', int(reserved))
      ok = 1
    end
    out[#out + 1] = ok; out[#out + 1] = used + reserved; out[#out + 1] = ttl; out[#out + 1] = window
  else
    local held = redis.pcall('HMGET', key, 'used', 'reserved', 'window')
    local applied = 0
    if held.err == nil and held[3] == ARGV[a + 1] then
      local reserved = math.max((tonumber(held[2]) or 0) - tonumber(ARGV[a + 2]), 0)
      local used = math.min((tonumber(held[1]) or 0) + tonumber(ARGV[a + 3]), 2000000000000000)
      redis.call('HSET', key, 'used', int(used), 'reserved', int(reserved))
      applied = 1
    end
    out[#out + 1] = applied; out[#out + 1] = 0; out[#out + 1] = 0; out[#out + 1] = ''
  end
end
return out
"""
Operation = tuple[str, tuple[str | int, ...], "asyncio.Future[list[Any]]"]  # key, 5 arguments, answer


class RedisStore:
    """Operations go to Redis in batches, one batch out at a time (group commit).

    coredis' per-command work is the costly part (~450 µs of CPU a round trip on the bench
    machine, against a few µs in Redis), so a batch is one script call with every key on a
    single Redis, whatever mix of request hits, reservations and settlements it holds. A lone
    operation goes out at the end of its loop turn; operations that arrive while a batch is
    out wait for it and then go together, so batches grow with the load instead of the round
    trips, and one process's operations reach Redis in the order they were made. On a cluster
    the keys may live on different nodes, so each key gets its own call in one
    non-transactional pipeline, which coredis splits by node."""

    def __init__(self, url: str, *, cluster: bool, timeout: float) -> None:
        # Skip coredis' per-call argument checks: our script and PING are fixed and typed.
        coredis.Config.optimized = True
        client_cls: Any = coredis.RedisCluster if cluster else coredis.Redis
        self._client = client_cls.from_url(url, stream_timeout=timeout, connect_timeout=timeout, decode_responses=False)
        self._cluster = cluster
        self._timeout = timeout
        self._script = self._client.register_script(OPERATIONS)
        self._pending: list[Operation] = []
        self._out: asyncio.Task[None] | None = None  # the batch Redis is working on
        self._open = False
        # Ids for the token windows this process starts: unique across processes and restarts.
        self._window_prefix = os.urandom(6).hex()
        self._window_counter = itertools.count(1)

    async def open(self) -> None:
        """Enter coredis' pool (it connects lazily, so this works while Redis is down)."""
        await self._client.__aenter__()
        self._open = True

    async def close(self) -> None:
        if self._open:
            self._open = False
            await self._client.__aexit__(None, None, None)

    async def hit(self, key: str, window_ms: int) -> tuple[int, int]:
        answer = await self._run(key, ("h", window_ms, 0, 0, ""))
        return int(answer[0]), max(1, int(answer[1]))

    async def reserve(self, key: str, amount: int, limit: int, window_ms: int) -> tuple[bool, int, int, str]:
        new_id = f"{self._window_prefix}{next(self._window_counter):x}"
        answer = await self._run(key, ("r", amount, limit, window_ms, new_id))
        window: str | bytes = answer[3]
        window = window.decode() if type(window) is bytes else str(window)
        return answer[0] == 1, int(answer[1]), max(1, int(answer[2])), window

    async def settle(self, key: str, window: str, reserved: int, used: int) -> None:
        # Shielded: a caller that stops waiting (its client gone) still has its tokens settled.
        await self._run(key, ("s", window, reserved, used, ""), shielded=True)

    async def _run(self, key: str, arguments: tuple[str | int, ...], shielded: bool = False) -> list[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Any]] = loop.create_future()
        if not self._pending and self._out is None:  # nothing waiting, nothing out: go after this turn
            loop.call_soon(self._send_batch)
        self._pending.append((key, arguments, future))
        if shielded:
            future.add_done_callback(_retrieved)  # its waiter may be gone: no "never retrieved" log
        try:
            async with asyncio.timeout(self._timeout):
                return await (asyncio.shield(future) if shielded else future)
        except TimeoutError as exc:
            raise StoreUnavailable() from exc

    def _send_batch(self) -> None:
        # An operation whose caller gave up waiting (deadline, client gone) is not sent:
        # a hit is not counted, a reservation not held. A settlement is shielded: it goes.
        batch = [operation for operation in self._pending if not operation[2].done()]
        self._pending = []
        if batch:
            self._out = asyncio.get_running_loop().create_task(self._run_batch(batch))
            self._out.add_done_callback(self._batch_done)

    def _batch_done(self, task: asyncio.Task[None]) -> None:
        self._out = None
        if self._pending:
            self._send_batch()

    async def _run_batch(self, batch: list[Operation]) -> None:
        try:
            # Its own deadline too: the next batch waits for this one, so it must end.
            async with asyncio.timeout(self._timeout):
                if not self._cluster or len(batch) == 1:
                    keys = [key for key, _, _ in batch]
                    arguments = [argument for _, each, _ in batch for argument in each]
                    flat: list[Any] = await self._script(keys=keys, args=arguments)
                else:
                    async with self._client.pipeline(transaction=False) as pipe:
                        calls = [self._script(keys=[key], args=list(each), client=pipe) for key, each, _ in batch]
                    flat = [value for call in calls for value in await call]
        except (TimeoutError, RedisError, OSError, RuntimeError):
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(StoreUnavailable())
            return
        for i, (_, _, future) in enumerate(batch):
            if not future.done():  # its request may have been cancelled (client gone, deadline)
                future.set_result(flat[4 * i : 4 * i + 4])

    async def ping(self) -> bool:
        try:
            async with asyncio.timeout(self._timeout):
                await self._client.ping()
        except (TimeoutError, RedisError, OSError, RuntimeError):
            return False
        return True


def _retrieved(future: asyncio.Future[list[Any]]) -> None:
    if not future.cancelled():
        future.exception()
