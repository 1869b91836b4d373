"""POST /v1/responses, POST /v1/embeddings and GET /v1/models end to end (SPEC §12): the
official openai SDK as the client, the real gateway process, the mock upstream speaking the
Responses API's JSON and event stream, embeddings and the model list."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import openai
import pytest
from hypothesis import HealthCheck, given, settings

from gateway.redact import ALL_KINDS, build_redactor

from ..conftest import GatewayFactory
from ..harness import Gateway, Mock, http_get, wait_until
from ..test_redact import PII, split_reply
from .structured import REDACTED, STRUCTURED, Contact
from .test_telemetry import samples

REDACTOR = build_redactor(ALL_KINDS)
assert REDACTOR is not None
redact = REDACTOR.redact
ALL_PII = [v for values in PII.values() for v in values]

RESPONSES, EMBEDDINGS, MODELS = "/v1/responses", "/v1/embeddings", "/v1/models"
MODEL = "gpt-4o-mini"
DEFAULT_REPLY = "Hello! This is a mock response from the upstream."
TERMINAL = ("response.completed", "response.incomplete", "response.failed")


def sdk(gateway: Gateway, headers: dict[str, str] | None = None, key: str = "demo", retries: int = 0) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=gateway.url + "/v1", api_key=key, max_retries=retries, timeout=20, default_headers=headers
    )


def knobs(**values: str | list[str] | dict[str, Any]) -> dict[str, str]:
    """The mock's knobs as headers the gateway passes upstream (x-stainless-mock-NAME)."""
    return {
        "x-stainless-mock-" + name.replace("_", "-"): value if isinstance(value, str) else json.dumps(value)
        for name, value in values.items()
    }


async def post(
    gateway: Gateway, path: str, body: bytes | dict[str, Any], headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            gateway.url + path, data=data, headers={"Content-Type": "application/json", **(headers or {})}
        ) as response,
    ):
        return response.status, {k.lower(): v for k, v in response.headers.items()}, await response.read()


def sse_events(wire: bytes) -> list[dict[str, Any]]:
    """Each event's data; every event carries an `event:` line naming its type, and nothing else."""
    out = []
    for block in wire.decode().split("\n\n"):
        if not block.strip():
            continue
        lines = dict(line.split(": ", 1) for line in block.split("\n"))
        assert set(lines) == {"event", "data"}, block
        data = json.loads(lines["data"])
        assert data["type"] == lines["event"], block
        out.append(data)
    return out


def streamed(events: list[dict[str, Any]], index: int = 0, kind: str = "output_text") -> str:
    return "".join(e["delta"] for e in events if e["type"] == f"response.{kind}.delta" and e["output_index"] == index)


def copies(events: list[dict[str, Any]], index: int = 0) -> list[str]:
    """Every later copy of a message's text: .done, content_part.done, output_item.done, terminal."""
    out = []
    for e in events:
        kind = e["type"]
        if kind == "response.output_text.done" and e["output_index"] == index:
            out.append(e["text"])
        elif kind == "response.content_part.done" and e["output_index"] == index:
            out.append(e["part"]["text"])
        elif kind == "response.output_item.done" and e["output_index"] == index:
            out.append(e["item"]["content"][0]["text"])
        elif kind in TERMINAL:
            out.append(e["response"]["output"][index]["content"][0]["text"])
    return out


def error_of(body: bytes) -> dict[str, Any]:
    error = json.loads(body)["error"]
    assert set(error) >= {"message", "type", "code"}, error
    return dict(error)


def upstream_bodies(mock: Mock, path: str) -> list[dict[str, Any]]:
    return [seen["body"] for seen in mock.requests() if seen.get("path") == path]


# --- Responses: replies ----------------------------------------------------------------


def test_create_returns_what_the_upstream_sent(shared_gateway: Gateway, mock: Mock) -> None:
    response = sdk(shared_gateway).responses.create(model=MODEL, input="Hola 👋", max_output_tokens=64)
    assert response.output_text == DEFAULT_REPLY and response.status == "completed" and response.model == MODEL
    assert response.usage is not None and response.usage.input_tokens == 9
    [sent] = upstream_bodies(mock, RESPONSES)
    assert sent == {"model": MODEL, "input": "Hola 👋", "max_output_tokens": 64}


def test_create_redacts_output_text_and_function_call_arguments(shared_gateway: Gateway, mock: Mock) -> None:
    text = "Reach Jane at jane@example.com or 4111-1111-1111-1111; released 3.11.7 on 2024-01-15."
    tool_input = {"to": "jane.doe@example.com", "cc": ["+1 415 555 2671", "order 123456789012"], "n": 3}
    response = sdk(shared_gateway, knobs(reply=text, tool_input=json.dumps(tool_input))).responses.create(
        model=MODEL, input="hi"
    )
    assert response.output_text == redact(text)
    call = response.output[1]
    assert call.type == "function_call"
    assert json.loads(call.arguments) == {
        "to": "j***e@example.com",
        "cc": [redact("+1 415 555 2671"), "order 123456789012"],
        "n": 3,
    }


def test_stream_text_is_what_the_upstream_sent(shared_gateway: Gateway, mock: Mock) -> None:
    reply = "one two three, four. Dates 2024-01-15 and v1.2.3 stay."
    with sdk(shared_gateway, knobs(reply=reply)).responses.stream(model=MODEL, input="hi") as stream:
        events = list(stream)
        final = stream.get_final_response()
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert "".join(deltas) == reply and len([d for d in deltas if d]) > 1  # streamed, not one lump
    assert final.output_text == reply == "".join(deltas)
    assert [e.text for e in events if e.type == "response.output_text.done"] == [reply]
    assert events[0].type == "response.created" and events[-1].type == "response.completed"


@pytest.mark.parametrize(
    ("deltas", "expected"),
    [
        (["mail jane.doe@exa", "mple.com now"], "mail j***e@example.com now"),
        (["pay with 4242 42", "42 4242 4242", " now"], "pay with CC_MASKED_LAST4_4242 now"),
        (["call +1 41", "5 555 ", "2671"], "call " + redact("+1 415 555 2671")),
        (["ends with jane@exam", "ple.com"], "ends with j***e@example.com"),  # held text flushed before the done
    ],
)
def test_stream_pii_split_across_deltas_is_masked_in_deltas_done_events_and_the_final_response(
    shared_gateway: Gateway, mock: Mock, deltas: list[str], expected: str
) -> None:
    with sdk(shared_gateway, knobs(deltas=deltas)).responses.stream(model=MODEL, input="hi") as stream:
        events = list(stream)
        final = stream.get_final_response()
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == expected
    assert final.output_text == expected
    done = [e for e in events if e.type.endswith(".done") or e.type == "response.completed"]
    assert [e.type for e in done] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert done[0].text == expected  # type: ignore[union-attr]
    seen = "".join(e.model_dump_json(warnings=False) for e in events)
    assert not any(value in seen for value in ALL_PII if value in "".join(deltas))
    assert "".join(deltas) not in seen


async def test_the_raw_stream_keeps_openais_events_and_ends_without_done(shared_gateway: Gateway, mock: Mock) -> None:
    status, headers, wire = await post(
        shared_gateway,
        RESPONSES,
        {"model": MODEL, "input": "hi", "stream": True},
        knobs(deltas=["Write to jane.doe@exa", "mple.com please"]),
    )
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = sse_events(wire)
    kinds = [e["type"] for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert b"[DONE]" not in wire and wire.endswith(b"\n\n")
    assert streamed(events) == "Write to j***e@example.com please"
    assert copies(events) == ["Write to j***e@example.com please"] * 4
    assert all(isinstance(e["sequence_number"], int) for e in events)


@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
@given(split_reply())
def test_any_split_of_a_streamed_text_is_redacted_like_the_whole_in_deltas_and_copies(
    shared_gateway: Gateway, mock: Mock, case: tuple[str, list[str]]
) -> None:
    text, deltas = case
    _, _, wire = asyncio.run(
        post(shared_gateway, RESPONSES, {"model": MODEL, "input": "hi", "stream": True}, knobs(deltas=deltas))
    )
    events = sse_events(wire)
    assert streamed(events) == redact(text)
    assert copies(events) == [redact(text)] * 4


def test_refusals_are_redacted_across_deltas(shared_gateway: Gateway, mock: Mock) -> None:
    refusal = "I can't email jane.doe@example.com, sorry."
    with sdk(shared_gateway, knobs(refusal=refusal)).responses.stream(model=MODEL, input="hi") as stream:
        events = list(stream)
        final = stream.get_final_response()
    expected = redact(refusal)
    assert "".join(e.delta for e in events if e.type == "response.refusal.delta") == expected
    assert [e.refusal for e in events if e.type == "response.refusal.done"] == [expected]
    assert final.output[0].content[0].refusal == expected  # type: ignore[union-attr]


def test_streamed_function_call_arguments_are_json_with_masks(shared_gateway: Gateway, mock: Mock) -> None:
    pieces = ['{"to": "jane.doe@exa', 'mple.com", "card": "4242 4242 ', '4242 4242", "n": 3}']
    with sdk(shared_gateway, knobs(tool_deltas=pieces)).responses.stream(model=MODEL, input="hi") as stream:
        events = list(stream)
        final = stream.get_final_response()
    arguments = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    expected = {"to": "j***e@example.com", "card": "CC_MASKED_LAST4_4242", "n": 3}
    assert json.loads(arguments) == expected
    assert [json.loads(e.arguments) for e in events if e.type == "response.function_call_arguments.done"] == [expected]
    assert json.loads(final.output[1].arguments) == expected  # type: ignore[union-attr]


def test_sequence_numbers_stay_unique_and_increasing_when_held_text_is_flushed(
    shared_gateway: Gateway, mock: Mock
) -> None:
    # The message ends inside an address and the call's arguments end inside a card: each held
    # part goes out as a delta of the gateway's own. It took the number of the .done after it
    # (9 twice, 16 twice), so a client that resumes or de-duplicates by sequence_number
    # (openai-python's starting_after: `>` the last number seen) lost the masked text.
    headers = knobs(deltas=["mail jane@exa", "mple.com"], tool_deltas=['{"card": "4242 4242 ', '4242 4242"}'])
    with sdk(shared_gateway, headers).responses.stream(model=MODEL, input="hi") as stream:
        events = list(stream)
        final = stream.get_final_response()
    numbers = [e.sequence_number for e in events]
    assert numbers == list(range(len(events)))  # as OpenAI numbers them: 0, 1, 2...
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == final.output_text
    assert final.output_text == "mail j***e@example.com"
    assert json.loads(final.output[1].arguments) == {"card": "CC_MASKED_LAST4_4242"}  # type: ignore[union-attr]


def test_a_custom_tools_input_split_across_deltas_is_masked_everywhere(shared_gateway: Gateway, mock: Mock) -> None:
    # Review of issue 18, D1: the custom tool's input streamed as custom_tool_call_input deltas
    # was redacted delta by delta, so an address split across two passed.
    pieces = ["send the report to jane.doe@exa", "mple.com, card 4242 4242 ", "4242 4242"]
    with sdk(shared_gateway, knobs(custom_tool_deltas=pieces)).responses.stream(model=MODEL, input="hi") as stream:
        events = list(stream)
        final = stream.get_final_response()
    expected = redact("".join(pieces))
    assert expected == "send the report to j***e@example.com, card CC_MASKED_LAST4_4242"
    assert "".join(e.delta for e in events if e.type == "response.custom_tool_call_input.delta") == expected
    assert [e.input for e in events if e.type == "response.custom_tool_call_input.done"] == [expected]
    item = final.output[-1]
    assert item.type == "custom_tool_call" and item.input == expected
    seen = "".join(e.model_dump_json(warnings=False) for e in events)
    assert "jane.doe@example.com" not in seen and "4242 4242 4242 4242" not in seen


def test_texts_of_every_item_type_and_prompt_variables_never_reach_the_upstream(
    shared_gateway: Gateway, mock: Mock
) -> None:
    # Review of issue 18, D2: custom tool calls and their outputs, shell and MCP items, a
    # stored prompt's variables and instructions given as items reached the upstream in clear.
    email, masked = "jane.doe@example.com", "j***e@example.com"
    sdk(shared_gateway).responses.create(
        model=MODEL,
        prompt={"id": "pmpt_1", "variables": {"customer": email, "note": {"type": "input_text", "text": email}}},
        input=[
            {"type": "custom_tool_call", "call_id": "c1", "name": "shell", "input": f"mail {email}"},
            {"type": "custom_tool_call_output", "call_id": "c1", "output": f"sent to {email}"},
            {"type": "local_shell_call_output", "id": "lsh_1", "output": email},
            {
                "type": "shell_call_output",
                "call_id": "c2",
                "output": [{"stdout": email, "stderr": "", "outcome": {"type": "exit", "exit_code": 0}}],
            },
            {
                "type": "mcp_call",
                "id": "mcp_1",
                "server_label": "crm",
                "name": "find",
                "arguments": f'{{"q": "{email}"}}',
                "output": email,
            },
        ],
        extra_body={"instructions": [{"role": "developer", "content": f"The user is {email}"}]},
    )
    [sent] = upstream_bodies(mock, RESPONSES)
    assert email not in json.dumps(sent)
    assert sent["prompt"] == {
        "id": "pmpt_1",
        "variables": {"customer": masked, "note": {"type": "input_text", "text": masked}},
    }
    assert sent["instructions"] == [{"role": "developer", "content": f"The user is {masked}"}]
    items = sent["input"]
    assert (items[0]["input"], items[0]["call_id"], items[1]["output"]) == (f"mail {masked}", "c1", f"sent to {masked}")
    assert items[2]["output"] == items[3]["output"][0]["stdout"] == items[4]["output"] == masked
    assert json.loads(items[4]["arguments"]) == {"q": masked}


def test_prompt_pii_never_reaches_the_upstream(shared_gateway: Gateway, mock: Mock) -> None:
    sdk(shared_gateway).responses.create(
        model=MODEL,
        instructions="You help jane.doe@example.com",
        input=[
            {"role": "user", "content": "my card is 4242 4242 4242 4242"},
            {
                "type": "message",
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "call +1 415 555 2671"},
                    {"type": "input_image", "image_url": "https://example.com/x.png"},
                ],
            },
            {"type": "function_call", "call_id": "c1", "name": "f", "arguments": '{"to": "jane.doe@example.com"}'},
            {"type": "function_call_output", "call_id": "c1", "output": "sent to jane.doe@example.com"},
        ],
        metadata={"ticket": "order 123456789012"},
    )
    [sent] = upstream_bodies(mock, RESPONSES)
    assert sent["instructions"] == "You help j***e@example.com"
    assert sent["input"][0]["content"] == "my card is CC_MASKED_LAST4_4242"
    assert sent["input"][1]["content"][0]["text"] == "call " + redact("+1 415 555 2671")
    assert sent["input"][1]["content"][1] == {"type": "input_image", "image_url": "https://example.com/x.png"}
    assert json.loads(sent["input"][2]["arguments"]) == {"to": "j***e@example.com"}
    assert sent["input"][3]["output"] == "sent to j***e@example.com"
    assert sent["metadata"] == {"ticket": "order 123456789012"}  # every other field as sent


async def test_with_redaction_off_nothing_after_the_terminal_event_is_relayed(
    start_gateway: GatewayFactory, mock: Mock
) -> None:
    # Review of issue 18, D3: an upstream's [DONE] after response.completed (in the same read)
    # went out on a route that has none, when the gateway did not redact.
    gateway = start_gateway(REDACT_KINDS="")
    status, _, wire = await post(
        gateway,
        RESPONSES,
        {"model": MODEL, "input": "hi", "stream": True},
        knobs(trailing_done="1", deltas=["a ", "b"]),
    )
    assert status == 200 and b"[DONE]" not in wire and wire.endswith(b"\n\n")
    assert sse_events(wire)[-1]["type"] == "response.completed" and streamed(sse_events(wire)) == "a b"


# --- Responses: bad input, errors -------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"[1, 2]", "invalid_request"),
        (b"not json", "invalid_json"),
        (b'{"input": "hi"}', "missing_model"),
        (b'{"model": "m", "input": 5}', "invalid_input"),
        (b'{"model": "m", "input": {"role": "user"}}', "invalid_input"),
        (b'{"model": "m", "input": null}', "invalid_input"),
    ],
)
async def test_bad_input_is_400_openai_shaped_and_never_reaches_the_upstream(
    shared_gateway: Gateway, mock: Mock, body: bytes, code: str
) -> None:
    status, headers, answer = await post(shared_gateway, RESPONSES, body)
    assert status == 400 and error_of(answer)["code"] == code and error_of(answer)["type"] == "invalid_request_error"
    assert headers["x-request-id"] and mock.requests() == []


def test_input_may_be_absent(shared_gateway: Gateway, mock: Mock) -> None:
    response = sdk(shared_gateway).responses.create(model=MODEL, previous_response_id="resp_earlier")
    assert response.output_text == DEFAULT_REPLY
    assert upstream_bodies(mock, RESPONSES) == [{"model": MODEL, "previous_response_id": "resp_earlier"}]


def test_logprobs_are_refused_while_redacting(shared_gateway: Gateway, mock: Mock) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        sdk(shared_gateway).responses.create(model=MODEL, input="hi", include=["message.output_text.logprobs"])
    assert caught.value.code == "logprobs_unavailable" and mock.requests() == []


async def test_upstream_dying_mid_stream_ends_with_a_responses_error_event(shared_gateway: Gateway, mock: Mock) -> None:
    status, _, wire = await post(
        shared_gateway,
        RESPONSES,
        {"model": MODEL, "input": "hi", "stream": True},
        knobs(deltas=["mail ", "jane.doe@example.com", " later"], die_after="2"),
    )
    assert status == 200
    events = sse_events(wire)
    error = events[-1]
    assert set(error) == {"type", "code", "message", "param", "sequence_number"} and error["type"] == "error"
    assert error["code"] == "upstream_stream_broken" and error["param"] is None
    assert error["sequence_number"] > events[-2]["sequence_number"]
    assert not any(e["type"] in TERMINAL for e in events)
    # The address was held (it could have gone on, ".com.au"): it goes out masked before the error.
    assert streamed(events) == "mail j***e@example.com"
    # The SDK hands the error on as the API's error event, and the gateway keeps serving.
    with sdk(shared_gateway, knobs(die_after="1")).responses.stream(model=MODEL, input="hi") as stream:
        kinds = [event.type for event in stream]
    assert kinds[-1] == "error"
    assert sdk(shared_gateway).responses.create(model=MODEL, input="hi").output_text == DEFAULT_REPLY


async def streamed_events(gateway: Gateway, **knob_values: str | list[str]) -> list[dict[str, Any]]:
    """The events of a plain stream request with the mock's knobs."""
    _, _, wire = await post(gateway, RESPONSES, {"model": MODEL, "input": "hi", "stream": True}, knobs(**knob_values))
    return sse_events(wire)


async def test_the_upstreams_own_error_event_is_relayed_after_the_held_text(
    shared_gateway: Gateway, mock: Mock
) -> None:
    events = await streamed_events(shared_gateway, deltas=["mail jane.doe@exa", "mple.com"], error_after="1")
    assert [e["type"] for e in events][-2:] == ["response.output_text.delta", "error"]
    assert events[-1]["code"] == "server_error" and streamed(events) == redact("mail jane.doe@exa")


async def test_a_stream_the_upstream_ends_before_its_terminal_event_ends_with_an_error_event(
    shared_gateway: Gateway, mock: Mock
) -> None:
    # The body ends cleanly, but with no response.completed (or .incomplete/.failed/error): a
    # reply cut short, told to the client as a broken stream (found by a black-box review).
    events = await streamed_events(shared_gateway, deltas=["mail ", "jane.doe@example.com"], no_done="1")
    assert events[-1]["type"] == "error" and events[-1]["code"] == "upstream_stream_broken"
    assert [e["type"] for e in events].count("error") == 1 and not any(e["type"] in TERMINAL for e in events)
    assert streamed(events) == "mail j***e@example.com"


@pytest.mark.parametrize(("upstream", "error"), [(429, openai.RateLimitError), (500, openai.InternalServerError)])
def test_upstream_errors_are_relayed(shared_gateway: Gateway, mock: Mock, upstream: int, error: type) -> None:
    with pytest.raises(error) as caught:
        sdk(shared_gateway, knobs(status=str(upstream))).responses.create(model=MODEL, input="hi")
    assert caught.value.status_code == upstream


def test_an_upstream_auth_failure_is_502(shared_gateway: Gateway, mock: Mock) -> None:
    with pytest.raises(openai.APIStatusError) as caught:
        sdk(shared_gateway, knobs(status="401")).responses.create(model=MODEL, input="hi")
    assert caught.value.status_code == 502 and caught.value.code == "upstream_auth_rejected"


async def test_client_disconnect_cancels_the_upstream(shared_gateway: Gateway, mock: Mock) -> None:
    body = {"model": MODEL, "input": "hi", "stream": True}
    async with aiohttp.ClientSession() as session:
        response = await session.post(
            shared_gateway.url + RESPONSES, json=body, headers=knobs(chunk_delay_ms="500", reply="a b c d e f g h")
        )
        await response.content.readline()  # the stream has started
        response.close()
    events = await asyncio.to_thread(wait_until, mock.events, 3.0, 0.02, "the upstream to see the disconnect")
    assert events[0]["event"] == "client_disconnected"


# --- Embeddings -------------------------------------------------------------------------


def test_embeddings_redact_input_strings_and_relay_the_vectors(shared_gateway: Gateway, mock: Mock) -> None:
    inputs = ["write to jane.doe@example.com", "order 123456789012 shipped"]
    result = sdk(shared_gateway).embeddings.create(model="text-embedding-3-small", input=inputs)
    assert [d.index for d in result.data] == [0, 1] and all(len(d.embedding) == 8 for d in result.data)
    assert result.usage.prompt_tokens == 6
    [sent] = upstream_bodies(mock, EMBEDDINGS)
    assert sent["input"] == ["write to j***e@example.com", "order 123456789012 shipped"]
    assert sent["encoding_format"] == "base64"  # the SDK's default: the base64 vectors came back intact


async def test_embeddings_of_token_arrays_pass_and_float_vectors_are_relayed(
    shared_gateway: Gateway, mock: Mock
) -> None:
    body = {"model": "text-embedding-3-small", "input": [[1, 2, 3], [4242, 4242, 4242, 4242]], "dimensions": 4}
    status, _, answer = await post(shared_gateway, EMBEDDINGS, body)
    assert status == 200
    reply = json.loads(answer)
    assert [len(d["embedding"]) for d in reply["data"]] == [4, 4] and reply["usage"]["prompt_tokens"] == 7
    assert upstream_bodies(mock, EMBEDDINGS)[0]["input"] == body["input"]


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"model": "m"}, "missing_input"),
        ({"input": "x"}, "missing_model"),
        ({"model": "m", "input": 5}, "invalid_input"),
        ({"model": "m", "input": [{"text": "jane@example.com"}]}, "invalid_input"),
    ],
)
async def test_embeddings_bad_input_is_400(
    shared_gateway: Gateway, mock: Mock, body: dict[str, Any], code: str
) -> None:
    status, _, answer = await post(shared_gateway, EMBEDDINGS, body)
    assert status == 400 and error_of(answer)["code"] == code and mock.requests() == []


async def test_embeddings_never_stream(shared_gateway: Gateway, mock: Mock) -> None:
    status, headers, answer = await post(shared_gateway, EMBEDDINGS, {"model": "m", "input": "hi", "stream": True})
    assert status == 200 and headers["content-type"].startswith("application/json") and json.loads(answer)["data"]


# --- The model list ---------------------------------------------------------------------


def test_models_list_is_the_upstreams(shared_gateway: Gateway, mock: Mock) -> None:
    ids = [model.id for model in sdk(shared_gateway, key="sk-client-secret").models.list()]
    assert ids == ["gpt-4o-mini", "gpt-4o", "text-embedding-3-small", "meta-llama/Llama-3-8B"]
    [seen] = [s for s in mock.requests() if s["path"] == MODELS]
    headers = {k.lower(): v for k, v in seen["headers"].items()}
    assert seen["method"] == "GET" and headers["authorization"] == "Bearer sk-upstream-secret"


async def test_models_needs_a_valid_key_in_keyed_mode_and_spends_no_quota(
    start_gateway: GatewayFactory, mock: Mock
) -> None:
    gateway = start_gateway(TENANT_KEYS="acme=sk-acme-1", DEFAULT_QUOTA="1", RPS="0.01", BURST="1")
    with pytest.raises(openai.AuthenticationError) as caught:
        sdk(gateway, key="sk-wrong").models.list()
    assert caught.value.status_code == 401 and caught.value.code == "invalid_api_key"
    async with aiohttp.ClientSession() as session:
        async with session.get(gateway.url + MODELS) as r:  # no key at all
            assert r.status == 401 and error_of(await r.read())["message"] == "invalid api key"
        assert mock.requests() == []
        for _ in range(5):  # past the burst and the quota: neither is spent
            async with session.get(gateway.url + MODELS, headers={"Authorization": "Bearer sk-acme-1"}) as r:
                assert r.status == 200 and "x-ratelimit-remaining-requests" not in r.headers
                assert len((await r.json())["data"]) == 4
    # The one token and the one request of the quota are still there.
    result = sdk(gateway, key="sk-acme-1").responses.with_raw_response.create(model=MODEL, input="hi")
    assert result.headers["x-ratelimit-remaining-requests"] == "0"
    with pytest.raises(openai.RateLimitError):
        sdk(gateway, key="sk-acme-1").embeddings.create(model="m", input="hi")


# --- One model (GET /v1/models/{model}) ------------------------------------------------------


@pytest.mark.parametrize("model", ["gpt-4o", "meta-llama/Llama-3-8B"])
def test_models_retrieve_is_the_upstreams(shared_gateway: Gateway, mock: Mock, model: str) -> None:
    # The SDK writes an id's "/" as %2F; it goes upstream as it came, one segment.
    got = sdk(shared_gateway, key="sk-client-secret").models.retrieve(model)
    assert (got.id, got.object, got.owned_by) == (model, "model", "openai")
    [seen] = [s for s in mock.requests() if s["path"].startswith(MODELS + "/")]
    headers = {k.lower(): v for k, v in seen["headers"].items()}
    assert seen["path"] == f"{MODELS}/{model}" and headers["authorization"] == "Bearer sk-upstream-secret"


def test_models_retrieve_of_an_unknown_model_is_the_upstreams_404(shared_gateway: Gateway, mock: Mock) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        sdk(shared_gateway).models.retrieve("gpt-nope")
    assert caught.value.code == "model_not_found"
    # An id of dot segments would leave /v1/models/ upstream: it names no model. (Sent as written:
    # aiohttp's client would resolve them.)
    status, answer = http_get(shared_gateway.port, MODELS + "/%2E%2E")
    assert status == 404 and error_of(answer)["code"] == "model_not_found"
    status, answer = http_get(shared_gateway.port, MODELS + "/..%2Fchat%2Fcompletions")  # one segment upstream
    assert status == 404 and error_of(answer)["code"] == "model_not_found"
    assert [s["path"] for s in mock.requests()] == [MODELS + "/gpt-nope", MODELS + "/../chat/completions"]


async def test_models_retrieve_needs_a_valid_key_in_keyed_mode_and_spends_no_quota(
    start_gateway: GatewayFactory, mock: Mock
) -> None:
    gateway = start_gateway(TENANT_KEYS="acme=sk-acme-1", DEFAULT_QUOTA="1", RPS="0.01", BURST="1")
    with pytest.raises(openai.AuthenticationError) as caught:
        sdk(gateway, key="sk-wrong").models.retrieve("gpt-4o")
    assert caught.value.status_code == 401 and mock.requests() == []
    for _ in range(5):  # past the burst and the quota: neither is spent
        assert sdk(gateway, key="sk-acme-1").models.retrieve("gpt-4o").id == "gpt-4o"
    result = sdk(gateway, key="sk-acme-1").responses.with_raw_response.create(model=MODEL, input="hi")
    assert result.headers["x-ratelimit-remaining-requests"] == "0"
    s = samples(gateway)
    assert s['requests_total{route="/v1/models/{model}"}'] == 6


@pytest.mark.parametrize(("upstream", "status"), [(401, 502), (403, 502), (500, 500), (429, 429)])
async def test_models_upstream_failures(shared_gateway: Gateway, mock: Mock, upstream: int, status: int) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.get(shared_gateway.url + MODELS, headers=knobs(status=str(upstream))) as r,
    ):
        assert r.status == status and error_of(await r.read())["message"]


def test_models_timeout_is_504(start_gateway: GatewayFactory, mock: Mock) -> None:
    gateway = start_gateway(TIMEOUT_SECS="0.5")
    with pytest.raises(openai.APIStatusError) as caught:
        sdk(gateway, knobs(latency_ms="2000")).models.list()
    assert caught.value.status_code == 504 and caught.value.message.endswith("upstream timed out")


# --- Admission, usage, metrics ------------------------------------------------------------


def test_usage_feeds_tokens_total_and_the_routes_are_labelled(start_gateway: GatewayFactory, mock: Mock) -> None:
    gateway = start_gateway()
    client = sdk(gateway, knobs(reply="a b c d e"))
    assert client.responses.create(model="resp-json", input="hi").usage.output_tokens == 5  # type: ignore[union-attr]
    with client.responses.stream(model="resp-stream", input="hi") as stream:
        assert stream.get_final_response().usage.output_tokens == 5  # type: ignore[union-attr]
    client.embeddings.create(model="embed-model", input=["one two", "three"])
    client.models.list()
    s = samples(gateway)
    for model in ("resp-json", "resp-stream"):
        assert s[f'tokens_total{{kind="prompt",model="{model}"}}'] == 9
        assert s[f'tokens_total{{kind="completion",model="{model}"}}'] == 5
        assert s[f'http_requests_total{{model="{model}",route="/v1/responses",status="200"}}'] == 1
    assert s['tokens_total{kind="prompt",model="embed-model"}'] == 3
    assert s['http_requests_total{model="embed-model",route="/v1/embeddings",status="200"}'] == 1
    assert s['requests_total{route="/v1/responses"}'] == 2 and s['requests_total{route="/v1/models"}'] == 1
    assert s['requests_total{route="/v1/embeddings"}'] == 1
    lines = wait_until(lambda: [e for e in gateway.log_lines() if e["path"] == MODELS], what="a log line")
    assert lines[0]["status"] == 200


async def test_the_quota_is_shared_by_every_route(start_gateway: GatewayFactory, mock: Mock) -> None:
    gateway = start_gateway(DEFAULT_QUOTA="3")
    client = sdk(gateway, key="shared")
    await asyncio.to_thread(client.responses.create, model=MODEL, input="hi")
    await asyncio.to_thread(client.embeddings.create, model="m", input="hi")
    await asyncio.to_thread(client.chat.completions.create, model=MODEL, messages=[{"role": "user", "content": "hi"}])
    for call in (
        lambda: client.responses.create(model=MODEL, input="hi"),
        lambda: client.embeddings.create(model="m", input="hi"),
    ):
        with pytest.raises(openai.RateLimitError) as caught:
            await asyncio.to_thread(call)
        assert caught.value.message.endswith("quota exceeded (limit=3)")
    assert len(mock.requests()) == 3


async def test_token_budgets_reserve_max_output_tokens_and_embeddings_their_text(
    start_gateway: GatewayFactory, mock: Mock
) -> None:
    gateway = start_gateway(TOKEN_QUOTA="1000")
    # "ping" is 1 token, plus max_output_tokens 20: 21 held; the reply's usage (9 + 1) settles it.
    body = {"model": MODEL, "input": "ping", "max_output_tokens": 20}
    status, headers, _ = await post(gateway, RESPONSES, body, {"X-Api-Key": "t", **knobs(deltas=["a"])})
    assert status == 200 and int(headers["x-ratelimit-remaining-tokens"]) == 1000 - 21
    # Embeddings reserve their text only: "ping pong" is 9 characters, 3 tokens; used: 10 + 3.
    status, headers, _ = await post(gateway, EMBEDDINGS, {"model": "m", "input": "ping pong"}, {"X-Api-Key": "t"})
    assert status == 200 and int(headers["x-ratelimit-remaining-tokens"]) == 1000 - 10 - 3


@pytest.mark.parametrize("stream", [False, True])
def test_structured_output_is_redacted_as_json(shared_gateway: Gateway, stream: bool) -> None:
    client = sdk(shared_gateway, knobs(reply=STRUCTURED))
    if stream:
        with client.responses.stream(model=MODEL, input="hi", text_format=Contact) as events:
            done = [event.text for event in events if event.type == "response.output_text.done"]
            final = events.get_final_response()
        assert [json.loads(text) for text in done] == [json.loads(final.output_text)]
    else:
        final = client.responses.parse(model=MODEL, input="hi", text_format=Contact)
    assert final.output_parsed == REDACTED
