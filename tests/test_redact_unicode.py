"""Redaction of PII written with other scripts' characters: decimal digits of any script
(full-width U+FF10-FF19, Arabic-Indic U+0660-0669, …) are digits to the card, phone, IBAN
and SSN kinds, and the other dashes (U+2012-2015, U+2212, U+FF0D) set groups apart as spaces do;
zero-width characters inside an address or a number are masked with it."""

from __future__ import annotations

import itertools
import json
import unicodedata

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.redact import ALL_KINDS, MAX_MATCH, build_redactor
from gateway.relay import side_may_match
from tests.test_redact import LOOK_ALIKES, ORDINARY, PII_VALUES, reference_redact, stream_in_pieces

REDACTOR = build_redactor(ALL_KINDS)
assert REDACTOR is not None

# The zero of each script's digits: ASCII, full-width, Arabic-Indic, Extended Arabic-Indic,
# Devanagari, Thai, and the mathematical bold digits (past U+FFFF).
ZEROS = [0x30, 0xFF10, 0x660, 0x6F0, 0x966, 0xE50, 0x1D7CE]


def written_in(text: str, zero: int) -> str:
    return "".join(chr(zero + int(c)) if "0" <= c <= "9" else c for c in text)


def fw(text: str) -> str:
    return written_in(text, 0xFF10)


@pytest.mark.parametrize(
    ("text", "redacted"),
    [
        ("カード番号は" + fw("4242 4242 4242 4242") + "、", "カード番号はCC_MASKED_LAST4_4242、"),
        (written_in("4242 4242 4242 4242", 0x660), "CC_MASKED_LAST4_4242"),
        (written_in("4111-1111-1111-1111", 0x6F0), "CC_MASKED_LAST4_1111"),
        (written_in("5555555555554444", 0x966), "CC_MASKED_LAST4_4444"),
        ("4242 " + fw("4242") + " 4242 " + written_in("4242", 0x660), "CC_MASKED_LAST4_4242"),  # mixed
        (fw("(415) 555-2671"), "PHONE_MASKED_LAST2_71"),
        ("tel " + fw("+44 20 7946 0958"), "tel PHONE_MASKED_LAST2_58"),
        (fw("123-45-6789"), "SSN_MASKED"),
        ("DE" + fw("89 3704 0044 0532 0130 00"), "IBAN_MASKED_LAST4_3000"),
        # Look-alikes stay as they are, whatever the digits.
        (fw("4242 4242 4242 4241"), None),
        (fw("2024-01-15"), None),
        (fw("3.11.7") + " " + fw("10.0.0.1"), None),
        (fw("1700000000123"), None),
        ("￥" + fw("1,234") + " " + fw("$1,234.56"), None),
        ("注文番号 " + fw("123456789012"), None),
        (written_in("INV-2024-000123 PO 4500012345", 0x660), None),
        # Addresses read ASCII digits only, as before.
        ("jane" + fw("42") + "@example.com", None),
    ],
)
def test_other_scripts_digits_are_digits(text: str, redacted: str | None) -> None:
    expected = text if redacted is None else redacted
    assert REDACTOR.redact(text) == expected
    assert stream_in_pieces(text, list(range(len(text))), False) == expected  # a character a delta


DASHES = "\u2012\u2013\u2014\u2015\u2212\uff0d"


@pytest.mark.parametrize(
    ("text", "redacted"),
    [
        *[(f"tel 415{d}555{d}2671", "tel PHONE_MASKED_LAST2_71") for d in DASHES],
        *[(f"4111{d}1111{d}1111{d}1111", "CC_MASKED_LAST4_1111") for d in DASHES],
        ("(415) 555\u20132671", "PHONE_MASKED_LAST2_71"),
        (fw("(415) 555") + "\uff0d" + fw("2671"), "PHONE_MASKED_LAST2_71"),
        ("card\u20144242 4242 4242 4242", "card\u2014CC_MASKED_LAST4_4242"),  # an em dash is no hyphen before it
        ("\u2012+44 20 7946 0958", "\u2012PHONE_MASKED_LAST2_58"),
        ("020\u20137946\u20130958", "PHONE_MASKED_LAST2_58"),
        # Look-alikes stay as they are: ranges, dates, negative numbers, ISBNs.
        ("pages 415\u2013555, the years 2019\u20132023 and 1999\u20142000", None),
        ("2024\u201301\u201315, " + fw("2024") + "\uff0d" + fw("01") + "\uff0d" + fw("15"), None),
        ("\u22124242424242424241 and \u221242, 4242\u2212", None),
        ("ISBN 978\u20133\u201316\u2013148410\u20130", None),
        ("\u2212$1,234.56, 3.11.7\u20133.12.1", None),
        # An address beside a dash is the address alone.
        ("write to us\u2014jane@example.com", "write to us\u2014j***e@example.com"),
    ],
)
def test_other_dashes_set_groups_apart(text: str, redacted: str | None) -> None:
    expected = text if redacted is None else redacted
    assert REDACTOR.redact(text) == expected
    assert stream_in_pieces(text, list(range(len(text))), False) == expected


@pytest.mark.parametrize(
    ("text", "redacted"),
    [
        ("4242\t4242\t4242\t4242", "CC_MASKED_LAST4_4242"),
        ("card:\t4242  4242  4242  4242.", "card:\tCC_MASKED_LAST4_4242."),
        ("4242 \t4242\t\t4242 -4242", "CC_MASKED_LAST4_4242"),
        (fw("4242") + "\u3000" + fw("4242") + "\u3000\u3000" + fw("4242 4242"), "CC_MASKED_LAST4_4242"),
        ("tel\t+1\t415\t555\t2671", "tel\tPHONE_MASKED_LAST2_71"),
        ("020\t7946\t0958", "PHONE_MASKED_LAST2_58"),
        # Look-alikes stay as they are: table rows, near-miss cards, numbers set wider apart.
        ("2024\t01\t15\t12:30:45\t3.11.7\t$1,234.56\t123456789012", None),
        ("4242\t4242\t4242\t4241 and 4242  4242  4242  4241", None),
        ("1  2  3  4  5  6  7  8  9  10  11  12  13  14", None),
    ],
)
def test_tabs_and_double_spaces_set_card_groups_apart(text: str, redacted: str | None) -> None:
    expected = text if redacted is None else redacted
    assert REDACTOR.redact(text) == expected
    assert stream_in_pieces(text, list(range(len(text))), False) == expected


ZW = "\u200b\u200c\u200d\u2060\ufeff"


@pytest.mark.parametrize(
    ("text", "redacted"),
    [
        *[(f"mail jane.doe{z}@example.com, ok", "mail j***e@example.com, ok") for z in ZW],
        ("j\u200ba\u200bn\u200be@ex\u200bample.c\u200bom", "j***e@ex\u200bample.c\u200bom"),
        ("\ufeffjane@example.com", "j***e@example.com"),  # masked with it
        ("jane@\u200bexample.com", "j***e@\u200bexample.com"),
        ("jane@example.com\u200b, bob\u200b@example.org", "j***e@example.com\u200b, b***b@example.org"),
        ("4242\u200b4242\u200b4242\u200b4242\u200b", "CC_MASKED_LAST4_4242\u200b"),
        ("4242 \u2060" * 3 + "4242", "CC_MASKED_LAST4_4242"),
        ("tel +1\u200b415\u200b555\u200b2671", "tel PHONE_MASKED_LAST2_71"),
        # Look-alikes stay as they are: no domain, a local part of zero-width characters alone,
        # dates and versions, emoji sequences.
        ("a\u200b@b, \u200b@example.com, x@\u200b.\u200b", None),
        ("\u200b2024-01-15\u200b v3.11.7\u200d 1\u200b700000000", None),
        ("\U0001f469\u200d\U0001f4bb @team \u200c", None),
    ],
)
def test_zero_width_characters_are_masked_with_what_they_are_in(text: str, redacted: str | None) -> None:
    expected = text if redacted is None else redacted
    assert REDACTOR.redact(text) == expected
    assert stream_in_pieces(text, list(range(len(text))), False) == expected


# The other invisible format characters (soft hyphen, directional marks, embeddings, overrides,
# isolates, invisible operators, variation selectors, the grapheme joiner, fillers) are
# zero-width characters too, and the typographic spaces
# (U+2000-200A, U+205F) spaces: before, a card or phone set apart by them went out in clear.
INVISIBLE = (
    "\u00ad\u061c\u180e\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2061\u2062\u2063\u2064\u2066\u2067\u2068\u2069"
    "\u2065\u206a\u206b\u206c\u206d\u206e\u206f\u034f\u115f\u1160\u17b4\u17b5\u180b\u180c\u180d\u180f\u3164\uffa0\ufe00\ufe01\ufe0e\ufe0f"
)
# Default-ignorable characters past U+FFFF: tags (U+E0020-E007F, U+E0001), the variation
# selectors supplement, unassigned ones of U+E0000-E0FFF, musical and shorthand format controls.
ASTRAL = (
    "\U000e0020\U000e0041\U000e007f\U000e0001\U000e0100\U000e01ef\U000e0fff\U0001d173\U0001d17a\U0001bca0\U0001bca3"
)
TYPOGRAPHIC_SPACES = "\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a\u205f"


@pytest.mark.parametrize(
    ("text", "redacted"),
    [
        *[(z.join(["4242"] * 4), "CC_MASKED_LAST4_4242") for z in INVISIBLE + TYPOGRAPHIC_SPACES],
        *[(f"tel +1{z}415{z}555{z}2671.", "tel PHONE_MASKED_LAST2_71.") for z in INVISIBLE + TYPOGRAPHIC_SPACES],
        *[(f"mail jane{z}.doe{z}@example.com, ok", "mail j***e@example.com, ok") for z in INVISIBLE],
        ("\u200f4242\u200f 4242\u200e 4242\u202e 4242\u202c", "\u200fCC_MASKED_LAST4_4242\u202c"),
        ("\u200fjane@example.com\u200f", "j***e@example.com\u200f"),
        # Emoji keep their variation selectors and keycaps: "I ❤️ 4️⃣".
        ("I \u2764\ufe0f 4\ufe0f\u20e3, 2024-01-15\ufe0f", None),
        # Look-alikes stay as they are: right-to-left text's dates and versions, near-miss cards.
        ("\u05e9\u05dc\u05d5\u05dd \u200f2024-01-15\u200f v3.11.7\u2009$1,234.56", None),
        ("4242\u200f4242\u200f4242\u200f4241 4242\u20094242\u20094242\u20094241", None),
    ],
)
def test_invisible_characters_and_typographic_spaces_set_groups_apart(text: str, redacted: str | None) -> None:
    expected = text if redacted is None else redacted
    assert REDACTOR.redact(text) == expected
    assert stream_in_pieces(text, list(range(len(text))), False) == expected


def test_a_tab_escape_in_a_json_text_sets_groups_apart_as_a_tab_does() -> None:
    # Tool-call arguments: JSON writes a tab as "\\t", so a card set apart by tabs, masked in a
    # message's content, went upstream in clear inside arguments. A line break still joins nothing.
    text = '{"card": "4242\\t4242\\t4242\\t4242", "n": "4242\\n4242\\n4242\\n4242"}'
    expected = '{"card": "CC_MASKED_LAST4_4242", "n": "4242\\n4242\\n4242\\n4242"}'
    assert REDACTOR.redact(text, json_text=True) == expected
    for cut in range(len(text) + 1):
        assert stream_in_pieces(text, [cut], True) == expected


@pytest.mark.parametrize("z", ASTRAL)
def test_default_ignorables_past_the_bmp_set_groups_apart_and_sit_in_addresses(z: str) -> None:
    # "4242\U000e00204242…" (a tag character between the groups) went out in clear.
    cases = [
        (z.join(["4242"] * 4), "CC_MASKED_LAST4_4242"),
        (f"日本語 tel +1{z}415{z}555{z}2671.", "日本語 tel PHONE_MASKED_LAST2_71."),
        (f"mail jane{z}.doe{z}@example.com, ok", "mail j***e@example.com, ok"),
        (f"{z}jane@{z}example.com", f"j***e@{z}example.com"),
        (f"Привет jane@exa{z}mple.c{z}om", f"Привет j***e@exa{z}mple.c{z}om"),
    ]
    for text, redacted in cases:
        assert REDACTOR.redact(text) == redacted == reference_redact(text)
        assert stream_in_pieces(text, list(range(len(text))), False) == redacted
        document = json.dumps({"v": text})  # escaped as a surrogate pair: a parser reads the character
        assert json.loads(REDACTOR.redact(document, json_text=True)) == {"v": redacted}
        assert stream_in_pieces(document, list(range(0, len(document), 5)), True) == REDACTOR.redact(
            document, json_text=True
        )


# Every space character (Zs) but those digit groups take as they are (the space, the no-break
# spaces), and every invisible format character (Cf) and default-ignorable code point (Unicode's
# Default_Ignorable_Code_Point, DerivedCoreProperties.txt; unicodedata has no such property): before, the Ogham
# space mark (U+1680), the interlinear annotation characters (U+FFF9-FFFB), the reserved
# default-ignorables U+FFF0-FFF8, the number signs and marks (U+0600-0605, U+06DD, U+070F,
# U+0890-0891, U+08E2, U+110BD, U+110CD) and the Egyptian hieroglyph format controls
# (U+13430-1343F) between groups left a card or phone in clear that a space set apart is masked in.
DEFAULT_IGNORABLE = [
    0x00AD, 0x034F, 0x061C, 0x115F, 0x1160, 0x17B4, 0x17B5, *range(0x180B, 0x1810), *range(0x200B, 0x2010),
    *range(0x202A, 0x202F), *range(0x2060, 0x2070), 0x3164, *range(0xFE00, 0xFE10), 0xFEFF, 0xFFA0,
    *range(0xFFF0, 0xFFF9), *range(0x1BCA0, 0x1BCA4), *range(0x1D173, 0x1D17B), *range(0xE0000, 0xE1000),
]  # fmt: skip
SPACES = [c for c in map(chr, range(0x110000)) if unicodedata.category(c) == "Zs" and c not in " \u00a0\u202f"]
FORMATS = sorted(
    {c for c in map(chr, range(0x110000)) if unicodedata.category(c) == "Cf"}
    | set(map(chr, DEFAULT_IGNORABLE))
    | set(map(chr, range(0x13430, 0x13440)))  # Cf in Unicode 15 (13439-1343F: unassigned in Python 3.11's 14)
)
SOME_FORMATS = [c for c in FORMATS if not "\U000e0080" <= c <= "\U000e0fff" or c in "\U000e0100\U000e01ef\U000e0fff"]


@pytest.mark.parametrize("z", SPACES + SOME_FORMATS, ids=lambda z: f"U+{ord(z):04X}")
def test_every_space_and_invisible_format_character_sets_groups_apart(z: str) -> None:
    cases = [
        (z.join(["4242"] * 4), "CC_MASKED_LAST4_4242"),
        (f"tel +1{z}415{z}555{z}2671.", "tel PHONE_MASKED_LAST2_71."),
        (f"Привет {z}4111{z}1111{z}1111{z}1111{z}", f"Привет {z}CC_MASKED_LAST4_1111{z}"),  # one on each side too
    ]
    if z not in SPACES:  # an invisible character is one of the address's
        cases.append((f"mail jane{z}.doe{z}@example.com, ok", "mail j***e@example.com, ok"))
    for text, redacted in cases:
        assert REDACTOR.redact(text) == redacted == reference_redact(text), text
        assert stream_in_pieces(text, list(range(len(text))), False) == redacted
        document = json.dumps({"v": text})  # written as an escape: a parser reads the character
        assert json.loads(REDACTOR.redact(document, json_text=True)) == {"v": redacted}


@pytest.mark.parametrize(
    ("value", "masked"),
    [
        ("+1\t415\t555\t2671", "PHONE_MASKED_LAST2_71"),
        ("415\t555\t2671", "PHONE_MASKED_LAST2_71"),
        ("(415)\t555\t2671", "PHONE_MASKED_LAST2_71"),
        ("+44\t20\t7946\t0958", "PHONE_MASKED_LAST2_58"),
        ("020\t7946\t0958", "PHONE_MASKED_LAST2_58"),
        ("01\t23\t45\t67\t89", "PHONE_MASKED_LAST2_89"),
        ("4242\t\t4242\t4242\t4242", "CC_MASKED_LAST4_4242"),
        ("DE89\t3704\t0044\t0532\t0130\t00", "IBAN_MASKED_LAST4_3000"),
    ],
)
def test_a_tab_escape_sets_phone_and_iban_groups_apart_as_a_tab_does(value: str, masked: str) -> None:
    # A phone's groups take one separator, and "\\t" is two characters: "+1\\t415\\t555\\t2671" in
    # tool-call arguments went out in clear while "+1<tab>415…" in content was masked.
    assert REDACTOR.redact(value) == masked
    text = json.dumps({"p": value, "n": 1})
    expected = json.dumps({"p": masked, "n": 1})
    assert REDACTOR.redact(text, json_text=True) == expected
    for cut in range(len(text) + 1):
        assert stream_in_pieces(text, [cut], True) == expected
    assert stream_in_pieces(text, list(range(len(text))), True) == expected


# Replies whose separators are tabs, one or two, or some other separator: in a JSON text ("\\t")
# they read as in content.
TABBED = st.builds(
    lambda text, tabs: "".join(
        (["\t", "\t\t", c][tabs[i % len(tabs)]] if c in " -" else c) for i, c in enumerate(text)
    ),
    st.lists(st.one_of(ORDINARY, PII_VALUES, st.sampled_from(LOOK_ALIKES)), min_size=1, max_size=12).map(" ".join),
    st.lists(st.integers(0, 2), min_size=1, max_size=8),
)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(TABBED, st.data())
def test_tabbed_text_in_a_json_string_is_redacted_as_in_content(text: str, data: st.DataObject) -> None:
    whole = REDACTOR.redact(text)
    assert whole == reference_redact(text)
    document = json.dumps({"v": text}, ensure_ascii=False)
    redacted = REDACTOR.redact(document, json_text=True)
    assert json.loads(redacted) == {"v": whole}
    cuts = data.draw(st.lists(st.integers(0, len(document)), max_size=len(document)))
    assert stream_in_pieces(document, cuts, True) == redacted  # the split guarantee


@pytest.mark.parametrize("z", ["\u200f", "\u00ad", "\u2009", "\u3000"])
def test_invisible_characters_and_spaces_written_as_json_escapes_are_read(z: str) -> None:
    escaped = f"\\u{ord(z):04x}"
    text = f'{{"card": "{escaped.join(["4242"] * 4)}"}}'
    assert REDACTOR.redact(text, json_text=True) == '{"card": "CC_MASKED_LAST4_4242"}'


def test_zero_width_characters_written_as_json_escapes_are_read() -> None:
    text = '{"to": "jane.doe\\u200b@example.com", "card": "4242\\u200b4242\\u200b4242\\u200b4242"}'
    expected = '{"to": "j***e@example.com", "card": "CC_MASKED_LAST4_4242"}'
    assert REDACTOR.redact(text, json_text=True) == expected
    assert stream_in_pieces(text, [10, 17, 30, 50], True) == expected


def test_other_scripts_digits_written_as_json_escapes_are_digits() -> None:
    # A client's parser reads "\uff14" as "４": a card in tool-call arguments either way.
    card = "".join(f"\\u{ord(c):04x}" for c in fw("4242 4242 4242 4242"))
    text = '{"card": "' + card + '"}'
    assert REDACTOR.redact(text, json_text=True) == '{"card": "CC_MASKED_LAST4_4242"}'
    assert stream_in_pieces(text, [13, 20, 31], True) == '{"card": "CC_MASKED_LAST4_4242"}'


def test_a_side_value_with_other_scripts_digits_may_match() -> None:
    # The relay's fast path passes a side value (an id, a pad) only if it holds nothing to mask.
    assert side_may_match(fw("4242 4242 4242 4242").encode())
    assert side_may_match(b"4242\t4242\t4242\t4242")
    assert not side_may_match(fw("chatcmpl 42").encode())


@st.composite
def in_some_script(draw: st.DrawFn, values: st.SearchStrategy[str]) -> str:
    """A value with its digits written in one script, or each digit in its own."""
    value = draw(values)
    if draw(st.booleans()):
        return written_in(value, draw(st.sampled_from(ZEROS)))
    return "".join(written_in(c, draw(st.sampled_from(ZEROS))) for c in value)


@st.composite
def with_zero_width(draw: st.DrawFn, values: st.SearchStrategy[str]) -> str:
    """A value with zero-width characters put in at a few places."""
    value = draw(values)
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(value)))
        value = value[:at] + draw(st.sampled_from(ZW + INVISIBLE + ASTRAL)) + value[at:]
    return value


UNICODE_REPLIES = st.lists(
    st.one_of(
        ORDINARY,
        in_some_script(PII_VALUES),
        in_some_script(st.sampled_from(LOOK_ALIKES)),
        st.sampled_from([*DASHES, "\t", "  ", "\u3000", *TYPOGRAPHIC_SPACES]),
        in_some_script(PII_VALUES).map(lambda value: value.replace("-", "\u2013")),
        in_some_script(PII_VALUES).map(lambda value: value.replace(" ", "\t")),
        in_some_script(PII_VALUES).map(lambda value: value.replace(" ", "  ")),
        with_zero_width(in_some_script(PII_VALUES)),
        with_zero_width(st.sampled_from(LOOK_ALIKES)),
        st.sampled_from(ZW),
        st.sampled_from(ASTRAL),
    ),
    min_size=1,
    max_size=20,
).map("".join)
UNICODE_NUMBERS = st.lists(
    st.one_of(
        in_some_script(
            st.sampled_from(
                ["4242", "4242 4242 4242 4242", "+1 415 555 2671", "415", " ", "-", ".", "+", "1", "\t", "  ", "\u3000"]
            )
        ),
        st.sampled_from([*DASHES, *ZW, *INVISIBLE, *ASTRAL, *TYPOGRAPHIC_SPACES]),
    ),
    min_size=1,
    max_size=12,
).map("".join)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(UNICODE_REPLIES, UNICODE_NUMBERS))
def test_fast_search_equals_the_definition_in_every_script(text: str) -> None:
    assert REDACTOR.redact(text) == reference_redact(text)


@settings(max_examples=750, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(UNICODE_REPLIES, UNICODE_NUMBERS), st.data())
def test_stream_equals_whole_for_any_split_in_every_script(text: str, data: st.DataObject) -> None:
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=len(text)))
    whole_counts: list[str] = []
    whole = REDACTOR.redact(text, whole_counts.append)
    stream_counts: list[str] = []
    stream = REDACTOR.stream(stream_counts.append)
    out = []
    for a, b in itertools.pairwise([0, *sorted(cuts), len(text)]):
        out.append(stream.feed(text[a:b]))
        assert stream.held <= MAX_MATCH
    assert "".join(out) + stream.flush() == whole
    assert sorted(stream_counts) == sorted(whole_counts)
    assert stream_in_pieces(text, cuts, True) == REDACTOR.redact(text, json_text=True)


MIB = 1024 * 1024
# Hostile texts of the new characters (SPEC §6: linear in the text's length). The timeout only
# guards against a hang: a quadratic path takes minutes at this size.
HOSTILE = {
    "full-width digit pairs": "４２ ",
    "zero-width spaces and digits": "\u200b4",
    "right-to-left marks and digits": "\u200f4",
    "thin spaces and digit groups": "4242\u2009",
    "full-width near-miss cards": "４２４２ ４２４２ ４２４２ ４２４１ ",
    "Arabic-Indic groups": "٤٢٤٢ ",
    "digits and en dashes": "4\u2013",
    "digits and tabs": "4\t",
    "groups and double spaces": "4242  ",
    "letters and zero-width spaces": "a\u200b",
    "zero-width '@' runs": "a\u200b@",
    "zero-width addresses": "jane\u200b@example.c\u200bo ",
    "'+' and 25 full-width digits": "+" + "１" * 25 + " ",
    "tag characters and digits": "\U000e00204",
    "tag-separated near-miss cards": "\U000e0020".join(["4242", "4242", "4242", "4241 "]),
    "tag '@' runs": "a\U000e0020@",
    "tag addresses": "jane\U000e0020@exa\U000e0020mple.c\U000e0020o ",
    "musical formats and local parts": "\U0001d173" * 40 + "a@",
    "Ogham-separated near-miss cards": "\u1680".join(["4242", "4242", "4242", "4241 "]),
    "interlinear annotations and digits": "\ufff94",
    "Egyptian format controls and digit groups": "4242\U00013430",
    "near-miss cards glued to local parts": "4242 4242 4242 4241" + "a" * 40 + "@",
    "phones glued to addresses": "+1 415 555 0100jane.doe@example.com ",
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("unit", HOSTILE.values(), ids=HOSTILE.keys())
def test_a_mib_of_hostile_text_of_the_new_characters_finishes(unit: str) -> None:
    text = unit * (MIB // len(unit))
    whole = REDACTOR.redact(text)
    stream = REDACTOR.stream()
    out = [stream.feed(text[i : i + 16_384]) for i in range(0, len(text), 16_384)]
    assert "".join(out) + stream.flush() == whole
    if unit == HOSTILE["full-width near-miss cards"]:
        assert whole == text
