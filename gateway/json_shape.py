"""How much JSON a body holds, counted before it is parsed (SPEC §6: the gateway keeps
serving others). orjson keeps the GIL while it parses, so a worker thread does not help there:
megabytes of tiny values must be refused before the parse, whoever sent them (a client's
request: bodies.py; an upstream's reply read whole: upstream.py)."""

from __future__ import annotations

import asyncio
import re

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
# The bytes may_be_too_complex deletes, by (whether it counts members, whether it counts values).
_NOT_MARKS = {
    (members, values): bytes(
        byte for byte in range(256) if byte not in b"[{" + (b":" if members else b"") + (b"," if values else b"")
    )
    for members in (False, True)
    for values in (False, True)
}
_SCAN_SLICE = 64 * 1024  # of a string, scanned by one regex call (no long hold of the GIL)
_STRING_PART = re.compile(rb'[^"\\]*(?:\\.[^"\\]*)*')  # a string's characters, up to its closing quote


def may_be_too_complex(
    body: bytes, max_values: int = MAX_VALUES, max_members: int = MAX_MEMBERS, max_containers: int = MAX_CONTAINERS
) -> bool:
    """Whether the body's bytes reach a structure limit (see MAX_CONTAINERS): if so,
    `structure_excess` tells whether its JSON does."""
    if len(body) <= COUNT_ABOVE_BYTES:
        return False
    # The marks kept in one pass, then counted: ~2.5 ms for 8 MiB of text where four counts
    # over the body took ~9 ms, on the event loop. A limit the body is too short to reach is
    # not counted at all (a reply's values and members: an embeddings reply is commas).
    counts_members, counts_values = max_members < len(body), max_values <= len(body)
    marks = body.translate(None, _NOT_MARKS[counts_members, counts_values])
    if marks.count(b"[") + marks.count(b"{") > max_containers:
        return True
    if marks.count(b":") > max_members:
        return True
    return marks.count(b",") >= max_values


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
