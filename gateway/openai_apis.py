"""More OpenAI APIs (SPEC §12) as surfaces: the Responses API and embeddings.

The Responses API streams each text — a message's output text or refusal, a reasoning item's
text or summary, a function, MCP or custom tool call's arguments or input, a code
interpreter's code, the audio's transcript — as deltas keyed by their `output_index` and,
inside the item, their `content_index` or `summary_index`; then repeats it whole, several
times: in its `.done` event, its part's `content_part.done`, its item's `output_item.done` and
the terminal response (`response.completed`, `.incomplete`, `.failed`). Each text is one
stream of the relay, rooted at (output index, "content" or "summary", index, field) or
(output index, field); the events that repeat it describe it as a COPY leaf, which carries
what that stream gave out, so every later copy is the redaction of the whole text and the same
as the deltas the client was sent. Held text goes out, as a delta of its own, before the first
copy (the `.done` event). The events that announce an item or a part (`output_item.added`,
`content_part.added`, the `output` of `response.created`) carry its opening text: OpenAI's is
empty, any other is fed to the stream its deltas feed (the SDKs append the deltas to it).
Any other `*.delta` event (a type this module does not know yet) is a stream too, its `delta`
string (or each string of a `delta` object) keyed by its type and its integer `*_index`
fields, flushed before its `.done`: a new event type is no way round the split guarantee.
The stream has no [DONE]: it ends with the terminal response; an error is the API's own
`error` event.

Embeddings never stream: their `input` strings are redacted, token arrays pass, and the
vectors of the reply (numbers, or base64) pass untouched — only those: an `embedding` that is
anything else is redacted like any other string.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any, ClassVar

import orjson

from . import sse
from .errors import BadRequest, GatewayError, LogprobsUnavailable
from .models import Usage, is_count
from .surfaces import (
    COPY,
    DROP,
    JSON_COPY,
    JSON_TEXT,
    LEFT_OUT,
    MISSING,
    NOT_AN_INTEGER,
    TEXT,
    All,
    Api,
    Leaf,
    Path,
    Spec,
    Surface,
    TextSlot,
    asks_json,
    carries_text,
    int_or_absent,
    usage_of,
)

# --- The Responses API -----------------------------------------------------------------
# An output item's texts: a message's parts (output text, refusal), a reasoning item's text
# parts and summary, a function or MCP call's arguments, a custom tool call's input, a code
# interpreter call's code. Log probabilities echo the text token by token: dropped (and
# requests asking for them refused).
_ITEM: Spec = {
    "content": All({"text": COPY, "refusal": COPY, "logprobs": DROP}),
    "summary": All({"text": COPY}),
    "arguments": JSON_COPY,
    "input": COPY,
    "code": COPY,
}
# An output item or part as it is announced (`output_item.added`, `content_part.added`, the
# response's `output` in `response.created`): OpenAI sends its texts empty, but whatever is
# there is where the client's SDK appends the deltas, so it is the opening of their stream.
_OPENS = Leaf(opens=True)
_JSON_OPENS = Leaf(json_text=True, opens=True)
_ITEM_OPENING: Spec = {
    "content": All({"text": _OPENS, "refusal": _OPENS, "logprobs": DROP}),
    "summary": All({"text": _OPENS}),
    "arguments": _JSON_OPENS,
    "input": _OPENS,
    "code": _OPENS,
}
_ITEM_REPLY: Spec = {
    "content": All({"text": TEXT, "refusal": TEXT, "logprobs": DROP}),
    "summary": All({"text": TEXT}),
    "arguments": JSON_TEXT,
}
# Delta events: where their stream is keyed ("content" or "summary": a part of an output item;
# None: the output item; "audio": the response's one transcript) and the field they stream.
_DELTAS: dict[str, tuple[str | None, str, Spec]] = {
    "response.output_text.delta": ("content", "text", {"delta": TEXT, "logprobs": DROP}),
    "response.refusal.delta": ("content", "refusal", {"delta": TEXT}),
    "response.reasoning_text.delta": ("content", "text", {"delta": TEXT}),
    "response.reasoning_summary_text.delta": ("summary", "text", {"delta": TEXT}),
    "response.function_call_arguments.delta": (None, "arguments", {"delta": JSON_TEXT}),
    "response.mcp_call_arguments.delta": (None, "arguments", {"delta": JSON_TEXT}),
    "response.custom_tool_call_input.delta": (None, "input", {"delta": TEXT}),
    "response.code_interpreter_call_code.delta": (None, "code", {"delta": TEXT}),
    "response.audio.transcript.delta": ("audio", "transcript", {"delta": TEXT}),
}
# Events that repeat a text whole: where they are keyed, and where the copies are.
_COPIES: dict[str, tuple[str | None, Spec]] = {
    "response.output_text.done": ("content", {"text": COPY, "logprobs": DROP}),
    "response.refusal.done": ("content", {"refusal": COPY}),
    "response.reasoning_text.done": ("content", {"text": COPY}),
    "response.reasoning_summary_text.done": ("summary", {"text": COPY}),
    "response.content_part.done": ("content", {"part": {"text": COPY, "refusal": COPY, "logprobs": DROP}}),
    "response.reasoning_summary_part.done": ("summary", {"part": {"text": COPY}}),
    "response.function_call_arguments.done": (None, {"arguments": JSON_COPY}),
    "response.mcp_call_arguments.done": (None, {"arguments": JSON_COPY}),
    "response.custom_tool_call_input.done": (None, {"input": COPY}),
    "response.code_interpreter_call_code.done": (None, {"code": COPY}),
    "response.audio.transcript.done": ("audio", {}),  # no text: its stream ends there
    "response.output_item.done": (None, {"item": _ITEM}),
}
# Events that open a text: where they are keyed, and where their opening texts are.
_OPENINGS: dict[str, tuple[str | None, Spec]] = {
    "response.output_item.added": (None, {"item": _ITEM_OPENING}),
    "response.content_part.added": ("content", {"part": {"text": _OPENS, "refusal": _OPENS, "logprobs": DROP}}),
    "response.reasoning_summary_part.added": ("summary", {"part": {"text": _OPENS}}),
}
# The response as it starts: the SDK's first snapshot, whose items the deltas go to (a later
# `response.queued` / `.in_progress` only replaces items already done: its texts are whole).
_STARTING: Spec = {"response": {"output": All(_ITEM_OPENING)}}
_FINAL: Spec = {"response": {"output": All(_ITEM)}}
_TERMINAL = frozenset({"response.completed", "response.incomplete", "response.failed"})
_NOTHING: Spec = {}
_ANY_DELTA: Spec = {"delta": TEXT}  # an unknown delta event's text
# Deltas that are no text: the audio itself (base64, decoded delta by delta: never held back;
# an unknown event, every string of it redacted whole).
_NOT_TEXT_DELTAS = frozenset({"response.audio.delta"})
# The names an unknown event's type, indices and delta fields may have to be keyed by (and
# written in the events carrying held text): OpenAI's own, lower-case words. Nothing PII is
# made of fits, and an event line stays one line.
_NAME = re.compile(r"[a-z_.]+")
_INDEX_OF = {"content": "content_index", "summary": "summary_index"}
# The indices a delta's or copy's place is keyed by (see `_place`), by event type.
_PLACE_KEYS: dict[str | None, tuple[str, ...]] = {
    None: ("output_index",),
    "content": ("output_index", "content_index"),
    "summary": ("output_index", "summary_index"),
    "audio": (),
}
_NEEDED = {
    **{kind: _PLACE_KEYS[delta[0]] for kind, delta in _DELTAS.items()},
    **{kind: _PLACE_KEYS[copy[0]] for kind, copy in _COPIES.items()},
    **{kind: _PLACE_KEYS[opening[0]] for kind, opening in _OPENINGS.items()},
}
# The steps of a copy's path that name its stream (the rest, "response", "output", "item",
# "part", are where the copy sits).
_STREAM_STEPS = frozenset({"content", "summary", "text", "refusal", "arguments", "input", "code"})


class ResponsesSurface(Surface):
    spec: ClassVar[Spec] = _NOTHING  # per event type: see spec_of
    reply_spec: ClassVar[Spec] = {"output": All(_ITEM_REPLY)}
    # The stream's four terminal events: the three that carry the response, and `error`.
    done_types: ClassVar[frozenset[str]] = _TERMINAL | {"error"}
    keeps_copies: ClassVar[bool] = True
    numbered: ClassVar[str | None] = "sequence_number"
    clients_stop_at: ClassVar[bytes | None] = sse.DONE  # no [DONE] on this route, but the SDKs stop at one

    def misindexed(self, event: dict[str, Any]) -> str | None:
        """Beside an index that is no integer: a delta or copy that carries text without the
        indices its place is keyed by (an unknown delta: with one of them null; left out, it
        is keyed without it)."""
        if not all(int_or_absent(event, name) for name in event if name.endswith("_index")):
            return NOT_AN_INTEGER
        kind = event.get("type")
        if type(kind) is not str:
            return None
        needed = _NEEDED.get(kind)
        if needed is not None:
            lacking = any(type(event.get(name)) is not int for name in needed)
        elif _is_unknown_delta(kind):
            lacking = any(event[name] is None for name in event if name.endswith("_index"))
        else:
            return None
        if not lacking:
            return None
        return MISSING if carries_text(event, self.spec_of(event)) else LEFT_OUT

    def root(self, event: dict[str, Any]) -> Path | None:
        """A delta's stream (output index, container, index, field); a copy's place (output
        index, container, index); an unknown delta's (output index, type, index name, index,
        ...); () for any other event. None: indices that are not integers."""
        kind = event.get("type")
        if type(kind) is not str:
            return ()
        delta = _DELTAS.get(kind)
        if delta is not None:
            place = _place(event, delta[0])
            return None if place is None else (*place, delta[1])
        copy = _COPIES.get(kind) or _OPENINGS.get(kind)
        if copy is not None:
            return _place(event, copy[0])
        if _is_unknown_delta(kind):
            return _event_root(event, kind)
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
        if kind in _TERMINAL:
            return _FINAL
        opening = _OPENINGS.get(kind)
        if opening is not None:
            return opening[1]
        if kind == "response.created":
            return _STARTING
        if _is_unknown_delta(kind):
            fields = event.get("delta")
            if type(fields) is dict:  # each field its own stream (a shell's stdout and stderr)
                return {"delta": {name: TEXT for name in fields if _NAME.fullmatch(name)}}
            return _ANY_DELTA
        return _NOTHING

    def stream_of(self, path: Path) -> Path:
        return (*(step for step in path if type(step) is int or step in _STREAM_STEPS), "delta")

    def for_request(self, payload: dict[str, Any] | None) -> Surface:
        text = payload.get("text") if payload is not None else None
        if type(text) is dict and asks_json(text.get("format")):
            return RESPONSES_JSON
        return self

    def flush_before(self, event: dict[str, Any]) -> list[Path] | None:
        """A text's held part goes out before its first copy (an unknown delta's, before its
        `.done`); everything held, before the end (or the upstream's error)."""
        kind = event.get("type")
        if type(kind) is not str:
            return None
        if kind in _COPIES:
            place = self.root(event)
            return [place if place is not None else ()]
        if kind in _TERMINAL or kind == "error":
            return [()]
        if kind.endswith(".done"):
            delta = kind[:-5] + ".delta"
            if _is_unknown_delta(delta):
                place = _event_root(event, delta)
                return [place] if place is not None else None
        return None

    def restart_before(self, event: dict[str, Any], counts: dict[str, int]) -> list[Path] | None:
        """An event that announces an item or a part carries an opening text of its own: one an
        earlier announcement already opened (the item's `content[].text`, then the part's
        `text`) is flushed first, redacted as the text it was, and this one starts afresh.
        Read as one run, the two made PII of neither, which was masked in part: "+1 415 555
        0100" then "jane.doe@…" came out as "+1 415 555 ***e@…"."""
        kind = event.get("type")
        if type(kind) is not str or kind not in _OPENINGS:
            return None
        place = self.root(event)
        return [place] if place else None

    def template(self, event: dict[str, Any]) -> dict[str, Any]:
        """A delta's own fields but its text, for a delta that carries held text: its type,
        item and integer indices (an output_item.added names its item inside it: `item.id`)."""
        kept = {
            name: value
            for name, value in event.items()
            if name in ("type", "item_id") or (type(value) is int and name.endswith("_index") and _NAME.fullmatch(name))
        }
        item = event.get("item")
        if "item_id" not in kept and type(item) is dict and type(item.get("id")) is str:
            kept["item_id"] = item["id"]
        return kept

    def flush_events(
        self, held: list[tuple[Path, str]], templates: dict[Path, dict[str, Any]], counts: dict[str, int]
    ) -> bytes:
        """Deltas of held text, each like the stream's first one; numbered after the last event
        sent, and every later upstream event moves up past them (the relay adds
        counts["inserted"]): numbers stay unique and increasing, as OpenAI sends them and as
        clients that resume or de-duplicate by sequence_number read them."""
        out = []
        number = counts.get("sequence_number", -1) + counts.get("inserted", 0)
        for path, text in held:
            root = path[: path.index("delta")]  # the stream's root: its path is (*root, "delta"[, field])
            template = templates.get(root)
            if template is not None:
                event = dict(template)
            else:
                event = _bare_delta(root)
                # A stream opened by text in its part or item (no delta of its own before): the
                # delta takes the item id the opening event named, as the SDKs key text by it.
                opened = templates.get(root[:3]) or templates.get(root[:1])
                if opened is not None and "item_id" in event and type(opened.get("item_id")) is str:
                    event["item_id"] = opened["item_id"]
            kind = event["type"]
            number += 1
            event["sequence_number"] = number
            event["delta"] = {path[-1]: text} if len(path) > len(root) + 1 else text
            if kind == "response.output_text.delta":
                event["logprobs"] = []
            out.append(b"event: " + str(kind).encode() + b"\ndata: " + orjson.dumps(event) + b"\n\n")
        counts["inserted"] = counts.get("inserted", 0) + len(out)
        return b"".join(out)

    def usage(self, event: dict[str, Any], before: Usage | None, counts: dict[str, int]) -> Usage | None:
        """The terminal response's usage. (The relay notes each event's sequence number in
        `counts` as it writes the event: see StreamRelay.numbered.)"""
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
            "sequence_number": counts.get("sequence_number", -1) + counts.get("inserted", 0) + 1,
        }
        return b"event: error\ndata: " + orjson.dumps(data) + b"\n\n"


def _place(event: dict[str, Any], container: str | None) -> Path | None:
    if container == "audio":
        return ("audio",)
    output = event.get("output_index")
    if type(output) is not int:
        return None
    if container is None:
        return (output,)
    index = event.get(_INDEX_OF[container])
    return (output, container, index) if type(index) is int else None


def _is_unknown_delta(kind: str) -> bool:
    return (
        kind.endswith(".delta")
        and kind not in _DELTAS
        and kind not in _NOT_TEXT_DELTAS
        and _NAME.fullmatch(kind) is not None
    )


def _event_root(event: dict[str, Any], kind: str) -> Path | None:
    """An unknown delta's stream: (output index, type, then each other `*_index` field's name
    and value, by name); without an output index, (type, ...). None: an index that is not an
    integer, or not named in OpenAI's way."""
    indices: list[str | int] = []
    for name in sorted(name for name in event if name.endswith("_index") and name != "output_index"):
        value = event[name]
        if type(value) is not int or _NAME.fullmatch(name) is None:
            return None
        indices += (name, value)
    if "output_index" not in event:
        return (kind, *indices)
    output = event["output_index"]
    return (output, kind, *indices) if type(output) is int else None


_BARE_TYPES = {
    ("content", "text"): "response.output_text.delta",
    ("content", "refusal"): "response.refusal.delta",
    ("summary", "text"): "response.reasoning_summary_text.delta",
    ("arguments",): "response.function_call_arguments.delta",
    ("input",): "response.custom_tool_call_input.delta",
    ("code",): "response.code_interpreter_call_code.delta",
}


def _bare_delta(root: Path) -> dict[str, Any]:
    """A delta event for held text whose stream's first event was not kept (past the bound)."""
    if root == ("audio", "transcript"):
        return {"type": "response.audio.transcript.delta"}
    output = root[0]
    if type(output) is not int:  # an unknown delta's, without an output index: (type, name, index, ...)
        return {"type": output, **_indices(root[1:])}
    step = root[1]
    if step in _INDEX_OF:
        container = str(step)
        return {
            "type": _BARE_TYPES[(container, str(root[3]))],
            "item_id": "",
            "output_index": output,
            _INDEX_OF[container]: root[2],
        }
    bare = _BARE_TYPES.get((str(step),))
    if bare is not None:
        return {"type": bare, "item_id": "", "output_index": output}
    return {"type": step, "output_index": output, **_indices(root[2:])}


def _indices(pairs: Path) -> dict[str, Any]:
    return {str(name): index for name, index in zip(pairs[0::2], pairs[1::2], strict=True)}


def responses_usage(response: dict[str, Any]) -> Usage | None:
    return usage_of(response, "input_tokens", "output_tokens")


def responses_request_texts(payload: dict[str, Any]) -> Iterator[TextSlot]:
    """Every text the client sends: `instructions` and `input` (a string, or input items) and
    the values of a stored prompt's `variables`. An item's `content` or `output` is a string,
    or parts whose text is read (images and files but their names, and audio, pass); its
    `arguments` are JSON text (function and MCP calls); every other string in it is redacted
    whole — a custom tool's input, a shell's stdout, a patch's diff, an item type not known
    yet — but ids, enums and binary data (`_NOT_TEXT`). A reasoning item's summary and text
    are text like any other (an OpenAI-compatible server puts them in the prompt, and the
    reply that gave them out was redacted already: a mask redacts to itself), its encrypted
    content passes; generated images pass as they came."""
    for key in ("instructions", "input"):
        if key in payload:
            yield from _items(payload, key)
    prompt = payload.get("prompt")
    variables = prompt.get("variables") if type(prompt) is dict else None
    if type(variables) is dict:
        for name in variables:
            yield from _part(variables, name)


# Strings that are no text: ids, enums, binary data (base64 images and files, encrypted
# reasoning) and references to it. Redacting them would only break them.
_NOT_TEXT = frozenset(
    {
        "type",
        "id",
        "call_id",
        "item_id",
        "approval_request_id",
        "status",
        "role",
        "detail",
        "encrypted_content",
        "image_url",
        "file_id",
        "file_data",
        "file_url",
    }
)
_UNREAD_ITEMS = frozenset({"item_reference", "image_generation_call"})
_UNREAD_PARTS = frozenset({"input_audio"})  # base64 audio
_TEXT_PARTS = {"input_text": "text", "output_text": "text", "text": "text", "refusal": "refusal"}


def _items(holder: Any, key: Any) -> Iterator[TextSlot]:
    """A string, or a list of input items."""
    value = holder[key]
    if type(value) is not list:
        yield from _strings(holder, key)
        return
    for position, item in enumerate(value):
        if type(item) is dict:
            yield from _item(item)
        else:  # a bare string, a nested list: no item OpenAI takes, but its text must not reach it in clear
            yield from _strings(value, position)


def _item(item: dict[str, Any]) -> Iterator[TextSlot]:
    kind = item.get("type")
    if type(kind) is str and kind in _UNREAD_ITEMS:  # (an object or array there is unhashable: read it all)
        return
    for name, value in item.items():
        if type(value) is str and name in _NOT_TEXT:
            continue
        if name in ("content", "output"):
            yield from _content(item, name)
        elif name == "arguments" and type(value) is str:
            yield item, name, True
        else:
            yield from _strings(item, name)


def _content(holder: dict[str, Any], key: str) -> Iterator[TextSlot]:
    """A string, parts, or one part."""
    value = holder[key]
    if type(value) is list:
        for position in range(len(value)):
            yield from _part(value, position)
    else:
        yield from _part(holder, key)


def _part(holder: Any, key: Any) -> Iterator[TextSlot]:
    """A text part's text; audio passes; anything else, every string but `_NOT_TEXT`'s."""
    value = holder[key]
    if type(value) is dict:
        kind = value.get("type")
        field = _TEXT_PARTS.get(kind) if type(kind) is str else None
        if field is not None and type(value.get(field)) is str:
            yield value, field, False
            return
        if type(kind) is str and kind in _UNREAD_PARTS:  # (an object there is unhashable)
            return
    yield from _strings(holder, key)


def _strings(holder: Any, key: Any) -> Iterator[TextSlot]:
    value = holder[key]
    if type(value) is str:
        yield holder, key, False
    elif type(value) is dict:
        for name, inner in value.items():
            if type(inner) is not str or name not in _NOT_TEXT:
                yield from _strings(value, name)
    elif type(value) is list:
        for position in range(len(value)):
            yield from _strings(value, position)


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


# Structured output (`text.format` json_schema or json_object): an output_text part is a JSON
# document, read as the JSON text it is (as chat's content is then: see CHAT_JSON), its
# deltas, copies and openings alike; refusals, reasoning and summaries stay prose.
_JSON_PART_COPY: Spec = {"text": JSON_COPY, "refusal": COPY, "logprobs": DROP}
_JSON_ITEM: Spec = {**_ITEM, "content": All(_JSON_PART_COPY)}
_JSON_ITEM_OPENING: Spec = {**_ITEM_OPENING, "content": All({"text": _JSON_OPENS, "refusal": _OPENS, "logprobs": DROP})}
_JSON_SPECS: dict[str, Spec] = {
    "response.output_text.delta": {"delta": JSON_TEXT, "logprobs": DROP},
    "response.output_text.done": {"text": JSON_COPY, "logprobs": DROP},
    "response.content_part.done": {"part": _JSON_PART_COPY},
    "response.output_item.done": {"item": _JSON_ITEM},
    "response.content_part.added": {"part": {"text": _JSON_OPENS, "refusal": _OPENS, "logprobs": DROP}},
    "response.output_item.added": {"item": _JSON_ITEM_OPENING},
    "response.created": {"response": {"output": All(_JSON_ITEM_OPENING)}},
    **{kind: {"response": {"output": All(_JSON_ITEM)}} for kind in _TERMINAL},
}


class ResponsesJsonSurface(ResponsesSurface):
    reply_spec: ClassVar[Spec] = {
        "output": All({**_ITEM_REPLY, "content": All({"text": JSON_TEXT, "refusal": TEXT, "logprobs": DROP})})
    }

    def spec_of(self, event: dict[str, Any]) -> Spec:
        kind = event.get("type")
        spec = _JSON_SPECS.get(kind) if type(kind) is str else None
        return spec if spec is not None else super().spec_of(event)


RESPONSES = ResponsesSurface()
RESPONSES_JSON = ResponsesJsonSurface()
RESPONSES_API = Api(
    "responses",
    "/v1/responses",
    RESPONSES,
    check_responses_request,
    responses_request_texts,
    responses_usage,
    preamble_echoes_request=True,
)


# --- Embeddings ------------------------------------------------------------------------
# A vector: kept as it came if it is base64 (a list of numbers has nothing to redact); any
# other value, a string with an "@" or a space, strings in a list, is redacted like any other
# (relay.walk reads a KEEP that is JSON_TEXT so).
_VECTOR = Leaf(keep=True, json_text=True)


class EmbeddingsSurface(Surface):
    """A reply's vectors pass untouched (a base64 vector is no text); every other string is
    redacted whole. Embeddings never stream: an upstream that sends events anyway has every
    string of them redacted whole."""

    spec: ClassVar[Spec] = _NOTHING
    reply_spec: ClassVar[Spec] = {"data": All({"embedding": _VECTOR})}

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


_INTS = frozenset({int})  # a token array's item types (bool is not int here)


def _embeddable(item: object) -> bool:
    kind = type(item)
    # The types checked in C (map), not item by item in Python: ~2x faster on long token arrays.
    return kind is str or kind is int or (kind is list and _INTS.issuperset(map(type, item)))  # type: ignore[call-overload]


def embeddings_request_texts(payload: dict[str, Any]) -> Iterator[TextSlot]:
    """The `input` strings; token arrays pass."""
    value = payload.get("input")
    if type(value) is str:
        yield payload, "input", False
    elif type(value) is list:
        for position, item in enumerate(value):
            if type(item) is str:
                yield value, position, False


def embeddings_request_tokens(payload: dict[str, Any]) -> int:
    """The token ids of `input`: one token array, or arrays of them. Its first item tells which
    (the APIs take no mixed array: one the upstream refuses holds nothing in the end), so a body
    of millions of ids costs no walk over them on the loop."""
    value = payload.get("input")
    if type(value) is not list or not value:
        return 0
    if type(value[0]) is int:
        return len(value)
    # Arrays of ids: their lengths, not their items, are read (a mixed array, which the
    # upstream refuses, counts its arrays only).
    return sum([len(item) for item in value if type(item) is list])


def embeddings_usage(reply: dict[str, Any]) -> Usage | None:
    usage = reply.get("usage")
    prompt = usage.get("prompt_tokens") if type(usage) is dict else None
    return Usage(prompt, 0) if is_count(prompt) else None


EMBEDDINGS = EmbeddingsSurface()
EMBEDDINGS_API = Api(
    "embeddings",
    "/v1/embeddings",
    EMBEDDINGS,
    check_embeddings_request,
    embeddings_request_texts,
    embeddings_usage,
    operation="embeddings",
    streams=False,
    request_tokens=embeddings_request_tokens,
)
