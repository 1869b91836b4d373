"""PII through side doors a review found after the object-key, thinking, eviction and JSON
escape changes: ended streams filling the stream bound, JSON texts in parts without an index,
a thinking delta on a text block, deep arguments translated for Anthropic. A test marked
xfail(strict=True) is a known gap kept on purpose; its reason says why."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from gateway.relay import StreamRelay, redact_reply
from gateway.surfaces import CHAT, MESSAGES
from tests.test_adversarial import (  # noqa: F401  (fixtures)
    ANTHROPIC_START,
    DONE,
    EMAIL,
    REDACTOR,
    GatewayFactory,
    Hostile,
    anthropic_ev,
    chunk,
    decoded,
    gateway,
    hostile,
    json_answer,
    json_events,
    start,
)

CHAT_PATH = "/v1/chat/completions"
ESCAPED_EMAIL = "jane.doe\\u0040example.com"  # as written inside a JSON text: a parser reads EMAIL
# Tool-call arguments (a JSON text) holding an address written with an escape, and a bare card number.
ARGUMENTS = '{"to": "' + ESCAPED_EMAIL + '", "n": 4242424242424242}'
assert json.loads(ARGUMENTS)["to"] == EMAIL
ESCAPED_ONLY = '{"to": "' + ESCAPED_EMAIL + '"}'


def block(index: int, *texts: str) -> bytes:
    out = anthropic_ev({"type": "content_block_start", "index": index, "content_block": {"type": "text", "text": ""}})
    for text in texts:
        out += anthropic_ev(
            {"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": text}}
        )
    return out + anthropic_ev({"type": "content_block_stop", "index": index})


def block_text(wire: bytes, index: int) -> str:
    return "".join(
        e["delta"].get("text", "")
        for e in json_events(wire)
        if e.get("type") == "content_block_delta" and e.get("index") == index
    )


# --- 1. Ended streams do not fill the bound on open ones (relay._leaf) ------------------------


def test_split_pii_after_256_ended_content_blocks_is_masked() -> None:
    relay = StreamRelay(REDACTOR, None, MESSAGES)
    n = 300
    wire = (
        ANTHROPIC_START
        + b"".join(block(i, f"item {i} done") for i in range(n))  # "done" is held to the block's stop
        + block(n, "mail jane.doe@exa", "mple.com")
        + anthropic_ev({"type": "message_stop"})
    )
    out = relay.feed(wire) + relay.close()
    assert block_text(out, 0) == "item 0 done"
    assert block_text(out, n) == "mail j***e@example.com"


# --- 2. JSON texts in parts without an index are still read as JSON --------------------------


def test_reply_choice_without_index_keeps_arguments_json_and_masked() -> None:
    reply: dict[str, Any] = {
        "id": "c",
        "object": "chat.completion",
        "model": "m",
        "choices": [
            {
                "message": {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [{"id": "t", "type": "function", "function": {"name": "f", "arguments": ARGUMENTS}}],
                },
                "finish_reason": "tool_calls",
            }
        ],
    }
    redact_reply(REDACTOR, reply, CHAT.reply_spec, None)
    arguments = reply["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]
    assert json.loads(arguments) == {"to": "j***e@example.com", "n": "CC_MASKED_LAST4_4242"}


@pytest.mark.parametrize("route", ["chat", "messages"])
def test_json_text_of_an_unreadable_part_is_unescaped_before_matching(route: str) -> None:
    if route == "chat":
        relay = StreamRelay(REDACTOR, None, CHAT)
        wire = chunk({"tool_calls": [{"index": "0", "function": {"arguments": ESCAPED_ONLY}}]}) + DONE
    else:
        relay = StreamRelay(REDACTOR, None, MESSAGES)
        delta = {"type": "input_json_delta", "partial_json": ESCAPED_ONLY}
        wire = ANTHROPIC_START + anthropic_ev({"type": "content_block_delta", "index": "0", "delta": delta})
    out = relay.feed(wire) + relay.close()
    texts = [
        value
        for e in json_events(out)
        for value in _strings(e)
        if value.startswith("{")  # the JSON texts, parsed as the client would
    ]
    assert texts and all(EMAIL not in json.dumps(json.loads(t), ensure_ascii=False) for t in texts)


def _strings(node: object) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for v in node.values() for s in _strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in _strings(v)]
    return []


# --- 3. Thinking fields are kept per part, by that part's own type ----------------------------


def test_a_thinking_delta_does_not_make_a_text_blocks_fields_keep() -> None:
    relay = StreamRelay(REDACTOR, None, MESSAGES)
    event = anthropic_ev(
        {
            "type": "content_block_start",
            "index": 0,
            "content_block": {"type": "text", "text": "", "signature": EMAIL},
            "delta": {"type": "thinking_delta"},
        }
    )
    out = relay.feed(ANTHROPIC_START + event + anthropic_ev({"type": "message_stop"})) + relay.close()
    assert EMAIL not in decoded(out)


# --- 4. Unescaping changes events that need no redaction --------------------------------------


@pytest.mark.xfail(
    strict=True,
    reason="SPEC §11 (unchanged events byte for byte), kept as a trade-off: a JSON text "
    "(partial_json, arguments) is read with its escapes of ordinary characters written as "
    "the characters ('\\u0041' -> 'A'), so that PII written with escapes is masked; the JSON "
    "means the same, its bytes differ",
)
def test_a_json_text_without_pii_passes_byte_for_byte() -> None:
    relay = StreamRelay(REDACTOR, None, MESSAGES)
    event = anthropic_ev(
        {
            "type": "content_block_delta",
            "index": 0,
            "delta": {"type": "input_json_delta", "partial_json": '{"a": "\\u0041"}'},
        }
    )
    assert relay.feed(ANTHROPIC_START + event) == ANTHROPIC_START + event


# --- 5. Router: a translated request nested past orjson's depth is a 4xx, not a 500 ----------

ROUTES = """
[upstreams.claude]
kind = "anthropic"
base_url = "{url}"
api_key_env = "ANTHROPIC_API_KEY"

[[models]]
match = "claude-*"
upstreams = [{{ upstream = "claude" }}]
"""


async def test_deep_arguments_routed_to_anthropic_are_not_a_500(
    start: GatewayFactory,  # noqa: F811
    hostile: Hostile,  # noqa: F811
    tmp_path: Path,
) -> None:
    path = tmp_path / "routes.toml"
    path.write_text(ROUTES.format(url=hostile.url))
    gw = await start(ROUTES_FILE=str(path))
    hostile.answer = json_answer(
        {
            "id": "m",
            "type": "message",
            "role": "assistant",
            "model": "claude-x",
            "content": [{"type": "text", "text": "ok"}],
            "stop_reason": "end_turn",
            "usage": {"input_tokens": 1, "output_tokens": 1},
        }
    )
    depth = 250
    arguments = '{"a":' * depth + '"x"' + "}" * depth
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": arguments}}
    body = {
        "model": "claude-x",
        "messages": [
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "c", "content": "ok"},
        ],
    }
    status, data = await gw.post(CHAT_PATH, body)
    assert status < 500, data
