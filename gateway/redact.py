"""PII detection and masking, for whole texts and for text that arrives in pieces.

One combined pattern finds candidates (leftmost first, like `re.finditer`); a validator per
kind (Luhn, mod-97, digit counts) decides whether a candidate is PII. Every pattern has a
bounded length (`MAX_MATCH` characters), which is what makes streaming exact:

`StreamRedactor` emits a prefix only once nothing that arrives later can change how that
prefix is redacted. It uses the `regex` module's partial matching to find the earliest
position where a match could still start; text before it is final. A complete match is
final once `MAX_MATCH` characters after its start have been seen (a longer alternative
could still win before that). So the held tail is at most `MAX_MATCH` characters, and only
while it could still be PII; ordinary prose holds back at most its last word.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import regex

MAX_MATCH = 80  # longest possible match plus look-ahead; the bound on held-back text
_CONTEXT = 2  # characters of look-behind the patterns need

_EMAIL = (
    r"(?<![A-Za-z0-9._%+*@-])[A-Za-z0-9._%+-]{1,32}"  # not after "*": masks stay masks
    r"@[A-Za-z0-9][A-Za-z0-9.-]{0,30}\.[A-Za-z]{2,10}(?![A-Za-z0-9@-]|\.[A-Za-z0-9])"
)
# Payment cards: 13-19 digits in groups, issuer prefixes 2-6 (timestamps start with 1).
_CARD = r"(?<![\w.,-])[2-6]\d{3}(?:[ -]?\d){9,15}(?![\w-]|[.,]\d)"
# Phones: international (+CC ...) or North American with separators; bare digit runs
# (order numbers, timestamps) and dates never qualify.
_PHONE = (
    r"(?<![\w+.-])(?:\+[1-9]\d{0,2}(?:[ .-]?\(?\d{1,4}\)?){2,5}"
    r"|(?:\([2-9]\d{2}\) ?|[2-9]\d{2}[ .-])[2-9]\d{2}[ .-]\d{4})(?![\w-]|[.,]\d)"
)
_IBAN = r"(?<![A-Za-z0-9])[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?(?![A-Za-z0-9])"
_SSN = r"(?<![\w-])(?!000|666|9)\d{3}-(?!00)\d{2}-(?!0000)\d{4}(?![\w-])"

_PATTERNS = {"email": _EMAIL, "card": _CARD, "phone": _PHONE, "iban": _IBAN, "ssn": _SSN}
ALL_KINDS = tuple(_PATTERNS)


def _digits(text: str) -> str:
    return "".join(c for c in text if c.isdigit())


def _luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _mask_email(text: str) -> str | None:
    local, _, domain = text.partition("@")
    if len(local) <= 2:
        return f"{local[0]}***@{domain}"
    return f"{local[0]}***{local[-1]}@{domain}"


def _mask_card(text: str) -> str | None:
    digits = _digits(text)
    if not 13 <= len(digits) <= 19 or not _luhn_ok(digits):
        return None
    return f"CC_MASKED_LAST4_{digits[-4:]}"


def _mask_phone(text: str) -> str | None:
    digits = _digits(text)
    if text.startswith("+") and not 8 <= len(digits) <= 15:
        return None
    return f"PHONE_MASKED_LAST2_{digits[-2:]}"


def _mask_iban(text: str) -> str | None:
    compact = text.replace(" ", "")
    if not 15 <= len(compact) <= 34:
        return None
    rearranged = compact[4:] + compact[:4]
    number = "".join(str(int(c, 36)) for c in rearranged)
    if int(number) % 97 != 1:
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


@dataclass(frozen=True, slots=True)
class Redactor:
    """Redacts whole texts; makes `StreamRedactor`s for text that arrives in pieces."""

    pattern: regex.Pattern[str]
    kinds: tuple[str, ...]

    def redact(self, text: str, on_redaction: OnRedaction | None = None) -> str:
        out, _pos = _scan(self, text, 0, len(text), final=True, on_redaction=on_redaction)
        return out

    def stream(self, on_redaction: OnRedaction | None = None) -> StreamRedactor:
        return StreamRedactor(self, on_redaction)


def build_redactor(kinds: Iterable[str]) -> Redactor | None:
    """None when no kind is enabled (`REDACT_KINDS=`): callers then skip redaction entirely."""
    chosen = tuple(k for k in ALL_KINDS if k in set(kinds))
    if not chosen:
        return None
    combined = "|".join(f"(?P<{k}>{_PATTERNS[k]})" for k in chosen)
    return Redactor(regex.compile(combined), chosen)


def _scan(
    redactor: Redactor,
    text: str,
    start: int,
    end: int,
    *,
    final: bool,
    on_redaction: OnRedaction | None,
) -> tuple[str, int]:
    """Redact text[start:end]; return (output, position up to which it is settled).

    With final=False stop before anything that more text could still change.
    """
    pattern = redactor.pattern
    pieces: list[str] = []
    pos = start
    while pos < end:
        m = pattern.search(text, pos, end, partial=not final)
        if m is None:
            break
        s, e = m.span()
        if not final and (m.partial or s + MAX_MATCH > end):
            pieces.append(text[pos:s])
            return "".join(pieces), s
        kind = m.lastgroup
        assert kind is not None
        masked = _MASKERS[kind](text[s:e])
        if masked is None:  # a look-alike (failed checksum): leave it as it is
            pieces.append(text[pos:e])
        else:
            pieces.append(text[pos:s])
            pieces.append(masked)
            if on_redaction is not None:
                on_redaction(kind)
        pos = e
    pieces.append(text[pos:end])
    return "".join(pieces), end


class StreamRedactor:
    """Feed text pieces; get back what is safe to emit now. `flush()` at the end.

    For any split of a text into pieces, the concatenated outputs equal `redact(text)`.
    """

    __slots__ = ("_on_redaction", "_redactor", "_start", "_text")

    def __init__(self, redactor: Redactor, on_redaction: OnRedaction | None) -> None:
        self._redactor = redactor
        self._on_redaction = on_redaction
        self._text = ""  # a little emitted context (for look-behind) + the held tail
        self._start = 0  # where the held tail begins in _text

    @property
    def held(self) -> int:
        return len(self._text) - self._start

    def feed(self, piece: str) -> str:
        text = self._text + piece
        out, settled = _scan(self._redactor, text, self._start, len(text), final=False, on_redaction=self._on_redaction)
        keep_from = max(0, settled - _CONTEXT)
        self._text = text[keep_from:]
        self._start = settled - keep_from
        return out

    def flush(self) -> str:
        text = self._text
        out, _ = _scan(self._redactor, text, self._start, len(text), final=True, on_redaction=self._on_redaction)
        self._text = text[-_CONTEXT:] if text else ""
        self._start = len(self._text)
        return out
