"""PII detection and masking, for whole texts and for text that arrives in pieces.

Matching is leftmost-first over the enabled kinds, as one alternation of their patterns
would match; a validator per kind (Luhn, mod-97, digit counts) then decides whether a
candidate is PII or a look-alike left as it is. Every pattern has a bounded length
(`MAX_MATCH` characters, look-ahead included) and contains an "@" or a digit, and that
carries the design:

* Speed. Text without "@" or digits is returned after one C-level search; emails are only
  looked for at an "@" (one candidate start each); the digit kinds only inside runs of the
  characters they are made of, long enough to hold one (found by a pattern the regex engine
  scans for at C speed). The stdlib `re` engine does all of it.
* Exact streaming. `StreamRedactor` emits a prefix only once nothing that arrives later
  can change how it is redacted. A match still in the making must reach the end of the
  text, so it lies in the trailing run of characters it could consist of, within
  `MAX_MATCH` of the end, and starts where its look-behind holds (or, for an address,
  right where another match ended: a stream remembers whether its held tail starts there); a
  complete match is final once `MAX_MATCH` characters from its start are known. So the held tail is at most
  `MAX_MATCH` characters (128: a 64-character local part, the "@", 61 of its domain and two
  of look-ahead), and only while it could still become PII: ordinary prose holds back at
  most its last word (of a run of letters or digits longer than 64, its last 64: the local
  part of an address whose "@" may come), and hostile text ("((((", "@@@@") next to nothing.
* Linear time, whatever the text (SPEC §6). Each search goes on from where the last one
  ended, never back over text already searched (a run of digits is found once, not once
  per candidate in it), and no pattern can backtrack more than a bounded amount at one
  position. A long text can be redacted in slices that yield to the event loop between
  them (`redact_yielding`), with the same result.
* JSON texts (tool-call arguments): matched in a view of the text in which escapes are
  blanked, and a mask outside a string is quoted (`JsonView`), so JSON stays JSON.
"""

from __future__ import annotations

import asyncio
import re
import time
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

MAX_MATCH = 128  # longest possible match plus look-ahead; the bound on held-back text
# A JSON text (tool-call arguments) also holds an escape cut short, which is no character yet:
# at most a surrogate pair's twelve characters less one ("\uD83D\uDE0").
MAX_PENDING_ESCAPE = 11
_CONTEXT = 2  # characters of look-behind the patterns need

# ASCII classes for the digit kinds: \d and \w would also take other scripts' digits. An
# address may hold letters of any script (internationalised mail, RFC 6531), never their digits.
_LETTER = r"[^\W\d_]"  # a letter of any script (and a few number signs, as "²"), never a digit
# Zero-width characters (spaces, joiners, the word joiner, the BOM) and the other invisible
# format characters (the soft hyphen, the directional marks, embeddings, overrides and isolates
# that right-to-left text is full of, the invisible operators), and the rest of the Basic
# Multilingual Plane's default-ignorable characters, which render as nothing (variation
# selectors, the combining grapheme joiner, fillers): text copied from
# a page may carry them inside an address or a number ("jane.doe\u200b@example.com",
# "4242\u200f4242…", "4242\ufe0f4242…"). An address takes them as characters of its local part
# and domain (masked with it; the mask's letters are read without them), a number as a
# separator (`digit_view`).
_ZW = (
    "\u200b\u200c\u200d\u2060\ufeff"  # zero-width spaces and joiners, the word joiner, the BOM
    "\u00ad\u061c\u180e\u200e\u200f"  # soft hyphen, Arabic letter mark, Mongolian separator, LRM, RLM
    "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"  # embeddings, overrides, isolates
    "\u2061\u2062\u2063\u2064\u2065\u206a\u206b\u206c\u206d\u206e\u206f"  # invisible operators, deprecated formats
    "\u034f\u115f\u1160\u17b4\u17b5\u180b\u180c\u180d\u180f\u3164\uffa0"  # grapheme joiner, fillers, selectors
    # The rest of the format characters (Cf): number signs and marks, which stand before or over
    # digits, and the interlinear annotation characters; and U+FFF0-FFF8, reserved default-ignorables.
    "\u0600\u0601\u0602\u0603\u0604\u0605\u06dd\u070f\u0890\u0891\u08e2\ufff9\ufffa\ufffb"
    + "".join(map(chr, range(0xFFF0, 0xFFF9)))
    + "".join(map(chr, range(0xFE00, 0xFE10)))  # variation selectors
)
# And the default-ignorable characters past U+FFFF: the tag characters and the variation
# selectors supplement (U+E0000-E0FFF: "4242\U000e00204242…" hides a card from a reader of the
# code points, not from one of the rendered text), the musical formatting controls and the
# shorthand format controls, and the format characters there (the Kaithi number signs, the Egyptian
# hieroglyph format controls). In the patterns' classes they cost every non-ASCII text several
# times its search, so the patterns made with `_ZW` alone serve wherever a text (or, for an
# address, the stretch its pattern reads) holds none of them (`_has_astral`), and those made
# with `_ZW_ALL` (the definition, `_PARTS`) elsewhere: both match the same there.
_ZW_ASTRAL = "".join(
    map(
        chr,
        [
            *range(0xE0000, 0xE1000),
            *range(0x1D173, 0x1D17B),
            *range(0x1BCA0, 0x1BCA4),
            0x110BD,
            0x110CD,
            *range(0x13430, 0x13440),
        ],
    )
)
# `_ZW_ASTRAL`, for a class
_ASTRAL_RANGES = (
    "\U000e0000-\U000e0fff\U0001d173-\U0001d17a\U0001bca0-\U0001bca3\U000110bd\U000110cd\U00013430-\U0001343f"
)
_ZW_ALL = _ZW + _ASTRAL_RANGES
_ASTRAL_ZW = re.compile(f"[{_ASTRAL_RANGES}]")


def _has_astral(text: str) -> bool:
    """Whether one of `_ZW_ASTRAL` is in the text. First whether any character past U+FFFF is
    (one UTF-16 code unit each, else two: an encode, a copy at C speed, ~1 ms a MiB, where a
    class search takes ~18), then, only if so (emoji), the search."""
    return (
        not text.isascii()
        and len(text.encode("utf-16-le", "surrogatepass")) != 2 * len(text)
        and _ASTRAL_ZW.search(text) is not None
    )


_LOCAL = rf"(?:{_LETTER}|[0-9._%+{_ZW}-])"  # a character of an address's local part
_LOCAL_ALL = rf"(?:{_LETTER}|[0-9._%+{_ZW_ALL}-])"  # the same, past U+FFFF too
_LOCAL_MAX = 64  # RFC 5321. Of a longer run of local characters before an "@", its last 64 are masked
# The domain characters a match reads after its "@": MAX_MATCH less the local part, the "@" and
# the look-ahead's two. A domain that ends within them is matched whole; a longer one (RFC 1035:
# up to 253) is matched as far as that, when a dot has come by then: the mask keeps the domain
# as it came, so where the match ends in it changes nothing in the output.
_DOMAIN_SEEN = MAX_MATCH - _LOCAL_MAX - 3


def _email_parts(letter: str, zw: str = _ZW_ALL) -> tuple[str, str, str]:
    """The email pattern's (look-behind, body, look-ahead), its letters those of `letter`, its
    zero-width characters those of `zw` (a class's body)."""
    alnum, local, domain = rf"(?:{letter}|[0-9])", rf"(?:{letter}|[0-9._%+{zw}-])", rf"(?:{letter}|[0-9.{zw}-])"
    first = rf"(?:{alnum}|[{zw}](?={alnum}))"  # a domain's first character ("@\u200bexample.com")
    return (
        # After "@" too ("@jane@example.com", a Fediverse handle; "a@b.co@c.co@d.co", the address
        # after a glued one); after "*" only with more than one character before the "@" (a mask's
        # tail, "j***e@", stays a mask; "**jane@", Markdown's bold, is an address); inside a
        # run of local characters only at its last 64 before the "@".
        rf"(?:(?<![0-9._%+{zw}-])(?<!{letter})(?:(?<!\*)|(?!{local}@))|(?<={local})(?={local}{{{_LOCAL_MAX}}}@))",
        # A local part of zero-width characters alone is none.
        rf"(?![{zw}]{{1,{_LOCAL_MAX}}}@){local}{{1,{_LOCAL_MAX}}}@(?:"
        # A domain within sight, whole: up to its end, a dot and a top-level domain of letters.
        rf"(?!{domain}{{{_DOMAIN_SEEN + 1}}}){first}{domain}{{0,{_DOMAIN_SEEN - 1}}}\.{letter}(?:[{zw}]?{letter})++"
        # An "@" may follow: "jane@example.com@x" holds jane's address (its domain is then masked, see
        # `_mask_email`).
        rf"(?!{alnum}|-|\.{alnum})"
        # A longer one, with a dot in sight: as far as can be seen.
        rf"|(?={first}{domain}{{0,{_DOMAIN_SEEN - 3}}}\.{alnum}){domain}{{{_DOMAIN_SEEN}}}(?={domain}))",
        "",  # the look-ahead of each kind of domain is in the body
    )


# Each kind: (look-behind, body, look-ahead); a match is the three in a row.
# Groups are also set apart by no-break spaces (U+00A0, U+202F: word processors, French),
# and by Unicode's hyphens as well as ASCII's (U+2010, and U+2011, the no-break hyphen models
# write numbers with: "415‑555‑2671"). "-" last, so that in a class it is no range.
_SPACE = " \u00a0\u202f"
# In a JSON text's view (`JsonView`) a tab's escape "\\t" is two characters where a tab is one: a
# space and this mark, which may follow any separator a tab could be (a space) and counts for
# nothing (`_digits`), so "+1\\t415\\t555\\t2671" groups as "+1\t415…" does. A raw U+0001
# is invalid in JSON and never stands in a view for anything else.
_TAB_MARK = "\x01"
_M = r"\x01?"  # after a separator that a tab can be
_HYPHEN = "\u2010\u2011-"
# A number ends where an address's local part glued to it begins ("+1 415 555 0100jane.doe@…",
# "4242 4242 4242 4242_jane@…"): after a digit (a number's last character, but for an IBAN's
# letters or a phone's bracket), a letter (any script's), "_" or "%", or a hyphen and one, then
# local-part characters and an "@", which an address may begin with right where a number ended
# (`Redactor._matches`). Without it the local part took the number's last group ("0100jane") and
# the groups before it, no number alone, passed in clear. Up to 46 characters between its first
# and the "@": the longest number (a card of 79 characters in a JSON view: "\\t\\t" between its
# digits) and its 49 end within MAX_MATCH of its start, where a stream decides it; and the
# "@" within 49 characters past the end of a number's run is looked for there (`_next_other`).
_GLUED_LOCAL_SEEN = 49
_GLUED_LOCAL = rf"(?<=[0-9])(?=[{_HYPHEN}]?(?:{_LETTER}|[_%])(?:{_LETTER}|[0-9._%+-]){{0,{_GLUED_LOCAL_SEEN - 3}}}@)"


def _ahead(digits: str, letters: str) -> str:
    """A digit kind's look-ahead: none of `digits` follows, and none of `letters` or a local part
    glued to it does (in two steps, so that backtracking inside a number, where a digit follows,
    costs no more than one look-ahead)."""
    return rf"(?!{digits})(?:(?!{letters})|{_GLUED_LOCAL})"


_CARD_AHEAD = _ahead("[0-9]|[.,][0-9]", rf"[A-Za-z_{_HYPHEN}]")


def _uk_area(digits: int) -> str:
    """A British area code of a leading 0 and `digits` + 1 digits, bare or in brackets, and a space."""
    return rf"(?:0[1-9][0-9]{{{digits}}}|\(0[1-9][0-9]{{{digits}}}\))[{_SPACE}]{_M}"


# National phone formats: British (11 digits as Ofcom groups them: 020 7946 0958, 0161 496
# 0000, 07700 900123), French (five pairs: 01 23 45 67 89, 06.12.34.56.78), and Japanese and
# Korean (three groups, the last of four, as both countries hyphenate them: mobiles 090-1234-5678
# and 010-1234-5678, Tokyo's 03-1234-5678, Seoul's 02-123-4567, 045-123-4567, 0123-45-6789; the
# full-width hyphen-minus, "０９０－１２３４－５６７８", is a hyphen in `digit_view`). Hyphens only: a
# leading 0 and groups of digits set apart by spaces are what tables, lists and ranges are made
# of ("01 1200 3400", "week 05 2024 1234", "Shift 02 0800-1600", "Season 01 2024-2025"). An
# area code of two digits is one of the four there are (Seoul's 02; 03, 04 and 06 in Japan):
# other two-digit groups are case and invoice numbers ("Case 01-2023-0001", "No. 05-2023-1234").
_SEP = f"[{_HYPHEN}]"
_NATIONAL = (
    rf"{_uk_area(1)}[0-9]{{4}}[{_SPACE}]{_M}[0-9]{{4}}|{_uk_area(2)}[0-9]{{3}}[{_SPACE}]{_M}[0-9]{{4}}"
    rf"|{_uk_area(3)}[0-9]{{3}}(?:[{_SPACE}]{_M})?[0-9]{{3}}|0[1-9](?:[{_SPACE}.]{_M}[0-9]{{2}}){{4}}"
    rf"|0(?:[2346]|[1-9][0-9]){_SEP}[0-9]{{3,4}}{_SEP}[0-9]{{4}}|0[1-9][0-9]{{2}}{_SEP}[0-9]{{2}}{_SEP}[0-9]{{4}}"
)
_PARTS = {
    "email": _email_parts(_LETTER),
    # Payment cards: 13-19 digits in groups (set apart by one separator or two: "4242  4242"),
    # issuer prefixes 2-6 (timestamps start with 1), or four groups of four set apart by dots.
    # After a dot only when no digit is before it: "Card No.4111…" is a card, "3.4242…" a
    # decimal and "v1.4242…" a version.
    "card": (
        rf"(?<![A-Za-z0-9_,{_HYPHEN}])(?<![0-9]\.)",
        rf"[2-6][0-9]{{3}}(?:(?:(?:[{_SPACE}{_HYPHEN}]{_M}){{0,2}}[0-9]){{9,15}}|(?:\.[0-9]{{4}}){{3}})",
        _CARD_AHEAD,
    ),
    # Phones: international (+CC ..., or (+CC) ...), North American with separators, or British
    # or French (`_NATIONAL`); bare digit runs
    # (order numbers, timestamps) and dates never qualify. A bracket belongs to a phone only
    # in a pair around a group, as in "+44 (0)20": "(call +1 415 555 2671)" keeps its ")".
    # A group's digits are possessive: backtracking into them only ever tried more, shorter
    # groups, which find no end a digit run does not already offer (a "+" and 25 digits took
    # ~250 µs a try), and changes nothing but the span of a "+" number too short to be a phone.
    # A North American number may have its country code as "1-" ("1 ", "1."), and an
    # extension after it ("x123" is left as it is, the number before it masked).
    "phone": (
        rf"(?<![A-Za-z0-9_+{_HYPHEN}])(?<![0-9]\.)",  # after a dot only when no digit is before it ("Tel.+49")
        rf"(?:(?:\+[1-9][0-9]{{0,2}}|\(\+[1-9][0-9]{{0,2}}\))(?:(?:[{_SPACE}.{_HYPHEN}]{_M})?(?:\([0-9]{{1,4}}\)|[0-9]{{1,4}}+)){{2,5}}"
        rf"|(?:1[{_SPACE}.{_HYPHEN}]{_M})?(?:\([2-9][0-9]{{2}}\)(?:[{_SPACE}]{_M})?|[2-9][0-9]{{2}}[{_SPACE}.{_HYPHEN}]{_M})"
        rf"[2-9][0-9]{{2}}[{_SPACE}.{_HYPHEN}]{_M}[0-9]{{4}}|{_NATIONAL})",
        _ahead("[0-9]|[.,][0-9]", rf"[A-Za-wyz_{_HYPHEN}]|x[A-Za-z]"),
    ),
    "iban": (
        r"(?<![A-Za-z0-9])",
        rf"[A-Z]{{2}}[0-9]{{2}}(?:(?: {_M})?[A-Z0-9]{{4}}){{2,7}}(?:(?: {_M})?[A-Z0-9]{{1,3}})?",
        _ahead("[0-9]", "[A-Za-z]"),
    ),
    "ssn": (
        rf"(?<![A-Za-z0-9_{_HYPHEN}])",
        rf"(?!000|666|9)[0-9]{{3}}[{_HYPHEN}](?!00)[0-9]{{2}}[{_HYPHEN}](?!0000)[0-9]{{4}}",
        _ahead("[0-9]", rf"[A-Za-z_{_HYPHEN}]"),
    ),
}
_PATTERNS = {kind: "".join(parts) for kind, parts in _PARTS.items()}
ALL_KINDS = tuple(_PATTERNS)

# The digit kinds read other scripts' decimal digits (full-width "４", Arabic-Indic "٤",
# Devanagari "४" …: every character \d takes, all below U+20000) as ASCII's, and the other
# dashes (figure, en and em dashes, the horizontal bar: "415–555–2671") as spaces, and the
# full-width hyphen-minus and the minus sign ("０９０－１２３４", "090−1234": JIS's hyphen-minus
# as Windows and as the JIS tables map it) as a hyphen: they are matched in a view of the
# text where each such digit is its ASCII digit and each such dash a space (one character for
# one, so a position in the view is the same position in the text, and the view of a prefix
# is a prefix of the view, as the split guarantee needs). A space, not a hyphen: it sets groups
# apart as a hyphen does, but a number right after it is still one ("card—4242 4242 4242 4242",
# where a hyphen's look-behind would rule the card out, as it does in "INV-…"). Masks are made
# from the view, so their last digits are ASCII's. Addresses are matched in the text itself,
# digits only ASCII's there, and a dash beside one ("us—jane@example.com") no part of it.
# Tabs, the ideographic space (U+3000), the typographic spaces (en, em, thin, hair … U+2000-200A,
# U+205F), the Ogham space mark (U+1680: every space character, Zs, is one) and zero-width
# characters (`_ZW`, `_ZW_ASTRAL`) are spaces there too: "4242\t4242\t4242\t4242",
# "4242\u20094242…", "4242\u200b4242…".
_OTHER_SPACES = "\t\u1680\u3000\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a\u205f"
_FOREIGN_DIGITS = "".join(chr(c) for c in range(0x80, 0x20000) if chr(c).isdecimal())
_DASHES = "\u2012\u2013\u2014\u2015\u2212\uff0d"
_VIEWED_HYPHENS = "\u2212\uff0d"  # of those, the ones read as a hyphen, not a space
_DIGIT_VIEW = (
    {ord(c): ord("0") + unicodedata.digit(c) for c in _FOREIGN_DIGITS}
    | {ord(c): ord(" ") for c in _DASHES + _OTHER_SPACES + _ZW + _ZW_ASTRAL}
    # But the full-width hyphen-minus and the minus sign, which stand for one: Japanese and Korean
    # numbers are hyphenated with them ("０９０－１２３４－５６７８", "090−1234−5678"), and only
    # hyphens set their groups apart (`_NATIONAL`).
    | {ord(c): ord("\u2010") for c in _VIEWED_HYPHENS}
)
# A digit but ASCII's, for `has_trigger` (a dash is none), and what the view changes. The digits
# by their category, not listed: a class of the 650 (some past U+FFFF) is searched ~60x slower.
_FOREIGN = re.compile(r"[^\D0-9]")
_VIEWED = re.compile(rf"[^\D0-9]|[{_DASHES}{_OTHER_SPACES}{_ZW}]")


def digit_view(text: str) -> str:
    """The text as the digit kinds read it (see `_DIGIT_VIEW`): the text itself when nothing
    in it reads otherwise, the common case (`isascii` is a flag of the string, no scan)."""
    if text.isascii():
        return text.replace("\t", " ") if "\t" in text else text
    if _VIEWED.search(text) is None and not _has_astral(text):  # `_VIEWED` without `_ZW_ASTRAL`: see there
        return text
    return text.translate(_DIGIT_VIEW)


# Every card, phone, IBAN or SSN lies in a run of these characters, at least 11 long
# except "+" phones (4). Looking for such runs first skips ordinary text at C speed:
# the pattern starts with a character class, which the regex engine scans for directly.
_DIGIT_RUN = re.compile(
    rf"[0-9(A-Z+](?:(?<=\+)[0-9A-Z{_SPACE}{_TAB_MARK}()+.{_HYPHEN}]{{3,}}|[0-9A-Z{_SPACE}{_TAB_MARK}()+.{_HYPHEN}]{{10,}})"
)
_DIGIT_RUN_CHARS = (
    "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ()+." + _HYPHEN + _SPACE + _TAB_MARK
)  # the class above, for str.rstrip
# The same runs looked for in bytes: each run character mapped to "x", all else (UTF-8's
# bytes of other scripts included) to " ", then eleven "x" in a row searched for. Two C
# passes: several times cheaper than the regex, which tries a match at every digit. The
# bytes of the no-break spaces (C2 A0, E2 80 AF) are run bytes too, wherever they are: a
# run found where there is none only costs the exact search.
_RUN_BYTES = frozenset(_DIGIT_RUN_CHARS.encode())
_RUN_MAP = bytes(ord("x") if b in _RUN_BYTES else ord(" ") for b in range(256))
_LONG_RUN = b"x" * 11
_NOT_FIRST_CHARS = ")." + _HYPHEN + _SPACE + _TAB_MARK  # in a run, but no match starts with one
# Where a card, phone, IBAN or SSN can start: each one's look-behind and first character
# (and for "+", "(" and a capital, the second, when it is known).
_OTHER_START = re.compile(
    rf"(?<![A-Za-z0-9_,{_HYPHEN}])(?<![0-9]\.)[2-6]"
    rf"|(?<![A-Za-z0-9_+{_HYPHEN}])(?<![0-9]\.)(?:[1-9]|\+(?![^1-9])|\((?![^02-9+]))"
    rf"|(?<![A-Za-z0-9])[A-Z](?![^A-Z])|(?<![A-Za-z0-9_{_HYPHEN}])[0-8]"
)
# An address's local part, and what one still in the making ends with: ASCII, for str.rstrip;
# letters of other scripts are then found by the exact class (`_run_start`).
_LOCAL_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._%+-"
_EMAIL_CHARS = _LOCAL_CHARS + "@"
_EMAIL_NO_DIGITS = _EMAIL_CHARS.replace("0123456789", "")
_LOCAL_RUN = re.compile(f"{_LOCAL}*")  # matched on reversed text: a run's length from its end
_EMAIL_RUN = re.compile(f"(?:{_LOCAL}|@)*")
_ASTRAL_RUNS = {  # the same, past U+FFFF too (`_ZW_ALL`)
    _LOCAL_RUN: re.compile(f"{_LOCAL_ALL}*"),
    _EMAIL_RUN: re.compile(f"(?:{_LOCAL_ALL}|@)*"),
}
# Every match contains one of these: text without any is returned untouched.
_TRIGGERS = "@0123456789"


# An "@" an address could hold: a local-part character before it, after it a domain the pattern
# could take (a top-level domain in sight, or a run past sight). Wider classes than the pattern's
# (\w takes every script's digits, and "_"): one class, not a choice of two, is several times
# faster, and this only skips the "@"s that no address can hold.
def _email_at(zw: str) -> re.Pattern[str]:
    return re.compile(
        rf"@(?=[{zw}]?(?:[^\W_][\w.{zw}-]{{0,{_DOMAIN_SEEN - 4}}}\.[^\W\d_][{zw}]?[^\W\d_]"
        rf"|[^\W_][\w.{zw}-]{{{_DOMAIN_SEEN}}}))"
        rf"(?<=[\w.%+{zw}-]@)"
    )


_EMAIL_AT = _email_at(_ZW)
_EMAIL_AT_ALL = _email_at(_ZW_ALL)  # for a text with one of `_ZW_ASTRAL`
_TRIGGER = re.compile(r"[@\d]")  # \d: every script's digits (`digit_view`)


def has_trigger(text: str, pos: int) -> bool:
    if len(text) - pos < 256:  # short (stream deltas): one regex call is cheapest
        return _TRIGGER.search(text, pos) is not None
    # Long: eleven memchr-speed scans beat one character-class scan by 20x. Plain loops: any()
    # over a generator costs more than the scans when the first trigger is found at once.
    if pos:
        for c in _TRIGGERS:
            if text.find(c, pos) >= 0:
                return True
    else:
        for c in _TRIGGERS:
            if c in text:
                return True
    return not text.isascii() and _FOREIGN.search(text, pos) is not None  # other scripts' digits


def _run_start(
    text: str,
    lo: int,
    hi: int,
    chars: str = _LOCAL_CHARS,
    run: re.Pattern[str] = _LOCAL_RUN,
    astral: bool = True,
) -> int:
    """Where the run of local-part characters (with `_EMAIL_CHARS`: and "@"s) that ends at
    `hi` begins, looking no further back than `lo`. `astral`: False when the text is known to
    hold none of `_ZW_ASTRAL` (`_has_astral`)."""
    head = text[lo:hi]
    kept = len(head.rstrip(chars))
    if kept and head[kept - 1] > "\x7f":  # maybe a letter of another script: the exact class
        if astral and _has_astral(head):
            run = _ASTRAL_RUNS[run]
        kept = len(head) - run.match(head[::-1]).end()  # type: ignore[union-attr]
    return lo + kept


_SEPARATORS = str.maketrans(
    "", "", " +()." + _HYPHEN + _SPACE + _TAB_MARK
)  # all a card or phone match holds besides digits


def _digits(text: str) -> str:
    return text.translate(_SEPARATORS)


_ASCII_SEPARATORS = b" +().-\x01"  # those of `_SEPARATORS` in ASCII, for bytes.translate
_LUHN_DOUBLED = bytes.maketrans(b"0123456789", b"0246813579")  # 2d, minus 9 when that is > 9


def _luhn_ok(digits: bytes) -> bool:
    # Every second digit from the right doubled; summed as byte values, at C speed.
    return (sum(digits[-1::-2]) + sum(digits[-2::-2].translate(_LUHN_DOUBLED)) - 48 * len(digits)) % 10 == 0


_NO_ZW = str.maketrans("", "", _ZW + _ZW_ASTRAL)


def _mask_email(text: str, glued: bool = False) -> str:
    """j***e@example.com: only letters of the local part are kept, never digits. `glued`: an "@"
    follows the address, so the end of its domain may be the local part of another, which the
    pattern cannot take apart ("x@example.com.bob@example.com": the domain "example.com.bob"
    holds bob's): the domain is masked too, "x***@***". Only the character after the match
    decides it, which a stream knows once the match is final (it is within MAX_MATCH)."""
    local, _, domain = text.partition("@")
    if not local.isascii():
        local = local.translate(_NO_ZW)  # never empty: a local part holds more than those
    first = local[0] if local[0].isalpha() else ""
    last = local[-1] if len(local) > 2 and local[-1].isalpha() else ""
    return f"{first}***{last}@***" if glued else f"{first}***{last}@{domain}"


def _git_remote(text: str, start: int, end: int) -> bool:
    """Whether the address at text[start:end] is a git remote's user and host: "git@", and
    right after the host the ":" of scp's form or the "/" of a URL's path
    (`git@github.com:org/repo.git`, `ssh://git@gitlab.example.com/group/repo.git`). Every git
    host serves SSH as the user "git": that is no one's address, and masked it broke every
    clone command in a reply. Like the "@" of a glued address, only the character after the
    match decides it (a stream knows it once the match is final: within MAX_MATCH)."""
    return end < len(text) and text.startswith("git@", start) and text[end] in ":/"


def _digit_bytes(text: str) -> bytes:
    """`_digits(text)` as bytes, for a span of a card (ASCII digits and separators: the view's).
    An ASCII span is translated as bytes, at a third of a str's cost: a run of near-miss
    cards is checked at every group."""
    if text.isascii():
        return text.encode().translate(None, _ASCII_SEPARATORS)
    return _digits(text).encode("utf-8", "surrogatepass")


def _mask_card(text: str) -> str | None:
    digits = _digit_bytes(text)
    if not 13 <= len(digits) <= 19 or not _luhn_ok(digits):
        return None
    return f"CC_MASKED_LAST4_{digits[-4:].decode()}"


def _mask_phone(text: str) -> str | None:
    digits = _digits(text)
    if text.startswith(("+", "(+")) and not 8 <= len(digits) <= 15:
        return None
    return f"PHONE_MASKED_LAST2_{digits[-2:]}"


_IBAN_DIGITS = str.maketrans({chr(c): str(c - 55) for c in range(ord("A"), ord("Z") + 1)})  # A=10 … Z=35


def _mask_iban(text: str) -> str | None:
    compact = text.replace(" ", "").replace(_TAB_MARK, "")
    if not 15 <= len(compact) <= 34:
        return None
    if int((compact[4:] + compact[:4]).translate(_IBAN_DIGITS)) % 97 != 1:
        return None
    return f"IBAN_MASKED_LAST4_{compact[-4:]}"


def _mask_ssn(text: str) -> str | None:
    return "SSN_MASKED"


_MASKERS: dict[str, Callable[[str], str | None]] = {
    "email": _mask_email,
    "card": _mask_card,
    "phone": _mask_phone,
    "iban": _mask_iban,
    "ssn": _mask_ssn,
}

OnRedaction = Callable[[str], None]  # called with the kind of each redaction

# A match: (start, end, kind, mask); mask None for a candidate not decided (`_matches`).
Found = tuple[int, int, str, "str | None"]

# Cards and phones end at a group, so a span may hold a shorter one, and one that fails
# its check at every length may hold another card or phone: the fewest characters a valid
# span has (13 digits; "+" and 8). An IBAN or SSN candidate that fails its check is passed
# over whole, as before (a card inside a mistyped IBAN stays unmasked): trying each of its
# groups again made 1 MiB of "AB12 " cost 4.5 s.
_SHORTEST = {"card": 13, "phone": 9}
_FEWEST_DIGITS = {"card": 13}  # `_mask_card`'s least; a phone's check has none for every form
_ASCII_DIGITS = "0123456789"
_BREAK = re.compile(r"[^0-9A-Za-z]")  # where a shorter span of a grouped kind can end
_INNER_START = re.compile(r"(?<=[^0-9A-Za-z])[0-9(]")  # where a card or phone can start inside one


@dataclass(frozen=True, slots=True)
class _Kind:
    """One of the digit kinds: its pattern whole, and its body and look-ahead alone, to try
    the shorter spans of a candidate that failed its check (or that swallows another)."""

    name: str
    pattern: re.Pattern[str]
    body: re.Pattern[str]
    ahead: re.Pattern[str]
    mask: Callable[[str], str | None]
    shortest: int  # the fewest characters of a shorter span; 0: the kind has one length
    fewest_digits: int  # the fewest digits its check takes (0: any number)
    # Past a failed candidate's start, where another could start first: a card's first four
    # characters are digits, and no kind starts right after a digit (each one's look-behind).
    next_start: int
    rest: re.Pattern[str] | None  # the enabled kinds after this one that may start where it does, as one alternation

    @classmethod
    def build(cls, name: str, after: list[str]) -> _Kind:
        behind, body, ahead = _PARTS[name]
        if name == "card":
            # None may: a card's first four characters are digits, where a phone starts with "+",
            # "(", "0", "1" and a separator, or three digits and one; an SSN with three digits and
            # a hyphen; an IBAN with capitals. A near-miss card is then one check, not two.
            after = []
        rest = re.compile("|".join(f"(?P<{k}>{_PATTERNS[k]})" for k in after)) if after else None
        return cls(
            name,
            re.compile(behind + body + ahead),
            re.compile(body),
            re.compile(ahead),
            _MASKERS[name],
            _SHORTEST.get(name, 0),
            _FEWEST_DIGITS.get(name, 0),
            4 if name == "card" else 1,
            rest,
        )

    def spans(self, text: str, start: int, end: int) -> list[tuple[int, str]]:
        """The (end, mask) of every valid match of this kind at `start`, longest first;
        `end`: the end of its longest candidate there (a candidate's shorter spans end
        inside it, at a group's end, where the look-ahead holds)."""
        candidate = text[start:end]
        masked = self.mask(candidate)
        spans = [(end, masked)] if masked is not None else []
        if self.shortest:
            # A shorter span ends at a break before the last group, so it holds at most the
            # digits before that group: fewer than the check takes, there is none (a near-miss
            # card of four groups of four: twelve).
            before_last = len(candidate.rstrip(_ASCII_DIGITS))
            if self.fewest_digits and len(_digit_bytes(candidate[:before_last])) < self.fewest_digits:
                return spans
            for b in reversed([m.start() for m in _BREAK.finditer(text, start + self.shortest, start + before_last)]):
                # The check first: it turns down most (too few digits), and is safe on any
                # part of a candidate; then whether the pattern ends there.
                masked = self.mask(text[start:b])
                if masked is not None and self.ahead.match(text, b) and self.body.fullmatch(text, start, b):
                    spans.append((b, masked))
        return spans

    def valid_at(self, text: str, start: int) -> bool:
        m = self.pattern.match(text, start)
        return m is not None and bool(self.spans(text, start, m.end()))


# After a run of the digit kinds' characters, local-part characters up to an "@" (a local part
# glued to a number ends there: `_GLUED_LOCAL`, which reads no further than that "@").
_LOCAL_TO_AT = re.compile(rf"(?:{_LETTER}|[0-9._%+-]){{1,{_GLUED_LOCAL_SEEN - 2}}}@")
# Where a local part glued to a number may begin (`_GLUED_LOCAL`): after a number's last character.
_GLUED_START = re.compile(rf"(?<=[0-9])[{_HYPHEN}]?(?:{_LETTER}|[_%])")
# What a local part glued to a number is made of, from its start to its "@" (`_GLUED_LOCAL`).
_GLUED_TAIL = re.compile(rf"(?:{_LETTER}|[0-9._%+{_HYPHEN}])*")


def _glued_number_start(digits: str, near_end: int, n: int) -> int:
    """For `Redactor.hold`: the start of the run of a number that a local part glued to it, its
    "@" still to come, may end (`_GLUED_LOCAL`: its look-ahead is then undecided), or n. (A local
    part begins within `_GLUED_LOCAL_SEEN` of its "@", which is at the end or later.)"""
    lo = n - _GLUED_LOCAL_SEEN + 1
    if lo < near_end:
        lo = near_end
    space = digits.rfind(" ", lo, n)  # the usual character no local part holds (one C call)
    found = _GLUED_START.search(digits, lo if space < 0 else space + 1, n)
    # Only a local part that runs to the end may still meet its "@": one a space (or any other
    # character no local part holds) ends is none ("4242ple.com 4242.doe"). Held from it, a
    # stream held more when its text came in one piece than in several (the relay's fast path,
    # which feeds a read's text at once, against its exact path, an event's at a time).
    while found is not None:
        end = _GLUED_TAIL.match(digits, found.start(), n).end()  # type: ignore[union-attr]  # (* matches empty)
        if end == n:
            break
        found = _GLUED_START.search(digits, end + 1, n)
    if found is None:
        return n
    q = found.start()
    return near_end + len(digits[near_end:q].rstrip(_DIGIT_RUN_CHARS))


@dataclass(frozen=True, slots=True)
class Redactor:
    """Redacts whole texts; makes `StreamRedactor`s for text that arrives in pieces.

    Matching is leftmost-first over all enabled kinds, as one alternation would be, but
    emails are only looked for around an "@", and the digit kinds through a pattern that
    rejects most positions on their first character.
    """

    email: re.Pattern[str] | None
    email_ascii: re.Pattern[str] | None  # the same, for ASCII text: single classes, several times faster
    glued: re.Pattern[str] | None  # the email pattern with no look-behind, for a start glued to an address (`_matches`)
    glued_ascii: re.Pattern[str] | None
    email_astral: re.Pattern[str] | None  # the definition (`_ZW_ALL`), for a stretch with one of `_ZW_ASTRAL`
    glued_astral: re.Pattern[str] | None
    others: re.Pattern[str] | None  # card | phone | iban | ssn, the enabled ones, in that order
    kinds: dict[str, _Kind]  # the same kinds, one by one

    def redact(self, text: str, on_redaction: OnRedaction | None = None, json_text: bool = False) -> str:
        """The text redacted. `json_text`: the text is a JSON document (tool-call arguments),
        and a mask outside its strings is quoted, so JSON stays JSON (see `JsonView`)."""
        if json_text:
            return self._redact_json(text, on_redaction)
        return self.redact_from(text, 0, on_redaction)

    def redact_from(self, text: str, pos: int, on_redaction: OnRedaction | None = None, after: int = -1) -> str:
        """text[pos:] redacted; text[:pos] serves only as look-behind context. `after`: where
        an address ended (see `_matches`)."""
        if not has_trigger(text, pos):  # no "@", no digit: nothing here can be PII
            return text[pos:]
        pieces: list[str] = []
        copied = pos
        for start, end, kind, masked in self._matches(text, pos, len(text), after, digit_view(text)):
            if masked is not None:
                if on_redaction is not None:
                    on_redaction(kind)
                pieces.append(text[copied:start])
                pieces.append(masked)
                copied = end
        pieces.append(text[copied:])
        return "".join(pieces)

    def stream(self, on_redaction: OnRedaction | None = None, json_text: bool = False) -> StreamRedactor:
        return JsonStreamRedactor(self, on_redaction) if json_text else StreamRedactor(self, on_redaction)

    def _redact_json(self, text: str, on_redaction: OnRedaction | None) -> str:
        text = JsonUnescaper().feed(text, final=True)
        view = JsonView().view(text)
        if not has_trigger(view, 0):
            return text
        return self.settle_json(view, text, 0, len(view), True, False, on_redaction)[0]

    def _matches(self, text: str, pos: int, limit: int, after: int = -1, digits: str | None = None) -> Iterator[Found]:
        """Matches in order, each one searched from the end of the previous one. After a
        candidate that fails its check at every length the search goes on from its next
        character, not its end: a card, or a phone, may start inside it. A candidate of the
        other kinds at `limit` or later ends it undecided (mask None): a stream holds from
        there whatever it is, so its check is not worth making.

        An address may start right where another match ended (`after`, then each match's end),
        its look-behind aside: the local part of one glued to an address ("x@ex.com_bob@ex.com",
        "a@b.co.@c.co", a domain past sight that runs into one) begins inside the first's run of
        characters, where no address starts otherwise, and would show in clear after the first's
        mask; so would one glued to a number ("…0100.jane@", "…0100用户@", `_GLUED_LOCAL`).

        `digits`: the text's `digit_view`, where the other kinds are looked for (the text when
        None)."""
        if digits is None:
            digits = text
        email_next: Found | None = None
        other_next: Found | None = None
        email_done = self.email is None
        other_done = self.others is None
        astral: bool | None = None  # whether the text holds one of `_ZW_ASTRAL` (known once an "@" is looked at)
        run_end = run_stop = 0  # where the run of the last candidate of the other kinds ends; how far its searches read
        while True:
            if not email_done and (email_next is None or email_next[0] < pos):
                if astral is None:  # once, not per address: a megabyte is copied in ~1 ms
                    astral = _has_astral(text)
                found = self._next_email(text, pos, after, astral)
                # A git remote's "git@host" is no one's address: passed over, once the character
                # after it is known to be final (before `limit`: see _git_remote).
                while found is not None and found.start() < limit and _git_remote(text, found.start(), found.end()):
                    found = self._next_email(text, found.end(), -1, astral)
                email_done = found is None
                if found is not None:
                    end = found.end()
                    if found.start() >= limit and _git_remote(text, found.start(), end):
                        masked = None  # undecided: a stream holds it until the text after it is known
                    else:
                        masked = _mask_email(found.group(), text.startswith("@", end))  # glued: see _mask_email
                    email_next = (found.start(), end, "email", masked)
            if not other_done and (other_next is None or other_next[0] < pos):
                other_next, run_end, run_stop = self._next_other(digits, pos, run_end, run_stop, limit)
                other_done = other_next is None
            best = email_next if not email_done else None
            if not other_done and (best is None or other_next[0] < best[0]):  # type: ignore[index]
                best = other_next  # on a tie the email wins: it comes first in the alternation
            if best is None:
                return
            yield best
            if best[3] is None:
                return
            pos = best[1]
            after = pos  # an address may be glued to any match (`_GLUED_LOCAL`)

    def hold(self, text: str, pos: int, digits: str | None = None) -> int:
        """Where the tail that more text could still turn into (part of) a match begins: the
        first place, within MAX_MATCH of the end and in the trailing run of characters a
        match could be made of, where a match could start (its look-behind holds and its
        first character fits). Holding no more than that keeps a stream's cost per piece
        low on hostile text: nothing held is nothing searched again. `digits`: the text's
        `digit_view`, for the other kinds (the text when None)."""
        n = len(text)
        near_end = n - MAX_MATCH if n - MAX_MATCH > pos else pos  # not max(): this runs per chunk
        hold = n
        glued = True  # whether a local part glued to a number may be in the making at the end
        if self.email is not None:
            # The common case first: a run of address characters without a digit (a word) after a
            # space or punctuation that begins in sight; no number is before a local part there.
            start = len(text.rstrip(_EMAIL_NO_DIGITS))
            if start >= near_end and (not start or text[start - 1] < "0"):
                hold = start
                glued = False
            else:
                if start and "0" <= text[start - 1] <= "9":  # the run goes on before a digit
                    start = len(text.rstrip(_EMAIL_CHARS))
                    # Digits alone: no letter after one, unless one of another script is before them
                    # ("4242jö2": the ASCII run is "2", the local part "jö2").
                    glued = not text[start:].isdigit() or (start > 0 and text[start - 1] > "\x7f")
                else:  # no digit in it: no number before a local part, but one of another script's
                    glued = start > 0 and text[start - 1] > "\x7f"
                # Then an ASCII run of address characters that begins in sight.
                if start >= near_end and (not start or text[start - 1] < "\x80"):
                    hold = start
                else:
                    hold = self._email_hold(text, near_end)
        if self.others is not None:
            if digits is None:
                digits = text
            start = len(digits.rstrip(_DIGIT_RUN_CHARS))
            if glued and n > pos:  # a number may end before a local part glued to it, its "@" to come
                glued_start = _glued_number_start(digits, near_end, n)
                if glued_start < start:
                    start = glued_start
            if start < near_end:
                start = near_end
            if hold - start > 16:  # long (hostile text): only where a match could start
                first = _OTHER_START.search(digits, start, hold)
                if first is not None:
                    hold = first.start()
            elif start < hold:  # short: cheaper to hold a little more (no match starts with those)
                start = n - len(digits[start:].lstrip(_NOT_FIRST_CHARS))
                if start < hold:
                    hold = start
        return hold

    @staticmethod
    def _email_hold(text: str, near_end: int) -> int:
        """`hold` for addresses: where one still in the making could start, in the trailing
        run of address characters (local-part characters and "@"), from `near_end` on."""
        n = len(text)
        lo = near_end - 1 if near_end else 0
        start = _run_start(text, lo, n, _EMAIL_CHARS, _EMAIL_RUN)
        if start >= near_end:  # the run begins in sight: as the first of a run, it may start one
            return start
        # A longer run: an address starts inside it right after an "@", or as the last 64
        # local-part characters before an "@". Either the "@" is still to come, after a
        # trailing run of them (a run that begins in sight begins after an "@")...
        hold = n
        tail = n - _LOCAL_MAX if n - _LOCAL_MAX > near_end else near_end
        local = _run_start(text, tail - 1, n)
        if local < n:
            hold = local if local >= tail else tail
        # ... or its own "@" has come, and it starts right after the "@" before that one (one
        # still in the making holds a single "@": the last).
        at = text.rfind("@", lo, n)
        if at > lo:
            before = text.rfind("@", lo, at)
            if 0 <= before < at - 1 and before + 1 < hold:
                hold = before + 1
        # ... or it is the last 64 before an "@" that is here, at least 64 in from near_end (of
        # two such "@"s, the later one's 64 characters would hold the earlier one).
        at = text.find("@", near_end + _LOCAL_MAX)
        if at >= 0 and at - _LOCAL_MAX < hold and _run_start(text, at - _LOCAL_MAX - 1, at) == at - _LOCAL_MAX - 1:
            hold = at - _LOCAL_MAX
        return hold

    def may_match(self, text: str, pos: int, digits: str | None = None) -> bool:
        """Whether text[pos:] can hold a complete match: an "@", or a run long enough (a run
        of capitals without digits passes too; the exact search then finds nothing there).
        `digits`: the text's `digit_view`, for the other kinds (the text when None)."""
        if self.email is not None and text.find("@", pos) >= 0:
            return True
        if self.others is None:
            return False
        if digits is not None:
            text = digits
        if len(text) - pos >= 256 and not has_trigger(text, pos):
            return False  # a long piece without a digit ("((((", capitals): nothing to search
        # Short (a live stream's delta), or with a "+" (a phone's run can then be short): the regex.
        if len(text) - pos < 48 or text.find("+", pos) >= 0:
            return _DIGIT_RUN.search(text, pos) is not None
        return text[pos:].encode("utf-8", "surrogatepass").translate(_RUN_MAP).find(_LONG_RUN) >= 0

    def _next_other(
        self, text: str, pos: int, run_end: int, run_stop: int, limit: int
    ) -> tuple[Found | None, int, int]:
        """The first match of the other kinds from pos (or the undecided candidate at
        `limit`, see `_matches`), the end of the run it lies in, and how far the searches in
        that run read: two characters past it (a look-ahead's), or up to the "@" that a local part
        glued to its number ends at, when local-part characters lead to it (`_LOCAL_TO_AT`).
        Only inside the runs a match could lie in. `run_end`, `run_stop`: those of the run the
        previous candidate lay in. Searching on from inside that run, rather than finding the run
        again, keeps a long run (1 MB of "4242 ") one pass instead of one pass per candidate in it."""
        assert self.others is not None
        while True:
            if pos < run_end:
                # Every match is at least as long as a run must be, so a match in the rest of
                # this run is one the run search from pos would have found: same result.
                m = self.others.search(text, pos, run_stop)
            else:
                run = _DIGIT_RUN.search(text, pos)
                if run is None:
                    return None, len(text), len(text)
                run_end = run.end()
                glued = _LOCAL_TO_AT.match(text, run_end)
                run_stop = glued.end() if glued is not None else run_end + 2
                m = self.others.search(text, run.start(), run_stop)
            if m is None:
                pos = run_end
                continue
            start = m.start()
            if start >= run_end:  # in the next run, read up to its "@": searched as that run
                pos = run_end
                continue
            if start >= limit:
                return (start, start, "", None), run_end, run_stop
            found = self._decide(text, m)
            if not isinstance(found, int):
                return found, run_end, run_stop
            pos = found

    def _decide(self, text: str, m: re.Match[str]) -> Found | int:
        """What is masked at m's start: the first kind, in the alternation's order, with a
        valid span there, and its longest one, except that a card or phone never swallows
        the start of another (a card's CVV, a phone's next number, a card after a phone).
        Otherwise: where the search goes on. Reads no further than MAX_MATCH from the start:
        a span ends within 49 characters of it, and a card or phone starting inside one
        within 49 of that start."""
        start = m.start()
        resume = len(text)
        found: re.Match[str] | None = m
        while found is not None:
            kind = self.kinds[found.lastgroup]  # type: ignore[index]
            spans = kind.spans(text, start, found.end())
            if spans and kind.shortest:
                spans = self._unswallowed(kind.name, text, start, spans)
            if spans:
                return start, spans[0][0], kind.name, spans[0][1]
            resume = min(resume, start + kind.next_start if kind.shortest else found.end())
            found = None if kind.rest is None else kind.rest.match(text, start)
        return resume  # a look-alike (failed checks), left as it is: where the search goes on

    def _unswallowed(self, name: str, text: str, start: int, spans: list[tuple[int, str]]) -> list[tuple[int, str]]:
        """`spans` (longest first) without those that take in the start of a valid card or
        phone lying past the shortest span's end ("4242 4242 4242 4242 123 415 555 2671"),
        and for a phone, without those that take in the start of any valid card: a phone's
        trailing groups are then the card's leading ones."""
        shortest, longest = spans[-1][0], spans[0][0]
        card, phone = self.kinds.get("card"), self.kinds.get("phone")
        if shortest == longest and (name == "card" or card is None):
            return spans  # the common case: one span, and nothing inside it counts
        for q in _INNER_START.finditer(text, start + 1, longest):
            at = q.start()
            if at >= shortest:
                cut = (card is not None and card.valid_at(text, at)) or (phone is not None and phone.valid_at(text, at))
            else:
                cut = name == "phone" and card is not None and card.valid_at(text, at)
            if cut:
                return [span for span in spans if span[0] <= at]
        return spans

    def _next_email(self, text: str, pos: int, after: int, astral: bool) -> re.Match[str] | None:
        """The next address from pos. `astral`: whether the text holds one of `_ZW_ASTRAL`
        (if so, each candidate's stretch is looked at: `_ZW_ALL`'s pattern only where it needs to)."""
        assert self.email is not None
        n = len(text)
        misses = 0
        while (at := text.find("@", pos)) >= 0:
            if misses > 1:
                # "@"s that hold no address, one after another: a regex skips the rest of
                # them in one C pass (thousands in a hostile "@@@@" or "a.b@c.d a.b@c.d").
                candidate = (_EMAIL_AT_ALL if astral else _EMAIL_AT).search(text, at)
                if candidate is None:
                    return None
                at = candidate.start()
            # The local part is the run of its characters ending at the "@" (the look-behind rules
            # out any later start), or that run's last 64: one candidate, not before pos.
            start = _run_start(text, max(pos, at - _LOCAL_MAX), at, astral=astral)
            if start < at:
                end = min(n, at + MAX_MATCH)  # all the pattern reads (look-behind: one before start)
                read = text[start - 1 if start else 0 : end]
                glued = start == after  # glued to the address that ends here (see _matches)
                if read.isascii():
                    pattern = self.glued_ascii if glued else self.email_ascii
                elif astral and _has_astral(read):
                    pattern = self.glued_astral if glued else self.email_astral
                else:
                    pattern = self.glued if glued else self.email
                m = pattern.match(text, start, end)  # type: ignore[union-attr]
                if m is not None:
                    return m
            misses += 1
            pos = at + 1
        return None

    def settle(self, text: str, pos: int, on_redaction: OnRedaction | None) -> tuple[str, int]:
        """Redact text[pos:] as far as more text cannot change it; return (output, settled).

        A match that more text could still create or change must reach the end of the text,
        so it starts in the trailing run of characters it could be made of (and within
        MAX_MATCH of the end). A complete match is final once MAX_MATCH characters from its
        start are known.
        """
        digits = digit_view(text)
        hold = self.hold(text, pos, digits)
        if not self.may_match(text, pos, digits):  # the common case: nothing complete to check
            return text[pos:hold], hold
        return self.settle_matches(text, pos, hold, on_redaction, digits=digits)[:2]

    def settle_matches(
        self,
        text: str,
        pos: int,
        hold: int,
        on_redaction: OnRedaction | None,
        final: bool = False,
        after: int = -1,
        digits: str | None = None,
    ) -> tuple[str, int, int]:
        """`settle` once `hold` is known and text[pos:] may hold a complete match. `final`: no
        more text comes, so every match is complete (`hold` is then the end). `after`: where an
        address ended (see `_matches`); returned for the last address, with the output and
        the settled end. `digits`: the text's `digit_view` (the text when None)."""
        n = len(text)
        pieces: list[str] = []
        limit = hold if final or hold <= n - MAX_MATCH else n - MAX_MATCH + 1
        for start, end, kind, masked in self._matches(text, pos, limit, after, digits):
            if start >= hold:
                break
            if start + MAX_MATCH > n and not final:
                hold = start
                break
            if masked is not None:
                if on_redaction is not None:
                    on_redaction(kind)
                pieces.append(text[pos:start])
                pieces.append(masked)
                pos = end
                after = end
        if after == pos and pos < hold and not final:
            hold = self.glued_hold(text, pos, hold)
        settled = max(hold, pos)
        pieces.append(text[pos:settled])
        return "".join(pieces), settled, after

    @staticmethod
    def glued_hold(text: str, pos: int, hold: int) -> int:
        """`hold`, when an address ended at `pos`: an address glued to it may be in the
        making there (see `_matches`), if the run of address characters from pos reaches the
        end, within MAX_MATCH."""
        n = len(text)
        if n - pos < MAX_MATCH and _run_start(text, pos, n, _EMAIL_CHARS, _EMAIL_RUN) == pos:
            return pos
        return hold

    def settle_json(
        self,
        view: str,
        text: str,
        pos: int,
        hold: int,
        final: bool,
        in_string: bool,
        on_redaction: OnRedaction | None,
        after: int = -1,
        digits: str | None = None,
    ) -> tuple[str, int, bool, int]:
        """`settle_matches` for a JSON text: matches are found in its `view`, masks made
        from `text`, and a mask outside a JSON string is quoted. `in_string`: whether
        text[pos] lies inside a string; returned for the settled end, with the output and
        the end. A quote in the view is always a string's start or end (escaped ones are
        blanked), so the state at a mask is the parity of the quotes before it. `after`: as
        for `settle_matches`, returned last. `digits`: the view's `digit_view` (made when None)."""
        n = len(view)
        pieces: list[str] = []
        counted = pos  # in_string is the state at `counted`
        limit = hold if final or hold <= n - MAX_MATCH else n - MAX_MATCH + 1
        if digits is None:
            digits = digit_view(view)
        for start, end, kind, masked in self._matches(view, pos, limit, after, digits):
            if start >= hold:
                break
            if start + MAX_MATCH > n and not final:
                hold = start
                break
            if masked is not None:  # made from the view: equal to the text in a match's span
                if on_redaction is not None:
                    on_redaction(kind)
                if view.count('"', counted, start) & 1:
                    in_string = not in_string
                counted = start
                pieces.append(text[pos:start])
                pieces.append(masked if in_string else f'"{masked}"')  # a bare number becomes a string
                pos = end
                after = end
        if after == pos and pos < hold and not final:
            hold = self.glued_hold(view, pos, hold)
        settled = max(hold, pos)
        pieces.append(text[pos:settled])
        if view.count('"', counted, settled) & 1:
            in_string = not in_string
        return "".join(pieces), settled, in_string, after


def build_redactor(kinds: Iterable[str]) -> Redactor | None:
    """None when no kind is enabled (`REDACT_KINDS=`): callers then skip redaction entirely."""
    chosen = tuple(k for k in ALL_KINDS if k in set(kinds))
    if not chosen:
        return None
    email = email_ascii = glued = glued_ascii = email_astral = glued_astral = None
    if "email" in chosen:
        email = re.compile("(?P<email>{})".format("".join(_email_parts(_LETTER, _ZW))))
        email_ascii = re.compile("(?P<email>{})".format("".join(_email_parts("[A-Za-z]", _ZW))))
        email_astral = re.compile(f"(?P<email>{_PATTERNS['email']})")
        glued = re.compile(_email_parts(_LETTER, _ZW)[1])
        glued_ascii = re.compile(_email_parts("[A-Za-z]", _ZW)[1])
        glued_astral = re.compile(_PARTS["email"][1])
    rest = [k for k in chosen if k != "email"]
    # The look-ahead rejects most positions (letters, spaces) in one step.
    others = (
        re.compile("(?=[0-9+(A-Z])(?:" + "|".join(f"(?P<{k}>{_PATTERNS[k]})" for k in rest) + ")") if rest else None
    )
    kinds = {k: _Kind.build(k, rest[i + 1 :]) for i, k in enumerate(rest)}
    return Redactor(email, email_ascii, glued, glued_ascii, email_astral, glued_astral, others, kinds)


class StreamRedactor:
    """Feed text pieces; get back what is safe to emit now. `flush()` at the end.

    For any split of a text into pieces, the concatenated outputs equal `redact(text)`.
    """

    __slots__ = ("_after", "_digits", "_on_redaction", "_redactor", "_start", "_text")

    def __init__(self, redactor: Redactor, on_redaction: OnRedaction | None) -> None:
        self._redactor = redactor
        self._on_redaction = on_redaction
        self._text = ""  # a little emitted context (for look-behind) + the held tail
        # The `digit_view` of the text matched (_text; a JSON text's view), kept so that a feed
        # translates only its piece (a translation costs ~75 ns a character); None: the text itself.
        self._digits: str | None = None
        self._start = 0  # where the held tail begins in _text
        self._after = False  # whether an address ended there (`Redactor._matches`: one may be glued to it)

    @property
    def held(self) -> int:
        return len(self._text) - self._start

    def _digits_of(self, text: str, before: str, piece: str) -> str:
        """The `digit_view` of text, which is `before` (the text matched so far) + piece."""
        if self._digits is None:
            if piece.isascii() and "\t" not in piece:
                return text
            viewed = digit_view(piece)
            return text if viewed is piece else before + viewed
        return self._digits + digit_view(piece)

    def feed(self, piece: str) -> str:
        text = self._text + piece
        start = self._start
        redactor = self._redactor
        # Redactor.settle and _keep, written out: this runs once per streamed event.
        digits = self._digits_of(text, self._text, piece)
        hold = redactor.hold(text, start, digits)
        if redactor.may_match(text, start, digits):
            after = start if self._after else -1
            out, settled, after = redactor.settle_matches(text, start, hold, self._on_redaction, False, after, digits)
            self._after = after == settled
        else:  # the common case: nothing complete to check
            if self._after:  # rare: an address ended where the held tail starts
                hold = redactor.glued_hold(text, start, hold)
                self._after = hold == start
            out, settled = text[start:hold], hold
        keep_from = settled - _CONTEXT if settled > _CONTEXT else 0
        self._text = text[keep_from:]
        self._digits = None if digits is text else digits[keep_from:]
        self._start = settled - keep_from
        return out

    def feed_unmasked(self, piece: str, final: bool = False) -> tuple[str, int] | None:
        """`feed`, for the common case that nothing gets masked: returns the text held before
        and how many characters of held + piece are emitted now (the output is exactly
        that prefix). When something would be masked: None, and nothing changes.
        `final`: the piece is the text's last, so nothing is held back (`flush` included)."""
        start = self._start
        text = self._text + piece
        redactor = self._redactor
        digits = self._digits_of(text, self._text, piece)
        settled = len(text) if final else redactor.hold(text, start, digits)
        if redactor.may_match(text, start, digits):  # something complete to check
            masked: list[str] = []
            after = start if self._after else -1
            _, settled, after = redactor.settle_matches(text, start, settled, masked.append, final, after, digits)
            if masked:
                return None
            self._after = after == settled
        elif self._after:  # rare: an address ended where the held tail starts
            if not final:
                settled = redactor.glued_hold(text, start, settled)
            self._after = settled == start
        held = self._text[start:]
        self._keep(text, digits, settled)
        return held, settled - start

    def _keep(self, text: str, digits: str, settled: int) -> None:
        """Hold text[settled:], with a little context before it for the look-behinds."""
        keep_from = settled - _CONTEXT if settled > _CONTEXT else 0
        self._text = text[keep_from:]
        self._digits = None if digits is text else digits[keep_from:]
        self._start = settled - keep_from

    def flush(self) -> str:
        """The held text, redacted as final. Text fed after a flush (an upstream that goes on
        after a part's end) is a text of its own, with no look-behind into this one: a match
        reaching back into text already sent could otherwise hide what follows it in clear."""
        text, start, after = self._text, self._start, self._after
        self._text = ""
        self._digits = None
        self._start = 0
        self._after = False
        if start == len(text):
            return ""
        # The tail is final now.
        return self._redactor.redact_from(text, start, self._on_redaction, start if after else -1)


def _unsent(owed: str, out: str) -> tuple[str, str]:
    """A resumed stream's output `out` without what repeats `owed`, the held text it went on
    from, which went out already (see ResumedStream); and what of `owed` is still to come."""
    if not owed:
        return out, ""
    if out.startswith(owed):
        return out[len(owed) :], ""
    if owed.startswith(out):
        return "", owed[len(out) :]
    same = 0
    while out[same] == owed[same]:  # they differ before either ends (the two tests above)
        same += 1
    return out[same:], ""


class ResumedStream(StreamRedactor):
    """A text stream that goes on after its held text was sent: a chat choice's content,
    flushed before its first tool call (the openai SDK fires content.done there) and written
    to again after the calls (Claude's text, tool_use, text), which every client joins. `sent`,
    that held text as it went out, is fed again as this stream's start, so PII the new text
    completes ("jane.doe@", then "example.com") is found; what repeats `sent` is not sent
    twice, and where a mask reaches back into it the rest of the mask goes out (what was sent
    stays sent: the mask hides what follows). Plain text only (the fast path's
    `feed_unmasked` is not for it: `type(...) is StreamRedactor` keeps it out). `held`, after
    `flush`: the whole held text it ended with, `sent`'s part included, which text after the
    next calls continues (not only its new part: a value cut by two calls)."""

    __slots__ = ("_owed", "held_text")

    def __init__(self, redactor: Redactor, on_redaction: OnRedaction | None, sent: str) -> None:
        super().__init__(redactor, on_redaction)
        self._owed = sent
        self.held_text = ""
        self.feed(sent)  # `sent` alone: nothing new to send

    def feed(self, piece: str) -> str:
        out, self._owed = _unsent(self._owed, super().feed(piece))
        return out

    def flush(self) -> str:
        self.held_text = super().flush()
        out, self._owed = _unsent(self._owed, self.held_text)
        return out


# JSON text. What stands in the view for a character that must take part in no match and
# that every pattern treats as a boundary (as it does a space).
_BLANK = "\x00"
# A backslash is a space in the view whatever follows it, which a piece's end may cut off: the
# view of a prefix stays a prefix of the view. The character after it is blank, but a tab's "t".
_BACKSLASH_BLANK = " " + _BLANK
_TAB_VIEW = " " + _TAB_MARK  # "\\t": a separator, as a tab is (`_TAB_MARK`)
_HEX = re.compile(r"[0-9A-Fa-f]*")
# An escape: a backslash and the character after it, and after a "u" up to 4 hex digits
# (fewer only when a character that ends them is known). A string's body runs up to its
# closing quote, whole escapes included; one cut by the piece's end stops it, and the
# character-by-character path takes it.
_ESCAPE_SOURCE = r"\\(?:u(?:[0-9A-Fa-f]{4}|[0-9A-Fa-f]{0,3}(?=[^0-9A-Fa-f]))|[^u])"
_ESCAPE = re.compile(_ESCAPE_SOURCE)
_STRING_BODY = re.compile(rf'[^"\\]*+(?:{_ESCAPE_SOURCE}[^"\\]*+)*+')
# Outside strings, valid JSON has "," only between values and "+" only in an exponent, after
# its "e" (a "+" elsewhere is no JSON: prose, as a structured output's refusal, "+44 20 …").
_OUTSIDE = str.maketrans({",": _BLANK})
_EXPONENT_SIGN = re.compile(r"(?<=[eE])\+")


def _outside(part: str, after_e: bool) -> str:
    """A run of text outside strings as the view has it; `after_e`: the character before it is
    an "e" or "E"."""
    part = part.translate(_OUTSIDE)
    if part.find("+") < 0:
        return part
    part = _EXPONENT_SIGN.sub("_", part)
    return "_" + part[1:] if after_e and part.startswith("+") else part


# An escape of a JSON text as the unescaper reads it: a backslash and the character after it,
# a "\u" with up to 4 hex digits, or a lone backslash at the end.
# A character past U+FFFF is written as two escapes, a surrogate pair: one escape here, and at the
# text's end a high surrogate with what has come of a low one, which the next piece may finish.
_HIGH = r"u[dD][89abAB][0-9A-Fa-f]{2}"
_ANY_ESCAPE = re.compile(
    rf"\\(?:{_HIGH}\\u[dD][c-fC-F][0-9A-Fa-f]{{2}}|{_HIGH}(?:\\(?:u(?:[dD](?:[c-fC-F][0-9A-Fa-f]?)?)?)?)?\Z"
    r"|u[0-9A-Fa-f]{0,4}|[^u]|\Z)",
    re.S,
)
# What an escape may be written as instead: printable ASCII but the quote and the backslash, the
# no-break and typographic spaces and dashes that group digits, other scripts' digits (`digit_view`), the
# zero-width characters an address or a number may hold (`_ZW`), letters (an
# address's, "j\\u00e4ne"). A JSON parser reads either form as the same character.
_A_LETTER = re.compile(_LETTER)  # as an address reads it, "²" too: escaped or not, the same text
_PLAIN = frozenset(chr(c) for c in range(0x20, 0x7F)) - {'"', "\\"} | set(
    _SPACE + _HYPHEN + _DASHES + _OTHER_SPACES.replace("\t", "") + _FOREIGN_DIGITS + _ZW + _ZW_ASTRAL
)


def _surrogate(written: str) -> bool:
    """Whether an escape is a high surrogate, alone or with part of a low one after it."""
    return 6 <= len(written) < 12 and written[2] in "dD" and written[3] in "89abAB"


class JsonUnescaper:
    """A JSON text's escapes of ordinary characters written as those characters, piece by
    piece ("\\u0040" becomes "@"): the JSON means the same, and PII written with escapes,
    which a client's parser would turn back into clear text, is matched like any other. An
    escape the piece's end may have cut waits for the next piece (`final`: none comes)."""

    __slots__ = ("_pending",)

    def __init__(self) -> None:
        self._pending = ""

    @property
    def pending(self) -> str:
        """An escape cut by the last piece's end, waiting for its rest."""
        return self._pending

    @pending.setter
    def pending(self, value: str) -> None:
        self._pending = value

    def feed(self, piece: str, final: bool = False) -> str:
        text = self._pending + piece if self._pending else piece
        self._pending = ""
        if text.find("\\") < 0:
            return text
        end = len(text)

        def plain(escape: re.Match[str]) -> str:
            written = escape.group()
            size = len(written)
            if (
                escape.end() == end
                and not final
                and ((size < 6 and (size == 1 or written[1] == "u")) or _surrogate(written))
            ):
                self._pending = written  # "\\", "\\u00", "\\ud83d" at the end: the next piece finishes it
                return ""
            if size == 6:
                character = chr(int(written[2:], 16))
            elif size == 12:
                character = chr(0x10000 + (int(written[2:6], 16) - 0xD800) * 0x400 + int(written[8:], 16) - 0xDC00)
            else:
                return written
            return character if character in _PLAIN or _A_LETTER.match(character) else written

        return _ANY_ESCAPE.sub(plain, text)


def _blanked(escape: re.Match[str]) -> str:
    """An escape's view: its backslash a space, the "t" of "\\t" `_TAB_MARK` (a tab sets digit
    groups apart, as in text that is not JSON), the rest blank."""
    rest = _BLANK * (escape.end() - escape.start() - 2)
    return (_TAB_VIEW if escape.group() == "\\t" else _BACKSLASH_BLANK) + rest


class JsonView:
    """The view a JSON text is matched in, built piece by piece: the same length, every
    escape sequence inside a string blanked but its backslash, a space (a mask never takes part
    of one, and "\\n" before a card number is a line break, not the letter n; "\\t", a space and
    `_TAB_MARK`, sets digit groups apart as a tab does in plain text), a comma outside strings blanked
    (in `[4242…,5555…]` it separates two numbers; in prose it would join digits), and a "+"
    outside strings after an "e" made "_" (an exponent's: `1e+4242…` holds no card; a "+"
    elsewhere is no JSON, and stays: prose's "+44 20 7946 0958" is a phone). Each
    character's view depends only on the text before it, so the view of a prefix is a prefix
    of the view, which the split guarantee needs. State: three small values."""

    __slots__ = ("_after_e", "_escape", "_in_string")

    def __init__(self) -> None:
        self._in_string = False
        self._escape = 0  # -1: just after a backslash; 1..4: hex digits a "\\u" may still take
        self._after_e = False  # the last piece ended in "e" or "E"

    @property
    def state(self) -> tuple[bool, int, bool]:
        return self._in_string, self._escape, self._after_e

    @state.setter
    def state(self, value: tuple[bool, int, bool]) -> None:
        self._in_string, self._escape, self._after_e = value

    def view(self, piece: str) -> str:
        after_e = self._after_e
        if piece:
            self._after_e = piece[-1] in "eE"
        if not self._escape and piece.find("\\") < 0:  # no escape: only the parts outside strings change
            parts = piece.split('"')
            outside = 1 if self._in_string else 0
            parts[outside::2] = [_outside(part, False) for part in parts[outside::2]]
            if not outside and parts[0].startswith("+"):
                parts[0] = _outside(parts[0], after_e)
            if len(parts) % 2 == 0:  # an odd number of quotes
                self._in_string = not self._in_string
            return '"'.join(parts)
        out: list[str] = []
        i, n = 0, len(piece)
        in_string, escape = self._in_string, self._escape
        while i < n:
            if escape:  # an escape cut by the last piece's end, or a malformed one
                if escape < 0:
                    out.append(_TAB_MARK if piece[i] == "t" else _BLANK)
                    escape = 4 if piece[i] == "u" else 0
                    j = i + 1
                else:
                    j = _HEX.match(piece, i, min(n, i + escape)).end()  # type: ignore[union-attr]
                    escape = escape - (j - i) if j == n else 0
                    out.append(_BLANK * (j - i))
                i = j
            elif in_string:
                j = _STRING_BODY.match(piece, i).end()  # type: ignore[union-attr]
                body = piece[i:j]
                if body.find("\\") >= 0:  # blanked with the character after it: an escape may look at it
                    body = _ESCAPE.sub(_blanked, piece[i : j + 1])[: j - i]
                out.append(body)
                if j == n:
                    break
                if piece[j] == '"':
                    out.append('"')
                    in_string = False
                else:  # a backslash the body stopped at: an escape the piece's end cuts
                    out.append(" ")
                    escape = -1
                i = j + 1
            else:
                j = piece.find('"', i)
                start_e = after_e and not i  # at the piece's start: the last piece's end is before it
                if j < 0:
                    out.append(_outside(piece[i:], start_e))
                    break
                out.append(_outside(piece[i:j], start_e))
                out.append('"')
                in_string = True
                i = j + 1
        self._in_string, self._escape = in_string, escape
        return "".join(out)


# What a JsonStreamRedactor's feed changes: its texts, where the held tail starts, whether it
# is inside a string, the scanner's and the unescaper's states, and whether an address just ended.
_JsonState = tuple[str, str, str | None, int, bool, tuple[bool, int, bool], str, bool]


class JsonStreamRedactor(StreamRedactor):
    """`StreamRedactor` for a JSON text (streamed tool-call arguments): matched in the text's
    `JsonView`, a mask outside a string quoted. The same split guarantee, against
    `redact(text, json_text=True)`."""

    __slots__ = ("_in_string", "_plain", "_scan", "_view")

    def __init__(self, redactor: Redactor, on_redaction: OnRedaction | None) -> None:
        super().__init__(redactor, on_redaction)
        self._plain = JsonUnescaper()
        self._scan = JsonView()
        self._view = ""  # the view of _text
        self._in_string = False  # whether the held tail starts inside a string

    @property
    def held(self) -> int:
        return len(self._text) - self._start + len(self._plain.pending)  # an escape cut short is held too

    def suspend(self) -> tuple[str, bool, str]:
        """`flush`, for a text that goes on after a pause (see ResumedJsonStream): the held
        text; whether it began inside a string, where the stream that goes on reads it from;
        and an escape cut short, kept back: no character until its rest comes (written out,
        "\\u00" then "e4" would be no escape to the client's parser, and the text after the
        pause would read "e4" as letters of its own). Held text that ends outside a string (a
        number the pause cut: `{"n": 4242` then `4242…`) is kept back whole, unredacted, as
        such an escape is: flushed, its digits went out as they were, or masked as a number of
        their own, and the digits after the pause made a card with them, or a mask that broke
        the document (`4242"CC_MASKED_LAST4_4242"`)."""
        in_string, pending = self._in_string, self._plain.pending
        held = self._text[self._start :]  # as it came, escapes of ordinary characters written out
        sent = self._held_sent()
        if not pending and len(held) > len(sent) and not self._scan.state[0] and held.startswith(sent):
            self._text = self._view = ""
            self._digits = None
            self._start = 0
            return "", in_string, held[len(sent) :]
        self._plain.pending = ""
        return self.flush(), in_string, pending

    def _held_sent(self) -> str:
        """What the held text starts with that went out already (ResumedJsonStream's)."""
        return ""

    def feed(self, piece: str) -> str:
        return self._settle(self._plain.feed(piece), False, self._on_redaction)

    def flush(self) -> str:
        out = self._settle(self._plain.feed("", final=True), True, self._on_redaction)
        # As StreamRedactor.flush: what follows is read with no look-behind (the JSON state stays,
        # but whether an "e" came last, the view's look-behind for a "+": "call me" then "+1 415
        # 555 2671" showed its "+1" as an exponent's sign, outside the phone's mask).
        in_string, escape, _ = self._scan.state
        self._scan.state = (in_string, escape, False)
        self._text = self._view = ""
        self._digits = None
        self._start = 0
        self._after = False
        return out

    def feed_unmasked(self, piece: str, final: bool = False) -> tuple[str, int] | None:
        saved = self._state()
        held = self._text[self._start :]
        masked: list[str] = []
        out = self._settle(self._plain.feed(piece, final), final, masked.append)
        if masked:  # put everything back: the caller feeds the piece again
            self._restore(saved)
            return None
        return held, len(out)

    def _state(self) -> _JsonState:
        """Everything a feed changes, for `feed_unmasked` to put back."""
        return (
            self._text,
            self._view,
            self._digits,
            self._start,
            self._in_string,
            self._scan.state,
            self._plain.pending,
            self._after,
        )

    def _restore(self, saved: _JsonState) -> None:
        (
            self._text,
            self._view,
            self._digits,
            self._start,
            self._in_string,
            self._scan.state,
            self._plain.pending,
            self._after,
        ) = saved

    def _settle(self, piece: str, final: bool, on_redaction: OnRedaction | None) -> str:
        start = self._start
        text = self._text + piece
        viewed = self._scan.view(piece)
        view = self._view + viewed
        redactor = self._redactor
        after = start if self._after else -1
        digits = self._digits_of(view, self._view, viewed)
        hold = len(view) if final else redactor.hold(view, start, digits)
        if redactor.may_match(view, start, digits):
            out, settled, self._in_string, after = redactor.settle_json(
                view, text, start, hold, final, self._in_string, on_redaction, after, digits
            )
        else:
            if after >= 0 and start < hold and not final:
                hold = redactor.glued_hold(view, start, hold)
            out, settled = text[start:hold], hold
            if view.count('"', start, hold) & 1:
                self._in_string = not self._in_string
        self._after = after == settled
        keep_from = settled - _CONTEXT if settled > _CONTEXT else 0
        self._text = text[keep_from:]
        self._view = view[keep_from:]
        self._digits = None if digits is view else digits[keep_from:]
        self._start = settled - keep_from
        return out


class ResumedJsonStream(JsonStreamRedactor):
    """`ResumedStream` for a JSON text (a structured output's content, which clients join
    around the tool calls as they do any content): the same document goes on, so the new
    stream reads `sent` from where its held text began, inside a string or not, and takes the
    escape the pause cut short as its next piece's start (`JsonStreamRedactor.suspend`).
    Started afresh, the text after the calls was read as a new document: the address or card
    it completed went out in clear, and text inside a string was taken for text outside one
    (a number there masked with quotes round it, which broke the document)."""

    __slots__ = ("_owed", "held_text")

    def __init__(
        self, redactor: Redactor, on_redaction: OnRedaction | None, sent: str, in_string: bool, pending: str
    ) -> None:
        super().__init__(redactor, on_redaction)
        self._in_string = in_string
        self._scan.state = (in_string, 0, False)
        self._owed = sent
        self.held_text = ""
        self.feed(sent)  # `sent` alone: nothing new to send
        self._plain.pending = pending

    def feed(self, piece: str) -> str:  # as ResumedStream's
        out, self._owed = _unsent(self._owed, super().feed(piece))
        return out

    def suspend(self) -> tuple[str, bool, str]:
        # Kept back (a number), the held text that went out before stays what it was resumed with.
        self.held_text = self._owed
        return super().suspend()

    def _held_sent(self) -> str:
        return self._owed

    def flush(self) -> str:
        self.held_text = super().flush()
        out, self._owed = _unsent(self._owed, self.held_text)
        return out


# Texts longer than this are redacted by `redact_yielding` (the proxy's choice): shorter
# ones cost at most a few milliseconds whatever their content.
YIELD_ABOVE_CHARS = 16_384
_SLICE_CHARS = 16_384  # ~6 ms of the costliest text measured (bench/redaction.py), ~0.1 ms of prose
_SLICE_SECONDS = 0.010  # a slower machine: slices shrink until one takes no longer than this


async def redact_yielding(
    redactor: Redactor,
    text: str,
    on_redaction: OnRedaction | None = None,
    json_text: bool = False,
    *,
    slice_chars: int = _SLICE_CHARS,
) -> str:
    """`redactor.redact(text, on_redaction, json_text)`, exactly (the split guarantee), for
    a long text: fed through a stream in slices of at most `slice_chars`, yielding to the
    event loop after each, so no slice keeps other requests waiting more than ~10 ms
    (SPEC §6: an 8 MiB prompt). Slices shrink while one takes longer than that."""
    stream = redactor.stream(on_redaction, json_text)
    pieces: list[str] = []
    size = slice_chars
    pos, n = 0, len(text)
    while pos < n:
        began = time.perf_counter()
        pieces.append(stream.feed(text[pos : pos + size]))
        pos += size
        took = time.perf_counter() - began
        if took > _SLICE_SECONDS and size > 1024:
            size //= 2
        elif took < _SLICE_SECONDS / 4 and size < slice_chars:
            size = min(size * 2, slice_chars)
        await asyncio.sleep(0)
    pieces.append(stream.flush())
    return "".join(pieces)


def redact_sliced(
    redactor: Redactor,
    text: str,
    on_redaction: OnRedaction | None = None,
    json_text: bool = False,
    *,
    slice_chars: int = _SLICE_CHARS,
) -> str:
    """`redactor.redact(text, on_redaction, json_text)`, exactly (the split guarantee), for a
    text redacted off the event loop, in a worker thread: fed through a stream in slices, so
    no single call into the regex engine holds the GIL for long (one search over megabytes
    can take seconds), and the loop's thread gets it back every few milliseconds."""
    if len(text) <= slice_chars:
        return redactor.redact(text, on_redaction, json_text)
    stream = redactor.stream(on_redaction, json_text)
    return feed_sliced(stream, text, slice_chars=slice_chars) + stream.flush()


def feed_sliced(stream: StreamRedactor, text: str, *, slice_chars: int = _SLICE_CHARS) -> str:
    """`stream.feed(text)`, exactly (the split guarantee), in slices: for a long text fed in a
    worker thread (see `redact_sliced`)."""
    if len(text) <= slice_chars:
        return stream.feed(text)
    return "".join([stream.feed(text[pos : pos + slice_chars]) for pos in range(0, len(text), slice_chars)])
