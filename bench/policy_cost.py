"""What Cedar policies cost a request (SPEC §15, issue 21): a 20-policy file, decided cold (a
cache miss: Cedar evaluates) and warm (a cache hit), in µs per request, plus the whole policy
step's work warm (the context from the body, the principal, the decision) and, for scale,
cedarpy given the policy text instead of the parsed set (it re-parses on every call).

    .venv/bin/python bench/policy_cost.py
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cedarpy

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway import policies
from gateway.models import Tenant
from gateway.policies import DEFAULT_UPSTREAM, Context, principal_of, request_context

PLANS = ("free", "team", "enterprise", "trial")
MODELS = [f"model-{n}" for n in range(20)]


def twenty_policies() -> str:
    rules = []
    for plan in PLANS:  # 4 x 4 = 16
        rules += [
            f'@id("{plan}-models") permit (principal in Plan::"{plan}", action, resource in Tier::"{plan}");',
            f'@id("{plan}-tools") forbid (principal in Plan::"{plan}", action, resource) when {{ context.has_tools && context.max_tokens > 4000 }};',
            f'@id("{plan}-tokens") forbid (principal in Plan::"{plan}", action, resource) when {{ context.max_tokens > 100000 }};',
            f'@id("{plan}-stream") forbid (principal in Plan::"{plan}", action == Action::"embeddings", resource) when {{ context.stream }};',
        ]
    rules += [
        '@id("list-models") permit (principal, action == Action::"models", resource == Model::"*");',
        '@id("no-o1") forbid (principal, action, resource == Model::"o1-preview");',
        '@id("upstream-guard") forbid (principal, action, resource) when { context.upstream == "blocked" };',
        '@id("banned") forbid (principal == Tenant::"banned", action, resource);',
    ]
    assert len(rules) == 20
    return "\n".join(rules)


def entities() -> str:
    listed = [
        {"uid": {"type": "Tenant", "id": f"tenant-{n}"}, "attrs": {}, "parents": [{"type": "Plan", "id": PLANS[n % 4]}]}
        for n in range(200)
    ]
    listed += [{"uid": {"type": "Plan", "id": plan}, "attrs": {}, "parents": []} for plan in PLANS]
    listed += [
        {"uid": {"type": "Model", "id": model}, "attrs": {}, "parents": [{"type": "Tier", "id": PLANS[n % 4]}]}
        for n, model in enumerate(MODELS)
    ]
    listed += [{"uid": {"type": "Tier", "id": plan}, "attrs": {}, "parents": []} for plan in PLANS]
    return json.dumps(listed)


def per_call_us(run: object, calls: int, rounds: int = 7) -> float:
    """Median over rounds of the mean µs per call (`run(calls)` makes `calls` calls)."""
    samples = []
    for _ in range(rounds):
        started = time.perf_counter_ns()
        run(calls)  # type: ignore[operator]
        samples.append((time.perf_counter_ns() - started) / calls / 1000)
    return statistics.median(samples)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        policy_path, entities_path = Path(tmp) / "p.cedar", Path(tmp) / "e.json"
        policy_path.write_text(twenty_policies())
        entities_path.write_text(entities())
        started = time.perf_counter()
        loaded = policies.load(str(policy_path), str(entities_path))
        load_ms = (time.perf_counter() - started) * 1000
        requests = [
            (f"tenant-{n % 200}", "chat", MODELS[n % 20], Context(n % 2 == 0, 100 + n, n % 3 == 0, DEFAULT_UPSTREAM))
            for n in range(2000)
        ]

        def cold(calls: int) -> None:
            fresh = policies.load(str(policy_path), str(entities_path), cache_size=calls)
            for request in requests[:calls]:  # each one new: a miss, evaluated and stored
                fresh.decide(*request)

        # Timed with the load inside: subtract it.
        load_only = per_call_us(lambda calls: policies.load(str(policy_path), str(entities_path)), 1, rounds=5)
        cold_us = per_call_us(cold, 2000, rounds=5) - load_only / 2000
        warm_set = requests[:500]
        for request in warm_set:
            loaded.decide(*request)

        def warm(calls: int) -> None:
            for index in range(calls):
                loaded.decide(*warm_set[index % 500])

        warm_us = per_call_us(warm, 100_000)
        payload = {
            "model": "model-3",
            "messages": [{"role": "user", "content": "hi"}],
            "stream": True,
            "max_tokens": 256,
        }
        tenant = Tenant("tenant-3", "tenant-3", "key:tenant-3")
        loaded.decide("tenant-3", "chat", "model-3", request_context(payload, DEFAULT_UPSTREAM))

        def step(calls: int) -> None:
            for _ in range(calls):
                loaded.decide(
                    principal_of(tenant, False), "chat", "model-3", request_context(payload, DEFAULT_UPSTREAM)
                )

        step_us = per_call_us(step, 100_000)
        text = twenty_policies()
        parsed_entities = cedarpy.Entities.from_json_str(entities())
        request = {
            "principal": {"type": "Tenant", "id": "tenant-3"},
            "action": {"type": "Action", "id": "chat"},
            "resource": {"type": "Model", "id": "model-3"},
            "context": {"stream": True, "max_tokens": 256, "has_tools": False, "upstream": DEFAULT_UPSTREAM},
        }

        def reparsed(calls: int) -> None:
            for _ in range(calls):
                cedarpy.is_authorized(request, text, parsed_entities)

        reparse_us = per_call_us(reparsed, 500, rounds=5)

    print("policy cost, 20 policies, 200 tenants in 4 plans, 20 models in 4 tiers (µs per request)")
    print(f"  load (parse both files once)          {load_ms:9.2f}  ms, once per start or SIGHUP")
    print(f"  decide, cold (cache miss: Cedar)      {cold_us:9.2f}")
    print(f"  decide, warm (cache hit)              {warm_us:9.2f}")
    print(f"  policy step's work, warm              {step_us:9.2f}  (context from the body + principal + decide)")
    print(f"  cedarpy given the text (re-parsed)    {reparse_us:9.2f}  (what parsing once avoids)")


if __name__ == "__main__":
    main()
