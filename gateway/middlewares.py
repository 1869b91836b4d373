"""The middleware chain: thin `@web.middleware` adapters from HTTP to the policies.

Each factory closes over its collaborators and returns one middleware; none holds policy of
its own, and the order lives in app.py. What differs between routes is decided once, at
start-up, as a `RoutePlan` per route name; the outermost step looks it up and, for a route
that goes through admission, puts the request's state under `ADMITTED`, where each admission
step finds it. Any other route — the probes, a 405, the 404 catch-all — passes through the
admission steps untouched, so it spends no token and no quota.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from aiohttp import HttpVersion11, web
from aiohttp.typedefs import Handler, Middleware

from . import bodies, json_shape
from .budgets import TokenBudget, spent
from .errors import (
    BadRequest,
    GatewayError,
    MethodNotAllowed,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    PermissionDenied,
    QuotaExceeded,
    RateLimited,
    RequestTimeout,
    ShuttingDown,
)
from .keys import ADMITTED, CONFIG, IDENTIFIED, LIFECYCLE, MODEL_ROUTE, STARTED, STATE
from .lifecycle import Lifecycle
from .limits import Quota, TokenBucket, format_reset, retry_headers
from .models import RequestState
from .offload import Turns
from .policies import ANY_MODEL, DEFAULT_UPSTREAM, principal_of, request_context
from .reload import LiveConfig
from .router import router_for
from .shedding import Shedder
from .surfaces import MESSAGES_API, Api
from .telemetry import Telemetry
from .tenancy import client_ip, presented_key

# A client's id as it sent it (SPEC §9), if it is one: printable ASCII, at most 128 characters
# (its header cannot hold a line break: aiohttp parsed it; the log line is JSON, escaped).
_REQUEST_ID = re.compile(r"[ -~]{1,128}")
_RETRY_NOW = MappingProxyType({"Retry-After": "1"})
log = logging.getLogger("gateway")


@dataclass(frozen=True, slots=True)
class RoutePlan:
    """What the chain does with one route, decided at start-up."""

    label: str  # in metrics, span names and logs; bounded: a known path, or "other"
    traced: bool = True  # probes and scrapes would drown the rest
    chat: bool = False  # the chat gauges and histograms: in flight, first byte, tokens
    admitted: bool = False  # through SPEC §4's admission steps
    anthropic_errors: bool = False  # the gateway's own errors in Anthropic's shape (SPEC §11)
    identified: bool = False  # the caller's key checked (SPEC §4 step 1): every admitted route, the model list
    operation: str = "chat"  # the route's gen_ai.operation.name, on its server span


OTHER = RoutePlan("other")


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


def observed(routes: Mapping[str | None, RoutePlan], telemetry: Telemetry, request_ids: RequestIds) -> Middleware:
    """Outermost: request id, metrics, server span and log line, so it sees every final
    status, rendered errors included. A route without a plan (none is left so) is `other`."""
    metrics, request_log, tracing = telemetry.metrics, telemetry.log, telemetry.tracing

    @web.middleware
    async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        route = routes.get(request.match_info.route.name, OTHER)
        label = route.label
        state = request[STATE] = RequestState(request_ids(request.headers.get("x-request-id")))
        if route.identified:
            request[IDENTIFIED] = state
        if route.admitted:
            request[ADMITTED] = state
        metrics.request_started(label)
        if route.chat:
            metrics.chat_started()
        span = None
        if tracing is not None and route.traced:
            span = state.span = tracing.start_server_span(request.method, label, request.path, request.headers)
        status = 500
        try:
            response = await handler(request)
            status = response.status
            if state.client_gone:
                status = 499
                metrics.cb_event("client_disconnect")
            return response
        except asyncio.CancelledError:
            if state.delivered is not None:
                # Its last byte was out when the client hung up (a Redis token settle was
                # still on its way): the client got the whole answer.
                status = state.delivered
            else:
                status = 499  # the client went away (or shutdown cut the request)
                metrics.cb_event("client_disconnect")
            raise
        finally:
            # The response no longer noted: one whose write failed (its client gone) keeps a
            # reference to the request, which would make a cycle of them, and of the request's
            # body and the reply, that only a full collection frees (10 clients of 5 MB replies
            # that went away: 100 MiB more each time).
            state.ended = True
            request.pop(STARTED, None)
            elapsed = time.perf_counter() - started
            if route.chat:
                metrics.chat_finished()
                if state.upstream_ttfb is not None:
                    metrics.upstream_first_byte(state.upstream_ttfb)
                if state.usage is not None:
                    metrics.tokens_used(state.model, state.usage.prompt_tokens, state.usage.completion_tokens)
                elif state.prompt_tokens_seen:
                    metrics.tokens_used(state.model, state.prompt_tokens_seen, 0)
            metrics.response_sent(label, state.model, status, elapsed, route.chat)
            trace_id = None
            if span is not None and tracing is not None:
                trace_id = tracing.trace_id(span)
                tracing.end_server_span(span, state, status, route.operation)
            request_log.write(state, request.method, request.path, status, elapsed, trace_id)

    return observe


def rendered_errors(routes: Mapping[str | None, RoutePlan]) -> Middleware:
    """Every error becomes OpenAI-shaped JSON here, and only here — unless the response's
    headers are already out (a stream): then there is no second response to give, the error
    is logged and the response ends (the relay has written the SSE error event)."""

    @web.middleware
    async def render(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except Exception as exc:  # CancelledError is not an Exception: it passes
            started: web.StreamResponse | None = request.get(STARTED)
            if started is not None:
                log.error(
                    "request %s failed after its response started: %r",
                    request[STATE].request_id,
                    exc,
                    exc_info=not isinstance(exc, GatewayError),
                )
                return started
            anthropic = routes.get(request.match_info.route.name, OTHER).anthropic_errors
            if isinstance(exc, GatewayError):
                response = error_response(exc, anthropic)
                if exc.hang_up:
                    await _answer_and_hang_up(request, response)
                return response
            if isinstance(exc, web.HTTPException):
                return error_response(_from_http_exception(exc), anthropic)
            log.exception("unhandled error (request %s)", request[STATE].request_id)
            return error_response(GatewayError(), anthropic)

    return render


async def _answer_and_hang_up(request: web.Request, response: web.Response) -> None:
    """The answer written now and the connection closed after it. Left to aiohttp, the rest of
    the request body would be read (and parsed) for up to 10 s before the connection closed."""
    response.force_close()
    await response.prepare(request)
    await response.write_eof()
    request.protocol.force_close()


# Admission: SPEC §4's steps, each acting only on requests with their state under ADMITTED.


def draining(lifecycle: Lifecycle) -> Middleware:
    """Nothing new while shutting down (/readyz says so too)."""

    @web.middleware
    async def refuse_while_draining(request: web.Request, handler: Handler) -> web.StreamResponse:
        state = request.get(IDENTIFIED)  # the admitted routes and the model list: not probes, not 404s
        if state is None:
            return await handler(request)
        if lifecycle.draining:
            raise ShuttingDown(headers=_RETRY_NOW)
        # In flight from here, not from the upstream call on: a request still sending its body
        # (or waiting for its quota) when SIGTERM came is waited for up to the grace too; it was
        # cut without any reply when the listener closed, 2 s into the drain.
        task = lifecycle.enter()
        try:
            return await handler(request)
        except asyncio.CancelledError:
            # Cut at the grace before the proxy had it (which answers its own the same way): a
            # 503 the client can retry elsewhere, not a connection closed without a reply.
            if not lifecycle.grace_expired or state.answering:
                raise
            task.uncancel()
            raise ShuttingDown(headers=_RETRY_NOW) from None
        finally:
            lifecycle.leave(task)

    return refuse_while_draining


def tenancy(live: LiveConfig, trusted_proxies: tuple[object, ...]) -> Middleware:
    """Who is calling: a bad key is refused (401) before anything else is spent. The file-backed
    configuration in force is taken here, once: the request runs under it (reload.py)."""

    @web.middleware
    async def identify(request: web.Request, handler: Handler) -> web.StreamResponse:
        state = request.get(IDENTIFIED)
        if state is not None:
            config = request[CONFIG] = live.current
            headers = request.headers
            key = presented_key(headers.get("X-Api-Key"), headers.get("Authorization"))
            ip = ""
            if not key:
                # Every X-Forwarded-For line, as one list (RFC 9110 §5.3): a proxy that adds its
                # own line after the client's (HAProxy's `option forwardfor`) puts the real hop last.
                forwarded = headers.getall("X-Forwarded-For", None)
                ip = client_ip(request.remote, ",".join(forwarded) if forwarded else None, trusted_proxies)
            state.tenant = config.tenancy.resolve(key, ip, request.path)
            router = config.router
            if router is not None:
                # From here the request holds its router: one a reload replaces meanwhile
                # (the body still uploading, the quota's round trip) stays open for it.
                router.enter()
                try:
                    return await handler(request)
                finally:
                    router.leave()
        return await handler(request)

    return identify


def body(
    max_bytes: int,
    budget: bodies.BodyBudget,
    read_timeout: float,
    telemetry: Telemetry,
    apis: Mapping[str, Api],
    redacting: bool,
) -> Middleware:
    """The body read once, decoded and parsed (bodies.py) into the request's state: within
    the bytes budget for bodies being read (else shed, 503) and within `read_timeout`
    (else 408), so stalled uploads hold neither memory nor a connection for long. Then the
    route's own checks of it (`Api.check_request`, by route name): a malformed request is
    refused here, before it spends a rate-limit token or quota."""
    metrics = telemetry.metrics
    # One structure count at a time: a count of millions of tiny strings is bytecode by the
    # step, and with several such threads each turn of the event loop waited for the GIL
    # behind each of them in turn (three at once held /healthz 170-500 ms; and 380-455 ms,
    # median, when each count's client left at once: offload.py). One inflation at a time, apart
    # (zlib lets go of the GIL): a body of 9 KiB inflates to the limit in ~30 ms, and three
    # clients sending such bodies again and again held /healthz ~150 ms while it ran on the loop.
    counting, inflating = Turns(), Turns()

    async def read_held(request: web.Request, sender: str) -> bytes:
        """A body still arriving, each part taken from the budget as it comes (bytes that
        arrived, not bytes announced: a client that declares a large body and sends none holds
        nothing); the caller gives it back. A part that does not fit: shed (503). Read a chunk
        of a chunked body at a time, so that a body of too many is refused (400) and its
        connection closed before aiohttp has parsed all of them."""
        # The parts joined once at the end: a bytearray grown part by part was copied again at
        # each of its ~40 reallocations (~15 ms of an 8 MiB body's read, on the loop).
        parts: list[bytes] = []
        held = 0
        chunks = 0  # the ends of chunks of a chunked body (bodies.MAX_BODY_CHUNKS)
        content = request.content
        try:
            while True:
                chunk, end = await content.readchunk()
                if end:
                    chunks += 1
                    if chunks > bodies.MAX_BODY_CHUNKS:
                        raise bodies.TooManyChunks()
                elif not chunk:  # the end of the body
                    break
                if held + len(chunk) > max_bytes:
                    raise bodies.too_large(max_bytes)
                hold(len(chunk), sender)
                parts.append(chunk)
                held += len(chunk)
        except BaseException:
            budget.give_back(held, sender)
            raise
        return b"".join(parts)

    def hold(size: int, sender: str) -> None:
        if not budget.take(size, sender):
            metrics.cb_event("load_shed")
            raise Overloaded(headers=_RETRY_NOW)

    async def read_raw(request: web.Request, sender: str) -> bytes:
        """The body as it came, its bytes held in the budget (the caller gives them back)."""
        bodies.check_length(request.content_length, max_bytes)
        try:
            if request.content.is_eof():  # all of it has arrived: read() cannot wait, no deadline needed
                raw = await request.read()  # aiohttp holds it to client_max_size (= max_bytes)
                hold(len(raw), sender)
                return raw
            _continue(request)  # a client that waits to be asked for the body is asked now
            async with asyncio.timeout(read_timeout):
                return await read_held(request, sender)
        except web.HTTPRequestEntityTooLarge:
            raise bodies.too_large(max_bytes) from None
        except web.RequestPayloadError:  # a broken chunked encoding, a short body
            raise BadRequest("the request body could not be read", code="invalid_body") from None
        except TimeoutError:
            raise RequestTimeout() from None

    @web.middleware
    async def read_body(request: web.Request, handler: Handler) -> web.StreamResponse:
        state = request.get(ADMITTED)
        if state is not None:
            sender = state.tenant.sender if state.tenant is not None else ""
            raw = await read_raw(request, sender)
            # Its bytes stay held until it is checked, and what it inflates to too: a read body
            # waiting for its turn to be inflated or counted holds memory as one still arriving
            # does (40 hostile bodies of 7.6 MiB queued for their counts took 330 MiB past the
            # budget).
            held = len(raw)
            try:
                headers = request.headers
                coding = headers.get("Content-Encoding")
                if coding is not None and len(codings := headers.getall("Content-Encoding")) > 1:
                    coding = ",".join(codings)  # several headers make one list (RFC 9110 §5.3)
                if bodies.compressed(coding):
                    body = await inflating.run(functools.partial(bodies.decode, raw, coding, max_bytes))
                    hold(len(body), sender)
                    held += len(body)
                else:
                    body = bodies.decode(raw, coding, max_bytes)  # as it came, or refused (415)
                if json_shape.may_be_too_complex(body):  # counted outside strings, off the loop
                    await counting.run(functools.partial(bodies.check_structure, body))
                state.payload, state.model = bodies.parse(body)
            finally:
                budget.give_back(held, sender)
            api = apis.get(request.match_info.route.name or "")
            if api is not None:
                api.check_request(state.payload, redacting)
                # Read here, not at the upstream step: a request refused by admission logs it too.
                state.stream = api.streams and state.payload.get("stream") is True
        return await handler(request)

    return read_body


def routed_upstream(request: web.Request, model: str | None) -> str:
    """The name of the upstream the request goes to first, as policies see it
    (context.upstream): `default` without ROUTES_FILE or for a model no route takes (the
    proxy answers that one 404)."""
    router = router_for(request)
    if router is None or model is None:
        return DEFAULT_UPSTREAM
    # The proxy's own choice (on the other routes: OPENAI_BASE_URL, `default`).
    return router.first_upstream(request.match_info.route.name or "", model) or DEFAULT_UPSTREAM


def policy() -> Middleware:
    """Whether this tenant may (SPEC §15): the Cedar policies of the request's own configuration
    decide from its route, model and body, after tenancy and the body, before any token,
    slot or quota is spent. Left out of the chain without POLICY_FILE."""

    @web.middleware
    async def check_policy(request: web.Request, handler: Handler) -> web.StreamResponse:
        state = request[STATE]
        tenant = state.tenant
        if tenant is not None:  # an identified request, on any route that identifies its tenant
            config = request[CONFIG]
            policies = config.policies
            assert policies is not None, "in the chain only with POLICY_FILE"
            payload = state.payload
            action = request.match_info.route.name or ""
            model = state.model if payload is not None else None
            if action == MODEL_ROUTE:  # GET /v1/models/{model}: the list's action, on the model it names
                action, model = "models", request.match_info["model"]
            verdict = policies.decide(
                principal_of(tenant, config.tenancy.keyed),
                action,
                model if model is not None else ANY_MODEL,
                # No upstream of its own: the list's ("default"), whether relayed or routed.
                request_context(payload, routed_upstream(request, state.model)),
            )
            if not verdict.allowed:
                raise PermissionDenied(verdict.message)
        return await handler(request)

    return check_policy


def rate_limit(bucket: TokenBucket, telemetry: Telemetry) -> Middleware:
    """How fast: the tenant's token bucket (429 with Retry-After)."""
    metrics = telemetry.metrics

    @web.middleware
    async def take_token(request: web.Request, handler: Handler) -> web.StreamResponse:
        state = request.get(ADMITTED)
        if state is not None:
            tenant = state.tenant
            assert tenant is not None, "the tenancy middleware runs first"
            wait = bucket.take(tenant.rate_key)
            if wait:
                metrics.rate_limited()
                raise RateLimited(headers=retry_headers(int(wait * 1000) + 1))
        return await handler(request)

    return take_token


def shedding(shedder: Shedder, telemetry: Telemetry) -> Middleware:
    """How many at once: the slot is held until the handler returns, for a stream after its
    last byte (the handler returns once the stream has ended)."""
    metrics = telemetry.metrics

    @web.middleware
    async def hold_slot(request: web.Request, handler: Handler) -> web.StreamResponse:
        if ADMITTED not in request:
            return await handler(request)
        if not shedder.try_acquire():
            metrics.cb_event("load_shed")
            raise Overloaded(headers=_RETRY_NOW)
        try:
            return await handler(request)
        finally:
            shedder.release()

    return hold_slot


def quota(quotas: Quota, telemetry: Telemetry) -> Middleware:
    """How many this window: the store round trip, so it comes last."""
    metrics = telemetry.metrics

    @web.middleware
    async def count(request: web.Request, handler: Handler) -> web.StreamResponse:
        state = request.get(ADMITTED)
        if state is not None:
            tenant = state.tenant
            assert tenant is not None, "the tenancy middleware runs first"
            decision = await quotas.check(tenant.name, tenant.public_id)
            if decision is not None:
                state.decision = decision
                if not decision.allowed:
                    metrics.quota_blocked()
                    raise QuotaExceeded(
                        f"quota exceeded (limit={decision.limit})", headers=retry_headers(decision.reset_after_ms)
                    )
        return await handler(request)

    return count


def token_budget(budget: TokenBudget, apis: Mapping[str, Api], telemetry: Telemetry) -> Middleware:
    """How many tokens this window (SPEC §14): the request's estimate held before the handler,
    settled after it returns (for a stream, after its last byte) to what the reply used. On
    the routes that produce tokens (`apis`, by route name), for tenants with a budget."""
    metrics = telemetry.metrics

    @web.middleware
    async def hold_tokens(request: web.Request, handler: Handler) -> web.StreamResponse:
        state = request.get(ADMITTED)
        api = apis.get(request.match_info.route.name or "") if state is not None else None
        if state is None or api is None:
            return await handler(request)
        tenant, payload = state.tenant, state.payload
        assert tenant is not None and payload is not None, "the tenancy and body middlewares run first"
        if not budget.limit_for(tenant.name):
            return await handler(request)
        decision = await budget.reserve(tenant.name, tenant.public_id, await budget.estimate(api, payload))
        if decision is None:  # the store is down, fail-open: admitted, nothing held
            return await handler(request)
        state.tokens = decision
        if not decision.allowed:
            metrics.quota_blocked("tokens")
            raise QuotaExceeded(
                f"token quota exceeded (limit={decision.limit})",
                headers=retry_headers(decision.reset_after_ms),
                code="token_quota_exceeded",
            )
        status: int | None = None
        failed = False
        try:
            response = await handler(request)
            status = response.status
            return response
        except Exception:  # not CancelledError: a client that left may have been generated for
            failed = True
            raise
        finally:
            # Never sent (the client left while its prompt was redacted): nothing to hold.
            unsent = not state.sent
            settled = None if state.generated else status  # see RequestState.generated
            await budget.settle(decision, spent(state.usage, failed or unsent or state.error_answer, settled))

    return hold_tokens


def expect_continue() -> Callable[[web.Request], Awaitable[None]]:
    """Every route's `Expect` handler (RFC 9110 §10.1.1), run by aiohttp before the middlewares:
    it answers nothing. The 100 of a `100-continue` is written by the body middleware just before
    it reads the body (`_continue`), so every refusal decided from the headers alone (draining,
    a bad key, a declared body over the limit, 404, 405) is the client's only answer, and it does
    not upload a body for nothing (aiohttp's default sent the 100 at once: then the 401). Any
    other expectation is ignored, as a server may: aiohttp's own answer, a plain-text 417
    quoting the header, bypassed the middlewares (no JSON error, no x-request-id, no log line)."""

    async def expect(request: web.Request) -> None:
        return None

    return expect


_CONTINUE_LINE = b"HTTP/1.1 100 Continue\r\n\r\n"


def _continue(request: web.Request) -> None:
    """The 100 that a `100-continue` client waits for before it sends the body; called only when
    the body has not all arrived (a client that did not wait needs none), so not on the path of
    the usual request."""
    if request.version >= HttpVersion11 and request.headers.get("Expect", "").lower() == "100-continue":
        transport = request.transport
        if transport is not None:
            transport.write(_CONTINUE_LINE)


async def not_found(request: web.Request) -> web.StreamResponse:
    raise NotFound()


def wrong_method(allowed: str) -> Handler:
    """The handler for any other method on a known path (`allowed`: the Allow header)."""
    headers = MappingProxyType({"Allow": allowed})

    async def refuse(request: web.Request) -> web.StreamResponse:
        raise MethodNotAllowed(headers=headers)

    return refuse


def error_response(error: GatewayError, anthropic: bool = False) -> web.Response:
    status, body = error.anthropic() if anthropic else (error.status, error.body())
    response = web.Response(body=body, status=status, content_type="application/json")
    response.headers.update(error.headers)
    return response


def _from_http_exception(exc: web.HTTPException) -> GatewayError:
    """aiohttp's own refusals (its router's, for a request line such as `OPTIONS *` that no
    route can match; its body-size limit) as the gateway's errors."""
    if exc.status == 404:
        return NotFound()
    if exc.status == 405:
        allowed = exc.headers.get("Allow")
        return MethodNotAllowed(headers={"Allow": allowed} if allowed is not None else None)
    if exc.status == 413:
        return PayloadTooLarge("request body is too large")
    error = GatewayError(exc.reason, code="http_error")
    error.status = exc.status
    error.type = "invalid_request_error" if exc.status < 500 else "server_error"
    return error


async def add_gateway_headers(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: our own Server header and x-request-id on everything, quota headers
    on admitted responses; and the response noted as started (see keys.STARTED)."""
    # aiohttp fills in `Server: Python/3.x aiohttp/3.y` only when none is set, after this hook:
    # naming the product without a version tells a scanner nothing to match a CVE against.
    # (The 400 aiohttp writes for a request it cannot parse never reaches the app or this hook.)
    response.headers["Server"] = "secure-llm-gateway"
    if request.app[LIFECYCLE].draining:
        # Kept alive, the connection would take the client's next request, and the process,
        # its last request done, would exit under it with no reply: close it after this one.
        # (aiohttp has set its own headers before this hook: this Connection header is ours.)
        response.force_close()
        response.headers["Connection"] = "close"
    state = request.get(STATE)
    if state is None:
        return
    if not state.ended:  # (a response prepared after the chain is done needs no noting)
        request[STARTED] = response
    headers = response.headers
    headers["x-request-id"] = state.request_id
    if request.match_info.route.name == MESSAGES_API.name:
        # Anthropic's API names it `request-id`, where its SDK reads it (`message._request_id`,
        # `APIStatusError.request_id`): the same id, under both names.
        headers["request-id"] = state.request_id
    decision = state.decision
    if decision is not None:
        headers["x-ratelimit-limit-requests"] = str(decision.limit)
        headers["x-ratelimit-remaining-requests"] = str(decision.remaining)
        headers["x-ratelimit-reset-requests"] = format_reset(decision.reset_after_ms)
    if state.upstream is not None:  # ROUTES_FILE's upstream that answered (SPEC §13)
        headers["x-gateway-upstream"] = state.upstream
    tokens = state.tokens
    if tokens is not None:
        headers["x-ratelimit-limit-tokens"] = str(tokens.limit)
        headers["x-ratelimit-remaining-tokens"] = str(tokens.remaining)
        headers["x-ratelimit-reset-tokens"] = format_reset(tokens.reset_after_ms)
