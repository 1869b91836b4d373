"""CPU cost of ROUTES_FILE's routing per request, with a file of 20 routes, measured with timeit.

    .venv/bin/python bench/routing_cost.py

The file: 20 routes, exact names and globs mixed, 4 upstreams. Measured: the route lookup of a
model matched by the first route, by the last one, and by none (the 404); and the whole
routing decision of a request (lookup, its upstreams, the first attempt's deadline share and
breaker permit, the outcome reported, the body chosen), which is what a routed request does
that one without ROUTES_FILE does not (SPEC §13's target: ≤ 5% of a non-stream request).
"""

from __future__ import annotations

import sys
import tempfile
import timeit
from pathlib import Path

ROOT = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.breaker import Breakers  # noqa: E402
from gateway.router import Router, body_for  # noqa: E402
from gateway.routing import load_routes  # noqa: E402
from gateway.surfaces import CHAT_API  # noqa: E402

UPSTREAMS = """
[upstreams.openai]
kind = "openai"
base_url = "https://api.openai.com"
api_key_env = "OPENAI_API_KEY"

[upstreams.azure]
kind = "openai"
base_url = "https://example.openai.azure.com/openai/v1?api-version=2024-10-21"
api_key_env = "AZURE_KEY"

[upstreams.groq]
kind = "openai"
base_url = "https://api.groq.com/openai"
api_key_env = "GROQ_KEY"

[upstreams.claude]
kind = "anthropic"
base_url = "https://api.anthropic.com"
api_key_env = "ANTHROPIC_API_KEY"
"""
MATCHES = [
    "gpt-4o-mini",
    "gpt-4o",
    "gpt-4.1",
    "gpt-4.1-mini",
    "o3",
    "o4-mini",
    "gpt-3.5-*",
    "llama-3.1-*",
    "llama-3.3-*",
    "mixtral-*",
    "gemma-*",
    "qwen-*",
    "deepseek-*",
    "claude-3-5-*",
    "claude-3-7-*",
    "claude-opus-*",
    "claude-haiku-*",
    "text-embedding-*",
    "ft:gpt-4o*",
    "claude-*",
]
ENV = {"OPENAI_API_KEY": "sk-o", "AZURE_KEY": "az", "GROQ_KEY": "gq", "ANTHROPIC_API_KEY": "sk-a"}


def routes_file() -> str:
    lines = [UPSTREAMS]
    for match in MATCHES:
        first = "claude" if match.startswith("claude") else "openai"
        lines.append(
            f'[[models]]\nmatch = "{match}"\nupstreams = [{{ upstream = "{first}" }}, {{ upstream = "azure" }}]\n'
        )
    return "\n".join(lines)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "routes.toml"
        path.write_text(routes_file())
        table = load_routes(str(path), ENV)
    assert len(table.routes) == 20
    router = Router(table, Breakers(5, 30), 60.0)
    payload = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    body = b"{}"

    def decision() -> None:
        legs = router.legs(CHAT_API, "gpt-4o-mini")
        attempts = router.attempts(legs, 60.0)
        attempt = attempts.next()
        assert attempt is not None
        body_for(attempt.leg, payload, body)
        attempts.answered(attempt)

    rows = [
        ("lookup: the first route (exact name)", lambda: table.lookup("gpt-4o-mini")),
        ("lookup: the last route (glob claude-*)", lambda: table.lookup("claude-sonnet-4-5")),
        ("lookup: no route (404)", lambda: table.lookup("mistral-large")),
        ("routing decision of a request (gpt-4o-mini)", decision),
    ]
    print(f"{'what':48} µs per call (best of 5 × 100k)")
    for name, call in rows:
        best = min(timeit.repeat(call, number=100_000, repeat=5)) / 100_000
        print(f"{name:48} {best * 1e6:.2f}")


if __name__ == "__main__":
    main()
