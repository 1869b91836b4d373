"""CPU cost of tracing one request, export included, per sampler.

    .venv/bin/python bench/tracing_cost.py [ROOT]

ROOT is a checkout to import `gateway` from (default: this one), so the same script measures
an older version (`git archive <commit> gateway | tar -x -C /tmp/old`). A "request" is what
gateway/middlewares.py and gateway/proxy.py do with tracing on: a server span, a client span
around the upstream call with its traceparent, the trace id for the log line, the server
span ended with its attributes. Each sampler runs in a fresh process; the figure is the
process's CPU time (every thread: the batch processor encodes and sends in its own) over
N requests until the last span has been sent to bench/otlp_sink.py, divided by N.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
N = int(os.environ.get("TRACING_COST_REQUESTS", "20000"))
SAMPLERS = [
    ("parentbased_always_on (the default, 100%)", {"OTEL_TRACES_SAMPLER": "parentbased_always_on"}),
    (
        "parentbased_traceidratio 0.1",
        {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.1"},
    ),
    (
        "parentbased_traceidratio 0.01",
        {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.01"},
    ),
    ("always_off (propagation only)", {"OTEL_TRACES_SAMPLER": "always_off"}),
]


def measure(root: Path, endpoint: str) -> None:
    """In the child: N requests' worth of spans, then the CPU time per request."""
    sys.path.insert(0, str(root))
    from multidict import CIMultiDict, CIMultiDictProxy

    from gateway.models import RequestState, Tenant, Usage
    from gateway.tracing import Tracing

    dropped = []

    class Drops(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "dropping" in record.getMessage().lower():
                dropped.append(record)

    logging.getLogger("opentelemetry").addHandler(Drops())
    chat = "/v1/chat/completions"
    headers = CIMultiDictProxy(
        CIMultiDict({"Host": "gw", "Content-Type": "application/json", "X-Api-Key": "k", "User-Agent": "wrk"})
    )
    tracing = Tracing(endpoint, "bench")
    tenant = Tenant("demo", "demo", "key:demo")

    def request(i: int) -> None:
        state = RequestState(f"req-{i}", tenant=tenant, model="gpt-4o-mini")
        span = tracing.start_server_span("POST", chat, chat, headers)
        with tracing.client_span(span, state.model):
            pass
        state.usage, state.response_model = Usage(9, 12), "gpt-4o-mini-2024-07-18"
        tracing.trace_id(span)
        tracing.end_server_span(span, state, 200)

    for i in range(2000):  # warm-up: imports, caches, the exporter's connection
        request(i)
    cpu, wall = time.process_time(), time.perf_counter()
    for i in range(N):
        request(i)
    tracing.shutdown()  # sends what is queued
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    note = f"  ({len(dropped)} drop warnings: raise OTEL_BSP_MAX_QUEUE_SIZE)" if dropped else ""
    print(f"{cpu / N * 1e6:7.1f} µs CPU a request ({wall / N * 1e6:6.1f} µs wall){note}", flush=True)


def main() -> None:
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else BENCH.parent
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    sink = subprocess.Popen([sys.executable, str(BENCH / "otlp_sink.py")], env=os.environ | {"PORT": str(port)})
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        print(f"{N} requests, gateway from {root}")
        for name, env in SAMPLERS:
            print(f"{name:<45}", end="", flush=True)
            # A queue that holds the whole run: the loop here ends spans far faster than
            # traffic does, and a dropped span would be a span not paid for.
            child_env = os.environ | env | {"OTEL_BSP_MAX_QUEUE_SIZE": str(2 * N + 8192)}
            code = f"import sys; sys.path.insert(0, {str(BENCH)!r}); import tracing_cost as t; t.measure({str(root)!r}, {f'http://127.0.0.1:{port}'!r})"
            subprocess.run([sys.executable, "-c", code], env=child_env, check=True)
    finally:
        sink.terminate()
        sink.wait()


if __name__ == "__main__":
    main()
