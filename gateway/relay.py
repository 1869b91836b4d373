"""The per-chunk transformation of a chat-completions SSE stream.

Fed the upstream's bytes as they arrive (framing by `sse.SSEParser`): each event's
`delta.content` goes through one streaming redactor per choice index. An event whose
content comes out unchanged, and every event without content (role, tool_calls, usage,
comments), is relayed byte for byte; held-back text is flushed into the choice's
`finish_reason` chunk, or before `[DONE]`. No aiohttp here: bytes in, bytes to write out.
"""

from __future__ import annotations

import bisect
import itertools
import json
import operator
import re
from typing import Any

import orjson

from . import sse
from .models import Usage
from .redact import OnRedaction, Redactor, StreamRedactor

# The common chat-completions chunk, seen as bytes: its delta text, JSON-escaped. Only a
# "content" string directly inside a "delta" object counts (no object nested before it, so no
# other field's "content" is taken for it; JSON escapes every quote inside a string, so the
# keys found are real keys).
_CONTENT = re.compile(rb'"delta": ?\{[^{}\n]*?"content": ?"([^"\\\n]*(?:\\.[^"\\\n]*)*)"')
# Events the fast path leaves to the exact one: the end, usage, a choice's last chunk,
# looked for in the JSON spacing of the read's first event. An upstream that mixed spacings
# within one stream would lose nothing: such a chunk without delta text fails the delta
# count and takes the exact path anyway; with delta text, its held text would go out in a
# chunk of its own before [DONE] instead of inside it.
_DONE_MARK = b"data: [DONE]\n"
_DONE_EVENT = b"data: [DONE]\n\n"
_DONE_AFTER_EVENT = b"\n\n" + _DONE_EVENT  # [DONE] after another event
_AS_RECEIVED = ("", -1)  # StreamRelay._settled: the events go out unchanged
_EMPTY_CONTENTS = (b'"content":null', b'"content": null', b'"content":""', b'"content": ""')
_COMPACT_MARKS = (_DONE_MARK, b'"usage":{', b'"finish_reason":"')
_SPACED_MARKS = (_DONE_MARK, b'"usage": {', b'"finish_reason": "')
_OTHER_CHOICE = re.compile(rb'"index": ?[1-9]')
# The marks and another choice at once, in either spacing, for a read of one event: there
# one short regex search costs less than five bytes searches.
_SPECIAL_OR_OTHER_CHOICE = re.compile(rb'"(?:finish_reason": ?"|usage": ?\{|index": ?[1-9])')


class StreamRelay:
    """Feed the upstream's bytes as they arrive; get back the bytes to send on.

    Fast paths, for one-line `data:` events of a single choice, none of them special: a
    read of one event (a live stream) is found by the template of the last one or two
    short searches (`_single`); a read of many events built alike is checked against the
    first one's template with whole-read byte operations (`_templated`); other runs by one
    regex pass (`_fast`). Their texts are decoded in one call and fed to the redactor
    together. When nothing is masked the events go out as received, except the few whose
    text moves because a tail is held back (rewritten with just their content replaced).
    Anything else (several choices, masking, usage, the finish chunk, comments, odd
    framing) takes the exact path: parse, redact and re-encode event by event. With
    redaction off, reads go out as received and only usage and [DONE] are looked for.
    """

    __slots__ = (
        "_head",
        "_on_redaction",
        "_parser",
        "_redactor",
        "_streams",
        "_tail",
        "_template",
        "done",
        "response_model",
        "usage",
    )

    def __init__(self, redactor: Redactor | None, on_redaction: OnRedaction | None) -> None:
        self._redactor = redactor
        self._on_redaction = on_redaction
        self._parser = sse.SSEParser()
        self._streams: dict[int, StreamRedactor] = {}
        # id/model/... for a synthetic flush chunk; bytes: an event's JSON, parsed only if one is needed
        self._template: dict[str, Any] | bytes | None = None
        # The last plain text event's bytes before and after its delta text ("data: " and the
        # blank line included): the next events are usually built alike, and one that starts
        # and ends so, with no quote in between, is known to be one without a search.
        self._head = self._tail = b"\x00"
        self.usage: Usage | None = None
        self.response_model: str | None = None
        self.done = False

    def feed(self, chunk: bytes) -> bytes:
        """b"" until an event is complete; then the events' bytes to send."""
        blocks = self._parser.complete(chunk)
        if not blocks:
            return b""
        if self._redactor is None:
            return self._unredacted(blocks)
        first_end = blocks.find(b"\n")
        if first_end == len(blocks) - 2:  # one one-line event: a live stream's usual read
            return self._single(blocks)
        if blocks.startswith(b"\n", first_end + 1):  # the first event is one line
            out = self._templated(blocks, first_end)
            if out is not None:
                return out
        return self._blocks(blocks)

    def _unredacted(self, blocks: bytes) -> bytes:
        """Redaction off: every event goes out as received; only usage (tokens for the metrics)
        and [DONE] are looked for, and with no usage object anywhere one search finds the end."""
        if _carries_usage(blocks):
            return self._blocks(blocks)  # read exactly, event by event where it matters
        if blocks.startswith(_DONE_EVENT) or blocks.rfind(_DONE_AFTER_EVENT) >= 0:  # from the end: it is last
            self.done = True
        return blocks

    def _blocks(self, blocks: bytes) -> bytes:
        """Whole events, as they came: the fast path up to the first special one, then exact."""
        if blocks == _DONE_EVENT:  # the usual last read, or what a burst ends with
            return self._done(blocks)
        special = _first_special(blocks)
        if special < 0:
            return self._run(blocks)
        cut = blocks.rfind(b"\n\n", 0, special) + 2  # where the special event begins
        if cut == 1:
            return self._events(sse.parse_blocks(blocks))
        return self._run(blocks[:cut]) + self._events(sse.parse_blocks(blocks[cut:]))

    def close(self) -> bytes:
        """The upstream ended: a last event without its blank line, then held text."""
        return self._events(self._parser.close()) + self.finish()

    def _events(self, events: list[sse.Event]) -> bytes:
        return b"".join(self._event(event) for event in events)

    def finish(self) -> bytes:
        """The upstream ended (or broke): whatever text is still held, as one last chunk."""
        flushed = {i: r.flush() for i, r in self._streams.items() if r.held}
        self._streams.clear()
        if not any(flushed.values()):
            return b""
        template = _template_of(self._template) if isinstance(self._template, bytes) else self._template
        chunk = dict(template or {"object": "chat.completion.chunk"})
        chunk["choices"] = [
            {"index": i, "delta": {"content": text}, "finish_reason": None} for i, text in flushed.items() if text
        ]
        return sse.encode(orjson.dumps(chunk))

    def _run(self, blocks: bytes) -> bytes:
        out = self._fast(blocks)
        return self._events(sse.parse_blocks(blocks)) if out is None else out

    def _fast(self, blocks: bytes) -> bytes | None:
        """The run of events as one text (see the class docstring); None: not this path."""
        n = blocks.count(b"\n\ndata: ") + 1
        if not (blocks.startswith(b"data: ") and blocks.count(b"\n") == 2 * n):
            return None  # not only one-line data events (comments, multi-line data, blank lines)
        if self._redactor is None:
            return blocks
        if _OTHER_CHOICE.search(blocks):
            return None  # several choices: each has its own text
        if n == 1:
            span = self._text_span(blocks)
            return None if span is None else self._one(blocks, *span)
        raws = _CONTENT.findall(blocks)
        if len(raws) != n:
            return None
        try:
            texts: list[str] = orjson.loads(b'["' + b'","'.join(raws) + b'"]')
        except orjson.JSONDecodeError:
            return None
        result = self._settled(blocks, "".join(texts))
        if result is None:
            return None
        return blocks if result is _AS_RECEIVED else _moved(blocks, texts, *result)

    def _templated(self, blocks: bytes, first_end: int) -> bytes | None:
        """A burst of events built alike (a fast upstream, or one replaying a reply): each one
        the first event with only its delta text changed. Found and checked with a few
        whole-read byte operations instead of scans per mark, which on a 40-event read cost
        several times more. The events after the run take the other paths; None: no run of
        two or more here (the first event is special, or the second is built otherwise)."""
        span = self._text_span(blocks[: first_end + 2])
        if span is None:
            return None
        head, tail = self._head[6:], self._tail[:-2]  # around the text, "data: " and the blank line left out
        second_end = blocks.find(b"\n", first_end + 2)
        if not (blocks.startswith(self._head, first_end + 2) and blocks.endswith(tail, 0, second_end)):
            return None  # the second event is built otherwise: no run (a cheap look before the splitting)
        pieces = blocks.split(b"\n\ndata: ")  # each event's JSON, if all are one-line data events
        pieces[0], pieces[-1] = pieces[0][6:], pieces[-1][:-2]  # "data: " and the last blank line
        n = len(pieces)
        while n and not (pieces[n - 1].startswith(head) and pieces[n - 1].endswith(tail)):
            n -= 1  # the special events at the end: [DONE], the finish chunk, usage
        if n < 2:
            return None
        raws = list(map(operator.itemgetter(slice(len(head), -len(tail))), pieces[:n]))
        run = self._head + (tail + b"\n\ndata: " + head).join(raws) + self._tail
        if not blocks.startswith(run):
            return None  # some event in between is built otherwise
        rest = blocks[len(run) :]
        joined = b"".join(raws)
        texts: list[str] | None = None  # each event's text, decoded only when needed
        if joined.find(b'"') < 0 and joined.find(b"\\") < 0:  # no escapes: the usual text
            try:
                text: str = orjson.loads(b'"' + joined + b'"')
            except orjson.JSONDecodeError:
                return None
        else:
            texts = _whole_strings(raws)
            if texts is None:
                return None
            text = "".join(texts)
        # The reply ends in this read with no more text (a finish chunk, usage, [DONE]):
        # nothing need be held back, so no text moves and no chunk is added to flush it.
        final = (rest.startswith(_DONE_EVENT) or rest.find(_DONE_AFTER_EVENT) >= 0) and _without_text(rest)
        result = self._settled(run, text, final)
        if result is None:
            return None
        changed = result is not _AS_RECEIVED
        if changed:
            # Texts moved: the run rebuilt from the template, no event looked up.
            if texts is None:
                texts = [raw.decode() for raw in raws]  # no escapes: the bytes are the text
            for i, now in _texts_moved(texts, *result):
                raws[i] = orjson.dumps(now)[1:-1]
            run = self._head + (tail + b"\n\ndata: " + head).join(raws) + self._tail
        if not rest:
            return run if changed else blocks
        after = self._blocks(rest)
        if not changed and after is rest:
            return blocks  # every event as received: no copy of the read
        return run + after

    def _settled(self, blocks: bytes, text: str, final: bool = False) -> tuple[str, int] | None:
        """Choice 0's text (the events' texts joined) through its redactor when nothing in it
        is masked: the text held back before and how much of it and the text goes out now, or
        `_AS_RECEIVED` when that is exactly the text. None when something is masked (then
        nothing changed: the events take the exact path)."""
        result = self._stream_of_choice_0(blocks).feed_unmasked(text, final)
        if result is None:
            return None
        held, emitted = result
        if not held and emitted == len(text):
            return _AS_RECEIVED  # the common case: every event as received
        return result

    def _single(self, event: bytes) -> bytes:
        """A read of one one-line event: `feed` with two short searches, or none when it is
        built like the last one, instead of block scans."""
        span = self._text_span(event)
        if span is not None:
            out = self._one(event, *span)
            if out is not None:
                return out
        if event == _DONE_EVENT:
            return self._done(event)
        return self._events(sse.parse_blocks(event))

    def _text_span(self, event: bytes) -> tuple[int, int] | None:
        """Where a plain text event of choice 0 (one one-line event, not special) has its delta
        text, JSON-escaped; None: not such an event. Built like the last one, it is such an
        event if what lies between is one JSON string's inside, as `_one` checks by decoding it."""
        head, tail = self._head, self._tail
        if event.startswith(head) and event.endswith(tail):
            return len(head), len(event) - len(tail)
        if not event.startswith(b"data: {") or _SPECIAL_OR_OTHER_CHOICE.search(event):
            return None
        found = _CONTENT.search(event)
        if found is None or event.find(b'"delta"', found.end()) >= 0:
            return None  # no delta text, or a second delta (two choices 0?)
        self._head, self._tail = event[: found.start(1)], event[found.end(1) :]
        return found.start(1), found.end(1)

    def _one(self, event: bytes, start: int, end: int) -> bytes | None:
        """`_fast` for a read of one event, the usual case for a live stream: no lists."""
        raw = event[start:end]
        try:
            text: str = orjson.loads(b'"' + raw + b'"')
        except orjson.JSONDecodeError:
            return None
        result = self._stream_of_choice_0(event).feed_unmasked(text)
        if result is None:
            return None
        held, emitted = result
        now = (held + text)[:emitted] if held else text[:emitted]
        if now == text:
            return event
        return event[:start] + orjson.dumps(now)[1:-1] + event[end:]

    def _stream_of_choice_0(self, blocks: bytes) -> StreamRedactor:
        stream = self._streams.get(0)
        if stream is None:
            stream = self._streams[0] = self._stream()
            if self._template is None:
                self._template = blocks[6 : blocks.index(b"\n")]
        return stream

    def _event(self, event: sse.Event) -> bytes:
        """The exact path: one event, parsed, redacted per choice, re-encoded if changed."""
        data = event.data
        if data is None:
            return event.raw
        if data == sse.DONE:
            return self._done(event.raw)
        wants_usage = _carries_usage(data)
        if not wants_usage and (self._redactor is None or (data.find(b'"content"') < 0 and not self._holding())):
            return event.raw
        try:
            chunk = loads_reply(data)
        except (ValueError, RecursionError):
            return event.raw  # not JSON: nothing in it is a delta
        if not isinstance(chunk, dict):
            return event.raw
        if wants_usage:
            self._note_usage(chunk)
        if self._redactor is None or not self._redact_choices(chunk):
            return event.raw
        return sse.encode(orjson.dumps(chunk))

    def _done(self, event: bytes) -> bytes:
        self.done = True
        return self.finish() + event

    def _holding(self) -> bool:
        return any(r.held for r in self._streams.values())

    def _redact_choices(self, chunk: dict[str, Any]) -> bool:
        choices = chunk.get("choices")
        if not isinstance(choices, list):
            return False
        if self._template is None:
            self._template = _template_from(chunk)
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


def _first_special(blocks: bytes) -> int:
    """Where the first special mark is, or -1 (bytes.find: faster than a regex here)."""
    first = len(blocks)
    colon = blocks.find(b'":', 0, 256)  # the first key's: `"id": "` or `"id":"`
    marks = _SPACED_MARKS if blocks[colon + 2 : colon + 3] == b" " else _COMPACT_MARKS
    for mark in marks:
        at = blocks.find(mark, 0, first)  # only before the first one found so far
        if at >= 0:
            first = at
    return first if first < len(blocks) else -1


def _carries_usage(data: bytes) -> bool:
    """Whether a usage object is in these events (bytes.find: see SSEParser.complete)."""
    return data.find(b'"usage"') >= 0 and (data.find(b'"usage":{') >= 0 or data.find(b'"usage": {') >= 0)


def _whole_strings(raws: list[bytes]) -> list[str] | None:
    """The texts, each decoded on its own, if each is a whole JSON string's inside: no quote
    in it and no backslash ending it (so no event hides another field, usage say, behind a
    quote in its text). None if not."""
    array = b'["' + b'","'.join(raws) + b'"]'
    if array.count(b'"') != 2 * len(raws) or array.find(b'\\"') >= 0:
        return None
    try:
        texts: list[str] = orjson.loads(array)
    except orjson.JSONDecodeError:
        return None
    return texts


def _without_text(events: bytes) -> bool:
    """Whether no "content" in these events can be text: each one is null or empty."""
    keys = events.count(b'"content"')
    return keys == 0 or keys == sum(map(events.count, _EMPTY_CONTENTS))


def _moved(blocks: bytes, texts: list[str], held: str, emitted: int) -> bytes:
    """The events with their texts moved (see `_texts_moved`). The i-th delta string in the
    bytes carries texts[i]; only the changed ones, the first and some of the last, are looked
    up, from each end, and replaced."""
    changed = _texts_moved(texts, held, emitted)
    n = len(texts)
    last = min((i for i, _ in changed if i > 0), default=n)
    located = dict(zip(range(last, n), _last_contents(blocks, n - last), strict=True))
    if changed and changed[0][0] == 0 and 0 not in located:
        first = _CONTENT.search(blocks)
        assert first is not None  # the fast path counted n of them
        located[0] = first
    pieces: list[bytes] = []
    copied = 0
    for i, now in changed:
        m = located[i]
        pieces += (blocks[copied : m.start(1)], orjson.dumps(now)[1:-1])
        copied = m.end(1)
    pieces.append(blocks[copied:])
    return b"".join(pieces)


def _texts_moved(texts: list[str], held: str, emitted: int) -> list[tuple[int, str]]:
    """Which texts change, and to what, when `held` (text held back before) goes out first
    and of held + texts only the first `emitted` characters go out now: the first, and those
    reaching into the text held back now."""
    whole = held + "".join(texts)
    n = len(texts)
    ends = list(itertools.accumulate(map(len, texts), initial=len(held)))  # texts[i] ends at ends[i + 1]
    tail = bisect.bisect_right(ends, emitted, 1) - 1  # the first text reaching past `emitted`
    changed: list[tuple[int, str]] = []
    for i in itertools.chain((0,) if tail > 0 else (), range(tail, n)):
        start = 0 if i == 0 else ends[i]
        now = whole[start : max(start, min(ends[i + 1], emitted))]
        if now != texts[i]:
            changed.append((i, now))
    return changed


def _last_contents(blocks: bytes, count: int) -> list[re.Match[bytes]]:
    """The last `count` delta strings: searched from the start of the count-th event from the
    end; if those events hold some other number of them, from the start."""
    if count == 0:
        return []
    at = len(blocks)
    for _ in range(count):
        at = blocks.rfind(b"\n\ndata: ", 0, at)
        if at < 0:
            break  # the first event
    found = list(_CONTENT.finditer(blocks, at + 2 if at >= 0 else 0))
    if len(found) != count:
        found = list(_CONTENT.finditer(blocks))[-count:]
    return found


def _template_of(data: bytes) -> dict[str, Any] | None:
    try:
        chunk = loads_reply(data)
    except (ValueError, RecursionError):
        return None
    return _template_from(chunk) if isinstance(chunk, dict) else None


def _template_from(chunk: dict[str, Any]) -> dict[str, Any]:
    """What a synthetic flush chunk copies from the upstream's chunks."""
    return {k: chunk[k] for k in ("id", "object", "created", "model") if k in chunk}


def loads_reply(data: bytes) -> Any:
    """The upstream's JSON (a reply or a chunk), parsed. JSON's grammar allows a lone UTF-16
    surrogate escape ("\\ud800": half of an emoji, say), which orjson refuses; rather than relay
    such a reply unredacted, the stdlib parses it and each lone surrogate becomes U+FFFD (it
    has no UTF-8 form anyway). ValueError or RecursionError: not JSON."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return _without_lone_surrogates(json.loads(data))


def _without_lone_surrogates(value: Any) -> Any:
    if isinstance(value, str):  # json.loads already joined every valid pair
        return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    if isinstance(value, list):
        return [_without_lone_surrogates(item) for item in value]
    if isinstance(value, dict):
        return {_without_lone_surrogates(k): _without_lone_surrogates(v) for k, v in value.items()}
    return value


def usage_of(body: dict[str, Any]) -> Usage | None:
    usage = body.get("usage")
    if not isinstance(usage, dict):
        return None
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if isinstance(prompt, int) and isinstance(completion, int):
        return Usage(prompt, completion)
    return None
