"""Requests without "stream" that the upstream answers with events (a server that streams
whatever it is asked), on /v1/messages and /v1/responses: the official SDKs' non-stream
create() must get the one Message / Response the JSON form is, redacted as the events were.
Real gateway processes in front of a scriptable fake upstream (tests/e2e/scripted_upstream.py)."""

from __future__ import annotations

import json

import anthropic
import openai
import pytest

from .test_adversarial import healthz_watch
from .test_routing_review import HI, fakes, gateway, post, sse

__all__ = ["fakes", "gateway"]  # the fixtures, shared with test_routing_review

USAGE = {"input_tokens": 30, "output_tokens": 1, "cache_read_input_tokens": 5, "cache_creation_input_tokens": 7}
START = {
    "type": "message_start",
    "message": {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "claude-x",
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": USAGE,
    },
}


def _delta(index: int, **delta: str) -> dict:
    return {"type": "content_block_delta", "index": index, "delta": delta}


# PII split across deltas: "jane.doe@exa" + "mple.com" in the text and in the tool's input.
ANSWER = [
    START,
    {"type": "content_block_start", "index": 0, "content_block": {"type": "thinking", "thinking": "", "signature": ""}},
    _delta(0, type="thinking_delta", thinking="Let me think "),
    _delta(0, type="thinking_delta", thinking="about it."),
    _delta(0, type="signature_delta", signature="EqQBCgIYAhIM1gbcDa9GJwZA2b3h"),
    {"type": "content_block_stop", "index": 0},
    {"type": "ping"},
    {"type": "content_block_start", "index": 1, "content_block": {"type": "text", "text": ""}},
    _delta(1, type="text_delta", text="Write to jane.doe@exa"),
    _delta(1, type="text_delta", text="mple.com today."),
    {"type": "content_block_stop", "index": 1},
    {
        "type": "content_block_start",
        "index": 2,
        "content_block": {"type": "tool_use", "id": "toolu_1", "name": "send", "input": {}},
    },
    _delta(2, type="input_json_delta", partial_json=""),
    _delta(2, type="input_json_delta", partial_json='{"to": "jane.doe@exa'),
    _delta(2, type="input_json_delta", partial_json='mple.com", "n": 3}'),
    {"type": "content_block_stop", "index": 2},
    {
        "type": "message_delta",
        "delta": {"stop_reason": "tool_use", "stop_sequence": None},
        "usage": {"output_tokens": 20},
    },
    {"type": "message_stop"},
]
MASKED = "j***e@example.com"


def _messages_gateway(fakes, gateway, **env: str):
    return gateway(ANTHROPIC_BASE_URL=fakes["claude"].url, ANTHROPIC_API_KEY="sk-ant-x", **env)


def _anthropic(gw) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gw.url, api_key="demo", max_retries=0, timeout=20)


# SPEC §11: a request without "stream" gets the Message (JSON), its texts and tool input
# redacted as the events were; thinking and its signature as they came; usage as a stream's.
def test_a_json_messages_request_answered_with_events_gets_one_message(fakes, gateway) -> None:
    fakes["claude"].script({"status": 200, "chunks": [sse(ANSWER)]})
    gw = _messages_gateway(fakes, gateway)
    raw = _anthropic(gw).messages.with_raw_response.create(model="claude-x", max_tokens=100, messages=HI)
    assert raw.headers["content-type"].startswith("application/json")
    message = raw.parse()
    assert isinstance(message, anthropic.types.Message)
    assert message.model_dump(exclude_none=True) == {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "claude-x",
        "content": [
            {"type": "thinking", "thinking": "Let me think about it.", "signature": "EqQBCgIYAhIM1gbcDa9GJwZA2b3h"},
            {"type": "text", "text": f"Write to {MASKED} today."},
            {"type": "tool_use", "id": "toolu_1", "name": "send", "input": {"to": MASKED, "n": 3}},
        ],
        "stop_reason": "tool_use",
        "usage": {**USAGE, "output_tokens": 20},
    }


# SPEC §14: the joined reply's usage settles the reservation, as the live stream's would.
def test_a_joined_message_settles_the_token_budget(fakes, gateway) -> None:
    gw = _messages_gateway(fakes, gateway, TOKEN_QUOTA="100000", TOKEN_WINDOW_SECS="3600")
    fakes["claude"].script({"status": 200, "chunks": [sse(ANSWER)]})
    body = {"model": "claude-x", "max_tokens": 100, "messages": HI}
    status, _, data = post(gw.port, "/v1/messages", body, {"x-api-key": "t"})
    assert status == 200, data[:300]
    fakes["claude"].script({"status": 200, "chunks": [sse(ANSWER)]})
    _, headers, _ = post(gw.port, "/v1/messages", {**body, "max_tokens": 1}, {"x-api-key": "t"})
    # 42 prompt + 20 completion settled; this one reserves "hi" / 4 rounded up + 1.
    assert int(headers["x-ratelimit-remaining-tokens"]) == 100000 - 62 - 2


# After the answer began: an error event, or the events ending before message_stop, is the
# upstream failing: the gateway's 502 in Anthropic's shape, not a partial Message.
@pytest.mark.parametrize(
    "events",
    [
        [*ANSWER[:9], {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}],
        ANSWER[:-1],
        ANSWER[:9],
    ],
    ids=["error-event", "no-message-stop", "cut"],
)
def test_a_json_messages_request_whose_events_fail_later_is_a_502(fakes, gateway, events: list[dict]) -> None:
    fakes["claude"].script({"status": 200, "chunks": [sse(events)]})
    gw = _messages_gateway(fakes, gateway)
    with pytest.raises(anthropic.InternalServerError) as raised:
        _anthropic(gw).messages.create(model="claude-x", max_tokens=100, messages=HI)
    assert raised.value.status_code == 502
    assert raised.value.body["type"] == "error" and raised.value.body["error"]["type"] == "api_error"
    assert "jane" not in raised.value.response.text


# SPEC §6 (the gateway keeps serving others): megabytes of events are joined off the loop.
@pytest.mark.serial  # asserts a time: run alone, not beside another worker
def test_a_long_joined_message_leaves_healthz_answering(fakes, gateway) -> None:
    words = "a sentence of forty characters or so... " * 5
    tool = {
        "type": "content_block_start",
        "index": 1,
        "content_block": {"type": "tool_use", "id": "t", "name": "f", "input": {}},
    }
    text = {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    events = [START, text, tool, _delta(1, type="input_json_delta", partial_json='{"k": "')]
    events += [
        _delta(0, type="text_delta", text=words),
        _delta(1, type="input_json_delta", partial_json="x" * 100),
    ] * 20_000
    events += [_delta(1, type="input_json_delta", partial_json='"}'), *ANSWER[-2:]]
    fakes["claude"].script({"status": 200, "chunks": [sse(events)]})
    gw = _messages_gateway(fakes, gateway)
    with healthz_watch(gw) as latencies:
        status, _, data = post(gw.port, "/v1/messages", {"model": "claude-x", "max_tokens": 5, "messages": HI})
    print(f"\n{len(data) >> 20} MiB joined, /healthz worst {max(latencies) * 1000:.0f} ms of {len(latencies)}")
    assert status == 200, data[:300]
    content = json.loads(data)["content"]
    assert content[0]["text"] == words * 20_000 and content[1]["input"] == {"k": "x" * 2_000_000}
    assert max(latencies) < 0.25  # SPEC's 100 ms, with room for a loaded machine


# --- /v1/responses -----------------------------------------------------------------------


def _response(status: str, text: str, **extra: object) -> dict:
    return {
        "id": "resp_1",
        "object": "response",
        "created_at": 1,
        "status": status,
        "model": "gpt-4o",
        "output": [
            {
                "id": "msg_1",
                "type": "message",
                "role": "assistant",
                "status": "completed",
                "content": [{"type": "output_text", "text": text, "annotations": []}],
            }
        ]
        if text
        else [],
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        **extra,
    }


def _responses_events(*tail: dict) -> list[dict]:
    part = {"type": "output_text", "text": "", "annotations": []}
    item = {"id": "msg_1", "type": "message", "role": "assistant", "status": "in_progress", "content": []}
    events = [
        {"type": "response.created", "response": _response("in_progress", "")},
        {"type": "response.in_progress", "response": _response("in_progress", "")},
        {"type": "response.output_item.added", "output_index": 0, "item": item},
        {
            "type": "response.content_part.added",
            "output_index": 0,
            "content_index": 0,
            "item_id": "msg_1",
            "part": part,
        },
        {
            "type": "response.output_text.delta",
            "output_index": 0,
            "content_index": 0,
            "item_id": "msg_1",
            "delta": "Write to jane.doe@exa",
        },
        {
            "type": "response.output_text.delta",
            "output_index": 0,
            "content_index": 0,
            "item_id": "msg_1",
            "delta": "mple.com today.",
        },
        *tail,
    ]
    return [{**event, "sequence_number": number} for number, event in enumerate(events)]


TEXT = "Write to jane.doe@example.com today."
RESPONSE_USAGE = {"input_tokens": 9, "output_tokens": 11, "total_tokens": 20}
DONE = [
    {"type": "response.output_text.done", "output_index": 0, "content_index": 0, "item_id": "msg_1", "text": TEXT},
    {
        "type": "response.content_part.done",
        "output_index": 0,
        "content_index": 0,
        "item_id": "msg_1",
        "part": {"type": "output_text", "text": TEXT, "annotations": []},
    },
    {"type": "response.completed", "response": _response("completed", TEXT, usage=RESPONSE_USAGE)},
]


def _openai(gw) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key="demo", max_retries=0, timeout=20)


# SPEC §12: a request without "stream" gets the Response (JSON): the terminal event's, its
# copy of the text redacted as the deltas were.
def test_a_json_responses_request_answered_with_events_gets_one_response(fakes, gateway) -> None:
    fakes["backup"].script({"status": 200, "chunks": [sse(_responses_events(*DONE))]})
    gw = gateway()
    raw = _openai(gw).responses.with_raw_response.create(model="gpt-4o", input="hi")
    assert raw.headers["content-type"].startswith("application/json")
    response = raw.parse()
    assert response.id == "resp_1" and response.status == "completed"
    assert response.output_text == f"Write to {MASKED} today."
    assert response.usage is not None and response.usage.output_tokens == 11


# A response that ran out of tokens is an answer: the Response, its status "incomplete".
def test_an_incomplete_response_is_the_response(fakes, gateway) -> None:
    incomplete = _response("incomplete", TEXT, incomplete_details={"reason": "max_output_tokens"})
    fakes["backup"].script(
        {
            "status": 200,
            "chunks": [sse(_responses_events(*DONE[:2], {"type": "response.incomplete", "response": incomplete}))],
        }
    )
    response = _openai(gateway()).responses.create(model="gpt-4o", input="hi")
    assert response.status == "incomplete" and response.output_text == f"Write to {MASKED} today."


FAILED = _response("failed", "", error={"code": "server_error", "message": "The model failed"})


# A failure after the answer began (response.failed, an error event, no terminal event at
# all) is the upstream's: a 502 in OpenAI's shape, not a partial Response.
@pytest.mark.parametrize(
    ("tail", "message"),
    [
        ([{"type": "response.failed", "response": FAILED}], "The model failed"),
        ([{"type": "error", "code": "server_error", "message": "Stream failed", "param": None}], "Stream failed"),
        ([], "upstream stream ended unexpectedly"),
    ],
    ids=["failed", "error-event", "cut"],
)
def test_a_json_responses_request_whose_events_fail_later_is_a_502(
    fakes, gateway, tail: list[dict], message: str
) -> None:
    fakes["backup"].script({"status": 200, "chunks": [sse(_responses_events(*tail))]})
    with pytest.raises(openai.InternalServerError) as raised:
        _openai(gateway()).responses.create(model="gpt-4o", input="hi")
    assert raised.value.status_code == 502 and raised.value.body["message"] == message
    assert "jane" not in raised.value.response.text


# One that opens with the failure (past response.created and .in_progress): its status, as an
# error object under a 200 gets.
@pytest.mark.parametrize(
    ("failure", "error"),
    [
        (
            {
                "type": "response.failed",
                "response": {**FAILED, "error": {"code": "rate_limit_exceeded", "message": "Slow down"}},
            },
            openai.RateLimitError,
        ),
        (
            {"type": "error", "code": "context_length_exceeded", "message": "Too long", "param": "input"},
            openai.BadRequestError,
        ),
    ],
)
def test_a_json_responses_request_whose_events_open_with_a_failure_gets_its_status(
    fakes, gateway, failure: dict, error: type[openai.APIStatusError]
) -> None:
    events = [*_responses_events()[:2], {**failure, "sequence_number": 2}]
    fakes["backup"].script({"status": 200, "chunks": [sse(events)]})
    with pytest.raises(error) as raised:
        _openai(gateway()).responses.create(model="gpt-4o", input="hi")
    assert raised.value.response.headers["content-type"].startswith("application/json")


# A tool input nested deeper than JSON writers go (the parser takes it): the events relay as
# they came, but the one Message cannot be written: the gateway's 502, not a 500 (a traceback).
def test_a_json_messages_request_whose_tool_input_is_nested_too_deeply_is_a_502(fakes, gateway) -> None:
    deep = '{"a":' * 1000 + "1" + "}" * 1000
    tool = {"type": "tool_use", "id": "toolu_1", "name": "send", "input": {}}
    events = [
        START,
        {"type": "content_block_start", "index": 0, "content_block": tool},
        _delta(0, type="input_json_delta", partial_json=deep),
        {"type": "content_block_stop", "index": 0},
        *ANSWER[-2:],
    ]
    fakes["claude"].script({"status": 200, "chunks": [sse(events)]})
    gw = _messages_gateway(fakes, gateway)
    with pytest.raises(anthropic.InternalServerError) as raised:
        _anthropic(gw).messages.create(model="claude-x", max_tokens=100, messages=HI)
    assert raised.value.status_code == 502
    assert raised.value.body["error"]["type"] == "api_error"


# SPEC §14: a chat request without "stream" whose events fail after the answer began was
# generated for (a 502, as for the joined Message and Response above): the estimate stands as
# a cut live stream's does, not released as an upstream's error status's.
def test_a_json_chat_request_whose_events_fail_later_keeps_its_estimate(fakes, gateway) -> None:
    gw = gateway(TOKEN_QUOTA="100000", TOKEN_WINDOW_SECS="3600")
    chunk = {
        "id": "c1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hello"}, "finish_reason": None}],
    }
    failed = {"error": {"message": "boom", "type": "server_error", "code": None, "param": None}}
    fakes["backup"].script({"status": 200, "chunks": [f"data: {json.dumps(chunk)}\n\ndata: {json.dumps(failed)}\n\n"]})
    body = {"model": "m", "max_tokens": 100, "messages": HI}
    status, _, data = post(gw.port, "/v1/chat/completions", body, {"Authorization": "Bearer t"})
    assert status == 502, data[:300]
    fakes["backup"].script({"status": 200, "chunks": [f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n"]})
    _, headers, _ = post(gw.port, "/v1/chat/completions", {**body, "max_tokens": 1}, {"Authorization": "Bearer t"})
    # The first one's estimate ("hi" / 4 rounded up + 100) stands; this one reserves 1 + 1.
    assert int(headers["x-ratelimit-remaining-tokens"]) == 100000 - 101 - 2
