"""What a review of failure shapes found (each test failed before its fix): real gateway
processes in front of a scriptable fake upstream (tests/e2e/scripted_upstream.py)."""

from __future__ import annotations

import json
from pathlib import Path

import anthropic
import pytest

from .test_routing_review import HI, OK_CHAT, OK_MESSAGE, OK_STREAM, fakes, gateway, post, sse, write_routes

__all__ = ["fakes", "gateway"]  # the fixtures, shared with test_routing_review

OVERLOADED = {"message": "Overloaded", "type": "server_error"}


def two_upstreams(tmp_path: Path, fakes, kind: str = "openai", match: str = "m") -> Path:
    path = tmp_path / "r.toml"
    write_routes(
        path,
        {"claude": (kind, fakes["claude"].url), "backup": (kind, fakes["backup"].url)},
        [(match, [("claude", None), ("backup", None)])],
    )
    return path


# 1. SPEC §13: a first event that is a failure fell back only when its JSON had "error" as its
#    FIRST key; `{"object":"error","error":…}`, `{"id":…,"error":…}`, Anthropic's error object
#    without its `event:` line were relayed (a JSON request: 502, no fallback; a stream: a 200
#    holding the error).
FAILURES = [
    f"data: {json.dumps({'object': 'error', 'error': OVERLOADED})}\n\n",
    f"data: {json.dumps({'id': 'x', 'error': OVERLOADED})}\n\n",
    f"data:{json.dumps({'id': 'x', 'error': OVERLOADED}, separators=(',', ':'))}\r\n\r\n",
    ': PROCESSING\n\ndata: {"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}\n\n',
    'data: {"id": "x",\ndata:  "error": {"type": "server_error", "message": "Overloaded"}}\n\n',
]


@pytest.mark.parametrize("events", FAILURES)
@pytest.mark.parametrize("stream", [False, True])
def test_a_first_event_failing_falls_back_whatever_its_key_order(
    tmp_path: Path, fakes, gateway, events: str, stream: bool
) -> None:
    fakes["claude"].script({"status": 200, "chunks": [events]})
    fakes["backup"].script({"status": 200, "chunks": [OK_STREAM]} if stream else {"status": 200, "body": OK_CHAT})
    gw = gateway(ROUTES_FILE=str(two_upstreams(tmp_path, fakes)))
    status, headers, data = post(gw.port, "/v1/chat/completions", {"model": "m", "stream": stream, "messages": HI})
    assert status == 200 and headers.get("x-gateway-upstream") == "backup", (status, data[:200])
    assert b"Overloaded" not in data


# With nothing left to try, the JSON request gets the failure with the status its type has.
def test_a_first_event_failing_with_no_fallback_has_its_types_status(tmp_path: Path, fakes, gateway) -> None:
    fakes["claude"].script({"status": 200, "chunks": [FAILURES[1]]})
    path = tmp_path / "r.toml"
    write_routes(path, {"claude": ("openai", fakes["claude"].url)}, [("m", [("claude", None)])])
    gw = gateway(ROUTES_FILE=str(path))
    status, _, data = post(gw.port, "/v1/chat/completions", {"model": "m", "messages": HI})
    assert status == 500 and json.loads(data)["error"]["message"] == "Overloaded", (status, data[:200])


# Not a failure: "error": null anywhere (servers that write it on every chunk), or "error" only
# inside the answer's text.
@pytest.mark.parametrize(
    "first",
    [
        {"id": "x", "error": None},
        {"id": "x", "object": "chat.completion.chunk", "note": '"error": {"type": "server_error"}'},
    ],
)
def test_a_first_event_with_no_failure_is_answered(tmp_path: Path, fakes, gateway, first: dict) -> None:
    chunk = {
        **first,
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "delta": {"role": "assistant", "content": "first"}, "finish_reason": None}],
    }
    last = {**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
    events = f"data: {json.dumps(chunk)}\n\ndata: {json.dumps(last)}\n\ndata: [DONE]\n\n"
    fakes["claude"].script({"status": 200, "chunks": [events]})
    fakes["backup"].script({"status": 200, "body": OK_CHAT})
    gw = gateway(ROUTES_FILE=str(two_upstreams(tmp_path, fakes)))
    for stream in (False, True):
        status, headers, data = post(gw.port, "/v1/chat/completions", {"model": "m", "stream": stream, "messages": HI})
        assert status == 200 and headers.get("x-gateway-upstream") == "claude", (status, data[:200])
        assert b"first" in data
    assert fakes["backup"].seen() == []


# 2. SPEC §11/§13: /v1/messages without "stream" answered with events that open with an error
#    (a server that always streams) was relayed as a 200 event stream: the anthropic SDK, which
#    asked for JSON, got no error to raise. Now Anthropic's JSON error with its type's status.
START = {
    "type": "message_start",
    "message": {"id": "m", "type": "message", "role": "assistant", "model": "c", "content": [], "usage": {}},
}
OVERLOAD_EVENT = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}


@pytest.mark.parametrize("routed", [False, True])
@pytest.mark.parametrize("preamble", [[], [START, {"type": "ping"}]])
def test_a_json_messages_request_answered_with_an_error_event_gets_the_json_error(
    tmp_path: Path, fakes, gateway, routed: bool, preamble: list[dict]
) -> None:
    fakes["claude"].script({"status": 200, "chunks": [sse([*preamble, OVERLOAD_EVENT])]})
    env = {"ANTHROPIC_BASE_URL": fakes["claude"].url, "ANTHROPIC_API_KEY": "sk-ant-x"}
    if routed:
        path = tmp_path / "r.toml"
        write_routes(path, {"claude": ("anthropic", fakes["claude"].url)}, [("claude-*", [("claude", None)])])
        env["ROUTES_FILE"] = str(path)
    gw = gateway(**env)
    client = anthropic.Anthropic(base_url=gw.url, api_key="demo", max_retries=0, timeout=20)
    with pytest.raises(anthropic.APIStatusError) as raised:
        client.messages.create(model="claude-x", max_tokens=5, messages=HI)
    assert raised.value.status_code == 529
    assert raised.value.body == {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    assert raised.value.response.headers["content-type"].startswith("application/json")


# With a second upstream, it answers instead (its JSON Message).
def test_a_json_messages_request_answered_with_an_error_event_falls_back(tmp_path: Path, fakes, gateway) -> None:
    fakes["claude"].script({"status": 200, "chunks": [sse([START, OVERLOAD_EVENT])]})
    fakes["backup"].script({"status": 200, "body": OK_MESSAGE})
    gw = gateway(ROUTES_FILE=str(two_upstreams(tmp_path, fakes, "anthropic", "claude-*")))
    client = anthropic.Anthropic(base_url=gw.url, api_key="demo", max_retries=0, timeout=20)
    reply = client.messages.with_raw_response.create(model="claude-x", max_tokens=5, messages=HI)
    assert reply.headers["x-gateway-upstream"] == "backup"
    assert reply.parse().content[0].text == "ok"


# 3. SPEC §11: every gateway error on the Anthropic surface is Anthropic-shaped; the paths under
#    /v1/messages the gateway does not serve (count_tokens, batches, …) answered OpenAI's shape.
NOT_FOUND = {"type": "error", "error": {"type": "not_found_error", "message": "not found"}}


@pytest.mark.parametrize(
    "call",
    [
        lambda c: c.messages.count_tokens(model="claude-x", messages=HI),
        lambda c: c.messages.batches.list(),
        lambda c: c.messages.batches.retrieve("msgbatch_1"),
        lambda c: c.messages.batches.create(
            requests=[{"custom_id": "a", "params": {"model": "claude-x", "max_tokens": 5, "messages": HI}}]
        ),
    ],
)
def test_the_paths_under_messages_not_served_are_anthropic_404s(fakes, gateway, call) -> None:
    fakes["claude"].script({"status": 200, "body": "{}"})
    gw = gateway(ANTHROPIC_BASE_URL=fakes["claude"].url)
    client = anthropic.Anthropic(base_url=gw.url, api_key="demo", max_retries=0, timeout=20)
    with pytest.raises(anthropic.NotFoundError) as raised:
        call(client)
    assert raised.value.body == NOT_FOUND
    assert fakes["claude"].seen() == []  # not served: nothing relayed


def test_other_paths_keep_openais_404(fakes, gateway) -> None:
    gw = gateway()
    for path in ("/v1/messagesx", "/v1/other", "/v1/chat/completions/x"):
        status, _, data = post(gw.port, path, {})
        assert status == 404 and json.loads(data)["error"]["code"] == "not_found", (path, data)


# SPEC §11/§13, as the SDK sees it (unchanged, pinned): every upstream's circuit open is a 503
# `api_error` with Retry-After, the SDK's ServiceUnavailableError, not Anthropic's 529 overload.
def test_every_circuit_open_on_messages_is_the_sdks_service_unavailable(tmp_path: Path, fakes, gateway) -> None:
    fakes["claude"].script({"status": 500, "body": "{}"})
    path = tmp_path / "r.toml"
    write_routes(path, {"claude": ("anthropic", fakes["claude"].url)}, [("claude-*", [("claude", None)])])
    gw = gateway(ROUTES_FILE=str(path), CB_FAILURES="1", CB_OPEN_SECS="60")
    client = anthropic.Anthropic(base_url=gw.url, api_key="demo", max_retries=0, timeout=20)
    with pytest.raises(anthropic.InternalServerError):  # the failure that opens the breaker
        client.messages.create(model="claude-x", max_tokens=5, messages=HI)
    with pytest.raises(anthropic.ServiceUnavailableError) as raised:
        client.messages.create(model="claude-x", max_tokens=5, messages=HI)
    assert raised.value.body == {"type": "error", "error": {"type": "api_error", "message": "upstream unavailable"}}
    assert int(raised.value.response.headers["retry-after"]) > 0
