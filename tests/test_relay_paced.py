"""The relay one event a read (a paced upstream: an LLM writing as it thinks): the fast path's
shortcut for a run of one text (`StreamRelay._fed_one`) writes what the usual way writes,
byte for byte, and what the exact path writes, on each surface's streamed texts (plain text,
JSON arguments, texts whose later copies repeat them). With redaction off, a read in which
nothing is worth parsing goes out at once, as the plain search over it would send it. An
event the stream changed is refused by `_spaced_as` as splitting it refuses it."""

from __future__ import annotations

import itertools
import json
import os
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import sse
from gateway.openai_apis import RESPONSES
from gateway.redact import ALL_KINDS, build_redactor
from gateway.relay import StreamRelay, Value, usage_values
from gateway.surfaces import CHAT, MESSAGES

from .stream_equivalence import assert_same_but_for_splits

REDACTOR = build_redactor(ALL_KINDS)
assert REDACTOR is not None

WORDS = ["Hello", " ", "world", ", ", ".", " token7", "order 12345", "v3.11.7", "é", "👋", '"q"', "\\", "\n", "{"]
PII = ["jane.doe@example.com", "4242 4242 4242 4242", "+1 415 555 2671", "DE89 3704 0044 0532 0130 00", "078-05-1120"]


class _NoShortcut(StreamRelay):
    __slots__ = ()

    def _fed_one(self, value: Value, edits: list[tuple[int, int, str]]) -> bool:
        return False  # every run the usual way


class _ExactOnly(StreamRelay):
    __slots__ = ()

    def _templated(self, blocks: bytes, at: int, out: list[bytes], copied: int) -> tuple[int, int] | None:
        return None  # every event parsed


def _data(kind: str | None, body: dict[str, Any]) -> bytes:
    line = b"data: " + json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"
    return (f"event: {kind}\n".encode() if kind else b"") + line


def _chat(field: str, pieces: list[str], pad: bool) -> list[bytes]:
    def chunk(delta: dict[str, Any], n: int, finish: str | None = None) -> bytes:
        body: dict[str, Any] = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
        body["choices"] = [{"index": 0, "delta": delta, "finish_reason": finish}]
        if pad:
            body["obfuscation"] = "x" * (n % 5 + 1)
        return _data(None, body)

    if field == "arguments":
        call = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": ""}}
        events = [chunk({"role": "assistant", "tool_calls": [call]}, 0)]
        events += [
            chunk({"tool_calls": [{"index": 0, "function": {"arguments": p}}]}, n) for n, p in enumerate(pieces, 1)
        ]
    else:
        events = [chunk({"role": "assistant", "content": ""}, 0)]
        events += [chunk({field: p}, n) for n, p in enumerate(pieces, 1)]
    return [*events, chunk({}, 99, "stop"), b"data: [DONE]\n\n"]


def _messages(json_input: bool, pieces: list[str]) -> list[bytes]:
    block = {"type": "tool_use", "id": "t1", "name": "f", "input": {}} if json_input else {"type": "text", "text": ""}
    kind, field = ("input_json_delta", "partial_json") if json_input else ("text_delta", "text")
    start = {"type": "message_start", "message": {"id": "m1", "type": "message", "role": "assistant", "content": []}}
    events = [
        _data("message_start", start),
        _data("content_block_start", {"type": "content_block_start", "index": 0, "content_block": block}),
    ]
    events += [
        _data("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": kind, field: p}})
        for p in pieces
    ]
    events.append(_data("content_block_stop", {"type": "content_block_stop", "index": 0}))
    return [*events, _data("message_stop", {"type": "message_stop"})]


def _responses(pieces: list[str], numbered: bool) -> list[bytes]:
    number = itertools.count()
    where = {"item_id": "msg_1", "output_index": 0, "content_index": 0}
    text = "".join(pieces)
    part = {"type": "output_text", "annotations": [], "text": text}
    item = {"id": "msg_1", "type": "message", "status": "completed", "role": "assistant", "content": [part]}
    response = {"id": "resp_1", "object": "response", "status": "in_progress", "output": []}
    bodies: list[dict[str, Any]] = [
        {"type": "response.created", "response": response},
        {"type": "response.output_item.added", "output_index": 0, "item": {**item, "content": []}},
        {"type": "response.content_part.added", **where, "part": {**part, "text": ""}},
        *[{"type": "response.output_text.delta", **where, "delta": p, "obfuscation": "pad"} for p in pieces],
        {"type": "response.output_text.done", **where, "text": text},
        {"type": "response.content_part.done", **where, "part": part},
        {"type": "response.output_item.done", "output_index": 0, "item": item},
        {"type": "response.completed", "response": {**response, "status": "completed", "output": [item]}},
    ]
    if not numbered:  # an OpenAI-compatible server that leaves the numbers out: a run of one text
        return [_data(body["type"], body) for body in bodies]
    return [_data(body["type"], {**body, "sequence_number": next(number)}) for body in bodies]


@st.composite
def paced_stream(draw: st.DrawFn) -> tuple[Any, list[bytes]]:
    """A reply cut anywhere into deltas, written as one of the surfaces streams it, one event
    a read."""
    whole = "".join(draw(st.lists(st.sampled_from(WORDS + PII), min_size=1, max_size=14)))
    cuts = sorted(draw(st.lists(st.integers(0, len(whole)), max_size=16)))
    pieces = [whole[a:b] for a, b in itertools.pairwise([0, *cuts, len(whole)]) if whole[a:b]]
    shape = draw(st.sampled_from(["content", "refusal", "arguments", "text", "partial_json", "responses"]))
    if shape in ("content", "refusal", "arguments"):
        return CHAT, _chat(shape, pieces, draw(st.booleans()))
    if shape in ("text", "partial_json"):
        return MESSAGES, _messages(shape == "partial_json", pieces)
    return RESPONSES, _responses(pieces, draw(st.booleans()))


@settings(max_examples=int(os.environ.get("RELAY_EXAMPLES", "600")), deadline=None)
@given(paced_stream())
def test_one_event_a_read_writes_what_the_usual_way_and_the_exact_path_write(case: tuple[Any, list[bytes]]) -> None:
    surface, reads = case
    fast, usual, exact = (kind(REDACTOR, None, surface) for kind in (StreamRelay, _NoShortcut, _ExactOnly))
    outs = [*map(fast.feed, reads), fast.close()]
    assert outs == [*map(usual.feed, reads), usual.close()]
    assert_same_but_for_splits(outs, [*map(exact.feed, reads), exact.close()])
    assert fast.done == exact.done and (fast.failure is None) == (exact.failure is None)
    assert sse.SSEParser().feed(b"".join(outs))  # still events


class _PlainSearch(StreamRelay):
    """Redaction off, every read searched as before the early return: the markers built from
    the surface each read, and the spans built (empty) before anything is decided."""

    __slots__ = ()

    def _worth_parsing(self, blocks: bytes) -> list[tuple[int, int]]:
        found = usage_values(blocks)
        surface = self._surface
        for marker in surface.done_markers if surface.done_data is None else (*surface.done_markers, surface.done_data):
            at = blocks.find(marker)
            while at >= 0:
                found.append(at)
                at = blocks.find(marker, at + 1)
        spans: list[tuple[int, int]] = []
        for at in sorted(found):
            if spans and at < spans[-1][1]:
                continue
            start = blocks.rfind(b"\n\n", 0, at)
            spans.append((0 if start < 0 else start + 2, blocks.find(b"\n\n", at) + 2))
        return spans


# Events of each surface, and what ends them or carries a usage (OpenAI's, Anthropic's,
# Responses'), some with the usage key as a text's words, escaped or null.
UNREDACTED_EVENTS = [
    b'data: {"choices":[{"index":0,"delta":{"content":" token7"}}],"usage":null}\n\n',
    b'data: {"choices":[{"index":0,"delta":{"content":"say \\"usage\\": 1"}}]}\n\n',
    b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":5,"total_tokens":8}}\n\n',
    b'data: {"choices":[],"\\u0075sage":{"prompt_tokens":1,"completion_tokens":2}}\n\n',
    b'data: {"error":{"message":"boom","type":"server_error"}}\n\n',
    b"data: [DONE]\n\n",
    b": keep-alive\n\n",
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
    b'"delta":{"type":"text_delta","text":"hi"}}\n\n',
    b'event: message_delta\ndata: {"type":"message_delta","delta":{},"usage":{"output_tokens":9}}\n\n',
    b'event: message_stop\ndata: {"type":"message_stop"}\n\n',
    b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta","delta":"x",'
    b'"sequence_number":4}\n\n',
    b'event: response.completed\ndata: {"type":"response.completed","response":{"usage":{"input_tokens":1,'
    b'"output_tokens":2}},"sequence_number":9}\n\n',
    b'event: error\ndata: {"type":"error","message":"boom"}\n\n',
]


@settings(max_examples=int(os.environ.get("RELAY_EXAMPLES", "600")), deadline=None)
@given(
    st.sampled_from([CHAT, MESSAGES, RESPONSES]),
    st.lists(st.sampled_from(UNREDACTED_EVENTS), max_size=12),
    st.lists(st.integers(0, 2000), max_size=8),
    st.booleans(),
)
def test_redaction_off_a_read_goes_out_as_the_plain_search_sends_it(
    surface: Any, events: list[bytes], cuts: list[int], hide_usage: bool
) -> None:
    wire = b"".join(events)
    points = sorted({min(cut, len(wire)) for cut in cuts})
    reads = [wire[a:b] for a, b in itertools.pairwise([0, *points, len(wire)])]
    fast, plain = (kind(None, None, surface, hide_usage=hide_usage) for kind in (StreamRelay, _PlainSearch))
    assert [*map(fast.feed, reads), fast.close()] == [*map(plain.feed, reads), plain.close()]
    assert (fast.done, fast.usage, fast.usage_final) == (plain.done, plain.usage, plain.usage_final)


def _spaced_as_by_splitting(data: bytes, compact: bytes) -> bool:
    """`relay._spaced_as` as it decides without its quick refusal: split on quotes, the
    whitespace outside strings dropped, joined again."""
    if len(data) <= len(compact) or data.find(b"\\") >= 0:
        return False
    parts = data.split(b'"')
    parts[::2] = [part.translate(None, b" \t\r\n") for part in parts[::2]]
    return b'"'.join(parts) == compact


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.text(alphabet=' ab"\\\t\n{}:,[]é', max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["a", "b c", "d\t"]), inner, max_size=3)
    ),
    max_leaves=8,
)


@settings(max_examples=int(os.environ.get("RELAY_EXAMPLES", "600")), deadline=None)
@given(JSON_VALUES, JSON_VALUES, st.lists(st.sampled_from([b" ", b"\t", b"\n", b"\r", b"  "]), max_size=6), st.data())
def test_spaced_as_refuses_quickly_only_what_splitting_refuses(
    value: Any, other: Any, spaces: list[bytes], data: st.DataObject
) -> None:
    # An event the stream changed (its text held back) is refused without the split: what the
    # split decides stays decided the same, for spacing added anywhere, inside strings too.
    from gateway.relay import _spaced_as

    compact = json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
    spaced = bytearray(json.dumps(other if data.draw(st.booleans()) else value, ensure_ascii=False).encode())
    for space in spaces:
        at = data.draw(st.integers(0, len(spaced)))
        spaced[at:at] = space
    assert _spaced_as(bytes(spaced), compact) == _spaced_as_by_splitting(bytes(spaced), compact)
