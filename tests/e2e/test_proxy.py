"""The relay end to end: the real gateway process, the mock upstream, the official SDK."""

from __future__ import annotations

import asyncio
import collections
import json
import random
import time

import aiohttp
import openai
import pytest

from ..conftest import GatewayFactory
from ..harness import Gateway, Mock, free_port, wait_until

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "Hola 👋"}]


def client(gateway: Gateway, key: str = "demo", **headers: str) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=gateway.url + "/v1", api_key=key, max_retries=0, timeout=20, default_headers=headers or None
    )


async def post(gateway: Gateway, body: bytes | dict[str, object], **headers: str) -> tuple[int, dict[str, str], bytes]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            gateway.url + CHAT, data=data, headers={"Content-Type": "application/json", **headers}
        ) as response,
    ):
        return response.status, {k.lower(): v for k, v in response.headers.items()}, await response.read()


def test_non_stream_content_is_what_the_upstream_sent(shared_gateway: Gateway, mock: Mock) -> None:
    reply = client(shared_gateway).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert reply.choices[0].message.content == "Hello! This is a mock response from the upstream."
    assert reply.usage is not None and reply.usage.prompt_tokens == 9


def test_stream_content_is_what_the_upstream_sent(shared_gateway: Gateway, mock: Mock) -> None:
    stream = client(shared_gateway, **{"x-stainless-mock-reply": "one two three, four."}).chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "one two three, four."
    assert chunks[-1].choices[0].finish_reason == "stop"


@pytest.mark.serial  # asserts a time: run alone, not beside another worker
async def test_stream_deltas_arrive_as_the_upstream_sends_them(shared_gateway: Gateway, mock: Mock) -> None:
    # 6 deltas 300 ms apart: the first must reach the client long before the last is sent.
    started = time.monotonic()
    arrivals: list[float] = []
    body = {"model": "m", "messages": MESSAGES, "stream": True}
    headers = {
        "x-stainless-mock-reply": "a b c d e f ",
        "x-stainless-mock-chunk-delay-ms": "300",
        "Content-Type": "application/json",
    }
    async with (
        aiohttp.ClientSession() as session,
        session.post(shared_gateway.url + CHAT, json=body, headers=headers) as r,
    ):
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/event-stream")
        async for line in r.content:
            if (
                line.startswith(b"data: {")
                and b'"content":"' in line.replace(b" ", b"")
                and b'"content": ""' not in line
            ):
                arrivals.append(time.monotonic() - started)
    assert len(arrivals) >= 5
    assert arrivals[0] < 1.0
    assert arrivals[-1] - arrivals[0] > 1.2  # spread out as sent, not buffered to the end


def test_every_field_reaches_the_upstream_unchanged(shared_gateway: Gateway, mock: Mock) -> None:
    extra = {
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}],
        "response_format": {"type": "json_object"},
        "seed": 7,
        "n": 2,
        "temperature": 0.3,
        "stream_options": {"include_usage": True},
        "some_future_field": {"nested": [1, "two", None]},
    }
    stream = client(shared_gateway).chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True, extra_body=extra
    )
    chunks = list(stream)
    assert chunks[-1].usage is not None  # include_usage honoured by the upstream
    [seen] = mock.requests()
    for field, value in extra.items():
        assert seen["body"][field] == value
    assert seen["body"]["messages"] == MESSAGES


def test_upstream_gets_the_gateway_key_never_the_clients(shared_gateway: Gateway, mock: Mock) -> None:
    client(shared_gateway, key="client-secret-key").chat.completions.create(model="m", messages=MESSAGES)
    asyncio.run(
        post(
            shared_gateway,
            {"model": "m", "messages": MESSAGES},
            **{
                "X-Api-Key": "tenant-key",
                "Connection": "keep-alive, X-Hop",
                "X-Hop": "1",
                "Keep-Alive": "timeout=5",
                "Proxy-Authorization": "Basic abc",
                "TE": "trailers",
                "Upgrade": "h2c",
                "X-Custom": "kept",
            },
        )
    )
    first, second = mock.requests()
    for seen in (first, second):
        headers = {k.lower(): v for k, v in seen["headers"].items()}
        assert headers["authorization"] == "Bearer sk-upstream-secret"
        assert "x-api-key" not in headers
    headers = {k.lower(): v for k, v in second["headers"].items()}
    for hop in ("x-hop", "keep-alive", "proxy-authorization", "te", "upgrade"):
        assert hop not in headers
    assert "x-custom" not in headers  # an allow-list (SPEC §5): only named headers go upstream


@pytest.mark.parametrize("stream", [False, True])
def test_upstream_cookies_are_never_kept_nor_passed_on(start_gateway: GatewayFactory, mock: Mock, stream: bool) -> None:
    # A provider's load balancer sets a cookie on one tenant's call: it must not ride along on
    # the next tenant's calls (nor on any later call), and the client never sees it either.
    # The upstream is named by host name: aiohttp keeps no cookies for IP addresses anyway.
    gateway = start_gateway(OPENAI_BASE_URL=f"http://localhost:{mock.port}")
    body = {"model": "m", "messages": MESSAGES, "stream": stream}
    status, headers, _ = asyncio.run(
        post(gateway, body, **{"X-Api-Key": "tenant-a", "x-stainless-mock-set-cookie": "affinity=a-secret; Path=/"})
    )
    assert status == 200 and "set-cookie" not in headers
    assert asyncio.run(post(gateway, body, **{"X-Api-Key": "tenant-b"}))[0] == 200
    later = {k.lower(): v for k, v in mock.requests()[-1]["headers"].items()}
    assert "cookie" not in later


@pytest.mark.serial  # asserts a time: run alone, not beside another worker
@pytest.mark.parametrize("stream", [False, True])
def test_first_byte_timeout_is_504(start_gateway: GatewayFactory, mock: Mock, stream: bool) -> None:
    gateway = start_gateway(TIMEOUT_SECS="1")
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as caught:
        response = client(gateway, **{"x-stainless-mock-latency-ms": "3000"}).chat.completions.create(
            model="m", messages=MESSAGES, stream=stream
        )
        list(response) if stream else None  # type: ignore[call-overload]
    elapsed = time.monotonic() - started
    assert caught.value.status_code == 504
    assert caught.value.body["message"] == "upstream timed out"  # type: ignore[index]
    assert 0.9 < elapsed < 2.0


def test_a_slow_stream_after_its_first_event_is_not_cut(start_gateway: GatewayFactory, mock: Mock) -> None:
    gateway = start_gateway(TIMEOUT_SECS="1")
    stream = client(
        gateway, **{"x-stainless-mock-chunk-delay-ms": "400", "x-stainless-mock-reply": "a b c d"}
    ).chat.completions.create(model="m", messages=MESSAGES, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "a b c d"


def test_usage_is_asked_for_upstream_and_relayed_only_when_the_client_asked(
    shared_gateway: Gateway, mock: Mock
) -> None:
    # SPEC §14: the gateway asks every stream for usage (tokens_total, budgets); the usage
    # chunk reaches the client only if it asked for it itself.
    sdk = client(shared_gateway, **{"x-stainless-mock-reply": "one two"})
    plain = list(sdk.chat.completions.create(model="m", messages=MESSAGES, stream=True))
    assert all(chunk.usage is None for chunk in plain) and all(chunk.choices for chunk in plain)
    assert mock.requests()[-1]["body"]["stream_options"] == {"include_usage": True}
    asked = list(
        sdk.chat.completions.create(model="m", messages=MESSAGES, stream=True, stream_options={"include_usage": True})
    )
    assert asked[-1].usage is not None and asked[-1].usage.prompt_tokens == 9 and not asked[-1].choices


@pytest.mark.serial  # asserts a time: run alone, not beside another worker
async def test_a_stream_silent_for_stream_idle_secs_is_cut_with_an_error_event(
    start_gateway: GatewayFactory, mock: Mock
) -> None:
    # SPEC §5: after the first chunk, an upstream silent STREAM_IDLE_SECS is cut (the socket
    # and the concurrency slot are freed), the client told so in the stream.
    gateway = start_gateway(STREAM_IDLE_SECS="0.5", MAX_CONCURRENCY="1")
    started = time.monotonic()
    status, _, body = await post(
        gateway,
        {"model": "m", "messages": MESSAGES, "stream": True},
        **{"x-stainless-mock-chunk-delay-ms": "3000", "x-stainless-mock-reply": "a b"},
    )
    assert status == 200 and time.monotonic() - started < 2.5
    events = [line[6:] for line in body.decode().splitlines() if line.startswith("data: ")]
    error = json.loads(events[-1])["error"]
    assert error["message"] == "upstream idle timeout" and error["code"] == "upstream_idle_timeout"
    # The client got a 200: the log line says how its stream ended.
    line = wait_until(lambda: [entry for entry in gateway.log_lines() if entry["path"] == CHAT], what="a log line")[0]
    assert line["status"] == 200 and line["stream_error"] == "upstream idle timeout"
    # the slot is free again: the only one there is
    reply = client(gateway).chat.completions.create(model="m", messages=MESSAGES)
    assert reply.choices[0].message.content


@pytest.mark.parametrize(
    ("upstream", "expected"), [(400, 400), (429, 429), (500, 500), (503, 503), (401, 502), (403, 502)]
)
@pytest.mark.parametrize("stream", [False, True])
async def test_upstream_statuses(
    shared_gateway: Gateway, mock: Mock, upstream: int, expected: int, stream: bool
) -> None:
    status, headers, body = await post(
        shared_gateway,
        {"model": "m", "messages": MESSAGES, "stream": stream},
        **{"x-stainless-mock-status": str(upstream)},
    )
    assert status == expected
    error = json.loads(body)["error"]
    if expected == 502:
        assert "credentials" in error["message"]
        assert "sk-upstream-secret" not in body.decode()
    else:
        assert error["message"] == f"mock upstream error {upstream}"  # the upstream's own body
    assert headers["x-request-id"]


@pytest.mark.parametrize("upstream", [301, 302, 304, 307, 600, 999])
@pytest.mark.parametrize("stream", [False, True])
async def test_upstream_redirects_and_statuses_past_599_are_502(
    shared_gateway: Gateway, mock: Mock, upstream: int, stream: bool
) -> None:
    # The gateway never follows a redirect and does not pass its Location on: relayed, the client
    # got a 302 that points nowhere (a 304, to a POST, with no body at all), or a 600/999 that
    # HTTP has no class for (SPEC §5 relays the upstream's errors, §9 wants SDKs to raise the
    # matching exception). It is the upstream failing: 502 in the gateway's shape.
    status, headers, body = await post(
        shared_gateway,
        {"model": "m", "messages": MESSAGES, "stream": stream},
        **{"x-stainless-mock-status": str(upstream)},
    )
    assert status == 502
    assert json.loads(body)["error"] == {
        "message": f"upstream answered {upstream}",
        "type": "upstream_error",
        "code": "bad_gateway",
    }
    assert "location" not in headers and headers["x-request-id"]


async def test_unreachable_upstream_is_502(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway(OPENAI_BASE_URL=f"http://127.0.0.1:{free_port()}")
    for stream in (False, True):
        status, _, body = await post(gateway, {"model": "m", "messages": MESSAGES, "stream": stream})
        assert status == 502
        assert json.loads(body)["error"]["type"] == "upstream_error"


@pytest.mark.serial  # asserts a time: run alone, not beside another worker
async def test_client_disconnect_cancels_the_upstream_at_once(shared_gateway: Gateway, mock: Mock) -> None:
    body = {"model": "m", "messages": MESSAGES, "stream": True}
    headers = {"x-stainless-mock-chunk-delay-ms": "500", "x-stainless-mock-reply": "a b c d e f g h i j"}
    async with aiohttp.ClientSession() as session:
        response = await session.post(shared_gateway.url + CHAT, json=body, headers=headers)
        await response.content.readline()  # the stream has started
        response.close()  # hang up
        hung_up = time.monotonic()
    events = await asyncio.to_thread(wait_until, mock.events, 3.0, 0.02, "the upstream to see the disconnect")
    assert events[0]["event"] == "client_disconnected"
    assert events[0]["at"] - time.time() < 1 and time.monotonic() - hung_up < 3


async def test_upstream_dying_mid_stream_ends_with_an_error_event(shared_gateway: Gateway, mock: Mock) -> None:
    status, _, body = await post(
        shared_gateway,
        {"model": "m", "messages": MESSAGES, "stream": True},
        **{"x-stainless-mock-die-after": "2", "x-stainless-mock-reply": "a b c d e f"},
    )
    assert status == 200
    events = [line[6:] for line in body.decode().splitlines() if line.startswith("data: ")]
    assert json.loads(events[-1])["error"]["code"] == "upstream_stream_broken"
    assert "a b " in "".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-1])
    # and the gateway keeps serving
    reply = client(shared_gateway).chat.completions.create(model="m", messages=MESSAGES)
    assert reply.choices[0].message.content


async def test_upstream_ending_without_done_still_ends_cleanly(shared_gateway: Gateway, mock: Mock) -> None:
    status, _, body = await post(
        shared_gateway,
        {"model": "m", "messages": MESSAGES, "stream": True},
        **{"x-stainless-mock-no-done": "1", "x-stainless-mock-reply": "last word jane"},
    )
    assert status == 200
    contents = [
        json.loads(line[6:])["choices"][0]["delta"].get("content", "")
        for line in body.decode().splitlines()
        if line.startswith("data: {")
    ]
    assert "".join(contents) == "last word jane"  # the held tail was flushed


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"{not json", 400, "invalid_json"),
        (b"\xff\xfe{}", 400, "invalid_json"),
        (b'"a string"', 400, "invalid_request"),
        (b"[1, 2]", 400, "invalid_request"),
        (b'{"messages": []}', 400, "missing_model"),
        (b'{"model": "m"}', 400, "missing_messages"),
        (b'{"model": "m", "messages": "hi"}', 400, "missing_messages"),
        (b"", 400, "invalid_json"),
    ],
)
async def test_bad_input_is_a_clear_400(
    shared_gateway: Gateway, mock: Mock, body: bytes, status: int, code: str
) -> None:
    got, headers, answer = await post(shared_gateway, body)
    assert got == status
    error = json.loads(answer)["error"]
    assert error["code"] == code and error["message"] and error["type"] == "invalid_request_error"
    assert headers["x-request-id"]
    assert mock.requests() == []  # never reached the upstream
    assert client(shared_gateway).chat.completions.create(model="m", messages=MESSAGES).choices


async def test_oversized_body_is_413(start_gateway: GatewayFactory, mock: Mock) -> None:
    gateway = start_gateway(MAX_BODY_BYTES="1000")
    big = {"model": "m", "messages": [{"role": "user", "content": "x" * 2000}]}
    status, _, body = await post(gateway, big)
    assert status == 413
    assert json.loads(body)["error"]["code"] == "request_too_large"

    # chunked upload without Content-Length: the limit holds while reading
    async def gen():  # type: ignore[no-untyped-def]
        yield json.dumps(big).encode()

    async with aiohttp.ClientSession() as session, session.post(gateway.url + CHAT, data=gen()) as r:
        assert r.status == 413
    assert mock.requests() == []
    assert client(gateway).chat.completions.create(model="m", messages=MESSAGES).choices


async def test_unknown_paths_and_methods_are_json_errors(shared_gateway: Gateway) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(shared_gateway.url + "/v1/unknown") as r:
            assert r.status == 404
            assert (await r.json())["error"]["code"] == "not_found"
        async with session.get(shared_gateway.url + CHAT) as r:
            assert r.status == 405
            assert (await r.json())["error"]["code"] == "method_not_allowed"
            assert r.headers["Allow"] == "POST"
            assert "x-ratelimit-limit-requests" not in r.headers  # no quota spent on a 405
            assert r.headers["x-request-id"]
        async with session.post(shared_gateway.url + "/healthz") as r:
            assert r.status == 405 and r.headers["Allow"] == "GET,HEAD"
        async with session.get(shared_gateway.url + "/healthz") as r:
            assert r.status == 200 and await r.text() == "ok"
        async with session.head(shared_gateway.url + "/healthz") as r:
            assert r.status == 200


async def test_request_id_is_the_clients_or_a_new_one(shared_gateway: Gateway, mock: Mock) -> None:
    _, headers, _ = await post(shared_gateway, {"model": "m", "messages": MESSAGES}, **{"x-request-id": "abc-123"})
    assert headers["x-request-id"] == "abc-123"
    _, headers, _ = await post(shared_gateway, b"{bad")
    assert len(headers["x-request-id"]) >= 16
    # Any printable id a client's tracing uses is its own (SPEC §9): spaces, commas, slashes.
    for given in ("req 42", "a,b", "trace=7/span=9", "x" * 128):
        _, headers, _ = await post(shared_gateway, {"model": "m", "messages": MESSAGES}, **{"x-request-id": given})
        assert headers["x-request-id"] == given
    # One that is too long to be an id, or not printable ASCII, is replaced.
    for odd in ("x" * 129, "caf\u00e9"):
        _, headers, _ = await post(shared_gateway, {"model": "m", "messages": MESSAGES}, **{"x-request-id": odd})
        assert headers["x-request-id"] != odd and len(headers["x-request-id"]) >= 16


def test_request_log_lines_have_no_prompt_and_no_keys(start_gateway: GatewayFactory, mock: Mock) -> None:
    gateway = start_gateway()
    client(gateway, key="tenant-key-123").chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "my secret prompt"}]
    )
    line = wait_until(lambda: [entry for entry in gateway.log_lines() if entry["path"] == CHAT], what="a log line")[0]
    assert line["status"] == 200 and line["model"] == "gpt-4o-mini" and line["request_id"]
    assert line["upstream_ttfb_ms"] is not None and line["duration_ms"] >= line["upstream_ttfb_ms"]
    everything = gateway.process.output() + gateway.process.errors()
    assert "my secret prompt" not in everything
    assert "sk-upstream-secret" not in everything


def test_upstream_gets_exactly_one_content_type(shared_gateway: Gateway, mock: Mock) -> None:
    asyncio.run(
        post(
            shared_gateway, {"model": "m", "messages": MESSAGES}, **{"content-type": "application/json; charset=utf-8"}
        )
    )
    [seen] = mock.requests()
    assert [v for k, v in seen["header_list"] if k.lower() == "content-type"] == ["application/json"]


async def test_chaos_leaves_the_gateway_serving_and_clean(start_gateway: GatewayFactory, mock: Mock) -> None:
    """Garbage bodies, streams cut by the upstream, clients hanging up at random points."""
    gateway = start_gateway(MAX_CONCURRENCY="40")
    bodies = [
        b"",
        b"{",
        b"null",
        b"[]",
        b'{"model":1,"messages":[]}',
        b'{"model":"m","messages":[1,{"content":{"a":1}},{"content":[{"type":"text","text":5},7]}]}',
        "é".encode("latin-1"),
        json.dumps({"model": "m", "messages": MESSAGES, "stream": True}).encode(),
        json.dumps({"model": "m", "messages": MESSAGES}).encode(),
    ]
    rng = random.Random(7)

    async def one(session: aiohttp.ClientSession, i: int) -> int | str:
        headers = {
            "X-Api-Key": f"k{i % 5}",
            "x-stainless-mock-die-after": rng.choice(["1", "3", "-1"]),
            "x-stainless-mock-chunk-delay-ms": "3",
        }
        try:
            async with session.post(gateway.url + CHAT, data=rng.choice(bodies), headers=headers) as r:
                if rng.random() < 0.3:
                    await r.content.readany()
                    r.close()  # hang up mid-response
                else:
                    await r.read()
                return r.status
        except aiohttp.ClientError as exc:
            return type(exc).__name__

    async with aiohttp.ClientSession() as session:
        outcomes = collections.Counter(await asyncio.gather(*(one(session, i) for i in range(400))))
    assert set(outcomes) <= {200, 400, 503}, outcomes
    reply = client(gateway).chat.completions.create(model="m", messages=MESSAGES)
    assert reply.choices[0].message.content
    wait_until(lambda: "inflight_requests 0" in gateway.metrics(), what="inflight back to 0")
    assert "unhandled error" not in gateway.process.errors()
    assert "Traceback" not in gateway.process.errors()


@pytest.mark.parametrize("stream", [False, True])
def test_upstream_connections_are_reused(shared_gateway: Gateway, mock: Mock, stream: bool) -> None:
    # The upstream's chunked terminator trails [DONE] by 50 ms (as over a real network); the
    # requests are spaced wider than that, so each can find the previous connection pooled.
    sdk = client(shared_gateway, **{"x-stainless-mock-done-delay-ms": "50"})
    for _ in range(3):
        reply = sdk.chat.completions.create(model="m", messages=MESSAGES, stream=stream)
        list(reply) if stream else None  # type: ignore[call-overload]
        time.sleep(0.2)
    peers = {tuple(seen["peer"]) for seen in mock.requests()}
    assert len(peers) == 1, peers  # one pooled connection, no new handshake per request
