"""scripts/grafana-dashboard.json: a dashboard Grafana imports as is, whose every query names only
metrics, labels and label values that a real gateway exports.

What the gateway exports is read from the /metrics of a real gateway process after traffic of
every kind the dashboard plots (histogram and labelled series appear only once observed). The
queries are read with a small PromQL lexer: selectors, the functions called and the labels of
`by (...)` clauses; anything it cannot read fails the test instead of being skipped.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from .harness import ROOT, Gateway, Mock

DASHBOARD = ROOT / "scripts" / "grafana-dashboard.json"

# Labels Prometheus adds to every scraped series itself (the scrape target's).
SCRAPE_LABELS = frozenset({"job", "instance"})
# Grafana's own variables, filled in by Grafana whatever the dashboard defines.
GRAFANA_VARIABLES = frozenset({"__rate_interval", "__interval", "__range", "__interval_ms", "__range_s"})
# The PromQL functions and aggregations a dashboard query may call: a misspelt one fails.
FUNCTIONS = frozenset(
    {
        "sum", "avg", "min", "max", "count", "topk", "bottomk", "quantile", "stddev", "group",
        "rate", "irate", "increase", "delta", "idelta", "deriv", "histogram_quantile",
        "clamp_min", "clamp_max", "abs", "ceil", "floor", "round", "vector", "scalar",
        "label_replace", "label_join", "sort", "sort_desc", "time", "absent",
        "avg_over_time", "max_over_time", "min_over_time", "sum_over_time", "count_over_time",
    }
)  # fmt: skip
GROUPING = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "inf", "nan"})

TOKEN = re.compile(
    r"""
    (?P<space>\s+)
  | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
  | (?P<variable>\$\{[A-Za-z_][A-Za-z0-9_]*(?::[A-Za-z]+)?\}|\$[A-Za-z_][A-Za-z0-9_]*)
  | (?P<range>\[[^\]\[]*\])
  | (?P<duration>(?:\d+(?:ms|[smhdwy]))+)
  | (?P<number>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<op>=~|!~|!=|==|>=|<=|[-+*/%^(){},=<>@])
    """,
    re.VERBOSE,
)


@dataclass(frozen=True, slots=True)
class Matcher:
    label: str
    op: str
    value: str


@dataclass(frozen=True, slots=True)
class Selector:
    metric: str
    matchers: tuple[Matcher, ...]


@dataclass(slots=True)
class Query:
    """What a PromQL expression refers to."""

    selectors: list[Selector] = field(default_factory=list)
    functions: set[str] = field(default_factory=set)
    grouping: set[str] = field(default_factory=set)  # labels named in by (...) / on (...) …
    variables: set[str] = field(default_factory=set)


def tokens(expr: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    at = 0
    while at < len(expr):
        match = TOKEN.match(expr, at)
        if match is None:
            raise ValueError(f"cannot read PromQL at {at}: {expr[at : at + 20]!r} in {expr!r}")
        kind = match.lastgroup
        assert kind is not None
        if kind != "space":
            out.append((kind, match.group()))
        at = match.end()
    return out


def _unquote(text: str) -> str:
    """A PromQL string's value: raw between backticks, else Go's escapes (JSON's, for what a
    dashboard holds; an escape PromQL refuses makes json refuse too)."""
    if text[0] == "`":
        return text[1:-1]
    if text[0] == "'":
        text = '"' + text[1:-1].replace("\\'", "'").replace('"', '\\"') + '"'
    value = json.loads(text)
    assert isinstance(value, str)
    return value


def parse(expr: str) -> Query:
    """Selectors, functions, grouping labels and variables of one PromQL expression. Raises
    ValueError on anything it does not understand (a test should fail, not skip it)."""
    query = Query()
    items = tokens(expr)
    for kind, text in items:
        if kind == "variable":
            query.variables.add(text.strip("${}").split(":")[0])
        elif kind in ("range", "string"):  # Grafana fills variables in inside these too
            query.variables.update(re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", text))
    at = 0
    while at < len(items):
        kind, text = items[at]
        following = items[at + 1][1] if at + 1 < len(items) else ""
        if kind == "ident" and text in GROUPING:
            at += 1
            if following == "(":
                at, labels = _label_list(items, at, expr)
                query.grouping.update(labels)
            continue
        if kind == "ident" and text in KEYWORDS:
            at += 1
            continue
        if kind == "ident" and (following == "(" or following in ("by", "without")):
            query.functions.add(text)  # a call, or an aggregation with its grouping first
            at += 1
            continue
        if kind == "ident":
            at, matchers = (_matchers(items, at + 2, expr)) if following == "{" else (at + 1, ())
            query.selectors.append(Selector(text, matchers))
            continue
        if text == "{":
            raise ValueError(f"a selector without a metric name in {expr!r}")
        at += 1
    return query


def _label_list(items: list[tuple[str, str]], at: int, expr: str) -> tuple[int, list[str]]:
    """(label, label, …) starting at the "(" at `at`; returns the index after ")"."""
    labels: list[str] = []
    at += 1
    while at < len(items) and items[at][1] != ")":
        kind, text = items[at]
        if kind == "ident":
            labels.append(text)
        elif text != ",":
            raise ValueError(f"unexpected {text!r} in a label list of {expr!r}")
        at += 1
    if at == len(items):
        raise ValueError(f"unclosed label list in {expr!r}")
    return at + 1, labels


def _matchers(items: list[tuple[str, str]], at: int, expr: str) -> tuple[int, tuple[Matcher, ...]]:
    """label op "value", … starting after "{"; returns the index after "}"."""
    found: list[Matcher] = []
    while at < len(items) and items[at][1] != "}":
        if items[at][1] == ",":
            at += 1
            continue
        window = items[at : at + 3]
        if len(window) < 3 or window[0][0] != "ident" or window[1][0] != "op" or window[2][0] not in ("string",):
            raise ValueError(f"cannot read the label matcher at {window!r} in {expr!r}")
        found.append(Matcher(window[0][1], window[1][1], _unquote(window[2][1])))
        at += 3
    if at == len(items):
        raise ValueError(f"unclosed selector in {expr!r}")
    return at + 1, tuple(found)


LABEL_VALUES = re.compile(
    r"^\s*label_values\((?P<selector>.*),\s*(?P<label>[A-Za-z_][A-Za-z0-9_]*)\s*\)\s*$", re.DOTALL
)


# ---- the dashboard ----------------------------------------------------------------------------


def load_dashboard() -> dict[str, Any]:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert isinstance(dashboard, dict)
    return dashboard


def all_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # a collapsed row keeps its panels inside


def targets(dashboard: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for panel in all_panels(dashboard):
        for target in panel.get("targets", []):
            yield panel["title"], target


def test_the_dashboard_is_one_grafana_imports_as_is() -> None:
    dashboard = load_dashboard()
    assert dashboard["id"] is None, "an id would overwrite whatever dashboard has it on import"
    assert dashboard["uid"] and len(dashboard["uid"]) <= 40
    assert dashboard["title"]
    assert 36 <= dashboard["schemaVersion"] <= 41
    assert "__inputs" not in dashboard, "the datasource is a variable: nothing to fill in on import"

    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    datasource = variables["datasource"]
    assert datasource["type"] == "datasource" and datasource["query"] == "prometheus"
    for name, variable in variables.items():
        if variable["type"] == "query":
            assert variable["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, name

    panels = list(all_panels(dashboard))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        area = {
            (x, y) for x in range(grid["x"], grid["x"] + grid["w"]) for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not area & cells, f"{panel['title']} overlaps another panel"
        cells |= area
        if panel["type"] == "row":
            continue
        assert panel["type"] in {"timeseries", "stat", "gauge", "bargauge", "table", "heatmap"}, panel["type"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], f"{panel['title']} has no query"
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), f"{panel['title']}: refIds repeat"
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]
            assert target["datasource"] == panel["datasource"]

    plotted = " ".join(t["expr"] for _, t in targets(dashboard))
    for metric in (
        "http_requests_total", "requests_total", "request_duration_seconds_bucket", "upstream_ttfb_seconds_bucket",
        "inflight_requests", "ratelimit_block_total", "quota_block_total", "cb_events_total", "redactions_total",
        "tokens_total",
    ):  # fmt: skip
        assert re.search(rf"\b{metric}\b", plotted), f"nothing plots {metric}"


def test_every_variable_a_query_uses_is_defined() -> None:
    dashboard = load_dashboard()
    defined = {v["name"] for v in dashboard["templating"]["list"]} | GRAFANA_VARIABLES
    used: set[str] = set()
    for _, target in targets(dashboard):
        used |= parse(target["expr"]).variables
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            found = LABEL_VALUES.match(variable["query"])
            assert found is not None, variable["name"]
            used |= parse(found["selector"]).variables
    assert used - defined == set()
    assert "datasource" in json.dumps(dashboard["panels"])  # every panel goes through the variable


# ---- what a live gateway exports --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Exported:
    """Sample name → label name → the values seen."""

    series: dict[str, dict[str, set[str]]]

    def labels(self, metric: str) -> set[str]:
        return set(self.series.get(metric, {}))


def post(gateway: Gateway, body: dict[str, Any], key: str, **headers: str) -> tuple[int, bytes]:
    request = urllib.request.Request(
        gateway.url + "/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "X-Api-Key": key, **headers},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def read_exported(text: str) -> Exported:
    series: dict[str, dict[str, set[str]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = series.setdefault(sample.name, {})
            for name, value in sample.labels.items():
                labels.setdefault(name, set()).add(value)
    return Exported(series)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, mock_process: Mock) -> Iterator[Exported]:
    """/metrics of a real gateway after a JSON reply, a stream, masks both ways and a 429."""
    gateway = Gateway(
        tmp_path_factory.mktemp("dashboard"),
        {"OPENAI_BASE_URL": mock_process.url, "OPENAI_API_KEY": "sk-upstream", "TENANT_QUOTAS": "tight=1"},
    )
    try:
        pii = "write to jane.doe@example.com, card 4242 4242 4242 4242"
        chat = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": pii}]}
        assert post(gateway, chat, "dash", **{"x-stainless-mock-echo": "1"})[0] == 200
        status, streamed = post(gateway, chat | {"stream": True}, "dash", **{"x-stainless-mock-reply": pii})
        assert status == 200 and b"[DONE]" in streamed and b"CC_MASKED_LAST4_4242" in streamed
        assert post(gateway, chat, "tight")[0] == 200
        assert post(gateway, chat, "tight")[0] == 429
        yield read_exported(gateway.metrics())
    finally:
        gateway.stop()


def test_the_traffic_produced_every_series_the_dashboard_needs(exported: Exported) -> None:
    # The fixture's own check: without these the test below would prove less than it claims.
    assert exported.series["redactions_total"]["direction"] == {"request", "response"}
    assert {"prompt", "completion"} <= exported.series["tokens_total"]["kind"]
    assert "429" in exported.series["http_requests_total"]["status"]
    assert "le" in exported.labels("request_duration_seconds_bucket")
    assert "upstream_ttfb_seconds_bucket" in exported.series


def test_every_query_names_only_what_the_gateway_exports(exported: Exported) -> None:
    dashboard = load_dashboard()
    problems: list[str] = []
    queries = [(title, t["expr"], t.get("legendFormat", "")) for title, t in targets(dashboard)]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            found = LABEL_VALUES.match(variable["query"])
            if found is None:
                problems.append(f"variable {variable['name']}: not label_values(selector, label)")
                continue
            queries.append((f"variable {variable['name']}", found["selector"], "{{" + found["label"] + "}}"))
    for where, expr, legend in queries:
        problems += check(where, expr, legend, exported)
    assert problems == []


def check(where: str, expr: str, legend: str, exported: Exported) -> list[str]:
    query = parse(expr)
    problems = [f"{where}: unknown function {name}()" for name in sorted(query.functions - FUNCTIONS)]
    if not query.selectors:
        problems.append(f"{where}: no metric in {expr!r}")
    labels = set(SCRAPE_LABELS)
    for selector in query.selectors:
        if selector.metric not in exported.series:
            problems.append(f"{where}: {selector.metric} is not exported")
            continue
        own = exported.labels(selector.metric)
        labels |= own
        for matcher in selector.matchers:
            if matcher.label not in own | SCRAPE_LABELS:
                problems.append(f"{where}: {selector.metric} has no label {matcher.label}")
            elif (
                matcher.op == "="
                and "$" not in matcher.value
                and matcher.label not in SCRAPE_LABELS
                and matcher.value not in exported.series[selector.metric][matcher.label]
            ):
                problems.append(f"{where}: {selector.metric}{{{matcher.label}}} is never {matcher.value!r}")
    problems += [f"{where}: grouped by {name}, which no series has" for name in sorted(query.grouping - labels)]
    shown = set(re.findall(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}", legend))
    # A legend can only show what survives the aggregation.
    available = (query.grouping | SCRAPE_LABELS) if query.grouping else labels
    problems += [f"{where}: the legend shows {name}, which the query drops" for name in sorted(shown - available)]
    return problems


# ---- the reader itself ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "metrics", "functions", "grouping"),
    [
        ("up", {"up"}, set(), set()),
        ('sum by (route) (rate(requests_total{route=~"/v1/.*"}[5m]))', {"requests_total"}, {"sum", "rate"}, {"route"}),
        (
            "histogram_quantile(0.99, sum by (le, route) (rate(request_duration_seconds_bucket[$__rate_interval])))",
            {"request_duration_seconds_bucket"},
            {"histogram_quantile", "sum", "rate"},
            {"le", "route"},
        ),
        (
            'sum(rate(a_total{status=~"5.."}[1m])) / sum without (x) (rate(b_total[1m])) > bool 1e-3',
            {"a_total", "b_total"},
            {"sum", "rate"},
            {"x"},
        ),
        (
            "rate(x_total[5m] offset 1h) * on (instance) group_left (job) up",
            {"x_total", "up"},
            {"rate"},
            {"instance", "job"},
        ),
        ('sum(rate(c_total{a="}", b="{not_a_metric}"}[5m]))', {"c_total"}, {"sum", "rate"}, set()),
        ("sum(rate(x_total[${__rate_interval}])) by (event)", {"x_total"}, {"sum", "rate"}, {"event"}),
    ],
)
def test_the_reader_finds_metrics_functions_and_grouping(
    expr: str, metrics: set[str], functions: set[str], grouping: set[str]
) -> None:
    query = parse(expr)
    assert {s.metric for s in query.selectors} == metrics
    assert query.functions == functions
    assert query.grouping == grouping


def test_the_reader_keeps_matchers_and_variables() -> None:
    query = parse('sum(rate(http_requests_total{job="$job", status=~"502|503", model!="a\\"b"}[$__rate_interval]))')
    assert query.selectors[0].matchers == (
        Matcher("job", "=", "$job"),
        Matcher("status", "=~", "502|503"),
        Matcher("model", "!=", 'a"b'),
    )
    assert query.variables == {"job", "__rate_interval"}


@pytest.mark.parametrize(
    "expr", ['{__name__="up"}', "sum(rate(x_total{route}[5m]))", 'rate(x_total{a="b"[5m])', "rate(x_total[5m]) # ?"]
)
def test_the_reader_refuses_what_it_cannot_read(expr: str) -> None:
    with pytest.raises(ValueError):
        parse(expr)


def test_a_misnamed_metric_label_or_function_is_caught() -> None:
    exported = read_exported(
        "# TYPE requests_total counter\n"
        'requests_total{route="/v1/chat/completions"} 1\n'
        "# TYPE inflight_requests gauge\n"
        "inflight_requests 0\n"
    )
    assert check("ok", 'sum by (route) (rate(requests_total{job="$job"}[5m]))', "{{route}}", exported) == []
    assert check("a", "sum(rate(request_total[5m]))", "", exported) == ["a: request_total is not exported"]
    assert check("b", 'sum(rate(requests_total{model="x"}[5m]))', "", exported) == [
        "b: requests_total has no label model"
    ]
    assert check("c", "sum by (status) (rate(requests_total[5m]))", "", exported) == [
        "c: grouped by status, which no series has"
    ]
    assert check("d", "rat(requests_total[5m])", "", exported) == ["d: unknown function rat()"]
    assert check("e", "sum by (route) (rate(requests_total[5m]))", "{{instance}} {{model}}", exported) == [
        "e: the legend shows model, which the query drops"
    ]
    assert check("f", 'requests_total{route="/v1/messages"}', "", exported) == [
        "f: requests_total{route} is never '/v1/messages'"
    ]


def test_the_dashboard_file_is_where_the_readme_says() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert str(DASHBOARD.relative_to(ROOT)) in readme
