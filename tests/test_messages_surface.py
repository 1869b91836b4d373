"""The relay on Anthropic's Messages event stream (SPEC §11), through the same pipeline."""

from __future__ import annotations

import itertools
import json
import os
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import sse
from gateway.errors import UpstreamStreamBroken
from gateway.redact import ALL_KINDS, build_redactor
from gateway.relay import StreamRelay
from gateway.surfaces import MESSAGES

from .test_redact import split_reply

REDACTOR = build_redactor(ALL_KINDS)
assert REDACTOR is not None


def ev(name: str, data: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: ".encode() + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


START = ev(
    "message_start",
    {
        "type": "message_start",
        "message": {
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "model": "claude-sonnet-4-5",
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {
                "input_tokens": 21,
                "cache_read_input_tokens": 4,
                "cache_creation_input_tokens": 2,
                "output_tokens": 1,
            },
        },
    },
)


def block_start(index: int, block: dict[str, Any]) -> bytes:
    return ev("content_block_start", {"type": "content_block_start", "index": index, "content_block": block})


def text_delta(text: str, index: int = 0) -> bytes:
    return ev(
        "content_block_delta",
        {"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": text}},
    )


def json_delta(text: str, index: int) -> bytes:
    return ev(
        "content_block_delta",
        {"type": "content_block_delta", "index": index, "delta": {"type": "input_json_delta", "partial_json": text}},
    )


def block_stop(index: int) -> bytes:
    return ev("content_block_stop", {"type": "content_block_stop", "index": index})


END = ev(
    "message_delta",
    {
        "type": "message_delta",
        "delta": {"stop_reason": "end_turn", "stop_sequence": None},
        "usage": {"output_tokens": 15},
    },
) + ev("message_stop", {"type": "message_stop"})
PING = ev("ping", {"type": "ping"})


def relay(*reads: bytes) -> tuple[bytes, StreamRelay]:
    r = StreamRelay(REDACTOR, None, MESSAGES)
    return b"".join(r.feed(x) for x in reads) + r.close(), r


def events(wire: bytes) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for event in sse.SSEParser().feed(wire):
        name = next(line[7:].decode() for line in event.raw.split(b"\n") if line.startswith(b"event: "))
        assert event.data is not None
        out.append((name, json.loads(event.data)))
    return out


def block_text(wire: bytes, index: int, field: str = "text") -> str:
    return "".join(
        data["delta"].get(field, "")
        for name, data in events(wire)
        if name == "content_block_delta" and data["index"] == index
    )


def test_unchanged_events_pass_byte_for_byte_with_their_event_lines() -> None:
    wire = (
        START + block_start(0, {"type": "text", "text": ""}) + PING + text_delta("Hello there. ") + block_stop(0) + END
    )
    out, r = relay(wire)
    assert out == wire and r.done
    assert r.usage is not None and (r.usage.prompt_tokens, r.usage.completion_tokens) == (27, 15)


def test_split_pii_is_masked_and_held_text_goes_out_before_the_block_stop() -> None:
    wire = (
        START
        + block_start(0, {"type": "text", "text": ""})
        + text_delta("mail jane.doe@exa")
        + text_delta("mple.com")
        + block_stop(0)
        + END
    )
    out, _ = relay(wire)
    assert block_text(out, 0) == "mail j***e@example.com"
    names = [name for name, _ in events(out)]
    assert names.index("content_block_stop") > max(i for i, n in enumerate(names) if n == "content_block_delta")
    assert "jane.doe" not in out.decode()


def test_text_blocks_message_start_opens_with_are_the_start_of_their_deltas() -> None:
    # The SDKs' snapshot starts from message_start's content, and a block's deltas append to
    # the block at their index there: its text and theirs are one text (an address split
    # between them was sent in clear, each redacted on its own).
    opened = json.loads(START[START.index(b"data: ") + 6 :])
    opened["message"]["content"] = [{"type": "text", "text": "write to jane.doe@exa"}]
    wire = ev("message_start", opened) + text_delta("mple.com now") + block_stop(0) + END
    out, _ = relay(wire)
    start = events(out)[0][1]
    assert start["message"]["content"][0]["text"] + block_text(out, 0) == "write to j***e@example.com now"
    assert "jane.doe" not in out.decode()
    # Without deltas after it, held text still goes out before the message ends (as a delta).
    out, _ = relay(ev("message_start", opened) + END)
    whole = REDACTOR.redact("write to jane.doe@exa", None)
    assert events(out)[0][1]["message"]["content"][0]["text"] + block_text(out, 0) == whole


def test_tool_input_json_is_redacted_across_deltas_and_stays_json() -> None:
    wire = (
        START
        + block_start(1, {"type": "tool_use", "id": "toolu_1", "name": "lookup", "input": {}})
        + json_delta('{"email": "jane.doe@exa', 1)
        + json_delta('mple.com", "card": 4242 4242 ', 1)
        + json_delta("4242 4242}", 1)
        + block_stop(1)
        + END
    )
    out, _ = relay(wire)
    assert json.loads(block_text(out, 1, "partial_json")) == {
        "email": "j***e@example.com",
        "card": "CC_MASKED_LAST4_4242",
    }


def test_thinking_and_its_signature_pass_unchanged() -> None:
    thinking = ev(
        "content_block_delta",
        {
            "type": "content_block_delta",
            "index": 0,
            "delta": {"type": "thinking_delta", "thinking": "user is jane.doe@example.com"},
        },
    )
    signature = ev(
        "content_block_delta",
        {
            "type": "content_block_delta",
            "index": 0,
            "delta": {"type": "signature_delta", "signature": "EqQBCgIYAh+4242424242424242"},
        },
    )
    wire = START + block_start(0, {"type": "thinking", "thinking": ""}) + thinking + signature + block_stop(0) + END
    out, _ = relay(wire)
    assert out == wire


def test_a_mid_stream_failure_is_an_anthropic_error_event() -> None:
    r = StreamRelay(REDACTOR, None, MESSAGES)
    r.feed(START + text_delta("call me at jane"))
    tail = r.finish() + r.error_event(UpstreamStreamBroken())
    names = [(name, data) for name, data in events(tail)]
    assert names[-1][0] == "error"
    assert names[-1][1] == {
        "type": "error",
        "error": {"type": "api_error", "message": "upstream stream ended unexpectedly"},
    }
    assert block_text(tail, 0) == "jane"


@settings(max_examples=int(os.environ.get("RELAY_EXAMPLES", "300")), deadline=None)
@given(split_reply(), st.lists(st.integers(0, 10_000), max_size=8))
def test_any_split_of_text_deltas_in_any_reads_is_redacted_like_the_whole(
    case: tuple[str, list[str]], cuts: list[int]
) -> None:
    text, deltas = case
    wire = (
        START
        + block_start(0, {"type": "text", "text": ""})
        + b"".join(text_delta(d) for d in deltas)
        + block_stop(0)
        + END
    )
    bounds = sorted({0, len(wire), *(c % (len(wire) + 1) for c in cuts)})
    out, r = relay(*(wire[a:b] for a, b in itertools.pairwise(bounds)))
    assert block_text(out, 0) == REDACTOR.redact(text)
    assert r.done and events(out)[-1][0] == "message_stop"


def test_a_compaction_summary_goes_out_whole_in_its_one_delta() -> None:
    # Context compaction (beta) sends its summary in one compaction_delta, which the Python SDK
    # takes as the block's content (it replaces, the TypeScript SDK appends): streamed like a
    # text, the summary's last word ("refund.", held) went out in a delta of its own, and the
    # Python SDK kept only that. Each delta's content is redacted whole.
    delta = {
        "type": "compaction_delta",
        "content": "Summary: jane.doe@example.com wants a refund.",
        "encrypted_content": "Eq",
    }
    wire = START + block_start(0, {"type": "compaction", "content": None})
    wire += ev("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta}) + block_stop(0) + END
    out, _ = relay(wire)
    deltas = [data["delta"] for name, data in events(out) if name == "content_block_delta"]
    assert deltas == [{**delta, "content": "Summary: j***e@example.com wants a refund."}]


def test_an_event_without_a_type_is_read_as_its_name_says() -> None:
    # The Anthropic SDK (Python, Swift) gives data without a "type" the type its event: line
    # names, and joins such a content_block_delta's text to its block: redacted whole event by
    # event, an address split between two of them went out in clear.
    wire = (
        START
        + ev("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}})
        + ev("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": "mail jane.doe@exa"}})
        + ev("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": "mple.com"}})
        + ev("content_block_stop", {"index": 0})
        + END
    )
    out, _ = relay(wire)
    assert "jane.d" not in out.decode()
    assert block_text(out, 0) == "mail j***e@example.com"
    # Split across reads at every byte, the same.
    assert relay(*[wire[i : i + 1] for i in range(len(wire))])[0] == out
    # An untyped error event ends the stream as a typed one does, held text first.
    wire = START + text_delta("mail jane.doe") + ev("error", {"error": {"type": "overloaded_error", "message": "x"}})
    out, r = relay(wire + text_delta("@example.com"))
    assert r.done and block_text(out, 0) == "mail jane.doe" and "example.com" not in out.decode()
