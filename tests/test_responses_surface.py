"""The relay on the Responses API's event stream (SPEC §12), through the same pipeline: text
streams per (output_index, content_index), every later copy of a text carrying what its
stream gave out, the API's own error event, hostile events; and the API's request side."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import sse
from gateway.errors import BadRequest, LogprobsUnavailable, UpstreamError, UpstreamStreamBroken
from gateway.openai_apis import (
    EMBEDDINGS,
    RESPONSES,
    check_embeddings_request,
    check_responses_request,
    embeddings_request_texts,
    embeddings_usage,
    responses_request_texts,
)
from gateway.redact import ALL_KINDS, build_redactor
from gateway.relay import StreamRelay, redact_reply
from gateway.surfaces import TextSlot

from .test_redact import PII, PII_VALUES, replies

REDACTOR = build_redactor(ALL_KINDS)
assert REDACTOR is not None
redact = REDACTOR.redact
EMAIL, CARD = "jane.doe@example.com", "4242 4242 4242 4242"
CORPUS = [v for values in PII.values() for v in values]


def ev(data: dict[str, Any]) -> bytes:
    return f"event: {data['type']}\ndata: ".encode() + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


Event = dict[str, Any] | bytes  # an event to number, or raw bytes (a hostile one)


def e(kind: str, **fields: Any) -> dict[str, Any]:
    return {"type": kind, **fields}


def numbered(items: list[Event]) -> bytes:
    """A Responses stream as OpenAI writes it: every event numbered in the order it is sent."""
    number = itertools.count()
    return b"".join(
        item if isinstance(item, bytes) else ev({**item, "sequence_number": next(number)}) for item in items
    )


RESPONSE = {"id": "resp_1", "object": "response", "model": "gpt-4o", "status": "in_progress", "output": []}
USAGE = {"input_tokens": 21, "output_tokens": 8, "total_tokens": 29}


def message(text: str | None, status: str = "completed", field: str = "text") -> dict[str, Any]:
    content = [] if text is None else [part(text, field)]
    return {"id": "msg_1", "type": "message", "status": status, "content": content, "role": "assistant"}


def part(text: str, field: str = "text") -> dict[str, Any]:
    if field == "refusal":
        return {"type": "refusal", "refusal": text}
    return {"type": "output_text", "annotations": [], "logprobs": [], "text": text}


def call(arguments: str, status: str = "completed") -> dict[str, Any]:
    return {
        "id": "fc_1",
        "type": "function_call",
        "status": status,
        "arguments": arguments,
        "call_id": "c",
        "name": "f",
    }


def text_item(deltas: list[str], index: int = 0, field: str = "text") -> list[Event]:
    """One message item's events: added, its part's, its deltas, the three copies."""
    kind = "refusal" if field == "refusal" else "output_text"
    where = {"item_id": f"msg_{index}", "output_index": index, "content_index": 0}
    text = "".join(deltas)
    extra: dict[str, Any] = {"logprobs": []} if field == "text" else {}
    return [
        e("response.output_item.added", output_index=index, item=message(None, "in_progress")),
        e("response.content_part.added", **where, part=part("", field)),
        *[e(f"response.{kind}.delta", **where, delta=d, **extra, obfuscation="pad") for d in deltas],
        e(f"response.{kind}.done", **where, **{field: text}, **extra),
        e("response.content_part.done", **where, part=part(text, field)),
        e("response.output_item.done", output_index=index, item=message(text, field=field)),
    ]


def call_item(deltas: list[str], index: int) -> list[Event]:
    arguments = "".join(deltas)
    return [
        e("response.output_item.added", output_index=index, item=call("", "in_progress")),
        *[
            e("response.function_call_arguments.delta", item_id="fc_1", output_index=index, delta=d, obfuscation="p")
            for d in deltas
        ],
        e("response.function_call_arguments.done", item_id="fc_1", output_index=index, arguments=arguments),
        e("response.output_item.done", output_index=index, item=call(arguments)),
    ]


def whole_stream(items: list[Event], output: list[dict[str, Any]], end: str = "completed") -> bytes:
    final = {**RESPONSE, "status": end, "output": output, "usage": USAGE}
    return numbered(
        [
            e("response.created", response=RESPONSE),
            e("response.in_progress", response=RESPONSE),
            *items,
            e(f"response.{end}", response=final),
        ]
    )


def relay(*reads: bytes, redactor: Any = REDACTOR) -> tuple[bytes, StreamRelay]:
    r = StreamRelay(redactor, None, RESPONSES)
    return b"".join(r.feed(x) for x in reads) + r.close(), r


def events(wire: bytes) -> list[dict[str, Any]]:
    """Each event's data; every event carries an `event:` line naming its type."""
    out = []
    for event in sse.SSEParser().feed(wire):
        assert event.data is not None
        data = json.loads(event.data)
        assert event.raw.startswith(f"event: {data['type']}\n".encode()), event.raw
        out.append(data)
    return out


def deltas_of(wire: bytes, index: int, kind: str = "output_text") -> str:
    return "".join(
        e["delta"] for e in events(wire) if e["type"] == f"response.{kind}.delta" and e["output_index"] == index
    )


def copies_of(wire: bytes, index: int) -> list[str]:
    """Every later copy of item `index`'s text (or refusal, or arguments)."""
    out: list[str] = []
    for e in events(wire):
        kind = e["type"]
        if e.get("output_index") == index:
            if kind in ("response.output_text.done", "response.refusal.done"):
                out.append(e.get("text", e.get("refusal")))
            elif kind == "response.function_call_arguments.done":
                out.append(e["arguments"])
            elif kind == "response.content_part.done":
                out.append(e["part"].get("text", e["part"].get("refusal")))
            elif kind == "response.output_item.done":
                out.append(_item_text(e["item"]))
        if kind in ("response.completed", "response.incomplete", "response.failed"):
            out.append(_item_text(e["response"]["output"][index]))
    return out


def _item_text(item: dict[str, Any]) -> str:
    if item["type"] == "function_call":
        return str(item["arguments"])
    return str(item["content"][0].get("text", item["content"][0].get("refusal")))


def assert_no_clear_pii(wire: bytes) -> None:
    decoded = wire.decode("utf-8", "replace")
    for event in sse.SSEParser().feed(wire):
        if event.data:
            with contextlib.suppress(ValueError, RecursionError):
                decoded += json.dumps(json.loads(event.data), ensure_ascii=False)
    for value in CORPUS:
        assert value not in decoded, value


# --- The stream ------------------------------------------------------------------------


def test_unchanged_events_pass_byte_for_byte_with_their_event_lines() -> None:
    deltas = ["Hello ", "there, ", "how are ", "you today?"]
    wire = whole_stream(text_item(deltas), [message("".join(deltas))])
    out, r = relay(wire)
    assert out == wire
    assert r.done and r.usage is not None and (r.usage.prompt_tokens, r.usage.completion_tokens) == (21, 8)


def test_split_pii_is_masked_and_every_later_copy_carries_the_masked_whole() -> None:
    deltas = ["Mail jane.doe@exa", "mple.com or pay 4242 42", "42 4242 4242"]
    text = "".join(deltas)
    out, _ = relay(whole_stream(text_item(deltas), [message(text)]))
    expected = "Mail j***e@example.com or pay CC_MASKED_LAST4_4242"
    assert deltas_of(out, 0) == expected == redact(text)
    assert copies_of(out, 0) == [expected] * 4  # output_text.done, content_part.done, output_item.done, completed
    assert_no_clear_pii(out)
    kinds = [e["type"] for e in events(out)]
    last_delta = max(i for i, k in enumerate(kinds) if k == "response.output_text.delta")
    assert last_delta < kinds.index("response.output_text.done")  # held text went out before the done


def test_held_text_goes_out_as_a_delta_shaped_like_the_streams_own() -> None:
    out, _ = relay(whole_stream(text_item(["write to jane.doe@exa", "mple.com"]), [message("x")]))
    flushed = [e for e in events(out) if e["type"] == "response.output_text.delta"][-1]
    assert flushed["delta"] == "j***e@example.com"
    assert (flushed["item_id"], flushed["output_index"], flushed["content_index"], flushed["logprobs"]) == (
        "msg_0",
        0,
        0,
        [],
    )
    numbers = [e["sequence_number"] for e in events(out)]
    assert numbers == sorted(numbers)  # in order: numbered as the event it goes out before


def test_refusals_are_redacted_across_deltas_and_in_every_copy() -> None:
    deltas = ["I won't mail jane.doe@exa", "mple.com, sorry"]
    out, _ = relay(whole_stream(text_item(deltas, field="refusal"), [message("".join(deltas), field="refusal")]))
    expected = "I won't mail j***e@example.com, sorry"
    assert deltas_of(out, 0, "refusal") == expected
    assert copies_of(out, 0) == [expected] * 4
    assert_no_clear_pii(out)


def test_function_call_arguments_stay_json_with_masks_in_deltas_and_copies() -> None:
    pieces = ['{"to": "jane.doe@exa', 'mple.com", "card": 4242 4242 ', '4242 4242, "n": 3}']
    arguments = "".join(pieces)
    items = text_item(["Calling."]) + call_item(pieces, 1)
    out, _ = relay(whole_stream(items, [message("Calling."), call(arguments)]))
    streamed = deltas_of(out, 1, "function_call_arguments")
    assert json.loads(streamed) == {"to": "j***e@example.com", "card": "CC_MASKED_LAST4_4242", "n": 3}
    assert copies_of(out, 1) == [streamed] * 3  # arguments.done, output_item.done, completed
    assert_no_clear_pii(out)


def test_a_copy_of_a_text_that_never_streamed_is_redacted_whole() -> None:
    text = "Reach jane.doe@example.com"
    item = e("response.output_item.done", output_index=0, item=message(text))
    out, _ = relay(whole_stream([item], [message(text)]))
    assert copies_of(out, 0) == [redact(text)] * 2


def test_a_copy_that_differs_from_its_deltas_carries_what_was_streamed() -> None:
    # A hostile (or broken) upstream whose done text is not its deltas: the client sees one
    # text everywhere, the one it was streamed, and never the other's PII in clear.
    where = {"item_id": "msg_0", "output_index": 0, "content_index": 0}
    items = [
        e("response.output_text.delta", **where, delta="Hello there", logprobs=[]),
        e("response.output_text.done", **where, text="Hello jane.doe@example.com", logprobs=[]),
        e("response.output_item.done", output_index=0, item=message("call +1 415 555 2671")),
    ]
    out, _ = relay(whole_stream(items, [message(CARD)]))
    assert copies_of(out, 0) == ["Hello there"] * 3
    assert_no_clear_pii(out)


def test_a_mid_stream_failure_is_a_responses_error_event_after_the_held_text() -> None:
    r = StreamRelay(REDACTOR, None, RESPONSES)
    r.feed(numbered(text_item(["call me at jane"])[:3]))  # added, part added, one delta: 0..2
    tail = r.finish() + r.error_event(UpstreamStreamBroken())
    flushed, error = events(tail)
    assert flushed["type"] == "response.output_text.delta" and flushed["delta"] == "jane"
    assert error == {
        "type": "error",
        "code": "upstream_stream_broken",
        "message": "upstream stream ended unexpectedly",
        "param": None,
        "sequence_number": 3,
    }


def test_the_upstreams_own_error_event_is_relayed_after_the_held_text() -> None:
    error = e("error", code="server_error", message="The server had an error", param=None)
    out, r = relay(numbered([*text_item(["mail jane.doe@exa"])[:3], error]))
    kinds = [event["type"] for event in events(out)]
    assert kinds[-2:] == ["response.output_text.delta", "error"]
    assert deltas_of(out, 0) == redact("mail jane.doe@exa")
    assert not r.done  # the stream ends when the upstream ends it


def test_nothing_after_the_terminal_event_is_relayed() -> None:
    # The route has no [DONE]: an upstream that sends one after response.completed (some
    # OpenAI-compatible servers do) has it left out, whatever the reads.
    wire = whole_stream(text_item(["Hi."]), [message("Hi.")]) + b"data: [DONE]\n\n"
    for cut in (len(wire) - 5, len(wire)):
        out, r = relay(wire[:cut], wire[cut:])
        assert r.done and events(out)[-1]["type"] == "response.completed" and b"[DONE]" not in out


def test_incomplete_and_failed_responses_carry_the_copies_and_end_the_stream() -> None:
    for end in ("incomplete", "failed"):
        deltas = ["to jane.doe@", "example.com"]
        out, r = relay(whole_stream(text_item(deltas), [message("".join(deltas))], end))
        assert r.done and copies_of(out, 0) == [redact("".join(deltas))] * 4


def test_logprobs_with_tokens_never_carry_the_text_in_clear() -> None:
    tokens = [{"token": t, "logprob": -0.1, "bytes": [], "top_logprobs": []} for t in ["jane", ".doe", "@example"]]
    where = {"item_id": "msg_0", "output_index": 0, "content_index": 0}
    out, _ = relay(numbered([e("response.output_text.delta", **where, delta=EMAIL, logprobs=tokens)]))
    assert "jane" not in out.decode() and events(out)[0]["logprobs"] is None


def test_redaction_off_notes_usage_and_the_end() -> None:
    wire = whole_stream(text_item(["Hi ", EMAIL]), [message("Hi " + EMAIL)])
    out, r = relay(wire, redactor=None)
    assert out == wire and r.done and r.usage is not None and r.usage.prompt_tokens == 21


# --- Any split, any interleaving --------------------------------------------------------

ARG_VALUES = st.one_of(PII_VALUES, st.sampled_from(["order 123456789012", "v3.11.7", "ok", "", 'say "hi"']))


@st.composite
def interleaved(draw: st.DrawFn) -> tuple[list[str], list[str], list[bytes]]:
    """Two output items — two messages, or a message and a function call — each text split
    anywhere into deltas, their events interleaved in any order (each item's own in order),
    numbered as sent, the stream cut into reads anywhere. (texts, their kinds, reads)"""
    kinds = ["output_text", draw(st.sampled_from(["output_text", "function_call_arguments"]))]
    texts: list[str] = []
    splits: list[list[str]] = []
    for kind in kinds:
        if kind == "function_call_arguments":
            values = draw(st.lists(ARG_VALUES, min_size=1, max_size=4))
            text = json.dumps({f"k{i}": v for i, v in enumerate(values)})
        else:
            text = draw(replies)
        cuts = sorted(draw(st.lists(st.integers(0, len(text)), max_size=8)))
        texts.append(text)
        splits.append([text[a:b] for a, b in itertools.pairwise([0, *cuts, len(text)])])
    calls = kinds[1] == "function_call_arguments"
    first = text_item(splits[0], 0)
    second = call_item(splits[1], 1) if calls else text_item(splits[1], 1)
    order = draw(st.permutations([0] * len(first) + [1] * len(second)))
    queues = [iter(first), iter(second)]
    output = [message(texts[0]), call(texts[1]) if calls else message(texts[1])]
    wire = whole_stream([next(queues[i]) for i in order], output)
    cuts = sorted(draw(st.lists(st.integers(0, len(wire)), max_size=8)))
    return texts, kinds, [wire[a:b] for a, b in itertools.pairwise([0, *cuts, len(wire)])]


@settings(max_examples=int(os.environ.get("RELAY_EXAMPLES", "300")), deadline=None)
@given(interleaved())
def test_any_split_and_interleaving_streams_the_redaction_of_each_whole_text_and_every_copy_is_it(
    case: tuple[list[str], list[str], list[bytes]],
) -> None:
    texts, kinds, reads = case
    out, r = relay(*reads)
    assert r.done and events(out)[-1]["type"] == "response.completed"
    for index, (text, kind) in enumerate(zip(texts, kinds, strict=True)):
        whole = REDACTOR.redact(text, json_text=kind == "function_call_arguments")
        assert deltas_of(out, index, kind) == whole
        # Every later copy: the .done, the part's (messages), the item's, the final response's.
        assert copies_of(out, index) == [whole] * (3 if kind == "function_call_arguments" else 4)
    for value in CORPUS:
        if any(value in t for t in texts) and all(value not in REDACTOR.redact(t) for t in texts):
            assert value not in out.decode()


# --- Hostile upstreams ------------------------------------------------------------------

ORDINARY = st.sampled_from(["Hello", " ", "world", ", ", ".", "order 12345", "v3.11.7", "é", "👋", '"q"', "\\"])
HOSTILE_TEXT = st.lists(st.one_of(ORDINARY, st.sampled_from(CORPUS)), min_size=1, max_size=6).map(" | ".join)


@st.composite
def hostile_event(draw: st.DrawFn) -> bytes:
    text = " | " + draw(HOSTILE_TEXT) + " | "
    where = {"item_id": "msg_0", "output_index": 0, "content_index": 0}
    delta = "response.output_text.delta"
    kind = draw(st.integers(0, 11))
    if kind == 0:  # an index that is no integer
        bad = draw(st.sampled_from([[0], "0", None, 1.5, True, -1, 2**70]))
        return ev({"type": delta, **where, "output_index": bad, "delta": text})
    if kind == 1:  # a repeated key: the first value must not pass in clear
        head = f'{{"type":"{delta}","output_index":0,"content_index":0,"delta":{json.dumps(text)},"delta":" | "}}'
        return b"event: x\ndata: " + head.encode() + b"\n\n"
    if kind == 2:  # an escaped key
        body = f'{{"type":"{delta}","output_index":0,"content_index":0,"\\u0064elta":{json.dumps(text)}}}'
        return b"data: " + body.encode() + b"\n\n"
    if kind == 3:  # text that is no string
        return ev({"type": delta, **where, "delta": [text, {"t": text}]})
    if kind == 4:  # a type that is no string
        return b"data: " + json.dumps({"type": [delta], **where, "delta": text}).encode() + b"\n\n"
    if kind == 5:  # not JSON
        return b"data: " + text.encode() + b"\n\n"
    if kind == 6:  # a copy whose text is not what was streamed
        return ev({"type": "response.output_text.done", **where, "text": text})
    if kind == 7:  # an item done with PII everywhere
        return ev({"type": "response.output_item.done", "output_index": 0, "item": {**message(text), "note": text}})
    if kind == 8:  # an unknown event
        return ev({"type": "response.future.delta", "output_index": 0, "delta": text, "x": {"y": text}})
    if kind == 9:  # a part done whose part is a string
        return ev({"type": "response.content_part.done", **where, "part": text})
    if kind == 10:  # a comment
        return b": " + text.encode().replace(b"\n", b" ") + b"\n\n"
    return ev({"type": "response.completed", "response": {"output": text, "usage": {"input_tokens": text}}})


@st.composite
def hostile_stream(draw: st.DrawFn) -> list[bytes]:
    whole = " | ".join(draw(st.lists(HOSTILE_TEXT, min_size=1, max_size=4))) + " | "
    cuts = sorted(draw(st.lists(st.integers(0, len(whole)), max_size=6)))
    deltas = [whole[a:b] for a, b in itertools.pairwise([0, *cuts, len(whole)])]
    events_ = text_item(deltas)
    for _ in range(draw(st.integers(1, 4))):
        events_.insert(draw(st.integers(0, len(events_))), draw(hostile_event()))
    wire = whole_stream(events_, [message(whole)])
    read_cuts = sorted(draw(st.lists(st.integers(0, len(wire)), max_size=8)))
    return [wire[a:b] for a, b in itertools.pairwise([0, *read_cuts, len(wire)])]


@settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "400")), deadline=None)
@given(hostile_stream())
def test_fuzz_hostile_events_never_pass_pii_in_clear(reads: list[bytes]) -> None:
    out, _ = relay(*reads)
    assert_no_clear_pii(out)
    assert out.endswith(b"\n\n") and sse.SSEParser().feed(out)


class _ExactOnly(StreamRelay):
    __slots__ = ()

    def _templated(self, blocks: bytes, at: int, stop: int, out: list[bytes], copied: int) -> int | None:
        return None


@settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "400")), deadline=None)
@given(hostile_stream())
def test_the_fast_path_equals_the_exact_path(reads: list[bytes]) -> None:
    fast, exact = StreamRelay(REDACTOR, None, RESPONSES), _ExactOnly(REDACTOR, None, RESPONSES)
    assert (
        b"".join(fast.feed(r) for r in reads) + fast.close() == b"".join(exact.feed(r) for r in reads) + exact.close()
    )


def test_deltas_of_one_shape_take_the_fast_path_and_their_numbers_are_noted() -> None:
    # Each delta has its own sequence number: the fast path reads it apart from the shape
    # (the exact path gives the same bytes: checked above), and notes it for the error event.
    seen: list[bytes] = []

    class Counting(StreamRelay):
        __slots__ = ()

        def _templated(self, blocks: bytes, at: int, stop: int, out: list[bytes], copied: int) -> int | None:
            spliced = super()._templated(blocks, at, stop, out, copied)
            if spliced is not None:
                seen.append(blocks[at:stop])
            return spliced

    words = [" lorem", " ipsum", " dolor", " sit", " amet", " consectetur", " adipiscing", " elit", " sed", " do"]
    r = Counting(REDACTOR, None, RESPONSES)
    out = r.feed(numbered(text_item(words)[:12]))  # added, part added, ten deltas: 0..11
    assert len(seen) >= 8
    tail = r.finish() + r.error_event(UpstreamStreamBroken())
    assert deltas_of(out + tail, 0) == "".join(words)
    assert [e["sequence_number"] for e in events(out)] == list(range(12))
    assert events(tail)[-1]["sequence_number"] == 12


def test_a_huge_event_is_the_upstreams_failure_not_held() -> None:
    r = StreamRelay(REDACTOR, None, RESPONSES, max_event_bytes=64 * 1024)
    r.feed(b"event: response.output_text.delta\ndata: " + b'{"delta":"' + b"x" * 1024)
    with pytest.raises(UpstreamError):
        r.feed(b"y" * 128 * 1024)


def test_a_large_event_is_redacted_whole() -> None:
    text = ("filler " * 100_000) + EMAIL
    out, _ = relay(numbered([e("response.output_item.done", output_index=0, item=message(text))]))
    assert_no_clear_pii(out)
    assert events(out)[0]["item"]["content"][0]["text"].endswith("j***e@example.com")


def test_many_output_items_are_bounded() -> None:
    r = StreamRelay(REDACTOR, None, RESPONSES)
    for i in range(2000):
        r.feed(ev(e("response.output_text.delta", item_id="m", output_index=i, content_index=0, delta=f"word{i} ")))
    assert len(r._streams) <= 256 and len(r._kept or {}) <= 256 and len(r._templates) <= 256


def test_a_long_text_past_the_kept_bound_has_its_copies_redacted_whole() -> None:
    from gateway import relay as relay_module

    where = {"item_id": "msg_0", "output_index": 0, "content_index": 0}
    piece = "word " * 1000
    count = relay_module.MAX_KEPT_CHARS // len(piece) + 2
    r = StreamRelay(REDACTOR, None, RESPONSES)
    for _ in range(count):
        r.feed(ev(e("response.output_text.delta", **where, delta=piece, logprobs=[])))
    done = r.feed(ev(e("response.output_text.done", **where, text="short " + EMAIL, logprobs=[])))
    assert events(done)[-1]["text"] == "short j***e@example.com"


# --- Requests ---------------------------------------------------------------------------


def texts(slots: list[TextSlot]) -> list[tuple[str, bool]]:
    return [(holder[key], json_text) for holder, key, json_text in slots]


def test_request_texts_are_instructions_input_and_the_text_of_items() -> None:
    payload = {
        "model": "m",
        "instructions": "You help jane@example.com",
        "input": [
            "a bare string",
            {"role": "user", "content": "plain content"},
            {
                "type": "message",
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "input text part"},
                    {"type": "input_image", "image_url": "https://x/jane@example.com.png"},
                ],
            },
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "earlier answer"}]},
            {"type": "function_call", "call_id": "c", "name": "f", "arguments": '{"to": "x"}'},
            {"type": "function_call_output", "call_id": "c", "output": "tool said hi"},
            {"type": "function_call_output", "call_id": "c", "output": [{"type": "input_text", "text": "tool part"}]},
            {"type": "reasoning", "summary": [{"type": "summary_text", "text": "thinking"}]},
            {"type": "item_reference", "id": "msg_9"},
        ],
    }
    assert texts(list(responses_request_texts(payload))) == [
        ("You help jane@example.com", False),
        ("a bare string", False),
        ("plain content", False),
        ("input text part", False),
        ("earlier answer", False),
        ('{"to": "x"}', True),
        ("tool said hi", False),
        ("tool part", False),
    ]
    assert texts(list(responses_request_texts({"model": "m", "input": "just a string"}))) == [("just a string", False)]


@pytest.mark.parametrize("value", [5, {"role": "user"}, None, True, 1.5])
def test_an_input_that_is_neither_a_string_nor_an_array_is_refused(value: object) -> None:
    with pytest.raises(BadRequest) as raised:
        check_responses_request({"model": "m", "input": value}, True)
    assert raised.value.status == 400 and raised.value.code == "invalid_input"


def test_input_may_be_absent() -> None:
    check_responses_request({"model": "m", "previous_response_id": "resp_1"}, True)
    check_responses_request({"model": "m", "input": []}, True)


def test_logprobs_are_refused_with_redaction_on_only() -> None:
    for payload in (
        {"model": "m", "input": "x", "top_logprobs": 2},
        {"model": "m", "input": "x", "include": ["message.output_text.logprobs"]},
    ):
        with pytest.raises(LogprobsUnavailable):
            check_responses_request(payload, True)
        check_responses_request(payload, False)


def test_a_json_reply_has_its_output_texts_redacted_and_stays_a_response() -> None:
    reply = {
        "id": "resp_1",
        "object": "response",
        "output": [
            {**message("Reach jane.doe@example.com"), "content": [part("Reach jane.doe@example.com")]},
            call('{"card": "4242 4242 4242 4242"}'),
        ],
        "usage": USAGE,
    }
    redact_reply(REDACTOR, reply, RESPONSES.reply_spec, None)
    assert reply["output"][0]["content"][0]["text"] == "Reach j***e@example.com"
    assert json.loads(reply["output"][1]["arguments"]) == {"card": "CC_MASKED_LAST4_4242"}


# --- Embeddings -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value", ["one", ["a", "b"], [1, 2, 3], [[1, 2], [3]], ["mixed", 7], []], ids=lambda v: json.dumps(v)
)
def test_embeddings_take_strings_and_token_arrays(value: object) -> None:
    check_embeddings_request({"model": "m", "input": value}, True)


@pytest.mark.parametrize("value", [None, 5, {"a": "b"}, [{"text": "x"}], [[1, "a"]], [True], [1.5]])
def test_embeddings_refuse_a_missing_or_odd_input(value: object) -> None:
    payload = {"model": "m"} if value is None else {"model": "m", "input": value}
    with pytest.raises(BadRequest) as raised:
        check_embeddings_request(payload, True)
    assert raised.value.code == ("missing_input" if value is None else "invalid_input")


def test_embeddings_texts_are_the_input_strings() -> None:
    assert texts(list(embeddings_request_texts({"input": "one"}))) == [("one", False)]
    assert texts(list(embeddings_request_texts({"input": ["a", 5, "b", [1]]}))) == [("a", False), ("b", False)]
    assert embeddings_usage({"usage": {"prompt_tokens": 7, "total_tokens": 7}}) is not None


def test_an_embeddings_vector_passes_untouched_whatever_it_looks_like() -> None:
    # A base64 vector may hold a run an IBAN or a card could be made of: never "redacted".
    vector = "GB82WEST12345698765432" + "4242424242424242" + "AAAA"
    reply = {"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": vector}], "note": EMAIL}
    redact_reply(REDACTOR, reply, EMBEDDINGS.reply_spec, None)
    assert reply["data"][0]["embedding"] == vector and reply["note"] == "j***e@example.com"
