"""The upstream LLM API: one pooled ClientSession, the header policy, and error wrapping.

The only module that uses aiohttp's client. aiohttp client errors never leave it: they
become `UpstreamError` (connection failure, 502) or `UpstreamStreamBroken` (mid-body).
"""

from __future__ import annotations

from collections.abc import Mapping

import aiohttp
from multidict import CIMultiDictProxy

from .errors import UpstreamError, UpstreamStreamBroken

# Never forwarded: hop-by-hop headers (RFC 9110 §7.6.1), what aiohttp sets itself, the
# client's credentials, and what would leak the client to the LLM provider.
_DROPPED = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "content-type",  # set by us: a second one from the client would duplicate it
        "accept-encoding",
        "authorization",
        "x-api-key",
        "cookie",
        "x-forwarded-for",
        "x-forwarded-host",
        "x-forwarded-proto",
        "forwarded",
        "x-real-ip",
        "traceparent",
        "tracestate",
    }
)


class UpstreamReply:
    """The upstream's answer once its headers have arrived."""

    __slots__ = ("_response",)

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response

    @property
    def status(self) -> int:
        return self._response.status

    @property
    def is_json(self) -> bool:
        return self._response.content_type == "application/json"

    async def read(self) -> bytes:
        try:
            return await self._response.read()
        except (aiohttp.ClientError, ConnectionError) as exc:
            raise UpstreamStreamBroken() from exc

    async def next_chunk(self) -> bytes:
        """The body's next bytes as they arrive, b"" at its end; a connection that dies raises
        UpstreamStreamBroken. A coroutine, not an async generator: one left unfinished (the
        relay is done at [DONE], before the body's end is read) would have the event loop
        schedule its aclose() in a task of its own, ~8 us a stream."""
        try:
            return await self._response.content.readany()
        except (aiohttp.ClientError, ConnectionError) as exc:
            raise UpstreamStreamBroken() from exc

    @property
    def at_eof(self) -> bool:
        """The whole body has been read (the connection is back in the pool)."""
        return self._response.content.at_eof()

    def close(self) -> None:
        """Drop the connection (used when the relay ends early: the LLM stops generating)."""
        self._response.close()


class Upstream:
    """The session is opened in the app's cleanup context (it needs the running loop)."""

    __slots__ = ("_auth", "_connect_timeout", "_session", "_url")

    def __init__(self, url: str, api_key: str | None, connect_timeout: float) -> None:
        self._session: aiohttp.ClientSession | None = None
        self._url = url
        self._auth = f"Bearer {api_key}" if api_key else None
        self._connect_timeout = connect_timeout

    async def open(self) -> None:
        # No connection limit: MAX_CONCURRENCY is the one admission limit; keep-alive reuse.
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=30)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self._connect_timeout)
        # No cookie jar: a cookie the provider sets on one tenant's call (a load balancer's,
        # say) must never ride along on another tenant's calls.
        self._session = aiohttp.ClientSession(connector=connector, timeout=timeout, cookie_jar=aiohttp.DummyCookieJar())

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def headers_for(self, incoming: CIMultiDictProxy[str], extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """Client headers minus the dropped ones, plus our credential and trace context."""
        connection_named = incoming.get("connection")
        named = {h.strip().lower() for h in connection_named.split(",")} if connection_named else ()
        out = {
            name: value
            for name, value in incoming.items()
            if (lower := name.lower()) not in _DROPPED and lower not in named
        }
        out["Content-Type"] = "application/json"
        if self._auth:
            out["Authorization"] = self._auth
        if extra:
            out.update(extra)
        return out

    async def post(self, body: bytes, headers: Mapping[str, str]) -> UpstreamReply:
        assert self._session is not None, "Upstream.open() was not awaited"
        try:
            response = await self._session.post(self._url, data=body, headers=headers)
        except (aiohttp.ClientError, ConnectionError, OSError) as exc:
            raise UpstreamError(f"upstream connection failed: {type(exc).__name__}") from exc
        return UpstreamReply(response)
