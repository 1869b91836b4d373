"""The header allow-list toward the upstream (SPEC §5), over real HTTP on loopback.

A client writes raw request bytes (odd casing and repeated lines kept exactly) to a small
aiohttp front whose handler does what the proxy does: `headers_for` then `Upstream.post`.
The upstream is a real aiohttp server that records the header lines as they arrived.
"""

from __future__ import annotations

import asyncio
import email.utils
import gc
import gzip
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from urllib.parse import quote, urlencode

import orjson
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.errors import UpstreamError
from gateway.upstream import MAX_REPLY_BYTES, Upstream

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
BODY = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]})

# (header line the client sends) -> the client's value must never reach the upstream.
DENIED = [
    b"Authorization: Bearer sk-client-secret",
    b"X-Api-Key: sk-client-secret",
    b"api-key: sk-azure-client-secret",
    b"Cookie: session=client-secret",
    b"OpenAI-Organization: org-client",
    b"OpenAI-Project: proj-client",
    b"Proxy-Authorization: Basic Y2xpZW50OnNlY3JldA==",
    b"X-Forwarded-For: 203.0.113.7",
    b"X-Forwarded-Host: internal.example",
    b"X-Forwarded-Proto: http",
    b"Forwarded: for=203.0.113.7",
    b"X-Real-IP: 203.0.113.7",
    b"Keep-Alive: timeout=5",
    b"TE: trailers",
    b"Via: 1.1 client-proxy",
    b"traceparent: 00-11111111111111111111111111111111-2222222222222222-01",
    b"tracestate: client=secret",
    b"x-request-id: client-chosen-id",
    b"Accept-Encoding: br, zstd, client",
    b"X-Custom-Header: client",
    b"Origin: https://client.example",
    b"X-Stainless-Hop: named-by-connection",  # hop-by-hop: the Connection line names it
]
DENIED_NAMES = [line.split(b":")[0].decode().lower() for line in DENIED]


async def serve(app: web.Application) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, int(runner.addresses[0][1])


Relay = Callable[..., Awaitable[list[tuple[str, str]]]]


@pytest.fixture
async def relay() -> AsyncIterator[Relay]:
    """relay(header lines, body[, Connection value]) -> the header lines the upstream got."""
    received: list[list[tuple[str, str]]] = []

    async def record(request: web.Request) -> web.Response:
        await request.read()
        received.append([(name.decode("latin-1"), value.decode("latin-1")) for name, value in request.raw_headers])
        return web.json_response({})

    upstream_app = web.Application()
    upstream_app.router.add_post("/v1/chat/completions", record)
    upstream_runner, upstream_port = await serve(upstream_app)
    upstream = Upstream(
        f"http://127.0.0.1:{upstream_port}/v1/chat/completions",
        "sk-upstream",
        5.0,
        organization="org-operator",
        project="proj-operator",
    )
    await upstream.open()

    async def front(request: web.Request) -> web.Response:
        headers = upstream.headers_for(request.headers, {"traceparent": TRACEPARENT}, request_id="gw-req-1")
        reply = await upstream.post(await request.read(), headers)
        await reply.read()
        return web.Response(status=reply.status)

    front_app = web.Application()
    front_app.router.add_post("/v1/chat/completions", front)
    front_runner, front_port = await serve(front_app)

    async def send(lines: list[bytes], body: bytes, connection: bytes = b"close") -> list[tuple[str, str]]:
        reader, writer = await asyncio.open_connection("127.0.0.1", front_port)
        head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway.example\r\n"
        head += b"".join(line + b"\r\n" for line in lines)
        head += b"Content-Length: %d\r\nConnection: %s\r\n\r\n" % (len(body), connection)
        writer.write(head + body)
        status_line = await reader.readline()
        await reader.read()
        writer.close()
        assert b" 200 " in status_line, status_line
        assert len(received) == 1
        return received.pop()

    yield send
    await front_runner.cleanup()
    await upstream.close()
    await upstream_runner.cleanup()


def values(arrived: list[tuple[str, str]], name: str) -> list[str]:
    return [value for key, value in arrived if key.lower() == name]


async def test_denied_headers_never_arrive_and_the_gateways_own_do(relay: Relay) -> None:
    arrived = await relay(DENIED, BODY, b"close, X-Stainless-Hop")
    for name in DENIED_NAMES:
        if name in ("authorization", "openai-organization", "openai-project", "traceparent", "x-request-id"):
            continue  # the gateway's own, checked below
        if name == "accept-encoding":  # aiohttp's client asks for what it can decode itself
            assert all("client" not in value for value in values(arrived, name)), arrived
            continue
        assert values(arrived, name) == [], name
    assert values(arrived, "authorization") == ["Bearer sk-upstream"]
    assert values(arrived, "openai-organization") == ["org-operator"]
    assert values(arrived, "openai-project") == ["proj-operator"]
    assert values(arrived, "traceparent") == [TRACEPARENT]
    assert values(arrived, "x-request-id") == ["gw-req-1"]
    assert values(arrived, "content-type") == ["application/json"]
    assert "sk-client-secret" not in repr(arrived)


async def test_every_connection_line_names_hop_by_hop_headers(relay: Relay) -> None:
    # Repeated Connection lines are one list (RFC 9110 §5.3): a header named on the second line
    # is as hop-by-hop as one named on the first. Only the first line was read: the header the
    # last line named reached the upstream.
    lines = [
        b"Connection: X-Stainless-First",
        b"X-Stainless-First: a",
        b"X-Stainless-Second: b",
        b"X-Stainless-Kept: c",
    ]
    arrived = await relay(lines, BODY, b"close, X-Stainless-Second")
    assert values(arrived, "x-stainless-first") == []
    assert values(arrived, "x-stainless-second") == []
    assert values(arrived, "x-stainless-kept") == ["c"]


async def test_allowed_headers_arrive_whatever_their_casing(relay: Relay) -> None:
    lines = [
        b"aCCePT: text/event-stream",
        b"uSER-aGENT: OpenAI/Python 1.99.0",
        b"openai-BETA: assistants=v2",
        b"IDEMPOTENCY-KEY: idem-1",
        b"x-STAINLESS-lang: python",
        b"X-Stainless-Retry-Count: 0",
        b"Anthropic-Version: 2023-06-01",
        b"ANTHROPIC-BETA: tools-2024-04-04",
        b"Content-Type: application/json; charset=utf-8",
    ]
    arrived = await relay(lines, BODY)
    assert values(arrived, "accept") == ["text/event-stream"]
    assert values(arrived, "user-agent") == ["OpenAI/Python 1.99.0"]
    assert values(arrived, "openai-beta") == ["assistants=v2"]
    assert values(arrived, "idempotency-key") == ["idem-1"]
    assert values(arrived, "x-stainless-lang") == ["python"]
    assert values(arrived, "x-stainless-retry-count") == ["0"]
    assert values(arrived, "anthropic-version") == ["2023-06-01"]
    assert values(arrived, "anthropic-beta") == ["tools-2024-04-04"]
    # The body sent is always JSON the gateway has parsed: one Content-Type, the gateway's.
    assert values(arrived, "content-type") == ["application/json"]


async def test_repeated_headers_go_out_once(relay: Relay) -> None:
    # (aiohttp's parser itself refuses a repeated User-Agent or Content-Type with 400.)
    lines = [
        b"Accept: application/json",
        b"accept: text/event-stream",
        b"anthropic-beta: a-1",
        b"Anthropic-Beta: b-2",
        b"Idempotency-Key: first-key",
        b"IDEMPOTENCY-KEY: second-key",
        b"X-Stainless-Os: Linux",
        b"X-Stainless-Arch: x64",
        b"x-stainless-os: MacOS",
    ]
    arrived = await relay(lines, BODY)
    names = [name.lower() for name, _ in arrived]
    assert len(names) == len(set(names)), arrived  # never one name twice, in any casing
    assert values(arrived, "accept") == ["application/json, text/event-stream"]  # lists join in order
    assert values(arrived, "anthropic-beta") == ["a-1, b-2"]
    assert values(arrived, "idempotency-key") == ["first-key"]  # the rest: the first, as headers.get reads
    assert values(arrived, "x-stainless-os") == ["Linux"]
    assert values(arrived, "x-stainless-arch") == ["x64"]


async def test_a_gzipped_request_body_arrives_decoded_without_its_encoding(relay: Relay) -> None:
    arrived = await relay([b"Content-Encoding: gzip"], gzip.compress(BODY))
    assert values(arrived, "content-encoding") == []
    assert values(arrived, "content-length") == [str(len(BODY))]


def test_without_organization_or_project_none_is_sent() -> None:
    upstream = Upstream("http://127.0.0.1:1/v1/chat/completions", None, 1.0)
    incoming = CIMultiDictProxy(CIMultiDict([("OpenAI-Organization", "org-client"), ("Authorization", "Bearer x")]))
    assert upstream.headers_for(incoming) == {"Content-Type": "application/json"}


def test_header_names_are_decided_alike_past_the_names_remembered() -> None:
    # The verdict per spelling is remembered for a bounded number of spellings: a client
    # inventing names can neither grow the process nor change what passes.
    upstream = Upstream("http://127.0.0.1:1/v1/chat/completions", None, 1.0)

    def sent(names: list[str]) -> dict[str, str]:
        return upstream.headers_for(CIMultiDictProxy(CIMultiDict([(name, "v") for name in names])))

    for batch in range(20):
        out = sent([f"X-Invented-{batch}-{i}" for i in range(500)] + [f"X-Stainless-Batch-{batch}", "X-Api-Key"])
        assert out == {"Content-Type": "application/json", f"x-stainless-batch-{batch}": "v"}
    gc.collect()
    tracemalloc.start()
    try:
        for batch in range(20):
            sent([f"X-Later-{batch}-{i}" for i in range(500)])
        gc.collect()
        assert tracemalloc.get_traced_memory()[0] < 64_000  # nothing kept per new name
    finally:
        tracemalloc.stop()


# Names a client might send: allowed, denied and the gateway's own, in random casing.
_NAMES = st.sampled_from(
    [
        "accept",
        "user-agent",
        "openai-beta",
        "idempotency-key",
        "anthropic-version",
        "anthropic-beta",
        "x-stainless-lang",
        "x-stainless-os",
        "x-stainless-",
        "content-type",
        "authorization",
        "x-api-key",
        "api-key",
        "cookie",
        "openai-organization",
        "openai-project",
        "content-encoding",
        "content-length",
        "transfer-encoding",
        "connection",
        "x-forwarded-for",
        "forwarded",
        "traceparent",
        "tracestate",
        "x-request-id",
        "x-stainlessfoo",
        "xx-stainless-lang",
    ]
) | st.from_regex(r"[A-Za-z0-9-]{1,20}", fullmatch=True)
_ALLOWED = {"accept", "user-agent", "openai-beta", "idempotency-key", "anthropic-version", "anthropic-beta"}
_OWN = {"content-type", "authorization", "openai-organization", "x-request-id", "traceparent"}


def _casing(name: str, flips: list[bool]) -> str:
    return "".join(c.upper() if flip else c for c, flip in zip(name, flips + [False] * len(name), strict=False))


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(_NAMES, st.lists(st.booleans(), max_size=24), st.text(st.characters(min_codepoint=0x20), max_size=8)),
        max_size=30,
    )
)
def test_only_allowed_names_and_the_gateways_own_go_out(sent: list[tuple[str, list[bool], str]]) -> None:
    upstream = Upstream("http://127.0.0.1:1/v1/chat/completions", "sk-upstream", 1.0, organization="org-op")
    incoming = CIMultiDictProxy(CIMultiDict([(_casing(name, flips), value) for name, flips, value in sent]))
    out = upstream.headers_for(incoming, {"traceparent": TRACEPARENT}, request_id="gw-1")
    names = [name.lower() for name in out]
    assert len(names) == len(set(names))
    for name in names:
        assert name in _ALLOWED or name in _OWN or name.startswith("x-stainless-"), name
    assert out["Authorization"] == "Bearer sk-upstream" and out["OpenAI-Organization"] == "org-op"
    assert out["x-request-id"] == "gw-1" and out["traceparent"] == TRACEPARENT
    assert out["Content-Type"] == "application/json"
    hop = {t.strip().lower() for line in incoming.getall("connection", ()) for t in line.split(",")}
    for sent_name, _, value in sent:
        name = sent_name.lower()
        passes = name in _ALLOWED or name.startswith("x-stainless-")
        if passes and value and name not in hop:
            assert name in names, name  # every allowed header with a value arrives


async def test_a_reply_that_inflates_past_the_cap_is_an_upstream_error_not_held_whole() -> None:
    # A non-stream reply is read whole before it is parsed: with no cap, a 400 KB gzip body that
    # inflates to 400 MB (aiohttp decodes what the gateway's Accept-Encoding invited) took the
    # process past 700 MB, three at once past 4 GB. Read past the cap, it is an UpstreamError
    # (502, or the next upstream of the route) and the connection is dropped.
    cap = 1024 * 1024
    inflated = b'{"content": "' + b"a" * (4 * cap) + b'"}'
    bomb = gzip.compress(inflated)
    assert len(bomb) < cap // 16

    async def answer(request: web.Request) -> web.Response:
        await request.read()
        if request.query.get("size") == "small":
            return web.Response(
                body=gzip.compress(b'{"ok": true}'),
                content_type="application/json",
                headers={"Content-Encoding": "gzip"},
            )
        return web.Response(body=bomb, content_type="application/json", headers={"Content-Encoding": "gzip"})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", answer)
    runner, port = await serve(app)
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    bounded = Upstream(url, None, 5.0, max_reply_bytes=cap)
    small = Upstream(url + "?size=small", None, 5.0, max_reply_bytes=cap)
    await bounded.open()
    await small.open()
    try:
        reply = await bounded.post(BODY, {"Content-Type": "application/json"})
        assert reply.status == 200
        with pytest.raises(UpstreamError, match="too large"):
            await reply.read()
        reply.close()
        # Under the cap, the decoded body as before.
        reply = await small.post(BODY, {"Content-Type": "application/json"})
        assert orjson.loads(await reply.read()) == {"ok": True}
    finally:
        await bounded.close()
        await small.close()
        await runner.cleanup()


async def test_a_whole_reply_is_read_with_the_loop_served_between_its_megabytes() -> None:
    # aiohttp's readany() returns at once while its buffer holds data, and inflates a gzip body
    # as it is read: a ~300 KB gzip reply that inflates to 256 MiB was read (and refused) in one
    # go on the event loop, /healthz waiting 0.75-1.2 s on the real process each time.
    size = 32 * 1024 * 1024
    bomb = gzip.compress(b'{"content": "' + b" " * size + b'"}')

    async def answer(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=bomb, content_type="application/json", headers={"Content-Encoding": "gzip"})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", answer)
    runner, port = await serve(app)
    upstream = Upstream(f"http://127.0.0.1:{port}/v1/chat/completions", None, 5.0, max_reply_bytes=size // 2)
    await upstream.open()
    turns = 0

    async def tick() -> None:
        nonlocal turns
        while True:
            turns += 1
            await asyncio.sleep(0)

    try:
        reply = await upstream.post(BODY, {"Content-Type": "application/json"})
        ticker = asyncio.get_running_loop().create_task(tick())
        await asyncio.sleep(0)
        turns = 0
        with pytest.raises(UpstreamError, match="too large"):
            await reply.read()
        ticker.cancel()
        reply.close()
        assert turns >= 8  # a turn of the loop for others at least every 2 MiB
    finally:
        await upstream.close()
        await runner.cleanup()


def test_the_default_cap_leaves_room_for_the_largest_replies_the_apis_give() -> None:
    # 2048 embeddings of 3072 floats, pretty-printed as OpenAI does (~23 bytes a number): ~145 MB.
    assert MAX_REPLY_BYTES >= 2048 * 3072 * 23


async def test_an_error_body_that_echoes_the_request_never_carries_the_operators_key() -> None:
    # The error body is relayed to the client (SPEC §5): one that quotes the request's headers
    # would hand it the operator's key, OpenAI's Bearer or Anthropic's x-api-key alike.
    async def echo(request: web.Request) -> web.Response:
        await request.read()
        status = int(request.query["status"])
        return web.json_response({"error": {"message": "bad request", "headers": dict(request.headers)}}, status=status)

    app = web.Application()
    app.router.add_post("/v1/chat/completions", echo)
    runner, port = await serve(app)
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    try:
        for anthropic in (False, True):
            for status, masked in ((400, True), (503, True), (200, False)):
                upstream = Upstream(f"{url}?status={status}", "sk-operator-secret-1", 5.0, anthropic=anthropic)
                await upstream.open()
                try:
                    reply = await upstream.post(BODY, upstream.headers_for(CIMultiDictProxy(CIMultiDict())))
                    data = await reply.read()
                finally:
                    await upstream.close()
                headers = orjson.loads(data)["error"]["headers"]
                sent = headers["x-api-key" if anthropic else "Authorization"]
                if masked:
                    assert b"sk-operator-secret-1" not in data
                    assert sent == ("***" if anthropic else "Bearer ***")
                else:  # a reply is the model's, relayed as it came
                    assert "sk-operator-secret-1" in sent
    finally:
        await runner.cleanup()


async def test_an_error_body_that_echoes_the_key_json_escaped_never_carries_it() -> None:
    # A base64 key (Amazon Bedrock's has "/", "+" and "=") echoed by an encoder that escapes
    # punctuation (Gson writes "=" as \u003d, PHP "/" as \/): the client's JSON reader got the key.
    key = "ABSKQmVk/cm9ja0+FQSUtleQ=="
    escapes = {
        "gson": lambda text: text.replace("=", "\\u003d"),
        "php": lambda text: text.replace("/", "\\/"),
        "upper": lambda text: text.replace("+", "\\u002B").replace("=", "\\u003D"),
    }

    async def echo(request: web.Request) -> web.Response:
        await request.read()
        quoted = escapes[request.query["as"]](request.headers["Authorization"])
        return web.Response(
            body=b'{"error":{"message":"got ' + quoted.encode() + b'"}}', status=400, content_type="application/json"
        )

    app = web.Application()
    app.router.add_post("/v1/chat/completions", echo)
    runner, port = await serve(app)
    try:
        for name in escapes:
            upstream = Upstream(f"http://127.0.0.1:{port}/v1/chat/completions?as={name}", key, 5.0)
            await upstream.open()
            try:
                reply = await upstream.post(BODY, upstream.headers_for(CIMultiDictProxy(CIMultiDict())))
                data = await reply.read()
            finally:
                await upstream.close()
            assert orjson.loads(data)["error"]["message"] == "got Bearer ***", name
    finally:
        await runner.cleanup()


@pytest.mark.serial  # asserts a time (the loop's longest gap): run alone, not beside another worker
async def test_masking_the_key_in_a_long_error_body_of_escapes_keeps_the_loop_serving() -> None:
    # A base64 key that opens with punctuation made the escaped-key pattern open with an
    # alternation, tried at every backslash: 16 MiB of them in an error body held the event
    # loop ~0.7 s (every other request waited). The key, escaped after them, is still masked.
    key = "/ABSKQmVk/cm9ja0+FQSUtleQ=="

    async def long_error(request: web.Request) -> web.Response:
        await request.read()
        escaped = request.headers["Authorization"].replace("/", "\\/").encode()
        return web.Response(
            body=b'{"error":{"message":"' + b"\\\\" * (8 << 20) + b" got " + escaped + b'"}}',
            status=400,
            content_type="application/json",
        )

    app = web.Application()
    app.router.add_post("/v1/chat/completions", long_error)
    runner, port = await serve(app)
    upstream = Upstream(f"http://127.0.0.1:{port}/v1/chat/completions", key, 5.0)
    await upstream.open()
    loop = asyncio.get_running_loop()
    gaps: list[float] = []

    async def tick() -> None:
        while True:
            before = loop.time()
            await asyncio.sleep(0.005)
            gaps.append(loop.time() - before)

    ticker = asyncio.ensure_future(tick())
    try:
        reply = await upstream.post(BODY, upstream.headers_for(CIMultiDictProxy(CIMultiDict())))
        data = await reply.read()
        ticks = len(gaps)
        while len(gaps) == ticks:  # the tick the read may have held up
            await asyncio.sleep(0)
    finally:
        ticker.cancel()
        await upstream.close()
        await runner.cleanup()
    assert data.endswith(b' got Bearer ***"}}') and key.encode() not in data
    assert max(gaps) < 0.3, max(gaps)  # ~0.06 s: reading and joining the body; 0.7 s before


async def test_an_error_body_that_echoes_the_urls_credentials_never_carries_them() -> None:
    # OPENAI_BASE_URL=https://user:pass@proxy (a credential instead of a key): aiohttp sends it
    # as Authorization: Basic, and an error body quoting that header gave it to the client.
    async def echo(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"error": {"message": "got " + request.headers["Authorization"]}}, status=400)

    app = web.Application()
    app.router.add_post("/v1/chat/completions", echo)
    runner, port = await serve(app)
    upstream = Upstream(f"http://gw:proxy-pass%40word@127.0.0.1:{port}/v1/chat/completions", None, 5.0)
    await upstream.open()
    try:
        reply = await upstream.post(BODY, upstream.headers_for(CIMultiDictProxy(CIMultiDict())))
        assert orjson.loads(await reply.read())["error"]["message"] == "got Basic ***"
    finally:
        await upstream.close()
        await runner.cleanup()


async def test_only_ascii_numbers_of_the_upstreams_back_off_advice_are_passed_on() -> None:
    # "٣" and "²" pass str.isdigit(): relayed, the client got a Retry-After in UTF-8 bytes.
    async def limited(request: web.Request) -> web.Response:
        await request.read()
        value = request.query["v"]
        return web.json_response({}, status=429, headers={"Retry-After": value, "retry-after-ms": value})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", limited)
    runner, port = await serve(app)
    try:
        for value, passed in (("3", True), ("2.5", True), ("\u0663", False), ("\u00b2", False), ("3\u0663", False)):
            upstream = Upstream(f"http://127.0.0.1:{port}/v1/chat/completions?v={value}", None, 5.0)
            await upstream.open()
            try:
                reply = await upstream.post(BODY, {"Content-Type": "application/json"})
                await reply.read()
                expected = {"Retry-After": value, "retry-after-ms": value} if passed else {}
                assert reply.retry_headers() == expected, value
            finally:
                await upstream.close()
    finally:
        await runner.cleanup()


async def test_back_off_advice_past_the_hour_is_passed_on_as_the_hour() -> None:
    # A Retry-After of 10^30 went to the client as sent: a client that sleeps what it is told
    # never retries, and one with a millisecond timer (Node's setTimeout, past 2^31-1 ms) fires
    # at once and hammers. The gateway believes an upstream up to MAX_RETRY_AFTER_SECS (its own
    # skip, SPEC §13); the client is told no more than that either.
    async def limited(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response(
            {}, status=429, headers={"Retry-After": request.query["s"], "retry-after-ms": request.query["ms"]}
        )

    app = web.Application()
    app.router.add_post("/v1/chat/completions", limited)
    runner, port = await serve(app)
    huge = "1" + "0" * 30
    cases = [
        ((huge, huge), {"Retry-After": "3600", "retry-after-ms": "3600000"}),
        (("3601", "3600001"), {"Retry-After": "3600", "retry-after-ms": "3600000"}),
        (("3600", "3600000"), {"Retry-After": "3600", "retry-after-ms": "3600000"}),
        (("20", "2.5"), {"Retry-After": "20", "retry-after-ms": "2.5"}),
    ]
    try:
        for (secs, ms), expected in cases:
            upstream = Upstream(f"http://127.0.0.1:{port}/v1/chat/completions?s={secs}&ms={ms}", None, 5.0)
            await upstream.open()
            try:
                reply = await upstream.post(BODY, {"Content-Type": "application/json"})
                await reply.read()
                assert reply.retry_headers() == expected, (secs, ms)
            finally:
                await upstream.close()
    finally:
        await runner.cleanup()


async def test_the_skip_believed_is_the_back_off_advice_passed_on() -> None:
    # SPEC §13's skip (retry_after) read retry-after-ms with float(): "inf" or "1e308" beside
    # `Retry-After: 2` took the upstream out for the whole hour (every request 503 circuit_open)
    # while the client was told 2 s (retry_headers drops what is no number); "nan" or "" hid the
    # Retry-After beside it, and the 429 counted toward the breaker instead.
    async def limited(request: web.Request) -> web.Response:
        await request.read()
        headers = {
            name: request.query[key]
            for key, name in (("ms", "retry-after-ms"), ("s", "Retry-After"))
            if key in request.query
        }
        return web.json_response({}, status=429, headers=headers)

    app = web.Application()
    app.router.add_post("/v1/chat/completions", limited)
    runner, port = await serve(app)
    cases = [
        ({"ms": "inf", "s": "2"}, 2.0, {"Retry-After": "2"}),
        ({"ms": "1e308", "s": "2"}, 2.0, {"Retry-After": "2"}),
        ({"ms": "nan", "s": "2"}, 2.0, {"Retry-After": "2"}),
        ({"ms": "", "s": "2"}, 2.0, {"Retry-After": "2"}),
        ({"ms": "-5", "s": "3"}, 3.0, {"Retry-After": "3"}),
        ({"ms": "1e308"}, None, {}),
        ({"s": "inf"}, None, {}),
        ({"s": "\u0663"}, None, {}),  # "٣": float() reads it as 3, no client does
        ({"ms": "1500", "s": "9"}, 1.5, {"retry-after-ms": "1500", "Retry-After": "9"}),
        ({"s": "1.5"}, 1.5, {"Retry-After": "1.5"}),
        ({"s": "99999"}, 3600.0, {"Retry-After": "3600"}),
    ]
    try:
        for query, skip, passed in cases:
            upstream = Upstream(f"http://127.0.0.1:{port}/v1/chat/completions?{urlencode(query)}", None, 5.0)
            await upstream.open()
            try:
                reply = await upstream.post(BODY, {"Content-Type": "application/json"})
                await reply.read()
                assert (reply.retry_after(), reply.retry_headers()) == (skip, passed), query
            finally:
                await upstream.close()
    finally:
        await runner.cleanup()


async def test_a_retry_after_date_is_passed_on_as_seconds() -> None:
    # RFC 9110 §10.2.3 allows an HTTP date (nginx's limit_req, Azure send one): it was dropped,
    # and the client retried on its own timer instead of when the upstream said.
    in_two_minutes = email.utils.formatdate(time.time() + 120, usegmt=True)
    cases = [
        (in_two_minutes, lambda v: v is not None and 115 <= int(v) <= 121),
        ("Fri, 31 Dec 9999 23:59:59 GMT", lambda v: v == "3600"),
        ("Mon, 01 Jan 2001 00:00:00 GMT", lambda v: v == "0"),  # past: now
        ("Fri, 32 Foo 2026 00:00:00 GMT", lambda v: v is None),
        ("soon", lambda v: v is None),
    ]

    async def limited(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({}, status=429, headers={"Retry-After": request.query["v"]})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", limited)
    runner, port = await serve(app)
    try:
        for value, check in cases:
            upstream = Upstream(f"http://127.0.0.1:{port}/v1/chat/completions?v={quote(value)}", None, 5.0)
            await upstream.open()
            try:
                reply = await upstream.post(BODY, {"Content-Type": "application/json"})
                await reply.read()
                assert check(reply.retry_headers().get("Retry-After")), (value, reply.retry_headers())
            finally:
                await upstream.close()
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("status_line", [b"HTTP/1.1 099 Odd", b"HTTP/1.1 000 Zero", b"HTTP/1.1 099 ", b"HTTP/1.1 000 "])
async def test_a_status_under_100_is_an_upstream_error_not_relayed(status_line: bytes) -> None:
    # aiohttp's client reads "099" and "000" as the statuses 99 and 0. Relayed, the client got
    # "HTTP/1.1 99" or "HTTP/1.1 0", status lines HTTP has no class for (curl and http.client
    # reject them) and /metrics a status="0" series: the upstream failing, as a 999 is.
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(next(line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))[15:])
        await reader.readexactly(length)
        body = b'{"error": {"message": "odd"}}'
        writer.write(
            status_line + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body
        )
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    upstream = Upstream(f"http://127.0.0.1:{port}/v1/chat/completions", None, 5.0)
    await upstream.open()
    try:
        with pytest.raises(UpstreamError, match=r"^upstream answered (99|0)$"):
            await upstream.post(BODY, {"Content-Type": "application/json"})
    finally:
        await upstream.close()
        server.close()
        await server.wait_closed()
