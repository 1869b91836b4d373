"""Spans from gateway/tracing.py as a real OTLP/HTTP receiver gets them (decoded with
opentelemetry-proto), and the W3C propagation and sampling decisions a collector would see."""

from __future__ import annotations

import gzip
import re
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan
from opentelemetry.proto.trace.v1.trace_pb2 import Status
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from gateway.models import RequestState, Tenant, Usage
from gateway.tracing import MAX_PATH, MAX_TEXT, SCOPE_NAME, Tracing, trace_headers

from .harness import wait_until

INCOMING_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
INCOMING_SPAN = "00f067aa0ba902b7"
CHAT = "/v1/chat/completions"


@dataclass
class Received:
    """One span as the receiver decoded it."""

    name: str
    kind: int
    trace_id: str
    span_id: str
    parent: str
    flags: int
    trace_state: str
    status: int
    attrs: dict[str, Any]
    events: list[tuple[str, dict[str, Any]]]
    service: str
    scope: str


def _value(any_value: Any) -> Any:
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind else None


def decode(data: bytes) -> list[Received]:
    export = ExportTraceServiceRequest()
    export.ParseFromString(data)
    out = []
    for resource_spans in export.resource_spans:
        resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                out.append(
                    Received(
                        name=span.name,
                        kind=span.kind,
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent=span.parent_span_id.hex(),
                        flags=span.flags,
                        trace_state=span.trace_state,
                        status=span.status.code,
                        attrs={a.key: _value(a.value) for a in span.attributes},
                        events=[(e.name, {a.key: _value(a.value) for a in e.attributes}) for e in span.events],
                        service=resource["service.name"],
                        scope=scope_spans.scope.name,
                    )
                )
    return out


@dataclass
class Receiver:
    """A real OTLP/HTTP endpoint on a loopback port, in a thread (the exporter's sends are
    blocking, from the SDK's own thread)."""

    url: str
    spans: list[Received] = field(default_factory=list)
    posts: int = 0


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # http.server calls it by this name
            data = self.rfile.read(int(self.headers["Content-Length"]))
            if self.headers.get("Content-Encoding") == "gzip":
                data = gzip.decompress(data)
            spans = decode(data) if self.path == "/v1/traces" else []
            with lock:
                received.spans.extend(spans)
                received.posts += 1
            self.send_response(200 if self.path == "/v1/traces" else 404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    received = Receiver(f"http://127.0.0.1:{server.server_address[1]}")
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield received
    server.shutdown()
    server.server_close()


@pytest.fixture(autouse=True)
def standard_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OTEL_TRACES_SAMPLER", "OTEL_TRACES_SAMPLER_ARG", "OTEL_SDK_DISABLED", "OTEL_RESOURCE_ATTRIBUTES"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "20")  # the receiver sees spans within ms


@pytest.fixture
def make_tracing(receiver: Receiver) -> Iterator[Any]:
    made: list[Tracing] = []

    def make(url: str = receiver.url) -> Tracing:
        tracing = Tracing(url, "gw")
        made.append(tracing)
        return tracing

    yield make
    for tracing in made:
        tracing.shutdown()


def headers(**values: str) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(values))


def state(model: str | None = "gpt-4o", tenant: str = "acme") -> RequestState:
    return RequestState(
        "req-1",
        tenant=Tenant(tenant, tenant, f"key:{tenant}"),
        model=model,
        usage=Usage(9, 12),
        response_model="gpt-4o-2024-08-06",
    )


def one_request(
    tracing: Tracing, incoming: CIMultiDictProxy[str], status: int = 200, model: str = "gpt-4o", tenant: str = "acme"
) -> tuple[trace.Span, dict[str, str]]:
    """What the middleware and the proxy do for one request; returns the server span and the
    headers sent upstream."""
    server = tracing.start_server_span("POST", CHAT, CHAT, incoming)
    with tracing.client_span(server, model) as sent:
        sent = dict(sent)
    tracing.end_server_span(server, state(model, tenant), status)
    return server, sent


def arrived(receiver: Receiver, tenant: str) -> Received:
    def find() -> Received | None:
        return next((s for s in receiver.spans if s.attrs.get("tenant") == tenant), None)

    found: Received = wait_until(find, what=f"the server span of {tenant}")
    return found


def sampled(span: trace.Span) -> bool:
    return span.get_span_context().trace_flags.sampled


def traceparent(trace_id: str, span_id: str, flags: str) -> str:
    return f"00-{trace_id}-{span_id}-{flags}"


def test_a_request_makes_a_server_and_a_client_span(receiver: Receiver, make_tracing: Any) -> None:
    tracing = make_tracing(receiver.url)
    server_span, sent = one_request(tracing, headers())
    server = arrived(receiver, "acme")
    [client] = wait_until(lambda: [s for s in receiver.spans if s.kind == PbSpan.SPAN_KIND_CLIENT], what="client")
    assert server.kind == PbSpan.SPAN_KIND_SERVER and server.name == f"POST {CHAT}"
    assert server.service == "gw" and server.scope == SCOPE_NAME
    assert server.parent == "" and server.trace_id == tracing.trace_id(server_span)
    assert server.attrs == {
        "http.request.method": "POST",
        "url.path": CHAT,
        "http.status_code": 200,
        "http.response.status_code": 200,
        "tenant": "acme",
        "model": "gpt-4o",
        "gen_ai.request.model": "gpt-4o",
        "gen_ai.operation.name": "chat",
        "gen_ai.response.model": "gpt-4o-2024-08-06",
        "gen_ai.usage.input_tokens": 9,
        "gen_ai.usage.output_tokens": 12,
        "request.id": "req-1",
    }
    assert server.status == Status.STATUS_CODE_UNSET
    assert client.name == "chat gpt-4o" and client.attrs == {
        "gen_ai.system": "openai",
        "gen_ai.request.model": "gpt-4o",
    }
    assert client.trace_id == server.trace_id and client.parent == server.span_id
    assert client.status == Status.STATUS_CODE_UNSET and not client.events
    # the upstream is told the client span: sampled, and (W3C level 2) with a random trace id
    assert sent == {"traceparent": traceparent(server.trace_id, client.span_id, "03")}


def test_an_error_status_marks_the_server_span(receiver: Receiver, make_tracing: Any) -> None:
    tracing = make_tracing(receiver.url)
    for status, tenant in ((429, "limited"), (404, "lost"), (399, "fine")):
        span = tracing.start_server_span("POST", CHAT, CHAT, headers())
        tracing.end_server_span(span, state(tenant=tenant), status)
    limited, lost, fine = (arrived(receiver, t) for t in ("limited", "lost", "fine"))
    for failed in (limited, lost):
        assert failed.attrs["error"] is True and failed.status == Status.STATUS_CODE_ERROR
    assert "error" not in fine.attrs and fine.status == Status.STATUS_CODE_UNSET


def test_an_upstream_call_that_raises_ends_its_span_failed(receiver: Receiver, make_tracing: Any) -> None:
    tracing = make_tracing(receiver.url)
    server = tracing.start_server_span("POST", CHAT, CHAT, headers())
    with pytest.raises(TimeoutError), tracing.client_span(server, "m"):
        raise TimeoutError("secret detail")
    tracing.end_server_span(server, state(tenant="raised"), 504)
    arrived(receiver, "raised")
    [client] = [s for s in receiver.spans if s.kind == PbSpan.SPAN_KIND_CLIENT]
    assert client.status == Status.STATUS_CODE_ERROR
    assert client.events == [("exception", {"exception.type": "TimeoutError"})]  # the type, not the message


def test_client_chosen_text_on_spans_is_cut(receiver: Receiver, make_tracing: Any) -> None:
    """A model name as long as the body allows must not be held in the export queue whole."""
    tracing = make_tracing()
    huge = "m" * 1_000_000
    server = tracing.start_server_span("POST", "other", "/" + "p" * 10_000, headers())
    with tracing.client_span(server, huge):
        pass
    tracing.end_server_span(server, state(model=huge, tenant="huge"), 404)
    span = arrived(receiver, "huge")
    assert span.attrs["model"] == span.attrs["gen_ai.request.model"] == "m" * MAX_TEXT
    assert span.attrs["url.path"] == "/" + "p" * (MAX_PATH - 1)
    [client] = wait_until(lambda: [s for s in receiver.spans if s.kind == PbSpan.SPAN_KIND_CLIENT], what="client")
    assert client.name == "chat " + "m" * MAX_TEXT and client.attrs["gen_ai.request.model"] == "m" * MAX_TEXT


def test_an_incoming_traceparent_and_tracestate_are_continued(receiver: Receiver, make_tracing: Any) -> None:
    tracing = make_tracing(receiver.url)
    incoming = headers(traceparent=traceparent(INCOMING_TRACE, INCOMING_SPAN, "01"), tracestate="vendor=abc")
    server_span, sent = one_request(tracing, incoming)
    assert tracing.trace_id(server_span) == INCOMING_TRACE
    server = arrived(receiver, "acme")
    [client] = wait_until(lambda: [s for s in receiver.spans if s.kind == PbSpan.SPAN_KIND_CLIENT], what="client")
    assert server.trace_id == INCOMING_TRACE and server.parent == INCOMING_SPAN
    assert server.flags & 0x300 == 0x300  # the parent is remote
    assert server.trace_state == "vendor=abc" and client.trace_state == "vendor=abc"
    assert sent == {"traceparent": traceparent(INCOMING_TRACE, client.span_id, "01"), "tracestate": "vendor=abc"}


def test_an_unsampled_parent_is_not_recorded_but_still_propagated(receiver: Receiver, make_tracing: Any) -> None:
    tracing = make_tracing(receiver.url)
    server, sent = one_request(tracing, headers(traceparent=traceparent(INCOMING_TRACE, INCOMING_SPAN, "00")))
    assert not sampled(server)
    assert sent["traceparent"].startswith(f"00-{INCOMING_TRACE}-") and sent["traceparent"].endswith("-00")
    assert sent["traceparent"].split("-")[2] != INCOMING_SPAN  # a span of its own, though unrecorded
    one_request(tracing, headers(), tenant="marker")
    marker = arrived(receiver, "marker")  # what was ended before it has been sent by now
    wait_until(lambda: len(receiver.spans) == 2, what="the marker's client span")
    assert all(s.trace_id == marker.trace_id for s in receiver.spans)


def test_an_unsampled_new_trace_passes_the_server_spans_own_context_and_sends_nothing(
    monkeypatch: pytest.MonkeyPatch, receiver: Receiver
) -> None:
    """Under an unsampled server span no client span is started: the upstream is told the
    server span (the trace id the log line has, the server span's id, not sampled) and the
    collector gets nothing; an exception in the upstream call still reaches the caller."""
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0")  # every new trace dropped
    tracing = Tracing(receiver.url, "gw")
    server, sent = one_request(tracing, headers())
    context = server.get_span_context()
    assert not server.is_recording() and context.is_valid
    assert sent == {"traceparent": traceparent(str(tracing.trace_id(server)), f"{context.span_id:016x}", "02")}
    with pytest.raises(TimeoutError), tracing.client_span(server, "m"):
        raise TimeoutError
    tracing.shutdown()
    assert receiver.posts == 0


def test_a_sampled_caller_is_recorded_under_a_ratio_that_drops_every_new_trace(
    monkeypatch: pytest.MonkeyPatch, receiver: Receiver, make_tracing: Any
) -> None:
    """The caller's sampled flag decides (parent-based): both spans are recorded and the
    upstream is told the client span, sampled, with the caller's tracestate."""
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0")
    tracing = make_tracing(receiver.url)
    incoming = headers(traceparent=traceparent(INCOMING_TRACE, INCOMING_SPAN, "01"), tracestate="vendor=abc")
    server_span, sent = one_request(tracing, incoming)
    assert sampled(server_span)
    server = arrived(receiver, "acme")
    [client] = wait_until(lambda: [s for s in receiver.spans if s.kind == PbSpan.SPAN_KIND_CLIENT], what="client")
    assert server.trace_id == client.trace_id == INCOMING_TRACE and client.parent == server.span_id
    assert sent == {"traceparent": traceparent(INCOMING_TRACE, client.span_id, "01"), "tracestate": "vendor=abc"}


TRACEPARENT_SENT = re.compile(r"00-[0-9a-f]{32}-[0-9a-f]{16}-0[0-3]")


# One receiver for every example (spans ended here are sent, and a live receiver makes each
# example's shutdown quick).
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    value=st.one_of(
        st.text(),
        st.from_regex(r"\A[0-9a-f]{2}-[0-9a-fA-F]{32}-[0-9a-fA-F]{16}-[0-9a-f]{2}\Z"),
        st.builds(
            lambda t, s, f, tail: f"{t}-{s}-{f}{tail}",
            st.sampled_from(["00-" + "0" * 32, "00-" + INCOMING_TRACE, "ff-" + INCOMING_TRACE, "01-" + INCOMING_TRACE]),
            st.sampled_from(["0" * 16, INCOMING_SPAN]),
            st.sampled_from(["00", "01", "ff", "1"]),
            st.sampled_from(["", "-x", " ", "\t", "\r\nx-evil: 1"]),
        ),
    ),
    trace_state=st.one_of(st.none(), st.text(max_size=300), st.just("a=1,b=2\r\nx-evil: 1")),
)
def test_any_incoming_trace_context_gives_a_valid_span_and_safe_headers(
    receiver: Receiver, value: str, trace_state: str | None
) -> None:
    tracing = Tracing(receiver.url, "gw")
    try:
        incoming = {"traceparent": value} | ({"tracestate": trace_state} if trace_state is not None else {})
        server = tracing.start_server_span("POST", CHAT, CHAT, headers(**incoming))
        context = server.get_span_context()
        assert context.is_valid  # the caller's trace, or a new one
        with tracing.client_span(server, "m") as sent:
            assert set(sent) <= {"traceparent", "tracestate"}
            assert TRACEPARENT_SENT.fullmatch(sent["traceparent"])
            assert sent["traceparent"][3:35] == f"{context.trace_id:032x}"
            assert all(" " <= c <= "~" for c in sent.get("tracestate", ""))  # nothing that breaks a header
    finally:
        tracing.shutdown()


def test_a_malformed_traceparent_starts_a_new_trace(receiver: Receiver, make_tracing: Any) -> None:
    tracing = make_tracing(receiver.url)
    one_request(tracing, headers(traceparent=f"00-{INCOMING_TRACE}-zz-01"))
    server = arrived(receiver, "acme")
    assert server.parent == "" and server.trace_id not in (INCOMING_TRACE, "0" * 32)


@pytest.mark.parametrize("collector", [True, False])
def test_repeated_trace_context_headers_are_read_as_w3c_says(
    receiver: Receiver, make_tracing: Any, collector: bool
) -> None:
    """W3C Trace Context (and its test suite): tracestate sent in several headers is one list,
    in order; a traceparent sent twice is no parent at all. Only the first of each was read:
    the caller's later tracestate entries were dropped, and the first of two traceparents
    continued."""
    tracing = make_tracing(receiver.url if collector else None)
    parent = f"00-{INCOMING_TRACE}-{INCOMING_SPAN}-01"
    several = CIMultiDict([("traceparent", parent), ("tracestate", "foo=1,bar=2"), ("tracestate", "rojo=1")])
    _, sent = one_request(tracing, CIMultiDictProxy(several))
    assert sent["traceparent"][3:35] == INCOMING_TRACE and sent["tracestate"] == "foo=1,bar=2,rojo=1"

    twice = CIMultiDict([("traceparent", parent), ("traceparent", f"00-{'1' * 32}-{INCOMING_SPAN}-01")])
    _, sent = one_request(tracing, CIMultiDictProxy(twice))
    assert sent["traceparent"][3:35] not in (INCOMING_TRACE, "1" * 32)


def test_the_sampler_comes_from_the_standard_variables(monkeypatch: pytest.MonkeyPatch, make_tracing: Any) -> None:
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
    server, sent = one_request(make_tracing(), headers())
    assert not sampled(server) and sent["traceparent"].endswith("-02")  # not sampled; random id


def test_the_ratio_sampler_decides_by_trace_id(monkeypatch: pytest.MonkeyPatch, make_tracing: Any) -> None:
    """traceidratio samples a trace whose id's low 64 bits are below ratio * 2^64, whatever
    the caller's flag; the client span follows its server span."""
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0.1")
    tracing = make_tracing()
    low, high = "ab" * 8 + "0" * 16, "ab" * 8 + "f" * 16
    kept, kept_sent = one_request(tracing, headers(traceparent=traceparent(low, INCOMING_SPAN, "00")))
    dropped, dropped_sent = one_request(tracing, headers(traceparent=traceparent(high, INCOMING_SPAN, "01")))
    assert sampled(kept) and kept_sent["traceparent"].endswith("-01")
    assert not sampled(dropped) and dropped_sent["traceparent"].endswith("-00")


def test_parentbased_ratio_follows_the_caller_and_samples_its_share_of_new_traces(
    monkeypatch: pytest.MonkeyPatch, make_tracing: Any
) -> None:
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0.1")
    tracing = make_tracing()
    high = "ab" * 8 + "f" * 16  # the ratio alone would drop it: the caller's flag decides
    followed, _ = one_request(tracing, headers(traceparent=traceparent(high, INCOMING_SPAN, "01")))
    assert sampled(followed)
    roots = [tracing.start_server_span("POST", CHAT, CHAT, headers()) for _ in range(2000)]
    assert all(s.is_recording() == ((s.get_span_context().trace_id & (2**64 - 1)) < 2**64 // 10) for s in roots)
    assert 0 < sum(s.is_recording() for s in roots) < len(roots)


def test_the_sdk_switch_turns_recording_off_and_passes_the_context_on(
    monkeypatch: pytest.MonkeyPatch, receiver: Receiver, make_tracing: Any
) -> None:
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    tracing = make_tracing(receiver.url)
    incoming = traceparent(INCOMING_TRACE, INCOMING_SPAN, "01")
    server, sent = one_request(tracing, headers(traceparent=incoming))
    assert not server.is_recording() and tracing.trace_id(server) == INCOMING_TRACE
    assert sent["traceparent"] == incoming  # the caller's context, flag and all, as it came
    server, sent = one_request(tracing, headers())
    assert tracing.trace_id(server) is None  # no trace recorded, none to log
    version, trace_id, span_id, flags = sent["traceparent"].split("-")  # but the upstream gets one: new, unsampled
    assert (version, flags) == ("00", "00") and int(trace_id, 16) and int(span_id, 16)
    tracing.shutdown()
    assert receiver.posts == 0


def test_each_app_has_its_own_provider(receiver: Receiver, make_tracing: Any) -> None:
    first, second = make_tracing(), Tracing(receiver.url, "second-app")
    one_request(second, headers(), tenant="second")
    one_request(first, headers(), tenant="first")
    second.shutdown()
    assert arrived(receiver, "first").service == "gw" and arrived(receiver, "second").service == "second-app"
    assert not isinstance(trace.get_tracer_provider(), TracerProvider)  # the global one is untouched


@pytest.mark.timeout(20)
def test_a_collector_that_never_answers_holds_neither_requests_nor_shutdown(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Accepts connections (the kernel completes them) and never reads or answers: each export
    # would wait for the exporter's whole timeout, set far past this test's hang guard.
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "60")
    monkeypatch.setenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "2")
    with socket.socket() as sink:
        sink.bind(("127.0.0.1", 0))
        sink.listen(64)
        tracing = Tracing(f"http://127.0.0.1:{sink.getsockname()[1]}", "gw")
        for _ in range(50):
            one_request(tracing, headers())
        tracing.shutdown()  # flushes for a bounded time, then gives up on the stuck export


# W3C tracestate members: a key (lowercase, digits, _-*/, an optional tenant@vendor) and a value
# of printable characters but "," and "=" (not ending in a space).
_TRACESTATE_KEYS = st.from_regex(r"[a-z][a-z0-9_\-*/]{0,15}(@[a-z][a-z0-9_\-*/]{0,7})?", fullmatch=True)
_TRACESTATE_VALUES = st.from_regex(r"[!-+\--<>-~]([ !-+\--<>-~]{0,20}[!-+\--<>-~])?", fullmatch=True)


@settings(max_examples=500)
@given(
    st.integers(0, 2**128 - 1),
    st.integers(0, 2**64 - 1),
    st.integers(0, 255),
    st.lists(st.tuples(_TRACESTATE_KEYS, _TRACESTATE_VALUES), max_size=4),
)
def test_trace_headers_are_what_the_propagator_writes(
    trace_id: int, span_id: int, flags: int, members: list[tuple[str, str]]
) -> None:
    # The fast path (no Context built per request) proven equal to the API's propagator, for any
    # context: valid or not, sampled or not, with or without a tracestate.
    context = trace.SpanContext(
        trace_id, span_id, is_remote=True, trace_flags=trace.TraceFlags(flags), trace_state=trace.TraceState(members)
    )
    expected: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(expected, trace.set_span_in_context(trace.NonRecordingSpan(context)))
    assert trace_headers(context) == expected
