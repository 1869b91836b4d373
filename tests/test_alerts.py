"""scripts/alerts.yml: rules Prometheus loads, that fire when they should (promtool), over
metrics a real gateway exports.

promtool checks the rules and runs their unit tests (scripts/alerts.test.yml) when it is on
PATH (Debian's `prometheus` package; .ci/run installs it). Without it those two tests skip and
say why; the check that every expression names only exported metrics and labels needs no
promtool: it reads the expressions with test_dashboard's PromQL reader and compares them with the
/metrics of a real gateway after traffic (test_dashboard's `exported` fixture).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from .harness import ROOT
from .test_dashboard import Exported, check, read_exported
from .test_dashboard import exported as exported  # the fixture: a live /metrics after traffic

ALERTS = ROOT / "scripts" / "alerts.yml"
ALERT_TESTS = ROOT / "scripts" / "alerts.test.yml"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not on PATH (apt-get install prometheus; .ci/run installs it)"
)


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)


@needs_promtool
def test_promtool_accepts_the_rules() -> None:
    result = promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(read_rules(ALERTS.read_text(encoding='utf-8')))} rules found" in result.stdout


@needs_promtool
def test_each_alert_fires_on_its_condition_and_only_then() -> None:
    result = promtool("test", "rules", str(ALERT_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_fails_a_rule_that_misbehaves(tmp_path: Path) -> None:
    # The unit tests can fail: with the 15-minute waits cut to 5, the three-minute burst of
    # shedding they feed pages.
    text = ALERTS.read_text(encoding="utf-8")
    assert "for: 15m" in text
    (tmp_path / "alerts.yml").write_text(text.replace("for: 15m", "for: 5m"), encoding="utf-8")
    shutil.copy(ALERT_TESTS, tmp_path / "alerts.test.yml")
    result = promtool("test", "rules", str(tmp_path / "alerts.test.yml"))
    assert result.returncode != 0
    assert "GatewayLoadSheddingSustained" in result.stdout + result.stderr


# ---- reading the rules (the project has no YAML library: a reader for this file's shapes) -----


@dataclass(frozen=True, slots=True)
class Rule:
    alert: str
    expr: str
    block: str  # the rule's whole text, for its keys and templates


def read_rules(text: str) -> list[Rule]:
    """The alerting rules of a rules file written as scripts/alerts.yml is: `- alert: Name`, then
    `expr:` either plain on its line or as a `|` block. Raises ValueError on any other shape
    (a quoted or folded expr, a recording rule) rather than skipping it."""
    rules: list[Rule] = []
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if re.match(r"\s*- (alert|record):", line)]
    for number, start in enumerate(starts):
        block = lines[start : starts[number + 1] if number + 1 < len(starts) else len(lines)]
        head = re.fullmatch(r"(\s*)- alert: ([A-Za-z_][A-Za-z0-9_]*)\s*", block[0])
        if head is None:
            raise ValueError(f"not an alerting rule written as `- alert: Name`: {block[0]!r}")
        exprs = [i for i, line in enumerate(block) if re.match(r"\s+expr:", line)]
        if len(exprs) != 1:
            raise ValueError(f"{head[2]}: {len(exprs)} expr keys")
        at = exprs[0]
        key = re.fullmatch(r"(\s+)expr:\s*(.*?)\s*", block[at])
        assert key is not None
        indent, value = len(key[1]), key[2]
        if value in ("|", "|-"):
            body = []
            for line in block[at + 1 :]:
                if line.strip() and len(line) - len(line.lstrip()) <= indent:
                    break
                body.append(line.strip())
            expr = " ".join(part for part in body if part)
        elif value and value[0] not in "'\">|&*!{[":
            expr = value
        else:
            raise ValueError(f"{head[2]}: an expr written as {value!r} is not read here")
        if not expr:
            raise ValueError(f"{head[2]}: empty expr")
        rules.append(Rule(head[2], expr, "\n".join(block)))
    return rules


def test_every_alert_has_a_severity_a_wait_and_a_runbook() -> None:
    rules = read_rules(ALERTS.read_text(encoding="utf-8"))
    names = [rule.alert for rule in rules]
    assert len(names) == len(set(names)), "alert names repeat"
    assert len(rules) >= 5
    for rule in rules:
        assert re.search(r"^\s+severity: (warning|critical)$", rule.block, re.MULTILINE), rule.alert
        assert re.search(r"^\s+for: \d+m$", rule.block, re.MULTILINE), f"{rule.alert} would page on one evaluation"
        for annotation in ("summary", "description", "runbook"):
            assert re.search(rf"^\s+{annotation}: \S", rule.block, re.MULTILINE), f"{rule.alert}: no {annotation}"


def test_the_rules_watch_what_the_issue_asks_for() -> None:
    exprs = " ".join(rule.expr for rule in read_rules(ALERTS.read_text(encoding="utf-8")))
    for needle in (
        'status=~"5.."', 'event="timeout"', 'event="load_shed"', 'event="store_error"',
        "histogram_quantile(0.99", "upstream_ttfb_seconds_bucket",
    ):  # fmt: skip
        assert needle in exprs


def test_every_expression_names_only_what_the_gateway_exports(exported: Exported) -> None:
    problems: list[str] = []
    for rule in read_rules(ALERTS.read_text(encoding="utf-8")):
        # What the annotations show of the alert's labels must survive the expression's sums.
        shown = " ".join("{{" + name + "}}" for name in re.findall(r"\$labels\.([A-Za-z_][A-Za-z0-9_]*)", rule.block))
        problems += check(rule.alert, rule.expr, shown, exported)
    assert problems == []


# ---- the reader itself ------------------------------------------------------------------------

SAMPLE = """groups:
  - name: g
    rules:
      - alert: Inline
        expr: sum by (job) (rate(requests_total[5m])) > 1
        for: 5m
      - alert: Block
        expr: |
          sum by (job) (rate(requests_total[5m]))
            > 2
        for: 5m
        annotations:
          summary: "{{ $labels.job }}"
"""


def test_the_reader_reads_inline_and_block_exprs() -> None:
    rules = read_rules(SAMPLE)
    assert [(r.alert, r.expr) for r in rules] == [
        ("Inline", "sum by (job) (rate(requests_total[5m])) > 1"),
        ("Block", "sum by (job) (rate(requests_total[5m])) > 2"),
    ]


@pytest.mark.parametrize(
    "text",
    [
        "      - alert: A\n        expr: 'up > 0'\n",
        "      - alert: A\n        expr: >-\n          up > 0\n",
        "      - alert: A\n        for: 5m\n",
        "      - record: job:up\n        expr: up\n",
        "      - alert: A\n        expr: |\n      - alert: B\n        expr: up\n",
    ],
)
def test_the_reader_refuses_what_it_cannot_read(text: str) -> None:
    with pytest.raises(ValueError):
        read_rules(text)


def test_a_rule_over_a_metric_or_label_the_gateway_lacks_is_caught() -> None:
    exported = read_exported(
        "# TYPE cb_events_total counter\n"
        'cb_events_total{event="timeout"} 0\n'
    )  # fmt: skip
    [ok, wrong] = read_rules(
        '      - alert: Ok\n        expr: sum by (job) (rate(cb_events_total{event="timeout"}[5m])) > 0\n'
        '      - alert: Wrong\n        expr: sum by (job) (rate(cb_events_total{event="timeot"}[5m])) > 0\n'
    )
    assert check(ok.alert, ok.expr, "{{job}}", exported) == []
    assert check(wrong.alert, wrong.expr, "{{job}}", exported) == ["Wrong: cb_events_total{event} is never 'timeot'"]
    assert check(ok.alert, ok.expr, "{{route}}", exported) == ["Ok: the legend shows route, which the query drops"]


def test_the_alerts_are_where_the_readme_says() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert str(ALERTS.relative_to(ROOT)) in readme
    assert "promtool test rules scripts/alerts.test.yml" in readme
