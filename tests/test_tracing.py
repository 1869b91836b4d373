"""Spans: what the hand-written OTLP encoder writes decodes with opentelemetry-proto to what
was recorded, and the W3C propagation and sampling decisions a collector would see."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan
from opentelemetry.proto.trace.v1.trace_pb2 import Status

from gateway.otlp import Encoder
from gateway.tracing import SCOPE_NAME, Span, Tracing

INCOMING_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
INCOMING_SPAN = "00f067aa0ba902b7"

attribute_values = st.one_of(
    st.text(max_size=40),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False),
)


def decode(data: bytes) -> ExportTraceServiceRequest:
    request = ExportTraceServiceRequest()
    request.ParseFromString(data)
    return request


def value_of(any_value: object) -> object:
    field = any_value.WhichOneof("value")  # type: ignore[attr-defined]
    return getattr(any_value, field) if field else None


@given(
    attributes=st.dictionaries(
        st.one_of(st.just("request.id"), st.text(min_size=1, max_size=20)), attribute_values, max_size=8
    ),
    name=st.text(max_size=30),
    parent=st.integers(min_value=0, max_value=2**64 - 1),
    remote=st.booleans(),
    failed=st.booleans(),
    exception=st.one_of(st.none(), st.sampled_from(["UpstreamError", "CancelledError"])),
    trace_state=st.sampled_from(["", "vendor=abc,other=1"]),
)
def test_encoded_spans_decode_to_what_was_recorded(
    attributes: dict[str, object],
    name: str,
    parent: int,
    remote: bool,
    failed: bool,
    exception: str | None,
    trace_state: str,
) -> None:
    encoder = Encoder({"service.name": "gw", "replicas": 3}, SCOPE_NAME, unique_keys=("request.id",))
    span = Span(name, 3, 2**128 - 7, 2**64 - 3, parent, 0x03)
    span.attributes = attributes  # type: ignore[assignment]
    span.remote_parent, span.failed, span.exception, span.trace_state = remote, failed, exception, trace_state
    span.end_ns = span.start_ns + 1234
    # twice: the second encoding comes from the attribute cache (but request.id's) and must be the same
    [resource_spans] = decode(encoder.request([span, span])).resource_spans
    assert {a.key: value_of(a.value) for a in resource_spans.resource.attributes} == {
        "service.name": "gw",
        "replicas": 3,
    }
    [scope_spans] = resource_spans.scope_spans
    assert scope_spans.scope.name == SCOPE_NAME
    first, second = scope_spans.spans
    assert first == second
    assert first.name == name and first.kind == PbSpan.SPAN_KIND_CLIENT
    assert first.trace_id == (2**128 - 7).to_bytes(16, "big") and first.span_id == (2**64 - 3).to_bytes(8, "big")
    assert first.parent_span_id == (parent.to_bytes(8, "big") if parent else b"")
    assert first.start_time_unix_nano == span.start_ns and first.end_time_unix_nano == span.start_ns + 1234
    assert [(a.key, value_of(a.value)) for a in first.attributes] == list(attributes.items())
    assert first.trace_state == trace_state
    assert first.flags == 0x03 | 0x100 | (0x200 if remote else 0)
    assert first.status.code == (Status.STATUS_CODE_ERROR if failed else Status.STATUS_CODE_UNSET)
    if exception is None:
        assert not first.events
    else:
        [event] = first.events
        assert event.name == "exception" and event.attributes[0].value.string_value == exception


def headers(**values: str) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(values))


@pytest.fixture
def tracing(monkeypatch: pytest.MonkeyPatch) -> Tracing:
    monkeypatch.delenv("OTEL_TRACES_SAMPLER", raising=False)
    return Tracing("http://127.0.0.1:9", "gw")  # nothing is ended, so nothing is sent


def test_a_request_without_traceparent_starts_a_sampled_trace(tracing: Tracing) -> None:
    server = tracing.start_server_span("POST", "/v1/chat/completions", "/v1/chat/completions", headers())
    assert server.sampled and server.parent_id == 0 and not server.remote_parent
    with tracing.client_span(server, "gpt-4o") as sent:
        version, trace_id, span_id, flags = sent["traceparent"].split("-")
    assert version == "00" and trace_id == tracing.trace_id(server) and span_id != f"{server.span_id:016x}"
    assert int(flags, 16) & 0x01  # sampled
    assert "tracestate" not in sent


def test_an_incoming_traceparent_and_tracestate_are_continued(tracing: Tracing) -> None:
    incoming = headers(traceparent=f"00-{INCOMING_TRACE}-{INCOMING_SPAN}-01", tracestate="vendor=abc")
    server = tracing.start_server_span("POST", "/v1/chat/completions", "/v1/chat/completions", incoming)
    assert tracing.trace_id(server) == INCOMING_TRACE
    assert server.parent_id == int(INCOMING_SPAN, 16) and server.remote_parent
    with tracing.client_span(server, None) as sent:
        assert sent["traceparent"].startswith(f"00-{INCOMING_TRACE}-") and sent["traceparent"].endswith("-01")
        assert sent["tracestate"] == "vendor=abc"


def test_an_unsampled_parent_is_not_recorded_but_still_propagated(tracing: Tracing) -> None:
    incoming = headers(traceparent=f"00-{INCOMING_TRACE}-{INCOMING_SPAN}-00")
    server = tracing.start_server_span("POST", "/v1/chat/completions", "/v1/chat/completions", incoming)
    assert not server.sampled
    with tracing.client_span(server, "m") as sent:
        assert sent["traceparent"].startswith(f"00-{INCOMING_TRACE}-") and sent["traceparent"].endswith("-00")


def test_a_malformed_traceparent_starts_a_new_trace(tracing: Tracing) -> None:
    server = tracing.start_server_span("GET", "other", "/x", headers(traceparent="00-zz-yy-01"))
    assert server.sampled and server.parent_id == 0 and tracing.trace_id(server) != "0" * 32


def test_the_sampler_comes_from_the_standard_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
    tracing = Tracing("http://127.0.0.1:9", "gw")
    server = tracing.start_server_span("POST", "/v1/chat/completions", "/v1/chat/completions", headers())
    assert not server.sampled
    with tracing.client_span(server, "m") as sent:
        assert int(sent["traceparent"].rsplit("-", 1)[1], 16) & 0x01 == 0  # not sampled


def test_the_sdk_switch_turns_recording_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    tracing = Tracing("http://127.0.0.1:9", "gw")
    incoming = headers(traceparent=f"00-{INCOMING_TRACE}-{INCOMING_SPAN}-01")
    server = tracing.start_server_span("POST", "/v1/chat/completions", "/v1/chat/completions", incoming)
    assert not server.sampled
    with tracing.client_span(server, "m") as sent:
        assert sent["traceparent"].startswith(f"00-{INCOMING_TRACE}-")


def test_an_upstream_call_that_raises_ends_its_span_failed(tracing: Tracing, monkeypatch: pytest.MonkeyPatch) -> None:
    ended: list[Span] = []
    monkeypatch.setattr(tracing, "_end", ended.append)
    server = tracing.start_server_span("POST", "/v1/chat/completions", "/v1/chat/completions", headers())
    with pytest.raises(TimeoutError), tracing.client_span(server, "m"):
        raise TimeoutError
    with tracing.client_span(server, "m"):
        pass
    failed, ok = ended
    assert failed.failed and failed.exception == "TimeoutError" and failed.parent_id == server.span_id
    assert not ok.failed and ok.exception is None
