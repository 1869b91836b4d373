"""Review of SPEC §11/§12 against upstreams that write the wire as the real APIs do: the gateway
in process, in front of a hostile upstream (tests/test_adversarial.py's fixtures)."""

from __future__ import annotations

import anthropic
import pytest

from tests.test_adversarial import (  # noqa: F401  (fixtures)
    EMAIL,
    Gateway,
    Hostile,
    events_answer,
    gateway,
    hostile,
    start,
)

# Anthropic's stream as its API writes it (captured): `{"type": "ping"}` with a space, and the
# other events padded with spaces before their last brace, so that an event's length says
# nothing about its text. Nothing here needs redaction.
ANTHROPIC_WIRE = [
    b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_01","type":"message",'
    b'"role":"assistant","model":"claude-3-5-sonnet-20240620","content":[],"stop_reason":null,'
    b'"stop_sequence":null,"usage":{"input_tokens":10,"output_tokens":3}}  }\n\n',
    b'event: content_block_start\ndata: {"type":"content_block_start","index":0,'
    b'"content_block":{"type":"text","text":""}     }\n\n',
    b'event: ping\ndata: {"type": "ping"}\n\n',
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
    b'"delta":{"type":"text_delta","text":"Hello there! "}               }\n\n',
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
    b'"delta":{"type":"text_delta","text":"Fine, thanks! "}}\n\n',
    b'event: content_block_stop\ndata: {"type":"content_block_stop","index":0             }\n\n',
    b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"end_turn",'
    b'"stop_sequence":null},"usage":{"output_tokens":12}       }\n\n',
    b'event: message_stop\ndata: {"type":"message_stop"       }\n\n',
]


async def test_anthropics_own_spacing_passes_byte_for_byte(gateway: Gateway, hostile: Hostile) -> None:  # noqa: F811
    # SPEC §11: unchanged events byte for byte. They were written compact, the padding that
    # hides each event's length stripped ({"type": "ping"} came out as {"type":"ping"}).
    hostile.answer = events_answer(*ANTHROPIC_WIRE)
    status, wire = await gateway.messages({"stream": True})
    assert status == 200
    assert wire == b"".join(ANTHROPIC_WIRE)


async def test_a_padded_event_whose_text_changes_is_written_from_its_parse(
    gateway: Gateway,  # noqa: F811
    hostile: Hostile,  # noqa: F811
) -> None:
    # The events around it still pass as they came; a repeated key is never relayed raw.
    masked = ANTHROPIC_WIRE[3].replace(b"Hello there! ", b"Mail " + EMAIL.encode() + b" ")
    twice = ANTHROPIC_WIRE[4].replace(b"}}\n\n", b'},"delta":{"type":"text_delta","text":"x"}  }\n\n')
    hostile.answer = events_answer(*ANTHROPIC_WIRE[:3], masked, twice, *ANTHROPIC_WIRE[5:])
    status, wire = await gateway.messages({"stream": True})
    assert status == 200
    assert EMAIL.encode() not in wire and b"j***e@example.com" in wire
    assert b"".join(ANTHROPIC_WIRE[:3]) in wire and b"".join(ANTHROPIC_WIRE[5:]) in wire
    assert b"Fine, thanks! " not in wire  # the repeated key: what the gateway parsed ("x"), written compact


@pytest.mark.parametrize("spacing", [b"", b"   "])
async def test_the_sdk_reads_the_padded_stream(gateway: Gateway, hostile: Hostile, spacing: bytes) -> None:  # noqa: F811
    hostile.answer = events_answer(*(event.replace(b"  }\n\n", spacing + b"}\n\n") for event in ANTHROPIC_WIRE))
    client = anthropic.AsyncAnthropic(
        base_url=str(gateway.client.make_url("")), api_key="demo", http_client=None, max_retries=0
    )
    async with client.messages.stream(model="claude", max_tokens=10, messages=[{"role": "user", "content": "hi"}]) as s:
        message = await s.get_final_message()
    assert [block.text for block in message.content if block.type == "text"] == ["Hello there! Fine, thanks! "]
