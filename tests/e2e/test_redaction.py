"""Redaction through the real gateway process: prompts, replies, any split of a stream."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import openai
import pydantic
import pytest
from hypothesis import HealthCheck, given, settings

from gateway.redact import ALL_KINDS, build_redactor

from ..conftest import GatewayFactory
from ..harness import Gateway, Mock
from ..test_redact import PII, split_reply

REDACTOR = build_redactor(ALL_KINDS)
assert REDACTOR is not None
ALL_PII = [v for values in PII.values() for v in values]


def sdk(gateway: Gateway, **headers: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key="demo", max_retries=0, default_headers=headers or None)


def test_pii_in_the_prompt_never_reaches_the_upstream(shared_gateway: Gateway, mock: Mock) -> None:
    prompt = "I am jane.doe@example.com, card 4242 4242 4242 4242, phone +1 415 555 2671, order 123456789012."
    reply = sdk(shared_gateway, **{"x-stainless-mock-echo": "1"}).chat.completions.create(
        model="m",
        messages=[
            {"role": "system", "content": "ssn 123-45-6789"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": prompt},
                    {"type": "image_url", "image_url": {"url": "https://x/a@b.com.png"}},
                ],
            },
        ],
    )
    [seen] = mock.requests()
    sent = json.dumps(seen["body"])
    for value in ("jane.doe@example.com", "4242 4242 4242 4242", "+1 415 555 2671", "123-45-6789"):
        assert value not in sent
    assert "order 123456789012" in sent  # look-alikes pass
    assert seen["body"]["messages"][1]["content"][1] == {
        "type": "image_url",
        "image_url": {"url": "https://x/a@b.com.png"},
    }
    assert reply.choices[0].message.content == REDACTOR.redact(prompt)


def test_non_stream_reply_is_redacted(shared_gateway: Gateway, mock: Mock) -> None:
    text = "Reach Jane at jane@example.com or 4111-1111-1111-1111; released 3.11.7 on 2024-01-15."
    reply = sdk(shared_gateway, **{"x-stainless-mock-reply": text}).chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}]
    )
    assert (
        reply.choices[0].message.content
        == "Reach Jane at j***e@example.com or CC_MASKED_LAST4_1111; released 3.11.7 on 2024-01-15."
    )


async def stream_through(gateway: Gateway, deltas: list[str]) -> list[str]:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    emitted: list[str] = []
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            gateway.url + "/v1/chat/completions", json=body, headers={"x-stainless-mock-deltas": json.dumps(deltas)}
        ) as response,
    ):
        assert response.status == 200
        async for line in response.content:
            if line.startswith(b"data: {"):
                for choice in json.loads(line[6:])["choices"]:
                    emitted.append(choice["delta"].get("content") or "")
    return emitted


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(case=split_reply())
async def test_any_split_of_a_streamed_reply_is_redacted_like_the_whole(
    shared_gateway: Gateway, mock_process: Mock, case: tuple[str, list[str]]
) -> None:
    text, deltas = case
    emitted = await stream_through(shared_gateway, deltas)
    assert "".join(emitted) == REDACTOR.redact(text)
    for value in ALL_PII:
        if value in text and value not in REDACTOR.redact(text):
            assert all(value not in delta for delta in emitted)


async def test_split_pii_examples_from_the_issue(shared_gateway: Gateway, mock: Mock) -> None:
    emitted = await stream_through(
        shared_gateway, ["Mail jane.doe@exa", "mple.com and pay with 4242 42", "42 4242 4242", " now"]
    )
    assert "".join(emitted) == "Mail j***e@example.com and pay with CC_MASKED_LAST4_4242 now"


# Half of an emoji, as a JSON escape: valid JSON that orjson refuses to parse.
HALF_EMOJI_DELTAS = ["mail jane.doe@example.com ", "\ud83d ok"]
HALF_EMOJI_REDACTED = "mail j***e@example.com \ufffd ok"


def test_a_reply_with_a_lone_surrogate_escape_is_still_redacted(shared_gateway: Gateway, mock: Mock) -> None:
    reply = sdk(shared_gateway, **{"x-stainless-mock-deltas": json.dumps(HALF_EMOJI_DELTAS)}).chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}]
    )
    assert reply.choices[0].message.content == HALF_EMOJI_REDACTED


async def test_a_stream_with_a_lone_surrogate_escape_is_still_redacted(shared_gateway: Gateway, mock: Mock) -> None:
    assert "".join(await stream_through(shared_gateway, HALF_EMOJI_DELTAS)) == HALF_EMOJI_REDACTED


@pytest.mark.parametrize("usage", [False, True])
def test_a_stream_request_answered_with_one_json_reply_is_a_stream_redacted(
    shared_gateway: Gateway, mock: Mock, usage: bool
) -> None:
    # A server without streaming answers `"stream": true` with a plain JSON reply. Relayed as
    # JSON, the openai SDK iterated no chunk and raised nothing: the answer was lost. It is
    # the stream OpenAI would have sent for it (SPEC §3: "stream": true gets SSE).
    client = sdk(
        shared_gateway, **{"x-stainless-mock-answer": "json", "x-stainless-mock-reply": "mail jane.doe@example.com now"}
    )
    options = {"stream_options": {"include_usage": True}} if usage else {}
    raw = client.chat.completions.with_raw_response.create(
        model="m", messages=[{"role": "user", "content": "hi"}], stream=True, **options
    )
    assert raw.headers["content-type"].startswith("text/event-stream")
    chunks = list(raw.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "mail j***e@example.com now"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    usage_chunks = [c for c in chunks if not c.choices]
    assert bool(usage_chunks) == usage and all(c.usage is not None and c.usage.total_tokens for c in usage_chunks)


def test_a_request_without_stream_answered_with_events_is_one_json_completion_redacted(
    shared_gateway: Gateway, mock: Mock
) -> None:
    # A server that always streams answers a request without "stream" with events. Relayed as
    # events, the openai SDK's create() returned the SSE text as a str, not a ChatCompletion
    # (black-box review; SPEC §3: absent or false gets JSON, as OpenAI).
    client = sdk(
        shared_gateway,
        **{
            "x-stainless-mock-answer": "events",
            "x-stainless-mock-deltas": json.dumps(["mail jane.doe@exa", "mple.com", " now"]),
        },
    )
    raw = client.chat.completions.with_raw_response.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert raw.headers["content-type"].startswith("application/json")
    reply = raw.parse()
    assert reply.object == "chat.completion"
    assert [c.message.content for c in reply.choices] == ["mail j***e@example.com now"]
    assert reply.choices[0].finish_reason == "stop" and reply.choices[0].message.role == "assistant"


async def test_a_stream_under_a_json_content_type_is_relayed_as_events_and_redacted(
    shared_gateway: Gateway, mock: Mock
) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    headers = {
        "x-stainless-mock-answer": "events",
        "x-stainless-mock-deltas": json.dumps(["mail jane.doe@exa", "mple.com"]),
        "x-stainless-mock-stream-type": "application/json",
    }
    async with (
        aiohttp.ClientSession() as session,
        session.post(shared_gateway.url + "/v1/chat/completions", json=body, headers=headers) as response,
    ):
        assert response.status == 200 and response.content_type == "text/event-stream"
        wire = await response.read()
    texts = [
        choice["delta"].get("content") or ""
        for line in wire.split(b"\n")
        if line.startswith(b"data: {")
        for choice in json.loads(line[6:])["choices"]
    ]
    assert "".join(texts) == "mail j***e@example.com" and wire.endswith(b"data: [DONE]\n\n")


async def test_redactions_are_counted_by_kind_and_direction(start_gateway: GatewayFactory, mock: Mock) -> None:
    gateway = start_gateway()
    sdk(gateway, **{"x-stainless-mock-reply": "call 415-555-2671"}).chat.completions.create(
        model="m", messages=[{"role": "user", "content": "me: a@b.com"}]
    )
    metrics = gateway.metrics()
    assert 'redactions_total{direction="request",kind="email"} 1' in metrics
    assert 'redactions_total{direction="response",kind="phone"} 1' in metrics
    # A resent system prompt (remembered, not scanned again) is counted on every request.
    system = "You are a support agent; escalate to ops@example.com or to billing@example.com when unsure."
    for _ in range(2):
        sdk(gateway).chat.completions.create(model="m", messages=[{"role": "system", "content": system}])
    assert 'redactions_total{direction="request",kind="email"} 5' in gateway.metrics()


@pytest.mark.parametrize(("kinds", "masked"), [("", False), ("card", False), ("email", True)])
def test_redact_kinds_selects_what_is_masked(
    start_gateway: GatewayFactory, mock: Mock, kinds: str, masked: bool
) -> None:
    gateway = start_gateway(REDACT_KINDS=kinds)
    reply = sdk(gateway, **{"x-stainless-mock-echo": "1"}).chat.completions.create(
        model="m", messages=[{"role": "user", "content": "jane@example.com"}]
    )
    assert (reply.choices[0].message.content == "j***e@example.com") is masked


def test_refusals_and_tool_call_arguments_in_the_request_are_redacted(shared_gateway: Gateway, mock: Mock) -> None:
    # SPEC §6: every text the client sends, not only `content`; arguments stay valid JSON.
    arguments = json.dumps({"to": "jane.doe@example.com", "card": 4242424242424242})
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "mail jane.doe@example.com"}]},
        {"role": "assistant", "refusal": "I will not call +1 415 555 2671"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "t1", "type": "function", "function": {"name": "send", "arguments": arguments}}],
        },
        {"role": "tool", "tool_call_id": "t1", "content": "sent to jane.doe@example.com"},
    ]
    sdk(shared_gateway).chat.completions.create(model="m", messages=messages)  # type: ignore[arg-type]
    sent = mock.requests()[-1]["body"]
    assert "jane.doe" not in json.dumps(sent) and "555 2671" not in json.dumps(sent)
    call = sent["messages"][2]["tool_calls"][0]["function"]["arguments"]
    assert json.loads(call) == {"to": "j***e@example.com", "card": "CC_MASKED_LAST4_4242"}


def test_texts_in_any_content_part_of_the_request_are_redacted(shared_gateway: Gateway, mock: Mock) -> None:
    # SPEC §6: every text the client sends in messages. OpenAI-compatible servers (vLLM) take
    # `input_text` / `output_text` parts, parts without a type and bare strings in a content
    # array into the prompt: all of them are masked, not only parts typed "text".
    content = [
        "mail jane.doe@example.com",
        {"type": "input_text", "text": "card 4242 4242 4242 4242"},
        {"type": "output_text", "text": "ssn 123-45-6789"},
        {"text": "call +1 415 555 2671"},
        {"type": "image_url", "image_url": {"url": "https://x/a@b.com.png"}},
    ]
    assistant = [{"type": "refusal", "refusal": "no"}, {"refusal": "not to jane.doe@example.com"}]
    messages = [{"role": "user", "content": content}, {"role": "assistant", "content": assistant}]
    sdk(shared_gateway).chat.completions.create(model="m", messages=messages)  # type: ignore[arg-type]
    sent = mock.requests()[-1]["body"]["messages"]
    assert sent[0]["content"] == [
        "mail j***e@example.com",
        {"type": "input_text", "text": "card CC_MASKED_LAST4_4242"},
        {"type": "output_text", "text": "ssn SSN_MASKED"},
        {"text": "call PHONE_MASKED_LAST2_71"},
        {"type": "image_url", "image_url": {"url": "https://x/a@b.com.png"}},
    ]
    assert sent[1]["content"] == [{"type": "refusal", "refusal": "no"}, {"refusal": "not to j***e@example.com"}]


@pytest.mark.parametrize("ask", [{"logprobs": True}, {"top_logprobs": 2}])
def test_logprobs_are_refused_while_redacting(shared_gateway: Gateway, mock: Mock, ask: dict[str, object]) -> None:
    before = len(mock.requests())
    with pytest.raises(openai.BadRequestError) as raised:
        sdk(shared_gateway).chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], **ask)  # type: ignore[call-overload]
    assert raised.value.code == "logprobs_unavailable" and "logprobs" in raised.value.message
    assert len(mock.requests()) == before  # never reached the upstream


def test_logprobs_pass_with_redaction_off(start_gateway: GatewayFactory, mock: Mock) -> None:
    gateway = start_gateway(REDACT_KINDS="")
    sdk(gateway).chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], logprobs=True)
    assert mock.requests()[-1]["body"]["logprobs"] is True


class _Contact(pydantic.BaseModel):
    name: str
    notes: str
    email: str


# Structured output (response_format json_schema) as OpenAI writes it: JSON, a line break in a
# string written as the escape "\n". Read as prose, "\n4242 4242 4242 4242" is a card glued to
# the letter n, and passed: the SDK's parse() gave the client the card in clear.
_STRUCTURED = json.dumps(
    {"name": "Jane", "notes": "paid with\n4242 4242 4242 4242", "email": "x\tjane.doe@example.com"}
)


@pytest.mark.parametrize("stream", [False, True])
def test_structured_output_is_redacted_as_json(shared_gateway: Gateway, stream: bool) -> None:
    client = sdk(shared_gateway, **{"x-stainless-mock-reply": _STRUCTURED})
    messages: list[Any] = [{"role": "user", "content": "hi"}]
    if stream:
        with client.chat.completions.stream(model="m", messages=messages, response_format=_Contact) as events:
            parsed = events.get_final_completion().choices[0].message.parsed
    else:
        parsed = (
            client.chat.completions.parse(model="m", messages=messages, response_format=_Contact)
            .choices[0]
            .message.parsed
        )
    assert parsed == _Contact(name="Jane", notes="paid with\nCC_MASKED_LAST4_4242", email="x\tj***e@example.com")
