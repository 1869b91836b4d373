"""Review: the fast path's number slot (the Responses API's sequence_number) against the exact
path. Each case is a stream the exact path reads one way and the fast path another: the fast
path reads digits where the exact path notes no number (a nested key, a key in the event
line, a float, a number past 15 digits) or sees no JSON at all (leading zeros)."""

from __future__ import annotations

import pytest

from gateway.openai_apis import RESPONSES
from gateway.redact import ALL_KINDS, build_redactor
from gateway.relay import StreamRelay

REDACTOR = build_redactor(ALL_KINDS)
_WHERE = b'"type":"response.output_text.delta","item_id":"m","output_index":0,"content_index":0'
# A .done copy: the held text ("jane") goes out before it, in an event numbered by the relay.
_DONE = (
    b'event: response.output_text.done\ndata: {"type":"response.output_text.done","item_id":"m",'
    b'"output_index":0,"content_index":0,"text":"x"}\n\n'
)


class _ExactOnly(StreamRelay):
    __slots__ = ()

    def _templated(self, blocks: bytes, at: int, out: list[bytes], copied: int) -> tuple[int, int] | None:
        return None


def _delta(text: bytes, tail: bytes, name: bytes = b"response.output_text.delta") -> bytes:
    return b"event: " + name + b"\ndata: {" + _WHERE + b',"delta":"' + text + b'"' + tail + b"}\n\n"


CASES = {
    # openai's own numbers, but written with leading zeros: not JSON (the exact path reads the
    # event as text), while the fast path streams its delta and notes 7
    "leading zeros": [_delta(b"Hi there", b',"sequence_number":1'), _delta(b" ok jane", b',"sequence_number":007')],
    # learned with 16 digits: the slot holds 15 of them, the 16th is read as part of the shape
    "sixteen digits": [
        _delta(b"Hi there", b',"sequence_number":1000000000000006'),
        _delta(b" ok jane", b',"sequence_number":2000000000000006'),
    ],
    # a float: the exact path notes no number (not an int); the fast path notes its integer part
    "float": [_delta(b"Hi there", b',"sequence_number":1.5'), _delta(b" ok jane", b',"sequence_number":7.5')],
    # the key only nested: the exact path notes none; the fast path reads the nested digits
    "nested key": [
        _delta(b"Hi there", b',"meta":{"sequence_number":1}'),
        _delta(b" ok jane", b',"meta":{"sequence_number":77}'),
    ],
    # the key only in the event line
    "key in the event line": [
        _delta(b"Hi there", b"", b'x"sequence_number":1'),
        _delta(b" ok jane", b"", b'x"sequence_number":42'),
    ],
}


@pytest.mark.parametrize("name", list(CASES))
def test_the_number_slot_reads_what_the_exact_path_reads(name: str) -> None:
    wire = b"".join(CASES[name]) + _DONE
    fast, exact = StreamRelay(REDACTOR, None, RESPONSES), _ExactOnly(REDACTOR, None, RESPONSES)
    assert fast.feed(wire) + fast.close() == exact.feed(wire) + exact.close()


def chat_event(model: bytes, text: bytes = b"a", tail: bytes = b"") -> bytes:
    """A compact chat chunk naming `model`, with `text` as its content and `tail` after its choices."""
    return (
        b'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"'
        + model
        + b'","choices":[{"index":0,"delta":{"content":"'
        + text
        + b'"},"finish_reason":null}]'
        + tail
        + b"}\n\n"
    )


def test_the_fast_path_notes_the_model_as_the_exact_path_does() -> None:
    # The fast path skips `_note`: an event of a learned shape naming a model after another
    # event named another leaves the other in `response_model` (the trace's gen_ai.response.model).
    from gateway.surfaces import CHAT

    wire = chat_event(b"gpt-4o", b"Hello") + chat_event(b"gpt-4o-mini", b" there") + chat_event(b"gpt-4o", b" again")
    fast, exact = StreamRelay(REDACTOR, None, CHAT), _ExactOnly(REDACTOR, None, CHAT)
    assert fast.feed(wire) == exact.feed(wire)
    assert fast.response_model == exact.response_model


@pytest.mark.parametrize(("pad", "model"), [(b"\xff", "gpt-4o"), (b"\x01", "m"), (b"a\\u0040b", "gpt-4o")])
def test_an_event_the_fast_path_gives_up_on_leaves_the_model_to_the_exact_path(pad: bytes, model: str) -> None:
    # An event of a learned shape whose side value fails its check (invalid UTF-8, a control
    # character, an escape) takes the exact path: the model must be what that path notes,
    # not the learned shape's (found by a review: it was noted before the values were checked).
    # An event that is no JSON names no model; one with an escape names its own, and so does
    # one with invalid UTF-8 (read with U+FFFD, as clients read it).
    from gateway.surfaces import CHAT

    wire = (
        chat_event(b"gpt-4o", tail=b',"obfuscation":"x"')
        + chat_event(b"m")
        + chat_event(b"gpt-4o", tail=b',"obfuscation":"' + pad + b'"')
    )
    fast, exact = StreamRelay(REDACTOR, None, CHAT), _ExactOnly(REDACTOR, None, CHAT)
    assert fast.feed(wire) == exact.feed(wire)
    assert fast.response_model == exact.response_model == model
