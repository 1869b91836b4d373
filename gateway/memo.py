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
from collections import OrderedDict

from .redact import OnRedaction, Redactor, has_trigger

MIN_CHARS = 64  # shorter texts are cheaper to redact than to look up
MAX_CHARS = 16_384  # longer ones are rarely resent verbatim, and would crowd the table


class RedactionMemo:
    __slots__ = ("_chars", "_entries", "_max_chars", "_redactor", "_secret")

    def __init__(self, redactor: Redactor, max_chars: int = 2_000_000) -> None:
        self._redactor = redactor
        self._secret = os.urandom(32)
        self._entries: OrderedDict[bytes, tuple[str, tuple[str, ...]]] = OrderedDict()
        self._chars = 0  # the table's size: the redacted texts' characters
        self._max_chars = max_chars

    def redact(self, tenant: str, text: str, on_redaction: OnRedaction | None) -> str:
        if not has_trigger(text, 0):
            return text  # nothing here can be PII (the redactor's own first check)
        if not MIN_CHARS <= len(text) <= MAX_CHARS:
            return self._redactor.redact(text, on_redaction)
        digest = hashlib.blake2b(tenant.encode(), key=self._secret, digest_size=16)
        digest.update(b"\0")
        digest.update(text.encode("utf-8", "surrogatepass"))
        key = digest.digest()
        entries = self._entries
        entry = entries.get(key)
        if entry is None:
            masked: list[str] = []
            entry = entries[key] = (self._redactor.redact(text, masked.append), tuple(masked))
            self._chars += len(entry[0])
            while self._chars > self._max_chars:
                _, (old, _) = entries.popitem(last=False)
                self._chars -= len(old)
        else:
            entries.move_to_end(key)
        clean, kinds = entry
        if on_redaction is not None:  # counted on every request, hit or miss
            for kind in kinds:
                on_redaction(kind)
        return clean

    def __len__(self) -> int:
        return len(self._entries)
