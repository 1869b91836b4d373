"""Events joined into the one reply their API's JSON form is (gateway/joins.py): the relay's
redacted output, joined, whatever the split of the upstream's events and reads."""

from __future__ import annotations

import itertools
import json
import os

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.joins import Joined, message_from_events, response_from_events
from gateway.openai_apis import RESPONSES
from gateway.relay import StreamRelay
from gateway.surfaces import MESSAGES

from .test_messages_surface import END, REDACTOR, START, block_start, block_stop, ev, json_delta, text_delta
from .test_redact import split_reply

SIGNATURE = "EqQBCgIYAhIM1gbcDa9GJwZA2b3h"


def relayed(surface: object, wire: bytes, cuts: list[int]) -> bytes:
    """The relay's output for `wire` read in the pieces `cuts` make of it."""
    relay = StreamRelay(REDACTOR, None, surface)  # type: ignore[arg-type]
    bounds = sorted({0, len(wire), *(c % (len(wire) + 1) for c in cuts)})
    return b"".join(relay.feed(wire[a:b]) for a, b in itertools.pairwise(bounds)) + relay.close()


def thinking_delta(text: str, index: int) -> bytes:
    delta = {"type": "thinking_delta", "thinking": text}
    return ev("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta})


def signature(index: int) -> bytes:
    delta = {"type": "signature_delta", "signature": SIGNATURE}
    return ev("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta})


def message_wire(texts: list[str], thinking: list[str], tool_json: list[str]) -> bytes:
    """A Message's events: a thinking block, a text block and a tool call, each in the pieces given."""
    return (
        START
        + block_start(0, {"type": "thinking", "thinking": "", "signature": ""})
        + b"".join(thinking_delta(t, 0) for t in thinking)
        + signature(0)
        + block_stop(0)
        + ev("ping", {"type": "ping"})
        + block_start(1, {"type": "text", "text": ""})
        + b"".join(text_delta(t, 1) for t in texts)
        + block_stop(1)
        + block_start(2, {"type": "tool_use", "id": "toolu_1", "name": "send", "input": {}})
        + b"".join(json_delta(j, 2) for j in tool_json)
        + block_stop(2)
        + END
    )


def split(text: str, cuts: list[int]) -> list[str]:
    bounds = sorted({0, len(text), *(c % (len(text) + 1) for c in cuts)})
    return [text[a:b] for a, b in itertools.pairwise(bounds)]


@settings(max_examples=int(os.environ.get("RELAY_EXAMPLES", "300")), deadline=None)
@given(
    split_reply(),
    split_reply(),
    st.lists(st.integers(0, 10_000), max_size=8),
    st.lists(st.integers(0, 10_000), max_size=8),
)
def test_any_split_of_the_events_joins_into_the_message_of_the_unsplit_ones(
    text: tuple[str, list[str]], value: tuple[str, list[str]], json_cuts: list[int], reads: list[int]
) -> None:
    whole, deltas = text
    tool_json = json.dumps({"to": value[0], "n": 3})
    split_wire = message_wire(deltas, deltas, split(tool_json, json_cuts))
    joined = message_from_events(relayed(MESSAGES, split_wire, reads))
    unsplit = message_from_events(relayed(MESSAGES, message_wire([whole], [whole], [tool_json]), []))
    assert joined == unsplit and joined.reply is not None
    content = joined.reply["content"]
    assert content[0] == {"type": "thinking", "thinking": whole, "signature": SIGNATURE}  # as it came
    assert content[1] == {"type": "text", "text": REDACTOR.redact(whole)}  # masked as streamed
    assert content[2]["input"] == json.loads(REDACTOR.redact(tool_json, json_text=True))


def test_the_message_keeps_message_starts_fields_and_message_deltas_stop_and_usage() -> None:
    wire = START + block_start(0, {"type": "text", "text": ""}) + text_delta("Hi", 0) + block_stop(0) + END
    assert message_from_events(relayed(MESSAGES, wire, [])) == Joined(
        reply={
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "model": "claude-sonnet-4-5",
            "content": [{"type": "text", "text": "Hi"}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {
                "input_tokens": 21,
                "cache_read_input_tokens": 4,
                "cache_creation_input_tokens": 2,
                "output_tokens": 15,
            },
        }
    )


def test_blocks_come_in_index_order_with_citations_and_cumulative_usage() -> None:
    citation = {"type": "char_location", "cited_text": "x", "document_index": 0}
    cite = ev(
        "content_block_delta",
        {"type": "content_block_delta", "index": 0, "delta": {"type": "citations_delta", "citation": citation}},
    )
    late = ev(
        "message_delta",
        {
            "type": "message_delta",
            "delta": {"stop_reason": "max_tokens", "stop_sequence": None},
            "usage": {"output_tokens": 7, "input_tokens": 40, "cache_read_input_tokens": None},
        },
    )
    wire = (
        START
        + block_start(1, {"type": "text", "text": ""})
        + block_start(0, {"type": "text", "text": ""})
        + text_delta("second", 1)
        + text_delta("first", 0)
        + cite
        + cite
        + block_stop(0)
        + block_stop(1)
        + late
        + ev("message_stop", {"type": "message_stop"})
    )
    reply = message_from_events(relayed(MESSAGES, wire, [])).reply
    assert reply is not None
    assert reply["content"] == [
        {"type": "text", "text": "first", "citations": [citation, citation]},
        {"type": "text", "text": "second"},
    ]
    assert reply["stop_reason"] == "max_tokens"
    assert reply["usage"] == {
        "input_tokens": 40,
        "cache_read_input_tokens": 4,
        "cache_creation_input_tokens": 2,
        "output_tokens": 7,
    }


def test_a_message_that_fails_or_stops_short_is_no_reply() -> None:
    opened = START + block_start(0, {"type": "text", "text": ""}) + text_delta("jane.doe@exa", 0)
    overloaded = {"type": "overloaded_error", "message": "Overloaded"}
    failed = opened + ev("error", {"type": "error", "error": overloaded})
    assert message_from_events(relayed(MESSAGES, failed, [])) == Joined(error=overloaded)
    assert message_from_events(relayed(MESSAGES, opened + block_stop(0), [])) == Joined()  # no message_stop
    broken = START + block_start(0, {"type": "tool_use", "id": "t", "name": "f", "input": {}}) + json_delta('{"a', 0)
    assert message_from_events(broken + block_stop(0) + END).error is not None


# --- Responses -----------------------------------------------------------------------------


def rev(data: dict) -> bytes:
    return f"event: {data['type']}\ndata: ".encode() + orjson.dumps(data) + b"\n\n"


def response(status: str, text: str) -> dict:
    content = [{"type": "output_text", "text": text, "annotations": []}]
    output = [{"id": "m", "type": "message", "role": "assistant", "status": "completed", "content": content}]
    return {"id": "resp_1", "object": "response", "status": status, "output": output if text else []}


def response_wire(text: str, deltas: list[str], terminal: str = "response.completed") -> bytes:
    at = {"output_index": 0, "content_index": 0, "item_id": "m"}
    part = {"type": "output_text", "text": "", "annotations": []}
    item = {"id": "m", "type": "message", "role": "assistant", "status": "in_progress", "content": []}
    events = [
        {"type": "response.created", "response": response("in_progress", "")},
        {"type": "response.output_item.added", "output_index": 0, "item": item},
        {"type": "response.content_part.added", **at, "part": part},
        *({"type": "response.output_text.delta", **at, "delta": d} for d in deltas),
        {"type": "response.output_text.done", **at, "text": text},
        {"type": "response.content_part.done", **at, "part": {**part, "text": text}},
        {"type": terminal, "response": response("completed", text)},
    ]
    return b"".join(rev({**e, "sequence_number": n}) for n, e in enumerate(events))


@settings(max_examples=int(os.environ.get("RELAY_EXAMPLES", "300")), deadline=None)
@given(split_reply(), st.lists(st.integers(0, 10_000), max_size=8))
def test_any_split_of_responses_events_joins_into_the_response_redacted_as_streamed(
    case: tuple[str, list[str]], reads: list[int]
) -> None:
    text, deltas = case
    joined = response_from_events(relayed(RESPONSES, response_wire(text, deltas), reads))
    assert joined == response_from_events(relayed(RESPONSES, response_wire(text, [text]), []))
    assert joined.reply is not None
    assert joined.reply["output"][0]["content"][0]["text"] == REDACTOR.redact(text)


def test_a_response_that_fails_is_its_error() -> None:
    failed = {**response("failed", ""), "error": {"code": "server_error", "message": "boom"}}
    wire = rev({"type": "response.created", "response": response("in_progress", "")})
    assert response_from_events(wire + rev({"type": "response.failed", "response": failed})) == Joined(
        error={"code": "server_error", "message": "boom"}
    )
    event = {"type": "error", "code": "server_error", "message": "boom", "param": None, "sequence_number": 1}
    assert response_from_events(wire + rev(event)) == Joined(
        error={"code": "server_error", "message": "boom", "param": None}
    )
    assert response_from_events(wire) == Joined()
    incomplete = response_from_events(response_wire("ok", ["ok"], "response.incomplete"))
    assert incomplete.reply is not None


@pytest.mark.timeout(30)
def test_events_joined_into_a_message_take_time_linear_in_their_number() -> None:
    """100,000 text deltas and as many of a tool call's input (30 MB in all): gathered and
    joined once, as chat's join does (+= inside a dict would copy the whole text each time)."""
    words, code = "a sentence of forty characters or so... " * 5, "x" * 100
    wire = START + block_start(0, {"type": "text", "text": ""}) + block_start(1, {"type": "tool_use", "input": {}})
    wire += json_delta('{"k": "', 1) + (text_delta(words, 0) + json_delta(code, 1)) * 100_000
    wire += json_delta('"}', 1) + END
    reply = message_from_events(wire).reply
    assert reply is not None
    assert reply["content"][0]["text"] == words * 100_000
    assert reply["content"][1]["input"] == {"k": code * 100_000}


def test_a_text_blocks_opening_text_begins_its_joined_text() -> None:
    """As the SDK appends the deltas to content_block_start's text: an address begun there and
    finished in the first delta is one text, masked (the relay streams it so)."""
    wire = START + block_start(0, {"type": "text", "text": "Mail jane.doe@exa"}) + text_delta("mple.com now", 0)
    reply = message_from_events(relayed(MESSAGES, wire + block_stop(0) + END, [])).reply
    assert reply is not None and reply["content"] == [{"type": "text", "text": "Mail j***e@example.com now"}]
