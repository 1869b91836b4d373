"""gateway/translate.py: chat completions ⇄ Anthropic Messages, by tables; the stream in any split."""

from __future__ import annotations

import itertools
import json
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from gateway.errors import BadRequest, UpstreamError
from gateway.translate import ChatStream, chat_error, chat_reply, chat_request, finish_reason, whole_reply

USER = {"role": "user", "content": "Hi"}
TOOL = {
    "type": "function",
    "function": {"name": "lookup", "description": "Find", "parameters": {"type": "object", "properties": {}}},
}
CALL = {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": '{"q": "x"}'}}

# (case, chat request fields, Messages request fields besides model)
REQUESTS: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("plain", {"messages": [USER]}, {"max_tokens": 4096, "messages": [{"role": "user", "content": "Hi"}]}),
    (
        "system string",
        {"messages": [{"role": "system", "content": "Be brief."}, USER]},
        {"max_tokens": 4096, "system": "Be brief.", "messages": [{"role": "user", "content": "Hi"}]},
    ),
    (
        "system parts, developer, and a system message mid-conversation",
        {
            "messages": [
                {"role": "system", "content": [{"type": "text", "text": "A"}, {"type": "text", "text": "B"}]},
                USER,
                {"role": "developer", "content": "C"},
            ]
        },
        {
            "max_tokens": 4096,
            "system": [{"type": "text", "text": t} for t in "ABC"],
            "messages": [{"role": "user", "content": "Hi"}],
        },
    ),
    (
        "text and image parts",
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "What is this?"},
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0K", "detail": "low"}},
                        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
                    ],
                }
            ]
        },
        {
            "max_tokens": 4096,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "What is this?"},
                        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0K"}},
                        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
                    ],
                }
            ],
        },
    ),
    (
        "a tool call and its result, then the user's next words: one user turn",
        {
            "messages": [
                USER,
                {"role": "assistant", "content": "Let me look.", "tool_calls": [CALL]},
                {"role": "tool", "tool_call_id": "call_1", "content": "found"},
                {"role": "user", "content": "thanks"},
            ],
            "tools": [TOOL],
            "tool_choice": "auto",
        },
        {
            "max_tokens": 4096,
            "messages": [
                {"role": "user", "content": "Hi"},
                {
                    "role": "assistant",
                    "content": [
                        {"type": "text", "text": "Let me look."},
                        {"type": "tool_use", "id": "call_1", "name": "lookup", "input": {"q": "x"}},
                    ],
                },
                {
                    "role": "user",
                    "content": [
                        {"type": "tool_result", "tool_use_id": "call_1", "content": "found"},
                        {"type": "text", "text": "thanks"},
                    ],
                },
            ],
            "tools": [{"name": "lookup", "input_schema": {"type": "object", "properties": {}}, "description": "Find"}],
            "tool_choice": {"type": "auto"},
        },
    ),
    (
        "limits (max_tokens first, as policies and budgets read it), sampling, stop, user; what Messages has"
        " no field for is left out",
        {
            "messages": [USER],
            "max_tokens": 20,
            "max_completion_tokens": 10,
            "stop": "END",
            "temperature": 0.5,
            "top_p": 0.9,
            "user": "u-1",
            "stream": True,
            "stream_options": {"include_usage": True},
            "n": 1,
            "seed": 7,
            "presence_penalty": 0.1,
        },
        {
            "max_tokens": 20,
            "messages": [{"role": "user", "content": "Hi"}],
            "stop_sequences": ["END"],
            "temperature": 0.5,
            "top_p": 0.9,
            "stream": True,
            "metadata": {"user_id": "u-1"},
        },
    ),
    (
        "max_tokens alone, stop as a list",
        {"messages": [USER], "max_tokens": 7, "stop": ["a", "b"]},
        {"max_tokens": 7, "messages": [{"role": "user", "content": "Hi"}], "stop_sequences": ["a", "b"]},
    ),
    (
        "stop sequences Anthropic refuses (empty, all whitespace) are left out; temperature past Anthropic's 1 is 1",
        {"messages": [USER], "stop": ["\n", " \t", "", "\nUser:"], "temperature": 1.7},
        {
            "max_tokens": 4096,
            "messages": [{"role": "user", "content": "Hi"}],
            "stop_sequences": ["\nUser:"],
            "temperature": 1.0,
        },
    ),
    (
        "top_p alone",
        {"messages": [USER], "top_p": 0.9},
        {"max_tokens": 4096, "messages": [{"role": "user", "content": "Hi"}], "top_p": 0.9},
    ),
    (
        "a stop of whitespace only: no stop_sequences at all; temperatures in both ranges as sent",
        {"messages": [USER], "stop": "\n", "temperature": 1},
        {"max_tokens": 4096, "messages": [{"role": "user", "content": "Hi"}], "temperature": 1},
    ),
    (
        "tool_choice required, no parallel calls",
        {"messages": [USER], "tools": [TOOL], "tool_choice": "required", "parallel_tool_calls": False},
        {
            "max_tokens": 4096,
            "messages": [{"role": "user", "content": "Hi"}],
            "tools": [{"name": "lookup", "input_schema": {"type": "object", "properties": {}}, "description": "Find"}],
            "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
        },
    ),
    (
        "tool_choice none, no parallel calls: Anthropic's none has no disable_parallel_tool_use (nor room for it)",
        {"messages": [USER], "tools": [TOOL], "tool_choice": "none", "parallel_tool_calls": False},
        {
            "max_tokens": 4096,
            "messages": [{"role": "user", "content": "Hi"}],
            "tools": [{"name": "lookup", "input_schema": {"type": "object", "properties": {}}, "description": "Find"}],
            "tool_choice": {"type": "none"},
        },
    ),
    (
        "a named tool; an assistant tool call with empty arguments",
        {
            "messages": [
                USER,
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [{**CALL, "function": {"name": "lookup", "arguments": ""}}],
                },
                {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "ok"}]},
            ],
            "tools": [{"type": "function", "function": {"name": "lookup"}}],
            "tool_choice": {"type": "function", "function": {"name": "lookup"}},
        },
        {
            "max_tokens": 4096,
            "messages": [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": [{"type": "tool_use", "id": "call_1", "name": "lookup", "input": {}}]},
                {
                    "role": "user",
                    "content": [
                        {"type": "tool_result", "tool_use_id": "call_1", "content": [{"type": "text", "text": "ok"}]}
                    ],
                },
            ],
            "tools": [{"name": "lookup", "input_schema": {"type": "object", "properties": {}}}],
            "tool_choice": {"type": "tool", "name": "lookup"},
        },
    ),
]


@pytest.mark.parametrize(("case", "chat", "messages"), REQUESTS, ids=[r[0] for r in REQUESTS])
def test_requests(case: str, chat: dict[str, Any], messages: dict[str, Any]) -> None:
    assert chat_request({"model": "claude-x", **chat}, "claude-y") == {"model": "claude-y", **messages}


UNTRANSLATABLE = [
    ({"messages": [{"role": "function", "name": "f", "content": "x"}]}, "messages[0].role 'function'"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]}, "only text parts"),
    (
        {"messages": [{"role": "assistant", "tool_calls": [{**CALL, "function": {"name": "f", "arguments": "[1]"}}]}]},
        "must be a JSON object",
    ),
    ({"messages": [USER], "tools": [{"type": "custom", "custom": {"name": "x"}}]}, "only function tools"),
    ({"messages": [USER], "tool_choice": "sometimes"}, "tool_choice must be"),
    # Left out before: the model answered as if it had no functions (a 200 with no call).
    ({"messages": [USER], "functions": [{"name": "f", "parameters": {"type": "object"}}]}, "functions"),
    # Left out before: one choice came back where the client asked for three.
    ({"messages": [USER], "n": 3}, "n > 1"),
    (
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,abc"}}]}]},
        "data URL",
    ),
    ({"messages": [{"role": "tool", "content": "x"}]}, "tool_call_id"),
    ({"messages": ["hi"]}, "messages[0] is not an object"),
]


@pytest.mark.parametrize(("chat", "problem"), UNTRANSLATABLE)
def test_what_has_no_messages_form_is_a_400(chat: dict[str, Any], problem: str) -> None:
    with pytest.raises(BadRequest) as caught:
        chat_request({"model": "m", **chat}, "m")
    assert caught.value.status == 400 and problem in caught.value.message


@pytest.mark.parametrize(
    ("stop_reason", "finish"),
    [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("max_tokens", "length"),
        ("tool_use", "tool_calls"),
        ("refusal", "content_filter"),
        ("pause_turn", "stop"),
        ("something_new", "stop"),
        (None, None),
    ],
)
def test_finish_reasons(stop_reason: str | None, finish: str | None) -> None:
    assert finish_reason(stop_reason) == finish


MESSAGE = {
    "id": "msg_1",
    "type": "message",
    "role": "assistant",
    "model": "claude-x",
    "content": [
        {"type": "thinking", "thinking": "hmm", "signature": "sig"},
        {"type": "text", "text": "Looking "},
        {"type": "text", "text": "it up."},
        {"type": "tool_use", "id": "toolu_1", "name": "lookup", "input": {"q": "x", "n": [1, 2]}},
    ],
    "stop_reason": "tool_use",
    "usage": {"input_tokens": 10, "cache_read_input_tokens": 5, "cache_creation_input_tokens": 2, "output_tokens": 7},
}


def test_a_reply() -> None:
    reply = chat_reply(MESSAGE, created=1700000000)
    ChatCompletion.model_validate(reply)  # what the SDK reads
    assert reply["choices"] == [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": "Looking it up.",
                "refusal": None,
                "tool_calls": [
                    {
                        "id": "toolu_1",
                        "type": "function",
                        "function": {"name": "lookup", "arguments": '{"q":"x","n":[1,2]}'},
                    }
                ],
            },
            "logprobs": None,
            "finish_reason": "tool_calls",
        }
    ]
    assert reply["usage"] == {
        "prompt_tokens": 17,
        "completion_tokens": 7,
        "total_tokens": 24,
        "prompt_tokens_details": {"cached_tokens": 5},
    }
    assert (reply["id"], reply["model"], reply["created"], reply["object"]) == (
        "msg_1",
        "claude-x",
        1700000000,
        "chat.completion",
    )


def test_a_reply_with_only_a_tool_call_has_null_content() -> None:
    reply = chat_reply({**MESSAGE, "content": [MESSAGE["content"][3]]}, created=1)  # type: ignore[index]
    assert reply["choices"][0]["message"]["content"] is None


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
            {"error": {"message": "Overloaded", "type": "overloaded_error", "code": "overloaded_error"}},
        ),
        ({"error": {"message": "plain"}}, {"error": {"message": "plain", "type": "api_error", "code": "api_error"}}),
        ({"detail": "not anthropic"}, {"detail": "not anthropic"}),
    ],
)
def test_errors(body: dict[str, Any], expected: dict[str, Any]) -> None:
    assert json.loads(chat_error(orjson.dumps(body))) == expected
    assert json.loads(whole_reply(529, orjson.dumps(body), False, 1)) == expected
    assert chat_error(b"<html>") == b"<html>"


def sse(event: dict[str, Any]) -> bytes:
    return f"event: {event['type']}\ndata: ".encode() + orjson.dumps(event) + b"\n\n"


STREAM = [
    {
        "type": "message_start",
        "message": {
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "model": "claude-x",
            "content": [],
            "usage": {"input_tokens": 10, "cache_read_input_tokens": 5, "output_tokens": 1},
        },
    },
    {"type": "content_block_start", "index": 0, "content_block": {"type": "thinking", "thinking": ""}},
    {"type": "ping"},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "hmm"}},
    {"type": "content_block_stop", "index": 0},
    {"type": "content_block_start", "index": 1, "content_block": {"type": "text", "text": ""}},
    {"type": "content_block_delta", "index": 1, "delta": {"type": "text_delta", "text": "Hello "}},
    {"type": "content_block_delta", "index": 1, "delta": {"type": "text_delta", "text": "there"}},
    {"type": "content_block_stop", "index": 1},
    {
        "type": "content_block_start",
        "index": 2,
        "content_block": {"type": "tool_use", "id": "toolu_1", "name": "lookup", "input": {}},
    },
    {"type": "content_block_delta", "index": 2, "delta": {"type": "input_json_delta", "partial_json": '{"q": '}},
    {"type": "content_block_delta", "index": 2, "delta": {"type": "input_json_delta", "partial_json": '"x"}'}},
    {"type": "content_block_stop", "index": 2},
    {"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 12}},
    {"type": "message_stop"},
]
STREAM_BYTES = b"".join(sse(e) for e in STREAM)


def chunks_of(data: bytes) -> list[Any]:
    out: list[Any] = []
    for block in data.split(b"\n\n"):
        if block:
            assert block.startswith(b"data: ")
            out.append("[DONE]" if block == b"data: [DONE]" else json.loads(block[6:]))
    return out


@pytest.mark.parametrize("include_usage", [True, False])
def test_a_stream(include_usage: bool) -> None:
    stream = ChatStream(include_usage, created=1700000000)
    chunks = chunks_of(stream.feed(STREAM_BYTES) + stream.close())
    assert stream.done and chunks[-1] == "[DONE]"
    for chunk in chunks[:-1]:
        ChatCompletionChunk.model_validate(chunk)  # what the SDK reads
        assert (chunk["id"], chunk["model"], chunk["created"]) == ("msg_1", "claude-x", 1700000000)
    deltas = [(c["choices"][0]["delta"], c["choices"][0]["finish_reason"]) for c in chunks[:-1] if c["choices"]]
    assert deltas == [
        ({"role": "assistant", "content": ""}, None),
        ({"content": "Hello "}, None),
        ({"content": "there"}, None),
        (
            {
                "tool_calls": [
                    {"index": 0, "id": "toolu_1", "type": "function", "function": {"name": "lookup", "arguments": ""}}
                ]
            },
            None,
        ),
        ({"tool_calls": [{"index": 0, "function": {"arguments": '{"q": '}}]}, None),
        ({"tool_calls": [{"index": 0, "function": {"arguments": '"x"}'}}]}, None),
        ({}, "tool_calls"),
    ]
    usage_chunks = [c for c in chunks[:-1] if not c["choices"]]
    if include_usage:
        assert usage_chunks == [
            {
                "id": "msg_1",
                "object": "chat.completion.chunk",
                "created": 1700000000,
                "model": "claude-x",
                "choices": [],
                "usage": {
                    "prompt_tokens": 15,
                    "completion_tokens": 12,
                    "total_tokens": 27,
                    "prompt_tokens_details": {"cached_tokens": 5},
                },
            }
        ]
    else:
        assert usage_chunks == []


@given(st.lists(st.integers(min_value=0, max_value=len(STREAM_BYTES)), max_size=12))
def test_a_stream_in_any_split_translates_alike(cuts: list[int]) -> None:
    whole = ChatStream(True, 1)
    expected = whole.feed(STREAM_BYTES) + whole.close()
    stream = ChatStream(True, 1)
    points = [0, *sorted(cuts), len(STREAM_BYTES)]
    out = b"".join(stream.feed(STREAM_BYTES[a:b]) for a, b in itertools.pairwise(points))
    assert out + stream.close() == expected


def test_an_error_event_ends_the_stream_as_chats_error_event() -> None:
    stream = ChatStream(True, 1)
    error = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    out = stream.feed(sse(STREAM[0]) + sse(error) + sse(STREAM[-1]))
    chunks = chunks_of(out)
    assert chunks[-1] == {"error": {"message": "Overloaded", "type": "overloaded_error", "code": "overloaded_error"}}
    assert stream.done and "[DONE]" not in chunks


def test_an_event_that_is_not_json_is_the_upstreams_failure() -> None:
    stream = ChatStream(False, 1)
    with pytest.raises(UpstreamError):
        stream.feed(b"event: message_start\ndata: {not json\n\n")


def test_a_whole_stream_where_a_reply_was_asked() -> None:
    out = whole_reply(200, STREAM_BYTES, False, 1)
    assert chunks_of(out)[-1] == "[DONE]"
    assert json.loads(whole_reply(200, orjson.dumps(MESSAGE), False, 1))["choices"][0]["finish_reason"] == "tool_calls"


def test_a_whole_stream_cut_short_ends_in_the_chat_error_event() -> None:
    # An upstream that streams whatever was asked, and whose body ends before message_stop:
    # the answer is incomplete, and says so (as a live stream does), not passed off as whole.
    cut = b"".join(sse(e) for e in STREAM[:7])  # up to the text's first delta
    chunks = chunks_of(whole_reply(200, cut, False, 1))
    assert chunks[-1]["error"]["code"] == "upstream_stream_broken"
    assert "[DONE]" not in chunks and "Hello " in json.dumps(chunks)


def test_nothing_goes_out_before_the_answer_begins() -> None:
    # Anthropic's stream opens with message_start; an overload reported right after it (before
    # any content) must be the first thing the gateway has to send, or no fallback can follow.
    overloaded = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    stream = ChatStream(False, 1)
    assert stream.feed(sse(STREAM[0]) + sse({"type": "ping"})) == b""
    assert chunks_of(stream.feed(sse(overloaded))) == [
        {"error": {"message": "Overloaded", "type": "overloaded_error", "code": "overloaded_error"}}
    ]


def test_a_tool_call_without_parameters_streams_the_arguments_the_reply_has() -> None:
    # A tool without parameters: Anthropic streams its input as one empty input_json_delta.
    # The chat client gets "{}" as the non-stream reply has it, not "", which is no JSON.
    events = [
        STREAM[0],
        {"type": "content_block_start", "index": 0, "content_block": {"type": "tool_use", "id": "t", "name": "now"}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta", "partial_json": ""}},
        {"type": "content_block_stop", "index": 0},
        {"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 3}},
        {"type": "message_stop"},
    ]
    stream = ChatStream(False, 1)
    chunks = chunks_of(stream.feed(b"".join(sse(e) for e in events)))
    arguments = "".join(
        call["function"].get("arguments") or ""
        for chunk in chunks[:-1]
        for call in chunk["choices"][0]["delta"].get("tool_calls") or ()
    )
    assert arguments == "{}"
    reply = chat_reply({"content": [{"type": "tool_use", "id": "t", "name": "now", "input": {}}]}, 1)
    assert reply["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"] == arguments


@pytest.mark.parametrize("index", [[0], {}, None, "0"])
def test_a_block_index_that_is_no_integer_is_ignored(index: object) -> None:
    # A list or an object as the index (a broken upstream) is no tool call's: left out, not a
    # TypeError (an internal error of the gateway's own, and no breaker failure).
    stream = ChatStream(False, 1)
    assert b'"role":"assistant"' in stream.feed(sse(STREAM[0]) + sse(STREAM[9]))  # a tool call at index 2
    delta = {"type": "input_json_delta", "partial_json": "{}"}
    hostile = sse({"type": "content_block_delta", "index": index, "delta": delta})
    assert stream.feed(hostile + sse({"type": "content_block_stop", "index": index})) == b""


@pytest.mark.parametrize("kind", [{}, ["content_block_delta"], {"type": "x"}])
def test_an_event_type_that_is_no_string_is_ignored(kind: object) -> None:
    # An object or a list as an event's type (a broken upstream) is no event Anthropic sends:
    # passed over like one of a later API version, not a TypeError (unhashable), which was a
    # 500 internal_error before the stream's first byte (found fuzzing the real gateway).
    stream = ChatStream(False, 1)
    assert stream.feed(sse(STREAM[0]) + sse({"type": kind, "index": 0})) == b""
    assert chunks_of(stream.feed(b"".join(sse(e) for e in STREAM[1:])))[-1] == "[DONE]"


@pytest.mark.parametrize(
    "body",
    [
        b"<html>502 Bad Gateway</html>",
        b"[1, 2]",
        b'"text"',
        orjson.dumps({"type": "message", "content": None}),
    ],
)
def test_a_2xx_that_is_no_message_is_the_upstreams_failure(body: bytes) -> None:
    # Not a Message, not an event stream: the upstream failed (a 502, or the next upstream),
    # never a 200 carrying an SSE error event or a "completion" with nothing in it.
    with pytest.raises(UpstreamError):
        whole_reply(200, body, False, 1)


@pytest.mark.parametrize(
    "body",
    [
        {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
        {"error": {"type": "overloaded_error", "message": "Overloaded"}},
    ],
)
def test_an_error_object_under_a_2xx_is_chats_error_body(body: dict[str, object]) -> None:
    # Its status is the proxy's to give, from the type (SPEC §13: 529 here), as for the same
    # error with its own status.
    error = {"message": "Overloaded", "type": "overloaded_error", "code": "overloaded_error"}
    assert orjson.loads(whole_reply(200, orjson.dumps(body), False, 1)) == {"error": error}


def test_a_completion_as_events_is_what_the_sdk_assembles_back() -> None:
    """A chat stream answered with one JSON reply goes out as the stream OpenAI would have
    sent (completion_events): the openai SDK's own stream state assembles it back into the
    completion: choices, text, refusals, tool calls and finish reasons."""
    from openai.lib.streaming.chat import ChatCompletionStreamState
    from openai.types.chat import ChatCompletionChunk

    from gateway import sse as events_format
    from gateway.translate import completion_events

    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    completion = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 7,
        "model": "gpt-4o",
        "system_fingerprint": "fp_1",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "Hi there"}, "finish_reason": "stop"},
            {
                "index": 1,
                "message": {"role": "assistant", "content": None, "tool_calls": [call, {**call, "id": "call_2"}]},
                "finish_reason": "tool_calls",
            },
            {"index": 2, "message": {"role": "assistant", "content": None, "refusal": "No."}, "finish_reason": "stop"},
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
    }
    events = completion_events(completion, with_usage=True)
    assert events is not None and events.endswith(b"data: [DONE]\n\n")
    state = ChatCompletionStreamState()
    for event in events_format.SSEParser().feed(events):
        if event.data != events_format.DONE:
            state.handle_chunk(ChatCompletionChunk.model_validate_json(event.data))
    final = state.get_final_completion()
    assert (final.id, final.model, final.created, final.system_fingerprint) == ("chatcmpl-1", "gpt-4o", 7, "fp_1")
    assert [c.finish_reason for c in final.choices] == ["stop", "tool_calls", "stop"]
    assert final.choices[0].message.content == "Hi there"
    calls = final.choices[1].message.tool_calls or []
    assert [(c.id, c.function.name, c.function.arguments) for c in calls] == [
        ("call_1", "f", '{"a": 1}'),
        ("call_2", "f", '{"a": 1}'),
    ]
    assert final.choices[2].message.refusal == "No."
    assert final.usage is not None and final.usage.total_tokens == 7
    assert completion_events({"error": {"message": "x"}}, with_usage=False) is None  # not a completion


def test_events_answering_a_request_without_stream_are_one_completion_the_sdk_reads() -> None:
    """A chat request without "stream" answered with events (a server that always streams) goes
    out as one completion (completion_from_events): deltas joined per choice, tool-call
    arguments per call, the last finish_reason and usage; an error event as its error object."""
    from gateway.translate import completion_from_events

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        head = {"id": "chatcmpl-9", "object": "chat.completion.chunk", "created": 5, "model": "gpt-4o"}
        return b"data: " + orjson.dumps({**head, "choices": choices, **extra}) + b"\n\n"

    def call(index: int, **fields: Any) -> dict[str, Any]:
        return {"index": 0, "delta": {"tool_calls": [{"index": index, **fields}]}, "finish_reason": None}

    parts = [
        b": keep-alive\n\n",
        chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]),
        chunk([{"index": 0, "delta": {"content": "Hi "}, "finish_reason": None}]),
        chunk([{"index": 1, "delta": {"role": "assistant", "refusal": "No"}, "finish_reason": None}]),
        chunk([{"index": 0, "delta": {"content": "j***e@example.com"}, "finish_reason": None}]),
        chunk([call(0, id="call_1", type="function", function={"name": "f", "arguments": ""})]),
        chunk([call(1, id="call_2", type="function", function={"name": "g", "arguments": '{"b"'})]),
        chunk([call(0, function={"arguments": '{"a": '})]),
        chunk([call(0, function={"arguments": "1}"})]),
        chunk([call(1, function={"arguments": ": 2}"})]),
        chunk([{"index": 1, "delta": {"refusal": "."}, "finish_reason": "stop"}]),
        chunk([{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]),
        chunk([], usage={"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}),
        b"data: [DONE]\n\n",
    ]
    completion = completion_from_events(b"".join(parts))
    assert completion is not None
    reply = ChatCompletion.model_validate(completion)
    assert (reply.id, reply.object, reply.created, reply.model) == ("chatcmpl-9", "chat.completion", 5, "gpt-4o")
    assert [c.index for c in reply.choices] == [0, 1]
    first, second = reply.choices
    assert (first.message.role, first.message.content, first.finish_reason) == (
        "assistant",
        "Hi j***e@example.com",
        "tool_calls",
    )
    assert [(c.id, c.function.name, c.function.arguments) for c in first.message.tool_calls or []] == [
        ("call_1", "f", '{"a": 1}'),
        ("call_2", "g", '{"b": 2}'),
    ]
    assert (second.message.content, second.message.refusal, second.finish_reason) == (None, "No.", "stop")
    assert reply.usage is not None and reply.usage.total_tokens == 7

    # What completion_events writes for a completion reads back as that completion.
    from gateway.translate import completion_events

    again = completion_from_events(completion_events(completion, with_usage=True) or b"")
    assert again is not None and ChatCompletion.model_validate(again) == reply

    error = {"message": "overloaded", "type": "server_error", "code": None}
    assert completion_from_events(b"".join(parts[:3]) + b"data: " + orjson.dumps({"error": error}) + b"\n\n") == {
        "error": error
    }
    assert completion_from_events(b": only a comment\n\ndata: [DONE]\n\n") is None


@pytest.mark.timeout(30)
def test_events_joined_into_a_completion_take_time_linear_in_their_number() -> None:
    """100,000 deltas of content and as many of a tool call's arguments (30 MB in all): grown
    by += inside a dict, each piece copied the whole text so far (quadratic: minutes), now
    gathered and joined once (~1 s)."""
    from gateway.translate import completion_from_events

    words, code = "a sentence of forty characters or so... " * 5, "x" * 100
    text = b"data: " + orjson.dumps({"choices": [{"index": 0, "delta": {"content": words}}]}) + b"\n\n"
    call = {"tool_calls": [{"index": 0, "function": {"arguments": code}}]}
    argument = b"data: " + orjson.dumps({"choices": [{"index": 0, "delta": call}]}) + b"\n\n"
    completion = completion_from_events((text + argument) * 100_000)
    assert completion is not None
    message = completion["choices"][0]["message"]
    assert message["content"] == words * 100_000
    assert message["tool_calls"][0]["function"]["arguments"] == code * 100_000


def test_events_joined_into_a_completion_keep_every_text_of_the_deltas() -> None:
    """What a server streams besides content (DeepSeek's and vLLM's `reasoning_content`,
    `annotations`, the legacy `function_call`) is part of the answer: joined too, not dropped."""
    from gateway.translate import completion_from_events

    def event(delta: dict[str, Any], finish: str | None = None) -> bytes:
        chunk = {"id": "c", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        return b"data: " + orjson.dumps(chunk) + b"\n\n"

    url = {"type": "url_citation", "url_citation": {"url": "https://example.com", "title": "x"}}
    events = [
        event({"role": "assistant", "reasoning_content": "First, "}),
        event({"reasoning_content": "think."}),
        event({"content": "Answer", "annotations": [url]}),
        event({"function_call": {"name": "f", "arguments": '{"a"'}}),
        event({"function_call": {"arguments": ": 1}"}}, "function_call"),
    ]
    completion = completion_from_events(b"".join(events) + b"data: [DONE]\n\n")
    assert completion is not None
    message = completion["choices"][0]["message"]
    assert message["reasoning_content"] == "First, think."
    assert message["content"] == "Answer"
    assert message["annotations"] == [url]
    assert message["function_call"] == {"name": "f", "arguments": '{"a": 1}'}
    assert completion["choices"][0]["finish_reason"] == "function_call"


def test_events_joined_into_a_completion_keep_custom_tool_input_and_audio() -> None:
    """A custom (freeform) tool's call streams its `input` in pieces, an audio reply its
    `transcript` and `data`: the join dropped both (a tool call with no input, no audio at all)
    from the JSON a request without "stream" got. Joined as arguments and content are."""
    from gateway.translate import completion_from_events

    def event(delta: dict[str, Any], finish: str | None = None) -> bytes:
        chunk = {"id": "c", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        return b"data: " + orjson.dumps(chunk) + b"\n\n"

    call = {"index": 0, "id": "call_1", "type": "custom", "custom": {"name": "sh", "input": "ls "}}
    events = [
        event({"role": "assistant", "audio": {"id": "audio_1", "transcript": "Hel", "data": "AAA", "expires_at": 9}}),
        event({"audio": {"transcript": "lo.", "data": "BBB"}}),
        event({"tool_calls": [call]}),
        event({"tool_calls": [{"index": 0, "custom": {"input": "-la"}}]}, "tool_calls"),
    ]
    completion = completion_from_events(b"".join(events) + b"data: [DONE]\n\n")
    assert completion is not None
    message = completion["choices"][0]["message"]
    assert message["audio"] == {"id": "audio_1", "transcript": "Hello.", "data": "AAABBB", "expires_at": 9}
    assert message["tool_calls"] == [{"id": "call_1", "type": "custom", "custom": {"name": "sh", "input": "ls -la"}}]
    sdk = ChatCompletion.model_validate({**completion, "created": 1, "model": "m"})
    assert sdk.choices[0].message.audio is not None and sdk.choices[0].message.audio.transcript == "Hello."


def test_events_joined_into_a_completion_keep_the_answer_after_thinking_chunks() -> None:
    """Mistral's reasoning models stream `content` as a list of thinking chunks, then the
    answer as strings: the join kept the list and dropped the strings (the answer lost). Both
    come back as the list of content chunks the whole reply holds, the answer a text chunk."""
    from gateway.translate import completion_from_events

    def event(delta: dict[str, Any], finish: str | None = None) -> bytes:
        chunk = {"id": "c", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        return b"data: " + orjson.dumps(chunk) + b"\n\n"

    thinking = {"type": "thinking", "thinking": [{"type": "text", "text": "2 and 2"}]}
    events = [
        event({"role": "assistant", "content": [thinking]}),
        event({"content": "The answer"}),
        event({"content": " is 4."}, "stop"),
    ]
    completion = completion_from_events(b"".join(events) + b"data: [DONE]\n\n")
    assert completion is not None
    assert completion["choices"][0]["message"]["content"] == [thinking, {"type": "text", "text": "The answer is 4."}]


def test_events_joined_into_a_completion_hold_one_reasoning_detail_per_index() -> None:
    """OpenRouter streams `reasoning_details` items whose text comes in pieces under one
    index (its signature in the last); the join listed every piece as an item of its own
    (three items for one, the signature on none but the last), where a whole reply holds one
    item per index, which clients pass back on the next turn."""
    from gateway.translate import completion_from_events

    def event(delta: dict[str, Any], finish: str | None = None) -> bytes:
        chunk = {"id": "c", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        return b"data: " + orjson.dumps(chunk) + b"\n\n"

    def detail(text: str, signature: str | None = None) -> dict[str, Any]:
        return {"type": "reasoning.text", "index": 0, "text": text, "signature": signature, "format": "x"}

    encrypted = {"type": "reasoning.encrypted", "index": 1, "data": "QUJD"}
    events = [
        event({"role": "assistant", "reasoning_details": [detail("First, ")]}),
        event({"reasoning_details": [detail("think")]}),
        event({"reasoning_details": [detail(".", "sig"), encrypted]}),
        event({"content": "4"}, "stop"),
    ]
    completion = completion_from_events(b"".join(events) + b"data: [DONE]\n\n")
    assert completion is not None
    message = completion["choices"][0]["message"]
    assert message["reasoning_details"] == [
        {"type": "reasoning.text", "index": 0, "text": "First, think.", "signature": "sig", "format": "x"},
        encrypted,
    ]
    assert message["content"] == "4"
