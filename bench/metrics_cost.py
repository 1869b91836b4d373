"""CPU cost of the metrics a request records, and of a scrape, measured with timeit.

    .venv/bin/python bench/metrics_cost.py [ROOT]

ROOT is a checkout to import `gateway` from (default: this one), so the same script measures
an older version: `git archive <commit> gateway | tar -x -C /tmp/old && ... bench/metrics_cost.py /tmp/old`.
A "request" is what gateway/middlewares.py records for a non-stream chat completion answered
200, plus the request's three redaction counts (the bench prompt has email, card and phone).
"""

from __future__ import annotations

import sys
import timeit
from pathlib import Path

ROOT = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.telemetry import CHAT_ROUTE, Metrics  # noqa: E402

MODELS = [f"model-{i}" for i in range(20)]


def main() -> None:
    metrics = Metrics(50)
    for model in MODELS:  # a registry that has seen some traffic: 20 models, a few statuses
        for status in (200, 429, 502):
            metrics.response_sent(CHAT_ROUTE, model, status, 0.01)
        metrics.tokens_used(model, 1, 1)

    def request() -> None:
        metrics.request_started(CHAT_ROUTE)
        metrics.chat_started()
        metrics.redacted("email", "request", 4)
        metrics.redacted("card", "request", 4)
        metrics.redacted("phone", "request", 4)
        metrics.chat_finished()
        metrics.upstream_first_byte(0.012)
        metrics.tokens_used("gpt-4o-mini", 9, 12)
        metrics.response_sent(CHAT_ROUTE, "gpt-4o-mini", 200, 0.015)

    def scrape() -> None:
        metrics.render([])

    for name, fn, number in (("request", request, 20_000), ("scrape (20 models)", scrape, 200)):
        best = min(timeit.repeat(fn, number=number, repeat=7)) / number
        print(f"{name:<20} {best * 1e6:8.2f} µs")


if __name__ == "__main__":
    main()
