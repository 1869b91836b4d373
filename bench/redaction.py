"""The redactor alone: a 2 KB prompt (three kinds of text) and a 1,000-token streamed reply;
the cost per MiB of every kind of text, hostile ones included (SPEC §6: linear, ~1 s or less
for 1 MiB of anything); and the longest the event loop waits while an 8 MiB prompt is
redacted by `redact_yielding` (SPEC §6: /healthz within 100 ms meanwhile).

Best of several repeats, so a busy machine inflates nothing; prints markdown tables.
"""

from __future__ import annotations

import asyncio
import time
import timeit

from run import sse_reply  # bench/run.py

from gateway import sse
from gateway.redact import ALL_KINDS, YIELD_ABOVE_CHARS, build_redactor, redact_yielding
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


MIB = 1024 * 1024
# Each repeated to the size measured. The hostile ones were each the worst of a search over
# random texts of their alphabet; "before" figures are in the README.
PER_MIB = [
    ("prose", "The quick brown fox jumps over the lazy dog, and then it naps in the sun. "),
    ("dense PII (every kind, every line)", DENSE),
    ('cards: "4242 " × n', "4242 "),
    ("near-miss cards (Luhn fails)", "4242 4242 4242 4241 "),
    ("near-miss IBANs (mod 97 fails)", "DE89 3704 0044 0532 0130 01 "),
    ('IBAN-like groups "AB12 "', "AB12 "),
    ('"@" runs', "@"),
    ('"a@" runs', "a@"),
    ('"a.b@c.d" runs', "a.b@c.d"),
    ("local parts of 40 characters", "a" * 40 + "@example.com "),
    ('"+1 " runs', "+1 "),
    ('"+" and 25 digits', "+" + "1" * 25 + " "),
    ('"(" runs', "("),
    ("capitals", "ABCDEFGHIJ"),
    ("all digits", "4"),
    ("mixed scripts, lone surrogates", "Привет 4242 4242 4242 4242 مرحبا jane@example.com 你好 \ud800+1 415 555 2671 "),
    ("JSON escapes (JSON text mode)", '"\\u00e9\\"\\\\",'),
    # Default-ignorables past U+FFFF (tag characters): the path taken only when one is present.
    ("tag characters between near-miss card groups", "\U000e0020".join(["4242", "4242", "4242", "4241 "])),
    ("tag characters in addresses", "jane\U000e0020@exa\U000e0020mple.com "),
    (
        "emoji prose with digits (no tag character)",
        "Great \U0001f44d order 12345 shipped \U0001f69a to tanaka@example.jp ",
    ),
]
HOSTILE_MIX = "4242 4242 4242 4241 +" + "1" * 25 + " a.b@c.d ( AB12 "


def fill(unit: str, size: int) -> str:
    return (unit * (size // len(unit) + 1))[:size]


def per_mib(fn, size: int, repeat: int = 3) -> float:  # type: ignore[no-untyped-def]
    """Milliseconds per MiB, best of `repeat`."""
    return min(timeit.repeat(fn, number=1, repeat=repeat)) * 1e3 * MIB / size


def streamed(text: str, piece: int, json_text: bool = False) -> None:
    redactor = REDACTOR.stream(json_text=json_text)
    for i in range(0, len(text), piece):
        redactor.feed(text[i : i + piece])
    redactor.flush()


def cost_table() -> None:
    print("\n| ms per MiB (best of 3) | whole text | stream, 16 KiB slices | stream, 7-character deltas |")
    print("|---|---|---|---|")
    for name, unit in PER_MIB:
        json_text = unit.startswith('"')
        text, small = fill(unit, MIB), fill(unit, MIB // 8)
        whole = per_mib(lambda t=text, j=json_text: REDACTOR.redact(t, json_text=j), MIB)
        slices = per_mib(lambda t=text, j=json_text: streamed(t, 16_384, j), MIB)
        deltas = per_mib(lambda t=small, j=json_text: streamed(t, 7, j), MIB // 8)
        print(f"| {name} | {whole:.0f} | {slices:.0f} | {deltas:.0f} |")


async def largest_stall(text: str) -> tuple[float, float]:
    """(the longest a 1 ms ticker ran late, the whole redaction's time), in ms, while
    `text` is redacted by redact_yielding on the same event loop."""
    loop = asyncio.get_running_loop()
    late = 0.0
    done = False

    async def ticker() -> None:
        nonlocal late
        while not done:
            before = loop.time()
            await asyncio.sleep(0.001)
            late = max(late, loop.time() - before - 0.001)

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0.01)
    began = time.perf_counter()
    await redact_yielding(REDACTOR, text)
    took = time.perf_counter() - began
    done = True
    await task
    return late * 1e3, took * 1e3


def stall_table() -> None:
    print(
        "\n| an 8 MiB prompt (best of 3) | largest event-loop stall, redact_yielding | its total time | redact() in one go (the stall without) |"
    )
    print("|---|---|---|---|")
    for name, unit in [
        ("prose", PER_MIB[0][1]),
        ("dense PII", DENSE),
        ("the costliest hostile texts, mixed", HOSTILE_MIX),
    ]:
        text = fill(unit, 8 * MIB)
        runs = [asyncio.run(largest_stall(text)) for _ in range(3)]
        stall, took = min(runs)
        whole = min(timeit.repeat(lambda t=text: REDACTOR.redact(t), number=1, repeat=3)) * 1e3
        print(f"| {name} | {stall:.1f} ms | {took:.0f} ms | {whole:.0f} ms |")
    worst = fill(HOSTILE_MIX, YIELD_ABOVE_CHARS)
    sync = min(timeit.repeat(lambda: REDACTOR.redact(worst), number=5, repeat=5)) / 5 * 1e3
    print(
        f"\nLongest text redacted without yielding (YIELD_ABOVE_CHARS = {YIELD_ABOVE_CHARS:,} characters of the costliest mix): {sync:.1f} ms."
    )


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
    cost_table()
    stall_table()


if __name__ == "__main__":
    main()
