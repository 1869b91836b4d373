"""Redaction: detectors, look-alikes, and exactness under every split of a stream."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import random
import re
import unicodedata
from collections import Counter

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gateway.redact import (
    ALL_KINDS,
    MAX_MATCH,
    MAX_PENDING_ESCAPE,
    YIELD_ABOVE_CHARS,
    StreamRedactor,
    build_redactor,
    redact_sliced,
    redact_yielding,
)

REDACTOR = build_redactor(ALL_KINDS)
assert REDACTOR is not None

PII = {
    "email": [
        "jane.doe@example.com",
        "a.b+tag@mail.example.co.uk",
        "x@y.io",
        "JOHN_SMITH@Corp.COM",
        "jane@students.engineering.university-example.edu",  # a domain of 44 characters
        "ops@" + "sub-domain." * 12 + "example.com",  # longer than a match sees
        "b" * 40 + "@example.org",  # local parts over 32 characters, and over RFC 5321's 64
        "c" * 70 + "@example.org",
        "jäne@exämple.com",  # internationalised (RFC 6531)
        "δοκιμή@παράδειγμα.δοκιμή",
    ],
    "card": ["4242 4242 4242 4242", "4111-1111-1111-1111", "5555555555554444", "378282246310005"],
    "phone": [
        "+1 415 555 2671",
        "(415) 555-2671",
        "415-555-2671",
        "+44 20 7946 0958",
        "+4930123456",
        "+44 (0)20 7946 0958",
        "090-1234-5678",
        "03-1234-5678",
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
    "ISBN 4-12-345678-9",
    "〒100-0001",
    # A git remote's "git@host": the user every git host serves SSH as, no one's address (it
    # was masked, "g***t@github.com:org/repo.git", which broke every clone command in a reply).
    "git@github.com:org/repo.git",
    "ssh://git@gitlab.example.com/group/repo.git",
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


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ('{"remote": "git@github.com:org/repo.git"}', '{"remote": "git@github.com:org/repo.git"}'),  # JSON text
        ("jane@server.example.com:backup/", "j***e@server.example.com:backup/"),  # a person's, in scp form
        ("git@example.com", "g***t@example.com"),  # no remote after it: an address
        ("git@github.com:jane.doe@example.com", "git@github.com:j***e@example.com"),
    ],
)
def test_a_git_remote_is_no_address(text: str, masked: str) -> None:
    assert REDACTOR.redact(text, json_text=text.startswith("{")) == masked


def test_mask_formats_follow_the_seed() -> None:
    assert REDACTOR.redact("jane@example.com") == "j***e@example.com"
    assert REDACTOR.redact("4242 4242 4242 4242") == "CC_MASKED_LAST4_4242"
    assert REDACTOR.redact("+1 415 555 2671") == "PHONE_MASKED_LAST2_71"


# Addresses that passed in clear, or half masked, before: a domain over 42 characters, a local
# part over 32, letters of other scripts (the local part's start leaked: "jän***@example.com").
ADDRESSES = [
    ("jane@students.engineering.university-example.edu", "j***e@students.engineering.university-example.edu"),
    ("ops@" + "sub-domain." * 12 + "example.com.", "o***s@" + "sub-domain." * 12 + "example.com."),
    ("x" * 33 + "@example.com", "x***x@example.com"),
    ("mail " + "y" * 64 + "@example.com!", "mail y***y@example.com!"),
    ("z" * 65 + "@example.com", "zz***z@example.com"),  # past RFC 5321's 64: its last 64 masked
    ("w" * 200 + "@example.com", "w" * 136 + "w***w@example.com"),
    ("jane@exämple.com", "j***e@exämple.com"),
    ("jäne@example.com", "j***e@example.com"),
    ("Écrire à élodie@exemple.fr.", "Écrire à é***e@exemple.fr."),
    ("δοκιμή@παράδειγμα.δοκιμή", "δ***ή@παράδειγμα.δοκιμή"),
    ("用户@例子.广告", "用***@例子.广告"),
    # An address followed by an "@" is still one (hypothesis put "@exam" after one in a stream),
    # its domain masked too: the domain's end may be the local part of an address glued to it.
    (" jane.doe@example.com@exam", " j***e@***@exam"),
    ("a@b.com@c.com", "a***@***@c.com"),
    ("x@example.com.bob@example.com", "x***@***@example.com"),  # bob's address showed
    ("ann@corp.iobob.smith@example.com", "a***n@***@example.com"),
    ("a@b.co@c.co@d.co", "a***@***@c***o@d.co"),  # a chain
    # An address right after an "@" (a Fediverse handle; one glued to what has no address).
    ("Follow @jane@mastodon.social", "Follow @j***e@mastodon.social"),
    ("a@b@example.com", "a@b***@example.com"),
    ("x@ex.com-bob@example.com", "x@e***b@example.com"),
    ("x@ex.com.b@e.com", "x@e***b@e.com"),
    # An address glued to the end of another's match (by a character of local parts only, a
    # dot, or a domain past sight that runs into it) is masked as well.
    ("x@example.com_bob@example.com", "x***@example.com***b@example.com"),
    ("x@example.com+bob@example.com", "x***@example.com***b@example.com"),
    ("a@0.aaa.@0.aa", "a***@0.aaa***@0.aa"),
    ("x@a." + "b" * 70 + ".bob@example.com", "x***@a." + "b" * 60 + "***b@example.com"),
]


@pytest.mark.parametrize(("text", "redacted"), ADDRESSES)
def test_long_and_international_addresses_are_masked(text: str, redacted: str) -> None:
    assert REDACTOR.redact(text) == redacted
    assert REDACTOR.redact(redacted) == redacted  # a mask stays a mask
    for cut in range(len(text) + 1):  # and in a stream, split anywhere
        assert stream_in_pieces(text, [cut], False) == redacted
    assert stream_in_pieces(text, list(range(len(text))), False) == redacted


# Addresses glued to one another: by an "@", a local part's character, or nothing at all.
GLUED_LOCAL = st.from_regex(r"[a-z][a-z0-9._%+-]{0,7}", fullmatch=True)
GLUED_DOMAIN = st.from_regex(r"[a-z0-9][a-z0-9-]{0,5}(\.[a-z0-9][a-z0-9-]{0,5}){0,2}\.[a-z]{2,5}", fullmatch=True)
GLUE = st.sampled_from(["", ".", "-", "@", "_", "+", " "])


@st.composite
def glued_addresses(draw: st.DrawFn) -> str:
    addresses = draw(st.lists(st.tuples(GLUE, GLUED_LOCAL, GLUED_DOMAIN), min_size=1, max_size=4))
    head = draw(st.sampled_from(["", "@", "mail ", "*"]))
    return head + "".join(f"{glue}{local}@{domain}" for glue, local, domain in addresses)


# What a reader takes for an address: the run of local-part characters before an "@" that a
# domain follows (one the pattern would take: a top-level domain that ends there). In a
# redacted text that run is a mask's tail (one letter after "*") or empty.
SHOWN_ADDRESS = re.compile(
    r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]+"
    r"(?=@[A-Za-z0-9][A-Za-z0-9.-]*?\.[A-Za-z]{2,}(?![A-Za-z0-9-]|\.[A-Za-z0-9]))"
)


@settings(
    max_examples=int(os.environ.get("REDACT_EXAMPLES", "3000")) // 6, deadline=None
)  # each example checks every split: 500 by default
@given(glued_addresses(), st.data())
def test_glued_addresses_never_leave_a_local_part_in_clear(text: str, data: st.DataObject) -> None:
    out = REDACTOR.redact(text)
    for shown in SHOWN_ADDRESS.finditer(out):
        assert len(shown.group()) == 1 and out[shown.start() - 1] == "*", (text, out)
    assert REDACTOR.redact(out) == out  # the masks stay masks
    assert out == reference_redact(text)
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=len(text)))
    assert stream_in_pieces(text, cuts, False) == out  # the split guarantee, held text bounded
    document = json.dumps({"to": text})  # and as JSON text (tool-call arguments)
    cuts = data.draw(st.lists(st.integers(0, len(document)), max_size=len(document)))
    assert stream_in_pieces(document, cuts, True) == REDACTOR.redact(document, json_text=True)
    assert json.loads(REDACTOR.redact(document, json_text=True)) == {"to": out}


# A number glued to an address: the address's local part took the number's last group
# ("0100jane.doe") and the groups before it, no number alone, passed in clear ("+1 415 555");
# or the number ended right before a local part that may not start there (".jane", "+jane", a
# letter of another script after a digit), and that address passed in clear. A number ends where
# a local part glued to it begins, and an address may start right where any match ended: the
# number is masked as a number and the address from its letters on. A number the address's
# local part takes in whole (no separator in it) is masked with it, as one address.
NUMBERS_GLUED_TO_ADDRESSES = [
    ("call +1 415 555 0100jane.doe@example.com", "call PHONE_MASKED_LAST2_00j***e@example.com"),
    ("card 4242 4242 4242 4242jane@example.com", "card CC_MASKED_LAST4_4242j***e@example.com"),
    ("iban DE89 3704 0044 0532 0130 00jane@example.com", "iban IBAN_MASKED_LAST4_3000j***e@example.com"),
    ("tel 020 7946 0958jane@example.com", "tel PHONE_MASKED_LAST2_58j***e@example.com"),
    ("tel (415) 555-2671jane@example.com", "tel PHONE_MASKED_LAST2_71j***e@example.com"),
    ("call +1 415 555 0100xavier@example.com", "call PHONE_MASKED_LAST2_00x***r@example.com"),
    ("call +1 415 555 0100.jane@example.com", "call PHONE_MASKED_LAST2_00***e@example.com"),
    ("call +1 415 555 0100-jane@example.com", "call PHONE_MASKED_LAST2_00***e@example.com"),
    ("call +1 415 555 0100_jane@example.com", "call PHONE_MASKED_LAST2_00***e@example.com"),
    ("call +1 415 555 0100+jane@example.com", "call PHONE_MASKED_LAST2_00***e@example.com"),
    ("card 4242 4242 4242 4242.jane@example.com", "card CC_MASKED_LAST4_4242***e@example.com"),
    ("call +1 415 555 0100\u200bjane@example.com", "call PHONE_MASKED_LAST2_00j***e@example.com"),
    # Other scripts: digits an address never takes, letters it does.
    (
        "call +1 \uff14\uff11\uff15 \uff15\uff15\uff15 \uff10\uff11\uff10\uff10jane@example.com",
        "call PHONE_MASKED_LAST2_00j***e@example.com",
    ),
    ("call +1 415 555 \u0660\u0661\u0660\u0660jane@example.com", "call PHONE_MASKED_LAST2_00j***e@example.com"),
    ("call +1 415 555 0100用户@例子.广告", "call PHONE_MASKED_LAST2_00用***@例子.广告"),
    ("call +1 415 555 0100δοκιμή@παράδειγμα.δοκιμή", "call PHONE_MASKED_LAST2_00δ***ή@παράδειγμα.δοκιμή"),
    (
        "\u0968\u0969\u0966\u096f 4242 4242 4242 4242jäne@exämple.com",
        "\u0968\u0969\u0966\u096f CC_MASKED_LAST4_4242j***e@exämple.com",
    ),
    # A local part with a letter of another script and then digits: a stream cut right after
    # those digits held too little ("…4242jö2", then "@…", showed "4242 4242 4242" in clear).
    ("card 4242 4242 4242 4242jö2@example.com", "card CC_MASKED_LAST4_4242j***@example.com"),
    ("tel (415) 555-2671_msé0jane@example.com", "tel PHONE_MASKED_LAST2_71***e@example.com"),
    # Taken in whole by the local part: one mask, nothing in clear.
    ("tel 415-555-2671jane@example.com", "tel ***e@example.com"),
    ("ssn 123-45-6789_jane@example.com", "ssn ***e@example.com"),
    ("card 5555555555554444jane@example.com", "card ***e@example.com"),
    # A number glued to letters that are no local part stays as it is; so does a near-miss card.
    ("id 4242424242424242abc, v 4242 4242 4242 4242abc", None),
    ("4242 4242 4242 4241jane@example.com", "4242 4242 4242 ***e@example.com"),
]


@pytest.mark.parametrize(("text", "redacted"), NUMBERS_GLUED_TO_ADDRESSES)
def test_a_number_glued_to_an_address_leaves_neither_in_clear(text: str, redacted: str | None) -> None:
    expected = text if redacted is None else redacted
    assert REDACTOR.redact(text) == expected == reference_redact(text)
    for cut in range(len(text) + 1):  # in a stream, split anywhere
        assert stream_in_pieces(text, [cut], False) == expected
    assert stream_in_pieces(text, list(range(len(text))), False) == expected
    for document in (json.dumps({"to": text}), json.dumps({"to": text}, ensure_ascii=False)):  # tool-call arguments
        whole = REDACTOR.redact(document, json_text=True)
        assert json.loads(whole) == {"to": expected}
        assert stream_in_pieces(document, list(range(len(document))), True) == whole


GLUED_NUMBERS = st.sampled_from([v for kind in ("card", "phone", "iban", "ssn") for v in PII[kind]])
NUMBER_GLUE = st.sampled_from(["", ".", "-", "_", "+", "%", "\u200b"])
MASK = re.compile(r"(?:CC|PHONE|IBAN)_MASKED_LAST\d_\d+|SSN_MASKED")


@st.composite
def numbers_glued_to_addresses(draw: st.DrawFn) -> str:
    parts = []
    for _ in range(draw(st.integers(1, 3))):
        number = draw(GLUED_NUMBERS)
        if draw(st.booleans()):  # its digits in another script
            zero = draw(st.sampled_from([0xFF10, 0x660, 0x966]))
            number = "".join(chr(zero + int(c)) if "0" <= c <= "9" else c for c in number)
        local = draw(st.from_regex(r"[a-zà-öø-ÿα-ω][a-z0-9._%+-]{0,7}", fullmatch=True))
        parts.append(draw(st.sampled_from([" ", "call ", "\u0928 "])) + number + draw(NUMBER_GLUE) + local)
        parts.append("@" + draw(st.sampled_from(["example.com", "exämple.org", "mail.example.co.uk"])))
    return "".join(parts)


@settings(max_examples=int(os.environ.get("REDACT_EXAMPLES", "3000")) // 6, deadline=None)
@given(numbers_glued_to_addresses(), st.data())
def test_numbers_glued_to_addresses_show_no_digit_and_stream_as_whole(text: str, data: st.DataObject) -> None:
    out = REDACTOR.redact(text)
    assert out == reference_redact(text)
    assert not any(c.isdecimal() for c in MASK.sub("", out)), (text, out)  # no digit of a number in clear
    for shown in SHOWN_ADDRESS.finditer(out):
        assert len(shown.group()) == 1 and out[shown.start() - 1] == "*", (text, out)
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=len(text)))
    assert stream_in_pieces(text, cuts, False) == out
    document = json.dumps({"to": text})
    whole = REDACTOR.redact(document, json_text=True)
    assert json.loads(whole) == {"to": out}
    cuts = data.draw(st.lists(st.integers(0, len(document)), max_size=len(document)))
    assert stream_in_pieces(document, cuts, True) == whole


@pytest.mark.parametrize(
    "text",
    [
        "jane@" + "a" * 70 + ".example.com",  # a first label past RFC 1035's 63: no dot in sight
        "*x@example.com",  # a mask's tail ("j***x@example.com"): one letter after a "*"
        "jane@exämple.c0m",
        "jane@١٢٣.com",  # digits of other scripts are no letters
    ],
)
def test_addresses_that_stay_as_they_are(text: str) -> None:
    assert REDACTOR.redact(text) == text
    assert stream_in_pieces(text, list(range(len(text))), False) == text


# Markdown emphasis around an address (LLM replies bold them): the "*" before it once kept it
# in clear, as a mask's tail; a mask's tail is one letter, an address after "*" is longer.
@pytest.mark.parametrize(
    ("text", "redacted"),
    [
        ("Email: **jane.doe@example.com**", "Email: **j***e@example.com**"),
        ("*jane@example.com*", "*j***e@example.com*"),
        ("***jane@example.com***", "***j***e@example.com***"),
        ("**j***e@example.com**", "**j***e@example.com**"),  # a mask, bold, stays as it is
    ],
)
def test_addresses_in_markdown_emphasis_are_masked(text: str, redacted: str) -> None:
    assert REDACTOR.redact(text) == redacted
    assert REDACTOR.redact(redacted) == redacted
    assert stream_in_pieces(text, list(range(len(text))), False) == redacted


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


@settings(max_examples=300, deadline=None)
@given(split_reply(), split_reply(), st.booleans())
# An "e" before the flush made the "+" after it an exponent's sign: '+1 "PHONE_MASKED_LAST2_71"'.
@example(before=("call me", ["call me"]), after=("+1 415 555 2671", ["+1 415 555 2671"]), json_text=True)
def test_text_fed_after_a_flush_never_shows_pii_in_clear(
    before: tuple[str, list[str]], after: tuple[str, list[str]], json_text: bool
) -> None:
    # An upstream that goes on after a part's end: the text after the flush is redacted as a
    # text of its own (a match reaching back into what was sent must not hide the rest).
    stream = REDACTOR.stream(json_text=json_text)
    emitted = [stream.feed(piece) for piece in before[1]] + [stream.flush()]
    emitted += [stream.feed(piece) for piece in after[1]] + [stream.flush()]
    assert "".join(emitted[len(before[1]) + 1 :]) == REDACTOR.redact(after[0], json_text=json_text)


def test_a_match_reaching_back_across_a_flush_leaves_nothing_in_clear() -> None:
    for json_text, head in ((False, "write j"), (True, '{"to": "j')):
        stream = REDACTOR.stream(json_text=json_text)
        stream.feed(head)
        stream.flush()
        assert "ane.doe@example.com" not in stream.feed("ane.doe@example.com, ok") + stream.flush()


@settings(max_examples=500, deadline=None)
@given(st.lists(st.one_of(ORDINARY, PII_VALUES), min_size=1, max_size=30).map(" ".join))
def test_redaction_is_idempotent(text: str) -> None:
    # Masks are not PII themselves (an echoed, already redacted prompt stays as it is) when
    # values stand apart; glued together ("a@b.com.DE89...") they may read as new ones.
    once = REDACTOR.redact(text)
    assert REDACTOR.redact(once) == once


# Every space character (Zs) but those the patterns take as they are, every format character (Cf),
# and every default-ignorable code point (Unicode's Default_Ignorable_Code_Point, from
# DerivedCoreProperties.txt: unicodedata has no such property; U+13439-1343F are Cf from Unicode 15).
SPACES_AND_FORMATS = frozenset(
    c for c in map(chr, range(0x110000)) if unicodedata.category(c) in ("Zs", "Cf") and c not in " \u00a0\u202f"
) | frozenset(
    map(
        chr,
        [
            *range(0x115F, 0x1161), *range(0x17B4, 0x17B6), *range(0x180B, 0x1810), 0x034F, 0x3164, 0xFFA0,
            *range(0xFE00, 0xFE10), *range(0xFFF0, 0xFFF9), *range(0x2060, 0x2070), *range(0xE0000, 0xE1000),
            *range(0x13430, 0x13440),
        ],
    )
)  # fmt: skip


def reference_redact(text: str, parts: dict[str, tuple[str, str, str]] | None = None) -> str:
    """The definition, slowly: at each position in turn, the first kind (in the order email,
    card, phone, iban, ssn) with a valid span there, then its longest span. A card or phone
    span is any length its look-behind, body, look-ahead and check allow, except that it may
    not take in the start of a valid card or phone lying past its shortest span's end, nor a
    phone span the start of any valid card; the other kinds' span is the one their pattern
    matches. After a match the next search starts at its end; after an IBAN candidate that
    fails its check (and no card or phone there), the other kinds' search (not the email's)
    goes on at the candidate's end. Right where a match ended (an address, or a number, whose
    look-ahead holds where a local part glued to it begins) an address may start whatever its
    look-behind says (glued to it); an address followed by an "@" has its domain masked.
    Every kind but the email reads every script's decimal digits as ASCII's, and the other dashes,
    tabs, every other space character and every invisible format character (`SPACES_AND_FORMATS`) as
    spaces: it is matched and masked in `digits`, the text with each digit its ASCII digit and
    each of those a space."""

    from gateway.redact import _MASKERS, _PARTS, MAX_MATCH, _mask_email

    dashes = (
        "\u2012\u2013\u2014\u2015\t\u3000\u200b\u200c\u200d\u2060\ufeff"
        "\u00ad\u061c\u180e\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2061\u2062\u2063\u2064\u2066\u2067\u2068\u2069"
        "\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a\u205f"
        "\u2065\u206a\u206b\u206c\u206d\u206e\u206f\u034f\u115f\u1160\u17b4\u17b5\u180b\u180c\u180d\u180f\u3164\uffa0"
        + "".join(map(chr, range(0xFE00, 0xFE10)))
        # Past U+FFFF: tags and the variation selectors supplement, musical and shorthand formats.
        + "".join(map(chr, [*range(0xE0000, 0xE1000), *range(0x1D173, 0x1D17B), *range(0x1BCA0, 0x1BCA4)]))
    )
    viewed = {"\uff0d": "\u2010", "\u2212": "\u2010"}  # the full-width hyphen-minus and the minus are hyphens
    digits = "".join(
        str(unicodedata.digit(c))
        if c.isdecimal()
        else " "
        if c in dashes or c in SPACES_AND_FORMATS
        else viewed.get(c, c)
        for c in text
    )

    kinds = parts or _PARTS
    compiled = {k: (re.compile(b), re.compile(body), re.compile(a)) for k, (b, body, a) in kinds.items()}
    whole = {k: re.compile(b + body + a) for k, (b, body, a) in kinds.items()}

    def ends(kind: str, s: int) -> list[int]:
        behind, body, ahead = compiled[kind]
        if behind.match(digits, s) is None:
            return []
        return [
            p
            for p in range(s + 1, min(len(text), s + MAX_MATCH) + 1)
            if body.fullmatch(digits, s, p) and ahead.match(digits, p) and _MASKERS[kind](digits[s:p]) is not None
        ]

    def decide(s: int) -> tuple[int, str | None]:
        resume = len(text)
        for kind in kinds:
            if kind == "email":
                continue
            if kind not in ("card", "phone"):
                m = whole[kind].match(digits, s)
                if m is not None:
                    if _MASKERS[kind](m.group()) is not None:
                        return m.end(), kind
                    resume = min(resume, m.end())
                continue
            valid = ends(kind, s)
            if valid:
                shortest = valid[0]
                for q in range(s + 1, valid[-1]):
                    past = q >= shortest
                    if (past and (ends("card", q) or ends("phone", q))) or (kind == "phone" and ends("card", q)):
                        valid = [p for p in valid if p <= q]
                        break
            if valid:
                return valid[-1], kind
            if whole[kind].match(digits, s):
                resume = s + 1
        return min(resume, s + 1) if resume == len(text) else resume, None

    glued = re.compile(kinds["email"][1]) if "email" in kinds else None  # no look-behind
    out, pos, s, other_from, after = [], 0, 0, 0, -1
    while s < len(text):
        email = whole["email"].match(text, s) if "email" in kinds else None
        if email is None and s == after and glued is not None:  # right where an address ended
            email = glued.match(text, s)
        if email is not None and text.startswith("git@", s) and text[email.end() : email.end() + 1] in (":", "/"):
            email = None  # a git remote's user and host (git@github.com:org/repo.git): no one's address
        if email is not None:
            end, kind = email.end(), "email"
            # An "@" right after it: the domain is masked too (it may end in a glued address's local part).
            after = end
            if text.startswith("@", end):
                out.append(text[pos:s] + _mask_email(text[s:end], glued=True))
                pos = s = end
                continue
        elif s >= other_from:
            end, kind = decide(s)
            other_from = end
        else:
            end, kind = s + 1, None
        if kind is None:
            s += 1
            continue
        out.append(text[pos:s] + str(_MASKERS[kind]((text if kind == "email" else digits)[s:end])))
        pos = s = after = end  # an address may be glued to any match
    return "".join(out) + text[pos:]


@settings(max_examples=int(os.environ.get("REDACT_EXAMPLES", "3000")) // 3, deadline=None)
@given(replies)
def test_fast_search_equals_the_definition(text: str) -> None:
    assert REDACTOR.redact(text) == reference_redact(text)


# The phone pattern before its digit groups were made possessive (they backtracked for
# ~250 µs at a "+" before 25 digits): the outputs must be the same.
def old_phone_body() -> str:
    from gateway.redact import _PARTS

    return _PARTS["phone"][1].replace("{1,4}+", "{1,4}")


PHONE_PARTS = st.sampled_from(
    [
        "+",
        "+1",
        "+44",
        " ",
        "-",
        ".",
        "(",
        ")",
        "(0)",
        "x",
        ",",
        "1",
        "12",
        "123",
        "1234",
        "2671",
        "555",
        "4242",
        "DE89",
    ]
)


@settings(max_examples=1000, deadline=None)
@given(st.lists(PHONE_PARTS, min_size=1, max_size=16).map("".join))
def test_possessive_phone_groups_change_no_output(text: str) -> None:
    from gateway.redact import _PARTS

    old = {**_PARTS, "phone": (_PARTS["phone"][0], old_phone_body(), _PARTS["phone"][2])}
    assert REDACTOR.redact(text) == reference_redact(text, old)


# Numbers next to numbers: cards with their CVV and expiry, phones after phones, cards after
# phones and the other way round, glued or spaced in every way.
NUMBER_PARTS = st.sampled_from(
    [
        "4242 4242 4242 4242",
        "4242",
        "4111 1111 1111 1111",
        "378282246310005",
        "+1 415 555 2671",
        "+44 20 7946 0958",
        "415 555 2671",
        "(415) 555-2671",
        "+1",
        "+",
        "123",
        "12",
        "27",
        "5",
        "2671",
        "555",
        "0",
        " ",
        " ",
        "-",
        ".",
        ",",
        "(",
        ")",
        "/",
        "x",
        "@a.io",
        "j",
        "1-",
        "\u00a0",
        "\u202f",
        "\u2011",
        "4242\u00a04242\u00a04242\u00a04242",
        "x12",
    ]
)
NUMBER_TEXTS = st.lists(NUMBER_PARTS, min_size=1, max_size=12).map("".join)


@settings(max_examples=int(os.environ.get("REDACT_EXAMPLES", "3000")) // 2, deadline=None)
@given(NUMBER_TEXTS)
def test_numbers_next_to_numbers_follow_the_definition(text: str) -> None:
    assert REDACTOR.redact(text) == reference_redact(text)


@settings(
    max_examples=int(os.environ.get("REDACT_EXAMPLES", "3000")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(NUMBER_TEXTS, st.data())
def test_numbers_next_to_numbers_stream_equal_whole_for_any_split(text: str, data: st.DataObject) -> None:
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=len(text)))
    assert stream_in_pieces(text, cuts, False) == REDACTOR.redact(text)
    assert stream_in_pieces(text, cuts, True) == REDACTOR.redact(text, json_text=True)


# Near-miss cards (Luhn fails) among cards, phones, SSNs and IBANs, in groups of every size: the
# card's fast paths (no other kind tried at a card's start, the search going on past its first
# four digits, no shorter span looked for when the digits before the last group are too few).
NEAR_MISS_PARTS = st.sampled_from(
    [
        "4242 4242 4242 4241",
        "4242 4242 4242 4242",
        "4242 4242 4242 4 2424",  # thirteen digits before the last group
        "4242424242424241",
        "4242-4242-4242-4241",
        "4242.4242.4242.4241",
        "4242",
        "4241",
        "424",
        "42",
        "4",
        "2125",
        "5555 5555 5555 4444",
        "415 555 2671",
        "212-555-0123",
        "123-45-6789",
        "DE89 3704 0044 0532 0130 00 ",
        "+1",
        "+",
        "(",
        ")",
        " ",
        "  ",
        "-",
        "\u2011",
        "\u00a0",
        ".",
        ",",
        "x",
        "A",
        "0",
        "1 ",
    ]
)
NEAR_MISS_TEXTS = st.lists(NEAR_MISS_PARTS, min_size=1, max_size=12).map("".join)


@settings(max_examples=int(os.environ.get("REDACT_EXAMPLES", "3000")) // 2, deadline=None)
@given(NEAR_MISS_TEXTS)
def test_near_miss_cards_follow_the_definition(text: str) -> None:
    assert REDACTOR.redact(text) == reference_redact(text)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(NEAR_MISS_TEXTS, st.data())
def test_near_miss_cards_stream_equal_whole_for_any_split(text: str, data: st.DataObject) -> None:
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=len(text)))
    assert stream_in_pieces(text, cuts, False) == REDACTOR.redact(text)


@settings(max_examples=1000, deadline=None)
@given(NEAR_MISS_TEXTS | st.text("0123456789 -.+()AZx\u2011\u00a0", max_size=40))
def test_no_kind_starts_after_a_digit_nor_where_a_card_does(text: str) -> None:
    # What the card's fast paths rest on: after a card candidate fails, no other kind is tried
    # at its start, and the search goes on past its first four characters (digits).
    from gateway.redact import _PATTERNS

    others = re.compile("|".join(_PATTERNS[k] for k in ("phone", "iban", "ssn")))
    card = re.compile(_PATTERNS["card"])
    for start in range(len(text)):
        if card.match(text, start):
            assert others.match(text, start) is None
        if start and text[start - 1] in "0123456789":
            assert not any(re.compile(_PATTERNS[k]).match(text, start) for k in ("card", "phone", "iban", "ssn"))


def luhn_textbook(digits: str) -> bool:
    total = 0
    for i, c in enumerate(reversed(digits)):
        d = int(c) * (2 if i % 2 else 1)
        total += d - 9 if d > 9 else d
    return total % 10 == 0


@settings(max_examples=1000, deadline=None)
@given(st.text("0123456789 -.+()\u2011\u00a0\u202f", max_size=40))
def test_card_check_is_luhn_over_13_to_19_digits(text: str) -> None:
    from gateway.redact import _mask_card

    digits = "".join(c for c in text if c in "0123456789")
    valid = 13 <= len(digits) <= 19 and luhn_textbook(digits)
    assert _mask_card(text) == (f"CC_MASKED_LAST4_{digits[-4:]}" if valid else None)


@pytest.mark.parametrize(
    ("text", "redacted"),
    [
        ("card 4242 4242 4242 4242 123", "card CC_MASKED_LAST4_4242 123"),
        ("4242 4242 4242 4242 12 27", "CC_MASKED_LAST4_4242 12 27"),
        ("4111 1111 1111 1111 737 exp 12/27", "CC_MASKED_LAST4_1111 737 exp 12/27"),
        ("+1 415 555 2671 4242 4242 4242 4242", "PHONE_MASKED_LAST2_71 CC_MASKED_LAST4_4242"),
        ("+44 20 7946 0958 4242 4242 4242 4242", "PHONE_MASKED_LAST2_58 CC_MASKED_LAST4_4242"),
        ("+1 415 555 2671 415 555 2672", "PHONE_MASKED_LAST2_71 PHONE_MASKED_LAST2_72"),
        ("4242 4242 4242 4242 415 555 2671", "CC_MASKED_LAST4_4242 PHONE_MASKED_LAST2_71"),
        ("+1 4242 4242 4242 4242", "+1 CC_MASKED_LAST4_4242"),  # a card is never a phone's tail
        ("4242 4242 4242 4241 4242 4242 4242 4242", "4242 4242 4242 4241 CC_MASKED_LAST4_4242"),
    ],
)
def test_pii_inside_a_failed_candidate_is_masked(text: str, redacted: str) -> None:
    assert REDACTOR.redact(text) == redacted
    assert stream_in_pieces(text, list(range(len(text))), False) == redacted


def redacts_whole_streamed_and_long(text: str, redacted: str | None) -> None:
    """`text` redacts to `redacted` (None: unchanged) whole, streamed a character at a time, and
    repeated 40 times (long enough for the byte-level run search)."""
    expected = text if redacted is None else redacted
    assert REDACTOR.redact(text) == expected
    assert stream_in_pieces(text, list(range(len(text))), False) == expected
    assert REDACTOR.redact((text + " ") * 40) == (expected + " ") * 40


@pytest.mark.parametrize(
    ("text", "redacted"),
    [
        ("call 1-415-555-2671 now", "call PHONE_MASKED_LAST2_71 now"),
        ("call 1 (415) 555-2671", "call PHONE_MASKED_LAST2_71"),
        ("ext 415-555-2671x123", "ext PHONE_MASKED_LAST2_71x123"),
        ("pay 4242\u00a04242\u00a04242\u00a04242 now", "pay CC_MASKED_LAST4_4242 now"),
        ("pay 4242\u202f4242\u202f4242\u202f4242", "pay CC_MASKED_LAST4_4242"),
        ("tel +33\u00a01\u00a023\u00a045\u00a067\u00a089", "tel PHONE_MASKED_LAST2_89"),
        # Unicode's hyphens as ASCII's: models write numbers with the no-break one (U+2011).
        ("call 415\u2011555\u20112671 now", "call PHONE_MASKED_LAST2_71 now"),
        ("call +1\u2011415\u2011555\u20112671", "call PHONE_MASKED_LAST2_71"),
        ("pay 4242\u20114242\u20114242\u20114242 now", "pay CC_MASKED_LAST4_4242 now"),
        ("ssn 078\u201105\u20111120.", "ssn SSN_MASKED."),
        ("ssn 078\u201005\u20101120", "ssn SSN_MASKED"),
        ("years 2020\u20112021 v1\u20112\u20113", None),
        ("id X\u20114242\u20114242\u20114242\u20114242", None),  # a hyphen before keeps it whole, as "-" does
        # Look-alikes stay.
        ("415-555-2671xyz", None),
        ("1920x1080 at 60 Hz", None),
        ("1-800-FLOWERS", None),
    ],
)
def test_north_american_prefix_extension_and_no_break_spaces(text: str, redacted: str | None) -> None:
    redacts_whole_streamed_and_long(text, redacted)


# Cards as people write them: four groups of four set apart by dots, and right after an
# abbreviation's dot ("Card No.4111…"). A dot after a digit still keeps a number whole
# (decimals, versions), and five dotted groups or a decimal tail are no card.
@pytest.mark.parametrize(
    ("text", "redacted"),
    [
        ("card 4242.4242.4242.4242 exp", "card CC_MASKED_LAST4_4242 exp"),
        ("card 4242.4242.4242.4242.", "card CC_MASKED_LAST4_4242."),
        ("Card No.4111111111111111", "Card No.CC_MASKED_LAST4_1111"),
        ("Card no.4111 1111 1111 1111.", "Card no.CC_MASKED_LAST4_1111."),
        # Look-alikes stay.
        ("v1.4242424242424242", None),
        ("4242.4242.4242.4242.4242", None),
        ("4242.4242.4242.4242.5", None),
        ("4242.4242.4242.4241", None),
        ("pi 3.4242424242424242", None),
    ],
)
def test_dotted_cards_and_cards_after_an_abbreviation(text: str, redacted: str | None) -> None:
    redacts_whole_streamed_and_long(text, redacted)


# Phones as people write them: the country code in brackets ("(+44) 20 …", UK and Asian
# signatures), and right after an abbreviation's dot ("Tel.+49 …"). A "+" number in brackets
# is held to the same 8-15 digits, and a dot after a digit still keeps a number whole.
@pytest.mark.parametrize(
    ("text", "redacted"),
    [
        ("call (+44) 20 7946 0958 today", "call PHONE_MASKED_LAST2_58 today"),
        ("(+44)20 7946 0958", "PHONE_MASKED_LAST2_58"),
        ("(+91) 98765 43210.", "PHONE_MASKED_LAST2_10."),
        ("(+33) 1 23 45 67 89", "PHONE_MASKED_LAST2_89"),
        ("Tel.+49 30 123456", "Tel.PHONE_MASKED_LAST2_56"),
        ("Ph.+1 415 555 2671", "Ph.PHONE_MASKED_LAST2_71"),
        ("Tel.415-555-2671", "Tel.PHONE_MASKED_LAST2_71"),
        # Look-alikes stay.
        ("(+1) 23 45", None),
        ("(+44) 20", None),
        ("v1.415-555-2671", None),
        ("1.+49 30 123456", None),
    ],
)
def test_bracketed_country_codes_and_phones_after_an_abbreviation(text: str, redacted: str | None) -> None:
    redacts_whole_streamed_and_long(text, redacted)


# National formats without a "+": British (a leading 0, spaces as Ofcom writes them: 020 7946
# 0958, 0161 496 0000, 07700 900123, an area code in brackets), French (five pairs), Japanese
# and Korean (three hyphenated groups, the last of four: 090-1234-5678, 03-1234-5678).
# Bare digit runs, other groupings and numbers without the leading 0 stay as they are.
@pytest.mark.parametrize(
    ("text", "redacted"),
    [
        ("call 020 7946 0958 today", "call PHONE_MASKED_LAST2_58 today"),
        ("(020) 7946 0958", "PHONE_MASKED_LAST2_58"),
        ("ring 0161 496 0000.", "ring PHONE_MASKED_LAST2_00."),
        ("mobile 07700 900123", "mobile PHONE_MASKED_LAST2_23"),
        ("mobile 07700 900 123", "mobile PHONE_MASKED_LAST2_23"),
        ("(01632) 960000", "PHONE_MASKED_LAST2_00"),
        ("appelez le 01 23 45 67 89", "appelez le PHONE_MASKED_LAST2_89"),
        ("tél. 06.12.34.56.78", "tél. PHONE_MASKED_LAST2_78"),
        ("携帯 090-1234-5678 まで", "携帯 PHONE_MASKED_LAST2_78 まで"),
        ("전화 010-1234-5678", "전화 PHONE_MASKED_LAST2_78"),
        ("Tokyo 03-1234-5678.", "Tokyo PHONE_MASKED_LAST2_78."),
        ("Seoul 02-123-4567", "Seoul PHONE_MASKED_LAST2_67"),
        ("Yokohama 045-123-4567", "Yokohama PHONE_MASKED_LAST2_67"),
        ("0123-45-6789", "PHONE_MASKED_LAST2_89"),
        ("０９０－１２３４－５６７８", "PHONE_MASKED_LAST2_78"),
        # Look-alikes stay.
        ("ISBN 0 306 40615 2", None),
        ("02079460958", None),
        ("0000 123 4567", None),
        ("steps 01 23 45", None),
        ("01.23.45.67.89.10", None),
        ("ids 20 7946 0958", None),
        ("FedEx 7489 1234 5678", None),
        ("01-23-4567", None),
        ("090-1234-56789", None),
        ("090-1234-5678-9", None),
        ("A03-1234-5678", None),
        # Groups set apart by spaces, or a space and a hyphen, are tables, lists and ranges:
        # only hyphens make the Japanese and Korean forms.
        ("ID Qty Price\n01 1200 3400\n02 1500 2000", None),
        ("Shift 02 0800-1600, Season 01 2024-2025, Vol. 03 1998-2004", None),
        ("week 05 2024 1234, at 10:05 1234 5678, 0930 12 2024", None),
        ("TSV\t01\t1234\t5678", None),
        ("Case 01-2023-0001, No. 05-2023-1234, ref 09-1234-5678", None),  # no two-digit area code
        ("Osaka 06-1234-5678, Chiba 04-7123-4567", "Osaka PHONE_MASKED_LAST2_78, Chiba PHONE_MASKED_LAST2_67"),
        ("携帯 ０３－１２３４－５６７８", "携帯 PHONE_MASKED_LAST2_78"),
        ("전화 010\u20111234\u20115678", "전화 PHONE_MASKED_LAST2_78"),
        ("TEL 03\u22121234\u22125678", "TEL PHONE_MASKED_LAST2_78"),  # JIS's hyphen-minus as U+2212
    ],
)
def test_british_french_japanese_and_korean_national_phones(text: str, redacted: str | None) -> None:
    redacts_whole_streamed_and_long(text, redacted)


# JSON texts (tool-call arguments): strings from the same parts as replies, numbers that are
# card numbers (or almost), nested; dumped in every style the stdlib has.
JSON_STRINGS = st.lists(st.one_of(ORDINARY, PII_VALUES, st.text(max_size=3)), max_size=5).map("".join)
NUMBERS = st.one_of(
    st.sampled_from([4242424242424242, 5555555555554444, 378282246310005, 4242424242424241, -4242424242424242]),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
)
JSON_VALUES = st.recursive(
    st.one_of(JSON_STRINGS, NUMBERS, st.booleans(), st.none()),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(JSON_STRINGS, inner, max_size=4),
    max_leaves=12,
)


@st.composite
def json_documents(draw: st.DrawFn) -> tuple[object, str]:
    value = draw(JSON_VALUES)
    text = json.dumps(
        value,
        ensure_ascii=draw(st.booleans()),
        indent=draw(st.sampled_from([None, 2])),
        separators=draw(st.sampled_from([(",", ":"), (", ", ": ")])),
    )
    return value, text


def expected_json(value: object) -> object:
    """What redacting a JSON text must give, once parsed: every string (keys too) redacted as a
    text of its own, and a bare number that is a card number its mask, as a string."""
    if isinstance(value, str):
        return REDACTOR.redact(value)
    if isinstance(value, list):
        return [expected_json(item) for item in value]
    if isinstance(value, dict):
        return {expected_json(k): expected_json(v) for k, v in value.items()}
    if type(value) is int:
        masked = REDACTOR.redact(str(value))
        return masked if masked != str(value) else value
    return value


def stream_in_pieces(text: str, cuts: list[int], json_text: bool) -> str:
    stream = REDACTOR.stream(json_text=json_text)
    bounds = [0, *sorted(cuts), len(text)]
    out = [stream.feed(text[a:b]) for a, b in itertools.pairwise(bounds)]
    assert stream.held <= MAX_MATCH + (MAX_PENDING_ESCAPE if json_text else 0)
    return "".join(out) + stream.flush()


@settings(max_examples=750, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(json_documents(), st.data())
def test_json_text_stays_json_and_streams_equal_whole(document: tuple[object, str], data: st.DataObject) -> None:
    value, text = document
    counted: list[str] = []
    whole = REDACTOR.redact(text, counted.append, json_text=True)
    assert json.loads(whole) == expected_json(value)
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=12))
    assert stream_in_pieces(text, cuts, True) == whole


def escaped_inside_strings(text: str, chosen: random.Random) -> str:
    """The JSON text with about a third of its strings' characters written as \\u escapes
    (a client's parser reads the same document)."""
    out: list[str] = []
    in_string, i = False, 0
    while i < len(text):
        c = text[i]
        if in_string and c == "\\":
            width = 6 if text[i + 1] == "u" else 2
            out.append(text[i : i + width])
            i += width
            continue
        if c == '"':
            in_string = not in_string
        elif in_string and ord(c) < 0x10000 and chosen.random() < 0.3:
            c = f"\\u{ord(c):04x}"
        out.append(c)
        i += 1
    return "".join(out)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(json_documents(), st.randoms(use_true_random=False), st.data())
def test_json_text_written_with_escapes_is_redacted_as_a_parser_reads_it(
    document: tuple[object, str], chosen: random.Random, data: st.DataObject
) -> None:
    # "jane.doe\u0040example.com" is an address to the client that parses the arguments.
    value, text = document
    escaped = escaped_inside_strings(text, chosen)
    assert json.loads(escaped) == json.loads(text)
    whole = REDACTOR.redact(escaped, json_text=True)
    assert json.loads(whole) == expected_json(value)
    cuts = data.draw(st.lists(st.integers(0, len(escaped)), max_size=12))
    assert stream_in_pieces(escaped, cuts, True) == whole


JSONISH = st.lists(
    st.one_of(
        st.sampled_from(['"', "\\", "\\u", "00e9", ",", "+", "e", "[", "]", "{", "}", ":", " ", "1"]), PII_VALUES
    ),
    max_size=30,
).map("".join)


@settings(max_examples=750, deadline=None)
@given(st.one_of(JSONISH, json_documents().map(lambda document: document[1])), st.data())
def test_json_text_any_split_of_any_text_equals_whole(text: str, data: st.DataObject) -> None:
    whole = REDACTOR.redact(text, json_text=True)
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=len(text)))
    assert stream_in_pieces(text, cuts, True) == whole
    try:
        json.loads(text)
    except ValueError:
        return
    json.loads(whole)  # valid JSON in, valid JSON out


@pytest.mark.parametrize(
    ("text", "redacted"),
    [
        ('{"card": 4242424242424242}', '{"card": "CC_MASKED_LAST4_4242"}'),
        ('{"card": "4242424242424242"}', '{"card": "CC_MASKED_LAST4_4242"}'),
        ("[4242424242424242,5555555555554444]", '["CC_MASKED_LAST4_4242","CC_MASKED_LAST4_4444"]'),
        ('{"to": "jane.doe@example.com"}', '{"to": "j***e@example.com"}'),
        ('{"n": "line\\n4242 4242 4242 4242"}', '{"n": "line\\nCC_MASKED_LAST4_4242"}'),  # an escape is a break
        ('{"to": "caf\\u00b7jane@example.com"}', '{"to": "caf\\u00b7j***e@example.com"}'),  # never cut
        # An escaped letter is that letter, as the client's parser reads it: one local part.
        ('{"to": "j\\u00e4ne@ex\\u00e4mple.com"}', '{"to": "j***e@exämple.com"}'),
        ('{"to": "caf\\u00e9jane@example.com"}', '{"to": "c***e@example.com"}'),
        ('{"x": 1e+4242424242424242}', '{"x": 1e+4242424242424242}'),  # an exponent is no card
        ('{"n": -4242424242424242}', '{"n": -4242424242424242}'),
        ("4242424242424242", '"CC_MASKED_LAST4_4242"'),
        # A "+" outside strings but after an exponent's e: no JSON, prose (structured output that
        # came as prose, a refusal) or a value JSON has no form for. Its phone is a phone, as in prose.
        ("Call +44 20 7946 0958 now", 'Call "PHONE_MASKED_LAST2_58" now'),
        ('{"q": +14155550123}', '{"q": "PHONE_MASKED_LAST2_23"}'),
        ("Tel:+33 1 42 68 53 00", 'Tel:"PHONE_MASKED_LAST2_00"'),
    ],
)
def test_json_text_masks(text: str, redacted: str) -> None:
    assert REDACTOR.redact(text, json_text=True) == redacted
    assert stream_in_pieces(text, list(range(len(text))), True) == redacted


@settings(max_examples=500, deadline=None)
@given(st.one_of(replies, JSONISH), st.booleans(), st.integers(1, 40))
def test_redact_yielding_equals_redact(text: str, json_text: bool, slice_chars: int) -> None:
    expected: list[str] = []
    got: list[str] = []
    whole = REDACTOR.redact(text, expected.append, json_text=json_text)
    assert asyncio.run(redact_yielding(REDACTOR, text, got.append, json_text, slice_chars=slice_chars)) == whole
    assert sorted(got) == sorted(expected)


@settings(max_examples=500, deadline=None)
@given(st.one_of(replies, JSONISH), st.booleans(), st.integers(1, 40))
def test_redact_sliced_equals_redact(text: str, json_text: bool, slice_chars: int) -> None:
    # A long reply is redacted in a worker thread this way (proxy._redacted_reply).
    expected: list[str] = []
    got: list[str] = []
    whole = REDACTOR.redact(text, expected.append, json_text=json_text)
    assert redact_sliced(REDACTOR, text, got.append, json_text, slice_chars=slice_chars) == whole
    assert sorted(got) == sorted(expected)


@pytest.mark.timeout(120)
async def test_an_8_mib_prompt_is_redacted_in_slices_that_let_others_run() -> None:
    line = "Jane (jane.doe@example.com, +1 415 555 2671) paid 4242 4242 4242 4242 on 2024-01-15. " + "ok " * 20
    text = (line * (8 * 1024 * 1024 // len(line) + 1))[: 8 * 1024 * 1024]
    assert len(text) > YIELD_ABOVE_CHARS
    expected: list[str] = []
    whole = REDACTOR.redact(text, expected.append)
    turns = 0
    done = False

    async def other_request() -> None:
        nonlocal turns
        while not done:
            turns += 1
            await asyncio.sleep(0)

    other = asyncio.create_task(other_request())
    got: list[str] = []
    result = await redact_yielding(REDACTOR, text, got.append)
    done = True
    await other
    assert result == whole
    assert Counter(got) == Counter(expected)
    assert turns >= len(text) // 16_384  # the other task ran between every two slices


def reference_view(text: str) -> str:
    """JsonView's definition, one character at a time."""
    out: list[str] = []
    in_string, escape = False, 0
    last = ""  # the character before (outside strings, an exponent's "e" makes its "+" "_")
    for c in text:
        if escape < 0:  # the character after a backslash: a tab's "t" the tab mark (after the backslash's space)
            last = c
            out.append("\x01" if c == "t" else "\0")
            escape = 4 if c == "u" else 0
            continue
        if escape > 0 and c in "0123456789abcdefABCDEF":  # a \u escape's hex digits
            last = c
            out.append("\0")
            escape -= 1
            continue
        escape = 0
        if c == '"':
            in_string = not in_string
            out.append(c)
        elif in_string:
            out.append(" " if c == "\\" else c)
            escape = -1 if c == "\\" else 0
        else:
            out.append({",": "\0", "+": "_" if last in ("e", "E") else "+"}.get(c, c))
        last = c
    return "".join(out)


@settings(max_examples=2000, deadline=None)
@given(
    st.lists(st.sampled_from(['"', "\\", "u", "0", "e9", "x", "t", ",", "+", " ", "4242"]), max_size=40).map("".join),
    st.data(),
)
def test_json_view_equals_its_definition_for_any_split(text: str, data: st.DataObject) -> None:
    from gateway.redact import JsonView

    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=8)))
    scan = JsonView()
    assert "".join(scan.view(text[a:b]) for a, b in itertools.pairwise([0, *cuts, len(text)])) == reference_view(text)


@pytest.mark.parametrize("cut_short", ["\\", "\\u00", "\\uD83D", "\\uD83D\\", "\\uD83D\\uDE0"])
def test_a_json_text_holds_back_an_escape_cut_short_past_max_match_and_no_more(cut_short: str) -> None:
    # A held tail of MAX_MATCH (an address that can still grow) and an escape that is not a
    # character yet: both held, the escape beyond MAX_MATCH (hypothesis found "...\\" at 129).
    text = '"' + "a" * 64 + "@" + "b" * 61 + ".c" + cut_short
    stream = REDACTOR.stream(json_text=True)
    out = stream.feed(text)
    assert MAX_MATCH < stream.held <= MAX_MATCH + MAX_PENDING_ESCAPE
    assert out + stream.flush() == REDACTOR.redact(text, json_text=True)


@pytest.mark.parametrize(
    ("text", "released"),
    [
        (" 4242ple.com 4242.doe", " 4242ple.com "),  # a space ended the local part after "4242"
        ("2nd item, 3rd.x", "2nd item, "),
        ("see 4242ab<cd", "see 4242ab<"),  # "<": no local part holds it
    ],
)
def test_a_local_part_that_something_ended_holds_no_number_back(text: str, released: str) -> None:
    # A number glued to a local part is held until its "@" may come; one whose local part a
    # space (or any character no local part holds) ended cannot get one. It was held all the
    # same when the text came in one piece, and not when it came in several: the relay's fast
    # path (a read's text at once) and its exact path (an event's) gave different reads.
    stream = StreamRedactor(REDACTOR, None)
    assert stream.feed(text) == released
    assert released + stream.flush() == REDACTOR.redact(text)
