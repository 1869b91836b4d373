"""What an adversarial review of PII redaction found (each test failed before its fix): real
gateway processes in front of a scriptable fake upstream (tests/e2e/scripted_upstream.py)."""

from __future__ import annotations

import json

import pytest

from ..harness import Gateway
from .test_routing_review import Fake, post, write_routes

EMAIL = "jane.doe@example.com"
CARD = "4242 4242 4242 4242"


@pytest.fixture(scope="module")
def fakes(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("fakes")
    made = {"claude": Fake(tmp), "backup": Fake(tmp)}
    yield made
    for f in made.values():
        f.stop()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, fakes):
    tmp = tmp_path_factory.mktemp("gw")
    routes = tmp / "routes.toml"
    write_routes(
        routes,
        {"claude": ("anthropic", fakes["claude"].url), "backup": ("openai", fakes["backup"].url)},
        [("claude-*", [("claude", None)]), ("both-*", [("backup", None), ("claude", None)]), ("*", [("backup", None)])],
    )
    gw = Gateway(tmp, {"R19_KEY": "sk-r19-secret", "ROUTES_FILE": str(routes), "OPENAI_BASE_URL": fakes["backup"].url})
    yield gw
    gw.stop()


# 1. SPEC §5/§6: an upstream's non-2xx JSON error body was relayed with its strings in clear,
#    while the same error sent as an in-stream event was redacted. Error bodies echo text:
#    Groq's 400 tool_use_failed carries the model's own generation (`failed_generation`), a
#    validation error quotes the value it refused. Now redacted like any other reply.
ERROR_BODY = json.dumps(
    {
        "error": {
            "message": f"Failed to call a function: {EMAIL}",
            "type": "invalid_request_error",
            "code": "tool_use_failed",
            "failed_generation": f'{{"to": "{EMAIL}", "card": "{CARD}"}}',
        }
    }
)


@pytest.mark.parametrize(
    ("path", "model", "fake", "status", "stream"),
    [
        ("/v1/chat/completions", "gpt-4o", "backup", 400, False),
        ("/v1/chat/completions", "gpt-4o", "backup", 400, True),
        ("/v1/chat/completions", "gpt-4o", "backup", 500, False),  # a fallback status, last upstream
        ("/v1/chat/completions", "both-x", "backup", 429, True),  # both upstreams fail: the last one's
        ("/v1/chat/completions", "claude-x", "claude", 400, False),  # translated from Anthropic's
        ("/v1/messages", "claude-x", "claude", 400, False),
        ("/v1/responses", "gpt-4o", "backup", 400, True),
        ("/v1/embeddings", "gpt-4o", "backup", 422, False),
    ],
)
def test_an_upstream_error_body_is_redacted(
    gateway, fakes, path: str, model: str, fake: str, status: int, stream: bool
) -> None:
    for f in fakes.values():
        f.script({"status": status, "body": ERROR_BODY})
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "input": "hi", "max_tokens": 5}
    if stream:
        body["stream"] = True
    got, _, data = post(gateway.port, path, body)
    assert got == status, data
    text = data.decode()
    assert EMAIL not in text and CARD not in text, text
    assert "j***e@example.com" in text, text  # (translated from Anthropic's shape: the message only)
    json.loads(data)  # still JSON
