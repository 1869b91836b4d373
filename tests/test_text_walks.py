"""The request walks that find every string under a value (a tool's input, a tool result, a
chat content of any shape) go with a stack of their own: nested generators cost every string
one step per level it lies under, so strings 900 lists deep in a 1.6 MB body took 9 s to walk
(twice with a token budget). They must find what the plain recursive walk finds, in its order."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.redact import has_trigger
from gateway.surfaces import (
    _MEDIA_PARTS,
    _NOT_BLOCK_TEXT,
    _NOT_PART_TEXT,
    CARD_SIZED,
    NumberText,
    ObjectKeys,
    _content_texts,
    _result_strings,
    strings_in,
)


def recursive_strings_in(holder: Any, key: Any) -> Iterator[Any]:
    """The walk as it was written before: generators nested as deep as the value."""
    value = holder[key] if type(holder) is list else holder.get(key)
    if type(value) is str:
        yield holder, key, False
    elif type(value) is int and (value >= CARD_SIZED or value <= -CARD_SIZED):
        yield NumberText(holder), key, False
    elif type(value) is dict:
        for name in value:
            yield from recursive_strings_in(value, name)
        if has_trigger("".join(value), 0):
            keys = ObjectKeys(value)
            for name in [name for name in value if has_trigger(name, 0)]:
                yield keys, name, False
    elif type(value) is list:
        for position in range(len(value)):
            yield from recursive_strings_in(value, position)


def recursive_result_strings(holder: Any, key: Any) -> Iterator[Any]:
    value = holder[key]
    if type(value) is str:
        yield holder, key, False
    elif type(value) is dict:  # (no "document" in the values drawn: that one is _block_texts')
        for name, inner in value.items():
            if type(inner) is not str or name not in _NOT_BLOCK_TEXT:
                yield from recursive_result_strings(value, name)
    elif type(value) is list:
        for position in range(len(value)):
            yield from recursive_result_strings(value, position)


def recursive_content_texts(holder: Any, key: Any) -> Iterator[Any]:
    value = holder[key]
    if type(value) is str:
        yield holder, key, False
    elif type(value) is list:
        for position in range(len(value)):
            yield from recursive_content_texts(value, position)
    elif type(value) is dict:
        kind = value.get("type")
        if type(kind) is str and kind in _MEDIA_PARTS:
            return
        for name in value:
            if name not in _NOT_PART_TEXT:
                yield from recursive_content_texts(value, name)


NAMES = st.sampled_from(["type", "text", "a@b.co", "k1", "image_url", "file_id", "title", "x"])
LEAVES = st.one_of(
    st.text(max_size=4), st.integers(-(10**16), 10**16), st.none(), st.sampled_from(["image_url", "text"])
)
VALUES = st.recursive(
    LEAVES, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(NAMES, inner, max_size=4), max_leaves=30
)


def found(walk: Iterator[Any]) -> list[tuple[str, Any, Any]]:
    """What a walk finds, in order: the slot's kind, its key, and its text (as it is read)."""
    return [(type(holder).__name__, key, holder[key]) for holder, key, _ in walk]


@settings(max_examples=300, deadline=None)
@given(VALUES)
def test_the_walks_find_what_the_recursive_walks_find_in_their_order(value: Any) -> None:
    for walk, recursive in (
        (strings_in, recursive_strings_in),
        (_result_strings, recursive_result_strings),
        (_content_texts, recursive_content_texts),
    ):
        assert found(walk({"v": value}, "v")) == found(recursive({"v": value}, "v"))


def test_strings_any_depth_down_are_found() -> None:
    # Past Python's recursion limit, where the nested generators stopped (a 400 "nested too deeply").
    value: Any = ["jane.doe@example.com"]
    for _ in range(5000):
        value = [{"text": value}]
    for walk in (strings_in, _result_strings, _content_texts):
        assert [holder[key] for holder, key, _ in walk({"v": value}, "v")] == ["jane.doe@example.com"]
