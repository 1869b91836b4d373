"""Where the gateway's CPU goes under one bench load: py-spy samples the pinned gateway
while wrk drives it, then the hottest functions are printed (own time and with callees).

    .venv/bin/python bench/profile.py json|unique|stream|redis|tracing|tracing10|paced [seconds]

Needs py-spy (`pip install py-spy`); the same nginx upstream and wrk as `make bench`.
"""

from __future__ import annotations

import collections
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import run  # bench/run.py: the same upstreams, loads and pinning

SCENARIOS = {
    "json": (run.JSON_BODY, "json", {}),
    "unique": (run.UNIQUE_BODY, "json", {}),  # a new prompt every request: the memo never hits
    "stream": (run.STREAM_BODY, "sse", {}),
    "unredacted": (run.STREAM_BODY, "sse", {"REDACT_KINDS": ""}),
    "openai": (run.STREAM_BODY, "openai", {}),  # OpenAI's real chunk layout
    "openai_unredacted": (run.STREAM_BODY, "openai", {"REDACT_KINDS": ""}),
    "anthropic": (run.MESSAGES_BODY, "anthropic", {}),  # through /v1/messages
    "redis": (run.JSON_BODY, "json", {"REDIS_URL": "redis"}),
    "budgets": (run.JSON_BODY, "json", {"REDIS_URL": "redis", "TOKEN_QUOTA": "1000000000000"}),
    "tracing": (
        run.JSON_BODY,
        "json",
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "otlp", "OTEL_TRACES_SAMPLER": "parentbased_always_on"},
    ),
    "tracing10": (
        run.JSON_BODY,
        "json",
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": "otlp",
            "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": "0.1",
        },
    ),
    "paced": (run.STREAM_BODY, "paced", {}),  # the node stream client, BENCH_STREAMS at once
}


def main() -> None:
    scenario = sys.argv[1] if len(sys.argv) > 1 else "json"
    seconds = int(sys.argv[2]) if len(sys.argv) > 2 else 8
    body, upstream, env = SCENARIOS[scenario]
    tmp = Path(tempfile.mkdtemp(prefix="profile-"))
    json_port, sse_port, openai_port, anthropic_port, redis_port, otlp_port, paced_port = (
        run.free_port() for _ in range(7)
    )
    replies = {"json": json_port, "sse": sse_port, "openai": openai_port, "anthropic": anthropic_port}
    helpers = [
        run.nginx(tmp, replies),
        run.Proc(["redis-server", "--port", str(redis_port), "--save", "", "--appendonly", "no"], run.LOAD_CPU),
        run.Proc([run.PY, str(run.ROOT / "bench" / "otlp_sink.py")], run.LOAD_CPU, {"PORT": str(otlp_port)}),
        run.Proc(["node", str(run.ROOT / "bench" / "paced_upstream.js")], run.LOAD_CPU, {"PORT": str(paced_port)}),
    ]
    if "REDIS_URL" in env:
        env = {**env, "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0"}  # TOKEN_QUOTA kept
    if "OTEL_EXPORTER_OTLP_ENDPOINT" in env:
        env = env | {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{otlp_port}", "OTEL_BSP_SCHEDULE_DELAY": "200"}
    try:
        for port in (*replies.values(), redis_port, otlp_port, paced_port):
            run.wait_port(port)
        gw, gw_port = run.gateway({**replies, "paced": paced_port}[upstream], **env)
        path = "/v1/messages" if upstream == "anthropic" else "/v1/chat/completions"
        try:
            url = f"http://127.0.0.1:{gw_port}"
            samples = tmp / "samples.txt"
            if upstream == "paced":
                load = threading.Thread(target=run.streams, args=(gw_port,))
            else:
                run.wrk(tmp, url, body, 2, path)
                load = threading.Thread(target=run.wrk, args=(tmp, url, body, seconds + 2, path))
            load.start()
            subprocess.run(
                [
                    str(Path(run.PY).parent / "py-spy"),
                    "record",
                    "--pid",
                    str(gw.pid),
                    "--duration",
                    str(seconds),
                    "--rate",
                    "500",
                    "--format",
                    "raw",
                    "--output",
                    str(samples),
                    "--nonblocking",
                    "--full-filenames",
                ],
                check=True,
                capture_output=True,
            )
            load.join()
        finally:
            gw.stop()
        report(samples)
    finally:
        for helper in helpers:
            helper.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def report(samples: Path, top: int = 45) -> None:
    own: collections.Counter[str] = collections.Counter()
    by_package: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    gateway_lines: collections.Counter[str] = collections.Counter()
    total = 0
    for line in samples.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        frames = [f.rsplit(" (", 1)[0] + " " + f.rsplit("/", 1)[-1].split(":")[0] for f in stack.split(";")]
        total += n
        own[frames[-1]] += n
        by_package[_package(stack.split(";")[-1])] += n
        for frame in set(frames):
            inclusive[frame] += n
        innermost = next((f for f in reversed(stack.split(";")) if "/gateway/" in f), None)
        if innermost is not None:  # charge library time to the gateway line that called it
            name, _, where = innermost.rpartition(" (")
            gateway_lines[name + " " + where.rstrip(")").split("/gateway/")[1]] += n
    print(f"{total} samples\n\nown time by package:")
    for package, n in by_package.most_common(12):
        print(f"  {n / total:6.1%}  {package}")
    print("\nown time:")
    for frame, n in own.most_common(top):
        print(f"  {n / total:6.1%}  {frame}")
    print("\nwith callees:")
    for frame, n in inclusive.most_common(top):
        print(f"  {n / total:6.1%}  {frame}")
    print("\nthe gateway's own lines (with callees outside gateway/):")
    for frame, n in gateway_lines.most_common(top):
        print(f"  {n / total:6.1%}  {frame}")


def _package(frame: str) -> str:
    """gateway/…, aiohttp, opentelemetry…: where a frame's code lives."""
    path = frame.rsplit(" (", 1)[-1].split(":")[0]
    if "site-packages/" in path:
        return path.split("site-packages/")[1].split("/")[0]
    if "/gateway/" in path:
        return "gateway/" + path.split("/gateway/")[1]
    return "python: " + path.rsplit("/", 1)[-1]


if __name__ == "__main__":
    main()
