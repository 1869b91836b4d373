"""Metrics, traces and logs from the real process, after real traffic of every outcome."""

from __future__ import annotations

import asyncio
import gzip
import http.client
import json
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan
from opentelemetry.proto.trace.v1.trace_pb2 import Status
from prometheus_client.parser import text_string_to_metric_families

from ..conftest import GatewayFactory
from ..harness import Gateway, Mock, base_env, free_port, gateway_argv, http_get, wait_until
from ..test_tracing import Received, decode

CHAT = "/v1/chat/completions"
ROUTE = '{route="/v1/chat/completions"}'


def body(stream: bool = False, model: str = "gpt-4o-mini") -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": "ping"}], "stream": stream}


async def call(session: aiohttp.ClientSession, gateway: Gateway, key: str, stream: bool = False, **headers: str) -> int:
    async with session.post(gateway.url + CHAT, json=body(stream), headers={"X-Api-Key": key, **headers}) as r:
        await r.read()
        return r.status


def samples(gateway: Gateway) -> dict[str, float]:
    """Every sample as 'name{labels}' → value, from a real Prometheus text parser."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(gateway.metrics()):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out


async def test_every_metric_after_a_mix_of_outcomes(start_gateway: GatewayFactory, mock: Mock) -> None:
    gateway = start_gateway(
        TENANT_QUOTAS="quota=1",
        RPS="1",
        BURST="1",
        MAX_CONCURRENCY="2",
        TIMEOUT_SECS="1",
        REDACT_KINDS="email",
    )
    slow = {"x-stainless-mock-chunk-delay-ms": "300", "x-stainless-mock-reply": "a b c d e"}
    async with aiohttp.ClientSession() as session:
        assert await call(session, gateway, "ok-1") == 200
        assert await call(session, gateway, "ok-2", stream=True) == 200
        assert await call(session, gateway, "quota") == 200
        assert await call(session, gateway, "quota-2") == 200
        assert await call(session, gateway, "quota-2") == 429  # rate limit (BURST=1)
        await asyncio.sleep(1.1)
        assert await call(session, gateway, "quota") == 429  # quota (limit 1)
        assert await call(session, gateway, "timeout", **{"x-stainless-mock-latency-ms": "2000"}) == 504
        assert await call(session, gateway, "badgw", **{"x-stainless-mock-status": "401"}) == 502
        # two slow streams hold both slots: the third request is shed
        held = [
            await session.post(gateway.url + CHAT, json=body(True), headers={"X-Api-Key": f"hold-{i}", **slow})
            for i in range(2)
        ]
        for r in held:
            await r.content.readline()
        assert await call(session, gateway, "shed") == 503
        for r in held:
            await r.read()
        # a client that hangs up mid-stream
        gone = await session.post(gateway.url + CHAT, json=body(True), headers={"X-Api-Key": "gone", **slow})
        await gone.content.readline()
        gone.close()
        async with session.get(gateway.url + "/v1/nope") as r:  # unknown paths share one label
            assert r.status == 404
        async with session.get(gateway.url + CHAT) as r:
            assert r.status == 405
    wait_until(lambda: samples(gateway)["inflight_requests"] == 0, what="inflight back to 0")
    s = samples(gateway)
    model = 'model="gpt-4o-mini",route="/v1/chat/completions"'
    assert s[f'http_requests_total{{{model},status="200"}}'] == 6
    assert s[f'http_requests_total{{{model},status="504"}}'] == 1
    assert s[f'http_requests_total{{{model},status="502"}}'] == 1
    assert s[f'http_requests_total{{{model},status="499"}}'] == 1
    # refused by admission, but the body was read first: the label names its model (SPEC §8)
    assert s[f'http_requests_total{{{model},status="429"}}'] == 2
    assert s[f'http_requests_total{{{model},status="503"}}'] == 1
    assert s[f"requests_total{ROUTE}"] == 13
    assert s['requests_total{route="other"}'] == 1
    assert s['http_requests_total{model="unknown",route="other",status="404"}'] == 1
    assert s['http_requests_total{model="unknown",route="/v1/chat/completions",status="405"}'] == 1
    assert s['quota_block_total{reason="exceeded"}'] == 1
    assert s["ratelimit_block_total"] == 1
    for event, count in {
        "timeout": 1,
        "load_shed": 1,
        "upstream_error": 1,
        "client_disconnect": 1,
        "store_error": 0,
    }.items():
        assert s[f'cb_events_total{{event="{event}"}}'] == count, event
    assert s[f"request_duration_seconds_count{ROUTE}"] == 13
    assert s["upstream_ttfb_seconds_count"] == 8  # every request that got an upstream answer in time
    # Buckets are cumulative: the 2 s timeout lands above 1 s, every request at or below +Inf.
    assert s[f'request_duration_seconds_bucket{{le="+Inf",{ROUTE[1:-1]}}}'] == 13
    assert s[f'request_duration_seconds_bucket{{le="0.5",{ROUTE[1:-1]}}}'] <= 11
    assert s['upstream_ttfb_seconds_bucket{le="+Inf"}'] == 8
    assert s["upstream_ttfb_seconds_sum"] > 0
    # the 3 non-stream 200s and the 3 streams (the gateway asks every stream for usage) report it
    assert s['tokens_total{kind="prompt",model="gpt-4o-mini"}'] == 9 * 6
    assert "redactions_total" in gateway.metrics()


async def test_every_proxied_route_has_its_latency_histogram(start_gateway: GatewayFactory, mock: Mock) -> None:
    # Whole-request latency on each API, under its own route (it was recorded for chat only);
    # probes and scrapes are not timed.
    gateway = start_gateway(RPS="0")
    asks = {
        "/v1/chat/completions": body(),
        "/v1/messages": {
            "model": "claude-sonnet-4-5",
            "max_tokens": 16,
            "messages": [{"role": "user", "content": "hi"}],
        },
        "/v1/responses": {"model": "gpt-4o-mini", "input": "hi"},
        "/v1/embeddings": {"model": "text-embedding-3-small", "input": "hi"},
    }
    async with aiohttp.ClientSession() as session:
        for path, ask in asks.items():
            for _ in range(2):
                async with session.post(gateway.url + path, json=ask, headers={"X-Api-Key": "demo"}) as r:
                    await r.read()
                    assert r.status == 200, path
        async with session.get(gateway.url + "/healthz") as r:
            await r.read()
    s = samples(gateway)
    for path in asks:
        assert s[f'request_duration_seconds_count{{route="{path}"}}'] == 2, path
    assert 'request_duration_seconds_count{route="/healthz"}' not in s


async def test_model_labels_are_bounded(start_gateway: GatewayFactory, mock: Mock) -> None:
    gateway = start_gateway(MODEL_LABEL_LIMIT="20", REDACT_KINDS="")
    async with aiohttp.ClientSession() as session:

        async def one(i: int) -> None:
            async with session.post(
                gateway.url + CHAT, json=body(model=f"model-{i}-{time.time()}"), headers={"X-Api-Key": "m"}
            ) as r:
                await r.read()

        for start in range(0, 1000, 100):
            await asyncio.gather(*(one(i) for i in range(start, start + 100)))
    models = {
        sample.labels["model"]
        for family in text_string_to_metric_families(gateway.metrics())
        for sample in family.samples
        if "model" in sample.labels
    }
    assert len(models - {"unknown"}) <= 21 and "other" in models  # unknown: requests without a body


HOSTILE_MODELS = [
    'a"b',
    'x"} 1\nevil_metric{a="b',
    'x\\"} 1\nevil_metric 1\n#',
    "line\nbreak",
    "sp ace",
    "é",
    "m" * 5000,
]


async def test_hostile_model_names_cannot_break_or_forge_metrics(start_gateway: GatewayFactory, mock: Mock) -> None:
    gateway = start_gateway(REDACT_KINDS="")
    before = {family.name for family in text_string_to_metric_families(gateway.metrics())}
    async with aiohttp.ClientSession() as session:
        for model in [*HOSTILE_MODELS, "gpt-4o-mini"]:
            async with session.post(gateway.url + CHAT, json=body(model=model), headers={"X-Api-Key": "k"}) as r:
                assert r.status == 200, await r.text()
    families = list(text_string_to_metric_families(gateway.metrics()))  # raises if unparsable
    assert {family.name for family in families} == before  # no family added
    models = {s.labels["model"] for family in families for s in family.samples if "model" in s.labels}
    assert models <= {"gpt-4o-mini", "other", "unknown"}
    s = samples(gateway)
    assert s['http_requests_total{model="other",route="/v1/chat/completions",status="200"}'] == len(HOSTILE_MODELS)
    assert s['http_requests_total{model="gpt-4o-mini",route="/v1/chat/completions",status="200"}'] == 1


@dataclass
class Collector:
    """An OTLP/HTTP receiver on the test's loop; what it gets is decoded with opentelemetry-proto."""

    port: int
    spans: list[Received] = field(default_factory=list)

    async def receive(self, request: web.Request) -> web.Response:
        data = await request.read()
        if request.headers.get("Content-Encoding") == "gzip":
            data = gzip.decompress(data)
        self.spans.extend(decode(data))
        return web.Response(status=200)

    async def wait_for(self, tenant: str) -> Received:
        deadline = time.monotonic() + 10
        while True:
            found = [s for s in self.spans if s.attrs.get("tenant") == tenant]
            if found:
                return found[0]
            assert time.monotonic() < deadline, f"no span of {tenant} in {self.spans}"
            await asyncio.sleep(0.02)


@pytest.fixture
async def collector() -> AsyncIterator[Collector]:
    receiver = Collector(free_port())
    app = web.Application()
    app.router.add_post("/v1/traces", receiver.receive)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", receiver.port).start()
    yield receiver
    await runner.cleanup()


async def test_spans_reach_an_otlp_receiver(start_gateway: GatewayFactory, mock: Mock, collector: Collector) -> None:
    gateway = start_gateway(
        OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{collector.port}",
        OTEL_SERVICE_NAME="gw-under-test",
        OTEL_BSP_SCHEDULE_DELAY="100",
        DEFAULT_QUOTA="2",
        TIMEOUT_SECS="1",
    )
    incoming_trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    async with aiohttp.ClientSession() as session:
        assert await call(session, gateway, "demo", traceparent=f"00-{incoming_trace}-00f067aa0ba902b7-01") == 200
        assert await call(session, gateway, "demo", **{"x-stainless-mock-latency-ms": "1500"}) == 504
        assert await call(session, gateway, "demo") == 429
        async with session.get(gateway.url + "/v1/nope") as r:
            assert r.status == 404
        async with session.get(gateway.url + "/healthz") as r:  # probes are not traced
            assert r.status == 200
        # a caller that did not sample its trace: not exported, but still propagated upstream
        unsampled = f"00-{'ab' * 16}-00f067aa0ba902b7-00"
        assert await call(session, gateway, "unsampled", traceparent=unsampled) == 200
        assert await call(session, gateway, "last") == 200  # exported after anything before it

    await collector.wait_for("last")
    servers = [s for s in collector.spans if s.kind == PbSpan.SPAN_KIND_SERVER and s.attrs.get("tenant") != "last"]
    by_status = {s.attrs["http.status_code"]: s for s in servers}
    assert len(servers) == len(by_status) == 4  # no span for /healthz, none for the unsampled trace
    ok, timed_out, rejected, not_found = (by_status[status] for status in (200, 504, 429, 404))
    assert ok.trace_id == incoming_trace and ok.parent == "00f067aa0ba902b7"  # the caller's trace continued
    assert ok.service == "gw-under-test" and ok.name == f"POST {CHAT}"
    assert ok.attrs["tenant"] == "demo" and ok.attrs["model"] == "gpt-4o-mini"
    assert ok.attrs["gen_ai.request.model"] == "gpt-4o-mini"
    assert ok.attrs["gen_ai.usage.input_tokens"] == 9
    assert "error" not in ok.attrs and ok.status == Status.STATUS_CODE_UNSET
    for failed in (timed_out, rejected, not_found):
        assert failed.attrs["error"] is True and failed.status == Status.STATUS_CODE_ERROR
    assert rejected.attrs["model"] == "gpt-4o-mini"  # refused by admission, still naming its model
    assert not_found.name == "GET other"
    assert not [s for s in collector.spans if s.trace_id == "ab" * 16]
    upstream_headers = [{k.lower(): v for k, v in r["headers"].items()} for r in mock.requests()]
    assert any(
        h["traceparent"].startswith(f"00-{'ab' * 16}-") and h["traceparent"].endswith("-00") for h in upstream_headers
    )
    # one client span per upstream call, the child of its server span
    clients = {s.parent: s for s in collector.spans if s.kind == PbSpan.SPAN_KIND_CLIENT}
    client = clients[ok.span_id]
    assert client.trace_id == incoming_trace and client.name == "chat gpt-4o-mini"
    assert client.status == Status.STATUS_CODE_UNSET
    failed_call = clients[timed_out.span_id]
    assert failed_call.status == Status.STATUS_CODE_ERROR and [e for e, _ in failed_call.events] == ["exception"]
    assert rejected.span_id not in clients and not_found.span_id not in clients
    # the upstream got a traceparent naming the client span
    assert upstream_headers[0]["traceparent"] == f"00-{incoming_trace}-{client.span_id}-01"
    # logs and traces join on the trace id
    [line] = wait_until(
        lambda: [e for e in gateway.log_lines() if e["tenant"] == "demo" and e["status"] == 200], what="a log line"
    )
    assert line["trace_id"] == incoming_trace


async def test_each_route_names_its_genai_operation_and_system(
    start_gateway: GatewayFactory, mock: Mock, collector: Collector
) -> None:
    # SPEC §11/§12: GenAI span attributes (OpenTelemetry's conventions). An embeddings call is
    # the operation `embeddings`, not `chat`: the span a trace viewer shows for it was
    # `chat text-embedding-3-small`, filed with the chat completions.
    gateway = start_gateway(
        OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{collector.port}", OTEL_BSP_SCHEDULE_DELAY="100"
    )
    calls = {
        "embed": ("/v1/embeddings", {"model": "text-embedding-3-small", "input": "hi"}),
        "claude": (
            "/v1/messages",
            {"model": "claude-x", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]},
        ),
        "chat": (CHAT, body()),
    }
    async with aiohttp.ClientSession() as session:
        for tenant, (path, payload) in calls.items():
            async with session.post(gateway.url + path, json=payload, headers={"X-Api-Key": tenant}) as r:
                assert r.status == 200, await r.text()
    servers = {tenant: await collector.wait_for(tenant) for tenant in calls}
    clients = {s.parent: s for s in collector.spans if s.kind == PbSpan.SPAN_KIND_CLIENT}
    embed, claude, chat = (servers[tenant] for tenant in calls)
    assert embed.attrs["gen_ai.operation.name"] == "embeddings"
    assert clients[embed.span_id].name == "embeddings text-embedding-3-small"
    assert clients[embed.span_id].attrs["gen_ai.system"] == "openai"
    assert claude.attrs["gen_ai.operation.name"] == chat.attrs["gen_ai.operation.name"] == "chat"
    assert clients[claude.span_id].name == "chat claude-x"
    assert clients[claude.span_id].attrs["gen_ai.system"] == "anthropic"
    assert clients[chat.span_id].name == "chat gpt-4o-mini"


async def test_spans_to_a_loopback_collector_bypass_the_egress_proxy(
    start_gateway: GatewayFactory, mock: Mock, collector: Collector
) -> None:
    """A loopback collector is reached directly, as a loopback upstream is, however the
    environment names a proxy: `requests`' own reading sent the spans to HTTP_PROXY (here a
    socket that never answers, so they never came)."""
    with socket.socket() as proxy:
        proxy.bind(("127.0.0.1", 0))
        proxy.listen(16)
        proxy.setblocking(False)
        proxy_url = f"http://127.0.0.1:{proxy.getsockname()[1]}"
        gateway = start_gateway(
            OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{collector.port}",
            OTEL_BSP_SCHEDULE_DELAY="100",
            OTEL_EXPORTER_OTLP_TIMEOUT="2",
            HTTP_PROXY=proxy_url,
            http_proxy=proxy_url,
        )
        async with aiohttp.ClientSession() as session:
            assert await call(session, gateway, "direct") == 200
        await collector.wait_for("direct")
        with pytest.raises(BlockingIOError):
            proxy.accept()  # nothing ever connected to the proxy


@pytest.mark.timeout(60)
async def test_a_collector_that_never_answers_holds_up_neither_requests_nor_shutdown(
    start_gateway: GatewayFactory, mock: Mock
) -> None:
    """The collector accepts connections and never answers, and the export timeout is ten
    minutes: requests must not wait on the export, and SIGTERM must not either (the hang
    guard above, not a timing, is what fails otherwise)."""
    with socket.socket() as sink:
        sink.bind(("127.0.0.1", 0))
        sink.listen(128)
        gateway = start_gateway(
            REDACT_KINDS="",
            OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{sink.getsockname()[1]}",
            OTEL_EXPORTER_OTLP_TIMEOUT="600",
            OTEL_BSP_SCHEDULE_DELAY="10",
            OTEL_BSP_MAX_EXPORT_BATCH_SIZE="4",
            OTEL_BSP_MAX_QUEUE_SIZE="16",  # full soon: the rest is dropped, never waited on
        )
        async with aiohttp.ClientSession() as session:
            for start in range(0, 300, 50):
                statuses = await asyncio.gather(*(call(session, gateway, f"k{i}") for i in range(start, start + 50)))
                assert statuses == [200] * 50
        gateway.process.signal(signal.SIGTERM)
        assert gateway.process.wait(timeout=30) == 0


def test_log_lines_are_json_with_the_request_fields(shared_gateway: Gateway, mock: Mock) -> None:
    import urllib.request

    request = urllib.request.Request(
        shared_gateway.url + CHAT,
        data=json.dumps(body()).encode(),
        headers={"X-Api-Key": "logged", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request) as response:
        request_id = response.headers["x-request-id"]
    line = wait_until(
        lambda: [e for e in shared_gateway.log_lines() if e["request_id"] == request_id], what="the log line"
    )[0]
    assert {"ts", "request_id", "tenant", "model", "status", "duration_ms", "upstream_ttfb_ms"} <= set(line)
    assert line["tenant"] == "logged" and line["status"] == 200


@pytest.mark.timeout(90)
def test_a_stdout_nobody_reads_holds_up_neither_requests_nor_shutdown(tmp_path: Path) -> None:
    """SPEC §10's log lines go to stdout; a reader that stops reading (a stuck journald or log
    shipper, a paused pager) must not stop the gateway. The lines were written from the event
    loop: once the pipe's 64 KiB were full the write blocked it, and every request, /healthz
    included, hung (after ~160 requests here), and so did SIGTERM. Past MAX_PENDING_BYTES
    (4 MiB) of lines waiting, new lines are dropped: an operator sees it in /metrics
    (`log_lines_dropped_total`), not only by missing lines in the log."""
    port = free_port()
    env = base_env() | {"LISTEN_ADDR": f"127.0.0.1:{port}", "RPS": "0", "DEFAULT_QUOTA": "1000000"}
    process = subprocess.Popen(
        gateway_argv(), env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )  # its stdout never read
    try:

        def dropped() -> float | None:
            assert process.poll() is None, "the gateway exited"
            try:
                status, text = http_get(port, "/metrics")
            except OSError:
                return None
            assert status == 200
            values = {
                sample.name: sample.value
                for family in text_string_to_metric_families(text.decode())
                for sample in family.samples
            }
            return values.get("log_lines_dropped_total")

        assert wait_until(lambda: dropped() is not None, what="the gateway's log_lines_dropped_total") is not None
        assert dropped() == 0
        # ~7 KiB a line; the writer thread may have taken a batch before it blocked, on top of
        # the 4 MiB held: send until lines are dropped (at most ~21 MiB).
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        for sent in range(1, 3001):
            connection.request("GET", "/nope-" + "x" * 7000)
            response = connection.getresponse()
            response.read()
            assert response.status == 404
            if sent % 200 == 0 and (dropped() or 0) > 0:
                break
        connection.close()
        assert wait_until(lambda: (dropped() or 0) > 0, what="dropped lines counted") > 0
        assert http_get(port, "/healthz", timeout=1) == (200, b"ok")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
    finally:
        process.kill()
        process.wait()


async def test_a_stream_refused_by_admission_is_logged_as_a_stream(start_gateway: GatewayFactory, mock: Mock) -> None:
    """A stream over the quota was logged with "stream": false: the flag was read only once
    the request reached the upstream step, as if the client had asked for JSON."""
    gateway = start_gateway(DEFAULT_QUOTA="1", RPS="0")
    async with aiohttp.ClientSession() as session:
        for _ in range(2):
            async with session.post(gateway.url + CHAT, json=body(stream=True), headers={"X-Api-Key": "q"}) as response:
                await response.read()
        assert response.status == 429
    lines = wait_until(lambda: [e for e in gateway.log_lines() if e["path"] == CHAT][1:], what="two log lines")
    assert [(line["status"], line["stream"]) for line in lines] == [(429, True)]


async def test_trace_context_reaches_the_upstream_without_a_collector(
    start_gateway: GatewayFactory, mock: Mock
) -> None:
    """SPEC §2: an unset OTEL_EXPORTER_OTLP_ENDPOINT means no export, not a broken trace. The
    caller's trace still reaches the upstream (its id, sampled flag and tracestate kept; the
    parent id the gateway's, never the client's header as it came: tests/e2e/test_adversarial)
    and the log line names it; a request without one still sends one (§5, §8): a new
    trace, unsampled, that nothing records (its log line names none)."""
    gateway = start_gateway()
    incoming = f"00-{'4b' * 16}-00f067aa0ba902b7-01"
    async with aiohttp.ClientSession() as session:
        assert await call(session, gateway, "traced", traceparent=incoming, tracestate="vendor=1") == 200
        assert await call(session, gateway, "untraced") == 200
    traced, untraced = ({k.lower(): v for k, v in r["headers"].items()} for r in mock.requests())
    version, trace_id, span_id, flags = traced["traceparent"].split("-")
    assert (version, trace_id, flags) == ("00", "4b" * 16, "01") and traced["tracestate"] == "vendor=1"
    assert span_id != "00f067aa0ba902b7" and int(span_id, 16)
    version, trace_id, span_id, flags = untraced["traceparent"].split("-")
    assert (version, flags) == ("00", "00") and len(trace_id) == 32 and len(span_id) == 16
    assert int(trace_id, 16) and int(span_id, 16)
    lines = wait_until(lambda: [e for e in gateway.log_lines() if e.get("tenant") in ("traced", "untraced")])
    assert {e["tenant"]: e.get("trace_id") for e in lines} == {"traced": "4b" * 16, "untraced": None}
