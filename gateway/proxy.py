"""A POST route's handler (chat completions, messages, responses, embeddings): validate,
redact, relay (JSON or SSE), under asyncio deadlines.

Non-stream: the whole upstream response must arrive within TIMEOUT_SECS. Stream: the first
event must; after that events are relayed as they arrive. The request body is forwarded as
received unless redaction changed a message (every other field is kept as sent).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import re
import struct
import termios
import time
from collections.abc import Callable, Coroutine, Mapping
from contextlib import AbstractContextManager
from types import MappingProxyType
from typing import Any

from aiohttp import web

from . import sse
from .errors import (
    BadRequest,
    GatewayError,
    ShuttingDown,
    UpstreamAuthRejected,
    UpstreamError,
    UpstreamIdleTimeout,
    UpstreamStreamBroken,
    UpstreamTimeout,
    UpstreamUnavailable,
    anthropic_error_type,
)
from .joins import Joined, message_from_events, response_from_events
from .keys import CONFIG, STATE
from .lifecycle import Lifecycle
from .memo import RedactionMemo
from .models import RequestState
from .policies import principal_of, request_context
from .redact import YIELD_ABOVE_CHARS, OnRedaction, Redactor, redact_sliced, redact_yielding
from .relay import ASIDE_BYTES, StreamRelay, dumps_reply, loads_reply, redact_reply, reply_may_need_redaction
from .router import (
    ROUTED_APIS,
    AnthropicAsChat,
    Attempt,
    Attempts,
    Leg,
    body_for,
    include_usage,
    is_fallback_status,
    router_for,
)
from .surfaces import MESSAGES_API, Api, Surface, ask_stream_usage, message_events
from .telemetry import Telemetry
from .translate import answer_tool, anthropic_error, chat_error, completion_events, completion_from_events
from .upstream import MAX_ANSWER_BYTES, MAX_REPLY_BYTES, Reply, Upstream

# Short texts redacted one after another: a turn of the loop for others after each 4 KiB of
# them. A request to the gateway needs a few turns, each waiting for one slice: with 32 KiB
# slices of card-dense text (~11 ms each on a slow core) /healthz waited ~60-100 ms.
_YIELD_EVERY_CHARS = 4096
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_RETRY_AFTER_STATUSES = frozenset({429, 503, 529})  # SPEC §13: with Retry-After, a skip, not a failure
_NO_TRACE: AbstractContextManager[Mapping[str, str]] = contextlib.nullcontext(MappingProxyType({}))
_RETRY_SOON = MappingProxyType({"Retry-After": "1"})  # another instance, or this one restarted
log = logging.getLogger("gateway")


def _permitted_legs(request: web.Request, state: RequestState, legs: tuple[Leg, ...]) -> tuple[Leg, ...]:
    """The route's upstreams the policies let this request reach (SPEC §15: context.upstream is
    the routed upstream's name). The policy step decided the first; a fallback is decided on its
    own name, and one a forbid names is not tried: `forbid … when { context.upstream == "openai" }`
    held only while the first upstream answered (its failure or open breaker sent the request
    there). Decisions are cached: a few dictionary lookups per fallback."""
    config = request.get(CONFIG)
    if config is None or config.policies is None or state.tenant is None or state.model is None:
        return legs
    policies = config.policies
    principal = principal_of(state.tenant, config.tenancy.keyed)
    route = request.match_info.route.name or ""
    return legs[:1] + tuple(
        leg
        for leg in legs[1:]
        if leg.name == legs[0].name
        or policies.decide(principal, route, state.model, request_context(state.payload, leg.name)).allowed
    )


class Proxy:
    """One route's handler, for the API it is given (chat completions, Anthropic messages)."""

    def __init__(
        self,
        api: Api,
        upstream: Upstream,
        redactor: Redactor | None,
        telemetry: Telemetry,
        lifecycle: Lifecycle,
        timeout_secs: float,
        stream_idle_secs: float = 300.0,
        client_idle_secs: float = 75.0,
    ) -> None:
        self._api = api
        self._idle = stream_idle_secs
        # How long a stream's (or a large reply's) client may take no byte: the idle stream's
        # limit, as on the upstream's side, never less than the connection's. A reader's
        # kernel shows bytes taken in steps of ~100 KiB (README, Slow readers), so the wait is
        # long: CLIENT_IDLE_SECS alone (75 s) cut SDK clients reading 3-10 events a second.
        self._client_idle = max(client_idle_secs, stream_idle_secs)
        self._idle_slack = min(1.0, stream_idle_secs / 50)  # how late the idle timeout may fire (see _pump)
        self._surface = api.surface
        self._upstream = upstream
        # A reply read whole: a text API's (chat, messages, responses: the ones that stream) is
        # bounded by the tokens a model writes, and held to MAX_ANSWER_BYTES; embeddings' (a
        # 2048-input batch of 3072 floats is tens of MiB) to the upstream's MAX_REPLY_BYTES.
        self._reply_limit = MAX_ANSWER_BYTES if api.streams else MAX_REPLY_BYTES
        self._redactor = redactor
        self._memo = RedactionMemo(redactor) if redactor is not None else None
        self._telemetry = telemetry
        self._lifecycle = lifecycle
        self._timeout = timeout_secs
        self._draining: set[asyncio.Task[None]] = set()
        metrics = telemetry.metrics
        # Straight to the family: a resent conversation counts its masks on every request.
        self._count_request_redactions: Counted = lambda kind, times: metrics.redactions.add((kind, "request"), times)
        self._count_request_redaction = lambda kind: metrics.redacted(kind, "request")
        self._count_response_redaction = lambda kind: metrics.redacted(kind, "response")
        self._count_response_redactions: Counted = lambda kind, times: metrics.redactions.add((kind, "response"), times)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        router = router_for(request)  # held by the request since the tenancy step (router.enter)
        state = request[STATE]
        payload = state.payload
        assert payload is not None and state.model is not None, "the body middleware runs first"
        # Before any work: an unrouted model is 404. ROUTES_FILE routes every POST route.
        legs = router.legs(self._api, state.model) if router is not None and self._api.name in ROUTED_APIS else None
        if legs is not None and len(legs) > 1:
            legs = _permitted_legs(request, state, legs)
        hidden_usage = state.stream and self._api.asks_stream_usage and ask_stream_usage(payload)
        state.usage_chunk = state.stream and self._api.asks_stream_usage and not hidden_usage
        if self._redactor is not None:
            await self._redact_request(payload, state)
        # What the gateway read goes upstream, not the client's bytes: a repeated key (two
        # "model"s, two "messages") means one thing here and must not mean another there.
        try:
            body = dumps_reply(payload)
        except (RecursionError, ValueError):
            raise BadRequest("request body is nested too deeply") from None
        tracing = self._telemetry.tracing
        task = asyncio.current_task()  # in flight since the draining step (lifecycle.enter)
        assert task is not None
        state.sent = True  # from here the upstream may have the request: a cancel may be billed
        try:
            if router is not None and legs is not None:
                response = await self._routed(request, state, body, router.attempts(legs, self._timeout), hidden_usage)
            elif tracing is None or state.span is None:
                headers = self._upstream.headers_for(request.headers, request_id=state.request_id)
                response = await self._relay(request, state, body, headers, hidden_usage)
            else:
                with tracing.client_span(
                    state.span, state.model, self._api.system, operation=self._api.operation
                ) as trace_headers:
                    headers = self._upstream.headers_for(request.headers, trace_headers, request_id=state.request_id)
                    response = await self._relay(request, state, body, headers, hidden_usage)
            if isinstance(response, web.Response) and not response.prepared:
                await self._send_if_large(request, state, response)
            return response
        except asyncio.CancelledError:
            # Our drain cut the request past the grace before any answer went out (a stream
            # already answering ends in `_pump` with its own error event): the client gets a
            # 503 it can retry elsewhere, not a connection closed without a reply.
            if not self._lifecycle.grace_expired or state.answering:
                raise
            task.uncancel()
            raise ShuttingDown(headers=_RETRY_SOON) from None

    async def _send_if_large(self, request: web.Request, state: RequestState, response: web.Response) -> None:
        """A whole reply larger than the socket's write buffer, written here rather than by
        aiohttp once the handler has returned: a client that takes none of it is cut after
        CLIENT_IDLE_SECS (`_write_while_taken`). Left to aiohttp, it held the reply's memory and
        its connection for as long as the client kept it open (10 such clients of 5 MB replies:
        100 MiB, for ever). The usual reply, smaller, is left to aiohttp."""
        transport = request.transport
        body = response.body
        if transport is None or not isinstance(body, bytes) or len(body) <= transport.get_write_buffer_limits()[1]:
            return
        state.answering = True  # from here, as a stream: the drain's cancellation ends it
        await response.prepare(request)
        try:
            await _write_while_taken(response.write_eof(), transport, len(body), self._client_idle)
            state.delivered = response.status
        except ConnectionResetError:
            state.client_gone = True

    async def _redact_request(self, payload: dict[str, Any], state: RequestState) -> None:
        """Redact every text the client sends, as the API's description lists them (SPEC §6,
        §11); JSON texts (tool-call arguments) so that a mask never breaks them."""
        assert self._redactor is not None
        texts = self._api.request_texts(payload)
        # Walked as it goes, not listed first: a body may hold hundreds of thousands of texts.
        since_yield = 0  # characters (and texts) redacted since the loop last served others
        while True:
            try:
                slot = next(texts, None)
            except RecursionError:
                raise BadRequest("request body is nested too deeply") from None
            if slot is None:
                break
            holder, key, json_text = slot
            text: str = holder[key]
            if json_text or len(text) > YIELD_ABOVE_CHARS:  # long: in slices, serving others in between
                clean = await redact_yielding(self._redactor, text, self._count_request_redaction, json_text)
            else:
                assert self._memo is not None and state.tenant is not None
                clean = self._memo.redact(state.tenant.name, text, self._count_request_redactions)
                since_yield += len(text) + 16  # finding a text costs too, however short
                if since_yield > _YIELD_EVERY_CHARS:  # many texts add up like one long one (SPEC §6)
                    since_yield = 0
                    await asyncio.sleep(0)
            if clean != text:
                holder[key] = clean

    async def _relay(
        self, request: web.Request, state: RequestState, body: bytes, headers: dict[str, str], hidden_usage: bool
    ) -> web.StreamResponse:
        """`hidden_usage`: the usage chunk was asked for by the gateway, not the client: not relayed."""
        if state.stream:
            return await self._relay_stream(request, state, body, headers, hidden_usage)
        return await self._relay_json(state, body, headers)

    async def _relay_json(self, state: RequestState, body: bytes, headers: dict[str, str]) -> web.Response:
        started = time.perf_counter()
        reply: Reply | None = None
        try:
            async with asyncio.timeout(self._timeout):
                reply = await self._upstream.post(body, headers)
                state.upstream_ttfb = time.perf_counter() - started
                data = await reply.read(self._reply_limit)  # the connection returns to the pool at EOF
        except BaseException as exc:
            if reply is not None:
                reply.close()
            raise self._upstream_exception(exc) from None
        return await self._json_answer(state, reply, data)

    async def _json_answer(self, state: RequestState, reply: Reply, data: bytes) -> web.Response:
        """A whole reply: JSON with message.content redacted, events through the relay (an
        upstream that streams whatever was asked), an error as such."""
        if reply.status >= 300:
            return await self._upstream_failure(reply, data)
        try:
            answer = loads_reply(data)
        except (ValueError, RecursionError):
            if data.lstrip().startswith(sse.EVENT_STARTS):
                return await self._events_answer(state, reply, data)
            raise UpstreamError("upstream answered with a body that is not JSON") from None
        failed: int | None = None  # the status an error object under a 2xx stands for
        reshape = False
        if isinstance(answer, dict):
            state.usage = self._api.reply_usage(answer)
            if isinstance(answer.get("model"), str):
                state.response_model = answer["model"]
            if answer.get("error") is not None:  # an error under a 200, which may echo the key (not "error": null)
                state.error_answer = True  # it charges nothing (SPEC §14)
                if not any(name in answer for name in _ANSWER_FIELDS):
                    # Nothing but the error: the client gets it as the same error with its status
                    # would reach it (SPEC §13), not a 200 an SDK takes for an answer (openai's:
                    # a completion with choices=None).
                    state.usage = None
                    failed = _error_status(answer["error"])
                    reshape = self._api.anthropic_errors != (answer.get("type") == "error")  # not this route's shape
                    if failed in (401, 403):
                        raise UpstreamAuthRejected()
                scrubbed = reply.scrub(data)
                if scrubbed is not data:  # the key masked, and the reply still redacted: it may carry an answer
                    data = scrubbed
                    try:
                        answer = loads_reply(data)  # "***" in a string: still the same JSON
                    except (ValueError, RecursionError):
                        answer = None  # redacted as text, never written from the unmasked parse
        if self._redactor is not None and not (
            # The usual reply: nothing to look at. (A long one goes to the thread unchecked:
            # the check is a scan of its own, seconds for megabytes of digits.)
            isinstance(answer, dict) and len(data) <= YIELD_ABOVE_CHARS and not reply_may_need_redaction(data)
        ):
            data = await self._redacted_reply(answer, data, self._surface.for_request(state.payload))
        if failed is not None:
            self._telemetry.metrics.cb_event("upstream_error")
            if reshape:
                data = anthropic_error(data) if self._api.anthropic_errors else chat_error(data)
            return web.Response(
                body=data, status=failed, content_type="application/json", headers=reply.retry_headers()
            )
        if state.stream and isinstance(answer, dict) and not state.error_answer:
            # A stream answered with one JSON reply (a server that does not stream): the client
            # asked for a stream (SPEC §3, §11), and gets the reply as one. Redacted in place, as
            # `data` was written: its texts are redacted once, its usage counted once.
            events = None
            if self._api.asks_stream_usage:
                events = completion_events(answer, state.usage_chunk, self._reply_limit)
            elif self._api is MESSAGES_API:
                events = message_events(answer)
            if events is not None:
                return web.Response(body=events, status=reply.status, headers=SSE_HEADERS)
        return web.Response(body=data, status=reply.status, content_type="application/json")

    async def _redacted_reply(self, answer: Any, data: bytes, surface: Surface) -> bytes:
        """The whole reply redacted and written. A long one is redacted in a worker thread, as a
        long prompt is in slices: scanning megabytes takes seconds, and the loop keeps serving
        others meanwhile (SPEC §6). The thread owns `answer` alone; its redactions are counted
        here, on the loop, once it is done."""
        if len(data) <= YIELD_ABOVE_CHARS:
            return self._redact_reply(answer, data, surface, self._count_response_redaction)
        noted: dict[str, int] = {}  # by kind: one metrics call each, not one per mask (~200k in 4 MiB of cards)

        def note(kind: str) -> None:
            noted[kind] = noted.get(kind, 0) + 1

        clean = await asyncio.to_thread(self._redact_reply, answer, data, surface, note)
        for kind, times in noted.items():
            self._count_response_redactions(kind, times)
        return clean

    def _redact_reply(self, answer: Any, data: bytes, surface: Surface, on_redaction: OnRedaction) -> bytes:
        assert self._redactor is not None
        sliced = len(data) > YIELD_ABOVE_CHARS  # in the worker thread (see _redacted_reply)
        if not isinstance(answer, dict):
            text = data.decode("utf-8", "replace")
            if sliced:
                return redact_sliced(self._redactor, text, on_redaction, json_text=True).encode()
            return self._redactor.redact(text, on_redaction, json_text=True).encode()
        # Written from what was parsed, whatever its shape: a repeated or escaped key in the
        # upstream's bytes never reaches the client (SPEC §6).
        try:
            redact_reply(self._redactor, answer, surface.reply_spec, on_redaction, sliced)
            return dumps_reply(answer)
        except (RecursionError, ValueError):
            raise UpstreamError("upstream reply is nested too deeply") from None

    async def _events_answer(self, state: RequestState, reply: Reply, data: bytes) -> web.Response:
        relay = StreamRelay(self._redactor, self._count_response_redaction, self._surface.for_request(state.payload))
        if len(data) > ASIDE_BYTES:
            body = await _aside(relay, data, self._count_response_redactions)
            body += await _aside(relay, None, self._count_response_redactions)
        else:
            body = relay.feed(data) + relay.close()
        state.error_answer = _is_error_event(body, _preamble_end(body))  # charges nothing, as its live form does
        if relay.failure is not None:  # an event the relay could not pass: its error event is ours, not an answer
            state.error_answer = False
            self._telemetry.metrics.cb_event("upstream_error")
        elif relay.cut_short:  # ended before its API's last event: incomplete, as a live stream says (_pump)
            self._telemetry.metrics.cb_event("upstream_error")
            body += relay.error_event(UpstreamStreamBroken())
        # As a live stream's (_stream_answer): message_start's counts are provisional.
        if relay.usage_final:
            state.usage = relay.usage
        elif relay.usage is not None:
            state.prompt_tokens_seen = relay.usage.prompt_tokens
        state.response_model = relay.response_model
        if self._api.asks_stream_usage and not state.stream:
            # A chat request without "stream" answered with events (a server that always
            # streams): the client asked for JSON (SPEC §3), and gets the redacted events as
            # one completion; an error after the answer began is the upstream's failure, a 502.
            long = len(body) > ASIDE_BYTES  # megabytes of events take a while to join: not on the loop
            answer = await asyncio.to_thread(completion_from_events, body) if long else completion_from_events(body)
            if answer is None:
                raise UpstreamError("upstream answered with events that hold no completion")
            status = reply.status
            if "error" in answer:  # an error before the answer: its status; after: the upstream's failure
                status = _error_status(answer["error"]) if state.error_answer else 502
                state.generated = not state.error_answer  # after: tokens were generated (as _joined_answer)
                if status in (401, 403):
                    raise UpstreamAuthRejected()
            return web.Response(body=reply.scrub(dumps_reply(answer)), status=status, content_type="application/json")
        if state.error_answer and not state.stream and self._api.anthropic_errors:
            # /v1/messages without "stream" answered with events that open with an error (a
            # server that always streams): the client asked for JSON (SPEC §11) and gets the
            # error as an error object under a 2xx reaches it: Anthropic's JSON body, with the
            # status its type stands for (overloaded_error: 529).
            status, error = _opening_error(body)
            if status in (401, 403):
                raise UpstreamAuthRejected()
            return web.Response(
                body=reply.scrub(error), status=status, content_type="application/json", headers=reply.retry_headers()
            )
        join = None if state.stream else _JOINS.get(self._api.name)
        if join is not None:
            return await self._joined_answer(state, reply, body, join)
        # The whole stream in one write: its error event may echo the key, as a live stream's last write may.
        return web.Response(body=reply.scrub(body), status=reply.status, headers=SSE_HEADERS)

    async def _joined_answer(
        self, state: RequestState, reply: Reply, body: bytes, join: Callable[[bytes], Joined]
    ) -> web.Response:
        """A request without "stream" answered with events (a server that always streams): the
        client asked for JSON (SPEC §11, §12) and gets the redacted events joined into the one
        reply they stand for (joins.py), its usage settled as the live stream's is (above). An
        error that opens the answer: its status; a failure after the answer began (an error
        event, or the events ending before their API's last): the upstream's, a 502."""
        long = len(body) > ASIDE_BYTES  # megabytes of events take a while to join: not on the loop
        joined = await asyncio.to_thread(_joined, join, body) if long else _joined(join, body)
        if isinstance(joined, bytes):
            return web.Response(body=reply.scrub(joined), status=reply.status, content_type="application/json")
        if joined is None:
            raise UpstreamError("upstream answered with events that hold no whole reply")
        status = _error_status(joined) if state.error_answer else 502
        state.generated = not state.error_answer
        if status in (401, 403):
            raise UpstreamAuthRejected()
        message = joined.get("message") if type(joined.get("message")) is str else "upstream error"
        if self._api.anthropic_errors:
            data = dumps_reply({"type": "error", "error": {"type": anthropic_error_type(status), "message": message}})
        else:
            kind = joined.get("type") if type(joined.get("type")) is str else UpstreamError.type
            shaped = {"message": message, "type": kind, "code": joined.get("code"), "param": joined.get("param")}
            data = dumps_reply({"error": shaped})
        return web.Response(
            body=reply.scrub(data), status=status, content_type="application/json", headers=reply.retry_headers()
        )

    def _upstream_exception(self, exc: BaseException) -> BaseException:
        """A deadline or upstream failure as the error to raise (counted); anything else as is."""
        if isinstance(exc, TimeoutError):
            self._telemetry.metrics.cb_event("timeout")
            return UpstreamTimeout()
        if isinstance(exc, UpstreamError):
            self._telemetry.metrics.cb_event("upstream_error")
        return exc

    async def _upstream_failure(self, reply: Reply, data: bytes) -> web.Response:
        """Relay the upstream's status and JSON error, except auth failures (our fault: 502)."""
        self._telemetry.metrics.cb_event("upstream_error")
        return await self._relayed_failure(reply, data)

    async def _relayed_failure(self, reply: Reply, data: bytes) -> web.Response:
        if reply.status in (401, 403, 407):  # 407: the egress proxy refused the gateway (HTTP_PROXY)
            raise UpstreamAuthRejected()
        if not reply.is_json:
            error = UpstreamError(f"upstream answered {reply.status}")
            # Relayed with the upstream's status, so typed by it (SPEC §11: a 429 is a
            # rate_limit_error, a 529 an overloaded_error), not by the 502 of UpstreamError.
            error.status = reply.status
            data = error.anthropic()[1] if self._api.anthropic_errors else error.body()
        elif self._redactor is not None and (len(data) > YIELD_ABOVE_CHARS or reply_may_need_redaction(data)):
            # Its strings redacted like any reply's (SPEC §6): an error may quote what the model
            # wrote (Groq's tool_use_failed carries its `failed_generation`) or the value refused.
            try:
                error_body = loads_reply(data)
            except (ValueError, RecursionError):
                error_body = None  # redacted as text
            data = await self._redacted_reply(error_body, data, self._surface)
        # The provider's back-off advice reaches the client (the SDKs wait as long as it says).
        return web.Response(
            body=data, status=reply.status, content_type="application/json", headers=reply.retry_headers()
        )

    async def _relay_stream(
        self, request: web.Request, state: RequestState, body: bytes, headers: dict[str, str], hidden_usage: bool
    ) -> web.StreamResponse:
        started = time.perf_counter()
        relay = StreamRelay(
            self._redactor,
            self._count_response_redaction,
            self._surface.for_request(state.payload),
            hide_usage=hidden_usage,
        )
        reply: Reply | None = None
        whole: bytes | None = None
        # The preamble (message_start, comments) waits for the answer's first event (see
        # _past_preamble), so an error right after it is seen as the answer however it was read.
        hold_until = asyncio.get_running_loop().time() + self._timeout / 2
        read_at: float | None = None
        try:
            async with asyncio.timeout(self._timeout):  # the first chunk, as the design card says
                reply = await self._upstream.post(body, headers)
                if reply.status >= 300 or reply.is_json:
                    # An error, or a server without streaming answering with one JSON reply.
                    whole = await reply.read(self._reply_limit)
                else:
                    first = await _first_events(reply, relay, self._count_response_redactions)
                    read_at = time.perf_counter()  # the upstream's first event, held or not
                    state.upstream_ttfb = read_at - started  # logged even if the client leaves meanwhile
                    # Two copies of the request's instructions and tools may come before the answer.
                    echoed = 2 * len(body) if self._api.preamble_echoes_request else 0
                    first, answer_at = await _past_preamble(
                        reply, relay, first, hold_until, self._count_response_redactions, _PREAMBLE_BYTES + echoed
                    )
                    state.error_answer = _is_error_event(first, answer_at)
        except BaseException as exc:
            if reply is not None:
                reply.close()
            raise self._upstream_exception(exc) from None
        state.upstream_ttfb = (time.perf_counter() if read_at is None else read_at) - started
        if whole is not None:
            try:
                return await self._json_answer(state, reply, whole)
            finally:
                reply.close()
        return await self._stream_answer(request, state, relay, reply, first)

    async def _stream_answer(
        self, request: web.Request, state: RequestState, relay: StreamRelay, reply: Reply, first: bytes
    ) -> web.StreamResponse:
        """The stream from its first events on: headers out, then events as they come."""
        held: Reply | None = reply
        try:
            response = web.StreamResponse(headers=SSE_HEADERS)
            try:
                state.answering = True
                await response.prepare(request)
                await self._pump(request, state, response, relay, first, reply)
                await response.write_eof()
                state.delivered = response.status
                if relay.failure is not None:  # an event the relay could not pass: the upstream is cut
                    state.stream_error = relay.failure.message
                    self._telemetry.metrics.cb_event("upstream_error")
                elif relay.done and not reply.at_eof:
                    # Hand the upstream over: the client may leave (and cancel us) now.
                    self._release_later(reply)
                    held = None
            except ConnectionResetError:
                # The client hung up between our writes (not always seen as a cancellation):
                # the upstream is cut below, and nobody is left to answer.
                state.client_gone = True
            return response
        finally:
            # Even when the client left (a cancellation): usage that arrived settles its tokens.
            if relay.usage_final:
                state.usage = relay.usage
            elif relay.usage is not None:
                state.prompt_tokens_seen = relay.usage.prompt_tokens
            elif isinstance(reply, AnthropicAsChat):
                # Translated, the usage chunk comes at message_stop; message_delta had the final
                # counts already, which settle a stream cut (or left) between the two, as on
                # /v1/messages. Before them, the prompt message_start reported was still used.
                if (usage := reply.final_usage) is not None:
                    state.usage = usage
                else:
                    state.prompt_tokens_seen = reply.prompt_tokens
            state.response_model = relay.response_model
            if held is not None:
                held.close()  # an unfinished upstream stream is cut: the LLM stops generating

    async def _body_for(self, leg: Leg, payload: dict[str, Any], body: bytes) -> bytes:
        """What goes to this leg (router.body_for). A long request translated for an Anthropic
        upstream is made in a worker thread: its tool-call arguments are parsed and their strings
        redacted again, and on the loop a 7.8 MiB one (460,000 argument strings) held /healthz
        3.5 s (SPEC §6: the gateway keeps serving others)."""
        if not leg.translated or len(body) <= ASIDE_BYTES:
            return body_for(leg, payload, body, self._redactor, self._count_request_redaction)
        noted: dict[str, int] = {}  # by kind: counted on the loop, one metrics call each

        def note(kind: str) -> None:
            noted[kind] = noted.get(kind, 0) + 1

        try:
            return await asyncio.to_thread(body_for, leg, payload, body, self._redactor, note)
        finally:
            for kind, times in noted.items():
                self._count_request_redactions(kind, times)

    async def _routed(
        self, request: web.Request, state: RequestState, body: bytes, attempts: Attempts, hidden_usage: bool
    ) -> web.StreamResponse:
        """SPEC §13: the route's upstreams in turn until one answers; a failure before anything
        reached the client (no answer, 429, 5xx) moves on to the next. The last failure is the
        client's; with no upstream tried (every breaker open), 503 circuit_open."""
        payload = state.payload
        assert payload is not None
        started = time.perf_counter()
        failure: AttemptFailed | None = None
        while (attempt := attempts.next()) is not None:
            try:
                send = await self._body_for(attempt.leg, payload, body)
            except (RecursionError, ValueError, BadRequest) as exc:
                attempts.abandoned(attempt)
                if failure is not None:
                    # A fallback with no form for the request (an Anthropic upstream, an audio
                    # part) is no upstream that failed: the one before it failed last, and the
                    # client gets its failure (a 503 it may retry), not a 400 blaming its request.
                    continue
                if isinstance(exc, BadRequest):
                    raise
                raise BadRequest("request body is nested too deeply") from None
            except BaseException:
                attempts.abandoned(attempt)
                raise
            try:
                with self._client_span(state, attempt.leg) as trace_headers:
                    headers = attempt.leg.client.headers_for(
                        request.headers, trace_headers, request_id=state.request_id
                    )
                    return await self._attempt(request, state, attempts, attempt, send, headers, hidden_usage, started)
            except AttemptFailed as failed:
                failure = failed
        if failure is None:
            raise UpstreamUnavailable(headers={"Retry-After": attempts.retry_after()})
        if failure.reply is None:
            raise failure.error
        state.upstream = failure.upstream
        return await self._relayed_failure(failure.reply, failure.data)

    async def _attempt(
        self,
        request: web.Request,
        state: RequestState,
        attempts: Attempts,
        attempt: Attempt,
        send: bytes,
        headers: dict[str, str],
        hidden_usage: bool,
        started: float,
    ) -> web.StreamResponse:
        """One upstream: its answer relayed, or AttemptFailed before anything was sent."""
        leg = attempt.leg
        relay = None
        if state.stream:
            relay = StreamRelay(
                self._redactor,
                self._count_response_redaction,
                self._surface.for_request(state.payload),
                hide_usage=hidden_usage,
            )
        reply: Reply | None = None
        whole = first = b""
        answer_at = 0
        read_at: float | None = None
        opened_with_error = False
        # The preamble (the translated role chunk, message_start, comments) may wait for the
        # answer's first event half this attempt's time.
        hold_until = asyncio.get_running_loop().time() + attempt.secs / 2
        try:
            async with asyncio.timeout(attempt.secs):  # this attempt's share of TIMEOUT_SECS
                reply = await leg.client.post(send, headers)
                if leg.translated:
                    assert state.payload is not None
                    # Without "stream", events (a server that streams whatever was asked) become
                    # one completion, which carries its usage as a Message's translation does.
                    with_usage = include_usage(state.payload) or not state.stream
                    answer = answer_tool(state.payload)  # a structured answer's tool: its call is content
                    reply = AnthropicAsChat(reply, with_usage, self._idle, hold_until, answer)
                if relay is None or reply.status >= 300 or reply.is_json:
                    whole = await reply.read(self._reply_limit)
                    relay = None
                    if reply.status < 300 and not _may_be_reply(whole):
                        # A proxy's HTML page, nothing: no reply, which the client would get as
                        # the gateway's 502. Nothing has gone out: as a body that broke (SPEC §13).
                        raise UpstreamError("upstream answered with a body that is not JSON")
                    if reply.status < 300 and (failure := _error_reply(whole)) is not None:
                        # An error object under a 200 (OpenRouter's way with a provider's
                        # failure) is this JSON's form of a stream that opens with an error.
                        opened_with_error = not _blames_request(failure)
                        if opened_with_error and attempts.more():
                            raise UpstreamError("upstream answered with an error object")
                    elif reply.status < 300 and _opens_with_failure(whole):
                        # Events for a request that did not ask for them (a server that always
                        # streams), opening with the upstream's failure: as a live stream's.
                        opened_with_error = True
                        if attempts.more():
                            raise UpstreamError("upstream answered with events that open with an error")
                else:
                    first = await _first_events(reply, relay, self._count_response_redactions)
                    read_at = time.perf_counter()  # the upstream's first event, held or not
                    if leg.translated:  # its preamble held by AnthropicAsChat
                        answer_at = _preamble_end(first)
                    else:
                        first, answer_at = await _past_preamble(
                            reply, relay, first, hold_until, self._count_response_redactions
                        )
                    # An error the request caused (a prompt too long, a bad tool schema) is no
                    # upstream failure (SPEC §13: a 429 or a 5xx is): the client gets it as an
                    # HTTP 400 would reach it, no fallback, and it counts nothing toward the
                    # breaker, or any client could open it for everyone with a few bad requests.
                    opened_with_error = _is_error_event(first, answer_at) and not _is_request_error_event(
                        first[answer_at:]
                    )
                    if opened_with_error and attempts.more():
                        # A stream that opens with an error (Anthropic's overloaded_error) has
                        # sent the client nothing yet: the next upstream may answer instead.
                        raise UpstreamError("upstream opened its stream with an error event")
        except (TimeoutError, UpstreamError) as exc:
            if reply is not None:
                reply.close()
            attempts.failed(attempt)
            error = self._upstream_exception(exc)
            raise AttemptFailed(error, leg.name) from None
        except BaseException:
            if reply is not None:
                reply.close()
            attempts.abandoned(attempt)
            raise
        if is_fallback_status(reply.status):
            self._telemetry.metrics.cb_event("upstream_error")
            retry_after = reply.retry_after() if reply.status in _RETRY_AFTER_STATUSES else None
            attempts.failed(attempt, retry_after)
            reply.close()
            raise AttemptFailed(UpstreamError(), leg.name, reply, whole)
        if opened_with_error:
            # Nothing left to try: the error goes to the client as it came, but it is the same
            # failure as with an upstream left (the 529 it stands for), so it counts toward
            # this upstream's breaker instead of closing it (SPEC §13).
            self._telemetry.metrics.cb_event("upstream_error")
            attempts.failed(attempt)
        else:
            attempts.answered(attempt)
        # Translated, the upstream's first bytes may have come well before its first events went out.
        first_read = reply.first_read if isinstance(reply, AnthropicAsChat) else read_at
        state.upstream_ttfb = (time.perf_counter() if first_read is None else first_read) - started
        state.upstream = leg.name
        state.error_answer = relay is not None and _is_error_event(first, answer_at)
        if relay is None:
            try:
                return await self._json_answer(state, reply, whole)
            finally:
                reply.close()
        return await self._stream_answer(request, state, relay, reply, first)

    def _client_span(self, state: RequestState, leg: Leg) -> AbstractContextManager[Mapping[str, str]]:
        tracing = self._telemetry.tracing
        if tracing is None or state.span is None:
            return _NO_TRACE
        # The model this upstream is asked for: the route's name for it, else the client's.
        return tracing.client_span(state.span, leg.model or state.model, leg.kind, upstream=leg.name)

    def _release_later(self, reply: Reply) -> None:
        task = asyncio.get_running_loop().create_task(_drain(reply))
        self._draining.add(task)  # a reference, or the task could be collected mid-way
        task.add_done_callback(self._draining.discard)

    async def _pump(
        self,
        request: web.Request,
        state: RequestState,
        response: web.StreamResponse,
        relay: StreamRelay,
        first: bytes,
        reply: Reply,
    ) -> None:
        """The stream relayed to its end. One that ends with the gateway's error event notes its
        message in `state.stream_error`: the status logged is the 200 the client got."""
        try:
            out = first
            loop = asyncio.get_running_loop()
            # One timeout for the whole stream: the upstream may be silent STREAM_IDLE_SECS
            # between two reads, however slowly the client takes them. Moving a timer costs
            # more than relaying a small event, so the deadline is set `slack` later than it
            # must be and moved again only once that much time has passed: it never fires
            # early, and at most `slack` late. A write that may wait for the client (its
            # socket's buffer is not empty) stops the clock; one that cannot leaves it be. One
            # that will wait (past the high-water mark) waits as long as the client takes bytes,
            # CLIENT_IDLE_SECS at a time (`_write_while_taken`).
            transport = request.transport
            # What one write may add to an empty buffer without pausing the protocol (its high-
            # water mark, less room for the chunk's framing that aiohttp adds).
            fits = transport.get_write_buffer_limits()[1] - 64 if transport is not None else -1
            slack = self._idle_slack
            armed: float | None = None  # when the deadline was last moved; None: stopped
            deadline = 0.0
            progressed = False  # the last read completed an event
            counted = self._count_response_redactions
            async with asyncio.timeout(None) as idle:
                while not relay.done:
                    if out:
                        buffered = transport.get_write_buffer_size() if transport is not None else fits
                        if buffered or len(out) > fits:
                            idle.reschedule(None)
                            armed = None
                        if buffered + len(out) > fits:  # past the high-water mark: the write waits
                            await _write_while_taken(response.write(out), transport, len(out), self._client_idle)
                        else:
                            await response.write(out)
                    now = loop.time()
                    # Events move the deadline, bytes do not: an upstream trickling bytes into an
                    # event it never ends is as silent as one sending nothing.
                    if armed is None or (progressed and now - armed > slack):
                        deadline = now + self._idle + slack
                        idle.reschedule(deadline)
                        armed = now
                    progressed = False
                    chunk = await reply.next_chunk()
                    if not chunk:  # upstream ended without [DONE]
                        long = len(relay.parser.pending) > ASIDE_BYTES
                        out = await _aside(relay, None, counted) if long else relay.close()
                        if relay.cut_short:  # ended cleanly, but before its last event: as if it broke
                            if out:
                                await response.write(out)
                            raise UpstreamStreamBroken()
                        break
                    held = len(chunk) + len(relay.parser.pending)  # less after the read: an event completed
                    if held <= ASIDE_BYTES:  # the usual read: small events
                        out = relay.feed(chunk)
                        progressed = len(relay.parser.pending) < held
                    else:  # the clock stops: the time is ours, not the upstream's silence
                        idle.reschedule(None)
                        out = await _aside(relay, chunk, counted)
                        progressed = len(relay.parser.pending) < held
                        if progressed:
                            armed = None
                        else:
                            idle.reschedule(deadline)
                idle.reschedule(None)
            # The last events and the end of the body in one write (with the headers too when
            # the whole reply came in the first read): one send instead of two. An in-stream
            # error ends the stream, so it is in these bytes: scanned once a stream for the
            # operator's key (an error that echoes the request's headers).
            await response.write_eof(reply.scrub(out))
        except TimeoutError:
            self._telemetry.metrics.cb_event("timeout")
            await self._end_with(response, state, relay, UpstreamIdleTimeout())
        except UpstreamError as exc:  # the upstream broke mid-stream
            self._telemetry.metrics.cb_event("upstream_error")
            await self._end_with(response, state, relay, exc)
        except OSError:
            raise  # the client's connection failed under our write: nobody to tell
        except asyncio.CancelledError:
            if not self._lifecycle.grace_expired:
                raise  # the client hung up: nobody to tell
            # Our own drain cut the stream: end it properly, with the reason as the last event.
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            await self._end_with(response, state, relay, ShuttingDown())
        except Exception:
            # Headers are out: whatever failed, the client gets an error event, never a second
            # HTTP response inside the body (SPEC §9).
            log.exception("stream relay failed (request %s)", state.request_id)
            state.stream_error = GatewayError.message
            await _try_write(response, relay.error_event(GatewayError()))

    @staticmethod
    async def _end_with(
        response: web.StreamResponse, state: RequestState, relay: StreamRelay, error: GatewayError
    ) -> None:
        """The stream ended by the gateway's error event (held text flushed before it)."""
        state.stream_error = error.message
        await _try_write(response, _finished(relay) + relay.error_event(error))


class AttemptFailed(Exception):
    """One upstream failed before anything reached the client: the next may be tried. `reply`
    and `data`: the answer it gave (429, 5xx), relayed if it is the last."""

    def __init__(self, error: BaseException, upstream: str, reply: Reply | None = None, data: bytes = b"") -> None:
        super().__init__(type(error).__name__)
        self.error = error
        self.upstream = upstream
        self.reply = reply
        self.data = data


# The APIs whose requests without "stream", answered with events, get the events joined into
# their JSON reply (chat's own join, with its choices, is in _events_answer).
_JOINS: Mapping[str, Callable[[bytes], Joined]] = MappingProxyType(
    {"messages": message_from_events, "responses": response_from_events}
)


def _joined(join: Callable[[bytes], Joined], body: bytes) -> bytes | dict[str, Any] | None:
    """The events joined: the reply written, else the error object they ended with (None:
    none). One call, so that a long one is joined and written in a worker thread alike."""
    joined = join(body)
    if joined.reply is None:
        return joined.error
    try:
        return dumps_reply(joined.reply)
    except RecursionError:  # a tool input nested past what JSON writers go to (the parser takes it)
        raise UpstreamError("upstream reply is nested too deeply") from None


def _finished(relay: StreamRelay) -> bytes:
    """The text still held, if the relay can give it; never raises (an error path). A relay a
    worker thread still has (the task was cancelled while it waited) gives nothing: what it
    holds stays unsent."""
    if relay.busy:
        return b""
    try:
        return relay.finish()
    except Exception:
        log.exception("flushing held text failed")
        return b""


def _may_be_reply(data: bytes) -> bool:
    """Whether a 2xx body may be a reply `_json_answer` can relay: JSON or events. Decided on
    its first byte on the usual path (a JSON object); a body that does not open like one is
    parsed to be sure (a JSON string or number is relayed as it came)."""
    head = data[:64].lstrip()
    if head[:1] in (b"{", b"[") or head.startswith(sse.EVENT_STARTS):
        return True
    try:
        loads_reply(data)
    except (ValueError, RecursionError):
        return False
    return True


# Events that open a stream before its answer and before a failure alike: /v1/messages'
# message_start and pings; the Responses API's response.created, .queued and .in_progress.
_PREAMBLE_NAMES = (b"message_start", b"ping", b"response.created", b"response.queued", b"response.in_progress")
# As the upstream spelled them (/v1/messages relays its events as they came): SSE allows the
# space after the colon or not.
_PREAMBLE_EVENTS = tuple(b"event:" + space + name + b"\n" for name in _PREAMBLE_NAMES for space in (b" ", b""))
_ERROR_NAMES = (b"error", b"response.failed")
_ERROR_EVENTS = tuple(b"event:" + space + name + b"\n" for name in _ERROR_NAMES for space in (b" ", b""))
# A preamble is a few hundred bytes (message_start, a ping, a router's comment or two): past
# this, what is held goes out, so an upstream that sends pings or comments without end is not
# held in memory for half TIMEOUT_SECS, each read rescanning all of it.
_PREAMBLE_BYTES = 64 * 1024


def _preamble_end(first: bytes) -> int:
    """Where the preamble ends in `first`: the answer's first event, or an event not yet
    ended, begins there. The preamble comes before an answer and before a failure alike
    (/v1/messages' message_start and pings, the SSE comments an OpenAI-compatible router sends
    while it waits for its provider, /v1/responses' response.created and .in_progress). Looked
    at in place: a copy of what follows it cost a stream ~13k instructions."""
    at = 0
    while True:
        end = first.find(b"\n\n", at)
        if end < 0 or not _is_preamble(first, at, end):
            return at
        at = end + 2


def _is_preamble(first: bytes, at: int, end: int) -> bool:
    """Whether the event `first[at:end]` is one of the preamble's."""
    if first.startswith(_PREAMBLE_EVENTS, at) or _event_name(first, at, end) in _PREAMBLE_NAMES:
        return True
    return first.startswith(b":", at) and all(line.startswith(b":") for line in first[at:end].split(b"\n"))


async def _past_preamble(
    reply: Reply,
    relay: StreamRelay,
    first: bytes,
    hold_until: float,
    counted: Counted,
    limit: int = _PREAMBLE_BYTES,
) -> tuple[bytes, int]:
    """The preamble (see _preamble_end) is held until the answer's first event, so that a failure
    right after it (Anthropic's overloaded_error after message_start, a provider's error after a
    router's comments) may still fall back (SPEC §13), as a translated chat stream's role chunk
    is; but only until `hold_until` (loop time), so a model slow to begin gets it out within the
    first-byte deadline, and only while it is no longer than a preamble is (`limit`).
    The end of the body is left for the relay to find (it reads b"" again). Returns what was
    read and where the answer begins in it."""
    loop = asyncio.get_running_loop()
    # Each read's events looked at once and joined once at the end (the relay gives whole
    # events): looked at again from the start after every read, comments trickled a byte a
    # read took 20 s of the loop's time for the first 13 KB.
    parts, size = [first], len(first)
    at = _preamble_end(first)
    preamble = bool(first) and at == size
    while preamble and not relay.done and size <= limit:
        left = hold_until - loop.time()
        if left <= 0:
            break
        try:
            async with asyncio.timeout(left):
                chunk = await reply.next_chunk()
        except TimeoutError:
            break
        if not chunk:
            if not relay.parser.pending:
                # Ended with the preamble and nothing after it: no answer came, and nothing has
                # gone out (as a body with no event at all, see _first_events): the next
                # upstream, or the gateway's 502, not a 200 of keep-alive comments alone.
                raise UpstreamStreamBroken("upstream closed the stream before any answer")
            break
        long = len(chunk) + len(relay.parser.pending) > ASIDE_BYTES  # see _pump
        out = await _aside(relay, chunk, counted) if long else relay.feed(chunk)
        if out:
            parts.append(out)
            end = _preamble_end(out)
            at, size = size + end, size + len(out)
            preamble = end == len(out)
    return (b"".join(parts) if len(parts) > 1 else first), at


_ERROR_DATA = b'data: {"error"'
# The answer's first event is parsed (to find its "error" at whatever place the upstream put
# it) up to this size: an error is a few hundred bytes. A longer first event (an answer that
# opens with megabytes of text) is not parsed on the loop a second time: only an "error" that
# opens it counts.
_ERROR_EVENT_BYTES = 64 * 1024


def _is_error_event(first: bytes, at: int = 0) -> bool:
    """Whether the first events read are, from `at` (the answer's first: see _preamble_end),
    an error: Anthropic's and the Responses API's `event: error`, the Responses API's
    `response.failed`, or an unnamed event whose JSON object has a non-null `"error"`, whatever
    its place among the keys (OpenAI's `data: {"error": ...}`, a translated Anthropic error,
    `{"object": "error", "error": ...}`, Anthropic's error object without its `event:` line) —
    not `"error": null`, which some servers write on every chunk of an answer."""
    if first.startswith(_ERROR_EVENTS, at):
        return True
    # SSE's fields in any order (an `id:` line first, `data:` before `event:`), as a client's
    # decoder reads them: /v1/messages relays its events as the upstream spelled them.
    end = first.find(b"\n\n", at)
    if end < 0:
        end = len(first)
    if not first.startswith((b"id:", b"retry:", b"data:", b":"), at):
        return False
    name = _event_name(first, at, end)
    if name is not None:
        return name in _ERROR_NAMES
    if end - at <= _ERROR_EVENT_BYTES:
        # Most first events hold neither "error" nor an escape: no SSE parse for them.
        if first.find(b"error", at, end) < 0 and first.find(b"\\u", at, end) < 0:
            return False
        return _error_body(first[at:end]) is not None
    line = first.find(b"data:", at, end)  # a long one: its first data line opens with "error"
    if line < 0 or (line > at and first[line - 1] != 10) or not first.startswith(_ERROR_DATA, line):
        return False
    value = first[line + len(_ERROR_DATA) : line + len(_ERROR_DATA) + 16].lstrip(b" \t").removeprefix(b":")
    return not value.lstrip(b" \t").startswith(b"null")


def _error_body(event: bytes) -> dict[str, Any] | None:
    """The event's JSON object if it has a non-null `"error"` (a key JSON may spell with
    escapes: the caller parses it whenever one could be there)."""
    return _with_error(_first_event_json(event))


def _first_event_json(body: bytes, at: int = 0) -> Any:
    """The JSON of the first event from `at` (None: no data, or data that is not JSON)."""
    end = body.find(b"\n\n", at)
    events = sse.parse_blocks(body[at:end] if end >= 0 else body[at:])
    data = events[0].data if events else None
    if data is None:
        return None
    try:
        return loads_reply(data)
    except (ValueError, RecursionError):
        return None


def _with_error(body: Any) -> dict[str, Any] | None:
    """`body` if it is an object with a non-null `"error"` (an error instead of an answer)."""
    return body if type(body) is dict and body.get("error") is not None else None


def _event_name(first: bytes, at: int, end: int) -> bytes | None:
    """The name of the event `first[at:end]` (its last `event:` line's, as decoders read it)."""
    return sse.event_name(first[at : end + 1])


# The status an error object under a 2xx stands for (SPEC §13: Anthropic's errors with the
# matching status; OpenAI's types and codes alike): its `code` when that is a 4xx or 5xx,
# else its type's (or a code's that names one), else 502, the upstream failing.
_ERROR_STATUSES = {
    "invalid_request_error": 400,
    "BadRequestError": 400,  # vLLM's
    "context_length_exceeded": 400,
    "authentication_error": 401,
    "invalid_api_key": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "NotFoundError": 404,
    "model_not_found": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "rate_limit_exceeded": 429,
    "insufficient_quota": 429,
    "api_error": 500,
    "server_error": 500,
    "timeout_error": 504,
    "overloaded_error": 529,
}


# A reply's answer, beside which an "error" is no failure of the whole (a Responses reply that
# failed part-way): chat's choices, the Responses API's output, a Message's content, a list's data.
_ANSWER_FIELDS = ("choices", "output", "content", "data")


def _error_status(error: object) -> int:
    if type(error) is not dict:
        return 502
    code = error.get("code")
    if type(code) is str and code.isascii() and code.isdigit() and len(code) == 3:
        code = int(code)
    if type(code) is int and 400 <= code <= 599:  # a status: it decides
        return code
    for name in (error.get("type"), code):
        if type(name) is str and name in _ERROR_STATUSES:  # (an object there is unhashable)
            return _ERROR_STATUSES[name]
    return 502


def _opening_error(body: bytes) -> tuple[int, bytes]:
    """The status and Anthropic-shaped JSON of the error event that opens `body` past its
    preamble (the relay's whole output: see _is_error_event); an event with no error object in
    it is the upstream failing, the gateway's 502."""
    answer = _with_error(_first_event_json(body, _preamble_end(body)))
    if answer is None:
        raise UpstreamError("upstream answered with an error event that holds no error")
    written = dumps_reply(answer)
    return _error_status(answer["error"]), written if answer.get("type") == "error" else anthropic_error(written)


def _is_request_error_event(first: bytes) -> bool:
    """Whether the error event that opens `first` blames the request: its `error`'s type says
    so, or its `code` is a 4xx status other than 429 (vLLM's `"code": 400`). Anything else (an
    overload, a server error, a shape not known) is the upstream failing. Run only on a stream
    that opens with an error: no cost on the usual path."""
    body = _first_event_json(first)
    return type(body) is dict and _blames_request(body)


# Blank lines before the first field: still taken for events (_json_answer strips them), so
# looked at as such. Matched in place: a JSON reply so spaced is not copied.
_BLANK_THEN_EVENTS = re.compile(rb"\s++(?:" + b"|".join(map(re.escape, sse.EVENT_STARTS)) + rb")")


def _opens_with_failure(whole: bytes) -> bool:
    """Whether a whole body of events opens, past its preamble, with an error event that is
    the upstream's failure (not the request's: see _is_request_error_event). Looked at only
    when the body opens like events: a JSON reply costs one check of its first byte."""
    if not whole.startswith(sse.EVENT_STARTS) and _BLANK_THEN_EVENTS.match(whole) is None:
        return False
    # In the spelling the relay writes (a live stream's first events are looked at so): the
    # upstream's may differ (`data:{`, `event:error`, CRLF). The preamble's bytes are enough.
    parser = sse.SSEParser()
    head = b"".join(_written(event) for event in parser.feed(whole[:_PREAMBLE_BYTES]))
    at = _preamble_end(head)
    return _is_error_event(head, at) and not _is_request_error_event(head[at:])


def _written(event: sse.Event) -> bytes:
    """An event as `event: <name>` and `data: ` lines; a comment-only one as a comment."""
    if event.data is None:
        return b":\n\n"
    name = sse.event_name(event.raw)
    return (b"event: " + name + b"\n" if name is not None else b"") + sse.encode(event.data)


def _error_reply(whole: bytes) -> dict[str, Any] | None:
    """The 2xx JSON reply, if it is an error object instead of an answer (`"error"` not null).
    Parsed only when the key is in it: one scan of the usual reply."""
    if b'"error"' not in whole:
        return None
    try:
        return _with_error(loads_reply(whole))
    except (ValueError, RecursionError):
        return None


def _blames_request(body: dict[str, Any]) -> bool:
    """Whether an error reply or event blames the request (see _is_request_error_event)."""
    status = _error_status(body.get("error"))
    return 400 <= status < 500 and status != 429  # whose HTTP form is no fallback status either


async def _first_events(reply: Reply, relay: StreamRelay, counted: Counted) -> bytes:
    """Read until the first whole event: what to send first (the deadline covers this). A 2xx
    body that does not open like an event stream (a proxy's HTML page) is no answer: the
    relay would pass its lines on as unknown SSE fields (on chat, a 200 stream with nothing in
    it for the SDKs), so it is the upstream failing, as the same body is for a JSON request:
    the next upstream, or the gateway's 502."""
    head: bytes | None = b""  # the body's first bytes, until they tell
    while True:
        chunk = await reply.next_chunk()
        if head is not None and chunk:
            head, opens = _opening(head + chunk)
            if opens is False:
                raise UpstreamError("upstream answered the stream with a body that is not an event stream")
            if opens:
                head = None
        long = len(chunk) + len(relay.parser.pending) > ASIDE_BYTES  # see _pump
        if not chunk:
            out = await _aside(relay, None, counted) if long else relay.close()
            if not out:
                raise UpstreamStreamBroken("upstream closed the stream before any event")
            return out
        out = await _aside(relay, chunk, counted) if long else relay.feed(chunk)
        if out:
            return out


def _opening(head: bytes) -> tuple[bytes, bool | None]:
    """Whether a stream's first bytes open an event stream (a field line, a comment, blank lines
    first): None while too few to tell, with what is left to look at (a BOM, blank lines and
    a field name cut short are all a read may hold)."""
    if len(head) < len(sse.BOM) and sse.BOM.startswith(head):
        return head, None
    head = head.removeprefix(sse.BOM).lstrip(b"\r\n")
    if head.startswith(sse.EVENT_STARTS):
        return head, True
    if not head or any(start.startswith(head) for start in sse.EVENT_STARTS):
        return head, None
    return head, False


Counted = Callable[[str, int], None]  # redactions of a kind, and how many


async def _aside(relay: StreamRelay, chunk: bytes | None, counted: Counted) -> bytes:
    """`relay.feed(chunk)` (`relay.close()` for None) in a worker thread: a read that completes
    a long event (megabytes of text take seconds to scan) while the loop keeps serving others
    (SPEC §6). The relay is this task's alone, and the task waits. Cancelled meanwhile (the
    client left, a deadline), it goes on at once and the thread finishes on its own: `busy`
    keeps the loop off the relay until then, and its redactions are counted when it is done."""
    noted: dict[str, int] = {}
    relay.busy = True
    work = asyncio.ensure_future(asyncio.to_thread(relay.aside, chunk, noted))

    def count(_: object) -> None:  # on the loop, once the thread is done, whoever still waits
        for kind, times in noted.items():
            counted(kind, times)

    work.add_done_callback(count)
    # Shielded: a cancelled wait leaves the thread's result to the shield, which retrieves it
    # (an exception nobody retrieved would be logged as an error).
    return await asyncio.shield(work)


async def _drain(reply: Reply) -> None:
    """Read what follows [DONE] (the chunked terminator) so the upstream connection goes back
    to the pool instead of being closed: no new TCP and TLS handshake for the next request."""
    try:
        with contextlib.suppress(TimeoutError, UpstreamError):
            async with asyncio.timeout(1):
                while await reply.next_chunk():
                    pass
    finally:
        reply.close()  # a no-op once the end of the body has released the connection


async def _write_while_taken(
    writing: Coroutine[Any, Any, None], transport: asyncio.Transport | None, size: int, patience: float
) -> None:
    """A write (of `size` bytes) that waits for the client to take what is buffered. A client
    that takes no byte for `patience` seconds (STREAM_IDLE_SECS, or CLIENT_IDLE_SECS if longer)
    is cut, as one that hung up
    (ConnectionResetError): else a client that never reads holds its stream, its upstream and
    its MAX_CONCURRENCY slot for as long as it keeps the connection open. Slow but steady
    readers are waited for if their kernel opens its receive window again within `patience`:
    it does so in steps (~100 KiB for an SDK's connection), not at each event the client reads,
    so a reader slower than a step per `patience` is cut too (README, Slow readers)."""
    left = _untaken(transport)
    if left is not None:
        left += size  # what the write adds (and its chunk framing: a few bytes more)
    write = asyncio.ensure_future(writing)
    try:
        while True:
            done, _ = await asyncio.wait((write,), timeout=patience)
            if done:
                write.result()  # raises what the write raised
                return
            now_left = _untaken(transport)
            if left is not None and now_left is not None and now_left >= left:  # not a byte taken
                if transport is not None:
                    transport.abort()
                raise ConnectionResetError(f"the client took no bytes of the stream for {patience:g} s")
            left = now_left
    finally:
        if not write.done():
            write.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await write
        elif not write.cancelled():
            # The client left: aiohttp failed the write and cancelled us in one turn of the
            # loop, so the wait above never looked at it. Retrieved, or asyncio logs "Task
            # exception was never retrieved" at ERROR for a client that merely hung up.
            write.exception()


def _untaken(transport: asyncio.Transport | None) -> int | None:
    """Bytes written to the client that it has not taken yet: the transport's buffer and the
    kernel's send queue (Linux's SIOCOUTQ, = TIOCOUTQ). The buffer alone does not move for a
    slow reader: the kernel takes more from it only once a third of its own (megabytes) is
    free. None where the queue cannot be read: then no client is cut."""
    sock = transport.get_extra_info("socket") if transport is not None else None
    if transport is None or sock is None or not hasattr(termios, "TIOCOUTQ"):
        return None
    try:
        queued = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
    except OSError:
        return None
    return int(queued) + transport.get_write_buffer_size()


async def _try_write(response: web.StreamResponse, data: bytes) -> None:
    with contextlib.suppress(OSError, TimeoutError):
        async with asyncio.timeout(1):
            await response.write(data)
