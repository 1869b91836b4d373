"""Quota storage: the `QuotaStore` protocol and the choice of backend from the URL."""

from __future__ import annotations

import hashlib
from typing import Protocol


def digest(key: str) -> bytes:
    """A fixed-size stand-in for a key in the process's own tables: 16 bytes of BLAKE2b,
    whatever the key's length (2^64 keys before a collision is even likely). surrogatepass:
    any str encodes, even one decoded from a header's invalid UTF-8."""
    return hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=16).digest()


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
