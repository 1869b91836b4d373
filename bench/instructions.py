"""Instructions per request, counted by callgrind: an A/B for hot-path changes that this
machine's noise does not blur.

    .venv/bin/python bench/instructions.py [json embeddings stream unredacted paced tracing tracing10 redis budgets …]

wrk's figures move by ±5% between runs here; callgrind counts the instructions the process
executes, and the count repeats to within about 1%. It sees user space only: what the kernel
does for a syscall is not in it, so it ranks code changes, not whole-request cost. Each side
(bare relay, gateway) runs under valgrind against the same nginx upstream as `make bench`;
after a warm-up that is not counted, a fixed number of requests (`INSTR_REQUESTS`,
`INSTR_CONCURRENCY` at a time: 10) is counted. To compare two commits, run each checkout's copy with the same venv:
`.venv/bin/python /tmp/other-checkout/bench/instructions.py` measures that checkout's gateway.
Needs valgrind (Debian's `valgrind`); about 20 s a side.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import aiohttp
import run  # bench/run.py: the same upstreams, replies and gateway settings

REQUESTS = int(os.environ.get("INSTR_REQUESTS", "300"))
# Requests in flight: with Redis, how many store operations share a batch follows it (wrk's 50
# give batches of ~25; 10 under valgrind give ~2.5, so each batch's cost shows more).
CONCURRENCY = int(os.environ.get("INSTR_CONCURRENCY", "10"))
WARM_UP = 100
# scenario: (request body, upstream, extra gateway settings)
SCENARIOS: dict[str, tuple[dict[str, Any], str, dict[str, str]]] = {
    "json": (run.JSON_BODY, "json", {}),
    "stream": (run.STREAM_BODY, "sse", {}),
    "unredacted": (run.STREAM_BODY, "sse", {"REDACT_KINDS": ""}),  # what streaming redaction costs
    "openai": (run.STREAM_BODY, "openai", {}),  # OpenAI's real chunk layout
    "openai_unredacted": (run.STREAM_BODY, "openai", {"REDACT_KINDS": ""}),
    "anthropic": (run.MESSAGES_BODY, "anthropic", {}),  # Anthropic's Messages stream on /v1/messages
    "responses": (run.RESPONSES_BODY, "responses", {}),  # the Responses API's event stream on /v1/responses
    "embeddings": (run.EMBEDDINGS_BODY, "embeddings", {}),  # a 1536-dim base64 embedding on /v1/embeddings
    "routes": (run.JSON_BODY, "json", {"ROUTES": "20"}),  # a 20-route ROUTES_FILE (run.routes_file)
    "policies": (run.JSON_BODY, "json", {"POLICIES": "20"}),  # a 20-policy Cedar file (run.policy_files)
    "paced": (run.STREAM_BODY, "paced", {}),  # one event per read: the per-event path
    "paced_unredacted": (run.STREAM_BODY, "paced", {"REDACT_KINDS": ""}),  # the same, redaction off
    # Spans sent to bench/otlp_sink.py (callgrind counts every thread: the batch processor's
    # encoding and sending too); wrk-like roots (no incoming traceparent). A batch goes when
    # it is full, never on a timer (whose firings would depend on valgrind's pace): 512 spans
    # as the bench's 100% row sends them, 64 as its 10% row sends ~130 every 200 ms.
    "tracing": (run.JSON_BODY, "json", {"OTLP": "512", "OTEL_TRACES_SAMPLER": "parentbased_always_on"}),
    "tracing10": (
        run.JSON_BODY,
        "json",
        {"OTLP": "64", "OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.1"},
    ),
    # Every new trace dropped: what the unsampled nine in ten cost, without tracing10's noise
    # (which requests the trace ids pick moves it by ~0.5%).
    "tracing0": (
        run.JSON_BODY,
        "json",
        {"OTLP": "64", "OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0"},
    ),
    "redis": (run.JSON_BODY, "json", {"REDIS_URL": "redis"}),  # quotas on redis-server
    # SPEC §14 on Redis: token budgets beside the quota (a reserve before, a settle after)
    "budgets": (run.JSON_BODY, "json", {"REDIS_URL": "redis", "TOKEN_QUOTA": "1000000000000"}),
    "budgets_memory": (run.JSON_BODY, "json", {"TOKEN_QUOTA": "1000000000000"}),  # the policy without Redis
}
# Counted requests where REQUESTS does not fit: at 100%, two full batches (1,024 spans) fall in
# the window whatever it starts with, so export is counted for exactly the spans made in it; at
# 10%, the trace ids decide what is sampled: enough requests that the sampled share is stable.
COUNTED = {"tracing": 512, "tracing10": 4096}


async def _post(port: int, body: dict[str, Any], count: int) -> None:
    paths = {
        id(run.MESSAGES_BODY): "/v1/messages",
        id(run.RESPONSES_BODY): "/v1/responses",
        id(run.EMBEDDINGS_BODY): "/v1/embeddings",
    }
    path = paths.get(id(body), "/v1/chat/completions")
    limit = asyncio.Semaphore(CONCURRENCY)
    async with aiohttp.ClientSession() as session:

        async def one() -> None:
            async with (
                limit,
                session.post(f"http://127.0.0.1:{port}{path}", json=body, headers={"X-Api-Key": "bench"}) as reply,
            ):
                await reply.read()
                if reply.status != 200:
                    raise RuntimeError(f"status {reply.status}")

        await asyncio.gather(*(one() for _ in range(count)))


def _counted(
    argv: list[str], env: dict[str, str], port: int, body: dict[str, Any], tmp: Path, requests: int = REQUESTS
) -> float:
    """Thousands of instructions per request of the process `argv` (serving on `port`)."""
    out = tmp / f"callgrind.{port}"
    valgrind = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}"]
    proc = run.Proc(valgrind + argv, run.SUT_CPU, env, cwd=tmp)
    try:
        run.wait_port(port, timeout=120)  # start-up under valgrind is slow
        asyncio.run(_post(port, body, WARM_UP))
        subprocess.run(["callgrind_control", "--instr=on", str(proc.pid)], check=True, capture_output=True)
        asyncio.run(_post(port, body, requests))
        subprocess.run(["callgrind_control", "--instr=off", str(proc.pid)], check=True, capture_output=True)
    finally:
        proc.stop()
    totals = [line for line in out.read_text().splitlines() if line.startswith("totals:")]
    return int(totals[0].split()[1]) / requests / 1000


def main() -> None:
    for tool in ("valgrind", "callgrind_control", "nginx", "node", "taskset"):
        if shutil.which(tool) is None:
            sys.exit(f"needs {tool}")
    chosen = sys.argv[1:] or list(SCENARIOS)
    tmp = Path(tempfile.mkdtemp(prefix="instructions-"))
    json_port, sse_port, openai_port, anthropic_port, responses_port, embeddings_port = (
        run.free_port() for _ in range(6)
    )
    paced_port, otlp_port, redis_port = (run.free_port() for _ in range(3))
    helpers = [
        run.nginx(
            tmp,
            {
                "json": json_port,
                "sse": sse_port,
                "openai": openai_port,
                "anthropic": anthropic_port,
                "responses": responses_port,
                "embeddings": embeddings_port,
            },
        ),
        run.Proc(["node", str(run.ROOT / "bench" / "paced_upstream.js")], run.LOAD_CPU, {"PORT": str(paced_port)}),
        run.Proc([run.PY, str(run.ROOT / "bench" / "otlp_sink.py")], run.LOAD_CPU, {"PORT": str(otlp_port)}),
    ]
    if any("REDIS_URL" in SCENARIOS[name][2] for name in chosen):
        redis = ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        helpers.append(run.Proc(redis, run.LOAD_CPU))
        run.wait_port(redis_port)
    upstreams = {
        "json": json_port,
        "sse": sse_port,
        "openai": openai_port,
        "anthropic": anthropic_port,
        "responses": responses_port,
        "embeddings": embeddings_port,
        "paced": paced_port,
    }
    counts = ", ".join(f"{name} {COUNTED[name]}" for name in chosen if name in COUNTED)
    print(
        f"thousands of instructions per request (callgrind), {REQUESTS} requests ({counts or 'each'}), {CONCURRENCY} at a time"
    )
    print("| scenario | bare relay | gateway | bare / gateway |\n|---|---|---|---|")
    try:
        for port in (*upstreams.values(), otlp_port):
            run.wait_port(port)
        for name in chosen:
            body, upstream, settings = SCENARIOS[name]
            settings = dict(settings)  # its markers are popped below
            requests = COUNTED.get(name, REQUESTS)
            url = f"http://127.0.0.1:{upstreams[upstream]}"
            if settings.pop("ROUTES", None):
                settings |= run.routes_file(tmp, upstreams[upstream])
            if settings.pop("POLICIES", None):
                settings |= run.policy_files(tmp)
            if "REDIS_URL" in settings:
                settings["REDIS_URL"] = f"redis://127.0.0.1:{redis_port}/0"
            if batch := settings.pop("OTLP", None):
                settings |= {
                    "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{otlp_port}",
                    "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": batch,
                    "OTEL_BSP_SCHEDULE_DELAY": "3600000",
                }
            bare_port, gateway_port = run.free_port(), run.free_port()
            bare = _counted(
                [run.PY, str(run.ROOT / "bench" / "bare_relay.py")],
                {"UPSTREAM": url, "PORT": str(bare_port)},
                bare_port,
                body,
                tmp,
                requests,
            )
            gateway = _counted(
                [run.PY, str(run.ROOT / "gateway.py")],
                {**run.gateway_settings(url, gateway_port), **settings},
                gateway_port,
                body,
                tmp,
                requests,
            )
            print(f"| {name} | {bare:.0f} | {gateway:.0f} | {bare / gateway:.0%} |", flush=True)
    finally:
        for helper in helpers:
            helper.stop()
        if keep := os.environ.get("INSTR_KEEP"):  # the callgrind files, for callgrind_annotate
            for out in tmp.glob("callgrind.*"):
                shutil.copy(out, keep)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
