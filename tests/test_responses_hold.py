"""/v1/responses streams that fail right after they open: `response.created` (and
`response.in_progress`) come first on every Responses stream, before the answer and before a
failure alike, as Anthropic's message_start does on /v1/messages (the gateway in process here,
in front of a hostile upstream: tests/test_adversarial.py's fixtures)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from aiohttp import web

from tests.test_adversarial import (  # noqa: F401  (fixtures)
    GatewayFactory,
    Hostile,
    anthropic_ev,
    events_answer,
    hostile,
    start,
)

RESPONSE: dict[str, Any] = {
    "id": "resp_1",
    "object": "response",
    "created_at": 1767225600,
    "status": "in_progress",
    "model": "gpt-4o-2024-08-06",
    "output": [],
    "usage": None,
}
CREATED = anthropic_ev({"type": "response.created", "sequence_number": 0, "response": RESPONSE})
IN_PROGRESS = anthropic_ev({"type": "response.in_progress", "sequence_number": 1, "response": RESPONSE})
# OpenAI's two ways to end a stream that fails: an `error` event, or `response.failed`.
ERROR = anthropic_ev(
    {
        "type": "error",
        "sequence_number": 2,
        "code": "server_error",
        "message": "The server had an error while processing your request.",
        "param": None,
    }
)
FAILED = anthropic_ev(
    {
        "type": "response.failed",
        "sequence_number": 2,
        "response": {**RESPONSE, "status": "failed", "error": {"code": "server_error", "message": "overloaded"}},
    }
)
MESSAGE_ADDED = anthropic_ev(
    {
        "type": "response.output_item.added",
        "sequence_number": 2,
        "output_index": 0,
        "item": {"id": "msg_1", "type": "message", "status": "in_progress", "role": "assistant", "content": []},
    }
)
USAGE = {"input_tokens": 1, "output_tokens": 0, "total_tokens": 1}
COMPLETED = anthropic_ev(
    {
        "type": "response.completed",
        "sequence_number": 3,
        "response": {**RESPONSE, "status": "completed", "usage": USAGE},
    }
)
BODY = {"model": "gpt-4o", "input": "hi", "stream": True, "max_output_tokens": 500}  # estimate 1 + 500


@pytest.mark.parametrize("failure", [ERROR, FAILED], ids=["error", "response.failed"])
@pytest.mark.parametrize("pause", [0.0, 0.05], ids=["one-read", "two-reads"])
async def test_a_responses_stream_failing_after_response_created_releases_its_reservation(
    start: GatewayFactory,  # noqa: F811
    hostile: Hostile,  # noqa: F811
    failure: bytes,
    pause: float,
) -> None:
    """SPEC §14: an upstream failure charges nothing. A Responses stream that failed right after
    response.created held the whole estimate to the window's end (501 of 10000, for nothing),
    however the reads fell: only message_start and comments were held for the answer."""
    gw = await start(TOKEN_QUOTA="10000")
    hostile.answer = events_answer(CREATED + IN_PROGRESS, failure, pause=pause)
    for _ in range(2):
        async with gw.client.post("/v1/responses", json=BODY, headers={"Authorization": "Bearer t"}) as response:
            data = await response.read()
            assert response.status == 200 and data == CREATED + IN_PROGRESS + failure
            assert response.headers["x-ratelimit-remaining-tokens"] == str(10000 - 501)  # the first released


async def test_a_responses_stream_echoing_long_instructions_is_held_as_well(
    start: GatewayFactory,  # noqa: F811
    hostile: Hostile,  # noqa: F811
) -> None:
    """response.created and response.in_progress each echo the request's instructions and tools
    (an agent's are tens of KB): two copies of 40 KB passed the 64 KiB a preamble of
    message_start and comments is held to, so that stream's failure kept its estimate."""
    gw = await start(TOKEN_QUOTA="100000")
    instructions = "Follow the rules. " * 2300  # 41,400 characters: 10,350 tokens
    echoed = {**RESPONSE, "instructions": instructions}
    created = anthropic_ev({"type": "response.created", "sequence_number": 0, "response": echoed})
    in_progress = anthropic_ev({"type": "response.in_progress", "sequence_number": 1, "response": echoed})
    hostile.answer = events_answer(created + in_progress, ERROR, pause=0.05)
    body = {**BODY, "instructions": instructions}
    estimate = 1 + len(instructions) // 4 + 500  # "hi" and the instructions, / 4 rounded up once
    for _ in range(2):
        async with gw.client.post("/v1/responses", json=body, headers={"Authorization": "Bearer t"}) as response:
            assert (await response.read()).endswith(ERROR)
            assert response.headers["x-ratelimit-remaining-tokens"] == str(100000 - estimate)  # the first released


@pytest.mark.parametrize("failure", [ERROR, FAILED], ids=["error", "response.failed"])
async def test_a_whole_reply_that_came_as_a_failing_stream_releases_its_reservation(
    start: GatewayFactory,  # noqa: F811
    hostile: Hostile,  # noqa: F811
    failure: bytes,
) -> None:
    """An upstream that streams whatever was asked: a request without "stream" gets the events
    joined into the JSON it asked for, here the failure with the status its code stands for.
    One that failed right after response.created kept its whole estimate, where the same
    events as a stream released it."""
    gw = await start(TOKEN_QUOTA="10000")
    hostile.answer = events_answer(CREATED + IN_PROGRESS, failure)
    for _ in range(2):
        body = {**BODY, "stream": False}
        async with gw.client.post("/v1/responses", json=body, headers={"Authorization": "Bearer t"}) as response:
            error = (await response.json())["error"]
            assert response.status == 500 and error["code"] == "server_error", error
            assert response.headers["x-ratelimit-remaining-tokens"] == str(10000 - 501)  # the first released


async def test_a_stream_whose_chunked_framing_breaks_during_the_hold_is_an_upstream_failure(
    start: GatewayFactory,  # noqa: F811
    hostile: Hostile,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    """SPEC §5, §9: an upstream whose chunked framing breaks right after response.created (the
    connection left open) failed. aiohttp drops the connection and then answers the next read
    with RuntimeError("Connection closed."): the gateway took it for its own failure (found by
    sweep-f): an `internal gateway error` event and a traceback logged at ERROR."""
    stall = asyncio.Event()

    async def broken(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(CREATED)
        await asyncio.sleep(0.05)
        assert request.transport is not None
        request.transport.write(b"zz\r\nnot a chunk\r\n")  # no chunk size: the framing is broken
        await stall.wait()
        return response

    gw = await start(TOKEN_QUOTA="10000", TIMEOUT_SECS="1")
    hostile.answer = broken
    try:
        for _ in range(2):
            async with gw.client.post("/v1/responses", json=BODY, headers={"Authorization": "Bearer t"}) as response:
                data = await response.read()
                # aiohttp does not wake the read the hold waits in: the hold ends (TIMEOUT_SECS / 2),
                # the headers go, and the next read finds the connection gone.
                assert b"internal" not in data, data
                assert data.endswith(
                    b'"code":"upstream_stream_broken","message":"upstream stream ended unexpectedly",'
                    b'"param":null,"sequence_number":1}\n\n'
                ), data
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    finally:
        stall.set()
