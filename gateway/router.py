"""ROUTES_FILE at run time (SPEC §13): a request's upstreams in order, each attempt's share of
the deadline and its breaker's permit, and the adapter that reads an Anthropic answer as chat.

`router_for(request)` is the one place the request path finds the routes (None without
ROUTES_FILE): the router of the configuration snapshot the request runs under (reload.py), so
a SIGHUP swaps what later requests get. A `Router` holds one client per named upstream and
shares the process's breakers, which outlive it; a router a reload replaced is closed once
the last request that runs under it has ended.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import translate
from .breaker import Breaker, Breakers, Permit
from .config import endpoint
from .egress import Egress
from .errors import ModelNotFound, UpstreamStreamBroken
from .keys import CONFIG, LIVE_CONFIG
from .models import Usage
from .openai_apis import EMBEDDINGS_API, RESPONSES_API
from .redact import OnRedaction, Redactor
from .relay import ASIDE_BYTES, dumps_reply
from .routing import Kind, RouteTable, UpstreamConfig
from .surfaces import CHAT_API, MESSAGES_API, Api, strings_in
from .upstream import MAX_REPLY_BYTES, Reply, Upstream

if TYPE_CHECKING:
    from aiohttp import web

ROUTED_APIS = frozenset({CHAT_API.name, MESSAGES_API.name, RESPONSES_API.name, EMBEDDINGS_API.name})  # SPEC §13
# The OpenAI routes that only an OpenAI-compatible upstream serves: not translated for Anthropic's.
_OPENAI_ONLY: tuple[Api, ...] = (RESPONSES_API, EMBEDDINGS_API)
MIN_ATTEMPT_SECS = 1.0  # SPEC §13: an attempt's share of TIMEOUT_SECS is never less
# Anthropic events with no chat form (thinking, pings) still show the upstream alive: past this
# long without a chat event (or half STREAM_IDLE_SECS, when that is shorter), one SSE comment
# goes out, so STREAM_IDLE_SECS never cuts a model that is thinking (SSE clients, the openai
# SDK among them, skip comments).
KEEP_ALIVE_SECS = 15.0
_KEEP_ALIVE = b": keep-alive\n\n"


def router_for(request: web.Request) -> Router | None:
    """The routes this request runs under; None: no ROUTES_FILE, the single upstreams serve."""
    config = request.get(CONFIG)  # set by the tenancy step on admitted routes
    if config is None:
        config = request.app[LIVE_CONFIG].current
    return config.router


def is_fallback_status(status: int) -> bool:
    """An answer that sends the request on to the next upstream: 429 or any 5xx (529 too)."""
    return status == 429 or status >= 500


@dataclass(frozen=True, slots=True)
class Leg:
    """One upstream of a route, as a request is sent to it."""

    name: str
    kind: Kind
    model: str | None  # sent instead of the client's
    client: Upstream
    translated: bool  # a chat request to an Anthropic upstream


class Router:
    __slots__ = (
        "_active",
        "_closed",
        "_closing",
        "_connect_timeout",
        "_egress",
        "_legs",
        "_organization",
        "_path_clients",
        "_project",
        "_retired",
        "breakers",
        "clients",
        "table",
    )

    def __init__(
        self,
        table: RouteTable,
        breakers: Breakers,
        connect_timeout: float,
        *,
        organization: str | None = None,
        project: str | None = None,
        egress: Egress | None = None,
    ) -> None:
        self.table = table
        self._egress = egress
        self.breakers = breakers
        self._active = 0  # requests running under this router
        self._retired = False  # a reload replaced it: closed when the last of them ends
        self._closing: asyncio.Task[None] | None = None
        self._closed = False
        self._connect_timeout = connect_timeout
        self._organization, self._project = organization, project
        # Each upstream's breaker (and its circuit_state series, at 0) from the load of the file
        # that names it, start-up or SIGHUP: an upstream a reload adds is watched before its
        # first request, as the ones of start-up are.
        for name in table.upstreams:
            breakers[name]

        # The operator's OpenAI organization and project go with the OpenAI key: to the
        # upstreams that are sent OPENAI_API_KEY. Each client posts to one path: an
        # OpenAI-compatible upstream has one for chat and one for each other OpenAI route.
        def client(upstream: UpstreamConfig, url: str) -> Upstream:
            openai_key = upstream.api_key_env == "OPENAI_API_KEY"
            return Upstream(
                url,
                upstream.api_key,
                connect_timeout,
                anthropic=upstream.kind == "anthropic",
                organization=organization if openai_key else None,
                project=project if openai_key else None,
                egress=egress,
            )

        self.clients = {name: client(upstream, upstream.url) for name, upstream in table.upstreams.items()}
        self._path_clients = {
            (name, api.name): client(upstream, endpoint(upstream.base_url, api.path))
            for name, upstream in table.upstreams.items()
            if upstream.kind == "openai"
            for api in _OPENAI_ONLY
        }
        # Per route, what each API sends where: /v1/messages only to Anthropic upstreams,
        # /v1/responses and /v1/embeddings only to OpenAI-compatible ones.
        self._legs: dict[tuple[str, int], tuple[Leg, ...]] = {}
        for route in table.routes:
            for api in (CHAT_API, MESSAGES_API):
                legs = tuple(
                    Leg(
                        t.upstream.name,
                        t.upstream.kind,
                        t.model,
                        self.clients[t.upstream.name],
                        api is CHAT_API and t.upstream.kind == "anthropic",
                    )
                    for t in route.targets
                    if api is CHAT_API or t.upstream.kind == "anthropic"
                )
                self._legs[(api.name, id(route))] = legs
            for api in _OPENAI_ONLY:
                self._legs[(api.name, id(route))] = tuple(
                    Leg(
                        t.upstream.name,
                        t.upstream.kind,
                        t.model,
                        self._path_clients[(t.upstream.name, api.name)],
                        False,
                    )
                    for t in route.targets
                    if t.upstream.kind == "openai"
                )

    def reloaded(self, table: RouteTable) -> Router:
        """A router for a new ROUTES_FILE (SIGHUP): the same breakers, so an upstream that keeps
        its name keeps its state. Its clients are opened (`open`) before it serves; this one is
        closed once the requests that run under it have ended."""
        return Router(
            table,
            self.breakers,
            self._connect_timeout,
            organization=self._organization,
            project=self._project,
            egress=self._egress,
        )

    async def open(self) -> None:
        for client in (*self.clients.values(), *self._path_clients.values()):
            await client.open()

    def enter(self) -> None:
        self._active += 1

    def leave(self) -> None:
        self._active -= 1
        if self._retired and not self._active:
            self._close_soon()

    def take_over(self) -> None:
        """A reload put this router in force: the breakers of upstreams it does not name go."""
        self.breakers.keep(self.table.upstreams)

    def retire(self) -> None:
        """A reload replaced this router: its clients close once no request uses them."""
        self._retired = True
        if not self._active:
            self._close_soon()

    def _close_soon(self) -> None:
        if self._closing is None:
            self._closing = asyncio.get_running_loop().create_task(self.close())

    async def close(self) -> None:
        self._closed = True
        for client in (*self.clients.values(), *self._path_clients.values()):
            await client.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def first_upstream(self, route_name: str, model: str) -> str | None:
        """The name of the upstream a request of this route for `model` is sent to first; None
        when no route takes the model or the route is not one ROUTES_FILE routes."""
        route = self.table.lookup(model)
        legs = self._legs.get((route_name, id(route))) if route is not None else None
        return legs[0].name if legs else None

    def legs(self, api: Api, model: str) -> tuple[Leg, ...]:
        """The model's upstreams in order, for this API; 404 model_not_found when none."""
        route = self.table.lookup(model)
        if route is None:
            raise ModelNotFound(model)
        legs = self._legs[(api.name, id(route))]
        if not legs:
            served = "OpenAI-compatible upstreams" if api is MESSAGES_API else "Anthropic upstreams"
            raise ModelNotFound(model, f"is routed only to {served}, which do not serve {api.path}")
        return legs

    def attempts(self, legs: tuple[Leg, ...], total_secs: float) -> Attempts:
        return Attempts(legs, self.breakers, total_secs)


def body_for(
    leg: Leg,
    payload: dict[str, Any],
    body: bytes,
    redactor: Redactor | None = None,
    on_redaction: OnRedaction | None = None,
) -> bytes:
    """What goes to this leg: the request as is, under its model name, or as a Messages request.
    Translated, tool-call arguments (JSON text, redacted as such) are parsed into `tool_use`
    input: their strings are redacted again as the strings they now are (an escape such as
    \\u0040 in the text is an "@" in them)."""
    if leg.translated:
        request = translate.chat_request(payload, leg.model or payload["model"])
        if redactor is not None:
            for message in request.get("messages") or ():
                for block in message.get("content") if type(message.get("content")) is list else ():
                    if type(block) is dict and block.get("type") == "tool_use":
                        for holder, key, _ in strings_in(block, "input"):
                            holder[key] = redactor.redact(holder[key], on_redaction)
        return dumps_reply(request)  # nested past orjson's depth: the stdlib's, or RecursionError (a 400)
    if leg.model is None or leg.model == payload["model"]:
        return body
    return dumps_reply({**payload, "model": leg.model})


@dataclass(frozen=True, slots=True)
class Attempt:
    leg: Leg
    permit: Permit
    breaker: Breaker
    secs: float  # its share of the deadline


class Attempts:
    """A request's way through its upstreams: skips those whose breaker refuses, gives each the
    time left divided by the attempts left (at least MIN_ATTEMPT_SECS), and reports outcomes."""

    __slots__ = ("_at", "_breakers", "_deadline", "_legs", "_skipped", "tried")

    def __init__(self, legs: tuple[Leg, ...], breakers: Breakers, total_secs: float) -> None:
        self._legs = legs
        self._breakers = breakers
        self._deadline = breakers.now() + total_secs
        self._at = 0
        self._skipped: list[Breaker] = []
        self.tried = 0

    def next(self) -> Attempt | None:
        breakers, legs = self._breakers, self._legs
        now = breakers.now()
        while self._at < len(legs):
            leg = legs[self._at]
            self._at += 1
            breaker = breakers[leg.name]
            if not breaker.available(now):
                self._skipped.append(breaker)
                continue
            left = 1 + sum(1 for later in legs[self._at :] if breakers[later.name].available(now))
            secs = max(MIN_ATTEMPT_SECS, (self._deadline - now) / left)
            permit = breaker.acquire(now, secs)
            if permit is None:  # the same upstream twice in a list, its one trial just taken
                self._skipped.append(breaker)
                continue
            self.tried += 1
            return Attempt(leg, permit, breaker, secs)
        return None

    def more(self) -> bool:
        """Whether an upstream is left to try after this one (its breaker lets it)."""
        breakers, now = self._breakers, self._breakers.now()
        return any(breakers[leg.name].available(now) for leg in self._legs[self._at :])

    def answered(self, attempt: Attempt) -> None:
        attempt.breaker.success(attempt.permit)

    def failed(self, attempt: Attempt, retry_after: float | None = None) -> None:
        """A failure before the first byte; with `retry_after` (429, 503, 529 that said when to
        come back) the upstream is skipped that long instead, no failure counted."""
        if retry_after is not None:
            attempt.breaker.skip(attempt.permit, self._breakers.now(), retry_after)
        else:
            attempt.breaker.failure(attempt.permit, self._breakers.now())

    def abandoned(self, attempt: Attempt) -> None:
        """The request ended before its outcome was known (the client left)."""
        attempt.breaker.release(attempt.permit)

    def retry_after(self) -> str:
        """Whole seconds until a skipped upstream may be tried again (for the 503)."""
        now = self._breakers.now()
        soonest = min((b.ready_at(now) for b in self._skipped), default=now + 1)
        return str(max(1, math.ceil(soonest - now)))


class AnthropicAsChat:
    """An Anthropic answer read as a chat completion's (`Reply`): errors OpenAI-shaped, a
    Message as a completion, events as chunks, a call of the `answer` tool (translate's
    answer_tool: a structured answer) as content. The proxy relays it as it would an OpenAI
    upstream's, redaction included."""

    __slots__ = (
        "_answer",
        "_created",
        "_hold_until",
        "_include_usage",
        "_keep_alive",
        "_last_out",
        "_reply",
        "_stream",
        "first_read",
    )

    def __init__(
        self,
        reply: Reply,
        include_usage: bool,
        idle_secs: float | None = None,
        hold_until: float | None = None,
        answer: str | None = None,
    ) -> None:
        self._reply = reply
        self._include_usage = include_usage
        self._answer = answer
        self._created = int(time.time())
        self._stream = translate.ChatStream(include_usage, self._created, answer)
        self._last_out = time.monotonic()
        # Within the relay's STREAM_IDLE_SECS (`idle_secs`), or a thinking model under a limit
        # shorter than KEEP_ALIVE_SECS would be cut as silent while its events flow.
        self._keep_alive = KEEP_ALIVE_SECS if idle_secs is None else min(KEEP_ALIVE_SECS, idle_secs / 2)
        # The role chunk waits for the answer's first event (an error first can still fall
        # back), but only until then (loop time): message_start is the upstream's first byte,
        # and a model slow to begin must not miss the first-byte deadline for our holding it.
        self._hold_until = hold_until
        # When the upstream's first bytes came (perf_counter): its first-byte time, which the role
        # chunk held back for the answer would otherwise stretch to the answer's first event.
        self.first_read: float | None = None

    @property
    def status(self) -> int:
        return self._reply.status

    @property
    def is_json(self) -> bool:
        return self._reply.is_json

    @property
    def at_eof(self) -> bool:
        return self._reply.at_eof

    @property
    def prompt_tokens(self) -> int:
        return self._stream.prompt_tokens

    @property
    def final_usage(self) -> Usage | None:
        return self._stream.final_usage

    def retry_headers(self) -> dict[str, str]:
        return self._reply.retry_headers()

    def retry_after(self) -> float | None:
        return self._reply.retry_after()

    async def read(self, limit: int = MAX_REPLY_BYTES) -> bytes:
        data = await self._reply.read(limit)
        if len(data) > ASIDE_BYTES:  # megabytes take tens of ms to parse and write: not on the loop
            return await asyncio.to_thread(
                translate.whole_reply, self.status, data, self._include_usage, self._created, self._answer, limit
            )
        return translate.whole_reply(self.status, data, self._include_usage, self._created, self._answer, limit)

    def scrub(self, data: bytes) -> bytes:
        return self._reply.scrub(data)

    async def next_chunk(self) -> bytes:
        """The next chat events, b"" at the end: Anthropic events without a chat form (a ping,
        thinking) are read past, so an empty answer always means the end. A body that ends
        before message_stop (or Anthropic's own error event) was cut short: UpstreamStreamBroken,
        as /v1/messages reports it, once its last events went out (the call after them raises)."""
        stream = self._stream
        while True:
            if stream.opening and self._hold_until is not None:
                try:
                    async with asyncio.timeout_at(self._hold_until):
                        data = await self._reply.next_chunk()
                except TimeoutError:
                    self._last_out = time.monotonic()
                    return stream.open()
            else:
                data = await self._reply.next_chunk()
            if not data:
                tail = stream.close()
                if tail or stream.done:
                    return tail
                # A chat stream without [DONE] would look whole to the client: truncated text
                # passed off as the answer. Checked once, at the body's end.
                raise UpstreamStreamBroken()
            if self.first_read is None:
                self.first_read = time.perf_counter()
            held = len(data) + stream.pending  # less after the read: an event completed
            if held <= ASIDE_BYTES:  # the usual read: small events
                out = stream.feed(data)
            else:  # a long event, translated in a worker thread while the loop serves others
                out = await asyncio.to_thread(stream.feed, data)
            now = time.monotonic()
            if out:
                self._last_out = now
                return out
            # Only events (thinking, pings) earn a keep-alive: bytes of an event that never
            # ends are silence, which STREAM_IDLE_SECS cuts, as on any other upstream.
            if stream.pending < held and now - self._last_out >= self._keep_alive:
                self._last_out = now
                return _KEEP_ALIVE

    def close(self) -> None:
        self._reply.close()


def include_usage(payload: Mapping[str, Any]) -> bool:
    options = payload.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True
