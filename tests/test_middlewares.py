"""The middleware chain in process: create_app(settings) behind pytest-aiohttp's test client, in
front of a real upstream on loopback whose streams can be held open (no sleeping: a held
stream is in flight until the test releases it)."""

from __future__ import annotations

import asyncio
import gzip
import io
import json
import logging
import re
import threading
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient, TestServer
from multidict import CIMultiDict, CIMultiDictProxy
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from gateway import bodies, keys
from gateway.app import SERVER_OPTIONS, create_app
from gateway.config import Settings
from gateway.errors import UpstreamStreamBroken

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "ping"}]
AiohttpClient = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]
AiohttpServer = Callable[..., Awaitable[TestServer]]
Route = tuple[str, str, Callable[[web.Request], Awaitable[web.StreamResponse]]]


def chat(model: str = "gpt-4o-mini", stream: bool = False) -> dict[str, object]:
    return {"model": model, "messages": MESSAGES, "stream": stream}


@dataclass
class Upstream:
    """OpenAI-like: a JSON reply, or an SSE stream whose end waits for `release` when `hold`."""

    url: str = ""
    bodies: list[bytes] = field(default_factory=list)
    hold: bool = False
    release: asyncio.Event = field(default_factory=asyncio.Event)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.bodies.append(body)
        payload = json.loads(body)
        if not payload.get("stream"):
            return web.json_response(
                {
                    "id": "c1",
                    "object": "chat.completion",
                    "model": payload["model"],
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "pong"}}],
                }
            )
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        chunk = {"id": "c1", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": "po"}}]}
        await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        if self.hold:
            await self.release.wait()
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


@dataclass
class Gateway:
    app: web.Application
    client: TestClient[web.Request, web.Application]
    log: io.BytesIO

    async def post(
        self, body: object = None, key: str | None = "demo", data: Any = None, **headers: str
    ) -> tuple[int, CIMultiDictProxy[str], dict[str, Any]]:
        response = await self.send(body, key, data, **headers)
        text = await response.read()
        return response.status, response.headers, json.loads(text) if text.startswith(b"{") else {}

    async def send(self, body: object = None, key: str | None = "demo", data: Any = None, **headers: str) -> Any:
        if key is not None:
            headers["X-Api-Key"] = key
        if data is None:
            data = json.dumps(body if body is not None else chat()).encode()
            headers.setdefault("Content-Type", "application/json")
        return await self.client.post(CHAT, data=data, headers=headers)

    def log_lines(self) -> list[dict[str, Any]]:
        self.app[keys.TELEMETRY].log.flush()
        return [json.loads(line) for line in self.log.getvalue().splitlines()]

    async def samples(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        """/metrics as {(name, labels): value}."""
        async with self.client.get("/metrics") as response:
            text = await response.text()
        found = {}
        for line in text.splitlines():
            match = re.fullmatch(r"(\w+)(?:\{(.*)\})? (\S+)", line)
            if match and not line.startswith("#"):
                labels = frozenset(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
                found[(match.group(1), labels)] = float(match.group(3))
        return found


def sample(name: str, **labels: str) -> tuple[str, frozenset[tuple[str, str]]]:
    return name, frozenset(labels.items())


def error_of(body: dict[str, Any]) -> dict[str, Any]:
    error = body["error"]
    assert set(error) == {"message", "type", "code"} and error["message"]
    return dict(error)


@pytest.fixture
async def upstream(aiohttp_server: AiohttpServer) -> Upstream:
    fake = Upstream()
    app = web.Application()
    app.router.add_post(CHAT, fake.chat)
    server = await aiohttp_server(app)
    fake.url = str(server.make_url("")).rstrip("/")
    return fake


GatewayFactory = Callable[..., Awaitable[Gateway]]


@pytest.fixture
def start(aiohttp_client: AiohttpClient, make_settings: Callable[..., Settings], upstream: Upstream) -> GatewayFactory:
    """start(VAR=value, ..., routes=[...]) → the gateway app in process; `routes` are added to it
    (a handler to break on purpose), after the gateway's own."""

    async def start(routes: list[Route] | None = None, **env: str) -> Gateway:
        defaults = {"OPENAI_BASE_URL": upstream.url, "OPENAI_API_KEY": "sk-up", "RPS": "0", "DEFAULT_QUOTA": "1000"}
        log = io.BytesIO()
        app = create_app(make_settings(**(defaults | env)), log_stream=log)
        for method, path, handler in routes or ():
            app.router.add_route(method, path, handler)
        # Started here with the runner options server.py uses: TestServer(app, **options), which
        # aiohttp_client(app, server_kwargs=...) does, drops them.
        server = TestServer(app)
        await server.start_server(**SERVER_OPTIONS)
        return Gateway(app, await aiohttp_client(server), log)

    return start


async def held_stream(gateway: Gateway, upstream: Upstream, key: str) -> ClientResponse:
    """A stream in flight: its headers and first event are out, its end waits for release."""
    upstream.hold = True
    response: ClientResponse = await gateway.send(chat(stream=True), key)
    assert response.status == 200
    assert (await response.content.readline()).startswith(b"data: ")
    return response


async def test_admission_runs_in_the_spec_order(start: GatewayFactory, upstream: Upstream) -> None:
    """401 before 429 before 503 before the quota: each request below fails more than one
    step, and gets the first one's answer."""
    gateway = await start(TENANT_KEYS="a=sk-a,b=sk-b", RPS="0.001", BURST="3", MAX_CONCURRENCY="1", DEFAULT_QUOTA="1")
    held = await held_stream(gateway, upstream, "sk-a")  # a: a token and its whole quota spent

    for _ in range(2):  # slot taken and quota spent (a token each)
        status, headers, body = await gateway.post(key="sk-a")
        assert status == 503 and error_of(body)["code"] == "server_overloaded" and headers["Retry-After"] == "1"
    status, headers, body = await gateway.post(key="sk-a")  # no token, slot taken, quota spent
    assert status == 429 and error_of(body)["code"] == "rate_limit_exceeded" and int(headers["Retry-After"]) >= 1
    for key in ("sk-wrong", None):  # whatever else is exhausted
        status, _, body = await gateway.post(key=key)
        assert status == 401 and error_of(body)["message"] == "invalid api key"
    status, _, body = await gateway.post(key="sk-b")  # b: shed before its quota is counted
    assert status == 503

    upstream.release.set()
    assert (await held.read()).endswith(b"data: [DONE]\n\n")
    status, headers, _ = await gateway.post(key="sk-b")
    assert status == 200 and headers["x-ratelimit-remaining-requests"] == "0"  # the 503 spent no quota
    status, headers, body = await gateway.post(key="sk-b")  # a token left, the quota spent
    assert status == 429 and error_of(body) == {
        "message": "quota exceeded (limit=1)",
        "type": "insufficient_quota",
        "code": "quota_exceeded",
    }
    assert len(upstream.bodies) == 2  # refused requests never reach the upstream


async def test_every_forwarded_for_line_counts_behind_a_trusted_proxy(start: GatewayFactory) -> None:
    """A proxy that adds its own X-Forwarded-For line after the client's (HAProxy's `option
    forwardfor`) puts the client's real address last: the lines are one list (RFC 9110 §5.3).
    Only the first line was read, so a client behind such a proxy chose its own rate-limit key
    with a forged line of its own: three requests from one address, each admitted."""
    gateway = await start(RPS="0.001", BURST="1", TRUSTED_PROXIES="127.0.0.1")
    statuses = []
    for i in range(3):
        forged_then_real = CIMultiDict([("X-Forwarded-For", f"198.51.100.{i}"), ("X-Forwarded-For", "203.0.113.9")])
        async with gateway.client.post(CHAT, json=chat(), headers=forged_then_real) as response:
            statuses.append(response.status)
    assert statuses == [200, 429, 429]


async def test_404_405_and_probes_spend_no_token_and_no_quota(start: GatewayFactory, upstream: Upstream) -> None:
    gateway = await start(TENANT_KEYS="a=sk-a", RPS="0.001", BURST="1", DEFAULT_QUOTA="1")
    client = gateway.client
    for _ in range(3):
        for method in ("GET", "PUT", "DELETE"):
            async with client.request(method, CHAT, headers={"X-Api-Key": "sk-a"}) as r:
                assert r.status == 405 and r.headers["Allow"] == "POST"
                assert error_of(await r.json())["code"] == "method_not_allowed"
                assert "x-ratelimit-limit-requests" not in r.headers and r.headers["x-request-id"]
        for path in ("/v1/unknown", "/v1/chat/completions/", "/%2e%2e/etc", "/healthz/x"):
            async with client.post(path, json=chat(), headers={"X-Api-Key": "sk-a"}) as r:
                assert r.status == 404 and error_of(await r.json())["code"] == "not_found"
        for path in ("/v1/messages/count_tokens", "/v1/messages/batches"):  # Anthropic's surface, its shape
            async with client.post(path, json=chat(), headers={"X-Api-Key": "sk-a"}) as r:
                assert r.status == 404 and (await r.json())["error"]["type"] == "not_found_error"
        async with client.post("/healthz") as r:
            assert r.status == 405 and r.headers["Allow"] == "GET,HEAD"
        for path in ("/healthz", "/readyz", "/metrics"):  # unadmitted: no key needed in keyed mode
            async with client.get(path) as r:
                assert r.status == 200
            async with client.head(path) as r:
                assert r.status == 200

    # A request line no route can match (aiohttp's router refuses it): JSON all the same.
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    writer.write(b"OPTIONS * HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    head, _, answer = (await reader.read()).partition(b"\r\n\r\n")
    writer.close()
    assert head.startswith(b"HTTP/1.1 404") and error_of(json.loads(answer))["code"] == "not_found"

    status, headers, _ = await gateway.post(key="sk-a")  # the only token, the only request of the quota
    assert status == 200 and headers["x-ratelimit-remaining-requests"] == "0"
    assert len(upstream.bodies) == 1
    samples = await gateway.samples()
    assert (
        samples[sample("http_requests_total", model="unknown", route="other", status="404")] == 19
    )  # 4 paths and 2 under /v1/messages, 3 times; the request line
    assert samples[sample("http_requests_total", model="unknown", route=CHAT, status="405")] == 9
    assert samples[sample("http_requests_total", model="unknown", route="/healthz", status="405")] == 3
    assert samples[sample("ratelimit_block_total")] == 0
    assert samples[sample("quota_block_total", reason="exceeded")] == 0


async def test_draining_refuses_new_requests_first(start: GatewayFactory, upstream: Upstream) -> None:
    gateway = await start(TENANT_KEYS="a=sk-a")
    await gateway.app[keys.LIFECYCLE].drain()
    for key in ("sk-a", "sk-wrong"):  # before tenancy: even a bad key hears that we are leaving
        status, headers, body = await gateway.post(key=key)
        assert status == 503 and error_of(body)["code"] == "shutting_down" and headers["Retry-After"] == "1"
    async with gateway.client.get("/healthz") as r:
        assert r.status == 200
    async with gateway.client.get("/readyz") as r:
        assert r.status == 503
    async with gateway.client.get("/nope") as r:
        assert r.status == 404
    # SPEC §10: nothing new is accepted, the model list included (it calls the upstream too).
    async with gateway.client.get("/v1/models", headers={"Authorization": "Bearer sk-a"}) as r:
        assert r.status == 503 and error_of(await r.json())["code"] == "shutting_down"
    assert upstream.bodies == []


def raw_deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


@pytest.mark.parametrize(
    ("coding", "encode"),
    [("gzip", gzip.compress), ("deflate", zlib.compress), ("deflate", raw_deflate), ("identity", bytes)],
)
async def test_encoded_bodies_reach_the_upstream_decoded(
    start: GatewayFactory, upstream: Upstream, coding: str, encode: Callable[[bytes], bytes]
) -> None:
    gateway = await start()
    plain = json.dumps(chat(model="gpt-enc")).encode()
    status, _, reply = await gateway.post(data=encode(plain), **{"Content-Encoding": coding})
    assert status == 200 and reply["model"] == "gpt-enc"
    assert [json.loads(b) for b in upstream.bodies] == [json.loads(plain)]  # decoded; re-encoded compact


async def test_bad_bodies_are_refused_before_they_spend_a_token_or_quota(
    start: GatewayFactory, upstream: Upstream
) -> None:
    gateway = await start(MAX_BODY_BYTES="1000", RPS="0.001", BURST="1", DEFAULT_QUOTA="1")
    big = json.dumps(chat(model="x" * 1000)).encode()

    async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: the limit holds while reading
        yield big

    gz = {"Content-Encoding": "gzip"}
    cases: list[tuple[dict[str, Any], int, str]] = [
        ({"data": big}, 413, "request_too_large"),
        ({"data": chunked()}, 413, "request_too_large"),
        ({"data": gzip.compress(big), **gz}, 413, "request_too_large"),  # small on the wire, too big decoded
        ({"data": b'{"model": "m", "messages": []}', **gz}, 400, "invalid_content_encoding"),  # not gzip
        ({"data": gzip.compress(b'{"model": "m"}')[:-6], **gz}, 400, "invalid_content_encoding"),
        ({"data": b"{}", "Content-Encoding": "br"}, 415, "unsupported_content_encoding"),
        ({"data": b"{}", "Content-Encoding": "compress"}, 415, "unsupported_content_encoding"),
        ({"data": b"{not json"}, 400, "invalid_json"),
        ({"data": gzip.compress(b"\xff\xfe")} | gz, 400, "invalid_json"),
        ({"data": b"[1]"}, 400, "invalid_request"),
        ({"data": b'{"messages": []}'}, 400, "missing_model"),
        ({"data": b""}, 400, "invalid_json"),
    ]
    for request, expected, code in cases:
        status, headers, body = await gateway.post(**request)
        assert (status, error_of(body)["code"]) == (expected, code), request
        assert error_of(body)["type"] == "invalid_request_error" and headers["x-request-id"]
        assert "x-ratelimit-limit-requests" not in headers
        if status == 415:
            assert headers["Accept-Encoding"] == "gzip, deflate"
    status, headers, _ = await gateway.post()
    assert status == 200 and headers["x-ratelimit-remaining-requests"] == "0"  # no token, no quota spent before
    assert len(upstream.bodies) == 1
    lines = gateway.log_lines()
    assert [line["status"] for line in lines] == [expected for _, expected, _ in cases] + [200]


async def test_a_body_still_arriving_at_the_deadline_is_408(start: GatewayFactory, upstream: Upstream) -> None:
    """The read deadline holds for a body not yet all in (one that is, is read without one)."""
    gateway = await start(TIMEOUT_SECS="0.2")
    release = asyncio.Event()

    async def stalled() -> AsyncIterator[bytes]:  # chunked: half a body, then nothing until the answer
        yield b'{"model": "gpt-4o-mini", '
        await release.wait()

    try:
        status, _, body = await gateway.post(data=stalled())
    finally:
        release.set()
    assert (status, error_of(body)["code"]) == (408, "request_timeout")
    assert not upstream.bodies
    status, _, _ = await gateway.post()  # a whole body: no deadline to wait out
    assert status == 200


async def test_bodies_not_yet_sent_hold_no_share_of_the_body_budget(start: GatewayFactory, upstream: Upstream) -> None:
    """The budget of bodies being read counts bytes that arrived, not bytes announced: a
    request that declares the largest body (or a chunked one) and sends none of it held the
    whole of MAX_CONCURRENCY=1's budget until its read deadline, and every other request with
    a body was shed (503 `server overloaded`) meanwhile; sixteen such sockets did it without
    MAX_CONCURRENCY, from any client, before any rate limit."""
    gateway = await start(MAX_CONCURRENCY="1", TIMEOUT_SECS="30")
    server = gateway.client.server
    reader, writer = await asyncio.open_connection(server.host, server.port)
    try:
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Api-Key: silent\r\n"
            b"Content-Type: application/json\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n" % (8 * 1024 * 1024)
        )
        # The 100 is written just before the middlewares run: once it is here, that request waits
        # for its body inside the body middleware.
        assert (await reader.readline()).startswith(b"HTTP/1.1 100")
        status, _, body = await gateway.post(key="other")
        assert status == 200, body
    finally:
        writer.close()


async def test_one_tenants_stalled_uploads_take_no_more_than_half_the_body_budget(
    start: GatewayFactory, upstream: Upstream
) -> None:
    """Bodies are read before the rate limit: a tenant that sent almost all of many bodies and
    stopped held the whole budget (16 bodies of MAX_BODY_BYTES), and every other tenant's
    request, however small, was shed (503) until those reads' deadline. One sender holds half
    of it at most: its ninth stalled body is shed, the others' requests are served."""
    gateway = await start(MAX_BODY_BYTES="1000", TIMEOUT_SECS="30", TENANT_KEYS="mallory=sk-m,alice=sk-a")
    server = gateway.client.server
    body = b"x" * 999  # one byte short of its Content-Length: the read waits for the last
    connections = []
    try:
        for _ in range(17):
            reader, writer = await asyncio.open_connection(server.host, server.port)
            connections.append((reader, writer))
            writer.write(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Api-Key: sk-m\r\n"
                b"Content-Type: application/json\r\nExpect: 100-continue\r\nContent-Length: 1000\r\n\r\n"
            )
            assert (await reader.readline()).startswith(b"HTTP/1.1 100")
            await reader.readline()
            writer.write(body)
        # 999 bytes each: 8 fit in mallory's half (8,000 of 16,000), the other 9 are shed.
        answers = [asyncio.ensure_future(reader.readline()) for reader, _ in connections]
        shed = 0
        async with asyncio.timeout(10):
            for answer in asyncio.as_completed(answers):
                assert (await answer).startswith(b"HTTP/1.1 503")
                shed += 1
                if shed == 9:
                    break
        assert sum(answer.done() for answer in answers) == 9  # the held 8 are still waiting
        for answer in answers:
            answer.cancel()
        assert shed == 9
        status, _, answer = await gateway.post(key="sk-a")
        assert status == 200, answer
    finally:
        for _, writer in connections:
            writer.close()


async def test_structure_counts_run_one_at_a_time(
    start: GatewayFactory, upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A count of millions of tiny strings is bytecode by the step: three in threads at once
    made each turn of the event loop wait for the GIL behind each (/healthz 170-500 ms, and
    with QUOTA_FAIL_MODE=closed every tenant's request 503 store_unavailable for ~2 s, from
    three gzip bodies of 26 KB). One runs at a time; the others wait their turn."""
    running = peak = 0
    lock = threading.Lock()
    count = bodies.check_structure

    def counted(body: bytes) -> None:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.1)
        try:
            count(body)
        finally:
            with lock:
                running -= 1

    monkeypatch.setattr(bodies, "check_structure", counted)
    gateway = await start()
    hostile = b'{"model":"m","messages":[' + b",".join([b"[]"] * 100_001) + b"]}"
    answers = await asyncio.gather(*(gateway.post(data=hostile, key=f"k{i}") for i in range(3)))
    assert [status for status, _, _ in answers] == [400] * 3
    assert all(error_of(body)["code"] == "body_too_complex" for _, _, body in answers)
    assert peak == 1


async def test_expectations_reach_the_gateway_not_aiohttps_plain_text(
    start: GatewayFactory, upstream: Upstream
) -> None:
    """An `Expect` other than 100-continue got aiohttp's own 417, text/plain quoting the header,
    before any middleware: no JSON error (Anthropic's on /v1/messages), no x-request-id, no
    log line. It is ignored now, as RFC 9110 §10.1.1 allows. A 100-continue whose declared
    body is over the limit gets its 413 at once, without first being asked for the body."""
    gateway = await start(MAX_BODY_BYTES="1000")
    server = gateway.client.server

    async def exchange(head: bytes, body: bytes = b"") -> bytes:
        reader, writer = await asyncio.open_connection(server.host, server.port)
        try:
            writer.write(head + body)
            answer = await reader.readuntil(b"\r\n\r\n")  # (an unread body keeps the connection open)
            length = re.search(rb"Content-Length: (\d+)", answer)
            return answer + (await reader.readexactly(int(length.group(1))) if length else b"")
        finally:
            writer.close()

    payload = json.dumps(chat()).encode()
    answer = await exchange(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Api-Key: demo\r\nExpect: 200-ok\r\n"
        b"Content-Type: application/json\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % len(payload),
        payload,
    )
    assert answer.startswith(b"HTTP/1.1 200 "), answer
    assert b"\r\nx-request-id: " in answer
    assert gateway.log_lines()[-1]["status"] == 200

    answer = await exchange(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Api-Key: demo\r\nExpect: 100-continue\r\n"
        b"Content-Type: application/json\r\nConnection: close\r\nContent-Length: 5000\r\n\r\n"
    )
    assert answer.startswith(b"HTTP/1.1 413 "), answer
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"]["code"] == "request_too_large"
    assert len(upstream.bodies) == 1


async def test_a_refusal_known_from_the_headers_is_answered_without_a_100_first(
    start: GatewayFactory, upstream: Upstream
) -> None:
    """A `100-continue` client asks whether to send its body: with a bad key the answer is the
    401 alone. The 100 went out before any middleware ran, so the client uploaded its body (up
    to MAX_BODY_BYTES) only to be refused; a 404 too. With a good key the 100 still comes, once
    the body is to be read, and the request is served."""
    gateway = await start(TENANT_KEYS="acme=sk-acme-1")
    server = gateway.client.server
    payload = json.dumps(chat()).encode()

    async def first_answer(path: bytes, key: bytes) -> tuple[bytes, asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection(server.host, server.port)
        writer.write(
            b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + key + b"\r\n"
            b"Expect: 100-continue\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(payload)
        )
        return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5), reader, writer

    for path, key, status in ((b"/v1/chat/completions", b"sk-wrong", b"401"), (b"/v1/nowhere", b"sk-acme-1", b"404")):
        head, _, writer = await first_answer(path, key)
        writer.close()
        assert head.startswith(b"HTTP/1.1 " + status + b" "), head
    head, reader, writer = await first_answer(b"/v1/chat/completions", b"sk-acme-1")
    try:
        assert head == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(payload)
        assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).startswith(b"HTTP/1.1 200 ")
    finally:
        writer.close()
    assert len(upstream.bodies) == 1


async def test_refused_requests_name_their_model_in_log_and_metrics(start: GatewayFactory, upstream: Upstream) -> None:
    gateway = await start(RPS="0.001", BURST="2", DEFAULT_QUOTA="1", MAX_CONCURRENCY="1")
    assert (await gateway.post(chat(model="m-ok"), key="t"))[0] == 200
    assert (await gateway.post(chat(model="m-quota"), key="t"))[0] == 429  # a token left, no quota
    assert (await gateway.post(chat(model="m-rate"), key="t"))[0] == 429  # no token
    held = await held_stream(gateway, upstream, "other")
    assert (await gateway.post(chat(model="m-shed"), key="third"))[0] == 503
    upstream.release.set()
    await held.read()

    lines = {line["model"]: line for line in gateway.log_lines()}
    assert {model: line["status"] for model, line in lines.items()} == {
        "m-ok": 200,
        "m-quota": 429,
        "m-rate": 429,
        "gpt-4o-mini": 200,
        "m-shed": 503,
    }
    assert lines["m-quota"]["tenant"] == "t"
    samples = await gateway.samples()
    for model, status in (("m-quota", "429"), ("m-rate", "429"), ("m-shed", "503")):
        assert samples[sample("http_requests_total", model=model, route=CHAT, status=status)] == 1


async def boom(request: web.Request) -> web.StreamResponse:
    raise RuntimeError("kaboom: a secret detail")


async def test_an_unexpected_exception_is_a_500_in_openai_json_without_traceback(
    start: GatewayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    gateway = await start(routes=[("POST", "/test/boom", boom)])
    with caplog.at_level(logging.ERROR, logger="gateway"):
        async with gateway.client.post("/test/boom", json={}) as r:
            text = await r.text()
            assert r.status == 500 and r.headers["x-request-id"]
            assert r.content_type == "application/json"
    assert json.loads(text) == {
        "error": {"message": "internal gateway error", "type": "server_error", "code": "internal_error"}
    }
    assert "kaboom" not in text and "Traceback" not in text
    logged = [record for record in caplog.records if record.exc_info]
    assert len(logged) == 1 and "kaboom" in str(logged[0].exc_info[1])  # type: ignore[index]
    assert gateway.log_lines()[-1]["status"] == 500


async def test_http_exceptions_from_a_handler_are_openai_json(start: GatewayFactory) -> None:
    async def too_large(request: web.Request) -> web.StreamResponse:
        raise web.HTTPRequestEntityTooLarge(max_size=10, actual_size=20)

    async def teapot(request: web.Request) -> web.StreamResponse:
        raise web.HTTPBadRequest(reason="Bad thing")

    async def not_allowed(request: web.Request) -> web.StreamResponse:
        raise web.HTTPMethodNotAllowed("PATCH", ["GET", "PUT"])

    gateway = await start(
        routes=[("GET", "/test/large", too_large), ("GET", "/test/bad", teapot), ("GET", "/test/405", not_allowed)]
    )
    async with gateway.client.get("/test/405") as r:
        assert r.status == 405 and error_of(await r.json())["code"] == "method_not_allowed"
        assert r.headers["Allow"] == "GET,PUT"
    async with gateway.client.get("/test/large") as r:
        assert r.status == 413 and error_of(await r.json())["code"] == "request_too_large"
    async with gateway.client.get("/test/bad") as r:
        assert r.status == 400 and error_of(await r.json()) == {
            "message": "Bad thing",
            "type": "invalid_request_error",
            "code": "http_error",
        }


@pytest.mark.parametrize("failure", [RuntimeError("kaboom after start"), UpstreamStreamBroken()])
async def test_a_failure_after_the_headers_went_out_is_no_second_response(
    start: GatewayFactory, caplog: pytest.LogCaptureFixture, failure: Exception
) -> None:
    async def fails_mid_stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: one\n\n")
        raise failure

    gateway = await start(routes=[("GET", "/test/stream", fails_mid_stream)])
    with caplog.at_level(logging.ERROR, logger="gateway"):
        async with gateway.client.get("/test/stream") as r:
            assert r.status == 200
            assert await r.read() == b"data: one\n\n"  # the stream ends; no status line or JSON inside it
    assert any("after its response started" in record.getMessage() for record in caplog.records)
    assert gateway.log_lines()[-1]["status"] == 200  # what the client saw
    async with gateway.client.get("/healthz") as r:  # the connection and the server are fine
        assert r.status == 200


@dataclass
class Collector:
    """An OTLP/HTTP receiver on loopback, in a thread (the SDK exports from its own thread):
    (span name, attributes) of every span received."""

    url: str = ""
    spans: list[tuple[str, dict[str, Any]]] = field(default_factory=list)


@pytest.fixture
def collector() -> Iterator[Collector]:
    received = Collector()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # http.server calls it by this name
            data = self.rfile.read(int(self.headers["Content-Length"]))
            export = ExportTraceServiceRequest()
            export.ParseFromString(gzip.decompress(data) if self.headers.get("Content-Encoding") == "gzip" else data)
            for resource in export.resource_spans:
                for scope in resource.scope_spans:
                    for span in scope.spans:
                        attributes = {a.key: getattr(a.value, a.value.WhichOneof("value")) for a in span.attributes}
                        received.spans.append((span.name, attributes))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    received.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield received
    server.shutdown()
    server.server_close()


async def test_refused_requests_name_their_model_on_the_span_and_probes_are_untraced(
    start: GatewayFactory, collector: Collector
) -> None:
    gateway = await start(
        OTEL_EXPORTER_OTLP_ENDPOINT=collector.url, OTEL_BSP_SCHEDULE_DELAY="20", RPS="0.001", BURST="1"
    )
    assert (await gateway.post(chat(model="m-first"), key="t"))[0] == 200
    assert (await gateway.post(chat(model="m-limited"), key="t"))[0] == 429
    for path in ("/healthz", "/readyz", "/metrics"):
        async with gateway.client.get(path) as r:
            assert r.status == 200
    async with gateway.client.get("/nope") as r:
        assert r.status == 404

    deadline = time.monotonic() + 10
    while len([name for name, _ in collector.spans if name.startswith(("POST", "GET"))]) < 3:
        assert time.monotonic() < deadline, f"spans not exported: {collector.spans}"
        await asyncio.sleep(0.02)
    server_spans = {attributes.get("model"): (name, attributes) for name, attributes in collector.spans}
    name, refused = server_spans["m-limited"]
    assert name == f"POST {CHAT}" and refused["http.status_code"] == 429 and refused["error"] is True
    assert refused["tenant"] == "t"
    assert [name for name, _ in collector.spans if name.startswith("GET")] == ["GET other"]  # no probe spans
