"""Review of SPEC §13/§14 together: token budgets settled from a routed upstream's usage, on a
chat request translated to an Anthropic upstream as on /v1/messages (the gateway in process, in
front of a hostile upstream: tests/test_adversarial.py's fixtures)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.test_adversarial import (  # noqa: F401  (fixtures)
    ANTHROPIC_START,
    GatewayFactory,
    Hostile,
    anthropic_ev,
    events_answer,
    hostile,
    json_answer,
    start,
)
from tests.test_side_channels import ROUTES  # claude-* → an Anthropic upstream

TEXT = anthropic_ev({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})
TEXT += anthropic_ev({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi. "}})
TEXT += anthropic_ev({"type": "content_block_stop", "index": 0})
# message_delta's usage is the reply's last word: input 3 (message_start) + output 5.
FINAL = anthropic_ev({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 5}})
MESSAGE = {
    "id": "msg_2",
    "type": "message",
    "role": "assistant",
    "model": "claude",
    "content": [{"type": "text", "text": "ok"}],
    "stop_reason": "end_turn",
    "usage": {"input_tokens": 1, "output_tokens": 1},
}


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages"])
async def test_a_stream_cut_after_its_final_usage_is_settled_to_it_on_every_surface(
    start: GatewayFactory,  # noqa: F811
    hostile: Hostile,  # noqa: F811
    tmp_path: Path,
    path: str,
) -> None:
    """SPEC §14: "When the reply's usage is known the reservation is settled to it". Anthropic's
    message_delta carries the final counts; the upstream then ends before message_stop. On
    /v1/messages the reservation settled to the 8 tokens used, but a chat request translated to
    the same upstream kept its whole estimate (1001): the usage chunk the translation makes comes
    only at message_stop, and the usage it had read was dropped."""
    routes = tmp_path / "routes.toml"
    routes.write_text(ROUTES.format(url=hostile.url))
    gw = await start(ROUTES_FILE=str(routes), TOKEN_QUOTA="10000", TOKEN_RESERVE_DEFAULT="1000")
    hostile.answer = events_answer(ANTHROPIC_START + TEXT + FINAL)  # no message_stop: cut short
    body = {"model": "claude-x", "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 1000}
    async with gw.client.post(path, json=body, headers={"Authorization": "Bearer t"}) as response:
        assert response.status == 200
        assert response.headers["x-ratelimit-remaining-tokens"] == str(10000 - 1001)
        assert b"error" in await response.read()  # the stream said it was cut short
    hostile.answer = json_answer(MESSAGE)
    body = {"model": "claude-x", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1000}
    async with gw.client.post(path, json=body, headers={"Authorization": "Bearer t"}) as response:
        assert response.status == 200
        # 3 + 5 used by the first, 1001 held for this one.
        assert response.headers["x-ratelimit-remaining-tokens"] == str(10000 - 8 - 1001)


TWO = """
[upstreams.a]
kind = "openai"
base_url = "{url}/a"
api_key_env = "OPENAI_API_KEY"

[upstreams.b]
kind = "openai"
base_url = "{url}/b"
api_key_env = "OPENAI_API_KEY"

[[models]]
match = "m"
upstreams = [{{ upstream = "a" }}, {{ upstream = "b" }}]
"""


@pytest.mark.parametrize(
    "broken",
    [
        (b"<html><body>502 Bad Gateway</body></html>", "text/html"),
        (b"", "application/json"),
        (b"upstream connect error or disconnect/reset before headers", "text/plain"),
    ],
    ids=["html", "empty", "text"],
)
async def test_a_2xx_body_that_is_no_reply_falls_back_and_counts_as_a_failure(
    start: GatewayFactory,  # noqa: F811
    hostile: Hostile,  # noqa: F811
    tmp_path: Path,
    broken: tuple[bytes, str],
) -> None:
    """SPEC §13: a non-stream reply whose body breaks before anything was sent may fall back.
    A 200 whose body is no reply at all (a proxy's HTML page, nothing) was answered as the
    gateway's own 502 "not JSON", the next upstream never tried, and it counted as a success
    for the breaker, which never opened however often it came (CB_FAILURES=2, four requests: four
    502s). A chat request translated to an Anthropic upstream already falls back on it."""
    from aiohttp import web

    body, content_type = broken
    routes = tmp_path / "routes.toml"
    routes.write_text(TWO.format(url=hostile.url))
    gw = await start(ROUTES_FILE=str(routes), CB_FAILURES="2", CB_OPEN_SECS="30")
    reply = {
        "id": "c",
        "object": "chat.completion",
        "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "from b"}, "finish_reason": "stop"}],
    }

    async def answer(request: web.Request) -> web.StreamResponse:
        if request.path.startswith("/a/"):
            return web.Response(body=body, status=200, content_type=content_type)
        return web.json_response(reply)

    hostile.answer = answer
    for _ in range(4):
        async with gw.client.post(
            "/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        ) as response:
            assert response.status == 200, await response.text()
            assert response.headers["x-gateway-upstream"] == "b"
            assert (await response.json())["choices"][0]["message"]["content"] == "from b"
    assert [seen.path.split("/")[1] for seen in hostile.seen] == ["a", "b", "a", "b", "b", "b"]  # a opened after 2


TWO_CLAUDES = """
[upstreams.c1]
kind = "anthropic"
base_url = "{url}/c1"
api_key_env = "ANTHROPIC_API_KEY"

[upstreams.c2]
kind = "anthropic"
base_url = "{url}/c2"
api_key_env = "ANTHROPIC_API_KEY"

[[models]]
match = "claude-*"
upstreams = [{{ upstream = "c1" }}, {{ upstream = "c2" }}]
"""
OVERLOADED = anthropic_ev({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
PING = anthropic_ev({"type": "ping"})
STOP = anthropic_ev({"type": "message_stop"})


@pytest.mark.parametrize("pause", [0.0, 0.05], ids=["one-read", "two-reads"])
async def test_messages_overloaded_right_after_message_start_falls_back(
    start: GatewayFactory,  # noqa: F811
    hostile: Hostile,  # noqa: F811
    tmp_path: Path,
    pause: float,
) -> None:
    """SPEC §13: an overloaded upstream (529, Anthropic's overloaded_error) sends the request to
    the next one while nothing has reached the client. Anthropic's stream reports it after
    message_start: a chat request translated to it held its role chunk for the answer's first
    event and fell back, but /v1/messages sent message_start on at once, so the client got the
    error although another upstream was there, and the breaker counted each such answer as a
    success (CB_FAILURES=2: four requests, four errors, c2 never asked, c1 never opened)."""
    import asyncio

    from aiohttp import web

    routes = tmp_path / "routes.toml"
    routes.write_text(TWO_CLAUDES.format(url=hostile.url))
    gw = await start(ROUTES_FILE=str(routes), CB_FAILURES="2", CB_OPEN_SECS="30")

    async def answer(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(ANTHROPIC_START)
        if request.path.startswith("/c1/"):
            await asyncio.sleep(pause)
            await response.write(PING + OVERLOADED)
        else:
            await response.write(TEXT + FINAL + STOP)
        await response.write_eof()
        return response

    hostile.answer = answer
    body = {"model": "claude-x", "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 10}
    for _ in range(4):
        async with gw.client.post("/v1/messages", json=body) as response:
            data = await response.read()
            assert response.headers["x-gateway-upstream"] == "c2", data
            assert b"overloaded" not in data and data.count(b"event: message_start") == 1
            assert b"Hi. " in data and data.endswith(STOP)
    assert [seen.path.split("/")[1] for seen in hostile.seen] == ["c1", "c2", "c1", "c2", "c2", "c2"]  # c1 opened


async def test_messages_held_message_start_goes_out_when_the_answer_is_slow(
    start: GatewayFactory,  # noqa: F811
    hostile: Hostile,  # noqa: F811
    tmp_path: Path,
) -> None:
    """The wait for the answer's first event is bounded (half the attempt's time, as the
    translated role chunk's): a model slow to begin gets message_start out within the first-byte
    deadline, and is then no failure, as before."""

    routes = tmp_path / "routes.toml"
    routes.write_text(TWO_CLAUDES.format(url=hostile.url))
    gw = await start(ROUTES_FILE=str(routes), TIMEOUT_SECS="4")

    hostile.answer = events_answer(
        ANTHROPIC_START, TEXT + FINAL + STOP, pause=1.5
    )  # past half of c1's share (4 s / 2 attempts / 2)
    body = {"model": "claude-x", "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 10}
    async with gw.client.post("/v1/messages", json=body) as response:
        assert response.headers["x-gateway-upstream"] == "c1"
        first = await response.content.readuntil(b"\n\n")
        assert first.startswith(b"event: message_start")
        data = first + await response.read()
    assert data.endswith(STOP) and b"Hi. " in data
    assert [seen.path.split("/")[1] for seen in hostile.seen] == ["c1"]


CHAT_ERROR = (
    b'data: {"error":{"message":"The server had an error while processing your request","type":"server_error"}}\n\n'
)
BAD_REQUEST = b'data: {"error":{"message":"prompt is too long","type":"invalid_request_error"}}\n\n'


@pytest.mark.parametrize(
    ("path", "model", "events"),
    [
        ("/v1/chat/completions", "gpt-4o", CHAT_ERROR),
        ("/v1/chat/completions", "gpt-4o", BAD_REQUEST),
        ("/v1/chat/completions", "claude-x", ANTHROPIC_START + OVERLOADED),
        ("/v1/messages", "claude-x", ANTHROPIC_START + OVERLOADED),
    ],
    ids=["chat-server-error", "chat-request-error", "translated-overloaded", "messages-overloaded"],
)
async def test_a_stream_whose_answer_is_an_error_releases_its_reservation(
    start: GatewayFactory,  # noqa: F811
    hostile: Hostile,  # noqa: F811
    tmp_path: Path,
    path: str,
    model: str,
    events: bytes,
) -> None:
    """SPEC §14: an upstream failure with no reply (a 5xx) releases the reservation, and an
    upstream's error answer charges nothing. The same failure in a 200 stream, an error event
    where the answer should be (OpenAI's server_error, Anthropic's overloaded_error after
    message_start), held the whole estimate to the window's end (501 of 10000, for nothing)."""
    routes = tmp_path / "routes.toml"
    routes.write_text(
        ROUTES.format(url=hostile.url) + '\n[upstreams.openai]\nkind = "openai"\n'
        f'base_url = "{hostile.url}"\napi_key_env = "OPENAI_API_KEY"\n\n'
        '[[models]]\nmatch = "gpt-*"\nupstreams = [{ upstream = "openai" }]\n'
    )
    gw = await start(ROUTES_FILE=str(routes), TOKEN_QUOTA="10000")
    hostile.answer = events_answer(events)
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 500}
    async with gw.client.post(path, json=body, headers={"Authorization": "Bearer t"}) as response:
        assert response.status == 200
        assert response.headers["x-ratelimit-remaining-tokens"] == str(10000 - 501)
        assert b"error" in await response.read()
    async with gw.client.post(path, json=body, headers={"Authorization": "Bearer t"}) as response:
        await response.read()
        assert response.headers["x-ratelimit-remaining-tokens"] == str(10000 - 501)  # the first released


async def test_an_unrouted_stream_whose_answer_is_an_error_releases_its_reservation(
    start: GatewayFactory,  # noqa: F811
    hostile: Hostile,  # noqa: F811
) -> None:
    """The same without ROUTES_FILE (OPENAI_BASE_URL's single upstream)."""
    gw = await start(TOKEN_QUOTA="10000")
    hostile.answer = events_answer(CHAT_ERROR)
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 500}
    for _ in range(2):
        async with gw.client.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer t"}) as response:
            assert response.status == 200 and b"server_error" in await response.read()
            assert response.headers["x-ratelimit-remaining-tokens"] == str(10000 - 501)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}),
        ("/v1/responses", {"model": "gpt-4o", "input": "hi"}),
    ],
)
async def test_a_json_reply_that_is_an_error_under_a_200_releases_its_reservation(
    start: GatewayFactory,  # noqa: F811
    hostile: Hostile,  # noqa: F811
    path: str,
    body: dict[str, object],
) -> None:
    """SPEC §14: an upstream's error answer charges nothing. OpenAI-compatible routers answer
    some failures with an error object under a 200 (OpenRouter, LiteLLM's proxy): it is relayed
    with the status it stands for (SPEC §13: its code, 502 here), but it kept the whole
    estimate to the window's end, as its stream form no longer does."""
    from aiohttp import web

    gw = await start(TOKEN_QUOTA="10000")

    async def answer(request: web.Request) -> web.Response:
        return web.json_response({"error": {"message": "Provider returned error", "code": 502}})

    hostile.answer = answer
    for _ in range(2):
        ask = {**body, "max_tokens": 500} if "messages" in body else {**body, "max_output_tokens": 500}
        async with gw.client.post(path, json=ask, headers={"Authorization": "Bearer t"}) as response:
            assert response.status == 502 and "error" in await response.json()
            assert response.headers["x-ratelimit-remaining-tokens"] == str(10000 - 501)  # the first released


async def test_an_unrouted_messages_stream_overloaded_after_message_start_releases_its_reservation(
    start: GatewayFactory,  # noqa: F811
    hostile: Hostile,  # noqa: F811
) -> None:
    """Without ROUTES_FILE too: whether message_start and the error came in one read or two
    decided whether the estimate was released (one) or held to the window's end (two)."""

    gw = await start(TOKEN_QUOTA="10000")

    hostile.answer = events_answer(ANTHROPIC_START, PING + OVERLOADED, pause=0.05)
    body = {"model": "claude-x", "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 500}
    for _ in range(2):
        async with gw.client.post("/v1/messages", json=body, headers={"x-api-key": "t"}) as response:
            data = await response.read()
            assert response.status == 200 and data.startswith(ANTHROPIC_START) and data.endswith(OVERLOADED)
            assert response.headers["x-ratelimit-remaining-tokens"] == str(10000 - 501)


COMMENT = b": OPENROUTER PROCESSING\n\n"
CONTENT = (
    b'data: {"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"from b. "}}]}\n\n'
)


@pytest.mark.parametrize("pause", [0.0, 0.05], ids=["one-read", "two-reads"])
async def test_a_stream_that_fails_after_a_keep_alive_comment_falls_back(
    start: GatewayFactory,  # noqa: F811
    hostile: Hostile,  # noqa: F811
    tmp_path: Path,
    pause: float,
) -> None:
    """SPEC §13: a failure before anything reached the client falls back. An OpenAI-compatible
    router (OpenRouter) sends SSE comments while it waits for its provider, then the provider's
    failure as an error event: the comment went out at once as the stream's first bytes, so the
    error reached the client with another upstream left, and the breaker counted a success."""
    import asyncio

    from aiohttp import web

    routes = tmp_path / "routes.toml"
    routes.write_text(TWO.format(url=hostile.url))
    gw = await start(ROUTES_FILE=str(routes), CB_FAILURES="2", CB_OPEN_SECS="30")

    async def answer(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        if request.path.startswith("/a/"):
            await response.write(COMMENT)
            await asyncio.sleep(pause)
            await response.write(CHAT_ERROR)
        else:
            await response.write(CONTENT + b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    hostile.answer = answer
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    for _ in range(4):
        async with gw.client.post("/v1/chat/completions", json=body) as response:
            data = await response.read()
            assert response.headers["x-gateway-upstream"] == "b", data
            assert b"error" not in data and b"from b. " in data
    assert [seen.path.split("/")[1] for seen in hostile.seen] == ["a", "b", "a", "b", "b", "b"]  # a opened


async def test_keep_alive_comments_of_a_slow_model_go_out_within_the_first_byte_deadline(
    start: GatewayFactory,  # noqa: F811
    hostile: Hostile,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Held only until half the attempt's time: a slow model's comments then go out as they come,
    and its answer follows from the same upstream, as before."""

    routes = tmp_path / "routes.toml"
    routes.write_text(TWO.format(url=hostile.url))
    gw = await start(ROUTES_FILE=str(routes), TIMEOUT_SECS="4")

    hostile.answer = events_answer(
        COMMENT, CONTENT + b"data: [DONE]\n\n", pause=1.5
    )  # past half of a's share (4 s / 2 attempts / 2)
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    async with gw.client.post("/v1/chat/completions", json=body) as response:
        assert response.headers["x-gateway-upstream"] == "a"
        assert await response.content.readuntil(b"\n\n") == COMMENT
        data = await response.read()
    assert b"from b. " in data and data.endswith(b"data: [DONE]\n\n")
    assert [seen.path.split("/")[1] for seen in hostile.seen] == ["a"]


NOT_EVENTS = [
    (b"<html><body>502 Bad Gateway</body></html>", "text/html"),
    (b"upstream connect error or disconnect/reset before headers", "text/plain"),
]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages"])
@pytest.mark.parametrize("broken", NOT_EVENTS, ids=["html", "text"])
async def test_a_stream_answered_by_a_2xx_page_that_is_no_event_stream_is_a_502(
    start: GatewayFactory,  # noqa: F811
    hostile: Hostile,  # noqa: F811
    path: str,
    broken: tuple[bytes, str],
) -> None:
    """SPEC §5/§9: a stream request whose upstream answers 200 with a proxy's page (no event in
    it) got a 200 event stream made of that page: on chat, without an error event or [DONE], so
    the official SDK saw an empty, successful completion; on /v1/messages, the page, then an error
    event. A non-stream request gets the gateway's 502 for the same answer; so does a stream now,
    before any header goes out."""
    from aiohttp import web

    body, content_type = broken

    async def answer(request: web.Request) -> web.StreamResponse:
        return web.Response(body=body, status=200, content_type=content_type)

    hostile.answer = answer
    gw = await start()
    request = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 5}
    async with gw.client.post(path, json=request) as response:
        data = await response.read()
        assert response.status == 502, data
        assert body not in data


@pytest.mark.parametrize(("path", "routes"), [("/v1/chat/completions", TWO), ("/v1/messages", TWO_CLAUDES)])
async def test_a_stream_answered_by_a_2xx_page_that_is_no_event_stream_falls_back(
    start: GatewayFactory,  # noqa: F811
    hostile: Hostile,  # noqa: F811
    tmp_path: Path,
    path: str,
    routes: str,
) -> None:
    """SPEC §13: such an answer is the upstream failing before anything reached the client, as
    the non-stream request's (above): the next upstream answers, and the first one's breaker
    counts it (CB_FAILURES=2: opened after two). The page was the client's answer, from the
    first upstream, every time."""
    from aiohttp import web

    file = tmp_path / "routes.toml"
    file.write_text(routes.format(url=hostile.url))
    gw = await start(ROUTES_FILE=str(file), CB_FAILURES="2", CB_OPEN_SECS="30")
    chunk = {"id": "c", "object": "chat.completion.chunk", "model": "m", "choices": []}
    chat = b"data: " + json.dumps(chunk).encode() + b"\n\ndata: [DONE]\n\n"

    async def answer(request: web.Request) -> web.StreamResponse:
        if request.path.split("/")[1] in ("a", "c1"):
            return web.Response(body=NOT_EVENTS[0][0], status=200, content_type="text/html")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(chat if path == "/v1/chat/completions" else ANTHROPIC_START + TEXT + FINAL + STOP)
        await response.write_eof()
        return response

    hostile.answer = answer
    model = "m" if path == "/v1/chat/completions" else "claude-x"
    request = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 5}
    for _ in range(3):
        async with gw.client.post(path, json=request) as response:
            data = await response.read()
            assert response.status == 200 and response.headers["x-gateway-upstream"] in ("b", "c2"), data
            assert b"html" not in data
    first, second = ("a", "b") if path == "/v1/chat/completions" else ("c1", "c2")
    assert [seen.path.split("/")[1] for seen in hostile.seen] == [first, second, first, second, second]  # opened


START_WITHOUT_USAGE = anthropic_ev(
    {"type": "message_start", "message": {"id": "m", "type": "message", "role": "assistant", "content": []}}
)
END_WITHOUT_USAGE = anthropic_ev({"type": "message_delta", "delta": {"stop_reason": "end_turn"}}) + STOP


@pytest.mark.parametrize(
    ("path", "stream", "include_usage"),
    [
        ("/v1/chat/completions", False, False),
        ("/v1/chat/completions", True, False),
        ("/v1/chat/completions", True, True),
        ("/v1/messages", False, False),
        ("/v1/messages", True, False),
    ],
    ids=["chat-json", "chat-stream", "chat-stream-usage", "messages-json", "messages-stream"],
)
async def test_an_anthropic_reply_without_usage_leaves_the_estimate_on_every_surface(
    start: GatewayFactory,  # noqa: F811
    hostile: Hostile,  # noqa: F811
    tmp_path: Path,
    path: str,
    stream: bool,
    include_usage: bool,
) -> None:
    """SPEC §14: "No usage at all: the estimate stands." An Anthropic upstream whose Message (or
    stream) reports no usage: /v1/messages held the estimate (1001), but a chat request translated
    to it was settled to 0, the translation having made up a usage of zeros (sent to the client
    too, as if the reply had cost nothing): a budget such an upstream never charged."""
    routes = tmp_path / "routes.toml"
    routes.write_text(ROUTES.format(url=hostile.url))
    gw = await start(ROUTES_FILE=str(routes), TOKEN_QUOTA="10000")
    if stream:
        hostile.answer = events_answer(START_WITHOUT_USAGE + TEXT + END_WITHOUT_USAGE)
    else:
        hostile.answer = json_answer({key: value for key, value in MESSAGE.items() if key != "usage"})
    body: dict[str, object] = {"model": "claude-x", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1000}
    if stream:
        body["stream"] = True
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    for held in (1001, 2002):  # the first request's estimate stands when the second is admitted
        async with gw.client.post(path, json=body, headers={"Authorization": "Bearer t"}) as response:
            data = await response.read()
            assert response.status == 200, data
            assert response.headers["x-ratelimit-remaining-tokens"] == str(10000 - held)
            assert b'"prompt_tokens":0' not in data  # no usage of zeros made up for the client


@pytest.mark.parametrize(
    ("error", "falls_back"),
    [
        ({"message": "Provider returned error", "code": 502}, True),  # OpenRouter's upstream failure
        ({"message": "overloaded", "type": "server_error"}, True),
        ({"message": "context too long", "type": "invalid_request_error"}, False),  # the request's fault
        ({"message": "bad request", "code": 400}, False),
    ],
)
async def test_a_json_error_object_under_a_200_falls_back_as_its_stream_form_does(
    start: GatewayFactory,  # noqa: F811
    hostile: Hostile,  # noqa: F811
    tmp_path: Path,
    error: dict[str, object],
    falls_back: bool,
) -> None:
    """SPEC §13: a failure before anything reached the client falls back. A router that answers
    an upstream failure with an error object under a 200 (OpenRouter) was relayed as the answer
    and counted a success for the breaker, where the same error as a stream's first event, or
    from a translated upstream, falls back and counts. One that blames the request does not."""
    from aiohttp import web

    routes = tmp_path / "routes.toml"
    routes.write_text(TWO.format(url=hostile.url))
    gw = await start(ROUTES_FILE=str(routes), CB_FAILURES="2", CB_OPEN_SECS="30")
    answer_of_b = {
        "id": "c",
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "from b"}, "finish_reason": "stop"}],
    }

    async def answer(request: web.Request) -> web.Response:
        return web.json_response({"error": error} if request.path.startswith("/a/") else answer_of_b)

    hostile.answer = answer
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    for _ in range(3):
        async with gw.client.post("/v1/chat/completions", json=body) as response:
            assert response.status == (200 if falls_back else 400)  # the request's fault: its 400 (SPEC §13)
            reply = await response.json()
            assert response.headers["x-gateway-upstream"] == ("b" if falls_back else "a")
            assert reply == (answer_of_b if falls_back else {"error": error})
    tried = [seen.path.split("/")[1] for seen in hostile.seen]
    assert tried == (["a", "b", "a", "b", "b"] if falls_back else ["a", "a", "a"])  # a opened, or never failed


@pytest.mark.parametrize("kind", [b"{}", b'["invalid_request_error"]'])
async def test_a_stream_opening_with_an_error_of_odd_type_is_relayed_not_a_500(
    start: GatewayFactory,  # noqa: F811
    hostile: Hostile,  # noqa: F811
    tmp_path: Path,
    kind: bytes,
) -> None:
    """A routed stream that opens with an error event is asked whether the error blames the
    request (by its type); an object or array as that type (a broken upstream) raised TypeError
    (unhashable): a 500 internal_error. Found fuzzing the real gateway with ROUTES_FILE. It is
    the upstream's error, relayed as any other (its type no request error's)."""
    routes = tmp_path / "routes.toml"
    routes.write_text(
        ROUTES.format(url=hostile.url) + '\n[upstreams.openai]\nkind = "openai"\n'
        f'base_url = "{hostile.url}"\napi_key_env = "OPENAI_API_KEY"\n\n'
        '[[models]]\nmatch = "gpt-*"\nupstreams = [{ upstream = "openai" }]\n'
    )
    gw = await start(ROUTES_FILE=str(routes))
    hostile.answer = events_answer(b'data: {"error":{"message":"odd","type":' + kind + b"}}\n\n")
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    async with gw.client.post("/v1/chat/completions", json=body) as response:
        assert response.status == 200
        assert b'"message":"odd"' in await response.read()


@pytest.mark.parametrize("pause", [0.0, 0.05], ids=["one-read", "two-reads"])
async def test_a_stream_that_ends_after_its_keep_alive_comments_falls_back_or_is_a_502(
    start: GatewayFactory,  # noqa: F811
    hostile: Hostile,  # noqa: F811
    tmp_path: Path,
    pause: float,
) -> None:
    """SPEC §13, §5: an upstream whose stream ended after keep-alive comments and no event had sent
    the client nothing (the comments are held for the answer's first event). The client got a 200
    holding the comments alone (no event, no [DONE], no error event: the SDKs read an empty
    answer), with another upstream left; the breaker counted a success and the tenant kept paying
    the estimate. Without ROUTES_FILE an empty body was already the gateway's 502. Found against
    the real gateway, with an upstream that sends `: ping` and ends its body."""
    import asyncio

    from aiohttp import web

    async def answer(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        if not request.path.startswith("/b/"):
            await response.write(COMMENT)
            await asyncio.sleep(pause)
            await response.write(COMMENT)
        else:
            await response.write(CONTENT + b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    hostile.answer = answer
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 500}
    routes = tmp_path / "routes.toml"
    routes.write_text(TWO.format(url=hostile.url))
    routed = await start(ROUTES_FILE=str(routes))
    async with routed.client.post("/v1/chat/completions", json=body) as response:
        data = await response.read()
        assert response.headers["x-gateway-upstream"] == "b", data
        assert b"from b. " in data and not data.startswith(COMMENT)
    single = await start(TOKEN_QUOTA="10000")
    for _ in range(2):
        async with single.client.post("/v1/chat/completions", json=body) as response:
            assert response.status == 502
            assert json.loads(await response.read())["error"]["code"] == "upstream_stream_broken"
            assert response.headers["x-ratelimit-remaining-tokens"] == str(10000 - 501)  # released
    hostile.answer = events_answer(ANTHROPIC_START, PING, pause=pause)  # /v1/messages: its preamble alone
    async with single.client.post("/v1/messages", json={**body, "model": "claude-x"}) as response:
        assert response.status == 502
        assert json.loads(await response.read())["type"] == "error"
