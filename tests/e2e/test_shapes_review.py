"""What a review of reply shapes found (each test failed before its fix): a real gateway in
front of a scriptable fake upstream (tests/e2e/scripted_upstream.py)."""

from __future__ import annotations

import json

import anthropic
import openai
import pytest

from ..harness import Gateway, wait_until
from .test_routing_review import EMAIL, HI, Fake, post, sse, write_routes
from .test_telemetry import samples

PHONE = "+1 415 555 0100"


@pytest.fixture(scope="module")
def fake(tmp_path_factory: pytest.TempPathFactory):
    made = Fake(tmp_path_factory.mktemp("fake"))
    yield made
    made.stop()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, fake: Fake):
    tmp = tmp_path_factory.mktemp("gw")
    routes = tmp / "routes.toml"
    write_routes(
        routes,
        {"claude": ("anthropic", fake.url), "gpt": ("openai", fake.url)},
        [("claude-*", [("claude", None)]), ("*", [("gpt", None)])],
    )
    gw = Gateway(
        tmp,
        {
            "OPENAI_BASE_URL": fake.url,
            "OPENAI_API_KEY": "sk-shapes",
            "ANTHROPIC_BASE_URL": fake.url,
            "ANTHROPIC_API_KEY": "sk-ant-shapes",
            "R19_KEY": "sk-r19-secret",
            "ROUTES_FILE": str(routes),
        },
    )
    yield gw
    gw.stop()


def message(content: list[dict]) -> dict:
    return {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "claude-x",
        "content": content,
        "stop_reason": "tool_use",
        "stop_sequence": None,
        "usage": {"input_tokens": 11, "output_tokens": 7},
    }


# 1. SPEC §3/§11: a stream request answered with one JSON Message (a server that ignores
#    "stream") was relayed as JSON: the anthropic SDK's messages.stream() failed (AssertionError).
def test_a_json_message_answering_a_stream_request_goes_out_as_its_events(gateway: Gateway, fake: Fake) -> None:
    content = [
        {"type": "thinking", "thinking": "let me think", "signature": "sig=="},
        {"type": "text", "text": f"write to {EMAIL} now"},
        {"type": "tool_use", "id": "tu_1", "name": "send", "input": {"to": EMAIL, "n": 2}},
    ]
    fake.script({"status": 200, "body": json.dumps(message(content))})
    before = samples(gateway)
    client = anthropic.Anthropic(base_url=gateway.url, api_key="demo", max_retries=0, timeout=20)
    with client.messages.stream(model="claude-x", max_tokens=50, messages=HI) as stream:
        texts = list(stream.text_stream)
        final = stream.get_final_message()
    assert "".join(texts) == "write to j***e@example.com now"
    assert [block.type for block in final.content] == ["thinking", "text", "tool_use"]
    assert final.content[0].thinking == "let me think" and final.content[0].signature == "sig=="
    assert final.content[1].text == "write to j***e@example.com now"
    assert final.content[2].input == {"to": "j***e@example.com", "n": 2}
    assert (final.id, final.stop_reason, final.usage.input_tokens, final.usage.output_tokens) == (
        "msg_1",
        "tool_use",
        11,
        7,
    )
    assert EMAIL not in final.model_dump_json()

    def counted() -> dict[str, float]:  # the usage counted once (logged and counted after the answer went out)
        after = samples(gateway)
        return {
            k: v - before.get(k, 0) for k, v in after.items() if k.startswith("tokens_total") and v != before.get(k)
        }

    wait_until(lambda: len(counted()) == 2, what="the tokens counted")
    assert sorted(counted().values()) == [7, 11], counted()


def chat(gateway: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key="demo", max_retries=0, timeout=20)


# 3. SPEC §13: a non-stream reply that is a failure under a 200 (an error object; Anthropic's
#    events opening with an error, translated) reached the client as `200 {"error": ...}`: the
#    openai SDK returned a completion with choices=None instead of raising.
@pytest.mark.parametrize(
    ("error", "status"),
    [
        ({"message": "Provider returned error sk-r19-secret", "code": 503}, 503),
        ({"message": "boom", "type": "server_error", "param": None, "code": None}, 500),
        ({"message": "slow down", "type": "requests", "code": "rate_limit_exceeded"}, 429),
        ({"message": "too long", "type": "invalid_request_error", "code": "context_length_exceeded"}, 400),
        ({"message": "who knows"}, 502),
        ({"message": "bad key", "type": "authentication_error"}, 502),
    ],
)
def test_an_error_object_under_a_200_is_raised_by_the_sdk_with_its_status(
    gateway: Gateway, fake: Fake, error: dict, status: int
) -> None:
    fake.script({"status": 200, "body": json.dumps({"error": error})})
    with pytest.raises(openai.APIStatusError) as raised:
        chat(gateway).chat.completions.create(model="gpt-x", messages=HI)
    assert raised.value.status_code == status
    body = raised.value.response.json()
    assert "sk-r19-secret" not in raised.value.response.text
    if status != 502 or "type" not in error:
        assert body["error"]["message"] == error["message"].replace("sk-r19-secret", body["error"]["message"][-3:])


def test_a_translated_overload_after_message_start_is_a_529_for_the_openai_sdk(gateway: Gateway, fake: Fake) -> None:
    start = {"type": "message_start", "message": message([]) | {"stop_reason": None}}
    overloaded = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    fake.script({"status": 200, "chunks": [sse([start, overloaded])]})
    with pytest.raises(openai.APIStatusError) as raised:
        chat(gateway).chat.completions.create(model="claude-x", messages=HI)
    assert raised.value.status_code == 529
    assert raised.value.response.json()["error"]["type"] == "overloaded_error"


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}, anthropic.APIStatusError),
        ({"type": "error", "error": {"type": "rate_limit_error", "message": "slow"}}, anthropic.RateLimitError),
        ({"error": {"type": "not_found_error", "message": "no"}}, anthropic.NotFoundError),
    ],
)
def test_an_error_object_under_a_200_on_messages_is_raised_by_the_anthropic_sdk(
    gateway: Gateway, fake: Fake, body: dict, error: type
) -> None:
    fake.script({"status": 200, "body": json.dumps(body)})
    client = anthropic.Anthropic(base_url=gateway.url, api_key="demo", max_retries=0, timeout=20)
    with pytest.raises(error) as raised:
        client.messages.create(model="claude-x", max_tokens=50, messages=HI)
    assert raised.value.response.json() == {"type": "error", "error": body["error"]}
    if body["error"]["type"] == "overloaded_error":
        assert raised.value.status_code == 529


def test_a_streams_error_event_after_its_answer_began_stays_an_event(gateway: Gateway, fake: Fake) -> None:
    start = {"type": "message_start", "message": message([]) | {"stop_reason": None}}
    block = {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    delta = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi"}}
    overloaded = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    fake.script({"status": 200, "chunks": [sse([start, block, delta]), sse([overloaded])], "chunk_delay": 0.2})
    status, headers, data = post(
        gateway.port, "/v1/messages", {"model": "claude-x", "max_tokens": 5, "messages": HI, "stream": True}
    )
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    assert data.endswith(b"event: error\ndata: " + json.dumps(overloaded).encode() + b"\n\n")


# 2. SPEC §12: text in both added-events of a part (output_item.added's item.content[].text and
#    content_part.added's part.text) was joined into one text: `+1 415 555 ***e@…`, part of
#    the phone in clear.
def test_texts_in_a_parts_added_events_are_redacted_whole(gateway: Gateway, fake: Fake) -> None:
    first, second = f"call {PHONE}", f"{EMAIL} later"
    item = {"id": "msg_1", "type": "message", "role": "assistant", "status": "in_progress"}
    part = {"type": "output_text", "annotations": []}
    events = [
        {"type": "response.created", "response": {"id": "r", "object": "response", "output": []}},
        {"type": "response.output_item.added", "output_index": 0, "item": item | {"content": [part | {"text": first}]}},
        {
            "type": "response.content_part.added",
            "output_index": 0,
            "content_index": 0,
            "item_id": "msg_1",
            "part": part | {"text": second},
        },
        {
            "type": "response.output_text.delta",
            "output_index": 0,
            "content_index": 0,
            "item_id": "msg_1",
            "delta": " end",
        },
        {
            "type": "response.output_text.done",
            "output_index": 0,
            "content_index": 0,
            "item_id": "msg_1",
            "text": first + second + " end",
        },
        {
            "type": "response.completed",
            "response": {
                "id": "r",
                "object": "response",
                "status": "completed",
                "output": [item | {"status": "completed", "content": [part | {"text": first + second + " end"}]}],
            },
        },
    ]
    for number, event in enumerate(events):
        event["sequence_number"] = number
    fake.script({"status": 200, "chunks": [sse(events)]})
    status, _, data = post(gateway.port, "/v1/responses", {"model": "gpt-x", "input": "hi", "stream": True})
    assert status == 200
    text = data.decode()
    assert EMAIL not in text and "415" not in text, text
    sent = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]
    seen = ""
    for event in sent:  # what a client assembles: the opening texts, then the deltas
        if event["type"] == "response.output_item.added":
            seen += event["item"]["content"][0]["text"]
        elif event["type"] == "response.content_part.added":
            seen += event["part"]["text"]
        elif event["type"] == "response.output_text.delta":
            seen += event["delta"]
    done = next(event["text"] for event in sent if event["type"] == "response.output_text.done")
    completed = sent[-1]["response"]["output"][0]["content"][0]["text"]
    assert seen == done == completed == "call PHONE_MASKED_LAST2_00j***e@example.com later end"
