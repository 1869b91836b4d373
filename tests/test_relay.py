"""The stream relay step: byte-for-byte where nothing changes, exact where something does."""

from __future__ import annotations

import itertools
import json
import os
import re
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import sse
from gateway.redact import ALL_KINDS, build_redactor
from gateway.relay import StreamRelay

from .test_redact import ORDINARY, PII_VALUES, split_reply

REDACTOR = build_redactor(ALL_KINDS)


def chunk(content: str | None = None, finish: str | None = None, index: int = 0, **extra: object) -> bytes:
    """A chat-completions chunk as OpenAI's Python-style JSON spacing has it."""
    delta = {} if content is None else {"content": content}
    body = {
        "id": "c1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [{"index": index, "delta": delta, "finish_reason": finish}],
        **extra,
    }
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def compact_chunk(content: str, finish: str | None = None, **extra: object) -> bytes:
    """The same without spaces, as most upstreams send it."""
    body = {"id": "c1", "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": finish}], **extra}
    return b"data: " + json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


def run(relay: StreamRelay, *blocks: bytes) -> bytes:
    return b"".join(relay.feed(block) for block in blocks)


def contents(wire: bytes) -> str:
    out = []
    for event in sse.SSEParser().feed(wire):
        if event.data and event.data != sse.DONE:
            for choice in json.loads(event.data).get("choices", []):
                out.append(choice.get("delta", {}).get("content") or "")
    return "".join(out)


def test_events_without_pii_or_content_pass_byte_for_byte() -> None:
    # Compact JSON, as OpenAI and most servers send it: an event written from what was parsed
    # is its own bytes again.
    role = b'data: {"id":"c1","choices":[{"index":0,"delta":{"role":"assistant"}}]}\n\n'
    tool = (
        b'data: {"choices":[{"index":0,"delta":{"tool_calls":'
        b'[{"index":0,"function":{"arguments":"{\\"a\\": 1}"}}]}}]}\n\n'
    )
    plain = compact_chunk("Hello there. ")
    comment = b": keep-alive\n\n"
    blocks = [role, tool, plain, comment, compact_chunk("", "stop"), b"data: [DONE]\n\n"]
    assert run(StreamRelay(REDACTOR, None), *blocks) == b"".join(blocks)


def test_spaced_json_is_relayed_as_what_it_parses_to() -> None:
    # Other spacing is written compact: the same JSON to any client, and never bytes the
    # gateway did not read (a repeated key, say).
    wire = chunk("Hello there. ") + b"data: [DONE]\n\n"
    out = run(StreamRelay(REDACTOR, None), wire)
    assert [json.loads(e.data) for e in sse.SSEParser().feed(out) if e.data != sse.DONE] == [
        json.loads(e.data) for e in sse.SSEParser().feed(wire) if e.data != sse.DONE
    ]


def test_split_email_is_masked_and_flushed_into_the_finish_chunk() -> None:
    counted: list[str] = []
    relay = StreamRelay(REDACTOR, counted.append)
    wire = run(relay, chunk("write to jane.doe@exa"), chunk("mple.com"), chunk(None, "stop"), b"data: [DONE]\n\n")
    assert "jane.doe" not in wire.decode()
    assert contents(wire) == "write to j***e@example.com"
    assert counted == ["email"]
    assert wire.endswith(b"data: [DONE]\n\n") and relay.done


def test_held_text_is_flushed_before_done_without_a_finish_chunk() -> None:
    relay = StreamRelay(REDACTOR, None)
    wire = run(relay, chunk("call +1 415 555 "), chunk("2671"), b"data: [DONE]\n\n")
    assert contents(wire) == "call PHONE_MASKED_LAST2_71"
    assert wire.index(b"PHONE_MASKED") < wire.index(b"[DONE]")


def test_choices_are_redacted_independently() -> None:
    relay = StreamRelay(REDACTOR, None)
    wire = run(relay, chunk("a@b", index=0), chunk("x ", index=1), chunk(".com ok", index=0), b"data: [DONE]\n\n")
    per_choice: dict[int, str] = {}
    for event in sse.SSEParser().feed(wire):
        if event.data and event.data != sse.DONE:
            for c in json.loads(event.data)["choices"]:
                per_choice[c["index"]] = per_choice.get(c["index"], "") + (c["delta"].get("content") or "")
    assert per_choice == {0: "a***@b.com ok", 1: "x "}


def test_usage_is_read_from_the_stream() -> None:
    relay = StreamRelay(None, None)
    usage = b'data: {"model": "gpt-x", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 5}}\n\n'
    assert run(relay, usage) == usage
    assert relay.usage is not None and (relay.usage.prompt_tokens, relay.usage.completion_tokens) == (3, 5)
    assert relay.response_model == "gpt-x"


@pytest.mark.parametrize("encode", [compact_chunk])
def test_a_finish_chunk_with_text_carries_the_held_text(encode: Callable[..., bytes]) -> None:
    # Read one event at a time, as from a live stream: the text held back goes out in the
    # finish chunk itself, not in one added before [DONE].
    relay = StreamRelay(REDACTOR, None)
    wire = run(relay, encode("Hello. "), encode("Bye.", finish="stop"), b"data: [DONE]\n\n")
    assert wire == encode("Hello. ") + encode("Bye.", finish="stop") + b"data: [DONE]\n\n"


@pytest.mark.parametrize("encode", [chunk, compact_chunk])
def test_usage_in_a_chunk_with_text_is_counted(encode: Callable[..., bytes]) -> None:
    relay = StreamRelay(REDACTOR, None)
    usage = {"prompt_tokens": 3, "completion_tokens": 5}
    wire = run(relay, encode("Hello. "), encode("Bye. ", usage=usage), b"data: [DONE]\n\n")
    assert contents(wire) == "Hello. Bye. "
    assert relay.usage is not None and (relay.usage.prompt_tokens, relay.usage.completion_tokens) == (3, 5)


def test_only_a_delta_text_is_taken_for_the_reply() -> None:
    # A "content" string elsewhere in a chunk (some OpenAI-compatible servers echo a
    # message) is not the reply: the delta's own text is redacted, read by read or all at once.
    def with_note(text: str) -> bytes:
        choice = {"index": 0, "message": {"content": "a note"}, "delta": {"content": text}, "finish_reason": None}
        return b"data: " + json.dumps({"id": "c1", "choices": [choice]}).encode() + b"\n\n"

    events = [with_note("mail jane.doe@example.com "), with_note("or call +1 415 555 2671 "), chunk(None, "stop")]
    for reads in (events, [b"".join(events)]):
        wire = run(StreamRelay(REDACTOR, None), *reads, b"data: [DONE]\n\n")
        assert contents(wire) == "mail j***e@example.com or call PHONE_MASKED_LAST2_71 "


def test_a_lone_surrogate_escape_does_not_let_a_chunk_past_redaction() -> None:
    # JSON allows "\ud800" (half of an emoji); orjson refuses it. Such a chunk is still
    # redacted, the lone half becoming U+FFFD; a whole pair stays the emoji it is.
    wire = [chunk("mail jane.doe@example.com \ud800 ok "), chunk("bye \U0001f600 ")]
    assert b"\\ud800" in wire[0] and b"\\ud83d\\ude00" in wire[1]  # as the stdlib's encoder sends them
    for reads in (wire, [b"".join(wire)]):
        out = run(StreamRelay(REDACTOR, None), *reads, b"data: [DONE]\n\n")
        assert contents(out) == "mail j***e@example.com \ufffd ok bye \U0001f600 "


def test_upstream_break_flushes_held_text() -> None:
    relay = StreamRelay(REDACTOR, None)
    wire = run(relay, chunk("mail me at bob@example"))
    assert contents(wire + relay.finish()) == "mail me at bob@example"  # a partial address is not an address


def varying_chunk(content: str, finish: str | None = None) -> bytes:
    """A chunk with a field that changes from chunk to chunk (as OpenAI's "obfuscation")."""
    return compact_chunk(content, finish, obfuscation="x" * (len(content) % 7))


# Texts JSON must escape: quotes, backslashes (one ending a delta, too), control characters.
JSON_ESCAPED = st.sampled_from(['"', "\\", 'say "hi" ', "C:\\", "\\n", "\t", "\u2028", "\x01"])


@st.composite
def wire_in_reads(draw: st.DrawFn) -> tuple[list[str], bool, list[bytes]]:
    """A reply as deltas, encoded as the upstream would send it, in one read (a burst) or
    cut into arbitrary reads."""
    deltas = [d for _, pieces in draw(st.lists(split_reply(), min_size=1, max_size=3)) for d in pieces]
    for at, text in draw(st.lists(st.tuples(st.integers(0, len(deltas)), JSON_ESCAPED), max_size=3)):
        deltas.insert(at, text)
    encode = draw(st.sampled_from([chunk, compact_chunk, varying_chunk]))
    finish = draw(st.booleans())
    wire = b"".join(encode(d) for d in deltas) + (chunk(None, "stop") if finish else b"") + b"data: [DONE]\n\n"
    if draw(st.booleans()):
        return deltas, finish, [wire]
    cuts = sorted(draw(st.lists(st.integers(0, len(wire)), max_size=12)))
    bounds = [0, *cuts, len(wire)]
    return deltas, finish, [wire[a:b] for a, b in itertools.pairwise(bounds)]


@settings(max_examples=int(os.environ.get("RELAY_EXAMPLES", "600")), deadline=None)
@given(wire_in_reads())
def test_relayed_text_is_the_redacted_reply_for_any_reads(case: tuple[list[str], bool, list[bytes]]) -> None:
    deltas, finish, reads = case
    relay = StreamRelay(REDACTOR, None)
    wire = b"".join(relay.feed(read) for read in reads)
    assert relay.done and wire.endswith(b"data: [DONE]\n\n")
    assert contents(wire) == REDACTOR.redact("".join(deltas))
    events = sse.SSEParser().feed(wire)
    # No event lost; one added only to flush held text when no finish chunk carries it.
    assert len(deltas) + finish + 1 <= len(events) <= len(deltas) + 2
    for event in events:  # every event stays a whole chat-completions chunk
        assert event.data == sse.DONE or json.loads(event.data)["id"] == "c1"


def test_deltas_that_end_between_words_are_relayed_byte_for_byte_in_any_reads() -> None:
    # Nothing to hold back at any event's end (a word could still grow into an address).
    wire = b"".join(compact_chunk(w) for w in ["Hello ", "there, ", "my ", "friend! "]) + b"data: [DONE]\n\n"
    for cut in range(len(wire)):
        relay = StreamRelay(REDACTOR, None)
        assert relay.feed(wire[:cut]) + relay.feed(wire[cut:]) == wire


@pytest.mark.parametrize("encode", [chunk, compact_chunk])
def test_a_whole_reply_in_one_read_keeps_its_text_and_its_events(encode: Callable[..., bytes]) -> None:
    # A fast upstream's burst: every event kept, the text whole (a word held back at one
    # event's end goes out at the next one's start).
    wire = b"".join(encode(f" token{i}") for i in range(40)) + encode(None, "stop") + b"data: [DONE]\n\n"
    relay = StreamRelay(REDACTOR, None)
    out = relay.feed(wire)
    assert relay.done and contents(out) == contents(wire)
    assert len(sse.SSEParser().feed(out)) == len(sse.SSEParser().feed(wire))


@pytest.mark.parametrize("encode", [chunk, compact_chunk, varying_chunk])
def test_a_burst_with_pii_across_events_is_masked(encode: Callable[..., bytes]) -> None:
    texts = ["Write to jane", ".doe@exam", 'ple.com or "call" +1 415 ', "555 2671", " C:\\", " bye"]
    counted: list[str] = []
    relay = StreamRelay(REDACTOR, counted.append)
    wire = relay.feed(b"".join(encode(t) for t in texts) + b"data: [DONE]\n\n")
    assert contents(wire) == 'Write to j***e@example.com or "call" PHONE_MASKED_LAST2_71 C:\\ bye'
    assert sorted(counted) == ["email", "phone"]
    assert wire.endswith(b"data: [DONE]\n\n") and relay.done


def test_an_event_built_otherwise_inside_a_burst_is_still_read() -> None:
    # Events alike but for one in the middle that carries usage and a second field: its text
    # is still redacted and its usage still counted.
    usage = {"prompt_tokens": 3, "completion_tokens": 5}
    events = [compact_chunk("mail jane"), compact_chunk(".doe@example.com", usage=usage), compact_chunk(" ok")]
    relay = StreamRelay(REDACTOR, None)
    wire = relay.feed(b"".join(events) + b"data: [DONE]\n\n")
    assert contents(wire) == "mail j***e@example.com ok"
    assert relay.usage is not None and relay.usage.completion_tokens == 5


def test_a_quote_in_a_text_does_not_hide_a_field() -> None:
    # Built like its neighbours at both ends, but its "text" closes the string and the
    # choices early: the usage it carries is still counted, read by read or all at once.
    first = b'data: {"id":"c1","choices":[{"index":0,"delta":{"content":"a "},"finish_reason":null}]}\n\n'
    hidden = (
        b'data: {"id":"c1","choices":[{"index":0,"delta":{"content":"a "}}],'
        b'"usage":{"prompt_tokens":1,"completion_tokens":2},"more":[{"delta":{"x":"b"},"finish_reason":null}]}\n\n'
    )
    wire = [first, hidden, first, b"data: [DONE]\n\n"]
    for redactor, reads in itertools.product((None, REDACTOR), (wire, [b"".join(wire)])):
        relay = StreamRelay(redactor, None)
        assert run(relay, *reads) == b"".join(wire)
        assert relay.usage is not None and relay.usage.completion_tokens == 2


def test_with_redaction_off_events_pass_as_received_and_the_end_and_usage_are_seen() -> None:
    usage = {"prompt_tokens": 3, "completion_tokens": 5}
    events = [compact_chunk("mail jane.doe@example.com "), compact_chunk("ok", usage=usage), b"data: [DONE]\n\n"]
    for reads in (events, [b"".join(events)], [b"".join(events[:2]), events[2]]):
        relay = StreamRelay(None, None)
        assert run(relay, *reads) == b"".join(events) and relay.done
        assert relay.usage is not None and relay.usage.completion_tokens == 5
    # A second data line makes an event that is not [DONE]: the stream goes on.
    relay = StreamRelay(None, None)
    assert run(relay, compact_chunk("a"), b"data: [DONE]\ndata: more\n\n") and not relay.done
    assert run(relay, b"data: [DONE]\n\n") and relay.done


def test_a_done_line_inside_another_event_ends_the_stream_as_a_line_reader_reads_it() -> None:
    # "data: [DONE]" as the second data line of an event: the event (no JSON as a whole) goes
    # on a data line at a time, as a client reading line by line reads it, so [DONE] ends the
    # stream for every client. Text held back goes out before it, and nothing after it (the
    # next read's ".doe@example.com" would make an address with the "jane" already sent).
    odd = b'data: {"id":"c1","choices":[]}\ndata: [DONE]\n\n'
    relay = StreamRelay(REDACTOR, None)
    wire = run(relay, compact_chunk("mail ") + compact_chunk("jane") + odd, compact_chunk(".doe@example.com "))
    assert relay.done and wire.endswith(b"\n\ndata: [DONE]\n\n")
    assert contents(wire + relay.finish()) == "mail jane"


def any_chunk(compact: bool, choice: dict[str, object], **extra: object) -> bytes:
    body = {"id": "c1", "object": "chat.completion.chunk", "choices": [choice], **extra}
    return b"data: " + json.dumps(body, separators=(",", ":") if compact else None).encode() + b"\n\n"


@st.composite
def mixed_stream(draw: st.DrawFn) -> tuple[dict[int, str], tuple[int, int] | None, list[bytes]]:
    """A stream as upstreams send them: text for two choices (some events with a field that
    changes from event to event), role, tool-call and usage chunks and comments between, the
    finish chunk last; in one read, one event per read, or cut anywhere."""
    compact = draw(st.booleans())
    texts: dict[int, str] = {0: "", 1: ""}
    usage: tuple[int, int] | None = None
    events: list[bytes] = []
    kinds = st.sampled_from(["text"] * 6 + ["choice 1", "role", "tool", "usage", "comment"])
    for kind in draw(st.lists(kinds, max_size=25)):
        if kind in ("text", "choice 1"):
            index = 0 if kind == "text" else 1
            text = "".join(draw(st.lists(st.one_of(ORDINARY, PII_VALUES, JSON_ESCAPED), max_size=3)))
            texts[index] += text
            extra = {"obfuscation": "x" * len(text)} if draw(st.booleans()) else {}
            choice = {"index": index, "delta": {"content": text}, "finish_reason": None}
            events.append(any_chunk(compact, choice, **extra))
        elif kind == "role":
            events.append(any_chunk(compact, {"index": 0, "delta": {"role": "assistant", "content": ""}}))
        elif kind == "tool":
            events.append(any_chunk(compact, {"index": 0, "delta": {"tool_calls": [{"index": 0}]}}))
        elif kind == "usage":
            usage = (draw(st.integers(1, 9)), draw(st.integers(1, 9)))
            body = {"id": "c1", "choices": [], "usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1]}}
            events.append(b"data: " + json.dumps(body).encode() + b"\n\n")
        else:
            events.append(b": ping\n\n")
    last = draw(st.sampled_from(["", "bye", "jane.doe@example.com"]))
    texts[0] += last
    events.append(any_chunk(compact, {"index": 0, "delta": {"content": last} if last else {}, "finish_reason": "stop"}))
    events.append(b"data: [DONE]\n\n")
    wire = b"".join(events)
    mode = draw(st.sampled_from(["one read", "per event", "cut"]))
    if mode == "one read":
        return texts, usage, [wire]
    if mode == "per event":
        return texts, usage, events
    cuts = sorted(draw(st.lists(st.integers(0, len(wire)), max_size=10)))
    return texts, usage, [wire[a:b] for a, b in itertools.pairwise([0, *cuts, len(wire)])]


@settings(max_examples=int(os.environ.get("RELAY_EXAMPLES", "600")), deadline=None)
@given(mixed_stream())
def test_each_choice_gets_its_redacted_text_among_other_events(
    case: tuple[dict[int, str], tuple[int, int] | None, list[bytes]],
) -> None:
    texts, usage, reads = case
    relay = StreamRelay(REDACTOR, None)
    wire = b"".join(relay.feed(read) for read in reads)
    assert relay.done and wire.endswith(b"data: [DONE]\n\n")
    got = {0: "", 1: ""}
    for event in sse.SSEParser().feed(wire):
        if event.data and event.data != sse.DONE:
            for choice in json.loads(event.data)["choices"]:
                got[choice["index"]] += choice.get("delta", {}).get("content") or ""
    assert got == {i: REDACTOR.redact(text) for i, text in texts.items()}
    if usage is not None:
        assert relay.usage is not None and (relay.usage.prompt_tokens, relay.usage.completion_tokens) == usage


# The unredacted path finds the events that may hold a usage by the key's bytes; the regex
# over the whole chunk is what it must agree with (a usage missed is tokens not counted).
USAGE_BITS = [b'"usage"', b":", b" ", b"\t", b"null", b",", b"}", b"{", b"1", b'"', b"\n", b"nul", b'"usag"', b"x"]
USAGE_BITS += [b'"usage":', b'"usage":null,', b'"usage": 1', b'"usage"\n:\tnull}', b'"usage":{"total_tokens":3}']
USAGE_BITS += [b"nullx", b'usage":1', b'"\\u0075sage":1', b'"usag\\u0065" : null', b"\\u00"]  # escapes: the regex


@settings(max_examples=1000)
@given(st.lists(st.sampled_from(USAGE_BITS), max_size=40))
def test_usage_found_by_key_where_the_regex_finds_it(bits: list[bytes]) -> None:
    from gateway.relay import _USAGE_VALUE, usage_values

    blocks = b"".join(bits)
    assert usage_values(blocks) == [m.start() for m in _USAGE_VALUE.finditer(blocks)]


# An embedding's base64 vector passes untouched (SPEC §12: no text in it); the test for it is
# done by deleting the alphabet's bytes, and must say what this pattern says of any string.
BASE64_PATTERN = re.compile(r"[A-Za-z0-9+/]*={0,2}")
BASE64_BITS = st.text(alphabet="Aa09+/=", min_size=0, max_size=12) | st.sampled_from(
    ["=", "==", "===", "@", " ", "-", "_", "\n", "\x00", "\x7f", "é", "\u0660", "Ａ", "\U0001d7ce", "\u200b"]
)


@settings(max_examples=1000)
@given(st.lists(BASE64_BITS, max_size=8).map("".join))
def test_base64_vectors_are_told_as_the_pattern_tells_them(value: str) -> None:
    from gateway.relay import _is_base64

    assert _is_base64(value) == (BASE64_PATTERN.fullmatch(value) is not None)


def test_an_embedding_of_1536_floats_in_base64_is_base64() -> None:
    import base64
    import struct

    from gateway.relay import _is_base64

    vector = base64.b64encode(struct.pack("<1536f", *(i / 1e4 - 0.07 for i in range(1536)))).decode()
    assert _is_base64(vector) and _is_base64(vector[:-1] + "=") and _is_base64(vector[:-2] + "==")
    assert not _is_base64(vector + "===") and not _is_base64(vector[:100] + " " + vector[100:])


@pytest.mark.parametrize("redactor", [REDACTOR, None])
def test_an_upstream_error_event_ends_the_stream_after_the_held_text(redactor: object) -> None:
    """An OpenAI in-stream error (or a translated Anthropic `event: error`) is the stream's last
    event: text held back for redaction goes out before it, not after it, where a client that
    stops at the error (the openai SDK raises there) would never see it (SPEC §5, §9)."""
    relay = StreamRelay(redactor, None)  # type: ignore[arg-type]
    error = b'data: {"error": {"message": "boom", "type": "server_error", "code": null}}\n\n'
    wire = run(relay, chunk("Hello "), chunk("jane"), error, chunk(" more")) + relay.close()
    events = [event.data for event in sse.SSEParser().feed(wire) if event.data]
    assert json.loads(events[-1]) == {"error": {"message": "boom", "type": "server_error", "code": None}}
    assert contents(wire) == "Hello jane"
    assert relay.done


def _described(spec: object, at: str = "") -> set[str]:
    """Every path a spec describes (its leaves' kinds aside)."""
    if isinstance(spec, dict):
        return {f"{at}/{key}" for key in spec} | {p for key, v in spec.items() for p in _described(v, f"{at}/{key}")}
    inner = getattr(spec, "spec", None)
    if inner is not None:
        return _described(inner, at + "[]")
    return {p for each in getattr(spec, "specs", ()) for p in _described(each, at + "[]")}


def test_structured_output_surfaces_describe_every_field_their_route_does() -> None:
    """A structured-output surface reads the answer's text as JSON and is its route's surface in
    all else: a field the route drops or redacts and it forgot went out as it came (a choice's
    token_ids did, with response_format, when they were added to chat's alone)."""
    from gateway.openai_apis import _JSON_SPECS, RESPONSES, RESPONSES_JSON
    from gateway.surfaces import CHAT, CHAT_JSON, MESSAGES, MESSAGES_JSON

    for base, structured in ((CHAT, CHAT_JSON), (MESSAGES, MESSAGES_JSON), (RESPONSES, RESPONSES_JSON)):
        assert _described(structured.spec) == _described(base.spec)
        assert _described(structured.reply_spec) == _described(base.reply_spec)
    for key, spec in MESSAGES.specs.items():
        assert _described(MESSAGES_JSON.specs[key]) == _described(spec)
    for kind in _JSON_SPECS:
        assert _described(RESPONSES_JSON.spec_of({"type": kind})) == _described(RESPONSES.spec_of({"type": kind}))
