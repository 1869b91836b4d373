"""Remembered redactions: same answer and same counts as redacting again, bounded, no PII kept."""

from __future__ import annotations

import hashlib
from collections import Counter

from hypothesis import given
from hypothesis import strategies as st

from gateway.memo import RedactionMemo
from gateway.redact import ALL_KINDS, YIELD_ABOVE_CHARS, build_redactor, redact_yielding

REDACTOR = build_redactor(ALL_KINDS)
assert REDACTOR is not None
SYSTEM = "You are a support agent. Escalate to ops@example.com or +1 415 555 2671 when in doubt. " * 2


def test_a_resent_text_gets_the_same_redaction_and_counts_again() -> None:
    memo = RedactionMemo(REDACTOR)
    first: list[tuple[str, int]] = []
    again: list[tuple[str, int]] = []
    assert memo.redact("t1", SYSTEM, lambda kind, n: first.append((kind, n))) == REDACTOR.redact(SYSTEM)
    assert memo.redact("t1", SYSTEM, lambda kind, n: again.append((kind, n))) == REDACTOR.redact(SYSTEM)
    assert first == again == [("email", 2), ("phone", 2)]  # every request's masks are counted
    assert len(memo) == 1


def test_texts_not_remembered_are_counted_too() -> None:
    counted: list[tuple[str, int]] = []
    text = "a@b.io c@d.io"  # too short to remember
    assert RedactionMemo(REDACTOR).redact("t", text, lambda kind, n: counted.append((kind, n))) == "a***@b.io c***@d.io"
    assert counted == [("email", 2)]


def test_tenants_do_not_share_entries() -> None:
    memo = RedactionMemo(REDACTOR)
    memo.redact("t1", SYSTEM, None)
    memo.redact("t2", SYSTEM, None)
    assert len(memo) == 2


def test_nothing_that_could_be_pii_is_kept() -> None:
    memo = RedactionMemo(REDACTOR)
    memo.redact("tenant-key-123", SYSTEM, None)
    for key, (clean, kinds) in memo._entries.items():
        assert len(key) == 16 and b"ops@" not in key and b"tenant-key" not in key
        assert "ops@example.com" not in clean and "415 555" not in clean
        assert kinds == (("email", 2), ("phone", 2))


def test_short_texts_and_texts_without_triggers_are_not_kept() -> None:
    memo = RedactionMemo(REDACTOR)
    assert memo.redact("t", "mail a@b.io", None) == "mail a***@b.io"
    assert memo.redact("t", "plain words only, " * 10, None) == "plain words only, " * 10
    assert len(memo) == 0


def test_the_table_is_bounded_by_characters() -> None:
    memo = RedactionMemo(REDACTOR, max_chars=1_000)
    for i in range(50):
        text = f"Ticket {i:04d}: reach me at ops{i}@example.com about the refund, thanks a lot."
        assert memo.redact("t", text, None) == REDACTOR.redact(text)
    assert sum(len(clean) for clean, _ in memo._entries.values()) <= 1_000
    assert 0 < len(memo) < 50


async def test_long_texts_count_the_same_through_redact_yielding() -> None:
    # The proxy sends texts over YIELD_ABOVE_CHARS through redact_yielding (one call per
    # mask), shorter ones through the memo (one call per kind): the totals must agree.
    memo = RedactionMemo(REDACTOR)
    long_text = SYSTEM * 200 + "card 4242 4242 4242 4242, " * 50
    assert len(long_text) > YIELD_ABOVE_CHARS
    for text in (SYSTEM, long_text):
        per_kind: list[tuple[str, int]] = []
        clean = memo.redact("t", text, lambda kind, n, into=per_kind: into.append((kind, n)))
        per_mask: list[str] = []
        assert await redact_yielding(REDACTOR, text, per_mask.append) == clean
        assert dict(per_kind) == Counter(per_mask)


@given(st.text(max_size=20), st.text(min_size=64, max_size=200).map(lambda text: text + " a@b.io"))
def test_entries_are_keyed_by_the_keyed_blake2b_of_the_tenant_and_the_text(tenant: str, text: str) -> None:
    # The key is a copy of a keyed BLAKE2b made once (the constructor's arguments cost a
    # quarter of a short text's key): the same digest as one made for the text.
    memo = RedactionMemo(REDACTOR)
    memo.redact(tenant, text, None)
    made = hashlib.blake2b(tenant.encode(), key=memo._secret, digest_size=16)
    made.update(b"\0" + text.encode("utf-8", "surrogatepass"))
    assert list(memo._entries) == [made.digest()]
