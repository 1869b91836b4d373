"""Event streams joined into the one reply their API's JSON form is: a request without
"stream" that an upstream answered with events (a server that streams whatever it is asked)
gets JSON, as it asked (SPEC §11, §12). Chat's join is translate.completion_from_events,
over the same `event_objects`.

Joined from the relay's output, so every text is exactly what the stream would have carried,
redacted per text stream with its split guarantee. Pure functions of bytes, linear in them:
each event parsed once, each text's pieces gathered in a list and joined once (a string grown
by += inside a dict is copied whole at every delta: quadratic)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from . import sse
from .relay import loads_reply


@dataclass(frozen=True, slots=True)
class Joined:
    """What a stream's events add up to: `reply`, when they ended as their API's streams end;
    else `error`, the error object they ended with (None: they ended without one, or held no
    reply at all)."""

    reply: dict[str, Any] | None = None
    error: dict[str, Any] | None = None


def event_objects(events: bytes) -> Iterator[dict[str, Any]]:
    """Each event's JSON object, in order (comments, [DONE] and what is not an object skipped):
    the walk every join starts with, chat's (translate.completion_from_events) included."""
    parser = sse.SSEParser()
    for event in [*parser.feed(events), *parser.close()]:
        if event.data is None or event.data == sse.DONE:
            continue
        try:
            data = loads_reply(event.data)
        except (ValueError, RecursionError):
            continue
        if type(data) is dict:
            yield data


# --- Anthropic's Messages API -------------------------------------------------------------


@dataclass(slots=True)
class _Block:
    """A content block as its content_block_start gave it, and its deltas' pieces."""

    block: dict[str, Any]
    texts: dict[str, list[str]] = field(default_factory=dict)  # "text" or "thinking": the pieces
    json: list[str] = field(default_factory=list)  # a tool call's input, in pieces

    def add(self, name: str, piece: str) -> None:
        pieces = self.texts.get(name)
        if pieces is None:
            opening = self.block.get(name)  # the block's opening text begins it (as the SDK appends)
            pieces = self.texts[name] = [opening] if type(opening) is str else []
        pieces.append(piece)

    def joined(self) -> dict[str, Any] | None:
        """The whole block; None when its input's JSON does not parse."""
        for name, pieces in self.texts.items():
            self.block[name] = "".join(pieces)
        partial = "".join(self.json)
        if partial:  # as the SDK reads it: none at all keeps content_block_start's input
            try:
                self.block["input"] = loads_reply(partial.encode())
            except (ValueError, RecursionError):
                return None
        return self.block


# The deltas whose text is a piece of a field of the block, by the block's type.
_TEXT_DELTAS = {("text_delta", "text"): "text", ("thinking_delta", "thinking"): "thinking"}


def message_from_events(events: bytes) -> Joined:
    """Anthropic's events as the Message its SDK builds from them (the stream's
    `get_final_message()`, which the JSON reply equals): message_start's message; its content
    blocks in index order, each as content_block_start opened it with its deltas applied (text
    and thinking joined, a tool call's input parsed from its joined `partial_json`, the last
    signature, citations appended, a compaction's content replaced); message_delta's stop
    reason and sequence, and its usage counts over message_start's (output_tokens, and the
    cumulative input and cache counts when it has them). Whole only with message_stop."""
    message: dict[str, Any] | None = None
    blocks: dict[int, _Block] = {}
    for data in event_objects(events):
        kind = data.get("type")
        if kind == "error":
            error = data.get("error")
            return Joined(error=error if type(error) is dict else {})
        if kind == "message_start":
            start = data.get("message")
            if type(start) is dict:
                message = dict(start)
                opened = start.get("content")
                listed = opened if type(opened) is list else []
                blocks = {i: _Block(dict(b)) for i, b in enumerate(listed) if type(b) is dict}
        elif message is None:
            continue
        elif kind == "content_block_start":
            index, block = data.get("index"), data.get("content_block")
            if type(index) is int and type(block) is dict:
                blocks[index] = _Block(dict(block))
        elif kind == "content_block_delta":
            _apply_delta(blocks, data)
        elif kind == "message_delta":
            _apply_message_delta(message, data)
        elif kind == "message_stop":
            content = [blocks[index].joined() for index in sorted(blocks)]
            if any(block is None for block in content):
                return Joined(error={"type": "api_error", "message": "upstream tool input is not JSON"})
            message["content"] = content
            return Joined(reply=message)
    return Joined()


def _apply_delta(blocks: dict[int, _Block], data: dict[str, Any]) -> None:
    index, delta = data.get("index"), data.get("delta")
    if type(index) is not int or index not in blocks or type(delta) is not dict:
        return
    joined = blocks[index]
    block = joined.block
    kind = delta.get("type")
    for (delta_type, name), block_type in _TEXT_DELTAS.items():
        if kind == delta_type:
            if block.get("type") == block_type and type(delta.get(name)) is str:
                joined.add(name, delta[name])
            return
    if kind == "input_json_delta":
        if "input" in block and type(delta.get("partial_json")) is str:  # tool_use, server and MCP tools
            joined.json.append(delta["partial_json"])
    elif kind == "signature_delta":
        if block.get("type") == "thinking":
            block["signature"] = delta.get("signature")
    elif kind == "citations_delta":
        if block.get("type") == "text":
            citations = block.get("citations")
            if type(citations) is list and citations:
                citations.append(delta.get("citation"))
            else:
                block["citations"] = [delta.get("citation")]
    elif kind == "compaction_delta" and block.get("type") == "compaction":
        block["content"] = delta.get("content")  # each one the whole summary (the beta SDK's reading)
        block["encrypted_content"] = delta.get("encrypted_content")


def _apply_message_delta(message: dict[str, Any], data: dict[str, Any]) -> None:
    delta = data.get("delta")
    if type(delta) is dict:
        message["stop_reason"] = delta.get("stop_reason")
        message["stop_sequence"] = delta.get("stop_sequence")
        message.update({k: v for k, v in delta.items() if v is not None and k not in _STOPS})
    # What else it reports (context_management, …) replaces message_start's.
    message.update({k: v for k, v in data.items() if v is not None and k not in _MESSAGE_DELTA_FIELDS})
    usage = data.get("usage")
    if type(usage) is dict:
        # Its counts are cumulative: each one it has replaces message_start's.
        before = message.get("usage")
        message["usage"] = {
            **(before if type(before) is dict else {}),
            **{k: v for k, v in usage.items() if v is not None},
        }


_STOPS = frozenset({"stop_reason", "stop_sequence"})
_MESSAGE_DELTA_FIELDS = frozenset({"type", "delta", "usage"})


# --- OpenAI's Responses API ----------------------------------------------------------------

_FINAL = frozenset({"response.completed", "response.incomplete"})


def response_from_events(events: bytes) -> Joined:
    """Responses events as the Response the JSON reply is: the terminal event's `response`
    (`response.completed` or `.incomplete`: the whole Response, its texts the redaction of the
    whole of each, as the stream's copies are). `response.failed` ends with its response's
    `error`; an `error` event with its error (its `code`, `message` and `param`)."""
    for data in event_objects(events):
        kind = data.get("type")
        if kind in _FINAL:
            response = data.get("response")
            return Joined(reply=response) if type(response) is dict else Joined()
        if kind == "response.failed":
            response = data.get("response")
            error = response.get("error") if type(response) is dict else None
            return Joined(error=error if type(error) is dict else {"message": "the response failed"})
        if kind == "error":
            error = data.get("error")  # a server's OpenAI-style {"error": {...}}; else the event's own fields
            if type(error) is dict:
                return Joined(error=error)
            return Joined(error={name: data[name] for name in ("code", "message", "param") if name in data})
    return Joined()
