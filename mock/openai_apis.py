"""The mock's Responses API, embeddings and model list (imports nothing from gateway/).

POST /v1/responses answers a Response object, or with `"stream": true` OpenAI's event stream
(`event:` lines; type first, then the fields in alphabetical order, as OpenAI sends them now;
a sequence_number on every event; an `obfuscation` pad on deltas): response.created,
response.in_progress, then per output item output_item.added, content_part.added,
output_text.delta..., output_text.done, content_part.done, output_item.done, and last
response.completed (response.incomplete with x-mock-incomplete). Knobs as for chat
(x-mock-NAME or x-stainless-mock-NAME): latency-ms, chunk-delay-ms, echo (the last user input
text), reply, deltas (a JSON array of exact deltas), status (an OpenAI-style error with that
status), die-after (drop the connection after N deltas), error-after (after N deltas the API's
`error` event, and the end), no-done (end the body cleanly before the terminal event), answer
(json or events, whatever "stream" says), plus refusal
(the message is a refusal with this text, streamed as refusal deltas), tool-input (a JSON
object: a function_call item after the message, its arguments streamed in three pieces, or
in the exact pieces of tool-deltas, a JSON array), custom-tool-deltas (a JSON array: a
custom_tool_call item last, its input streamed in these pieces as
response.custom_tool_call_input.delta), incomplete (a reason: the response ends incomplete)
and trailing-done (1: a `data: [DONE]` after the terminal event, in the same write, as some
OpenAI-compatible servers send).

POST /v1/embeddings: deterministic vectors (`dimensions`, default 8), floats or base64 as
`encoding_format` asks; usage counts words (or tokens). GET /v1/models: a fixed list (GET
/v1/models/{model}: one of it, or 404). Both take the latency and status knobs.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import re
import secrets
import struct
import time
import uuid
from collections import deque
from typing import Any

from aiohttp import web

DEFAULT_REPLY = "Hello! This is a mock response from the upstream."
MODELS = ("gpt-4o-mini", "gpt-4o", "text-embedding-3-small", "meta-llama/Llama-3-8B")

Seen = web.AppKey[deque[dict[str, Any]]]
Events = web.AppKey[list[dict[str, Any]]]


def add_routes(app: web.Application, seen: Seen, events: Events) -> None:
    """The three routes on the mock's app; what they receive is recorded under `seen`, the
    client disconnects of streams under `events`."""

    async def record(request: web.Request, body: Any) -> str:
        request_id = uuid.uuid4().hex
        request.app[seen].append(
            {
                "id": request_id,
                "path": request.path,
                "method": request.method,
                "headers": dict(request.headers),
                "header_list": list(request.headers.items()),
                "body": body,
                "at": time.time(),
            }
        )
        latency = int(_knob(request, "x-mock-latency-ms", "LATENCY_MS", "0")) / 1000
        if latency:
            await asyncio.sleep(latency)
        return request_id

    async def responses(request: web.Request) -> web.StreamResponse:
        body = await _json_body(request)
        if body is None:
            return _error(400, "bad json")
        request_id = await record(request, body)
        status = int(_header(request, "x-mock-status") or "200")
        if status != 200:
            return _error(status, f"mock upstream error {status}")
        try:
            return await _respond(request, body, request_id)
        except (asyncio.CancelledError, ConnectionError) as exc:
            request.app[events].append(
                {"id": request_id, "event": "client_disconnected", "at": time.time(), "error": type(exc).__name__}
            )
            raise

    async def embeddings(request: web.Request) -> web.Response:
        body = await _json_body(request)
        if body is None:
            return _error(400, "bad json")
        await record(request, body)
        status = int(_header(request, "x-mock-status") or "200")
        if status != 200:
            return _error(status, f"mock upstream error {status}")
        return _embeddings(body)

    async def models(request: web.Request) -> web.Response:
        await record(request, None)
        status = int(_header(request, "x-mock-status") or "200")
        if status != 200:
            return _error(status, f"mock upstream error {status}")
        data = [{"id": name, "object": "model", "created": 1686935002, "owned_by": "openai"} for name in MODELS]
        return web.json_response({"object": "list", "data": data})

    app.router.add_post("/v1/responses", responses)
    app.router.add_post("/v1/embeddings", embeddings)

    async def model(request: web.Request) -> web.Response:
        await record(request, None)
        status = int(_header(request, "x-mock-status") or "200")
        if status != 200:
            return _error(status, f"mock upstream error {status}")
        name = request.match_info["model"]
        if name not in MODELS:
            error = {"message": f"The model '{name}' does not exist", "type": "invalid_request_error"}
            return web.json_response({"error": {**error, "param": None, "code": "model_not_found"}}, status=404)
        return web.json_response({"id": name, "object": "model", "created": 1686935002, "owned_by": "openai"})

    app.router.add_get("/v1/models", models)
    app.router.add_get("/v1/models/{model:.+}", model)


async def _respond(request: web.Request, body: dict[str, Any], request_id: str) -> web.StreamResponse:
    model = body.get("model", "gpt-4o-mini")
    exact = _header(request, "x-mock-deltas")
    if exact:
        deltas = [str(d) for d in json.loads(exact)]
    else:
        echo = _knob(request, "x-mock-echo", "MOCK_ECHO", "0") == "1"
        deltas = _words(_input_text(body) if echo else _knob(request, "x-mock-reply", "MOCK_REPLY", DEFAULT_REPLY))
    refusal = _header(request, "x-mock-refusal")
    if refusal is not None:
        deltas = _words(refusal)
    tool_input = _header(request, "x-mock-tool-input")
    tool_pieces = _header(request, "x-mock-tool-deltas")
    pieces: list[str] = []
    if tool_pieces:
        pieces = [str(p) for p in json.loads(tool_pieces)]
    elif tool_input:
        step = max(1, len(tool_input) // 3)
        pieces = [tool_input[at : at + step] for at in range(0, len(tool_input), step)]
    custom_pieces = [str(p) for p in json.loads(_header(request, "x-mock-custom-tool-deltas") or "[]")]
    incomplete = _header(request, "x-mock-incomplete")
    message_id, call_id, custom_id = "msg_" + request_id[:24], "fc_" + request_id[:24], "ctc_" + request_id[:24]
    output_tokens = len(deltas) + len(pieces) + len(custom_pieces)
    usage = {
        "input_tokens": 9,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 9 + output_tokens,
    }
    response = {
        "id": "resp_" + request_id[:24],
        "object": "response",
        "created_at": int(time.time()),
        "status": "in_progress",
        "background": False,
        "error": None,
        "incomplete_details": None,
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "model": model,
        "output": [],
        "parallel_tool_calls": True,
        "previous_response_id": body.get("previous_response_id"),
        "reasoning": {"effort": None, "summary": None},
        "store": True,
        "temperature": 1.0,
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": body.get("tools") or [],
        "top_p": 1.0,
        "truncation": "disabled",
        "usage": None,
        "user": None,
        "metadata": {},
    }
    part_type, field = ("refusal", "refusal") if refusal is not None else ("output_text", "text")

    def part(text: str) -> dict[str, Any]:
        if part_type == "refusal":
            return {"type": "refusal", "refusal": text}
        return {"type": "output_text", "annotations": [], "logprobs": [], "text": text}

    def message(status: str, text: str | None) -> dict[str, Any]:
        content = [part(text)] if text is not None else []
        return {"id": message_id, "type": "message", "status": status, "content": content, "role": "assistant"}

    def call(status: str, arguments: str) -> dict[str, Any]:
        return {
            "id": call_id,
            "type": "function_call",
            "status": status,
            "arguments": arguments,
            "call_id": "call_" + request_id[:24],
            "name": "lookup",
        }

    def custom(status: str, tool_input: str) -> dict[str, Any]:
        return {
            "id": custom_id,
            "type": "custom_tool_call",
            "status": status,
            "call_id": "call_" + request_id[:24],
            "input": tool_input,
            "name": "shell",
        }

    text, arguments, custom_input = "".join(deltas), "".join(pieces), "".join(custom_pieces)
    final_output = [message("completed", text)] + ([call("completed", arguments)] if pieces else [])
    final_output += [custom("completed", custom_input)] if custom_pieces else []
    final_status = "incomplete" if incomplete else "completed"
    final = {
        **response,
        "status": final_status,
        "output": final_output,
        "usage": usage,
        "incomplete_details": {"reason": incomplete} if incomplete else None,
    }
    answer = _header(request, "x-mock-answer") or ("events" if body.get("stream") is True else "json")
    if answer == "json":
        return web.json_response(final, dumps=lambda value: _compact(value).decode())

    chunk_delay = int(_knob(request, "x-mock-chunk-delay-ms", "CHUNK_DELAY_MS", "120")) / 1000
    die_after = int(_header(request, "x-mock-die-after") or "-1")
    error_after = int(_header(request, "x-mock-error-after") or "-1")
    stream = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await stream.prepare(request)
    numbers = iter(range(1 << 30))

    def event(kind: str, **fields: Any) -> bytes:
        fields["sequence_number"] = next(numbers)
        data = {"type": kind, **dict(sorted(fields.items()))}
        return f"event: {kind}\ndata: ".encode() + _compact(data) + b"\n\n"

    def pad() -> str:
        return secrets.token_urlsafe(12)[: random.randint(2, 15)]

    await stream.write(event("response.created", response=response))
    await stream.write(event("response.in_progress", response=response))
    await stream.write(event("response.output_item.added", item=message("in_progress", None), output_index=0))
    place = {"item_id": message_id, "output_index": 0, "content_index": 0}
    await stream.write(event("response.content_part.added", part=part(""), **place))
    delta_type = "response.refusal.delta" if refusal is not None else "response.output_text.delta"
    extra = {} if refusal is not None else {"logprobs": []}
    for number, delta in enumerate(deltas):
        if number == die_after:
            assert request.transport is not None
            request.transport.close()  # mid-stream death: no terminal event
            return stream
        if number == error_after:  # as OpenAI ends a stream it cannot finish
            await stream.write(event("error", code="server_error", message="The server had an error", param=None))
            await stream.write_eof()
            return stream
        if chunk_delay:
            await asyncio.sleep(chunk_delay)
        await stream.write(event(delta_type, delta=delta, obfuscation=pad(), **place, **extra))
    done_type = "response.refusal.done" if refusal is not None else "response.output_text.done"
    await stream.write(event(done_type, **{field: text}, **place, **extra))
    await stream.write(event("response.content_part.done", part=part(text), **place))
    await stream.write(event("response.output_item.done", item=message("completed", text), output_index=0))
    if pieces:
        await stream.write(event("response.output_item.added", item=call("in_progress", ""), output_index=1))
        for piece in pieces:
            await stream.write(
                event(
                    "response.function_call_arguments.delta",
                    delta=piece,
                    item_id=call_id,
                    obfuscation=pad(),
                    output_index=1,
                )
            )
        await stream.write(
            event("response.function_call_arguments.done", arguments=arguments, item_id=call_id, output_index=1)
        )
        await stream.write(event("response.output_item.done", item=call("completed", arguments), output_index=1))
    if custom_pieces:
        where = {"item_id": custom_id, "output_index": len(final_output) - 1}
        index = where["output_index"]
        await stream.write(event("response.output_item.added", item=custom("in_progress", ""), output_index=index))
        for piece in custom_pieces:
            await stream.write(event("response.custom_tool_call_input.delta", delta=piece, obfuscation=pad(), **where))
        await stream.write(event("response.custom_tool_call_input.done", input=custom_input, **where))
        await stream.write(
            event("response.output_item.done", item=custom("completed", custom_input), output_index=index)
        )
    if _header(request, "x-mock-no-done") is not None:  # a clean end, but before the terminal event
        await stream.write_eof()
        return stream
    trailing = b"data: [DONE]\n\n" if _header(request, "x-mock-trailing-done") == "1" else b""
    await stream.write(event("response." + final_status, response=final) + trailing)
    await stream.write_eof()
    return stream


def _embeddings(body: dict[str, Any]) -> web.Response:
    value = body.get("input")
    if isinstance(value, str) or (isinstance(value, list) and value and all(isinstance(t, int) for t in value)):
        items: list[Any] = [value]
    elif isinstance(value, list):
        items = value
    else:
        return _error(400, "'input' is required")
    dimensions = int(body.get("dimensions") or 8)
    data = []
    tokens = 0
    for index, item in enumerate(items):
        seed = item if isinstance(item, str) else " ".join(map(str, item))
        tokens += len(seed.split()) if isinstance(item, str) else len(item)
        rng = random.Random(seed)
        vector = [round(rng.uniform(-1, 1), 6) for _ in range(dimensions)]
        embedding: Any = vector
        if body.get("encoding_format") == "base64":
            embedding = base64.b64encode(struct.pack(f"<{dimensions}f", *vector)).decode()
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    model = body.get("model", "text-embedding-3-small")
    reply = {"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
    return web.json_response(reply, dumps=lambda v: _compact(v).decode())


def _input_text(body: dict[str, Any]) -> str:
    """The text of the last user input: `input` itself, or the last user item's content."""
    value = body.get("input")
    if isinstance(value, str):
        return value
    for item in reversed(value if isinstance(value, list) else []):
        if isinstance(item, dict) and item.get("role", "user") == "user":
            content = item.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                return "".join(
                    p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "input_text"
                )
    return ""


async def _json_body(request: web.Request) -> dict[str, Any] | None:
    try:
        body = json.loads(await request.read())
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def _error(status: int, message: str) -> web.Response:
    error = {"error": {"message": message, "type": "mock_error", "param": None, "code": str(status)}}
    return web.json_response(error, status=status)


def _knob(request: web.Request, header: str, env: str, default: str) -> str:
    return _header(request, header) or os.environ.get(env) or default


def _header(request: web.Request, name: str) -> str | None:
    """A knob header: `x-mock-NAME`, or `x-stainless-mock-NAME` (what passes the gateway)."""
    headers = request.headers
    return headers.get(name) or headers.get("x-stainless-" + name[2:])


def _words(text: str) -> list[str]:
    return re.findall(r"\S+\s*|\s+", text) or [""]


def _compact(value: Any) -> bytes:
    try:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return json.dumps(value, separators=(",", ":")).encode()
