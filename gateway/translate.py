"""OpenAI Chat Completions ⇄ Anthropic Messages (SPEC §13), as pure functions of values.

`chat_request`: a chat request → a Messages request. `chat_reply`: a Message → a chat
completion. `ChatStream`: Anthropic's event stream, fed as bytes in any split → chat
completion chunks as SSE bytes (what an OpenAI upstream would have sent: the gateway's chat
relay redacts them like any other). `chat_error`: Anthropic's error body → OpenAI's.

`response_format` (json_schema, json_object) becomes a forced tool whose input is the answer
(`ANSWER_TOOL`), and that tool's call comes back as the message's content, JSON text.

What a chat request says that Messages cannot (logit_bias, seed, audio, …) is left out; a
message the Messages API has no form for (an audio or file part, a legacy `function` role or
`functions`, n > 1, tool-call arguments that are not a JSON object) is a 400.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from . import sse
from .errors import BadRequest, UpstreamError, UpstreamReplyTooLarge, UpstreamStreamBroken
from .joins import event_objects
from .models import Usage, is_count
from .relay import dumps_reply, loads_reply

DEFAULT_MAX_TOKENS = 4096  # Messages requires max_tokens; chat requests may leave it out
# The tool a structured answer is asked for with: its input is the document (what LiteLLM and
# others do; Anthropic's own output_config.format is on its newest models only).
ANSWER_TOOL = "json_response"
FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}
_DONE_EVENT = b"data: [DONE]\n\n"
# The events that show the answer has begun: the first of them brings the role chunk. Until
# then (message_start, pings) nothing reaches the client, so an error event there (Anthropic's
# overloaded_error after message_start) is still a failure the next upstream can answer.
_ANSWER_EVENTS = frozenset(
    {"content_block_start", "content_block_delta", "content_block_stop", "message_delta", "message_stop"}
)


def finish_reason(stop_reason: object) -> str | None:
    if stop_reason is None:
        return None
    return FINISH_REASONS.get(stop_reason, "stop") if isinstance(stop_reason, str) else "stop"


def _json_text(value: object) -> str:
    """A tool call's input as JSON text. Nested past orjson's 255 levels (which the parser
    takes, up to 1024) the stdlib writes it; past what that can, the upstream's reply is not
    one the gateway can pass on: UpstreamError, not a 500."""
    try:
        return dumps_reply(value).decode()
    except RecursionError:
        raise UpstreamError("upstream reply is nested too deeply") from None


def _finish(stop_reason: object, answered: bool) -> str | None:
    """The finish reason; a tool_use stop whose only call was the answer tool's (`answered`),
    now the content, is the answer's end: "stop", as OpenAI ends a structured answer."""
    reason = finish_reason(stop_reason)
    return "stop" if reason == "tool_calls" and answered else reason


# --- request --------------------------------------------------------------------------


def chat_request(payload: Mapping[str, Any], model: str) -> dict[str, Any]:
    """The Messages request for this (already redacted) chat request, for `model`."""
    system: list[dict[str, Any]] = []
    messages: list[dict[str, Any]] = []
    raw = payload.get("messages")
    for position, message in enumerate(raw if isinstance(raw, list) else ()):
        where = f"messages[{position}]"
        if not isinstance(message, dict):
            raise BadRequest(f"{where} is not an object")
        role = message.get("role")
        content = message.get("content")
        if role in ("system", "developer"):
            system += _text_blocks(content, where)
        elif role == "user":
            _append(messages, "user", _user_blocks(content, where))
        elif role == "assistant":
            _append(messages, "assistant", _assistant_blocks(message, where))
        elif role == "tool":
            _append(messages, "user", [_tool_result(message, where)])
        else:
            raise BadRequest(f"{where}.role {str(role)[:32]!r} has no form in an anthropic upstream's Messages API")
    out: dict[str, Any] = {
        "model": model,
        "max_tokens": _max_tokens(payload),
        "messages": [_compact(m) for m in messages],
    }
    if system:
        out["system"] = system[0]["text"] if len(system) == 1 else system
    stops = _stop_sequences(payload.get("stop"))
    if stops:
        out["stop_sequences"] = stops
    # Both as sent (SPEC §13), though Claude models since Opus 4.1 refuse the pair with a 400.
    for name in ("temperature", "top_p"):
        if payload.get(name) is not None:
            out[name] = payload[name]
    if type(out.get("temperature")) in (int, float) and out["temperature"] > 1:
        out["temperature"] = 1.0  # OpenAI's range is 0..2, Anthropic's 0..1 (more is a 400)
    if payload.get("stream") is True:
        out["stream"] = True
    user = payload.get("user")
    if isinstance(user, str) and "@" not in user:
        # Anthropic refuses (400) a user_id that "appears to contain an email address": a
        # fallback would fail what OpenAI took. It is only a hint for abuse monitoring.
        out["metadata"] = {"user_id": user}
    n = payload.get("n")
    if type(n) is int and n > 1:
        # Left out, the reply had one choice where the client asked for several (and indexes
        # choices[1]); a Message is one answer.
        raise BadRequest("n > 1 (several choices) has no form in an anthropic upstream")
    if payload.get("functions"):
        # The legacy form of tools: left out, the model would answer as if it had none, and
        # its reply has no function_call form here. `tools` says the same and is translated.
        raise BadRequest("functions (the legacy form of tools) has no form in an anthropic upstream: send tools")
    tools = payload.get("tools")
    if isinstance(tools, list) and tools:
        out["tools"] = [_tool(tool, f"tools[{i}]") for i, tool in enumerate(tools)]
    choice = _tool_choice(payload.get("tool_choice"))
    answer = _answer_tool(payload.get("response_format"), choice, bool(out.get("tools")))
    if answer is not None:
        if any(tool["name"] == ANSWER_TOOL for tool in out.get("tools") or ()):
            raise BadRequest(f"a tool named {ANSWER_TOOL} cannot go with response_format to an anthropic upstream")
        # The client's tools stay (a history's tool_use blocks need them): the model calls one
        # of them or answers, unless tool_choice was none. One call: one document (OpenAI's
        # structured outputs do not go with parallel function calls either).
        forced = {"type": "tool", "name": ANSWER_TOOL} if not out.get("tools") or choice == _NONE else {"type": "any"}
        out["tools"] = [*out.get("tools", ()), answer]
        out["tool_choice"] = {**forced, "disable_parallel_tool_use": True}
        return out
    if payload.get("parallel_tool_calls") is False and out.get("tools") and (choice or {}).get("type") != "none":
        # Anthropic's `none` choice has no such field (and refuses extra ones): no calls at all
        choice = {**(choice or {"type": "auto"}), "disable_parallel_tool_use": True}
    if choice is not None and (out.get("tools") or choice["type"] == "none"):
        out["tool_choice"] = choice
    return out


_NONE = {"type": "none"}


def answer_tool(payload: Mapping[str, Any]) -> str | None:
    """The tool whose call is the answer to this chat request (a structured one: SPEC §13),
    None when it asks for none. What `chat_request` sent it as."""
    try:
        choice = _tool_choice(payload.get("tool_choice"))
        tools = payload.get("tools")
        answer = _answer_tool(payload.get("response_format"), choice, isinstance(tools, list) and bool(tools))
    except BadRequest:
        return None
    return None if answer is None else ANSWER_TOOL


def _answer_tool(response_format: object, choice: Mapping[str, Any] | None, tools: bool) -> dict[str, Any] | None:
    """The forced tool a `response_format` asking for JSON becomes; None for any other format,
    or when the client's tool_choice makes this turn a call of its own tools (required or a
    named one: OpenAI's format applies to the content, and such a turn has none)."""
    if not isinstance(response_format, dict) or response_format.get("type") not in ("json_schema", "json_object"):
        return None
    if tools and choice is not None and choice["type"] in ("any", "tool"):
        return None
    if response_format["type"] == "json_object":
        return {
            "name": ANSWER_TOOL,
            "description": "The answer to the user: a JSON object.",
            "input_schema": {"type": "object"},
        }
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict):
        raise BadRequest("response_format.json_schema must be an object")
    schema = spec.get("schema")
    if schema is None:
        schema = {"type": "object"}
    if not isinstance(schema, dict):
        raise BadRequest("response_format.json_schema.schema must be an object")
    if "type" not in schema:
        schema = {"type": "object", **schema}  # a tool's input is an object, and Anthropic needs it said
    elif schema["type"] != "object":
        raise BadRequest(
            "response_format.json_schema.schema: an anthropic upstream answers only an object (type object)"
        )
    description = spec.get("description")
    if not isinstance(description, str) or not description:
        name = spec.get("name")
        named = f" ({name})" if isinstance(name, str) and name else ""
        description = f"The answer to the user: a JSON document that follows this schema{named}."
    return {"name": ANSWER_TOOL, "description": description, "input_schema": schema}


def _stop_sequences(stop: object) -> list[object]:
    """chat's `stop` as a list, without the sequences Anthropic refuses with a 400 (one that is
    empty or all whitespace, "\\n" as completion prompts use it): a fallback to Anthropic
    answers what the OpenAI upstream before it accepted, and may go on past such a stop."""
    stops = [stop] if isinstance(stop, str) else stop if isinstance(stop, list) else []
    return [s for s in stops if not isinstance(s, str) or s.strip()]


def _max_tokens(payload: Mapping[str, Any]) -> object:
    # The order policies (SPEC §15) and the token budget (§14) read them in: a cap they check
    # is the cap Anthropic gets, whatever else the request names.
    for name in ("max_tokens", "max_completion_tokens"):
        value = payload.get(name)
        if value is not None:
            return value  # not a count: the upstream says so
    return DEFAULT_MAX_TOKENS


def _append(messages: list[dict[str, Any]], role: str, blocks: list[dict[str, Any]]) -> None:
    """Consecutive messages of one role become one (tool results and the user's next words
    are one user turn in the Messages API); a message with nothing in it is left out."""
    if not blocks:
        return
    if messages and messages[-1]["role"] == role:
        messages[-1]["content"] += blocks
    else:
        messages.append({"role": role, "content": blocks})


def _compact(message: dict[str, Any]) -> dict[str, Any]:
    content = message["content"]
    if len(content) == 1 and content[0]["type"] == "text":
        return {"role": message["role"], "content": content[0]["text"]}
    return message


def _text_blocks(content: object, where: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    if content is None:
        return []
    if not isinstance(content, list):
        raise BadRequest(f"{where}.content must be a string or an array of parts")
    blocks = []
    for part in content:
        if isinstance(part, dict) and part.get("type") in ("text", "refusal"):
            text = part.get(part["type"])
            if isinstance(text, str) and text:
                blocks.append({"type": "text", "text": text})
        else:
            raise BadRequest(f"{where}.content: only text parts can be sent here to an anthropic upstream")
    return blocks


def _user_blocks(content: object, where: str) -> list[dict[str, Any]]:
    if not isinstance(content, list):
        return _text_blocks(content, where)
    blocks = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "image_url":
            blocks.append(_image(part.get("image_url"), where))
        else:
            blocks += _text_blocks([part], where)
    return blocks


def _image(image: object, where: str) -> dict[str, Any]:
    url = image.get("url") if isinstance(image, dict) else image
    if not isinstance(url, str):
        raise BadRequest(f"{where}: an image_url part without a url")
    if url.startswith("data:"):
        header, comma, data = url[5:].partition(",")
        media_type, _, encoding = header.partition(";")
        if not comma or encoding != "base64" or not media_type:
            raise BadRequest(f"{where}: an image data URL must be data:<media type>;base64,<data>")
        return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}
    return {"type": "image", "source": {"type": "url", "url": url}}


def _assistant_blocks(message: Mapping[str, Any], where: str) -> list[dict[str, Any]]:
    blocks = _text_blocks(message.get("content"), where)
    if isinstance(message.get("refusal"), str) and message["refusal"]:
        blocks.append({"type": "text", "text": message["refusal"]})
    calls = message.get("tool_calls")
    for number, call in enumerate(calls if isinstance(calls, list) else ()):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(call.get("id"), str):
            raise BadRequest(f"{where}.tool_calls[{number}] needs an id and a function")
        arguments = function.get("arguments") or "{}"
        try:
            tool_input = orjson.loads(arguments) if isinstance(arguments, str) else None
        except orjson.JSONDecodeError:
            tool_input = None
        if not isinstance(tool_input, dict):
            raise BadRequest(f"{where}.tool_calls[{number}].function.arguments must be a JSON object")
        blocks.append({"type": "tool_use", "id": call["id"], "name": function.get("name"), "input": tool_input})
    return blocks


def _tool_result(message: Mapping[str, Any], where: str) -> dict[str, Any]:
    call_id = message.get("tool_call_id")
    if not isinstance(call_id, str):
        raise BadRequest(f"{where}: a tool message needs its tool_call_id")
    content = message.get("content")
    result: dict[str, Any] = {"type": "tool_result", "tool_use_id": call_id}
    if isinstance(content, str):
        result["content"] = content
    else:
        result["content"] = _text_blocks(content, where)
    return result


def _tool(tool: object, where: str) -> dict[str, Any]:
    function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise BadRequest(f"{where}: only function tools (with a name) can be sent to an anthropic upstream")
    out: dict[str, Any] = {
        "name": function["name"],
        "input_schema": function.get("parameters") or {"type": "object", "properties": {}},
    }
    if isinstance(function.get("description"), str):
        out["description"] = function["description"]
    return out


def _tool_choice(choice: object) -> dict[str, Any] | None:
    if choice is None:
        return None
    if choice == "auto":
        return {"type": "auto"}
    if choice == "none":
        return {"type": "none"}
    if choice == "required":
        return {"type": "any"}
    function = choice.get("function") if isinstance(choice, dict) else None
    if isinstance(function, dict) and isinstance(function.get("name"), str):
        return {"type": "tool", "name": function["name"]}
    raise BadRequest("tool_choice must be auto, none, required or a named function")


# --- reply ----------------------------------------------------------------------------


def chat_usage(usage: Mapping[str, Any]) -> dict[str, Any] | None:
    """Anthropic's counts as OpenAI's: the prompt includes the cache's reads and writes. None
    when it reports none: zeros made up here would settle the tenant's token budget to nothing
    (SPEC §14: with no usage at all the estimate stands, as on /v1/messages)."""
    counts = {k: v for k, v in usage.items() if type(v) is int and v >= 0}
    if not counts:
        return None
    cached = counts.get("cache_read_input_tokens", 0)
    prompt = counts.get("input_tokens", 0) + cached + counts.get("cache_creation_input_tokens", 0)
    completion = counts.get("output_tokens", 0)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def chat_reply(message: Mapping[str, Any], created: int, answer: str | None = None) -> dict[str, Any]:
    """A Message (the non-stream reply) as a chat completion; a call of the `answer` tool (a
    structured answer's, `answer_tool`) is the content, its input as JSON text."""
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    answered = False
    content = message.get("content")
    for block in content if isinstance(content, list) else ():
        if not isinstance(block, dict):
            continue
        if block.get("type") == "text" and isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif block.get("type") == "tool_use" and answer is not None and block.get("name") == answer:
            texts.append(_json_text(block.get("input") if block.get("input") is not None else {}))
            answered = True
        elif block.get("type") == "tool_use":
            arguments = _json_text(block.get("input") if block.get("input") is not None else {})
            calls.append(
                {
                    "id": block.get("id"),
                    "type": "function",
                    "function": {"name": block.get("name"), "arguments": arguments},
                }
            )
    said: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts else None, "refusal": None}
    if calls:
        said["tool_calls"] = calls
    usage = message.get("usage")
    reply: dict[str, Any] = {
        "id": message.get("id"),
        "object": "chat.completion",
        "created": created,
        "model": message.get("model"),
        "choices": [
            {
                "index": 0,
                "message": said,
                "logprobs": None,
                "finish_reason": _finish(message.get("stop_reason"), answered and not calls) or "stop",
            }
        ],
    }
    counted = chat_usage(usage) if isinstance(usage, dict) else None
    if counted is not None:  # none reported: none made up (see chat_usage)
        reply["usage"] = counted
    return reply


def chat_error(data: bytes) -> bytes:
    """Anthropic's `{"type":"error","error":{"type","message"}}` as OpenAI's error body; any
    other body as it came."""
    error = _error_object(data)
    return data if error is None else _error_body(error)


def anthropic_error(data: bytes) -> bytes:
    """OpenAI's `{"error":{"message","type",...}}` as Anthropic's error body; any other body as it came."""
    error = _error_object(data)
    if error is None:
        return data
    kind = error.get("type") if isinstance(error.get("type"), str) else "api_error"
    message = error.get("message") if isinstance(error.get("message"), str) else "upstream error"
    return orjson.dumps({"type": "error", "error": {"type": kind, "message": message}})


def _error_object(data: bytes) -> dict[str, Any] | None:
    """The `error` object of an error body (OpenAI's or Anthropic's: both keep it there)."""
    try:
        body = loads_reply(data)
    except (ValueError, RecursionError):
        return None
    error = body.get("error") if isinstance(body, dict) else None
    return error if isinstance(error, dict) else None


def _error_body(error: Mapping[str, Any]) -> bytes:
    kind = error.get("type") if isinstance(error.get("type"), str) else "api_error"
    message = error.get("message") if isinstance(error.get("message"), str) else "upstream error"
    return orjson.dumps({"error": {"message": message, "type": kind, "code": kind}})


def whole_reply(
    status: int, data: bytes, include_usage: bool, created: int, answer: str | None = None, limit: int | None = None
) -> bytes:
    """A whole Anthropic answer as chat's: an error, a Message, or a stream read to its end
    (an upstream that streams whatever was asked). An error object under a 2xx is chat's error
    body. A 2xx that is none of these (an HTML page, a JSON array, no `content` array) is the
    upstream failing: UpstreamError,
    so the next upstream is tried and the last one's is a 502, never a "completion" made of it."""
    if status >= 300:
        return chat_error(data)
    try:
        body = loads_reply(data)
    except (ValueError, RecursionError):
        if not data.lstrip().startswith(sse.EVENT_STARTS):
            raise UpstreamError("upstream answered with a body that is not JSON") from None
        # Each chunk repeats message_start's `model` and `id`: a small body of many deltas would
        # be gigabytes of chunks, so they are held to `limit` (the reply's own, proxy.py) as made.
        stream = ChatStream(include_usage, created, answer)
        out = stream.feed(data, limit)
        out += stream.close(None if limit is None else limit - len(out))
        # Events that end before message_stop (or an error event) are an incomplete answer:
        # chat's error event says so, as a live stream's does (router.AnthropicAsChat).
        return out if stream.done else out + sse.error_event(UpstreamStreamBroken())
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return _error_body(body["error"])  # an error under a 2xx: chat's, its status read as chat's is (proxy)
    if not isinstance(body, dict) or not isinstance(body.get("content"), list):
        raise UpstreamError("upstream answered with a body that is not a Message")
    return orjson.dumps(chat_reply(body, created, answer))


# --- stream ---------------------------------------------------------------------------


class ChatStream:
    """Anthropic's events in, chat.completion.chunk events out (SSE bytes, [DONE] last).

    The role chunk comes with the first event of the answer (not at message_start: see
    _ANSWER_EVENTS). A text_delta is a `content` delta, a tool_use block a tool call (its
    input_json_delta pieces the call's `arguments`; "{}" for a call whose input came empty, as
    the non-stream reply has it), message_delta's stop reason the finish reason, and with
    `include_usage` message_stop brings the usage chunk (`choices: []`) before [DONE].
    Thinking, signatures and pings have no chat form and are left out. Anthropic's `error`
    event becomes chat's in-stream error event, and ends the stream. A call of the `answer`
    tool (a structured answer's) is `content`: its input_json_delta pieces, "{}" if it came
    empty; its tool_use stop is "stop" when no other call came."""

    __slots__ = (
        "_answer_tool",
        "_answers",
        "_argued",
        "_base",
        "_counts",
        "_created",
        "_final",
        "_include_usage",
        "_opening",
        "_parser",
        "_tools",
        "done",
    )

    def __init__(self, include_usage: bool, created: int, answer: str | None = None) -> None:
        self._answer_tool = answer
        self._answers: set[int] = set()  # content block indexes of the answer tool's calls
        self._include_usage = include_usage
        self._created = created
        self._parser = sse.SSEParser()
        self._base: dict[str, Any] = {"id": "", "object": "chat.completion.chunk", "created": created, "model": ""}
        self._tools: dict[int, int] = {}  # content block index -> tool call index
        self._argued: set[int] = set()  # tool blocks whose arguments have had text
        self._opening = False  # message_start read, the role chunk not yet sent
        self._counts: dict[str, int] = {}
        self._final = False  # message_delta's usage read: the counts are the reply's last word
        self.done = False

    @property
    def opening(self) -> bool:
        """message_start read, the role chunk held back for the answer's first event."""
        return self._opening

    def open(self) -> bytes:
        """The held role chunk, now (the upstream is alive, but slow to begin its answer)."""
        self._opening = False
        return b"data: " + orjson.dumps(self._chunk({"role": "assistant", "content": ""})) + b"\n\n"

    @property
    def pending(self) -> int:
        """Bytes read of an event not yet complete."""
        return len(self._parser.pending)

    @property
    def prompt_tokens(self) -> int:
        """The prompt's tokens reported so far (message_start's, message_delta's where it has
        them): what a stream that breaks before its usage chunk still used."""
        usage = chat_usage(self._counts)  # counted as the usage chunk counts it
        return 0 if usage is None else int(usage["prompt_tokens"])

    @property
    def final_usage(self) -> Usage | None:
        """The reply's usage once message_delta has reported it (as /v1/messages reads it), the
        usage chunk made or not: a stream cut between message_delta and message_stop, or left
        by its client there, is settled to it (SPEC §14), not held at its estimate."""
        usage = chat_usage(self._counts) if self._final else None
        return None if usage is None else Usage(usage["prompt_tokens"], usage["completion_tokens"])

    def feed(self, data: bytes, limit: int | None = None) -> bytes:
        """The chunks `data` completes; past `limit` bytes of them, UpstreamError."""
        try:
            blocks = self._parser.complete(data)
        except sse.EventTooLarge as exc:
            raise UpstreamError(f"upstream sent an event larger than {exc.limit} bytes") from None
        return self._translated(sse.parse_blocks(blocks), limit) if blocks else b""

    def close(self, limit: int | None = None) -> bytes:
        return self._translated(self._parser.close(), limit)

    def _translated(self, events: list[sse.Event], limit: int | None) -> bytes:
        out: list[bytes] = []
        size = 0
        for event in events:
            if self.done or event.data is None:
                continue
            try:
                value = loads_reply(event.data)
            except (ValueError, RecursionError):
                value = None
            if not isinstance(value, dict):
                raise UpstreamError("upstream sent an event that is not a JSON object")
            for chunk in self.chunks(value):
                out.append(chunk if isinstance(chunk, bytes) else b"data: " + orjson.dumps(chunk) + b"\n\n")
                if limit is not None:
                    size += len(out[-1])
                    if size > limit:
                        raise UpstreamReplyTooLarge()
        return b"".join(out)

    def chunks(self, event: Mapping[str, Any]) -> list[dict[str, Any] | bytes]:
        """The chat chunks (or raw events: [DONE]) one Anthropic event becomes."""
        kind = event.get("type")
        if kind == "message_start":
            message = event.get("message")
            if isinstance(message, dict):
                self._base["id"] = message.get("id") or ""
                self._base["model"] = message.get("model") or ""
                self._count(message.get("usage"))
            self._opening = True
            return []
        if type(kind) is not str or kind not in _ANSWER_EVENTS:  # (an object there is unhashable)
            return self._other(kind, event)
        out = self._answer(kind, event)
        if self._opening:
            self._opening = False
            return [self._chunk({"role": "assistant", "content": ""}), *out]
        return out

    def _answer(self, kind: object, event: Mapping[str, Any]) -> list[dict[str, Any] | bytes]:
        if kind == "content_block_start":
            return self._block_start(event)
        if kind == "content_block_delta":
            return self._block_delta(event)
        if kind == "content_block_stop":
            return self._block_stop(event)
        if kind == "message_delta":
            self._count(event.get("usage"))
            self._final = self._final or isinstance(event.get("usage"), dict)
            delta = event.get("delta")
            reason = (
                _finish(delta.get("stop_reason"), bool(self._answers) and not self._tools)
                if isinstance(delta, dict)
                else None
            )
            return [self._chunk({}, reason or "stop")]
        self.done = True  # message_stop
        usage = chat_usage(self._counts) if self._include_usage else None
        if usage is not None:  # none reported: no usage chunk of zeros (see chat_usage)
            return [{**self._base, "choices": [], "usage": usage}, _DONE_EVENT]
        return [_DONE_EVENT]

    def _other(self, kind: object, event: Mapping[str, Any]) -> list[dict[str, Any] | bytes]:
        if kind == "error":
            self.done = True
            error = event.get("error")
            return [sse.encode(_error_body(error if isinstance(error, dict) else {}))]
        return []  # ping, and what a later API version adds

    def _block_start(self, event: Mapping[str, Any]) -> list[dict[str, Any] | bytes]:
        block, index = event.get("content_block"), event.get("index")
        if not isinstance(block, dict) or type(index) is not int:
            return []
        if block.get("type") == "text" and isinstance(block.get("text"), str) and block["text"]:
            return [self._chunk({"content": block["text"]})]
        if block.get("type") != "tool_use":
            return []
        tool_input = block.get("input")
        if self._answer_tool is not None and block.get("name") == self._answer_tool:
            self._answers.add(index)
            if isinstance(tool_input, dict) and tool_input:
                self._argued.add(index)
                return [self._chunk({"content": _json_text(tool_input)})]
            return []
        call = self._tools[index] = len(self._tools)
        arguments = _json_text(tool_input) if isinstance(tool_input, dict) and tool_input else ""
        if arguments:
            self._argued.add(index)
        function = {"name": block.get("name"), "arguments": arguments}
        return [
            self._chunk(
                {"tool_calls": [{"index": call, "id": block.get("id"), "type": "function", "function": function}]}
            )
        ]

    def _block_delta(self, event: Mapping[str, Any]) -> list[dict[str, Any] | bytes]:
        delta = event.get("delta")
        if not isinstance(delta, dict):
            return []
        kind = delta.get("type")
        if kind == "text_delta" and isinstance(delta.get("text"), str):
            return [self._chunk({"content": delta["text"]})]
        if kind == "input_json_delta" and isinstance(delta.get("partial_json"), str):
            index = event.get("index")
            if type(index) is int and index in self._answers:
                if not delta["partial_json"]:
                    return []  # Anthropic's first piece: no content chunk of nothing
                self._argued.add(index)
                return [self._chunk({"content": delta["partial_json"]})]
            if type(index) is not int or (call := self._tools.get(index)) is None:  # a list: no key
                return []
            if delta["partial_json"]:
                self._argued.add(index)
            return [self._chunk({"tool_calls": [{"index": call, "function": {"arguments": delta["partial_json"]}}]})]
        return []

    def _block_stop(self, event: Mapping[str, Any]) -> list[dict[str, Any] | bytes]:
        """A tool call whose input came empty (a tool without parameters: Anthropic sends one
        empty input_json_delta) gets "{}" as its arguments, as in the non-stream reply: ""
        is no JSON, and a client that parses the arguments would fail on it."""
        index = event.get("index")
        if type(index) is not int or index in self._argued:
            return []
        if index in self._answers:
            self._argued.add(index)
            return [self._chunk({"content": "{}"})]
        if (call := self._tools.get(index)) is None:
            return []
        self._argued.add(index)
        return [self._chunk({"tool_calls": [{"index": call, "function": {"arguments": "{}"}}]})]

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {**self._base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

    def _count(self, usage: object) -> None:
        """message_start's counts, then message_delta's cumulative ones where it has them."""
        if isinstance(usage, dict):
            for name, value in usage.items():
                if is_count(value):
                    self._counts[name] = value


# A chunk's top-level fields, as a completion's (OpenAI writes the same on both).
_CHUNK_FIELDS = ("id", "created", "model", "system_fingerprint", "service_tier")


def completion_events(completion: Mapping[str, Any], with_usage: bool, limit: int | None = None) -> bytes | None:
    """A chat completion (from an upstream that answered a stream request with one JSON reply)
    as the stream OpenAI would have sent for it: per choice its message in one delta and its
    finish chunk, the usage chunk if the client asked for one, then [DONE]. Else the openai
    SDK, handed JSON for the stream it asked for, iterates no chunk and no error: the answer is
    lost. None: not a chat completion (an error object stays as it came). Every chunk repeats
    the head (`model` and `id` included), so a small reply with a long `model` and many choices
    would be gigabytes: past `limit` bytes, UpstreamError (the reply's own limit, proxy.py)."""
    choices = completion.get("choices")
    if type(choices) is not list or not all(type(choice) is dict for choice in choices):
        return None
    head = {name: completion[name] for name in _CHUNK_FIELDS if name in completion}
    head["object"] = "chat.completion.chunk"
    events: list[bytes] = []
    size = 0

    def chunk(listed: list[dict[str, Any]], **extra: Any) -> None:
        nonlocal size
        event = b"data: " + orjson.dumps({**head, "choices": listed, **extra}) + b"\n\n"
        size += len(event)
        if limit is not None and size > limit:
            raise UpstreamReplyTooLarge()
        events.append(event)

    for number, choice in enumerate(choices):
        index = choice.get("index", number)
        message = choice.get("message")
        delta: dict[str, Any] = {"role": "assistant"}
        if type(message) is dict:
            delta |= {name: value for name, value in message.items() if value is not None and name != "tool_calls"}
            calls = message.get("tool_calls")
            if type(calls) is list and calls:
                delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(calls) if type(call) is dict]
        chunk([{"index": index, "delta": delta, "logprobs": choice.get("logprobs"), "finish_reason": None}])
        chunk([{"index": index, "delta": {}, "finish_reason": choice.get("finish_reason")}])
    if with_usage and type(completion.get("usage")) is dict:
        chunk([], usage=completion["usage"])
    events.append(b"data: [DONE]\n\n")
    return b"".join(events)


def completion_from_events(events: bytes) -> dict[str, Any] | None:
    """A chat stream (from an upstream that answered a request without "stream" with events:
    a server that always streams) as the one completion OpenAI would have sent for it: each
    choice's deltas joined into its message (content, refusal, tool calls by index), its last
    finish_reason, the last usage. Else the openai SDK, handed SSE for the JSON it asked for,
    returns the text as a str. An error event comes back as its error object, the completion
    left behind; None: no chunk and no error (nothing to write as a completion)."""
    head: dict[str, Any] = {}
    choices: dict[int, dict[str, Any]] = {}
    usage: Any = None
    for chunk in event_objects(events):
        if chunk.get("error") is not None:
            return {"error": chunk["error"]}
        for name in _CHUNK_FIELDS:
            if name in chunk and name not in head:
                head[name] = chunk[name]
        if type(chunk.get("usage")) is dict:
            usage = chunk["usage"]
        listed = chunk.get("choices")
        for number, choice in enumerate(listed if type(listed) is list else ()):
            if type(choice) is dict:
                index = choice.get("index", number)
                _join_delta(choices.setdefault(index if type(index) is int else number, {}), choice)
    if not head and not choices:
        return None
    completion: dict[str, Any] = {**head, "object": "chat.completion"}
    completion["choices"] = [_choice(index, parts) for index, parts in sorted(choices.items())]
    if usage is not None:
        completion["usage"] = usage
    return completion


def _join_delta(parts: dict[str, Any], choice: Mapping[str, Any]) -> None:
    # Pieces gathered in lists and joined once (`_choice`): a string grown by += inside a dict
    # is copied whole at every delta, quadratic in the answer (100k deltas: seconds). Every
    # text of the delta is joined, not only content and refusal: what a server adds
    # (`reasoning_content`, `reasoning`) is part of the answer too; lists (`annotations`) are
    # joined, and the legacy `function_call` as a tool call's function is.
    delta = choice.get("delta")
    if type(delta) is dict:
        # Per field, its pieces in order: strings, and lists (a list's items are one piece each).
        fields: dict[str, list[Any]] = parts.setdefault("fields", {})
        for name, value in delta.items():
            if name == "role":
                if type(value) is str:
                    parts.setdefault("role", value)
            elif name == "tool_calls":
                for number, call in enumerate(value if type(value) is list else ()):
                    if type(call) is dict:
                        index = call.get("index", number)
                        calls = parts.setdefault("tool_calls", {})
                        _join_call(calls.setdefault(index if type(index) is int else number, {}), call)
            elif name == "function_call":
                if type(value) is dict:
                    _join_fields(
                        parts.setdefault("function_call", {"name": [], "arguments": []}), value, _FUNCTION_PIECES
                    )
            elif name == "audio":
                if type(value) is dict:  # an audio reply: its data and transcript in pieces, its id once
                    _join_fields(parts.setdefault("audio", {}), value, _AUDIO_PIECES)
            elif name == "reasoning_details" and type(value) is list:
                _join_details(parts.setdefault("reasoning_details", {}), value)
            elif type(value) is str or type(value) is list:
                fields.setdefault(name, []).append(value)
    if choice.get("finish_reason") is not None:
        parts["finish_reason"] = choice["finish_reason"]
    logprobs = choice.get("logprobs")
    if type(logprobs) is dict and type(logprobs.get("content")) is list:
        parts.setdefault("logprobs", {"content": []})["content"].extend(logprobs["content"])


def _join_call(joined: dict[str, Any], call: Mapping[str, Any]) -> None:
    for name in ("id", "type"):
        if type(call.get(name)) is str:
            joined.setdefault(name, call[name])
    function = call.get("function")
    if type(function) is dict:
        _join_fields(joined.setdefault("function", {"name": [], "arguments": []}), function, _FUNCTION_PIECES)
    custom = call.get("custom")
    if type(custom) is dict:  # a custom (freeform) tool's call: its input in pieces, as arguments are
        _join_fields(joined.setdefault("custom", {}), custom, _CUSTOM_PIECES)


# The fields of a delta's object that come in pieces (joined); its others are kept as they first came.
_FUNCTION_PIECES = frozenset({"name", "arguments"})
_AUDIO_PIECES = frozenset({"data", "transcript"})
_CUSTOM_PIECES = frozenset({"name", "input"})
_DETAIL_PIECES = frozenset({"text", "summary", "data"})


def _join_fields(into: dict[str, Any], value: Mapping[str, Any], pieces: frozenset[str]) -> None:
    for name, item in value.items():
        if name not in pieces:
            if into.get(name) is None:  # as it first came, or later when it first came null
                into[name] = item
        elif type(item) is str:
            into.setdefault(name, []).append(item)


def _join_details(into: dict[Any, dict[str, Any]], items: list[Any]) -> None:
    # OpenRouter's reasoning_details: an item's text (summary, encrypted data) streams in pieces
    # under its index, and a whole reply holds one item per index; one without an index stays one.
    for item in items:
        if type(item) is dict:
            index = item.get("index")
            key = index if type(index) is int else ("unindexed", len(into))
            _join_fields(into.setdefault(key, {}), item, _DETAIL_PIECES)


def _pieces_joined(joined: Mapping[str, Any], pieces: frozenset[str]) -> dict[str, Any]:
    return {name: "".join(item) if name in pieces else item for name, item in joined.items()}


def _joined_field(pieces: list[Any]) -> Any:
    """A field's pieces joined: strings into one, lists into one; both (Mistral's reasoning
    models stream `content` as a list of thinking chunks, then the answer as strings) into the
    list of content chunks their whole reply holds, each run of strings a `text` chunk in its
    place (the strings were dropped: the answer lost behind its thinking)."""
    if all(type(piece) is str for piece in pieces):
        return "".join(pieces)
    joined: list[Any] = []
    run: list[str] = []
    for piece in pieces:
        if type(piece) is str:
            run.append(piece)
            continue
        if run:
            joined.append({"type": "text", "text": "".join(run)})
            run = []
        joined.extend(piece)
    if run:
        joined.append({"type": "text", "text": "".join(run)})
    return joined


def _choice(index: int, parts: Mapping[str, Any]) -> dict[str, Any]:
    message: dict[str, Any] = {"role": parts.get("role", "assistant"), "content": None, "refusal": None}
    for name, pieces in parts.get("fields", {}).items():
        message[name] = _joined_field(pieces)
    if "function_call" in parts:
        message["function_call"] = _pieces_joined(parts["function_call"], _FUNCTION_PIECES)
    if "audio" in parts:
        message["audio"] = _pieces_joined(parts["audio"], _AUDIO_PIECES)
    if "reasoning_details" in parts:
        message["reasoning_details"] = [_pieces_joined(d, _DETAIL_PIECES) for d in parts["reasoning_details"].values()]
    calls = parts.get("tool_calls")
    if calls:
        for call in calls.values():
            if "function" in call:
                call["function"] = _pieces_joined(call["function"], _FUNCTION_PIECES)
            if "custom" in call:
                call["custom"] = _pieces_joined(call["custom"], _CUSTOM_PIECES)
        message["tool_calls"] = [calls[number] for number in sorted(calls)]
    return {
        "index": index,
        "message": message,
        "logprobs": parts.get("logprobs"),
        "finish_reason": parts.get("finish_reason"),
    }
