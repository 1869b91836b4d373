"""Token budgets (SPEC §14): the estimate, what a reservation settles to, the policy over a
store with its fail mode, and the middleware in the app (create_app in process, in front of a
real upstream on loopback that reports the usage it is told to)."""

from __future__ import annotations

import asyncio
import io
import json
import math
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDictProxy

from gateway.app import SERVER_OPTIONS, create_app
from gateway.budgets import TokenBudget, completion_bound, spent
from gateway.config import Settings
from gateway.errors import BadRequest, StoreUnavailable
from gateway.limits import Quota
from gateway.models import Usage
from gateway.openai_apis import EMBEDDINGS_API
from gateway.stores import StoreGuard
from gateway.stores.memory import MemoryStore
from gateway.surfaces import CHAT_API, MESSAGES_API, Api, chat_request_texts, chat_usage

from .harness import free_port

CHAT = "/v1/chat/completions"
MESSAGES = "/v1/messages"
# Keys the APIs give meaning to: a body built from them reaches every branch of the texts walk.
KEYS = [
    "messages",
    "system",
    "content",
    "role",
    "text",
    "type",
    "refusal",
    "tool_calls",
    "function",
    "arguments",
    "input",
    "max_tokens",
    "max_completion_tokens",
    "max_output_tokens",
    "tool_use",
    "tool_result",
]
# A route whose replies are no completion (as /v1/embeddings will be), reading chat's texts.
EMBEDDINGS = Api("embeddings", "/v1/embeddings", CHAT_API.surface, lambda p, r: None, chat_request_texts, chat_usage)
AiohttpClient = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]
AiohttpServer = Callable[..., Awaitable[TestServer]]


def budget_over(store: MemoryStore, default: int = 100, overrides: dict[str, int] | None = None) -> TokenBudget:
    return TokenBudget(store, default, overrides or {}, 60, 1024, StoreGuard(True, lambda: None))


# --- the estimate ---------------------------------------------------------------------------


async def test_chat_estimate_counts_the_texts_redaction_reads() -> None:
    payload = {
        "model": "m",
        "max_tokens": 100,
        "messages": [
            {"role": "system", "content": "abcde"},  # 5
            {
                "role": "user",
                "content": [{"type": "text", "text": "fgh"}, {"type": "image_url", "image_url": {"url": "x" * 999}}],
            },  # 3: an image is no text
            {
                "role": "assistant",
                "content": None,
                "refusal": "no",  # 2
                "tool_calls": [{"id": "c", "function": {"name": "lookup", "arguments": '{"a":1}'}}],  # 7
            },
            {"role": "user", "content": "é日"},  # 2: characters, not bytes
        ],
        "tools": [{"type": "function", "function": {"name": "lookup", "description": "d" * 400}}],
    }
    assert await budget_over(MemoryStore()).estimate(CHAT_API, payload) == math.ceil(19 / 4) + 100


async def test_messages_estimate_counts_system_blocks_tool_results_and_tool_input() -> None:
    payload = {
        "model": "claude",
        "max_tokens": 50,
        "system": [{"type": "text", "text": "sys"}],  # 3
        "messages": [
            {"role": "user", "content": "hi"},  # 2
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "t" * 500, "signature": "s" * 100},  # passes, not counted
                    {"type": "tool_use", "id": "t1", "name": "f", "input": {"q": "abcd", "n": ["x", 5]}},  # 5
                ],
            },
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "res"}]},  # 3
        ],
    }
    assert await budget_over(MemoryStore()).estimate(MESSAGES_API, payload) == math.ceil(13 / 4) + 50


@given(st.lists(st.text(max_size=50), max_size=20), st.integers(min_value=0, max_value=10**6))
def test_the_text_part_is_rounded_once_however_the_text_is_split(texts: list[str], reserve: int) -> None:
    budget = TokenBudget(MemoryStore(), 1000, {}, 60, reserve, StoreGuard(True, lambda: None))

    def cost(contents: list[str], api: Api = CHAT_API) -> int:
        payload = {"model": "m", "messages": [{"role": "user", "content": text} for text in contents]}
        return asyncio.run(budget.estimate(api, payload))

    whole = cost(["".join(texts)])
    assert cost(texts) == whole == math.ceil(len("".join(texts)) / 4) + reserve
    assert cost(texts, EMBEDDINGS) == whole - reserve


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.sampled_from(KEYS),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=5), inner),
    max_leaves=30,
)


@given(body=st.dictionaries(st.sampled_from(KEYS), JSON), api=st.sampled_from([CHAT_API, MESSAGES_API]))
def test_any_body_is_an_estimate_or_a_bad_request(body: dict[str, Any], api: Api) -> None:
    # As in the gateway: the body step's checks, then the estimate of a body that passed them.
    budget, payload = budget_over(MemoryStore()), {"model": "m"} | body
    try:
        api.check_request(payload, False)
    except BadRequest:
        return
    try:
        cost = asyncio.run(budget.estimate(api, payload))
    except BadRequest:  # nested past the stack: the estimate says so
        return
    assert type(cost) is int and cost >= 0


async def test_the_loop_serves_others_while_a_huge_body_is_estimated() -> None:
    order: list[str] = []

    async def other() -> None:
        order.append("other")

    payload = {"model": "m", "messages": [{"role": "user", "content": "abcd"}] * 20_000}
    task = asyncio.create_task(other())
    assert await budget_over(MemoryStore()).estimate(CHAT_API, payload) == 20_000 + 1024
    order.append("estimated")
    await task
    assert order == ["other", "estimated"]


@pytest.mark.parametrize(
    ("payload", "bound"),
    [
        ({}, 1024),
        ({"max_tokens": 7}, 7),
        ({"max_tokens": 0}, 0),
        ({"max_completion_tokens": 9, "max_output_tokens": 3}, 9),  # the largest present
        # Found by review: the first present was held, 1 here, and an upstream that reads
        # max_completion_tokens (vLLM, SGLang) generated up to 100000 against that.
        ({"max_tokens": 1, "max_completion_tokens": 100_000}, 100_000),
        ({"max_tokens": 100_000, "max_completion_tokens": 1}, 100_000),
        ({"max_output_tokens": 3}, 3),
        ({"max_tokens": None, "max_completion_tokens": 9}, 9),  # null is "not set"
        ({"max_tokens": -1, "max_completion_tokens": 9}, 1024),  # present but no count: the default
        ({"max_tokens": True}, 1024),
        ({"max_tokens": 1.5}, 1024),
        ({"max_tokens": "10"}, 1024),
        ({"max_tokens": [10]}, 1024),
        ({"max_output_tokens": 10**30}, 10**30),  # held as "more than the budget": refused
    ],
)
def test_completion_bound(payload: dict[str, Any], bound: int) -> None:
    assert completion_bound(payload, 1024) == bound


@pytest.mark.parametrize(
    ("extra", "held"),
    [
        # Found by review: n=50 held one completion's bound, 100, and the upstream generated
        # (and billed) 50 of them: the budget overrun by 49 times the estimate.
        ({"n": 50, "max_tokens": 100}, 1 + 50 * 100),
        ({"n": 3}, 1 + 3 * 1024),
        ({"n": 1, "max_tokens": 100}, 101),
        ({"n": 0, "max_tokens": 100}, 101),  # not a count of choices: the upstream refuses it
        ({"n": "50", "max_tokens": 100}, 101),
        ({"n": True, "max_tokens": 100}, 101),
    ],
)
async def test_each_choice_asked_for_is_reserved(extra: dict[str, Any], held: int) -> None:
    payload = {"model": "m", "messages": [{"role": "user", "content": "ping"}], **extra}
    assert await budget_over(MemoryStore()).estimate(CHAT_API, payload) == held


@pytest.mark.parametrize(
    ("given", "held"),
    [
        # Found by review: token arrays held nothing, so an embeddings request of 3000 token
        # ids was admitted against a budget of 1000 (2048 arrays of 8191: 16.7M in one request).
        ([7] * 3000, 3000),
        ([[7] * 3000, [8] * 5], 3005),
        ([[7, 7], 8, "abcd"], 2 + 1),  # mixed: OpenAI refuses it, which releases the reservation
        ([8, [7, 7]], 2),
        ([], 0),
        ("abcdefgh", 2),
    ],
)
async def test_embeddings_token_ids_are_reserved_one_each(given: object, held: int) -> None:
    payload = {"model": "text-embedding-3-small", "input": given}
    assert await budget_over(MemoryStore()).estimate(EMBEDDINGS_API, payload) == held


async def test_a_route_without_completions_reserves_its_texts_only() -> None:
    payload = {"model": "m", "messages": [{"role": "user", "content": "abcdefgh"}], "max_tokens": 5}
    assert await budget_over(MemoryStore()).estimate(EMBEDDINGS, payload) == 2


async def test_texts_nested_past_the_stack_are_a_bad_request() -> None:
    # Tool results within tool results: their walk nests (a tool's input no longer does: it is
    # walked with a stack of its own, see tests/test_text_walks.py).
    nested: Any = "deep"
    for _ in range(5000):
        nested = [{"type": "tool_result", "tool_use_id": "t", "content": nested}]
    payload = {"model": "c", "messages": [{"role": "user", "content": nested}]}
    with pytest.raises(BadRequest, match="nested too deeply"):
        await budget_over(MemoryStore()).estimate(MESSAGES_API, payload)


@pytest.mark.parametrize(
    ("usage", "failed", "status", "settled"),
    [
        (Usage(10, 5), False, 200, 15),  # the reply's usage replaces the estimate
        (Usage(10, 5), True, None, 15),  # usage known before a failure still counts
        (Usage(0, 0), False, 200, 0),
        (None, True, None, 0),  # no reply: released
        (None, False, 500, 0),  # the upstream's error: it charges none
        (None, False, 429, 0),
        (None, False, 400, 0),
        (None, False, 200, None),  # no usage reported: the estimate stands
        (None, False, None, None),  # the client left (cancelled): the estimate stands
    ],
)
def test_what_a_reservation_settles_to(usage: Usage | None, failed: bool, status: int | None, settled: int) -> None:
    assert spent(usage, failed, status) == settled


# --- the policy over a store ----------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FailingStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.fail = True
        self.calls = 0

    async def hit(self, key: str, window_ms: int) -> tuple[int, int]:
        self.calls += 1
        if self.fail:
            raise StoreUnavailable()
        return await super().hit(key, window_ms)

    async def reserve(self, key: str, amount: int, limit: int, window_ms: int) -> tuple[bool, int, int, str]:
        self.calls += 1
        if self.fail:
            raise StoreUnavailable()
        return await super().reserve(key, amount, limit, window_ms)

    async def settle(self, key: str, window: str, reserved: int, used: int) -> None:
        self.calls += 1
        if self.fail:
            raise StoreUnavailable()
        await super().settle(key, window, reserved, used)


async def test_decisions_remaining_and_settlement() -> None:
    clock = Clock()
    budget = budget_over(MemoryStore(clock=clock))
    first = await budget.reserve("t", "t", 60)
    assert first is not None and (first.allowed, first.remaining, first.reserved, first.reset_after_ms) == (
        True,
        40,
        60,
        60_000,
    )
    refused = await budget.reserve("t", "t", 41)
    assert refused is not None and (refused.allowed, refused.remaining, refused.reserved) == (False, 40, 0)
    await budget.settle(refused, 0)  # a refusal holds nothing to settle
    await budget.settle(first, 20)
    clock.now += 59.5
    second = await budget.reserve("t", "t", 80)
    assert second is not None and (second.allowed, second.remaining, second.reset_after_ms) == (True, 0, 500)
    clock.now += 0.5  # the window ends: what it held goes with it
    assert (await budget.reserve("t", "t", 100)).allowed  # type: ignore[union-attr]


async def test_estimates_beyond_any_budget_are_refused_not_sent_whole() -> None:
    budget = budget_over(MemoryStore(), default=10**15)
    decision = await budget.reserve("t", "t", 10**30)
    assert decision is not None and not decision.allowed and decision.remaining == 10**15


def test_overrides_apply_when_the_default_is_off() -> None:
    store = MemoryStore()
    assert not budget_over(store, 0).enabled
    assert not budget_over(store, 0, {"acme": 0}).enabled
    listed = budget_over(store, 0, {"acme": 500})
    assert listed.enabled and listed.limit_for("acme") == 500 and listed.limit_for("other") == 0
    assert budget_over(store, 100, {"vip": 0}).limit_for("vip") == 0  # listed with 0: no budget


@pytest.mark.parametrize("fail_open", [True, False])
async def test_store_failures_follow_the_mode_and_one_outage_is_backed_off_once(fail_open: bool) -> None:
    errors: list[int] = []
    store = FailingStore()
    guard = StoreGuard(fail_open, lambda: errors.append(1), retry_after_secs=60)
    quota = Quota(store, 5, {}, 60, guard=guard)
    budget = TokenBudget(store, 100, {}, 60, 1024, guard)
    for _ in range(3):
        if fail_open:
            assert await quota.check("t", "t") is None
            assert await budget.reserve("t", "t", 10) is None
        else:
            with pytest.raises(StoreUnavailable):
                await quota.check("t", "t")
            with pytest.raises(StoreUnavailable):
                await budget.reserve("t", "t", 10)
    assert store.calls == 1  # the quota's failure backs the budget off too: nobody waits on a dead store
    assert len(errors) == 6


async def test_a_settle_that_fails_leaves_the_reservation_to_its_window() -> None:
    store = FailingStore()
    store.fail = False
    budget = TokenBudget(store, 100, {}, 60, 1024, StoreGuard(False, lambda: None))
    decision = await budget.reserve("t", "t", 90)
    assert decision is not None
    store.fail = True
    await budget.settle(decision, 0)  # fail-closed, but the answer is out: no error to raise
    store.fail = False
    await budget.settle(decision, 90)  # equal to the reservation: nothing to send
    assert store.calls == 2
    fresh = TokenBudget(store, 100, {}, 60, 1024, StoreGuard(False, lambda: None))  # not backing off
    after = await fresh.reserve("t", "t", 11)
    assert after is not None and not after.allowed and after.remaining == 10  # 90 still held


async def test_a_settle_while_the_guard_backs_off_reaches_the_store_that_is_back() -> None:
    # Found by review: after one failed call (a Redis stall of 300 ms), the guard skipped every
    # settle of the next second, so streams that ended then held their whole estimates to the
    # window's end although Redis answered again (the tenant refused for a minute, or a day).
    store = FailingStore()
    guard = StoreGuard(True, lambda: None, retry_after_secs=0.2)
    budget = TokenBudget(store, 100, {}, 60, 1024, guard)
    store.fail = False
    decision = await budget.reserve("t", "t", 90)
    assert decision is not None and decision.allowed
    store.fail = True
    assert await Quota(store, 5, {}, 60, guard=guard).check("t", "t") is None  # the stall: backing off
    store.fail = False  # Redis answers again, within the back-off
    calls = store.calls
    await budget.settle(decision, 12)
    assert store.calls == calls  # not while the guard skips the store: once it tries it again
    fresh = TokenBudget(store, 100, {}, 60, 1024, StoreGuard(True, lambda: None))  # not backing off
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 2
    while (after := await fresh.reserve("t", "t", 88)) is None or not after.allowed:
        assert loop.time() < deadline, "the settle never reached the store: 90 still held"
        await asyncio.sleep(0.01)


# --- the middleware, in the app -------------------------------------------------------------


@dataclass
class Upstream:
    """OpenAI- and Anthropic-like. `usage` is what replies report (None: no usage field),
    `status` an error to answer with, `hold` keeps a stream open after its first event."""

    url: str = ""
    bodies: list[dict[str, Any]] = field(default_factory=list)
    usage: tuple[int, int] | None = (10, 5)
    status: int = 200
    hold: asyncio.Event | None = None
    hold_before_done: asyncio.Event | None = None  # a stream's usage is out, its end is not
    stall: asyncio.Event | None = None  # nothing is answered until it is set

    async def chat(self, request: web.Request) -> web.StreamResponse:
        payload = await request.json()
        self.bodies.append(payload)
        if self.stall is not None:
            await self.stall.wait()
        if self.status != 200:
            return web.json_response({"error": {"message": "no", "type": "x", "code": None}}, status=self.status)
        usage = None if self.usage is None else {"prompt_tokens": self.usage[0], "completion_tokens": self.usage[1]}
        message = {"role": "assistant", "content": "pong"}
        if not payload.get("stream"):
            reply: dict[str, Any] = {
                "id": "c",
                "object": "chat.completion",
                "choices": [{"index": 0, "message": message}],
            }
            return web.json_response(reply | ({"usage": usage} if usage else {}))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        chunk = {"id": "c", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": "po"}}]}
        await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        if self.hold is not None:
            await self.hold.wait()
        if usage and (payload.get("stream_options") or {}).get("include_usage"):
            await response.write(b"data: " + json.dumps({"id": "c", "choices": [], "usage": usage}).encode() + b"\n\n")
        if self.hold_before_done is not None:
            await self.hold_before_done.wait()
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def messages(self, request: web.Request) -> web.StreamResponse:
        self.bodies.append(await request.json())
        assert self.usage is not None
        usage = {"input_tokens": self.usage[0], "output_tokens": self.usage[1]}
        content = [{"type": "text", "text": "pong"}]
        return web.json_response(
            {"id": "m", "type": "message", "role": "assistant", "content": content, "usage": usage}
        )


@dataclass
class Gateway:
    client: TestClient[web.Request, web.Application]

    async def post(
        self, body: dict[str, Any], key: str = "demo", path: str = CHAT
    ) -> tuple[int, CIMultiDictProxy[str], dict[str, Any]]:
        async with self.client.post(path, json=body, headers={"X-Api-Key": key}) as response:
            text = await response.read()
            return response.status, response.headers, json.loads(text) if text.startswith(b"{") else {}

    async def sample(self, name: str, **labels: str) -> float:
        async with self.client.get("/metrics") as response:
            text = await response.text()
        wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in text.splitlines():
            match = re.fullmatch(r"(\w+)(?:\{(.*)\})? (\S+)", line)
            if match and match.group(1) == name and ",".join(sorted((match.group(2) or "").split(","))) == wanted:
                return float(match.group(3))
        return 0.0


def ask(content: str = "x" * 40, max_tokens: int = 90, **extra: Any) -> dict[str, Any]:
    """A chat request whose estimate is len(content) / 4 + max_tokens (100 by default)."""
    return {"model": "m", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, **extra}


@pytest.fixture
async def upstream(aiohttp_server: AiohttpServer) -> Upstream:
    fake = Upstream()
    app = web.Application()
    app.router.add_post(CHAT, fake.chat)
    app.router.add_post(MESSAGES, fake.messages)
    server = await aiohttp_server(app)
    fake.url = str(server.make_url("")).rstrip("/")
    return fake


GatewayFactory = Callable[..., Awaitable[Gateway]]


@pytest.fixture
def start(aiohttp_client: AiohttpClient, make_settings: Callable[..., Settings], upstream: Upstream) -> GatewayFactory:
    async def start(**env: str) -> Gateway:
        defaults = {
            "OPENAI_BASE_URL": upstream.url,
            "ANTHROPIC_BASE_URL": upstream.url,
            "RPS": "0",
            "DEFAULT_QUOTA": "1000",
        }
        app = create_app(make_settings(**(defaults | env)), log_stream=io.BytesIO())
        server = TestServer(app)
        await server.start_server(**SERVER_OPTIONS)
        return Gateway(await aiohttp_client(server))

    return start


def token_headers(headers: CIMultiDictProxy[str]) -> tuple[str, str] | None:
    if "x-ratelimit-limit-tokens" not in headers:
        return None
    assert re.fullmatch(r"\d+ms|\d+(\.\d+)?s|\d+m\d+s", headers["x-ratelimit-reset-tokens"])
    return headers["x-ratelimit-limit-tokens"], headers["x-ratelimit-remaining-tokens"]


async def test_headers_show_the_reservation_and_json_usage_settles_it(
    start: GatewayFactory, upstream: Upstream
) -> None:
    gateway = await start(TOKEN_QUOTA="1000")
    status, headers, _ = await gateway.post(ask())
    assert status == 200 and token_headers(headers) == ("1000", "900")  # after this request's 100
    status, headers, _ = await gateway.post(ask())
    assert status == 200 and token_headers(headers) == ("1000", str(1000 - 15 - 100))  # the first used 15
    status, headers, _ = await gateway.post(ask(), key="other")
    assert token_headers(headers) == ("1000", "900")  # per tenant


async def test_a_spent_budget_is_429_after_the_request_quota_counted(start: GatewayFactory, upstream: Upstream) -> None:
    upstream.usage = (100, 100)
    gateway = await start(TOKEN_QUOTA="250", TOKEN_WINDOW_SECS="30")
    assert (await gateway.post(ask()))[0] == 200  # 100 held, 200 used
    status, headers, body = await gateway.post(ask())  # 200 + 100 > 250
    assert status == 429
    assert body["error"] == {
        "message": "token quota exceeded (limit=250)",
        "type": "insufficient_quota",
        "code": "token_quota_exceeded",
    }
    assert 1 <= int(headers["Retry-After"]) <= 30 and 0 < int(headers["retry-after-ms"]) <= 30_000
    assert token_headers(headers) == ("250", "50")
    assert headers["x-ratelimit-remaining-requests"] == "998"  # refused for tokens: counted as a request
    assert len(upstream.bodies) == 1  # never reached the upstream
    assert (await gateway.post(ask(content="", max_tokens=50)))[0] == 200  # what fits still goes
    assert await gateway.sample("quota_block_total", reason="tokens") == 1
    assert await gateway.sample("quota_block_total", reason="exceeded") == 0


async def test_a_request_over_its_request_quota_holds_no_tokens(start: GatewayFactory, upstream: Upstream) -> None:
    # The quota step comes first: a request it refuses never reaches the token step.
    gateway = await start(TOKEN_QUOTA="1000", DEFAULT_QUOTA="1", QUOTA_WINDOW_SECS="1", TOKEN_WINDOW_SECS="60")
    status, headers, _ = await gateway.post(ask())
    assert status == 200 and token_headers(headers) == ("1000", "900")
    status, headers, body = await gateway.post(ask())
    assert status == 429 and body["error"]["message"] == "quota exceeded (limit=1)"
    assert token_headers(headers) is None and headers["x-ratelimit-remaining-requests"] == "0"
    assert await gateway.sample("quota_block_total", reason="exceeded") == 1
    assert await gateway.sample("quota_block_total", reason="tokens") == 0
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while (answer := await gateway.post(ask()))[0] == 429:  # the request quota's next window
        assert loop.time() < deadline, "the request quota's window never ended"
        await asyncio.sleep(0.05)
    assert token_headers(answer[1]) == ("1000", str(1000 - 15 - 100))  # the first's 15 used, this one's 100


async def test_an_estimate_larger_than_the_budget_is_refused(start: GatewayFactory, upstream: Upstream) -> None:
    gateway = await start(TOKEN_QUOTA="1000")
    status, headers, body = await gateway.post(ask(max_tokens=10**40))
    assert status == 429 and body["error"]["message"] == "token quota exceeded (limit=1000)"
    assert token_headers(headers) == ("1000", "1000")
    status, headers, _ = await gateway.post(ask(content="", max_tokens=1000))  # the whole budget fits
    assert status == 200 and token_headers(headers) == ("1000", "0")


@pytest.mark.parametrize("upstream_status", [500, 503, 400, 429])
async def test_an_upstream_error_releases_the_reservation(
    start: GatewayFactory, upstream: Upstream, upstream_status: int
) -> None:
    upstream.status = upstream_status
    gateway = await start(TOKEN_QUOTA="1000")
    status, headers, _ = await gateway.post(ask())
    assert status == upstream_status and token_headers(headers) == ("1000", "900")
    assert token_headers((await gateway.post(ask()))[1]) == ("1000", "900")  # the first's 100 came back


async def test_no_reply_releases_the_reservation(start: GatewayFactory, upstream: Upstream) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    gateway = await start(TOKEN_QUOTA="1000", OPENAI_BASE_URL=dead)
    assert (await gateway.post(ask()))[0] == 502
    assert token_headers((await gateway.post(ask()))[1]) == ("1000", "900")


async def test_a_timeout_releases_the_reservation(start: GatewayFactory, upstream: Upstream) -> None:
    upstream.stall = asyncio.Event()
    gateway = await start(TOKEN_QUOTA="1000", TIMEOUT_SECS="0.2")
    for stream in (False, True):
        status, headers, body = await gateway.post(ask(stream=stream))
        assert status == 504 and body["error"]["code"] == "upstream_timeout"
        assert token_headers(headers) == ("1000", "900")
    upstream.stall.set()
    assert token_headers((await gateway.post(ask()))[1]) == ("1000", "900")


async def test_a_request_refused_as_malformed_reserves_nothing(start: GatewayFactory) -> None:
    gateway = await start(TOKEN_QUOTA="1000")
    status, _, body = await gateway.post(ask(logprobs=True))  # refused with redaction on, by the body step
    assert status == 400 and body["error"]["code"] == "logprobs_unavailable"
    assert token_headers((await gateway.post(ask()))[1]) == ("1000", "900")  # only this one's 100 held


async def test_streams_settle_to_the_usage_chunk(start: GatewayFactory, upstream: Upstream) -> None:
    gateway = await start(TOKEN_QUOTA="1000")
    asked = ask(stream=True, stream_options={"include_usage": True})
    status, headers, _ = await gateway.post(asked)
    assert status == 200 and token_headers(headers) == ("1000", "900")
    assert token_headers((await gateway.post(ask()))[1]) == ("1000", str(1000 - 15 - 100))


async def test_a_stream_that_did_not_ask_for_usage_settles_to_it(start: GatewayFactory, upstream: Upstream) -> None:
    gateway = await start(TOKEN_QUOTA="1000")
    assert (await gateway.post(ask(stream=True)))[0] == 200
    assert upstream.bodies[0]["stream_options"] == {"include_usage": True}  # the gateway asked for it
    assert token_headers((await gateway.post(ask()))[1]) == ("1000", str(1000 - 15 - 100))


async def test_a_client_that_leaves_mid_stream_before_usage_keeps_the_estimate(
    start: GatewayFactory, upstream: Upstream
) -> None:
    upstream.hold = asyncio.Event()
    gateway = await start(TOKEN_QUOTA="1000")
    response = await gateway.client.post(CHAT, json=ask(stream=True), headers={"X-Api-Key": "demo"})
    assert response.status == 200 and (await response.content.readline()).startswith(b"data: ")
    response.close()  # gone before the usage
    deadline = asyncio.get_running_loop().time() + 10
    while await gateway.sample("http_requests_total", route=CHAT, model="m", status="499") < 1:
        assert asyncio.get_running_loop().time() < deadline, "the gateway never saw the client leave"
        await asyncio.sleep(0.02)
    upstream.hold.set()
    assert token_headers((await gateway.post(ask()))[1]) == ("1000", "800")  # its 100 still held


async def test_a_client_that_leaves_after_the_usage_is_settled_to_it(start: GatewayFactory, upstream: Upstream) -> None:
    upstream.hold_before_done = asyncio.Event()
    gateway = await start(TOKEN_QUOTA="1000")
    asked = ask(stream=True, stream_options={"include_usage": True})
    response = await gateway.client.post(CHAT, json=asked, headers={"X-Api-Key": "demo"})
    while b'"usage"' not in await response.content.readline():  # the usage chunk came
        pass
    response.close()  # gone before [DONE]
    deadline = asyncio.get_running_loop().time() + 10
    while await gateway.sample("http_requests_total", route=CHAT, model="m", status="499") < 1:
        assert asyncio.get_running_loop().time() < deadline, "the gateway never saw the client leave"
        await asyncio.sleep(0.02)
    upstream.hold_before_done.set()
    assert token_headers((await gateway.post(ask()))[1]) == ("1000", str(1000 - 15 - 100))  # SPEC §14


async def test_tenant_budgets_apply_when_token_quota_is_0(start: GatewayFactory, upstream: Upstream) -> None:
    upstream.usage = (60, 0)
    gateway = await start(TENANT_TOKEN_QUOTAS="acme=150,vip=0")
    status, headers, _ = await gateway.post(ask(), key="acme")
    assert status == 200 and token_headers(headers) == ("150", "50")
    assert (await gateway.post(ask(), key="acme"))[0] == 429  # 60 used + 100 > 150
    for key in ("vip", "anyone-else"):  # no budget: no token headers, never refused for tokens
        for _ in range(3):
            status, headers, _ = await gateway.post(ask(max_tokens=10**9), key=key)
            assert status == 200 and token_headers(headers) is None


async def test_budgets_off_by_default(start: GatewayFactory) -> None:
    gateway = await start()
    status, headers, _ = await gateway.post(ask(max_tokens=10**9))
    assert status == 200 and token_headers(headers) is None
    assert await gateway.sample("quota_block_total", reason="tokens") == 0  # shown, at zero


async def test_the_messages_route_settles_and_refuses_in_anthropics_shape(
    start: GatewayFactory, upstream: Upstream
) -> None:
    upstream.usage = (60, 20)
    gateway = await start(TOKEN_QUOTA="200")
    body = {"model": "claude", "max_tokens": 96, "system": "abcd", "messages": [{"role": "user", "content": "wxyz"}]}
    status, headers, _ = await gateway.post(body, path=MESSAGES)
    assert status == 200 and token_headers(headers) == ("200", "102")  # 2 + 96 held
    status, headers, _ = await gateway.post(body, path=MESSAGES)
    assert status == 200 and token_headers(headers) == ("200", str(200 - 80 - 98))  # the first used 80
    status, headers, error = await gateway.post(body, path=MESSAGES)
    assert status == 429 and int(headers["retry-after"]) >= 1
    assert error == {
        "type": "error",
        "error": {"type": "rate_limit_error", "message": "token quota exceeded (limit=200)"},
    }


@pytest.mark.parametrize("messages", [5, True, None, "text", {"role": "user"}])
@pytest.mark.parametrize("path", [CHAT, MESSAGES])
async def test_a_body_the_handler_refuses_is_refused_before_anything_is_held(
    start: GatewayFactory, upstream: Upstream, messages: object, path: str
) -> None:
    gateway = await start(TOKEN_QUOTA="1000")
    status, _, body = await gateway.post({"model": "m", "messages": messages, "max_tokens": 10}, path=path)
    assert status == 400, body
    status, headers, _ = await gateway.post(ask())
    assert status == 200 and token_headers(headers) == ("1000", "900")
    assert upstream.bodies == [ask()]


async def test_a_client_that_leaves_before_the_request_is_sent_holds_nothing(
    start: GatewayFactory, upstream: Upstream
) -> None:
    # A prompt of megabytes is redacted in a worker thread for a second or more; a client that
    # leaves meanwhile cancels a request that never reached the upstream: nothing was generated,
    # so its reservation is released, not held to the window's end (found by sweep-f against the
    # real process: a 4.9 MB prompt cut during redaction held 1,230,100 tokens in Redis).
    upstream.usage = None  # the small requests below keep their estimate (1 each): countable
    gateway = await start(TOKEN_QUOTA="100000000")
    big = ask(content="jane.doe@example.com 4242 4242 4242 4242 " * 150_000, max_tokens=100)
    held = -(-len(big["messages"][0]["content"]) // 4) + 100
    small = ask(content="", max_tokens=1)
    leaving = asyncio.ensure_future(gateway.post(big))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    seen = 0
    while True:  # until the big one is admitted: its reservation shows in a small one's headers
        status, headers, _ = await gateway.post(small)
        seen += 1
        assert status == 200 and loop.time() < deadline, "the big request was never admitted"
        if int(headers["x-ratelimit-remaining-tokens"]) == 100_000_000 - held - seen:
            break
        assert not leaving.done(), "the big request finished before it could be cut"
    leaving.cancel()  # the client hangs up while its prompt is redacted
    with pytest.raises(asyncio.CancelledError):
        await leaving
    while await gateway.sample("inflight_requests") > 0:
        assert loop.time() < deadline, "the cut request never ended"
        await asyncio.sleep(0.02)
    assert all(b["messages"][0]["content"] == "" for b in upstream.bodies)  # never sent
    status, headers, _ = await gateway.post(small)
    assert status == 200
    assert int(headers["x-ratelimit-remaining-tokens"]) == 100_000_000 - seen - 1  # nothing of `held` left
