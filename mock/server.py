"""A fake OpenAI Chat Completions upstream for local runs and tests (imports nothing from gateway/).

Knobs (environment): PORT (4000), LATENCY_MS (first-byte delay, 0), CHUNK_DELAY_MS (delay
between streamed deltas, 120), MOCK_ECHO=1 (reply with the last user message), MOCK_REPLY.
The same knobs per request, as headers (`x-mock-NAME`, or `x-stainless-mock-NAME` through the
gateway, whose allow-list passes the X-Stainless-* family): x-mock-latency-ms,
x-mock-chunk-delay-ms, x-mock-echo, x-mock-reply, plus x-mock-deltas (a JSON array of
exact deltas), x-mock-status (answer with that status and an OpenAI-style error),
x-mock-die-after (drop the connection after N deltas), x-mock-no-done (end without [DONE]),
x-mock-done-delay-ms (send the chunked terminator that long after [DONE]), x-mock-set-cookie
(answer with that Set-Cookie, as a provider's load balancer does), x-mock-answer (json or
events: answer so whatever the request's "stream" says, as servers that cannot stream or always
do), x-mock-stream-type (the Content-Type of a stream, text/event-stream unless set).

What it saw, for tests: GET /_mock/requests (headers and body of recent requests),
GET /_mock/events (client disconnects), DELETE /_mock/requests (forget both).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
import uuid
from collections import deque
from typing import Any

from aiohttp import web

DEFAULT_REPLY = "Hello! This is a mock response from the upstream."
SEEN: web.AppKey[deque[dict[str, Any]]] = web.AppKey("seen", deque)
EVENTS: web.AppKey[list[dict[str, Any]]] = web.AppKey("events", list)


def _knob(request: web.Request, header: str, env: str, default: str) -> str:
    return _header(request, header) or os.environ.get(env) or default


def _header(request: web.Request, name: str, default: str | None = None) -> str | None:
    """A knob header: `x-mock-NAME`, or `x-stainless-mock-NAME` — the form that passes through
    the gateway, whose header allow-list forwards the X-Stainless-* family (SPEC §5)."""
    headers = request.headers
    return headers.get(name) or headers.get("x-stainless-" + name[2:]) or default


def _last_user_text(messages: Any) -> str:
    for message in reversed(messages if isinstance(messages, list) else []):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def _deltas(request: web.Request, body: dict[str, Any]) -> list[str]:
    exact = _header(request, "x-mock-deltas")
    if exact:
        return [str(d) for d in json.loads(exact)]
    if _knob(request, "x-mock-echo", "MOCK_ECHO", "0") == "1":
        text = _last_user_text(body.get("messages"))
    else:
        text = _knob(request, "x-mock-reply", "MOCK_REPLY", DEFAULT_REPLY)
    return re.findall(r"\S+\s*|\s+", text) or [""]


async def chat(request: web.Request) -> web.StreamResponse:
    raw = await request.read()
    try:
        body = json.loads(raw)
    except ValueError:
        return web.json_response({"error": {"message": "bad json", "type": "invalid_request_error"}}, status=400)
    request_id = uuid.uuid4().hex
    request.app[SEEN].append(
        {
            "id": request_id,
            "headers": dict(request.headers),
            "header_list": list(request.headers.items()),  # repeated headers show here
            "peer": list(request.transport.get_extra_info("peername") or ()) if request.transport else [],
            "body": body,
            "at": time.time(),
        }
    )

    latency = int(_knob(request, "x-mock-latency-ms", "LATENCY_MS", "0")) / 1000
    if latency:
        await asyncio.sleep(latency)
    status = int(_header(request, "x-mock-status", "200"))
    if status != 200:
        error = {"error": {"message": f"mock upstream error {status}", "type": "mock_error", "code": str(status)}}
        return web.json_response(error, status=status)

    model = body.get("model", "gpt-4o-mini")
    deltas = _deltas(request, body)
    n = int(body.get("n") or 1)
    completion_id = "chatcmpl-" + request_id[:24]
    created = int(time.time())
    usage = {"prompt_tokens": 9, "completion_tokens": len(deltas), "total_tokens": 9 + len(deltas)}
    set_cookie = _header(request, "x-mock-set-cookie")
    cookie = {"Set-Cookie": set_cookie} if set_cookie is not None else {}
    answer = _header(request, "x-mock-answer") or ("events" if body.get("stream") is True else "json")
    if answer == "json":
        choices = [
            {"index": i, "message": {"role": "assistant", "content": "".join(deltas)}, "finish_reason": "stop"}
            for i in range(n)
        ]
        return web.json_response(
            {
                "id": completion_id,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": choices,
                "usage": usage,
            },
            headers=cookie,
        )

    chunk_delay = int(_knob(request, "x-mock-chunk-delay-ms", "CHUNK_DELAY_MS", "120")) / 1000
    die_after = int(_header(request, "x-mock-die-after", "-1"))
    content_type = _header(request, "x-mock-stream-type", "text/event-stream")
    response = web.StreamResponse(headers={"Content-Type": content_type, "Cache-Control": "no-cache", **cookie})
    await response.prepare(request)

    def event(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        chunk = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": choices,
            **extra,
        }
        return b"data: " + json.dumps(chunk).encode() + b"\n\n"

    try:
        await response.write(
            event(
                [{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None} for i in range(n)]
            )
        )
        for number, delta in enumerate(deltas):
            if number == die_after:
                assert request.transport is not None
                request.transport.close()  # mid-stream death: no terminating chunk
                return response
            if chunk_delay:
                await asyncio.sleep(chunk_delay)
            await response.write(
                event([{"index": i, "delta": {"content": delta}, "finish_reason": None} for i in range(n)])
            )
        await response.write(event([{"index": i, "delta": {}, "finish_reason": "stop"} for i in range(n)]))
        if (body.get("stream_options") or {}).get("include_usage"):
            await response.write(event([], usage=usage))
        if _header(request, "x-mock-no-done") is None:
            await response.write(b"data: [DONE]\n\n")
        # The chunked terminator may trail [DONE] in a later packet, as real upstreams' does.
        await asyncio.sleep(int(_header(request, "x-mock-done-delay-ms", "0")) / 1000)
        await response.write_eof()
    except (asyncio.CancelledError, ConnectionError) as exc:
        request.app[EVENTS].append(
            {"id": request_id, "event": "client_disconnected", "at": time.time(), "error": type(exc).__name__}
        )
        raise
    return response


async def seen(request: web.Request) -> web.Response:
    return web.json_response(list(request.app[SEEN]))


async def events(request: web.Request) -> web.Response:
    return web.json_response(request.app[EVENTS])


async def forget(request: web.Request) -> web.Response:
    request.app[SEEN].clear()
    request.app[EVENTS].clear()
    return web.Response(status=204)


def create_mock_app() -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[SEEN] = deque(maxlen=1000)
    app[EVENTS] = []
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/_mock/requests", seen)
    app.router.add_get("/_mock/events", events)
    app.router.add_delete("/_mock/requests", forget)
    return app


def main() -> None:
    port = int(os.environ.get("PORT", "4000"))
    host = os.environ.get("HOST", "127.0.0.1")
    print(f"mock upstream on http://{host}:{port}", flush=True)
    web.run_app(create_mock_app(), host=host, port=port, print=None, access_log=None, handler_cancellation=True)


if __name__ == "__main__":
    main()
