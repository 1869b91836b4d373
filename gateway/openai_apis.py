"""More OpenAI APIs (SPEC §12) as surfaces: the Responses API and embeddings.

The Responses API streams each text — a message's output text or refusal, a reasoning item's
text or summary, a function call's arguments — as deltas keyed by their `output_index` and,
inside the item, their `content_index` or `summary_index`; then repeats it whole, several
times: in its `.done` event, its part's `content_part.done`, its item's `output_item.done` and
the terminal response (`response.completed`, `.incomplete`, `.failed`). Each text is one
stream of the relay, rooted at (output index, "content" or "summary", index, field) or
(output index, "arguments"); the events that repeat it describe it as a COPY leaf, which
carries what that stream gave out, so every later copy is the redaction of the whole text
and the same as the deltas the client was sent. Held text goes out, as a delta of its own,
before the first copy (the `.done` event). The stream has no [DONE]: it ends with the
terminal response; an error is the API's own `error` event.

Embeddings never stream: their `input` strings are redacted, token arrays pass, and the
vectors of the reply (floats or base64) pass untouched.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar

import orjson

from .errors import BadRequest, GatewayError, LogprobsUnavailable
from .models import Usage
from .surfaces import COPY, DROP, JSON_COPY, JSON_TEXT, KEEP, TEXT, All, Api, Path, Spec, Surface, TextSlot

# --- The Responses API -----------------------------------------------------------------
# An output item's texts: a message's parts (output text, refusal), a reasoning item's text
# parts and summary, a function call's arguments. Log probabilities echo the text token by
# token: dropped (and requests asking for them refused).
_ITEM: Spec = {
    "content": All({"text": COPY, "refusal": COPY, "logprobs": DROP}),
    "summary": All({"text": COPY}),
    "arguments": JSON_COPY,
}
_ITEM_REPLY: Spec = {
    "content": All({"text": TEXT, "refusal": TEXT, "logprobs": DROP}),
    "summary": All({"text": TEXT}),
    "arguments": JSON_TEXT,
}
# Delta events: the item's container ("content", "summary", or none) and the field they stream.
_DELTAS: dict[str, tuple[str | None, str, Spec]] = {
    "response.output_text.delta": ("content", "text", {"delta": TEXT, "logprobs": DROP}),
    "response.refusal.delta": ("content", "refusal", {"delta": TEXT}),
    "response.reasoning_text.delta": ("content", "text", {"delta": TEXT}),
    "response.reasoning_summary_text.delta": ("summary", "text", {"delta": TEXT}),
    "response.function_call_arguments.delta": (None, "arguments", {"delta": JSON_TEXT}),
}
# Events that repeat a text whole: the container they are rooted in, and where the copies are.
_COPIES: dict[str, tuple[str | None, Spec]] = {
    "response.output_text.done": ("content", {"text": COPY, "logprobs": DROP}),
    "response.refusal.done": ("content", {"refusal": COPY}),
    "response.reasoning_text.done": ("content", {"text": COPY}),
    "response.reasoning_summary_text.done": ("summary", {"text": COPY}),
    "response.content_part.done": ("content", {"part": {"text": COPY, "refusal": COPY, "logprobs": DROP}}),
    "response.reasoning_summary_part.done": ("summary", {"part": {"text": COPY}}),
    "response.function_call_arguments.done": (None, {"arguments": JSON_COPY}),
    "response.output_item.done": (None, {"item": _ITEM}),
}
_FINAL: Spec = {"response": {"output": All(_ITEM)}}
_TERMINAL = frozenset({"response.completed", "response.incomplete", "response.failed"})
_NOTHING: Spec = {}
_INDEX_OF = {"content": "content_index", "summary": "summary_index"}
# The steps of a copy's path that name its stream (the rest, "response", "output", "item",
# "part", are where the copy sits).
_STREAM_STEPS = frozenset({"content", "summary", "text", "refusal", "arguments"})
_MAX_SEQUENCE = 2**53  # a sequence number the gateway may count on from


class ResponsesSurface(Surface):
    spec: ClassVar[Spec] = _NOTHING  # per event type: see spec_of
    reply_spec: ClassVar[Spec] = {"output": All(_ITEM_REPLY)}
    done_types: ClassVar[frozenset[str]] = _TERMINAL
    keeps_copies: ClassVar[bool] = True
    numbered: ClassVar[str | None] = "sequence_number"

    def root(self, event: dict[str, Any]) -> Path | None:
        """A delta's stream (output index, container, index, field); a copy's place (output
        index, container, index); () for any other event. None: indices that are not integers."""
        kind = event.get("type")
        if type(kind) is not str:
            return ()
        delta = _DELTAS.get(kind)
        if delta is not None:
            place = _place(event, delta[0])
            return None if place is None else (*place, delta[1])
        copy = _COPIES.get(kind)
        if copy is not None:
            return _place(event, copy[0])
        return ()

    def spec_of(self, event: dict[str, Any]) -> Spec:
        kind = event.get("type")
        if type(kind) is not str:
            return _NOTHING
        delta = _DELTAS.get(kind)
        if delta is not None:
            return delta[2]
        copy = _COPIES.get(kind)
        if copy is not None:
            return copy[1]
        return _FINAL if kind in _TERMINAL else _NOTHING

    def stream_of(self, path: Path) -> Path:
        return (*(step for step in path if type(step) is int or step in _STREAM_STEPS), "delta")

    def flush_before(self, event: dict[str, Any]) -> list[Path] | None:
        """A text's held part goes out before its first copy; everything held, before the end
        (or the upstream's error)."""
        kind = event.get("type")
        if type(kind) is not str:
            return None
        if kind in _COPIES:
            place = self.root(event)
            return [place if place is not None else ()]
        if kind in _TERMINAL or kind == "error":
            return [()]
        return None

    def template(self, event: dict[str, Any]) -> dict[str, Any]:
        """A delta's own fields but its text, for a delta that carries held text."""
        return {
            name: event[name]
            for name in ("type", "item_id", "output_index", "content_index", "summary_index")
            if name in event
        }

    def flush_events(
        self, held: list[tuple[Path, str]], templates: dict[Path, dict[str, Any]], counts: dict[str, int]
    ) -> bytes:
        """Deltas of held text, each like the stream's first one; numbered as the event they
        go out before (or the last one, at the end): the numbers stay in order."""
        out = []
        for path, text in held:
            event = dict(templates.get(path[:-1]) or _bare_delta(path))
            kind = event["type"]
            event["sequence_number"] = counts.get("sequence_number", 0)
            event["delta"] = text
            if kind == "response.output_text.delta":
                event["logprobs"] = []
            out.append(b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(event) + b"\n\n")
        return b"".join(out)

    def usage(self, event: dict[str, Any], before: Usage | None, counts: dict[str, int]) -> Usage | None:
        """The terminal response's usage. Every event passes here: its sequence number is
        noted too (for the events the gateway writes)."""
        number = event.get("sequence_number")
        if type(number) is int and 0 <= number < _MAX_SEQUENCE:
            counts["sequence_number"] = number
        kind = event.get("type")
        if type(kind) is not str or kind not in _TERMINAL:
            return before
        response = event.get("response")
        return (responses_usage(response) if type(response) is dict else None) or before

    def error_event(self, error: GatewayError, counts: dict[str, int]) -> bytes:
        """The API's own error event (openai-python's ResponseErrorEvent), numbered next."""
        data = {
            "type": "error",
            "code": error.code,
            "message": error.message,
            "param": None,
            "sequence_number": counts.get("sequence_number", -1) + 1,
        }
        return b"event: error\ndata: " + orjson.dumps(data) + b"\n\n"


def _place(event: dict[str, Any], container: str | None) -> Path | None:
    output = event.get("output_index")
    if type(output) is not int:
        return None
    if container is None:
        return (output,)
    index = event.get(_INDEX_OF[container])
    return (output, container, index) if type(index) is int else None


_BARE_TYPES = {
    ("content", "text"): "response.output_text.delta",
    ("content", "refusal"): "response.refusal.delta",
    ("summary", "text"): "response.reasoning_summary_text.delta",
}


def _bare_delta(path: Path) -> dict[str, Any]:
    """A delta event for held text whose stream's first event was not kept (past the bound)."""
    if path[1] == "arguments":
        return {"type": "response.function_call_arguments.delta", "item_id": "", "output_index": path[0]}
    container = str(path[1])
    return {
        "type": _BARE_TYPES[(container, str(path[3]))],
        "item_id": "",
        "output_index": path[0],
        _INDEX_OF[container]: path[2],
    }


def responses_usage(response: dict[str, Any]) -> Usage | None:
    usage = response.get("usage")
    if type(usage) is not dict:
        return None
    prompt, completion = usage.get("input_tokens"), usage.get("output_tokens")
    if type(prompt) is int and type(completion) is int and prompt >= 0 and completion >= 0:
        return Usage(prompt, completion)
    return None


def responses_request_texts(payload: dict[str, Any]) -> Iterator[TextSlot]:
    """`instructions`, and `input`: a string, or items whose `content` is a string or has
    text parts (input_text, and the output_text and refusal parts of earlier turns), function
    calls' arguments and function call outputs. Reasoning items pass unchanged."""
    if type(payload.get("instructions")) is str:
        yield payload, "instructions", False
    value = payload.get("input")
    if type(value) is str:
        yield payload, "input", False
        return
    if type(value) is not list:
        return
    for position, item in enumerate(value):
        if type(item) is str:  # no item OpenAI takes, but its text must not reach it in clear
            yield value, position, False
        elif type(item) is dict:
            kind = item.get("type")
            if kind == "function_call":
                if type(item.get("arguments")) is str:
                    yield item, "arguments", True
            elif kind == "function_call_output":
                yield from _content_texts(item, "output")
            else:
                yield from _content_texts(item, "content")


_TEXT_PARTS = {"input_text": "text", "output_text": "text", "refusal": "refusal"}


def _content_texts(holder: dict[str, Any], key: str) -> Iterator[TextSlot]:
    value = holder.get(key)
    if type(value) is str:
        yield holder, key, False
    elif type(value) is list:
        for part in value:
            kind = part.get("type") if type(part) is dict else None
            if type(kind) is str:
                field = _TEXT_PARTS.get(kind)
                if field is not None and type(part.get(field)) is str:
                    yield part, field, False


class ResponsesLogprobsUnavailable(LogprobsUnavailable):
    message = (
        "logprobs are unavailable while the gateway redacts PII: log probabilities repeat the output's "
        "tokens one by one, which the gateway cannot redact; ask without top_logprobs and without "
        "'message.output_text.logprobs' in include"
    )


def check_responses_request(payload: dict[str, Any], redacting: bool) -> None:
    """`input` may be absent (a request continuing `previous_response_id`, or naming a stored
    `prompt`); present, it is a string or an array."""
    if "input" in payload and type(payload["input"]) not in (str, list):
        raise BadRequest("'input' must be a string or an array of input items", code="invalid_input")
    if redacting:
        include = payload.get("include")
        asks = type(include) is list and "message.output_text.logprobs" in include
        if asks or payload.get("top_logprobs") is not None:
            raise ResponsesLogprobsUnavailable()


RESPONSES = ResponsesSurface()
RESPONSES_API = Api(
    "responses", "/v1/responses", RESPONSES, check_responses_request, responses_request_texts, responses_usage
)


# --- Embeddings ------------------------------------------------------------------------
class EmbeddingsSurface(Surface):
    """A reply's vectors pass untouched (a base64 vector is no text); every other string is
    redacted whole. Embeddings never stream: an upstream that sends events anyway has every
    string of them redacted whole."""

    spec: ClassVar[Spec] = _NOTHING
    reply_spec: ClassVar[Spec] = {"data": All({"embedding": KEEP})}

    def flush_events(
        self, held: list[tuple[Path, str]], templates: dict[Path, dict[str, Any]], counts: dict[str, int]
    ) -> bytes:
        return b""  # nothing streams, nothing is held


def check_embeddings_request(payload: dict[str, Any], redacting: bool) -> None:
    value = payload.get("input")
    if value is None:
        raise BadRequest("'input' is required", code="missing_input")
    if type(value) is str or (type(value) is list and all(_embeddable(item) for item in value)):
        return
    raise BadRequest("'input' must be a string, an array of strings, or an array of token arrays", code="invalid_input")


def _embeddable(item: object) -> bool:
    kind = type(item)
    return kind is str or kind is int or (kind is list and all(type(t) is int for t in item))  # type: ignore[attr-defined]


def embeddings_request_texts(payload: dict[str, Any]) -> Iterator[TextSlot]:
    """The `input` strings; token arrays pass."""
    value = payload.get("input")
    if type(value) is str:
        yield payload, "input", False
    elif type(value) is list:
        for position, item in enumerate(value):
            if type(item) is str:
                yield value, position, False


def embeddings_usage(reply: dict[str, Any]) -> Usage | None:
    usage = reply.get("usage")
    prompt = usage.get("prompt_tokens") if type(usage) is dict else None
    return Usage(prompt, 0) if type(prompt) is int and prompt >= 0 else None


EMBEDDINGS = EmbeddingsSurface()
EMBEDDINGS_API = Api(
    "embeddings",
    "/v1/embeddings",
    EMBEDDINGS,
    check_embeddings_request,
    embeddings_request_texts,
    embeddings_usage,
    streams=False,
)
