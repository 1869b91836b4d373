"""Review of the day's merged fixes (8b02d8f..f53c036): regressions in the fixes themselves,
each found against the running gateway first (the gateway in process here, in front of a
hostile upstream: tests/test_adversarial.py's fixtures)."""

from __future__ import annotations

import asyncio

import pytest

from tests.test_adversarial import (  # noqa: F401  (fixtures)
    ANTHROPIC_START,
    GatewayFactory,
    Hostile,
    anthropic_ev,
    events_answer,
    hostile,
    start,
)

PING = anthropic_ev({"type": "ping"})


async def test_a_preamble_that_never_ends_is_not_held_without_bound(
    start: GatewayFactory,  # noqa: F811
    hostile: Hostile,  # noqa: F811
) -> None:
    """message_start (and the pings after it) wait for the answer's first event, up to half
    TIMEOUT_SECS. An upstream that sent pings without end had all of them held in memory for that
    long, every read rescanning all it held (healthz 0.3-0.8 s late, RSS doubled, against the real
    gateway with 25-50 MB of pings): the hold now ends once it holds more than a preamble does."""
    stall = asyncio.Event()
    gw = await start(TIMEOUT_SECS="20")  # held up to 10 s
    hostile.answer = events_answer(ANTHROPIC_START + PING * 4000, stall=stall)  # ~120 KiB of pings
    body = {"model": "claude-x", "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 10}
    try:
        async with asyncio.timeout(3):
            async with gw.client.post("/v1/messages", json=body) as response:
                assert response.status == 200
                assert (await response.content.readuntil(b"\n\n")).startswith(b"event: message_start")
    finally:
        stall.set()


COMMENT = b": OPENROUTER PROCESSING\n\n"
CHAT_ERROR = b'data: {"error":{"message":"overloaded","type":"server_error"}}\n\n'


async def test_an_unrouted_stream_failing_after_a_comment_releases_its_reservation_in_two_reads(
    start: GatewayFactory,  # noqa: F811
    hostile: Hostile,  # noqa: F811
) -> None:
    """SPEC §14: an upstream's error answer charges nothing. Without ROUTES_FILE, a chat stream
    whose upstream sent a keep-alive comment and then its error released the reservation when
    the two came in one read, and held it to the window's end (501 of 10000) when they came in
    two: only /v1/messages' message_start was held for the answer's first event there (2a72ca6),
    not the comments 14f59ea holds on routed streams. Found against the real gateway."""

    gw = await start(TOKEN_QUOTA="10000")

    hostile.answer = events_answer(COMMENT, CHAT_ERROR, pause=0.05)
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 500}
    for _ in range(2):
        async with gw.client.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer t"}) as response:
            data = await response.read()
            assert response.status == 200 and data == COMMENT + CHAT_ERROR
            assert response.headers["x-ratelimit-remaining-tokens"] == str(10000 - 501)


async def test_a_client_that_leaves_while_message_start_is_held_is_logged_with_its_first_byte_time(
    start: GatewayFactory,  # noqa: F811
    hostile: Hostile,  # noqa: F811
) -> None:
    """The upstream's first-byte time is logged whether message_start was held or not (2a72ca6);
    but it was written only once the hold had ended, so a client that left meanwhile (or an
    upstream that broke then) was logged with upstream_ttfb_ms null, as if the upstream had never
    answered. Found against the real gateway: a 499 after 1 s, message_start read at once."""
    import json

    stall = asyncio.Event()
    gw = await start(TIMEOUT_SECS="20")
    hostile.answer = events_answer(ANTHROPIC_START, stall=stall)
    body = {"model": "claude-x", "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 10}
    try:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.5):
                await gw.client.post("/v1/messages", json=body)
        for _ in range(50):  # the line is written once the handler is done, and flushed within 100 ms
            await asyncio.sleep(0.05)
            if gw.log.getvalue():
                break
    finally:
        stall.set()
    line = json.loads(gw.log.getvalue().splitlines()[0])
    assert line["status"] == 499
    assert line["upstream_ttfb_ms"] is not None and line["upstream_ttfb_ms"] < 400


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/models"])
async def test_an_egress_proxys_407_reaches_the_client_as_a_502(
    start: GatewayFactory,  # noqa: F811
    hostile: Hostile,  # noqa: F811
    path: str,
) -> None:
    """SPEC §5: the upstream's 401/403 become a 502, so a gateway misconfiguration is not reported
    as the client's fault. Through HTTP_PROXY (91117cc) an http:// upstream's request goes to the
    proxy itself, whose 407 for missing or wrong credentials was relayed as the client's own
    status: 'Proxy Authentication Required', which HTTP clients take for their own proxy's
    demand (an https upstream's CONNECT refused the same way was already a 502). Found against
    the real gateway and a forward proxy that answers 407."""
    from aiohttp import web

    async def answer(request: web.Request) -> web.StreamResponse:
        return web.json_response({"error": {"message": "proxy auth required"}}, status=407)

    gw = await start()
    hostile.answer = answer
    if path == "/v1/models":
        response = await gw.client.get(path)
    else:
        response = await gw.client.post(path, json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert response.status == 502
    assert (await response.json())["error"]["code"] == "upstream_auth_rejected"


async def test_a_preamble_trickled_a_byte_a_read_is_looked_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hold looked at everything it held again after every read: comments trickled a byte
    a read made that quadratic (20 s of the event loop for the first 13 KB). Each event is now
    looked at once: the check runs as many times as there are events, not reads times events."""
    from gateway import proxy
    from gateway.relay import StreamRelay

    comments = COMMENT * 500  # ~12 KB, one byte a read
    reads = [comments[i : i + 1] for i in range(len(comments))] + [CHAT_ERROR]

    class Trickle:
        async def next_chunk(self) -> bytes:
            return reads.pop(0) if reads else b""

    looked = 0
    is_preamble = proxy._is_preamble

    def counted(first: bytes, at: int, end: int) -> bool:
        nonlocal looked
        looked += 1
        return is_preamble(first, at, end)

    monkeypatch.setattr(proxy, "_is_preamble", counted)
    relay = StreamRelay(None, None)
    first = relay.feed(reads.pop(0))
    while not first:
        first = relay.feed(reads.pop(0))
    held, answer_at = await proxy._past_preamble(
        Trickle(),  # type: ignore[arg-type]
        relay,
        first,
        asyncio.get_running_loop().time() + 30,
        lambda noted: None,  # type: ignore[arg-type,return-value]
    )
    assert held == comments + CHAT_ERROR  # held to the answer's first event, the error
    assert held[answer_at:] == CHAT_ERROR
    assert looked <= 2 * 500 + 2
