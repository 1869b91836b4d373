"""The relay against hostile and odd upstream events (issue 15): side fields, repeated and
escaped keys, wrong types, and a fuzz target over well- and ill-formed streams."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from gateway import sse
from gateway.redact import ALL_KINDS, build_redactor
from gateway.relay import MAX_PAD, StreamRelay
from gateway.surfaces import CHAT

from .stream_equivalence import assert_same_but_for_splits

REDACTOR = build_redactor(ALL_KINDS)
assert REDACTOR is not None
EMAIL = "jane.doe@example.com"
CARD = "4242 4242 4242 4242"
# PII that must never reach the client in clear, and fragments that show it did.
CORPUS = [EMAIL, CARD, "4242424242424242", "+1 415 555 2671", "DE89 3704 0044 0532 0130 00", "078-05-1120"]


def event(body: object) -> bytes:
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


def delta_chunk(delta: dict[str, Any], index: object = 0, finish: str | None = None, **extra: Any) -> bytes:
    return event(
        {
            "id": "c1",
            "object": "chat.completion.chunk",
            "choices": [{"index": index, "delta": delta, "finish_reason": finish}],
            **extra,
        }
    )


DONE = b"data: [DONE]\n\n"


def relay_all(*reads: bytes) -> bytes:
    relay = StreamRelay(REDACTOR, None)
    out = b"".join(relay.feed(r) for r in reads)
    return out + relay.close()


def texts(wire: bytes, field: str = "content") -> str:
    out = []
    for ev in sse.SSEParser().feed(wire):
        if ev.data and ev.data != sse.DONE:
            for choice in json.loads(ev.data).get("choices", []):
                out.append((choice.get("delta") or {}).get(field) or "")
    return "".join(out)


def assert_no_clear_pii(wire: bytes) -> None:
    # Decode the JSON too: an escape must not hide a value either.
    decoded = wire.decode("utf-8", "replace")
    for ev in sse.SSEParser().feed(wire):
        if ev.data and ev.data != sse.DONE:
            with contextlib.suppress(ValueError, RecursionError):
                decoded += json.dumps(json.loads(ev.data), ensure_ascii=False)
    for value in CORPUS:
        assert value not in decoded, value


def test_logprobs_tokens_never_carry_the_text_in_clear() -> None:
    tokens = [{"token": t, "logprob": -0.1} for t in ["jane", ".doe", "@example", ".com"]]
    wire = relay_all(
        event({"id": "c1", "choices": [{"index": 0, "delta": {"content": EMAIL}, "logprobs": {"content": tokens}}]}),
        DONE,
    )
    assert_no_clear_pii(wire)
    assert "jane" not in wire.decode() and "@example" in wire.decode()


def test_refusal_and_tool_call_arguments_are_redacted_across_events() -> None:
    wire = relay_all(
        delta_chunk({"refusal": "I won't mail jane.doe@exa"}),
        delta_chunk({"refusal": "mple.com, sorry"}),
        delta_chunk(
            {
                "tool_calls": [
                    {
                        "index": 0,
                        "id": "t",
                        "type": "function",
                        "function": {"name": "f", "arguments": '{"card": 4242 4242'},
                    }
                ]
            }
        ),
        delta_chunk(
            {"tool_calls": [{"index": 0, "function": {"arguments": ' 4242 4242, "to": "jane.doe@example.com"}'}}]}
        ),
        delta_chunk({}, finish="tool_calls"),
        DONE,
    )
    assert_no_clear_pii(wire)
    assert texts(wire, "refusal") == "I won't mail j***e@example.com, sorry"
    arguments = "".join(
        call["function"].get("arguments", "")
        for ev in sse.SSEParser().feed(wire)
        if ev.data and ev.data != sse.DONE
        for choice in json.loads(ev.data)["choices"]
        for call in choice["delta"].get("tool_calls", [])
    )
    assert json.loads(arguments) == {"card": "CC_MASKED_LAST4_4242", "to": "j***e@example.com"}


def test_a_chunk_with_a_list_index_gets_no_second_response_and_no_clear_text() -> None:
    wire = relay_all(delta_chunk({"content": "hello "}), delta_chunk({"content": EMAIL}, index=[0]), DONE)
    assert_no_clear_pii(wire)
    # The stream ends with an error event (a client could file the text under index 0).
    last = sse.SSEParser().feed(wire)[-1].data
    assert last is not None and b"index is not an integer" in last and b"HTTP/1.1" not in wire


def test_a_string_index_does_not_lose_held_text() -> None:
    wire = relay_all(delta_chunk({"content": "write to jane"}), delta_chunk({"content": "x"}, index="0"), DONE)
    assert texts(wire) == "write to jane"  # "jane" is not lost: it goes out before the error event


def test_a_repeated_content_key_never_relays_the_first_value_in_clear() -> None:
    raw = (
        b'data: {"id":"c1","choices":[{"index":0,'
        b'"delta":{"content":"jane.doe@example.com","content":"ok"},"finish_reason":null}]}\n\n'
    )
    wire = relay_all(raw, DONE)
    assert_no_clear_pii(wire)
    assert texts(wire) == "ok"


def test_a_repeated_delta_key_never_relays_the_first_value_in_clear() -> None:
    raw = b'data: {"id":"c1","choices":[{"index":0,"delta":{"content":"jane.doe@example.com"},"delta":{}}]}\n\n'
    assert_no_clear_pii(relay_all(raw, DONE))


def test_an_escaped_key_is_read_as_the_key_it_spells() -> None:
    raw = b'data: {"id":"c1","choices":[{"index":0,"delta":{"\\u0063ontent":"jane.doe@example.com"}}]}\n\n'
    wire = relay_all(raw, DONE)
    assert_no_clear_pii(wire)
    assert texts(wire) == "j***e@example.com"


def test_content_that_is_not_a_string_is_redacted_whole() -> None:
    wire = relay_all(delta_chunk({"content": [EMAIL, {"text": CARD}]}), DONE)
    assert_no_clear_pii(wire)


def test_an_event_that_is_not_json_is_redacted_as_text() -> None:
    wire = relay_all(b"data: mail jane.doe@example.com now\n\n", DONE)
    assert_no_clear_pii(wire)
    assert b"j***e@example.com" in wire


def line_texts(wire: bytes) -> str:
    """The text a client that takes each `data:` line for a chunk of its own reads (many
    hand-written ones do: `for line in lines: if line.startswith("data: "): json.loads(...)`)."""
    out = []
    for line in wire.split(b"\n"):
        if line.startswith(b"data: ") and line != b"data: [DONE]":
            with contextlib.suppress(ValueError):
                for choice in json.loads(line[6:]).get("choices", []):
                    out.append((choice.get("delta") or {}).get("content") or "")
    return "".join(out)


@pytest.mark.parametrize(
    "reads",
    [
        # PII split between the data lines of one event, which are no JSON together
        [delta_chunk({"content": "card 4242 4242 "})[:-1] + delta_chunk({"content": "4242 4242 ok"}), DONE],
        [delta_chunk({"content": "mail jane.doe@"})[:-1] + delta_chunk({"content": "example.com ok"}), DONE],
        # and between a held text and such an event's second line
        [
            delta_chunk({"content": "mail jane."}),
            delta_chunk({"content": "doe@exa"})[:-1] + delta_chunk({"content": "mple.com ok"}),
            DONE,
        ],
    ],
)
def test_pii_split_between_the_data_lines_of_an_event_is_masked_as_each_line_is_read(reads: list[bytes]) -> None:
    # Each line was redacted whole on its own: the card, the address went out in two halves,
    # which a client reading line by line joins (and held text came out after the event).
    wire = relay_all(*reads)
    text = line_texts(wire)
    for value in CORPUS:
        assert value not in text, value
    assert "CC_MASKED_LAST4_4242" in text or "j***e@example.com" in text
    assert text.endswith(" ok")


def test_each_data_line_of_such_an_event_keeps_the_events_name() -> None:
    # The Anthropic SDK reads an event by its `event:` name and drops one without: each line
    # of an event split a data line at a time carries the name (the last, as SSE reads it).
    block = b"event: x\ndata: {}}\nid: 7\nevent: content_block_delta\ndata: {}}\n\n"
    events = sse.SSEParser().feed(relay_all(block))
    assert [(e.raw.split(b"\n")[0], e.data) for e in events] == [(b"event: content_block_delta", b"{}}")] * 2
    assert b"id: 7" in events[0].raw


def test_data_lines_no_client_reads_as_chunks_stay_one_event_redacted_whole() -> None:
    # Only a line a client may take for a chunk (a JSON object) or for the end goes on alone;
    # the lines between two such stay together, their text redacted whole, as before the split.
    block = (
        b"data: mail jane.doe@example.com\ndata: ok\n" + delta_chunk({"content": "hi"})[:-1] + b"data: x\ndata: y\n\n"
    )
    wire = relay_all(block, DONE)
    events = [e.data for e in sse.SSEParser().feed(wire)]
    assert events[0] == b"mail j***e@example.com\nok"
    assert events[2] == b"x\ny"
    assert (
        texts(wire.replace(b"data: mail j***e@example.com\ndata: ok\n\n", b"").replace(b"data: x\ndata: y\n\n", b""))
        == "hi"
    )


@pytest.mark.serial  # asserts a time: run alone, not beside another worker
@pytest.mark.parametrize("first", [b"", delta_chunk({"content": "hi"})[:-1]], ids=["plain", "after-a-chunk"])
def test_an_event_of_a_hundred_thousand_plain_data_lines_costs_what_its_text_does(first: bytes) -> None:
    # Each went on as an event of its own: 1 MiB of "data: x" lines took 2.5 s (16 MiB, the
    # parser's limit: 42 s of a core), 25 times its text's whole redaction (SPEC §6: about a
    # second or less for a MiB of any content).
    block = first + b"data: x\n" * (1024 * 1024 // 8) + b"\n"
    started = time.perf_counter()
    wire = relay_all(block, DONE)
    elapsed = time.perf_counter() - started
    assert wire.count(b"data: x\n") == 1024 * 1024 // 8
    assert elapsed < 1.0, elapsed


@pytest.mark.serial  # asserts a time: run alone, not beside another worker
@pytest.mark.parametrize(
    "body", [b"data: " + b" " * (128 * 1024 * 1024), b"<html>" + b"x" * (128 * 1024 * 1024)], ids=["events", "page"]
)
def test_a_reply_no_json_value_can_start_is_refused_without_reading_it_whole(body: bytes) -> None:
    # A request that asked for JSON, answered with events or a page: parsed as JSON first on the
    # event loop, where orjson scanned the whole of it and the stdlib's retry decoded all of it
    # to text (~1 s for 200 MiB of events, /healthz held 1.7-2.4 s by a 200 KiB gzip bomb).
    from gateway.relay import loads_reply

    started = time.perf_counter()
    with pytest.raises(ValueError):
        loads_reply(body)
    assert time.perf_counter() - started < 0.05
    for text in (b"NaN", b"\xef\xbb\xbf\n [1]", b"-Infinity", b'{"a":"\\ud800"}', b"true"):
        loads_reply(text)  # what the stdlib reads still is


def test_side_fields_and_unknown_fields_are_redacted() -> None:
    wire = relay_all(delta_chunk({"content": "hi", "note": EMAIL}, user={"phone": "+1 415 555 2671"}), DONE)
    assert_no_clear_pii(wire)


def test_a_compact_event_without_pii_goes_out_byte_for_byte() -> None:
    role = delta_chunk({"role": "assistant", "content": ""}, system_fingerprint="fp_1", service_tier="default")
    finish = delta_chunk({}, finish="stop")
    usage = event({"id": "c1", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}})
    wire = role + delta_chunk({"content": "Hello there. "}) + finish + usage + DONE
    relay = StreamRelay(REDACTOR, None)
    assert relay.feed(wire) == wire
    assert relay.usage is not None and relay.usage.prompt_tokens == 3


def test_many_distinct_indices_are_bounded() -> None:
    reads = [delta_chunk({"content": f"word{i} "}, index=i) for i in range(2000)]
    relay = StreamRelay(REDACTOR, None)
    for read in reads:
        relay.feed(read)
    assert len(relay._streams) <= 256


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(CORPUS), st.integers(1, 40), st.integers(0, 4), st.booleans())
def test_past_the_stream_bound_idle_streams_are_let_go_and_split_pii_stays_masked(
    pii: str, cut: int, reused: int, in_new: bool
) -> None:
    # Five streams (bound 3 here) whose texts end where nothing is held; then PII split
    # across two events, in a new stream or in one that was let go (it starts afresh): masked.
    import gateway.relay as relay_module

    text = f"write to {pii} now"
    cut = min(cut, len(text) - 1)
    target = 9 if in_new else reused
    opening = [delta_chunk({"content": "ok. "}, index=i) for i in range(5)]
    split = [delta_chunk({"content": piece}, index=target) for piece in (text[:cut], text[cut:])]
    bound = relay_module.MAX_STREAMS
    relay_module.MAX_STREAMS = 3
    try:
        relay = StreamRelay(REDACTOR, None)
        wire = b"".join(relay.feed(read) for read in [*opening, *split, DONE]) + relay.close()
    finally:
        relay_module.MAX_STREAMS = bound
    texts = "".join(
        c["delta"].get("content") or ""
        for e in sse.SSEParser().feed(wire)
        if e.data and e.data != sse.DONE
        for c in json.loads(e.data)["choices"]
        if c["index"] == target
    )
    assert pii not in texts and texts.endswith(" now")


# --- fuzz: random well- and ill-formed chat streams -------------------------------------

ORDINARY = st.sampled_from(["Hello", " ", "world", ", ", ".", "order 12345", "v3.11.7", "é", "👋", '"q"', "\\"])
PII = st.sampled_from(CORPUS)
TEXT = st.lists(st.one_of(ORDINARY, PII), min_size=1, max_size=12).map(" | ".join).map(lambda t: t + " | ")


@st.composite
def hostile_event(draw: st.DrawFn) -> bytes:
    kind = draw(st.integers(0, 7))
    text = " | " + draw(TEXT)  # apart from the text around it: glued, "x4242 ..." is not a card
    if kind == 0:
        return delta_chunk({"content": text}, index=draw(st.sampled_from([[0], "0", None, 1.5, True, -1, 2**70])))
    if kind == 1:
        return (
            f'data: {{"choices":[{{"index":0,"delta":{{"content":{json.dumps(text)},"content":" | "}}}}]}}\n\n'.encode()
        )
    if kind == 2:
        return b"data: " + text.encode() + b"\n\n"
    if kind == 3:
        return delta_chunk({"content": {"nested": text}})
    if kind == 4:
        return event({"choices": 5, "extra": text})
    if kind == 5:
        return event([text, {"content": text}])
    if kind == 6:
        return b": comment " + text.encode().replace(b"\n", b" ") + b"\n\n"
    return delta_chunk({"content": text}, logprobs={"content": [{"token": text}]})


@st.composite
def fuzz_stream(draw: st.DrawFn) -> tuple[list[str], bool, list[bytes]]:
    well_formed = draw(st.booleans())
    deltas = draw(st.lists(TEXT, min_size=1, max_size=8))
    # PII split across deltas: cut the joined text anywhere.
    whole = "".join(deltas)
    cuts = sorted(draw(st.lists(st.integers(0, len(whole)), max_size=10)))
    pieces = [whole[a:b] for a, b in itertools.pairwise([0, *cuts, len(whole)]) if whole[a:b]]
    events = [delta_chunk({"content": p}) for p in pieces]
    if not well_formed:
        for _ in range(draw(st.integers(1, 4))):
            events.insert(draw(st.integers(0, len(events))), draw(hostile_event()))
    wire = b"".join(events) + delta_chunk({}, finish="stop") + DONE
    reads_cuts = sorted(draw(st.lists(st.integers(0, len(wire)), max_size=10)))
    reads = [wire[a:b] for a, b in itertools.pairwise([0, *reads_cuts, len(wire)])]
    return pieces, well_formed, reads


@settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "400")), deadline=None)
@given(fuzz_stream())
def test_fuzz_no_clear_pii_valid_sse_and_exact_text(case: tuple[list[str], bool, list[bytes]]) -> None:
    pieces, well_formed, reads = case
    relay = StreamRelay(REDACTOR, None)
    wire = b"".join(relay.feed(r) for r in reads) + relay.close()
    assert_no_clear_pii(wire)
    events = sse.SSEParser().feed(wire)
    # Valid SSE, ended: by [DONE], or by an error event where an index was no integer.
    ended = events and (events[-1].data == sse.DONE or relay.failure is not None)
    assert ended and wire.endswith(b"\n\n")
    if well_formed:
        assert texts(wire) == REDACTOR.redact("".join(pieces))


class _AlwaysScrub(StreamRelay):
    __slots__ = ()

    def _side_may_match(self, data: bytes) -> bool:
        return True


@settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "400")), deadline=None)
@given(fuzz_stream())
def test_the_shortcut_equals_the_full_walk(case: tuple[list[str], bool, list[bytes]]) -> None:
    # The one fast path (no escape and nothing PII could be made of: only the described fields
    # are looked at) gives exactly what walking every string gives.
    _, _, reads = case
    fast, full = StreamRelay(REDACTOR, None), _AlwaysScrub(REDACTOR, None)
    assert b"".join(fast.feed(r) for r in reads) + fast.close() == b"".join(full.feed(r) for r in reads) + full.close()


def test_an_event_nested_past_the_stack_ends_the_stream() -> None:
    # Redacted whole as text, it went out while JavaScript's parser reads it (any depth), its
    # text cut off from its stream's: see test_text_beside_what_the_gateway_cannot_read_...
    deep = b"[" * 3000 + b'"jane.doe@example.com"' + b"]" * 3000
    wire = relay_all(b'data: {"choices":' + deep + b"}\n\n", DONE)
    assert_no_clear_pii(wire)
    assert b"jane" not in wire and not wire.endswith(DONE)
    assert json.loads(list(sse.SSEParser().feed(wire))[-1].data)["error"]["message"] == (
        "upstream sent an event nested too deeply to read"
    )


@settings(max_examples=2000, deadline=None)
@given(st.text(alphabet=st.sampled_from('0123456789ABZaz -.()+@"{}:,é\u00a0\u202f\u2000\u2010\u2011'), max_size=80))
def test_the_side_check_finds_every_run_the_redactor_looks_in(text: str) -> None:
    # The relay's check over bytes agrees with the redactor's own run pattern over the text
    # (no-break spaces included): a string it passes over holds nothing the redactor masks.
    from gateway.redact import _DIGIT_RUN, digit_view
    from gateway.relay import side_may_match

    assert side_may_match(text.encode()) == ("@" in text or _DIGIT_RUN.search(digit_view(text)) is not None)


class _ExactOnly(StreamRelay):
    __slots__ = ()

    def _templated(self, blocks: bytes, at: int, out: list[bytes], copied: int) -> tuple[int, int] | None:
        return None  # every event parsed


@settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "400")), deadline=None)
@given(fuzz_stream(), st.booleans(), st.lists(st.integers(0, MAX_PAD + 8), min_size=1, max_size=6))
def test_the_fast_path_equals_the_exact_path(
    case: tuple[list[str], bool, list[bytes]], messages: bool, pads: list[int]
) -> None:
    # Events of a shape seen before have their volatile strings read from their bytes; the
    # result is byte for byte what parsing every event gives, on chat and Anthropic streams,
    # these padded as Anthropic's API pads them (spaces before the last brace, of any length).
    _, _, reads = case
    if messages:  # the same texts as Anthropic events
        from gateway.surfaces import MESSAGES

        texts = [
            t
            for e in sse.SSEParser().feed(b"".join(reads))
            if e.data and e.data != sse.DONE
            for t in [_text_of(e.data)]
            if t is not None
        ]
        wire = (
            b"".join(
                b"event: content_block_delta\ndata: "
                + json.dumps(
                    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": t}},
                    separators=(",", ":"),
                    ensure_ascii=False,
                ).encode()[:-1]
                + b" " * pads[n % len(pads)]
                + b"}\n\n"
                for n, t in enumerate(texts)
            )
            + b'event: content_block_stop\ndata: {"type":"content_block_stop","index":0   }\n\n'
        )
        fast, exact = StreamRelay(REDACTOR, None, MESSAGES), _ExactOnly(REDACTOR, None, MESSAGES)
        assert_same_but_for_splits([fast.feed(wire), fast.close()], [exact.feed(wire), exact.close()])
        return
    fast, exact = StreamRelay(REDACTOR, None), _ExactOnly(REDACTOR, None)
    assert_same_but_for_splits([*map(fast.feed, reads), fast.close()], [*map(exact.feed, reads), exact.close()])


@settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "400")), deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 1), st.sampled_from([" hi", " jane", ".doe", "@exam", "ple.com", " 4242", " x"]))
    ),
    st.lists(st.integers(0, 4000), max_size=8),
)
# A card glued to letters is an id, in the whole text too (README: `4242424242424242abc` passes):
# each choice's text is what the redaction of its whole text is, not free of every card's digits.
@example(deltas=[(0, " 4242")] * 4 + [(0, "ple.com")], cuts=[])
def test_interleaved_choices_take_the_fast_path_as_the_exact_path(
    deltas: list[tuple[int, str]], cuts: list[int]
) -> None:
    # Two choices' texts in one read: a run that feeds several streams goes one by one, in
    # order (found by a review: fed stream by stream, which stream the bound lets go changed).
    wire = b"".join(delta_chunk({"content": text}, index=index) for index, text in deltas)
    wire += delta_chunk({}, index=0, finish="stop") + delta_chunk({}, index=1, finish="stop") + DONE
    points = sorted({min(cut, len(wire)) for cut in cuts})
    reads = [wire[a:b] for a, b in itertools.pairwise([0, *points, len(wire)]) if wire[a:b]]
    fast, exact = StreamRelay(REDACTOR, None), _ExactOnly(REDACTOR, None)
    outs = [*map(fast.feed, reads), fast.close()]
    assert_same_but_for_splits(outs, [*map(exact.feed, reads), exact.close()])
    got = ["", ""]
    for ev in sse.SSEParser().feed(b"".join(outs)):
        if ev.data and ev.data != sse.DONE:
            for choice in json.loads(ev.data)["choices"]:
                got[choice["index"]] += choice["delta"].get("content") or ""
    sent = ["", ""]
    for index, text in deltas:
        sent[index] += text
    assert got == [REDACTOR.redact(text) for text in sent]  # SPEC §6's split guarantee, per choice


@settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "400")), deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 5), st.sampled_from([" hi", " jane", ".doe", "@exam", "ple.com", " 4242", " x", "!"]))
    ),
    st.lists(st.integers(0, 4000), max_size=8),
)
# The text that found no room began the read: its event's start was taken one byte late, and
# that byte (the "d" of "data:") went out before the error event (found by a run of the suite).
@example(deltas=[(0, " hi"), (1, "!"), (2, " hi"), (3, " hi"), (1, " hi")], cuts=[490])
def test_past_the_stream_bound_the_fast_path_ends_the_stream_as_the_exact_path(
    deltas: list[tuple[int, str]], cuts: list[int]
) -> None:
    # Six choices, room for three streams: where a text finds no stream it may use (all hold
    # text back), the stream ends with the error event (an address split across that text's
    # events would have gone out in clear, redacted event by event). On the fast path, the
    # events of the run before that text go out as the exact path writes them, then the end.
    import gateway.relay as relay_module

    wire = b"".join(delta_chunk({"content": text}, index=index) for index, text in deltas) + DONE
    points = sorted({min(cut, len(wire)) for cut in cuts})
    reads = [wire[a:b] for a, b in itertools.pairwise([0, *points, len(wire)]) if wire[a:b]]
    bound = relay_module.MAX_STREAMS
    relay_module.MAX_STREAMS = 3
    try:
        fast, exact = StreamRelay(REDACTOR, None), _ExactOnly(REDACTOR, None)
        outs = [*map(fast.feed, reads), fast.close()]
        assert_same_but_for_splits(outs, [*map(exact.feed, reads), exact.close()])
    finally:
        relay_module.MAX_STREAMS = bound
    assert_no_clear_pii(b"".join(outs))
    assert (fast.failure is None) == (exact.failure is None)


def test_past_the_stream_bound_a_run_lets_the_same_stream_go_as_the_exact_path() -> None:
    # 256 streams, one idle: in the read A1 B1 A2 B2 the exact path lets idle A go for B, so
    # B's address, split over B1 and B2, is masked. Fed stream by stream, A's two texts first,
    # A held "bob" and B, finding no room, went out whole: the address in clear. (A2, finding
    # no room then, ends the stream: on both paths alike.)
    a, b = 0, 1
    reads = [delta_chunk({"content": "hi!"}, index=b), delta_chunk({"content": "hi jane"}, index=a)]
    reads += [delta_chunk({"content": "x jane"}, index=i) for i in range(2, 257)]
    reads += [delta_chunk({"content": "! "}, index=a)]
    reads += [
        delta_chunk({"content": "ok!"}, index=a)
        + delta_chunk({"content": "mail jane.doe@exa"}, index=b)
        + delta_chunk({"content": "bob"}, index=a)
        + delta_chunk({"content": "mple.com now"}, index=b)
    ]
    fast, exact = StreamRelay(REDACTOR, None), _ExactOnly(REDACTOR, None)
    outs = [*map(fast.feed, reads), fast.close()]
    assert_same_but_for_splits(outs, [*map(exact.feed, reads), exact.close()])
    assert_no_clear_pii(b"".join(outs))


def _text_of(data: bytes) -> str | None:
    try:
        chunk = json.loads(data)
        text = chunk["choices"][0]["delta"]["content"]
    except (ValueError, KeyError, IndexError, TypeError, RecursionError):
        return None
    return text if isinstance(text, str) else None


class FastPathCounting(StreamRelay):
    """A relay that counts the events its fast path took (a relay that refuses the fast path
    writes the same events: the property tests check that)."""

    __slots__ = ("fast_events",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fast_events = 0

    def _templated(self, blocks: bytes, at: int, out: list[bytes], copied: int) -> tuple[int, int] | None:
        spliced = super()._templated(blocks, at, out, copied)
        if spliced is not None:
            self.fast_events += blocks[at : spliced[1]].count(b"\n\n")
        return spliced


def test_events_of_one_shape_take_the_fast_path() -> None:
    # The fast path is taken (a relay that refuses it writes the same events, checked above).
    relay = FastPathCounting(REDACTOR, None)
    relay.feed(b"".join(delta_chunk({"content": f" word{i}"}, obfuscation="x" * (i % 5 + 1)) for i in range(10)))
    assert relay.fast_events >= 8


def _padded_delta(text: str, pad: int) -> bytes:
    body = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}}
    data = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
    return b"event: content_block_delta\ndata: " + data[:-1] + b" " * pad + b"}\n\n"


def test_padded_anthropic_events_take_the_fast_path_and_keep_their_pads() -> None:
    # Anthropic's API pads each event with spaces before its last brace, a different number
    # each time. Taken as part of the shape, every pad length was a shape of its own, and
    # nearly every event was parsed (a real-shaped stream relayed ~5x slower). The pad is a
    # value of its own now; it goes out as it came, in events whose text was masked too.
    from gateway.surfaces import MESSAGES

    words = [" word", " and", " mail", " jane.doe@exa", "mple.com", " now", " ok", " then", " fine", " done"]
    pads = [4, 11, 6, 3, 13, 7, 15, 9, 5, 1]
    wire = b"".join(_padded_delta(w, p) for w, p in zip(words, pads, strict=True))
    wire += b'event: content_block_stop\ndata: {"type":"content_block_stop","index":0     }\n\n'
    relay = FastPathCounting(REDACTOR, None, MESSAGES)
    out = relay.feed(wire) + relay.close()
    assert relay.fast_events >= 7
    events = [e for e in sse.SSEParser().feed(out) if e.raw.startswith(b"event: content_block_delta")]
    # Each pad as it came (after them, the gateway's own event with the text held at the end).
    assert [len(e.data) - len(e.data[:-1].rstrip()) - 1 for e in events][: len(pads)] == pads
    assert "".join(json.loads(e.data)["delta"]["text"] for e in events) == REDACTOR.redact("".join(words))
    assert b"jane.doe" not in out and out.endswith(b'"index":0     }\n\n')


def test_a_usage_chunk_the_gateway_asked_for_is_noted_not_relayed() -> None:
    usage = event({"id": "c1", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}})
    wire = delta_chunk({"content": "Hi. "}) + delta_chunk({}, finish="stop") + usage + DONE
    for redactor in (REDACTOR, None):
        hidden = StreamRelay(redactor, None, hide_usage=True)
        out = hidden.feed(wire)
        assert b'"usage":{' not in out and out.endswith(DONE)
        assert hidden.usage is not None and hidden.usage.prompt_tokens == 3
        shown = StreamRelay(redactor, None)
        assert b'"usage":{' in shown.feed(wire)


REPLY_STRINGS = st.text(alphabet=st.sampled_from("0123456789ABZaz -.()+@é\u00a0"), max_size=40)
REPLY_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**40), 2**40), REPLY_STRINGS),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(["content", "logprobs", "x", "n"]), inner, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=750, deadline=None)
@given(st.dictionaries(st.sampled_from(["id", "choices", "usage", "note", "logprobs"]), REPLY_VALUES, max_size=5))
def test_a_reply_passed_over_is_one_redaction_would_not_change(reply: dict[str, object]) -> None:
    # The JSON reply's shortcut: when its bytes hold nothing PII could be made of, the full
    # redaction (every string, logprobs dropped) leaves it as it is.
    from gateway.relay import redact_reply, reply_may_need_redaction

    data = json.dumps(reply, separators=(",", ":"), ensure_ascii=False).encode()
    if not reply_may_need_redaction(data):
        redacted = json.loads(data)
        redact_reply(REDACTOR, redacted, CHAT.reply_spec, None)
        assert redacted == reply


def test_large_events_are_never_learned() -> None:
    # A learned shape keeps the event's bytes: events past a real chunk's size are not kept,
    # so a hostile upstream's megabyte events cost no memory beyond their own relay.
    relay = StreamRelay(REDACTOR, None)
    for i in range(20):
        relay.feed(delta_chunk({"content": "hi "}, **{f"pad{i}": "x" * 1_000_000}))
    assert len(relay._plans) == 0
    relay.feed(delta_chunk({"content": "hi "}))
    assert len(relay._plans) == 1


def test_text_after_a_choices_end_cannot_complete_pii_with_what_was_flushed() -> None:
    # "jane.doe" is held, then flushed into the finishing chunk; an upstream that goes on
    # after it ("@example.com") would make an email of the two: a stream that ended takes no
    # more text.
    wire = relay_all(
        delta_chunk({"content": "write jane.doe"}),
        delta_chunk({}, finish="stop"),
        delta_chunk({"content": "@example.com now"}),
        DONE,
    )
    assert texts(wire) == "write jane.doe"


def test_redaction_off_relays_nothing_after_done() -> None:
    # Review of issue 18, D3: as with redaction on, what follows the end in the same read (or
    # later) is not relayed; a last event without its blank line is relayed as it came.
    wire = delta_chunk({"content": "Hi"}) + delta_chunk({}, finish="stop") + DONE
    more = delta_chunk({"content": EMAIL}) + DONE
    for cut in (len(wire) - 3, len(wire), len(wire) + 5):
        relay = StreamRelay(None, None)
        assert relay.feed((wire + more)[:cut]) + relay.feed((wire + more)[cut:]) + relay.close() == wire
    relay = StreamRelay(None, None)
    assert relay.feed(wire[:-2]) + relay.close() == wire and relay.done


def test_redaction_off_finds_usage_among_nulls_and_hides_only_the_asked_usage_chunk() -> None:
    # With usage asked for, OpenAI puts "usage":null on every chunk; only the last chunk's
    # usage is real. Redaction off, the relay must still find it (however it is spaced) and,
    # when the gateway asked for it, leave out that one chunk and nothing else.
    chunks = [delta_chunk({"content": f"w{i} "}, usage=None) for i in range(5)] + [
        delta_chunk({}, finish="stop", usage=None)
    ]
    for spacing in (b'"usage":{', b'"usage" : {'):
        usage = event({"id": "c1", "choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 5}})
        usage = usage.replace(b'"usage":{', spacing)
        wire = b"".join(chunks) + usage + DONE
        for cut in (len(wire), 100, 7):
            reads = [wire[i : i + cut] for i in range(0, len(wire), cut)]
            shown, hidden = StreamRelay(None, None), StreamRelay(None, None, hide_usage=True)
            assert b"".join(shown.feed(r) for r in reads) + shown.close() == wire
            assert b"".join(hidden.feed(r) for r in reads) + hidden.close() == b"".join(chunks) + DONE
            for relay in (shown, hidden):
                assert relay.usage is not None and (relay.usage.prompt_tokens, relay.usage.completion_tokens) == (7, 5)
                assert relay.done


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.sampled_from(["text", "text_null_usage", "usage", "usage_spaced", "finish", "comment", "blank"]),
        max_size=12,
    ),
    st.integers(min_value=1, max_value=64),
    st.booleans(),
    st.lists(st.sampled_from(["text", "usage", "done"]), max_size=3),
)
def test_redaction_off_notes_what_parsing_every_event_notes(
    kinds: list[str], cut: int, hide: bool, after: list[str]
) -> None:
    # The redaction-off relay parses only the events that may hold a usage; what it notes,
    # hides and sends is what parsing every event would give. Nothing after [DONE] is sent
    # (nor noted), whatever the reads.
    parts = {
        "text": delta_chunk({"content": "usage "}),
        "text_null_usage": delta_chunk({"content": '"usage":{'}, usage=None),
        "usage": event({"id": "c1", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}),
        "usage_spaced": b'data: {"id": "c1", "choices": [], "usage" : {"prompt_tokens": 4, "completion_tokens": 1}}'
        + b"\n\n",
        "finish": delta_chunk({}, finish="stop", usage=None),
        "comment": b": keep-alive\n\n",
        "blank": b"\n\n",
    }
    wire = b"".join(parts[k] for k in kinds) + DONE
    trailing = b"".join(DONE if k == "done" else parts[k] for k in after)
    reads = [(wire + trailing)[i : i + cut] for i in range(0, len(wire + trailing), cut)]
    relay = StreamRelay(None, None, hide_usage=hide)
    out = b"".join(relay.feed(r) for r in reads) + relay.close()
    noted = [json.loads(parts[k][6:])["usage"] for k in kinds if k.startswith("usage")]
    if hide:  # the same events (blank lines between them may differ)
        expected = b"".join(parts[k] for k in kinds if not k.startswith("usage")) + DONE
        assert [e.raw.strip() for e in sse.SSEParser().feed(out)] == [
            e.raw.strip() for e in sse.SSEParser().feed(expected)
        ]
    else:
        assert out == wire
    assert relay.done
    if noted:
        assert relay.usage is not None
        assert (relay.usage.prompt_tokens, relay.usage.completion_tokens) == (
            noted[-1]["prompt_tokens"],
            noted[-1]["completion_tokens"],
        )
    else:
        assert relay.usage is None


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.sampled_from(["text", "pii", "blank", "comment", "crlf_blank"]), max_size=10),
    st.integers(min_value=1, max_value=40),
    st.booleans(),
)
def test_blank_line_runs_cut_anywhere_end_and_match_the_exact_path(kinds: list[str], cut: int, messages: bool) -> None:
    # Extra blank lines, and reads that cut a blank-line run (its third newline arriving with
    # the events before it), once made `feed` loop for ever. Every such stream ends, its text
    # masked, byte for byte what the exact path gives.
    from gateway.surfaces import MESSAGES

    if messages:
        parts = {
            "text": b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
            b'"delta":{"type":"text_delta","text":"mail "}}\n\n',
            "pii": b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
            b'"delta":{"type":"text_delta","text":"jane.doe@example.com "}}\n\n',
        }
        end = b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
    else:
        parts = {"text": delta_chunk({"content": "mail "}), "pii": delta_chunk({"content": EMAIL + " "})}
        end = DONE
    parts |= {"blank": b"\n", "comment": b": keep-alive\n\n", "crlf_blank": b"\r\n"}
    wire = b"".join(parts[k] for k in kinds) + end
    reads = [wire[i : i + cut] for i in range(0, len(wire), cut)]
    surface = MESSAGES if messages else CHAT
    fast, exact = StreamRelay(REDACTOR, None, surface), _ExactOnly(REDACTOR, None, surface)
    with _deadline(2):  # each example its own: a hang fails it, and its shrinking, at once
        outs = [*map(fast.feed, reads), fast.close()]
        assert_same_but_for_splits(outs, [*map(exact.feed, reads), exact.close()])
    out = b"".join(outs)
    assert EMAIL.encode() not in out and fast.done


@contextlib.contextmanager
def _deadline(seconds: int) -> Iterator[None]:
    def expired(*_: object) -> None:
        raise TimeoutError(f"the relay did not return within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_redaction_off_counts_a_usage_under_an_escaped_key() -> None:
    # Only events that may hold a usage are parsed with redaction off: a key written with
    # escapes ("\u0075sage") is one too, or tokens_total and budgets would miss that usage.
    for key in (b'"\\u0075sage"', b'"us\\u0061ge"', b'"\\u0075\\u0073\\u0061\\u0067\\u0065"'):
        raw = b'data: {"id":"c1","choices":[],' + key + b':{"prompt_tokens":3,"completion_tokens":2}}\n\n'
        on, off = StreamRelay(REDACTOR, None), StreamRelay(None, None, hide_usage=True)
        on.feed(raw)
        assert off.feed(raw + DONE) == DONE  # noted, and hidden as the gateway asked
        assert on.usage is not None and off.usage == on.usage


@contextlib.contextmanager
def _thin_slices(chars: int) -> Iterator[None]:
    """The relay's slices for the worker thread (16 KiB) cut to a few characters, so that short
    texts are cut as megabytes are."""
    from unittest import mock

    from gateway import redact, relay

    with (
        mock.patch.object(
            relay, "feed_sliced", lambda stream, text: redact.feed_sliced(stream, text, slice_chars=chars)
        ),
        mock.patch.object(
            relay,
            "redact_sliced",
            lambda r, text, on, json_text=False: redact.redact_sliced(r, text, on, json_text, slice_chars=chars),
        ),
        mock.patch.object(relay, "YIELD_ABOVE_CHARS", chars),
    ):
        yield


def _kinds(counted: list[str]) -> dict[str, int]:
    return {kind: counted.count(kind) for kind in sorted(set(counted))}


@settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "400")), deadline=None)
@given(fuzz_stream(), st.integers(1, 7), st.lists(st.booleans(), min_size=1))
def test_a_read_relayed_aside_equals_one_relayed_on_the_loop(
    case: tuple[list[str], bool, list[bytes]], chars: int, aside: list[bool]
) -> None:
    # What the proxy does with a read of long events (`aside`, in a worker thread: texts in
    # slices, redactions noted for the loop) gives what `feed` gives, and the same counts. But
    # for one thing: a run of fast-path events whose texts add up past a slice is fed one by
    # one, not at once, so a stream's text may be spread over the read's events otherwise.
    _, _, reads = case
    counted: list[str] = []
    loop = StreamRelay(REDACTOR, counted.append)
    expected = [loop.feed(r) for r in reads] + [loop.close()]
    reported: list[str] = []
    noted: dict[str, int] = {}
    relay = StreamRelay(REDACTOR, reported.append)
    got = []
    with _thin_slices(chars):
        for number, read in enumerate([*reads, None]):
            if aside[number % len(aside)]:
                relay.busy = True
                got.append(relay.aside(read, noted))
                assert not relay.busy
            else:
                got.append(relay.feed(read) if read is not None else relay.close())
    assert_same_but_for_splits(got, expected)
    for kind in reported:
        noted[kind] = noted.get(kind, 0) + 1
    assert dict(sorted(noted.items())) == _kinds(counted)


@pytest.mark.parametrize("unit", ["4242 4242 4242 4241 ", "4242 4242 4242 4242 jane@example.com ", "+1 (", "-"])
@pytest.mark.parametrize("where", ["content", "arguments", "side", "comment"])
def test_a_long_event_relayed_aside_equals_it_relayed_on_the_loop(unit: str, where: str) -> None:
    # 256 KiB (megabytes cost seconds each way): the 16 KiB slices themselves, every field kind.
    text = unit * (256 * 1024 // len(unit))
    if where == "content":
        big = delta_chunk({"content": text})
    elif where == "arguments":
        big = delta_chunk({"tool_calls": [{"index": 0, "function": {"arguments": json.dumps({"a": text})}}]})
    elif where == "side":
        big = delta_chunk({"content": "hi"}, side=text)
    else:
        big = b": " + text.encode() + b"\n\n"
    reads = [delta_chunk({"role": "assistant", "content": "hi "}), big[:1000], big[1000:], DONE]
    counted: list[str] = []
    loop = StreamRelay(REDACTOR, counted.append)
    expected = b"".join(loop.feed(r) for r in reads) + loop.close()
    noted: dict[str, int] = {}
    reported: list[str] = []
    relay = StreamRelay(REDACTOR, reported.append)
    got = relay.feed(reads[0]) + relay.feed(reads[1])
    relay.busy = True
    got += relay.aside(reads[2], noted)
    assert not reported  # from the thread: noted, for the loop to report
    got += relay.feed(reads[3]) + relay.close()
    assert got == expected
    for kind in reported:  # what was held and flushed on the loop after
        noted[kind] = noted.get(kind, 0) + 1
    assert dict(sorted(noted.items())) == _kinds(counted)


@settings(max_examples=2000, deadline=None)
@given(
    st.text(alphabet=st.sampled_from('0123456789ABZaz -.()+@"{}:,é\u00a0\u202f\u2000'), max_size=300),
    st.integers(1, 40),
)
def test_the_side_check_in_windows_finds_what_one_search_finds(text: str, window: int) -> None:
    # A long event's bytes are searched in windows (one search over megabytes holds the GIL).
    from unittest import mock

    from gateway import relay
    from gateway.redact import _DIGIT_RUN, digit_view

    with mock.patch.object(relay, "_SEARCH_BYTES", window):
        assert relay.side_may_match(text.encode()) == ("@" in text or _DIGIT_RUN.search(digit_view(text)) is not None)


@settings(max_examples=2000, deadline=None)
@given(st.text(alphabet=st.sampled_from("ABZaz09+/=- ."), max_size=300))
def test_the_side_check_of_base64_is_the_run_pattern(text: str) -> None:
    # Base64 (an embedding, a pad) has a "+" every 64 characters: the check looks for a "+"
    # and three run characters first (_PLUS_RUN), then for the whole pattern.
    from gateway.relay import _RUN_IN_BYTES, side_may_match

    data = text.encode()
    assert side_may_match(data) == (_RUN_IN_BYTES.search(data) is not None)


# --- Events a client reads where the gateway could not: their text must not escape its stream --
def _client_text(wire: bytes, key: str) -> str:
    """The `key` strings a client joins: one that decodes the stream as EventSource does (U+FFFD
    for invalid UTF-8, a leading BOM dropped) and parses JSON at any depth (JavaScript's)."""
    text = wire.decode("utf-8-sig", "replace")
    return "".join(json.loads(f'"{m}"') for m in re.findall(f'"{key}":"((?:[^"\\\\]|\\\\.)*)"', text))


def _chat(text: str, side: bytes = b"") -> bytes:
    wire = delta_chunk({"content": text})
    return wire[: -len(b"}\n\n")] + side + b"}\n\n" if side else wire


def _block(text: str, side: bytes = b"") -> bytes:
    body = b'{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":' + json.dumps(text).encode()
    return b"event: content_block_delta\ndata: " + body + b"}" + side + b"}\n\n"


def _output_text(text: str, side: bytes = b"") -> bytes:
    body = b'{"type":"response.output_text.delta","item_id":"m","output_index":0,"content_index":0,"delta":'
    return b"event: response.output_text.delta\ndata: " + body + json.dumps(text).encode() + side + b"}\n\n"


_DEEP_LISTS = b',"x":' + b"[" * 1100 + b"]" * 1100  # past any parser's depth here, not JavaScript's
_DEEP_OBJECTS = b',"x":' + b'{"a":' * 600 + b"1" + b"}" * 600  # parsed, but past the walk's stack
_PARSED_LISTS = b',"x":' + b"[" * 1000 + b"]" * 1000  # parsed (orjson), but past json.dumps's stack: was a 500


@pytest.mark.parametrize(
    "side",
    [b',"x":"\xff"', _DEEP_LISTS, _DEEP_OBJECTS, _PARSED_LISTS],
    ids=["bad-utf8", "deep-lists", "deep", "parsed-lists"],
)
@pytest.mark.parametrize("api", ["chat", "messages", "responses"])
def test_text_beside_what_the_gateway_cannot_read_stays_in_its_stream(api: str, side: bytes) -> None:
    # An invalid UTF-8 byte, or nesting past the parser's stack, in another field of the event:
    # clients still read its text (EventSource writes U+FFFD, JavaScript parses any depth) and
    # join it to the next event's. Redacted whole apart from its stream, "jane.doe@" went out
    # in clear, then "example.com" (or the stream's mask after it: the address twice over).
    from gateway.openai_apis import RESPONSES
    from gateway.surfaces import MESSAGES

    make, surface, key = {
        "chat": (_chat, CHAT, "content"),
        "messages": (_block, MESSAGES, "text"),
        "responses": (_output_text, RESPONSES, "delta"),
    }[api]
    relay = StreamRelay(REDACTOR, None, surface)
    wire = relay.feed(make("Write to jane.doe@", side)) + relay.feed(make("example.com today."))
    wire += relay.close()
    text = _client_text(wire, key)
    assert EMAIL not in text
    assert not ("jane.doe@" in text and "example.com" in text), text


def test_a_bom_does_not_hide_the_first_event_from_redaction() -> None:
    wire = relay_all(b"\xef\xbb\xbf" + _chat("Write to jane.doe@"), _chat("example.com today."), DONE)
    assert _client_text(wire, "content") == "Write to j***e@example.com today."


@pytest.mark.parametrize("api", ["chat", "messages", "responses"])
def test_a_second_bom_does_not_open_what_the_gateway_sends(api: str) -> None:
    # The stream's BOM is dropped; a second one opens the first line, an unknown field for the
    # gateway and for a client of the upstream. Written as it came, it opened the gateway's own
    # stream, where a client's decoder (TextDecoder, EventSource) dropped it and read the line as
    # data: "jane.doe@" there (redacted whole: nothing to mask) and "example.com" next, in clear.
    from gateway.openai_apis import RESPONSES
    from gateway.surfaces import MESSAGES

    make, surface, key = {
        "chat": (_chat, CHAT, "content"),
        "messages": (_block, MESSAGES, "text"),
        "responses": (_output_text, RESPONSES, "delta"),
    }[api]
    bom = b"\xef\xbb\xbf"
    relay = StreamRelay(REDACTOR, None, surface)
    wire = relay.feed(bom + bom + make("Write to jane.doe@")) + relay.feed(make("example.com today.")) + relay.close()
    read: list[str] = []
    for block in wire.decode("utf-8-sig").split("\n\n"):  # the client's decoder drops one BOM
        lines = [line[5:].removeprefix(" ") for line in block.split("\n") if line.startswith("data:")]
        if lines and lines != ["[DONE]"]:
            read.append(_client_text(("\n".join(lines)).encode(), key))
    assert EMAIL not in "".join(read) and not ("jane.doe@" in "".join(read) and "example.com" in "".join(read))


@pytest.mark.parametrize("done", [b"[DONE] ", b"[DONE]\r", b"[DONE]x jane.doe@example.com"])
def test_data_that_starts_with_done_ends_the_stream_after_held_text(done: bytes) -> None:
    # The openai SDKs stop at data that starts with [DONE]: text held back (a number that may
    # become a card) went out after it, where the client no longer read ("Build " only).
    wire = relay_all(_chat("Build 4242 4242"), b"data: " + done + b"\n\n", _chat(" more"))
    read: list[str] = []
    for ev in sse.SSEParser().feed(wire):
        assert ev.data is not None
        if ev.data.decode().startswith("[DONE]"):
            break
        read += [choice["delta"].get("content", "") for choice in json.loads(ev.data)["choices"]]
    assert "".join(read) == "Build 4242 4242"
    assert wire.endswith(b"data: [DONE]\n\n") and b"jane" not in wire


@settings(max_examples=200, deadline=None)
@given(
    text=st.lists(st.sampled_from([EMAIL, CARD, "+1 415 555 2671", "see ", " ok", "12", "."]), min_size=1, max_size=6),
    cuts=st.lists(st.integers(0, 200), max_size=4),
    reads=st.sampled_from([1, 2, 100]),
)
def test_a_delta_field_no_description_names_streams_like_content(text: list[str], cuts: list[int], reads: int) -> None:
    """A server's own field of a chat delta ("reasoning_text") is joined across chunks by the
    openai SDK's stream helper as content is: for any split, the joined field is the redaction
    of the whole (it was redacted event by event, so a split address was joined in clear)."""
    whole = "".join(text)
    bounds = sorted({0, len(whole), *(cut % (len(whole) + 1) for cut in cuts)})
    events = [delta_chunk({"reasoning_text": whole[a:b], "content": "x"}) for a, b in itertools.pairwise(bounds)]
    events += [delta_chunk({}, finish="stop"), DONE]
    per_read = [b"".join(events[at : at + reads]) for at in range(0, len(events), reads)]
    assert texts(relay_all(*per_read), "reasoning_text") == REDACTOR.redact(whole)


@pytest.mark.serial  # asserts a time: run alone, not beside another worker
def test_choices_without_an_index_cost_what_their_event_does() -> None:
    # Each choice without an index read the whole event's description again (every choice, for
    # a delta field no description names): quadratic, 4,000 such choices (52 KB) took 2.4 s of
    # the event loop, 10,000 about 15 s.
    body = {"choices": [{"delta": {}}] * 10_000 + [{"index": 0, "delta": {"x": 1}}]}
    started = time.perf_counter()
    wire = relay_all(event(body), DONE)
    elapsed = time.perf_counter() - started
    assert wire.endswith(DONE)
    assert elapsed < 0.5, elapsed


@settings(max_examples=200, deadline=None)
@given(
    text=st.lists(st.sampled_from([EMAIL, CARD, "+1 415 555 2671", "see ", " ok", "12", "."]), min_size=1, max_size=6),
    cuts=st.lists(st.integers(0, 200), max_size=4),
)
def test_an_object_no_description_names_streams_its_strings_key_by_key(text: list[str], cuts: list[int]) -> None:
    """The openai SDK's stream helper joins a delta's objects key by key (accumulate_delta), a
    server's own `{"x": {"y": ...}}` too: each of its strings, redacted whole event by event,
    was joined in clear when an address was split between two chunks."""
    whole = "".join(text)
    bounds = sorted({0, len(whole), *(cut % (len(whole) + 1) for cut in cuts)})
    events = [
        delta_chunk({"x": {"y": whole[a:b], "type": "t", "z": {"w": whole[a:b]}}})
        for a, b in itertools.pairwise(bounds)
    ]
    wire = relay_all(*events, delta_chunk({}, finish="stop"), DONE)
    joined: dict[str, str] = {"y": "", "w": ""}
    for ev in sse.SSEParser().feed(wire):
        if ev.data and ev.data != sse.DONE:
            for choice in json.loads(ev.data)["choices"]:
                x = (choice.get("delta") or {}).get("x") or {}
                joined["y"] += x.get("y") or ""
                joined["w"] += (x.get("z") or {}).get("w") or ""
    assert joined == {"y": REDACTOR.redact(whole), "w": REDACTOR.redact(whole)}


def test_a_field_that_is_a_string_in_one_choice_and_an_object_in_another_is_redacted() -> None:
    body = {"choices": [{"index": 0, "delta": {"x": "mail " + EMAIL}}, {"index": 1, "delta": {"x": {"y": EMAIL}}}]}
    wire = relay_all(event(body), DONE)
    assert EMAIL.encode() not in wire and wire.endswith(DONE)


@settings(max_examples=200, deadline=None)
@given(
    text=st.lists(st.sampled_from([EMAIL, CARD, "+1 415 555 2671", "see ", " ok", "12", "."]), min_size=1, max_size=6),
    cuts=st.lists(st.integers(0, 200), max_size=4),
)
def test_a_role_inside_a_servers_object_streams_as_the_sdk_joins_it(text: list[str], cuts: list[int]) -> None:
    """The SDK's stream helper (accumulate_delta) replaces only `type` and `index` inside a
    delta's object: a `role` there it joins across chunks, so redacted whole event by event,
    an address split between two chunks' `{"x": {"role": ...}}` was joined in clear."""
    from openai.lib.streaming._deltas import accumulate_delta

    whole = "".join(text)
    bounds = sorted({0, len(whole), *(cut % (len(whole) + 1) for cut in cuts)})
    reads = [delta_chunk({"x": {"role": whole[a:b]}}) for a, b in itertools.pairwise(bounds)]
    reads += [delta_chunk({}, finish="stop"), DONE]
    fast, exact = StreamRelay(REDACTOR, None), _ExactOnly(REDACTOR, None)
    outs = [*map(fast.feed, reads), fast.close()]
    assert_same_but_for_splits(outs, [*map(exact.feed, reads), exact.close()])
    joined: dict[object, object] = {}
    for ev in sse.SSEParser().feed(b"".join(outs)):
        if ev.data and ev.data != sse.DONE:
            for choice in json.loads(ev.data)["choices"]:
                accumulate_delta(joined, choice["delta"])
    assert joined["x"] == {"role": REDACTOR.redact(whole)}
