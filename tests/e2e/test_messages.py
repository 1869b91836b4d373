"""POST /v1/messages end to end (SPEC §11): the official anthropic SDK as the client, the real
gateway process, the mock upstream speaking Anthropic's JSON and event stream."""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import random
import re
import signal
import time
from typing import Any

import aiohttp
import anthropic
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.redact import ALL_KINDS, build_redactor

from ..conftest import GatewayFactory
from ..harness import Gateway, Mock, free_port, http_get, wait_until
from ..test_redact import PII, PII_VALUES, split_reply
from .structured import REDACTED, STRUCTURED, Contact
from .test_telemetry import samples

REDACTOR = build_redactor(ALL_KINDS)
assert REDACTOR is not None
redact = REDACTOR.redact
ALL_PII = [v for values in PII.values() for v in values]

MESSAGES = "/v1/messages"
MODEL = "claude-sonnet-4-5"
HI: list[Any] = [{"role": "user", "content": "Hola 👋"}]
DEFAULT_REPLY = "Hello! This is a mock response from the upstream."
SPLIT_EMAIL = ["mail jane.doe@exa", "mple.com now"]
SIGNATURE = "EqQBCkYIARgCIkDsig+/=="


def sdk(
    gateway: Gateway, headers: dict[str, str] | None = None, key: str = "demo", retries: int = 0
) -> anthropic.Anthropic:
    return anthropic.Anthropic(
        base_url=gateway.url, api_key=key, max_retries=retries, timeout=20, default_headers=headers
    )


def knobs(**values: str | list[str] | dict[str, Any]) -> dict[str, str]:
    """The mock's knobs as headers the gateway passes upstream (x-stainless-mock-NAME)."""
    return {
        "x-stainless-mock-" + name.replace("_", "-"): value if isinstance(value, str) else json.dumps(value)
        for name, value in values.items()
    }


async def post(
    gateway: Gateway, body: bytes | dict[str, Any], headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            gateway.url + MESSAGES, data=data, headers={"Content-Type": "application/json", **(headers or {})}
        ) as response,
    ):
        return response.status, {k.lower(): v for k, v in response.headers.items()}, await response.read()


def sse_events(wire: bytes) -> list[tuple[str, dict[str, Any]]]:
    """(event name, data) of each event in a raw SSE body; every event must carry both lines."""
    out = []
    for block in wire.decode().split("\n\n"):
        if not block.strip():
            continue
        lines = dict(line.split(": ", 1) for line in block.split("\n"))
        assert set(lines) == {"event", "data"}, block
        data = json.loads(lines["data"])
        assert data["type"] == lines["event"], block
        out.append((lines["event"], data))
    return out


def texts_by_block(events: list[tuple[str, dict[str, Any]]], kind: str = "text_delta") -> dict[int, list[str]]:
    field = {"text_delta": "text", "input_json_delta": "partial_json", "thinking_delta": "thinking"}[kind]
    out: dict[int, list[str]] = collections.defaultdict(list)
    for name, data in events:
        if name == "content_block_delta" and data["delta"]["type"] == kind:
            out[data["index"]].append(data["delta"][field])
    return out


def upstream_bodies(mock: Mock) -> list[dict[str, Any]]:
    return [seen["body"] for seen in mock.requests() if seen.get("path") == MESSAGES]


# --- Replies: what the upstream sent, except masks ---------------------------------------


def test_create_returns_what_the_upstream_sent(shared_gateway: Gateway, mock: Mock) -> None:
    message = sdk(shared_gateway).messages.create(model=MODEL, max_tokens=64, messages=HI)
    assert [block.type for block in message.content] == ["text"]
    assert message.content[0].text == DEFAULT_REPLY  # type: ignore[union-attr]
    assert message.stop_reason == "end_turn" and message.model == MODEL
    assert message.usage.input_tokens == 21 and message.usage.cache_read_input_tokens == 4
    [seen] = mock.requests()
    assert seen["path"] == MESSAGES and seen["body"]["messages"] == HI and seen["body"]["max_tokens"] == 64


def test_create_redacts_reply_text_and_tool_input(shared_gateway: Gateway, mock: Mock) -> None:
    text = "Reach Jane at jane@example.com or 4111-1111-1111-1111; released 3.11.7 on 2024-01-15."
    tool_input = {"to": "jane.doe@example.com", "cc": ["+1 415 555 2671", "order 123456789012"], "n": 3}
    message = sdk(shared_gateway, knobs(reply=text, tool_input=tool_input)).messages.create(
        model=MODEL, max_tokens=64, messages=HI
    )
    text_block, tool_block = message.content
    assert text_block.type == "text" and tool_block.type == "tool_use"
    assert text_block.text == "Reach Jane at j***e@example.com or CC_MASKED_LAST4_1111; released 3.11.7 on 2024-01-15."
    assert tool_block.input == {
        "to": redact("jane.doe@example.com"),
        "cc": [redact("+1 415 555 2671"), "order 123456789012"],
        "n": 3,
    }
    assert tool_block.name == "lookup" and message.stop_reason == "tool_use"


def test_stream_text_is_what_the_upstream_sent(shared_gateway: Gateway, mock: Mock) -> None:
    reply = "one two three, four. Dates 2024-01-15 and v1.2.3 stay."
    with sdk(shared_gateway, knobs(reply=reply)).messages.stream(model=MODEL, max_tokens=64, messages=HI) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert "".join(pieces) == reply
    assert len([p for p in pieces if p]) > 1  # streamed, not one lump
    assert final.content[0].text == reply  # type: ignore[union-attr]
    assert final.stop_reason == "end_turn"
    assert final.usage.input_tokens == 21 and final.usage.output_tokens == len(reply.split())


@pytest.mark.parametrize(
    ("deltas", "expected"),
    [
        (SPLIT_EMAIL, "mail j***e@example.com now"),
        (["pay with 4242 42", "42 4242 4242", " now"], "pay with CC_MASKED_LAST4_4242 now"),
        (["call +1 41", "5 555 ", "2671"], "call " + redact("+1 415 555 2671")),
        (["ends with jane@exam", "ple.com"], "ends with j***e@example.com"),  # held text flushed at the end
        (["mail jane.doe@example.com ", "\ud83d ok"], "mail j***e@example.com \ufffd ok"),  # half an emoji
    ],
)
def test_stream_pii_split_across_deltas_is_redacted(
    shared_gateway: Gateway, mock: Mock, deltas: list[str], expected: str
) -> None:
    with sdk(shared_gateway, knobs(deltas=deltas)).messages.stream(model=MODEL, max_tokens=64, messages=HI) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert "".join(pieces) == expected
    assert final.content[0].text == expected  # type: ignore[union-attr]
    joined = "".join(deltas)
    for value in ALL_PII:
        if value in joined:
            assert all(value not in piece and value[:6] not in piece for piece in pieces)


@pytest.mark.parametrize(
    "tool_deltas",
    [
        ['{"to":"jane.doe@exa', 'mple.com","n":3,"note":"call +1 415', ' 555 2671"}'],
        ['{"to":"jane.doe@example.com","n":3,"note":"call +1 415 555 2671"}'],
        list('{"to":"jane.doe@example.com","n":3,"note":"call +1 415 555 2671"}'),  # one character each
    ],
)
def test_streamed_tool_input_is_valid_json_with_masks(
    shared_gateway: Gateway, mock: Mock, tool_deltas: list[str]
) -> None:
    with sdk(shared_gateway, knobs(reply="Looking that up.", tool_deltas=tool_deltas)).messages.stream(
        model=MODEL, max_tokens=64, messages=HI
    ) as stream:
        final = stream.get_final_message()
    text_block, tool_block = final.content
    assert text_block.type == "text" and text_block.text == "Looking that up."
    assert tool_block.type == "tool_use" and tool_block.id == "toolu_mock1"
    assert tool_block.input == {
        "to": "j***e@example.com",
        "n": 3,
        "note": "call " + redact("+1 415 555 2671"),
    }
    assert final.stop_reason == "tool_use"


async def test_raw_tool_input_deltas_join_to_json_with_masks(shared_gateway: Gateway, mock: Mock) -> None:
    # What the SDK parses, checked on the wire: the partial_json pieces join to one JSON document.
    tool = ['{"to":"jane.doe@exa', 'mple.com","card":"4242 4242 ', '4242 4242","q":"a \\"quoted\\" jane@example.com"}']
    status, _, wire = await post(
        shared_gateway, {"model": MODEL, "max_tokens": 9, "messages": HI, "stream": True}, knobs(tool_deltas=tool)
    )
    assert status == 200
    pieces = texts_by_block(sse_events(wire), "input_json_delta")[1]
    assert json.loads("".join(pieces)) == {
        "to": "j***e@example.com",
        "card": "CC_MASKED_LAST4_4242",
        "q": 'a "quoted" j***e@example.com',
    }
    assert all("jane.doe" not in piece and "4242 4242 4242" not in piece for piece in pieces)


async def test_stream_keeps_anthropics_event_sequence(shared_gateway: Gateway, mock: Mock) -> None:
    status, headers, wire = await post(
        shared_gateway,
        {"model": MODEL, "max_tokens": 9, "messages": HI, "stream": True},
        knobs(reply="a b", tool_input={"q": "x"}),
    )
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    names = [name for name, _ in sse_events(wire)]
    # Empty deltas are allowed between the ones the upstream sent (held text goes out later).
    deduped = [n for i, n in enumerate(names) if i == 0 or n != names[i - 1]]
    assert deduped == [
        "message_start",
        "content_block_start",
        "ping",
        "content_block_delta",
        "content_block_stop",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    # Unchanged events byte for byte: the spaced ping, and the padded stop (the mock writes
    # both as Anthropic's API does).
    assert b'event: ping\ndata: {"type": "ping"}\n\n' in wire
    assert re.search(rb'event: message_stop\ndata: \{"type":"message_stop" +\}\n\n$', wire)


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(case=split_reply())
async def test_any_split_of_a_streamed_text_is_redacted_like_the_whole(
    shared_gateway: Gateway, mock_process: Mock, case: tuple[str, list[str]]
) -> None:
    text, deltas = case
    status, _, wire = await post(
        shared_gateway, {"model": MODEL, "max_tokens": 9, "messages": HI, "stream": True}, knobs(deltas=deltas)
    )
    assert status == 200
    emitted = texts_by_block(sse_events(wire))[0]
    assert "".join(emitted) == redact(text)
    for value in ALL_PII:
        if value in text and value not in redact(text):
            assert all(value not in delta for delta in emitted)


@st.composite
def split_tool_input(draw: st.DrawFn) -> tuple[dict[str, Any], list[str]]:
    """A tool's input (strings of ordinary text and PII, quotes, escapes, numbers) and its JSON
    text cut anywhere, even inside an escape."""
    strings = st.lists(st.one_of(PII_VALUES, st.sampled_from(['"', "\\", "\n", "é", "👋", " ", "x", ","])), max_size=8)
    keys = st.sampled_from(["to", "q", "note", "a@b.co"])
    value = st.one_of(strings.map("".join), st.integers(-5, 10**16), st.lists(strings.map("".join), max_size=3))
    tool_input = draw(st.dictionaries(keys, value, min_size=1, max_size=4))
    text = json.dumps(tool_input, ensure_ascii=draw(st.booleans()))
    cuts = sorted(draw(st.lists(st.integers(0, len(text)), max_size=12)))
    return tool_input, [text[a:b] for a, b in itertools.pairwise([0, *cuts, len(text)])]


def redacted_values(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, list):
        return [redacted_values(item) for item in value]
    if isinstance(value, int) and redact(str(value)) != str(value):
        return redact(str(value))  # a bare number that is a card: a quoted mask (the JSON stays JSON)
    return value


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(case=split_tool_input())
async def test_any_split_of_streamed_tool_input_is_json_with_its_strings_redacted(
    shared_gateway: Gateway, mock_process: Mock, case: tuple[dict[str, Any], list[str]]
) -> None:
    tool_input, pieces = case
    status, _, wire = await post(
        shared_gateway,
        {"model": MODEL, "max_tokens": 9, "messages": HI, "stream": True},
        knobs(reply="ok", tool_deltas=pieces),
    )
    assert status == 200
    joined = "".join(texts_by_block(sse_events(wire), "input_json_delta")[1])
    # String values are redacted one by one (the keys too: a mask never breaks the JSON).
    assert json.loads(joined) == {redact(k): redacted_values(v) for k, v in tool_input.items()}


# --- Thinking: passes unchanged, its signature covers it -------------------------------


def test_thinking_in_the_reply_passes_unchanged(shared_gateway: Gateway, mock: Mock) -> None:
    thinking = "The user is jane.doe@example.com; card 4242 4242 4242 4242 on file."
    headers = knobs(thinking=thinking, signature=SIGNATURE, deltas=SPLIT_EMAIL)
    message = sdk(shared_gateway, headers).messages.create(model=MODEL, max_tokens=64, messages=HI)
    with sdk(shared_gateway, headers).messages.stream(model=MODEL, max_tokens=64, messages=HI) as stream:
        final = stream.get_final_message()
    for reply in (message, final):
        thought, text = reply.content
        assert thought.type == "thinking" and thought.thinking == thinking and thought.signature == SIGNATURE
        assert text.type == "text" and text.text == "mail j***e@example.com now"


def test_thinking_in_the_request_reaches_the_upstream_unchanged(shared_gateway: Gateway, mock: Mock) -> None:
    thinking = {"type": "thinking", "thinking": "Ask jane.doe@example.com, +1 415 555 2671.", "signature": SIGNATURE}
    hidden = {"type": "redacted_thinking", "data": "EmwKAhgBEgy3va3pzix/LafPsn4aDFIT2Xlxh0L5L8rLVyIwxtE3rAFBa8cr3qpP"}
    messages: list[Any] = [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": [thinking, hidden, {"type": "text", "text": "Mail jane.doe@example.com."}]},
        {"role": "user", "content": "Thanks"},
    ]
    sdk(shared_gateway).messages.create(
        model=MODEL, max_tokens=64, messages=messages, thinking={"type": "enabled", "budget_tokens": 1024}
    )
    [body] = upstream_bodies(mock)
    assert body["messages"][1]["content"][:2] == [thinking, hidden]
    assert body["messages"][1]["content"][2] == {"type": "text", "text": "Mail j***e@example.com."}
    assert body["thinking"] == {"type": "enabled", "budget_tokens": 1024}


# --- The prompt's PII never reaches the upstream ---------------------------------------


@pytest.mark.parametrize("system_as_blocks", [False, True])
def test_prompt_pii_never_reaches_the_upstream(shared_gateway: Gateway, mock: Mock, system_as_blocks: bool) -> None:
    system_text = "You are support. Escalate to ops@example.com. SSN on file 123-45-6789."
    system: Any = (
        [{"type": "text", "text": system_text, "cache_control": {"type": "ephemeral"}}]
        if system_as_blocks
        else system_text
    )
    tool_input = {
        "query": "find jane.doe@example.com",
        "limit": 3,
        "filters": {"phones": ["+1 415 555 2671", "order 123456789012"], "exact": True, "none": None},
    }
    tools: Any = [
        {
            "name": "lookup",
            "description": "Looks up a customer; questions to owner@example.com",
            "input_schema": {"type": "object", "properties": {"query": {"type": "string"}}},
        }
    ]
    image = {"type": "image", "source": {"type": "url", "url": "https://img.example.com/a@b.com.png"}}
    messages: list[Any] = [
        {"role": "user", "content": "I am jane.doe@example.com, card 4242 4242 4242 4242, released 3.11.7."},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Let me look up +44 20 7946 0958."},
                {"type": "tool_use", "id": "toolu_1", "name": "lookup", "input": tool_input},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "found JOHN_SMITH@Corp.COM"},
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_1",
                    "content": [{"type": "text", "text": "IBAN DE89 3704 0044 0532 0130 00"}, image],
                },
                {"type": "text", "text": "And x@y.io, on 2024-01-15?"},
                image,
            ],
        },
    ]
    sdk(shared_gateway).messages.create(
        model=MODEL,
        max_tokens=64,
        system=system,
        messages=messages,
        tools=tools,
        metadata={"user_id": "user-42"},
        stop_sequences=["\n\nHuman:"],
    )
    [body] = upstream_bodies(mock)
    sent = json.dumps(body, ensure_ascii=False)
    for value in (
        "ops@example.com",
        "123-45-6789",
        "jane.doe@example.com",
        "4242 4242 4242 4242",
        "+44 20 7946 0958",
        "+1 415 555 2671",
        "JOHN_SMITH@Corp.COM",
        "DE89 3704 0044 0532 0130 00",
        "x@y.io",
    ):
        assert value not in sent, value
    expected_system = redact(system_text)
    if system_as_blocks:
        assert body["system"] == [{"type": "text", "text": expected_system, "cache_control": {"type": "ephemeral"}}]
    else:
        assert body["system"] == expected_system
    assert body["messages"][0]["content"] == redact(messages[0]["content"])
    assert "released 3.11.7" in body["messages"][0]["content"]  # look-alikes pass
    assert body["messages"][1]["content"][1]["input"] == {
        "query": "find j***e@example.com",
        "limit": 3,
        "filters": {"phones": [redact("+1 415 555 2671"), "order 123456789012"], "exact": True, "none": None},
    }
    results = body["messages"][2]["content"]
    assert results[0]["content"] == redact("found JOHN_SMITH@Corp.COM")
    assert results[1]["content"] == [
        {"type": "text", "text": redact("IBAN DE89 3704 0044 0532 0130 00")},
        image,
    ]
    assert results[2]["text"] == "And " + redact("x@y.io") + ", on 2024-01-15?"
    # Everything that is not a text the client wrote goes as sent (SPEC §11).
    assert results[3] == image and body["tools"] == tools and body["metadata"] == {"user_id": "user-42"}
    assert body["stop_sequences"] == ["\n\nHuman:"] and body["max_tokens"] == 64 and body["model"] == MODEL


def test_the_upstream_gets_the_gateways_key_and_the_clients_anthropic_headers(
    shared_gateway: Gateway, mock: Mock
) -> None:
    client = sdk(shared_gateway, key="client-secret-key")
    client.messages.create(model=MODEL, max_tokens=8, messages=HI)
    sdk(shared_gateway, {"anthropic-version": "2099-01-01", "anthropic-beta": "b1,b2"}).messages.create(
        model=MODEL, max_tokens=8, messages=HI
    )
    first, second = ({k.lower(): v for k, v in seen["headers"].items()} for seen in mock.requests())
    for headers in (first, second):
        assert headers["x-api-key"] == "sk-ant-upstream-secret"
        assert "authorization" not in headers
    assert first["anthropic-version"] == client.default_headers["anthropic-version"]  # what the SDK sent
    assert second["anthropic-version"] == "2099-01-01" and second["anthropic-beta"] == "b1,b2"
    assert "client-secret-key" not in json.dumps(mock.requests())


async def test_without_anthropic_version_the_gateway_sends_the_default(shared_gateway: Gateway, mock: Mock) -> None:
    status, _, _ = await post(shared_gateway, {"model": MODEL, "max_tokens": 8, "messages": HI})
    assert status == 200
    [seen] = mock.requests()
    assert {k.lower(): v for k, v in seen["headers"].items()}["anthropic-version"] == "2023-06-01"


# --- The gateway's own errors, in Anthropic's shape, as the SDK's exceptions -----------


def anthropic_error(body: bytes, kind: str) -> str:
    """The message of an Anthropic-shaped error of that type (and nothing else in the body)."""
    error = json.loads(body)
    assert error["type"] == "error" and set(error) == {"type", "error"}, error
    assert error["error"]["type"] == kind and isinstance(error["error"]["message"], str), error
    return str(error["error"]["message"])


def test_rate_limit_is_a_rate_limit_error_with_retry_after(start_gateway: GatewayFactory, mock: Mock) -> None:
    gateway = start_gateway(RPS="1", BURST="1")
    client = sdk(gateway)
    client.messages.create(model=MODEL, max_tokens=8, messages=HI)
    with pytest.raises(anthropic.RateLimitError) as caught:
        client.messages.create(model=MODEL, max_tokens=8, messages=HI)
    error = caught.value
    assert error.status_code == 429 and error.type == "rate_limit_error"
    assert error.api_message == "rate limit exceeded"
    assert int(error.response.headers["retry-after"]) >= 1
    assert error.response.headers["x-request-id"]
    # The SDK reads Anthropic's `request-id`: the gateway's id, under that name too.
    assert error.request_id == error.response.headers["x-request-id"]
    assert len(mock.requests()) == 1  # refused before the upstream
    # The SDK backs off as told and gets through.
    message = sdk(gateway, retries=2).messages.create(model=MODEL, max_tokens=8, messages=HI)
    assert message.content[0].text == DEFAULT_REPLY  # type: ignore[union-attr]
    assert message._request_id is not None and message._request_id != error.request_id  # SDK's documented accessor
    assert len(mock.requests()) == 2


async def test_the_quota_is_shared_with_the_other_routes(start_gateway: GatewayFactory, mock: Mock) -> None:
    gateway = start_gateway(DEFAULT_QUOTA="2")
    chat = {"model": "gpt-4o-mini", "messages": HI}
    async with (
        aiohttp.ClientSession() as session,
        session.post(gateway.url + "/v1/chat/completions", json=chat, headers={"X-Api-Key": "shared"}) as r,
    ):
        assert r.status == 200
    client = sdk(gateway, key="shared")
    await asyncio.to_thread(client.messages.create, model=MODEL, max_tokens=8, messages=HI)
    with pytest.raises(anthropic.RateLimitError) as caught:
        await asyncio.to_thread(client.messages.create, model=MODEL, max_tokens=8, messages=HI)
    error = caught.value
    assert error.type == "rate_limit_error" and error.api_message == "quota exceeded (limit=2)"
    assert int(error.response.headers["retry-after"]) >= 1
    assert error.response.headers["x-ratelimit-remaining-requests"] == "0"
    assert len(mock.requests()) == 2


def test_load_shedding_is_529_overloaded(start_gateway: GatewayFactory, mock: Mock) -> None:
    gateway = start_gateway(MAX_CONCURRENCY="1")
    slow = sdk(gateway, knobs(reply="a b c d e f g h", chunk_delay_ms="200"))
    with slow.messages.stream(model=MODEL, max_tokens=8, messages=HI) as held:  # holds the one slot
        with pytest.raises(anthropic.OverloadedError) as caught:
            sdk(gateway).messages.create(model=MODEL, max_tokens=8, messages=HI)
        assert "".join(held.text_stream) == "a b c d e f g h"
    error = caught.value
    assert isinstance(error, anthropic.InternalServerError) and error.status_code == 529
    assert error.type == "overloaded_error" and error.api_message == "server overloaded"
    assert int(error.response.headers["retry-after"]) >= 1
    assert len(mock.requests()) == 1
    wait_until(lambda: "inflight_requests 0" in gateway.metrics(), what="the slot to be free")
    assert sdk(gateway).messages.create(model=MODEL, max_tokens=8, messages=HI).content


async def test_draining_is_529_and_the_stream_in_flight_finishes(start_gateway: GatewayFactory, mock: Mock) -> None:
    gateway = start_gateway(SHUTDOWN_GRACE_SECS="10")
    body = {"model": MODEL, "max_tokens": 8, "messages": HI, "stream": True}
    reply = "one two three four five six seven eight nine ten"  # 2 s: time to drain and be refused
    slow = knobs(chunk_delay_ms="200", reply=reply)
    async with (
        aiohttp.ClientSession() as session,
        session.post(gateway.url + MESSAGES, json=body, headers=slow) as held,
    ):
        first = await held.content.readline()  # the stream has started
        gateway.process.signal(signal.SIGTERM)

        def draining() -> bool:
            try:
                return http_get(gateway.port, "/readyz")[0] == 503
            except OSError:
                return False

        await asyncio.to_thread(wait_until, draining, 5.0, 0.02, "the gateway to drain")
        with pytest.raises(anthropic.OverloadedError) as caught:
            await asyncio.to_thread(sdk(gateway).messages.create, model=MODEL, max_tokens=8, messages=HI)
        assert caught.value.status_code == 529 and caught.value.type == "overloaded_error"
        assert caught.value.api_message == "gateway is shutting down"
        events = sse_events(first + await held.read())
    assert events[-1][0] == "message_stop"
    assert "".join(texts_by_block(events)[0]) == reply
    assert await asyncio.to_thread(gateway.process.wait, 10) == 0


@pytest.mark.parametrize("stream", [False, True])
def test_upstream_timeout_is_504_timeout_error(start_gateway: GatewayFactory, mock: Mock, stream: bool) -> None:
    gateway = start_gateway(TIMEOUT_SECS="1")
    client = sdk(gateway, knobs(latency_ms="3000"))
    with pytest.raises(anthropic.APIStatusError) as caught:
        if stream:
            with client.messages.stream(model=MODEL, max_tokens=8, messages=HI) as events:
                list(events)
        else:
            client.messages.create(model=MODEL, max_tokens=8, messages=HI)
    error = caught.value
    assert isinstance(error, anthropic.InternalServerError) and error.status_code == 504
    assert error.type == "timeout_error" and error.api_message == "upstream timed out"


@pytest.mark.parametrize("upstream", [401, 403])
@pytest.mark.parametrize("stream", [False, True])
async def test_upstream_auth_failure_is_502_api_error(
    shared_gateway: Gateway, mock: Mock, upstream: int, stream: bool
) -> None:
    status, headers, body = await post(
        shared_gateway,
        {"model": MODEL, "max_tokens": 8, "messages": HI, "stream": stream},
        knobs(status=str(upstream)),
    )
    assert status == 502
    assert "credentials" in anthropic_error(body, "api_error")
    assert "sk-ant-upstream-secret" not in body.decode() and headers["x-request-id"]
    with pytest.raises(anthropic.InternalServerError) as caught:
        sdk(shared_gateway, knobs(status=str(upstream))).messages.create(model=MODEL, max_tokens=8, messages=HI)
    assert caught.value.status_code == 502 and caught.value.type == "api_error"


@pytest.mark.parametrize(
    ("upstream", "exception", "kind"),
    [
        (400, anthropic.BadRequestError, "invalid_request_error"),
        (429, anthropic.RateLimitError, "rate_limit_error"),
        (500, anthropic.InternalServerError, "api_error"),
        (529, anthropic.OverloadedError, "overloaded_error"),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
def test_upstream_errors_are_relayed_as_they_came(
    shared_gateway: Gateway,
    mock: Mock,
    upstream: int,
    exception: type[anthropic.APIStatusError],
    kind: str,
    stream: bool,
) -> None:
    client = sdk(shared_gateway, knobs(status=str(upstream)))
    with pytest.raises(exception) as caught:
        if stream:
            with client.messages.stream(model=MODEL, max_tokens=8, messages=HI) as events:
                list(events)
        else:
            client.messages.create(model=MODEL, max_tokens=8, messages=HI)
    error = caught.value
    assert error.status_code == upstream and error.type == kind
    assert error.api_message == f"mock upstream error {upstream}"  # the upstream's own body


@pytest.mark.parametrize("upstream", [429, 529])
def test_the_upstreams_retry_after_reaches_the_client(shared_gateway: Gateway, mock: Mock, upstream: int) -> None:
    with pytest.raises(anthropic.APIStatusError) as caught:
        sdk(shared_gateway, knobs(status=str(upstream), retry_after="7")).messages.create(
            model=MODEL, max_tokens=8, messages=HI
        )
    assert caught.value.status_code == upstream
    assert caught.value.response.headers.get("retry-after") == "7"


@pytest.mark.serial  # asserts a time: run alone, not beside another worker
def test_sdk_retries_an_upstream_429(shared_gateway: Gateway, mock: Mock) -> None:
    started = time.monotonic()
    with pytest.raises(anthropic.RateLimitError):
        sdk(shared_gateway, knobs(status="429", retry_after="0"), retries=2).messages.create(
            model=MODEL, max_tokens=8, messages=HI
        )
    assert len(mock.requests()) == 3  # the first attempt and two retries, each relayed upstream
    assert time.monotonic() - started < 10


def test_sdk_retries_wait_as_long_as_the_upstreams_retry_after(shared_gateway: Gateway, mock: Mock) -> None:
    with pytest.raises(anthropic.RateLimitError):
        sdk(shared_gateway, knobs(status="429", retry_after="1"), retries=2).messages.create(
            model=MODEL, max_tokens=8, messages=HI
        )
    arrivals = [seen["at"] for seen in mock.requests()]
    assert len(arrivals) == 3
    # Without the header the SDK's own backoff waits 0.375-0.5 s before its first retry.
    assert all(later - earlier >= 0.95 for earlier, later in itertools.pairwise(arrivals))


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"model": "m", "max_tokens": 8}', "messages"),
        (b'{"model": "m", "max_tokens": 8, "messages": "hi"}', "messages"),
        (b'{"model": "m", "max_tokens": 8, "messages": {"role": "user"}}', "messages"),
        (b'{"max_tokens": 8, "messages": []}', "model"),
        (b'{"model": 7, "max_tokens": 8, "messages": []}', "model"),
        (b"{not json", "JSON"),
        (b"\xff\xfe{}", "JSON"),
        (b"", "JSON"),
        (b"[1, 2]", "object"),
        (b'"a string"', "object"),
    ],
)
async def test_bad_body_is_400_invalid_request_error(
    shared_gateway: Gateway, mock: Mock, body: bytes, message: str
) -> None:
    status, headers, answer = await post(shared_gateway, body)
    assert status == 400
    assert message in anthropic_error(answer, "invalid_request_error")
    assert headers["x-request-id"]
    assert mock.requests() == []  # never reached the upstream


@pytest.mark.parametrize("where", ["metadata", "tool_use"])
@pytest.mark.parametrize("depth", [300, 900])
async def test_a_deeply_nested_body_is_forwarded_or_refused_never_a_500(
    shared_gateway: Gateway, mock: Mock, where: str, depth: int
) -> None:
    deep = b"[" * depth + b'"jane@example.com"' + b"]" * depth
    block = b'{"type":"tool_use","id":"t","name":"f","input":{"x":' + deep + b"}}"
    body = (
        b'{"model":"m","max_tokens":8,"metadata":{"x":' + deep + b'},"messages":[{"role":"user","content":"hi"}]}'
        if where == "metadata"
        else b'{"model":"m","max_tokens":8,"messages":[{"role":"assistant","content":[' + block + b"]}]}"
    )
    status, _, answer = await post(shared_gateway, body)
    assert status in (200, 400), answer
    if status == 400:
        anthropic_error(answer, "invalid_request_error")
    elif where == "tool_use":  # forwarded: the string at the bottom was redacted like any other
        [sent] = upstream_bodies(mock)
        node = sent["messages"][0]["content"][0]["input"]["x"]
        while isinstance(node, list):
            [node] = node
        assert node == "j***e@example.com"


def test_the_sdk_raises_bad_request_for_a_body_without_messages(shared_gateway: Gateway, mock: Mock) -> None:
    with pytest.raises(anthropic.BadRequestError) as caught:
        sdk(shared_gateway).messages.create(model=MODEL, max_tokens=8, messages="hi")  # type: ignore[arg-type]
    assert caught.value.status_code == 400 and caught.value.type == "invalid_request_error"
    assert mock.requests() == []


def test_keyed_mode_takes_the_key_from_x_api_key(start_gateway: GatewayFactory, mock: Mock) -> None:
    gateway = start_gateway(TENANT_KEYS="acme=sk-acme-1")
    with pytest.raises(anthropic.AuthenticationError) as caught:
        sdk(gateway, key="sk-wrong").messages.create(model=MODEL, max_tokens=8, messages=HI)
    assert caught.value.status_code == 401 and caught.value.type == "authentication_error"
    assert caught.value.api_message == "invalid api key"
    assert mock.requests() == []
    assert sdk(gateway, key="sk-acme-1").messages.create(model=MODEL, max_tokens=8, messages=HI).content
    # The SDK's auth_token goes as a bearer token: the tenant key when there is no x-api-key.
    bearer = anthropic.Anthropic(base_url=gateway.url, auth_token="sk-acme-1", max_retries=0, timeout=20)
    assert bearer.messages.create(model=MODEL, max_tokens=8, messages=HI).content
    for seen in mock.requests():
        headers = {k.lower(): v for k, v in seen["headers"].items()}
        assert headers["x-api-key"] == "sk-ant-upstream-secret" and "authorization" not in headers
    assert len(mock.requests()) == 2


async def test_oversized_body_is_413_request_too_large(start_gateway: GatewayFactory, mock: Mock) -> None:
    gateway = start_gateway(MAX_BODY_BYTES="1000")
    status, _, answer = await post(
        gateway, {"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": "x" * 2000}]}
    )
    assert status == 413
    anthropic_error(answer, "request_too_large")
    assert mock.requests() == []


async def test_unreachable_upstream_is_502_api_error(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway(ANTHROPIC_BASE_URL=f"http://127.0.0.1:{free_port()}")
    for stream in (False, True):
        status, _, body = await post(gateway, {"model": MODEL, "max_tokens": 8, "messages": HI, "stream": stream})
        assert status == 502
        anthropic_error(body, "api_error")


# --- Mid-stream failure: event: error, and the gateway keeps serving --------------------


@pytest.mark.parametrize(
    ("ending", "text"),
    [
        (("die_after", "2"), "mail j***e@example.com"),  # the connection breaks after two deltas
        # A body that ends cleanly without message_stop: a reply cut short, not a short reply
        # (found by a black-box review: the SDK returned the partial text, stop_reason None).
        (("no_done", "1"), "mail j***e@example.com later"),
    ],
)
async def test_a_stream_the_upstream_does_not_finish_ends_with_an_error_event(
    shared_gateway: Gateway, mock: Mock, ending: tuple[str, str], text: str
) -> None:
    status, _, wire = await post(
        shared_gateway,
        {"model": MODEL, "max_tokens": 8, "messages": HI, "stream": True},
        knobs(deltas=["mail ", "jane.doe@example.com", " later"], **dict([ending])),
    )
    assert status == 200
    events = sse_events(wire)
    name, data = events[-1]
    assert name == "error"
    assert data["error"]["type"] == "api_error" and data["error"]["message"]
    assert [n for n, _ in events].count("error") == 1 and "message_stop" not in [n for n, _ in events]
    # The address was held (it could have gone on, ".com.au"): it goes out masked before the error.
    assert "".join(texts_by_block(events)[0]) == text
    # The SDK reports the same event as an error.
    knob = {ending[0]: "1"}
    with (
        pytest.raises(anthropic.APIStatusError) as caught,
        sdk(shared_gateway, knobs(**knob)).messages.stream(model=MODEL, max_tokens=8, messages=HI) as stream,
    ):
        list(stream.text_stream)
    assert caught.value.type == "api_error"
    # and the gateway keeps serving
    message = sdk(shared_gateway).messages.create(model=MODEL, max_tokens=8, messages=HI)
    assert message.content[0].text == DEFAULT_REPLY  # type: ignore[union-attr]


def test_the_upstreams_own_error_event_is_relayed(shared_gateway: Gateway, mock: Mock) -> None:
    # Anthropic ends a stream it cannot finish with its own `event: error` (overloaded_error).
    client = sdk(shared_gateway, knobs(deltas=["one ", "two ", "three"], error_after="2"))
    pieces: list[str] = []
    with (
        pytest.raises(anthropic.APIStatusError) as caught,
        client.messages.stream(model=MODEL, max_tokens=8, messages=HI) as stream,
    ):
        pieces.extend(stream.text_stream)
    assert caught.value.type == "overloaded_error" and caught.value.api_message == "Overloaded"
    assert "".join(pieces) == "one two "


async def test_held_text_goes_out_before_the_upstreams_error_event(shared_gateway: Gateway, mock: Mock) -> None:
    status, _, wire = await post(
        shared_gateway,
        {"model": MODEL, "max_tokens": 8, "messages": HI, "stream": True},
        knobs(deltas=["mail ", "jane.doe@example.com", " later"], error_after="2"),
    )
    assert status == 200
    events = sse_events(wire)
    assert [name for name, _ in events].count("error") == 1
    assert events[-1] == ("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
    assert "".join(texts_by_block(events)[0]) == "mail j***e@example.com"


async def test_client_disconnect_cancels_the_upstream(shared_gateway: Gateway, mock: Mock) -> None:
    body = {"model": MODEL, "max_tokens": 8, "messages": HI, "stream": True}
    headers = knobs(chunk_delay_ms="500", reply="a b c d e f g h i j")
    async with aiohttp.ClientSession() as session:
        response = await session.post(shared_gateway.url + MESSAGES, json=body, headers=headers)
        await response.content.readline()  # the stream has started
        response.close()
    events = await asyncio.to_thread(wait_until, mock.events, 3.0, 0.02, "the upstream to see the disconnect")
    assert events[0]["event"] == "client_disconnected"


# --- Usage and metrics ----------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_usage_feeds_tokens_total_and_the_route_is_labelled(
    start_gateway: GatewayFactory, mock: Mock, stream: bool
) -> None:
    gateway = start_gateway()
    usage = {"input_tokens": 100, "cache_read_input_tokens": 20, "cache_creation_input_tokens": 3}
    client = sdk(gateway, knobs(usage=usage, reply="a b c d e"))
    if stream:
        with client.messages.stream(model="claude-usage", max_tokens=8, messages=HI) as events:
            assert events.get_final_message().usage.output_tokens == 5
    else:
        assert client.messages.create(model="claude-usage", max_tokens=8, messages=HI).usage.output_tokens == 5
    s = samples(gateway)
    assert s['tokens_total{kind="prompt",model="claude-usage"}'] == 123  # input + cache read + cache creation
    assert s['tokens_total{kind="completion",model="claude-usage"}'] == 5
    assert s['http_requests_total{model="claude-usage",route="/v1/messages",status="200"}'] == 1
    assert s['requests_total{route="/v1/messages"}'] == 1
    line = wait_until(lambda: [e for e in gateway.log_lines() if e["path"] == MESSAGES], what="a log line")[0]
    assert line["status"] == 200 and line["model"] == "claude-usage"


@pytest.mark.parametrize("ending", ["die_after", "error_after", "no_done"])
def test_a_stream_that_never_finishes_still_counts_its_input_tokens(
    shared_gateway: Gateway, mock: Mock, ending: str
) -> None:
    # message_start reported the input tokens; no message_delta came (the connection broke,
    # Anthropic's own error, a body ended early): the prompt was read all the same (SPEC §11).
    # The module's gateway: a model of this test's own, whose counts nothing else adds to.
    gateway, model = shared_gateway, f"claude-cut-{ending}"
    usage = {"input_tokens": 100, "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0}
    client = sdk(gateway, knobs(usage=usage, reply="a b c", **{ending: "1"}))
    with (
        pytest.raises(anthropic.APIStatusError),
        client.messages.stream(model=model, max_tokens=8, messages=HI) as events,
    ):
        list(events.text_stream)
    s = wait_until(lambda: (s := samples(gateway)).get(f'tokens_total{{kind="prompt",model="{model}"}}') and s)
    assert s[f'tokens_total{{kind="prompt",model="{model}"}}'] == 100
    assert s[f'tokens_total{{kind="completion",model="{model}"}}'] == 0


def test_completion_tokens_are_the_last_message_delta_count(shared_gateway: Gateway, mock: Mock) -> None:
    gateway = shared_gateway  # its model is its own: nothing else counts under it
    headers = knobs(reply="a b", delta_usage={"output_tokens": 42})
    with sdk(gateway, headers).messages.stream(model="claude-delta", max_tokens=8, messages=HI) as events:
        assert events.get_final_message().usage.output_tokens == 42
    s = samples(gateway)
    assert s['tokens_total{kind="completion",model="claude-delta"}'] == 42
    assert s['tokens_total{kind="prompt",model="claude-delta"}'] == 25  # 21 + 4 cache read + 0


def test_cumulative_input_counts_in_message_delta_win(shared_gateway: Gateway, mock: Mock) -> None:
    gateway = shared_gateway  # its model is its own: nothing else counts under it
    delta = {"input_tokens": 200, "cache_read_input_tokens": 30, "cache_creation_input_tokens": 5, "output_tokens": 7}
    with sdk(gateway, knobs(reply="a b", delta_usage=delta)).messages.stream(
        model="claude-cumulative", max_tokens=8, messages=HI
    ) as events:
        events.get_final_message()
    s = samples(gateway)
    assert s['tokens_total{kind="prompt",model="claude-cumulative"}'] == 235
    assert s['tokens_total{kind="completion",model="claude-cumulative"}'] == 7


def test_a_message_delta_with_input_tokens_alone_keeps_the_cache_counts(shared_gateway: Gateway, mock: Mock) -> None:
    gateway = shared_gateway  # its model is its own: nothing else counts under it
    usage = {"input_tokens": 100, "cache_read_input_tokens": 20, "cache_creation_input_tokens": 3}
    with sdk(gateway, knobs(usage=usage, delta_usage={"input_tokens": 110, "output_tokens": 7})).messages.stream(
        model="claude-partial", max_tokens=8, messages=HI
    ) as events:
        events.get_final_message()
    assert samples(gateway)['tokens_total{kind="prompt",model="claude-partial"}'] == 133  # 110 + 20 + 3


# --- Hostile traffic -----------------------------------------------------------------


async def test_chaos_leaves_the_gateway_serving_and_clean(start_gateway: GatewayFactory, mock: Mock) -> None:
    """Garbage bodies, streams cut by the upstream, clients hanging up at random points."""
    gateway = start_gateway(MAX_CONCURRENCY="40")
    deep = b"[" * 5000 + b'"jane@example.com"' + b"]" * 5000  # deeper than any recursive walk goes
    bodies = [
        b"",
        b"{",
        b"null",
        b'{"model":"m","messages":[1,{"content":{"a":1}},{"content":[{"type":"text","text":5},7,null]}]}',
        b'{"model":"m","messages":[],"system":7}',
        b'{"model":"m","messages":[],"system":[{"type":"text"},{"type":"text","text":null},3]}',
        b'{"model":"m","messages":[{"role":"user","content":[{"type":"tool_result","content":{"x":1}}]}]}',
        b'{"model":"m","messages":[{"role":"user","content":[{"type":"tool_use","input":"jane@example.com"}]}]}',
        b'{"model":"m","messages":[{"role":"user","content":[{"type":"tool_use","input":' + deep + b"}]}]}",
        json.dumps({"model": "m", "max_tokens": 8, "messages": HI, "stream": True}).encode(),
        json.dumps({"model": "m", "max_tokens": 8, "messages": HI}).encode(),
    ]
    rng = random.Random(11)

    async def one(session: aiohttp.ClientSession, i: int) -> int | str:
        headers = {
            "x-api-key": f"k{i % 5}",
            "Content-Type": "application/json",
            **knobs(die_after=rng.choice(["1", "3", "-1"]), chunk_delay_ms="3", tool_input={"q": "a@b.co"}),
        }
        try:
            async with session.post(gateway.url + MESSAGES, data=rng.choice(bodies), headers=headers) as r:
                if rng.random() < 0.3:
                    await r.content.readany()
                    r.close()  # hang up mid-response
                else:
                    await r.read()
                return r.status
        except aiohttp.ClientError as exc:
            return type(exc).__name__

    async with aiohttp.ClientSession() as session:
        outcomes = collections.Counter(await asyncio.gather(*(one(session, i) for i in range(300))))
    assert set(outcomes) <= {200, 400, 529}, outcomes
    message = await asyncio.to_thread(sdk(gateway).messages.create, model=MODEL, max_tokens=8, messages=HI)
    assert message.content
    wait_until(lambda: "inflight_requests 0" in gateway.metrics(), what="inflight back to 0")
    assert "Traceback" not in gateway.process.errors()
    assert "unhandled error" not in gateway.process.errors()


@pytest.mark.parametrize("stream", [False, True])
def test_structured_output_is_redacted_as_json(shared_gateway: Gateway, stream: bool) -> None:
    client = sdk(shared_gateway, knobs(reply=STRUCTURED))
    messages: list[Any] = [{"role": "user", "content": "hi"}]
    if stream:
        with client.messages.stream(model="claude-x", max_tokens=64, messages=messages, output_format=Contact) as s:
            parsed = s.get_final_message().parsed_output
    else:
        parsed = client.messages.parse(
            model="claude-x", max_tokens=64, messages=messages, output_format=Contact
        ).parsed_output
    assert parsed == REDACTED
