"""What a review of reply shapes found (each test failed before its fix): a real gateway in
front of a scriptable fake upstream (tests/e2e/scripted_upstream.py)."""

from __future__ import annotations

import json

import anthropic
import pytest

from ..harness import Gateway
from .test_routing_review import EMAIL, HI, Fake, write_routes

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
