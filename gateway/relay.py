"""One event-stream pipeline: SSE framing → parse → redact per text stream → encode.

Fed the upstream's bytes as they arrive (framing by `sse.SSEParser`), it returns the bytes to
send on. Each event's JSON is parsed; the fields its surface's description names (see
`surfaces.py`) go through one streaming redactor per field and index, so PII split across
events is still masked; every other string in it is redacted whole. The event is then
written from what was parsed: with an upstream that sends compact JSON (OpenAI and
Anthropic do) an unchanged event is its own bytes again, and what a parser would not see
(a repeated key, an escaped key) never reaches the client. An event that is not the JSON
object it should be has its text redacted whole. Held text is flushed into a choice's
finishing chunk, or in a chunk of its own before the end. Where a surface's events repeat a
streamed text whole (the Responses API's `.done` events and final response), the relay keeps
what each text stream gave out and puts it in every such copy. Nothing after the event that
ends a stream is relayed. No aiohttp here.
"""

from __future__ import annotations

import enum
import functools
import json
import re
from collections.abc import Callable
from typing import Any, Final, Literal, Protocol

import orjson

from . import sse
from .errors import GatewayError, UpstreamError
from .models import Usage
from .redact import (
    YIELD_ABOVE_CHARS,
    JsonStreamRedactor,
    OnRedaction,
    Redactor,
    ResumedJsonStream,
    ResumedStream,
    StreamRedactor,
    digit_view,
    feed_sliced,
    has_trigger,
    redact_sliced,
)
from .surfaces import (
    CARD_SIZED,
    CHAT,
    LEFT_OUT,
    TEXT,
    THINKING_CHUNKS,
    All,
    Each,
    Leaf,
    Path,
    Spec,
    Surface,
    chat_usage,
    put,
)

# What every card, phone, IBAN or SSN lies in (redact.py's `_DIGIT_RUN`, over bytes): a run
# of digits, capitals and separators at least 11 long, or shorter after a "+". The regex tries
# every digit and capital of an event; the runs are found first by mapping each byte to
# "x" (a run character) or " " and searching for eleven "x": one C pass each.
# The no-break spaces (U+00A0, U+202F) group digits too, and so do Unicode's hyphens (U+2010,
# U+2011): one repetition each, whatever their UTF-8 length; the byte map counts their bytes as
# run bytes wherever they stand (more runs to confirm, none missed).
_RUN_CHAR = rb"(?:[0-9A-Z ()+.-]|\xc2\xa0|\xe2\x80[\xaf\x90\x91])"
# Whether there is a match, not how far it goes: no repetition runs past the length it needs
# (greedy, a search went to the end of a megabyte run of digits, ~0.3 s in one C call).
_RUN_IN_BYTES = re.compile(rb"[0-9(A-Z+](?:(?<=\+)" + _RUN_CHAR + rb"{3}|" + _RUN_CHAR + rb"{10})")
_PLUS_RUN = re.compile(rb"\+" + _RUN_CHAR + rb"{3}")  # the pattern's first branch, from its "+"
_LONGEST_RUN = 1 + 10 * 3  # bytes a match of _RUN_IN_BYTES spans at most (a no-break space is 3)
_SEARCH_BYTES = 64 * 1024  # a long event's bytes searched this many at a time (a few ms each)
_RUN_BYTES = frozenset(b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ ()+.-\xc2\xa0\xe2\x80\xaf\x90\x91")
_RUN_MAP = bytes(ord("x") if b in _RUN_BYTES else ord(" ") for b in range(256))
_ELEVEN = b"x" * 11


def side_may_match(data: bytes) -> bool:
    """Whether any string in these bytes could hold PII: an "@", or a run the redactor's run
    pattern accepts (a dated model name, "-2024-08-06", is eleven run characters but none)."""
    if data.find(b"@") >= 0:
        return True
    if not data.isascii() or data.find(b"\t") >= 0:  # other scripts' digits are digits, a tab a space (`digit_view`)
        text = data.decode("utf-8", "replace")
        view = digit_view(text)
        if view is not text:  # else the bytes read the same
            data = view.encode()
    if len(data) < 11 and data.find(b"+") < 0:
        return False  # too short for a run (a pad, an id): the common case, decided here
    if data.find(b"+") >= 0:  # a "+" phone's run may be short
        if len(data) <= _SEARCH_BYTES:
            # A "+" and three run characters, first: a match of the pattern too, found by its
            # literal at memchr speed. Base64 (an embedding) has one within a few hundred bytes,
            # where the pattern alone tried every capital and digit on the way there (~4 us, 50k
            # instructions, for the 124 bytes before the bench's embedding has one).
            return _PLUS_RUN.search(data) is not None or _RUN_IN_BYTES.search(data) is not None
        return _run_in(data, 0, len(data))
    mapped = data.translate(_RUN_MAP)
    at = mapped.find(_ELEVEN)
    while at >= 0:
        end = mapped.find(b" ", at)
        if end < 0:
            end = len(data)
        if end - at <= _SEARCH_BYTES:
            if _RUN_IN_BYTES.search(data, at, end) is not None:
                return True
        elif _run_in(data, at, end):
            return True
        at = mapped.find(_ELEVEN, end)
    return False


def _run_in(data: bytes, at: int, end: int) -> bool:
    """Whether `_RUN_IN_BYTES` matches in data[at:end], searched in windows that overlap by a
    match's length: one search over megabytes holds the GIL as long (~60 ms for 15 MiB of
    dashes, in an event relayed in a worker thread: see `StreamRelay.aside`)."""
    for start in range(at, end, _SEARCH_BYTES):
        if _RUN_IN_BYTES.search(data, start, min(start + _SEARCH_BYTES + _LONGEST_RUN, end)) is not None:
            return True
    return False


# A "usage" key whose value is not null (anything else, an unexpected spacing included, is
# worth parsing).
_NOT_NULL = rb"[ \t\r\n]*:[ \t\r\n]*(?!null[ \t\r\n,}])"
_USAGE_VALUE = re.compile(
    rb'"(?:u|\\u0075)(?:s|\\u0073)(?:a|\\u0061)(?:g|\\u0067)(?:e|\\u0065)"'  # the key, its letters escaped or not
    + _NOT_NULL
)
# The same without escapes: a literal prefix, which the regex engine finds with a fast search
# (a look-ahead, so that a key whose value is null does not hide a key inside it).
_USAGE_KEY_VALUE = re.compile(rb'"usage"(?=' + _NOT_NULL + rb")")


def usage_values(blocks: bytes) -> list[int]:
    """Where `_USAGE_VALUE` matches, in order. Without an escape it is found by its key:
    a regex that may start at every quote of a chunk costs ten times as much."""
    if blocks.find(b"\\") >= 0 and blocks.find(b"\\u00") >= 0:  # memchr first: ~40x faster than a 4-byte find
        return [m.start() for m in _USAGE_VALUE.finditer(blocks)]
    first = blocks.find(b'"usage"')  # memchr speed; the regex engine's prefix search is ~5x slower
    return [] if first < 0 else [m.start() for m in _USAGE_KEY_VALUE.finditer(blocks, first)]


MAX_STREAMS = 256  # text streams open at once; past that (a hostile upstream), the stream ends
MAX_ENDED = 16_384  # ended streams remembered (a path each), so that text sent after its end is dropped


# What follows a chat choice's ("choices", index, "delta") on the paths of the texts clients
# append to whatever comes between: its content, its refusal, and the thinking of a content that
# comes as chunks (flushed when the answer begins: thinking after answer text goes on with it,
# as clients join every thinking chunk).
_RESUMED_TAILS = (("content",), ("refusal",), ("content", THINKING_CHUNKS))


def _resumes(path: Path) -> bool:
    """A text clients append to, whatever comes between (`_RESUMED_TAILS`)."""
    return len(path) > 3 and path[0] == "choices" and path[3:] in _RESUMED_TAILS


class _TooManyStreams(Exception):
    """A text needs a stream past MAX_STREAMS (or MAX_ENDED), and none can be let go. Raised
    on the fast path with the first byte of the value that found no room."""


MAX_KEPT_CHARS = 4 * 1024 * 1024  # streamed text kept for its later copies, per reply
# A read whose events may add up to more bytes than this is relayed in a worker thread (see
# `StreamRelay.aside`): on the loop it could take ~60 ms of the costliest text, ~1 s a MiB.
ASIDE_BYTES = 64 * 1024


class _Redactions:
    """The relay's `on_redaction`: each redaction reported as it happens, or, while the relay
    works in a worker thread, counted by kind in `noted`, for the loop to report after (the
    metrics are the loop's; one report per kind, not one per mask)."""

    __slots__ = ("noted", "report")

    def __init__(self, report: OnRedaction | None) -> None:
        self.report = report
        self.noted: dict[str, int] | None = None

    def __call__(self, kind: str) -> None:
        noted = self.noted
        if noted is None:
            assert self.report is not None
            self.report(kind)
        else:
            noted[kind] = noted.get(kind, 0) + 1


class StreamRelay:
    """Feed the upstream's bytes as they arrive; get back the bytes to send on."""

    __slots__ = (
        "_ended",
        "_hide_usage",
        "_kept",
        "_kept_chars",
        "_last_plan",
        "_markers",
        "_number_key",
        "_numbered",
        "_on_redaction",
        "_plans",
        "_redactions",
        "_redactor",
        "_resumed",
        "_scratch",
        "_sliced",
        "_streams",
        "_surface",
        "_templates",
        "_truncated",
        "busy",
        "done",
        "failure",
        "parser",
        "response_model",
        "usage",
        "usage_final",
    )

    def __init__(
        self,
        redactor: Redactor | None,
        on_redaction: OnRedaction | None,
        surface: Surface = CHAT,
        max_event_bytes: int = 0,
        *,
        hide_usage: bool = False,
    ) -> None:
        self._redactor = redactor
        self._redactions = _Redactions(on_redaction)
        self._on_redaction = self._redactions if on_redaction is not None else None
        self._sliced = False  # in a worker thread: long texts go to the redactor in slices
        self.busy = False  # a worker thread has it (see `aside`): the loop must leave it be
        self._surface = surface
        self._hide_usage = hide_usage  # a chunk with only usage, asked for by the gateway: noted, not relayed
        # Redaction off: the bytes of the events that end the stream, looked for in every read.
        done = surface.done_data
        self._markers = surface.done_markers if done is None else (*surface.done_markers, done)
        # Its framing; `parser.pending`: the bytes of an incomplete event (read, not written, outside).
        self.parser = sse.SSEParser(max_event_bytes) if max_event_bytes else sse.SSEParser()
        self._streams: dict[Path, StreamRedactor] = {}  # one per text field and indices, in order of arrival
        self._ended: set[Path] = set()  # streams whose held text was flushed: they take no more text
        # Streams flushed to go on afresh (Surface.restart_before), the held text they sent and,
        # for a JSON text, whether that text began inside a string and an escape cut short
        # (JsonStreamRedactor.suspend): text that comes for them later continues it
        # (ResumedStream, ResumedJsonStream).
        self._resumed: dict[Path, tuple[str, bool, str]] = {}
        self._templates: dict[Path, dict[str, Any]] = {}  # what a flush event copies, by root: its first event
        # What each text stream gave out, for the events that repeat it whole (None: too long to keep).
        self._kept: dict[Path, list[str] | None] | None = {} if surface.keeps_copies else None
        self._kept_chars = 0
        # A number every event of the surface carries (the Responses API's sequence_number): the
        # fast path reads it apart from an event's shape, and notes it for the surface.
        self._numbered = surface.numbered
        self._number_key = b'"' + surface.numbered.encode() + b'":' if surface.numbered else b""
        self._plans: dict[tuple[bytes, ...], Plan] = {}  # the fast path's, by its segments
        self._last_plan: Plan | None = None
        self.usage: Usage | None = None
        self._scratch: dict[str, int] = {}  # the surface's: usage reported in parts, sequence numbers
        self.usage_final = False  # the usage is the reply's last word (not message_start's first count)
        self.response_model: str | None = None
        self.done = False
        self.failure: UpstreamError | None = None  # the upstream event that ended the stream early
        self._truncated = False  # the body ended part-way through an event (see close)

    def feed(self, chunk: bytes) -> bytes:
        """b"" until an event is complete; then the events' bytes to send. An event past the
        parser's size limit is the upstream's failure (UpstreamError)."""
        try:
            blocks = self.parser.complete(chunk)
        except sse.EventTooLarge as exc:
            raise UpstreamError(f"upstream sent an event larger than {exc.limit} bytes") from None
        if not blocks:
            return b""
        if self._redactor is None:
            return self._unredacted(blocks)
        # Events going out as they came are not copied one by one: blocks[copied:at] is a run
        # of them, added to `out` when something else has to go between.
        out: list[bytes] = []
        copied = at = 0
        end = len(blocks)
        while at < end:
            if self.done:
                break  # nothing follows the end of a stream (a [DONE] after response.completed)
            if self._last_plan is not None:  # the fast path: an event of a shape seen before
                spliced = self._templated(blocks, at, out, copied)
                if spliced is not None:
                    copied, at = spliced
                    continue
            stop = blocks.find(b"\n\n", at) + 2  # every event ends with a blank line, and so do blocks
            if stop < 2:
                break  # what is left is the tail of a run of blank lines ("\n\n\n"): nothing to send
            if stop == at + 2:  # a run of blank lines: nothing to send
                out.append(blocks[copied:at])
                copied = at = stop
                continue
            out.append(blocks[copied:at])
            out += [self._event(event) for event in sse.parse_blocks(blocks[at:stop])]
            copied = at = stop
        if copied == 0 and at >= end:
            return blocks  # every event as it came
        out.append(blocks[copied:at])  # up to the end of the stream, if it came
        return b"".join(out)

    def aside(self, chunk: bytes | None, noted: dict[str, int]) -> bytes:
        """`feed(chunk)` (`close()` for None), in a worker thread while the loop serves others:
        for a read whose events are long (megabytes of text take seconds to scan). Long texts
        go to the redactor in slices, so that no call into the regex engine holds the GIL for
        long; redactions are counted in `noted` by kind, for the loop to report. The caller
        sets `busy` before it hands the relay over, and touches it no more until it is clear."""
        redactions = self._redactions
        self._sliced = True
        redactions.noted = noted
        try:
            return self.feed(chunk) if chunk is not None else self.close()
        finally:
            self._sliced = False
            redactions.noted = None
            self.busy = False

    def close(self) -> bytes:
        """The upstream ended: a last event without its blank line, then held text. That last
        event goes out only if it is whole (its data JSON, or [DONE]): one the body ended
        part-way through (its JSON cut, or a name without its data) is what SSE clients drop,
        and the SDKs, handed it as an event, raised a JSON decode error instead of reading the
        stream's error event. It is left out, and the stream was cut short."""
        last = self.parser.close()
        if last and not self.done and not _whole_at_end(last[-1]):
            self._truncated = True
            last = last[:-1]
        if self._redactor is None:
            if self._number_key and last and not self.done:
                self._note_last_number(last[-1].raw)
            return b"".join([event.raw for event in last if not self.done and not self._noted(event)])
        return b"".join([self._event(event) for event in last if not self.done]) + self.finish()

    @property
    def cut_short(self) -> bool:
        """The upstream ended without the event that ends its API's streams, where that is an
        event of its own (Anthropic's message_stop, the Responses API's terminal events): the
        reply is incomplete; or its body ended part-way through an event (see close), on any
        API. (A chat stream's [DONE] is left out by some OpenAI-compatible servers: its absence
        alone says nothing.)"""
        return not self.done and (self._truncated or self._surface.done_data is None)

    def finish(self) -> bytes:
        """The upstream ended (or broke): whatever text is still held, in events of its own."""
        return self._flushed(None)

    def error_event(self, error: GatewayError) -> bytes:
        return self._surface.error_event(error, self._scratch)

    def _flushed(self, prefixes: list[Path] | None, end: bool | None = True) -> bytes:
        held = self._take_held(prefixes, end)
        return self._surface.flush_events(held, self._templates, self._scratch) if held else b""

    def _take_held(self, prefixes: list[Path] | None, end: bool | None = True) -> list[tuple[Path, str]]:
        """The held text of the streams under `prefixes` (None: all), flushed. These streams
        have ended (their part is finished): text the upstream sends them later is dropped, as
        it would make PII with what was sent ("jane.doe", flushed, then "@example.com"), and
        they no longer count against MAX_STREAMS (a long reply's finished tool calls, JSON
        streams that are never let go as idle, would fill it, and past it the stream ends).
        Unless not `end`: the text that comes next starts a new one (Surface.restart_before);
        or `end` is None: only the streams that hold text are flushed and end, the others go on
        untouched (Surface.settle_before)."""
        held: list[tuple[Path, str]] = []
        ended = [path for path in self._streams if prefixes is None or any(path[: len(p)] == p for p in prefixes)]
        for path in ended:
            if end is None and not self._streams[path].held:
                continue
            stream = self._streams.pop(path)
            json_text = isinstance(stream, JsonStreamRedactor)
            if json_text and end is False and _resumes(path) and len(self._resumed) < MAX_ENDED:
                assert isinstance(stream, JsonStreamRedactor)
                text, in_string, pending = stream.suspend()  # (past the bound: flushed whole, as it ends)
            else:
                text, in_string, pending = stream.flush(), False, ""
            # Resumed, what it held includes the text it was resumed with (calls on both sides).
            resumed = stream.held_text if isinstance(stream, ResumedStream | ResumedJsonStream) else text
            if end is not False:
                self._ended.add(path)
            elif (resumed or json_text) and _resumes(path):
                # Clients join the text that comes next to what went out (a chat choice's
                # content around its tool calls): it continues this, and a JSON text (a
                # structured output's) the same document, whether it held text or not. Past the
                # bound it takes no more. (A Responses part's second opening text replaces the
                # first: afresh.)
                if len(self._resumed) < MAX_ENDED:
                    self._resumed[path] = (resumed, in_string, pending)
                else:
                    self._ended.add(path)
            if text:
                held.append((path, text))
                if self._kept is not None:
                    self._keep(path, text)
        if end is True and self._resumed:
            # A JSON text that never went on after its pause ends with it: what the pause kept
            # back (JsonStreamRedactor.suspend: an escape cut short, a number) goes out, redacted
            # as the end of the text it was cut from.
            for path in self._resumed_under(prefixes):
                sent, in_string, pending = self._resumed.pop(path)
                self._ended.add(path)
                if pending:
                    assert self._redactor is not None  # (only a redacting relay pauses a stream)
                    text = ResumedJsonStream(self._redactor, self._on_redaction, sent, in_string, pending).flush()
                    if text:
                        held.append((path, text))
                        if self._kept is not None:
                            self._keep(path, text)
        return held

    def _resumed_under(self, prefixes: list[Path] | None) -> list[Path]:
        """The paths of `_resumed` under `prefixes` (None: all). A choice's finish looks up the
        few its choice may hold (`_resumes`), not every one: thousands of choices, each paused at
        a tool call and then finished, made the reply's cost quadratic (8,000: 10 s)."""
        resumed = self._resumed
        if prefixes is None or any(len(prefix) < 2 for prefix in prefixes):  # the stream's end, an error
            return [path for path in resumed if prefixes is None or any(path[: len(q)] == q for q in prefixes)]
        found: dict[Path, None] = {}
        for prefix in prefixes:
            at = (*prefix[:2], "delta")
            for tail in _RESUMED_TAILS:
                path = (*at, *tail)
                if path in resumed and path[: len(prefix)] == prefix:
                    found[path] = None
        return list(found)

    def _unredacted(self, blocks: bytes) -> bytes:
        """Redaction off: the events go out as received, up to the one that ends the stream
        (nothing after it); only usage and the end are looked for (and a usage chunk the
        client did not ask for is left out). Only the events that may hold a usage or end the
        stream are parsed (OpenAI puts `"usage":null` on every chunk once usage is asked for:
        those are not)."""
        if self.done:
            return b""
        if self._number_key:
            self._note_last_number(blocks)
        spans = self._worth_parsing(blocks)
        if not spans:
            return blocks
        out: list[bytes] = []
        copied = 0
        for start, stop in spans:
            hide = False
            for event in sse.parse_blocks(blocks[start:stop]):
                hide = self._noted(event) or hide
            if hide:
                out.append(blocks[copied:start])
                copied = stop
            if self.done:
                out.append(blocks[copied:stop])
                return b"".join(out)
        if not copied:
            return blocks
        out.append(blocks[copied:])
        return b"".join(out)

    def _note_last_number(self, blocks: bytes) -> None:
        """Redaction off: the number of the last event relayed (the surface's own key, read
        from the bytes: one search from the end), for the error event that may follow."""
        key = self._number_key
        at = blocks.rfind(key)
        digits = _DIGITS.match(blocks, at + len(key)) if at >= 0 else None
        if digits is not None:
            assert self._numbered is not None
            self._scratch[self._numbered] = int(digits.group())

    def _noted(self, event: sse.Event) -> bool:
        """Redaction off: the event's usage and end noted; whether it is a usage chunk to hide."""
        data = event.data
        if data is None:
            return False
        if data == self._surface.done_data:
            self.done = True
            return False
        chunk = _loads_object(data)
        if chunk is None:
            return False
        self._note(chunk)
        return self._hide_usage and self._surface.usage_only(chunk)

    def _worth_parsing(self, blocks: bytes) -> list[tuple[int, int]]:
        """Where the events that may hold a usage (not null) or end the stream lie, in order."""
        found = usage_values(blocks)  # the key as it usually comes, or escaped ("\u0075sage")
        for marker in self._markers:
            at = blocks.find(marker)
            while at >= 0:
                found.append(at)
                at = blocks.find(marker, at + 1)
        if not found:
            return []  # the usual read: nothing to parse
        spans: list[tuple[int, int]] = []
        for at in sorted(found):
            if spans and at < spans[-1][1]:
                continue  # in the event already found
            start = blocks.rfind(b"\n\n", 0, at)
            spans.append((0 if start < 0 else start + 2, blocks.find(b"\n\n", at) + 2))
        return spans

    def _event(self, event: sse.Event) -> bytes:
        """The exact path: the event parsed, redacted, written from the parse. An event whose
        bytes are what it parses to is also a candidate to learn from (see `_learn`)."""
        if not event.raw.isascii() and _has_invalid_utf8(event.raw):
            # Read as every client reads it: EventSource decodes with U+FFFD for each invalid
            # byte, and what the gateway writes is valid UTF-8 anyway; read raw, such an event
            # would not parse here while it parses there, and its text escape its stream.
            event = sse.parse_blocks(event.raw.decode("utf-8", "replace").encode())[0]
        if event.raw.startswith(sse.BOM):
            # A line opening with a BOM (the stream's own was dropped) names an unknown field:
            # ignored. Written first in what the gateway sends, a client's decoder would drop
            # it as the stream's BOM and read the line as data; as a comment, nobody reads it.
            event = sse.parse_blocks(b":" + event.raw)[0]
        data = event.data
        if data is None:  # comments (a keep-alive), or fields without data: their text redacted whole
            text = event.raw.decode("utf-8", "replace")
            clean = self._whole(text)
            return event.raw if clean == text else clean.encode()
        surface = self._surface
        done = surface.done_data
        # The openai SDKs (Python and Node) end a stream at data that starts with [DONE]
        # ("[DONE] " included): held text must go out before it, and nothing after it is read.
        if done is not None and data.startswith(done):
            self.done = True
            return self.finish() + _with_data(event, done, self._whole)  # its other lines redacted too
        stop = surface.clients_stop_at
        if stop is not None and data.startswith(stop):
            # Not this API's end, but where its clients stop reading: the stream ends there
            # for them, so held text goes out before it, and nothing after it is sent.
            self.done = True
            return self.finish() + _with_data(event, stop, self._whole)
        try:
            chunk = _loads_object(data, deep=True)
        except RecursionError:
            return self._too_deep()
        if chunk is None:
            return self._unreadable(event)
        if surface.named_types and "type" not in chunk:
            # Typed as its client reads it (Surface.named_types): redacted as the event it is there.
            name = sse.event_name(event.raw)
            if name is not None and name in surface.named_types:
                chunk["type"] = name.decode()
        wrong = surface.misindexed(chunk)
        if wrong is not None and wrong is not LEFT_OUT:
            # Whatever the gateway fed its text to, a client could file it elsewhere and join
            # it to text that was redacted apart from it: the stream ends here (SPEC §6).
            self.done = True
            self.failure = UpstreamError(f"upstream sent an event whose index is {wrong}")
            return self.finish() + self.error_event(self.failure)
        if self._hide_usage and surface.usage_only(chunk):
            self._note(chunk)
            return self.finish()  # the usage the gateway asked for is its own; held text still goes
        # An event is learned from (see `_learn`) when it is small, has no escape and is its
        # own bytes again (no spacing, no repeated or escaped key), and is plain: no usage,
        # nothing flushed before or into it, not the end.
        out = b""
        try:
            raw = event.raw
            pad = _pad_of(data)
            plain = (
                wrong is None  # a part without its index: not a shape to learn (the fast path reads no index)
                and len(self._plans) < MAX_PLANS
                and len(raw) <= MAX_PLAN_BYTES
                and raw.find(b"\\") < 0
                and _dumps(chunk) == (data[: -1 - pad] + b"}" if pad else data)
                and surface.usage(chunk, None, {}) is None
            )
            root = surface.root(chunk)
            self._note(chunk)
            before = surface.flush_before(chunk)
            out = self._flushed(before) if before is not None else b""
            settled = surface.settle_before(chunk)
            if settled is not None:
                out += self._flushed(settled, end=None)
            restart = surface.restart_before(chunk, self._scratch)
            if restart is not None:
                out += self._flushed(restart, end=False)
            fed: list[tuple[Path, Leaf, str, str]] = []
            leaf = self._recorded(fed) if plain else self._leaf
            # The one shortcut: without an escape or anything PII could be made of in the whole
            # event, only the described fields need a look (their streams may hold text back).
            scrub = root is None or data.find(b"\\") >= 0 or self._side_may_match(data)
            if root is None:  # no index to key its streams by: its texts whole, JSON ones as JSON
                walk(chunk, surface.spec_of(chunk), (), True, _read_whole(self._whole), self._whole)
            else:
                walk(chunk, surface.spec_of(chunk), root, scrub, leaf, self._whole)
            templates = self._templates
            if root is not None and root not in templates and len(templates) < MAX_STREAMS:
                templates[root] = surface.template(chunk)  # redacted: an id the upstream filled with PII stays masked
            into = surface.flush_into(chunk)
            if into is not None:
                plain = False
                for path, text in self._take_held(into):
                    put(chunk, path, text)
            shift = self._renumbered(chunk) if self._numbered is not None else 0
            parsed = _dumps(chunk)
            if parsed != data:
                # Unchanged but for the upstream's spacing (Anthropic writes `{"type": "ping"}` and
                # pads events with spaces to hide their lengths): relayed byte for byte (SPEC §11).
                # Changed: written from its parse, with the upstream's pad still hiding its length.
                padded = parsed[:-1] + data[-1 - pad :] if pad else parsed
                parsed = data if padded == data or _spaced_as(data, parsed) else padded
            written = _with_data(event, parsed, self._whole)
            # An event whose texts are all empty opens a part (OpenAI's role chunk, Anthropic's
            # content_block_start): one of its shape seldom follows, so it is not worth learning.
            if (
                plain
                and before is None
                and restart is None
                and root is not None
                and not self.done
                and any(text for _, _, text, _ in fed)
            ):
                self._learn(event, chunk, fed, written, shift)
            return out + written
        except RecursionError:  # parsed, but too deep to walk or write: some of its text may be in its streams
            return out + self._too_deep()
        except _TooManyStreams:
            return out + self._too_many()

    def _too_many(self) -> bytes:
        """More texts at once than the relay keeps streams for (a hostile upstream): the
        stream ends here, held text first."""
        self.done = True
        self.failure = UpstreamError(f"upstream sent more than {MAX_STREAMS} texts at once")
        return self.finish() + self.error_event(self.failure)

    def _too_deep(self) -> bytes:
        """An event nested past what the gateway can read (a client's parser may read it, and
        join its text to a stream's): the stream ends here, held text first (SPEC §6)."""
        self.done = True
        self.failure = UpstreamError("upstream sent an event nested too deeply to read")
        return self.finish() + self.error_event(self.failure)

    def _renumbered(self, chunk: dict[str, Any]) -> int:
        """Note the event's number (the surface's, as the fast path reads it) and move it up
        past the events the gateway inserted into the stream so far (held text flushed in
        events of its own: `Surface.flush_events` counts them in "inserted"), so that the
        numbers the client sees stay unique and increasing. Returns the shift applied."""
        key = self._numbered
        assert key is not None
        number = chunk.get(key)
        if type(number) is not int or not 0 <= number < _MAX_NUMBER:
            return 0
        self._scratch[key] = number
        shift = self._scratch.get("inserted", 0)
        if shift:
            chunk[key] = number + shift
        return shift

    def _recorded(self, fed: list[tuple[Path, Leaf, str, str]]) -> LeafText:
        """`_leaf`, noting each described text and what its stream gave out."""

        def leaf(path: Path, described: Leaf, text: str) -> str:
            now = self._leaf(path, described, text)
            fed.append((path, described, text, now))
            return now

        return leaf

    def _learn(
        self,
        event: sse.Event,
        chunk: dict[str, Any],
        fed: list[tuple[Path, Leaf, str, str]],
        written: bytes,
        shift: int = 0,
    ) -> None:
        """Keep a plain event's shape for the fast path: the bytes between its volatile values,
        which stream each value feeds, and the model it names (noted as the exact path notes
        it). Kept only when writing the event the fast path's way gives what the exact path
        wrote."""
        assert event.data is not None
        raw = event.raw
        slots = [(m.start(2), m.end(2), m.group(1)) for m in _VOLATILE.finditer(raw)]
        key = self._number_key
        if key:  # the surface's number (sequence_number): a value of its own, read as digits
            at = raw.find(key)
            digits = _DIGITS.match(raw, at + len(key)) if at >= 0 and raw.find(key, at + 1) < 0 else None
            number = chunk.get(self._numbered) if self._numbered else None
            number = number - shift if shift and type(number) is int else number  # the upstream's, as in raw
            # Only the event's own number, written as it parses (not a nested key's, not a
            # float's integer part, not the head of a longer number).
            if digits is not None and type(number) is int and str(number).encode() == digits.group():
                slots.append((digits.start(), digits.end(), b""))
                slots.sort()
        pad = _pad_of(raw[:-2]) if raw.endswith(b"\n\n") else 0
        if 0 < pad <= MAX_PAD:  # its own value: events of one shape come with pads of any length
            slots.append((len(raw) - 3 - pad, len(raw) - 3, _PAD_NAME))
        steps = _steps_of(raw, slots, fed)
        if steps is None or _with_data(event, event.data, self._whole) != raw:
            return
        segments = tuple(
            raw[begin:end]
            for begin, end in zip([0] + [e for _, e, _ in slots], [b for b, _, _ in slots] + [len(raw)], strict=True)
        )
        outputs = {str(path[-1]).encode(): now for path, _, _, now in fed}
        values = [
            str(int(raw[begin:end]) + shift).encode()
            if step is NUMBER and shift
            else raw[begin:end]
            if step is None or step is NUMBER or step is PAD or outputs[name] == raw[begin:end].decode()
            else orjson.dumps(outputs[name])[1:-1]
            for step, (begin, end, name) in zip(steps, slots, strict=True)
        ]
        if _rebuilt(segments, values) == written:
            model = chunk.get("model")
            plan = self._plans[segments] = Plan(steps, segments, model if type(model) is str else None)
            self._last_plan = plan

    def _templated(self, blocks: bytes, at: int, out: list[bytes], copied: int) -> tuple[int, int] | None:
        """The fast path, for the run of events that begins at blocks[at], each built like an
        event learned before (see `_learn`) but for its volatile values: those are read from
        the bytes and fed to their streams, and a string its stream changed is spliced in
        (what went before it is added to `out`). Returns where the bytes not yet in `out`
        begin and where the run ends; None (nothing changed yet): the event takes the exact
        path."""
        run: list[Value] = []  # every value of the run
        plans, plan = self._plans, self._last_plan
        assert plan is not None
        stop, end = at, len(blocks)
        while stop < end:
            ended = plan.read(blocks, stop, run)
            if ended < 0:
                for other in plans.values():
                    if other is not plan and (ended := other.read(blocks, stop, run)) >= 0:
                        plan = other
                        break
                else:
                    break
            if plan.model is not None:
                self.response_model = plan.model  # as the exact path notes it (the shape holds the name)
            stop = ended
        self._last_plan = plan
        if stop == at:
            return None
        edits: list[tuple[int, int, str]] = []  # (begin, end, text) of each value changed
        failed = -1
        try:
            if len(run) != 1 or not self._fed_one(run[0], edits):  # one event a read: straight to its stream
                self._fed(run, edits)
        except _TooManyStreams as no_room:
            failed = no_room.args[0]
        shift = self._scratch.get("inserted")
        if shift:  # the gateway inserted events before: the run's numbers move up past them
            edits += [(begin, end, str(int(text) + shift)) for step, begin, end, text in run if step is NUMBER]
            edits.sort()
        if failed >= 0:
            # As the exact path ends it: the events before the one that found no room go out,
            # that one does not (its number noted), then the end.
            newline = blocks.rfind(b"\n\n", at, failed)
            start = at if newline < 0 else newline + 2  # the event's first byte
            after = blocks.find(b"\n\n", failed, stop) + 2  # and its end (every event ends so)
            if self._numbered is not None:
                numbers = [text for step, begin, _, text in run if step is NUMBER and begin < after]
                if numbers:
                    self._scratch[self._numbered] = int(numbers[-1])
            edits = [edit for edit in edits if edit[0] < start]
        for begin, value_end, now in edits:
            out.append(blocks[copied:begin])
            out.append(orjson.dumps(now)[1:-1])
            copied = value_end
        if failed >= 0:
            out += [blocks[copied:start], self._too_many()]
            return end, end
        return copied, stop

    def _fed(self, run: list[Value], edits: list[tuple[int, int, str]]) -> None:
        """Feed a run's values to their streams; note in `edits`, in order, each one whose
        text changed. When the run's texts all go to one live plain-text stream, it is fed
        them at once: one decision on what to hold back for the run, not one an event (the
        texts are sent together anyway). Its output is spread over the texts in order: each
        goes out as it came unless held text comes out before it or its own is held back;
        the split guarantee (see `StreamRedactor`) makes the whole what feeding them one by
        one gives. Anything else goes one by one, in the run's order: with several streams,
        which one the stream bound lets go (`_evicted_idle`) and which one's copies stop
        being kept (`MAX_KEPT_CHARS`) follow the order texts arrive in."""
        scratch, numbered = self._scratch, self._numbered
        first: tuple[Path, Leaf] | None = None  # the first text's step
        one_stream = True
        for step, _, _, text in run:
            if step is NUMBER:
                assert numbered is not None
                scratch[numbered] = int(text)
            elif first is None:
                first = step
            elif step is not first and step != first:  # a plan's steps are shared by its events
                one_stream = False
        if first is None:
            return
        path, leaf = first
        key = self._stream_key(path, leaf)
        stream = self._streams.get(key)
        result = None
        # A plain text stream only: a JSON one may rewrite escapes, and a copy reads what its
        # stream gave out so far. And when something gets masked: one by one.
        if one_stream and len(run) > 1 and type(stream) is StreamRedactor and not leaf.copy:
            joined = "".join([text for step, _, _, text in run if step is not NUMBER])
            if not self._sliced or len(joined) <= YIELD_ABOVE_CHARS:  # else one by one, each in slices
                result = stream.feed_unmasked(joined)
        if result is None:
            for step, begin, end, text in run:
                if step is not NUMBER:
                    try:
                        now = self._leaf(step[0], step[1], text)
                    except _TooManyStreams:
                        raise _TooManyStreams(begin) from None
                    if now != text:
                        edits.append((begin, end, now))
            return
        held, emitted = result
        if not held and emitted == len(joined):
            if self._kept is not None:
                self._keep(key, joined)
            return  # the common case: every text goes out as it came
        given = held + joined
        if self._kept is not None:
            self._keep(key, given[:emitted])
        shown, through = 0, len(held)
        for step, begin, end, text in run:
            if step is NUMBER:
                continue
            if shown == through and through + len(text) <= emitted:
                shown = through = through + len(text)
                continue  # out as it came, with nothing before it: no slice to make
            through += len(text)
            upto = max(shown, min(through, emitted))
            if given[shown:upto] != text:
                edits.append((begin, end, given[shown:upto]))
            shown = upto

    def _fed_one(self, value: Value, edits: list[tuple[int, int, str]]) -> bool:
        """`_fed` for a run of one text (one event a read: a paced stream), when its stream is
        open: what `_leaf` does then, without looking the stream up twice. False: nothing
        done, the run goes the usual way (a stream to open or ended, a copy, the number)."""
        step, begin, end, text = value
        if step is NUMBER or self._sliced:
            return False
        path, leaf = step
        if leaf.copy or (leaf.opens and not text):
            return False
        key = self._stream_key(path, leaf) if leaf.joins is not None or leaf.opens else path
        stream = self._streams.get(key)
        if stream is None:
            return False
        now = stream.feed(text)
        if self._kept is not None:
            self._keep(key, now)
        if now != text:
            edits.append((begin, end, now))
        return True

    def _side_may_match(self, data: bytes) -> bool:
        return side_may_match(data)

    def _leaf(self, path: Path, leaf: Leaf, text: str) -> str:
        """A described field's text through its stream (past `MAX_STREAMS` of them, none of
        which can be let go: _TooManyStreams)."""
        if leaf.copy:
            return self._copy(path, leaf, text)
        if leaf.opens and not text:
            # OpenAI's empty opening: no stream starts, so a text that never gets a delta
            # still has its copies redacted whole (not replaced by this "").
            return text
        if leaf.joins is not None or leaf.opens:  # the common case, a text of its own: no call
            path = self._stream_key(path, leaf)
        stream = self._streams.get(path)
        if stream is None:
            assert self._redactor is not None
            if path in self._ended:
                return ""
            if (len(self._streams) >= MAX_STREAMS and not self._evicted_idle()) or len(self._ended) >= MAX_ENDED:
                # Redacted event by event, a text split across this stream's events would go
                # out in clear: the stream ends instead (SPEC §6: redacted, or an error event).
                raise _TooManyStreams
            resumed = self._resumed.pop(path, None) if self._resumed else None
            if resumed is not None:
                sent, in_string, pending = resumed
                stream = self._streams[path] = (
                    ResumedJsonStream(self._redactor, self._on_redaction, sent, in_string, pending)
                    if leaf.json_text
                    else ResumedStream(self._redactor, self._on_redaction, sent)
                )
            else:
                stream = self._streams[path] = self._redactor.stream(self._on_redaction, json_text=leaf.json_text)
        out = stream.feed(text) if not self._sliced else feed_sliced(stream, text)
        if self._kept is not None:
            self._keep(path, out)
        return out

    def _stream_key(self, path: Path, leaf: Leaf) -> Path:
        """The stream a described text feeds: its own path, a sibling's (`Leaf.joins`), or,
        for an opening text, the stream its deltas feed (`Leaf.opens`)."""
        if leaf.joins is not None:
            return path[: len(path) - len(leaf.joins)] + leaf.joins
        if leaf.opens:
            return self._surface.stream_of(path)
        return path

    def _evicted_idle(self) -> bool:
        """At the bound on text streams, forget the plain ones that hold nothing back: no
        suffix of what they gave out can start PII, so text that comes for them later loses
        nothing by starting afresh (a look-behind then sees the start of a text, which only
        ever allows more matches). JSON text streams keep their place in the document, and
        ended ones must stay ended. Whether room was made."""
        idle = [path for path, stream in self._streams.items() if not stream.held and type(stream) is StreamRedactor]
        for path in idle:
            del self._streams[path]
        return bool(idle)

    def _keep(self, path: Path, text: str) -> None:
        """Note what a text stream gave out, for its later copies (bounded: past MAX_STREAMS
        streams or MAX_KEPT_CHARS characters, copies are redacted whole instead)."""
        kept = self._kept
        assert kept is not None
        pieces = kept.get(path)
        if pieces is None:
            if path in kept or len(kept) >= MAX_STREAMS:
                return
            pieces = kept[path] = []
        if text:
            self._kept_chars += len(text)
            if self._kept_chars > MAX_KEPT_CHARS:
                kept[path] = None
                return
            pieces.append(text)

    def _copy(self, path: Path, leaf: Leaf, text: str) -> str:
        """A later copy of a streamed text: the whole of what its stream gave out (its held
        text went out before this event: see `Surface.flush_before`). A text that never
        streamed, or too long to keep, is redacted whole."""
        kept = self._kept.get(self._surface.stream_of(path)) if self._kept is not None else None
        if kept is None:
            return self._whole(text, leaf.json_text)
        if len(kept) > 1:
            kept[:] = ["".join(kept)]
        return kept[0] if kept else ""

    def _whole(self, text: str, json_text: bool = False) -> str:
        assert self._redactor is not None
        if self._sliced:
            return redact_sliced(self._redactor, text, self._on_redaction, json_text)
        return self._redactor.redact(text, self._on_redaction, json_text=json_text)

    def _unreadable(self, event: sse.Event) -> bytes:
        """An event that is not a JSON object: its text redacted whole (JSON stays JSON; text
        that is no JSON is read as text: "+44 20 7946 0958" is a phone there, not a number)."""
        assert event.data is not None
        done = self._surface.done_data
        if event.data.find(b"\n") >= 0 and any(_may_be_chunk(line, done) for line in event.data.split(b"\n")):
            # Several data lines, no JSON together: a client that takes each `data:` line for a
            # chunk of its own (many hand-written ones do) reads a text in each, and PII split
            # between them ("card 4242 4242 " / "4242 4242") was out of sight of each line's
            # whole redaction. Each line goes on as an event of its own, through the text
            # streams like any other: what either kind of client reads is redacted. (Lines
            # no client reads as a chunk stay together, redacted whole: one event each, 100k
            # lines of "data: x" took 25 times as long as whole, 42 s for 16 MiB.)
            out: list[bytes] = []
            for part in _per_data_line(event, done):
                if self.done:
                    break
                out.append(self._event(part))
            return b"".join(out)
        text = event.data.decode("utf-8", "replace")
        clean = self._whole(text, _is_json(event.data))
        if clean == text and not _has_invalid_utf8(event.data):
            return _with_data(event, event.data, self._whole)  # its other lines redacted too
        return _with_data(event, clean.encode(), self._whole)

    def _note(self, chunk: dict[str, Any]) -> None:
        surface = self._surface
        usage = surface.usage(chunk, self.usage, self._scratch)
        if usage is not self.usage:
            self.usage = usage
            self.usage_final = surface.usage_is_final(chunk)
        if surface.ends(chunk):
            self.done = True
        model = chunk.get("model")
        if type(model) is str:
            self.response_model = model


# The fast path. An event's volatile strings: the described texts, and side values that change
# from event to event (OpenAI's "obfuscation" pad). Without escapes in an event, a string is
# what lies between two quotes, so splitting its bytes around these strings leaves its
# "shape": events of one shape parse alike but for these strings.
_VOLATILE = re.compile(
    rb'"(content|refusal|arguments|reasoning_content|reasoning|transcript|text|partial_json|thinking|signature'
    rb'|delta|obfuscation)":"([^"\\]*)"'
)
_DIGITS = re.compile(rb"[0-9]{1,15}")
_MAX_NUMBER = 10**15  # the surface's numbers the gateway reads (and renumbers): what _DIGITS reads whole
MAX_PLANS = 16  # shapes remembered per stream (a role chunk, text chunks, a tool call's...)
MAX_PLAN_BYTES = 4096  # larger events are never learned: each shape keeps its bytes


class Slot(enum.Enum):
    NUMBER = "number"  # the surface's number (`Surface.numbered`)
    PAD = "pad"  # the spaces an event is padded with before its last brace (see `_pad_of`)


NUMBER: Final = Slot.NUMBER
PAD: Final = Slot.PAD
# A volatile value's step: the stream it feeds, None (a side value), NUMBER or PAD.
Fed = tuple[Path, Leaf] | Literal[Slot.NUMBER]  # a value that feeds a stream, or the number
Step = Fed | Literal[Slot.PAD] | None
MAX_PAD = 64  # spaces a learned shape reads as its pad (Anthropic's are 1 to ~16)
_PAD_NAME = b" "  # a pad's slot name (no key is named so)


def _pad_of(data: bytes) -> int:
    """How many spaces an event's data is padded with before its last brace; 0: none.
    Anthropic's API pads its events so that their lengths do not give their texts away:
    `{"type":"content_block_stop","index":0     }`. (Tabs are JSON's whitespace too; SSE ends
    a line at a CR or LF, so no other whitespace can be in one.)"""
    if data[-1:] != b"}" or data[-2:-1] not in (b" ", b"\t"):
        return 0
    return len(data) - len(data[:-1].rstrip(b" \t")) - 1


def _rebuilt(segments: tuple[bytes, ...], values: list[bytes]) -> bytes:
    """An event of a learned shape, from its segments and these values between them."""
    return b"".join([part for pair in zip(segments, values, strict=False) for part in pair] + [segments[-1]])


# A value `Plan.read` found that feeds a stream or is the surface's number: its step, where
# it lies, and its text.
Value = tuple[Fed, int, int, str]


class Plan:
    """A learned shape (the bytes between its volatile values, and what each value is) and
    the model it names."""

    __slots__ = ("head", "model", "rest")

    def __init__(self, steps: tuple[Step, ...], segments: tuple[bytes, ...], model: str | None) -> None:
        self.model = model
        self.head = segments[0]
        # Each value's step, the segment after it, and whether the value is a string (it ends
        # at the next quote); else the surface's number (it ends after its digits) or a pad.
        # The segment's length is kept beside it: `read` runs once an event, on every value.
        self.rest = tuple(
            (step, segment, len(segment), step is not PAD and segment.startswith(b'"'))
            for step, segment in zip(steps, segments[1:], strict=True)
        )

    def read(self, blocks: bytes, at: int, run: list[Value]) -> int:
        """If the bytes from `at` are an event of this shape, with no escape, every side value
        holds nothing PII could be made of and every value is what the exact path would read
        as the same text: the values to feed added to `run`, and where the event ends; else
        -1, and `run` as it was. A value ends at the next quote (a string without escapes),
        or, where the next segment does not begin with one, after its digits (the surface's
        number); a pad is the spaces up to its segment (the event's last brace), any number
        of them up to MAX_PAD."""
        if not blocks.startswith(self.head, at):
            return -1
        mark = len(run)
        begin = at + len(self.head)
        for step, segment, length, quoted in self.rest:
            if step is PAD:
                end = blocks.find(segment, begin, begin + MAX_PAD + length)
                if end < 0 or blocks[begin:end].strip(b" \t"):
                    break
                begin = end + length
                continue
            if quoted:
                end = blocks.find(b'"', begin)
            else:
                digits = _DIGITS.match(blocks, begin)
                end = -1 if digits is None else digits.end()
            if end < 0 or not blocks.startswith(segment, end):
                break
            value = blocks[begin:end]
            if step is None:
                # `_plain_side`, its common case (a short pad of letters and digits) inline
                if not (end - begin < 11 and value.isalnum()) and not _plain_side(value):
                    break
            elif step is NUMBER:
                if len(value) > 1 and value[0] == 48:
                    break  # "007" is no JSON number: the exact path reads the event as text
                run.append((step, begin, end, value.decode()))
            else:
                try:
                    text = value.decode()
                except UnicodeDecodeError:
                    break
                if not text.isprintable():
                    break  # a raw control character is not JSON: the exact path says what happens
                run.append((step, begin, end, text))
            begin = end + length
        else:
            # Without an escape, a string's value is what lies between its quotes.
            if blocks.find(b"\\", at, begin) < 0:
                return begin
        del run[mark:]
        return -1


def _plain_side(value: bytes) -> bool:
    """Whether a side value (a pad, an id) passes as it came: printable UTF-8 that holds
    nothing PII could be made of."""
    if value.isalnum() and len(value) < 11:
        return True  # ASCII letters and digits, too short for a run: the common case
    try:
        text = value.decode()
    except UnicodeDecodeError:
        return False
    return text.isprintable() and not side_may_match(value)


def _steps_of(
    raw: bytes, slots: list[tuple[int, int, bytes]], fed: list[tuple[Path, Leaf, str, str]]
) -> tuple[Step, ...] | None:
    """Which stream each volatile value feeds (matched by key, each fed key once), None for
    a side value, which must hold nothing PII could be made of, NUMBER for the surface's
    number, PAD for a pad; None: no plan."""
    names = [name for _, _, name in slots]
    by_name: dict[bytes, tuple[Path, Leaf, str]] = {}
    for path, leaf, text, _ in fed:
        name = str(path[-1]).encode()
        if name in by_name or names.count(name) != 1:
            return None
        by_name[name] = (path, leaf, text)
    if len(by_name) != len(fed):
        return None
    steps: list[Step] = []
    outside: list[bytes] = []
    copied = 0
    for begin, end, name in slots:
        outside.append(raw[copied:begin])
        copied = end
        value = raw[begin:end]
        if not name:
            steps.append(NUMBER)
            continue
        if name == _PAD_NAME:
            steps.append(PAD)
            continue
        fed_here = by_name.get(name)
        if fed_here is None:
            if side_may_match(value):
                return None
            steps.append(None)
        else:
            path, leaf, text = fed_here
            if text.encode() != value:
                return None
            steps.append((path, leaf))
    outside.append(raw[copied:])
    if side_may_match(b"".join(outside)):
        return None  # something outside could be PII (the exact path scrubs then)
    return tuple(steps)


LeafText = Callable[[Path, Leaf, str], str]


class WholeText(Protocol):
    """Redacts a text whole (a JSON text as JSON)."""

    def __call__(self, text: str, json_text: bool = False) -> str: ...


def _read_whole(whole: WholeText) -> LeafText:
    """A described field's text redacted whole, as its description says (JSON or prose): for
    a part that cannot be told apart by its index, so has no stream."""

    def leaf(path: Path, described: Leaf, text: str) -> str:
        return whole(text, described.json_text)

    return leaf


def walk(node: dict[str, Any], spec: Spec | None, path: Path, scrub: bool, leaf: LeafText, whole: WholeText) -> None:
    """Redact in place what `spec` names in `node` (`leaf` gets each described string and
    where it is); with `scrub`, every other string too (`whole`). Values of an unexpected
    type, and list items whose "index" is there but no integer, are not described: scrubbed
    whole (an item without one is keyed None: see `Surface.restart_before`)."""
    if not scrub:
        assert spec is not None
        _described(node, spec, path, leaf, whole)
        return
    for name, value in node.items():
        _visit(node, name, value, spec.get(name) if spec is not None else None, path, scrub, leaf, whole)
    if has_trigger("".join(node), 0):  # a key holds "@" or a digit: keys are text too
        _rekeyed(node, whole)


def _rekeyed(node: dict[str, Any], whole: WholeText) -> None:
    """The object's keys redacted whole, in place and in order (an address used as a key is
    masked; two keys that mask alike keep the last value)."""
    items = [(whole(name), value) for name, value in node.items()]
    node.clear()
    node.update(items)


def _described(node: dict[str, Any], spec: Spec, path: Path, leaf: LeafText, whole: WholeText) -> None:
    """`walk` without scrubbing, written out flat: only the described fields, each as its
    description says (the per-event cost of a stream)."""
    for name, sub in spec.items():
        value = node.get(name)
        if value is None:
            continue
        shape = type(sub)
        if shape is Leaf:
            if sub.drop:  # type: ignore[union-attr]
                if value:  # an empty one carries no text: it stays as it came
                    node[name] = None
            elif type(value) is str and not sub.keep:  # type: ignore[union-attr]
                node[name] = leaf((*path, name), sub, value)  # type: ignore[arg-type]
            elif type(value) is list and sub.chunks:  # type: ignore[union-attr]
                _chunks(value, (*path, name), sub, False, leaf, whole)  # type: ignore[arg-type]
        elif shape is dict:
            if type(value) is dict:
                _described(value, sub, (*path, name), leaf, whole)  # type: ignore[arg-type]
        elif type(value) is list:
            items = sub.spec  # type: ignore[union-attr]
            last = -1  # as in _visit
            for position, item in enumerate(value):
                if type(item) is dict:
                    if shape is All:
                        _described(item, sub.spec_for(item), (*path, name, position), leaf, whole)  # type: ignore[union-attr]
                    elif type(index := item.get("index")) is int:
                        _described(item, items, (*path, name, index), leaf, whole)
                    elif index is None:
                        if last < 0:
                            last = _last_unindexed(value)
                        if position == last:
                            _described(item, items, (*path, name, None), leaf, whole)
                        else:  # a whole call, another one after it in this event: redacted whole
                            _described(item, items, (), _read_whole(whole), whole)


def _last_unindexed(items: list[Any]) -> int:
    """The position of the list's last object without an index (absent or null). Several such
    calls in one event (Gemini's parallel calls): those before it are whole, the next one opens
    after each; the last one's text is the stream that later deltas without an id or index
    continue (clients append them to the last call), so it streams (Surface.restart_before)."""
    return max(position for position, item in enumerate(items) if type(item) is dict and item.get("index") is None)


def _visit(
    node: Any, name: str | int, value: Any, sub: Any, path: Path, scrub: bool, leaf: LeafText, whole: WholeText
) -> None:
    kind = type(value)
    if type(sub) is Leaf:
        if sub.drop:
            if value:
                node[name] = None
        elif sub.keep:
            if scrub and not _kept(sub, value):
                _visit(node, name, value, None, (), scrub, leaf, whole)  # not what it should be: as any value
        elif kind is str:
            node[name] = leaf((*path, name), sub, value)
        elif kind is list and sub.chunks:
            _chunks(value, (*path, name), sub, scrub, leaf, whole)
        elif scrub:
            _visit(node, name, value, None, (), scrub, leaf, whole)  # not the string it should be: whole
    elif kind is str:
        # A string with no "@" and no digit is what redacting it whole gives (redact_from's
        # own first test): most side strings of a reply ("assistant", "stop", ids in hex).
        if scrub and value and has_trigger(value, 0):
            node[name] = whole(value)
    elif kind is int:
        if scrub and (value >= CARD_SIZED or value <= -CARD_SIZED) and name != _SEQUENCE:
            _masked_number(node, name, value, whole)
    elif kind is dict:
        if type(sub) is dict:
            walk(value, sub, (*path, name), scrub, leaf, whole)
        elif scrub:
            walk(value, None, (), scrub, leaf, whole)
    elif kind is list:
        kind_of_list = type(sub)
        if kind_of_list is not Each and kind_of_list is not All and not scrub:
            return
        last = -1  # the last item without an index: its texts stream (Surface.restart_before)
        for position, item in enumerate(value):
            if type(item) is dict:
                if kind_of_list is Each:
                    index = item.get("index")
                    if index is None and last < 0:
                        last = _last_unindexed(value)
                    if type(index) is int or (index is None and position == last):
                        walk(item, sub.spec, (*path, name, index), scrub, leaf, whole)
                    elif scrub or index is None:  # no index to key its streams by: its texts whole, JSON ones as JSON
                        walk(item, sub.spec, (), scrub, _read_whole(whole), whole)
                    continue
                elif kind_of_list is All:
                    walk(item, sub.spec_for(item), (*path, name, position), scrub, leaf, whole)
                    continue
            if scrub:
                _visit(value, position, item, None, (), scrub, leaf, whole)  # not readable as described: whole


def _chunks(items: list[Any], path: Path, text: Leaf, scrub: bool, leaf: LeafText, whole: WholeText) -> None:
    """A text that came as content chunks (`Leaf.chunks`: Mistral's chat content): each `text`
    chunk's text through the stream at `path`, read as `text` says (JSON text for structured
    output), each `thinking` chunk's (a string, or text chunks) through the one at `path` and
    THINKING_CHUNKS, as prose, in order, as clients join them; with `scrub`, every other value
    whole."""
    for position, item in enumerate(items):
        if type(item) is not dict:
            if scrub:
                _visit(items, position, item, None, (), scrub, leaf, whole)
            continue
        kind = item.get("type")
        streamed = ""
        if kind == "text" and type(item.get("text")) is str:
            item["text"] = leaf(path, text, item["text"])
            streamed = "text"
        elif kind == "thinking":
            thinking = item.get("thinking")
            if type(thinking) is str:
                item["thinking"] = leaf((*path, THINKING_CHUNKS), TEXT, thinking)
                streamed = "thinking"
            elif type(thinking) is list:
                _chunks_of_thinking(thinking, (*path, THINKING_CHUNKS), scrub, leaf, whole)
                streamed = "thinking"
        if scrub:
            for name, value in list(item.items()):
                if name != streamed:
                    _visit(item, name, value, None, (), scrub, leaf, whole)
            if has_trigger("".join(item), 0):
                _rekeyed(item, whole)


def _chunks_of_thinking(items: list[Any], path: Path, scrub: bool, leaf: LeafText, whole: WholeText) -> None:
    """A thinking chunk's text chunks, through the thinking stream at `path`."""
    for position, item in enumerate(items):
        if type(item) is dict and item.get("type") == "text" and type(item.get("text")) is str:
            item["text"] = leaf(path, TEXT, item["text"])
            if scrub:
                for name, value in list(item.items()):
                    if name != "text":
                        _visit(item, name, value, None, (), scrub, leaf, whole)
        elif scrub:
            _visit(items, position, item, None, (), scrub, leaf, whole)


# A JSON number long enough to be a card number (13 digits or more): a model writes one as
# a bare number in a tool's input as readily as in a string, and the client reads its digits.
# Masked like the string of its digits (the mask is a string, as in JSON text); the Responses
# API's sequence_number is the protocol's own counter (the fast path's number slot), not text.
_SEQUENCE = "sequence_number"


def _masked_number(node: Any, name: str | int, value: int, whole: WholeText) -> None:
    digits = str(value)
    masked = whole(digits)
    if masked != digits:
        node[name] = masked


# Base64's alphabet (no "@", no space, no separator a phone or a card is written with).
_BASE64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _is_base64(value: str) -> bool:
    """Whether `value` is base64: `[A-Za-z0-9+/]*={0,2}` whole. Its alphabet's bytes deleted
    in one C pass, not matched by that regex: the regex engine tried each character against
    the class's ranges, ~30 us (~150k instructions) for an embedding of 1536 floats (8 KiB),
    where this takes a fifth of that (tests/test_relay.py proves the two equal)."""
    if not value.isascii():
        return False
    if value.endswith("="):
        value = value[:-2] if value.endswith("==") else value[:-1]
    return not value.encode().translate(None, _BASE64_ALPHABET)


def _kept(leaf: Leaf, value: Any) -> bool:
    """Whether a KEEP leaf's value passes as it came: a string. A KEEP that is also JSON_TEXT
    is data, not text (an embedding's vector): base64, or a list of numbers. Anything else is
    read like an undescribed value."""
    kind = type(value)
    if kind is str:
        return not leaf.json_text or _is_base64(value)
    return leaf.json_text and kind is list and all(type(item) is float or type(item) is int for item in value)


def reply_may_need_redaction(data: bytes) -> bool:
    """False when nothing in a whole reply's bytes could be PII: no escape (so every string is
    its bytes), no "@", no run a card or phone could lie in, no log probabilities or token ids
    but null. Then `redact_reply` would change nothing, and the reply can go out as it came."""
    if data.find(b"\\") >= 0 or side_may_match(data):
        return True
    for name in (b'"logprobs"', b'"token_ids"'):
        count = data.count(name)
        if count > 0 and count != data.count(name + b":null"):
            return True
    return False


def redact_reply(
    redactor: Redactor, reply: dict[str, Any], spec: Spec, on_redaction: OnRedaction | None, sliced: bool = False
) -> None:
    """A whole reply: the described fields and every other string redacted whole, in place.
    `sliced`: long texts in slices (`redact_sliced`), for a reply redacted in a worker thread."""
    redact = functools.partial(redact_sliced, redactor) if sliced else redactor.redact

    def leaf(path: Path, described: Leaf, text: str) -> str:
        return redact(text, on_redaction, json_text=described.json_text)

    def whole(text: str, json_text: bool = False) -> str:
        return redact(text, on_redaction, json_text=json_text)

    walk(reply, spec, (), True, leaf, whole)


def _may_be_chunk(data: bytes, done: bytes | None) -> bool:
    """Whether a data line's value is what a client reading line by line takes for a chunk (a
    JSON object) or for the end of the stream."""
    return data.lstrip().startswith(b"{") or (done is not None and data.startswith(done))


def _per_data_line(event: sse.Event, done: bytes | None) -> list[sse.Event]:
    """The event as one event per data line that may be a chunk (`_may_be_chunk`; the lines
    between two such, together), each with the event's name (its last `event:` line: the
    Anthropic SDK reads an event by its name, and drops one without), each other line (id:,
    a comment) in the event of the data line before it (lines before the first data line, in
    the first's)."""
    blocks: list[bytes] = []
    block: list[bytes] = []
    name = b""
    with_data = False
    chunk = False  # the last data line may be a chunk
    for line in event.raw[:-2].split(b"\n"):
        field, _, value = line.partition(b":")
        if field == b"event":
            name = line + b"\n"
            continue
        if field == b"data":
            was, chunk = chunk, _may_be_chunk(value.removeprefix(b" "), done)
            if with_data and (was or chunk):
                blocks.append(b"\n".join(block))
                block = []
            with_data = True
        block.append(line)
    blocks.append(b"\n".join(block))
    return sse.parse_blocks(b"".join(name + block + b"\n\n" for block in blocks))


def _with_data(event: sse.Event, data: bytes, whole: WholeText) -> bytes:
    """The event with its data replaced; its other lines (event:, id:) kept in place, their
    text redacted whole."""
    raw = event.raw
    if raw.startswith(b"data: ") and raw.find(b"\n") == len(raw) - 2:
        return b"data: " + data + b"\n\n" if data != event.data else raw
    # "event: NAME\ndata: DATA\n\n" (Anthropic, the Responses API): a name line that is ASCII
    # and holds nothing PII could be made of is what redacting it whole would leave.
    first = raw.find(b"\n")
    if (
        raw.startswith(b"event: ")
        and raw.startswith(b"data: ", first + 1)
        and raw.find(b"\n", first + 1) == len(raw) - 2
        and data.find(b"\n") < 0
        and raw[:first].isascii()
        and not side_may_match(raw[:first])
    ):
        return raw[: first + 7] + data + b"\n\n" if data != event.data else raw
    lines: list[bytes] = []
    placed = False
    for line in raw[:-2].split(b"\n"):
        if line.startswith(b"data"):
            if not placed:
                lines.append(sse.encode(data)[:-1])
                placed = True
        elif line:
            text = line.decode("utf-8", "replace")
            lines.append(whole(text).encode() + b"\n")
    return b"".join(lines) + b"\n"


def _whole_at_end(event: sse.Event) -> bool:
    """Whether an event the body ended without its blank line can be read as whole: its data is
    [DONE] or JSON (every data line JSON, for one of several), or it has neither data nor a
    name (a comment, an id)."""
    data = event.data
    if data is None:
        return sse.event_name(event.raw) is None
    if data.startswith(sse.DONE) or _is_json(data):
        return True
    return data.find(b"\n") >= 0 and all(_is_json(line) for line in data.split(b"\n"))


def _is_json(data: bytes) -> bool:
    try:
        loads_reply(data)
    except ValueError:
        return False
    except RecursionError:
        return True  # JSON nested past the parser's stack
    return True


def _has_invalid_utf8(data: bytes) -> bool:
    try:
        data.decode()
    except UnicodeDecodeError:
        return True
    return False


_JSON_SPACE = b" \t\r\n"


def _spaced_as(data: bytes, compact: bytes) -> bool:
    """Whether `data` is `compact` with JSON whitespace added between tokens. Without an escape,
    every other quote opens a string, so what lies outside strings is found by splitting on
    quotes; a repeated key, a number written otherwise ("1.50") or any escape: False."""
    if len(data) <= len(compact) or data.find(b"\\") >= 0:
        return False
    if data.translate(None, _JSON_SPACE) != compact.translate(None, _JSON_SPACE):
        return False  # other than by whitespace (a text the stream changed): no split needed to say so
    parts = data.split(b'"')
    parts[::2] = [part.translate(None, _JSON_SPACE) for part in parts[::2]]
    return b'"'.join(parts) == compact


def _dumps(value: Any) -> bytes:
    try:
        return orjson.dumps(value)
    except TypeError:  # an integer past 64 bits, which the stdlib's parser accepted
        return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


def _loads_object(data: bytes, deep: bool = False) -> dict[str, Any] | None:
    """The JSON object in `data`; None if it is none. RecursionError (nested past the parser's
    stack) is raised with `deep`, else None too."""
    try:
        value = loads_reply(data)
    except ValueError:
        return None
    except RecursionError:
        if deep:
            raise
        return None
    return value if type(value) is dict else None


# What a JSON text can start with, as the stdlib reads one (a BOM dropped, its whitespace, then
# a value: NaN and Infinity included).
_JSON_START = re.compile(rb"(?:\xef\xbb\xbf)?[ \t\n\r]*+[\[{\"\-0-9tfnNI]")


def loads_reply(data: bytes) -> Any:
    """The upstream's JSON (a reply or a chunk), parsed. JSON's grammar allows a lone UTF-16
    surrogate escape ("\\ud800": half of an emoji, say), which orjson refuses; rather than relay
    such a reply unredacted, the stdlib parses it and each lone surrogate becomes U+FFFD (it
    has no UTF-8 form anyway). ValueError or RecursionError: not JSON. Read as UTF-8 (RFC 8259; a BOM dropped),
    as orjson reads it: given bytes, the stdlib would read UTF-16 and UTF-32 too, as clients'
    parsers do (httpx's), while the check for PII reads the bytes as UTF-8 (`side_may_match`).
    Bytes that no JSON value can start (an event stream, a page) are refused before either
    parser sees them: both scan the whole of it first, ~1 s on the loop for 200 MiB of events
    answering a request that asked for JSON (a gzip bomb inflates to that from 200 KiB)."""
    if not isinstance(data, str) and _JSON_START.match(data) is None:
        raise ValueError("not JSON: no value starts there")
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        text = bytes(data).decode("utf-8-sig", "surrogatepass") if not isinstance(data, str) else data
        return _without_lone_surrogates(json.loads(text))


def _without_lone_surrogates(value: Any) -> Any:
    if isinstance(value, str):  # json.loads already joined every valid pair
        return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    if isinstance(value, list):
        return [_without_lone_surrogates(item) for item in value]
    if isinstance(value, dict):
        return {_without_lone_surrogates(k): _without_lone_surrogates(v) for k, v in value.items()}
    return value


def usage_of(body: dict[str, Any]) -> Usage | None:
    return chat_usage(body)


def dumps_reply(value: Any) -> bytes:
    return _dumps(value)
