"""Structured output through the Anthropic translation (SPEC §13): the official openai SDK's
parse helpers against a real gateway routing claude-* to the mock, which answers a forced tool
as Anthropic does (a tool_use block alone; streamed as input_json_delta pieces)."""

from __future__ import annotations

import itertools
import json
from typing import Any

import openai
import pydantic
import pytest

from ..harness import Gateway, Mock
from .structured import REDACTED, STRUCTURED, Contact
from .test_routing import CLAUDE, HI, knobs, routed, routed_process, sdk, ups, upstreams

__all__ = ["routed", "routed_process", "ups", "upstreams"]  # the fixtures this module uses


class Weather(pydantic.BaseModel):
    city: str
    celsius: int
    sunny: bool


def parsed(client: openai.OpenAI, stream: bool, model: type[pydantic.BaseModel], **extra: Any) -> Any:
    """The SDK's parse helper (or its stream helper's final completion): its one choice."""
    if stream:
        with client.chat.completions.stream(model=CLAUDE, messages=HI, response_format=model, **extra) as events:
            return events.get_final_completion().choices[0]
    return client.chat.completions.parse(model=CLAUDE, messages=HI, response_format=model, **extra).choices[0]


@pytest.mark.parametrize("stream", [False, True])
def test_the_sdks_parse_gets_the_document_claude_answered(routed: Gateway, ups: dict[str, Mock], stream: bool) -> None:
    choice = parsed(sdk(routed), stream, Weather)
    assert choice.message.parsed == Weather(city="mock", celsius=1, sunny=True)  # made from the schema
    assert choice.finish_reason == "stop" and not choice.message.tool_calls
    [seen] = ups["claude"].requests()
    [tool] = seen["body"]["tools"]
    assert tool["name"] == "json_response"
    assert tool["input_schema"]["properties"] == Weather.model_json_schema()["properties"]
    assert seen["body"]["tool_choice"] == {"type": "tool", "name": "json_response", "disable_parallel_tool_use": True}


@pytest.mark.parametrize("stream", [False, True])
def test_pii_inside_a_string_value_is_masked_and_the_document_still_parses(routed: Gateway, stream: bool) -> None:
    # Split inside the escape "\\n" glued to the card, right after it, inside the card and the address.
    escape, at = STRUCTURED.index("\\n"), STRUCTURED.index("doe@")
    points = [0, escape + 1, escape + 2, escape + 9, at + 3, len(STRUCTURED)]
    cut = [STRUCTURED[a:b] for a, b in itertools.pairwise(points)]
    client = sdk(routed, **knobs(tool_deltas=cut))
    choice = parsed(client, stream, Contact)
    assert choice.message.parsed == REDACTED


@pytest.mark.parametrize("stream", [False, True])
def test_json_object_mode_answers_a_json_object(routed: Gateway, ups: dict[str, Mock], stream: bool) -> None:
    client = sdk(routed, **knobs(tool_input='{"answer": 42}'))
    request: Any = {"model": CLAUDE, "messages": HI, "response_format": {"type": "json_object"}}
    if stream:
        chunks = list(client.chat.completions.create(**request, stream=True))
        content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert not any(c.choices[0].delta.tool_calls for c in chunks if c.choices)
    else:
        reply = client.chat.completions.create(**request)
        content, finish = reply.choices[0].message.content or "", [reply.choices[0].finish_reason]
        assert reply.choices[0].message.tool_calls is None
    assert json.loads(content) == {"answer": 42} and finish == ["stop"]
    [tool] = ups["claude"].requests()[0]["body"]["tools"]
    assert tool["input_schema"] == {"type": "object"}


LOOKUP = {
    "type": "function",
    "function": {
        "name": "lookup",
        "parameters": {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]},
        "strict": True,
    },
}


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("called", ["lookup", "json_response"])
def test_with_the_clients_tools_claude_calls_one_or_answers_the_document(
    routed: Gateway, ups: dict[str, Mock], stream: bool, called: str
) -> None:
    client = sdk(routed, **knobs(tool_name=called))
    choice = parsed(client, stream, Weather, tools=[LOOKUP])
    if called == "lookup":
        assert choice.finish_reason == "tool_calls" and choice.message.parsed is None
        [call] = choice.message.tool_calls
        assert (call.function.name, json.loads(call.function.arguments)) == ("lookup", {"q": "mock"})
    else:
        assert choice.finish_reason == "stop" and not choice.message.tool_calls
        assert choice.message.parsed == Weather(city="mock", celsius=1, sunny=True)
    body = ups["claude"].requests()[0]["body"]
    assert [tool["name"] for tool in body["tools"]] == ["lookup", "json_response"]
    assert body["tool_choice"] == {"type": "any", "disable_parallel_tool_use": True}


class Tree(pydantic.BaseModel):
    name: str
    children: list[Tree]


class Chain(pydantic.BaseModel):
    value: int
    next: Chain | None = None


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("model", [Tree, Chain])
def test_a_recursive_model_is_answered(routed: Gateway, stream: bool, model: type[pydantic.BaseModel]) -> None:
    # A tree or a linked list (a $ref back to its own model): the mock followed the $ref for
    # ever (RecursionError) and the SDK got no document.
    choice = parsed(sdk(routed), stream, model)
    assert isinstance(choice.message.parsed, model)


@pytest.mark.parametrize("stream", [False, True])
def test_a_deeply_nested_document_is_answered(routed: Gateway, stream: bool) -> None:
    # 300 levels (the gateway takes the request): Claude's tool input, written as the content,
    # was past orjson's 255 levels: a 500 instead of the document.
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(300):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    body = {"model": CLAUDE, "messages": HI, "stream": stream}
    body["response_format"] = {"type": "json_schema", "json_schema": {"name": "deep", "schema": schema}}
    client = sdk(routed)
    if stream:
        chunks = client.chat.completions.create(**body)
        content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    else:
        content = client.chat.completions.create(**body).choices[0].message.content or ""
    value = json.loads(content)
    for _ in range(300):
        value = value["a"]
    assert value == "mock"
