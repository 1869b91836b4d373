"""What an adversarial review of hostile upstreams found (each test failed before its fix): a
real gateway in front of a scriptable fake upstream (tests/e2e/scripted_upstream.py)."""

from __future__ import annotations

import json

import pytest

from ..harness import Gateway, wait_until
from .test_routing_review import Fake, post


@pytest.fixture(scope="module")
def fake(tmp_path_factory: pytest.TempPathFactory):
    made = Fake(tmp_path_factory.mktemp("fake"))
    yield made
    made.stop()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, fake: Fake):
    gw = Gateway(tmp_path_factory.mktemp("gw"), {"OPENAI_BASE_URL": fake.url, "OPENAI_API_KEY": "sk-review"})
    yield gw
    gw.stop()


def _chunk(index: object) -> str:
    delta = {"content": "mail jane.doe@example.com"}
    return "data: " + json.dumps(
        {"id": "c", "object": "chat.completion.chunk", "choices": [{"index": index, "delta": delta}]}
    )


# SPEC §9: a request without "stream" answered with events the gateway cannot pass (an index
# that is no integer, an event nested past what it reads) got the gateway's own error in a
# 200, logged and counted as 200: the openai SDK took it for a completion with no choices.
@pytest.mark.parametrize(
    "event",
    [_chunk("0"), _chunk([0]), 'data: {"choices":' + "[" * 3000 + "]" * 3000 + "}"],
    ids=["index-string", "index-list", "nested"],
)
def test_a_non_stream_request_answered_with_events_the_gateway_cannot_pass_is_a_502(
    gateway: Gateway, fake: Fake, event: str
) -> None:
    fake.script({"chunks": [event + "\n\n", "data: [DONE]\n\n"]})
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    status, headers, data = post(gateway.port, "/v1/chat/completions", body)
    assert status == 502, data
    assert json.loads(data)["error"]["message"].startswith("upstream sent an event")
    assert b"jane" not in data
    request_id = headers["x-request-id"]

    def logged() -> list[dict]:
        return [line for line in gateway.log_lines() if line["request_id"] == request_id]

    assert wait_until(logged, what="its log line")[0]["status"] == 502
