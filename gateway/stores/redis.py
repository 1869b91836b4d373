"""Quota counters and token windows in Redis or Redis Cluster, through coredis.

One Lua script does every operation, each atomically: a request counter's increment with its
expiry (no counter can ever exist without a TTL; it also repairs one that somehow lost it),
a token reservation (the window's hash created with its TTL when there is none, the check
and the hold in one step) and a token settlement. It takes any number of keys, so a batch
of operations of any kinds costs one command. Every call has a deadline; coredis errors and
timeouts become `StoreUnavailable` here, and the policies decide what that means. coredis
reconnects by itself when Redis returns.

Each call also carries a key of its own, kept a few seconds with its answers: a call that
coredis sends again (its connection broke after Redis ran it) answers as it did and changes
nothing, and a call that failed can be repaired afterwards, whether Redis ran it, runs it
late or never got it (RedisStore._marked, RedisStore._repair).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import unquote, urlsplit

import coredis
from coredis.exceptions import AuthorizationError, ClusterDownError, NoScriptError, RedisError
from coredis.exceptions import ConnectionError as RedisConnectionError
from coredis.retry import CompositeRetryPolicy, ConstantRetryPolicy

from ..errors import KeyUnavailable, StoreUnavailable
from ..tls import redis_url_verified
from . import Held

log = logging.getLogger("gateway")

# After the pool's connections are dropped for a timeout, the next timeouts keep them for this
# many timeouts (see RedisStore._drop_connections).
DROP_INTERVAL_TIMEOUTS = 4

# How long a call's key (RedisStore._marked) is kept: coredis sends a call again within the
# call's deadline, but a Redis that stalls between the two runs them further apart.
CALL_KEY_MIN_MS = 10_000
# A failed call's repair (RedisStore._repair) goes this long after the failure, and again as long
# after each failure of its own.
REPAIR_RETRY_SECS = 1.0
# Repairs waiting at once, at most. Each goes again every REPAIR_RETRY_SECS while Redis is out of
# reach, an undo for as long as its token window (TOKEN_WINDOW_SECS: a day, say): through a long
# outage their number would grow with it, and the work of sending them all every second too.
# Past this many, a failed call is not repaired (its reservations are held to the window's end),
# as before repairs existed.
MAX_REPAIRS = 10_000

REPORT_EVERY_SECS = 60.0  # an outage logged at most once a minute after its first failure (_report)

# On a cluster, a key whose call failed fails at once for this long, then is tried again
# (StoreGuard's second, for one key: its master may be silent, and no batch waits it out again).
KEY_RETRY_SECS = 1.0
# Keys failing at once are forgotten past their second when there are more than this many.
KEYS_FAILING_MAX = 1024

# A string constant, so the frozen build needs no data files. Each operation is one argument,
# the operation and its operands separated by spaces, takes one key and answers one string of
# numbers (coredis' work per argument and per reply element is the costly part):
#   "h window_ms"                           -> "count ms_left"
#   "r amount limit window_ms new_id"       -> "held(1/0) used+reserved ms_left window_id"
#   "s window_id reserved used"             -> "applied(1/0)"
#   "u index amount ttl_ms call_key"        -> "released(1/0)"
#   "v index window_id reserved used ttl_ms call_key" -> "applied(1/0)"
# A token window is a hash {used, reserved, window}. Its id is chosen by the caller that
# starts it (unique per process and call), so a settle names the window it reserved in and
# changes nothing in a later one under the same key. Nothing here raises on a key of another
# type: a reservation starts a window over it, a settlement leaves it alone. Amounts are kept
# below 2^53 by the caller; `%d` writes them as integers (a Lua number may print as 2e+15).
# A call may end with "d ttl_ms" and one more key, the call's own (see RedisStore._marked): a
# call that key shows has run already answers what it answered then and changes nothing.
# "u" and "v" repair the operation at `index` of a call that failed (see RedisStore._repair).
# Not run yet, the call's key is set to "u" (the call changes nothing when it comes), and the
# indexes of the settlements applied since follow it ("u,2,5"). "u" undoes a reservation: one
# that ran is released and noted so in the call's answers. "v" applies a settlement once:
# unless the call ran, or it is noted after "u".
OPERATIONS = """
local function hit(key, window_ms)
  local count = redis.call('INCR', key)
  local ttl = redis.call('PTTL', key)
  if ttl < 0 then
    redis.call('PEXPIRE', key, window_ms)
    ttl = tonumber(window_ms)
  end
  return count, string.format('%d %d', count, ttl)
end
local function reserve(key, amount, limit, window_ms, new_id)
  amount, limit = tonumber(amount), tonumber(limit)
  local held = redis.pcall('HMGET', key, 'used', 'reserved', 'window')
  local used, reserved, window = 0, 0, false
  if held.err == nil then
    used, reserved, window = tonumber(held[1]) or 0, tonumber(held[2]) or 0, held[3]
  end
  local ttl = redis.call('PTTL', key)
  if not window then
    window, used, reserved = new_id, 0, 0
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
    redis.call('HSET', key, 'reserved', string.format('%d', reserved))
    ok = 1
  end
  return string.format('%d %d %d ', ok, used + reserved, ttl) .. window
end
local function settle(key, window, reserved, used)
  local held = redis.pcall('HMGET', key, 'used', 'reserved', 'window')
  if held.err == nil and held[3] == window then
    reserved = math.max((tonumber(held[2]) or 0) - tonumber(reserved), 0)
    used = math.min((tonumber(held[1]) or 0) + tonumber(used), 2000000000000000)
    redis.call('HSET', key, 'used', string.format('%d', used), 'reserved', string.format('%d', reserved))
    return '1'
  end
  return '0'
end
local function cancelled(call, ttl_ms)
  local before = redis.call('GET', call)
  if not before then
    redis.call('SET', call, 'u', 'PX', ttl_ms)
    return 'u'
  end
  return before
end
local function undo(key, index, amount, ttl_ms, call)
  local before = cancelled(call, ttl_ms)
  if string.sub(before, 1, 1) == 'u' then
    return '0'
  end
  local answers = {}
  for answer in string.gmatch(before, '[^,]+') do answers[#answers + 1] = answer end
  local answer = answers[tonumber(index)]
  if not answer or string.sub(answer, 1, 2) ~= '1 ' then
    return '0'
  end
  answers[tonumber(index)] = '0' .. string.sub(answer, 2)
  redis.call('SET', call, table.concat(answers, ','), 'KEEPTTL')
  return settle(key, string.match(answer, '(%S+)$'), amount, 0)
end
local function redo(key, index, window, reserved, used, ttl_ms, call)
  local before = cancelled(call, ttl_ms)
  if string.sub(before, 1, 1) ~= 'u' or string.find(before .. ',', ',' .. index .. ',', 1, true) then
    return '0'
  end
  redis.call('SET', call, before .. ',' .. index, 'KEEPTTL')
  return settle(key, window, reserved, used)
end
local ops, done = #ARGV, false
if string.sub(ARGV[ops], 1, 2) == 'd ' then
  done, ops = KEYS[ops], ops - 1
  local before = redis.call('GET', done)
  if before then
    local out = {}
    for answer in string.gmatch(before, '[^,]+') do out[#out + 1] = answer end
    return out
  end
end
local out = {}
for i = 1, ops do
  local arg = ARGV[i]
  local f = {}
  for word in string.gmatch(arg, '%S+') do f[#f + 1] = word end
  local op, key = f[1], KEYS[i]
  if op == 'h' then
    local _, answer = hit(key, f[2])
    out[i] = answer
  elseif op == 'r' then
    out[i] = reserve(key, f[2], f[3], f[4], f[5])
  elseif op == 'u' then
    out[i] = undo(key, f[2], f[3], f[4], string.match(arg, '^u %S+ %S+ %S+ (.*)$'))
  elseif op == 'v' then
    out[i] = redo(key, f[2], f[3], f[4], f[5], f[6], string.match(arg, '^v %S+ %S+ %S+ %S+ %S+ (.*)$'))
  else
    out[i] = settle(key, f[2], f[3], f[4])
  end
end
if done then
  redis.call('SET', done, table.concat(out, ','), 'PX', string.sub(ARGV[#ARGV], 3))
end
return out
"""

# key, operation, its answer's numbers, and whether it goes even if its waiter has left
Operation = tuple[str, str, "asyncio.Future[list[bytes]]", bool]


class RedisStore:
    """Operations go to Redis in batches, one batch out at a time (group commit).

    coredis' per-command work is the costly part (~450 µs of CPU a round trip on the bench
    machine, against a few µs in Redis), so a batch is one script call with every key on a
    single Redis, whatever mix of request hits, reservations and settlements it holds. A lone
    operation goes out at the end of its loop turn; operations that arrive while a batch is
    out wait for it and then go together, so batches grow with the load instead of the round
    trips, and one process's operations reach Redis in the order they were made. On a cluster
    the keys may live on different masters, so each key's operations are a call of their own,
    all sent at once, each answered or failed alone (see _run_on_cluster).

    Deadlines are the batches': a batch must be answered `timeout` after its first operation
    was made, so no operation waits longer than that (a later one of the same batch may be
    failed sooner: when a batch fails, the guard backs every caller off the store anyway), and
    an operation needs no timer of its own. A batch out is always answered within its deadline,
    which is no later than that of the next batch, so a batch never starts late."""

    def __init__(self, url: str, *, cluster: bool, timeout: float) -> None:
        # Skip coredis' per-call argument checks: our script and PING are fixed and typed.
        coredis.Config.optimized = True
        # decode_components: a percent-encoded user name or password (`redis://:p%40ss@host`, as the
        # README says to write one) reaches AUTH decoded; coredis sent it as written by default.
        options: dict[str, Any] = {
            "stream_timeout": timeout,
            "connect_timeout": timeout,
            "decode_responses": False,
            "decode_components": True,
        }
        url = redis_url_verified(url, cluster=cluster)  # rediss://: its host name checked, its CAs found
        if cluster:
            # coredis' cluster default, less two things: a call that timed out is not sent again
            # (the batch's deadline, as long as the timeout, has passed by then), and a connection
            # error is retried at once (a master that refuses connections fails its calls in a
            # few ms, not 200). Those retries stay: they report the failures that make coredis
            # read the cluster's layout again, so the keys of a failed master reach the replica
            # promoted in its place (without them they never did). CLUSTERDOWN, from a master
            # still joining, is worth the default's waits (without them the first call on a new
            # cluster failed at times).
            retries = CompositeRetryPolicy(
                ConstantRetryPolicy((ClusterDownError,), retries=2, delay=0.1),
                ConstantRetryPolicy((RedisConnectionError,), retries=2, delay=0),
            )
            self._client: Any = coredis.RedisCluster.from_url(url, retry_policy=retries, **options)
        else:
            self._client = coredis.Redis.from_url(url, **options)
        self._cluster = cluster
        self._timeout = timeout
        self._script = self._client.register_script(OPERATIONS)
        self._pending: list[Operation] = []
        self._deadline = 0.0  # the pending batch's: `timeout` after its first operation
        self._out: asyncio.Task[None] | None = None  # the batch Redis is working on
        self._open = False
        self._kept_until = 0.0  # the loop's time before which a timeout drops no connection (see _drop_connections)
        self._failing: dict[str, float] = {}  # cluster: key -> the loop's time until which its calls fail at once
        # The outage log (`_report`): when a failure was last logged (0.0: none since the last
        # answer), and the password, never to be logged even if an error quotes it.
        self._reported_at = 0.0
        password = urlsplit(url).password
        self._secrets = tuple({password, unquote(password)}) if password else ()
        # Ids for the token windows this process starts: unique across processes and restarts.
        self._window_prefix = os.urandom(6).hex()
        self._window_counter = itertools.count(1)
        self._call_counter = itertools.count(1)
        self._call_ttl_ms = max(CALL_KEY_MIN_MS, math.ceil(4000 * timeout))
        self._call_ttl = f"d {self._call_ttl_ms}"
        self._marking = True  # False once Redis has refused this user the call keys (see _refused)
        self._repairs = 0  # repairs waiting or out (MAX_REPAIRS)

    async def open(self) -> None:
        """Enter coredis' pool. A single Redis is connected lazily, so this works while it is
        down; a cluster's layout is read here: StoreUnavailable when no node gives it."""
        try:
            await self._client.__aenter__()
        except Exception as exc:  # coredis' errors, or the socket's (no node answered)
            cause = exc.__cause__
            reason = f"{exc} ({cause})" if isinstance(cause, RedisError) else str(exc)
            raise StoreUnavailable(" ".join(reason.split()) or type(exc).__name__) from None
        self._open = True

    async def close(self) -> None:
        if self._open:
            self._open = False
            await self._client.__aexit__(None, None, None)

    async def hit(self, key: str, window_ms: int) -> tuple[int, int]:
        count, ttl = await self._run(key, f"h {window_ms}")
        return int(count), max(1, int(ttl))

    async def reserve(self, key: str, amount: int, limit: int, window_ms: int) -> Held:
        new_id = f"{self._window_prefix}{next(self._window_counter):x}"
        return _held(await self._run(key, f"r {amount} {limit} {window_ms} {new_id}"))

    async def settle(self, key: str, window: str, reserved: int, used: int) -> None:
        if not (window.isascii() and window.isalnum()):  # ids are hex: nothing else names a window
            return
        # Sent even if the caller stops waiting (its client gone): its tokens are settled all the same.
        await self._run(key, f"s {window} {reserved} {used}", True)

    def _run(self, key: str, operation: str, goes: bool = False) -> asyncio.Future[list[bytes]]:
        """The operation's answer, to await: its numbers, or StoreUnavailable."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[bytes]] = loop.create_future()
        if not self._pending:
            self._deadline = loop.time() + self._timeout
            if self._out is None:  # nothing out: go after this turn
                loop.call_soon(self._send_batch)
        self._pending.append((key, operation, future, goes))
        return future

    def _send_batch(self) -> None:
        # An operation whose caller gave up waiting (client gone, a deadline of its own) is
        # not sent: a hit is not counted, a reservation not held. A settlement goes all the same.
        batch = [operation for operation in self._pending if operation[3] or not operation[2].done()]
        self._pending = []
        if batch:
            self._out = asyncio.get_running_loop().create_task(self._run_batch(batch, self._deadline))
            self._out.add_done_callback(self._batch_done)

    def _batch_done(self, task: asyncio.Task[None]) -> None:
        self._out = None
        if self._pending:
            self._send_batch()

    async def _run_batch(self, batch: list[Operation], deadline: float) -> None:
        if self._cluster:
            await self._run_on_cluster(batch, deadline)
            return
        answers: list[Any] | None = None
        call = self._marked([operation[0] for operation in batch], [operation[1] for operation in batch], "")
        try:
            async with asyncio.timeout_at(deadline):
                try:
                    answers = await self._evalsha(*call)
                except AuthorizationError:
                    answers = await self._refused(call, self._evalsha)
        except TimeoutError:
            answers = None
            self._drop_connections()
            self._report(f"no answer within STORE_TIMEOUT_MS ({round(self._timeout * 1000)} ms)")
        except (RedisError, OSError, RuntimeError) as exc:
            answers = None
            self._report(exc)
        finally:
            # Every waiter hears back, whatever happened here (this task cancelled included):
            # no operation has a timer of its own.
            self._answer(batch, answers, call, StoreUnavailable)
        if self._reported_at and answers is not None:
            self._reported_at = 0.0
            log.info("quota store: Redis answers again")

    async def _run_on_cluster(self, batch: list[Operation], deadline: float) -> None:
        """A batch on a cluster: each key's operations in one call (one key, one slot), the
        calls all sent at once, each answered or failed alone. A master that is down fails
        the operations on its keys and no others (KeyUnavailable: the guard does not skip the
        store for the other keys). A pipeline spanning the masters failed whole after some of
        them had run their part (so requests on live masters were refused, yet counted), and
        coredis first asked every master, a dead one included, whether it had the script."""
        by_key: dict[str, list[Operation]] = {}
        for operation in batch:
            by_key.setdefault(operation[0], []).append(operation)
        try:
            async with asyncio.timeout_at(deadline):
                if len(by_key) == 1:
                    await self._run_key(batch[0][0], batch)
                else:
                    await asyncio.gather(*(self._run_key(key, operations) for key, operations in by_key.items()))
        except TimeoutError:  # the calls not answered by then have failed (cancelled: see _run_key)
            # Nothing else of ours is out (one batch at a time): dropping every master's
            # connections cuts no call short, and the next batch connects afresh.
            self._drop_connections()

    async def _run_key(self, key: str, operations: list[Operation]) -> None:
        answers: list[Any] | None = None
        call = self._marked([key] * len(operations), [operation[1] for operation in operations], key)
        failing = self._failing
        now = asyncio.get_running_loop().time()
        try:
            if failing and failing.get(key, 0.0) > now:
                return  # failed in the last KEY_RETRY_SECS: fails at once (never sent: repaired as one)
            try:
                answers = await self._evalsha_on_cluster(*call)
            except AuthorizationError:
                answers = await self._refused(call, self._evalsha_on_cluster)
        except (RedisError, OSError, RuntimeError) as exc:
            answers = None
            self._report(exc, key)
        finally:  # cancelled at the batch's deadline included
            if answers is None or len(answers) != len(operations):
                if key not in failing or failing[key] <= now:
                    if len(failing) >= KEYS_FAILING_MAX:
                        self._failing = failing = {k: until for k, until in failing.items() if until > now}
                    failing[key] = now + KEY_RETRY_SECS
            elif failing:
                failing.pop(key, None)
            self._answer(operations, answers, call, KeyUnavailable)

    def _report(self, failure: BaseException | str, key: str | None = None) -> None:
        """Log a failed call: the first of an outage, then at most one a minute (the metric
        `cb_events_total{event="store_error"}` counts every one). On one Redis, the first
        answer after is logged too; on a cluster a master down fails some keys while others
        answer, so only failures are."""
        now = time.monotonic()
        if self._reported_at and now - self._reported_at < REPORT_EVERY_SECS:
            return
        self._reported_at = now
        reason = failure if isinstance(failure, str) else f"{type(failure).__name__}: {failure}"
        if isinstance(failure, RedisConnectionError) and isinstance(failure.__cause__, OSError):
            # Why it could not connect (a refused connection, a certificate that fails
            # verification or names another host): coredis' own words say only that it could not.
            reason += f" ({failure.__cause__})"
        reason = " ".join(reason.split())[:300]
        for secret in self._secrets:
            reason = reason.replace(secret, "***")
        where = f" (key {key!r}'s master)" if key is not None else ""
        log.warning("quota store: Redis call failed%s: %s", where, reason)

    def _answer(
        self,
        batch: list[Operation],
        answers: list[Any] | None,
        call: tuple[list[str], list[str]],
        failure: type[StoreUnavailable],
    ) -> None:
        """Every waiter of one call hears back: its numbers, or `failure` (and the call is
        repaired)."""
        if answers is None or len(answers) != len(batch):
            for _, _, future, _ in batch:
                if not future.done():
                    future.set_exception(failure())
            self._repair(batch, call)
        else:
            for (key, operation, future, _), answer in zip(batch, answers, strict=True):
                if not future.done():
                    future.set_result(answer.split())
                elif operation.startswith("r "):  # its caller left while it was out
                    self._release(key, operation, answer)

    def _marked(self, keys: list[str], args: list[str], slot_key: str) -> tuple[list[str], list[str]]:
        """The call's keys and arguments with a key of its own, which the script sets to its
        answers (with a TTL). A connection that breaks after Redis ran a call and before its
        answer came back makes coredis send it again (as it must when the connection had died
        before the call went out): run twice, a hit would count twice, a reservation hold
        twice, a settlement apply twice. On a single Redis the key names no tenant; on a
        cluster it carries `slot_key`'s hash part (shown by that key already) to share its
        slot, and a key whose slot no hash tag can name goes unmarked. Costs Redis a GET and
        a SET per call, the client one key and one argument."""
        if not self._marking:
            return keys, args
        call = f"call:{self._window_prefix}{next(self._call_counter):x}"
        if self._cluster:
            part = _hash_part(slot_key)
            if "}" in part:
                return keys, args
            call = "{" + part + "}" + call
        return [*keys, call], [*args, self._call_ttl]

    def _repair(self, batch: list[Operation], call: tuple[list[str], list[str]]) -> None:
        """The token operations of a call that failed, repaired. Their callers were told the
        store was unavailable, but Redis may have run the call (its answer late or lost),
        may still run it (a stalled Redis runs what it was sent when it resumes), or may
        never get it (a connection dropped). A reservation must then hold nothing (its
        caller was admitted holding nothing, or refused: nobody would settle it, and the
        tenant lost it to the window's end) and a settlement must apply once. Each repair
        goes in a later call, REPAIR_RETRY_SECS after the failure and again as long after
        each failure of its own, while the call's key surely lives; it cancels the call if
        it has not run (its hits then go uncounted, as those of a call never sent).

        A repair that finds no key takes the call for one that never ran: after the key has
        expired it would apply a settlement the call applied already. The key lives its TTL
        from the call's run, which may be as early as a timeout before the failure, and a
        repair runs up to a timeout after it is sent: so the last one goes two timeouts and
        a retry's wait before the TTL has passed since the failure. (It went up to the TTL:
        a settlement whose answer was lost, with Redis out of reach until then, was applied
        twice.)"""
        keys, args = call
        if not self._open or not self._marking or args[-1] is not self._call_ttl:  # unmarked: nothing to know it by
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        give_up = now + self._call_ttl_ms / 1000 - 2 * self._timeout - REPAIR_RETRY_SECS
        for position, (key, operation, _, _) in enumerate(batch):
            kind = operation[:2]
            if kind not in ("r ", "s "):
                continue
            index = position + 1
            if kind == "r ":
                _, amount, _, window_ms, _ = operation.split(" ")
                repair = f"u {index} {amount} {self._call_ttl_ms} {keys[-1]}"
                # An undo applies nothing twice, whenever it comes: it goes on while what the
                # call may hold lasts, so that a Redis stalled past the key's TTL, which runs
                # the call when it resumes, gives it back then (they stopped with the key).
                until = max(give_up, now + int(window_ms) / 1000)
            else:
                repair = f"v {index} {operation[2:]} {self._call_ttl_ms} {keys[-1]}"
                until = give_up
            if self._repairs >= MAX_REPAIRS:
                continue
            self._repairs += 1
            # Not at once: the store that just failed is most likely still failing (a stall),
            # and the guard keeps the requests off it for as long.
            loop.call_later(REPAIR_RETRY_SECS, self._send_repair, key, repair, until)

    def _send_repair(self, key: str, repair: str, give_up: float) -> None:
        if not self._open or not self._marking:
            self._repairs -= 1
            return
        sent = self._run(key, repair, True)
        sent.add_done_callback(functools.partial(self._repaired, key, repair, give_up))

    def _repaired(self, key: str, repair: str, give_up: float, sent: asyncio.Future[list[bytes]]) -> None:
        if not sent.cancelled() and sent.exception() is not None:
            loop = asyncio.get_running_loop()
            if loop.time() + REPAIR_RETRY_SECS < give_up:
                loop.call_later(REPAIR_RETRY_SECS, self._send_repair, key, repair, give_up)
                return
        self._repairs -= 1  # done: applied, or given up

    def _release(self, key: str, operation: str, answer: bytes) -> None:
        """A reservation whose caller left while it was out (client gone): what it held
        goes back, as the settle of a request that used nothing would give it back."""
        held, _, _, window = answer.split()
        if held == b"1":
            amount = operation.split(" ", 2)[1]
            release = self._run(key, f"s {window.decode()} {amount} 0", True)
            release.add_done_callback(_retrieved)  # nobody waits for it

    async def _refused(
        self, call: tuple[list[str], list[str]], send: Callable[[list[str], list[str]], Awaitable[Any]]
    ) -> Any:
        """A call Redis refused its user (NOPERM), sent again without its key when it had one.
        Redis checks a script's keys before it runs it: the refused call ran nothing. A user
        allowed the keys the README named before the call keys (`quota:*`, `tokens:*`) was
        served, and was then refused every call (fail-open: quotas enforced nowhere; closed:
        every request 503). If the call goes through without its key, no call carries one
        from then on: served as before the keys, without what they give."""
        keys, args = call
        if args[-1] is not self._call_ttl:
            raise  # refused without a call key: the user lacks more than those (the error being handled)
        answers = await send(keys[:-1], args[:-1])
        if self._marking:
            self._marking = False
            log.warning(
                "the Redis user may not use the store's call keys (call:*, on a cluster {...}call:*): "
                "calls go without them, so one that coredis sends again after a broken connection "
                "counts twice, and a failed call's reservations and settlements are not repaired; "
                "allow the user those keys (ACL ~call:* ~{*) and restart"
            )
        return answers

    async def _evalsha(self, keys: list[str], args: list[str]) -> Any:
        """The script by its digest, loaded first if Redis does not have it (a restarted or
        flushed server). Script's own call does the same, but builds a retrying request per
        call: ~140k instructions a batch (callgrind), a sixth of coredis' whole round trip."""
        client, sha = self._client, self._script.sha
        try:
            return await client.evalsha(sha, keys, args)
        except NoScriptError:
            await client.script_load(OPERATIONS)
            return await client.evalsha(sha, keys, args)

    async def _evalsha_on_cluster(self, keys: list[str], args: list[str]) -> Any:
        """The script by its digest on the master holding `keys` (one slot). One that lacks it
        (restarted, or a replica just promoted) gets it from EVAL, sent to that master alone:
        SCRIPT LOAD goes to every master, and fails while any of them is down."""
        try:
            return await self._client.evalsha(self._script.sha, keys, args)
        except NoScriptError:
            return await self._client.eval(OPERATIONS, keys, args)

    async def ping(self) -> bool:
        try:
            async with asyncio.timeout(self._timeout):
                await self._client.ping()  # on a cluster: every master
        except TimeoutError:
            self._drop_connections()
        except (RedisError, OSError, RuntimeError):
            pass
        else:
            return True
        if not self._cluster:
            return False
        # Up while any master answers: one that is down fails its own keys only, and a gateway
        # taken out of service for it would serve the other masters' tenants no better.
        return any(await asyncio.gather(*(self._ping_one(master) for master in self._client.primaries)))

    async def _ping_one(self, master: Any) -> bool:
        """One master, on a client of its own (coredis' cluster PING needs every master)."""
        try:
            async with asyncio.timeout(self._timeout), master:
                await master.ping()
        # A client that cannot connect raises its error grouped (an anyio task group).
        except (TimeoutError, RedisError, OSError, RuntimeError, ExceptionGroup):
            return False
        return True

    def _drop_connections(self) -> None:
        """After a call that got no answer in time. coredis keeps the connection, and the
        answer it still waits for there: on a connection that went silent (a NAT or load
        balancer that forgot it, with no reset), every later call would time out behind it for
        ever. The next call connects afresh; a late answer on the old one is lost, as its
        callers were already told the store was unavailable.

        At most once in DROP_INTERVAL_TIMEOUTS timeouts (a second at least): a fresh
        connection costs round trips of its own (HELLO, then the call), so on a reachable Redis
        whose round trip is a third of the timeout or more, dropping after every timeout made
        each call connect afresh and time out again, for ever (every request 503 with
        QUOTA_FAIL_MODE=closed, where keeping the connection served them all)."""
        now = asyncio.get_running_loop().time()
        if now < self._kept_until:
            return
        self._kept_until = now + max(1.0, DROP_INTERVAL_TIMEOUTS * self._timeout)
        self._client.connection_pool.disconnect()


def _hash_part(key: str) -> str:
    """What Redis Cluster hashes of `key`: its hash tag (the text between the first `{` and the
    next `}`, when not empty), else the whole key."""
    start = key.find("{")
    if start >= 0:
        end = key.find("}", start + 1)
        if end > start + 1:
            return key[start + 1 : end]
    return key


def _held(answer: list[bytes]) -> Held:
    held, total, ttl, window = answer
    return held == b"1", int(total), max(1, int(ttl)), window.decode()


def _retrieved(future: asyncio.Future[list[bytes]]) -> None:
    if not future.cancelled():
        future.exception()  # a failed release is the store's failure, already counted: no log
