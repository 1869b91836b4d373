"""OTLP protobuf encoding of the gateway's spans, written straight to bytes.

The SDK's generic encoder builds a protobuf object per span, attribute and value: ~32 µs
a span on the bench machine. Our spans have a fixed, small shape, so each field is written
as its wire bytes (field numbers from opentelemetry/proto/trace/v1/trace.proto), and the
key/value pairs that repeat from request to request (method, route, model, tenant, status)
are encoded once and reused. tests/test_tracing.py decodes the output with opentelemetry-proto.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping
from typing import Protocol

_FIXED64 = struct.Struct("<Q").pack
_FIXED32 = struct.Struct("<I").pack
_DOUBLE = struct.Struct("<d").pack
_CACHE_LIMIT = 4096

STATUS_ERROR = 2  # Status.StatusCode.STATUS_CODE_ERROR
FLAG_HAS_IS_REMOTE = 0x100  # SpanFlags: the is-remote bit below is meaningful
FLAG_IS_REMOTE = 0x200  # SpanFlags: the parent came from another process


class EncodableSpan(Protocol):
    trace_id: int
    span_id: int
    parent_id: int
    remote_parent: bool
    trace_flags: int
    trace_state: str
    name: str
    kind: int
    start_ns: int
    end_ns: int
    attributes: dict[str, str | bool | int | float]
    failed: bool  # status ERROR
    exception: str | None  # the type of the exception that ended the span, if one did


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field: its tag, the payload's length, the payload."""
    return tag + _varint(len(payload)) + payload


def _any_value(value: object) -> bytes:
    kind = value.__class__
    if kind is str:
        return _field(b"\x0a", value.encode())  # type: ignore[attr-defined]
    if kind is bool:
        return b"\x10\x01" if value else b"\x10\x00"
    if kind is int:
        return b"\x18" + _varint(value & 0xFFFFFFFFFFFFFFFF)  # type: ignore[operator]  # int64, two's complement
    if kind is float:
        return b"\x21" + _DOUBLE(value)
    return _field(b"\x0a", str(value).encode())


def _key_value(key: str, value: object) -> bytes:
    """A KeyValue message: key = 1, value = 2."""
    return _field(b"\x0a", key.encode()) + _field(b"\x12", _any_value(value))


class Encoder:
    """Encodes batches of spans for one resource and one instrumentation scope."""

    def __init__(
        self, resource_attributes: Mapping[str, object], scope_name: str, unique_keys: Iterable[str] = ()
    ) -> None:
        resource = b"".join(_field(b"\x0a", _key_value(k, v)) for k, v in resource_attributes.items())
        self._resource = _field(b"\x0a", resource)  # ResourceSpans.resource = 1
        self._scope = _field(b"\x0a", _field(b"\x0a", scope_name.encode()))  # ScopeSpans.scope = 1
        self._attributes: dict[tuple[str, type, object], bytes] = {}
        self._unique_keys = frozenset(unique_keys)  # a new value every span: never cached

    def request(self, spans: Iterable[EncodableSpan]) -> bytes:
        """An ExportTraceServiceRequest holding the spans."""
        body = b"".join([_field(b"\x12", self.span(s)) for s in spans])  # ScopeSpans.spans = 2
        scope_spans = _field(b"\x12", self._scope + body)  # ResourceSpans.scope_spans = 2
        return _field(b"\x0a", self._resource + scope_spans)  # ExportTraceServiceRequest.resource_spans = 1

    def span(self, span: EncodableSpan) -> bytes:
        flags = span.trace_flags | FLAG_HAS_IS_REMOTE | (FLAG_IS_REMOTE if span.remote_parent else 0)
        parts = [
            b"\x0a\x10",
            span.trace_id.to_bytes(16, "big"),
            b"\x12\x08",
            span.span_id.to_bytes(8, "big"),
        ]
        if span.trace_state:
            parts.append(_field(b"\x1a", span.trace_state.encode()))
        if span.parent_id:
            parts += (b"\x22\x08", span.parent_id.to_bytes(8, "big"))
        parts += (
            _field(b"\x2a", span.name.encode()),
            b"\x30",
            _varint(span.kind),
            b"\x39",
            _FIXED64(span.start_ns),
            b"\x41",
            _FIXED64(span.end_ns),
        )
        parts += [self._attribute(k, v) for k, v in span.attributes.items()]  # Span.attributes = 9
        if span.exception is not None:
            # Span.events = 11: an "exception" event, as the SDK's record_exception names it.
            event = (
                b"\x09"
                + _FIXED64(span.end_ns)
                + _field(b"\x12", b"exception")
                + _field(b"\x1a", _key_value("exception.type", span.exception))
            )
            parts.append(_field(b"\x5a", event))
        if span.failed:
            parts.append(b"\x7a\x02\x18" + _varint(STATUS_ERROR))  # Span.status = 15 {code = 3}
        parts.append(b"\x85\x01" + _FIXED32(flags))  # Span.flags = 16, fixed32
        return b"".join(parts)

    def _attribute(self, key: str, value: object) -> bytes:
        if key in self._unique_keys:
            return _field(b"\x4a", _key_value(key, value))
        cache_key = (key, value.__class__, value)  # the type too: True == 1 as dict keys
        encoded = self._attributes.get(cache_key)
        if encoded is None:
            encoded = _field(b"\x4a", _key_value(key, value))
            if len(self._attributes) >= _CACHE_LIMIT:
                self._attributes.clear()  # client-chosen values (paths) must not grow it for ever
            self._attributes[cache_key] = encoded
        return encoded
