"""Metrics (aioprometheus) and the JSON request log; traces are in gateway/tracing.py.

The only module that touches aioprometheus. Metrics live in a private registry built per
app. Tenants and keys are never label values, and client-chosen label values (the model)
are capped.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import sys
import time
from typing import IO

import orjson
from aioprometheus.collectors import Counter, Gauge, Histogram, Registry
from aioprometheus.histogram import Histogram as BucketCounts
from aioprometheus.renderer import render

from .models import RequestState
from .tracing import Tracing

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

    def redacted(self, kind: str, direction: str, times: int = 1) -> None:
        self.redactions.add((kind, direction), times)

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
            "duration_ms": _ms(seconds),
            "upstream_ttfb_ms": _ms(state.upstream_ttfb) if state.upstream_ttfb is not None else None,
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


def _ms(seconds: float) -> float:
    """Milliseconds to two decimals: round() to an integer first, a third of round(x, 2)'s cost."""
    return round(seconds * 100_000) / 100


class Telemetry:
    """What the `observed` wrapper and the proxy use; tracing is optional."""

    def __init__(self, metrics: Metrics, tracing: Tracing | None, log: RequestLog) -> None:
        self.metrics = metrics
        self.tracing = tracing
        self.log = log

    def close(self) -> None:
        self.log.flush()
        if self.tracing is not None:
            self.tracing.shutdown()
