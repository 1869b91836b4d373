"""make bench: the gateway against a bare aiohttp relay, same machine, same run.

The system under test (gateway or bare relay) is pinned to CPU 0; nginx (fixed JSON and SSE
replies), the paced upstream (node), Redis, the OTLP sink, wrk and the stream client share
CPU 1. Every load is bounded in time and targets 127.0.0.1; everything started is stopped.
Prints one markdown table and writes it to bench/results/latest.md.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
SUT_CPU, LOAD_CPU = "0", "1"
DURATION = int(os.environ.get("BENCH_SECS", "8"))  # per side and scenario, split into rounds
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "4"))
CONNECTIONS = int(os.environ.get("BENCH_CONNECTIONS", "50"))
STREAMS = int(os.environ.get("BENCH_STREAMS", "500"))
ONLY = set(
    os.environ.get(
        "BENCH_ONLY",
        "json,unique,stream,openai,anthropic,responses,embeddings,unredacted,redis,budgets,tracing,policies,routes,"
        "production,paced",
    ).split(",")
)
CLK_TCK = os.sysconf("SC_CLK_TCK")
PROMPT = (
    "Please summarise this note. Customer Jane Doe (jane.doe@example.com, +1 415 555 2671) paid with "
    "card 4242 4242 4242 4242 on 2024-01-15 for order 123456789012; version 3.11.7, total $1,234.56. "
) * 4
JSON_BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": PROMPT}]}
UNIQUE_BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Ticket NONCE. " + PROMPT}]}

STREAM_BODY = {**JSON_BODY, "stream": True}
MESSAGES_BODY = {"model": "claude-sonnet-4-5", "max_tokens": 1024, "messages": JSON_BODY["messages"], "stream": True}
RESPONSES_BODY = {"model": "gpt-4o-mini", "input": PROMPT, "stream": True}
EMBEDDINGS_BODY = {"model": "text-embedding-3-small", "input": PROMPT}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port}")


class Proc:
    def __init__(self, argv: list[str], cpu: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            ["taskset", "-c", cpu, *argv], env={**os.environ, **(env or {})}, cwd=cwd, stdout=self.log, stderr=self.log
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK

    def peak_rss_mb(self) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def sse_reply() -> str:
    events = []
    for i in range(40):
        chunk = {
            "id": "chatcmpl-bench",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "bench",
            "choices": [{"index": 0, "delta": {"content": f" token{i}"}, "finish_reason": None}],
        }
        events.append("data: " + json.dumps(chunk) + "\n\n")
    return "".join(events) + "data: [DONE]\n\n"


# Real-shaped replies (issue 17): what OpenAI and Anthropic send for a 40-token answer.
REPLY_TEXT = (
    "Sure! Here is a short summary of the note: the customer paid for order 123456789012 on "
    "2024-01-15, version 3.11.7 is in use, and the total came to $1,234.56. Let me know if you "
    "need anything else, such as a longer summary or the details"
)
TOKENS = [(" " if i else "") + w for i, w in enumerate(REPLY_TEXT.split())][:40]


def openai_stream() -> str:
    """OpenAI's chunk layout (2025): compact JSON, service_tier, system_fingerprint, logprobs,
    "usage": null on every chunk (the request asked for usage), a per-chunk "obfuscation" pad
    of varying length, a role chunk, text chunks, a finish chunk, a usage chunk, [DONE]."""
    pads = "Zq3xQ kP9 aB7cD1eF 4g Hh2jK8LmN0 pQ r5StU6v wX7yZ"
    common = {
        "id": "chatcmpl-CB1nzHhVb8V4FnuQ3DJP6Ztgb7yUz",
        "object": "chat.completion.chunk",
        "created": 1756215412,
        "model": "gpt-4o-mini-2024-07-18",
        "service_tier": "default",
        "system_fingerprint": "fp_560af6e559",
    }

    def chunk(n: int, choices: list[dict[str, Any]], usage: Any = None) -> str:
        pad = pads.split(" ")[n % 8]
        body = {**common, "choices": choices, "usage": usage, "obfuscation": pad}
        return "data: " + json.dumps(body, separators=(",", ":"), ensure_ascii=False) + "\n\n"

    def choice(delta: dict[str, Any], finish: str | None = None) -> list[dict[str, Any]]:
        return [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]

    events = [chunk(0, choice({"role": "assistant", "content": "", "refusal": None}))]
    events += [chunk(i + 1, choice({"content": t})) for i, t in enumerate(TOKENS)]
    events.append(chunk(41, choice({}, "stop")))
    usage = {
        "prompt_tokens": 98,
        "completion_tokens": 40,
        "total_tokens": 138,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }
    events.append(chunk(42, [], usage))
    return "".join(events) + "data: [DONE]\n\n"


# The spaces Anthropic's API pads each event with before its last brace (so that an event's
# length does not give its text away), as captured streams show them: 3 to 15, varying.
ANTHROPIC_PADS = [4, 6, 11, 6, 3, 13, 7, 15, 9, 5]


def anthropic_stream() -> str:
    """Anthropic's Messages event stream for the same answer as its API writes it: event:
    lines, compact JSON padded with spaces before the last brace, `{"type": "ping"}` spaced."""
    count = iter(range(1000))

    def event(name: str, body: dict[str, Any]) -> str:
        if name == "ping":
            return 'event: ping\ndata: {"type": "ping"}\n\n'
        data = json.dumps(body, separators=(",", ":"), ensure_ascii=False)
        pad = " " * ANTHROPIC_PADS[next(count) % len(ANTHROPIC_PADS)]
        return f"event: {name}\ndata: " + data[:-1] + pad + "}\n\n"

    message = {
        "id": "msg_01XFDUDYJgAACzvnptvVoYEL",
        "type": "message",
        "role": "assistant",
        "model": "claude-sonnet-4-5-20250929",
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {
            "input_tokens": 98,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0},
            "output_tokens": 1,
            "service_tier": "standard",
        },
    }
    events = [event("message_start", {"type": "message_start", "message": message})]
    events.append(
        event(
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        )
    )
    events.append(event("ping", {"type": "ping"}))
    for t in TOKENS:
        delta = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": t}}
        events.append(event("content_block_delta", delta))
    events.append(event("content_block_stop", {"type": "content_block_stop", "index": 0}))
    events.append(
        event(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": 40},
            },
        )
    )
    events.append(event("message_stop", {"type": "message_stop"}))
    return "".join(events)


def responses_stream() -> str:
    """The Responses API's event stream for the same answer, as OpenAI writes it now: `event:`
    lines, the type first and the other fields in alphabetical order, a sequence_number on
    every event, `logprobs: []` and an `obfuscation` pad on each delta; created, in_progress,
    the message item's added/part added, 40 deltas, the three .done copies, completed."""
    number = iter(range(1000))
    pads = ["Zq3xQ", "kP9", "aB7cD1eF", "4g", "Hh2jK8LmN0", "pQ", "r5StU6v", "wX7yZ"]

    def event(kind: str, **fields: Any) -> str:
        data = {"type": kind, **dict(sorted({**fields, "sequence_number": next(number)}.items()))}
        return f"event: {kind}\ndata: " + json.dumps(data, separators=(",", ":"), ensure_ascii=False) + "\n\n"

    item_id = "msg_68b2f1c3a4e88190a3f1a0b2c3d4e5f60b1c2d3e4f5a6b7c"
    response = {
        "id": "resp_68b2f1c2f9d48190b5c6a7d8e9f0a1b20c3d4e5f6a7b8c9d",
        "object": "response",
        "created_at": 1756215412,
        "status": "in_progress",
        "background": False,
        "error": None,
        "incomplete_details": None,
        "instructions": None,
        "max_output_tokens": None,
        "model": "gpt-4o-mini-2024-07-18",
        "output": [],
        "parallel_tool_calls": True,
        "previous_response_id": None,
        "reasoning": {"effort": None, "summary": None},
        "service_tier": "default",
        "store": True,
        "temperature": 1.0,
        "text": {"format": {"type": "text"}, "verbosity": "medium"},
        "tool_choice": "auto",
        "tools": [],
        "top_p": 1.0,
        "truncation": "disabled",
        "usage": None,
        "user": None,
        "metadata": {},
    }
    text = "".join(TOKENS)
    where = {"content_index": 0, "item_id": item_id, "output_index": 0}
    part = {"type": "output_text", "annotations": [], "logprobs": [], "text": text}
    item = {"id": item_id, "type": "message", "status": "completed", "content": [part], "role": "assistant"}
    usage = {
        "input_tokens": 98,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": 40,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 138,
    }
    events = [event("response.created", response=response), event("response.in_progress", response=response)]
    events.append(
        event("response.output_item.added", item={**item, "status": "in_progress", "content": []}, output_index=0)
    )
    events.append(event("response.content_part.added", part={**part, "text": ""}, **where))
    events += [
        event("response.output_text.delta", delta=t, logprobs=[], obfuscation=pads[i % 8], **where)
        for i, t in enumerate(TOKENS)
    ]
    events.append(event("response.output_text.done", logprobs=[], text=text, **where))
    events.append(event("response.content_part.done", part=part, **where))
    events.append(event("response.output_item.done", item=item, output_index=0))
    final = {**response, "status": "completed", "output": [item], "usage": usage}
    events.append(event("response.completed", response=final))
    return "".join(events)


def embeddings_reply() -> str:
    """An embedding of 1536 dimensions as the official SDKs ask for it (base64 float32)."""
    import base64
    import random as rnd
    import struct

    floats = [rnd.Random(i).uniform(-0.1, 0.1) for i in range(1536)]
    vector = base64.b64encode(struct.pack("<1536f", *floats)).decode()
    return json.dumps(
        {
            "object": "list",
            "data": [{"object": "embedding", "index": 0, "embedding": vector}],
            "model": "text-embedding-3-small",
            "usage": {"prompt_tokens": 98, "total_tokens": 98},
        }
    )


JSON_REPLY = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1,
        "model": "bench",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "A fixed reply from the bench upstream. " * 8},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 120, "completion_tokens": 64, "total_tokens": 184},
    }
)


REPLIES = {
    "json": JSON_REPLY,
    "sse": sse_reply(),
    "openai": openai_stream(),
    "anthropic": anthropic_stream(),
    "responses": responses_stream(),
    "embeddings": embeddings_reply(),
}


def nginx(tmp: Path, ports: dict[str, int]) -> Proc:
    """Fixed replies as static files, one server per reply, each at every route's path; POST to
    a static file is a 405 that error_page turns into 200."""
    servers = []
    for name, port in ports.items():
        (tmp / name / "v1" / "chat").mkdir(parents=True)
        (tmp / name / "v1" / "chat" / "completions").write_text(REPLIES[name])
        for route in ("messages", "responses", "embeddings"):
            (tmp / name / "v1" / route).write_text(REPLIES[name])
        kind = "application/json" if name in ("json", "embeddings") else "text/event-stream"
        servers.append(
            f"  server {{ listen 127.0.0.1:{port}; root {tmp}/{name}; default_type {kind}; error_page 405 =200 $uri; }}"
        )
    conf = tmp / "nginx.conf"
    conf.write_text(f"""
daemon off; worker_processes 1; pid {tmp}/nginx.pid; error_log {tmp}/nginx-error.log; user root;
events {{ worker_connections 4096; }}
http {{
  access_log off; client_body_temp_path {tmp}; keepalive_requests 1000000;
{chr(10).join(servers)}
}}
""")
    return Proc(["nginx", "-c", str(conf), "-p", str(tmp)], LOAD_CPU)


def wrk(
    tmp: Path, url: str, body: dict[str, Any], seconds: int, path: str = "/v1/chat/completions"
) -> dict[str, float]:
    script = tmp / "post.lua"
    lua = (
        'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
        f'wrk.headers["X-Api-Key"] = "bench"\nwrk.body = {json.dumps(json.dumps(body))}\n'
    )
    if "NONCE" in json.dumps(body):  # a different prompt on every request: nothing to remember
        lua += (
            "local n = 0\nrequest = function()\n  n = n + 1\n"
            '  return wrk.format(nil, nil, nil, (string.gsub(wrk.body, "NONCE", tostring(n))))\nend\n'
        )
    script.write_text(lua)
    out = subprocess.run(
        [
            "taskset",
            "-c",
            LOAD_CPU,
            "wrk",
            "-t1",
            f"-c{CONNECTIONS}",
            f"-d{seconds}s",
            "--latency",
            "-s",
            str(script),
            url + path,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout

    def latency(label: str) -> float:
        match = re.search(rf"^\s+{label}\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        if not match:
            return float("nan")
        value, unit = float(match.group(1)), match.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
        "p50": latency("50%"),
        "p99": latency("99%"),
        "requests": requests,
        "errors": int(errors.group(1)) if errors else 0,
    }


def measure_wrk(
    tmp: Path, targets: list[tuple[Proc, int]], body: dict[str, Any], path: str = "/v1/chat/completions"
) -> list[dict[str, float]]:
    """Each target measured ROUNDS times, interleaved (a, b, a, b, ...), so a machine that
    speeds up or slows down during the run shifts both sides alike. Requests, time and CPU
    are summed over the rounds; latency percentiles are the median round's."""
    for _, port in targets:
        wrk(tmp, f"http://127.0.0.1:{port}", body, 2, path)  # warm-up: pools, caches, lazy imports
    rounds: list[list[dict[str, float]]] = [[] for _ in targets]
    seconds = max(2, DURATION // ROUNDS)
    for _ in range(ROUNDS):
        for (proc, port), results in zip(targets, rounds, strict=True):
            cpu_before = proc.cpu_seconds()
            result = wrk(tmp, f"http://127.0.0.1:{port}", body, seconds, path)
            result["cpu"] = proc.cpu_seconds() - cpu_before
            results.append(result)
    combined = []
    for (proc, _), results in zip(targets, rounds, strict=True):
        requests = sum(r["requests"] for r in results)
        by_p50 = sorted(results, key=lambda r: r["p50"])
        median = by_p50[len(by_p50) // 2]
        combined.append(
            {
                "rps": sum(r["rps"] for r in results) / len(results),
                "p50": median["p50"],
                "p99": median["p99"],
                "requests": requests,
                "errors": sum(r["errors"] for r in results),
                "cpu_ms": sum(r["cpu"] for r in results) * 1000 / max(1, requests),
                "rss": proc.peak_rss_mb(),
            }
        )
    return combined


def streams(port: int) -> dict[str, float]:
    out = subprocess.run(
        ["taskset", "-c", LOAD_CPU, "node", str(ROOT / "bench" / "stream_client.js")],
        env={
            **os.environ,
            "TARGET": f"http://127.0.0.1:{port}",
            "CONCURRENCY": str(STREAMS),
            "DURATION_S": str(DURATION),
        },
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return dict(json.loads(out))


def policy_files(tmp: Path) -> dict[str, str]:
    """A 20-policy Cedar file (bench/policy_cost.py's) whose plans admit the bench's tenant and model."""
    import policy_cost  # bench/policy_cost.py

    listed = json.loads(policy_cost.entities())
    listed += [
        {"uid": {"type": "Tenant", "id": "bench"}, "attrs": {}, "parents": [{"type": "Plan", "id": "team"}]},
        {"uid": {"type": "Model", "id": "gpt-4o-mini"}, "attrs": {}, "parents": [{"type": "Tier", "id": "team"}]},
    ]
    (tmp / "policies.cedar").write_text(policy_cost.twenty_policies())
    (tmp / "entities.json").write_text(json.dumps(listed))
    return {"POLICY_FILE": str(tmp / "policies.cedar"), "POLICY_ENTITIES_FILE": str(tmp / "entities.json")}


def routes_file(tmp: Path, upstream_port: int) -> dict[str, str]:
    """A 20-route ROUTES_FILE: 19 others first (globs among them), the bench's model last."""
    models = "".join(
        f'[[models]]\nmatch = "{name}"\nupstreams = [{{ upstream = "main" }}]\n\n'
        for name in [*(f"other-{n}" for n in range(10)), *(f"family-{n}-*" for n in range(9)), "gpt-4o-mini"]
    )
    path = tmp / "routes.toml"
    path.write_text(
        f'[upstreams.main]\nkind = "openai"\nbase_url = "http://127.0.0.1:{upstream_port}"\n'
        f'api_key_env = "OPENAI_API_KEY"\n\n{models}'
    )
    return {"ROUTES_FILE": str(path)}


def gateway_settings(upstream_url: str, port: int) -> dict[str, str]:
    """Every feature on; quota, rate limit and concurrency limit too high to reject."""
    return {
        "LISTEN_ADDR": f"127.0.0.1:{port}",
        "OPENAI_BASE_URL": upstream_url,
        "ANTHROPIC_BASE_URL": upstream_url,
        "OPENAI_API_KEY": "sk-bench",
        "RPS": "1000000",
        "BURST": "1000000",
        "DEFAULT_QUOTA": "1000000000",
        "MAX_CONCURRENCY": "100000",
    }


def gateway(upstream_port: int, **env: str) -> tuple[Proc, int]:
    port = free_port()
    cwd = Path(tempfile.mkdtemp())
    base = gateway_settings(f"http://127.0.0.1:{upstream_port}", port)
    command = os.environ.get("GATEWAY_CMD", f"{PY} {ROOT / 'gateway.py'}").split()
    proc = Proc(command, SUT_CPU, {**base, **env}, cwd=cwd)
    wait_port(port)
    return proc, port


def bare(upstream_port: int) -> tuple[Proc, int]:
    port = free_port()
    proc = Proc(
        [PY, str(ROOT / "bench" / "bare_relay.py")],
        SUT_CPU,
        {"UPSTREAM": f"http://127.0.0.1:{upstream_port}", "PORT": str(port)},
    )
    wait_port(port)
    return proc, port


def paced_through(proc: Proc, port: int) -> tuple[dict[str, float], float]:
    """The paced streams through one pinned relay: the client's figures with the relay's core
    busy share, and its peak RSS."""
    try:
        cpu_before, started = proc.cpu_seconds(), time.monotonic()
        through = streams(port)
        through["cpu_busy"] = (proc.cpu_seconds() - cpu_before) / (time.monotonic() - started)
        return through, proc.peak_rss_mb()
    finally:
        proc.stop()


def run() -> list[dict[str, Any]]:
    tmp = Path(tempfile.mkdtemp(prefix="bench-"))
    json_port, sse_port, openai_port, anthropic_port, paced_port, redis_port, otlp_port = (
        free_port() for _ in range(7)
    )
    responses_port, embeddings_port = free_port(), free_port()
    fixed = {"json": json_port, "sse": sse_port, "openai": openai_port, "anthropic": anthropic_port}
    helpers = [
        nginx(tmp, fixed | {"responses": responses_port, "embeddings": embeddings_port}),
        Proc(["node", str(ROOT / "bench" / "paced_upstream.js")], LOAD_CPU, {"PORT": str(paced_port)}),
        Proc(
            ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            LOAD_CPU,
        ),
        Proc([PY, str(ROOT / "bench" / "otlp_sink.py")], LOAD_CPU, {"PORT": str(otlp_port)}),
    ]
    rows: list[dict[str, Any]] = []
    try:
        for port in (*fixed.values(), responses_port, embeddings_port, paced_port, redis_port, otlp_port):
            wait_port(port)

        def wrk_pair(
            name: str, upstream: int, body: dict[str, Any], path: str = "/v1/chat/completions", **env: str
        ) -> None:
            relay, relay_port = bare(upstream)
            gw, gw_port = gateway(upstream, **env)
            try:
                baseline, measured = measure_wrk(tmp, [(relay, relay_port), (gw, gw_port)], body, path)
            finally:
                relay.stop()
                gw.stop()
            rows.append(
                {"scenario": name, "bare": baseline, "gateway": measured, "ratio": measured["rps"] / baseline["rps"]}
            )
            print(
                f"  {name}: gateway {measured['rps']:.0f} req/s vs bare {baseline['rps']:.0f} ({measured['rps'] / baseline['rps']:.0%})",
                flush=True,
            )

        print("measuring (about two minutes)...", flush=True)
        if "json" in ONLY:
            wrk_pair("non-stream, memory store", json_port, JSON_BODY)
        if "unique" in ONLY:
            wrk_pair("non-stream, a new prompt every request", json_port, UNIQUE_BODY)
        if "stream" in ONLY:
            wrk_pair("stream (40 events), memory store", sse_port, STREAM_BODY)
        if "openai" in ONLY:
            wrk_pair("stream, OpenAI's real chunk layout (43 events)", openai_port, STREAM_BODY)
        if "anthropic" in ONLY:
            wrk_pair("stream, Anthropic messages (46 events)", anthropic_port, MESSAGES_BODY, "/v1/messages")
        if "responses" in ONLY:
            wrk_pair(
                "stream, OpenAI Responses API's real event layout (47 events)",
                responses_port,
                RESPONSES_BODY,
                "/v1/responses",
            )
        if "embeddings" in ONLY:
            wrk_pair("non-stream, embeddings (1536 dims, base64)", embeddings_port, EMBEDDINGS_BODY, "/v1/embeddings")
        if "unredacted" in ONLY:  # for reference, not a target: what streaming redaction costs
            wrk_pair("stream (40 events), redaction off (reference)", sse_port, STREAM_BODY, REDACT_KINDS="")
        if "redis" in ONLY:
            wrk_pair(
                "non-stream, quotas on redis-server",
                json_port,
                JSON_BODY,
                REDIS_URL=f"redis://127.0.0.1:{redis_port}/0",
            )
        if "budgets" in ONLY:  # SPEC §14 on Redis: a reserve before and a settle after each request
            wrk_pair(
                "non-stream, quotas and token budgets on redis-server",
                json_port,
                JSON_BODY,
                REDIS_URL=f"redis://127.0.0.1:{redis_port}/0",
                TOKEN_QUOTA="1000000000000",
            )
        if "tracing" in ONLY:
            # Every request sampled (the SDK's default sampler, set here so an OTEL_TRACES_SAMPLER
            # in the caller's environment cannot change the row), then one in ten, as the README
            # advises at high request rates (wrk's requests carry no traceparent: all are roots).
            for name, sampler, ratio in (
                ("non-stream, tracing to OTLP", "parentbased_always_on", ""),
                ("non-stream, tracing to OTLP, 10% sampled", "parentbased_traceidratio", "0.1"),
            ):
                wrk_pair(
                    name,
                    json_port,
                    JSON_BODY,
                    OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{otlp_port}",
                    OTEL_BSP_SCHEDULE_DELAY="200",
                    OTEL_TRACES_SAMPLER=sampler,
                    OTEL_TRACES_SAMPLER_ARG=ratio,
                )
        if "policies" in ONLY:  # SPEC §15: a 20-policy Cedar file (decisions cached)
            wrk_pair("non-stream, 20 Cedar policies", json_port, JSON_BODY, **policy_files(tmp))
        if "routes" in ONLY:  # SPEC §13: a 20-route ROUTES_FILE, the bench's model the last route
            wrk_pair("non-stream, 20-route ROUTES_FILE", json_port, JSON_BODY, **routes_file(tmp, json_port))
        if "production" in ONLY:  # everything on at once (issue 23's production configuration)
            production = {
                "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
                "TOKEN_QUOTA": "1000000000000",
                "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{otlp_port}",
                "OTEL_BSP_SCHEDULE_DELAY": "200",
                "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                "OTEL_TRACES_SAMPLER_ARG": "0.1",
                **policy_files(tmp),
            }
            wrk_pair("production: non-stream", json_port, JSON_BODY, **production, **routes_file(tmp, json_port))
            wrk_pair(
                "production: stream, OpenAI's real chunk layout",
                openai_port,
                STREAM_BODY,
                **production,
                **routes_file(tmp, openai_port),
            )
        if "paced" not in ONLY:
            return rows

        direct = streams(paced_port)
        relayed, _ = paced_through(*bare(paced_port))
        through, rss = paced_through(*gateway(paced_port))
        rows.append(
            {
                "scenario": f"{STREAMS} paced streams (20 ms/event)",
                "direct": direct,
                "bare": relayed,
                "gateway": through,
                "rss": rss,
                "ratio": through["streams_per_s"] / direct["streams_per_s"],
            }
        )
        print(f"  paced: {through['streams_per_s']:.0f} vs {direct['streams_per_s']:.0f} streams/s", flush=True)
    finally:
        for helper in helpers:
            helper.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.machine(),
    )
    lines = [
        f"Measured {datetime.date.today()} on {os.cpu_count()} cores ({cpu}), Python {platform.python_version()}; "
        f"gateway or bare relay pinned to one core, load and upstreams on the other; wrk -c{CONNECTIONS}, "
        f"{DURATION} s per side in {ROUNDS} interleaved rounds.",
        "",
        "| scenario | bare relay req/s | gateway req/s | ratio | gateway p50 / p99 ms | bare p50 / p99 ms | gateway CPU ms/req | bare CPU ms/req | gateway peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if "direct" not in row:
            g, b = row["gateway"], row["bare"]
            errors = f" ({g['errors']} errors)" if g["errors"] else ""
            lines.append(
                f"| {row['scenario']} | {b['rps']:.0f} | {g['rps']:.0f}{errors} | {row['ratio']:.0%} | {g['p50']:.2f} / {g['p99']:.2f} | "
                f"{b['p50']:.2f} / {b['p99']:.2f} | {g['cpu_ms']:.3f} | {b['cpu_ms']:.3f} | {g['rss']:.0f} |"
            )
    for row in rows:
        if "direct" in row:
            d, b, g = row["direct"], row["bare"], row["gateway"]

            lines += [
                "",
                f"| {row['scenario']} | direct | through the bare relay | through the gateway |",
                "|---|---|---|---|",
                f"| completed streams/s | {d['streams_per_s']:.1f} | {b['streams_per_s']:.1f} | "
                f"{g['streams_per_s']:.1f} ({row['ratio']:.0%}) |",
                f"| time to first byte p50 / p99 ms | {d['ttfb_p50_ms']:.2f} / {d['ttfb_p99_ms']:.2f} | "
                f"{b['ttfb_p50_ms']:.2f} / {b['ttfb_p99_ms']:.2f} | {g['ttfb_p50_ms']:.2f} / {g['ttfb_p99_ms']:.2f} |",
                f"| added time to first byte p50 / p99 ms | | {_added_ttfb(b, d)} | {_added_ttfb(g, d)} |",
                f"| failed streams | {d['failed']} | {b['failed']} | {g['failed']} |",
                f"| relay core busy | | {b['cpu_busy']:.0%} | {g['cpu_busy']:.0%} |",
                f"| gateway peak RSS MB | | | {row['rss']:.0f} |",
            ]
    return "\n".join(lines)


def _added_ttfb(via: dict[str, float], direct: dict[str, float]) -> str:
    return f"{via['ttfb_p50_ms'] - direct['ttfb_p50_ms']:.2f} / {via['ttfb_p99_ms'] - direct['ttfb_p99_ms']:.2f}"


def main() -> None:
    for tool in ("taskset", "wrk", "nginx", "node", "redis-server"):
        if shutil.which(tool) is None:
            sys.exit(f"bench needs {tool}: bench/run.sh installs it")
    rows = run()
    text = table(rows)
    print()
    print(text)
    results = ROOT / "bench" / "results"
    results.mkdir(exist_ok=True)
    (results / "latest.md").write_text(text + "\n")
    (results / "latest.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
