"""Metrics as a Prometheus server reads them (prometheus_client's text parser): client-chosen
label values can neither break /metrics nor add to it, and counts and histograms say exactly
what was recorded. In process: Metrics directly, and the whole app behind a test client."""

from __future__ import annotations

import io
import json
import re
import threading
from collections.abc import Awaitable, Callable

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from gateway import telemetry
from gateway.app import create_app
from gateway.config import Settings
from gateway.models import RequestState
from gateway.telemetry import (
    CHAT_ROUTE,
    LOG_MODEL_MAX,
    MODEL_LABEL_MAX,
    OTHER,
    UNKNOWN,
    BoundedLabels,
    Metrics,
    RequestLog,
)

FAMILIES = {
    "requests",  # prometheus_client names a counter family without its _total
    "http_requests",
    "inflight_requests",
    "redactions",
    "quota_block",
    "cb_events",
    "ratelimit_block",
    "tokens",
    "config_reloads",
    "log_lines_dropped",
    "request_duration_seconds",
    "upstream_ttfb_seconds",
}
HOSTILE = [
    'a"b',
    'x"} 1\nevil_metric{a="b',
    "x\\",
    'x\\"} 1\nevil_metric 1\n#',
    "line\nbreak",
    "cr\rlf",
    "tab\there",
    "sp ace",
    "nul\x00",
    "é-unicode",
    "\u2028",
    "a" * (MODEL_LABEL_MAX + 1),
    "m" * 100_000,
    "{}",
    "a,b=c",
]
SAFE_LABEL = re.compile(r"[A-Za-z0-9._:/@+-]{1,64}")

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> tuple[set[str], Samples]:
    """Family names and every sample, as a Prometheus server would read them; raises on
    anything unparsable."""
    names, samples = set(), {}
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        for s in family.samples:
            key = (s.name, frozenset(s.labels.items()))
            assert key not in samples, f"duplicate series {key}"
            samples[key] = s.value
    return names, samples


def scrape(metrics: Metrics) -> tuple[set[str], Samples]:
    body, headers = metrics.render([])
    assert headers["Content-Type"].startswith("text/plain")
    return parse(body.decode())


def key(name: str, **labels: str) -> tuple[str, frozenset[tuple[str, str]]]:
    return name, frozenset(labels.items())


def models_in(samples: Samples) -> set[str]:
    return {dict(labels)["model"] for _, labels in samples if "model" in dict(labels)}


def test_hostile_model_names_become_other_and_metrics_still_parse() -> None:
    metrics = Metrics(50)
    for model in [*HOSTILE, "gpt-4o", None, ""]:
        metrics.response_sent(CHAT_ROUTE, model, 200, 0.01, timed=True)
        metrics.tokens_used(model, 1, 2)
    names, samples = scrape(metrics)
    assert names == FAMILIES  # nothing forged
    assert models_in(samples) == {"gpt-4o", OTHER, UNKNOWN}
    assert samples[key("http_requests_total", route=CHAT_ROUTE, model=OTHER, status="200")] == len(HOSTILE)
    assert samples[key("http_requests_total", route=CHAT_ROUTE, model=UNKNOWN, status="200")] == 2  # None and ""
    assert samples[key("tokens_total", kind="completion", model=OTHER)] == 2 * len(HOSTILE)


@given(models=st.lists(st.one_of(st.none(), st.text(), st.from_regex(SAFE_LABEL, fullmatch=True)), max_size=30))
def test_any_model_names_keep_metrics_parsable_and_bounded(models: list[str | None]) -> None:
    limit = 5
    metrics = Metrics(limit)
    for model in models:
        metrics.response_sent(CHAT_ROUTE, model, 200, 0.01, timed=True)
        metrics.tokens_used(model, 1, 1)
    names, samples = scrape(metrics)
    assert names == FAMILIES
    seen = models_in(samples)
    # each label is what the client sent, if it was acceptable and arrived in time, else a fixed word
    acceptable = [m for m in dict.fromkeys(models) if m and SAFE_LABEL.fullmatch(m) and m not in (OTHER, UNKNOWN)]
    assert seen - {OTHER, UNKNOWN} == set(acceptable[:limit])
    assert (OTHER in seen) == any(m and m not in acceptable[:limit] for m in models)
    assert sum(v for (name, _), v in samples.items() if name == "http_requests_total") == len(models)


def test_model_labels_are_bounded_and_rejected_names_take_no_place() -> None:
    label = BoundedLabels(2)
    assert [label(m) for m in ['a"b', "x" * 65, "gpt-4o", "llama3.1:8b", "third", "gpt-4o"]] == [
        OTHER,
        OTHER,
        "gpt-4o",
        "llama3.1:8b",
        OTHER,
        "gpt-4o",
    ]
    assert [label(m) for m in ["meta-llama/Llama-3-8B", None, ""]] == [OTHER, UNKNOWN, UNKNOWN]
    # A client's model named as the gateway's own words is `other`: it could pass for them.
    assert [BoundedLabels(5)(m) for m in [OTHER, UNKNOWN]] == [OTHER, OTHER]
    wide = BoundedLabels(10)
    names = ["ft:gpt-4o:org:x:id", "@cf/meta/llama-3", "anthropic.claude-v2:1", "a+b", "x" * 64]
    assert [wide(m) for m in names] == names


def test_every_family_shows_from_the_start() -> None:
    names, samples = scrape(Metrics(50))
    assert names == FAMILIES
    assert samples[key("inflight_requests")] == 0
    assert samples[key("requests_total", route=CHAT_ROUTE)] == 0
    assert samples[key("quota_block_total", reason="exceeded")] == 0
    assert samples[key("ratelimit_block_total")] == 0
    for event in ("timeout", "load_shed", "store_error", "upstream_error", "client_disconnect"):
        assert samples[key("cb_events_total", event=event)] == 0


def test_counts_and_histograms_after_known_events() -> None:
    metrics = Metrics(50)
    durations = [0.003, 0.02, 0.7, 400.0]  # under the first bucket, inside two, past the last finite one
    for _ in durations:
        metrics.request_started(CHAT_ROUTE)
        metrics.chat_started()
    _, samples = scrape(metrics)
    assert samples[key("inflight_requests")] == 4
    for seconds, status in zip(durations, (200, 200, 429, 504), strict=True):
        metrics.chat_finished()
        metrics.response_sent(CHAT_ROUTE, "gpt-4o", status, seconds, timed=True)
    metrics.request_started("other")
    metrics.response_sent("other", None, 404, 0.001)  # not a proxied request: no duration observed
    metrics.upstream_first_byte(0.2)
    metrics.upstream_first_byte(2.0)
    metrics.tokens_used("gpt-4o", 9, 12)
    metrics.tokens_used("gpt-4o", 1, 3)
    metrics.redacted("email", "request", 4)
    metrics.redacted("email", "request")
    metrics.redacted("card", "response")
    metrics.cb_event("timeout")
    metrics.quota_blocked()
    metrics.rate_limited()
    metrics.rate_limited()
    _, samples = scrape(metrics)
    assert samples[key("inflight_requests")] == 0
    assert samples[key("requests_total", route=CHAT_ROUTE)] == 4
    assert samples[key("requests_total", route="other")] == 1
    chat = {"route": CHAT_ROUTE, "model": "gpt-4o"}
    assert samples[key("http_requests_total", **chat, status="200")] == 2
    assert samples[key("http_requests_total", **chat, status="429")] == 1
    assert samples[key("http_requests_total", **chat, status="504")] == 1
    assert samples[key("http_requests_total", route="other", model=UNKNOWN, status="404")] == 1
    assert samples[key("tokens_total", kind="prompt", model="gpt-4o")] == 10
    assert samples[key("tokens_total", kind="completion", model="gpt-4o")] == 15
    assert samples[key("redactions_total", kind="email", direction="request")] == 5
    assert samples[key("redactions_total", kind="card", direction="response")] == 1
    assert samples[key("cb_events_total", event="timeout")] == 1
    assert samples[key("quota_block_total", reason="exceeded")] == 1
    assert samples[key("ratelimit_block_total")] == 2

    def buckets(name: str, **labels: str) -> dict[str, float]:
        return {
            dict(lbls)["le"]: value
            for (n, lbls), value in samples.items()
            if n == name + "_bucket" and dict(lbls).items() >= labels.items()
        }

    route = {"route": CHAT_ROUTE}
    duration = buckets("request_duration_seconds", **route)
    assert (duration["0.005"], duration["0.025"], duration["0.5"], duration["1.0"]) == (1, 2, 2, 3)
    assert (duration["300.0"], duration["+Inf"]) == (3, 4)
    assert list(duration.values()) == sorted(duration.values())  # cumulative
    assert samples[key("request_duration_seconds_count", **route)] == 4
    assert abs(samples[key("request_duration_seconds_sum", **route)] - sum(durations)) < 1e-9
    ttfb = buckets("upstream_ttfb_seconds")
    assert (ttfb["0.1"], ttfb["0.25"], ttfb["1.0"], ttfb["2.5"], ttfb["+Inf"]) == (0, 1, 1, 2, 2)
    assert samples[key("upstream_ttfb_seconds_count")] == 2
    assert abs(samples[key("upstream_ttfb_seconds_sum")] - 2.2) < 1e-9


def test_a_scrape_does_not_change_what_the_next_one_says() -> None:
    metrics = Metrics(50)
    metrics.request_started(CHAT_ROUTE)
    metrics.response_sent(CHAT_ROUTE, "m", 200, 0.1, timed=True)
    assert scrape(metrics) == scrape(metrics)


async def test_the_log_line_cuts_a_huge_model_name() -> None:
    out = io.BytesIO()
    log = RequestLog(out)
    for model in ("m" * 1_000_000, "gpt-4o", None):
        log.write(RequestState("r", model=model), "POST", CHAT_ROUTE, 200, 0.01, None)
    log.flush()
    assert [json.loads(line)["model"] for line in out.getvalue().splitlines()] == [
        "m" * LOG_MODEL_MAX,
        "gpt-4o",
        None,
    ]


async def test_a_stdout_that_takes_nothing_holds_lines_up_to_a_bound_never_the_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A reader that stops reading blocks the write: the writer thread waits, the loop never
    does (flush(timeout=0) returns at once), lines past the bound are dropped and counted, and
    the rest are written in order once the reader reads again."""
    monkeypatch.setattr(telemetry, "MAX_PENDING_BYTES", 20_000)
    reading = threading.Event()

    class Stuck(io.BytesIO):
        def write(self, data: bytes) -> int:  # type: ignore[override]
            assert reading.wait(10)
            return super().write(data)

    out = Stuck()
    log = RequestLog(out)
    for i in range(1000):
        log.write(RequestState(f"r{i}", model="m"), "POST", CHAT_ROUTE, 200, 0.01, None)
        if i % 10 == 9:
            assert log.flush(timeout=0) is False  # handed over; nothing waited for
    assert log.dropped > 0
    reading.set()
    assert log.flush(timeout=10)
    ids = [json.loads(line)["request_id"] for line in out.getvalue().splitlines()]
    assert len(ids) + log.dropped == 1000
    assert ids == sorted(ids, key=lambda r: int(r[1:]))  # in order
    log.close(timeout=1)


async def test_a_model_name_with_unicode_line_breaks_stays_on_one_log_line() -> None:
    """JSON lets U+2028, U+2029 and U+0085 stand unescaped, and orjson leaves them so; but they
    are line breaks to Unicode (Python's str.splitlines, editors, some log viewers): a client's
    model name split its request's line in two, neither of them JSON."""
    out = io.BytesIO()
    log = RequestLog(out)
    hostile = 'gpt\u2028{"status":200}\u2029x\x85y\u00e9'
    for model in (hostile, "gpt-4o"):
        log.write(RequestState("r", model=model), "POST", "/v1/\u2028path", 200, 0.01, None)
    log.flush()
    lines = out.getvalue().decode().splitlines()
    assert [(json.loads(line)["model"], json.loads(line)["path"]) for line in lines] == [
        (hostile, "/v1/\u2028path"),
        ("gpt-4o", "/v1/\u2028path"),
    ]


AiohttpClient = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]
AiohttpServer = Callable[..., Awaitable[TestServer]]


async def test_hostile_model_names_through_the_app(
    aiohttp_client: AiohttpClient, aiohttp_server: AiohttpServer
) -> None:
    """The whole app in process, in front of a real upstream on loopback that reports usage."""

    async def chat(request: web.Request) -> web.Response:
        payload = await request.json()
        return web.json_response(
            {
                "id": "c1",
                "object": "chat.completion",
                "model": payload["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "pong"}}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
            }
        )

    upstream_app = web.Application()
    upstream_app.router.add_post(CHAT_ROUTE, chat)
    upstream = await aiohttp_server(upstream_app)
    settings = Settings(
        upstream_base_url=str(upstream.make_url("")).rstrip("/"),
        upstream_api_key="sk-up",
        rps=0,
        default_quota=1000,
        model_label_limit=3,
    )
    client = await aiohttp_client(create_app(settings, log_stream=io.BytesIO()))
    models = [*HOSTILE, "gpt-4o", "gpt-4o-mini", "third", "fourth", "fifth"]
    for model in models:
        body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]})
        async with client.post(CHAT_ROUTE, data=body, headers={"Content-Type": "application/json"}) as r:
            assert r.status == 200, await r.text()
    async with client.get("/metrics") as r:
        names, samples = parse(await r.text())
    assert names == FAMILIES
    assert models_in(samples) == {"gpt-4o", "gpt-4o-mini", "third", OTHER}
    other = key("http_requests_total", route=CHAT_ROUTE, model=OTHER, status="200")
    assert samples[other] == len(HOSTILE) + 2  # fourth and fifth: past the limit
    assert samples[key("tokens_total", kind="prompt", model=OTHER)] == 3 * (len(HOSTILE) + 2)
    assert samples[key("request_duration_seconds_count", route=CHAT_ROUTE)] == len(models)
