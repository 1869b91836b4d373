"""Redaction: detectors, look-alikes, and exactness under every split of a stream."""

from __future__ import annotations

import itertools
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.redact import ALL_KINDS, MAX_MATCH, build_redactor

REDACTOR = build_redactor(ALL_KINDS)
assert REDACTOR is not None

PII = {
    "email": ["jane.doe@example.com", "a.b+tag@mail.example.co.uk", "x@y.io", "JOHN_SMITH@Corp.COM"],
    "card": ["4242 4242 4242 4242", "4111-1111-1111-1111", "5555555555554444", "378282246310005"],
    "phone": [
        "+1 415 555 2671",
        "(415) 555-2671",
        "415-555-2671",
        "+44 20 7946 0958",
        "+4930123456",
        "+44 (0)20 7946 0958",
    ],
    "iban": ["DE89 3704 0044 0532 0130 00", "GB82WEST12345698765432", "FR1420041010050500013M02606"],
    "ssn": ["123-45-6789", "078-05-1120"],
}

LOOK_ALIKES = [
    "2024-01-15",
    "12/31/2024",
    "Jan 5, 2024",
    "12:30:45",
    "2024-01-15T12:30:45Z",
    "3.11.7",
    "v1.2.3.4",
    "10.0.0.1",
    "192.168.1.1",
    "$1,234.56",
    "€99.99",
    "1,000,000",
    "0.0001",
    "order #123456789012",
    "INV-2024-000123",
    "PO 4500012345",
    "555-1234",
    "1700000000",
    "1700000000123",
    "123e4567-e89b-12d3-a456-426614174000",
    "4242424242424241",
    "4111 1111 1111 1112",
    "000-12-3456",
    "ISBN 978-3-16-148410-0",
]

ORDINARY = st.sampled_from(
    [
        "Hello",
        " ",
        "world",
        ", ",
        ".",
        "(",
        ")",
        "\n",
        "the order ",
        "costs ",
        "at ",
        "on ",
        "call me",
        "é",
        "👋",
        *LOOK_ALIKES,
    ]
)
PII_VALUES = st.sampled_from([v for values in PII.values() for v in values])


@pytest.mark.parametrize(("kind", "value"), [(k, v) for k, vs in PII.items() for v in vs])
def test_each_kind_is_masked(kind: str, value: str) -> None:
    counted: list[str] = []
    out = REDACTOR.redact(f"Here: {value}. Thanks", counted.append)
    assert value not in out
    assert counted == [kind]


@pytest.mark.parametrize("text", LOOK_ALIKES)
def test_look_alikes_pass_unchanged(text: str) -> None:
    assert REDACTOR.redact(f"see {text} here") == f"see {text} here"


def test_mask_formats_follow_the_seed() -> None:
    assert REDACTOR.redact("jane@example.com") == "j***e@example.com"
    assert REDACTOR.redact("4242 4242 4242 4242") == "CC_MASKED_LAST4_4242"
    assert REDACTOR.redact("+1 415 555 2671") == "PHONE_MASKED_LAST2_71"


@pytest.mark.parametrize(
    ("text", "redacted"),
    [
        ("(call +1 415 555 2671)", "(call PHONE_MASKED_LAST2_71)"),
        ("Jane (+44 20 7946 0958) called", "Jane (PHONE_MASKED_LAST2_58) called"),
        ("+1 (415) 555-2671.", "PHONE_MASKED_LAST2_71."),
        ("+44 (0)20 7946 0958", "PHONE_MASKED_LAST2_58"),
    ],
)
def test_brackets_around_a_phone_stay_and_brackets_inside_it_are_masked(text: str, redacted: str) -> None:
    assert REDACTOR.redact(text) == redacted


def test_only_selected_kinds() -> None:
    emails_only = build_redactor(["email"])
    assert emails_only is not None
    assert emails_only.redact("a@b.com 4242 4242 4242 4242") == "a***@b.com 4242 4242 4242 4242"
    assert build_redactor([]) is None


replies = st.lists(st.one_of(ORDINARY, PII_VALUES), min_size=1, max_size=30).map("".join)


@st.composite
def split_reply(draw: st.DrawFn) -> tuple[str, list[str]]:
    text = draw(replies)
    cuts = sorted(draw(st.lists(st.integers(0, len(text)), max_size=len(text))))
    bounds = [0, *cuts, len(text)]
    return text, [text[a:b] for a, b in itertools.pairwise(bounds)]


@settings(
    max_examples=int(os.environ.get("REDACT_EXAMPLES", "3000")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(split_reply())
def test_stream_equals_whole_for_any_split(case: tuple[str, list[str]]) -> None:
    text, pieces = case
    whole_counts: list[str] = []
    whole = REDACTOR.redact(text, whole_counts.append)
    stream_counts: list[str] = []
    stream = REDACTOR.stream(stream_counts.append)
    emitted = []
    for piece in pieces:
        emitted.append(stream.feed(piece))
        assert stream.held <= MAX_MATCH
    emitted.append(stream.flush())
    assert "".join(emitted) == whole
    assert sorted(stream_counts) == sorted(whole_counts)
    for value in (v for vs in PII.values() for v in vs):
        if value in text and value not in whole:
            assert all(value not in e for e in emitted)


def test_prose_is_held_back_by_at_most_a_word() -> None:
    stream = REDACTOR.stream()
    out = stream.feed("The quick brown fox jumps over the lazy dog and")
    assert out == "The quick brown fox jumps over the lazy dog "
    assert stream.flush() == "and"


@settings(max_examples=500, deadline=None)
@given(st.lists(st.one_of(ORDINARY, PII_VALUES), min_size=1, max_size=30).map(" ".join))
def test_redaction_is_idempotent(text: str) -> None:
    # Masks are not PII themselves (an echoed, already redacted prompt stays as it is) when
    # values stand apart; glued together ("a@b.com.DE89...") they may read as new ones.
    once = REDACTOR.redact(text)
    assert REDACTOR.redact(once) == once


def reference_redact(text: str) -> str:
    """The definition: one alternation of every pattern, searched leftmost-first."""
    import re

    from gateway.redact import _MASKERS, _PATTERNS

    pattern = re.compile("|".join(f"(?P<{k}>{p})" for k, p in _PATTERNS.items()))
    out, pos = [], 0
    while (m := pattern.search(text, pos)) is not None:
        masked = _MASKERS[m.lastgroup](m.group())  # type: ignore[index]
        out.append(text[pos : m.end()] if masked is None else text[pos : m.start()] + masked)
        pos = m.end()
    return "".join(out) + text[pos:]


@settings(max_examples=2000, deadline=None)
@given(replies)
def test_fast_search_equals_one_alternation(text: str) -> None:
    assert REDACTOR.redact(text) == reference_redact(text)
