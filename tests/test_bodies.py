"""Request bodies: the size limit, Content-Encoding (gzip, deflate, refused codings), JSON."""

from __future__ import annotations

import gzip
import json
import tracemalloc
import zlib
from unittest.mock import patch

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import bodies, json_shape
from gateway.errors import BadRequest, GatewayError, PayloadTooLarge

LIMIT = 1000
JSON = b'{"model": "gpt-4o-mini", "messages": []}'


def raw_deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


ENCODERS = {"gzip": gzip.compress, "x-gzip": gzip.compress, "deflate": zlib.compress, "raw-deflate": raw_deflate}


def encode(coding: str, data: bytes) -> tuple[str, bytes]:
    return ("deflate" if coding == "raw-deflate" else coding), ENCODERS[coding](data)


@pytest.mark.parametrize("coding", ["gzip", "x-gzip", "deflate", "raw-deflate"])
def test_encoded_bodies_are_decoded(coding: str) -> None:
    header, data = encode(coding, JSON)
    assert bodies.decode(data, header, LIMIT) == JSON
    assert bodies.decode(data, f" {header.upper()}\t", LIMIT) == JSON  # codings are case-insensitive


@pytest.mark.parametrize("header", [None, "", "identity", "Identity "])
def test_unencoded_bodies_pass_as_they_are(header: str | None) -> None:
    assert bodies.decode(JSON, header, LIMIT) is JSON


@pytest.mark.parametrize("header", ["br", "zstd", "compress", "gzip, deflate", "gzip,gzip", "chunked", "x" * 500])
def test_other_codings_are_415_naming_what_is_accepted(header: str) -> None:
    with pytest.raises(bodies.UnsupportedEncoding) as caught:
        bodies.decode(JSON, header, LIMIT)
    error = caught.value
    assert error.status == 415 and error.code == "unsupported_content_encoding"
    assert error.headers["Accept-Encoding"] == "gzip, deflate"
    assert "x" * 33 not in error.message  # a long header is not echoed back


@pytest.mark.parametrize(
    ("header", "data", "why"),
    [
        ("gzip", b"this is not gzip at all", "does not decode"),
        ("gzip", JSON, "does not decode"),  # marked gzip, sent plain
        # mtime=0: the same bytes, so the same test ids, in every pytest-xdist worker whatever second it collects in
        ("gzip", gzip.compress(JSON, mtime=0)[:-4], "truncated"),  # the trailer (CRC, size) cut off
        ("gzip", gzip.compress(JSON, mtime=0)[:15], "truncated"),
        ("gzip", b"", "truncated"),
        ("gzip", gzip.compress(JSON, mtime=0) + b"garbage", "does not decode"),
        ("deflate", b"\x78\x9c not deflate", "does not decode"),
        ("deflate", zlib.compress(JSON)[:-2], "truncated"),
        ("deflate", zlib.compress(JSON) + b"more", "bytes follow"),
    ],
)
def test_a_body_that_fails_to_decode_is_a_clear_400(header: str, data: bytes, why: str) -> None:
    with pytest.raises(BadRequest) as caught:
        bodies.decode(data, header, LIMIT)
    assert caught.value.code == "invalid_content_encoding"
    assert header in caught.value.message and why in caught.value.message


def test_gzip_members_are_joined_up_to_a_bound() -> None:
    members = [gzip.compress(b"[1,"), gzip.compress(b"2]")]
    assert bodies.decode(b"".join(members), "gzip", LIMIT) == b"[1,2]"
    many = gzip.compress(b" ") * (bodies.MAX_GZIP_MEMBERS + 1)
    with pytest.raises(BadRequest, match="members"):
        bodies.decode(many, "gzip", LIMIT)


@pytest.mark.parametrize("coding", ["gzip", "deflate", "raw-deflate"])
def test_the_decoded_size_counts_against_the_limit(coding: str) -> None:
    header, data = encode(coding, b" " * LIMIT)
    assert len(bodies.decode(data, header, LIMIT)) == LIMIT  # the limit itself is allowed
    header, data = encode(coding, b" " * (LIMIT + 1))
    assert len(data) < 100
    with pytest.raises(PayloadTooLarge):
        bodies.decode(data, header, LIMIT)
    # across gzip members too
    with pytest.raises(PayloadTooLarge):
        bodies.decode(gzip.compress(b" " * 600) * 2, "gzip", LIMIT)


def test_a_decompression_bomb_costs_no_more_than_the_limit() -> None:
    limit = 1024 * 1024
    compressor, zeros = zlib.compressobj(1, zlib.DEFLATED, 16 + zlib.MAX_WBITS), b"\0" * (1024 * 1024)
    bomb = b"".join(compressor.compress(zeros) for _ in range(256)) + compressor.flush()  # 256 MiB in ~1 MB
    tracemalloc.start()
    try:
        with pytest.raises(PayloadTooLarge):
            bodies.decode(bomb, "gzip", limit)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3 * limit + len(bomb)  # the output (built in blocks, then joined), the input left: not 256 MiB


def test_a_declared_length_over_the_limit_is_refused_before_reading() -> None:
    bodies.check_length(None, LIMIT)
    bodies.check_length(LIMIT, LIMIT)
    with pytest.raises(PayloadTooLarge) as caught:
        bodies.check_length(LIMIT + 1, LIMIT)
    assert caught.value.status == 413 and caught.value.code == "request_too_large"
    assert str(LIMIT) in caught.value.message


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"{not json", "invalid_json"),
        (b"\xff\xfe{}", "invalid_json"),
        (b"", "invalid_json"),
        (b"[" * 5000, "invalid_json"),  # nesting past orjson's limit: an error, not a crash
        (b'"a string"', "invalid_request"),
        (b"[1, 2]", "invalid_request"),
        (b"null", "invalid_request"),
        (b'{"messages": []}', "missing_model"),
        (b'{"model": ""}', "missing_model"),
        (b'{"model": 4}', "missing_model"),
        (b'{"model": ["m"]}', "missing_model"),
    ],
)
def test_parse_refuses_what_is_not_an_object_with_a_model(body: bytes, code: str) -> None:
    with pytest.raises(BadRequest) as caught:
        bodies.parse(body)
    assert caught.value.status == 400 and caught.value.code == code


def test_parse_returns_the_object_and_its_model() -> None:
    payload, model = bodies.parse(b'{"model": "m\\u00e9", "n": 2, "unknown": {"kept": true}}')
    assert model == "mé" and payload == {"model": "mé", "n": 2, "unknown": {"kept": True}}


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=2 * LIMIT), coding=st.sampled_from(sorted(ENCODERS)))
def test_any_body_round_trips_or_is_too_large(data: bytes, coding: str) -> None:
    header, encoded = encode(coding, data)
    if len(data) <= LIMIT:
        assert bodies.decode(encoded, header, LIMIT) == data
    else:
        with pytest.raises(PayloadTooLarge):
            bodies.decode(encoded, header, LIMIT)


@settings(max_examples=500, deadline=None)
@given(
    data=st.binary(max_size=LIMIT),
    coding=st.sampled_from(sorted(ENCODERS)),
    cut=st.integers(min_value=0),
    flip=st.integers(min_value=0),
    junk=st.binary(max_size=64),
)
def test_any_damaged_body_is_the_gateways_own_error(data: bytes, coding: str, cut: int, flip: int, junk: bytes) -> None:
    """Cut short, a byte changed, or followed by junk: decoded (a few damages still decode to
    something) or refused with a GatewayError — never zlib's or any other exception."""
    header, encoded = encode(coding, data)
    damaged = [encoded[: cut % (len(encoded) + 1)], encoded + junk]
    if encoded:
        at = flip % len(encoded)
        damaged.append(encoded[:at] + bytes([encoded[at] ^ 0x55]) + encoded[at + 1 :])
    for body in damaged:
        try:
            bodies.decode(body, header, LIMIT)
        except GatewayError as error:
            assert error.status in (400, 413)


@settings(max_examples=300, deadline=None)
@given(body=st.binary(max_size=200))
def test_parse_of_any_bytes_is_an_object_with_a_model_or_a_400(body: bytes) -> None:
    try:
        payload, model = bodies.parse(body)
    except BadRequest as error:
        assert error.status == 400
    else:
        assert isinstance(payload, dict) and payload["model"] == model and isinstance(model, str) and model


# --- structure limits: a body of megabytes of tiny values is refused before it is parsed --------

TRICKY_TEXT = st.text(alphabet=st.sampled_from('[]{},"\\ aé\n\u2028😀'), max_size=12)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | TRICKY_TEXT,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(TRICKY_TEXT, inner, max_size=5),
    max_leaves=40,
)


def true_counts(value: object) -> tuple[int, int, int]:
    """Arrays and objects, the commas between values, and object members, of a parsed JSON value."""
    if isinstance(value, list):
        inner = [true_counts(item) for item in value]
        return (
            1 + sum(c for c, _, _ in inner),
            max(len(value) - 1, 0) + sum(v for _, v, _ in inner),
            sum(m for _, _, m in inner),
        )
    if isinstance(value, dict):
        inner = [true_counts(item) for item in value.values()]
        return (
            1 + sum(c for c, _, _ in inner),
            max(len(value) - 1, 0) + sum(v for _, v, _ in inner),
            len(value) + sum(m for _, _, m in inner),
        )
    return 0, 0, 0


@settings(max_examples=500, deadline=None)
@given(value=JSON_VALUES, spaced=st.booleans(), slice_bytes=st.sampled_from([2, 3, 7, 64 * 1024]))
def test_the_structure_count_sees_only_what_is_outside_strings(value: object, spaced: bool, slice_bytes: int) -> None:
    """Brackets, braces, commas, quotes and backslashes inside strings never count; at the
    limit a body passes, one under it is refused. Strings are scanned in slices as small as
    two bytes, so an escape cut in two by a slice is read as one."""
    body = json.dumps({"model": "m", "v": value}, ensure_ascii=not spaced, separators=None if spaced else (",", ":"))
    containers, commas, members = true_counts({"model": "m", "v": value})
    data = body.encode()
    with patch.object(json_shape, "_SCAN_SLICE", slice_bytes):
        bodies.check_structure(data, max_containers=containers, max_values=commas + 1, max_members=members)
        with pytest.raises(BadRequest):
            bodies.check_structure(data, max_containers=containers, max_values=commas + 1, max_members=members - 1)
        with pytest.raises(BadRequest) as caught:
            bodies.check_structure(data, max_containers=containers - 1, max_values=commas + 1)
        assert caught.value.code == "body_too_complex"
        if commas:
            with pytest.raises(BadRequest):
                bodies.check_structure(data, max_containers=containers, max_values=commas)


def refused_as_too_complex(body: bytes) -> str:
    """The message of the 400 `body_too_complex` that `body` gets, its bytes having reached a limit."""
    assert json_shape.may_be_too_complex(body)
    with pytest.raises(BadRequest) as caught:
        bodies.check_structure(body)
    assert caught.value.code == "body_too_complex"
    return caught.value.message


def prompt_passes(text: str) -> None:
    """A prompt of `text`: its bytes reach a limit, its JSON (all of it inside one string) does not."""
    prompt = json.dumps({"model": "m", "messages": [{"role": "user", "content": text}]}).encode()
    assert json_shape.may_be_too_complex(prompt)
    bodies.check_structure(prompt)
    assert bodies.parse(prompt)[0]["messages"][0]["content"] == text


def test_megabytes_of_tiny_arrays_are_refused_and_json_text_is_not() -> None:
    hostile = b'{"model":"m","input":[' + b",".join([b"[]"] * 300_000) + b"]}"
    assert "100000 JSON arrays and objects" in refused_as_too_complex(hostile)
    # A prompt of JSON text: its brackets and commas by the hundred thousand are inside one string.
    prompt_passes('{"email": "jane@example.com", "n": [1, 2]}, ' * 60_000)


def test_megabytes_of_object_members_are_refused() -> None:
    """Under the value limit, but each key a new string into one dict: 8 MiB of them held the
    event loop ~0.5 s in orjson's parse. Colons inside strings (a prompt's URLs, times) do not count."""
    hostile = b'{"model":"m","x":{' + b",".join(b'"%x":0' % i for i in range(450_000)) + b"}}"
    assert hostile.count(b",") < bodies.MAX_VALUES and hostile.count(b"{") < bodies.MAX_CONTAINERS
    assert "200000 JSON object members" in refused_as_too_complex(hostile)
    prompt_passes("at 10:30 see https://example.com: " * 80_000)


def test_megabytes_of_one_letter_strings_are_refused_and_openais_token_arrays_are_not() -> None:
    """2,000,000 one-letter strings (7.6 MiB, no bracket, member or value limit of before
    reached) took ~130 ms in orjson's parse, holding the event loop: /healthz 126-143 ms."""
    hostile = b'{"model":"m","input":[' + b",".join([b'"a"'] * 1_999_000) + b"]}"
    assert "500000 JSON values" in refused_as_too_complex(hostile)
    # OpenAI's embeddings take at most 300k tokens of token arrays (2,048 inputs) a request.
    tokens = json.dumps({"model": "m", "input": [[100_000 + i for i in range(146)] for _ in range(2048)]}).encode()
    assert tokens.count(b",") > 290_000
    bodies.check_structure(tokens)


def test_a_body_under_the_counting_size_is_not_counted() -> None:
    small = b'{"model":"m","input":[' + b",".join([b"[]"] * 80_000) + b"]}"
    assert len(small) <= json_shape.COUNT_ABOVE_BYTES and not json_shape.may_be_too_complex(small)


@given(
    body=st.binary(max_size=400)
    | st.lists(st.sampled_from([b"[", b"{", b":", b",", b'"', b"a", b"\xff"])).map(b"".join),
    limits=st.tuples(st.integers(0, 60), st.integers(0, 60), st.integers(0, 60)),
)
def test_the_one_pass_byte_count_says_what_counting_each_byte_says(body: bytes, limits: tuple[int, int, int]) -> None:
    # may_be_too_complex keeps the four bytes in one pass (translate) and counts those.
    max_values, max_members, max_containers = limits
    plain = (
        body.count(b"[") + body.count(b"{") > max_containers
        or body.count(b":") > max_members
        or body.count(b",") >= max_values
    )
    with patch.object(json_shape, "COUNT_ABOVE_BYTES", -1):  # counted whatever its size
        assert json_shape.may_be_too_complex(body, max_values, max_members, max_containers) == plain


async def test_a_long_logprobs_reply_is_not_too_complex_and_megabytes_of_arrays_are() -> None:
    """A reply with top_logprobs 20 has 43 arrays and objects a token: 4,096 tokens (176k, past
    a request's bound) pass; 7 MiB of "[]" do not."""
    top = [{"token": "a", "logprob": -0.1, "bytes": [97]} for _ in range(20)]
    tokens = [{"token": "a", "logprob": -0.1, "bytes": [97], "top_logprobs": top} for _ in range(4096)]
    reply = {"choices": [{"index": 0, "message": {"content": "a" * 4096}, "logprobs": {"content": tokens}}]}
    data = json.dumps(reply).encode()
    assert json.dumps(reply).count("{") + json.dumps(reply).count("[") > bodies.MAX_CONTAINERS
    assert await json_shape.reply_structure_excess(data) is None
    hostile = b'{"choices":[],"x":[' + b",".join([b"[]"] * 2_500_000) + b"]}"
    assert await json_shape.reply_structure_excess(hostile) == "more than 1000000 JSON arrays and objects"


def test_empty_bodies_leave_nothing_behind_in_the_body_budget() -> None:
    """Bodies are read before the rate limit, so each sender's share is noted only while it
    holds bytes: an empty body (a POST without one: 400) left its sender noted for good, and
    open mode's senders are any keys (SPEC §4: per-key state is bounded in total): ~340 bytes
    a request, 20,000 requests with new keys took 6.8 MB of the real process for good."""
    budget = bodies.BodyBudget(16 * LIMIT, LIMIT)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for number in range(5000):
            sender = f"key:{number:0256d}"
            assert budget.take(0, sender)
            budget.give_back(0, sender)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 50_000  # 5,000 senders kept: ~1.7 MB
    assert budget.take(16 * LIMIT // 2, "key:a") and not budget.take(1, "key:a")  # the share still holds
