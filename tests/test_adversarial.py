"""Adversarial review of the gateway (issues 15-17), in process: the app from create_app(settings)
in front of a hostile upstream of our own on loopback (real HTTP both ways).

Each test asserts what a user of the gateway would notice: no PII in clear past it (either
way), JSON that stays JSON, an error that is the gateway's own (never a 500 for someone
else's bad input, never a second response inside a stream), a gateway that keeps serving.
A test marked xfail(strict=True) is a defect found by this review: it fails today, and its
reason names the SPEC clause; the rest are defences that held, kept as regression tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from multidict import CIMultiDictProxy
from prometheus_client.parser import text_string_to_metric_families

from gateway import keys, sse
from gateway.app import SERVER_OPTIONS, create_app
from gateway.config import Settings
from gateway.redact import ALL_KINDS, Redactor, build_redactor
from gateway.relay import StreamRelay
from gateway.surfaces import MESSAGES

_BUILT = build_redactor(ALL_KINDS)
assert _BUILT is not None
REDACTOR: Redactor = _BUILT
CHAT = "/v1/chat/completions"
MESSAGES_PATH = "/v1/messages"
UPSTREAM_KEY = "sk-upstream-secret"
ANTHROPIC_KEY = "sk-ant-upstream-secret"
EMAIL = "jane.doe@example.com"
PROMPT = [{"role": "user", "content": "hi"}]
AiohttpClient = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]
AiohttpServer = Callable[..., Awaitable[TestServer]]
Answer = Callable[[web.Request], Awaitable[web.StreamResponse]]


# --- a hostile upstream: answers whatever the test scripts, records what it was sent ---------


@dataclass
class Seen:
    path: str
    headers: CIMultiDictProxy[str]
    body: bytes


@dataclass
class Hostile:
    url: str = ""
    seen: list[Seen] = field(default_factory=list)
    answer: Answer | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append(Seen(request.path, request.headers, await request.read()))
        if self.answer is None:
            return web.json_response(chat_reply("pong"))
        return await self.answer(request)

    def sent(self) -> dict[str, Any]:
        """The JSON body of the last request the upstream got."""
        return dict(json.loads(self.seen[-1].body))


def chat_reply(content: object, **message: object) -> dict[str, Any]:
    return {
        "id": "c1",
        "object": "chat.completion",
        "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content, **message}}],
    }


def json_answer(body: object, status: int = 200) -> Answer:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()

    async def answer(request: web.Request) -> web.StreamResponse:
        return web.Response(body=data, status=status, content_type="application/json")

    return answer


def events_answer(*reads: bytes, stall: asyncio.Event | None = None, pause: float = 0.0) -> Answer:
    """An event stream written read by read (`pause` seconds apart: the gateway reads them
    apart); with `stall`, it then goes silent until set."""

    async def answer(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for position, read in enumerate(reads):
            if pause and position:
                await asyncio.sleep(pause)
            await response.write(read)
        if stall is not None:
            await stall.wait()
        await response.write_eof()
        return response

    return answer


def ev(body: object) -> bytes:
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


def chunk(delta: dict[str, Any], finish: str | None = None, index: object = 0) -> bytes:
    return ev(
        {
            "id": "c1",
            "object": "chat.completion.chunk",
            "choices": [{"index": index, "delta": delta, "finish_reason": finish}],
        }
    )


def anthropic_ev(body: dict[str, Any]) -> bytes:
    return f"event: {body['type']}\n".encode() + ev(body)


DONE = b"data: [DONE]\n\n"
ANTHROPIC_START = anthropic_ev(
    {
        "type": "message_start",
        "message": {
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "content": [],
            "model": "claude",
            "usage": {"input_tokens": 3, "output_tokens": 1},
        },
    }
)
ANTHROPIC_END = anthropic_ev(
    {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 5}}
) + anthropic_ev({"type": "message_stop"})


def events_of(wire: bytes) -> list[sse.Event]:
    parser = sse.SSEParser()
    return parser.feed(wire) + parser.close()


def json_events(wire: bytes) -> list[dict[str, Any]]:
    out = []
    for event in events_of(wire):
        if event.data is not None and event.data != sse.DONE:
            try:
                out.append(json.loads(event.data))
            except (ValueError, RecursionError):
                continue
    return out


def delta_text(wire: bytes, *path: str) -> str:
    """The concatenation of choices[].delta.<path> over a chat stream."""
    pieces = []
    for body in json_events(wire):
        for choice in body.get("choices") or ():
            node: Any = choice.get("delta") or {}
            for step in path:
                node = node.get(step) if isinstance(node, dict) else None
            if isinstance(node, str):
                pieces.append(node)
    return "".join(pieces)


def decoded(wire: bytes) -> str:
    """The wire, and every event's JSON decoded (an escape must not hide a value either)."""
    text = wire.decode("utf-8", "replace")
    for body in json_events(wire):
        text += "\n" + json.dumps(body, ensure_ascii=False)
    return text


# --- the gateway, in process, in front of the hostile upstream -------------------------------


@dataclass
class Gateway:
    app: web.Application
    client: TestClient[web.Request, web.Application]
    log: io.BytesIO

    async def chat(self, body: dict[str, Any], **headers: str) -> tuple[int, bytes]:
        return await self.post(CHAT, {"model": "m", "messages": PROMPT, **body}, **headers)

    async def messages(self, body: dict[str, Any], **headers: str) -> tuple[int, bytes]:
        return await self.post(
            MESSAGES_PATH, {"model": "claude", "max_tokens": 10, "messages": PROMPT, **body}, **headers
        )

    async def post(self, path: str, body: object, **headers: str) -> tuple[int, bytes]:
        headers.setdefault("X-Api-Key", "demo")
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        async with self.client.post(path, data=data, headers={"Content-Type": "application/json", **headers}) as r:
            return r.status, await r.read()

    async def healthy(self) -> bool:
        async with self.client.get("/healthz") as r:
            return r.status == 200 and await r.text() == "ok"


@pytest.fixture
async def hostile(aiohttp_server: AiohttpServer) -> Hostile:
    upstream = Hostile()
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_route("*", "/{path:.*}", upstream.handle)  # GET too: the model list
    server = await aiohttp_server(app)
    upstream.url = str(server.make_url("")).rstrip("/")
    return upstream


GatewayFactory = Callable[..., Awaitable[Gateway]]


@pytest.fixture
def start(aiohttp_client: AiohttpClient, make_settings: Callable[..., Settings], hostile: Hostile) -> GatewayFactory:
    async def start(**env: str) -> Gateway:
        defaults = {
            "OPENAI_BASE_URL": hostile.url,
            "OPENAI_API_KEY": UPSTREAM_KEY,
            "ANTHROPIC_BASE_URL": hostile.url,
            "ANTHROPIC_API_KEY": ANTHROPIC_KEY,
            "RPS": "0",
            "DEFAULT_QUOTA": "100000",
        }
        log = io.BytesIO()
        app = create_app(make_settings(**(defaults | env)), log_stream=log)
        server = TestServer(app)
        await server.start_server(**SERVER_OPTIONS)  # type: ignore[arg-type]  # as server.py passes them
        return Gateway(app, await aiohttp_client(server), log)

    return start


@pytest.fixture
async def gateway(start: GatewayFactory) -> AsyncIterator[Gateway]:
    yield await start()


# --- 1. Redaction misses: PII next to other digits (SPEC §6 "Detected: ... Luhn-valid cards") --

# A candidate that fails its check (Luhn, digit count) is skipped whole: the search goes on
# after its end, so a real card or phone inside it, or right after it, is never tried again.
SWALLOWED = [
    ("card 4242 4242 4242 4242 123", "4242 4242 4242 4242", "a card and its CVV"),
    ("4111 1111 1111 1111 737 exp 12/27", "4111 1111 1111 1111", "a test card, CVV and expiry"),
    ("4242 4242 4242 4242 12 27", "4242 4242 4242 4242", "a card and its expiry month and year"),
    ("+1 415 555 2671 4242 4242 4242 4242", "4242 4242 4242 4242", "a phone, then a card"),
    ("+44 20 7946 0958 4242 4242 4242 4242", "7946 0958", "a UK phone, then a card"),
    ("+1 415 555 2671 415 555 2672", "555 2671", "two phones"),
    ("4242 4242 4242 4242 415 555 2671", "4242 4242 4242 4242", "a card, then a phone"),
]


@pytest.mark.parametrize(("text", "clear"), [c[:2] for c in SWALLOWED], ids=[c[2] for c in SWALLOWED])
def test_pii_next_to_more_digits_is_still_masked(text: str, clear: str) -> None:
    assert clear not in REDACTOR.redact(text)


LONG_EMAILS = [
    "jane@mail.engineering.department.example-corp.com",  # 33 characters before the last dot
    "jane@example.photography",  # an 11-letter TLD (IANA has them up to 24)
    "christopher.alexander.montgomery1@example.com",  # a 33-character local part (RFC 5321: 64)
]


@pytest.mark.parametrize("address", LONG_EMAILS)
def test_real_addresses_with_long_parts_are_masked(address: str) -> None:
    assert address not in REDACTOR.redact(f"write to {address} today")


@pytest.mark.parametrize("text", ["4242\u00a04242\u00a04242\u00a04242", "+1\u00a0415\u00a0555\u00a02671"])
def test_pii_grouped_with_no_break_spaces_is_masked(text: str) -> None:
    out = REDACTOR.redact(f"pay with {text} now")
    assert "4242\u00a04242" not in out and "415\u00a0555" not in out


COMMON_FORMATS = [
    ("call 1-415-555-2671 now", "555-2671", "US with its 1- prefix"),
    ("ext 415-555-2671x123", "555-2671", "with an extension"),
    (
        "\uff14\uff12\uff14\uff12 \uff14\uff12\uff14\uff12 \uff14\uff12\uff14\uff12 \uff14\uff12\uff14\uff12",
        "\uff14\uff12\uff14\uff12 \uff14",
        "full-width card",
    ),
    (
        "\uff10\uff19\uff10\uff0d\uff11\uff12\uff13\uff14\uff0d\uff15\uff16\uff17\uff18",
        "\uff15\uff16\uff17\uff18",
        "full-width JP mobile",
    ),
]


@pytest.mark.parametrize(("text", "clear"), [pytest.param(*c[:2], id=c[2]) for c in COMMON_FORMATS])
def test_common_phone_and_card_formats_are_masked(text: str, clear: str) -> None:
    assert clear not in REDACTOR.redact(text)


HELD = [
    ("4242 4242 4242 4242", "CC_MASKED_LAST4_4242"),
    ("card 4242-4242-4242-4242, thanks", "card CC_MASKED_LAST4_4242, thanks"),
    ("amex 3782 822463 10005.", "amex CC_MASKED_LAST4_0005."),
    ("card 4242 4242 4242 4242 cvv 123", "card CC_MASKED_LAST4_4242 cvv 123"),
    ("5555 5555 5555 4444 2027", "CC_MASKED_LAST4_4444 2027"),
    ("Tel: +1 415 555 2671 Card: 4242 4242 4242 4242", "Tel: PHONE_MASKED_LAST2_71 Card: CC_MASKED_LAST4_4242"),
    ("(415) 555-2671 or +44 7911 123456", "PHONE_MASKED_LAST2_71 or PHONE_MASKED_LAST2_56"),
    ("JANE.DOE@EXAMPLE.COM", "J***E@EXAMPLE.COM"),
    ("mailto:jane+tag@example.co.uk.", "mailto:j***g@example.co.uk."),
    ("SSN: 219-09-9999", "SSN: SSN_MASKED"),
    ("GB82 WEST 1234 5698 7654 32", "IBAN_MASKED_LAST4_5432"),
    # Look-alikes pass unchanged.
    ("order 123456789012 on 2024-01-15T10:20:30Z, v3.11.7, $1,234.56", None),
    ("uuid 550e8400-e29b-41d4-a716-446655440000 and 4242 4242 4242 4241", None),
]


@pytest.mark.parametrize(("text", "masked"), HELD, ids=[t[:24] for t, _ in HELD])
def test_what_is_masked_and_what_passes(text: str, masked: str | None) -> None:
    assert REDACTOR.redact(text) == (masked if masked is not None else text)


async def test_a_card_with_its_cvv_never_reaches_the_upstream(gateway: Gateway, hostile: Hostile) -> None:
    status, _ = await gateway.chat({"messages": [{"role": "user", "content": "pay 4242 4242 4242 4242 123 now"}]})
    assert status == 200
    assert "4242 4242 4242 4242" not in hostile.seen[-1].body.decode()


# --- 2. Request texts the upstream must not see (SPEC §6, §11) --------------------------------


@pytest.mark.parametrize(
    "message",
    [
        {
            "role": "assistant",
            "content": None,
            "function_call": {"name": "mail", "arguments": json.dumps({"to": EMAIL})},
        },
        {"role": "assistant", "content": [{"type": "refusal", "refusal": f"I will not write to {EMAIL}"}]},
    ],
    ids=["function_call", "refusal_part"],
)
async def test_every_message_text_is_redacted_before_the_upstream(
    gateway: Gateway, hostile: Hostile, message: dict[str, Any]
) -> None:
    status, _ = await gateway.chat({"messages": [{"role": "user", "content": "hi"}, message]})
    assert status == 200
    assert EMAIL not in hostile.seen[-1].body.decode()


async def test_anthropic_tool_use_input_keys_are_redacted_before_the_upstream(
    gateway: Gateway, hostile: Hostile
) -> None:
    hostile.answer = json_answer({"type": "message", "role": "assistant", "content": []})
    block = {"type": "tool_use", "id": "toolu_1", "name": "invite", "input": {"guests": {EMAIL: "Jane"}}}
    status, _ = await gateway.messages({"messages": [{"role": "assistant", "content": [block]}]})
    assert status == 200
    assert EMAIL not in hostile.seen[-1].body.decode()


async def test_request_texts_in_every_listed_place_are_redacted(gateway: Gateway, hostile: Hostile) -> None:
    messages = [
        {"role": "system", "content": f"user {EMAIL}"},
        {"role": "user", "content": [{"type": "text", "text": "card 4242 4242 4242 4242"}]},
        {
            "role": "assistant",
            "refusal": "no +1 415 555 2671",
            "content": None,
            "tool_calls": [
                {"id": "t", "type": "function", "function": {"name": "f", "arguments": '{"n": 4242424242424242}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "t", "content": f"sent to {EMAIL}"},
    ]
    status, _ = await gateway.chat({"messages": messages})
    assert status == 200
    sent = hostile.sent()
    text = json.dumps(sent)
    for value in (EMAIL, "4242 4242 4242 4242", "4242424242424242", "415 555 2671"):
        assert value not in text
    assert json.loads(sent["messages"][2]["tool_calls"][0]["function"]["arguments"]) == {"n": "CC_MASKED_LAST4_4242"}


# Predicted Outputs (chat's `prediction`): the text of the file being regenerated, usually the
# same text the messages carry, which were masked while the prediction went up in clear.
@pytest.mark.parametrize(
    "prediction",
    [
        {"type": "content", "content": f"contact: {EMAIL}"},
        {"type": "content", "content": [{"type": "text", "text": f"contact: {EMAIL}"}]},
    ],
    ids=["string", "parts"],
)
async def test_a_predicted_output_is_redacted_as_the_messages_are(
    gateway: Gateway, hostile: Hostile, prediction: dict[str, Any]
) -> None:
    status, _ = await gateway.chat(
        {"messages": [{"role": "user", "content": f"fix: contact: {EMAIL}"}], "prediction": prediction}
    )
    assert status == 200
    sent = hostile.sent()
    assert EMAIL not in json.dumps(sent)
    assert "j***e@example.com" in json.dumps(sent["prediction"])
    assert sent["prediction"]["type"] == "content"


# --- 3. Hostile request bodies: the gateway's own 4xx, never a 500 ----------------------------


# Was a 500 (orjson.dumps refuses past 254 levels what orjson.loads took): fixed in af53022.
@pytest.mark.parametrize("path", [CHAT, MESSAGES_PATH])
async def test_a_deeply_nested_request_field_is_not_a_500(gateway: Gateway, path: str) -> None:
    deep: object = "x"
    for _ in range(300):
        deep = [deep]
    body = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}], "metadata": deep}
    status, data = await gateway.post(path, body)
    assert status < 500, data
    assert await gateway.healthy()


@pytest.mark.parametrize(
    "body",
    [
        b"[]",
        b'{"model": 5, "messages": []}',
        b'{"model": "m", "messages": "hi"}',
        b'{"model": "m", "messages": [], "model": ["x"]}',
        b'{"model": "m", "messages": [5, null, {"content": {"a": 1}}, {"content": [5, {"type": "text", "text": 7}]}]}',
        b'{"model":"m","messages":[{"role":"user","content":"\\ud800 lone"}]}',
        b"\xff\xfe{}",
        b'{"model": "m", "messages": [' + b"[" * 2000 + b"]" * 2000 + b"]}",
    ],
    ids=["array", "model-int", "messages-str", "repeated-model", "odd-types", "lone-surrogate", "not-utf8", "too-deep"],
)
async def test_malformed_bodies_get_a_clear_4xx_or_a_relay(gateway: Gateway, body: bytes) -> None:
    status, data = await gateway.post(CHAT, body)
    assert status < 500, data
    if status >= 400:
        assert set(json.loads(data)["error"]) == {"message", "type", "code"}
    assert await gateway.healthy()


async def test_a_repeated_key_means_the_same_thing_upstream(gateway: Gateway, hostile: Hostile) -> None:
    body = (
        b'{"model":"m","messages":[{"role":"user","content":"'
        + EMAIL.encode()
        + b'"}],"messages":[{"role":"user","content":"hi"}]}'
    )
    status, _ = await gateway.post(CHAT, body)
    assert status == 200
    assert hostile.sent()["messages"] == [{"role": "user", "content": "hi"}]
    assert EMAIL.encode() not in hostile.seen[-1].body


# --- 4. Hostile upstream events (SPEC §6: never relayed with text in clear) ----------------


@pytest.mark.parametrize(
    "event",
    [
        b"id: " + EMAIL.encode() + b"\ndata: [DONE]\n\n",
        b": " + EMAIL.encode() + b"\ndata: [DONE]\n\n",
        b": " + EMAIL.encode() + b"\ndata: keep-alive\n\n",
        b"event: 4242424242424242\ndata: keep-alive\n\n",
    ],
    ids=["done-id", "done-comment", "text-comment", "text-event-line"],
)
async def test_pii_on_the_other_lines_of_an_event_is_redacted(gateway: Gateway, hostile: Hostile, event: bytes) -> None:
    hostile.answer = events_answer(chunk({"content": "hi"}), event, DONE)
    status, wire = await gateway.chat({"stream": True})
    assert status == 200
    assert EMAIL not in wire.decode() and "4242424242424242" not in wire.decode()


async def test_pii_on_the_other_lines_of_a_json_event_is_redacted(gateway: Gateway, hostile: Hostile) -> None:
    lines = b"id: " + EMAIL.encode() + b"\n: 4242 4242 4242 4242\nevent: " + EMAIL.encode() + b"\n"
    hostile.answer = events_answer(lines + chunk({"content": "hi"}), DONE)
    status, wire = await gateway.chat({"stream": True})
    assert status == 200 and delta_text(wire, "content") == "hi"
    assert EMAIL not in wire.decode() and "4242 4242 4242 4242" not in wire.decode()


SIDE_STREAMS = [
    (("reasoning_content",), "DeepSeek/vLLM/Qwen reasoning text"),
    (("reasoning",), "OpenRouter's reasoning text"),
    (("audio", "transcript"), "OpenAI's audio transcript"),
    (("function_call", "arguments"), "the legacy function_call arguments"),
]


def nested(path: tuple[str, ...], text: str) -> dict[str, Any]:
    node: dict[str, Any] = {path[-1]: text}
    for step in reversed(path[:-1]):
        node = {step: node}
    return node


@pytest.mark.parametrize("path", [p for p, _ in SIDE_STREAMS], ids=[w for _, w in SIDE_STREAMS])
async def test_text_streamed_in_other_delta_fields_is_redacted_across_events(
    gateway: Gateway, hostile: Hostile, path: tuple[str, ...]
) -> None:
    hostile.answer = events_answer(
        chunk(nested(path, "write to jane.doe")), chunk(nested(path, "@example.com now")), chunk({}, "stop"), DONE
    )
    status, wire = await gateway.chat({"stream": True})
    assert status == 200
    assert EMAIL not in delta_text(wire, *path)


async def test_openrouter_reasoning_details_are_redacted_across_events(gateway: Gateway, hostile: Hostile) -> None:
    # OpenRouter streams its reasoning twice: as `reasoning`, and as `reasoning_details` items
    # (per index) that clients such as the AI SDK's provider join and show. Redacted event by
    # event, the second copy let an address split across chunks through.
    def detail(text: str) -> bytes:
        item = {"type": "reasoning.text", "text": text, "format": "unknown", "index": 0}
        return chunk({"reasoning": text, "reasoning_details": [item]})

    hostile.answer = events_answer(detail("write to jane.doe"), detail("@example.com now"), chunk({}, "stop"), DONE)
    status, wire = await gateway.chat({"stream": True})
    assert status == 200
    items = [
        item
        for body in json_events(wire)
        for choice in body.get("choices") or ()
        for item in (choice.get("delta") or {}).get("reasoning_details") or ()
    ]
    assert "".join(item.get("text") or "" for item in items) == "write to j***e@example.com now"
    assert all(item["type"] == "reasoning.text" and item["index"] == 0 for item in items)  # the held tail's too


async def test_custom_tool_call_input_is_redacted_across_events(gateway: Gateway, hostile: Hostile) -> None:
    # A custom (freeform) tool's call streams its input as `custom.input` deltas per call index
    # (openai-python's accumulator joins them); redacted event by event, a split address passed.
    def call(text: str, **opening: Any) -> bytes:
        return chunk({"tool_calls": [{"index": 0, **opening, "custom": {"input": text}}]})

    hostile.answer = events_answer(
        call("", id="call_1", type="custom"),
        call("SELECT * FROM users WHERE email = 'jane.doe@exa"),
        call("mple.com'"),
        chunk({}, "tool_calls"),
        DONE,
    )
    status, wire = await gateway.chat({"stream": True})
    assert status == 200
    pieces = [
        call.get("custom", {}).get("input") or ""
        for body in json_events(wire)
        for choice in body.get("choices") or ()
        for call in (choice.get("delta") or {}).get("tool_calls") or ()
    ]
    assert "".join(pieces) == "SELECT * FROM users WHERE email = 'j***e@example.com'"


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_legacy_function_call_arguments_stay_json(gateway: Gateway, hostile: Hostile, stream: bool) -> None:
    arguments = '{"card": 4242424242424242}'
    call = {"name": "pay", "arguments": arguments}
    if stream:
        hostile.answer = events_answer(
            chunk({"role": "assistant", "function_call": call}), chunk({}, "function_call"), DONE
        )
    else:
        hostile.answer = json_answer(chat_reply(None, function_call=call))
    status, data = await gateway.chat({"stream": stream})
    assert status == 200
    got = (
        delta_text(data, "function_call", "arguments")
        if stream
        else json.loads(data)["choices"][0]["message"]["function_call"]["arguments"]
    )
    assert json.loads(got) == {"card": "CC_MASKED_LAST4_4242"}


@pytest.mark.parametrize(
    ("arguments", "clear"),
    [('{"to": "jane.doe\\u0040example.com"}', EMAIL), ('{"card": "4242424\\u003242424242"}', "4242424242424242")],
    ids=["escaped-at", "escaped-digits"],
)
async def test_escaped_pii_in_tool_call_arguments_is_redacted(
    gateway: Gateway, hostile: Hostile, arguments: str, clear: str
) -> None:
    call = {"id": "t", "type": "function", "function": {"name": "f", "arguments": arguments}}
    hostile.answer = json_answer(chat_reply(None, tool_calls=[call]))
    status, data = await gateway.chat({})
    assert status == 200
    got = json.loads(data)["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]
    assert clear not in json.dumps(json.loads(got), ensure_ascii=False)


async def test_a_masked_number_in_reply_tool_call_arguments_keeps_them_json(gateway: Gateway, hostile: Hostile) -> None:
    # A JSON reply's tool calls have no "index": their arguments are still JSON text, and a
    # card written as a bare number is masked as a string.
    call = {"id": "t", "type": "function", "function": {"name": "f", "arguments": '{"card": 4242424242424242}'}}
    hostile.answer = json_answer(chat_reply(None, tool_calls=[call]))
    status, data = await gateway.chat({})
    assert status == 200
    got = json.loads(data)["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]
    assert json.loads(got) == {"card": "CC_MASKED_LAST4_4242"}


async def test_past_the_stream_bound_split_pii_is_still_redacted(gateway: Gateway, hostile: Hostile) -> None:
    # SPEC §6 (split PII redacted, whatever the upstream sends): past 256 text streams
    # (relay.py MAX_STREAMS) that all still hold text back (none can be let go), every new one
    # was redacted event by event, so an upstream that first opened 256 indices, each ending in
    # a letter, then split an address across two events got it through. The stream ends there
    # now, with the error event.
    opening = b"".join(chunk({"content": "x"}, index=i) for i in range(1, 257))
    hostile.answer = events_answer(opening, chunk({"content": "to jane.doe"}), chunk({"content": "@example.com"}), DONE)
    status, wire = await gateway.chat({"stream": True})
    assert status == 200
    events = json_events(wire)
    assert EMAIL not in "".join(
        c["delta"].get("content", "") for body in events for c in body.get("choices", []) if c["index"] == 0
    )
    assert events[-1]["error"]["message"] == "upstream sent more than 256 texts at once"


HOSTILE_EVENTS = [
    (b'data: {"choices":[{"index":0,"delta":{"\\u0063ontent":"' + EMAIL.encode() + b'"}}]}\n\n', "escaped-key"),
    (
        b'data: {"choices":[{"index":0,"delta":{"content":"' + EMAIL.encode() + b'","content":"ok"}}]}\n\n',
        "repeated-key",
    ),
    (b'data: {"choices":[{"index":[0],"delta":{"content":"' + EMAIL.encode() + b'"}}]}\n\n', "list-index"),
    (b'data: {"choices":[{"index":0,"delta":{"content":["' + EMAIL.encode() + b'"]}}]}\n\n', "content-list"),
    (b'data: {"choices":{"0":{"delta":{"content":"' + EMAIL.encode() + b'"}}}}\n\n', "choices-object"),
    (b"data: not json " + EMAIL.encode() + b"\n\n", "not-json"),
    (b"data: {" + b'"a":' * 3000 + b"1" + b"}" * 3000 + b"\n\n", "deep"),
    (b"data: " + b"[" * 1000 + b'"' + EMAIL.encode() + b'"' + b"]" * 1000 + b"\n\n", "deep-lists"),
    (b'data: {"choices":[{"index":0,"delta":{"content":"' + EMAIL.encode() + b'"}}]}\r\n\r\n', "crlf"),
    (b'data: {"choices":[{"index":0,"delta":{"content":"jane.doe\\u0040example.com"}}]}\n\n', "escaped-at"),
    (b'data: {"choices":[{"index":0,"delta":{"content":"\\ud800' + EMAIL.encode() + b'"}}]}\n\n', "lone-surrogate"),
    (b'data: {"choices":[{"index":0,"delta":{"content":"\xff' + EMAIL.encode() + b'"}}]}\n\n', "bad-utf8"),
    (
        b'data: {"choices":[{"index":99999999999999999999999,"delta":{"content":"' + EMAIL.encode() + b'"}}]}\n\n',
        "huge-index",
    ),
    (
        b'data: {"choices":[{"index":0,"logprobs":{"content":[{"token":"' + EMAIL.encode() + b'"}]},"delta":{}}]}\n\n',
        "logprobs",
    ),
    (b'data: {"error":{"message":"failed for ' + EMAIL.encode() + b'"}}\n\n', "error-event"),
]


@pytest.mark.parametrize("event", [e for e, _ in HOSTILE_EVENTS], ids=[n for _, n in HOSTILE_EVENTS])
async def test_hostile_events_never_carry_pii_in_clear(gateway: Gateway, hostile: Hostile, event: bytes) -> None:
    hostile.answer = events_answer(chunk({"content": "hi "}), event, chunk({"content": "bye"}, "stop"), DONE)
    status, wire = await gateway.chat({"stream": True})
    assert status == 200
    assert EMAIL not in decoded(wire)
    assert b"HTTP/1.1" not in wire
    assert await gateway.healthy()


async def test_an_event_split_at_every_byte_is_redacted_like_the_whole() -> None:
    wire = (
        chunk({"role": "assistant", "content": ""})
        + chunk({"content": "mail jane.doe@exa"})
        + chunk({"content": "mple.com or 4242 4242 "})
        + chunk({"content": "4242 4242 now"}, "stop")
        + DONE
    )
    wire = wire.replace(b"\n", b"\r\n")
    relay = StreamRelay(REDACTOR, None)
    out = b"".join(relay.feed(wire[i : i + 1]) for i in range(len(wire))) + relay.close()
    assert delta_text(out, "content") == "mail j***e@example.com or CC_MASKED_LAST4_4242 now"
    assert out.endswith(DONE)


async def test_a_stream_without_done_still_flushes_held_text(gateway: Gateway, hostile: Hostile) -> None:
    hostile.answer = events_answer(chunk({"content": "call jane"}), chunk({"content": ".doe@example.com"}))
    status, wire = await gateway.chat({"stream": True})
    assert status == 200 and delta_text(wire, "content") == "call j***e@example.com"


async def test_a_silent_upstream_is_cut_with_an_sse_error(start: GatewayFactory, hostile: Hostile) -> None:
    gateway = await start(STREAM_IDLE_SECS="0.3")
    stall = asyncio.Event()
    hostile.answer = events_answer(chunk({"content": "hello jane"}), stall=stall)
    try:
        async with asyncio.timeout(10):
            status, wire = await gateway.chat({"stream": True})
    finally:
        stall.set()
    assert status == 200
    last = json_events(wire)[-1]
    assert last["error"]["message"] == "upstream idle timeout"
    assert delta_text(wire, "content") == "hello jane"  # held text flushed before the error
    assert await gateway.healthy()


@pytest.mark.serial  # asserts a time: run alone, not beside another worker
async def test_an_upstream_trickling_bytes_into_an_event_it_never_ends_is_cut_as_silent(
    start: GatewayFactory, hostile: Hostile
) -> None:
    # SPEC §5: a byte every 50 ms, none of them ending an event, kept the stream open (and its
    # MAX_CONCURRENCY slot taken) for as long as the upstream cared to go on, the client
    # getting nothing; the idle timeout measured bytes, not events.
    gateway = await start(STREAM_IDLE_SECS="0.3")
    stop = asyncio.Event()

    async def trickle(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(chunk({"content": "hello jane"}) + b'data: {"id":"c1"')
        while not stop.is_set():
            await asyncio.sleep(0.05)
            await response.write(b" ")
        return response

    hostile.answer = trickle
    started = time.monotonic()
    try:
        async with asyncio.timeout(5):
            status, wire = await gateway.chat({"stream": True})
    finally:
        stop.set()
    assert status == 200
    assert json_events(wire)[-1]["error"]["message"] == "upstream idle timeout"
    assert delta_text(wire, "content") == "hello jane"
    assert time.monotonic() - started < 3


async def test_a_client_slower_than_stream_idle_secs_still_gets_the_whole_stream(
    start: GatewayFactory, hostile: Hostile
) -> None:
    # SPEC §5: the idle timeout measures the upstream's silence, not the client's: a client
    # that reads nothing for longer than STREAM_IDLE_SECS, while the gateway's writes wait
    # for it (32 MB: more than the sockets buffer), still gets every event and the end.
    gateway = await start(STREAM_IDLE_SECS="0.3")
    piece = "x" * 8000
    hostile.answer = events_answer(b"".join(chunk({"content": piece}) for _ in range(4000)) + DONE)
    body = json.dumps({"model": "m", "messages": PROMPT, "stream": True})
    headers = {"Content-Type": "application/json", "X-Api-Key": "demo"}
    async with gateway.client.post(CHAT, data=body, headers=headers) as reply:
        first = await reply.content.readany()
        await asyncio.sleep(1.0)  # the slow client: nothing read for three idle timeouts
        wire = first + await reply.read()
    assert not any("error" in event for event in json_events(wire))
    assert wire.endswith(DONE) and len(delta_text(wire, "content")) == 4000 * len(piece)


async def test_an_oversized_first_event_is_a_502(gateway: Gateway, hostile: Hostile) -> None:
    hostile.answer = events_answer(b"data: " + b"a" * (17 * 1024 * 1024))
    status, data = await gateway.chat({"stream": True})
    assert status == 502, data[:200]


async def test_an_oversized_later_event_ends_the_stream_with_an_sse_error(gateway: Gateway, hostile: Hostile) -> None:
    hostile.answer = events_answer(chunk({"content": "hi"}), b"data: " + b"a" * (17 * 1024 * 1024))
    status, wire = await gateway.chat({"stream": True})
    assert status == 200
    assert b"HTTP/1.1" not in wire and "error" in json_events(wire)[-1]
    assert await gateway.healthy()


# --- 5. Hostile JSON replies --------------------------------------------------------------


async def test_a_deeply_nested_json_reply_is_not_a_500(gateway: Gateway, hostile: Hostile) -> None:
    hostile.answer = json_answer(b'{"choices": ' + b"[" * 1000 + b"]" * 1000 + b"}")
    status, data = await gateway.chat({})
    assert status in (200, 502), data


@pytest.mark.parametrize(
    "reply",
    [
        b'{"choices": 5}',
        b'{"choices": [{"index": "0", "message": {"content": 7}}]}',
        b'{"choices": [{"index": 0, "message": {"content": "' + EMAIL.encode() + b'", "content": "ok"}}]}',
        b'{"choices": [{"index": 0, "message": {"\\u0063ontent": "' + EMAIL.encode() + b'"}}]}',
        b'["' + EMAIL.encode() + b'"]',
        b'"' + EMAIL.encode() + b'"',
        b'{"usage": {"prompt_tokens": -5, "completion_tokens": 1e400}, "model": "' + b"x" * 100_000 + b'"}',
        b'{"a": 123456789012345678901234567890, "b": "' + EMAIL.encode() + b'"}',
        b'{"a": "\\ud800 ' + EMAIL.encode() + b'"}',
    ],
    ids=[
        "choices-int",
        "wrong-types",
        "repeated",
        "escaped-key",
        "array",
        "string",
        "odd-usage",
        "bigint",
        "lone-surrogate",
    ],
)
async def test_odd_json_replies_are_relayed_redacted_or_502(gateway: Gateway, hostile: Hostile, reply: bytes) -> None:
    hostile.answer = json_answer(reply)
    status, data = await gateway.chat({})
    assert status in (200, 502), data
    if status == 200:
        assert EMAIL not in decoded(b"data: " + data + b"\n\n")
    assert await gateway.healthy()


@pytest.mark.parametrize("route", ["chat", "messages"])
async def test_pii_in_reply_object_keys_is_redacted(gateway: Gateway, hostile: Hostile, route: str) -> None:
    if route == "chat":
        hostile.answer = json_answer({**chat_reply("hi"), "extra": {EMAIL: 1}})
        status, data = await gateway.chat({})
    else:
        block = {"type": "tool_use", "id": "toolu_1", "name": "invite", "input": {"guests": {EMAIL: "Jane"}}}
        hostile.answer = json_answer({"type": "message", "role": "assistant", "content": [block]})
        status, data = await gateway.messages({"messages": [{"role": "user", "content": "hi"}]})
    assert status == 200
    assert EMAIL not in data.decode()


# --- 6. Anthropic events (SPEC §11) ---------------------------------------------------------


def text_delta(text: str, index: int = 0, **extra: object) -> bytes:
    return anthropic_ev(
        {"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": text, **extra}}
    )


async def test_anthropic_thinking_passes_and_text_is_redacted(gateway: Gateway, hostile: Hostile) -> None:
    thinking = anthropic_ev(
        {"type": "content_block_start", "index": 0, "content_block": {"type": "thinking", "thinking": ""}}
    )
    thinking += anthropic_ev(
        {"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": f"user is {EMAIL}"}}
    )
    thinking += anthropic_ev(
        {
            "type": "content_block_delta",
            "index": 0,
            "delta": {"type": "signature_delta", "signature": "Eq4242424242424242=="},
        }
    )
    thinking += anthropic_ev({"type": "content_block_stop", "index": 0})
    text = anthropic_ev({"type": "content_block_start", "index": 1, "content_block": {"type": "text", "text": ""}})
    text += (
        text_delta("mail jane.doe@exa", 1)
        + text_delta("mple.com", 1)
        + anthropic_ev({"type": "content_block_stop", "index": 1})
    )
    hostile.answer = events_answer(ANTHROPIC_START, thinking, text, ANTHROPIC_END)
    status, wire = await gateway.messages({"messages": [{"role": "user", "content": "hi"}], "stream": True})
    assert status == 200
    assert thinking in wire  # byte for byte: its signature covers it
    assert (
        "".join(b["delta"].get("text", "") for b in json_events(wire) if b["type"] == "content_block_delta")
        == "mail j***e@example.com"
    )
    names = [e.raw.split(b"\n", 1)[0] for e in events_of(wire)]
    assert names[-1] == b"event: message_stop"


async def test_anthropic_text_begun_in_content_block_start_is_redacted_with_its_deltas() -> None:
    relay = StreamRelay(REDACTOR, None, MESSAGES)
    start = anthropic_ev(
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": "to jane.doe"}}
    )
    wire = (
        ANTHROPIC_START
        + start
        + text_delta("@example.com")
        + anthropic_ev({"type": "content_block_stop", "index": 0})
        + ANTHROPIC_END
    )
    out = relay.feed(wire) + relay.close()
    text = "".join(
        b.get("content_block", {}).get("text", "") + b.get("delta", {}).get("text", "")
        for b in json_events(out)
        if b["type"] in ("content_block_start", "content_block_delta")
    )
    assert EMAIL not in text


async def test_anthropic_keep_fields_on_a_text_delta_are_not_a_side_channel() -> None:
    relay = StreamRelay(REDACTOR, None, MESSAGES)
    wire = ANTHROPIC_START + text_delta("hi", data=EMAIL) + ANTHROPIC_END
    assert EMAIL not in decoded(relay.feed(wire) + relay.close())
    # ... nor on a text block's start
    start = anthropic_ev(
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": "", "signature": EMAIL}}
    )
    relay = StreamRelay(REDACTOR, None, MESSAGES)
    assert EMAIL not in decoded(relay.feed(ANTHROPIC_START + start + ANTHROPIC_END) + relay.close())


async def test_anthropic_keep_fields_on_a_text_block_of_a_reply_are_not_a_side_channel(
    gateway: Gateway, hostile: Hostile
) -> None:
    # SPEC §11: a thinking block passes as it came (its signature covers it); the same fields
    # on a text block are text like any other.
    thinking = {"type": "thinking", "thinking": f"user is {EMAIL}", "signature": "Eq4242424242424242=="}
    text = {"type": "text", "text": "hi", "signature": EMAIL, "data": EMAIL}
    hostile.answer = json_answer({"type": "message", "role": "assistant", "content": [thinking, text]})
    status, data = await gateway.messages({"messages": [{"role": "user", "content": "hi"}]})
    assert status == 200
    content = json.loads(data)["content"]
    assert content[0] == thinking
    assert EMAIL not in json.dumps(content[1]) and content[1]["text"] == "hi"


async def test_anthropic_tool_input_stays_json_when_masked_across_deltas(gateway: Gateway, hostile: Hostile) -> None:
    start = anthropic_ev(
        {
            "type": "content_block_start",
            "index": 0,
            "content_block": {"type": "tool_use", "id": "t", "name": "f", "input": {}},
        }
    )
    pieces = ['{"n": 42424242', '42424242, "s": "jane', '.doe@example.com\\"x", "p": [415', "]}"]
    deltas = b"".join(
        anthropic_ev(
            {"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta", "partial_json": p}}
        )
        for p in pieces
    )
    hostile.answer = events_answer(
        ANTHROPIC_START, start, deltas, anthropic_ev({"type": "content_block_stop", "index": 0}), ANTHROPIC_END
    )
    status, wire = await gateway.messages({"messages": [{"role": "user", "content": "hi"}], "stream": True})
    assert status == 200
    arguments = "".join(
        b["delta"].get("partial_json", "") for b in json_events(wire) if b["type"] == "content_block_delta"
    )
    assert json.loads(arguments) == {"n": "CC_MASKED_LAST4_4242", "s": 'j***e@example.com"x', "p": [415]}


async def test_anthropic_tool_input_card_as_a_bare_number_is_masked_both_ways(
    gateway: Gateway, hostile: Hostile
) -> None:
    # SPEC §11: tool_use input is redacted like chat's tool-call arguments, where a card
    # written as a bare number is masked (a quoted mask); the stream masked it in
    # partial_json, the JSON reply and the request passed it as it came (a black-box review).
    # As in JSON text (test_redact.expected_json), a negative number is no card number.
    tool_input = {"n": 4242424242424242, "m": [-4242424242424242, 1796559500, 4242424242424241], "s": "x"}
    block = {"type": "tool_use", "id": "t", "name": "f", "input": tool_input}
    masked = {"n": "CC_MASKED_LAST4_4242", "m": [-4242424242424242, 1796559500, 4242424242424241], "s": "x"}
    hostile.answer = json_answer({"type": "message", "role": "assistant", "content": [block]})
    turn = [{"role": "assistant", "content": [block]}, {"role": "user", "content": "ok"}]
    status, data = await gateway.messages({"messages": turn})
    assert status == 200
    assert json.loads(data)["content"][0]["input"] == masked
    assert hostile.sent()["messages"][0]["content"][0]["input"] == masked
    # ... and whole in a stream's content_block_start, or as a text delta's "text"
    start = anthropic_ev({"type": "content_block_start", "index": 0, "content_block": block})
    number_text = anthropic_ev(
        {"type": "content_block_delta", "index": 1, "delta": {"type": "text_delta", "text": 4242424242424242}}
    )
    hostile.answer = events_answer(ANTHROPIC_START, start, number_text, ANTHROPIC_END)
    status, wire = await gateway.messages({"messages": [{"role": "user", "content": "hi"}], "stream": True})
    assert status == 200
    start_out, delta_out = (e for e in json_events(wire) if e["type"] in ("content_block_start", "content_block_delta"))
    assert start_out["content_block"]["input"] == masked and delta_out["delta"]["text"] == "CC_MASKED_LAST4_4242"


async def test_anthropic_pii_whole_in_a_content_block_start_is_redacted() -> None:
    relay = StreamRelay(REDACTOR, None, MESSAGES)
    start = anthropic_ev(
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": f"to {EMAIL}"}}
    )
    wire = ANTHROPIC_START + start + anthropic_ev({"type": "content_block_stop", "index": 0}) + ANTHROPIC_END
    out = relay.feed(wire) + relay.close()
    assert EMAIL not in decoded(out) and "j***e@example.com" in out.decode()


JSON_ARGUMENTS = [
    '{"n": 4242424242424242, "e": "jane.doe@example.com", "p": "+1 415 555 2671"}',
    "[4242424242424242,5555555555554444]",
    '{"s": "a\\"4242424242424242\\"b", "t": "x\\\\4242424242424242"}',
    '{"k": "\\n4242 4242 4242 4242\\t", "m": "\\u00e9jane.doe@example.com"}',
    '{"iban": "DE89 3704 0044 0532 0130 00", "ssn": "078-05-1120", "x": 1e+4242424242424242}',
]


def chat_arguments(pieces: list[str]) -> str:
    relay = StreamRelay(REDACTOR, None)
    calls = [chunk({"tool_calls": [{"index": 0, "function": {"arguments": p}}]}) for p in pieces]
    out = relay.feed(b"".join(calls) + chunk({}, "tool_calls") + DONE) + relay.close()
    return "".join(
        call["function"].get("arguments", "")
        for body in json_events(out)
        for choice in body["choices"]
        for call in choice["delta"].get("tool_calls", [])
    )


def anthropic_arguments(pieces: list[str]) -> str:
    relay = StreamRelay(REDACTOR, None, MESSAGES)
    deltas = b"".join(
        anthropic_ev(
            {"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta", "partial_json": p}}
        )
        for p in pieces
    )
    out = relay.feed(
        ANTHROPIC_START + deltas + anthropic_ev({"type": "content_block_stop", "index": 0}) + ANTHROPIC_END
    )
    out += relay.close()
    return "".join(b["delta"].get("partial_json", "") for b in json_events(out) if b["type"] == "content_block_delta")


@pytest.mark.parametrize("document", JSON_ARGUMENTS)
def test_streamed_json_arguments_split_anywhere_stay_json_and_masked(document: str) -> None:
    whole = REDACTOR.redact(document, json_text=True)
    parsed = json.loads(whole)
    assert not any(
        v in json.dumps(parsed, ensure_ascii=False) for v in (EMAIL, "4242424242424242", "415 555 2671", "078-05-1120")
    )
    for cut in range(len(document) + 1):
        pieces = [document[:cut], document[cut:]]
        assert chat_arguments(pieces) == whole, cut
        assert anthropic_arguments(pieces) == whole, cut


# --- 7. Upstream credentials and redirects (SPEC §5: the operator's key goes to its upstream only) --


@pytest.mark.parametrize("route", ["chat", "messages"])
async def test_an_upstream_redirect_never_carries_the_key_elsewhere(
    gateway: Gateway, hostile: Hostile, aiohttp_server: AiohttpServer, route: str
) -> None:
    elsewhere = Hostile()
    app = web.Application()
    app.router.add_route("POST", "/{path:.*}", elsewhere.handle)
    server = await aiohttp_server(app)
    target = str(server.make_url("/v1/x")).replace("127.0.0.1", "localhost")  # another origin

    async def redirect(request: web.Request) -> web.StreamResponse:
        raise web.HTTPTemporaryRedirect(target)

    hostile.answer = redirect
    if route == "chat":
        await gateway.chat({"messages": [{"role": "user", "content": "hi"}]})
    else:
        await gateway.messages({"messages": [{"role": "user", "content": "hi"}]})
    for seen in elsewhere.seen:
        headers = "\n".join(f"{k}: {v}" for k, v in seen.headers.items())
        assert UPSTREAM_KEY not in headers and ANTHROPIC_KEY not in headers
    assert not elsewhere.seen, "the gateway followed the upstream's redirect"


# --- 8. After every failure the gateway still serves; secrets stay out of what it writes --------


async def test_secrets_stay_out_of_logs_and_error_bodies(
    gateway: Gateway, hostile: Hostile, caplog: pytest.LogCaptureFixture
) -> None:
    bodies = []
    for answer in (
        json_answer({"error": {"message": "bad key"}}, 401),
        json_answer(b"<html>", 500),
        events_answer(b"x" * 10),
    ):
        hostile.answer = answer
        bodies.append((await gateway.chat({}))[1])
        bodies.append((await gateway.chat({"stream": True}))[1])
    gateway.app[keys.TELEMETRY].log.flush()
    text = b"\n".join(bodies).decode() + gateway.log.getvalue().decode() + caplog.text
    async with gateway.client.get("/metrics") as r:
        text += await r.text()
    assert UPSTREAM_KEY not in text and ANTHROPIC_KEY not in text
    assert await gateway.healthy()


# --- 9. One long event: the gateway keeps serving (SPEC §6: /healthz within 100 ms) --------------

MIB = 1024 * 1024


@contextlib.contextmanager
def healthz_watch(gateway: Gateway) -> Iterator[list[float]]:
    """/healthz asked every ~20 ms from a thread of its own (the loop's clock does not see its
    own stalls) while the block runs: each answer's latency in seconds (one still waiting
    when the block ends counts too)."""
    url = str(gateway.client.make_url("/healthz"))
    latencies: list[float] = []
    stop = threading.Event()
    asked = time.perf_counter()

    def watch() -> None:
        nonlocal asked
        while not stop.is_set():
            asked = time.perf_counter()
            with urllib.request.urlopen(url, timeout=30) as r:
                assert r.status == 200
            latencies.append(time.perf_counter() - asked)
            asked = 0.0
            stop.wait(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield latencies
    finally:
        if asked:
            latencies.append(time.perf_counter() - asked)
        stop.set()


@pytest.mark.serial  # asserts a time: run alone, not beside another worker
@pytest.mark.parametrize(("stream", "size"), [(True, 4 * MIB), (False, MIB)], ids=["stream", "json-answered-as-events"])
async def test_one_long_event_leaves_healthz_answering(
    gateway: Gateway, hostile: Hostile, stream: bool, size: int
) -> None:
    # One chunk of megabytes of card-like digits (each group a candidate, none Luhn-valid):
    # scanning it takes seconds, and was done on the event loop (a black-box review saw
    # /healthz wait 5.3 s for 4 MiB, over 10 s for 15 MiB). Non-stream: an upstream that
    # answers with events anyway. The event is relayed in a worker thread, in slices.
    text = "4242 4242 4242 4241 " * (size // 20)
    hostile.answer = events_answer(chunk({"role": "assistant", "content": ""}), chunk({"content": text}), DONE)
    with healthz_watch(gateway) as latencies:
        status, wire = await gateway.chat({"stream": stream})
    print(f"\n{size // MIB} MiB event, /healthz worst {max(latencies) * 1000:.0f} ms of {len(latencies)}")
    assert status == 200
    # Non-stream: the events go out as the one completion the client asked for (SPEC §3).
    content = delta_text(wire, "content") if stream else json.loads(wire)["choices"][0]["message"]["content"]
    assert content == text
    assert max(latencies) < 0.25  # SPEC's 100 ms, with room for a loaded machine


def sliced_answer(data: bytes) -> Answer:
    """`data` as one JSON reply, written a MiB at a time: the upstream's own writing (in the
    same loop as the gateway here, in another process in use) holds the loop no longer."""

    async def answer(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.content_length = len(data)
        await response.prepare(request)
        view = memoryview(data)
        for at in range(0, len(data), MIB):
            await response.write(view[at : at + MIB])
        await response.write_eof()
        return response

    return answer


def huge_reply(path: str, size: int) -> bytes:
    """A valid reply of `path`'s API whose one text is `size` bytes of prose."""
    text = "The quick brown fox jumps over the lazy dog. " * (size // 45)
    if path == MESSAGES_PATH:
        body: dict[str, Any] = {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude"}
        body["content"] = [{"type": "text", "text": text}]
    elif path == "/v1/responses":
        body = {"id": "resp_1", "object": "response", "status": "completed", "model": "m"}
        body["output"] = [{"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": text}]}]
    else:
        body = chat_reply(text)
    return json.dumps(body).encode()


@pytest.mark.serial  # asserts a time: run alone, not beside another worker
@pytest.mark.parametrize("path", [CHAT, MESSAGES_PATH, "/v1/responses"])
async def test_a_huge_json_reply_is_refused_and_leaves_healthz_answering(
    gateway: Gateway, hostile: Hostile, path: str
) -> None:
    # A hostile or broken upstream answers a non-stream request with 100 MiB of plain JSON
    # (under the 256 MiB of any reply): joining, counting, parsing and writing it held the
    # loop 0.2-0.3 s at a time (/healthz 295-378 ms). No chat, messages or responses reply is
    # that large: past MAX_ANSWER_BYTES it is an upstream error, in the route's error shape.
    hostile.answer = sliced_answer(huge_reply(path, 100 * MIB))
    body = {"model": "claude" if path == MESSAGES_PATH else "m", "max_tokens": 10, "messages": PROMPT}
    with healthz_watch(gateway) as latencies:
        status, wire = await gateway.post(path, body | ({"input": "hi"} if path == "/v1/responses" else {}))
    print(f"\n100 MiB reply on {path}: {status}, /healthz worst {max(latencies) * 1000:.0f} ms of {len(latencies)}")
    assert status == 502
    error = json.loads(wire)
    if path == MESSAGES_PATH:
        assert error["type"] == "error" and error["error"]["type"] == "api_error"
    else:
        assert error["error"]["type"] == "upstream_error"
    assert error["error"]["message"] == "upstream reply too large"
    assert max(latencies) < 0.25  # SPEC's 100 ms, with room for a loaded machine
    assert await gateway.healthy()


async def test_an_embeddings_reply_past_the_answer_limit_still_passes(gateway: Gateway, hostile: Hostile) -> None:
    # Embeddings keep the 256 MiB limit: a 2048-input batch of 3072 floats is tens of MiB.
    vector = [-0.0123456789] * 3072
    data = [{"object": "embedding", "index": i, "embedding": vector} for i in range(2048)]
    reply = {"object": "list", "data": data, "model": "e", "usage": {"prompt_tokens": 1, "total_tokens": 1}}
    raw = json.dumps(reply).encode()
    assert len(raw) > 64 * MIB  # past MAX_ANSWER_BYTES
    hostile.answer = sliced_answer(raw)
    status, wire = await gateway.post("/v1/embeddings", {"model": "e", "input": ["x"] * 2048})
    assert status == 200
    assert len(json.loads(wire)["data"]) == 2048


async def test_a_small_json_reply_to_a_chat_stream_is_not_written_as_gigabytes(
    gateway: Gateway, hostile: Hostile
) -> None:
    # A chat stream answered with one JSON reply is written as the chunks OpenAI would have
    # sent, each repeating the reply's `model`: 0.13 MiB with a 128 KiB model and 1500 empty
    # choices became 375 MiB for the client (/healthz held 1.5 s, +1.1 GiB), so the answer
    # limit that bounds the reply read whole did not bound what was made of it.
    reply = {"id": "c1", "object": "chat.completion", "model": "m" * (128 * 1024), "choices": [{}] * 300}
    hostile.answer = json_answer(reply)  # ~38 KiB, as chunks ~75 MiB
    status, wire = await gateway.chat({"stream": True})
    assert status == 502, len(wire)
    assert json.loads(wire)["error"]["message"] == "upstream reply too large"
    # A usual one passes as before.
    hostile.answer = json_answer(chat_reply("pong"))
    status, wire = await gateway.chat({"stream": True})
    assert status == 200
    assert delta_text(wire, "content") == "pong"


async def response_redactions(gateway: Gateway) -> float:
    """redactions_total{direction="response"} as /metrics reports it (one kind at a time here)."""
    async with gateway.client.get("/metrics") as m:
        for family in text_string_to_metric_families(await m.text()):
            for sample in family.samples:
                if sample.name == "redactions_total" and sample.labels.get("direction") == "response":
                    return sample.value
    return 0.0


async def test_a_long_json_reply_is_masked_and_counted_mask_by_mask(gateway: Gateway, hostile: Hostile) -> None:
    # Over 16 KiB, a reply is redacted in a worker thread; its masks are counted on the loop
    # after it, by kind.
    addresses = 2_000
    text = "write to jane.doe@example.com " * addresses
    reply = {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]}
    hostile.answer = json_answer(reply)
    status, data = await gateway.chat({})
    assert status == 200
    assert json.loads(data)["choices"][0]["message"]["content"] == "write to j***e@example.com " * addresses
    assert await response_redactions(gateway) == addresses


async def test_a_client_gone_while_a_long_event_is_relayed_aside(
    gateway: Gateway, hostile: Hostile, caplog: pytest.LogCaptureFixture
) -> None:
    # A client that hangs up cancels its handler (aiohttp's test server, as server.py's): here
    # while its worker thread has the relay. The thread finishes on its own, nothing is
    # logged as an error, and its masks are still counted.
    cards = 100_000
    text = "4242 4242 4242 4242 " * cards
    hostile.answer = events_answer(chunk({"role": "assistant", "content": ""}), chunk({"content": text}), DONE)
    body = {"model": "m", "messages": PROMPT, "stream": True}
    async with gateway.client.post(CHAT, json=body, headers={"X-Api-Key": "demo"}) as r:
        assert r.status == 200
        assert (await r.content.readuntil(b"\n\n")).startswith(b"data: ")
        await asyncio.sleep(0.2)  # the long event is being redacted now
        r.close()

    async with asyncio.timeout(30):
        while await response_redactions(gateway) < cards:
            await asyncio.sleep(0.05)
    assert await response_redactions(gateway) == cards
    await asyncio.sleep(0.1)
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert await gateway.healthy()


# --- The operator's key echoed by an upstream that reports errors outside an error status ---------


async def test_an_error_that_echoes_the_request_never_hands_the_client_the_operators_key(
    gateway: Gateway, hostile: Hostile
) -> None:
    # A debugging proxy or a misbehaving upstream quoting the request it got, in an error event
    # mid-stream, in a stream that opens with one, or in a 200 reply that is an error: the
    # client (any tenant) read the operator's key. An error status's body was masked already.
    said = f"Incorrect API key: Bearer {UPSTREAM_KEY}"
    claude_said = f"x-api-key {ANTHROPIC_KEY}"
    start = anthropic_ev(
        {"type": "message_start", "message": {"id": "m", "role": "assistant", "content": [], "usage": {}}}
    )
    cases = [
        (CHAT, True, events_answer(chunk({"content": "a"}), ev({"error": {"message": said}}))),
        (CHAT, True, events_answer(ev({"error": {"message": said}}))),
        (CHAT, False, json_answer({"error": {"message": said}})),
        ("/v1/embeddings", False, json_answer({"error": {"message": said}})),
        (MESSAGES_PATH, True, events_answer(start, anthropic_ev({"type": "error", "error": {"message": claude_said}}))),
    ]
    for path, stream, answer in cases:
        hostile.answer = answer
        body: dict[str, Any] = {"model": "m", "messages": PROMPT, "input": "x", "max_tokens": 5, "stream": stream}
        status, data = await gateway.post(path, body)
        # An error object alone under a 200 goes out with the status it stands for (SPEC §13).
        assert status == (200 if stream else 502), (path, data)
        assert b"upstream-secret" not in data, (path, data)
        assert b"***" in data, (path, data)  # the error itself still reaches the client
    hostile.answer = json_answer({"object": "list", "data": [], "error": {"message": said}})
    async with gateway.client.get("/v1/models", headers={"X-Api-Key": "demo"}) as r:
        data = await r.read()
    assert r.status == 200 and b"upstream-secret" not in data and b"***" in data, data


async def test_a_token_count_no_reply_could_hold_is_not_counted(gateway: Gateway, hostile: Hostile) -> None:
    # One reply saying 2**63 tokens made tokens_total a float64 that the next requests' few
    # tokens no longer moved (and its span failed OTLP's int64, a traceback on stderr each).
    huge = 2**63
    claude = {
        "id": "m",
        "type": "message",
        "role": "assistant",
        "model": "c",
        "content": [{"type": "text", "text": "hi"}],
    }
    for path, usage, body in [
        (CHAT, {"prompt_tokens": 3, "completion_tokens": huge}, {"model": "huge-chat"}),
        (MESSAGES_PATH, {"input_tokens": huge, "output_tokens": 2}, {"model": "huge-claude"}),
        ("/v1/embeddings", {"prompt_tokens": huge, "total_tokens": huge}, {"model": "huge-embed", "input": "x"}),
    ]:
        reply = {**(claude if path == MESSAGES_PATH else chat_reply("hi")), "usage": usage}
        hostile.answer = json_answer(reply)
        status, _ = await gateway.post(path, {"messages": PROMPT, "max_tokens": 5, **body})
        assert status == 200
    async with gateway.client.get("/metrics") as r:
        text = await r.text()
    assert "huge-" not in "".join(line for line in text.splitlines() if line.startswith("tokens_total")), text
    assert str(huge) not in text


async def test_a_200_reply_whose_error_echoes_the_key_still_has_its_answer_redacted(
    gateway: Gateway, hostile: Hostile
) -> None:
    # A 200 reply with both an answer and an "error" (a Responses reply that failed part-way
    # carries both) quoting the request's headers: masking the key returned the body as it
    # came, past redaction, and the answer's address reached the client in clear.
    said = f"Incorrect API key: Bearer {UPSTREAM_KEY}"
    hostile.answer = json_answer({**chat_reply(f"mail {EMAIL}"), "error": {"message": said}})
    status, data = await gateway.post(CHAT, {"model": "m", "messages": PROMPT})
    assert status == 200, data
    assert b"upstream-secret" not in data and b"***" in data, data
    assert EMAIL.encode() not in data and b"j***e@example.com" in data, data


async def test_an_error_event_in_events_answering_a_whole_request_never_carries_the_key(
    gateway: Gateway, hostile: Hostile
) -> None:
    # A request without "stream" that an upstream answers with events anyway (its error, after
    # the answer began, a 502 in JSON): an error event quoting the request's headers reached
    # the client with the operator's key, where the same event in a stream has it masked.
    said = f"Incorrect API key: Bearer {UPSTREAM_KEY}"
    hostile.answer = events_answer(chunk({"content": "a"}), ev({"error": {"message": said}}))
    status, data = await gateway.chat({"stream": False})
    assert status == 502, data
    assert b"upstream-secret" not in data and b"***" in data, data


# --- A body that ends cleanly in the middle of an event ------------------------------------------


def responses_ev(body: dict[str, Any]) -> bytes:
    return f"event: {body['type']}\n".encode() + ev(body)


CUT_STREAMS = {
    CHAT: (
        {"model": "m", "messages": PROMPT},
        chunk({"content": "Hi "}) + chunk({"content": f"mail {EMAIL} ok"}),
    ),
    MESSAGES_PATH: (
        {"model": "claude", "max_tokens": 10, "messages": PROMPT},
        ANTHROPIC_START
        + anthropic_ev({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})
        + anthropic_ev({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi "}})
        + anthropic_ev(
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": f"mail {EMAIL}"}}
        ),
    ),
    "/v1/responses": (
        {"model": "m", "input": "hi"},
        responses_ev({"type": "response.created", "sequence_number": 0, "response": {"id": "r", "output": []}})
        + responses_ev(
            {
                "type": "response.output_text.delta",
                "sequence_number": 1,
                "output_index": 0,
                "content_index": 0,
                "delta": "Hi ",
            }
        )
        + responses_ev(
            {
                "type": "response.output_text.delta",
                "sequence_number": 2,
                "output_index": 0,
                "content_index": 0,
                "delta": f"mail {EMAIL}",
            }
        ),
    ),
}


CUTS = {"in-json": ("@example", 8), "after-data": ("data: ", 6), "after-name": ("\ndata: ", 1)}


def _cuts_inside_an_event() -> list[Any]:
    """Each stream cut at each place that falls inside an event (a chat stream names no event,
    so its cut after a name would fall between two events: not this test's case)."""
    cases = []
    for path, (_, wire) in CUT_STREAMS.items():
        for name, (cut, kept) in CUTS.items():
            if not wire[: wire.rfind(cut.encode()) + kept].endswith(b"\n\n"):
                cases.append(pytest.param(path, cut, kept, id=f"{name}-{path}"))
    return cases


@pytest.mark.parametrize(("path", "cut", "kept"), _cuts_inside_an_event())
async def test_a_body_that_ends_in_the_middle_of_an_event_ends_the_stream_with_an_error_event(
    gateway: Gateway, hostile: Hostile, path: str, cut: str, kept: int
) -> None:
    # An upstream (or a proxy before it) whose body ends cleanly part-way through an event: a
    # close-delimited HTTP/1.x body cut by a crash, a chunked one terminated early. The SSE
    # spec (and every SDK) drops an event that never got its blank line; the gateway relayed it
    # as a whole event, so the SDKs raised json.JSONDecodeError on its truncated JSON (chat:
    # with no error event at all; messages and responses: before their error event).
    body, wire = CUT_STREAMS[path]
    sent = wire[: wire.rfind(cut.encode()) + kept]
    hostile.answer = events_answer(sent)
    status, out = await gateway.post(path, {**body, "stream": True})
    assert status == 200
    events = events_of(out)
    for event in events:  # every event an SDK reads as JSON
        assert event.data is None or event.data == sse.DONE or json.loads(event.data) is not None, out
        assert event.data is not None or sse.event_name(event.raw) is None, out
    assert events[-1].data is not None and b"upstream stream ended unexpectedly" in events[-1].data, out
    assert await gateway.healthy()
