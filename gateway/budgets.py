"""Token budgets per tenant (SPEC §14): what a request is estimated to cost, its reservation
in the store before it goes upstream, and what that reservation settles to afterwards.

Reserve and settle are each one atomic store step (stores/), so with several processes on
one store a window's budget is overrun only by requests in flight, each by what its usage
exceeds its estimate. A reservation nobody settles (a crashed process) ends with its window.
Decisions are values; middlewares.py turns them into 429s and headers.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .errors import BadRequest, StoreUnavailable
from .models import TokenDecision, Usage
from .stores import MAX_TOKENS, QuotaStore, StoreGuard

if TYPE_CHECKING:
    from .surfaces import Api

# The request's bound on its completion, by the names the APIs give it: the largest present.
MAX_TOKENS_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")
# Routes whose replies are no completion (embeddings): their texts alone are reserved.
NO_COMPLETION = frozenset({"embeddings"})
YIELD_EVERY_TEXTS = 8192  # ~5 ms of walking a body's texts between two turns of the loop


def estimate(chars: int, payload: Mapping[str, Any], reserve_default: int, completion: bool = True) -> int:
    """`chars` characters of text / 4, rounded up (once, over all the texts), plus the
    completion's bound: the request's max-tokens field, or `reserve_default` without one,
    for each of the `n` choices asked for."""
    tokens = -(-chars // 4)
    return tokens + completion_bound(payload, reserve_default) * choices(payload) if completion else tokens


def choices(payload: Mapping[str, Any]) -> int:
    """Chat's `n`: each choice is a completion of its own, up to the bound, all billed (OpenAI
    counts max_tokens times n against its own limits). Anything but a count of 1 or more: 1 (the
    upstream refuses it, or has no `n`)."""
    n = payload.get("n")
    return n if type(n) is int and n > 1 else 1


def completion_bound(payload: Mapping[str, Any], reserve_default: int) -> int:
    """The largest of the fields present: which one bounds the reply is the upstream's choice
    (OpenAI refuses max_tokens with max_completion_tokens; vLLM and SGLang take the latter), so
    max_tokens 1 beside max_completion_tokens 100000 must not hold 1."""
    bound = None
    for name in MAX_TOKENS_FIELDS:
        value = payload.get(name)
        if value is None:  # absent, or null as some clients send "not set"
            continue
        # Anything but a count (a string, -1, 1.5, true) the upstream refuses, which releases
        # the reservation: the default is held until then.
        value = value if type(value) is int and value >= 0 else reserve_default
        bound = value if bound is None or value > bound else bound
    return reserve_default if bound is None else bound


def spent(usage: Usage | None, failed: bool, status: int | None) -> int | None:
    """What a reservation settles to: the reply's usage when it is known; nothing (0) when no
    reply came (the handler raised: the upstream unreachable or timed out, or the request
    never sent) or the upstream answered with an error (it charges none); None — the
    estimate stands — otherwise (no usage reported, or the client left before the end)."""
    if usage is not None:
        return usage.prompt_tokens + usage.completion_tokens
    if failed or (status is not None and status >= 400):
        return 0
    return None


class TokenBudget:
    """Tokens per tenant per fixed window over a `QuotaStore` (the tenant's window is the
    hash `tokens:{<public id>}`: one key, so one hash slot on a cluster). A limit of 0, the
    default's or a tenant's, means no budget for that tenant."""

    __slots__ = ("_closing", "_default", "_guard", "_overrides", "_reserve_default", "_sending", "_store", "_window_ms")

    def __init__(
        self,
        store: QuotaStore,
        default_limit: int,
        overrides: Mapping[str, int],
        window_secs: int,
        reserve_default: int,
        guard: StoreGuard,
    ) -> None:
        self._store = store
        self._default = default_limit
        self._overrides = overrides
        self._window_ms = window_secs * 1000
        self._reserve_default = reserve_default
        self._guard = guard
        self._sending: set[asyncio.Future[None]] = set()  # settles held back by the guard, on their way
        self._closing = asyncio.Event()  # the app shuts down: settles held back go at once (see close)

    @property
    def enabled(self) -> bool:
        """Whether any tenant has a budget (TENANT_TOKEN_QUOTAS counts when TOKEN_QUOTA is 0)."""
        return self._default > 0 or any(limit > 0 for limit in self._overrides.values())

    def limit_for(self, tenant: str) -> int:
        return self._overrides.get(tenant, self._default)

    async def estimate(self, api: Api, payload: dict[str, Any]) -> int:
        """The request's estimate, from the texts its API's redaction reads. A body may hold
        hundreds of thousands of texts (0.1-0.3 s to walk): the loop serves others between
        slices of them."""
        # The body step has checked the body's shape (api.check_request): its texts can be found.
        chars = 0
        try:
            for count, (holder, key, _) in enumerate(api.request_texts(payload), start=1):
                chars += len(holder[key])
                if not count % YIELD_EVERY_TEXTS:
                    await asyncio.sleep(0)
        except RecursionError:
            raise BadRequest("request body is nested too deeply") from None
        tokens = estimate(chars, payload, self._reserve_default, api.name not in NO_COMPLETION)
        # Token ids are tokens already (an embeddings token array): none of them is text.
        return tokens + api.request_tokens(payload) if api.request_tokens is not None else tokens

    async def reserve(self, tenant: str, public_id: str, amount: int) -> TokenDecision | None:
        """Hold `amount` tokens of the tenant's window if they fit (the tenant must have a
        budget); None when the store is down and the mode is fail-open (nothing is held)."""
        limit = self.limit_for(tenant)
        # More than the limit can never be held: what the store is sent stays small.
        amount = min(amount, limit + 1)
        key = "tokens:{" + public_id + "}"
        held = await self._guard.call(self._store.reserve, key, amount, limit, self._window_ms)
        if held is None:
            return None
        allowed, total, reset_after_ms, window = held
        return TokenDecision(
            allowed, limit, max(0, limit - total), reset_after_ms, amount if allowed else 0, key, window
        )

    async def settle(self, decision: TokenDecision, used: int | None) -> None:
        """Replace the reservation with `used` tokens (None: the estimate stands). A store
        failure leaves the reservation to end with its window (the guard counts it)."""
        if used is None or not decision.allowed or used == decision.reserved:
            return
        store, used = self._store, min(max(used, 0), MAX_TOKENS)
        wait = self._guard.skip_left()
        if wait:
            # The guard skips the store for a while after a failure, but the store may be back
            # by its end (a 300 ms stall): a settle skipped would hold the whole estimate to the
            # window's end. It goes when the guard tries the store again, not waited for, in the
            # batch of that moment; a failure then leaves the reservation to its window, as below.
            sending = asyncio.ensure_future(self._send(wait, decision, used))
            self._sending.add(sending)  # a task the loop alone refers to may be collected mid-way
            sending.add_done_callback(self._sent)
            return
        # Fail-closed raises: the request is answered already, and over-counting is the safe side.
        with contextlib.suppress(StoreUnavailable):
            await self._guard.call(store.settle, decision.key, decision.window, decision.reserved, used)

    async def _send(self, wait: float, decision: TokenDecision, used: int) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait):
                await self._closing.wait()
        await self._store.settle(decision.key, decision.window, decision.reserved, used)

    async def close(self) -> None:
        """Before the store closes: the settles held back by the guard go now and are waited
        for (each within the store's deadline). Dropped with the process, each would hold its
        whole estimate to the window's end, on every instance sharing the store."""
        self._closing.set()
        await asyncio.gather(*self._sending, return_exceptions=True)

    def _sent(self, sending: asyncio.Future[None]) -> None:
        self._sending.discard(sending)
        if not sending.cancelled():
            sending.exception()  # a failure of the store the guard has counted already: no log
