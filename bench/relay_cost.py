"""What the streaming relay alone costs a stream (no HTTP, no gateway around it): the bench's
real-shaped replies fed to a `StreamRelay` with every redaction kind on, whole (one read, as
`make bench`'s nginx upstream gives them) and paced (one event a read).

    .venv/bin/python bench/relay_cost.py [openai anthropic responses] [--whole|--paced] [-n N]

Prints microseconds a stream (the best of five rounds). For a figure this machine's noise
does not move, count instructions instead, the difference of two runs with different N:
`valgrind --tool=callgrind --callgrind-out-file=/dev/null .venv/bin/python bench/relay_cost.py
openai --whole -n 20` and `-n 220`; (second - first) / 200 is the relay's count a stream.
"""

from __future__ import annotations

import argparse
import functools
import sys
import timeit
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import run  # bench/run.py: the replies

from gateway.config import REDACT_KIND_NAMES
from gateway.openai_apis import RESPONSES
from gateway.redact import build_redactor
from gateway.relay import StreamRelay
from gateway.surfaces import CHAT, MESSAGES, Surface

REPLIES: dict[str, tuple[Callable[[], str], Surface]] = {
    "openai": (run.openai_stream, CHAT),
    "anthropic": (run.anthropic_stream, MESSAGES),
    "responses": (run.responses_stream, RESPONSES),
}


def relay_once(body: bytes, reads: list[bytes], surface: Surface, whole: bool) -> None:
    relay = StreamRelay(REDACTOR, lambda kind: None, surface)
    if whole:
        relay.feed(body)
    else:
        for read in reads:
            relay.feed(read)
    relay.close()


REDACTOR = build_redactor(REDACT_KIND_NAMES)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("replies", nargs="*", default=list(REPLIES))
    parser.add_argument("--whole", action="store_true")
    parser.add_argument("--paced", action="store_true")
    parser.add_argument("-n", type=int, default=0, help="run N streams once each, untimed (for callgrind)")
    args = parser.parse_args()
    modes = [mode for mode, on in (("whole", args.whole), ("paced", args.paced)) if on] or ["whole", "paced"]
    for name in args.replies:
        make, surface = REPLIES[name]
        body = make().encode()
        reads = [event + b"\n\n" for event in body.split(b"\n\n") if event]
        for mode in modes:
            once = functools.partial(relay_once, body, reads, surface, mode == "whole")
            for _ in range(20):  # warm: the redactor's and the regex engine's caches
                once()
            if args.n:
                for _ in range(args.n):
                    once()
                continue
            rounds = timeit.repeat(once, number=500, repeat=5)
            print(f"{name:10} {mode:6} {min(rounds) / 500 * 1e6:8.1f} µs a stream ({len(reads)} events)")


if __name__ == "__main__":
    main()
