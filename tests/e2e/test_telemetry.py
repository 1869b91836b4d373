"""Metrics, traces and logs from the real process, after real traffic of every outcome."""

from __future__ import annotations

import asyncio
import gzip
import json
import statistics
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from prometheus_client.parser import text_string_to_metric_families

from ..conftest import GatewayFactory
from ..harness import Gateway, Mock, free_port, wait_until

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
    assert s['tokens_total{kind="prompt",model="gpt-4o-mini"}'] == 9 * 3  # the 3 non-stream 200s report usage
    assert "redactions_total" in gateway.metrics()


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


class Collector:
    """An in-process OTLP/HTTP receiver."""

    def __init__(self) -> None:
        self.spans: list[dict[str, object]] = []

    async def receive(self, request: web.Request) -> web.Response:
        data = await request.read()
        if request.headers.get("Content-Encoding") == "gzip":
            data = gzip.decompress(data)
        export = ExportTraceServiceRequest()
        export.ParseFromString(data)
        for resource_spans in export.resource_spans:
            service = {a.key: a.value.string_value for a in resource_spans.resource.attributes}["service.name"]
            for scope in resource_spans.scope_spans:
                for span in scope.spans:
                    attrs: dict[str, object] = {}
                    for a in span.attributes:
                        value = a.value
                        attrs[a.key] = next(
                            getattr(value, f)
                            for f in ("string_value", "int_value", "bool_value", "double_value")
                            if value.HasField(f)
                        )
                    self.spans.append(
                        {
                            "name": span.name,
                            "trace_id": span.trace_id.hex(),
                            "span_id": span.span_id.hex(),
                            "parent": span.parent_span_id.hex(),
                            "kind": span.kind,
                            "attrs": attrs,
                            "service": service,
                        }
                    )
        return web.Response(status=200)


@pytest.fixture
async def collector() -> AsyncIterator[tuple[Collector, int]]:
    receiver = Collector()
    app = web.Application()
    app.router.add_post("/v1/traces", receiver.receive)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield receiver, port
    await runner.cleanup()


async def test_spans_reach_an_otlp_receiver(
    start_gateway: GatewayFactory, mock: Mock, collector: tuple[Collector, int]
) -> None:
    receiver, port = collector
    gateway = start_gateway(
        OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{port}",
        OTEL_SERVICE_NAME="gw-under-test",
        OTEL_BSP_SCHEDULE_DELAY="100",
        DEFAULT_QUOTA="1",
    )
    incoming_trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    async with aiohttp.ClientSession() as session:
        assert await call(session, gateway, "demo", traceparent=f"00-{incoming_trace}-00f067aa0ba902b7-01") == 200
        assert await call(session, gateway, "demo") == 429
        async with session.get(gateway.url + "/v1/nope") as r:
            assert r.status == 404
        async with session.get(gateway.url + "/healthz") as r:  # probes are not traced
            assert r.status == 200
        # a caller that did not sample its trace: not exported, but still propagated upstream
        unsampled = f"00-{'ab' * 16}-00f067aa0ba902b7-00"
        assert await call(session, gateway, "unsampled", traceparent=unsampled) == 200
        assert await call(session, gateway, "last") == 200  # exported after anything before it

    async def spans_arrived() -> bool:
        return any(s["attrs"].get("tenant") == "last" for s in receiver.spans)  # type: ignore[attr-defined]

    deadline = time.monotonic() + 10
    while not await spans_arrived():
        assert time.monotonic() < deadline, receiver.spans
        await asyncio.sleep(0.05)
    servers = [s for s in receiver.spans if s["kind"] == 2 and s["attrs"].get("tenant") != "last"]  # type: ignore[attr-defined]
    clients = [s for s in receiver.spans if s["kind"] == 3 and s["trace_id"] == incoming_trace]
    ok = next(s for s in servers if s["attrs"]["http.status_code"] == 200)  # type: ignore[index]
    assert ok["trace_id"] == incoming_trace  # the incoming traceparent was continued
    assert ok["service"] == "gw-under-test"
    assert ok["attrs"]["tenant"] == "demo" and ok["attrs"]["model"] == "gpt-4o-mini"  # type: ignore[index]
    assert ok["attrs"]["gen_ai.request.model"] == "gpt-4o-mini"  # type: ignore[index]
    assert ok["attrs"]["gen_ai.usage.input_tokens"] == 9  # type: ignore[index]
    assert "error" not in ok["attrs"]  # type: ignore[operator]
    rejected = next(s for s in servers if s["attrs"]["http.status_code"] == 429)  # type: ignore[index]
    assert rejected["attrs"]["error"] is True  # type: ignore[index]
    not_found = next(s for s in servers if s["attrs"]["http.status_code"] == 404)  # type: ignore[index]
    assert not_found["name"] == "GET other" and not_found["attrs"]["error"] is True  # type: ignore[index]
    assert len(servers) == 3  # no span for /healthz, none for the unsampled trace
    assert not [s for s in receiver.spans if s["trace_id"] == "ab" * 16]
    upstream_headers = [{k.lower(): v for k, v in r["headers"].items()} for r in mock.requests()]
    assert any(
        h["traceparent"].startswith(f"00-{'ab' * 16}-") and h["traceparent"].endswith("-00") for h in upstream_headers
    )
    [client] = clients
    assert client["trace_id"] == incoming_trace and client["parent"] == ok["span_id"]
    # the upstream got a traceparent naming the client span
    traceparent = {k.lower(): v for k, v in mock.requests()[0]["headers"].items()}["traceparent"]
    assert traceparent.split("-")[1] == incoming_trace
    assert traceparent.split("-")[2] == client["span_id"]
    # logs and traces join on the trace id
    [line] = wait_until(
        lambda: [e for e in gateway.log_lines() if e["tenant"] == "demo" and e["status"] == 200], what="a log line"
    )
    assert line["trace_id"] == incoming_trace


async def test_a_dead_collector_does_not_slow_requests(start_gateway: GatewayFactory, mock: Mock) -> None:
    plain = start_gateway(REDACT_KINDS="")
    traced = start_gateway(
        REDACT_KINDS="", OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{free_port()}", OTEL_BSP_SCHEDULE_DELAY="50"
    )

    async def median_latency(gateway: Gateway) -> float:
        timings = []
        async with aiohttp.ClientSession() as session:
            for _ in range(60):
                started = time.perf_counter()
                assert await call(session, gateway, "lat") == 200
                timings.append(time.perf_counter() - started)
        return statistics.median(timings[10:])

    base = await median_latency(plain)
    with_dead_collector = await median_latency(traced)
    assert with_dead_collector < base + 0.005, (base, with_dead_collector)


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
