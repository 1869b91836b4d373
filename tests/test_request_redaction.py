"""Request fields that leave for the upstream beside the messages (SPEC §6, §11, §13): the end
user's identifiers, and the blocks of an Anthropic conversation sent back. The gateway in
process, in front of a hostile upstream that records what it gets (tests/test_adversarial.py's
fixtures)."""

from __future__ import annotations

from pathlib import Path

from tests.test_adversarial import (  # noqa: F401  (fixtures)
    EMAIL,
    Gateway,
    GatewayFactory,
    Hostile,
    gateway,
    hostile,
    json_answer,
    start,
)

MASKED = "j***e@example.com"
MESSAGE = {
    "id": "msg_1",
    "type": "message",
    "role": "assistant",
    "model": "claude-x",
    "content": [{"type": "text", "text": "ok"}],
    "stop_reason": "end_turn",
    "usage": {"input_tokens": 1, "output_tokens": 1},
}
ROUTES = """
[upstreams.claude]
kind = "anthropic"
base_url = "{url}"
api_key_env = "ANTHROPIC_API_KEY"

[[models]]
match = "claude-*"
upstreams = [{{ upstream = "claude" }}]
"""


def sent_text(upstream: Hostile) -> str:
    return upstream.seen[-1].body.decode()


# --- The end user's identifier: chat's `user`, Messages' `metadata.user_id` ------------------


async def test_chat_user_identifiers_reach_an_openai_upstream_masked(gateway: Gateway, hostile: Hostile) -> None:  # noqa: F811
    status, _ = await gateway.chat({"user": EMAIL, "safety_identifier": f"+1 415 555 2671 / {EMAIL}"})
    assert status == 200
    sent = hostile.sent()
    assert EMAIL not in sent_text(hostile) and "415 555 2671" not in sent_text(hostile)
    assert sent["user"] == MASKED


async def test_a_chat_user_with_an_address_is_left_out_of_a_translated_request(
    start: GatewayFactory,  # noqa: F811
    hostile: Hostile,  # noqa: F811
    tmp_path: Path,
) -> None:
    # Anthropic refuses a user_id holding an address, masked or not: the hint is left out.
    path = tmp_path / "routes.toml"
    path.write_text(ROUTES.format(url=hostile.url))
    gw = await start(ROUTES_FILE=str(path))
    hostile.answer = json_answer(MESSAGE)
    status, _ = await gw.chat({"model": "claude-x", "user": EMAIL})
    assert status == 200
    assert "@" not in sent_text(hostile) and "metadata" not in hostile.sent()
    status, _ = await gw.chat({"model": "claude-x", "user": "user-8f3a"})
    assert status == 200
    assert hostile.sent()["metadata"] == {"user_id": "user-8f3a"}


async def test_messages_metadata_user_id_reaches_the_upstream_masked(gateway: Gateway, hostile: Hostile) -> None:  # noqa: F811
    hostile.answer = json_answer(MESSAGE)
    status, _ = await gateway.messages({"metadata": {"user_id": EMAIL}})
    assert status == 200
    assert EMAIL not in sent_text(hostile)
    assert hostile.sent()["metadata"] == {"user_id": MASKED}
