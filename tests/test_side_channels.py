"""PII through side doors a review found after the object-key, thinking, eviction and JSON
escape changes: ended streams filling the stream bound, JSON texts in parts without an index,
a thinking delta on a text block, deep arguments translated for Anthropic. A test marked
xfail(strict=True) is a known gap kept on purpose; its reason says why."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from gateway.openai_apis import RESPONSES
from gateway.relay import StreamRelay, redact_reply
from gateway.surfaces import CHAT, MAX_UNINDEXED_CHOICES, MESSAGES
from tests.test_adversarial import (  # noqa: F401  (fixtures)
    ANTHROPIC_START,
    DONE,
    EMAIL,
    PROMPT,
    REDACTOR,
    Gateway,
    GatewayFactory,
    Hostile,
    anthropic_ev,
    chunk,
    decoded,
    events_answer,
    gateway,
    hostile,
    json_answer,
    json_events,
    start,
)

CHAT_PATH = "/v1/chat/completions"
ESCAPED_EMAIL = "jane.doe\\u0040example.com"  # as written inside a JSON text: a parser reads EMAIL
# Tool-call arguments (a JSON text) holding an address written with an escape, and a bare card number.
ARGUMENTS = '{"to": "' + ESCAPED_EMAIL + '", "n": 4242424242424242}'
assert json.loads(ARGUMENTS)["to"] == EMAIL
ESCAPED_ONLY = '{"to": "' + ESCAPED_EMAIL + '"}'


def block(index: int, *texts: str) -> bytes:
    out = anthropic_ev({"type": "content_block_start", "index": index, "content_block": {"type": "text", "text": ""}})
    for text in texts:
        out += anthropic_ev(
            {"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": text}}
        )
    return out + anthropic_ev({"type": "content_block_stop", "index": index})


def block_text(wire: bytes, index: int) -> str:
    return "".join(
        e["delta"].get("text", "")
        for e in json_events(wire)
        if e.get("type") == "content_block_delta" and e.get("index") == index
    )


# --- 1. Ended streams do not fill the bound on open ones (relay._leaf) ------------------------


def test_split_pii_after_256_ended_content_blocks_is_masked() -> None:
    relay = StreamRelay(REDACTOR, None, MESSAGES)
    n = 300
    wire = (
        ANTHROPIC_START
        + b"".join(block(i, f"item {i} done") for i in range(n))  # "done" is held to the block's stop
        + block(n, "mail jane.doe@exa", "mple.com")
        + anthropic_ev({"type": "message_stop"})
    )
    out = relay.feed(wire) + relay.close()
    assert block_text(out, 0) == "item 0 done"
    assert block_text(out, n) == "mail j***e@example.com"


# --- 2. JSON texts in parts without an index are still read as JSON --------------------------


def test_reply_choice_without_index_keeps_arguments_json_and_masked() -> None:
    reply: dict[str, Any] = {
        "id": "c",
        "object": "chat.completion",
        "model": "m",
        "choices": [
            {
                "message": {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [{"id": "t", "type": "function", "function": {"name": "f", "arguments": ARGUMENTS}}],
                },
                "finish_reason": "tool_calls",
            }
        ],
    }
    redact_reply(REDACTOR, reply, CHAT.reply_spec, None)
    arguments = reply["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]
    assert json.loads(arguments) == {"to": "j***e@example.com", "n": "CC_MASKED_LAST4_4242"}


@pytest.mark.parametrize("route", ["chat", "messages"])
def test_json_text_of_an_unreadable_part_is_unescaped_before_matching(route: str) -> None:
    if route == "chat":
        relay = StreamRelay(REDACTOR, None, CHAT)
        wire = chunk({"tool_calls": [{"function": {"arguments": ESCAPED_ONLY}}]}) + DONE  # no index
    else:
        relay = StreamRelay(REDACTOR, None, MESSAGES)
        delta = {"type": "input_json_delta", "partial_json": ESCAPED_ONLY}
        # An event of no type is no block's (a content_block_delta without an index that
        # carries text ends the stream instead: see test_an_index_left_out_or_null_...).
        wire = ANTHROPIC_START + b"data: " + json.dumps({"index": 0, "delta": delta}).encode() + b"\n\n"
    out = relay.feed(wire) + relay.close()
    if route == "chat":  # a tool call without an index is one text stream: its arguments, joined
        texts = [
            "".join(
                call["function"]["arguments"]
                for e in json_events(out)
                for call in e["choices"][0]["delta"]["tool_calls"]
            )
        ]
    else:
        texts = [
            value
            for e in json_events(out)
            for value in _strings(e)
            if value.startswith("{")  # the JSON texts, parsed as the client would
        ]
    assert texts and all(EMAIL not in json.dumps(json.loads(t), ensure_ascii=False) for t in texts)


def _strings(node: object) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for v in node.values() for s in _strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in _strings(v)]
    return []


# --- 3. Thinking fields are kept per part, by that part's own type ----------------------------


def test_a_thinking_delta_does_not_make_a_text_blocks_fields_keep() -> None:
    relay = StreamRelay(REDACTOR, None, MESSAGES)
    event = anthropic_ev(
        {
            "type": "content_block_start",
            "index": 0,
            "content_block": {"type": "text", "text": "", "signature": EMAIL},
            "delta": {"type": "thinking_delta"},
        }
    )
    out = relay.feed(ANTHROPIC_START + event + anthropic_ev({"type": "message_stop"})) + relay.close()
    assert EMAIL not in decoded(out)


# --- 4. Unescaping changes events that need no redaction --------------------------------------


@pytest.mark.xfail(
    strict=True,
    reason="SPEC §11 (unchanged events byte for byte), kept as a trade-off: a JSON text "
    "(partial_json, arguments) is read with its escapes of ordinary characters written as "
    "the characters ('\\u0041' -> 'A'), so that PII written with escapes is masked; the JSON "
    "means the same, its bytes differ",
)
def test_a_json_text_without_pii_passes_byte_for_byte() -> None:
    relay = StreamRelay(REDACTOR, None, MESSAGES)
    event = anthropic_ev(
        {
            "type": "content_block_delta",
            "index": 0,
            "delta": {"type": "input_json_delta", "partial_json": '{"a": "\\u0041"}'},
        }
    )
    assert relay.feed(ANTHROPIC_START + event) == ANTHROPIC_START + event


# --- 5. Router: a translated request nested past orjson's depth is a 4xx, not a 500 ----------

ROUTES = """
[upstreams.claude]
kind = "anthropic"
base_url = "{url}"
api_key_env = "ANTHROPIC_API_KEY"

[[models]]
match = "claude-*"
upstreams = [{{ upstream = "claude" }}]
"""


async def test_deep_arguments_routed_to_anthropic_are_not_a_500(
    start: GatewayFactory,  # noqa: F811
    hostile: Hostile,  # noqa: F811
    tmp_path: Path,
) -> None:
    path = tmp_path / "routes.toml"
    path.write_text(ROUTES.format(url=hostile.url))
    gw = await start(ROUTES_FILE=str(path))
    hostile.answer = json_answer(
        {
            "id": "m",
            "type": "message",
            "role": "assistant",
            "model": "claude-x",
            "content": [{"type": "text", "text": "ok"}],
            "stop_reason": "end_turn",
            "usage": {"input_tokens": 1, "output_tokens": 1},
        }
    )
    depth = 250
    arguments = '{"a":' * depth + '"x"' + "}" * depth
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": arguments}}
    body = {
        "model": "claude-x",
        "messages": [
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "c", "content": "ok"},
        ],
    }
    status, data = await gw.post(CHAT_PATH, body)
    assert status < 500, data


# --- An index that is there but no integer ("0", 0.0, true, [0]) -------------------------
# A lax client reads such an index as the integer (pydantic takes "0", 0.0 and true; JavaScript
# files a part under "0" for [0] too), so the text of that event would join a stream the
# gateway never fed it to: "jane.doe@exa" redacted alone, then "mple.com" in block 0, and the
# client holds the address (found by a black-box review). The stream ends with an error event.
BAD_INDICES = ["0", 0.0, True, [0]]
SPLIT = ("jane.doe@exa", "mple.com")


def _responses_delta(text: str, **indices: object) -> bytes:
    body = {"type": "response.output_text.delta", "item_id": "m", "output_index": 0, "content_index": 0}
    return f"event: {body['type']}\ndata: ".encode() + json.dumps({**body, **indices, "delta": text}).encode() + b"\n\n"


def _misindexed_stream(route: str, bad: object) -> tuple[StreamRelay, bytes]:
    if route == "chat":
        return StreamRelay(REDACTOR, None, CHAT), chunk({"content": SPLIT[0]}, index=bad) + chunk({"content": SPLIT[1]})
    if route == "chat tool call":
        first, rest = (
            {"index": i, "function": {"arguments": '{"to":"' + t}} for i, t in ((bad, SPLIT[0]), (0, SPLIT[1]))
        )
        return StreamRelay(REDACTOR, None, CHAT), chunk({"tool_calls": [first]}) + chunk({"tool_calls": [rest]})
    if route == "messages":
        first, rest = (
            anthropic_ev({"type": "content_block_delta", "index": i, "delta": {"type": "text_delta", "text": t}})
            for i, t in ((bad, SPLIT[0]), (0, SPLIT[1]))
        )
        return StreamRelay(REDACTOR, None, MESSAGES), ANTHROPIC_START + first + rest
    name = route.split()[-1]
    return StreamRelay(REDACTOR, None, RESPONSES), _responses_delta(SPLIT[0], **{name: bad}) + _responses_delta(
        SPLIT[1]
    )


@pytest.mark.parametrize("bad", BAD_INDICES, ids=repr)
@pytest.mark.parametrize(
    "route", ["chat", "chat tool call", "messages", "responses output_index", "responses content_index"]
)
def test_an_index_that_is_no_integer_ends_the_stream_with_an_error(route: str, bad: object) -> None:
    relay, wire = _misindexed_stream(route, bad)
    out = relay.feed(wire)
    out += relay.close()
    assert SPLIT[0] not in decoded(out) and SPLIT[1] not in decoded(out)
    last = json_events(out)[-1]
    assert ("error" in last or last.get("type") == "error") and "index is not an integer" in json.dumps(last)
    assert relay.done and relay.failure is not None


# --- An index left out or null, on a part that carries text --------------------------------
# Clients read such a part as the one there is (openai-python's choices[0], Anthropic's block
# and the Responses API's part by their position) and join its text to the events around
# it: "Write to jane.doe@" then "example.com today." made the address on the client's side
# (found by a review), each redacted alone. The stream ends as for an index that is no integer.
LEFT_OUT = ["absent", "null"]


def _unindexed(body: dict[str, Any], name: str, how: str) -> dict[str, Any]:
    """The body with its `name` member left out ("absent") or null."""
    out = {k: v for k, v in body.items() if k != name}
    if how == "null":
        out[name] = None
    return out


def _unindexed_chat(delta: dict[str, Any], how: str) -> bytes:
    choice = _unindexed({"index": 0, "delta": delta, "finish_reason": None}, "index", how)
    body = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [choice]}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def _unindexed_stream(route: str, how: str) -> tuple[StreamRelay, bytes]:
    """SPLIT over two events whose part has no index (the review's stream)."""
    if route in ("chat content", "chat refusal"):
        field = route.split()[-1]
        return StreamRelay(REDACTOR, None, CHAT), b"".join(_unindexed_chat({field: t}, how) for t in SPLIT) + DONE
    if route == "chat tool call":  # the tool calls have an index, their choice has none
        first, rest = ({"index": 0, "function": {"arguments": a}} for a in ('{"to":"' + SPLIT[0], SPLIT[1] + '"}'))
        wire = _unindexed_chat({"tool_calls": [first]}, how) + _unindexed_chat({"tool_calls": [rest]}, how)
        return StreamRelay(REDACTOR, None, CHAT), wire + DONE
    if route.startswith("messages"):
        delta = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": SPLIT[1]}}
        if route == "messages start":  # the block opens with the first part, the delta has its index
            opening = {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": SPLIT[0]}}
            wire = anthropic_ev(_unindexed(opening, "index", how)) + anthropic_ev(delta)
        else:
            wire = b"".join(
                anthropic_ev(_unindexed({**delta, "delta": {"type": "text_delta", "text": t}}, "index", how))
                for t in SPLIT
            )
        return StreamRelay(REDACTOR, None, MESSAGES), ANTHROPIC_START + wire
    name = route.split()[-1]
    deltas = []
    for text in SPLIT:
        body = {"type": "response.output_text.delta", "item_id": "m", "output_index": 0, "content_index": 0}
        body = _unindexed({**body, "delta": text}, name, how)
        deltas.append(f"event: {body['type']}\ndata: ".encode() + json.dumps(body).encode() + b"\n\n")
    return StreamRelay(REDACTOR, None, RESPONSES), b"".join(deltas)


@pytest.mark.parametrize("how", LEFT_OUT)
@pytest.mark.parametrize(
    "route",
    [
        "chat content",
        "chat refusal",
        "chat tool call",
        "messages delta",
        "messages start",
        "responses output_index",
        "responses content_index",
    ],
)
@pytest.mark.parametrize("read_by_read", [False, True])
def test_an_index_left_out_or_null_on_text_ends_the_stream_with_an_error(
    route: str, how: str, read_by_read: bool
) -> None:
    relay, wire = _unindexed_stream(route, how)
    reads = [e + b"\n\n" for e in wire.split(b"\n\n") if e] if read_by_read else [wire]
    out = b"".join(relay.feed(read) for read in reads) + relay.close()
    assert EMAIL not in decoded(out) and SPLIT[1] not in decoded(out)
    last = json_events(out)[-1]
    assert ("error" in last or last.get("type") == "error") and "index is missing" in json.dumps(last)
    assert relay.done and relay.failure is not None


@pytest.mark.parametrize("how", LEFT_OUT)
def test_a_choice_without_an_index_is_not_learned_for_the_fast_path(how: str) -> None:
    """Events whose second choice has no index and no text pass, but their shape is not
    learned: the fast path reads no index, and the same shape would carry that choice's
    text past the check ("call 555-12", "3-4567": no run long enough to be looked at)."""

    def two_choices(content: str, refusal: str) -> bytes:
        other = _unindexed({"index": 1, "delta": {"refusal": refusal}, "finish_reason": None}, "index", how)
        body = {
            "id": "c1",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "m",
            "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}, other],
        }
        return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"

    relay = StreamRelay(REDACTOR, None, CHAT)
    pairs = [("Hello", ""), (" there", ""), ("x", "call 555-12"), ("y", "3-4567 now")]
    out = b"".join(relay.feed(two_choices(c, r)) for c, r in pairs) + relay.close()
    assert "555-12" not in decoded(out) and "3-4567" not in decoded(out)
    assert "index is missing" in json.dumps(json_events(out)[-1])


@pytest.mark.parametrize("how", LEFT_OUT)
def test_held_text_goes_out_before_the_error_of_a_missing_index(how: str) -> None:
    relay = StreamRelay(REDACTOR, None, CHAT)
    out = relay.feed(chunk({"content": "write to jane"}) + _unindexed_chat({"content": ".doe@example.com"}, how))
    out += relay.close()
    texts = "".join(c["delta"].get("content") or "" for e in json_events(out) for c in e.get("choices", []))
    assert texts == "write to jane" and "index is missing" in json.dumps(json_events(out)[-1])


@pytest.mark.parametrize("how", LEFT_OUT)
def test_a_responses_copy_without_its_indices_ends_the_stream(how: str) -> None:
    """A `.done` text whose part cannot be told: the stream ends before it, held text first."""
    relay = StreamRelay(REDACTOR, None, RESPONSES)
    done = _unindexed(
        {"type": "response.output_text.done", "item_id": "m", "output_index": 0, "content_index": 0, "text": EMAIL},
        "output_index",
        how,
    )
    wire = _responses_delta("write to ") + b"event: response.output_text.done\ndata: " + json.dumps(done).encode()
    out = relay.feed(wire + b"\n\n") + relay.close()
    assert EMAIL not in decoded(out)
    assert "".join(e.get("delta", "") for e in json_events(out) if e["type"].endswith(".delta")) == "write to "
    last = json_events(out)[-1]
    assert last["type"] == "error" and "index is missing" in last["message"]


@pytest.mark.parametrize("how", LEFT_OUT)
@pytest.mark.parametrize("read_by_read", [False, True])
def test_an_index_left_out_or_null_on_an_event_without_text_still_streams(how: str, read_by_read: bool) -> None:
    """A role chunk or a finish chunk without an index carries no text a client could join:
    it passes (so does a tool call without an index in a choice that has one: some
    OpenAI-compatible servers leave those indices out; see the tests below)."""
    relay = StreamRelay(REDACTOR, None, CHAT)
    call = {"id": "t", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    reads = [
        _unindexed_chat({"role": "assistant", "content": ""}, how),
        chunk({"content": "one "}),
        chunk({"tool_calls": [call]}),
        _unindexed_chat({}, how).replace(b'"finish_reason": null', b'"finish_reason": "stop"') + DONE,
    ]
    out = b"".join(relay.feed(read) for read in reads) if read_by_read else relay.feed(b"".join(reads))
    out += relay.close()
    assert relay.failure is None and out.endswith(DONE)
    assert "".join(c["delta"].get("content") or "" for e in json_events(out) for c in e["choices"]) == "one "
    assert [e["choices"][0]["finish_reason"] for e in json_events(out)][-1] == "stop"


def _unindexed_calls(out: bytes) -> list[str]:
    """The arguments of each tool call without an index, as a client that opens a call at
    each id reads them."""
    calls: list[str] = []
    for event in json_events(out):
        for choice in event.get("choices", []):
            for call in (choice.get("delta") or {}).get("tool_calls") or []:
                assert "index" not in call or call["index"] is None
                if call.get("id"):
                    calls.append("")
                calls[-1] += (call.get("function") or {}).get("arguments") or ""
    return calls


@pytest.mark.parametrize("how", LEFT_OUT)
@pytest.mark.parametrize("read_by_read", [False, True])
def test_split_pii_in_arguments_of_a_tool_call_without_an_index_is_masked(how: str, read_by_read: bool) -> None:
    """SPEC §6: tool-call arguments keep the split guarantee. A client joins the deltas of a
    call without an index (keyed by None, or as the one call there is): the gateway used to
    redact each delta whole, so "jane.doe@exa" + "mple.com" went out as it came."""
    relay = StreamRelay(REDACTOR, None, CHAT)
    opening = _unindexed({"index": 0, "id": "t", "type": "function", "function": {"name": "f"}}, "index", how)
    pieces = ['{"to": "' + SPLIT[0], SPLIT[1] + '", "card": "4242 4242 ', '4242 4242"}']
    reads = [chunk({"tool_calls": [{**opening, "function": {"name": "f", "arguments": ""}}]})]
    reads += [
        chunk({"tool_calls": [_unindexed({"index": 0, "function": {"arguments": p}}, "index", how)]}) for p in pieces
    ]
    reads.append(chunk({}, finish="tool_calls") + DONE)
    out = b"".join(relay.feed(read) for read in reads) if read_by_read else relay.feed(b"".join(reads))
    out += relay.close()
    assert relay.failure is None and EMAIL not in decoded(out) and "4242 4242" not in decoded(out)
    assert [json.loads(a) for a in _unindexed_calls(out)] == [
        {"to": "j***e@example.com", "card": "CC_MASKED_LAST4_4242"}
    ]


@pytest.mark.parametrize("how", LEFT_OUT)
def test_parallel_tool_calls_without_an_index_keep_their_own_arguments(how: str) -> None:
    """Servers that leave the index out send parallel calls each whole, opened by its id: the
    text the first call's stream holds back (an address near its end) goes out before the
    second opens, as the first's, and each call's arguments stay its own JSON."""
    relay = StreamRelay(REDACTOR, None, CHAT)
    calls = [
        {"index": 0, "id": "t1", "type": "function", "function": {"name": "f", "arguments": '{"to": "' + EMAIL + '"}'}},
        {"index": 1, "id": "t2", "type": "function", "function": {"name": "g", "arguments": '{"n": 4242424242424242}'}},
    ]
    wire = b"".join(chunk({"tool_calls": [_unindexed(call, "index", how)]}) for call in calls)
    out = relay.feed(wire + chunk({}, finish="tool_calls") + DONE) + relay.close()
    assert relay.failure is None and EMAIL not in decoded(out)
    assert [json.loads(a) for a in _unindexed_calls(out)] == [
        {"to": "j***e@example.com"},
        {"n": "CC_MASKED_LAST4_4242"},
    ]


@pytest.mark.parametrize("how", LEFT_OUT)
def test_several_tool_calls_without_an_index_in_one_event_are_each_whole(how: str) -> None:
    """Gemini sends parallel calls in one chunk, none with an index: each is a whole JSON text,
    redacted whole, and what the stream before them held goes out first."""
    relay = StreamRelay(REDACTOR, None, CHAT)
    first = _unindexed(
        {"index": 0, "id": "t0", "function": {"name": "e", "arguments": '{"a": "x", "b": "jane'}}, "index", how
    )
    calls = [
        {"id": "t1", "type": "function", "function": {"name": "f", "arguments": '{"to": "' + EMAIL + '"}'}},
        {"id": "t2", "type": "function", "function": {"name": "g", "arguments": '{"n": 4242424242424242}'}},
    ]
    wire = chunk({"tool_calls": [first]}) + chunk({"tool_calls": [_unindexed(c, "index", how) for c in calls]})
    out = relay.feed(wire + chunk({}, finish="tool_calls") + DONE) + relay.close()
    assert relay.failure is None and EMAIL not in decoded(out)
    arguments = _unindexed_calls(out)
    assert arguments[0] == '{"a": "x", "b": "jane'
    assert [json.loads(a) for a in arguments[1:]] == [{"to": "j***e@example.com"}, {"n": "CC_MASKED_LAST4_4242"}]


@pytest.mark.parametrize("how", LEFT_OUT)
def test_the_last_of_several_calls_in_one_event_is_continued_by_later_deltas(how: str) -> None:
    """Several calls without an index in one event, then deltas without an id: a client appends
    those to the last call, so its text is a stream. Redacted whole, its tail "jane.doe@exa"
    went out, then "mple.com" (a new stream): the client assembled the address in clear."""
    relay = StreamRelay(REDACTOR, None, CHAT)
    calls = [
        {"id": "t1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}},
        {"id": "t2", "type": "function", "function": {"name": "g", "arguments": '{"to": "' + SPLIT[0]}},
    ]
    wire = chunk({"tool_calls": [_unindexed(c, "index", how) for c in calls]})
    wire += chunk({"tool_calls": [_unindexed({"index": 0, "function": {"arguments": SPLIT[1] + '"}'}}, "index", how)]})
    out = relay.feed(wire + chunk({}, finish="tool_calls") + DONE) + relay.close()
    assert relay.failure is None and EMAIL not in decoded(out)
    assert [json.loads(a) for a in _unindexed_calls(out)] == [{"a": 1}, {"to": "j***e@example.com"}]


@pytest.mark.parametrize("how", LEFT_OUT)
def test_a_tool_call_without_an_index_that_repeats_its_id_is_still_one_stream(how: str) -> None:
    relay = StreamRelay(REDACTOR, None, CHAT)
    pieces = ['{"to": "' + SPLIT[0], SPLIT[1] + '"}']
    wire = b"".join(
        chunk({"tool_calls": [_unindexed({"index": 0, "id": "t", "function": {"arguments": p}}, "index", how)]})
        for p in pieces
    )
    out = relay.feed(wire + DONE) + relay.close()
    assert EMAIL not in decoded(out)
    joined = "".join(
        call["function"]["arguments"] for e in json_events(out) for call in e["choices"][0]["delta"]["tool_calls"]
    )
    assert json.loads(joined) == {"to": "j***e@example.com"}


@pytest.mark.parametrize("how", LEFT_OUT)
def test_text_less_anthropic_and_responses_events_without_an_index_still_stream(how: str) -> None:
    relay = StreamRelay(REDACTOR, None, MESSAGES)
    stop = anthropic_ev(_unindexed({"type": "content_block_stop", "index": 0}, "index", how))
    out = relay.feed(ANTHROPIC_START + block(0, "one") + stop + anthropic_ev({"type": "message_stop"}))
    assert relay.failure is None and relay.done and block_text(out, 0) == "one"
    relay = StreamRelay(REDACTOR, None, RESPONSES)
    empty = _unindexed(
        {"type": "response.output_text.delta", "item_id": "m", "output_index": 0, "content_index": 0, "delta": ""},
        "content_index",
        how,
    )
    out = relay.feed(b"event: response.output_text.delta\ndata: " + json.dumps(empty).encode() + b"\n\n")
    out += relay.feed(_responses_delta("two")) + relay.finish()
    assert relay.failure is None and not relay.done
    assert "".join(e["delta"] for e in json_events(out)) == "two"


async def test_a_typeless_anthropic_event_is_redacted_whole_and_no_block_is_made_up(
    gateway: Gateway,  # noqa: F811
    hostile: Hostile,  # noqa: F811
) -> None:
    """An event with no type is no block's: its text redacted whole, nothing of it held (held
    text went out later in a content_block_delta of index "delta", which the SDK choked on)."""
    typeless = b"data: " + json.dumps({"index": 0, "delta": {"text": SPLIT[0]}}).encode() + b"\n\n"
    text = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": SPLIT[1]}}
    hostile.answer = events_answer(
        ANTHROPIC_START,
        anthropic_ev({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        typeless,
        anthropic_ev(text),
        anthropic_ev({"type": "content_block_stop", "index": 0}),
        anthropic_ev({"type": "message_stop"}),
    )
    status, wire = await gateway.post(
        "/v1/messages", {"model": "c", "max_tokens": 9, "messages": PROMPT, "stream": True}
    )
    assert status == 200
    for body in json_events(wire):
        assert type(body.get("index", 0)) is int, body
    assert SPLIT[0] in decoded(wire)  # no address in it alone: it goes out as it came


def test_a_new_choice_every_event_does_not_grow_the_relays_memory_without_bound() -> None:
    """A hostile upstream that opens an index-less tool call in a new choice on every event:
    the last call id kept per choice (to tell a new call from a continued one) is bounded, so
    a long stream does not grow the gateway's memory by an entry an event."""
    relay = StreamRelay(REDACTOR, None, CHAT)
    calls = 3 * MAX_UNINDEXED_CHOICES
    for n in range(calls):  # each choice finished: its stream closed, only the call id is kept
        call = {"id": f"t{n}", "type": "function", "function": {"name": "f"}}  # no text: no stream held open
        relay.feed(chunk({"tool_calls": [call]}, index=n) + chunk({}, finish="tool_calls", index=n))
    assert len(relay._scratch) <= MAX_UNINDEXED_CHOICES + 1
    # Past the bound, a continued call's split address is still masked, whether its deltas
    # repeat the call's id or not (found by review: taken as new calls, the deltas that
    # repeated it each flushed the stream, and "jane.doe" + "@example.com" went out in clear).
    for n, call_id in [(calls, None), (calls + 1, "t-again")]:
        pieces = ['{"to": "' + SPLIT[0], SPLIT[1] + '"}']
        deltas = [{"function": {"arguments": p}} | ({"id": call_id} if call_id else {}) for p in pieces]
        out = b"".join(relay.feed(chunk({"tool_calls": [d]}, index=n)) for d in deltas)
        out += relay.feed(chunk({}, finish="tool_calls", index=n))
        joined = "".join(
            (call.get("function") or {}).get("arguments") or ""
            for event in json_events(out)
            for choice in event.get("choices", [])
            for call in (choice.get("delta") or {}).get("tool_calls") or []
        )
        assert relay.failure is None and EMAIL not in decoded(out) and EMAIL not in joined


def test_a_reply_of_hundreds_of_tool_calls_keeps_the_split_guarantee_to_its_last() -> None:
    """An agentic reply with 300 tool_use blocks, one after the other: each block's JSON stream
    stayed open after its content_block_stop (it held nothing), JSON streams are never let go
    as idle, so past 256 blocks each input_json_delta was redacted whole and an address split
    across two of them went out in clear."""
    relay = StreamRelay(REDACTOR, None, MESSAGES)

    def block(index: int, pieces: list[str]) -> bytes:
        opening = {"type": "tool_use", "id": f"toolu_{index}", "name": "f", "input": {}}
        wire = anthropic_ev({"type": "content_block_start", "index": index, "content_block": opening})
        for piece in pieces:
            delta = {"type": "input_json_delta", "partial_json": piece}
            wire += anthropic_ev({"type": "content_block_delta", "index": index, "delta": delta})
        return wire + anthropic_ev({"type": "content_block_stop", "index": index})

    for index in range(300):
        relay.feed(block(index, ['{"n": ', f"{index}}}"]))
    out = relay.feed(block(300, ['{"to": "' + SPLIT[0], SPLIT[1] + '"}']))
    joined = "".join(
        event["delta"]["partial_json"] for event in json_events(out) if event.get("type") == "content_block_delta"
    )
    assert relay.failure is None and EMAIL not in joined and json.loads(joined) == {"to": "j***e@example.com"}
