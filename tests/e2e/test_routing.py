"""ROUTES_FILE end to end (SPEC §13): real gateway processes in front of several mock
upstreams (each failed on its own through POST /_mock/fault), the official openai SDK as the
client: claude-* through translation, fallbacks, the circuit breaker, x-gateway-upstream."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from ..conftest import GatewayFactory
from ..harness import Gateway, Mock, free_port, wait_until
from . import test_telemetry
from .test_startup import start_up
from .test_telemetry import Collector, samples

collector = test_telemetry.collector  # the OTLP receiver fixture, for the spans test

CHAT = "/v1/chat/completions"
HI = [{"role": "user", "content": "Hola"}]
CLAUDE = "claude-sonnet-4-5"


@pytest.fixture(scope="module")
def upstreams(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Mock]]:
    """Three OpenAI-compatible mocks, each replying with its own name, and one for Claude."""
    tmp = tmp_path_factory.mktemp("upstreams")
    mocks = {name: Mock(tmp, MOCK_REPLY=f"reply from {name}") for name in ("a", "b", "c", "claude")}
    yield mocks
    for mock in mocks.values():
        mock.stop()


@pytest.fixture
def ups(upstreams: dict[str, Mock]) -> dict[str, Mock]:
    for mock in upstreams.values():
        mock.heal()
        mock.forget()
    return upstreams


def routes_toml(ups: dict[str, Mock], dead_port: int) -> str:
    return f"""
[upstreams.a]
kind = "openai"
base_url = "{ups["a"].url}"
api_key_env = "KEY_A"

[upstreams.b]
kind = "openai"
base_url = "{ups["b"].url}/v1"
api_key_env = "KEY_B"

[upstreams.c]
kind = "openai"
base_url = "{ups["c"].url}"
api_key_env = "KEY_B"

[upstreams.claude]
kind = "anthropic"
base_url = "{ups["claude"].url}"
api_key_env = "KEY_CLAUDE"

[upstreams.dead]
kind = "openai"
base_url = "http://127.0.0.1:{dead_port}"
api_key_env = "KEY_A"

[[models]]
match = "claude-only-*"
upstreams = [{{ upstream = "claude" }}]

[[models]]
match = "claude-*"
upstreams = [{{ upstream = "claude" }}, {{ upstream = "b", model = "gpt-4o" }}]

[[models]]
match = "gpt-4o-mini"
upstreams = [{{ upstream = "a" }}, {{ upstream = "b" }}]

[[models]]
match = "solo"
upstreams = [{{ upstream = "a" }}]

[[models]]
match = "from-dead"
upstreams = [{{ upstream = "dead" }}, {{ upstream = "b" }}]

[[models]]
match = "three"
upstreams = [{{ upstream = "a" }}, {{ upstream = "b" }}, {{ upstream = "c" }}]
"""


@pytest.fixture
def start(start_gateway: GatewayFactory, ups: dict[str, Mock], tmp_path: Path) -> Any:
    def run(**env: str) -> Gateway:
        path = tmp_path / f"routes-{free_port()}.toml"
        path.write_text(routes_toml(ups, free_port()))
        keys = {"KEY_A": "sk-a", "KEY_B": "sk-b", "KEY_CLAUDE": "sk-ant-claude"}
        return start_gateway(ROUTES_FILE=str(path), **keys, **env)

    return run


@pytest.fixture(scope="module")
def routed_process(
    upstreams: dict[str, Mock], mock_process: Mock, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    """One gateway with the default routes for the module's tests that fail no upstream and
    read no counter: nothing they do changes what the next one sees (no breaker, Retry-After
    or token state), and each still gets its mocks healed and forgotten (`routed`)."""
    tmp = tmp_path_factory.mktemp("routed")
    path = tmp / "routes.toml"
    path.write_text(routes_toml(upstreams, free_port()))
    gateway = Gateway(
        tmp,
        {
            "OPENAI_BASE_URL": mock_process.url,
            "OPENAI_API_KEY": "sk-upstream-secret",
            "ANTHROPIC_BASE_URL": mock_process.url,
            "ANTHROPIC_API_KEY": "sk-ant-upstream-secret",
            "ROUTES_FILE": str(path),
            "KEY_A": "sk-a",
            "KEY_B": "sk-b",
            "KEY_CLAUDE": "sk-ant-claude",
        },
    )
    yield gateway
    gateway.stop()


@pytest.fixture
def routed(routed_process: Gateway, ups: dict[str, Mock]) -> Gateway:
    return routed_process


def sdk(gateway: Gateway, **headers: str) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=gateway.url + "/v1", api_key="demo", max_retries=0, timeout=20, default_headers=headers or None
    )


def knobs(**values: object) -> dict[str, str]:
    return {
        "x-stainless-mock-" + k.replace("_", "-"): v if isinstance(v, str) else json.dumps(v) for k, v in values.items()
    }


def hits(mock: Mock) -> int:
    return len(mock.requests())


async def post(gateway: Gateway, body: dict[str, Any], **headers: str) -> tuple[int, dict[str, str], bytes]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(gateway.url + CHAT, json=body, headers=headers) as response,
    ):
        return response.status, {k.lower(): v for k, v in response.headers.items()}, await response.read()


# --- translation: the openai SDK against claude-* --------------------------------------


def test_a_claude_model_answers_through_the_openai_sdk(routed: Gateway, ups: dict[str, Mock]) -> None:
    gateway = routed
    raw = sdk(gateway).chat.completions.with_raw_response.create(
        model=CLAUDE,
        messages=[{"role": "system", "content": "Be brief."}, *HI],
        stop=["\n\nUser:"],  # Anthropic refuses a stop of whitespace only ("\n\n"): the translation leaves it out
        temperature=0.2,
    )
    reply = raw.parse()
    assert raw.headers["x-gateway-upstream"] == "claude"
    assert reply.choices[0].message.content == "reply from claude"
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == 25  # 21 input + 4 cache read + 0 cache creation
    assert reply.usage.completion_tokens == 3
    [seen] = ups["claude"].requests()
    assert seen["path"] == "/v1/messages"
    assert seen["headers"]["x-api-key"] == "sk-ant-claude" and "Authorization" not in seen["headers"]
    assert seen["headers"]["anthropic-version"] == "2023-06-01"
    assert seen["body"] == {
        "model": CLAUDE,
        "max_tokens": 4096,
        "system": "Be brief.",
        "messages": [{"role": "user", "content": "Hola"}],
        "stop_sequences": ["\n\nUser:"],
        "temperature": 0.2,
    }
    assert hits(ups["b"]) == 0


def test_a_claude_stream_with_its_usage_chunk(routed: Gateway, ups: dict[str, Mock]) -> None:
    gateway = routed
    stream = sdk(gateway, **knobs(reply="one two three")).chat.completions.create(
        model=CLAUDE, messages=HI, stream=True, stream_options={"include_usage": True}, max_tokens=50
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "one two three"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage is not None
    assert (usage_chunk.usage.prompt_tokens, usage_chunk.usage.completion_tokens) == (25, 3)
    [seen] = ups["claude"].requests()
    assert seen["body"]["stream"] is True and seen["body"]["max_tokens"] == 50


def test_a_claude_stream_without_usage_asked_has_no_usage_chunk(start: Any) -> None:
    gateway = start()
    chunks = list(sdk(gateway).chat.completions.create(model=CLAUDE, messages=HI, stream=True))
    assert all(c.choices for c in chunks) and all(c.usage is None for c in chunks)
    # the gateway still counted the usage it had asked for
    assert samples(gateway)['tokens_total{kind="prompt",model="claude-sonnet-4-5"}'] == 25


@pytest.mark.parametrize("stream", [False, True])
def test_a_tool_call_round_trip_through_claude(routed: Gateway, ups: dict[str, Mock], stream: bool) -> None:
    gateway = routed
    tools = [
        {
            "type": "function",
            "function": {
                "name": "lookup",
                "description": "Find a thing",
                "parameters": {"type": "object", "properties": {"q": {"type": "string"}}},
            },
        }
    ]
    client = sdk(gateway, **knobs(tool_input='{"q": "weather in Paris"}'))
    if stream:
        chunks = list(client.chat.completions.create(model=CLAUDE, messages=HI, tools=tools, stream=True))
        calls: dict[int, dict[str, str]] = {}
        for chunk in chunks:
            for call in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
                entry = calls.setdefault(call.index, {"id": "", "name": "", "arguments": ""})
                entry["id"] += call.id or ""
                assert call.function is not None
                entry["name"] += call.function.name or ""
                entry["arguments"] += call.function.arguments or ""
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert finish == ["tool_calls"]
        [call] = calls.values()
        call_id, name, arguments = call["id"], call["name"], call["arguments"]
    else:
        reply = client.chat.completions.create(model=CLAUDE, messages=HI, tools=tools, tool_choice="required")
        assert reply.choices[0].finish_reason == "tool_calls"
        tool_calls = reply.choices[0].message.tool_calls
        assert tool_calls is not None
        [tool_call] = tool_calls
        call_id, name, arguments = tool_call.id, tool_call.function.name, tool_call.function.arguments  # type: ignore[union-attr]
        assert ups["claude"].requests()[0]["body"]["tool_choice"] == {"type": "any"}
    assert (call_id, name, json.loads(arguments)) == ("toolu_mock1", "lookup", {"q": "weather in Paris"})
    assert ups["claude"].requests()[0]["body"]["tools"] == [
        {
            "name": "lookup",
            "input_schema": {"type": "object", "properties": {"q": {"type": "string"}}},
            "description": "Find a thing",
        }
    ]
    # The result goes back as the next turn: tool_use and tool_result blocks upstream.
    follow_up = sdk(gateway).chat.completions.create(
        model=CLAUDE,
        messages=[
            *HI,
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}],
            },
            {"role": "tool", "tool_call_id": call_id, "content": "sunny, 21 C"},
        ],
        tools=tools,
    )
    assert follow_up.choices[0].message.content == "reply from claude"
    sent = ups["claude"].requests()[-1]["body"]["messages"]
    assert sent[1] == {
        "role": "assistant",
        "content": [{"type": "tool_use", "id": "toolu_mock1", "name": "lookup", "input": {"q": "weather in Paris"}}],
    }
    assert sent[2] == {
        "role": "user",
        "content": [{"type": "tool_result", "tool_use_id": "toolu_mock1", "content": "sunny, 21 C"}],
    }


@pytest.mark.parametrize("stream", [False, True])
def test_pii_is_masked_through_translation_both_ways(start: Any, ups: dict[str, Mock], stream: bool) -> None:
    gateway = start()
    # The reply's email arrives split across two text deltas.
    client = sdk(gateway, **knobs(deltas=["write to jane.doe@exa", "mple.com or 4242 4242 4242 4242"]))
    messages = [
        {"role": "system", "content": "Operator: ops@example.com"},
        {"role": "user", "content": [{"type": "text", "text": "I am john.smith@example.org"}]},
    ]
    if stream:
        chunks = list(client.chat.completions.create(model=CLAUDE, messages=messages, stream=True))  # type: ignore[arg-type]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    else:
        reply = client.chat.completions.create(model=CLAUDE, messages=messages)  # type: ignore[arg-type]
        text = reply.choices[0].message.content or ""
    assert "jane.doe@example.com" not in text and "4242 4242 4242 4242" not in text
    assert "j***e@example.com" in text and "CC_MASKED_LAST4_4242" in text
    sent = ups["claude"].requests()[0]["body"]
    assert "ops@example.com" not in json.dumps(sent) and "john.smith@example.org" not in json.dumps(sent)
    assert sent["system"] == "Operator: o***s@example.com"


def test_anthropic_errors_come_back_openai_shaped(start: Any, ups: dict[str, Mock]) -> None:
    gateway = start()
    ups["claude"].fault(status=400)
    with pytest.raises(openai.BadRequestError) as caught:
        sdk(gateway).chat.completions.create(model="claude-only-x", messages=HI)
    assert caught.value.status_code == 400
    assert caught.value.body == {
        "message": "mock upstream error 400",
        "type": "invalid_request_error",
        "code": "invalid_request_error",
    }
    ups["claude"].fault(status=529, retry_after=1)  # the only upstream: its overload is the client's answer
    with pytest.raises(openai.InternalServerError) as overloaded:
        sdk(gateway).chat.completions.create(model="claude-only-x", messages=HI, stream=True)
    assert overloaded.value.status_code == 529
    assert overloaded.value.response.headers["retry-after"] == "1"
    assert overloaded.value.body["type"] == "overloaded_error"  # type: ignore[index]


# --- routing and fallbacks -------------------------------------------------------------


async def test_an_unrouted_model_is_404_model_not_found_in_each_shape(routed: Gateway) -> None:
    gateway = routed
    with pytest.raises(openai.NotFoundError) as caught:
        sdk(gateway).chat.completions.create(model="llama-3", messages=HI)
    assert caught.value.code == "model_not_found"
    async with (
        aiohttp.ClientSession() as session,
        session.post(gateway.url + "/v1/messages", json={"model": "llama-3", "max_tokens": 5, "messages": HI}) as r,
    ):
        assert r.status == 404
        assert (await r.json())["error"]["type"] == "not_found_error"
        # gpt-4o-mini routes only to OpenAI-compatible upstreams: none can serve /v1/messages
    async with (
        aiohttp.ClientSession() as session,
        session.post(gateway.url + "/v1/messages", json={"model": "gpt-4o-mini", "max_tokens": 5, "messages": HI}) as r,
    ):
        assert r.status == 404
        assert "OpenAI-compatible" in (await r.json())["error"]["message"]


async def test_messages_route_to_the_anthropic_upstream_of_a_route(routed: Gateway, ups: dict[str, Mock]) -> None:
    gateway = routed
    async with (
        aiohttp.ClientSession() as session,
        session.post(gateway.url + "/v1/messages", json={"model": CLAUDE, "max_tokens": 5, "messages": HI}) as r,
    ):
        assert r.status == 200 and r.headers["x-gateway-upstream"] == "claude"
        assert (await r.json())["content"][0]["text"] == "reply from claude"
    assert ups["claude"].requests()[0]["headers"]["x-api-key"] == "sk-ant-claude"


@pytest.mark.parametrize("stream", [False, True])
def test_a_failing_upstream_falls_back_to_the_next(start: Any, ups: dict[str, Mock], stream: bool) -> None:
    gateway = start()
    ups["a"].fault(status=503)
    raw = sdk(gateway).chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=HI, stream=stream)
    assert raw.headers["x-gateway-upstream"] == "b"
    if stream:
        text = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
    else:
        text = raw.parse().choices[0].message.content
    assert text == "reply from b"
    assert hits(ups["a"]) == 1 and hits(ups["b"]) == 1
    assert ups["b"].requests()[0]["headers"]["Authorization"] == "Bearer sk-b"
    assert ups["a"].requests()[0]["headers"]["Authorization"] == "Bearer sk-a"


def test_a_fallback_the_policies_forbid_is_not_tried(start: Any, ups: dict[str, Mock], tmp_path: Path) -> None:
    # SPEC §15: context.upstream is the routed upstream's name. The policy step decides the
    # first upstream; a fallback to one a forbid names (data that must not reach it) was tried
    # all the same once the first failed.
    policy = tmp_path / "policies.cedar"
    policy.write_text(
        "permit (principal, action, resource);\n"
        '@id("keep-off-b") forbid (principal, action, resource) when { context.upstream == "b" };\n'
    )
    gateway = start(POLICY_FILE=str(policy))
    ups["a"].fault(status=503)
    raw = sdk(gateway).chat.completions.with_raw_response.create(model="three", messages=HI)
    assert raw.headers["x-gateway-upstream"] == "c" and raw.parse().choices[0].message.content == "reply from c"
    with pytest.raises(openai.APIStatusError):
        sdk(gateway).chat.completions.create(model="gpt-4o-mini", messages=HI)  # a failed, b not allowed
    assert hits(ups["b"]) == 0 and hits(ups["a"]) == 2
    ups["a"].heal()
    assert sdk(gateway).chat.completions.create(model="gpt-4o-mini", messages=HI).choices  # a itself: allowed


def test_a_claude_route_falls_back_to_an_openai_upstream_under_its_own_model_name(
    start: Any, ups: dict[str, Mock]
) -> None:
    gateway = start()
    ups["claude"].fault(status=529, retry_after=1)
    raw = sdk(gateway).chat.completions.with_raw_response.create(model=CLAUDE, messages=HI)
    assert raw.headers["x-gateway-upstream"] == "b"
    assert raw.parse().choices[0].message.content == "reply from b"
    assert ups["b"].requests()[0]["body"]["model"] == "gpt-4o"


def test_a_connection_failure_falls_back(start: Any, ups: dict[str, Mock]) -> None:
    gateway = start()
    raw = sdk(gateway).chat.completions.with_raw_response.create(model="from-dead", messages=HI)
    assert raw.headers["x-gateway-upstream"] == "b"
    ups["a"].fault(drop=True)
    raw = sdk(gateway).chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=HI)
    assert raw.headers["x-gateway-upstream"] == "b"


@pytest.mark.serial  # asserts a time: run alone, not beside another worker
def test_a_first_byte_timeout_falls_back_within_the_whole_deadline(start: Any, ups: dict[str, Mock]) -> None:
    gateway = start(TIMEOUT_SECS="3")
    ups["a"].fault(latency_ms=10_000)
    started = time.monotonic()
    chunks = list(sdk(gateway).chat.completions.create(model="three", messages=HI, stream=True))
    elapsed = time.monotonic() - started
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "reply from b"
    assert 0.9 < elapsed < 2.5  # a's share: 3 s / 3 attempts left
    assert hits(ups["c"]) == 0


async def test_the_last_failure_is_the_clients(start: Any, ups: dict[str, Mock]) -> None:
    gateway = start(TIMEOUT_SECS="2")
    ups["a"].fault(status=500)
    ups["b"].fault(status=429, retry_after=7)
    status, headers, body = await post(gateway, {"model": "gpt-4o-mini", "messages": HI})
    assert status == 429 and headers["retry-after"] == "7" and headers["x-gateway-upstream"] == "b"
    assert json.loads(body)["error"]["message"] == "mock upstream error 429"
    ups["c"].fault(latency_ms=5_000)  # b is skipped now (its Retry-After), c never answers
    ups["a"].fault(status=401)  # an answer, not a failure: relayed as the gateway's own 502
    status, headers, body = await post(gateway, {"model": "three", "messages": HI})
    assert status == 502 and json.loads(body)["error"]["code"] == "upstream_auth_rejected"
    ups["a"].fault(latency_ms=5_000)
    status, headers, body = await post(gateway, {"model": "three", "messages": HI})
    assert status == 504 and "x-gateway-upstream" not in headers  # a 1 s, b skipped, c 1 s
    assert json.loads(body)["error"]["message"] == "upstream timed out"


async def test_no_fallback_once_the_stream_has_started(start: Any, ups: dict[str, Mock]) -> None:
    gateway = start()
    ups["a"].fault(die_after=1)
    body = {"model": "gpt-4o-mini", "messages": HI, "stream": True}
    status, headers, data = await post(gateway, body, **knobs(reply="one two three"))
    assert status == 200 and headers["x-gateway-upstream"] == "a"
    events = [line for line in data.decode().split("\n\n") if line]
    assert json.loads(events[-1].removeprefix("data: "))["error"]["code"] == "upstream_stream_broken"
    assert hits(ups["b"]) == 0


@pytest.mark.parametrize("ending", ["no_done", "die_after"])
def test_a_claude_stream_cut_short_ends_in_an_error_event(start: Any, ending: str) -> None:
    # The Anthropic upstream ends its body cleanly before message_delta and message_stop
    # (no_done), or drops the connection (die_after): either way the answer is incomplete,
    # and the openai SDK raises instead of returning a truncated text as if whole (SPEC §5,
    # §13), as /v1/messages does for the same upstream (SPEC §11).
    gateway = start()
    stream = sdk(gateway, **knobs(reply="one two three", **{ending: "1"})).chat.completions.create(
        model=CLAUDE, messages=HI, stream=True
    )
    with pytest.raises(openai.APIError, match="upstream stream ended unexpectedly"):
        list(stream)
    # and the gateway goes on serving
    assert sdk(gateway).chat.completions.create(model=CLAUDE, messages=HI).choices[0].finish_reason == "stop"


@pytest.mark.parametrize("ending", ["die_after", "error_after", "no_done"])
def test_a_claude_stream_that_never_finishes_still_counts_its_input_tokens(start: Any, ending: str) -> None:
    # message_start reported the prompt's tokens; the stream broke before message_delta (the
    # connection dropped, Anthropic's own error event, a body ended early): the prompt was
    # read all the same, and counts in tokens_total as it does on /v1/messages (SPEC §7, §11).
    gateway = start()
    usage = {"input_tokens": 100, "cache_read_input_tokens": 7, "cache_creation_input_tokens": 3}
    headers = knobs(usage=usage, reply="a b c", **{ending: "1"})
    with pytest.raises(openai.APIError):
        list(sdk(gateway, **headers).chat.completions.create(model=CLAUDE, messages=HI, stream=True))
    s = wait_until(lambda: (s := samples(gateway)).get(f'tokens_total{{kind="prompt",model="{CLAUDE}"}}') and s)
    assert s[f'tokens_total{{kind="prompt",model="{CLAUDE}"}}'] == 110
    assert s[f'tokens_total{{kind="completion",model="{CLAUDE}"}}'] == 0


async def test_the_circuit_opens_half_opens_and_closes(start: Any, ups: dict[str, Mock]) -> None:
    gateway = start(CB_FAILURES="2", CB_OPEN_SECS="1")
    s = samples(gateway)
    assert s['circuit_state{upstream="a"}'] == 0 and s['cb_events_total{event="open"}'] == 0
    ups["a"].fault(status=500)
    for _ in range(2):
        status, headers, _ = await post(gateway, {"model": "gpt-4o-mini", "messages": HI})
        assert status == 200 and headers["x-gateway-upstream"] == "b"
    s = samples(gateway)
    assert s['circuit_state{upstream="a"}'] == 2 and s['cb_events_total{event="open"}'] == 1
    assert hits(ups["a"]) == 2
    status, headers, _ = await post(gateway, {"model": "gpt-4o-mini", "messages": HI})
    assert headers["x-gateway-upstream"] == "b" and hits(ups["a"]) == 2  # open: skipped
    # Still failing after the open time: the one trial fails, and it opens for twice as long.
    await asyncio.sleep(1.1)
    status, headers, _ = await post(gateway, {"model": "gpt-4o-mini", "messages": HI})
    assert headers["x-gateway-upstream"] == "b" and hits(ups["a"]) == 3
    s = samples(gateway)
    assert s['cb_events_total{event="half_open"}'] == 1 and s['cb_events_total{event="open"}'] == 2
    await asyncio.sleep(1.1)  # within the doubled 2 s: still open
    status, headers, _ = await post(gateway, {"model": "gpt-4o-mini", "messages": HI})
    assert hits(ups["a"]) == 3
    ups["a"].heal()
    await asyncio.sleep(1.0)
    # Half-open: of concurrent requests exactly one is the trial; the rest go to b.
    results = await asyncio.gather(
        *(post(gateway, {"model": "gpt-4o-mini", "messages": HI}, **knobs(latency_ms=300)) for _ in range(4))
    )
    assert sorted(h["x-gateway-upstream"] for _, h, _ in results) == ["a", "b", "b", "b"]
    s = samples(gateway)
    assert s['circuit_state{upstream="a"}'] == 0 and s['cb_events_total{event="close"}'] == 1
    assert s['cb_events_total{event="half_open"}'] == 2
    status, headers, _ = await post(gateway, {"model": "gpt-4o-mini", "messages": HI})
    assert headers["x-gateway-upstream"] == "a"


@pytest.mark.serial  # asserts a time: run alone, not beside another worker
async def test_a_hung_trial_cannot_wedge_the_circuit(start: Any, ups: dict[str, Mock]) -> None:
    gateway = start(CB_FAILURES="1", CB_OPEN_SECS="0.5", TIMEOUT_SECS="2")
    ups["a"].fault(status=500)
    await post(gateway, {"model": "gpt-4o-mini", "messages": HI})
    ups["a"].fault(latency_ms=60_000)  # the trial never answers: its first-byte deadline ends it
    await asyncio.sleep(0.6)
    started = time.monotonic()
    _, headers, _ = await post(gateway, {"model": "gpt-4o-mini", "messages": HI})
    assert headers["x-gateway-upstream"] == "b" and time.monotonic() - started < 2.5
    assert samples(gateway)['circuit_state{upstream="a"}'] == 2  # re-opened, for 1 s now
    ups["a"].heal()
    await asyncio.sleep(1.1)
    _, headers, _ = await post(gateway, {"model": "gpt-4o-mini", "messages": HI})
    assert headers["x-gateway-upstream"] == "a"
    assert samples(gateway)['circuit_state{upstream="a"}'] == 0


async def test_retry_after_skips_an_upstream_without_opening_its_circuit(start: Any, ups: dict[str, Mock]) -> None:
    gateway = start(CB_FAILURES="1")
    ups["a"].fault(status=429, retry_after=1)
    _, headers, _ = await post(gateway, {"model": "gpt-4o-mini", "messages": HI})
    assert headers["x-gateway-upstream"] == "b" and hits(ups["a"]) == 1
    _, headers, _ = await post(gateway, {"model": "gpt-4o-mini", "messages": HI})
    assert headers["x-gateway-upstream"] == "b" and hits(ups["a"]) == 1  # skipped for 1 s
    s = samples(gateway)
    assert s['cb_events_total{event="open"}'] == 0 and s['circuit_state{upstream="a"}'] == 0
    ups["a"].heal()
    await asyncio.sleep(1.1)
    _, headers, _ = await post(gateway, {"model": "gpt-4o-mini", "messages": HI})
    assert headers["x-gateway-upstream"] == "a"


async def test_nothing_left_to_try_is_503_circuit_open(start: Any, ups: dict[str, Mock]) -> None:
    gateway = start(CB_FAILURES="1", CB_OPEN_SECS="30")
    ups["a"].fault(status=500)
    status, headers, body = await post(gateway, {"model": "solo", "messages": HI})
    assert status == 500 and headers["x-gateway-upstream"] == "a"
    status, headers, body = await post(gateway, {"model": "solo", "messages": HI})
    assert status == 503 and json.loads(body)["error"] == {
        "message": "upstream unavailable",
        "type": "server_error",
        "code": "circuit_open",
    }
    assert 25 <= int(headers["retry-after"]) <= 30 and "x-gateway-upstream" not in headers
    assert hits(ups["a"]) == 1


async def test_each_attempt_is_a_client_span(start: Any, ups: dict[str, Mock], collector: Collector) -> None:
    gateway = start(OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{collector.port}", OTEL_BSP_SCHEDULE_DELAY="100")
    ups["a"].fault(status=500)
    status, _, _ = await post(gateway, {"model": "gpt-4o-mini", "messages": HI}, **{"X-Api-Key": "spans"})
    assert status == 200
    server = await collector.wait_for("spans")
    clients = wait_until(
        lambda: [s for s in collector.spans if s.parent == server.span_id] if len(collector.spans) >= 3 else None,
        what="the client spans",
    )
    assert sorted(s.attrs["gateway.upstream"] for s in clients) == ["a", "b"]
    failed = next(s for s in clients if s.attrs["gateway.upstream"] == "a")
    assert [e for e, _ in failed.events] == ["exception"]


async def test_a_client_span_names_the_model_its_upstream_was_asked_for(
    start: Any, ups: dict[str, Mock], collector: Collector
) -> None:
    # claude-* falls back to b as gpt-4o: that attempt's span says gpt-4o (found by a review:
    # it said the client's model), the first attempt's the client's.
    gateway = start(OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{collector.port}", OTEL_BSP_SCHEDULE_DELAY="100")
    ups["claude"].fault(status=500)
    status, _, _ = await post(
        gateway, {"model": "claude-x", "max_tokens": 5, "messages": HI}, **{"X-Api-Key": "renamed"}
    )
    assert status == 200
    server = await collector.wait_for("renamed")

    def children() -> list[Any] | None:
        found = [s for s in collector.spans if s.parent == server.span_id]
        return found if len(found) >= 2 else None

    clients = wait_until(children, what="the client spans")
    models = {s.attrs["gateway.upstream"]: s.attrs["gen_ai.request.model"] for s in clients}
    assert models == {"claude": "claude-x", "b": "gpt-4o"}


def test_without_routes_file_no_upstream_header(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway()
    raw = sdk(gateway).chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=HI)
    assert "x-gateway-upstream" not in raw.headers
    assert "circuit_state" not in gateway.metrics()


# --- start-up ---------------------------------------------------------------------------


BAD_FILES = {
    "unknown upstream": (
        '[upstreams.a]\nkind="openai"\nbase_url="http://x"\napi_key_env="K"\n'
        '[[models]]\nmatch="m"\nupstreams=[{upstream="zz"}]\n',
        "unknown upstream 'zz'",
    ),
    "missing key variable": (
        '[upstreams.a]\nkind="openai"\nbase_url="http://x"\napi_key_env="NOT_SET_ANYWHERE"\n'
        '[[models]]\nmatch="m"\nupstreams=[{upstream="a"}]\n',
        "NOT_SET_ANYWHERE is not set",
    ),
    "empty key variable": (
        '[upstreams.a]\nkind="openai"\nbase_url="http://x"\napi_key_env="EMPTY_KEY"\n'
        '[[models]]\nmatch="m"\nupstreams=[{upstream="a"}]\n',
        "EMPTY_KEY is empty",
    ),
    "bad url": (
        '[upstreams.a]\nkind="openai"\nbase_url="ftp://x"\napi_key_env="K"\n'
        '[[models]]\nmatch="m"\nupstreams=[{upstream="a"}]\n',
        "upstreams.a.base_url",
    ),
    "bad kind": (
        '[upstreams.a]\nkind="gemini"\nbase_url="http://x"\napi_key_env="K"\n'
        '[[models]]\nmatch="m"\nupstreams=[{upstream="a"}]\n',
        "upstreams.a.kind",
    ),
    "bad glob": (
        '[upstreams.a]\nkind="openai"\nbase_url="http://x"\napi_key_env="K"\n'
        '[[models]]\nmatch="gpt-[4"\nupstreams=[{upstream="a"}]\n',
        "never closed",
    ),
    "empty list": (
        '[upstreams.a]\nkind="openai"\nbase_url="http://x"\napi_key_env="K"\n[[models]]\nmatch="m"\nupstreams=[]\n',
        "empty list",
    ),
    "not toml": ("[upstreams\n", "not valid TOML"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_a_bad_routes_file_stops_start_up_with_one_line(tmp_path: Path, case: str) -> None:
    text, problem = BAD_FILES[case]
    path = tmp_path / "routes.toml"
    path.write_text(text)
    result = start_up(tmp_path, ROUTES_FILE=str(path), K="sk-secret-value", EMPTY_KEY="")
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert line.startswith(f"config error: ROUTES_FILE: {path}: ") and problem in line
    assert "sk-secret-value" not in result.stderr


def test_a_missing_routes_file_stops_start_up(tmp_path: Path) -> None:
    result = start_up(tmp_path, ROUTES_FILE=str(tmp_path / "nope.toml"))
    assert result.returncode == 2
    missing = tmp_path / "nope.toml"
    assert result.stderr.splitlines() == [
        f"config error: ROUTES_FILE: {missing}: cannot read it: No such file or directory"
    ]


# --- SIGHUP reload of ROUTES_FILE (SPEC §10) ----------------------------------------------


def _reloads(gateway: Gateway, result: str) -> int:
    import re

    match = re.search(rf'^config_reloads_total{{result="{result}"}} (\d+)', gateway.metrics(), re.MULTILINE)
    return int(float(match.group(1))) if match else 0


async def test_a_reload_moves_a_model_to_another_upstream_and_a_stream_in_flight_finishes(
    start_gateway: GatewayFactory, ups: dict[str, Mock], tmp_path: Path
) -> None:
    import signal

    path = tmp_path / "routes.toml"
    first = routes_toml(ups, free_port())
    path.write_text(first)
    keys = {"KEY_A": "sk-a", "KEY_B": "sk-b", "KEY_CLAUDE": "sk-ant-claude"}
    gateway = start_gateway(ROUTES_FILE=str(path), **keys)
    status, headers, _ = await post(gateway, {"model": "solo", "messages": HI})
    assert (status, headers["x-gateway-upstream"]) == (200, "a")

    async with aiohttp.ClientSession() as session:
        # A slow stream on the old routes: it must finish after the reload swapped them.
        slow = {"model": "solo", "messages": HI, "stream": True}
        async with session.post(gateway.url + CHAT, json=slow, headers=knobs(chunk_delay_ms=150)) as streaming:
            assert streaming.status == 200
            first_line = await streaming.content.readline()
            assert first_line.startswith(b"data: ")

            moved = 'match = "solo"\nupstreams = [{ upstream = "c" }]'
            path.write_text(first.replace('match = "solo"\nupstreams = [{ upstream = "a" }]', moved))
            gateway.process.signal(signal.SIGHUP)
            await asyncio.to_thread(wait_until, lambda: _reloads(gateway, "ok") == 1, what="the reload")
            status, headers, _ = await post(gateway, {"model": "solo", "messages": HI})
            assert (status, headers["x-gateway-upstream"]) == (200, "c")

            rest = await streaming.read()
            assert rest.rstrip().endswith(b"data: [DONE]") and b'"error"' not in rest

    # A routes file that no longer validates is refused, and the routes in force stay.
    path.write_text(first + '\n[[models]]\nmatch = "x"\nupstreams = [{ upstream = "nowhere" }]\n')
    gateway.process.signal(signal.SIGHUP)
    await asyncio.to_thread(wait_until, lambda: _reloads(gateway, "refused") == 1, what="the refused reload")
    status, headers, _ = await post(gateway, {"model": "solo", "messages": HI})
    assert (status, headers["x-gateway-upstream"]) == (200, "c")
    [refusal] = [line for line in gateway.process.errors().splitlines() if "reload refused" in line]
    assert "ROUTES_FILE" in refusal and "nowhere" in refusal


def test_the_model_list_is_the_routed_models(routed: Gateway, ups: dict[str, Mock]) -> None:
    # SPEC §12/§13: with ROUTES_FILE, GET /v1/models lists exact names and, for a glob, each
    # rename target or the glob itself; no upstream is asked.
    gateway = routed
    listed = [model.id for model in sdk(gateway).models.list()]
    assert listed == ["claude-only-*", "claude-*", "gpt-4o", "gpt-4o-mini", "solo", "from-dead", "three"]
    # One model: the object the list holds for it (OpenAI's models.retrieve), 404 for another.
    for name in listed:
        got = sdk(gateway).models.retrieve(name)
        assert (got.id, got.object, got.owned_by) == (name, "model", "gateway")
    for name in ("gpt-5", "claude-3-opus", "meta-llama/Llama-3-8B"):  # "claude-3-opus" is routed, not listed
        with pytest.raises(openai.NotFoundError) as caught:
            sdk(gateway).models.retrieve(name)
        assert caught.value.code == "model_not_found" and caught.value.type == "invalid_request_error"
    assert all(hits(mock) == 0 for mock in ups.values())


def test_an_upstream_a_reload_removes_leaves_metrics(
    start_gateway: GatewayFactory, ups: dict[str, Mock], tmp_path: Path
) -> None:
    """`circuit_state{upstream}` is per upstream of ROUTES_FILE: one that a SIGHUP reload no
    longer names stayed in /metrics for ever, at its last state (an open circuit kept paging
    for an upstream that was gone). It goes with the upstream; one the reload adds back shows
    again, closed."""
    import signal

    def routes(*names: str) -> str:
        upstreams = "".join(
            f'[upstreams.{name}]\nkind = "openai"\nbase_url = "{ups[name].url}"\napi_key_env = "KEY_A"\n\n'
            for name in names
        )
        legs = ", ".join(f'{{ upstream = "{name}" }}' for name in names)
        return upstreams + f'[[models]]\nmatch = "*"\nupstreams = [{legs}]\n'

    path = tmp_path / "routes.toml"
    path.write_text(routes("a", "b"))
    gateway = start_gateway(ROUTES_FILE=str(path), KEY_A="sk-a")
    assert {k for k in samples(gateway) if k.startswith("circuit_state")} == {
        'circuit_state{upstream="a"}',
        'circuit_state{upstream="b"}',
    }
    for expected, names in ((1, ("a",)), (2, ("a", "b"))):
        path.write_text(routes(*names))
        gateway.process.signal(signal.SIGHUP)
        wait_until(lambda expected=expected: _reloads(gateway, "ok") == expected, what="the reload")
        s = samples(gateway)
        assert {k for k in s if k.startswith("circuit_state")} == {f'circuit_state{{upstream="{n}"}}' for n in names}
        assert all(s[f'circuit_state{{upstream="{n}"}}'] == 0 for n in names)
