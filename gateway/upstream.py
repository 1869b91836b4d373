"""The upstream LLM API: one pooled ClientSession, the header policy, and error wrapping.

The only module that uses aiohttp's client. aiohttp client errors never leave it: they
become `UpstreamError` (connection failure, 502) or `UpstreamStreamBroken` (mid-body).
"""

from __future__ import annotations

import asyncio
import email.utils
import math
import re
import time
from collections.abc import Mapping
from typing import Protocol
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import aiohttp
from multidict import CIMultiDictProxy

from .egress import Egress
from .errors import UpstreamError, UpstreamReplyTooLarge, UpstreamStreamBroken
from .json_shape import reply_structure_excess
from .tls import client_context

# The client headers that reach the upstream (SPEC §5), by lower-case name: an allow-list,
# so the client's credentials (Authorization, X-Api-Key, Azure's api-key, Cookie), its
# OpenAI-Organization/-Project (the operator's key decides who pays), Content-Encoding
# (aiohttp has already decoded the body), Content-Length, hop-by-hop, X-Forwarded-*,
# Forwarded, X-Real-IP and trace context stay behind, and so does any header invented later.
# Content-Type is the gateway's own: the body sent is always UTF-8 JSON it has parsed.
_PASSED = frozenset({"accept", "user-agent", "openai-beta", "idempotency-key", "anthropic-version", "anthropic-beta"})
_PASSED_PREFIX = "x-stainless-"  # the official SDKs' platform and retry headers
# Comma-separated lists (RFC 9110 §5.3): repeated lines are joined in order. A repeat of
# any other header keeps its first value, as `headers.get` does wherever the gateway reads one.
_LISTS = frozenset({"accept", "openai-beta", "anthropic-beta"})
_VERDICTS_KEPT = 1024


def _merged(passed: list[tuple[str, str]]) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in passed:
        prior = out.get(name)
        if prior is None:
            out[name] = value
        elif name in _LISTS:
            out[name] = f"{prior}, {value}"
    return out


ANTHROPIC_VERSION = "2023-06-01"  # sent when the client names none
_RETRY_HEADERS = ("Retry-After", "retry-after-ms", "x-should-retry")


MAX_RETRY_AFTER_SECS = 3600.0  # an upstream's Retry-After is believed up to this (SPEC §13's skip)
_RETRY_CAPS = {"Retry-After": int(MAX_RETRY_AFTER_SECS), "retry-after-ms": int(MAX_RETRY_AFTER_SECS * 1000)}
# A reply read whole (JSON, an error) is held in memory: past this many decoded bytes it is an
# upstream error. Room for the largest replies the APIs give (2048 embeddings of 3072 floats,
# pretty-printed: ~145 MB), not for a body without end, or a small gzip one inflating ~1000x.
MAX_REPLY_BYTES = 256 * 1024 * 1024
# A chat completion, message or response is held to less (embeddings keep MAX_REPLY_BYTES):
# each step over a reply read whole holds the event loop once, in proportion to its size
# (100 MiB of prose: joined in ~70 ms, parsed in ~165 ms with the GIL held, written in ~210 ms;
# /healthz waited 300-400 ms), so past this it is an upstream error. Room for the largest real
# ones: 128k output tokens of prose are ~0.5 MB (~3 MB escaped as \uXXXX); logprobs (top 20:
# ~1.3 KB a token) reach REPLY_MAX_CONTAINERS (json_shape.py) near 30 MB; media in base64 are
# the largest (a chat answer's audio as WAV, ~64 KB a second; a response's generated images,
# a few MB each, partial ones included): 64 MiB is ~8 minutes of WAV.
MAX_ANSWER_BYTES = 64 * 1024 * 1024
# aiohttp's readany() returns at once while data is buffered, and inflates a gzip body as it is
# read: a whole reply is read with a turn of the loop for others after each this many bytes.
_YIELD_EVERY_BYTES = 1024 * 1024
# A compressed reply read whole may inflate freely up to this many bytes; past it, to no more
# than _MAX_INFLATION times what came over the wire. JSON compresses ~3-10x (embeddings' floats
# ~3x): only a bomb gets there, 200 KiB of gzip that inflate to 200 MiB, all of it held in
# memory and parsed on the event loop (orjson holds the GIL: ~1 s on a slow core, /healthz
# with it). The same bytes sent plain cost the upstream what they cost the gateway.
_INFLATE_FREELY_BYTES = 16 * 1024 * 1024
_MAX_INFLATION = 64


def _advice_number(value: str | None) -> float | None:
    """A back-off header's number (Retry-After, retry-after-ms), if it is one a client reads as
    one: ASCII digits with at most one decimal point, at most 32 characters. Not "inf", "nan",
    "1e308", "-5" or "" (float() takes them all), nor "٣" or "²" (str.isdigit() takes those)."""
    if value is not None and len(value) <= 32 and value.isascii() and value.replace(".", "", 1).isdigit():
        return float(value)
    return None


def _date_secs(value: str) -> float | None:
    """The seconds from now to an HTTP date (in the past: negative), or None if it is none."""
    try:
        return email.utils.parsedate_to_datetime(value).timestamp() - time.time()
    except (ValueError, TypeError, OverflowError, IndexError):
        return None


class Reply(Protocol):
    """An upstream's answer as the proxy reads it: an `UpstreamReply`, or one translated
    from another API (router.py's AnthropicAsChat)."""

    @property
    def status(self) -> int: ...
    @property
    def is_json(self) -> bool: ...
    @property
    def at_eof(self) -> bool: ...
    def retry_headers(self) -> dict[str, str]: ...
    def retry_after(self) -> float | None: ...
    async def read(self, limit: int = MAX_REPLY_BYTES) -> bytes: ...
    async def next_chunk(self) -> bytes: ...
    def scrub(self, data: bytes) -> bytes: ...
    def close(self) -> None: ...


def _connection_failed(exc: BaseException) -> UpstreamError:
    """What failed before the upstream's answer was read. aiohttp raises ClientResponseError
    for an answer that is no HTTP it reads (a bad status line, thousands of headers, one past
    8 KiB): the upstream answered, so the operator is not sent to look at the network. Its
    message quotes the upstream's bytes, so it is not passed on. A refusing egress proxy
    (ClientHttpProxyError, one of them) is the connection failing, as before."""
    if isinstance(exc, aiohttp.ClientResponseError) and not isinstance(exc, aiohttp.ClientHttpProxyError):
        return UpstreamError("upstream sent a malformed response")
    return UpstreamError(f"upstream connection failed: {type(exc).__name__}")


class KeyMask:
    """The operator's key as a reply may echo it, to mask: as sent, or JSON-escaped.

    JSON encoders escape some punctuation (Gson writes "=" as \\u003d, PHP "/" as \\/), and
    the client's JSON reader gets the key back; a base64 key (Amazon Bedrock's) has "=", "/"
    and "+". None escapes letters, digits, "-" or "_": a key of only those (OpenAI's,
    Anthropic's) is looked for as sent, and nothing more is compiled for it."""

    __slots__ = ("_escaped", "_key", "_lead", "_lead_widths")

    def __init__(self, key: bytes) -> None:
        self._key = key
        parts: list[bytes] = []
        widths: list[tuple[int, ...]] = []  # the widths each character's forms may take
        escapable = False
        for byte in key:
            char = bytes((byte,))
            if char.isalnum() or char in b"-_":
                parts.append(re.escape(char))
                widths.append((1,))
                continue
            escapable = True
            forms = [re.escape(char), rb"\\u00" + b"".join(_either_case(d) for d in b"%02x" % byte)]
            widths.append((1, 6))
            if char in b'"\\/':  # JSON's own two-character escapes
                forms.append(rb"\\" + re.escape(char))
                widths[-1] += (2,)
            parts.append(b"(?:" + b"|".join(forms) + b")")
        # A pattern that opens with an alternation is tried at every backslash (~0.3 s in 8 MiB
        # of them, on the loop); one that opens with a literal is searched for at memchr speed.
        # So the punctuation that opens a key ("/" or "+" in base64) is matched apart, before
        # each place the rest of the key is found.
        lead = next((at for at, each in enumerate(widths) if each == (1,)), 0)
        self._escaped = re.compile(b"".join(parts[lead:])) if escapable else None
        self._lead = re.compile(b"".join(parts[:lead])) if lead and escapable else None
        spans = {0}
        for each in widths[:lead]:
            spans = {span + width for span in spans for width in each}
        self._lead_widths = sorted(spans, reverse=True)  # the widest first: where the key's form begins

    def __call__(self, data: bytes) -> bytes:
        """`data` with the key masked; the same object when it holds none."""
        if self._key in data:
            data = data.replace(self._key, b"***")
        escaped = self._escaped
        if escaped is None or b"\\" not in data:
            return data
        lead = self._lead
        if lead is None:
            masked, count = escaped.subn(b"***", data)
            return masked if count else data
        out: list[bytes] = []
        copied = 0
        match = escaped.search(data)
        while match is not None:
            at = match.start()
            for width in self._lead_widths:
                if at - width >= copied and lead.fullmatch(data, at - width, at):
                    out += (data[copied : at - width], b"***")
                    copied = match.end()
                    break
            match = escaped.search(data, max(copied, at + 1))
        if not out:
            return data
        out.append(data[copied:])
        return b"".join(out)


def _basic_credentials(url: str) -> str | None:
    """What aiohttp sends for user info in the URL (`https://user:pass@proxy`, the credential
    then instead of a key): `Authorization: Basic <this>`, an error body may echo it too."""
    parts = urlsplit(url)
    if parts.username is None:
        return None
    # Decoded and encoded as aiohttp's client does (latin-1, its BasicAuth's default).
    header = aiohttp.encode_basic_auth(unquote(parts.username), unquote(parts.password or ""), "latin1")
    return header.partition(" ")[2]


def _either_case(digit: int) -> bytes:
    char = bytes((digit,))
    return b"[" + char + char.upper() + b"]" if char.isalpha() else char


class UpstreamReply:
    """The upstream's answer once its headers have arrived."""

    __slots__ = ("_limit", "_mask", "_response")

    def __init__(
        self, response: aiohttp.ClientResponse, limit: int = MAX_REPLY_BYTES, mask: KeyMask | None = None
    ) -> None:
        self._response = response
        self._limit = limit
        self._mask = mask  # the operator's key: never handed back to the client (see read)

    @property
    def status(self) -> int:
        return self._response.status

    @property
    def is_json(self) -> bool:
        return self._response.content_type == "application/json"

    def retry_headers(self) -> dict[str, str]:
        """The upstream's back-off advice, to pass on with its error (Retry-After, retry-after-ms,
        x-should-retry), when it gave some that reads as a number or a boolean."""
        headers = self._response.headers
        out: dict[str, str] = {}
        for name in _RETRY_HEADERS:
            value = headers.get(name)
            if value is not None and (number := _advice_number(value)) is not None:
                # No longer than the gateway itself believes (MAX_RETRY_AFTER_SECS): a client told
                # 10^30 s never retries, or (a millisecond timer that overflows) retries at once.
                cap = _RETRY_CAPS.get(name)
                if cap is not None and number > cap:
                    value = str(cap)
                out[name] = value
            elif value in ("true", "false"):
                out[name] = value
            elif value is not None and name == "Retry-After" and (secs := _date_secs(value)) is not None:
                # An HTTP date (RFC 9110 §10.2.3, as nginx or Azure send it), passed on as the
                # seconds it leaves: a date was dropped, and the client retried on its own timer.
                out[name] = str(math.ceil(min(max(secs, 0.0), MAX_RETRY_AFTER_SECS)))
        return out

    def retry_after(self) -> float | None:
        """Seconds the upstream asks to wait (`retry-after-ms`, else `Retry-After` as seconds
        or an HTTP date), up to MAX_RETRY_AFTER_SECS; None when it names none."""
        # Read as retry_headers reads them, so the skip is what the client is told: a
        # `retry-after-ms: inf` (or 1e308) beside `Retry-After: 2` skipped the upstream for the
        # whole hour while the client was told 2 s; "nan" or "" hid the Retry-After beside it.
        headers = self._response.headers
        secs = _advice_number(headers.get("retry-after-ms"))
        if secs is not None:
            secs /= 1000
        else:
            value = headers.get("Retry-After")
            if value is None:
                return None
            secs = _advice_number(value)
            if secs is None:
                secs = _date_secs(value)
                if secs is None:
                    return None
        return min(max(secs, 0.0), MAX_RETRY_AFTER_SECS)

    async def read(self, limit: int = MAX_REPLY_BYTES) -> bytes:
        """The whole body, decoded; past the size limit (the upstream's, or `limit` if lower), or
        the bound on arrays and objects that keeps its parse short (json_shape.py), an
        UpstreamError."""
        content = self._response.content
        limit = min(limit, self._limit)
        parts: list[bytes] = []
        size = 0
        turn_at = _YIELD_EVERY_BYTES
        try:
            while chunk := await content.readany():
                size += len(chunk)
                if size > limit:
                    self._response.close()
                    raise UpstreamReplyTooLarge()
                parts.append(chunk)
                if size >= turn_at:  # megabytes already buffered (or inflating): others get a turn
                    turn_at = size + _YIELD_EVERY_BYTES
                    if size > _INFLATE_FREELY_BYTES and size > _MAX_INFLATION * content.total_raw_bytes:
                        self._response.close()
                        raise UpstreamError("upstream reply inflates too far")
                    await asyncio.sleep(0)
        except (aiohttp.ClientError, ConnectionError) as exc:
            raise UpstreamStreamBroken() from exc
        data = b"".join(parts)
        # An error body that echoes the request it got (a debugging proxy, a validation error
        # quoting the headers) would hand the operator's key to whoever made the call.
        if self._response.status >= 300:
            data = self.scrub(data)
        # Before anything parses it (a JSON reply, an error, a translation, the model list), so
        # one check covers them all and a route's next upstream answers instead.
        excess = await reply_structure_excess(data)
        if excess is not None:
            raise UpstreamError(f"upstream reply has {excess}")
        return data

    def scrub(self, data: bytes) -> bytes:
        """`data` without the operator's key: for what may echo the request the upstream got
        (an error body, an in-stream error event, a 200 reply that is an error)."""
        mask = self._mask
        return data if mask is None else mask(data)

    async def next_chunk(self) -> bytes:
        """The body's next bytes as they arrive, b"" at its end; a connection that dies raises
        UpstreamStreamBroken. A coroutine, not an async generator: one left unfinished (the
        relay is done at [DONE], before the body's end is read) would have the event loop
        schedule its aclose() in a task of its own, ~8 us a stream."""
        try:
            return await self._response.content.readany()
        except (aiohttp.ClientError, ConnectionError) as exc:
            raise UpstreamStreamBroken() from exc
        except RuntimeError as exc:
            # aiohttp's answer to a read after it dropped the connection ("Connection closed."):
            # a body whose chunked framing broke is dropped without an error on the body, so
            # the read pending then waits on, and the next one gets this. The upstream broke.
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

    __slots__ = (
        "_connect_timeout",
        "_defaults",
        "_mask",
        "_max_reply",
        "_own",
        "_proxy",
        "_proxy_headers",
        "_session",
        "_url",
        "_verdicts",
    )

    def __init__(
        self,
        url: str,
        api_key: str | None,
        connect_timeout: float,
        *,
        organization: str | None = None,
        project: str | None = None,
        anthropic: bool = False,
        max_reply_bytes: int = MAX_REPLY_BYTES,
        egress: Egress | None = None,
    ) -> None:
        self._session: aiohttp.ClientSession | None = None
        self._max_reply = max_reply_bytes
        secret = api_key or _basic_credentials(url)
        self._mask = KeyMask(secret.encode()) if secret and len(secret) >= 8 else None  # masking "x" would garble
        self._url = url
        self._connect_timeout = connect_timeout
        # What the gateway itself says on every call: built once, added per request. An
        # Anthropic upstream takes its key as x-api-key and needs an anthropic-version, the
        # client's if it sent one (SPEC §11).
        own = {"Content-Type": "application/json"}
        self._defaults = {"anthropic-version": ANTHROPIC_VERSION} if anthropic else {}
        if api_key:
            if anthropic:
                own["x-api-key"] = api_key
            else:
                own["Authorization"] = f"Bearer {api_key}"
        if organization:
            own["OpenAI-Organization"] = organization
        if project:
            own["OpenAI-Project"] = project
        # The egress proxy this upstream is reached through (decided once), and its credentials.
        self._proxy, authorization = egress.proxy_for(url) if egress is not None else (None, None)
        self._proxy_headers: dict[str, str] | None = None  # sent with a CONNECT (an https upstream's tunnel)
        if authorization and not url.lower().startswith("https:"):
            # No tunnel: the request itself goes to the proxy (aiohttp sends proxy_headers only
            # on a CONNECT), so the credentials go with it.
            own["Proxy-Authorization"] = authorization
        elif authorization:
            self._proxy_headers = {"Proxy-Authorization": authorization}
        self._own = own
        self._verdicts: dict[str, str] = {}  # header name as spelled -> lower-case if it passes, else ""

    async def open(self) -> None:
        self._open_session()

    def _open_session(self) -> aiohttp.ClientSession:
        # No connection limit: MAX_CONCURRENCY is the one admission limit; keep-alive reuse.
        # https upstreams verified against the system's CAs, wherever it keeps them (tls.py).
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=30, ssl=client_context())
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self._connect_timeout)
        # No cookie jar: a cookie the provider sets on one tenant's call (a load balancer's,
        # say) must never ride along on another tenant's calls.
        session = aiohttp.ClientSession(
            connector=connector, timeout=timeout, cookie_jar=aiohttp.DummyCookieJar(), proxy=self._proxy
        )
        self._session = session
        return session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def headers_for(
        self,
        incoming: CIMultiDictProxy[str],
        extra: Mapping[str, str] | None = None,
        *,
        request_id: str | None = None,
    ) -> dict[str, str]:
        """The allowed client headers, then the gateway's own: its credential and content
        type, the operator's organization and project, `x-request-id` and `extra` (the
        trace context). One pass over the client's headers, a dict lookup each."""
        verdicts = self._verdicts
        passed: list[tuple[str, str]] = []
        for name, value in incoming.items():
            lower = verdicts.get(name)
            if lower is None:
                lower = self._verdict(name)
            if lower and value:
                passed.append((lower, value))
        # Keyed by the lower-case name, so "accept" and "Accept" can never go out as two.
        out = dict(passed)
        if len(out) != len(passed):  # a name repeated, in any casing: rare, so handled apart
            out = _merged(passed)
        # RFC 9110 §7.6.1: what the client's Connection header names is hop-by-hop, on every
        # one of its lines (§5.3: repeated lines are one list).
        for connection in incoming.getall("connection", ()):
            for named in connection.split(","):
                out.pop(named.strip().lower(), None)
        out.update(self._own)  # no allowed name collides: the gateway's own always win
        for name, value in self._defaults.items():
            out.setdefault(name, value)
        if request_id:
            out["x-request-id"] = request_id
        if extra:
            out.update(extra)
        return out

    def _verdict(self, name: str) -> str:
        """The lower-case name if the header passes, else "", remembered by its spelling: the
        SDKs send the same dozen names spelled the same way on every call, so a dict lookup
        replaces lower() and two tests (a third of the cost). Names are the client's to
        choose, so past a bound they are decided without being remembered."""
        lower = name.lower()
        verdict = lower if lower in _PASSED or lower.startswith(_PASSED_PREFIX) else ""
        if len(self._verdicts) < _VERDICTS_KEPT:
            self._verdicts[name] = verdict
        return verdict

    async def post(self, body: bytes, headers: Mapping[str, str]) -> UpstreamReply:
        # Opened with the app, or here on first use (the clients of routes a reload brought).
        session = self._session if self._session is not None else self._open_session()
        try:
            # Never follow a redirect: it would carry the prompt (and on an origin change aiohttp
            # drops only Authorization, not x-api-key) to wherever the upstream points.
            response = await session.post(
                self._url, data=body, headers=headers, allow_redirects=False, proxy_headers=self._proxy_headers
            )
        except (aiohttp.ClientError, ConnectionError, OSError) as exc:
            raise _connection_failed(exc) from exc
        return self._reply(response)

    async def get(self, headers: Mapping[str, str], segment: str | None = None) -> UpstreamReply:
        """A GET of the upstream's URL (the model list), under the same rules as `post`.
        `segment`: one more path segment, percent-encoded whole ("/" too, as the openai SDK
        writes a model id: "meta-llama%2FLlama-3-8B"), before the URL's query (one model)."""
        assert self._session is not None, "Upstream.open() was not awaited"
        url = self._url
        if segment is not None:
            parts = urlsplit(url)
            url = urlunsplit(parts._replace(path=parts.path.rstrip("/") + "/" + quote(segment, safe="")))
        try:
            response = await self._session.get(
                url, headers=headers, allow_redirects=False, proxy_headers=self._proxy_headers
            )
        except (aiohttp.ClientError, ConnectionError, OSError) as exc:
            raise _connection_failed(exc) from exc
        return self._reply(response)

    def _reply(self, response: aiohttp.ClientResponse) -> UpstreamReply:
        """The answer, if it is one a client can be handed: a success or an error (4xx, 5xx).
        A redirect is not followed (see post) and its Location is not relayed, so passed on it
        told the client "look elsewhere" with nowhere to look (a 304, to a POST, with no body at
        all); a status past 599 has no class in HTTP and clients reject or misread it, and so
        has one under 100 (aiohttp reads "099" as 99; a 1xx never gets here: its client waits
        for the final answer). Either is the upstream failing: 502, or the route's next
        upstream. Two comparisons per call."""
        status = response.status
        if status < 200 or 300 <= status < 400 or status >= 600:
            response.close()
            raise UpstreamError(f"upstream answered {status}")
        return UpstreamReply(response, self._max_reply, self._mask)
