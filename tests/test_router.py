"""gateway/router.py: each attempt's share of the deadline, breakers skipped, what goes where."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from gateway import router as router_module
from gateway.breaker import OPEN, Breakers
from gateway.errors import ModelNotFound, UpstreamStreamBroken
from gateway.router import AnthropicAsChat, Router, body_for, is_fallback_status
from gateway.routing import Route, RouteTable, Target, UpstreamConfig
from gateway.surfaces import CHAT_API, MESSAGES_API


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


UPSTREAMS = {
    name: UpstreamConfig(name, kind, f"http://{name}.example", "K", "k")  # type: ignore[arg-type]
    for name, kind in (("a", "openai"), ("b", "openai"), ("c", "openai"), ("claude", "anthropic"))
}


def router(clock: Clock, failures: int = 1) -> Router:
    routes = (
        Route("three", tuple(Target(UPSTREAMS[n]) for n in "abc")),
        Route("claude-*", (Target(UPSTREAMS["claude"]), Target(UPSTREAMS["a"], "gpt-4o"))),
        Route("gpt-only", (Target(UPSTREAMS["a"]),)),
    )
    return Router(RouteTable(UPSTREAMS, routes), Breakers(failures, 10, clock=clock), 5.0)


def test_each_attempt_gets_the_time_left_over_the_attempts_left_at_least_one_second() -> None:
    clock = Clock()
    r = router(clock, failures=5)
    attempts = r.attempts(r.legs(CHAT_API, "three"), 9.0)
    first = attempts.next()
    assert first is not None and (first.leg.name, first.secs) == ("a", 3.0)
    clock.now += 3.0
    attempts.failed(first)
    second = attempts.next()
    assert second is not None and (second.leg.name, second.secs) == ("b", 3.0)
    clock.now += 3.0 + 2.5  # b overran its share
    attempts.failed(second)
    third = attempts.next()
    assert third is not None and (third.leg.name, third.secs) == ("c", 1.0)  # never less than 1 s
    attempts.failed(third)
    assert attempts.next() is None and attempts.tried == 3


def test_open_upstreams_are_skipped_and_not_counted_in_the_share() -> None:
    clock = Clock()
    r = router(clock)
    attempts = r.attempts(r.legs(CHAT_API, "three"), 9.0)
    first = attempts.next()
    assert first is not None
    attempts.failed(first)  # CB_FAILURES=1: a opens
    assert first.breaker.state == OPEN
    attempts = r.attempts(r.legs(CHAT_API, "three"), 9.0)
    second = attempts.next()
    assert second is not None and (second.leg.name, second.secs) == ("b", 4.5)  # 2 attempts left, not 3
    attempts.failed(second)
    third = attempts.next()
    assert third is not None
    attempts.failed(third, retry_after=3.2)  # skipped for 3.2 s, no failure counted
    assert third.breaker.state != OPEN
    assert attempts.next() is None
    again = r.attempts(r.legs(CHAT_API, "three"), 9.0)  # a and b open for 10 s, c skipped for 3.2 s
    assert again.next() is None and again.tried == 0
    assert again.retry_after() == "4"  # c comes back first: ceil(3.2)
    only_a = r.attempts(r.legs(CHAT_API, "gpt-only"), 9.0)
    assert only_a.next() is None and only_a.tried == 0 and only_a.retry_after() == "10"


def test_what_each_leg_is_sent() -> None:
    r = router(Clock())
    claude, fallback = r.legs(CHAT_API, "claude-sonnet")
    payload = {"model": "claude-sonnet", "messages": [{"role": "user", "content": "hi"}]}
    body = orjson.dumps(payload)
    assert claude.translated and orjson.loads(body_for(claude, payload, body)) == {
        "model": "claude-sonnet",
        "max_tokens": 4096,
        "messages": [{"role": "user", "content": "hi"}],
    }
    assert not fallback.translated and orjson.loads(body_for(fallback, payload, body))["model"] == "gpt-4o"
    [only_a] = r.legs(CHAT_API, "gpt-only")
    assert body_for(only_a, {"model": "gpt-only"}, b"as sent") == b"as sent"
    [messages_leg] = r.legs(MESSAGES_API, "claude-sonnet")  # /v1/messages: anthropic upstreams only
    assert messages_leg.name == "claude" and not messages_leg.translated


def test_unrouted_models() -> None:
    r = router(Clock())
    with pytest.raises(ModelNotFound) as caught:
        r.legs(CHAT_API, "llama")
    assert caught.value.status == 404 and caught.value.code == "model_not_found"
    with pytest.raises(ModelNotFound, match="only to OpenAI-compatible upstreams"):
        r.legs(MESSAGES_API, "gpt-only")


@pytest.mark.parametrize(
    ("status", "falls_back"),
    [
        (200, False),
        (400, False),
        (401, False),
        (404, False),
        (429, True),
        (500, True),
        (502, True),
        (503, True),
        (529, True),
    ],
)
def test_which_answers_fall_back(status: int, falls_back: bool) -> None:
    assert is_fallback_status(status) is falls_back


class Events:
    """An Anthropic stream's reads, as an UpstreamReply gives them."""

    def __init__(self, *reads: bytes) -> None:
        self.reads = list(reads)
        self.status, self.is_json, self.at_eof = 200, False, False

    async def next_chunk(self) -> bytes:
        return self.reads.pop(0) if self.reads else b""


START = b'event: message_start\ndata: {"type":"message_start","message":{"id":"m","model":"c","usage":{}}}\n\n'
THINKING = b'data: {"type":"content_block_delta","index":0,"delta":{"type":"thinking_delta","thinking":"hm"}}\n\n'
TEXT = b'data: {"type":"content_block_delta","index":1,"delta":{"type":"text_delta","text":"Hi"}}\n\n'
STOP = b'event: message_stop\ndata: {"type":"message_stop"}\n\n'


@pytest.mark.parametrize("keep_alive_secs", [15.0, 0.0])
async def test_thinking_reads_past_or_keeps_the_stream_alive(
    monkeypatch: pytest.MonkeyPatch, keep_alive_secs: float
) -> None:
    monkeypatch.setattr(router_module, "KEEP_ALIVE_SECS", keep_alive_secs)
    reply = AnthropicAsChat(Events(START, THINKING, THINKING, TEXT, STOP), include_usage=False)  # type: ignore[arg-type]
    reads = [await reply.next_chunk() for _ in range(4)]
    if keep_alive_secs:  # the thinking is read past: the next chat event comes next
        # (the role chunk comes with the answer's first event, the thinking's)
        assert b'"role":"assistant"' in reads[0]
        assert b'"content":"Hi"' in reads[1] and reads[2:] == [b"data: [DONE]\n\n", b""]
    else:  # silence in chat terms as long as the limit: a comment goes out instead
        assert reads[0] == b": keep-alive\n\n" and b'"role":"assistant"' in reads[1]  # message_start's
        assert reads[2] == b": keep-alive\n\n" and b'"content":"Hi"' in reads[3]


@pytest.mark.parametrize(("idle_secs", "kept_alive"), [(300.0, False), (0.0, True)])
async def test_the_keep_alive_comes_within_half_the_idle_limit(idle_secs: float, kept_alive: bool) -> None:
    """Under a STREAM_IDLE_SECS shorter than KEEP_ALIVE_SECS the keep-alive comes within half
    of it: the relay would otherwise cut a model that is thinking as silent."""
    reply = AnthropicAsChat(Events(START, THINKING, THINKING, TEXT, STOP), include_usage=False, idle_secs=idle_secs)  # type: ignore[arg-type]
    reads = [await reply.next_chunk() for _ in range(4)]
    assert (reads[0] == b": keep-alive\n\n") is kept_alive  # message_start's
    assert b'"role":"assistant"' in reads[1 if kept_alive else 0]  # with the first thinking
    assert (reads[2] == b": keep-alive\n\n") is kept_alive  # the second thinking's
    assert b'"content":"Hi"' in reads[3 if kept_alive else 1]


async def test_bytes_of_an_event_never_ended_earn_no_keep_alive(monkeypatch: pytest.MonkeyPatch) -> None:
    """A trickling upstream (an event begun, then a byte at a time, never ended) is silence:
    no keep-alive goes out for it, so the relay's STREAM_IDLE_SECS cuts it (a keep-alive is a
    chat event to the relay, and would have kept it open for ever)."""
    monkeypatch.setattr(router_module, "KEEP_ALIVE_SECS", 0.0)
    trickle = [b'data: {"type":"content_block_delta"'] + [b" "] * 5
    reply = AnthropicAsChat(Events(START, TEXT, *trickle, b"}\n\n", THINKING, TEXT), include_usage=False)  # type: ignore[arg-type]
    reads = [await reply.next_chunk() for _ in range(5)]
    assert reads[0] == b": keep-alive\n\n" and b'"role":"assistant"' in reads[1]  # message_start's, then the text
    # One keep-alive once the trickled event ends, one for the thinking: none for the bytes.
    assert reads[2:4] == [b": keep-alive\n\n"] * 2 and b'"content":"Hi"' in reads[4]


@pytest.mark.parametrize("tail", [b"", b'data: {"type":"content_block_stop","index":1}'])
async def test_a_stream_ended_before_message_stop_is_broken(tail: bytes) -> None:
    """Anthropic ends every stream with message_stop (or its own error event): a body that
    ends cleanly before it was cut short, and the chat client is told so (an error event,
    as on /v1/messages), not handed a truncated answer that looks whole (SPEC §5, §13). Its
    last event, even without its blank line, is translated first."""
    reply = AnthropicAsChat(Events(START, TEXT, tail), include_usage=False)  # type: ignore[arg-type]
    first = await reply.next_chunk()  # the role chunk comes with the answer's first event
    assert b'"role":"assistant"' in first and b'"content":"Hi"' in first
    with pytest.raises(UpstreamStreamBroken):
        await reply.next_chunk()


async def test_a_stream_ended_by_message_stop_or_an_error_event_is_whole() -> None:
    error = b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}'
    for last in (STOP, error):  # the error event without its blank line: the body's last bytes
        reply = AnthropicAsChat(Events(START, TEXT, last), include_usage=False)  # type: ignore[arg-type]
        reads = [await reply.next_chunk() for _ in range(3)]
        assert reads[2] == b"" and (b"[DONE]" in reads[1] or b'"error"' in reads[1])


def test_a_reloaded_router_keeps_the_breakers() -> None:
    clock = Clock()
    r = router(clock)
    attempts = r.attempts(r.legs(CHAT_API, "gpt-only"), 5.0)
    attempt = attempts.next()
    assert attempt is not None
    attempts.failed(attempt)
    table = RouteTable(UPSTREAMS, (Route("*", (Target(UPSTREAMS["a"]), Target(UPSTREAMS["b"]))),))
    again = r.reloaded(table)
    assert again.breakers is r.breakers and again.table is table
    next_attempt = again.attempts(again.legs(CHAT_API, "anything"), 5.0).next()
    assert next_attempt is not None and next_attempt.leg.name == "b"  # a is still open


class Arriving:
    """An Anthropic stream's reads as they arrive: each waits for the test to send it."""

    def __init__(self) -> None:
        self.reads: asyncio.Queue[bytes] = asyncio.Queue()
        self.status, self.is_json, self.at_eof = 200, False, False

    async def next_chunk(self) -> bytes:
        return await self.reads.get()


async def test_the_role_chunk_waits_for_the_answer_only_until_its_hold_ends() -> None:
    """message_start is the upstream's first byte: a model slow to begin its answer gets the
    role chunk out by `hold_until`, within the first-byte deadline, and nothing read is lost."""
    upstream = Arriving()
    loop = asyncio.get_running_loop()
    reply = AnthropicAsChat(upstream, include_usage=False, hold_until=loop.time() + 0.05)  # type: ignore[arg-type]
    upstream.reads.put_nowait(START)
    first = await asyncio.wait_for(reply.next_chunk(), 2)
    assert b'"role":"assistant"' in first and b'"content":""' in first
    upstream.reads.put_nowait(TEXT)
    assert b'"role"' not in (second := await reply.next_chunk()) and b'"content":"Hi"' in second


def test_a_reloaded_router_shows_the_breakers_of_upstreams_it_adds_at_once() -> None:
    """SPEC §13's circuit_state has one series per upstream from start-up: an upstream that a
    SIGHUP adds shows closed from the reload on, not only after its first request."""
    made: list[str] = []
    breakers = Breakers(1, 10, on_change=lambda name, event, state: made.append(name) if event is None else None)
    table = RouteTable({"a": UPSTREAMS["a"]}, (Route("*", (Target(UPSTREAMS["a"]),)),))
    Router(table, breakers, 5.0)
    assert made == ["a"]
    wider = RouteTable(UPSTREAMS, (Route("*", (Target(UPSTREAMS["a"]), Target(UPSTREAMS["b"]))),))
    Router(table, breakers, 5.0).reloaded(wider)
    assert sorted(made) == ["a", "b", "c", "claude"]  # every upstream named in the file, used or not
