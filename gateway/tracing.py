"""Traces through the OpenTelemetry SDK's public API: a server span per request, a client
span per upstream call, W3C `traceparent` continued and injected, OTLP/HTTP export in
batches from the BatchSpanProcessor's thread.

The tracer provider is the app's own, never the global one, so two apps in one process
(tests) keep their spans apart. The SDK reads its standard variables from the process
environment: the sampler (OTEL_TRACES_SAMPLER and _ARG), OTEL_RESOURCE_ATTRIBUTES,
OTEL_BSP_*, OTEL_EXPORTER_OTLP_HEADERS, _TIMEOUT, _COMPRESSION, _CERTIFICATE and
OTEL_SDK_DISABLED (then nothing is recorded). Without OTEL_EXPORTER_OTLP_ENDPOINT nothing is
recorded either, and the SDK is not loaded: the caller's trace goes on upstream (its id and
flags, a parent id of ours) and its id is logged; without one a new unsampled trace is sent
upstream (~1 µs a request; nothing records it, so the log names none).
"""

from __future__ import annotations

import threading
from random import getrandbits
from types import TracebackType
from typing import TYPE_CHECKING

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import (
    INVALID_SPAN,
    INVALID_SPAN_CONTEXT,
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    format_span_id,
    format_trace_id,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from .egress import Egress
from .models import RequestState

if TYPE_CHECKING:
    from multidict import CIMultiDictProxy
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

SCOPE_NAME = "secure-llm-gateway"
# At shutdown, queued spans get this long to reach the collector; past it the exporter is
# shut down, which ends its retries, and what is left is dropped. Without the bound, a dead
# collector holds shutdown for the exporter's timeout (OTEL_EXPORTER_OTLP_TIMEOUT, 10 s)
# once per queued batch, up to the processor's 30 s.
SHUTDOWN_FLUSH_SECS = 2.0
# Client-chosen text on a span is cut to this: a model name can be as long as the request
# body, and a queued span keeps its text alive until it is exported (2048 spans by default).
MAX_TEXT = 256
MAX_PATH = 2048
_NO_PARENT = Context()  # explicit: a request's span never picks up an ambient current span
_ERROR = Status(StatusCode.ERROR)


class Tracing:
    """Starts and ends the gateway's spans; the SDK samples, records, batches and sends them."""

    def __init__(self, endpoint: str | None, service_name: str, egress: Egress | None = None) -> None:
        self._propagator = TraceContextTextMapPropagator()
        self._provider: TracerProvider | None = None
        self._exporter: SpanExporter | None = None
        if endpoint is None:
            # No collector (SPEC §2: no export), yet trace context still flows (§5, §8): the
            # caller's trace goes upstream with a parent id of ours, else a fresh unsampled
            # one (start_server_span, _headers). No span is recorded: ~1 µs a request, and not
            # the SDK's import (~40 ms at start-up).
            return
        # Imported here so a gateway without a collector does not pay for the SDK's tracer
        # and the exporter (~80 ms) at start-up.
        import requests
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        url = endpoint.rstrip("/")
        if not url.endswith("/v1/traces"):
            url += "/v1/traces"
        # No sampler given: the SDK builds the one OTEL_TRACES_SAMPLER(_ARG) name
        # (default parentbased_always_on). shutdown() is ours, from the app's cleanup.
        self._provider = TracerProvider(
            resource=Resource.create({"service.name": service_name}), shutdown_on_exit=False
        )
        # The gateway's egress rules, not `requests`' own reading of the environment: that
        # would send a loopback collector's spans (and its OTLP headers) to HTTP_PROXY, miss a
        # proxy named in `.env`, and read `.netrc`.
        session = requests.Session()
        session.trust_env = False
        proxy = (egress or Egress()).proxy_url(url)
        if proxy is not None:
            session.proxies = {"http": proxy, "https": proxy}
        self._exporter = OTLPSpanExporter(endpoint=url, session=session)
        self._provider.add_span_processor(BatchSpanProcessor(self._exporter))
        self._tracer = self._provider.get_tracer(SCOPE_NAME)

    def start_server_span(self, method: str, route: str, path: str, headers: CIMultiDictProxy[str]) -> Span:
        """Named by the bounded route ("other" for unknown paths); the raw path is an attribute.

        The parent is the caller's `traceparent`, if valid (W3C: no traceparent, no parent;
        tracestate alone means nothing; a traceparent sent twice is none either, and tracestate
        sent in several headers is one list: the SDK's getter would read the first of each)."""
        parent = _NO_PARENT
        if "traceparent" in headers:
            parents = headers.getall("traceparent")
            if len(parents) == 1:
                carrier = {"traceparent": parents, "tracestate": headers.getall("tracestate", [])}
                parent = self._propagator.extract(carrier, _NO_PARENT)
        if self._provider is None:  # nothing recorded: the caller's trace, or none (see _headers)
            if parent is _NO_PARENT:
                return INVALID_SPAN
            # The caller's trace, its flags and tracestate, with a span id of ours as the parent
            # the upstream sees (W3C: a proxy that takes part in the trace), as the SDK would.
            caller = trace.get_current_span(parent).get_span_context()
            return NonRecordingSpan(
                SpanContext(
                    caller.trace_id,
                    getrandbits(64) or 1,
                    is_remote=False,
                    trace_flags=caller.trace_flags,
                    trace_state=caller.trace_state,
                )
            )
        return self._tracer.start_span(
            f"{method} {route}",
            parent,
            SpanKind.SERVER,
            {"http.request.method": method, "url.path": path[:MAX_PATH]},
        )

    def end_server_span(self, span: Span, state: RequestState, status: int, operation: str = "chat") -> None:
        if not span.is_recording():  # not sampled: nothing to add, nothing to send
            return
        attributes: dict[str, str | bool | int] = {
            "http.status_code": status,
            "http.response.status_code": status,
        }
        if state.tenant is not None:
            attributes["tenant"] = state.tenant.public_id
        if state.model is not None:
            model = state.model[:MAX_TEXT]  # the same object when short enough: no copy
            attributes["model"] = model
            attributes["gen_ai.request.model"] = model
            attributes["gen_ai.operation.name"] = operation
        if state.response_model is not None:
            attributes["gen_ai.response.model"] = state.response_model[:MAX_TEXT]
        if state.usage is not None:
            attributes["gen_ai.usage.input_tokens"] = state.usage.prompt_tokens
            attributes["gen_ai.usage.output_tokens"] = state.usage.completion_tokens
        attributes["request.id"] = state.request_id
        if status >= 400:
            attributes["error"] = True  # the seed's Jaeger filter
            span.set_status(_ERROR)
        span.set_attributes(attributes)
        span.end()

    def trace_id(self, span: Span) -> str | None:
        """The span's trace id in hex, for the log line; None when there is no trace (the SDK
        disabled and no incoming traceparent)."""
        context = span.get_span_context()
        return f"{context.trace_id:032x}" if context.is_valid else None

    def client_span(
        self,
        server_span: Span,
        model: str | None,
        system: str = "openai",
        upstream: str | None = None,
        operation: str = "chat",
    ) -> ClientSpan:
        """A client span around the upstream call: `with tracing.client_span(...) as headers`
        gives the `traceparent` (and `tracestate`) headers that name it.

        Its sampling follows the server span's (the parent-based samplers, the default, decide
        so; so does the ratio sampler for a trace id it already sampled).

        Under an unsampled server span no client span is started: every sampler the SDK
        names would drop it too, so the upstream is given the server span's own (unsampled)
        context, which saves the SDK's span start (~5 µs) on most requests at a low ratio."""
        if not server_span.is_recording():
            return ClientSpan(None, self._headers(server_span))
        model = model[:MAX_TEXT] if model else None
        attributes = {"gen_ai.system": system, **({"gen_ai.request.model": model} if model else {})}
        if upstream is not None:  # ROUTES_FILE's upstream this attempt went to (SPEC §13)
            attributes["gateway.upstream"] = upstream
        span = self._tracer.start_span(
            f"{operation} {model}" if model else operation,
            trace.set_span_in_context(server_span, _NO_PARENT),
            SpanKind.CLIENT,
            attributes,
        )
        return ClientSpan(span, self._headers(span))

    def _headers(self, span: Span) -> dict[str, str]:
        """What the upstream is told of this span: W3C `traceparent` (and `tracestate`). A
        request in no trace (no collector, or the SDK disabled, and no valid incoming
        context) still sends one: a new trace, unsampled, its ids random as the SDK's
        RandomIdGenerator makes them (0 is W3C's invalid id), written without building a
        SpanContext (nobody reads it here)."""
        context = span.get_span_context()
        if context is INVALID_SPAN_CONTEXT:
            return {"traceparent": f"00-{getrandbits(128) or 1:032x}-{getrandbits(64) or 1:016x}-00"}
        return trace_headers(context)

    def shutdown(self) -> None:
        """Send what is queued, for at most SHUTDOWN_FLUSH_SECS, then stop the export thread."""
        if self._provider is None or self._exporter is None:
            return
        flush = threading.Thread(target=self._provider.shutdown, name="otel-shutdown", daemon=True)
        flush.start()
        flush.join(SHUTDOWN_FLUSH_SECS)
        if flush.is_alive():
            self._exporter.shutdown()  # ends the exporter's retry wait; the rest is dropped


def trace_headers(context: SpanContext) -> dict[str, str]:
    """The W3C headers that name `context`, as the API's TraceContextTextMapPropagator.inject
    writes them (tests/test_tracing.py proves them equal for any context), without the Context
    it needs built and read back for each request: ~1 µs instead of ~2.2, on every request
    that records no client span (no collector, or not sampled: most of them)."""
    if context == INVALID_SPAN_CONTEXT:
        return {}
    flags = context.trace_flags
    headers = {"traceparent": f"00-{format_trace_id(context.trace_id)}-{format_span_id(context.span_id)}-{flags:02x}"}
    if context.trace_state:
        headers["tracestate"] = context.trace_state.to_header()
    return headers


class ClientSpan:
    """What `Tracing.client_span` returns: a plain context manager, cheaper per request than
    a @contextmanager generator. An exception marks the span failed, with an `exception`
    event naming its type (not its message or traceback: neither is the collector's business).
    Under an unsampled server span there is no span (None), only the headers to pass on."""

    __slots__ = ("_span", "headers")

    def __init__(self, span: Span | None, headers: dict[str, str]) -> None:
        self._span = span
        self.headers = headers

    def __enter__(self) -> dict[str, str]:
        return self.headers

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        span = self._span
        if span is None:
            return
        if exc_type is not None:
            span.add_event("exception", {"exception.type": exc_type.__name__})
            span.set_status(_ERROR)
        span.end()
