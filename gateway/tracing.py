"""Traces: a server span per request, a client span per upstream call, W3C `traceparent`
continued and injected, OTLP/HTTP export in batches from a background thread.

Why the spans are our own small records and not the SDK's Span objects: on the bench, the
SDK's spans (a lock and validation per attribute, a ReadableSpan copy at the end, processor
hooks at start) and its generic protobuf encoder cost ~100 µs and ~65 µs of CPU per request,
more than everything else the gateway does for a request. Our spans have a fixed shape, so
they are slotted records encoded straight to protobuf (gateway/otlp.py). The SDK still does
everything that is configuration or plumbing: the sampler (OTEL_TRACES_SAMPLER/_ARG), the
ids, the resource (OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES), the batching and its
thread (BatchSpanProcessor, OTEL_BSP_*), and the OTLP/HTTP transport (OTLPSpanExporter:
endpoint, OTEL_EXPORTER_OTLP_HEADERS, compression, TLS, retries).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, cast

from .models import RequestState
from .otlp import Encoder

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.trace.export import SpanExporter

SCOPE_NAME = "secure-llm-gateway"
_SERVER, _CLIENT = 2, 3  # Span.SpanKind in the OTLP protocol
_SAMPLED, _RANDOM_TRACE_ID = 0x01, 0x02  # W3C trace flags


class Span:
    """A span as the encoder needs it, and nothing more."""

    __slots__ = (
        "attributes",
        "end_ns",
        "exception",
        "failed",
        "kind",
        "name",
        "parent_id",
        "remote_parent",
        "span_id",
        "start_ns",
        "trace_flags",
        "trace_id",
        "trace_state",
    )
    context: Any = None  # set below: what BatchSpanProcessor.on_end checks before queueing

    def __init__(self, name: str, kind: int, trace_id: int, span_id: int, parent_id: int, trace_flags: int) -> None:
        self.name = name
        self.kind = kind
        self.trace_id = trace_id
        self.span_id = span_id
        self.parent_id = parent_id
        self.trace_flags = trace_flags
        self.remote_parent = False
        self.trace_state = ""
        self.attributes: dict[str, str | bool | int | float] = {}
        self.failed = False
        self.exception: str | None = None
        self.start_ns = time.time_ns()
        self.end_ns = 0

    @property
    def sampled(self) -> bool:
        return bool(self.trace_flags & _SAMPLED)

    def traceparent(self) -> str:
        return f"00-{self.trace_id:032x}-{self.span_id:016x}-{self.trace_flags:02x}"


class Tracing:
    """Starts and ends the gateway's spans; the SDK samples, batches and sends them."""

    def __init__(self, endpoint: str, service_name: str) -> None:
        # Imported here so a gateway without tracing does not pay for the SDK at start-up.
        from opentelemetry import trace
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        url = endpoint.rstrip("/")
        if not url.endswith("/v1/traces"):
            url += "/v1/traces"
        # The provider is built only for what it reads from the environment: the sampler
        # (OTEL_TRACES_SAMPLER and _ARG), the id generator and the resource.
        provider = TracerProvider(resource=Resource.create({"service.name": service_name}), shutdown_on_exit=False)
        self._sampler = provider.sampler
        if isinstance(provider.get_tracer(SCOPE_NAME), trace.NoOpTracer):  # OTEL_SDK_DISABLED=true
            from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

            self._sampler = ALWAYS_OFF  # nothing recorded; trace context still passed on
        self._new_trace_id = provider.id_generator.generate_trace_id
        self._new_span_id = provider.id_generator.generate_span_id
        self._random_ids = _RANDOM_TRACE_ID if provider.id_generator.is_trace_id_random() else 0
        encoder = Encoder(provider.resource.attributes, SCOPE_NAME, unique_keys=("request.id",))
        exporter = _Exporter(OTLPSpanExporter(endpoint=url, timeout=5), encoder)
        self._processor = BatchSpanProcessor(cast("SpanExporter", exporter))
        self._propagator = TraceContextTextMapPropagator()
        self._current_span = trace.get_current_span
        self._server_kind = trace.SpanKind.SERVER
        Span.context = trace.SpanContext(0, 0, False, trace.TraceFlags(_SAMPLED))

    def start_server_span(self, method: str, route: str, path: str, headers: Mapping[str, str]) -> Span:
        """Named by the bounded route ("other" for unknown paths); the raw path is an attribute."""
        name = f"{method} {route}"
        attributes: dict[str, str | bool | int | float] = {"http.request.method": method, "url.path": path}
        parent_context, parent = None, None
        if "traceparent" in headers:  # W3C: no traceparent, no parent (tracestate alone means nothing)
            parent_context = self._propagator.extract(headers)
            parent = self._current_span(parent_context).get_span_context()
            if not parent.is_valid:
                parent = None
        if parent is None:
            trace_id, parent_id, random_ids = self._new_trace_id(), 0, self._random_ids
        else:
            trace_id, parent_id, random_ids = parent.trace_id, parent.span_id, parent.trace_flags & _RANDOM_TRACE_ID
        decision = self._sampler.should_sample(parent_context, trace_id, name, self._server_kind, attributes)
        span = Span(
            name,
            _SERVER,
            trace_id,
            self._new_span_id(),
            parent_id,
            random_ids | (_SAMPLED if decision.decision.is_sampled() else 0),  # type: ignore[no-untyped-call]
        )
        span.remote_parent = parent is not None
        if decision.trace_state is not None:
            span.trace_state = decision.trace_state.to_header()
        if decision.attributes:
            attributes.update(cast("dict[str, str | bool | int | float]", decision.attributes))
        span.attributes = attributes
        return span

    def end_server_span(self, span: Span, state: RequestState, status: int) -> None:
        if not span.sampled:
            return
        attrs = span.attributes
        attrs["http.status_code"] = status
        attrs["http.response.status_code"] = status
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
            span.failed = True
        self._end(span)

    def trace_id(self, span: Span) -> str:
        return format(span.trace_id, "032x")

    def client_span(self, server_span: Span, model: str | None) -> ClientSpan:
        """A client span around the upstream call: `with tracing.client_span(...) as headers`
        gives the headers that carry it.

        It follows its server span's sampling decision, as the default parent-based samplers
        decide and as the ratio sampler does for a trace id it already sampled."""
        span = Span(
            f"chat {model}" if model else "chat",
            _CLIENT,
            server_span.trace_id,
            self._new_span_id(),
            server_span.span_id,
            server_span.trace_flags,
        )
        span.trace_state = server_span.trace_state
        if model:
            span.attributes["gen_ai.request.model"] = model
        headers = {"traceparent": span.traceparent()}
        if span.trace_state:
            headers["tracestate"] = span.trace_state
        return ClientSpan(span, headers, self._end)

    def _end(self, span: Span) -> None:
        span.end_ns = time.time_ns()
        self._processor.on_end(cast("ReadableSpan", span))  # queued; encoded and sent by its thread

    def shutdown(self) -> None:
        self._processor.shutdown()  # type: ignore[no-untyped-call]


class ClientSpan:
    """What `Tracing.client_span` returns: a plain context manager, cheaper per request than
    a @contextmanager generator. An exception marks the span failed, with its type."""

    __slots__ = ("_end", "_span", "headers")

    def __init__(self, span: Span, headers: dict[str, str], end: Callable[[Span], None]) -> None:
        self._span = span
        self.headers = headers
        self._end = end

    def __enter__(self) -> dict[str, str]:
        return self.headers

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        span = self._span
        if exc_type is not None:
            span.exception = exc_type.__name__
            span.failed = True
        if span.sampled:
            self._end(span)


class _Exporter:
    """The BatchSpanProcessor's exporter: our encoder, the SDK exporter's HTTP client."""

    def __init__(self, otlp: Any, encoder: Encoder) -> None:
        self._otlp = otlp
        self._encoder = encoder

    def export(self, spans: Sequence[Span]) -> Any:
        from opentelemetry.sdk.trace.export import SpanExportResult

        # _client is the exporter's transport (retries, headers, compression, TLS); the
        # version is pinned, and the e2e tests send through it to a real receiver.
        result = self._otlp._client.export(self._encoder.request(spans))
        return SpanExportResult.SUCCESS if result.success else SpanExportResult.FAILURE

    def shutdown(self) -> None:
        self._otlp.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True
