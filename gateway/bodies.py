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

import asyncio
import re
import zlib
from types import MappingProxyType
from typing import Any

import orjson

from .errors import BadRequest, GatewayError, PayloadTooLarge

_GZIP = 16 + zlib.MAX_WBITS
_ZLIB = zlib.MAX_WBITS
_RAW_DEFLATE = -zlib.MAX_WBITS
# A body may hold several gzip members (RFC 1952 §2.2); each costs a decompressor, so a body
# made of thousands of empty members is refused rather than looped over.
MAX_GZIP_MEMBERS = 16
# A body of megabytes of tiny values ("[[],[],…]", "[1,1,…]") costs ~0.5 s to parse and
# seconds to walk, all of it holding the event loop (orjson keeps the GIL while it parses):
# one request would stall every other client. Such a body is refused before it is parsed
# (400 `body_too_complex`): at most 100,000 arrays and objects and 500,000 values, which
# parse in ~50 ms. Not 2,000,000: values are no ints alone, and 2M one-letter strings ("a",
# 7.6 MiB) took ~130 ms in orjson alone, held /healthz 126-143 ms (180-250 ms spread over
# 95,000 arrays; 144 ms as floats). No real request comes near (an 8 MiB prompt is ~2M tokens,
# past every model's context; OpenAI takes 300k tokens of token arrays). Counted only in bodies over
# 256 KiB (any smaller one parses in ~15 ms), first as bytes (fast, but the brackets and
# commas of text count too), then, only if those reach a limit, outside strings, in a worker
# thread (a prompt of JSON text has brackets by the hundred thousand, and is no such body).
MAX_CONTAINERS = 100_000
MAX_VALUES = 500_000
# Object members (their colons) too: a key costs ~10x a value (a new string, hashed, into a
# dict), so 8 MiB of `{"0":0,"1":0,…}` (830k distinct keys, under the value limit) parsed in
# ~0.5 s holding /healthz as long; 200,000 of them parse in ~50 ms.
MAX_MEMBERS = 200_000
COUNT_ABOVE_BYTES = 256 * 1024
# An upstream's reply is held to a number of arrays and objects too (a hostile or broken
# upstream could stall the loop as a client could), ten times a request's: a reply with
# `top_logprobs: 20` has 43 of them a token, so a 16,384-token one has ~700,000 (it parses in
# ~0.5 s, a cost the client asked for); not to a number of values or members (an embeddings
# reply in floats has millions of values, a logprobs one hundreds of thousands of members).
REPLY_MAX_CONTAINERS = 1_000_000
REPLY_MAX_VALUES = 1 << 62
_SCAN_SLICE = 64 * 1024  # of a string, scanned by one regex call (no long hold of the GIL)
_STRING_PART = re.compile(rb'[^"\\]*(?:\\.[^"\\]*)*')  # a string's characters, up to its closing quote


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
    """How many body bytes may be being read at once, across all requests. A body is read
    whole before rate limiting (so a refused request names its model), which would let
    clients that send almost all of a large body and stop hold memory no other limit sees:
    a body still arriving takes each part from this budget as it comes, and a request whose
    next part does not fit is shed. What counts is what arrived, not the declared length: a
    request that announces the largest body and sends none of it holds nothing."""

    __slots__ = ("_free",)

    def __init__(self, total: int) -> None:
        self._free = total

    def take(self, size: int) -> bool:
        if size > self._free:
            return False
        self._free -= size
        return True

    def give_back(self, size: int) -> None:
        self._free += size


def check_length(declared: int | None, limit: int) -> None:
    """A declared Content-Length over the limit is refused before a byte is read."""
    if declared is not None and declared > limit:
        raise too_large(limit)


def too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"request body is larger than {limit} bytes")


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


def may_be_too_complex(
    body: bytes, max_values: int = MAX_VALUES, max_members: int = MAX_MEMBERS, max_containers: int = MAX_CONTAINERS
) -> bool:
    """Whether the body's bytes reach a structure limit (see MAX_CONTAINERS): if so,
    `structure_excess` tells whether its JSON does."""
    if len(body) <= COUNT_ABOVE_BYTES:
        return False
    if body.count(b"[") + body.count(b"{") > max_containers:
        return True
    if max_members < len(body) and body.count(b":") > max_members:
        return True
    return max_values <= len(body) and body.count(b",") >= max_values


def check_structure(
    body: bytes, max_containers: int = MAX_CONTAINERS, max_values: int = MAX_VALUES, max_members: int = MAX_MEMBERS
) -> None:
    """Refuses a request body whose JSON has more arrays and objects, values or object
    members than the limits (MAX_CONTAINERS, MAX_VALUES, MAX_MEMBERS): 400
    `body_too_complex`, saying which."""
    excess = structure_excess(body, max_containers, max_values, max_members)
    if excess is not None:
        raise BadRequest(f"request body has {excess}", code="body_too_complex")


def structure_excess(
    body: bytes, max_containers: int = MAX_CONTAINERS, max_values: int = MAX_VALUES, max_members: int = MAX_MEMBERS
) -> str | None:
    """What the JSON in `body` has more of than the limits ("more than N JSON values"), or
    None. Brackets and commas inside strings do not count. Linear, and for a worker thread:
    no regex call scans more than _SCAN_SLICE bytes, so the event loop gets the GIL back in
    between."""
    containers = commas = colons = 0
    at, end = 0, len(body)
    while at < end:
        quote = body.find(b'"', at)
        outside = end if quote < 0 else quote
        containers += body.count(b"[", at, outside) + body.count(b"{", at, outside)
        commas += body.count(b",", at, outside)
        colons += body.count(b":", at, outside)
        if containers > max_containers:
            return f"more than {max_containers} JSON arrays and objects"
        if colons > max_members:
            return f"more than {max_members} JSON object members"
        if commas >= max_values:
            return f"more than {max_values} JSON values"
        if quote < 0:
            return None
        at = quote + 1  # inside a string: to its closing quote, a slice at a time
        while True:
            part = _STRING_PART.match(body, at, min(at + _SCAN_SLICE, end))
            assert part is not None  # the pattern matches the empty string too
            stop = part.end()
            if stop < end and body[stop] == 0x22:  # the closing quote
                at = stop + 1
                break
            if stop in (at, end):
                return None  # the body ends inside a string: no JSON (its parse says so)
            at = stop  # the slice ended: inside the string, or before an escape cut in two
    return None


async def reply_structure_excess(data: bytes) -> str | None:
    """`structure_excess` of an upstream's reply (REPLY_MAX_CONTAINERS only), counted in a
    worker thread when its bytes reach the limit; None for every usual reply."""
    if not may_be_too_complex(data, REPLY_MAX_VALUES, REPLY_MAX_VALUES, REPLY_MAX_CONTAINERS):
        return None
    return await asyncio.to_thread(structure_excess, data, REPLY_MAX_CONTAINERS, REPLY_MAX_VALUES, REPLY_MAX_VALUES)


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
