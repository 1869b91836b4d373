"""Parallel tool calls in a chat stream, as the openai SDK's stream helper reads them.

OpenAI streams parallel tool calls one after another: a call opens (its `id`, `type` and
`function.name`, arguments ""), its arguments follow in pieces, then the next call opens. The
SDK's `client.chat.completions.stream(...)` takes a call for done when a delta for another
call's index arrives: it fires `tool_calls.function.arguments.done` with the arguments it has
then and, for a strict (pydantic) tool, validates them. The text the gateway held back for
redaction must have reached the client by then."""

from __future__ import annotations

import itertools
import json
import time
from typing import Any

import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletionChunk
from pydantic import BaseModel

from gateway import sse
from gateway.redact import ALL_KINDS, build_redactor
from gateway.relay import StreamRelay
from gateway.surfaces import CHAT, CHAT_JSON, Surface

from .stream_equivalence import assert_same_but_for_splits
from .test_redact import PII_VALUES
from .test_relay_hostile import _ExactOnly

REDACTOR = build_redactor(ALL_KINDS)
FIRST = json.dumps({"to": "jane.doe@example.com", "subject": "Card 4242 4242 4242 4242", "body": "hi"})
SECOND = json.dumps({"city": "Paris", "note": "jdoe@corp.example.org"})


class SendEmail(BaseModel):
    to: str
    subject: str
    body: str


class GetWeather(BaseModel):
    city: str
    note: str


TOOLS = [
    openai.pydantic_function_tool(SendEmail, name="send_email"),
    openai.pydantic_function_tool(GetWeather, name="get_weather"),
]


def _chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
    body = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "gpt-4o",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


def _calls_stream(size: int) -> list[bytes]:
    """Two tool calls as OpenAI streams them, arguments in pieces of `size` characters."""
    events = [_chunk({"role": "assistant", "content": None, "refusal": None})]
    for index, (call_id, name, arguments) in enumerate(
        [("call_1", "send_email", FIRST), ("call_2", "get_weather", SECOND)]
    ):
        opening = {"index": index, "id": call_id, "type": "function", "function": {"name": name, "arguments": ""}}
        events.append(_chunk({"tool_calls": [opening]}))
        for at in range(0, len(arguments), size):
            piece = arguments[at : at + size]
            events.append(_chunk({"tool_calls": [{"index": index, "function": {"arguments": piece}}]}))
    return [*events, _chunk({}, "tool_calls"), b"data: [DONE]\n\n"]


def _sdk_events(wire: bytes) -> list[Any]:
    state = ChatCompletionStreamState(input_tools=TOOLS)
    events = []
    for event in sse.SSEParser().feed(wire):
        if event.data and event.data != sse.DONE:
            events += state.handle_chunk(ChatCompletionChunk.model_validate(json.loads(event.data)))
    return events


@pytest.mark.parametrize("size", [1, 3, 7, 200])
def test_the_sdk_helper_gets_each_call_whole_before_the_next_one_opens(size: int) -> None:
    # Before: the first call's held tail ("jane.doe@example.com", ..., "}") went out only in
    # the finish chunk, after the second call had opened: the helper fired arguments.done for
    # it with `{"to": "` and pydantic raised a ValidationError inside the client's loop.
    relay = StreamRelay(REDACTOR, None)
    wire = b"".join(relay.feed(event) for event in _calls_stream(size)) + relay.close()
    done = [e for e in _sdk_events(wire) if e.type == "tool_calls.function.arguments.done"]
    assert [json.loads(e.arguments) for e in done] == [
        {"to": "j***e@example.com", "subject": "Card CC_MASKED_LAST4_4242", "body": "hi"},
        {"city": "Paris", "note": "j***e@corp.example.org"},
    ]
    assert done[0].parsed_arguments == SendEmail(to="j***e@example.com", subject="Card CC_MASKED_LAST4_4242", body="hi")


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 12), st.lists(st.integers(0, 3000), max_size=6))
def test_calls_that_open_in_turn_take_the_fast_path_as_the_exact_path(size: int, cuts: list[int]) -> None:
    # An opening event ends the calls before it on either path (it is never of a learned shape).
    wire = b"".join(_calls_stream(size))
    points = sorted({min(cut, len(wire)) for cut in cuts})
    reads = [wire[a:b] for a, b in zip([0, *points], [*points, len(wire)], strict=True) if wire[a:b]]
    fast, exact = StreamRelay(REDACTOR, None), _ExactOnly(REDACTOR, None)
    outs = [*map(fast.feed, reads), fast.close()]
    assert_same_but_for_splits(outs, [*map(exact.feed, reads), exact.close()])
    out = b"".join(outs)
    assert b"jane.doe" not in out and b"4242 4242" not in out


def _content_then_call(content: list[str], after: str = "") -> list[bytes]:
    """Text before a tool call (Claude's "I'll check the weather…", gpt-4o's too), as deltas."""
    events = [_chunk({"role": "assistant", "content": ""})]
    events += [_chunk({"content": piece}) for piece in content]
    opening = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}
    events.append(_chunk({"tool_calls": [opening]}))
    events.append(_chunk({"tool_calls": [{"index": 0, "function": {"arguments": SECOND}}]}))
    if after:
        events.append(_chunk({"content": after}))
    return [*events, _chunk({}, "tool_calls"), b"data: [DONE]\n\n"]


@pytest.mark.parametrize(
    ("pieces", "done"),
    [
        (["I'll check the weather in Paris for you."], "I'll check the weather in Paris for you."),
        (["Let me look that up"], "Let me look that up"),
        (["Writing to jane.doe@exa", "mple.com"], "Writing to j***e@example.com"),
    ],
)
def test_the_sdk_helper_gets_the_content_whole_before_the_first_call(pieces: list[str], done: str) -> None:
    # Before: the content's held tail ("you.", "up", the address) went out only in the finish
    # chunk, after the call had opened: the helper fired content.done with "… for " and then
    # a content.delta after it.
    relay = StreamRelay(REDACTOR, None)
    wire = b"".join(relay.feed(event) for event in _content_then_call(pieces)) + relay.close()
    events = _sdk_events(wire)
    assert [e.content for e in events if e.type == "content.done"] == [done]
    kinds = [e.type for e in events if e.type != "chunk"]
    assert kinds.index("content.done") > max(i for i, kind in enumerate(kinds) if kind == "content.delta")


def test_text_after_the_calls_still_reaches_the_client() -> None:
    relay = StreamRelay(REDACTOR, None)
    events = _content_then_call(["Let me look that up"], after=" and mail jane.doe@example.com")
    wire = b"".join(relay.feed(event) for event in events) + relay.close()
    state = ChatCompletionStreamState(input_tools=TOOLS)
    for event in sse.SSEParser().feed(wire):
        if event.data and event.data != sse.DONE:
            state.handle_chunk(ChatCompletionChunk.model_validate(json.loads(event.data)))
    message = state.get_final_completion().choices[0].message
    assert message.content == "Let me look that up and mail j***e@example.com"
    assert json.loads(message.tool_calls[0].function.arguments) == {"city": "Paris", "note": "j***e@corp.example.org"}


@pytest.mark.parametrize(
    ("before", "after", "clear"),
    [
        ("Writing to jane.doe@", "example.com today", "jane.doe@example.com"),
        ("card 4242 4242 ", "4242 4242 ok", "4242 4242 4242 4242"),
        ("call +1 415 ", "555 2671 now", "415 555 2671"),
    ],
)
def test_pii_split_around_the_calls_is_not_joined_in_clear(before: str, after: str, clear: str) -> None:
    # Claude writes text, a tool_use, more text: translated to chat, one content. The openai
    # SDK (and any client that appends delta.content) joins the two halves: the content's
    # held tail went out before the call (for content.done) and the text after the calls
    # started afresh, so each half was redacted alone. Only what was sent stays in clear.
    relay = StreamRelay(REDACTOR, None)
    events = _content_then_call([before], after=after)
    wire = b"".join(relay.feed(event) for event in events) + relay.close()
    state = ChatCompletionStreamState(input_tools=TOOLS)
    for event in sse.SSEParser().feed(wire):
        if event.data and event.data != sse.DONE:
            state.handle_chunk(ChatCompletionChunk.model_validate(json.loads(event.data)))
    assert clear not in (state.get_final_completion().choices[0].message.content or "")


def _joined_content(before: str, after: str) -> str:
    relay = StreamRelay(REDACTOR, None)
    wire = b"".join(relay.feed(event) for event in _content_then_call([before], after=after)) + relay.close()
    state = ChatCompletionStreamState(input_tools=TOOLS)
    for event in sse.SSEParser().feed(wire):
        if event.data and event.data != sse.DONE:
            state.handle_chunk(ChatCompletionChunk.model_validate(json.loads(event.data)))
    return state.get_final_completion().choices[0].message.content or ""


@settings(max_examples=300, deadline=None)
@given(
    value=PII_VALUES,
    words=st.tuples(st.sampled_from(["Write to ", "ok ", "", "see: "]), st.sampled_from([" today.", "", " and 12"])),
    cut=st.integers(0, 200),
)
def test_content_split_anywhere_around_the_calls_never_joins_pii_in_clear(
    value: str, words: tuple[str, str], cut: int
) -> None:
    text = words[0] + value + words[1]
    at = cut % (len(text) + 1)
    joined = _joined_content(text[:at], text[at:])
    assert value not in joined  # whole, or completed by the text after the calls
    # What went out before the calls is that text redacted, as content.done showed it.
    assert joined.startswith(REDACTOR.redact(text[:at])) or at == 0


@given(before=st.text(st.sampled_from("ab .,\n"), max_size=40), after=st.text(st.sampled_from("ab .,\n"), max_size=40))
@settings(max_examples=200, deadline=None)
def test_content_without_pii_around_the_calls_arrives_whole(before: str, after: str) -> None:
    assert _joined_content(before or "x", after or "y") == (before or "x") + (after or "y")


def test_a_call_the_upstream_comes_back_to_keeps_its_arguments_when_it_held_nothing() -> None:
    """The format keys tool-call deltas by index and promises no order: an upstream may come
    back to a call after the next one opened. The opening settles the earlier call, and one
    that held nothing (its arguments so far end at a quote) went on being ended all the same:
    the rest of its arguments was dropped and the client got broken JSON."""

    def opening(index: int, name: str) -> dict[str, Any]:
        return {"index": index, "id": f"call_{index}", "type": "function", "function": {"name": name, "arguments": ""}}

    def args(index: int, piece: str) -> bytes:
        return _chunk({"tool_calls": [{"index": index, "function": {"arguments": piece}}]})

    events = [
        _chunk({"role": "assistant", "content": None}),
        _chunk({"tool_calls": [opening(0, "get_weather")]}),
        args(0, '{"city": "'),
        _chunk({"tool_calls": [opening(1, "get_weather")]}),
        args(1, '{"city": "Rome", "note": "x"}'),
        args(0, 'Paris", "note": "mail jane.doe@example.com"}'),
        _chunk({}, "tool_calls"),
        b"data: [DONE]\n\n",
    ]
    relay = StreamRelay(REDACTOR, None)
    wire = b"".join(relay.feed(event) for event in events) + relay.close()
    arguments = {0: "", 1: ""}
    for event in sse.SSEParser().feed(wire):
        if event.data and event.data != sse.DONE:
            for choice in json.loads(event.data)["choices"]:
                for call in choice["delta"].get("tool_calls") or ():
                    arguments[call["index"]] += call["function"].get("arguments") or ""
    assert json.loads(arguments[0]) == {"city": "Paris", "note": "mail j***e@example.com"}
    assert json.loads(arguments[1]) == {"city": "Rome", "note": "x"}


def _content_around_calls(pieces: list[str]) -> list[bytes]:
    """Content, a call, content, another call, ...: text and tool_use blocks in turn, as Claude
    writes them (translated to chat: one content with the calls between its pieces)."""
    events = [_chunk({"role": "assistant", "content": ""})]
    for index, piece in enumerate(pieces):
        events.append(_chunk({"content": piece}))
        if index < len(pieces) - 1:
            opening = {"index": index, "id": f"call_{index}", "type": "function"}
            opening["function"] = {"name": "get_weather", "arguments": ""}
            events.append(_chunk({"tool_calls": [opening]}))
            events.append(_chunk({"tool_calls": [{"index": index, "function": {"arguments": SECOND}}]}))
    return [*events, _chunk({}, "tool_calls"), b"data: [DONE]\n\n"]


def _sdk_content(events: list[bytes], surface: Surface = CHAT) -> str:
    """The content the openai SDK's stream helper joins from what the relay makes of `events`."""
    relay = StreamRelay(REDACTOR, None, surface)
    wire = b"".join(relay.feed(event) for event in events) + relay.close()
    state = ChatCompletionStreamState(input_tools=TOOLS)
    for event in sse.SSEParser().feed(wire):
        if event.data and event.data != sse.DONE:
            state.handle_chunk(ChatCompletionChunk.model_validate(json.loads(event.data)))
    return state.get_final_completion().choices[0].message.content or ""


@pytest.mark.parametrize(
    ("pieces", "clear"),
    [
        (["card 4242 ", "4242 ", "4242 4242 ok"], "4242 4242 4242 4242"),
        (["card 4242 4242 ", "4242 ", "4242 ok"], "4242 4242 4242 4242"),
        (["mail jane.doe", "@", "example.com ok"], "jane.doe@example.com"),
        (["call +1 415 ", "555 ", "2671 now"], "415 555 2671"),
    ],
)
def test_pii_split_around_two_calls_is_not_joined_in_clear(pieces: list[str], clear: str) -> None:
    # Before: the text after the second call continued only what went out between the two
    # calls (" 4242 "), not the text before the first one: the SDK joined the card whole.
    assert clear not in _sdk_content(_content_around_calls(pieces))


@settings(max_examples=300, deadline=None)
@given(
    value=PII_VALUES,
    words=st.tuples(st.sampled_from(["Write to ", "ok ", "", "see: "]), st.sampled_from([" today.", "", " and 12"])),
    cuts=st.lists(st.integers(0, 200), min_size=1, max_size=4),
)
def test_content_split_anywhere_around_several_calls_never_joins_pii_in_clear(
    value: str, words: tuple[str, str], cuts: list[int]
) -> None:
    text = words[0] + value + words[1]
    bounds = sorted({0, len(text), *(cut % (len(text) + 1) for cut in cuts)})
    pieces = [text[a:b] for a, b in itertools.pairwise(bounds)]
    assert value not in _sdk_content(_content_around_calls(pieces))


@given(pieces=st.lists(st.text(st.sampled_from("ab .,\n"), min_size=1, max_size=20), min_size=1, max_size=5))
@settings(max_examples=200, deadline=None)
def test_content_without_pii_around_several_calls_arrives_whole(pieces: list[str]) -> None:
    assert _sdk_content(_content_around_calls(pieces)) == "".join(pieces)


# Structured output (`response_format` json_schema / json_object: CHAT_JSON) reads the content
# as JSON text. Content, a call, content: the text after the calls continues the same JSON
# document (every client appends it), inside the string the calls cut. It started afresh, as
# a new document: "jane.doe@exa" went out before the call, "mple.com" after it, and the
# client's content held the address whole; a card's digits after the call were read as a
# number outside any string and masked with quotes round it, which broke the document.
def _sdk_json_content(pieces: list[str]) -> str:
    return _sdk_content(_content_around_calls(pieces), CHAT_JSON)


@pytest.mark.parametrize(
    ("pieces", "clear"),
    [
        (['{"note":"mail jane.doe@exa', 'mple.com now"}'], "jane.doe@example.com"),
        (['{"note":"mail jane.doe', "@", 'example.com now"}'], "jane.doe@example.com"),
        (['{"note":"card 4242 4242 ', '4242 4242 ok"}'], "4242 4242 4242 4242"),
        (['{"note":"card ', '4242 4242 4242 4242 ok"}'], "4242 4242 4242 4242"),
        (['{"note":"hello ', 'jane.doe@example.com"}'], "jane.doe@example.com"),
        (['{"note":"call +1 415 ', "555 ", '2671 now"}'], "415 555 2671"),
        # An escape the call cuts: held back, its rest after the call finishes it.
        (['{"note":"mail j\\u00', 'e4ne@ex\\u00e4mple.com"}'], "jäne@exämple.com"),
    ],
)
def test_a_json_content_split_around_calls_is_one_document(pieces: list[str], clear: str) -> None:
    content = _sdk_json_content(pieces)
    assert clear not in json.loads(content)["note"]  # still the one JSON document


@settings(max_examples=300, deadline=None)
@given(
    value=PII_VALUES,
    words=st.tuples(st.sampled_from(["Write to ", "ok ", "", "see: "]), st.sampled_from([" today.", "", " and 12"])),
    cuts=st.lists(st.integers(0, 200), min_size=1, max_size=3),
)
def test_a_json_content_split_anywhere_around_calls_never_joins_pii_in_clear(
    value: str, words: tuple[str, str], cuts: list[int]
) -> None:
    document = json.dumps({"note": words[0] + value + words[1], "n": 12})
    bounds = sorted({0, len(document), *(cut % (len(document) + 1) for cut in cuts)})
    pieces = [document[a:b] for a, b in itertools.pairwise(bounds)]
    note = json.loads(_sdk_json_content(pieces))["note"]
    assert value not in note


@given(pieces=st.lists(st.text(st.sampled_from('ab .,:\n"{}'), min_size=1, max_size=20), min_size=1, max_size=4))
@settings(max_examples=200, deadline=None)
def test_a_json_content_without_pii_around_calls_arrives_whole(pieces: list[str]) -> None:
    assert _sdk_json_content(pieces) == "".join(pieces)


def test_an_escape_the_calls_cut_goes_out_when_no_content_follows() -> None:
    # Held back at the call (no character until its rest comes), it must not be lost when the
    # rest never comes: every character the upstream sent reaches the client.
    pieces = ['{"note":"mail j\\u00']
    events = _content_around_calls([*pieces, "x"])
    events = [event for event in events if b'"content":"x"' not in event]  # no content after the call
    relay = StreamRelay(REDACTOR, None, CHAT_JSON)
    wire = b"".join(relay.feed(event) for event in events) + relay.close()
    content = "".join(
        choice["delta"].get("content") or ""
        for event in sse.SSEParser().feed(wire)
        if event.data and event.data != sse.DONE
        for choice in json.loads(event.data)["choices"]
    )
    assert content == pieces[0]


def _choice_chunk(index: int, delta: dict[str, Any], finish: str | None = None) -> bytes:
    """One choice's chat chunk, compact as OpenAI writes it."""
    body = {"object": "chat.completion.chunk", "choices": [{"index": index, "delta": delta, "finish_reason": finish}]}
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


# A call's first delta.
_OPENING = {"tool_calls": [{"index": 0, "id": "c", "type": "function", "function": {"name": "f"}}]}


@pytest.mark.serial  # asserts a time: run alone, not beside another worker
def test_thousands_of_choices_paused_at_a_call_cost_what_their_text_does() -> None:
    # Each choice's finish looked through every choice paused at a tool call (a content to go
    # on): quadratic, 8,000 choices (4 MB) held the event loop 10 s, against 0.4 s before.
    events = [_choice_chunk(i, {"content": "hi"}) + _choice_chunk(i, _OPENING) for i in range(8000)]
    events += [_choice_chunk(i, {}, "tool_calls") for i in range(8000)]
    relay = StreamRelay(REDACTOR, None)
    started = time.perf_counter()
    wire = b"".join(map(relay.feed, events)) + relay.feed(b"data: [DONE]\n\n") + relay.close()
    elapsed = time.perf_counter() - started
    assert wire.count(b'"content":"hi"') == 8000 and wire.endswith(b"data: [DONE]\n\n")
    assert elapsed < 3.0, elapsed


# A number of a structured output that a tool call cuts: `{"n": 4242` + call + `424242424242}`.
# Flushed at the call, its digits went out as they were, and those after the call made a card
# with them (a mask quoted after them: `4242"CC_MASKED_LAST4_4242"`, which broke the document;
# or the 14 digits before it masked as a number of their own, the rest glued on after).
_CARDS = [4242424242424242, 5555555555554444, 378282246310005]


@settings(max_examples=400, deadline=None)
@given(
    values=st.lists(
        st.one_of(st.sampled_from([*_CARDS, 12, 1.5e10, -3, "ok", "git@github.com:org/repo.git"]), PII_VALUES),
        min_size=1,
        max_size=4,
    ),
    cuts=st.lists(st.integers(0, 400), min_size=1, max_size=4),
    nothing_after=st.booleans(),
)
def test_a_json_content_cut_anywhere_by_calls_stays_one_valid_document(
    values: list[Any], cuts: list[int], nothing_after: bool
) -> None:
    document = json.dumps({f"k{i}": value for i, value in enumerate(values)})
    bounds = sorted({0, len(document), *(cut % (len(document) + 1) for cut in cuts)})
    pieces = [document[a:b] for a, b in itertools.pairwise(bounds)] + ([""] if nothing_after else [])
    content = _sdk_json_content(pieces)
    parsed = json.loads(content)  # one valid document
    assert list(parsed) == [f"k{i}" for i in range(len(values))]
    for value, got in zip(values, parsed.values(), strict=True):
        if value in _CARDS:
            assert got == "CC_MASKED_LAST4_" + str(value)[-4:]
        elif value in (12, 1.5e10, -3, "ok"):
            assert got == value
        elif value == "git@github.com:org/repo.git":  # masked from the call when one cuts its host
            assert got == value or got.endswith("***t@github.com:org/repo.git")
        else:
            assert str(value) not in content


def test_past_the_bound_on_paused_texts_a_structured_contents_number_is_not_lost() -> None:
    # Past MAX_ENDED paused contents, a content cut by a call takes no more text: what its
    # pause kept back (a number, an escape cut short) must still go out, not be dropped.
    from gateway.relay import MAX_ENDED

    relay = StreamRelay(REDACTOR, None, CHAT_JSON)
    for i in range(MAX_ENDED):
        relay.feed(_choice_chunk(i, {"content": "{}"}) + _choice_chunk(i, _OPENING))
    last = MAX_ENDED
    wire = relay.feed(
        _choice_chunk(last, {"content": '{"n": 4242'})
        + _choice_chunk(last, _OPENING)
        + _choice_chunk(last, {}, "tool_calls")
    )
    wire += relay.close()
    content = "".join(
        choice["delta"].get("content") or ""
        for event in sse.SSEParser().feed(wire)
        if event.data and event.data != sse.DONE
        for choice in json.loads(event.data)["choices"]
        if choice["index"] == last
    )
    assert content == '{"n": 4242'
