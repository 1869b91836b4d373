"""Metrics (aioprometheus), traces (OpenTelemetry, OTLP/HTTP) and the JSON request log.

The only module that touches aioprometheus or OpenTelemetry. Metrics live in a private
registry built per app. Spans are exported in batches from a background thread, so a
slow or dead collector never delays a request. Tenants and keys are never label values,
and client-chosen label values (the model) are capped.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import IO, Any

import orjson
from aioprometheus.collectors import Counter, Gauge, Histogram, Registry
from aioprometheus.histogram import Histogram as BucketCounts
from aioprometheus.renderer import render

from .models import RequestState

CHAT_ROUTE = "/v1/chat/completions"
# LLM latencies run from milliseconds (errors, cache hits) to minutes (long generations).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, float("inf"))
CB_EVENTS = ("timeout", "load_shed", "store_error", "upstream_error", "client_disconnect")
OTHER = "other"


class BoundedLabels:
    """Client-chosen label values: the first `limit` distinct ones, then `other`."""

    __slots__ = ("_limit", "_seen")

    def __init__(self, limit: int) -> None:
        self._seen: set[str] = set()
        self._limit = limit

    def __call__(self, value: str | None) -> str:
        if not value:
            return "unknown"
        if value in self._seen:
            return value
        if len(self._seen) >= self._limit or len(value) > 100:
            return OTHER
        self._seen.add(value)
        return value


class _Family:
    """One aioprometheus collector fed from a plain dict of label-value tuples.

    The request path only bumps a dict entry; label dicts are built and handed to
    aioprometheus (which serialises them per call) only when /metrics is scraped.
    """

    __slots__ = ("collector", "counts", "names")

    def __init__(self, collector: Counter | Gauge, *names: str) -> None:
        self.collector = collector
        self.names = names
        self.counts: dict[tuple[str, ...], float] = {}

    def add(self, key: tuple[str, ...], amount: float = 1) -> None:
        counts = self.counts
        counts[key] = counts.get(key, 0) + amount

    def publish(self) -> None:
        for key, value in self.counts.items():
            self.collector.set(dict(zip(self.names, key, strict=True)), value)


class _Latencies:
    """A histogram with fixed labels: one bisect per observation; the cumulative bucket
    counts aioprometheus renders are worked out only when /metrics is scraped."""

    __slots__ = ("_counts", "_sum", "_target")

    def __init__(self, target: BucketCounts) -> None:
        self._target = target
        self._counts = [0] * len(LATENCY_BUCKETS)
        self._sum = 0.0

    def observe(self, seconds: float) -> None:
        self._counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self._sum += seconds

    def publish(self) -> None:
        target = self._target
        for bound, count in zip(LATENCY_BUCKETS, itertools.accumulate(self._counts), strict=True):
            target.buckets[bound] = count
        target.sum = self._sum
        target.observations = sum(self._counts)


class Metrics:
    def __init__(self, model_label_limit: int) -> None:
        self.registry = r = Registry()

        def family(kind: type[Counter] | type[Gauge], name: str, doc: str, *labels: str) -> _Family:
            return _Family(kind(name, doc, registry=r), *labels)

        self.requests = family(Counter, "requests_total", "Requests received, by route.", "route")
        self.responses = family(
            Counter, "http_requests_total", "Responses sent, by route, model and status.", "route", "model", "status"
        )
        self.inflight = family(Gauge, "inflight_requests", "Chat requests in flight (streams until their last byte).")
        self.redactions = family(
            Counter, "redactions_total", "PII redactions, by kind and direction.", "kind", "direction"
        )
        self.quota_blocks = family(Counter, "quota_block_total", "Requests refused by the tenant quota.", "reason")
        self.cb_events = family(
            Counter, "cb_events_total", "Circuit-breaker events: timeouts, load shedding, store errors.", "event"
        )
        self.ratelimit_blocks = family(Counter, "ratelimit_block_total", "Requests refused by the rate limit.")
        self.tokens = family(
            Counter, "tokens_total", "Tokens reported by the upstream, by kind and model.", "kind", "model"
        )
        self._families = (
            self.requests,
            self.responses,
            self.inflight,
            self.redactions,
            self.quota_blocks,
            self.cb_events,
            self.ratelimit_blocks,
            self.tokens,
        )
        duration = Histogram(
            "request_duration_seconds",
            "Whole-request latency (streams until the last byte).",
            registry=r,
            buckets=LATENCY_BUCKETS,
        )
        ttfb = Histogram(
            "upstream_ttfb_seconds",
            "Upstream time to first byte (first event for streams).",
            registry=r,
            buckets=LATENCY_BUCKETS,
        )
        # Fixed label sets: aioprometheus' bucket aggregators, filled from _Latencies on scrape.
        duration_counts, ttfb_counts = BucketCounts(*LATENCY_BUCKETS), BucketCounts(*LATENCY_BUCKETS)
        duration.set_value({"route": CHAT_ROUTE}, duration_counts)
        ttfb.set_value({}, ttfb_counts)
        self._duration, self._ttfb = _Latencies(duration_counts), _Latencies(ttfb_counts)
        self.model_label = BoundedLabels(model_label_limit)
        # Every family shows from the start, at zero.
        self.inflight.add((), 0)
        self.quota_blocks.add(("exceeded",), 0)
        self.ratelimit_blocks.add((), 0)
        for event in CB_EVENTS:
            self.cb_events.add((event,), 0)
        self.requests.add((CHAT_ROUTE,), 0)

    def request_started(self, route: str) -> None:
        self.requests.add((route,))

    def chat_started(self) -> None:
        self.inflight.add((), 1)

    def chat_finished(self) -> None:
        self.inflight.add((), -1)

    def response_sent(self, route: str, model: str | None, status: int, seconds: float) -> None:
        self.responses.add((route, self.model_label(model), str(status)))
        if route == CHAT_ROUTE:
            self._duration.observe(seconds)

    def upstream_first_byte(self, seconds: float) -> None:
        self._ttfb.observe(seconds)

    def cb_event(self, event: str) -> None:
        self.cb_events.add((event,))

    def quota_blocked(self) -> None:
        self.quota_blocks.add(("exceeded",))

    def rate_limited(self) -> None:
        self.ratelimit_blocks.add(())

    def redacted(self, kind: str, direction: str) -> None:
        self.redactions.add((kind, direction))

    def tokens_used(self, model: str | None, prompt: int, completion: int) -> None:
        label = self.model_label(model)
        self.tokens.add(("prompt", label), prompt)
        self.tokens.add(("completion", label), completion)

    def render(self, accept: list[str]) -> tuple[bytes, dict[str, str]]:
        for family in self._families:
            family.publish()
        self._duration.publish()
        self._ttfb.publish()
        return render(self.registry, accept)


class Tracing:
    """Server and client spans, W3C propagation, OTLP/HTTP export in batches."""

    def __init__(self, endpoint: str, service_name: str) -> None:
        # Imported here so a gateway without tracing does not pay for the SDK at start-up.
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace import SpanKind, Status, StatusCode, set_span_in_context
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        url = endpoint.rstrip("/")
        if not url.endswith("/v1/traces"):
            url += "/v1/traces"
        # The sampler comes from the standard OTEL_TRACES_SAMPLER(_ARG) variables.
        self._provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        self._provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=url, timeout=5)))
        self._tracer = self._provider.get_tracer("secure-llm-gateway")
        self._propagator = TraceContextTextMapPropagator()
        self._server_kind = SpanKind.SERVER
        self._client_kind = SpanKind.CLIENT
        self._set_in_context = set_span_in_context
        self._error_status = Status(StatusCode.ERROR)

    def start_server_span(self, method: str, route: str, path: str, headers: Mapping[str, str]) -> Any:
        """Named by the bounded route ("other" for unknown paths); the raw path is an attribute."""
        parent = self._propagator.extract(headers)
        return self._tracer.start_span(
            f"{method} {route}",
            context=parent,
            kind=self._server_kind,
            attributes={"http.request.method": method, "url.path": path},
        )

    def end_server_span(self, span: Any, state: RequestState, status: int) -> None:
        attrs: dict[str, Any] = {"http.status_code": status, "http.response.status_code": status}
        if state.tenant is not None:
            attrs["tenant"] = state.tenant.public_id
        if state.model is not None:
            attrs["model"] = state.model
            attrs["gen_ai.request.model"] = state.model
            attrs["gen_ai.operation.name"] = "chat"
        if state.response_model is not None:
            attrs["gen_ai.response.model"] = state.response_model
        if state.usage is not None:
            attrs["gen_ai.usage.input_tokens"] = state.usage.prompt_tokens
            attrs["gen_ai.usage.output_tokens"] = state.usage.completion_tokens
        attrs["request.id"] = state.request_id
        if status >= 400:
            attrs["error"] = True
            span.set_status(self._error_status)
        span.set_attributes(attrs)
        span.end()

    def trace_id(self, span: Any) -> str:
        return format(span.get_span_context().trace_id, "032x")

    @contextmanager
    def client_span(self, server_span: Any, model: str | None) -> Iterator[dict[str, str]]:
        """A client span around the upstream call; yields the headers that carry it."""
        name = f"chat {model}" if model else "chat"
        attributes = {"gen_ai.request.model": model} if model else None
        # Not made the current span: nothing reads the context, and attaching it costs.
        span = self._tracer.start_span(
            name, context=self._set_in_context(server_span), kind=self._client_kind, attributes=attributes
        )
        try:
            carrier: dict[str, str] = {}
            self._propagator.inject(carrier, context=self._set_in_context(span))
            yield carrier
        except BaseException as exc:
            span.record_exception(exc)
            span.set_status(self._error_status)
            raise
        finally:
            span.end()

    def shutdown(self) -> None:
        self._provider.shutdown()


class RequestLog:
    """One JSON line per request on stdout; never prompt or completion text, never a key.

    Lines are buffered and flushed at most every 100 ms, so a slow stdout reader costs one
    write per interval rather than one per request.
    """

    def __init__(self, stream: IO[bytes] | None = None) -> None:
        self._stream = stream if stream is not None else sys.stdout.buffer
        self._buffer = bytearray()
        self._flush_handle: asyncio.TimerHandle | None = None
        self._second = -1
        self._timestamp = ""

    def write(
        self, state: RequestState, method: str, path: str, status: int, seconds: float, trace_id: str | None
    ) -> None:
        now = time.time()
        if int(now) != self._second:  # formatted once a second, not once a request
            self._second = int(now)
            self._timestamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now))
        record: dict[str, object] = {
            "ts": f"{self._timestamp}.{int(now * 1000) % 1000:03d}Z",
            "request_id": state.request_id,
            "method": method,
            "path": path,
            "tenant": state.tenant.public_id if state.tenant is not None else None,
            "model": state.model,
            "stream": state.stream,
            "status": status,
            "duration_ms": round(seconds * 1000, 2),
            "upstream_ttfb_ms": round(state.upstream_ttfb * 1000, 2) if state.upstream_ttfb is not None else None,
        }
        if trace_id is not None:
            record["trace_id"] = trace_id
        self._buffer += orjson.dumps(record)
        self._buffer += b"\n"
        if self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_later(0.1, self.flush)

    def flush(self) -> None:
        self._flush_handle = None
        if self._buffer:
            data, self._buffer = bytes(self._buffer), bytearray()
            try:
                self._stream.write(data)
                self._stream.flush()
            except (OSError, ValueError):
                pass  # stdout gone (closed pipe): logging must never fail a request


class Telemetry:
    """What the telemetry middleware and the proxy use; tracing is optional."""

    def __init__(self, metrics: Metrics, tracing: Tracing | None, log: RequestLog) -> None:
        self.metrics = metrics
        self.tracing = tracing
        self.log = log

    def close(self) -> None:
        self.log.flush()
        if self.tracing is not None:
            self.tracing.shutdown()
