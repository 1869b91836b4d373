"""SPEC §11: the gateway's own error bodies on /v1/messages are Anthropic-shaped and typed by
their status (the gateway in process, in front of a hostile upstream: tests/test_adversarial.py's
fixtures)."""

from __future__ import annotations

import pytest

from tests.test_adversarial import GatewayFactory, Hostile, hostile, start  # noqa: F401  (fixtures)


@pytest.mark.parametrize(
    ("status", "kind"),
    [(429, "rate_limit_error"), (529, "overloaded_error"), (404, "not_found_error"), (500, "api_error")],
)
async def test_an_upstream_error_without_a_json_body_is_typed_by_the_status_it_is_relayed_with(
    start: GatewayFactory,  # noqa: F811
    hostile: Hostile,  # noqa: F811
    status: int,
    kind: str,
) -> None:
    """An upstream error whose body is no JSON (a load balancer's HTML 429) is relayed with its
    status and the gateway's own body in its place; on /v1/messages that body said `api_error`
    whatever the status, so a 429 came as {"type": "api_error"} where SPEC §11 has
    `rate_limit_error` (and a 529 `overloaded_error`)."""
    from aiohttp import web

    async def answer(request: web.Request) -> web.StreamResponse:
        return web.Response(
            body=b"<html>busy</html>", status=status, content_type="text/html", headers={"Retry-After": "7"}
        )

    hostile.answer = answer
    gw = await start()
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    async with gw.client.post("/v1/messages", json=body) as response:
        assert response.status == status
        assert response.headers["Retry-After"] == "7"
        error = await response.json()
    assert error["type"] == "error" and error["error"]["type"] == kind, error
    assert error["error"]["message"] == f"upstream answered {status}"
