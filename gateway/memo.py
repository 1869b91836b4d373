"""Redacted message texts remembered per tenant, so a text sent again is not scanned again.

Chat clients resend the same texts on every request: the system prompt, and the whole
conversation so far. Redaction is a pure function of the text, so the result (and the
kinds masked, for the metrics) is kept in a bounded LRU table. Nothing that could carry
PII is kept: entries are keyed by a keyed BLAKE2b digest of the tenant and the text (the
key is random per process, so nobody can craft a collision), and hold only the redacted
text. Keys include the tenant, so response timing cannot tell one tenant whether another
sent a given text. Texts without any "@" or digit skip the table: scanning them costs
less than hashing them.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter, OrderedDict
from collections.abc import Callable

from .redact import Redactor, has_trigger

CountMasks = Callable[[str, int], None]  # called with each kind masked and how many times

MIN_CHARS = 64  # shorter texts are cheaper to redact than to look up
MAX_CHARS = 16_384  # longer ones are rarely resent verbatim, and would crowd the table


class RedactionMemo:
    __slots__ = ("_chars", "_entries", "_keyed", "_max_chars", "_redactor", "_secret")

    def __init__(self, redactor: Redactor, max_chars: int = 2_000_000) -> None:
        self._redactor = redactor
        self._secret = os.urandom(32)
        self._keyed = hashlib.blake2b(key=self._secret, digest_size=16)  # nothing in it yet: copied per text
        self._entries: OrderedDict[bytes, tuple[str, tuple[tuple[str, int], ...]]] = OrderedDict()
        self._chars = 0  # the table's size: the redacted texts' characters
        self._max_chars = max_chars

    def redact(self, tenant: str, text: str, count: CountMasks | None) -> str:
        """The text redacted; `count` gets each kind masked in it and how many times (a
        remembered text's masks are counted again: every request's are)."""
        if not has_trigger(text, 0):
            return text  # nothing here can be PII (the redactor's own first check)
        if not MIN_CHARS <= len(text) <= MAX_CHARS:
            clean, kinds = self._redacted(text)
            return _counted(clean, kinds, count)
        digest = self._keyed.copy()  # (copied: a new keyed one parses its arguments each time)
        digest.update(tenant.encode())
        digest.update(b"\0")
        digest.update(text.encode("utf-8", "surrogatepass"))
        key = digest.digest()
        entries = self._entries
        entry = entries.get(key)
        if entry is None:
            entry = entries[key] = self._redacted(text)
            self._chars += len(entry[0])
            while self._chars > self._max_chars:
                _, (old, _) = entries.popitem(last=False)
                self._chars -= len(old)
        else:
            entries.move_to_end(key)
        return _counted(*entry, count)

    def _redacted(self, text: str) -> tuple[str, tuple[tuple[str, int], ...]]:
        masked: list[str] = []
        clean = self._redactor.redact(text, masked.append)
        return clean, tuple(Counter(masked).items())

    def __len__(self) -> int:
        return len(self._entries)


def _counted(clean: str, kinds: tuple[tuple[str, int], ...], count: CountMasks | None) -> str:
    if count is not None:  # one call per kind, not per mask: a resent history can hold many
        for kind, times in kinds:
            count(kind, times)
    return clean
