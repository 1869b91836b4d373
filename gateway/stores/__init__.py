"""Quota storage: the `QuotaStore` protocol and the choice of backend from the URL."""

from __future__ import annotations

from typing import Protocol


class QuotaStore(Protocol):
    async def hit(self, key: str, window_ms: int) -> tuple[int, int]:
        """Count one request on `key`; return (count in window, ms until the window ends).

        Increment and expiry are one atomic step. Raises errors.StoreUnavailable.
        """
        ...

    async def ping(self) -> bool: ...

    async def close(self) -> None: ...


def store_from_url(url: str | None, *, cluster: bool, timeout: float) -> QuotaStore:
    # An explicit table: PyInstaller follows static imports only.
    from .memory import MemoryStore
    from .redis import RedisStore

    if url is None:
        return MemoryStore()
    return RedisStore(url, cluster=cluster, timeout=timeout)
