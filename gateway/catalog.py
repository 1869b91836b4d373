"""GET /v1/models (SPEC §12): the models a client may ask for, in OpenAI's list shape; and
GET /v1/models/{model}, one of them (OpenAI's `models.retrieve`).

Without routing the list is the upstream's own answer, relayed as it came; with ROUTES_FILE it
is the routed models (SPEC §13: exact names, and for a glob each rename target or the glob
itself). `ModelList.models` is the one place that produces it. In keyed mode the caller's key is checked first (the
tenancy step); the route spends no rate-limit token and no quota. The upstream call follows
SPEC §5: the whole answer within TIMEOUT_SECS (else 504), its status and JSON error relayed,
401/403 (the gateway's own credential refused) as 502, no connection as 502.

One model: with ROUTES_FILE, the object the list holds for that id, or 404 model_not_found for
an id it does not list; without, the upstream's GET of that model, relayed as the list is. An
id may hold "/" ("meta-llama/Llama-3-8B", sent by the SDK as %2F): it is sent upstream as one
percent-encoded segment. Admission as the list's; the policy's resource is the model
(middlewares.policy).
"""

from __future__ import annotations

import asyncio
import time

import orjson
from aiohttp import web

from .errors import ModelNotFound, UpstreamAuthRejected, UpstreamError, UpstreamTimeout
from .keys import STATE
from .models import RequestState
from .router import router_for
from .telemetry import Telemetry
from .upstream import Upstream

# The path of one model (its route is keys.MODEL_ROUTE); "model" in its match_info.
MODEL_PATH = "/v1/models/{model:.+}"  # ".+": an id may hold "/"
_NOT_AN_ID = frozenset({".", ".."})  # a URL's dot segments: sent upstream, they would leave /v1/models/


def _model_object(model: str) -> dict[str, object]:
    return {"id": model, "object": "model", "created": 0, "owned_by": "gateway"}


class ModelList:
    """The handler of GET /v1/models (`handle`) and GET /v1/models/{model} (`retrieve`)."""

    def __init__(self, upstream: Upstream, telemetry: Telemetry, timeout_secs: float) -> None:
        self._upstream = upstream
        self._telemetry = telemetry
        self._timeout = timeout_secs

    async def handle(self, request: web.Request) -> web.Response:
        status, body, headers = await self.models(request, request[STATE])
        return web.Response(body=body, status=status, content_type="application/json", headers=headers)

    async def retrieve(self, request: web.Request) -> web.Response:
        status, body, headers = await self.model(request, request[STATE], request.match_info["model"])
        return web.Response(body=body, status=status, content_type="application/json", headers=headers)

    async def models(self, request: web.Request, state: RequestState) -> tuple[int, bytes, dict[str, str]]:
        """(status, JSON body, headers) of the list: the routed models, or the upstream's answer."""
        router = router_for(request)
        if router is not None:
            listed = [_model_object(name) for name in router.table.model_ids()]
            return 200, orjson.dumps({"object": "list", "data": listed}), {}
        return await self._relay(request, state, None)

    async def model(self, request: web.Request, state: RequestState, model: str) -> tuple[int, bytes, dict[str, str]]:
        """(status, JSON body, headers) of one model: the list's object for it, or the upstream's
        answer; 404 model_not_found for a routed list without it."""
        router = router_for(request)
        if router is not None:
            if model not in router.table.model_ids():
                raise ModelNotFound(model, "does not exist")
            return 200, orjson.dumps(_model_object(model)), {}
        if model in _NOT_AN_ID:
            raise ModelNotFound(model, "does not exist")
        return await self._relay(request, state, model)

    async def _relay(
        self, request: web.Request, state: RequestState, model: str | None
    ) -> tuple[int, bytes, dict[str, str]]:
        tracing = self._telemetry.tracing
        if tracing is None or state.span is None:
            headers = self._upstream.headers_for(request.headers, request_id=state.request_id)
            return await self._fetch(state, headers, model)
        with tracing.client_span(state.span, None) as trace_headers:
            headers = self._upstream.headers_for(request.headers, trace_headers, request_id=state.request_id)
            return await self._fetch(state, headers, model)

    async def _fetch(
        self, state: RequestState, headers: dict[str, str], model: str | None
    ) -> tuple[int, bytes, dict[str, str]]:
        metrics = self._telemetry.metrics
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self._timeout):
                reply = await self._upstream.get(headers, model)
                state.upstream_ttfb = time.perf_counter() - started
                try:
                    # Any status: the list is asked for rarely and is small, and one that echoes
                    # the request (a debugging proxy answering 200) would hand out the key.
                    data = reply.scrub(await reply.read())
                finally:
                    reply.close()
        except TimeoutError:
            metrics.cb_event("timeout")
            raise UpstreamTimeout() from None
        except UpstreamError:
            metrics.cb_event("upstream_error")
            raise
        if reply.status in (401, 403, 407):  # 407: the egress proxy refused the gateway (HTTP_PROXY)
            metrics.cb_event("upstream_error")
            raise UpstreamAuthRejected()
        if not reply.is_json:
            metrics.cb_event("upstream_error")
            raise UpstreamError(f"upstream answered {reply.status} with a body that is not JSON")
        return reply.status, data, reply.retry_headers() if reply.status >= 300 else {}
