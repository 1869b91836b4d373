"""The per-chunk transformation of a chat-completions SSE stream.

`sse.parse → redactor.feed → sse.encode`: each event's `delta.content` goes through one
streaming redactor per choice index. An event whose content comes out unchanged, and every
event without content (role, tool_calls, usage, comments), is relayed byte for byte;
held-back text is flushed into the choice's `finish_reason` chunk, or before `[DONE]`.
No aiohttp here: it is fed events and returns bytes to write.
"""

from __future__ import annotations

from typing import Any

import orjson

from . import sse
from .models import Usage
from .redact import OnRedaction, Redactor, StreamRedactor


class StreamRelay:
    __slots__ = ("_on_redaction", "_redactor", "_streams", "_template", "done", "response_model", "usage")

    def __init__(self, redactor: Redactor | None, on_redaction: OnRedaction | None) -> None:
        self._redactor = redactor
        self._on_redaction = on_redaction
        self._streams: dict[int, StreamRedactor] = {}
        self._template: dict[str, Any] | None = None  # id/model/... for a synthetic flush chunk
        self.usage: Usage | None = None
        self.response_model: str | None = None
        self.done = False

    def events(self, events: list[sse.Event]) -> bytes:
        return b"".join(self._event(event) for event in events)

    def finish(self) -> bytes:
        """The upstream ended (or broke): whatever text is still held, as one last chunk."""
        flushed = {i: r.flush() for i, r in self._streams.items() if r.held}
        self._streams.clear()
        if not any(flushed.values()):
            return b""
        chunk = dict(self._template or {"object": "chat.completion.chunk"})
        chunk["choices"] = [
            {"index": i, "delta": {"content": text}, "finish_reason": None} for i, text in flushed.items() if text
        ]
        return sse.encode(orjson.dumps(chunk))

    def _event(self, event: sse.Event) -> bytes:
        data = event.data
        if data is None:
            return event.raw
        if data == sse.DONE:
            self.done = True
            return self.finish() + event.raw
        wants_usage = b'"usage":{' in data or b'"usage": {' in data
        if not wants_usage and (self._redactor is None or (b'"content"' not in data and not self._holding())):
            return event.raw
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            return event.raw
        if not isinstance(chunk, dict):
            return event.raw
        if wants_usage:
            self._note_usage(chunk)
        if self._redactor is None or not self._redact_choices(chunk):
            return event.raw
        return sse.encode(orjson.dumps(chunk))

    def _holding(self) -> bool:
        return any(r.held for r in self._streams.values())

    def _redact_choices(self, chunk: dict[str, Any]) -> bool:
        choices = chunk.get("choices")
        if not isinstance(choices, list):
            return False
        if self._template is None:
            self._template = {k: chunk[k] for k in ("id", "object", "created", "model") if k in chunk}
        changed = False
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            index = choice.get("index", 0)
            delta = choice.get("delta")
            content = delta.get("content") if isinstance(delta, dict) else None
            stream = self._streams.get(index) if isinstance(index, int) else None
            finishing = choice.get("finish_reason") is not None
            if isinstance(content, str) and content:
                if stream is None:
                    stream = self._streams[index] = self._stream()
                out = stream.feed(content)
                if finishing:
                    out += stream.flush()
                if out != content:
                    delta["content"] = out  # type: ignore[index]
                    changed = True
            elif finishing and stream is not None and stream.held:
                if isinstance(delta, dict):
                    delta["content"] = stream.flush()
                else:
                    choice["delta"] = {"content": stream.flush()}
                changed = True
        return changed

    def _stream(self) -> StreamRedactor:
        assert self._redactor is not None
        return self._redactor.stream(self._on_redaction)

    def _note_usage(self, chunk: dict[str, Any]) -> None:
        usage = usage_of(chunk)
        if usage is not None:
            self.usage = usage
        model = chunk.get("model")
        if isinstance(model, str):
            self.response_model = model


def usage_of(body: dict[str, Any]) -> Usage | None:
    usage = body.get("usage")
    if not isinstance(usage, dict):
        return None
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if isinstance(prompt, int) and isinstance(completion, int):
        return Usage(prompt, completion)
    return None
