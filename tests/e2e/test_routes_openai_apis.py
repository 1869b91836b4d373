"""SPEC §13 on /v1/responses and /v1/embeddings (black-box conformance review): ROUTES_FILE
routes every POST route, not only chat and messages. Before the fix both routes went to
OPENAI_BASE_URL whatever the file said: a model GET /v1/models lists was sent elsewhere (a 502
here, where OPENAI_BASE_URL refuses connections), an unrouted model was no 404, no fallback, no
breaker, no x-gateway-upstream, and Cedar's context.upstream said `default` under the file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ..harness import Gateway
from .test_routing_review import OK_MESSAGE, Fake, post, write_routes

OK_RESPONSE = json.dumps(
    {
        "id": "resp_1",
        "object": "response",
        "status": "completed",
        "model": "renamed",
        "output": [
            {
                "type": "message",
                "id": "msg_1",
                "role": "assistant",
                "status": "completed",
                "content": [{"type": "output_text", "text": "ok", "annotations": []}],
            }
        ],
        "usage": {"input_tokens": 1, "output_tokens": 1, "total_tokens": 2},
    }
)
OK_EMBEDDINGS = json.dumps(
    {
        "object": "list",
        "data": [{"object": "embedding", "index": 0, "embedding": [0.5, 0.25]}],
        "model": "renamed",
        "usage": {"prompt_tokens": 1, "total_tokens": 1},
    }
)
OK = {"/v1/responses": OK_RESPONSE, "/v1/embeddings": OK_EMBEDDINGS}
BODY = {"input": "hi"}


@pytest.fixture(scope="module")
def fakes(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("fakes")
    made = {"one": Fake(tmp), "two": Fake(tmp), "claude": Fake(tmp)}
    yield made
    for f in made.values():
        f.stop()


@pytest.fixture
def gateway(tmp_path: Path, fakes):
    routes = tmp_path / "routes.toml"
    write_routes(
        routes,
        {
            "one": ("openai", fakes["one"].url),
            "two": ("openai", fakes["two"].url + "/v1"),
            "claude": ("anthropic", fakes["claude"].url),
        },
        [("m-*", [("one", None), ("claude", None), ("two", "renamed")]), ("claude-*", [("claude", None)])],
    )
    policy = tmp_path / "p.cedar"
    policy.write_text(
        '@id("all") permit(principal, action, resource);\n'
        '@id("not-one") forbid(principal, action, resource)\n'
        'when { context.upstream == "one" && context.max_tokens == 7 };\n'
    )
    # OPENAI_BASE_URL refuses connections: nothing routed may go there.
    gw = Gateway(
        tmp_path,
        {
            "R19_KEY": "sk-r19-secret",
            "ROUTES_FILE": str(routes),
            "POLICY_FILE": str(policy),
            "OPENAI_BASE_URL": "http://127.0.0.1:1",
        },
    )
    yield gw
    gw.stop()


@pytest.mark.parametrize("path", ["/v1/responses", "/v1/embeddings"])
def test_a_routed_model_goes_to_its_upstreams_and_falls_back(gateway, fakes, path: str) -> None:
    fakes["one"].script({"status": 500, "body": json.dumps({"error": {"message": "down", "type": "server_error"}})})
    fakes["two"].script({"status": 200, "body": OK[path]})
    fakes["claude"].script({"status": 200, "body": OK_MESSAGE})
    status, headers, data = post(gateway.port, path, {"model": "m-1", **BODY})
    assert status == 200, data
    assert headers.get("x-gateway-upstream") == "two"
    assert json.loads(data)["model"] == "renamed"
    [first], [second] = fakes["one"].seen(), fakes["two"].seen()
    assert first["path"] == path and first["body"]["model"] == "m-1"
    assert second["path"] == path and second["body"]["model"] == "renamed"  # the route's name for it, /v1 not doubled
    assert second["headers"]["Authorization"] == "Bearer sk-r19-secret"
    assert fakes["claude"].seen() == []  # an Anthropic upstream serves neither route: passed over


@pytest.mark.parametrize("path", ["/v1/responses", "/v1/embeddings"])
def test_an_unrouted_model_is_404_model_not_found(gateway, fakes, path: str) -> None:
    for model in ("unrouted", "claude-x"):  # no route; a route of Anthropic upstreams only
        status, _, data = post(gateway.port, path, {"model": model, **BODY})
        assert status == 404, data
        assert json.loads(data)["error"]["code"] == "model_not_found"


def test_the_policy_sees_the_routed_upstream(gateway) -> None:
    # SPEC §15: context.upstream is the routed upstream's name (`default` only without the file).
    status, _, data = post(gateway.port, "/v1/responses", {"model": "m-1", "max_output_tokens": 7, **BODY})
    assert status == 403, data
    assert json.loads(data)["error"]["message"] == "denied by policy not-one"
