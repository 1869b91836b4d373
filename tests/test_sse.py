"""SSE parser: the same events for every way the bytes can be split into reads."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import sse

STREAM = (
    b": keep-alive\n\n"
    b'data: {"choices":[{"delta":{"content":"Hel"}}]}\n\n'
    b'data: {"choices":[{"delta":{"content":"lo"}}]}\r\n\r\n'
    b"event: note\ndata: line one\ndata: line two\n\n"
    b"data:no-space\r\rid: 7\ndata: x\n\n\n"
    b"data: [DONE]\n\n"
)
EXPECTED = [
    None,
    b'{"choices":[{"delta":{"content":"Hel"}}]}',
    b'{"choices":[{"delta":{"content":"lo"}}]}',
    b"line one\nline two",
    b"no-space",
    b"x",
    b"[DONE]",
]


def parse_in_reads(data: bytes, cuts: list[int]) -> list[sse.Event]:
    parser = sse.SSEParser()
    bounds = [0, *sorted(cuts), len(data)]
    events: list[sse.Event] = []
    for a, b in itertools.pairwise(bounds):
        events.extend(parser.feed(data[a:b]))
    return events + parser.close()


def test_whole_stream() -> None:
    assert [e.data for e in parse_in_reads(STREAM, [])] == EXPECTED


@settings(max_examples=2000, deadline=None)
@given(st.lists(st.integers(0, len(STREAM)), max_size=40))
def test_any_split_gives_the_same_events(cuts: list[int]) -> None:
    whole = parse_in_reads(STREAM, [])
    assert parse_in_reads(STREAM, cuts) == whole


payloads = st.lists(st.binary(min_size=1, max_size=30).filter(lambda b: b"\n" not in b and b"\r" not in b), max_size=8)


@settings(max_examples=500, deadline=None)
@given(payloads, st.sampled_from([b"\n", b"\r\n", b"\r"]), st.data())
def test_encoded_events_round_trip(items: list[bytes], newline: bytes, data: st.DataObject) -> None:
    wire = b"".join(sse.encode(p) for p in items).replace(b"\n", newline)
    cuts = data.draw(st.lists(st.integers(0, len(wire)), max_size=10))
    assert [e.data for e in parse_in_reads(wire, cuts)] == items


def test_raw_block_is_relayed_byte_for_byte() -> None:
    [event] = sse.SSEParser().feed(b'data: {"a":1}\n\n')
    assert event.raw == b'data: {"a":1}\n\n'


def test_unterminated_final_event_is_dispatched_on_close() -> None:
    parser = sse.SSEParser()
    assert parser.feed(b"data: tail") == []
    assert [e.data for e in parser.close()] == [b"tail"]
