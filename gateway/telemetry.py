"""Metrics (aioprometheus) and the JSON request log; traces are in gateway/tracing.py.

The only module that touches aioprometheus, and only through its public API. Metrics live in
a private registry built per app. Tenants and keys are never label values, and client-chosen
label values (the model) are checked and capped, so /metrics always parses.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
import threading
import time
from typing import IO

import orjson
from aioprometheus import histogram
from aioprometheus.collectors import Counter, Gauge, Histogram, Registry
from aioprometheus.renderer import render

from .models import RequestState
from .tracing import Tracing

CHAT_ROUTE = "/v1/chat/completions"
# LLM latencies run from milliseconds (errors, cache hits) to minutes (long generations).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, float("inf"))
QUOTA_BLOCK_REASONS = ("exceeded", "tokens")  # the request quota, the token budget (SPEC §14)
CIRCUIT_EVENTS = ("open", "half_open", "close")  # with ROUTES_FILE (SPEC §13)
CIRCUIT_STATE = "circuit_state"
CIRCUIT_STATE_DOC = "Circuit breaker per upstream: 0 closed, 1 half-open, 2 open."
CB_EVENTS = ("timeout", "load_shed", "store_error", "upstream_error", "client_disconnect")
RELOAD_RESULTS = ("ok", "refused")  # config_reloads_total (SPEC §10)
OTHER = "other"
LOG_MODEL_MAX = 256
MAX_PENDING_BYTES = 4 * 1024 * 1024  # log lines waiting for a stdout that does not keep up
UNKNOWN = "unknown"  # no model named (rejected before the body was read)
# aioprometheus writes label values into the text format as they are, unescaped: a `"`, `\`
# or line break in one would end the value early and let a client write its own lines. So a
# client-chosen value is kept only when it is made of characters that need no escaping and
# that model names use (`gpt-4o-mini`, `meta-llama/Llama-3-8B`, `ft:gpt-4o:org:x:id`,
# `llama3.1:8b`, `@cf/meta/llama-3`, `anthropic.claude-v2:1`); anything else is `other`.
MODEL_LABEL_MAX = 64
_MODEL_LABEL = re.compile(r"[A-Za-z0-9._:/@+-]+")


_OWN_WORDS = frozenset({OTHER, UNKNOWN})


class BoundedLabels:
    """Client-chosen label values: the first `limit` distinct acceptable ones, then `other`.

    A value is acceptable when it is 1..MODEL_LABEL_MAX characters from [A-Za-z0-9._:/@+-]
    and not one of the gateway's own words (`other`, `unknown`: a client naming its model so
    would pass for them); a rejected value does not take one of the `limit` places.
    """

    __slots__ = ("_limit", "_seen")

    def __init__(self, limit: int) -> None:
        self._seen: set[str] = set()
        self._limit = limit

    def __call__(self, value: str | None) -> str:
        if not value:
            return UNKNOWN
        if value in self._seen:
            return value
        if (
            len(self._seen) >= self._limit
            or len(value) > MODEL_LABEL_MAX
            or not _MODEL_LABEL.fullmatch(value)
            or value in _OWN_WORDS
        ):
            return OTHER
        self._seen.add(value)
        return value


class _Family:
    """A counter or gauge whose values are counted in a plain dict on the request path and
    handed to aioprometheus with its public `set` when /metrics is scraped.

    Why not `Counter.inc` per event: aioprometheus serialises the label dict to JSON and
    validates the label names on every call (twice per `add`), ~2.5-3.5 µs an event, ~20 µs
    for a request's eight events; a dict update is ~0.1 µs (bench/metrics_cost.py).
    """

    __slots__ = ("_collector", "_counts", "_names")

    def __init__(self, collector: Counter | Gauge, *names: str) -> None:
        self._collector = collector
        self._names = names
        self._counts: dict[tuple[str, ...], int] = {}

    def add(self, key: tuple[str, ...], amount: int = 1) -> None:
        counts = self._counts
        counts[key] = counts.get(key, 0) + amount

    def set(self, key: tuple[str, ...], value: int) -> None:
        self._counts[key] = value

    def forget(self, key: tuple[str, ...], collector: Counter | Gauge) -> None:
        """`key`'s series gone: the others are handed to `collector`, a new one, from the next
        scrape (aioprometheus has no public way to drop one series from a collector)."""
        self._counts.pop(key, None)
        self._collector = collector

    def publish(self) -> None:
        names, collector = self._names, self._collector
        for key, value in self._counts.items():
            collector.set(dict(zip(names, key, strict=True)), value)


class _Series:
    """One histogram series with fixed labels, observed on the request path.

    The first observation goes through the collector, which makes the series; the next ones
    straight to the series itself (the collector's public `get_value`, the series' public
    `observe`): the collector's `observe` serialises the label dict to JSON and type-checks
    the value through `typing.cast` on every call, a third of its cost.
    """

    __slots__ = ("_collector", "_labels", "_series")

    def __init__(self, collector: Histogram, labels: dict[str, str]) -> None:
        self._collector = collector
        self._labels = labels
        self._series: histogram.Histogram | None = None

    def observe(self, value: float) -> None:
        series = self._series
        if series is None:
            self._collector.observe(self._labels, value)
            got = self._collector.get_value(self._labels)
            assert isinstance(got, histogram.Histogram)
            self._series = got
        else:
            series.observe(value)


class Metrics:
    def __init__(self, model_label_limit: int) -> None:
        self.registry = r = Registry()

        def family(kind: type[Counter] | type[Gauge], name: str, doc: str, *labels: str) -> _Family:
            return _Family(kind(name, doc, registry=r), *labels)

        self.requests = family(Counter, "requests_total", "Requests received, by route.", "route")
        self.responses = family(
            Counter, "http_requests_total", "Responses sent, by route, model and status.", "route", "model", "status"
        )
        self.inflight = family(
            Gauge, "inflight_requests", "LLM requests in flight, every POST route (streams until their last byte)."
        )
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
        self.reloads = family(
            Counter, "config_reloads_total", "SIGHUP reloads of the file-backed configuration, by result.", "result"
        )
        self.log_dropped = family(
            Counter, "log_lines_dropped_total", "Request-log lines dropped: stdout did not take them (4 MiB waited)."
        )
        self._family = family
        self.circuits: _Family | None = None  # made with the first breaker: only with ROUTES_FILE
        self._families = [
            self.requests,
            self.responses,
            self.inflight,
            self.redactions,
            self.quota_blocks,
            self.cb_events,
            self.ratelimit_blocks,
            self.tokens,
            self.reloads,
            self.log_dropped,
        ]
        # Observed per request through the public `observe` (it walks every bucket); a series
        # appears with its first observation.
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
        self._duration = duration
        self._durations: dict[str, _Series] = {}  # by route: the proxied routes' (a fixed few)
        self._ttfb = _Series(ttfb, {})
        self.model_label = BoundedLabels(model_label_limit)
        # Every family shows from the start, at zero.
        self.inflight.add((), 0)
        for reason in QUOTA_BLOCK_REASONS:
            self.quota_blocks.add((reason,), 0)
        self.ratelimit_blocks.add((), 0)
        for event in CB_EVENTS:
            self.cb_events.add((event,), 0)
        self.requests.add((CHAT_ROUTE,), 0)
        for result in RELOAD_RESULTS:
            self.reloads.add((result,), 0)
        self.log_dropped.set((), 0)

    def request_started(self, route: str) -> None:
        self.requests.add((route,))

    def chat_started(self) -> None:
        self.inflight.add((), 1)

    def chat_finished(self) -> None:
        self.inflight.add((), -1)

    def response_sent(self, route: str, model: str | None, status: int, seconds: float, timed: bool = False) -> None:
        """`timed`: a proxied route's request, whose whole duration is observed (not probes,
        scrapes or unknown paths)."""
        self.responses.add((route, self.model_label(model), str(status)))
        if timed:
            series = self._durations.get(route)
            if series is None:
                series = self._durations[route] = _Series(self._duration, {"route": route})
            series.observe(seconds)

    def upstream_first_byte(self, seconds: float) -> None:
        self._ttfb.observe(seconds)

    def cb_event(self, event: str) -> None:
        self.cb_events.add((event,))

    def circuit(self, upstream: str, event: str | None, state: int) -> None:
        """A breaker changed (`event`: open, half_open, close) or was made (None)."""
        circuits = self.circuits
        if circuits is None:  # routing is on: its events show from the start, at zero
            circuits = self.circuits = self._family(Gauge, CIRCUIT_STATE, CIRCUIT_STATE_DOC, "upstream")
            self._families.append(circuits)
            for name in CIRCUIT_EVENTS:
                self.cb_events.add((name,), 0)
        if event is not None:
            self.cb_events.add((event,))
        circuits.set((upstream,), state)

    def circuit_gone(self, upstream: str) -> None:
        """An upstream a reload no longer names: its circuit_state series leaves /metrics (it
        stayed at its last state for ever). The gauge is made anew, through the registry's
        public deregister, and the other upstreams' series go to it."""
        circuits = self.circuits
        if circuits is None:
            return
        self.registry.deregister(CIRCUIT_STATE)
        circuits.forget((upstream,), Gauge(CIRCUIT_STATE, CIRCUIT_STATE_DOC, registry=self.registry))

    def quota_blocked(self, reason: str = "exceeded") -> None:
        """A request refused by its tenant's quota: `exceeded` (requests) or `tokens`."""
        self.quota_blocks.add((reason,))

    def rate_limited(self) -> None:
        self.ratelimit_blocks.add(())

    def redacted(self, kind: str, direction: str, times: int = 1) -> None:
        self.redactions.add((kind, direction), times)

    def tokens_used(self, model: str | None, prompt: int, completion: int) -> None:
        label = self.model_label(model)
        self.tokens.add(("prompt", label), prompt)
        self.tokens.add(("completion", label), completion)

    def config_reloaded(self, ok: bool) -> None:
        self.reloads.add((RELOAD_RESULTS[0] if ok else RELOAD_RESULTS[1],))

    def render(self, accept: list[str]) -> tuple[bytes, dict[str, str]]:
        for family in self._families:
            family.publish()
        return render(self.registry, accept)


class RequestLog:
    """One JSON line per request on stdout; never prompt or completion text, never a key.

    The model is cut to LOG_MODEL_MAX characters: it is the client's, as long as its body. It and
    the path may hold any character: Unicode's line breaks are escaped as JSON's control ones are.

    Lines are buffered and handed over at most every 100 ms to a thread that writes them, so a
    slow stdout reader costs one write per interval rather than one per request, and one that
    stops reading (a stuck journald or log shipper: the pipe full, the write blocked) holds up
    that thread only, never the loop: requests, /healthz and SIGTERM go on. Lines it has not
    taken yet are kept up to MAX_PENDING_BYTES; past that, new ones are dropped.
    """

    def __init__(self, stream: IO[bytes] | None = None) -> None:
        self._stream = stream if stream is not None else _stdout()
        self._owned = stream is None  # closed by the writer thread once the log is closed
        self._buffer = bytearray()
        self._flush_handle: asyncio.TimerHandle | None = None
        self._second = -1
        self._timestamp = ""
        self._pending: list[bytes] = []  # handed over, not yet written (guarded by _ready)
        self._pending_bytes = 0
        self._writing = False
        self._ready = threading.Condition()
        self._writer: threading.Thread | None = None
        self._closed = False
        self.dropped = 0  # lines dropped while the reader did not keep up

    def write(
        self, state: RequestState, method: str, path: str, status: int, seconds: float, trace_id: str | None
    ) -> None:
        now = time.time()
        second, millis = divmod(int(now * 1000), 1000)
        if second != self._second:  # formatted once a second, not once a request
            self._second = second
            self._timestamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        record: dict[str, object] = {
            "ts": self._timestamp + _MILLIS[millis],
            "request_id": state.request_id,
            "method": method,
            "path": path,
            "tenant": state.tenant.public_id if state.tenant is not None else None,
            "model": state.model[:LOG_MODEL_MAX] if state.model is not None else None,
            "stream": state.stream,
            "status": status,
            "duration_ms": _ms(seconds),
            "upstream_ttfb_ms": _ms(state.upstream_ttfb) if state.upstream_ttfb is not None else None,
        }
        if state.upstream is not None:
            record["upstream"] = state.upstream
        if state.stream_error is not None:
            record["stream_error"] = state.stream_error
        if trace_id is not None:
            record["trace_id"] = trace_id
        line = orjson.dumps(record)
        if not line.isascii():  # a client's model or path: Unicode's own line breaks escaped too
            for raw, escaped in _UNICODE_LINE_BREAKS:
                line = line.replace(raw, escaped)
        self._buffer += line
        self._buffer += b"\n"
        if self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_later(0.1, self._hand_over)

    def flush(self, timeout: float | None = None) -> bool:
        """Hand the buffered lines over and wait until they are written (at most `timeout`
        seconds: at shutdown, a reader that stopped must not keep the process). True if all were."""
        self._hand_over()
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._ready:
            while self._pending or self._writing:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._ready.wait(left)
        return True

    def close(self, timeout: float) -> None:
        """Write what is left (at most `timeout` seconds), then let the writer thread end."""
        self.flush(timeout)
        with self._ready:
            self._closed = True
            self._ready.notify_all()

    def _hand_over(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if not self._buffer:
            return
        data, self._buffer = bytes(self._buffer), bytearray()
        with self._ready:
            if self._closed or self._pending_bytes + len(data) > MAX_PENDING_BYTES:
                self.dropped += data.count(b"\n")
                return
            self._pending.append(data)
            self._pending_bytes += len(data)
            self._ready.notify_all()
            if self._writer is None:
                self._writer = threading.Thread(target=self._write_out, name="request-log", daemon=True)
                self._writer.start()

    def _write_out(self) -> None:
        while True:
            with self._ready:
                while not self._pending:
                    self._writing = False
                    self._ready.notify_all()
                    if self._closed:
                        if self._owned:
                            self._stream.close()
                        return
                    self._ready.wait()
                data = b"".join(self._pending)
                self._pending.clear()
                self._pending_bytes = 0
                self._writing = True
            try:
                view = memoryview(data)
                while view:  # a raw stream may take part of it (a signal during the write)
                    written = self._stream.write(view)
                    if not written:
                        break
                    view = view[written:]
                self._stream.flush()
            except (OSError, ValueError):
                pass  # stdout gone (closed pipe): logging must never fail a request


def _stdout() -> IO[bytes]:
    """stdout, unbuffered, under a descriptor of its own: the writer thread blocked in a write
    holds no lock that sys.stdout's flush at exit would wait for."""
    try:
        return os.fdopen(os.dup(sys.stdout.fileno()), "wb", buffering=0)
    except (AttributeError, OSError, ValueError):  # no usable stdout: the lines go nowhere
        return open(os.devnull, "wb", buffering=0)


# Valid unescaped in JSON, left so by orjson, yet line breaks to Unicode (str.splitlines, editors):
# one in a client's model name split its log line in two, neither of them JSON.
_UNICODE_LINE_BREAKS = tuple((c.encode(), f"\\u{ord(c):04x}".encode()) for c in "\u0085\u2028\u2029")
_MILLIS = tuple(f".{ms:03d}Z" for ms in range(1000))  # a timestamp's ends, looked up rather than formatted


def _ms(seconds: float) -> float:
    """Milliseconds to two decimals: round() to an integer first, a third of round(x, 2)'s cost."""
    return round(seconds * 100_000) / 100


class Telemetry:
    """What the `observed` wrapper and the proxy use; tracing is optional."""

    def __init__(self, metrics: Metrics, tracing: Tracing | None, log: RequestLog) -> None:
        self.metrics = metrics
        self.tracing = tracing
        self.log = log

    def render(self, accept: list[str]) -> tuple[bytes, dict[str, str]]:
        """/metrics: the metrics, with the log's dropped lines as they are now."""
        self.metrics.log_dropped.set((), self.log.dropped)
        return self.metrics.render(accept)

    def close(self) -> None:
        self.log.close(timeout=1.0)  # a stdout nobody reads must not keep the process
        if self.tracing is not None:
            self.tracing.shutdown()
