"""What the relay's fast path must give: what the exact path gives, but for how a text
stream's text is spread over the events of one read (the fast path feeds a run of events'
texts to their stream at once, the exact path one event at a time). So, read by read: the
same events in the same order, equal once their streamed texts are blanked, and per text
stream the same text. (A stream is told apart by the keys on its path, the index and type
fields of the objects on it and list positions; an Anthropic block's start and its deltas,
one stream in the relay, are two here: the texts compared are the same in both.)"""

from __future__ import annotations

import json
from typing import Any

from gateway import sse

# The keys whose string values a text stream fills (chat, Anthropic, Responses).
TEXT_KEYS = frozenset(
    {
        "content",
        "refusal",
        "arguments",
        "reasoning_content",
        "reasoning",
        "transcript",
        "text",
        "partial_json",
        "thinking",
        "signature",
        "delta",
    }
)
_INDEX_KEYS = ("type", "index", "output_index", "content_index")


def _blanked(node: Any, where: tuple[Any, ...], texts: dict[tuple[Any, ...], list[str]]) -> Any:
    """`node` with its streamed texts blanked; each noted under its stream: the keys and list
    positions on its path, with the index (and type) fields of the objects on it."""
    if isinstance(node, dict):
        here = where + tuple((key, node[key]) for key in _INDEX_KEYS if isinstance(node.get(key), str | int))
        out = {}
        for key, value in node.items():
            if key in TEXT_KEYS and isinstance(value, str):
                texts.setdefault((*here, key), []).append(value)
                out[key] = ""
            else:
                out[key] = _blanked(value, (*here, key), texts)
        return out
    if isinstance(node, list):
        return [_blanked(value, (*where, position), texts) for position, value in enumerate(node)]
    return node


def _read(wire: bytes) -> tuple[list[Any], dict[tuple[Any, ...], str]]:
    events: list[Any] = []
    texts: dict[tuple[Any, ...], list[str]] = {}
    for event in sse.SSEParser().feed(wire):
        try:
            data = json.loads(event.data) if event.data is not None else None
        except (ValueError, RecursionError):
            data = None
        if not isinstance(data, dict):
            events.append(event.raw)
            continue
        others = [line for line in event.raw.split(b"\n") if not line.startswith(b"data:")]
        events.append((others, _blanked(data, (), texts)))
    return events, {where: "".join(pieces) for where, pieces in texts.items()}


def assert_same_but_for_splits(fast: list[bytes], exact: list[bytes]) -> None:
    """`fast` and `exact`: what each relay gave back for each read (and at its close)."""
    assert len(fast) == len(exact)
    for fast_out, exact_out in zip(fast, exact, strict=True):
        if fast_out == exact_out:
            continue
        fast_events, fast_texts = _read(fast_out)
        exact_events, exact_texts = _read(exact_out)
        assert fast_events == exact_events
        # A stream that held nothing back in one may show as an empty text in the other.
        assert {k: v for k, v in fast_texts.items() if v} == {k: v for k, v in exact_texts.items() if v}
