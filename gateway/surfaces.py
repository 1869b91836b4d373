"""API surfaces: which fields of a reply or an event carry text, described as data.

A description is a tree shaped like the JSON it reads: a dict names the keys to descend into,
`Each(spec)` a list whose items are told apart by their integer "index" member (a choice, a
tool call), `All(spec)` a list read item by item (a reply's content blocks), and a leaf says
what its string is: `TEXT`, `JSON_TEXT` (a JSON document as a string, tool-call arguments: a
mask never breaks it), `DROP` (gone with redaction on), `KEEP` (passes untouched: thinking
and its signature) or `COPY` / `JSON_COPY` (a later copy of a streamed text, as the Responses
API repeats a part's whole text once it is done: it carries what that text's stream gave out).
Every string a description does not name is redacted whole. The relay keeps one streaming
redactor per leaf and per indices on the way to it, so text split across events is redacted
as one. Redacting one more field is one more leaf.

Each surface also says where a stream's text streams end (so held text is flushed in time),
how a flush is written, what ends the stream, where usage is, and how an error event looks.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import orjson

from . import sse
from .errors import BadRequest, GatewayError, LogprobsUnavailable
from .models import Usage, is_count
from .redact import has_trigger


@dataclass(frozen=True, slots=True)
class Leaf:
    json_text: bool = False  # the string holds a JSON document: a mask outside its strings is quoted
    drop: bool = False  # with redaction on, the value goes out as null
    keep: bool = False  # passes as it came, never redacted (a signature covers it)
    copy: bool = False  # a later copy of a streamed text: what its stream gave out (Surface.stream_of)
    # Feeds the stream of a sibling field: its path with the last len(joins) keys replaced by
    # these (a block's opening text and its deltas are one text).
    joins: tuple[str, ...] | None = None
    # The opening text of a streamed text (a part or an item as it is announced, before its
    # deltas): it feeds the stream its copies repeat (Surface.stream_of), so a client that
    # appends the deltas to it, as the SDKs do, assembles what the stream redacted whole.
    opens: bool = False
    # The text may come as a list of content chunks (Mistral's reasoning models stream chat
    # content so): a `text` chunk's text feeds this stream, as clients join it to the string
    # content; a `thinking` chunk's text (a string, or text chunks) feeds one more, at this
    # path and THINKING_CHUNKS (see relay.walk; `put` writes held text back as a chunk).
    chunks: bool = False


TEXT = Leaf()
CHUNKED_TEXT = Leaf(chunks=True)
THINKING_CHUNKS = "thinking"  # the last step of a chunked text's thinking stream
JSON_TEXT = Leaf(json_text=True)
DROP = Leaf(drop=True)  # an empty value (null, [], "") stays as it is: it carries no text
KEEP = Leaf(keep=True)
COPY = Leaf(copy=True)
JSON_COPY = Leaf(json_text=True, copy=True)


@dataclass(frozen=True, slots=True)
class Each:
    """A list of objects, each told apart by its integer "index" member."""

    spec: Spec


@dataclass(frozen=True, slots=True)
class All:
    """A list of objects read alike (whole replies only: no text streams across them); an
    item whose "type" `by_type` lists is read by that description instead."""

    spec: Spec
    by_type: dict[str, Spec] | None = field(default=None, compare=False)

    def spec_for(self, item: dict[str, Any]) -> Spec:
        if self.by_type is None:
            return self.spec
        kind = item.get("type")
        return self.by_type.get(kind, self.spec) if type(kind) is str else self.spec


Spec = dict[str, "Spec | Each | All | Leaf"]
# Keys, and the "index" of list items (ints), from the event's root; None: the item without an
# index (a chat tool call some OpenAI-compatible servers send without one: see ChatSurface).
Path = tuple[str | int | None, ...]


class Surface:
    """One API's event stream, for the relay. Subclasses fill in the blanks."""

    spec: ClassVar[Spec]  # an event's described fields
    reply_spec: ClassVar[Spec]  # a whole (JSON) reply's
    done_data: ClassVar[bytes | None] = None  # an event whose data ends the stream ([DONE])
    # Data at which the route's clients stop reading, though the API ends its streams otherwise
    # (the openai SDKs stop at a [DONE] on any stream): held text goes out before it.
    clients_stop_at: ClassVar[bytes | None] = None
    done_types: ClassVar[frozenset[str]] = frozenset()  # event types that end it
    keeps_copies: ClassVar[bool] = False  # events repeat streamed texts whole (COPY leaves)
    numbered: ClassVar[str | None] = None  # a number every event carries (noted in `usage`'s counts)
    done_markers: ClassVar[tuple[bytes, ...]] = ()  # those types as they appear in an event's bytes
    # Event names a client takes for the type of an event whose data has no "type" (see MESSAGES).
    named_types: ClassVar[frozenset[bytes]] = frozenset()

    def __init_subclass__(cls) -> None:
        super().__init_subclass__()
        cls.done_markers = tuple(b'"' + name.encode() + b'"' for name in sorted(cls.done_types))

    def root(self, event: dict[str, Any]) -> Path | None:
        """Where the event's streams are keyed from; None: it cannot be read as described."""
        return ()

    def for_request(self, payload: dict[str, Any] | None) -> Surface:
        """The surface a request's reply is read by: this one, or its structured-output
        variant when the request asks for JSON (a JSON document is read as JSON text)."""
        return self

    def spec_of(self, event: dict[str, Any]) -> Spec:
        """The event's description (one for every event, unless the API's events differ)."""
        return self.spec

    def misindexed(self, event: dict[str, Any]) -> str | None:
        """What is wrong with an index that keys the event's streams (None: nothing).
        `NOT_AN_INTEGER`: it is there but no integer ("0", 0.0, true, [0]): clients read such a
        one as the integer (a lax parser, JavaScript's property names), so its text would join
        a stream the gateway never fed it to. `MISSING`: a part that carries text has none
        (absent or null): clients read it as the one part there is (openai-python's
        `choices[0]`), and join its text to the text of the events around it, which the
        gateway could only redact event by event. Both end the stream. `LEFT_OUT`: only
        parts without text have none (a role or finish chunk): the event passes, but is not
        learned for the fast path, which reads no index (the same shape could carry text)."""
        return None

    def stream_of(self, path: Path) -> Path:
        """The stream (its leaf's path) whose text a COPY leaf at `path` repeats."""
        raise NotImplementedError

    def ends(self, event: dict[str, Any]) -> bool:
        """Whether the event ends the stream (nothing after it is relayed)."""
        kind = event.get("type")
        return type(kind) is str and kind in self.done_types

    def flush_before(self, event: dict[str, Any]) -> list[Path] | None:
        """Streams (by path prefix) whose held text must go out in events before this one;
        None: none."""
        return None

    def settle_before(self, event: dict[str, Any]) -> list[Path] | None:
        """Streams whose held text, if any, must go out in events before this one: those that
        held some end (as `flush_before`'s do), the others go on untouched (nothing went out
        for them, so their text that comes later is not lost). None: none."""
        return None

    def flush_into(self, event: dict[str, Any]) -> list[Path] | None:
        """Streams whose held text goes out inside this event (after its own text)."""
        return None

    def restart_before(self, event: dict[str, Any], counts: dict[str, int]) -> list[Path] | None:
        """Streams whose held text goes out in events before this one, and which this event
        starts afresh (not ended, unlike `flush_before`'s); None: none. `counts`: as `usage`'s."""
        return None

    def flush_events(
        self, held: list[tuple[Path, str]], templates: dict[Path, dict[str, Any]], counts: dict[str, int]
    ) -> bytes:
        """Events that carry held text (the end came without a place for it). `templates`:
        `template` of the first event of each root."""
        raise NotImplementedError

    def usage(self, event: dict[str, Any], before: Usage | None, counts: dict[str, int]) -> Usage | None:
        """The usage known after this event (`counts`: the stream's own scratch space, where
        a surface may note more than usage: the Responses API's sequence numbers)."""
        return before

    def error_event(self, error: GatewayError, counts: dict[str, int]) -> bytes:
        return sse.error_event(error)

    def template(self, event: dict[str, Any]) -> dict[str, Any]:
        """What a flush event copies from the first event of a root (see `root`)."""
        return {}

    def usage_only(self, event: dict[str, Any]) -> bool:
        """An event that carries only usage (the one a gateway's own usage request adds)."""
        return False

    def usage_is_final(self, event: dict[str, Any]) -> bool:
        """Whether the usage this event reported is the reply's final count."""
        return True


def put(root: dict[str, Any], path: Path, text: str) -> None:
    """Append `text` to the string at `path`, creating what is missing on the way (an int
    step is the list item with that "index", None the item without one). Chat's content that
    came as chunks (`Leaf.chunks`) gets a chunk appended: a text chunk, or for the thinking
    stream (its path ends in "content", THINKING_CHUNKS) a thinking chunk."""
    if len(path) > 2 and path[-1] == THINKING_CHUNKS and path[-2] == "content":
        node, leaf = _holder(root, path[:-1])
        before = node.get(leaf)
        part = {"type": "thinking", "thinking": [{"type": "text", "text": text}]}
        if type(before) is list:
            before.append(part)
        else:
            node[leaf] = [{"type": "text", "text": before}, part] if type(before) is str and before else [part]
        return
    node, leaf = _holder(root, path)
    before = node.get(leaf)
    if type(before) is list and leaf == "content":
        before.append({"type": "text", "text": text})
        return
    node[leaf] = before + text if type(before) is str else text


def _holder(root: dict[str, Any], path: Path) -> tuple[dict[str, Any], str]:
    """The object that holds the value at `path` (created on the way, as `put` says), and its key."""
    node: Any = root
    holder: str | int | None = None  # the key of the list an item is in
    for step, following in itertools.pairwise(path):
        if step is None:
            item = next((i for i in node if type(i) is dict and i.get("index") is None), None)
            if item is None:
                item = {}
                node.append(item)
            node = item
        elif type(step) is int:
            item = next((i for i in node if type(i) is dict and i.get("index") == step), None)
            if item is None:
                item = {"index": step}
                kind = _ITEM_TYPES.get((holder, str(path[-1]))) if type(holder) is str else None
                if kind is not None:
                    item["type"] = kind
                node.append(item)
            node = item
        else:
            holder = step
            want = list if following is None or type(following) is int else dict
            child = node.get(step)
            if type(child) is not want:
                child = node[step] = want()
            node = child
    leaf = path[-1]
    assert type(leaf) is str
    return node, leaf


# --- Chat completions (SPEC §6) ---------------------------------------------------------
# A message's texts, in a stream chunk's "delta" or a reply's "message", per choice (and per
# tool call). Log probabilities echo the text token by token (PII split across tokens would
# pass): with redaction on they are dropped, and requests asking for them are refused.
# A tool call: a function's JSON arguments, or a custom (freeform) tool's input text.
_CHAT_CALL: Spec = {"function": {"arguments": JSON_TEXT}, "custom": {"input": TEXT}}
_CHAT_MESSAGE: Spec = {
    "content": CHUNKED_TEXT,
    "refusal": TEXT,
    "tool_calls": Each(_CHAT_CALL),
    "function_call": {"arguments": JSON_TEXT},  # the legacy form of a tool call
    # What OpenAI-compatible servers stream beside the answer: reasoning (DeepSeek, vLLM,
    # OpenRouter), an audio reply's transcript.
    "reasoning_content": TEXT,
    "reasoning": TEXT,
    # OpenRouter's second copy of the reasoning, per item index, which clients join and show.
    "reasoning_details": Each({"text": TEXT, "summary": TEXT}),
    "audio": {"transcript": TEXT},
}
# The type of an item a flush creates in a list of typed items (a client's parser may need
# one), by the list's key and the field that carries the held text.
_ITEM_TYPES = {("reasoning_details", "text"): "reasoning.text", ("reasoning_details", "summary"): "reasoning.summary"}


# What `Surface.misindexed` finds wrong with an index (the relay's error says "index is ...").
NOT_AN_INTEGER = "not an integer"
MISSING = "missing"
LEFT_OUT = "left out"  # from parts without text only: no error


def int_or_absent(part: dict[str, Any], name: str = "index") -> bool:
    """The part's index is an integer, or absent (null counts as absent): not `NOT_AN_INTEGER`
    (whether an absent one matters depends on the part's text: see `carries_text`)."""
    index = part.get(name)
    return index is None or type(index) is int


def carries_text(node: dict[str, Any], spec: Spec) -> bool:
    """Whether anything but null or "" is where `spec` names a text (a leaf that is no DROP
    and no KEEP, at any depth): a part without its index that carries some makes the stream
    end (`Surface.misindexed`), one that carries none (a role or finish chunk) passes."""
    for name, sub in spec.items():
        value = node.get(name)
        if value is None or value == "":
            continue
        shape = type(sub)
        if shape is Leaf:
            if not sub.drop and not sub.keep:  # type: ignore[union-attr]
                return True
        elif shape is dict:
            if type(value) is dict and carries_text(value, sub):  # type: ignore[arg-type]
                return True
        elif type(value) is list:
            for item in value:
                if type(item) is dict:
                    items = sub.spec_for(item) if shape is All else sub.spec  # type: ignore[union-attr]
                    if carries_text(item, items):
                        return True
    return False


# A choice's token ids (vLLM's and SGLang's `return_token_ids`) are its text to anyone with the
# model's tokenizer: dropped as log probabilities are.
_CHAT_CHOICE: Spec = {"delta": _CHAT_MESSAGE, "logprobs": DROP, "token_ids": DROP}
# A reply's choice: a message, its tool calls a plain list (only a stream's carry an "index").
_CHAT_REPLY_CHOICE: Spec = {
    "message": {**_CHAT_MESSAGE, "tool_calls": All(_CHAT_CALL)},
    "logprobs": DROP,
    "token_ids": DROP,
}


# Choices whose last index-less tool call `ChatSurface.restart_before` remembers, and the key
# of their count in the stream's scratch space.
MAX_UNINDEXED_CHOICES = 256
_UNINDEXED_CHOICES = "unindexed call choices"
# The calls an opening tool call settles (`ChatSurface.settle_before`): those of the 16 indices
# below it (OpenAI's calls open 0, 1, 2…; a bound, as every prefix is checked against every
# text stream, and an upstream may open a call of index 10**9 in every event).
CALLS_ENDED_BY_OPENING = 16


# A delta's strings clients do not join across chunks: the openai SDK's stream helper
# replaces `type` and `index`, and OpenAI sends `role` once. Every other string of a delta that
# the description does not name (a server's own field) is joined by them, and by the gateway's
# join of events into one completion (translate.completion_from_events): it is a text stream.
_NOT_JOINED = frozenset({"role", "type", "index"})
# Inside a server's own object of a delta, only `type` and `index` are replaced: the SDK's
# stream helper (accumulate_delta) joins every other string, one named `role` too.
_REPLACED = frozenset({"type", "index"})
# How deep into a server's own object of a delta its strings are text streams (deeper ones are
# redacted whole, event by event, as every other string).
_JOINED_DEPTH = 8


def _joined(spec: Spec, name: str, value: Any, depth: int) -> None:
    """Describe in `spec` a server's own field of a delta as clients join it across chunks: a
    string as a text stream; an object key by key, as the openai SDK's stream helper joins one
    (accumulate_delta: every string of it but `_REPLACED`'s, and its objects alike), so an
    address split between two chunks' `{"x": {"y": ...}}` was joined in clear. A string wins
    over an object another choice of the event holds under the same name."""
    if type(value) is str:
        spec[name] = TEXT
    elif type(value) is dict and depth:
        inner = spec.get(name)
        if inner is None:
            inner = spec[name] = {}
        if type(inner) is dict:
            for key, item in value.items():
                if key not in _REPLACED:
                    _joined(inner, key, item, depth - 1)


class ChatSurface(Surface):
    spec: ClassVar[Spec] = {"choices": Each(_CHAT_CHOICE)}
    reply_spec: ClassVar[Spec] = {"choices": Each(_CHAT_REPLY_CHOICE)}
    done_data = sse.DONE
    _choice: ClassVar[Spec] = _CHAT_CHOICE
    _message: ClassVar[Spec] = _CHAT_MESSAGE
    _known: ClassVar[frozenset[str]] = frozenset(_CHAT_MESSAGE) | _NOT_JOINED  # the delta's fields read as they are

    def spec_of(self, event: dict[str, Any]) -> Spec:
        """Chat's description, and each string a choice's delta holds that it does not name
        (but `_NOT_JOINED`'s) as one more text stream: clients join those across chunks as they
        join content, so redacted whole, event by event, an address split across two chunks
        was joined in clear."""
        choices = event.get("choices")
        if type(choices) is list:
            known = self._known
            for choice in choices:
                if type(choice) is dict:
                    delta = choice.get("delta")
                    if type(delta) is dict and not known.issuperset(delta):  # (one C call: the usual delta)
                        return self._with_unknown(choices)
        return self.spec

    def _with_unknown(self, choices: list[Any]) -> Spec:
        """`spec_of` for an event whose deltas hold fields the description does not name: a
        string, and every string of an object, key by key (`_joined`)."""
        known = self._known
        unknown: Spec = {}
        for choice in choices:
            if type(choice) is dict and type(delta := choice.get("delta")) is dict:
                for name, value in delta.items():
                    if name not in known and type(value) in (str, dict):
                        _joined(unknown, name, value, _JOINED_DEPTH)
        if not unknown:
            return self.spec
        return {"choices": Each({**self._choice, "delta": {**self._message, **unknown}})}

    def misindexed(self, event: dict[str, Any]) -> str | None:
        # Written out flat: every event of the exact path is checked (~40 of the synthetic bench's).
        # A tool call without an index, in a choice that has one, passes (redacted whole):
        # some OpenAI-compatible servers leave tool calls' indices out.
        choices = event.get("choices")
        if type(choices) is not list:
            return None
        wrong = None
        described: Spec | None = None  # a choice's description, once one without an index needs it
        for choice in choices:
            if type(choice) is dict:
                index = choice.get("index")
                if type(index) is not int:
                    if index is not None:
                        return NOT_AN_INTEGER
                    if described is None:  # once an event: it reads every choice
                        each = self.spec_of(event)["choices"]
                        assert type(each) is Each
                        described = each.spec
                    if carries_text(choice, described):  # (a server's own delta field too)
                        return MISSING
                    wrong = LEFT_OUT
                delta = choice.get("delta")
                if type(delta) is dict and "tool_calls" in delta:
                    calls = delta["tool_calls"]
                    if type(calls) is list:
                        if not all(int_or_absent(call) for call in calls if type(call) is dict):
                            return NOT_AN_INTEGER
                        if any(type(call) is dict and call.get("index") is None for call in calls):
                            wrong = LEFT_OUT  # its text streams (path step None), but not a shape to learn
        return wrong

    def ends(self, event: dict[str, Any]) -> bool:
        """An in-stream error (`data: {"error": {...}}`, OpenAI's, or a translated Anthropic
        `event: error`) is the stream's last event (SPEC §5, §9)."""
        return type(event.get("error")) is dict

    def flush_before(self, event: dict[str, Any]) -> list[Path] | None:
        """An error ends the stream: all held text goes out before it, where a client that
        stops at the error (the openai SDK raises there) still reads it."""
        return [()] if self.ends(event) else None

    def settle_before(self, event: dict[str, Any]) -> list[Path] | None:
        """A tool call that opens (an indexed call with an `id`: OpenAI streams parallel calls
        one after another) settles the calls of lower index in its choice that the event does
        not carry: the openai SDK's stream helper takes a call for done, and validates its
        arguments, when a delta for another index arrives, so their held tails must be out
        before it. A call that held nothing goes on: an upstream that comes back to it (the
        format keys deltas by index, in no promised order) loses none of its arguments.
        (An opening event never takes the fast path: it is never of a learned shape.)"""
        paths: list[Path] = []
        for index, delta in _indexed_deltas(event):
            calls = delta.get("tool_calls")
            if type(calls) is not list:
                continue
            here = {call["index"] for call in calls if type(call) is dict and type(call.get("index")) is int}
            opened = [
                call["index"]
                for call in calls
                if type(call) is dict and type(call.get("index")) is int and type(call.get("id")) is str and call["id"]
            ]
            if opened:
                top = max(opened)
                prefix = ("choices", index, "delta", "tool_calls")
                paths += [(*prefix, j) for j in range(max(0, top - CALLS_ENDED_BY_OPENING), top) if j not in here]
        return paths or None

    def restart_before(self, event: dict[str, Any], counts: dict[str, int]) -> list[Path] | None:
        """A tool call without an index (Gemini's OpenAI-compatible API leaves it out, and
        splits arguments across such deltas) streams its text under the step None, one stream
        per choice, as clients that key calls by index join those deltas; a split address in
        its arguments is then redacted like one in content. A call that opens (an id other
        than the last one's) is a new JSON document: what the last one held goes out before
        it, as the tail of that call. Several such calls in one event: those before the last are
        whole, redacted whole, and the last one starts the stream that later deltas continue
        (see `relay.walk`), after the stream before them is flushed."""
        paths: list[Path] = []
        for index, delta in _indexed_deltas(event):
            if _answer_after_thinking(delta.get("content"), counts):
                # The answer begins: the thinking's held text goes out first, as clients keep one
                # leading thinking chunk (Mistral refuses a conversation sent back otherwise).
                paths.append(("choices", index, "delta", "content", THINKING_CHUNKS))
            calls = delta.get("tool_calls")
            if type(calls) is not list:
                continue
            if not delta.get("content") and not delta.get("refusal") and _opens_a_call(calls):
                # The openai SDK's stream helper takes the content (and refusal) for done when
                # a tool call's delta arrives (content.done): their held text goes out before
                # it. Text that comes after the calls (Claude may write some) starts afresh.
                at = ("choices", index, "delta")
                paths += [(*at, "content"), (*at, "refusal")]
            unindexed = [call for call in calls if type(call) is dict and call.get("index") is None]
            if not unindexed:
                continue
            ids = [call["id"] for call in unindexed if type(call.get("id")) is str and call["id"]]
            key = f"unindexed call {index}"
            last = counts.get(key)
            # The call later deltas without an id (or with it again) go on. Choices noted are
            # bounded (a hostile upstream may send a new index every event): past the bound, a
            # choice's calls are one stream (a call's held tail may then open the next call's
            # arguments, but no text split across deltas goes out unmasked).
            noted = last is not None or counts.get(_UNINDEXED_CHOICES, 0) < MAX_UNINDEXED_CHOICES
            opened = bool(ids) and noted and last != hash(ids[-1])
            if ids and noted:
                if last is None:
                    counts[_UNINDEXED_CHOICES] = counts.get(_UNINDEXED_CHOICES, 0) + 1
                counts[key] = hash(ids[-1])
            if opened or len(unindexed) > 1:
                paths.append(("choices", index, "delta", "tool_calls", None))
        return paths or None

    def flush_into(self, event: dict[str, Any]) -> list[Path] | None:
        """The choices this chunk finishes: their held text goes out in it."""
        choices = event.get("choices")
        if type(choices) is not list:
            return None
        return [
            ("choices", choice["index"])
            for choice in choices
            if type(choice) is dict and type(choice.get("index")) is int and choice.get("finish_reason") is not None
        ] or None

    def flush_events(
        self, held: list[tuple[Path, str]], templates: dict[Path, dict[str, Any]], counts: dict[str, int]
    ) -> bytes:
        chunk = dict(templates.get(()) or {"object": "chat.completion.chunk"})
        chunk["choices"] = []
        for path, text in held:
            put(chunk, path, text)
        for choice in chunk["choices"]:
            choice.setdefault("finish_reason", None)
        return sse.encode(orjson.dumps(chunk))

    def template(self, event: dict[str, Any]) -> dict[str, Any]:
        return {k: event[k] for k in ("id", "object", "created", "model") if k in event}

    def usage(self, event: dict[str, Any], before: Usage | None, counts: dict[str, int]) -> Usage | None:
        return chat_usage(event) or before

    def usage_only(self, event: dict[str, Any]) -> bool:
        return event.get("choices") == [] and type(event.get("usage")) is dict

    def for_request(self, payload: dict[str, Any] | None) -> Surface:
        if payload is not None and asks_json(payload.get("response_format")):
            return CHAT_JSON
        return self


def _indexed_deltas(event: dict[str, Any]) -> Iterator[tuple[int, dict[str, Any]]]:
    """Each choice's index and delta, for the choices that have both (what streams are keyed by)."""
    choices = event.get("choices")
    for choice in choices if type(choices) is list else ():
        if (
            type(choice) is dict
            and type(index := choice.get("index")) is int
            and type(delta := choice.get("delta")) is dict
        ):
            yield index, delta


def _opens_a_call(calls: list[Any]) -> bool:
    return any(type(call) is dict and type(call.get("id")) is str and call["id"] for call in calls)


def chat_usage(body: dict[str, Any]) -> Usage | None:
    return usage_of(body, "prompt_tokens", "completion_tokens")


def usage_of(body: dict[str, Any], prompt_key: str, completion_key: str) -> Usage | None:
    """The body's `usage` under these two count names, if both are counts."""
    usage = body.get("usage")
    if type(usage) is not dict:
        return None
    prompt, completion = usage.get(prompt_key), usage.get(completion_key)
    if is_count(prompt) and is_count(completion):
        return Usage(prompt, completion)
    return None


_THOUGHT = "thinking chunks"  # the stream's scratch space: a content came with a thinking chunk


def _answer_after_thinking(content: Any, counts: dict[str, int]) -> bool:
    """Whether a chat delta's content carries answer text in a stream whose content came as
    chunks with thinking (Mistral's reasoning models; noted in `counts`)."""
    if type(content) is list:
        kinds = {part.get("type") for part in content if type(part) is dict and type(part.get("type")) is str}
        if "thinking" in kinds:
            counts[_THOUGHT] = 1
        return "text" in kinds and _THOUGHT in counts
    return type(content) is str and content != "" and _THOUGHT in counts


# Where `ChatSurface.ends` may hold (read with redaction off): an error chunk's key.
ChatSurface.done_markers = (b'"error"',)
CHAT = ChatSurface()

# Structured output (`response_format` json_schema or json_object): the content is a JSON
# document, read as the JSON text it is, as tool-call arguments are. Read as prose, an escape
# hides what it glues to ("\n4242 4242 4242 4242" is a card after the letter n), and the
# client's parse() gets the card in clear.
_CHAT_JSON_MESSAGE: Spec = {**_CHAT_MESSAGE, "content": Leaf(json_text=True, chunks=True)}  # chunks: as CHUNKED_TEXT
_JSON_FORMATS = frozenset({"json_schema", "json_object"})


class ChatJsonSurface(ChatSurface):
    # Chat's own but for the content: what else a choice drops (token ids too), it drops.
    spec: ClassVar[Spec] = {"choices": Each({**_CHAT_CHOICE, "delta": _CHAT_JSON_MESSAGE})}
    _choice: ClassVar[Spec] = {**_CHAT_CHOICE, "delta": _CHAT_JSON_MESSAGE}
    _message: ClassVar[Spec] = _CHAT_JSON_MESSAGE
    reply_spec: ClassVar[Spec] = {
        "choices": Each({**_CHAT_REPLY_CHOICE, "message": {**_CHAT_JSON_MESSAGE, "tool_calls": All(_CHAT_CALL)}})
    }


ChatJsonSurface.done_markers = ChatSurface.done_markers
CHAT_JSON = ChatJsonSurface()


def asks_json(response_format: Any) -> bool:
    """A `response_format` (chat) or `text.format` (Responses) that asks for a JSON document."""
    return type(response_format) is dict and response_format.get("type") in _JSON_FORMATS


# --- Anthropic Messages (SPEC §11) ------------------------------------------------------
# A stream's events are keyed by their content block's "index"; text and tool input JSON
# stream per block. Thinking and its signature pass untouched (the signature covers them).
_THINKING: Spec = {"thinking": KEEP, "signature": KEEP, "data": KEEP}
# A text block's opening text (content_block_start's, usually "") is the start of its deltas' text.
_BLOCK_TEXT = Leaf(joins=("delta", "text"))
# Thinking is passed as it came only in thinking events (its signature covers it); on any
# other event those fields are text like any other.
_THINKING_TYPES = frozenset({"thinking", "redacted_thinking", "thinking_delta", "signature_delta"})
_THINKING_BLOCKS = {"thinking": _THINKING, "redacted_thinking": _THINKING}
# Not here: compaction_delta's `content` (beta). It is no text stream: Anthropic sends the whole
# summary in one delta, and the Python SDK sets the block's content to each delta's (the
# TypeScript one appends), so held text flushed in a delta of its own would replace the summary
# there. It is redacted whole, as every string no spec names.
_DELTA: Spec = {"text": TEXT, "partial_json": JSON_TEXT}
_BLOCK: Spec = {"text": _BLOCK_TEXT}
# A text block message_start opens with: the SDKs' snapshot starts from message_start's
# content, and a block's deltas append to the block at their index there (see stream_of).
_STARTING_TEXT = Leaf(opens=True)


def _is_thinking(part: Any) -> bool:
    kind = part.get("type") if type(part) is dict else None
    return type(kind) is str and kind in _THINKING_TYPES


def _messages_specs(deltas: Spec, blocks: Spec, starting: Leaf) -> dict[tuple[bool, bool], Spec]:
    """A Messages stream's event descriptions, by whether the event's delta, and its
    content_block, is thinking: each part read by its own type."""
    return {
        (delta, block): {
            "delta": {**deltas, **_THINKING} if delta else deltas,
            "content_block": {**blocks, **_THINKING} if block else blocks,
            "message": {"content": All({"text": starting}, _THINKING_BLOCKS)},
        }
        for delta in (False, True)
        for block in (False, True)
    }


class MessagesSurface(Surface):
    specs: ClassVar[dict[tuple[bool, bool], Spec]] = _messages_specs(_DELTA, _BLOCK, _STARTING_TEXT)
    spec: ClassVar[Spec] = specs[False, False]
    reply_spec: ClassVar[Spec] = {"content": All({"text": TEXT}, _THINKING_BLOCKS)}
    done_types: ClassVar[frozenset[str]] = frozenset({"message_stop", "error"})  # the upstream's own error ends it too
    # The Anthropic SDK (Python, Swift) reads data without a "type" as the event its `event:`
    # line names, and joins a content_block_delta's text to its block's: the gateway reads it so too.
    named_types: ClassVar[frozenset[bytes]] = frozenset(
        {b"message_start", b"message_delta", b"message_stop", b"error"}
        | {b"content_block_start", b"content_block_delta", b"content_block_stop"}
    )

    def spec_of(self, event: dict[str, Any]) -> Spec:
        return self.specs[_is_thinking(event.get("delta")), _is_thinking(event.get("content_block"))]

    def root(self, event: dict[str, Any]) -> Path | None:
        """A content block's events are keyed by its index; message_start's text blocks open
        the streams of the blocks at their positions (`stream_of`); no other event carries a
        text stream (a text an event of another type, or of no type, holds is redacted whole:
        a held part of it would have no block to go out in)."""
        kind = event.get("type")
        if type(kind) is str and kind.startswith("content_block_"):
            index = event.get("index")
            return (index,) if type(index) is int else None
        return () if kind == "message_start" else None

    def stream_of(self, path: Path) -> Path:
        """The stream a text block of message_start opens: ("message", "content", position,
        "text") → that of the block whose index is its position."""
        return (path[2], "delta", "text")

    def misindexed(self, event: dict[str, Any]) -> str | None:
        kind = event.get("type")
        if type(kind) is not str or not kind.startswith("content_block_"):
            return None
        index = event.get("index")
        if type(index) is int:
            return None
        if index is not None:
            return NOT_AN_INTEGER
        return MISSING if carries_text(event, self.spec_of(event)) else LEFT_OUT  # a content_block_stop passes

    def for_request(self, payload: dict[str, Any] | None) -> Surface:
        if payload is not None:
            config = payload.get("output_config")
            if (type(config) is dict and asks_json(config.get("format"))) or asks_json(payload.get("output_format")):
                return MESSAGES_JSON
        return self

    def flush_before(self, event: dict[str, Any]) -> list[Path] | None:
        """A block's held text goes out before its content_block_stop (and any left before
        the message's end)."""
        kind = event.get("type")
        if kind == "content_block_stop":
            index = event.get("index")
            return [(index,)] if type(index) is int else [()]
        if kind in ("message_delta", "message_stop", "error"):
            return [()]
        return None

    def flush_events(
        self, held: list[tuple[Path, str]], templates: dict[Path, dict[str, Any]], counts: dict[str, int]
    ) -> bytes:
        out = []
        for path, text in held:
            index, field = path[0], path[-1]
            delta = (
                {"type": "input_json_delta", "partial_json": text}
                if field == "partial_json"
                else {"type": "text_delta", "text": text}
            )
            data = orjson.dumps({"type": "content_block_delta", "index": index, "delta": delta})
            out.append(b"event: content_block_delta\ndata: " + data + b"\n\n")
        return b"".join(out)

    def usage(self, event: dict[str, Any], before: Usage | None, counts: dict[str, int]) -> Usage | None:
        """message_start's counts, then message_delta's, field by field: its cumulative values
        win where it has them, the cache counts it leaves out stay (`counts` keeps them)."""
        kind = event.get("type")
        if kind == "message_start":
            message = event.get("message")
            usage = message.get("usage") if type(message) is dict else None
        elif kind == "message_delta":
            usage = event.get("usage")
        else:
            return before
        if type(usage) is not dict:
            return before
        for name in _ANTHROPIC_COUNTS:
            value = usage.get(name)
            if is_count(value):
                counts[name] = value
        prompt = anthropic_input_tokens(counts)
        completion = counts.get("output_tokens")
        if prompt is None and completion is None:
            return before
        return Usage(prompt or 0, completion or 0)

    def usage_is_final(self, event: dict[str, Any]) -> bool:
        return event.get("type") == "message_delta"  # message_start's output count is provisional

    def error_event(self, error: GatewayError, counts: dict[str, int]) -> bytes:
        return b"event: error\ndata: " + error.anthropic()[1] + b"\n\n"


_ANTHROPIC_COUNTS = ("input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens", "output_tokens")


def anthropic_input_tokens(usage: dict[str, Any]) -> int | None:
    """input_tokens plus the cache's read and creation tokens; None when none is reported."""
    counts = [usage.get(k) for k in ("input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens")]
    present = [c for c in counts if is_count(c)]
    return sum(present) if present else None


def anthropic_usage(reply: dict[str, Any]) -> Usage | None:
    usage = reply.get("usage")
    if type(usage) is not dict:
        return None
    prompt, completion = anthropic_input_tokens(usage), usage.get("output_tokens")
    if prompt is None or not is_count(completion):
        return None
    return Usage(prompt, completion)


def message_events(message: dict[str, Any]) -> bytes | None:
    """A Message (from an upstream that answered a stream request with one JSON reply) as the
    events Anthropic would have sent for it: message_start (the message without its content,
    the usage without output tokens), per block its start, deltas and stop (text_delta, a
    tool call's input as one input_json_delta, thinking_delta and signature_delta), then
    message_delta (stop reason and sequence, output tokens) and message_stop. Else the
    anthropic SDK, handed JSON for the stream it asked for, fails. None: not a Message (an
    error object stays as it came)."""
    content = message.get("content")
    if message.get("type") != "message" or type(content) is not list or not all(type(b) is dict for b in content):
        return None
    usage = message.get("usage")
    usage = usage if type(usage) is dict else {}
    events: list[bytes] = []

    def event(kind: str, **fields: Any) -> None:
        events.append(b"event: " + kind.encode() + b"\ndata: " + orjson.dumps({"type": kind, **fields}) + b"\n\n")

    start = {name: value for name, value in message.items() if name not in ("content", "stop_reason", "stop_sequence")}
    start |= {"content": [], "stop_reason": None, "stop_sequence": None, "usage": {**usage, "output_tokens": 0}}
    event("message_start", message=start)
    for index, block in enumerate(content):
        kind = block.get("type")
        deltas: list[dict[str, Any]] = []
        opened = dict(block)
        if kind == "text" and type(block.get("text")) is str:
            opened["text"] = ""
            deltas.append({"type": "text_delta", "text": block["text"]})
        elif kind == "thinking" and type(block.get("thinking")) is str:
            opened |= {"thinking": "", "signature": ""}
            deltas.append({"type": "thinking_delta", "thinking": block["thinking"]})
            if type(block.get("signature")) is str:
                deltas.append({"type": "signature_delta", "signature": block["signature"]})
        elif type(block.get("input")) is dict:  # tool_use, server_tool_use, mcp_tool_use
            opened["input"] = {}
            if block["input"]:
                deltas.append({"type": "input_json_delta", "partial_json": orjson.dumps(block["input"]).decode()})
        event("content_block_start", index=index, content_block=opened)
        for delta in deltas:
            event("content_block_delta", index=index, delta=delta)
        event("content_block_stop", index=index)
    stop = {"stop_reason": message.get("stop_reason"), "stop_sequence": message.get("stop_sequence")}
    event("message_delta", delta=stop, usage={"output_tokens": usage.get("output_tokens", 0)})
    event("message_stop")
    return b"".join(events)


MESSAGES = MessagesSurface()

# Structured output (`output_config.format` json_schema, or the beta's `output_format`): text
# blocks are a JSON document, read as the JSON text it is (as chat's content is then: see
# CHAT_JSON), their deltas, opening text and message_start's alike.
_JSON_DELTA: Spec = {"text": JSON_TEXT, "partial_json": JSON_TEXT}
_JSON_BLOCK: Spec = {"text": Leaf(json_text=True, joins=("delta", "text"))}
_JSON_STARTING_TEXT = Leaf(json_text=True, opens=True)


class MessagesJsonSurface(MessagesSurface):
    specs: ClassVar[dict[tuple[bool, bool], Spec]] = _messages_specs(_JSON_DELTA, _JSON_BLOCK, _JSON_STARTING_TEXT)
    spec: ClassVar[Spec] = specs[False, False]
    reply_spec: ClassVar[Spec] = {"content": All({"text": JSON_TEXT}, _THINKING_BLOCKS)}


MESSAGES_JSON = MessagesJsonSurface()


# --- Request texts: what a client sends, per API (SPEC §6, §11) -------------------------
TextSlot = tuple[Any, Any, bool]  # (holder, key or index, JSON text?): holder[key] is a str to redact


class ObjectKeys:
    """An object's keys as text slots: `keys[name]` is the name, and assigning a new one
    renames the key (it moves to the end: key order means nothing in JSON; a name that was
    already there keeps the renamed key's value)."""

    __slots__ = ("node",)

    def __init__(self, node: dict[str, Any]) -> None:
        self.node = node

    def __getitem__(self, name: str) -> str:
        return name

    def __setitem__(self, name: str, new: str) -> None:
        if new != name:
            self.node[new] = self.node.pop(name)


def chat_request_texts(payload: dict[str, Any]) -> Iterator[TextSlot]:
    """String content, text parts, refusals, reasoning sent back and tool-call arguments of every
    message, and a predicted output's content. Every other field goes as sent (SPEC §3), the end
    user's `user` and `safety_identifier` too."""
    for message in payload.get("messages") or ():
        if type(message) is not dict:
            continue
        content = message.get("content")
        if type(content) is str:
            yield message, "content", False
        elif type(content) is list or type(content) is dict:
            # A part's text whatever its type says, and a bare string as a part: OpenAI-compatible
            # servers (vLLM) put `input_text` / `output_text` parts, parts without a type and
            # strings in a content array into the prompt, so keying on type "text" let them
            # reach the upstream unredacted. So every string of a part but its media's and type
            # (`_content_texts`): refusal parts, Mistral's thinking chunks of text chunks, and
            # shapes no API takes (one part for an array, a nested list, the Assistants API's
            # text object), which reach the upstream all the same.
            yield from _content_texts(message, "content")
        if type(message.get("refusal")) is str:
            yield message, "refusal", False
        # Reasoning sent back (DeepSeek's thinking mode with tools, Kimi, MiniMax ask for it): text
        # the model reads, the same fields a reply's redaction reads (_CHAT_MESSAGE).
        for name in ("reasoning_content", "reasoning"):
            if type(message.get(name)) is str:
                yield message, name, False
        details = message.get("reasoning_details")
        for item in details if type(details) is list else ():
            if type(item) is dict:
                for name in ("text", "summary"):
                    if type(item.get(name)) is str:
                        yield item, name, False
        legacy = message.get("function_call")
        if type(legacy) is dict:
            yield from _arguments(legacy)
        calls = message.get("tool_calls")
        if type(calls) is dict:  # one call where an array goes: no message OpenAI takes, but sent there
            calls = [calls]
        for call in calls if type(calls) is list else ():
            function = call.get("function") if type(call) is dict else None
            if type(function) is dict:
                yield from _arguments(function)
            custom = call.get("custom") if type(call) is dict else None
            if type(custom) is dict and type(custom.get("input")) is str:
                yield custom, "input", False
    # Predicted Outputs: the text of a file being regenerated (a string or text parts), which the
    # messages usually carry too; sent in clear beside them, it gave away what they masked.
    prediction = payload.get("prediction")
    if type(prediction) is dict and "content" in prediction:
        yield from _content_texts(prediction, "content")


def _arguments(function: dict[str, Any]) -> Iterator[TextSlot]:
    """A tool call's arguments: JSON text, or an object (servers that parse them for a chat
    template take one) whose strings, long numbers and keys are read as a tool_use input's."""
    arguments = function.get("arguments")
    if type(arguments) is str:
        yield function, "arguments", True
    elif type(arguments) is dict or type(arguments) is list:
        yield from strings_in(function, "arguments")


# A chat content part's media, which passes as sent (an image's URL, base64 audio or a file),
# and the fields that name no text.
_MEDIA_PARTS = frozenset({"image_url", "input_audio", "file", "video_url", "audio_url", "document_url"})
_NOT_PART_TEXT = _MEDIA_PARTS | {"type", "detail", "file_id", "cache_control"}


def _content_texts(holder: Any, key: Any) -> Iterator[TextSlot]:
    """Every string of a chat content (parts, one part, or nested lists) but a media part's (a
    file part's `filename` and a document part's `document_name` excepted) and
    `_NOT_PART_TEXT`'s, in document order. Walked with a stack of its own (see `strings_in`)."""
    todo: list[tuple[Any, Any]] = [(holder, key)]
    while todo:
        holder, key = todo.pop()
        value = holder[key]
        if type(value) is str:
            yield holder, key, False
        elif type(value) is list:
            todo += [(value, position) for position in range(len(value) - 1, -1, -1)]
        elif type(value) is dict:
            kind = value.get("type")
            if type(kind) is not str or kind not in _MEDIA_PARTS:
                todo += [(value, name) for name in reversed(value) if name not in _NOT_PART_TEXT]
            elif kind == "file" and type(file := value.get("file")) is dict and type(file.get("filename")) is str:
                yield file, "filename", False  # a name the user gave it (as the Responses API's input_file)
            elif kind == "document_url" and type(value.get("document_name")) is str:
                yield value, "document_name", False  # Mistral's name for a document part: the same


def messages_request_texts(payload: dict[str, Any]) -> Iterator[TextSlot]:
    """`system`, and every text of the conversation's blocks (`_block_texts`). `metadata` goes
    as sent (SPEC §11)."""
    yield from _blocks_texts(payload, "system")
    for message in payload.get("messages") or ():
        if type(message) is dict:
            yield from _blocks_texts(message, "content")


def _blocks_texts(holder: dict[str, Any], key: str) -> Iterator[TextSlot]:
    """A string, or content blocks as the client sends the conversation back: text and its
    citations, a tool call's input, a tool result's content (a string or blocks), and the
    rarer blocks of `_block_texts`. Thinking passes unchanged (its signature covers it), as
    do images and whatever the API adds that is neither a tool call nor a tool result."""
    value = holder.get(key)
    if type(value) is str:
        yield holder, key, False
        return
    if type(value) is dict:  # one block where an array goes: refused by Anthropic, but sent there
        value = [value]
    elif type(value) is not list:
        return
    for position, block in enumerate(value):
        if type(block) is not dict:
            # A string, a nested list: no block Anthropic takes, but its text must not reach it in clear.
            if type(block) is str or type(block) is list:
                yield from _result_strings(value, position)
            continue
        # The common blocks here, the others in _block_texts: one generator less per block.
        kind = block.get("type")
        if kind == "text":
            if type(block.get("text")) is str:
                yield block, "text", False
            elif block.get("text") is not None:  # a text that is no string: refused, but sent there
                yield from _result_strings(block, "text")
            if block.get("citations"):
                yield from _result_strings(block, "citations")
        elif kind is None:  # no type: no block Anthropic takes (nor signs), but sent there
            for name in block:
                yield from _result_strings(block, name)
        elif kind == "tool_result":
            yield from _blocks_texts(block, "content")
        elif kind == "tool_use":
            yield from strings_in(block, "input")
        elif type(kind) is str and (kind in _OTHER_TEXT_BLOCKS or kind.endswith("_tool_result")):
            # (A type that is no string, an object say, is no block's: not looked up, it is unhashable.)
            yield from _block_texts(block)


# A server tool result's strings that are no text: ids, enums, and what Anthropic encrypted
# (a search result's page, a citation's place in it, code's output): it decrypts them when the
# conversation comes back, so a changed one would fail the request.
_NOT_BLOCK_TEXT = frozenset(
    {"type", "tool_use_id", "tool_name", "file_id", "media_type", "error_code", "tab_id", "download_id"}
    | {"encrypted_content", "encrypted_index", "encrypted_stdout"}
)
_OTHER_TEXT_BLOCKS = frozenset(
    {"server_tool_use", "mcp_tool_use", "document", "search_result", "browser_state", "compaction"}
)


def _block_texts(block: dict[str, Any]) -> Iterator[TextSlot]:
    """A server tool's call (a web search's query) and an MCP tool's, like a tool call; an MCP
    tool's result, like a tool result; a document's title, context and text (a plain-text
    source, or a content source's blocks: PDFs and files pass); a search result's source,
    title and text; and a server tool's result (a web search's titles and URLs, a fetched
    page, code's output), and a browser's state: every string but `_NOT_BLOCK_TEXT`'s."""
    kind = block.get("type")
    if kind == "server_tool_use" or kind == "mcp_tool_use":
        yield from strings_in(block, "input")
    elif kind == "mcp_tool_result":
        yield from _blocks_texts(block, "content")
    elif kind == "document":
        for name in ("title", "context"):
            if type(block.get(name)) is str:
                yield block, name, False
        source = block.get("source")
        if type(source) is dict:
            if source.get("type") == "text" and type(source.get("data")) is str:
                yield source, "data", False
            elif source.get("type") == "content":
                yield from _blocks_texts(source, "content")
    elif kind == "search_result":
        for name in ("source", "title"):
            if type(block.get(name)) is str:
                yield block, name, False
        yield from _blocks_texts(block, "content")
    elif kind == "compaction":
        # Context compaction's summary of the conversation (beta), sent back in later turns:
        # text the model wrote from the messages, addresses included (its encrypted_content passes).
        if type(block.get("content")) is str:
            yield block, "content", False
    elif kind == "browser_state":
        # A browser tool's result (beta): the model reads text made from its tabs' titles and
        # URLs and its downloads' paths; the ids the client assigned pass.
        for name in ("tabs", "state_changes"):
            if name in block:
                yield from _result_strings(block, name)
    elif type(kind) is str and kind.endswith("_tool_result"):
        yield from _result_strings(block, "content")


def _result_strings(holder: Any, key: Any) -> Iterator[TextSlot]:
    """Every string under holder[key] but `_NOT_BLOCK_TEXT`'s; a document by its own rule. In
    document order, walked with a stack of its own (see `strings_in`)."""
    todo: list[tuple[Any, Any]] = [(holder, key)]
    while todo:
        holder, key = todo.pop()
        value = holder[key]
        if type(value) is str:
            yield holder, key, False
        elif type(value) is dict:
            if value.get("type") == "document":
                yield from _block_texts(value)
                continue
            todo += [
                (value, name)
                for name, inner in reversed(value.items())
                if type(inner) is not str or name not in _NOT_BLOCK_TEXT
            ]
        elif type(value) is list:
            todo += [(value, position) for position in range(len(value) - 1, -1, -1)]


class NumberText:
    """A JSON number as a text slot: `slot[key]` is its digits, and assigning other text (its
    mask) replaces the number with that string; its own digits back leave the number as it was."""

    __slots__ = ("holder",)

    def __init__(self, holder: Any) -> None:
        self.holder = holder

    def __getitem__(self, key: Any) -> str:
        return str(self.holder[key])

    def __setitem__(self, key: Any, new: str) -> None:
        if new != str(self.holder[key]):
            self.holder[key] = new


CARD_SIZED = 10**12  # a number of 13 digits or more could be a card number


_KEYS_OF = object()  # `strings_in`'s stack: the object on it has its keys looked at now


def strings_in(holder: Any, key: Any) -> Iterator[TextSlot]:
    """Every string under holder[key], every number long enough to be a card number (a
    model's tool input holds a bare one as readily as a string), and every object key there
    that holds "@" or a digit (an address used as a key): each key after its object's
    values, so that renaming it cannot hide a value still to come. Walked with a stack of its
    own, in document order: nested generators cost every string a step per level it lies
    under (a 1.6 MB body of strings 900 lists deep took 9 s to walk)."""
    todo: list[tuple[Any, Any]] = [(holder, key)]
    while todo:
        holder, key = todo.pop()
        if key is _KEYS_OF:
            keys = ObjectKeys(holder)
            for name in [name for name in holder if has_trigger(name, 0)]:
                yield keys, name, False
            continue
        value = holder[key] if type(holder) is list else holder.get(key)
        if type(value) is str:
            yield holder, key, False
        elif type(value) is int and (value >= CARD_SIZED or value <= -CARD_SIZED):
            yield NumberText(holder), key, False
        elif type(value) is dict:
            if has_trigger("".join(value), 0):
                todo.append((value, _KEYS_OF))  # after its values: pushed before them
            todo += [(value, name) for name in reversed(value)]
        elif type(value) is list:
            todo += [(value, position) for position in range(len(value) - 1, -1, -1)]


# --- Whole APIs: a route's request checks, request texts, reply and event stream --------
@dataclass(frozen=True, slots=True)
class Api:
    name: str  # the route's name (metrics label "route" is its path)
    path: str
    surface: Surface
    check_request: Callable[[dict[str, Any], bool], None]  # (payload, redacting): raises BadRequest
    request_texts: Callable[[dict[str, Any]], Iterator[TextSlot]]
    reply_usage: Callable[[dict[str, Any]], Usage | None]
    anthropic_errors: bool = False  # the gateway's own errors in Anthropic's shape (SPEC §11)
    system: str = "openai"  # gen_ai.system on the upstream call's span
    operation: str = "chat"  # gen_ai.operation.name (OpenTelemetry's GenAI conventions) on its spans
    asks_stream_usage: bool = False  # streams get stream_options.include_usage upstream (SPEC §14)
    streams: bool = True  # "stream": true is answered as a stream (embeddings never are)
    # The prompt tokens the request gives as token ids, not text (embeddings' token arrays):
    # counted one each in the token budget's estimate (SPEC §14), as 4 characters of text are.
    request_tokens: Callable[[dict[str, Any]], int] | None = None
    # Its stream's opening events echo the request (the Responses API's response.created and
    # .in_progress each carry its instructions and tools): held for the answer as long as that.
    preamble_echoes_request: bool = False


def check_chat_request(payload: dict[str, Any], redacting: bool) -> None:
    if type(payload.get("messages")) is not list:
        raise BadRequest("'messages' is required and must be an array", code="missing_messages")
    if redacting and (payload.get("logprobs") is True or payload.get("top_logprobs") is not None):
        raise LogprobsUnavailable()


def check_messages_request(payload: dict[str, Any], redacting: bool) -> None:
    if type(payload.get("messages")) is not list:
        raise BadRequest("'messages' is required and must be an array", code="missing_messages")


CHAT_API = Api(
    "chat", "/v1/chat/completions", CHAT, check_chat_request, chat_request_texts, chat_usage, asks_stream_usage=True
)


def ask_stream_usage(payload: dict[str, Any]) -> bool:
    """Have the upstream report usage at the stream's end (OpenAI's stream_options); True when
    the client had not asked for it, so the usage chunk is its own and not relayed."""
    options = payload.get("stream_options")
    if type(options) is dict and options.get("include_usage") is True:
        return False
    payload["stream_options"] = {**(options if type(options) is dict else {}), "include_usage": True}
    return True


MESSAGES_API = Api(
    "messages",
    "/v1/messages",
    MESSAGES,
    check_messages_request,
    messages_request_texts,
    anthropic_usage,
    anthropic_errors=True,
    system="anthropic",
)
