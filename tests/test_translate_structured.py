"""gateway/translate.py: a chat request's `response_format` to an anthropic upstream, a forced
tool whose input is the answer; that call back as the message's content (JSON), stream in any split."""

from __future__ import annotations

import itertools
import json
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from gateway.errors import BadRequest
from gateway.redact import ALL_KINDS, build_redactor
from gateway.relay import StreamRelay
from gateway.surfaces import CHAT_JSON
from gateway.translate import ANSWER_TOOL, ChatStream, answer_tool, chat_reply, chat_request, whole_reply

USER = {"role": "user", "content": "Hi"}
SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "celsius": {"type": "integer"}},
    "required": ["city", "celsius"],
    "additionalProperties": False,
}
JSON_SCHEMA = {"type": "json_schema", "json_schema": {"name": "weather", "schema": SCHEMA, "strict": True}}
LOOKUP = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}}}
LOOKUP_TOOL = {"name": "lookup", "input_schema": {"type": "object", "properties": {}}}
FORCED = {"type": "tool", "name": ANSWER_TOOL, "disable_parallel_tool_use": True}
REDACTOR = build_redactor(ALL_KINDS)
SCHEMA_DESCRIPTION = "The answer to the user: a JSON document that follows this schema (weather)."

# (case, chat request fields besides messages, the Messages request's tools and tool_choice)
REQUESTS: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    (
        "json_schema: a forced tool whose input_schema is the schema",
        {"response_format": JSON_SCHEMA},
        {
            "tools": [{"name": ANSWER_TOOL, "description": SCHEMA_DESCRIPTION, "input_schema": SCHEMA}],
            "tool_choice": FORCED,
        },
    ),
    (
        "json_schema with a description: the tool's",
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "w", "description": "Now.", "schema": SCHEMA},
            }
        },
        {"tools": [{"name": ANSWER_TOOL, "description": "Now.", "input_schema": SCHEMA}], "tool_choice": FORCED},
    ),
    (
        "json_object: any object",
        {"response_format": {"type": "json_object"}},
        {
            "tools": [
                {
                    "name": ANSWER_TOOL,
                    "description": "The answer to the user: a JSON object.",
                    "input_schema": {"type": "object"},
                }
            ],
            "tool_choice": FORCED,
        },
    ),
    (
        "the client's tools too: the model calls one of them or answers",
        {"response_format": {"type": "json_object"}, "tools": [LOOKUP]},
        {
            "tools": [
                LOOKUP_TOOL,
                {
                    "name": ANSWER_TOOL,
                    "description": "The answer to the user: a JSON object.",
                    "input_schema": {"type": "object"},
                },
            ],
            "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
        },
    ),
    (
        "the client's tools with tool_choice none: only the answer (its tools kept for the history)",
        {"response_format": {"type": "json_object"}, "tools": [LOOKUP], "tool_choice": "none"},
        {
            "tools": [
                LOOKUP_TOOL,
                {
                    "name": ANSWER_TOOL,
                    "description": "The answer to the user: a JSON object.",
                    "input_schema": {"type": "object"},
                },
            ],
            "tool_choice": FORCED,
        },
    ),
    (
        "tool_choice required: this turn is a call of the client's, the format has no say",
        {"response_format": JSON_SCHEMA, "tools": [LOOKUP], "tool_choice": "required"},
        {"tools": [LOOKUP_TOOL], "tool_choice": {"type": "any"}},
    ),
    (
        "a named function: the same",
        {
            "response_format": JSON_SCHEMA,
            "tools": [LOOKUP],
            "tool_choice": {"type": "function", "function": {"name": "lookup"}},
        },
        {"tools": [LOOKUP_TOOL], "tool_choice": {"type": "tool", "name": "lookup"}},
    ),
    ("text: nothing", {"response_format": {"type": "text"}}, {}),
    (
        "a schema without a type at its root: an object (a tool's input is one)",
        {"response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": {"properties": {}}}}},
        {
            "tools": [
                {
                    "name": ANSWER_TOOL,
                    "description": "The answer to the user: a JSON document that follows this schema (w).",
                    "input_schema": {"type": "object", "properties": {}},
                }
            ],
            "tool_choice": FORCED,
        },
    ),
]


@pytest.mark.parametrize(("case", "chat", "expected"), REQUESTS, ids=[r[0] for r in REQUESTS])
def test_requests(case: str, chat: dict[str, Any], expected: dict[str, Any]) -> None:
    payload = {"model": "claude-x", "messages": [USER], **chat}
    request = chat_request(payload, "claude-x")
    assert {k: request[k] for k in ("tools", "tool_choice") if k in request} == expected
    assert answer_tool(payload) == (ANSWER_TOOL if ANSWER_TOOL in str(expected) else None)


@pytest.mark.parametrize(
    ("chat", "problem"),
    [
        ({"response_format": JSON_SCHEMA, "tools": [{**LOOKUP, "function": {"name": ANSWER_TOOL}}]}, ANSWER_TOOL),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": {"type": "array"}}}},
            "object",
        ),
        ({"response_format": {"type": "json_schema", "json_schema": "w"}}, "json_schema"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": [1]}}}, "schema"),
    ],
)
def test_what_a_forced_tool_cannot_carry_is_a_400(chat: dict[str, Any], problem: str) -> None:
    with pytest.raises(BadRequest) as caught:
        chat_request({"model": "m", "messages": [USER], **chat}, "m")
    assert caught.value.status == 400 and problem in caught.value.message


ANSWER = {"city": "Paris", "celsius": 21, "notes": "line one\nmail jane.doe@example.com"}
MESSAGE = {
    "id": "msg_1",
    "type": "message",
    "role": "assistant",
    "model": "claude-x",
    "content": [{"type": "tool_use", "id": "toolu_1", "name": ANSWER_TOOL, "input": ANSWER}],
    "stop_reason": "tool_use",
    "usage": {"input_tokens": 10, "output_tokens": 7},
}


def test_the_answer_tools_call_is_the_messages_content() -> None:
    reply = chat_reply(MESSAGE, 1, ANSWER_TOOL)
    ChatCompletion.model_validate(reply)
    [choice] = reply["choices"]
    assert json.loads(choice["message"]["content"]) == ANSWER
    assert "tool_calls" not in choice["message"] and choice["finish_reason"] == "stop"
    # Without the format asked, the same Message is a tool call (a tool of that name the client's).
    assert chat_reply(MESSAGE, 1)["choices"][0]["finish_reason"] == "tool_calls"


def test_a_call_of_the_clients_tool_stays_a_tool_call() -> None:
    call = {"type": "tool_use", "id": "toolu_2", "name": "lookup", "input": {"q": "x"}}
    [choice] = chat_reply({**MESSAGE, "content": [call]}, 1, ANSWER_TOOL)["choices"]
    assert choice["message"]["content"] is None and choice["finish_reason"] == "tool_calls"
    assert choice["message"]["tool_calls"][0]["function"] == {"name": "lookup", "arguments": '{"q":"x"}'}


def sse(event: dict[str, Any]) -> bytes:
    return f"event: {event['type']}\ndata: ".encode() + orjson.dumps(event) + b"\n\n"


ANSWER_TEXT = json.dumps(ANSWER)
STREAM = [
    {"type": "message_start", "message": {**MESSAGE, "content": [], "stop_reason": None}},
    {
        "type": "content_block_start",
        "index": 0,
        "content_block": {"type": "tool_use", "id": "toolu_1", "name": ANSWER_TOOL, "input": {}},
    },
    {"type": "ping"},
    *(
        {"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta", "partial_json": piece}}
        for piece in ("", ANSWER_TEXT[:9], ANSWER_TEXT[9:40], ANSWER_TEXT[40:])
    ),
    {"type": "content_block_stop", "index": 0},
    {"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 12}},
    {"type": "message_stop"},
]
STREAM_BYTES = b"".join(sse(e) for e in STREAM)


def chunks_of(data: bytes) -> list[Any]:
    return ["[DONE]" if block == b"data: [DONE]" else json.loads(block[6:]) for block in data.split(b"\n\n") if block]


def test_the_answer_streams_as_content_deltas() -> None:
    stream = ChatStream(False, 1, ANSWER_TOOL)
    chunks = chunks_of(stream.feed(STREAM_BYTES) + stream.close())
    assert chunks[-1] == "[DONE]"
    for chunk in chunks[:-1]:
        ChatCompletionChunk.model_validate(chunk)
    deltas = [(c["choices"][0]["delta"], c["choices"][0]["finish_reason"]) for c in chunks[:-1]]
    assert deltas == [
        ({"role": "assistant", "content": ""}, None),
        ({"content": ANSWER_TEXT[:9]}, None),
        ({"content": ANSWER_TEXT[9:40]}, None),
        ({"content": ANSWER_TEXT[40:]}, None),
        ({}, "stop"),
    ]


def test_an_answer_that_came_empty_is_an_empty_object_as_in_the_reply() -> None:
    events = [*STREAM[:4], *STREAM[-3:]]  # the empty delta only
    chunks = chunks_of(ChatStream(False, 1, ANSWER_TOOL).feed(b"".join(sse(e) for e in events)))
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks[:-1])
    empty = {**MESSAGE, "content": [{**MESSAGE["content"][0], "input": {}}]}  # type: ignore[index]
    assert content == "{}" == chat_reply(empty, 1, ANSWER_TOOL)["choices"][0]["message"]["content"]


@given(st.lists(st.integers(min_value=0, max_value=len(STREAM_BYTES)), max_size=12))
def test_in_any_split_the_content_is_the_document(cuts: list[int]) -> None:
    stream = ChatStream(True, 1, ANSWER_TOOL)
    points = [0, *sorted(cuts), len(STREAM_BYTES)]
    out = b"".join(stream.feed(STREAM_BYTES[a:b]) for a, b in itertools.pairwise(points)) + stream.close()
    whole = ChatStream(True, 1, ANSWER_TOOL)
    assert out == whole.feed(STREAM_BYTES) + whole.close()
    chunks = chunks_of(out)
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks[:-1] if c["choices"])
    assert json.loads(content) == ANSWER
    # The events read whole (a request without "stream" answered with them): the same document.
    completion = whole_reply(200, STREAM_BYTES, True, 1, ANSWER_TOOL)
    assert completion == out


# --- redacted as content is (SPEC §6): the relay reads it as the JSON text it is ---------

PII_ANSWER = {"name": "Jane", "notes": "paid with\n4242 4242 4242 4242, mail jane.doe@example.com\tor +1 415 555 0100"}
PII_TEXT = json.dumps(PII_ANSWER)


def _relayed(pieces: list[str], cuts: list[int]) -> str:
    """The content a chat client gets: Anthropic's events for the answer tool's input in these
    pieces, split into reads at `cuts`, translated, then through the chat relay."""
    events = [
        STREAM[0],
        STREAM[1],
        *(
            {"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta", "partial_json": piece}}
            for piece in ["", *pieces]
        ),
        *STREAM[-3:],
    ]
    wire = b"".join(sse(e) for e in events)
    stream = ChatStream(False, 1, ANSWER_TOOL)
    relay = StreamRelay(REDACTOR, None, CHAT_JSON)
    points = [0, *sorted(c % (len(wire) + 1) for c in cuts), len(wire)]
    out = b"".join(relay.feed(stream.feed(wire[a:b])) for a, b in itertools.pairwise(points))
    out += relay.feed(stream.close()) + relay.close()
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks_of(out)[:-1] if c.get("choices"))


@given(
    st.lists(st.integers(min_value=1, max_value=len(PII_TEXT) - 1), max_size=10),
    st.lists(st.integers(min_value=0), max_size=6),
)
def test_pii_inside_a_string_value_is_masked_and_the_json_parses_in_any_split(
    pieces: list[int], cuts: list[int]
) -> None:
    points = [0, *sorted(set(pieces)), len(PII_TEXT)]
    content = _relayed([PII_TEXT[a:b] for a, b in itertools.pairwise(points)], cuts)
    assert json.loads(content) == json.loads(_relayed([PII_TEXT], []))
    document = json.loads(content)
    assert "4242 4242 4242 4242" not in document["notes"] and "jane.doe@example.com" not in document["notes"]
    assert "CC_MASKED_LAST4_4242" in document["notes"] and "j***e@example.com" in document["notes"]
