"""Quota storage: the `QuotaStore` protocol, the choice of backend from the URL, and the guard
that applies the fail mode when the store is down."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Awaitable, Callable
from typing import ParamSpec, Protocol, TypeVar

from ..errors import KeyUnavailable, StoreUnavailable

T = TypeVar("T")
P = ParamSpec("P")

# Token amounts a store is given stay below this: far beyond any real budget, and exact in
# Lua's numbers (doubles, exact to 2^53) and in Redis' 64-bit integers whatever is added up.
MAX_TOKENS = 10**15

# A reservation's answer: (held?, used + reserved afterwards, ms until the window ends, the window's id).
Held = tuple[bool, int, int, str]


# A fresh BLAKE2b of 16 bytes, copied for each key: the constructor's parsing of its keyword
# arguments cost a quarter of a short key's digest (~4.9k instructions a call, ~3.7k copied).
_BLAKE2B_16 = hashlib.blake2b(digest_size=16)


def digest(key: str) -> bytes:
    """A fixed-size stand-in for a key in the process's own tables: 16 bytes of BLAKE2b,
    whatever the key's length (2^64 keys before a collision is even likely). surrogatepass:
    any str encodes, even one decoded from a header's invalid UTF-8."""
    fresh = _BLAKE2B_16.copy()
    fresh.update(key.encode("utf-8", "surrogatepass"))
    return fresh.digest()


class QuotaStore(Protocol):
    async def hit(self, key: str, window_ms: int) -> tuple[int, int]:
        """Count one request on `key`; return (count in window, ms until the window ends).

        Increment and expiry are one atomic step. Raises errors.StoreUnavailable.
        """
        ...

    async def reserve(self, key: str, amount: int, limit: int, window_ms: int) -> Held:
        """One atomic step on the token window `key` (started, `window_ms` long, if there is
        none): hold `amount` more tokens if used + reserved + amount <= limit. Returns
        (held?, used + reserved afterwards, ms until the window ends, the window's id).

        The window's id names this window and no later one under the same key, so a settle
        that arrives after the window ended changes nothing. Raises errors.StoreUnavailable.
        """
        ...

    async def settle(self, key: str, window: str, reserved: int, used: int) -> None:
        """One atomic step: release `reserved` held tokens of window `window` and count `used`
        ones instead; nothing if that window has ended. Goes through even if the caller stops
        waiting for it. Raises errors.StoreUnavailable."""
        ...

    async def ping(self) -> bool: ...

    async def close(self) -> None: ...


class StoreGuard:
    """The fail mode, shared by every policy over one store (the request quota, the token
    budget), so that one outage is handled once.

    After a store failure the store is skipped for `retry_after_secs` (the fail mode applies
    at once instead of every request waiting out the store deadline), then tried again, so
    service resumes by itself when the store comes back. A failure of one key's part of the
    store (KeyUnavailable: a cluster master down) is that call's alone: the store skips that
    key itself, and calls on the other keys go on. `on_error` counts each failed or skipped call.
    """

    __slots__ = ("_fail_open", "_on_error", "_retry_after", "_skip_until")

    def __init__(self, fail_open: bool, on_error: Callable[[], None], retry_after_secs: float = 1.0) -> None:
        self._fail_open = fail_open
        self._on_error = on_error
        self._retry_after = retry_after_secs
        self._skip_until = 0.0

    @property
    def fail_open(self) -> bool:
        return self._fail_open

    def skip_left(self) -> float:
        """Seconds until calls try the store again (0.0: they do now)."""
        if not self._skip_until:  # no failure yet: no clock read
            return 0.0
        return max(0.0, self._skip_until - time.monotonic())

    async def call(self, operation: Callable[P, Awaitable[T]], *args: P.args, **kwargs: P.kwargs) -> T | None:
        """`operation(*args, **kwargs)`'s result; None when the store is down and the mode is
        fail-open (in fail-closed mode StoreUnavailable is raised). The arguments are passed
        apart, not in a closure: no function made per call on the request path."""
        now = time.monotonic()
        try:
            if now < self._skip_until:
                raise StoreUnavailable()
            return await operation(*args, **kwargs)
        except StoreUnavailable as error:
            # A real failure of the whole store, not a skipped call: back off.
            if now >= self._skip_until and not isinstance(error, KeyUnavailable):
                self._skip_until = time.monotonic() + self._retry_after
            self._on_error()
            if self._fail_open:
                return None
            raise


def store_from_url(url: str | None, *, cluster: bool, timeout: float) -> QuotaStore:
    # Imports written out (PyInstaller follows static imports only), and the Redis one only
    # when REDIS_URL is set: importing coredis is ~0.3 s of every start otherwise.
    if url is None:
        from .memory import MemoryStore

        return MemoryStore()
    from .redis import RedisStore

    return RedisStore(url, cluster=cluster, timeout=timeout)
