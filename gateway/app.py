"""create_app(settings): builds every component, and the routes with their wrappers.

Importing this module does nothing; tests build a fresh app per case.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import IO

from aiohttp import web
from aiohttp.typedefs import Handler

from . import keys
from .config import Settings
from .lifecycle import Lifecycle
from .limits import Quota, TokenBucket
from .middlewares import (
    RequestIds,
    add_gateway_headers,
    admission,
    draining_check,
    not_found,
    observed,
    ratelimit_check,
    rendered_errors,
    tenancy_check,
    wrong_method,
)
from .proxy import ChatProxy
from .redact import build_redactor
from .shedding import Shedder
from .stores import store_from_url
from .telemetry import CHAT_ROUTE, Metrics, RequestLog, Telemetry
from .tenancy import Tenancy
from .tracing import Tracing
from .upstream import Upstream


def create_app(settings: Settings, *, log_stream: IO[bytes] | None = None) -> web.Application:
    tracing = Tracing(settings.otlp_endpoint, settings.service_name) if settings.otlp_endpoint else None
    telemetry = Telemetry(Metrics(settings.model_label_limit), tracing, RequestLog(log_stream))
    store = store_from_url(settings.redis_url, cluster=settings.redis_cluster, timeout=settings.store_timeout_secs)
    upstream = Upstream(settings.upstream_chat_url, settings.upstream_api_key, settings.timeout_secs)
    lifecycle = Lifecycle(settings.shutdown_grace_secs, settings.notify_socket)
    quota = Quota(
        store,
        settings.default_quota,
        settings.tenant_quotas,
        settings.quota_window_secs,
        fail_open=settings.quota_fail_mode == "open",
        on_store_error=lambda: telemetry.metrics.cb_event("store_error"),
    )
    proxy = ChatProxy(
        upstream,
        build_redactor(settings.redact_kinds),
        telemetry,
        lifecycle,
        settings.timeout_secs,
        settings.max_body_bytes,
    )

    # Admission, in SPEC §4's order: nothing new while draining; who is calling (a bad key is
    # refused before anything else), how fast; then (in `admission`) how many at once and
    # how many this window. The cheap, local checks come before the quota's store round
    # trip, so a flood is turned away before it reaches Redis. Disabled steps are left out.
    checks = [
        draining_check(lifecycle),
        tenancy_check(Tenancy(settings.tenant_key_digests, settings.hash_secret), settings.trusted_proxies),
    ]
    if settings.rps > 0:
        checks.append(ratelimit_check(TokenBucket(settings.rps, settings.burst), telemetry))
    shedder = Shedder(settings.max_concurrency) if settings.max_concurrency else None

    app = web.Application(client_max_size=settings.max_body_bytes)
    app[keys.SETTINGS] = settings
    app[keys.UPSTREAM] = upstream
    app[keys.STORE] = store
    app[keys.TELEMETRY] = telemetry
    app[keys.LIFECYCLE] = lifecycle

    # Made here, in each worker process (after the fork): every worker gets its own id prefix.
    request_ids = RequestIds()

    def served(handler: Handler, route: str) -> Handler:
        return observed(rendered_errors(handler), route, telemetry, request_ids)

    routes: list[tuple[str, str, Handler]] = [
        ("GET", "/healthz", healthz),
        ("GET", "/readyz", readyz),
        ("GET", "/metrics", metrics),
        ("POST", CHAT_ROUTE, admission(proxy.handle, checks, shedder, quota, telemetry)),
    ]
    for method, path, handler in routes:
        methods = ("GET", "HEAD") if method == "GET" else (method,)
        for each in methods:
            app.router.add_route(each, path, served(handler, path))
        app.router.add_route("*", path, served(wrong_method(",".join(methods)), path))  # any other: 405
    app.router.add_route("*", "/{path:.*}", served(not_found, "other"))  # last: any other path
    app.cleanup_ctx.append(resources)
    app.on_response_prepare.append(add_gateway_headers)
    return app


async def resources(app: web.Application) -> AsyncIterator[None]:
    upstream, store, telemetry = app[keys.UPSTREAM], app[keys.STORE], app[keys.TELEMETRY]
    await upstream.open()
    open_store = getattr(store, "open", None)
    if open_store is not None:
        await open_store()
    yield
    await upstream.close()
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
    body, headers = request.app[keys.TELEMETRY].metrics.render(request.headers.getall("Accept", []))
    return web.Response(body=body, headers=headers)
