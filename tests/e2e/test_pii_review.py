"""What an adversarial review of PII redaction found (each test failed before its fix): real
gateway processes in front of a scriptable fake upstream (tests/e2e/scripted_upstream.py)."""

from __future__ import annotations

import json

import pytest

from gateway.redact import ALL_KINDS, build_redactor

from ..harness import Gateway
from .test_routing_review import Fake, post, sse, write_routes

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


# 2. SPEC §6 split guarantee: Mistral's reasoning models stream `delta.content` as a list of
#    chunks (a `thinking` chunk of text chunks, then `text` chunks), and clients join each
#    kind's text across deltas. Such a content was redacted event by event, so an address split
#    between two deltas reached the client in clear. The chunks' texts now stream: text chunks
#    with the string content (one text, as clients join them), thinking chunks as one more.
def chunk(content: object, finish: str | None = None) -> str:
    event = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "magistral"}
    event["choices"] = [{"index": 0, "delta": {"content": content}, "finish_reason": finish}]
    return "data: " + json.dumps(event, separators=(",", ":")) + "\n\n"


def think(text: str) -> list[dict]:
    return [{"type": "thinking", "thinking": [{"type": "text", "text": text}]}]


def joined(data: bytes) -> tuple[str, str]:
    """(text, thinking) as a client that joins each kind's chunks across deltas reads them."""
    text, thinking = "", ""
    for line in data.decode().splitlines():
        if not line.startswith("data: {"):
            continue
        for choice in json.loads(line[6:])["choices"]:
            content = choice["delta"].get("content")
            if isinstance(content, str):
                text += content
            for part in content if isinstance(content, list) else ():
                if part["type"] == "text":
                    text += part["text"]
                elif part["type"] == "thinking":
                    inner = part["thinking"]
                    thinking += inner if isinstance(inner, str) else "".join(c["text"] for c in inner)
    return text, thinking


@pytest.mark.parametrize(
    "chunks",
    [
        # split between two text chunks, and between two thinking chunks
        [
            chunk(think(f"the user is {EMAIL[:9]}")),
            chunk(think(f"{EMAIL[9:]} ok")),
            chunk([{"type": "text", "text": "mail " + EMAIL[:12]}]),
            chunk([{"type": "text", "text": EMAIL[12:] + " now"}]),
            chunk("", "stop"),
        ],
        # a string delta, then a text chunk; held text flushed into a finishing chunk's list
        [chunk(f"mail {EMAIL[:5]}"), chunk([{"type": "text", "text": EMAIL[5:]}], "stop")],
        # thinking held at the end of the stream, a thinking chunk given as a string
        [
            chunk([{"type": "thinking", "thinking": f"card {CARD[:7]}"}]),
            chunk([{"type": "thinking", "thinking": CARD[7:]}]),
        ],
    ],
)
@pytest.mark.parametrize("structured", [False, True])
def test_mistral_content_chunks_split_across_deltas_are_redacted(
    gateway, fakes, chunks: list[str], structured: bool
) -> None:
    """With structured output (response_format: Mistral takes json_object) the text is read as
    JSON text, the thinking as prose: chunks were read event by event then, a split in clear."""
    fakes["backup"].script({"chunks": [*chunks, "data: [DONE]\n\n"]})
    body = {"model": "magistral-medium-latest", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    if structured:
        body["response_format"] = {"type": "json_object"}
    got, _, data = post(gateway.port, "/v1/chat/completions", body)
    assert got == 200, data
    text, thinking = joined(data)
    whole_text, whole_thinking = joined("".join(chunks).encode())
    redactor = build_redactor(ALL_KINDS)
    expected = redactor.redact(whole_text, json_text=structured)
    assert text == expected and thinking == redactor.redact(whole_thinking), data
    assert EMAIL not in text + thinking and "4242 4242" not in text + thinking


@pytest.mark.parametrize("structured", [False, True])
@pytest.mark.parametrize(
    ("before", "after"),
    [(f"the user is {EMAIL[:12]}", f"{EMAIL[12:]} fine"), (f"card {CARD[:10]}", f"{CARD[10:]} ok")],
)
def test_mistral_thinking_split_around_answer_text_is_masked(
    gateway, fakes, structured: bool, before: str, after: str
) -> None:
    """The thinking's held text goes out when the answer begins; thinking that comes after
    answer text continues it, as clients join every thinking chunk: it started afresh, so the
    address split around the answer chunk was joined in clear."""
    chunks = [chunk(think(before)), chunk([{"type": "text", "text": "{}"}]), chunk(think(after)), chunk("", "stop")]
    fakes["backup"].script({"chunks": [*chunks, "data: [DONE]\n\n"]})
    body = {"model": "magistral-medium-latest", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    if structured:
        body["response_format"] = {"type": "json_object"}
    got, _, data = post(gateway.port, "/v1/chat/completions", body)
    assert got == 200, data
    text, thinking = joined(data)
    assert text == "{}"
    assert EMAIL not in thinking and CARD not in thinking, thinking
    assert thinking.startswith(before[:5]), thinking  # what went out before the answer stays


# 3. SPEC §6's reason to refuse log probabilities (they repeat the completion token by token)
#    holds for token ids too: vLLM and SGLang answer `return_token_ids: true` with each choice's
#    `token_ids`, the completion unredacted to anyone with the model's public tokenizer (or the
#    server's /detokenize). They went out as they came; with redaction on they go out as null,
#    as an unasked-for `logprobs` does.
TOKEN_IDS = [8830, 94815, 13, 57999, 31, 8858, 916]


# Structured output reads the content as JSON text (its surface of its own): the ids go too.
STRUCTURED = pytest.mark.parametrize(
    "asked", [{}, {"response_format": {"type": "json_object"}}], ids=["prose", "structured"]
)


@STRUCTURED
def test_completion_token_ids_do_not_reach_the_client(gateway, fakes, asked) -> None:
    choice = {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}
    reply = {"id": "c", "object": "chat.completion", "choices": [{**choice, "token_ids": TOKEN_IDS}]}
    fakes["backup"].script({"status": 200, "body": json.dumps({**reply, "prompt_token_ids": [1, 2]})})
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "return_token_ids": True, **asked}
    got, _, data = post(gateway.port, "/v1/chat/completions", body)
    assert got == 200, data
    answer = json.loads(data)
    assert answer["choices"][0]["token_ids"] is None and answer["choices"][0]["message"]["content"] == "hi"
    assert answer["prompt_token_ids"] == [1, 2]  # the prompt's, as redacted before it left


@STRUCTURED
def test_completion_token_ids_do_not_reach_the_client_in_a_stream(gateway, fakes, asked) -> None:
    event = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    chunks = [
        {**event, "choices": [{"index": 0, "delta": {"content": "mail "}, "token_ids": TOKEN_IDS[:2]}]},
        {**event, "choices": [{"index": 0, "delta": {"content": "me"}, "token_ids": TOKEN_IDS[2:]}]},
        {**event, "choices": [{"index": 0, "delta": {"content": "!"}, "token_ids": TOKEN_IDS[2:]}]},
    ]
    lines = ["data: " + json.dumps(c, separators=(",", ":")) + "\n\n" for c in chunks]
    fakes["backup"].script({"chunks": [*lines, "data: [DONE]\n\n"]})
    body = {
        "model": "gpt-4o",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "return_token_ids": True,
        **asked,
    }
    got, _, data = post(gateway.port, "/v1/chat/completions", body)
    assert got == 200, data
    events = [json.loads(line[6:]) for line in data.decode().splitlines() if line.startswith("data: {")]
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events) == "mail me!"
    assert all(e["choices"][0].get("token_ids") is None for e in events), data


# 5. Structured output is read as JSON text, where a "+" outside strings was taken for an
#    exponent's: a reply that came as prose all the same (a refusal, a server that does not
#    enforce response_format) had its international phone numbers go out in clear, though the
#    same prose without response_format was masked.
@pytest.mark.parametrize("stream", [False, True])
def test_structured_output_that_came_as_prose_has_its_phones_masked(gateway, fakes, stream: bool) -> None:
    prose = "Sorry, no JSON today. Call Jane on +44 20 7946 0958."
    if stream:
        event = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m"}
        pieces = [prose[:38], prose[38:]]
        lines = [
            "data: " + json.dumps({**event, "choices": [{"index": 0, "delta": {"content": p}}]}) + "\n\n"
            for p in pieces
        ]
        fakes["backup"].script({"chunks": [*lines, "data: [DONE]\n\n"]})
    else:
        choice = {"index": 0, "message": {"role": "assistant", "content": prose}, "finish_reason": "stop"}
        fakes["backup"].script({"status": 200, "body": json.dumps({"id": "c", "choices": [choice]})})
    body = {
        "model": "gpt-4o",
        "messages": [{"role": "user", "content": "hi"}],
        "response_format": {"type": "json_object"},
        "stream": stream,
    }
    got, _, data = post(gateway.port, "/v1/chat/completions", body)
    assert got == 200, data
    assert b"7946" not in data and b"PHONE_MASKED_LAST2_58" in data, data


# 2. SPEC §6: a phone set apart by tabs inside tool-call arguments ("\t" escapes in the JSON
#    text) reached the upstream, and the client, in clear, while the same phone with tabs in
#    content was masked (a JSON tab is two characters, a phone's groups take one separator).
TABBED_ARGUMENTS = json.dumps({"phone": "+1\t415\t555\t2671", "fax": "415\t555\t2671"})
TABBED_MASKED = {"phone": "PHONE_MASKED_LAST2_71", "fax": "PHONE_MASKED_LAST2_71"}


def _call(arguments: str) -> dict:
    return {"id": "t1", "type": "function", "function": {"name": "dial", "arguments": arguments}}


def test_a_tabbed_phone_in_tool_call_arguments_of_a_request_is_masked(gateway, fakes) -> None:
    fakes["backup"].script({"status": 200, "body": json.dumps({"choices": []})})
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [_call(TABBED_ARGUMENTS)]}]
    status, _, data = post(gateway.port, "/v1/chat/completions", {"model": "gpt-4o", "messages": messages})
    assert status == 200, data
    [seen] = fakes["backup"].seen()
    sent = seen["body"]["messages"][1]["tool_calls"][0]["function"]["arguments"]
    assert "2671" not in sent and json.loads(sent) == TABBED_MASKED


@pytest.mark.parametrize("stream", [False, True])
def test_a_tabbed_phone_in_tool_call_arguments_of_a_reply_is_masked(gateway, fakes, stream: bool) -> None:
    if stream:
        pieces = [TABBED_ARGUMENTS[i : i + 3] for i in range(0, len(TABBED_ARGUMENTS), 3)]  # split inside every escape
        chunks = [
            "data: "
            + json.dumps(
                {
                    "id": "x",
                    "object": "chat.completion.chunk",
                    "model": "gpt-4o",
                    "choices": [
                        {
                            "index": 0,
                            "delta": {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]},
                            "finish_reason": None,
                        }
                    ],
                }
            )
            + "\n\n"
            for piece in pieces
        ]
        fakes["backup"].script(
            {"status": 200, "headers": {"Content-Type": "text/event-stream"}, "chunks": [*chunks, "data: [DONE]\n\n"]}
        )
    else:
        message = {"role": "assistant", "content": None, "tool_calls": [_call(TABBED_ARGUMENTS)]}
        reply = {
            "id": "c",
            "object": "chat.completion",
            "model": "gpt-4o",
            "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls"}],
        }
        fakes["backup"].script({"status": 200, "body": json.dumps(reply)})
    status, _, data = post(
        gateway.port,
        "/v1/chat/completions",
        {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "stream": stream},
    )
    assert status == 200, data
    if stream:
        arguments = "".join(
            call["function"].get("arguments", "")
            for line in data.decode().splitlines()
            if line.startswith("data: {")
            for choice in json.loads(line[6:])["choices"]
            for call in choice["delta"].get("tool_calls") or []
        )
    else:
        arguments = json.loads(data)["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]
    assert "2671" not in data.decode() and json.loads(arguments) == TABBED_MASKED


# 6. SPEC §6/§13: a structured output's content is one JSON document, which clients join
#    around the tool calls (Claude may call a tool of the client's, then go on with the
#    forced answer). The text after the calls started afresh as a new document: the address
#    split by the call reached the openai SDK's content (and its `parsed`) in clear, on the
#    translated stream and in the reply joined from it for a request without "stream".
def _answer_around_a_call(before: str = '{"note": "mail ' + EMAIL[:12], after: str = EMAIL[12:] + ' now"}') -> str:
    def block_delta(index: int, partial: str) -> dict:
        return {
            "type": "content_block_delta",
            "index": index,
            "delta": {"type": "input_json_delta", "partial_json": partial},
        }

    usage = {"input_tokens": 3, "output_tokens": 1}
    message = {"id": "m", "type": "message", "role": "assistant", "model": "claude-x", "content": [], "usage": usage}
    answer = {"type": "tool_use", "id": "t0", "name": "json_response", "input": {}}
    call = {"type": "tool_use", "id": "t1", "name": "lookup", "input": {}}
    return sse(
        [
            {"type": "message_start", "message": message},
            {"type": "content_block_start", "index": 0, "content_block": answer},
            block_delta(0, before),
            {"type": "content_block_start", "index": 1, "content_block": call},
            block_delta(1, "{}"),
            {"type": "content_block_stop", "index": 1},
            block_delta(0, after),
            {"type": "content_block_stop", "index": 0},
            {"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 9}},
            {"type": "message_stop"},
        ]
    )


@pytest.mark.parametrize("stream", [False, True])
def test_a_structured_answer_split_around_a_call_is_masked(gateway, fakes, stream: bool) -> None:
    import openai
    from pydantic import BaseModel

    class Note(BaseModel):
        note: str

    class Lookup(BaseModel):
        pass

    script = {"status": 200, "headers": {"Content-Type": "text/event-stream"}, "chunks": [_answer_around_a_call()]}
    fakes["claude"].script(script)
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="demo", max_retries=0, timeout=20)
    messages = [{"role": "user", "content": "hi"}]
    tools = [openai.pydantic_function_tool(Lookup, name="lookup")]
    if stream:  # (the SDK's stream helper parses the content when the call opens: read as chunks)
        chunks = client.chat.completions.create(
            model="claude-x", messages=messages, tools=tools, response_format={"type": "json_object"}, stream=True
        )
        content = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    else:
        message = (
            client.chat.completions.parse(model="claude-x", messages=messages, tools=tools, response_format=Note)
            .choices[0]
            .message
        )
        assert message.tool_calls is not None and message.tool_calls[0].function.name == "lookup"
        content = message.content or ""
    assert EMAIL not in content, content
    assert json.loads(content)["note"].startswith("mail jane.doe@exa")  # still the one document


# 7. SPEC §6: a field of a chat delta that the gateway does not describe (a server's own,
#    "reasoning_text" say) was redacted event by event, whole; but clients join every string
#    of a delta across chunks (the openai SDK's stream helper appends them all, as the
#    gateway's own join of events into one completion does), so an address split across two
#    chunks was joined in clear: on the stream by the SDK, in the JSON reply by the gateway.
def _odd_field_stream() -> list[str]:
    def delta_chunk(delta: dict, finish: str | None = None) -> str:
        event = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o"}
        event["choices"] = [{"index": 0, "delta": delta, "finish_reason": finish}]
        return "data: " + json.dumps(event, separators=(",", ":")) + "\n\n"

    return [
        delta_chunk({"role": "assistant", "content": ""}),
        delta_chunk({"reasoning_text": "the user is " + EMAIL[:12], "content": "Hi"}),
        delta_chunk({"reasoning_text": EMAIL[12:] + ", card " + CARD[:7]}),
        delta_chunk({"reasoning_text": CARD[7:] + " ok", "content": " there"}),
        delta_chunk({}, "stop"),
        "data: [DONE]\n\n",
    ]


@pytest.mark.parametrize("stream", [False, True])
def test_a_delta_field_of_a_servers_own_is_redacted_across_chunks(gateway, fakes, stream: bool) -> None:
    from openai.lib.streaming.chat import ChatCompletionStreamState
    from openai.types.chat import ChatCompletionChunk

    fakes["backup"].script({"headers": {"Content-Type": "text/event-stream"}, "chunks": _odd_field_stream()})
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    got, _, data = post(gateway.port, "/v1/chat/completions", body)
    assert got == 200, data
    if stream:
        state = ChatCompletionStreamState()
        for line in data.decode().splitlines():
            if line.startswith("data: {"):
                state.handle_chunk(ChatCompletionChunk.model_validate(json.loads(line[6:])))
        message = state.get_final_completion().choices[0].message.model_dump()
    else:
        message = json.loads(data)["choices"][0]["message"]
    assert message["content"] == "Hi there"
    redactor = build_redactor(ALL_KINDS)
    assert message["reasoning_text"] == redactor.redact(f"the user is {EMAIL}, card {CARD} ok"), message


# 7. The same, a number the call cuts: `{"n": 4242` + call + `424242424242}`. Flushed at the
#    call, its digits went out as they were, and the mask that the digits after the call made
#    a card with was quoted after them: `4242"CC_MASKED_LAST4_4242"`, no JSON.
@pytest.mark.parametrize("stream", [False, True])
def test_a_structured_answers_number_cut_by_a_call_stays_json(gateway, fakes, stream: bool) -> None:
    import openai

    answer = _answer_around_a_call('{"note": "ok", "n": 4242', "424242424242}")
    fakes["claude"].script({"status": 200, "headers": {"Content-Type": "text/event-stream"}, "chunks": [answer]})
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="demo", max_retries=0, timeout=20)
    messages = [{"role": "user", "content": "hi"}]
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    kwargs = {"model": "claude-x", "messages": messages, "tools": tools, "response_format": {"type": "json_object"}}
    if stream:
        chunks = client.chat.completions.create(**kwargs, stream=True)  # type: ignore[call-overload]
        content = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    else:
        content = client.chat.completions.create(**kwargs).choices[0].message.content or ""  # type: ignore[call-overload]
    assert json.loads(content) == {"note": "ok", "n": "CC_MASKED_LAST4_4242"}, content
