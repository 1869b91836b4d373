"""The redactor alone: a 2 KB prompt (three kinds of text) and a 1,000-token streamed reply.

Best of 5 repeats, so a busy machine inflates nothing; prints a markdown table.
"""

from __future__ import annotations

import timeit

from run import sse_reply  # bench/run.py

from gateway import sse
from gateway.redact import ALL_KINDS, build_redactor
from gateway.relay import StreamRelay

REDACTOR = build_redactor(ALL_KINDS)
assert REDACTOR is not None

PROSE = ("The quick brown fox jumps over the lazy dog, and then it naps in the sun. " * 30)[:2048]
BUSINESS = ("Meeting on 2024-01-15 about order 12345 (v3.11.7, $1,234.56); notes by ops@example.com. " * 25)[:2048]
DENSE = (
    "Customer Jane Doe (jane.doe@example.com, +1 415 555 2671) paid with card 4242 4242 4242 4242 "
    "on 2024-01-15 for order 123456789012. "
) * 12
DENSE = DENSE[:2048]
WORDS = [" word", " and", " the", " gateway", " streams", ","] * 167
TOKENS = [" token", "42", " is", " jane", ".doe", "@example", ".com", " ok"] * 125


def best(fn, number: int) -> float:  # type: ignore[no-untyped-def]
    return min(timeit.repeat(fn, number=number, repeat=5)) / number


def stream(deltas: list[str]) -> None:
    redactor = REDACTOR.stream()
    for delta in deltas:
        redactor.feed(delta)
    redactor.flush()


def relay(reads: list[bytes]) -> None:
    step = StreamRelay(REDACTOR, None)
    for read in reads:
        step.feed(read)


def main() -> None:
    rows = [
        ("2 KB prompt, prose (no @, no digits)", best(lambda: REDACTOR.redact(PROSE), 2000) * 1e6, "µs"),
        ("2 KB prompt, dates, numbers, an address per line", best(lambda: REDACTOR.redact(BUSINESS), 200) * 1e6, "µs"),
        ("2 KB prompt, dense PII (every kind, every line)", best(lambda: REDACTOR.redact(DENSE), 200) * 1e6, "µs"),
        ("1,000-token reply of words, per delta", best(lambda: stream(WORDS[:1000]), 5) * 1e6 / 1000, "µs"),
        ("1,000-token reply with digits and an address, per delta", best(lambda: stream(TOKENS), 5) * 1e6 / 1000, "µs"),
    ]
    events = [
        sse.encode(
            b'{"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"%s"},"finish_reason":null}]}'
            % d.encode()
        )
        for d in WORDS[:1000]
    ]
    reply = sse_reply().encode()  # the stream bench's reply: 40 events and [DONE], spaced JSON
    rows += [
        ("relay step per SSE event, 1,000 in one read", best(lambda: relay([b"".join(events)]), 5) * 1e6 / 1000, "µs"),
        ("relay step per SSE event, one per read (a live stream)", best(lambda: relay(events), 5) * 1e6 / 1000, "µs"),
        ("relay step, the stream bench's 40-event reply in one read", best(lambda: relay([reply]), 2000) * 1e6, "µs"),
    ]
    print("| redaction cost (best of 5) | |\n|---|---|")
    for name, value, unit in rows:
        print(f"| {name} | {value:.1f} {unit} |")


if __name__ == "__main__":
    main()
