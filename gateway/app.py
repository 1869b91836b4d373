"""create_app(settings): builds every component, the middleware chain and the routes.

Importing this module does nothing; tests build a fresh app per case.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from types import MappingProxyType
from typing import IO

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from . import keys
from .bodies import BodyBudget
from .breaker import Breakers
from .budgets import TokenBudget
from .catalog import MODEL_PATH, ModelList
from .config import Settings
from .egress import Egress
from .lifecycle import Lifecycle
from .limits import Quota, TokenBucket
from .middlewares import (
    RequestIds,
    RoutePlan,
    add_gateway_headers,
    body,
    draining,
    expect_continue,
    not_found,
    observed,
    policy,
    quota,
    rate_limit,
    rendered_errors,
    shedding,
    tenancy,
    token_budget,
    wrong_method,
)
from .openai_apis import EMBEDDINGS_API, RESPONSES_API
from .proxy import Proxy
from .redact import build_redactor
from .reload import LiveConfig
from .router import Router
from .shedding import Shedder
from .stores import StoreGuard, store_from_url
from .surfaces import CHAT_API, MESSAGES_API, Api
from .telemetry import Metrics, RequestLog, Telemetry
from .tracing import Tracing
from .upstream import Upstream

# How the app is to be served (web.AppRunner's keyword arguments, by server.py and tests alike):
# request bodies are decoded by the body middleware (bodies.py), not by aiohttp.
SERVER_OPTIONS: Mapping[str, object] = MappingProxyType({"auto_decompress": False})

# Routes that go through SPEC §4's admission; every other route is let through by its steps.
ADMITTED_ROUTES = frozenset({CHAT_API.name, MESSAGES_API.name, RESPONSES_API.name, EMBEDDINGS_API.name})
# The model list, and one model, need a valid key in keyed mode, and spend nothing (SPEC §12).
IDENTIFIED_ROUTES = ADMITTED_ROUTES | {"models", keys.MODEL_ROUTE}
TOKEN_APIS = (CHAT_API, MESSAGES_API, RESPONSES_API, EMBEDDINGS_API)  # the routes that use tokens: budgeted (SPEC §14)
_ANTHROPIC_SHAPED = frozenset({MESSAGES_API.name})  # the gateway's own errors as Anthropic's (SPEC §11)
_UNTRACED = frozenset({"/healthz", "/readyz", "/metrics"})
_LABELS = {MODEL_PATH: "/v1/models/{model}"}  # a path as metrics, spans and logs name it, when not itself


def create_app(settings: Settings, *, log_stream: IO[bytes] | None = None) -> web.Application:
    egress = Egress(settings.https_proxy, settings.http_proxy, settings.no_proxy)
    tracing = Tracing(settings.otlp_endpoint or None, settings.service_name, egress)
    telemetry = Telemetry(Metrics(settings.model_label_limit), tracing, RequestLog(log_stream))
    store = store_from_url(settings.redis_url, cluster=settings.redis_cluster, timeout=settings.store_timeout_secs)

    def openai_upstream(url: str) -> Upstream:
        return Upstream(
            url,
            settings.upstream_api_key,
            settings.timeout_secs,
            organization=settings.openai_organization,
            project=settings.openai_project,
            egress=egress,
        )

    upstream = openai_upstream(settings.upstream_chat_url)
    responses = openai_upstream(settings.upstream_responses_url)
    embeddings = openai_upstream(settings.upstream_embeddings_url)
    models = openai_upstream(settings.upstream_models_url)
    anthropic = Upstream(
        settings.upstream_messages_url, settings.anthropic_api_key, settings.timeout_secs, anthropic=True, egress=egress
    )
    lifecycle = Lifecycle(settings.shutdown_grace_secs, settings.notify_socket)
    # What lives in files (tenant keys, policies): read now, and again on SIGHUP (server.py).
    # One guard for every policy over the store: an outage is noticed, and backed off, once.
    guard = StoreGuard(settings.quota_fail_mode == "open", lambda: telemetry.metrics.cb_event("store_error"))
    quotas = Quota(store, settings.default_quota, settings.tenant_quotas, settings.quota_window_secs, guard=guard)
    budget = TokenBudget(
        store,
        settings.token_quota,
        settings.tenant_token_quotas,
        settings.token_window_secs,
        settings.token_reserve_default,
        guard,
    )
    redactor = build_redactor(settings.redact_kinds)
    router = None
    if settings.routes is not None:  # SPEC §13; breakers per upstream name, kept across reloads
        breakers = Breakers(
            settings.cb_failures,
            settings.cb_open_secs,
            telemetry.metrics.circuit,
            on_gone=telemetry.metrics.circuit_gone,  # an upstream a reload removes leaves /metrics
        )
        router = Router(
            settings.routes,
            breakers,
            settings.timeout_secs,
            organization=settings.openai_organization,
            project=settings.openai_project,
            egress=egress,
        )

    live = LiveConfig(settings, telemetry.metrics.config_reloaded, router)

    def proxy_for(api: Api, to: Upstream) -> Proxy:
        return Proxy(
            api,
            to,
            redactor,
            telemetry,
            lifecycle,
            settings.timeout_secs,
            stream_idle_secs=settings.stream_idle_secs,
            client_idle_secs=settings.client_idle_secs,
        )

    # (method, path, route name, handler). Every route has a name: its RoutePlan is looked up by it.
    catalog = ModelList(models, telemetry, settings.timeout_secs)
    routes: list[tuple[str, str, str, Handler]] = [
        ("GET", "/healthz", "healthz", healthz),
        ("GET", "/readyz", "readyz", readyz),
        ("GET", "/metrics", "metrics", metrics),
        ("POST", CHAT_API.path, CHAT_API.name, proxy_for(CHAT_API, upstream).handle),
        ("POST", MESSAGES_API.path, MESSAGES_API.name, proxy_for(MESSAGES_API, anthropic).handle),
        ("POST", RESPONSES_API.path, RESPONSES_API.name, proxy_for(RESPONSES_API, responses).handle),
        ("POST", EMBEDDINGS_API.path, EMBEDDINGS_API.name, proxy_for(EMBEDDINGS_API, embeddings).handle),
        ("GET", "/v1/models", "models", catalog.handle),
        ("GET", MODEL_PATH, keys.MODEL_ROUTE, catalog.retrieve),
    ]
    operations = {api.name: api.operation for api in TOKEN_APIS}
    plans: dict[str | None, RoutePlan] = {
        name: RoutePlan(
            _LABELS.get(path, path),
            path not in _UNTRACED,
            name in ADMITTED_ROUTES,
            name in ADMITTED_ROUTES,
            name in _ANTHROPIC_SHAPED,
            identified=name in IDENTIFIED_ROUTES,
            operation=operations.get(name, "chat"),
        )
        for _, path, name, _ in routes
    }
    # Any other method on a known path: 405, observed under that path, never admitted.
    plans |= {
        f"{name}.wrong_method": RoutePlan(
            _LABELS.get(path, path),
            path not in _UNTRACED,
            name in ADMITTED_ROUTES,
            anthropic_errors=name in _ANTHROPIC_SHAPED,
        )
        for _, path, name, _ in routes
    }
    plans["not_found"] = RoutePlan("other")
    # The Messages API's other paths (count_tokens, batches), not served: the SDK gets its 404 in
    # Anthropic's shape, as every gateway error on that surface is (SPEC §11).
    plans["messages.not_found"] = RoutePlan("other", anthropic_errors=True)

    # Outermost first. `observed` sees every final status, so it wraps the renderer, which
    # turns every error below into OpenAI JSON. Then SPEC §4's admission, in its order, on the
    # ADMITTED_ROUTES only (a 404/405 or a probe spends nothing): nothing new while draining;
    # who is calling (a bad key is refused before anything else); the body, read and checked
    # once, so a malformed request costs no token or quota and a refused one still names its
    # model; whether the tenant may at all (SPEC §15's policies, which read the body); how
    # fast; how many at once (the slot held until the handler returns: for a stream, its last
    # byte); how many this window (a store round trip, so last); how many tokens (SPEC §14:
    # after the request quota, so a request refused for tokens has counted as a request, and
    # one the quota refuses holds nothing; innermost, so it sees how the handler ended and
    # settles from there).
    # Disabled steps are left out.
    chain: list[Middleware] = [
        observed(MappingProxyType(plans), telemetry, RequestIds()),  # ids made per worker (after the fork)
        rendered_errors(MappingProxyType(plans)),
        draining(lifecycle),
        tenancy(live, settings.trusted_proxies),
        # Bodies being read or checked at once: one per concurrency slot, or sixteen without a limit.
        body(
            settings.max_body_bytes,
            BodyBudget(settings.max_body_bytes * (settings.max_concurrency or 16), settings.max_body_bytes),
            settings.timeout_secs,
            telemetry,
            MappingProxyType({api.name: api for api in TOKEN_APIS}),  # every admitted route's API
            redactor is not None,
        ),
    ]
    if settings.policy_file:
        chain.append(policy())
    if settings.rps > 0:
        chain.append(rate_limit(TokenBucket(settings.rps, settings.burst), telemetry))
    if settings.max_concurrency:
        chain.append(shedding(Shedder(settings.max_concurrency), telemetry))
    chain.append(quota(quotas, telemetry))
    if budget.enabled:
        chain.append(token_budget(budget, MappingProxyType({api.name: api for api in TOKEN_APIS}), telemetry))

    app = web.Application(middlewares=chain, client_max_size=settings.max_body_bytes)
    app[keys.SETTINGS] = settings
    app[keys.UPSTREAMS] = (upstream, anthropic, responses, embeddings, models)
    app[keys.STORE] = store
    app[keys.BUDGET] = budget
    app[keys.TELEMETRY] = telemetry
    app[keys.LIFECYCLE] = lifecycle
    app[keys.LIVE_CONFIG] = live

    expect = expect_continue()
    for method, path, name, handler in routes:
        methods = ("GET", "HEAD") if method == "GET" else (method,)
        for each in methods:
            app.router.add_route(each, path, handler, name=name, expect_handler=expect)
        refuse = wrong_method(",".join(methods))
        app.router.add_route("*", path, refuse, name=f"{name}.wrong_method", expect_handler=expect)
    messages_tail = MESSAGES_API.path + "/{path:.*}"
    app.router.add_route("*", messages_tail, not_found, name="messages.not_found", expect_handler=expect)
    app.router.add_route("*", "/{path:.*}", not_found, name="not_found", expect_handler=expect)  # last: any other path
    app.cleanup_ctx.append(resources)
    app.on_response_prepare.append(add_gateway_headers)
    return app


async def resources(app: web.Application) -> AsyncIterator[None]:
    upstreams, store, telemetry = app[keys.UPSTREAMS], app[keys.STORE], app[keys.TELEMETRY]
    # The store first: a cluster's fails to open (StoreUnavailable) with nothing else open yet.
    open_store = getattr(store, "open", None)
    if open_store is not None:
        await open_store()
    for upstream in upstreams:
        await upstream.open()
    live = app[keys.LIVE_CONFIG]
    router = live.current.router
    if router is not None:
        await router.open()
    yield
    for upstream in upstreams:
        await upstream.close()
    await live.close_routers()
    await app[keys.BUDGET].close()  # its last settles, before the store closes
    await store.close()
    telemetry.close()


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def readyz(request: web.Request) -> web.Response:
    app = request.app
    if app[keys.LIFECYCLE].draining:
        return web.Response(status=503, text="draining")
    if app[keys.SETTINGS].quota_fail_mode == "closed" and not await app[keys.STORE].ping():
        return web.Response(status=503, text="quota store unavailable")
    return web.Response(text="ready")


async def metrics(request: web.Request) -> web.Response:
    body, headers = request.app[keys.TELEMETRY].render(request.headers.getall("Accept", []))
    return web.Response(body=body, headers=headers)
