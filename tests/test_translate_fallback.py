"""A chat request its OpenAI upstream accepts, answered by an Anthropic fallback (SPEC §13): the
official openai SDK against the gateway in process, routed to a fake that checks the request as
Anthropic's Messages API does (tests/test_adversarial.py's fixtures)."""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from pathlib import Path

import openai
import pytest
from aiohttp import web

from tests.test_adversarial import (  # noqa: F401  (fixtures)
    EMAIL,
    GatewayFactory,
    Hostile,
    hostile,
    json_answer,
    start,
)
from tests.test_side_channels import ROUTES  # a chat → Anthropic route to the fake

MESSAGE = {
    "id": "msg_1",
    "type": "message",
    "role": "assistant",
    "model": "claude-sonnet-4-5",
    "content": [{"type": "text", "text": "ok"}],
    "stop_reason": "end_turn",
    "usage": {"input_tokens": 1, "output_tokens": 1},
}
_ADDRESS = re.compile(r"\S+@\S+\.\S+")


def refusal(body: dict[str, object]) -> str | None:
    """What Anthropic's API answers with a 400 for this request (its messages as it writes them)."""
    stops = body.get("stop_sequences")
    if isinstance(stops, list) and any(isinstance(s, str) and not s.strip() for s in stops):
        return "stop_sequences: each stop sequence must contain non-whitespace"
    temperature = body.get("temperature")
    if isinstance(temperature, (int, float)) and not 0 <= temperature <= 1:
        return "temperature: range: 0 <= temperature <= 1"
    # Anthropic's own check is not public: any address-shaped user_id, a masked one too, is refused here.
    metadata = body.get("metadata")
    if isinstance(metadata, dict) and _ADDRESS.search(str(metadata.get("user_id"))):
        return "metadata.user_id: user_id appears to contain an email address. Please send a uuid or hash value"
    return None


async def anthropic(request: web.Request) -> web.StreamResponse:
    problem = refusal(json.loads(await request.read()))
    if problem is not None:
        error = {"type": "error", "error": {"type": "invalid_request_error", "message": problem}}
        return web.json_response(error, status=400)
    return web.json_response(MESSAGE)


ACCEPTED_BY_OPENAI = [
    ("a newline stop", {"stop": "\n"}),
    ("stops with whitespace-only ones", {"stop": ["\n", " ", "\nUser:"]}),
    ("temperature 1.5", {"temperature": 1.5}),
    ("an address as the user", {"user": EMAIL}),
]


@pytest.mark.parametrize("fields", [f for _, f in ACCEPTED_BY_OPENAI], ids=[name for name, _ in ACCEPTED_BY_OPENAI])
async def test_what_openai_accepts_an_anthropic_upstream_answers(
    start: GatewayFactory,  # noqa: F811
    hostile: Hostile,  # noqa: F811
    tmp_path: Path,
    fields: dict[str, object],
) -> None:
    path = tmp_path / "routes.toml"
    path.write_text(ROUTES.format(url=hostile.url))
    gw = await start(ROUTES_FILE=str(path))
    hostile.answer = anthropic
    sdk = openai.AsyncOpenAI(base_url=str(gw.client.make_url("/v1")), api_key="demo", max_retries=0)
    reply = await sdk.chat.completions.create(
        model="claude-sonnet-4-5",
        messages=[{"role": "user", "content": "Hi"}],
        **fields,  # type: ignore[arg-type]
    )
    assert reply.choices[0].message.content == "ok"
    await sdk.close()


FALLBACK_ROUTES = """
[upstreams.openai]
kind = "openai"
base_url = "{url}"
api_key_env = "OPENAI_API_KEY"

[upstreams.claude]
kind = "anthropic"
base_url = "{url}"
api_key_env = "ANTHROPIC_API_KEY"

[[models]]
match = "m"
upstreams = [{{ upstream = "openai" }}, {{ upstream = "claude" }}]
"""
NO_MESSAGES_FORM = [
    ("an audio part", {"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]}),
    ("a function role", {"messages": [{"role": "function", "name": "f", "content": "1"}]}),
    ("a non-function tool", {"tools": [{"type": "custom", "custom": {"name": "x"}}]}),
]


@pytest.mark.parametrize("fields", [f for _, f in NO_MESSAGES_FORM], ids=[name for name, _ in NO_MESSAGES_FORM])
async def test_a_fallback_that_cannot_take_the_request_leaves_the_primarys_failure(
    start: GatewayFactory,  # noqa: F811
    hostile: Hostile,  # noqa: F811
    tmp_path: Path,
    fields: dict[str, object],
) -> None:
    """SPEC §13: when the last upstream fails, the client gets that failure. An Anthropic
    fallback that has no form for the request is no upstream that failed: the client got the
    gateway's 400 `invalid_request_error` (an SDK does not retry it) for the primary's 503."""
    path = tmp_path / "routes.toml"
    path.write_text(FALLBACK_ROUTES.format(url=hostile.url))
    gw = await start(ROUTES_FILE=str(path))
    overloaded = {"error": {"message": "try later", "type": "server_error", "code": "overloaded"}}
    hostile.answer = json_answer(overloaded, status=503)
    status, body = await gw.chat(fields)
    assert (status, json.loads(body)) == (503, overloaded)
    assert [seen.path for seen in hostile.seen] == ["/v1/chat/completions"]
    # The primary's answer is the client's as before: a 400 still, when it is the one refusing.
    hostile.answer = json_answer({"error": {"message": "no", "type": "invalid_request_error"}}, status=400)
    status, _ = await gw.chat(fields)
    assert status == 400


def anthropic_event(body: dict[str, object]) -> bytes:
    return f"event: {body['type']}\ndata: {json.dumps(body)}\n\n".encode()


async def test_a_small_event_reply_is_not_translated_into_gigabytes(
    start: GatewayFactory,  # noqa: F811
    hostile: Hostile,  # noqa: F811
    tmp_path: Path,
) -> None:
    """A chat request without "stream" that an Anthropic upstream answers with events: each
    chat chunk made of them repeats message_start's `model`, so 0.3 MiB of events with a
    128 KiB model became ~190 MiB of chunks (+0.9 GiB, /healthz held 263 ms), past the 64 MiB
    that bounds the reply read whole. Past it as translated: 502, as a reply that large."""
    path = tmp_path / "routes.toml"
    path.write_text(ROUTES.format(url=hostile.url))
    gw = await start(ROUTES_FILE=str(path))
    usage = {"input_tokens": 1, "output_tokens": 0}
    message = {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-" + "m" * 128 * 1024}
    opening = [
        anthropic_event({"type": "message_start", "message": message | {"content": [], "usage": usage}}),
        anthropic_event({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
    ]
    delta = anthropic_event({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "a"}})
    closing = [
        anthropic_event({"type": "content_block_stop", "index": 0}),
        anthropic_event({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 1}}),
        anthropic_event({"type": "message_stop"}),
    ]

    def answer_with(deltas: int) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        data = b"".join([*opening, *[delta] * deltas, *closing])

        async def answer(request: web.Request) -> web.StreamResponse:
            return web.Response(body=data, content_type="text/event-stream")

        return answer

    hostile.answer = answer_with(600)  # ~0.2 MiB, as chunks ~75 MiB
    status, body = await gw.post(
        "/v1/chat/completions", {"model": "claude-x", "messages": [{"role": "user", "content": "Hi"}]}
    )
    assert status == 502, len(body)
    assert json.loads(body)["error"]["message"] == "upstream reply too large"
    hostile.answer = answer_with(3)  # a usual one passes as before
    status, body = await gw.post(
        "/v1/chat/completions", {"model": "claude-x", "messages": [{"role": "user", "content": "Hi"}]}
    )
    assert status == 200
    assert json.loads(body)["choices"][0]["message"]["content"] == "aaa"
