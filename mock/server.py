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
TLS_CERT and TLS_KEY (PEM files) serve it over https.

Anthropic's Messages API (POST /v1/messages) takes the same latency, chunk-delay, echo, reply,
deltas, status (its error shape; 429 and 529 carry retry-after, x-mock-retry-after to choose)
and die-after knobs, plus x-mock-tool-input (a JSON object: a tool_use block whose input is
streamed as input_json_delta in three pieces, or in the exact pieces of x-mock-tool-deltas, a
JSON array), x-mock-error-after (after N text deltas, Anthropic's own `event: error`,
overloaded_error, and the end of the stream), x-mock-thinking (a thinking block before the
text, its text streamed as thinking_delta, then x-mock-signature as signature_delta),
x-mock-stop-reason, x-mock-usage (a JSON object merged into message_start's usage),
x-mock-delta-usage (a JSON object merged into message_delta's usage) and x-mock-no-done (end
the body cleanly before message_delta and message_stop). A request whose tool_choice forces a
tool ("tool", or "any": x-mock-tool-name's, else the first) is answered as Anthropic answers it:
that tool's call alone, no text before it, its input x-mock-tool-input's (or pieces) or a value
made from the tool's input_schema, streamed after an empty input_json_delta.

The Responses API (POST /v1/responses), embeddings and GET /v1/models: see openai_apis.py.

What it saw, for tests: GET /_mock/requests (headers and body of recent requests),
GET /_mock/events (client disconnects), DELETE /_mock/requests (forget both).

Faults of this instance, whatever the request's headers say (so a test can fail one upstream
of several and watch traffic move): POST /_mock/fault with a JSON object — `status` (answer
with it, in the route's error shape; `retry_after` adds that Retry-After), `latency_ms` (before
answering), `drop` (true: close the connection without an answer), `die_after` (a stream's
connection closes after N deltas), `count` (only the next N requests; then the fault is
gone) — and DELETE /_mock/fault to heal. Faulted requests are recorded like any other.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import secrets
import ssl
import time
import uuid
from collections import deque
from typing import Any, overload

import openai_apis  # beside this file: the mock runs as a script (python mock/server.py)
from aiohttp import web

DEFAULT_REPLY = "Hello! This is a mock response from the upstream."
SEEN: web.AppKey[deque[dict[str, Any]]] = web.AppKey("seen", deque)
EVENTS: web.AppKey[list[dict[str, Any]]] = web.AppKey("events", list)
FAULT: web.AppKey[dict[str, Any]] = web.AppKey("fault", dict)


def _knob(request: web.Request, header: str, env: str, default: str) -> str:
    return _header(request, header) or os.environ.get(env) or default


@overload
def _header(request: web.Request, name: str) -> str | None: ...
@overload
def _header(request: web.Request, name: str, default: str) -> str: ...
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

    injected = await _injected(request, openai_error)
    if injected is not None:
        return injected
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
    die_after = request[DIE_AFTER] if DIE_AFTER in request else int(_header(request, "x-mock-die-after", "-1"))
    content_type = _header(request, "x-mock-stream-type", "text/event-stream")
    response = web.StreamResponse(headers={"Content-Type": content_type, "Cache-Control": "no-cache", **cookie})
    await response.prepare(request)

    wants_usage = bool((body.get("stream_options") or {}).get("include_usage"))

    def event(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        # OpenAI's layout: compact JSON, service_tier and system_fingerprint on every chunk,
        # "usage": null on each when usage was asked for, and an "obfuscation" padding field
        # whose length varies from chunk to chunk.
        chunk = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "service_tier": "default",
            "system_fingerprint": "fp_mock0001",
            "choices": choices,
            **({"usage": None} if wants_usage else {}),
            **extra,
        }
        chunk["obfuscation"] = secrets.token_urlsafe(random.randint(1, 12))[: random.randint(1, 16)]
        return b"data: " + _compact(chunk) + b"\n\n"

    try:
        await response.write(
            event(
                [
                    {
                        "index": i,
                        "delta": {"role": "assistant", "content": "", "refusal": None},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                    for i in range(n)
                ]
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
                event(
                    [
                        {"index": i, "delta": {"content": delta}, "logprobs": None, "finish_reason": None}
                        for i in range(n)
                    ]
                )
            )
        await response.write(
            event([{"index": i, "delta": {}, "logprobs": None, "finish_reason": "stop"} for i in range(n)])
        )
        if wants_usage:
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


ANTHROPIC_ERRORS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}


def _anthropic_user_text(body: dict[str, Any]) -> str:
    for message in reversed(body.get("messages") or []):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                return "".join(b.get("text", "") for b in content if isinstance(b, dict) and b.get("type") == "text")
    return ""


def _compact(value: Any) -> bytes:
    """Compact JSON as the providers send it: UTF-8 as is, escapes only where UTF-8 has no
    form (a lone surrogate, half an emoji, goes out as its \\u escape)."""
    try:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return json.dumps(value, separators=(",", ":")).encode()


def _sse(event: str, data: dict[str, Any]) -> bytes:
    """An event as Anthropic's API writes it: compact JSON padded with spaces before its last
    brace (1 to 15 of them, so that an event's length does not give its text away), and the
    ping spaced: `{"type": "ping"}`."""
    if event == "ping":
        return b'event: ping\ndata: {"type": "ping"}\n\n'
    body = _compact(data)
    pad = b" " * (1 + len(body) * 7 % 15)
    return f"event: {event}\ndata: ".encode() + body[:-1] + pad + b"}\n\n"


async def messages(request: web.Request) -> web.StreamResponse:
    """Anthropic's Messages API: a JSON reply, or its event stream (message_start,
    content_block_start/delta/stop for text and, with x-mock-tool-input, a tool_use block with
    input_json_delta, ping, message_delta with usage and stop_reason, message_stop)."""
    raw = await request.read()
    try:
        body = json.loads(raw)
    except ValueError:
        error = {"type": "error", "error": {"type": "invalid_request_error", "message": "bad json"}}
        return web.json_response(error, status=400)
    request_id = uuid.uuid4().hex
    request.app[SEEN].append(
        {
            "id": request_id,
            "headers": dict(request.headers),
            "header_list": list(request.headers.items()),
            "body": body,
            "at": time.time(),
            "path": request.path,
        }
    )
    injected = await _injected(request, anthropic_error)
    if injected is not None:
        return injected
    latency = int(_knob(request, "x-mock-latency-ms", "LATENCY_MS", "0")) / 1000
    if latency:
        await asyncio.sleep(latency)
    status = int(_header(request, "x-mock-status", "200") or "200")
    if status != 200:
        kind = ANTHROPIC_ERRORS.get(status, "api_error")
        headers = {"retry-after": _header(request, "x-mock-retry-after") or "1"} if status in (429, 529) else {}
        error = {"type": "error", "error": {"type": kind, "message": f"mock upstream error {status}"}}
        return web.json_response(error, status=status, headers=headers)
    exact = _header(request, "x-mock-deltas")
    if exact:
        deltas = [str(d) for d in json.loads(exact)]
    else:
        text = (
            _anthropic_user_text(body)
            if _knob(request, "x-mock-echo", "MOCK_ECHO", "0") == "1"
            else (_knob(request, "x-mock-reply", "MOCK_REPLY", DEFAULT_REPLY))
        )
        deltas = _words(text)
    tool_input = _header(request, "x-mock-tool-input")  # a JSON object's text, streamed in pieces
    tool_pieces = _header(request, "x-mock-tool-deltas")  # or exactly these pieces of it
    pieces: list[str] = []
    if tool_pieces:
        pieces = [str(p) for p in json.loads(tool_pieces)]
        tool_input = "".join(pieces)
    elif tool_input:
        step = max(1, len(tool_input) // 3)
        pieces = [tool_input[at : at + step] for at in range(0, len(tool_input), step)]
    # A forced tool (tool_choice "tool", or "any"): Anthropic answers with that tool's call
    # alone, no text before it (it prefills the turn), its input made from the tool's schema
    # unless x-mock-tool-input says what it is.
    forced = _forced_tool(request, body)
    if forced is not None and not tool_input:
        tool_input = json.dumps(_example(forced.get("input_schema"), forced.get("input_schema")))
        step = max(1, len(tool_input) // 3)
        pieces = [tool_input[at : at + step] for at in range(0, len(tool_input), step)]
    tool_name = str(forced.get("name")) if forced is not None else "lookup"
    if forced is not None:
        deltas = []  # no text block: the forced call is the whole answer
    thinking = _header(request, "x-mock-thinking")
    signature = _header(request, "x-mock-signature", "EqQBCkYIARgCIkDmockSignature==")
    model = body.get("model", "claude-sonnet-4-5")
    message_id = "msg_" + request_id[:24]
    usage_in = {"input_tokens": 21, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 4, "output_tokens": 1}
    usage_in |= json.loads(_header(request, "x-mock-usage") or "{}")
    out_tokens = len(deltas) + (3 if tool_input else 0) + (len(_words(thinking)) if thinking else 0)
    stop_reason = _header(request, "x-mock-stop-reason") or ("tool_use" if tool_input else "end_turn")
    if body.get("stream") is not True:
        content: list[dict[str, Any]] = []
        if thinking is not None:
            content.append({"type": "thinking", "thinking": thinking, "signature": signature})
        if forced is None:
            content.append({"type": "text", "text": "".join(deltas)})
        if tool_input:
            content.append(
                {"type": "tool_use", "id": "toolu_mock1", "name": tool_name, "input": json.loads(tool_input)}
            )
        return web.json_response(
            {
                "id": message_id,
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": content,
                "stop_reason": stop_reason,
                "stop_sequence": None,
                "usage": {**usage_in, "output_tokens": out_tokens},
            },
            dumps=lambda value: _compact(value).decode(),
        )
    chunk_delay = int(_knob(request, "x-mock-chunk-delay-ms", "CHUNK_DELAY_MS", "120")) / 1000
    die_after = request[DIE_AFTER] if DIE_AFTER in request else int(_header(request, "x-mock-die-after", "-1") or "-1")
    error_after = int(_header(request, "x-mock-error-after", "-1") or "-1")
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)

    def block_start(index: int, block: dict[str, Any]) -> bytes:
        return _sse("content_block_start", {"type": "content_block_start", "index": index, "content_block": block})

    def block_delta(index: int, delta: dict[str, Any]) -> bytes:
        return _sse("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta})

    def block_stop(index: int) -> bytes:
        return _sse("content_block_stop", {"type": "content_block_stop", "index": index})

    try:
        await response.write(
            _sse(
                "message_start",
                {
                    "type": "message_start",
                    "message": {
                        "id": message_id,
                        "type": "message",
                        "role": "assistant",
                        "model": model,
                        "content": [],
                        "stop_reason": None,
                        "stop_sequence": None,
                        "usage": usage_in,
                    },
                },
            )
        )
        index = 0
        # As Anthropic does: one ping after the first content_block_start.
        if thinking is not None:
            await response.write(block_start(index, {"type": "thinking", "thinking": "", "signature": ""}))
            await response.write(_sse("ping", {"type": "ping"}))
            for piece in _words(thinking):
                await response.write(block_delta(index, {"type": "thinking_delta", "thinking": piece}))
            await response.write(block_delta(index, {"type": "signature_delta", "signature": signature}))
            await response.write(block_stop(index))
            index += 1
        if forced is None:
            await response.write(block_start(index, {"type": "text", "text": ""}))
        if thinking is None:
            await response.write(_sse("ping", {"type": "ping"}))
        for number, delta in enumerate(deltas):
            if number == die_after:
                assert request.transport is not None
                request.transport.close()
                return response
            if number == error_after:  # as Anthropic ends a stream it cannot finish
                error = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
                await response.write(_sse("error", error))
                await response.write_eof()
                return response
            if chunk_delay:
                await asyncio.sleep(chunk_delay)
            await response.write(block_delta(index, {"type": "text_delta", "text": delta}))
        if forced is None:
            await response.write(block_stop(index))
            index += 1
        if tool_input:
            await response.write(
                block_start(index, {"type": "tool_use", "id": "toolu_mock1", "name": tool_name, "input": {}})
            )
            # Anthropic's first input_json_delta of a tool_use block is empty.
            for piece in ["", *pieces] if forced is not None else pieces:
                await response.write(block_delta(index, {"type": "input_json_delta", "partial_json": piece}))
            await response.write(block_stop(index))
        if _header(request, "x-mock-no-done") is not None:  # a clean end, but before message_delta and message_stop
            await response.write_eof()
            return response
        delta_usage = {"output_tokens": out_tokens} | json.loads(_header(request, "x-mock-delta-usage") or "{}")
        await response.write(
            _sse(
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                    "usage": delta_usage,
                },
            )
        )
        await response.write(_sse("message_stop", {"type": "message_stop"}))
        await response.write_eof()
    except (asyncio.CancelledError, ConnectionError) as exc:
        request.app[EVENTS].append(
            {"id": request_id, "event": "client_disconnected", "at": time.time(), "error": type(exc).__name__}
        )
        raise
    return response


DIE_AFTER: web.RequestKey[int] = web.RequestKey("die_after", int)


def _forced_tool(request: web.Request, body: dict[str, Any]) -> dict[str, Any] | None:
    """The tool the request's tool_choice makes the model call: the named one ("tool"), or
    for "any" the one x-mock-tool-name names, else the first; None when the choice forces none."""
    choice = body.get("tool_choice")
    tools = [tool for tool in body.get("tools") or () if isinstance(tool, dict)]
    if not isinstance(choice, dict):
        return None
    kind = choice.get("type")
    if kind == "tool":
        name = choice.get("name")
    elif kind == "any" and tools:
        name = _header(request, "x-mock-tool-name") or tools[0].get("name")
    else:
        return None
    return next((tool for tool in tools if tool.get("name") == name), {"name": name})


# $refs followed on one path: a recursive model (a tree, a linked list) ends there, with an
# empty array or the null its anyOf allows.
_MAX_REFS = 3


def _example(schema: Any, root: Any, refs: int = 0) -> Any:
    """A value that follows a JSON schema (the kinds pydantic writes: objects, $refs to $defs,
    anyOf, enums, arrays, scalars), as a model forced to call that tool would fill it."""
    if not isinstance(schema, dict):
        return {}
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#") and isinstance(root, dict):
        if refs >= _MAX_REFS:
            return {}
        target: Any = root
        for part in ref[2:].split("/") if ref != "#" else ():
            target = target.get(part) if isinstance(target, dict) else None
        return _example(target, root, refs + 1)
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    if "const" in schema:
        return schema["const"]
    for key in ("anyOf", "oneOf", "allOf"):
        options = schema.get(key)
        if isinstance(options, list) and options:
            deep = refs >= _MAX_REFS - 1  # the null a recursive field allows, before the bound
            nulls = [o for o in options if isinstance(o, dict) and o.get("type") == "null"]
            return _example(nulls[0] if deep and nulls else options[0], root, refs)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "array":
        return [] if refs >= _MAX_REFS - 1 else [_example(schema.get("items"), root, refs)]
    if kind == "string":
        return "mock"
    if kind == "integer":
        return 1
    if kind == "number":
        return 1.5
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    properties = schema.get("properties")
    return {name: _example(value, root, refs) for name, value in (properties or {}).items()}


def openai_error(status: int) -> dict[str, Any]:
    return {"error": {"message": f"mock upstream error {status}", "type": "mock_error", "code": str(status)}}


def anthropic_error(status: int) -> dict[str, Any]:
    kind = ANTHROPIC_ERRORS.get(status, "overloaded_error" if status == 529 else "api_error")
    return {"type": "error", "error": {"type": kind, "message": f"mock upstream error {status}"}}


async def _injected(request: web.Request, error_body: Any) -> web.StreamResponse | None:
    """This instance's fault (POST /_mock/fault) applied to a request: its answer, or None to
    answer as usual (a `die_after` is left on the request for the stream to act on)."""
    fault = request.app[FAULT]
    if not fault:
        return None
    if "count" in fault:
        fault["count"] -= 1
        if fault["count"] <= 0:
            fault = dict(fault)
            request.app[FAULT].clear()  # this request is the last one it applies to
    if fault.get("latency_ms"):
        await asyncio.sleep(fault["latency_ms"] / 1000)
    if fault.get("drop"):
        assert request.transport is not None
        request.transport.close()  # no status line, no body: a connection failure upstream
        return web.Response()
    if fault.get("die_after") is not None:
        request[DIE_AFTER] = int(fault["die_after"])
    status = fault.get("status")
    if status:
        headers = {"retry-after": str(fault["retry_after"])} if fault.get("retry_after") is not None else {}
        return web.json_response(error_body(int(status)), status=int(status), headers=headers)
    return None


async def set_fault(request: web.Request) -> web.Response:
    fault = await request.json()
    request.app[FAULT].clear()
    request.app[FAULT].update(fault)
    return web.json_response(request.app[FAULT])


async def heal(request: web.Request) -> web.Response:
    request.app[FAULT].clear()
    return web.Response(status=204)


def _words(text: str) -> list[str]:
    """A text in the pieces a model streams: each word with the spaces after it."""
    return re.findall(r"\S+\s*|\s+", text) or [""]


async def seen(request: web.Request) -> web.Response:
    recent = request.app[SEEN]
    return web.json_response(list(recent))


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
    app[FAULT] = {}
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/messages", messages)
    openai_apis.add_routes(app, SEEN, EVENTS)
    app.router.add_get("/_mock/requests", seen)
    app.router.add_get("/_mock/events", events)
    app.router.add_delete("/_mock/requests", forget)
    app.router.add_post("/_mock/fault", set_fault)
    app.router.add_delete("/_mock/fault", heal)
    return app


def main() -> None:
    port = int(os.environ.get("PORT", "4000"))
    host = os.environ.get("HOST", "127.0.0.1")
    # TLS_CERT and TLS_KEY (PEM files): served over https, as the real providers are.
    cert, key = os.environ.get("TLS_CERT"), os.environ.get("TLS_KEY")
    context = None
    if cert and key:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert, key)
    print(f"mock upstream on {'https' if context else 'http'}://{host}:{port}", flush=True)
    web.run_app(
        create_mock_app(),
        host=host,
        port=port,
        print=None,
        access_log=None,
        handler_cancellation=True,
        ssl_context=context,
    )


if __name__ == "__main__":
    main()
