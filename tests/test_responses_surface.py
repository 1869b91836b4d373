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
from tests.test_relay_hostile import FastPathCounting

from .stream_equivalence import assert_same_but_for_splits
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


# The tool calls whose text streams: the delta's kind → the item's type, the field its .done
# event and the item carry the whole text in, and whether it is JSON (openai-python's types).
TOOLS = {
    "function_call_arguments": ("function_call", "arguments", True),
    "mcp_call_arguments": ("mcp_call", "arguments", True),
    "custom_tool_call_input": ("custom_tool_call", "input", False),
    "code_interpreter_call_code": ("code_interpreter_call", "code", False),
}
TOOL_FIELDS = {item_type: field for item_type, field, _ in TOOLS.values()}


def tool(kind: str, text: str, status: str = "completed") -> dict[str, Any]:
    if kind == "function_call_arguments":
        return call(text, status)
    item_type, field, _ = TOOLS[kind]
    extra: dict[str, Any] = {
        "mcp_call": {"server_label": "s", "name": "send", "output": None, "error": None},
        "custom_tool_call": {"call_id": "c", "name": "shell"},
        "code_interpreter_call": {"container_id": "cntr_1", "outputs": None},
    }[item_type]
    return {"id": f"{item_type}_1", "type": item_type, "status": status, field: text, **extra}


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


def call_item(deltas: list[str], index: int, kind: str = "function_call_arguments") -> list[Event]:
    """A tool call item's events: added, its text's deltas, its .done, the item done."""
    text = "".join(deltas)
    where = {"item_id": tool(kind, "")["id"], "output_index": index}
    return [
        e("response.output_item.added", output_index=index, item=tool(kind, "", "in_progress")),
        *[e(f"response.{kind}.delta", **where, delta=d, obfuscation="p") for d in deltas],
        e(f"response.{kind}.done", **where, **{TOOLS[kind][1]: text}),
        e("response.output_item.done", output_index=index, item=tool(kind, text)),
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
            if kind in ("response.output_text.done", "response.refusal.done", "response.reasoning_summary_text.done"):
                out.append(e.get("text", e.get("refusal")))
            elif kind.endswith(".done") and kind[len("response.") : -len(".done")] in TOOLS:
                out.append(e[TOOLS[kind[len("response.") : -len(".done")]][1]])
            elif kind == "response.content_part.done":
                out.append(e["part"].get("text", e["part"].get("refusal")))
            elif kind == "response.output_item.done":
                out.append(_item_text(e["item"]))
        if kind in ("response.completed", "response.incomplete", "response.failed"):
            out.append(_item_text(e["response"]["output"][index]))
    return out


def _item_text(item: dict[str, Any]) -> str:
    if item["type"] in TOOL_FIELDS:
        return str(item[TOOL_FIELDS[item["type"]]])
    if item["type"] == "reasoning":
        return str(item["summary"][0]["text"])
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
    assert numbers == list(range(len(numbers)))  # the flushed delta takes a number of its own


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


@pytest.mark.parametrize(
    ("kind", "pieces"),
    [
        ("mcp_call_arguments", ['{"to": "jane.doe@exa', 'mple.com", "n": 3}']),
        ("custom_tool_call_input", ["send to jane.doe@exa", "mple.com and call +1 415 ", "555 2671"]),
        ("code_interpreter_call_code", ["x = 'jane.doe@exa", "mple.com'; card = '4242 4242 ", "4242 4242'"]),
    ],
)
def test_other_tool_texts_are_redacted_across_deltas_and_in_every_copy(kind: str, pieces: list[str]) -> None:
    # Review of issue 18, D1: these streamed texts were redacted event by event (split PII passed).
    text = "".join(pieces)
    out, _ = relay(
        whole_stream(text_item(["Calling."]) + call_item(pieces, 1, kind), [message("Calling."), tool(kind, text)])
    )
    expected = REDACTOR.redact(text, json_text=TOOLS[kind][2])
    assert deltas_of(out, 1, kind) == expected != text
    assert copies_of(out, 1) == [expected] * 3  # the .done, output_item.done, completed
    assert_no_clear_pii(out)
    if TOOLS[kind][2]:
        assert json.loads(expected) == {"to": "j***e@example.com", "n": 3}


def test_a_tool_texts_held_part_goes_out_before_its_done_as_a_delta_of_its_kind() -> None:
    kind = "custom_tool_call_input"
    out, _ = relay(whole_stream(call_item(["mail jane.doe@exa", "mple.com"], 0, kind), [tool(kind, "x")]))
    kinds = [event["type"] for event in events(out)]
    flushed = [event for event in events(out) if event["type"] == f"response.{kind}.delta"][-1]
    assert (flushed["delta"], flushed["item_id"], flushed["output_index"]) == (
        "j***e@example.com",
        "custom_tool_call_1",
        0,
    )
    assert kinds.index(f"response.{kind}.done") == len(kinds) - 3  # the held delta went out just before


def test_the_audio_transcript_is_one_stream_and_the_audio_passes_as_it_came() -> None:
    # The transcript's deltas carry no output index: the response's one transcript. The audio
    # deltas are base64, decoded one by one: never held back, never changed.
    audio = [e("response.audio.delta", delta="UklGRiQAAABXQVZFZm10IBAAAAABAAEAQB8AAEAfAAABAAgAZGF0YQAAAAA=")]
    transcript = [e("response.audio.transcript.delta", delta=d) for d in ("call me at jane.doe@exa", "mple.com ok")]
    wire = whole_stream(
        [*audio, *transcript, *audio, e("response.audio.transcript.done"), e("response.audio.done")], []
    )
    out, _ = relay(wire)
    said = "".join(event["delta"] for event in events(out) if event["type"] == "response.audio.transcript.delta")
    assert said == "call me at j***e@example.com ok"
    assert [event for event in events(out) if event["type"] == "response.audio.delta"] == [
        event for event in events(wire) if event["type"] == "response.audio.delta"
    ]
    kinds = [event["type"] for event in events(out)]
    assert kinds.index("response.audio.transcript.done") > max(
        i for i, k in enumerate(kinds) if k == "response.audio.transcript.delta"
    )


@pytest.mark.parametrize(
    "where",
    [{"output_index": 2}, {"output_index": 2, "command_index": 1}, {}],
    ids=["output-index", "two-indices", "no-index"],
)
def test_an_unknown_delta_event_is_a_stream_of_its_own(where: dict[str, Any]) -> None:
    # A delta event the surface does not know yet is keyed by its type and integer *_index
    # fields: split PII in it is redacted; its held text goes out before its .done.
    kind = "response.future_tool_call_text"
    items = [e(f"{kind}.delta", item_id="ft_1", **where, delta=d) for d in ("to jane.doe@exa", "mple.com")]
    items.append(e(f"{kind}.done", item_id="ft_1", **where, text="to jane.doe@example.com"))
    out, _ = relay(whole_stream(items, []))
    deltas = [event for event in events(out) if event["type"] == f"{kind}.delta"]
    assert "".join(d["delta"] for d in deltas) == "to j***e@example.com"
    assert {k: deltas[-1][k] for k in ("item_id", *where)} == {"item_id": "ft_1", **where}  # the held part, keyed alike
    assert events(out)[-2] == {
        **e(f"{kind}.done", item_id="ft_1", **where, text="to j***e@example.com"),
        "sequence_number": 5,  # the upstream's 4, after the held part the gateway sent as 4
    }
    assert_no_clear_pii(out)


def test_an_unknown_delta_object_has_each_field_streamed() -> None:
    # OpenAI's shell output: {"delta": {"stdout": ..., "stderr": ...}} per (output, command).
    kind = "response.shell_call_output_content"
    where = {"item_id": "sh_1", "output_index": 0, "command_index": 0}
    pieces = [
        {"stdout": "mail jane.doe@exa"},
        {"stdout": "mple.com\n", "stderr": "card 4242 4242 "},
        {"stderr": "4242 4242"},
    ]
    out, _ = relay(
        whole_stream([*[e(f"{kind}.delta", **where, delta=p) for p in pieces], e(f"{kind}.done", **where)], [])
    )
    deltas = [event["delta"] for event in events(out) if event["type"] == f"{kind}.delta"]
    assert "".join(d.get("stdout", "") for d in deltas) == "mail j***e@example.com\n"
    assert "".join(d.get("stderr", "") for d in deltas) == "card CC_MASKED_LAST4_4242"
    assert_no_clear_pii(out)


def test_an_id_filled_with_pii_stays_masked_in_the_delta_that_carries_held_text() -> None:
    # The held text's event copies its stream's first delta's fields: as redacted, not as sent.
    where = {"item_id": EMAIL, "output_index": 0, "content_index": 0}
    items = [e("response.output_text.delta", **where, delta=d, logprobs=[]) for d in ("hi ", "jane")]
    out, _ = relay(numbered(items))
    assert_no_clear_pii(out)
    assert [event["item_id"] for event in events(out)] == ["j***e@example.com"] * 3


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


def assembled(wire: bytes) -> list[dict[str, Any]]:
    """The output as the openai SDK's stream helper assembles it (ResponseStreamState): the
    response.created output, each output_item.added item and content_part.added or
    reasoning_summary_part.added part appended as it came, each delta appended to its text."""
    output: list[dict[str, Any]] = []
    for event in events(wire):
        kind, at = event["type"], event.get("output_index")
        if kind == "response.created":
            output = list(event["response"]["output"])
        elif kind == "response.output_item.added":
            output.append(event["item"])
        elif kind == "response.content_part.added":
            output[at]["content"].append(event["part"])
        elif kind == "response.reasoning_summary_part.added":
            output[at]["summary"].append(event["part"])
        elif kind == "response.output_text.delta":
            output[at]["content"][event["content_index"]]["text"] += event["delta"]
        elif kind == "response.reasoning_summary_text.delta":
            output[at]["summary"][event["summary_index"]]["text"] += event["delta"]
        elif kind == "response.function_call_arguments.delta":
            output[at]["arguments"] += event["delta"]
    return output


CARD_START, CARD_END = "Card 4242 4242 4242", " 4242 ok"  # neither is PII alone


def _card_message(items: list[Event]) -> tuple[list[Event], list[dict[str, Any]], Any, str]:
    """A case whose message text is the card split in two: its events, the output they make,
    how to read the text the SDK assembles, and the redaction of the whole."""
    return (
        items,
        [message(CARD_START + CARD_END)],
        lambda out: assembled(out)[0]["content"][0]["text"],
        redact(CARD_START + CARD_END),
    )


def _opened_by_part() -> tuple[list[Event], list[dict[str, Any]], Any, str]:
    where = {"item_id": "msg_0", "output_index": 0, "content_index": 0}
    items: list[Event] = [
        e("response.output_item.added", output_index=0, item=message(None, "in_progress")),
        e("response.content_part.added", **where, part=part(CARD_START)),
        e("response.output_text.delta", **where, delta=CARD_END, logprobs=[]),
        e("response.output_text.done", **where, text=CARD_START + CARD_END, logprobs=[]),
    ]
    return _card_message(items)


def _opened_by_item() -> tuple[list[Event], list[dict[str, Any]], Any, str]:
    where = {"item_id": "msg_0", "output_index": 0, "content_index": 0}
    items: list[Event] = [
        e("response.output_item.added", output_index=0, item=message(CARD_START, "in_progress")),
        e("response.output_text.delta", **where, delta=CARD_END, logprobs=[]),
        e("response.output_text.done", **where, text=CARD_START + CARD_END, logprobs=[]),
    ]
    return _card_message(items)


def _opened_by_arguments() -> tuple[list[Event], list[dict[str, Any]], Any, str]:
    where = {"item_id": "fc_1", "output_index": 0}
    start, end = '{"card":"4242 4242 4242', ' 4242"}'
    items: list[Event] = [
        e("response.output_item.added", output_index=0, item=call(start, "in_progress")),
        e("response.function_call_arguments.delta", **where, delta=end),
        e("response.function_call_arguments.done", **where, arguments=start + end),
    ]
    whole = redact(start + end, json_text=True)
    return items, [call(start + end)], lambda out: assembled(out)[0]["arguments"], whole


def _opened_by_summary_part() -> tuple[list[Event], list[dict[str, Any]], Any, str]:
    where = {"item_id": "rs_1", "output_index": 0, "summary_index": 0}
    item = {"id": "rs_1", "type": "reasoning", "summary": []}
    summary = {"type": "summary_text", "text": CARD_START}
    items: list[Event] = [
        e("response.output_item.added", output_index=0, item=item),
        e("response.reasoning_summary_part.added", **where, part=summary),
        e("response.reasoning_summary_text.delta", **where, delta=CARD_END),
        e("response.reasoning_summary_text.done", **where, text=CARD_START + CARD_END),
    ]
    done = {**item, "summary": [{**summary, "text": CARD_START + CARD_END}]}
    return items, [done], lambda out: assembled(out)[0]["summary"][0]["text"], redact(CARD_START + CARD_END)


@pytest.mark.parametrize("opening", [_opened_by_part, _opened_by_item, _opened_by_arguments, _opened_by_summary_part])
def test_a_texts_opening_in_its_added_event_is_the_start_of_its_stream(opening: Any) -> None:
    # OpenAI announces a part or an item with its text empty; an upstream that fills it has
    # the SDK append the deltas to it: "Card 4242 4242 4242" + " 4242 ok" assembled the card
    # in clear when the opening was redacted apart from the deltas (and every copy lacked it).
    items, output, text_of, whole = opening()
    out, _ = relay(whole_stream(items, output))
    assert "4242 4242 4242 4242" not in text_of(out)
    assert text_of(out) == whole
    assert set(copies_of(out, 0)) == {whole}


@pytest.mark.parametrize("by", ["part", "item"])
def test_held_text_of_an_opening_without_deltas_goes_out_under_the_openings_item_id(by: str) -> None:
    # The opening's text ends where PII may start and no delta follows: the held part goes out
    # as a delta before the .done, under the item id the opening named (it went out as "").
    start = "Mail me at jane.doe@exa"
    if by == "part":
        where = {"item_id": "msg_7", "output_index": 0, "content_index": 0}
        items: list[Event] = [
            e("response.output_item.added", output_index=0, item={**message(None, "in_progress"), "id": "msg_7"}),
            e("response.content_part.added", **where, part=part(start)),
            e("response.output_text.done", **where, text=start, logprobs=[]),
        ]
        output, kind = [message(start)], "response.output_text.delta"
    else:
        where = {"item_id": "fc_7", "output_index": 0}
        items = [
            e(
                "response.output_item.added",
                output_index=0,
                item={**call('{"to": "' + start, "in_progress"), "id": "fc_7"},
            ),
            e("response.function_call_arguments.done", **where, arguments='{"to": "' + start),
        ]
        output, kind = [call('{"to": "' + start)], "response.function_call_arguments.delta"
    out, _ = relay(whole_stream(items, output))
    [flushed] = [event for event in events(out) if event["type"] == kind]
    assert flushed["item_id"] == where["item_id"] and flushed["output_index"] == 0


def test_the_output_of_response_created_opens_its_texts() -> None:
    where = {"item_id": "msg_0", "output_index": 0, "content_index": 0}
    start = {**RESPONSE, "output": [message(CARD_START, "in_progress")]}
    items: list[Event] = [
        e("response.created", response=start),
        e("response.output_text.delta", **where, delta=CARD_END, logprobs=[]),
        e("response.completed", response={**RESPONSE, "output": [message(CARD_START + CARD_END)]}),
    ]
    out, _ = relay(numbered(items))
    assert assembled(out)[0]["content"][0]["text"] == redact(CARD_START + CARD_END)
    assert copies_of(out, 0) == [redact(CARD_START + CARD_END)]


def test_an_empty_opening_then_no_delta_has_its_copies_redacted_whole() -> None:
    # An upstream that announces an item empty and sends it whole in its copies, no delta.
    text = "Reach jane.doe@example.com"
    where = {"item_id": "msg_0", "output_index": 0, "content_index": 0}
    items: list[Event] = [
        e("response.output_item.added", output_index=0, item=message(None, "in_progress")),
        e("response.content_part.added", **where, part=part("")),
        e("response.output_text.done", **where, text=text, logprobs=[]),
        e("response.output_item.done", output_index=0, item=message(text)),
    ]
    out, _ = relay(whole_stream(items, [message(text)]))
    assert copies_of(out, 0) == [redact(text)] * 3


def test_an_opening_text_without_its_index_ends_the_stream() -> None:
    # The SDK appends an added item or part where it comes, whatever its index: one that
    # carries text with no index to key its stream by could be joined to any delta.
    part_added = e("response.content_part.added", item_id="msg_0", output_index=0, part=part(CARD_START))
    out, r = relay(numbered([part_added, *text_item([CARD_END])[2:3]]))
    assert events(out)[-1]["type"] == "error"
    assert isinstance(r.failure, UpstreamError)
    empty = e("response.output_item.added", item=message(None, "in_progress"))  # no text: passes
    out, r = relay(numbered([empty]))
    assert r.failure is None and events(out)[0]["item"] == empty["item"]


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
        "sequence_number": 4,  # after the held part, numbered 3
    }


def test_redaction_off_the_error_event_is_numbered_after_the_last_event_relayed() -> None:
    # Redaction off, events are relayed unparsed: the error event that ends a broken stream
    # still takes the number after the last one the client saw (it took 2 after 0..5).
    r = StreamRelay(None, None, RESPONSES)
    out = r.feed(numbered(text_item(["Hello", " there", " again"])[:5]))  # added, part added, 3 deltas
    tail = r.error_event(UpstreamStreamBroken())
    assert [e["sequence_number"] for e in events(out + tail)] == list(range(6))


def test_the_upstreams_own_error_event_is_relayed_after_the_held_text() -> None:
    error = e("error", code="server_error", message="The server had an error", param=None)
    late = e("response.output_text.delta", output_index=0, content_index=0, item_id="msg_1", delta="late")
    out, r = relay(numbered([*text_item(["mail jane.doe@exa"])[:3], error, late]))
    kinds = [event["type"] for event in events(out)]
    assert kinds[-2:] == ["response.output_text.delta", "error"]  # nothing after it
    assert deltas_of(out, 0) == redact("mail jane.doe@exa")
    assert r.done  # one of the stream's four terminal events (with the three that carry the response)


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


def test_redaction_off_relays_nothing_after_the_terminal_event() -> None:
    # Review of issue 18, D3: with redaction off too, a [DONE] (or anything) after
    # response.completed is left out, in the same read as the end or in a later one, and a
    # last event without its blank line is relayed as it came.
    wire = whole_stream(text_item(["Hi ", EMAIL]), [message("Hi " + EMAIL)])
    for after in (b"data: [DONE]\n\n", ev(e("response.output_text.delta", output_index=0, delta="more"))):
        for cut in (len(wire) - 7, len(wire), len(wire) + 3):
            both = wire + after
            out, r = relay(both[:cut], both[cut:], redactor=None)
            assert out == wire and r.done and r.usage is not None
    out, r = relay(wire[:-2], redactor=None)  # the upstream ends without the last blank line
    assert out == wire and r.done


# --- Any split, any interleaving --------------------------------------------------------

ARG_VALUES = st.one_of(PII_VALUES, st.sampled_from(["order 123456789012", "v3.11.7", "ok", "", 'say "hi"']))


@st.composite
def interleaved(draw: st.DrawFn) -> tuple[list[str], list[str], list[bytes]]:
    """Two output items — two messages, or a message and a tool call (function, MCP, custom
    tool, code interpreter) — each text split
    anywhere into deltas, their events interleaved in any order (each item's own in order),
    numbered as sent, the stream cut into reads anywhere. (texts, their kinds, reads)"""
    kinds = ["output_text", draw(st.sampled_from(["output_text", *TOOLS]))]
    texts: list[str] = []
    splits: list[list[str]] = []
    for kind in kinds:
        if kind in TOOLS and TOOLS[kind][2]:  # JSON arguments
            values = draw(st.lists(ARG_VALUES, min_size=1, max_size=4))
            text = json.dumps({f"k{i}": v for i, v in enumerate(values)})
        else:
            text = draw(replies)
        cuts = sorted(draw(st.lists(st.integers(0, len(text)), max_size=8)))
        texts.append(text)
        splits.append([text[a:b] for a, b in itertools.pairwise([0, *cuts, len(text)])])
    calls = kinds[1] in TOOLS
    first = text_item(splits[0], 0)
    second = call_item(splits[1], 1, kinds[1]) if calls else text_item(splits[1], 1)
    order = draw(st.permutations([0] * len(first) + [1] * len(second)))
    queues = [iter(first), iter(second)]
    output = [message(texts[0]), tool(kinds[1], texts[1]) if calls else message(texts[1])]
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
    # Numbered 0, 1, 2... as OpenAI numbers its events: the deltas that carry held text take
    # numbers of their own, and every event after them moves up (the fast path's included).
    numbers = [event["sequence_number"] for event in events(out)]
    assert numbers == list(range(len(numbers)))
    for index, (text, kind) in enumerate(zip(texts, kinds, strict=True)):
        whole = REDACTOR.redact(text, json_text=kind in TOOLS and TOOLS[kind][2])
        assert deltas_of(out, index, kind) == whole
        # Every later copy: the .done, the part's (messages), the item's, the final response's.
        assert copies_of(out, index) == [whole] * (3 if kind in TOOLS else 4)
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
    kind = draw(st.integers(0, 15))
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
    if kind == 11:  # another tool's text, or an unknown delta (keyed alike, or by odd indices)
        other = draw(
            st.sampled_from(["response.custom_tool_call_input.delta", "response.x_y.delta", "response.X.delta"])
        )
        index = draw(st.sampled_from([0, 1, "0", None]))
        return ev({"type": other, "output_index": 0, "command_index": index, "item_id": text, "delta": text})
    if kind == 12:  # an unknown delta object
        return ev(
            {
                "type": "response.shell_call_output_content.delta",
                "output_index": 0,
                "delta": {"stdout": text, "Odd": [text]},
            }
        )
    if kind == 13:  # the audio's transcript, and its end
        return ev(
            {"type": draw(st.sampled_from(["response.audio.transcript.delta", "response.x_y.done"])), "delta": text}
        )
    if kind == 14:  # an item or a part announced with text (OpenAI's are empty)
        if draw(st.booleans()):
            return ev({"type": "response.content_part.added", **where, "part": part(text)})
        return ev({"type": "response.output_item.added", "output_index": 0, "item": message(text, "in_progress")})
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

    def _templated(self, blocks: bytes, at: int, out: list[bytes], copied: int) -> tuple[int, int] | None:
        return None


@settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "400")), deadline=None)
@given(hostile_stream())
def test_the_fast_path_equals_the_exact_path(reads: list[bytes]) -> None:
    fast, exact = StreamRelay(REDACTOR, None, RESPONSES), _ExactOnly(REDACTOR, None, RESPONSES)
    assert_same_but_for_splits([*map(fast.feed, reads), fast.close()], [*map(exact.feed, reads), exact.close()])


def test_deltas_of_one_shape_take_the_fast_path_and_their_numbers_are_noted() -> None:
    # Each delta has its own sequence number: the fast path reads it apart from the shape
    # (the exact path gives the same events: checked above), and notes it for the error event.
    words = [" lorem", " ipsum", " dolor", " sit", " amet", " consectetur", " adipiscing", " elit", " sed", " do"]
    r = FastPathCounting(REDACTOR, None, RESPONSES)
    out = r.feed(numbered(text_item(words)[:12]))  # added, part added, ten deltas: 0..11
    assert r.fast_events >= 8
    tail = r.finish() + r.error_event(UpstreamStreamBroken())
    assert deltas_of(out + tail, 0) == "".join(words)
    assert [e["sequence_number"] for e in events(out)] == list(range(12))
    numbers = [e["sequence_number"] for e in events(tail)]  # " do" may be held: its delta, then the error
    assert numbers == list(range(12, 12 + len(numbers)))


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
        ("f", False),  # a function's name: a string like any other (it changes only if it is PII)
        ('{"to": "x"}', True),
        ("tool said hi", False),
        ("tool part", False),
        ("thinking", False),  # a reasoning item's summary: the model's text, sent back
    ]
    assert texts(list(responses_request_texts({"model": "m", "input": "just a string"}))) == [("just a string", False)]


# Review of issue 18, D2: texts in other items, in a prompt's variables, in instructions
# that are items. Each body holds EMAIL (or CARD) somewhere the client wrote it.
OTHER_TEXTS: dict[str, dict[str, Any]] = {
    "custom_tool_call_output": {
        "input": [{"type": "custom_tool_call_output", "call_id": "c", "output": f"mail {EMAIL}"}]
    },
    "custom_tool_call_output_parts": {
        "input": [
            {"type": "custom_tool_call_output", "call_id": "c", "output": [{"type": "input_text", "text": EMAIL}]}
        ]
    },
    "custom_tool_call": {"input": [{"type": "custom_tool_call", "call_id": "c", "name": "n", "input": EMAIL}]},
    "local_shell_call_output": {"input": [{"type": "local_shell_call_output", "id": "x", "output": EMAIL}]},
    "local_shell_call": {
        "input": [
            {
                "type": "local_shell_call",
                "id": "x",
                "call_id": "c",
                "action": {"type": "exec", "command": ["mail", EMAIL]},
            }
        ]
    },
    "mcp_call": {
        "input": [{"type": "mcp_call", "id": "x", "server_label": "s", "name": "n", "arguments": "{}", "output": EMAIL}]
    },
    "mcp_call_arguments": {
        "input": [
            {"type": "mcp_call", "id": "x", "server_label": "s", "name": "n", "arguments": f'{{"to": "{EMAIL}"}}'}
        ]
    },
    "shell_call_output": {
        "input": [
            {
                "type": "shell_call_output",
                "call_id": "c",
                "output": [
                    {
                        "stdout": f"sent to {EMAIL}",
                        "stderr": f"card {CARD}",
                        "outcome": {"type": "exit", "exit_code": 0},
                    }
                ],
            }
        ]
    },
    "apply_patch_call": {
        "input": [
            {
                "type": "apply_patch_call",
                "call_id": "c",
                "status": "completed",
                "operation": {"type": "update_file", "path": "a.txt", "diff": f"@@ -1 +1 @@\n-x\n+mail {EMAIL}\n"},
            }
        ]
    },
    "computer_call_typing": {
        "input": [{"type": "computer_call", "id": "x", "call_id": "c", "action": {"type": "type", "text": EMAIL}}]
    },
    "a_future_item": {"input": [{"type": "future_item", "id": "x", "payload": {"notes": [EMAIL]}}]},
    "text_part": {"input": [{"role": "user", "content": [{"type": "text", "text": EMAIL}]}]},
    "unknown_part": {"input": [{"role": "user", "content": [{"type": "input_future", "body": EMAIL}]}]},
    "file_name": {
        "input": [{"role": "user", "content": [{"type": "input_file", "filename": f"{EMAIL}.pdf", "file_id": "f"}]}]
    },
    "nested_input_arrays": {"input": [[{"role": "user", "content": EMAIL}], [EMAIL]]},
    "prompt_variables": {"prompt": {"id": "pmpt_1", "variables": {"customer": EMAIL}}},
    "prompt_variables_part": {
        "prompt": {"id": "pmpt_1", "variables": {"customer": {"type": "input_text", "text": EMAIL}}}
    },
    # A reasoning item sent back: its summary and text are read as the model's own text (an
    # OpenAI-compatible server puts them in the prompt); its encrypted content passes (below).
    "reasoning_summary": {
        "input": [
            {
                "type": "reasoning",
                "id": "rs_1",
                "summary": [{"type": "summary_text", "text": f"The user is {EMAIL}"}],
                "encrypted_content": "gAAAA",
            }
        ]
    },
    "reasoning_text_parts": {
        "input": [
            {"type": "reasoning", "id": "rs_1", "summary": [], "content": [{"type": "reasoning_text", "text": EMAIL}]}
        ]
    },
    "reasoning_content_string": {"input": [{"type": "reasoning", "id": "rs_1", "summary": [], "content": EMAIL}]},
    "instructions_items": {"instructions": [{"role": "system", "content": EMAIL}], "input": "hi"},
    "instructions_parts": {
        "instructions": [{"type": "message", "role": "developer", "content": [{"type": "input_text", "text": EMAIL}]}]
    },
}


def redacted_request(payload: dict[str, Any]) -> dict[str, Any]:
    """The body as the gateway sends it on: each text slot redacted (JSON texts as JSON)."""
    body = json.loads(json.dumps(payload))
    for holder, key, json_text in list(responses_request_texts(body)):
        holder[key] = redact(holder[key], json_text=json_text)
    return dict(body)


@pytest.mark.parametrize("name", list(OTHER_TEXTS))
def test_every_text_the_client_sends_is_a_request_text(name: str) -> None:
    sent = json.dumps(redacted_request({"model": "m", **OTHER_TEXTS[name]}))
    assert EMAIL not in sent and CARD not in sent and "j***e@example.com" in sent


def test_ids_enums_and_binary_data_are_no_request_texts() -> None:
    # A base64 image or file may hold a run an IBAN or a card could be made of, an id a run of
    # digits: never "redacted" (which would only break them); reasoning passes with its
    # encrypted content, a generated image as it came.
    blob = "GB82WEST12345698765432" + "4242424242424242" + "AAAA"
    payload = {
        "model": "m",
        "input": [
            {
                "role": "user",
                "content": [{"type": "input_image", "image_url": "data:image/png;base64," + blob, "detail": "auto"}],
            },
            {
                "role": "user",
                "content": [{"type": "input_file", "file_data": blob, "file_id": "file-4242424242424242"}],
            },
            {"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": blob, "format": "wav"}}]},
            {
                "type": "computer_call_output",
                "call_id": "call_4242424242424242",
                "output": {"type": "computer_screenshot", "image_url": blob},
            },
            {
                "type": "reasoning",
                "id": "rs_1",
                "encrypted_content": blob,
                "summary": [{"type": "summary_text", "text": "x"}],
            },
            {"type": "image_generation_call", "id": "ig_1", "result": blob, "status": "completed"},
            {"type": "compaction", "id": "cmp_1", "encrypted_content": blob},
            {"type": "mcp_approval_response", "approval_request_id": "mcpr_4242424242424242", "approve": True},
        ],
    }
    assert redacted_request(payload) == payload


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


@pytest.mark.parametrize(
    "embedding",
    [[EMAIL, CARD], EMAIL, f"call {CARD}", [0.1, EMAIL], {"v": EMAIL}],
    ids=["strings", "an-address", "a-card", "mixed", "an-object"],
)
def test_an_embedding_that_is_no_vector_is_redacted_like_any_text(embedding: object) -> None:
    # Review of issue 18, D7: only numbers and base64 pass untouched.
    reply = {
        "object": "list",
        "data": [{"index": 0, "embedding": embedding}, {"index": 1, "embedding": [0.5, -1, 2e-3]}],
    }
    redact_reply(REDACTOR, reply, EMBEDDINGS.reply_spec, None)
    text = json.dumps(reply)
    assert EMAIL not in text and CARD not in text and ("j***e@example.com" in text or "CC_MASKED" in text)
    assert reply["data"][1]["embedding"] == [0.5, -1, 2e-3]  # type: ignore[index]


@pytest.mark.parametrize("stream", [True, False])
def test_pii_in_an_object_key_is_redacted(stream: bool) -> None:
    response = {"id": "r", "output": [], "metadata": {EMAIL: "v"}}
    if stream:
        out, _ = relay(numbered([e("response.completed", response=response)]))
        assert EMAIL.encode() not in out
    else:
        redact_reply(REDACTOR, response, RESPONSES.reply_spec, None)
        assert EMAIL not in json.dumps(response)


# Past the bound, streams that hold nothing back are let go: the new one is a stream too.
def test_past_the_stream_bound_split_pii_is_still_redacted() -> None:
    from gateway.relay import MAX_STREAMS

    opening = [
        e("response.output_text.delta", item_id="m", output_index=i, content_index=0, delta="ok ")
        for i in range(MAX_STREAMS)
    ]
    where = {"item_id": "m", "output_index": MAX_STREAMS, "content_index": 0}
    split = [e("response.output_text.delta", **where, delta=d) for d in ("mail jane.doe@exa", "mple.com")]
    out, _ = relay(numbered(opening + split))
    assert EMAIL not in deltas_of(out, MAX_STREAMS)


def test_a_done_marker_on_this_route_ends_the_stream_with_held_text_before_it() -> None:
    """No [DONE] on this route, but the openai SDKs stop reading at one on any stream: an
    upstream that sends one mid-stream got its [DONE] relayed with the held text after it, and
    the SDK's text ended at 'Mail ' (the address, held, never read)."""
    items = text_item(["Mail jane.doe@exa", "mple.com ok"])
    stream = numbered(items[:3]) + b"data: [DONE]\n\n" + numbered(items[3:])
    out, _ = relay(stream)
    before, done, after = out.partition(b"data: [DONE]\n\n")
    assert done and not after  # nothing after it: the client stops there
    texts = [e["delta"] for e in events(before) if e["type"] == "response.output_text.delta"]
    assert "".join(texts) == redact("Mail jane.doe@exa")  # held text out before the marker
