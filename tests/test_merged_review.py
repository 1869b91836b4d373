"""Review of the day's merged fixes (8b02d8f..f53c036): regressions in the fixes themselves,
each found against the running gateway first (the gateway in process here, in front of a
hostile upstream: tests/test_adversarial.py's fixtures)."""

from __future__ import annotations

import asyncio

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
    from aiohttp import web

    gw = await start(TOKEN_QUOTA="10000")

    async def answer(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(COMMENT)
        await asyncio.sleep(0.05)
        await response.write(CHAT_ERROR)
        await response.write_eof()
        return response

    hostile.answer = answer
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 500}
    for _ in range(2):
        async with gw.client.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer t"}) as response:
            data = await response.read()
            assert response.status == 200 and data == COMMENT + CHAT_ERROR
            assert response.headers["x-ratelimit-remaining-tokens"] == str(10000 - 501)
