"""Request fields that leave for the upstream beside the messages (SPEC §6, §11, §13): the end
user's identifiers, and the blocks of an Anthropic conversation sent back. The gateway in
process, in front of a hostile upstream that records what it gets (tests/test_adversarial.py's
fixtures)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

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
from tests.test_side_channels import ROUTES  # a chat → Anthropic route to the hostile upstream

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


def sent_text(upstream: Hostile) -> str:
    return upstream.seen[-1].body.decode()


# --- The end user's identifier: chat's `user`, Messages' `metadata.user_id` ------------------
# SPEC §3, §11, §12: every field but the message text goes as sent, these too.


async def test_chat_user_identifiers_reach_an_openai_upstream_as_sent(gateway: Gateway, hostile: Hostile) -> None:  # noqa: F811
    status, _ = await gateway.chat({"user": EMAIL, "safety_identifier": "user-8f3a"})
    assert status == 200
    assert hostile.sent()["user"] == EMAIL and hostile.sent()["safety_identifier"] == "user-8f3a"


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


async def test_messages_metadata_reaches_the_upstream_as_sent(gateway: Gateway, hostile: Hostile) -> None:  # noqa: F811
    hostile.answer = json_answer(MESSAGE)
    status, _ = await gateway.messages({"metadata": {"user_id": EMAIL}})
    assert status == 200
    assert hostile.sent()["metadata"] == {"user_id": EMAIL}


# --- Blocks of an Anthropic conversation sent back (SPEC §11) --------------------------------
# Each holds the address in a text the upstream reads; each was sent in clear before.
CARD_LIKE = "Eq+4111111111111111/"  # what a card mask would change: an encrypted string must not be
SEARCH_RESULT = {
    "type": "search_result",
    "source": f"https://people.example/{EMAIL}",
    "title": f"Contact {EMAIL}",
    "content": [{"type": "text", "text": f"write to {EMAIL}"}],
}
BLOCKS = [
    (
        "server tool use: a web search query",
        {
            "type": "server_tool_use",
            "id": "srvtoolu_1",
            "name": "web_search",
            "input": {"query": f"who is {EMAIL}"},
        },
    ),
    (
        "web search result titles and URLs",
        {
            "type": "web_search_tool_result",
            "tool_use_id": "srvtoolu_1",
            "content": [
                {
                    "type": "web_search_result",
                    "url": f"https://people.example/{EMAIL}",
                    "title": f"Contact {EMAIL}",
                    "encrypted_content": CARD_LIKE,
                    "page_age": "April 30, 2025",
                }
            ],
        },
    ),
    (
        "a text block's citations",
        {
            "type": "text",
            "text": "Her address is on file.",
            "citations": [
                {
                    "type": "web_search_result_location",
                    "url": "https://people.example/jane",
                    "title": "Jane",
                    "encrypted_index": CARD_LIKE,
                    "cited_text": f"write to {EMAIL}",
                }
            ],
        },
    ),
    (
        "an MCP tool's call (beta)",
        {"type": "mcp_tool_use", "id": "mcptoolu_1", "name": "find", "server_name": "crm", "input": {"who": EMAIL}},
    ),
    (
        "an MCP tool's result (beta)",
        {"type": "mcp_tool_result", "tool_use_id": "mcptoolu_1", "content": [{"type": "text", "text": EMAIL}]},
    ),
    ("a search result block", SEARCH_RESULT),
    ("a search result in a tool result", {"type": "tool_result", "tool_use_id": "toolu_1", "content": [SEARCH_RESULT]}),
    (
        "a plain-text document, its title and context",
        {
            "type": "document",
            "source": {"type": "text", "media_type": "text/plain", "data": f"Contact: {EMAIL}"},
            "title": f"{EMAIL}'s file",
            "context": f"from {EMAIL}",
        },
    ),
    (
        "a document of content blocks",
        {
            "type": "document",
            "source": {"type": "content", "content": [{"type": "text", "text": f"mail {EMAIL}"}]},
        },
    ),
    (
        "a fetched page",
        {
            "type": "web_fetch_tool_result",
            "tool_use_id": "srvtoolu_2",
            "content": {
                "type": "web_fetch_result",
                "url": "https://people.example/jane",
                "content": {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": EMAIL}},
            },
        },
    ),
    (
        "a browser tool's state in a tool result: tab titles, URLs, downloads (beta)",
        {
            "type": "tool_result",
            "tool_use_id": "toolu_2",
            "content": [
                {"type": "text", "text": "Done."},
                {
                    "type": "browser_state",
                    "tabs": [
                        {
                            "tab_id": "tab_1",
                            "title": f"Inbox - {EMAIL} - Mail",
                            "url": "https://mail.example/",
                            "active": True,
                        }
                    ],
                    "state_changes": [
                        {
                            "type": "download_completed",
                            "download_id": "dl_1",
                            "url": "https://a.example/f",
                            "path": f"/tmp/{EMAIL}.pdf",
                        }
                    ],
                },
            ],
        },
    ),
    ("a bare string where a block goes (refused by Anthropic, but sent there)", f"write to {EMAIL}"),
    (
        "a compaction summary (beta: context management's compact edit)",
        {"type": "compaction", "content": f"The user, {EMAIL}, asked for a refund.", "encrypted_content": CARD_LIKE},
    ),
    (
        "a tool result whose content is one block, not an array (refused by Anthropic, but sent there)",
        {"type": "tool_result", "tool_use_id": "toolu_1", "content": {"type": "text", "text": EMAIL}},
    ),
    (
        "code execution output",
        {
            "type": "bash_code_execution_tool_result",
            "tool_use_id": "srvtoolu_3",
            "content": {
                "type": "bash_code_execution_result",
                "stdout": f"{EMAIL}\n",
                "stderr": "",
                "return_code": 0,
                "content": [],
            },
        },
    ),
]


@pytest.mark.parametrize("block", [b for _, b in BLOCKS], ids=[name for name, _ in BLOCKS])
async def test_conversation_blocks_reach_the_upstream_masked(
    gateway: Gateway,  # noqa: F811
    hostile: Hostile,  # noqa: F811
    block: dict[str, Any],
) -> None:
    hostile.answer = json_answer(MESSAGE)
    conversation = [
        {"role": "user", "content": "Who is she?"},
        {"role": "assistant", "content": [block]},
        {"role": "user", "content": [block]},  # what a client's own search results look like
    ]
    status, data = await gateway.messages({"messages": conversation})
    assert status == 200, data
    assert EMAIL not in sent_text(hostile) and MASKED in sent_text(hostile)
    # What Anthropic encrypted goes back as it came (below): two copies of the block, two of it.
    assert sent_text(hostile).count(CARD_LIKE) == 2 * json.dumps(block).count(CARD_LIKE)


async def test_thinking_and_encrypted_content_go_back_as_they_came(gateway: Gateway, hostile: Hostile) -> None:  # noqa: F811
    # Anthropic checks a thinking block's signature and decrypts a search result's content when
    # the conversation comes back: either changed, the request fails.
    hostile.answer = json_answer(MESSAGE)
    unchanged = [
        {"type": "thinking", "thinking": f"The user is {EMAIL}, card 4111 1111 1111 1111.", "signature": CARD_LIKE},
        {"type": "redacted_thinking", "data": CARD_LIKE},
        {
            "type": "web_search_tool_result",
            "tool_use_id": "srvtoolu_1",
            "content": [
                {"type": "web_search_result", "url": "https://a.example", "title": "A", "encrypted_content": CARD_LIKE}
            ],
        },
        {
            "type": "text",
            "text": "Ask her.",
            "citations": [
                {
                    "type": "web_search_result_location",
                    "url": "https://a.example",
                    "title": "A",
                    "cited_text": "A.",
                    "encrypted_index": CARD_LIKE,
                }
            ],
        },
        {
            "type": "code_execution_tool_result",
            "tool_use_id": "srvtoolu_4",
            "content": {
                "type": "encrypted_code_execution_result",
                "encrypted_stdout": CARD_LIKE,
                "stderr": "",
                "return_code": 0,
                "content": [],
            },
        },
    ]
    status, _ = await gateway.messages(
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": unchanged}]}
    )
    assert status == 200
    assert hostile.sent()["messages"][1]["content"] == unchanged


async def test_responses_user_identifiers_reach_the_upstream_as_sent(gateway: Gateway, hostile: Hostile) -> None:  # noqa: F811
    status, _ = await gateway.post(
        "/v1/responses", {"model": "m", "input": "hi", "user": EMAIL, "safety_identifier": EMAIL}
    )
    assert status == 200
    assert hostile.sent()["user"] == hostile.sent()["safety_identifier"] == EMAIL


async def test_a_chat_content_that_is_one_part_reaches_the_upstream_masked(gateway: Gateway, hostile: Hostile) -> None:  # noqa: F811
    # A content that is one part, not an array of them: no message OpenAI takes, but the body
    # reaches the upstream all the same, so its text must not be in clear (as with bare strings).
    hostile.answer = json_answer({"id": "c1", "object": "chat.completion", "model": "m", "choices": []})
    part = {"type": "text", "text": f"write to {EMAIL}"}
    status, _ = await gateway.chat({"messages": [{"role": "user", "content": part}]})
    assert status == 200
    assert hostile.sent()["messages"][0]["content"] == {"type": "text", "text": f"write to {MASKED}"}


async def test_a_custom_tool_calls_input_reaches_the_upstream_masked(gateway: Gateway, hostile: Hostile) -> None:  # noqa: F811
    # Chat's other kind of tool call (a custom, freeform tool) sent back: its input is the
    # model's text as a function call's arguments are (the Responses API's is read already).
    hostile.answer = json_answer({"id": "c1", "object": "chat.completion", "model": "m", "choices": []})
    call = {"id": "c1", "type": "custom", "custom": {"name": "sql", "input": f"WHERE email = '{EMAIL}'"}}
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "1 row"},
    ]
    status, _ = await gateway.chat({"messages": messages})
    assert status == 200
    assert hostile.sent()["messages"][1]["tool_calls"][0]["custom"] == {
        "name": "sql",
        "input": f"WHERE email = '{MASKED}'",
    }


async def test_reasoning_sent_back_in_an_assistant_message_reaches_the_upstream_masked(
    gateway: Gateway,  # noqa: F811
    hostile: Hostile,  # noqa: F811
) -> None:
    # DeepSeek's thinking mode with tools, Kimi's and MiniMax's ask the client to send the
    # reasoning back (`reasoning_content`, `reasoning`, OpenRouter's `reasoning_details`): text
    # the model reads as it reads the content, redacted in replies, and so in requests. These
    # went upstream in clear.
    hostile.answer = json_answer({"id": "c1", "object": "chat.completion", "model": "m", "choices": []})
    details = [
        {"type": "reasoning.text", "text": f"mail {EMAIL}", "index": 0},
        {"type": "reasoning.summary", "summary": f"for {EMAIL}", "index": 1},
        {"type": "reasoning.encrypted", "data": "gAAAA", "index": 2},
    ]
    assistant = {
        "role": "assistant",
        "content": "",
        "reasoning_content": f"The user is {EMAIL}",
        "reasoning": f"write to {EMAIL}",
        "reasoning_details": details,
        "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
    }
    messages = [{"role": "user", "content": "hi"}, assistant, {"role": "tool", "tool_call_id": "c1", "content": "ok"}]
    status, _ = await gateway.chat({"messages": messages})
    assert status == 200
    sent = hostile.sent()["messages"][1]
    assert EMAIL not in json.dumps(sent)
    assert sent["reasoning_content"] == f"The user is {MASKED}" and sent["reasoning"] == f"write to {MASKED}"
    assert sent["reasoning_details"] == [
        {"type": "reasoning.text", "text": f"mail {MASKED}", "index": 0},
        {"type": "reasoning.summary", "summary": f"for {MASKED}", "index": 1},
        {"type": "reasoning.encrypted", "data": "gAAAA", "index": 2},
    ]


async def test_mistral_thinking_chunks_sent_back_reach_the_upstream_masked(
    gateway: Gateway,  # noqa: F811
    hostile: Hostile,  # noqa: F811
) -> None:
    # Mistral's reasoning models answer with content chunks, the thinking as a `thinking` chunk
    # of text chunks, and take the conversation back so: its text went upstream in clear.
    hostile.answer = json_answer({"id": "c1", "object": "chat.completion", "model": "m", "choices": []})
    content = [
        {"type": "thinking", "thinking": [{"type": "text", "text": f"the user is {EMAIL}"}], "closed": True},
        {"type": "thinking", "thinking": f"write to {EMAIL}"},
        {"type": "text", "text": "ok"},
    ]
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": content}]
    status, _ = await gateway.chat({"messages": [*messages, {"role": "user", "content": "and?"}]})
    assert status == 200
    assert hostile.sent()["messages"][1]["content"] == [
        {"type": "thinking", "thinking": [{"type": "text", "text": f"the user is {MASKED}"}], "closed": True},
        {"type": "thinking", "thinking": f"write to {MASKED}"},
        {"type": "text", "text": "ok"},
    ]


ODD_CONTENTS: list[tuple[str, Any]] = [
    ("nested_list", [[f"mail {EMAIL}"]]),
    ("text_as_list", [{"type": "text", "text": [f"mail {EMAIL}"]}]),
    ("assistants_api_text", [{"type": "text", "text": {"value": f"mail {EMAIL}", "annotations": []}}]),
    ("object_with_content", {"content": f"mail {EMAIL}"}),
    ("text_in_another_key", [{"type": "input_text", "input_text": f"mail {EMAIL}"}]),
    ("untyped_content_key", [{"content": f"mail {EMAIL}"}]),
]


@pytest.mark.parametrize("content", [c for _, c in ODD_CONTENTS], ids=[name for name, _ in ODD_CONTENTS])
async def test_a_chat_content_of_an_odd_shape_never_reaches_the_upstream_in_clear(
    gateway: Gateway,  # noqa: F811
    hostile: Hostile,  # noqa: F811
    content: Any,
) -> None:
    # Shapes no API documents (the Assistants API's text object copied into chat, a nested
    # list) reach the upstream all the same, which refuses or reads them, and logs them: their
    # text went in clear, only a part's own "text" string was read. Media parts still pass.
    hostile.answer = json_answer({"id": "c1", "object": "chat.completion", "model": "m", "choices": []})
    image = {"type": "image_url", "image_url": {"url": "https://x/a@b.com.png", "detail": "low"}}
    contents = [*content, image] if type(content) is list else content
    status, _ = await gateway.chat({"messages": [{"role": "user", "content": contents}]})
    assert status == 200
    sent = json.dumps(hostile.sent()["messages"])
    assert EMAIL not in sent and MASKED in sent
    if type(content) is list:
        assert hostile.sent()["messages"][0]["content"][-1] == image


async def test_a_chat_file_parts_filename_reaches_the_upstream_masked(
    gateway: Gateway,  # noqa: F811
    hostile: Hostile,  # noqa: F811
) -> None:
    # A file part passed whole, as a media part does: its data and id are no text, but its
    # `filename` is a name the user gave ("contract jane.doe@example.com.pdf"), which the
    # Responses API's `input_file` part had redacted and chat's sent upstream in clear.
    hostile.answer = json_answer({"id": "c1", "object": "chat.completion", "model": "m", "choices": []})
    data = "data:application/pdf;base64,JVBERi0xLjQ="
    part = {"type": "file", "file": {"file_data": data, "filename": f"contract {EMAIL}.pdf"}}
    status, _ = await gateway.chat({"messages": [{"role": "user", "content": [part, {"type": "text", "text": "sum"}]}]})
    assert status == 200
    sent = hostile.sent()["messages"][0]["content"][0]
    assert sent == {"type": "file", "file": {"file_data": data, "filename": f"contract {MASKED}.pdf"}}


async def test_a_chat_document_parts_name_reaches_the_upstream_masked(
    gateway: Gateway,  # noqa: F811
    hostile: Hostile,  # noqa: F811
) -> None:
    # Mistral's document part (`document_url`) names its document as a file part does: the
    # URL passes, the name the user gave it went upstream in clear.
    hostile.answer = json_answer({"id": "c1", "object": "chat.completion", "model": "m", "choices": []})
    part = {"type": "document_url", "document_url": "https://example.org/a.pdf", "document_name": f"cv {EMAIL}.pdf"}
    status, _ = await gateway.chat({"messages": [{"role": "user", "content": [part, {"type": "text", "text": "sum"}]}]})
    assert status == 200
    sent = hostile.sent()["messages"][0]["content"][0]
    assert sent == {**part, "document_name": f"cv {MASKED}.pdf"}


ODD_CALLS: list[tuple[str, dict[str, Any]]] = [
    # Arguments as an object, as the servers that parse them for a chat template hold them.
    (
        "arguments_object",
        {
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "f", "arguments": {"to": EMAIL, "card": 4242424242424242}},
                }
            ]
        },
    ),
    ("legacy_arguments_object", {"function_call": {"name": "f", "arguments": {"to": [EMAIL]}}}),
    (
        "one_call_for_an_array",
        {
            "tool_calls": {
                "id": "c1",
                "type": "function",
                "function": {"name": "f", "arguments": f'{{"to": "{EMAIL}"}}'},
            }
        },
    ),
]


@pytest.mark.parametrize("call", [c for _, c in ODD_CALLS], ids=[name for name, _ in ODD_CALLS])
async def test_a_tool_call_of_an_odd_shape_never_reaches_the_upstream_in_clear(
    gateway: Gateway,  # noqa: F811
    hostile: Hostile,  # noqa: F811
    call: dict[str, Any],
) -> None:
    hostile.answer = json_answer({"id": "c1", "object": "chat.completion", "model": "m", "choices": []})
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, **call}]
    status, _ = await gateway.chat({"messages": messages})
    assert status == 200
    sent = json.dumps(hostile.sent()["messages"])
    assert EMAIL not in sent and MASKED in sent and "4242424242424242" not in sent


ODD_BLOCKS: list[tuple[str, dict[str, Any]]] = [
    ("text_as_list", {"messages": [{"role": "user", "content": [{"type": "text", "text": [f"mail {EMAIL}"]}]}]}),
    ("nested_list", {"messages": [{"role": "user", "content": [[f"mail {EMAIL}"]]}]}),
    ("untyped_block", {"messages": [{"role": "user", "content": [{"text": f"mail {EMAIL}"}]}]}),
    ("system_nested_list", {"system": [[f"mail {EMAIL}"]]}),
    (
        "tool_result_text_object",
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "tool_result", "tool_use_id": "t", "content": [{"type": "text", "text": {"v": EMAIL}}]}
                    ],
                }
            ]
        },
    ),
]


@pytest.mark.parametrize("body", [b for _, b in ODD_BLOCKS], ids=[name for name, _ in ODD_BLOCKS])
async def test_a_messages_block_of_an_odd_shape_never_reaches_the_upstream_in_clear(
    gateway: Gateway,  # noqa: F811
    hostile: Hostile,  # noqa: F811
    body: dict[str, Any],
) -> None:
    # Anthropic refuses these, but gets them (and may log them): a text that is no string, a
    # nested list, a block without a type. Their text went in clear.
    hostile.answer = json_answer(MESSAGE)
    status, _ = await gateway.messages(body)
    assert status == 200
    sent = sent_text(hostile)
    assert EMAIL not in sent and MASKED in sent


# A block's or item's `type` is the client's JSON: an object or an array there (no type either
# API has) was looked up in a frozenset and raised TypeError (unhashable): a 500
# internal_error for a malformed body, found by fuzzing the real gateway. Such a block is one of
# no known type, as an unknown string type is; an item of no known type has every string read.
ODD_TYPES: list[tuple[str, dict[str, Any]]] = [
    ("messages_system_block", {"system": [{"type": {}, "text": "hi"}]}),
    ("messages_content_block", {"messages": [{"role": "user", "content": [{"type": ["text"], "text": "hi"}]}]}),
    ("responses_item", {"model": "m", "input": [{"type": [], "content": f"mail {EMAIL}"}]}),
    ("responses_part", {"model": "m", "input": [{"role": "user", "content": [{"type": {}, "text": f"mail {EMAIL}"}]}]}),
]


@pytest.mark.parametrize("body", [b for _, b in ODD_TYPES], ids=[name for name, _ in ODD_TYPES])
async def test_a_type_that_is_no_string_is_relayed_not_a_500(
    gateway: Gateway,  # noqa: F811
    hostile: Hostile,  # noqa: F811
    body: dict[str, Any],
) -> None:
    if "input" in body:
        status, data = await gateway.post("/v1/responses", body)
    else:
        hostile.answer = json_answer(MESSAGE)
        status, data = await gateway.messages(body)
    assert status == 200, data
    assert EMAIL not in sent_text(hostile)


# --- A reply in another encoding than UTF-8 -----------------------------------------------
@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16", "utf-32-be"])
async def test_a_json_reply_in_utf16_or_utf32_never_reaches_the_client_unredacted(
    gateway: Gateway,  # noqa: F811
    hostile: Hostile,  # noqa: F811
    encoding: str,
) -> None:
    # The stdlib parser (the fallback for what orjson refuses) reads JSON in UTF-16 and UTF-32,
    # and so do the clients (httpx's and requests' json(), the openai SDK's), while the check
    # for PII read the bytes as UTF-8: a card or a phone number passed unredacted. Such a body
    # is no JSON reply now (RFC 8259: UTF-8), the upstream's failure.
    reply = {"id": "c1", "object": "chat.completion", "model": "m", "choices": []}
    reply["choices"] = [{"index": 0, "message": {"role": "assistant", "content": "card 4242 4242 4242 4242"}}]
    hostile.answer = json_answer(json.dumps(reply).encode(encoding))
    status, data = await gateway.chat({})
    assert status == 502, data
    assert b"not JSON" in data


async def test_a_json_reply_opening_with_a_utf8_bom_is_still_read_and_redacted(
    gateway: Gateway,  # noqa: F811
    hostile: Hostile,  # noqa: F811
) -> None:
    reply = {"id": "c1", "object": "chat.completion", "model": "m", "choices": []}
    reply["choices"] = [{"index": 0, "message": {"role": "assistant", "content": "card 4242 4242 4242 4242"}}]
    hostile.answer = json_answer(b"\xef\xbb\xbf" + json.dumps(reply).encode())
    status, data = await gateway.chat({})
    assert status == 200, data
    assert json.loads(data)["choices"][0]["message"]["content"] == "card CC_MASKED_LAST4_4242"
