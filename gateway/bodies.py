"""Request bodies (SPEC §5): the size limit, Content-Encoding, and the JSON object with its model.

Pure functions over bytes; the body middleware reads the request and calls them, ahead of rate
limiting, so a malformed request costs no token and no quota, and a refused one still names
its model. The gateway is served with aiohttp's request decompression off (`SERVER_OPTIONS` in
app.py) and decodes here instead: aiohttp would answer a coding it cannot decode (br, zstd) with
a plain-text 400 before any middleware runs, and log a traceback for a gzip body that is not
gzip. Here every outcome is the gateway's own error, observed and logged like any other.

One coding per request: `gzip` (or its alias `x-gzip`), `deflate` (zlib-wrapped, as RFC 9110
says, or raw, as some clients send it) or `identity`; anything else is 415 with
`Accept-Encoding: gzip, deflate` (RFC 9110 §15.5.16). Output is produced at most `limit + 1`
bytes at a time, so a small body that inflates to gigabytes costs no more than the limit.
"""

from __future__ import annotations

import zlib
from types import MappingProxyType
from typing import Any

import orjson

from .errors import BadRequest, GatewayError, PayloadTooLarge
from .json_shape import MAX_CONTAINERS, MAX_MEMBERS, MAX_VALUES, structure_excess

_GZIP = 16 + zlib.MAX_WBITS
_ZLIB = zlib.MAX_WBITS
_RAW_DEFLATE = -zlib.MAX_WBITS
# A body may hold several gzip members (RFC 1952 §2.2); each costs a decompressor, so a body
# made of thousands of empty members is refused rather than looped over.
MAX_GZIP_MEMBERS = 16
# Chunks of a chunked body: aiohttp's parser costs ~1.2 µs a chunk, so an 8 MiB body sent a
# byte a chunk held the event loop ~10 s in all. A client that sends more is not a client
# (16384 chunks: 512 bytes each on average for an 8 MiB body).
MAX_BODY_CHUNKS = 16384
_INFLATED = frozenset({"gzip", "x-gzip", "deflate"})  # the codings `decode` inflates


class UnsupportedEncoding(GatewayError):
    status = 415
    type = "invalid_request_error"
    code = "unsupported_content_encoding"

    def __init__(self, coding: str) -> None:
        shown = f" {coding!r}" if len(coding) <= 32 else ""  # never echo a long header back
        super().__init__(
            f"Content-Encoding{shown} is not supported: send gzip, deflate or an unencoded body",
            headers=MappingProxyType({"Accept-Encoding": "gzip, deflate"}),
        )


class BodyBudget:
    """How many body bytes may be being read or checked at once, across all requests. A body is read
    whole before rate limiting (so a refused request names its model), which would let
    clients that send almost all of a large body and stop hold memory no other limit sees:
    a body still arriving takes each part from this budget as it comes, and a request whose
    next part does not fit is shed. What counts is what arrived, not the declared length: a
    request that announces the largest body and sends none of it holds nothing. A body read
    holds its bytes (and what it inflates to) until it has been checked: one waiting for its
    turn to be inflated or counted costs memory as one still arriving does.

    One sender (a key, or a peer address without one) may hold half of it at most (never less
    than two bodies of the limit, inflated): else one tenant's stalled uploads, which no rate
    limit has seen yet, took all of it and every other tenant was shed until their deadline."""

    __slots__ = ("_free", "_held", "_share")

    def __init__(self, total: int, body_limit: int = 0) -> None:
        self._free = total
        self._share = max(total // 2, 2 * body_limit)
        self._held: dict[str, int] = {}  # by sender, while it holds any: as many as bodies being read

    def take(self, size: int, sender: str = "") -> bool:
        if not size:  # nothing held, nothing noted (give_back forgets only a sender that held bytes)
            return True
        held = self._held.get(sender, 0) + size
        if size > self._free or held > self._share:
            return False
        self._free -= size
        self._held[sender] = held
        return True

    def give_back(self, size: int, sender: str = "") -> None:
        if not size:
            return
        self._free += size
        held = self._held[sender] - size
        if held:
            self._held[sender] = held
        else:
            del self._held[sender]


class TooManyChunks(BadRequest):
    code = "too_many_chunks"
    message = f"request body has more than {MAX_BODY_CHUNKS} chunks"
    hang_up = True  # the rest is not read: reading it is what costs


def check_length(declared: int | None, limit: int) -> None:
    """A declared Content-Length over the limit is refused before a byte is read."""
    if declared is not None and declared > limit:
        raise too_large(limit)


def too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"request body is larger than {limit} bytes")


def compressed(content_encoding: str | None) -> bool:
    """Whether `decode` inflates a body with this Content-Encoding (worth a worker thread: a
    few KiB may inflate to the limit)."""
    return content_encoding is not None and content_encoding.strip(" \t").lower() in _INFLATED


def decode(data: bytes, content_encoding: str | None, limit: int) -> bytes:
    """The body with its Content-Encoding undone; no more than `limit` bytes decoded."""
    if content_encoding is None:
        return data
    coding = content_encoding.strip(" \t").lower()
    if coding in ("", "identity"):
        return data
    if coding in ("gzip", "x-gzip"):
        return _inflate(data, _GZIP, limit, "gzip", members=MAX_GZIP_MEMBERS)
    if coding == "deflate":
        return _inflate(data, _ZLIB if _is_zlib(data) else _RAW_DEFLATE, limit, "deflate")
    raise UnsupportedEncoding(coding)


def parse(body: bytes) -> tuple[dict[str, Any], str]:
    """The body as a JSON object, and its `model` (a non-empty string). A body that
    `may_be_too_complex` must have passed `check_structure` first."""
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:  # its message names a position, never the content
        raise BadRequest(f"request body is not valid UTF-8 JSON: {exc.msg}", code="invalid_json") from None
    if not isinstance(payload, dict):
        raise BadRequest("request body must be a JSON object")
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("'model' is required and must be a string", code="missing_model")
    return payload, model


def check_structure(
    body: bytes, max_containers: int = MAX_CONTAINERS, max_values: int = MAX_VALUES, max_members: int = MAX_MEMBERS
) -> None:
    """Refuses a request body whose JSON has more arrays and objects, values or object
    members than the limits (MAX_CONTAINERS, MAX_VALUES, MAX_MEMBERS): 400
    `body_too_complex`, saying which."""
    excess = structure_excess(body, max_containers, max_values, max_members)
    if excess is not None:
        raise BadRequest(f"request body has {excess}", code="body_too_complex")


def _is_zlib(data: bytes) -> bool:
    """RFC 1950's two-byte header: method 8 (deflate), and a check making it a multiple of 31."""
    return len(data) >= 2 and data[0] & 0x0F == 8 and ((data[0] << 8) | data[1]) % 31 == 0


def _inflate(data: bytes, wbits: int, limit: int, name: str, members: int = 1) -> bytes:
    parts: list[bytes] = []
    size = 0
    rest = data
    for _ in range(members):
        decompressor = zlib.decompressobj(wbits)
        try:
            part = decompressor.decompress(rest, limit - size + 1)
        except zlib.error:
            raise _undecodable(name, "it does not decode") from None
        size += len(part)
        if size > limit:
            raise too_large(limit)
        if not decompressor.eof:
            raise _undecodable(name, "it is truncated")
        parts.append(part)
        rest = decompressor.unused_data
        if not rest:
            return parts[0] if len(parts) == 1 else b"".join(parts)
    if members > 1:
        raise _undecodable(name, f"it has more than {members} members")
    raise _undecodable(name, "bytes follow the compressed data")


def _undecodable(name: str, why: str) -> BadRequest:
    return BadRequest(f"request body is marked Content-Encoding: {name} but {why}", code="invalid_content_encoding")
