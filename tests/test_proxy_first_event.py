"""proxy._is_error_event: whether a stream's (or a whole body's) first answer event is a failure,
decided the same whatever the place of `"error"` among its keys and however SSE spells it."""

from __future__ import annotations

import json
import random

from hypothesis import given
from hypothesis import strategies as st

from gateway.proxy import _is_error_event, _opens_with_failure

OTHER_KEYS = st.dictionaries(
    st.sampled_from(["id", "object", "type", "model", "created", "note", "choices"]),
    st.one_of(st.none(), st.integers(), st.text(max_size=20), st.just("error"), st.just('"error": {}')),
    max_size=5,
)
ERRORS = st.one_of(
    st.none(),
    st.fixed_dictionaries({"message": st.text(max_size=10), "type": st.sampled_from(["server_error", "x"])}),
    st.text(min_size=1, max_size=10),
)


def spelled(body: dict, seed: int) -> str:
    """A JSON object with its keys in a shuffled order, in one of JSON's and SSE's spellings."""
    rng = random.Random(seed)
    items = list(body.items())
    rng.shuffle(items)
    separators = rng.choice([(",", ":"), (", ", ": ")])
    text = json.dumps(dict(items), separators=separators, ensure_ascii=rng.random() < 0.5)
    if rng.random() < 0.2:
        text = text.replace('"error"', '"\\u0065rror"')  # the same key to any decoder
    data = rng.choice(["data: ", "data:"]) + text + "\n"
    return rng.choice(["", "id: 7\n", ": a comment\n", "retry: 100\n"]) + data + "\n"


@given(OTHER_KEYS, ERRORS, st.booleans(), st.integers())
def test_a_first_event_is_a_failure_when_its_error_is_not_null_wherever_it_is(
    others: dict, error: object, with_error: bool, seed: int
) -> None:
    body = {**others, "error": error} if with_error else others
    failing = with_error and error is not None
    event = spelled(body, seed).encode()
    preamble = b": PROCESSING\n\n"
    assert _is_error_event(event) is failing
    assert _is_error_event(preamble + event, len(preamble)) is failing
    # A whole body of events (a request without "stream"): the same decision, unless the error
    # blames the request (none of these does).
    assert _opens_with_failure(preamble + event + b"data: [DONE]\n\n") is failing


def test_a_long_first_event_counts_only_an_error_that_opens_it() -> None:
    text = "x" * 100_000
    assert _is_error_event(f'data: {{"error": {{"message": "{text}"}}}}\n\n'.encode())
    assert not _is_error_event(f'data: {{"error": null, "note": "{text}"}}\n\n'.encode())
    assert not _is_error_event(f'data: {{"note": "{text}", "error": {{}}}}\n\n'.encode())
