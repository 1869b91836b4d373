"""Thin adapters from HTTP to the policies, one per step; the order lives in app.py.

Each factory closes over its collaborators; none holds policy of its own. They wrap each
route's handler once, at start-up, rather than being aiohttp middlewares: for those aiohttp looks
the chain up in a cache on every request, calls each through a partial and adds a layer of
its own.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import re
import time
from collections.abc import Callable, Sequence

from aiohttp import web
from aiohttp.typedefs import Handler

from .errors import (
    GatewayError,
    MethodNotAllowed,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    QuotaExceeded,
    RateLimited,
    ShuttingDown,
)
from .keys import STATE
from .lifecycle import Lifecycle
from .limits import Quota, TokenBucket, format_reset, retry_headers
from .models import RequestState
from .shedding import Shedder
from .telemetry import CHAT_ROUTE, Metrics, Telemetry
from .tenancy import Tenancy, client_ip, presented_key

_UNTRACED = frozenset({"/healthz", "/readyz", "/metrics"})
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
log = logging.getLogger("gateway")


class RequestIds:
    """The client's x-request-id when it is sane, else a new one: a random per-process
    prefix and a counter (unique across restarts and replicas, and far cheaper than uuid4)."""

    __slots__ = ("_counter", "_prefix")

    def __init__(self) -> None:
        self._prefix = os.urandom(8).hex()
        self._counter = itertools.count(1)

    def __call__(self, header: str | None) -> str:
        if header and _REQUEST_ID.fullmatch(header):
            return header
        return f"{self._prefix}{next(self._counter):08x}"


def observed(handler: Handler, route: str, telemetry: Telemetry, request_id_from: RequestIds) -> Handler:
    """The outermost step of every route: request id, metrics, server span and log line, so
    it sees every final status, rendered errors included. `route` is the metrics label."""
    metrics, request_log = telemetry.metrics, telemetry.log
    tracing = telemetry.tracing if route not in _UNTRACED else None  # probes and scrapes would drown the rest
    is_chat = route == CHAT_ROUTE

    async def observe(request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        state = request[STATE] = RequestState(request_id_from(request.headers.get("x-request-id")))
        metrics.request_started(route)
        if is_chat:
            metrics.chat_started()
        if tracing is not None:
            state.span = tracing.start_server_span(request.method, route, request.path, request.headers)
        status = 500
        try:
            response = await handler(request)
            status = response.status
            if state.client_gone:
                status = 499
                metrics.cb_event("client_disconnect")
            return response
        except asyncio.CancelledError:
            status = 499  # the client went away (or shutdown cut the request)
            metrics.cb_event("client_disconnect")
            raise
        finally:
            elapsed = time.perf_counter() - started
            if is_chat:
                metrics.chat_finished()
                if state.upstream_ttfb is not None:
                    metrics.upstream_first_byte(state.upstream_ttfb)
                if state.usage is not None:
                    metrics.tokens_used(state.model, state.usage.prompt_tokens, state.usage.completion_tokens)
            metrics.response_sent(route, state.model, status, elapsed)
            trace_id = None
            if state.span is not None and tracing is not None:
                trace_id = tracing.trace_id(state.span)
                tracing.end_server_span(state.span, state, status)
            request_log.write(state, request.method, request.path, status, elapsed, trace_id)

    return observe


def rendered_errors(handler: Handler) -> Handler:
    """Every error becomes OpenAI-shaped JSON here, and only here."""

    async def render(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except GatewayError as error:
            return error_response(error)
        except web.HTTPException as exc:  # aiohttp's body-size limit
            return error_response(_from_http_exception(exc))
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("unhandled error (request %s)", request[STATE].request_id)
            return error_response(GatewayError())

    return render


async def not_found(request: web.Request) -> web.StreamResponse:
    raise NotFound()


def wrong_method(allowed: str) -> Handler:
    """The handler for any other method on a known path (`allowed`: the Allow header)."""

    async def refuse(request: web.Request) -> web.StreamResponse:
        raise MethodNotAllowed(headers={"Allow": allowed})

    return refuse


def error_response(error: GatewayError) -> web.Response:
    response = web.Response(body=error.body(), status=error.status, content_type="application/json")
    response.headers.update(error.headers)
    return response


def _from_http_exception(exc: web.HTTPException) -> GatewayError:
    if exc.status == 413:
        return PayloadTooLarge("request body is too large")
    error = GatewayError(exc.reason, code="http_error")
    error.status = exc.status
    error.type = "invalid_request_error" if exc.status < 500 else "server_error"
    return error


# Admission: SPEC §4's steps. The cheap local ones are plain functions that raise to refuse;
# the concurrency slot and the quota (a store round trip) come last. They wrap the chat
# handler itself rather than being layers of their own: a 404/405 never reaches them (so it spends
# no tokens or quota), and the request pays for one call per step, not one coroutine.
Check = Callable[[web.Request, RequestState], None]


def admission(
    handler: Handler, checks: Sequence[Check], shedder: Shedder | None, quota: Quota, telemetry: Telemetry
) -> Handler:
    metrics = telemetry.metrics
    checks = tuple(checks)

    async def admitted(request: web.Request) -> web.StreamResponse:
        state = request[STATE]
        for check in checks:
            check(request, state)
        if shedder is None:
            await _check_quota(quota, metrics, state)
            return await handler(request)
        if not shedder.try_acquire():
            metrics.cb_event("load_shed")
            raise Overloaded(headers={"Retry-After": "1"})
        try:  # the slot is held until the handler returns: for streams, after the last byte
            await _check_quota(quota, metrics, state)
            return await handler(request)
        finally:
            shedder.release()

    return admitted


def draining_check(lifecycle: Lifecycle) -> Check:
    def check(request: web.Request, state: RequestState) -> None:
        if lifecycle.draining:
            raise ShuttingDown(headers={"Retry-After": "1"})

    return check


def tenancy_check(tenancy: Tenancy, trusted_proxies: tuple[object, ...]) -> Check:
    def check(request: web.Request, state: RequestState) -> None:
        headers = request.headers
        key = presented_key(headers.get("X-Api-Key"), headers.get("Authorization"))
        ip = "" if key else client_ip(request.remote, headers.get("X-Forwarded-For"), trusted_proxies)
        state.tenant = tenancy.resolve(key, ip, request.path)

    return check


def ratelimit_check(bucket: TokenBucket, telemetry: Telemetry) -> Check:
    metrics = telemetry.metrics

    def check(request: web.Request, state: RequestState) -> None:
        assert state.tenant is not None
        wait = bucket.take(state.tenant.rate_key)
        if wait:
            metrics.rate_limited()
            raise RateLimited(headers=retry_headers(int(wait * 1000) + 1))

    return check


async def _check_quota(quota: Quota, metrics: Metrics, state: RequestState) -> None:
    tenant = state.tenant
    assert tenant is not None
    decision = await quota.check(tenant.name, tenant.public_id)
    if decision is not None:
        state.decision = decision
        if not decision.allowed:
            metrics.quota_blocked()
            raise QuotaExceeded(
                f"quota exceeded (limit={decision.limit})", headers=retry_headers(decision.reset_after_ms)
            )


async def add_gateway_headers(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: x-request-id on everything, quota headers on chat responses."""
    state = request.get(STATE)
    if state is None:
        return
    headers = response.headers
    headers["x-request-id"] = state.request_id
    decision = state.decision
    if decision is not None:
        headers["x-ratelimit-limit-requests"] = str(decision.limit)
        headers["x-ratelimit-remaining-requests"] = str(decision.remaining)
        headers["x-ratelimit-reset-requests"] = format_reset(decision.reset_after_ms)
