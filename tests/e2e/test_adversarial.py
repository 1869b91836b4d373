"""Adversarial review against the real gateway process (issues 15-17): hostile prompts while
/healthz is watched, hostile model names and /metrics, hostile headers and keys, bad start-up
values, and secrets looked for in everything the process writes.

A test marked xfail(strict=True) is a defect found by this review (its reason names the SPEC
clause); the rest are defences that held, kept as regression tests. Timings are not asserted
as performance: the /healthz bounds below are SPEC §6's own (100 ms) where a defect makes it
miss by a second or more, and a generous bound where the defence holds (a shared 2-core
machine must not make the suite flaky); the figures are printed for the report (-s).
"""

from __future__ import annotations

import contextlib
import gzip
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ..conftest import GatewayFactory
from ..harness import ROOT, Gateway, Mock, base_env, http_get, wait_until

CHAT = "/v1/chat/completions"
MESSAGES = "/v1/messages"
UPSTREAM_SECRETS = ("sk-upstream-secret", "sk-ant-upstream-secret")
MIB = 1024 * 1024


def post(gateway: Gateway, path: str, body: object, **headers: str) -> tuple[int, dict[str, str], bytes]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=30)
    try:
        conn.request("POST", path, body=data, headers={"Content-Type": "application/json", **headers})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


@contextmanager
def healthz_watch(gateway: Gateway) -> Iterator[list[float]]:
    """/healthz asked every ~20 ms on a fresh connection while the block runs: each answer's
    latency, in seconds (a request still waiting when the block ends counts too)."""
    latencies: list[float] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            began = time.perf_counter()
            status, _ = http_get(gateway.port, "/healthz", timeout=30)
            latencies.append(time.perf_counter() - began)
            assert status == 200
            stop.wait(0.02)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield latencies
    finally:
        stop.set()
        thread.join(35)


def parses(metrics: str) -> set[str]:
    """The metric family names of /metrics as Prometheus reads it (raises if it cannot)."""
    return {family.name for family in text_string_to_metric_families(metrics)}


# --- 1. Hostile prompts: linear cost, and the gateway keeps serving (SPEC §6) ---------------

PROMPT_UNITS = ["4242 ", "AB12 ", "@a.b", "+1 ("]  # digits alone: tests/test_redact_adversarial.py


@pytest.mark.serial  # asserts a time: run alone, not beside another worker
@pytest.mark.parametrize("unit", PROMPT_UNITS)
def test_an_8_mib_hostile_prompt_leaves_healthz_answering(shared_gateway: Gateway, mock: Mock, unit: str) -> None:
    text = unit * ((8 * MIB - 200) // len(unit))
    body = {"model": "m", "messages": [{"role": "user", "content": text}]}
    began = time.perf_counter()
    with healthz_watch(shared_gateway) as latencies:
        status, _, data = post(shared_gateway, CHAT, body)
    took = time.perf_counter() - began
    print(f"\n{unit!r}: 8 MiB in {took:.2f} s, /healthz worst {max(latencies) * 1000:.0f} ms of {len(latencies)}")
    assert status == 200, data[:300]
    assert max(latencies) < 0.25  # SPEC's 100 ms, with room for a loaded machine
    assert took < 30  # hang guard: "about a second per MiB" is measured above, not asserted


def many_texts(route: str) -> dict[str, Any]:
    """~8 MiB of distinct texts each just under the length past which the proxy yields
    (redact.py YIELD_ABOVE_CHARS = 16384): each is redacted in one go, and so are all of them."""
    texts = [f"{i:06d} " + "4242 " * 3198 for i in range(500)]
    if route == CHAT:
        return {"model": "m", "messages": [{"role": "user", "content": t} for t in texts]}
    block = {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {"notes": texts}}
    return {"model": "claude", "max_tokens": 5, "messages": [{"role": "assistant", "content": [block]}]}


@pytest.mark.serial  # asserts a time: run alone, not beside another worker
@pytest.mark.parametrize("route", [CHAT, MESSAGES])
def test_8_mib_of_many_texts_leaves_healthz_answering(shared_gateway: Gateway, mock: Mock, route: str) -> None:
    with healthz_watch(shared_gateway) as latencies:
        status, _, data = post(shared_gateway, route, many_texts(route))
    print(f"\n{route}: many texts, /healthz worst {max(latencies) * 1000:.0f} ms")
    assert status == 200, data[:300]
    assert max(latencies) < 0.1


@pytest.mark.serial  # asserts a time: run alone, not beside another worker
def test_six_hostile_bodies_at_once_leave_healthz_answering(shared_gateway: Gateway) -> None:
    """Six bodies of 150,000 tiny messages each (5.4 MiB, refused as too complex) sent
    together: each one's structure count ran in a worker thread, and the event loop waited
    Python's 5 ms for the GIL at each poll; /healthz took 250-520 ms. Now ~75-85 ms here."""
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "ab cd"}] * 150_000}).encode()
    statuses: list[int] = []

    def send() -> None:
        statuses.append(post(shared_gateway, CHAT, body)[0])

    with healthz_watch(shared_gateway) as latencies:
        senders = [threading.Thread(target=send) for _ in range(6)]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join(60)
    print(f"\nsix hostile bodies at once: /healthz worst {max(latencies) * 1000:.0f} ms of {len(latencies)}")
    assert statuses == [400] * 6
    assert max(latencies) < 0.2  # SPEC's 100 ms, with room for a loaded machine


def cpu_secs(gateway: Gateway) -> float:
    """User and system CPU time of the gateway process so far."""
    fields = Path(f"/proc/{gateway.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_hostile_bodies_from_clients_that_leave_at_once_leave_healthz_answering(start_gateway: GatewayFactory) -> None:
    """Three clients sending the hostile body above again and again, each closing its
    connection as soon as its body is out: a cancelled request gave up its turn to count while
    its thread still counted, so the counts ran side by side, as many as clients had left
    (/healthz median 380-455 ms). Now the turn is held until the thread is done, and a request
    whose client left while it waited for the turn never counts (median 55-105 ms, reading the
    bodies included)."""
    gateway = start_gateway()
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "ab cd"}] * 150_000}).encode()
    head = b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (CHAT.encode(), len(body))
    done = threading.Event()

    def send_and_leave() -> None:
        while not done.is_set():
            with socket.create_connection(("127.0.0.1", gateway.port), timeout=30) as sock:
                sock.sendall(head + body)
                done.wait(0.01)

    with healthz_watch(gateway) as latencies:
        senders = [threading.Thread(target=send_and_leave) for _ in range(3)]
        for sender in senders:
            sender.start()
        wait_until(lambda: len(latencies) >= 20, timeout=30, what="20 answers from /healthz")
        done.set()
        for sender in senders:
            sender.join(30)
    median = sorted(latencies)[len(latencies) // 2]
    print(f"\nclients leaving after hostile bodies: /healthz median {median * 1000:.0f} ms of {len(latencies)}")
    assert median < 0.2


def test_gzip_bombs_sent_again_and_again_leave_healthz_answering(start_gateway: GatewayFactory) -> None:
    """9 KiB of gzip that inflates past the 8 MiB limit (413): ~30 ms of inflating each, on the
    event loop, and three clients sending them back to back held /healthz ~150 ms (median).
    Now inflated in a worker thread, one at a time (zlib lets go of the GIL): a few ms."""
    gateway = start_gateway()
    bomb = gzip.compress(b'{"model": "m", "messages": [{"role": "user", "content": "' + b"a" * 9 * MIB + b'"}]}')
    request = (
        b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n"
        % (CHAT.encode(), len(bomb))
        + bomb
    )
    done = threading.Event()
    statuses: list[bytes] = []

    def send_again_and_again() -> None:
        with socket.create_connection(("127.0.0.1", gateway.port), timeout=30) as sock:
            while not done.is_set():
                sock.sendall(request)
                statuses.append(sock.recv(65536)[:12])  # each answer is one small packet

    with healthz_watch(gateway) as latencies:
        senders = [threading.Thread(target=send_again_and_again) for _ in range(3)]
        for sender in senders:
            sender.start()
        wait_until(lambda: len(latencies) >= 40, timeout=30, what="40 answers from /healthz")
        done.set()
        for sender in senders:
            sender.join(30)
    median = sorted(latencies)[len(latencies) // 2]
    print(f"\n{len(statuses)} gzip bombs: /healthz median {median * 1000:.0f} ms, worst {max(latencies) * 1000:.0f} ms")
    assert set(statuses) == {b"HTTP/1.1 413"}
    assert median < 0.05


TINY_VALUES = {
    "arrays": b",".join([b"[]"] * (8 * MIB // 3 - 100)),
    "objects": b",".join([b"{}"] * (8 * MIB // 3 - 100)),
    "numbers": b",".join([b"1"] * (8 * MIB // 2 - 100)),
    # Under the 2,000,000 values once allowed: /healthz held 126-143 ms by orjson's parse.
    "strings": b",".join([b'"a"'] * 1_999_000),
}


@pytest.mark.serial  # asserts a time: run alone, not beside another worker
@pytest.mark.parametrize("route", ["/v1/embeddings", CHAT])
@pytest.mark.parametrize("values", sorted(TINY_VALUES))
def test_8_mib_of_tiny_values_is_refused_at_once_and_healthz_answers(
    shared_gateway: Gateway, route: str, values: str
) -> None:
    """Millions of tiny JSON values took 0.4-1.6 s to parse and check, holding the event loop
    (orjson keeps the GIL): /healthz waited as long. Now refused (400) before they are parsed."""
    field = b'"input"' if route != CHAT else b'"messages"'
    body = b'{"model":"m",' + field + b":[" + TINY_VALUES[values] + b"]}"
    with healthz_watch(shared_gateway) as latencies:
        status, _, data = post(shared_gateway, route, body)
    print(f"\n{values} on {route}: /healthz worst {max(latencies) * 1000:.0f} ms of {len(latencies)}")
    assert status == 400 and json.loads(data)["error"]["code"] == "body_too_complex", data[:300]
    assert max(latencies) < 0.1


def test_a_prompt_of_json_text_is_not_too_complex(shared_gateway: Gateway, mock: Mock) -> None:
    """Its brackets and commas, by the hundred thousand, are text inside one string."""
    text = '{"n": [1, 2], "ok": true}, ' * 50_000
    status, _, data = post(shared_gateway, CHAT, {"model": "m", "messages": [{"role": "user", "content": text}]})
    assert status == 200, data[:300]
    assert mock.requests()[-1]["body"]["messages"][0]["content"] == text


@pytest.mark.serial  # asserts a time: run alone, not beside another worker
def test_a_hostile_stream_prompt_on_messages_is_masked_and_served(shared_gateway: Gateway, mock: Mock) -> None:
    text = "4242 4242 4242 4242 jane.doe@example.com " * (2 * MIB // 40)
    body = {"model": "claude", "max_tokens": 5, "stream": True, "messages": [{"role": "user", "content": text}]}
    with healthz_watch(shared_gateway) as latencies:
        status, headers, data = post(shared_gateway, MESSAGES, body)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    assert b"event: message_stop" in data
    [seen] = mock.requests()
    sent = json.dumps(seen["body"])
    assert "jane.doe@example.com" not in sent and "4242 4242 4242 4242" not in sent
    assert max(latencies) < 0.25


# The costliest texts to scan (bench/redaction.py): 2 MiB of each held /healthz 0.4-2.6 s before.
@pytest.mark.serial  # asserts a time: run alone, not beside another worker
@pytest.mark.parametrize("unit", ["4242 4242 4242 4241 ", "AB12 ", "+1 ("])
def test_a_2_mib_json_reply_leaves_healthz_answering(shared_gateway: Gateway, mock: Mock, unit: str) -> None:
    """The reply is redacted as the prompt is: a big upstream reply (here the mock echoing a
    4 MiB prompt) must not hold every other client up while it is scanned (SPEC §6: the
    gateway keeps serving others; a black-box review saw /healthz wait ~0.9 s for 4 MiB,
    and over 10 s for a 15 MiB reply of card-like groups)."""
    text = unit * ((2 * MIB) // len(unit))
    body = {"model": "m", "messages": [{"role": "user", "content": text}]}
    with healthz_watch(shared_gateway) as latencies:
        status, _, data = post(shared_gateway, CHAT, body, **{"x-stainless-mock-echo": "1"})
    print(f"\n{unit!r}: 2 MiB reply, /healthz worst {max(latencies) * 1000:.0f} ms of {len(latencies)}")
    assert status == 200, data[:300]
    content = json.loads(data)["choices"][0]["message"]["content"]
    assert len(content) > MIB
    assert max(latencies) < 0.25  # SPEC's 100 ms, with room for a loaded machine


# --- 2. Hostile model names and /metrics (SPEC §7) ------------------------------------------

HOSTILE_MODELS = [
    'a"b',
    'x"} 1\nevil_metric{a="b',
    "a\\",
    "line\nbreak",
    "é" * 10,
    "m" * 65,
    "m" * 100_000,
    "\u2028",
    "ok-model",
    "a b",
    "{}",
]


def test_metrics_parse_after_hostile_model_names_on_every_route(start_gateway: GatewayFactory, mock: Mock) -> None:
    gateway = start_gateway(TENANT_KEYS="acme=sk-acme-1", MAX_BODY_BYTES="200000")
    key = {"X-Api-Key": "sk-acme-1"}
    baseline = parses(gateway.metrics())
    for model in HOSTILE_MODELS:
        chat = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
        claude = {"model": model, "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
        outcomes = [
            post(gateway, CHAT, chat, **key)[0],
            post(gateway, MESSAGES, claude, **key)[0],
            post(gateway, CHAT, {**chat, "stream": True}, **key)[0],
            post(gateway, MESSAGES, {**claude, "stream": True}, **key)[0],
            post(gateway, CHAT, chat, **{"X-Api-Key": "wrong"})[0],  # 401
            post(gateway, CHAT, {**chat, "messages": "x"}, **key)[0],  # 400
            post(gateway, CHAT, {**chat, "logprobs": True}, **key)[0],  # 400 logprobs_unavailable
        ]
        assert outcomes[4] == 401 and outcomes[5] == 400 and outcomes[6] == 400, (model[:20], outcomes)
        families = parses(gateway.metrics())
        assert families <= baseline | {"tokens"}, families - baseline
    text = gateway.metrics()
    assert "evil_metric" not in text and "é" not in text and "m" * 65 not in text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            label = sample.labels.get("model")
            assert label is None or label in ("ok-model", "other", "unknown"), label


# --- 3. Hostile headers and keys (SPEC §4, §5) ----------------------------------------------


def test_client_headers_the_upstream_must_not_see(shared_gateway: Gateway, mock: Mock) -> None:
    hidden = {
        "Authorization": "Bearer client-secret-1",
        "api-key": "client-secret-2",
        "Cookie": "session=client-secret-3",
        "OpenAI-Organization": "org-client",
        "OpenAI-Project": "proj-client",
        "X-Forwarded-For": "10.9.9.9",
        "Forwarded": "for=10.9.9.9",
        "X-Real-IP": "10.9.9.9",
        "Proxy-Authorization": "Basic client-secret-4",
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "X-Amz-Security-Token": "client-secret-5",
        "Anthropic-Dangerous-Direct-Browser-Access": "true",
    }
    passed = {"OpenAI-Beta": "assistants=v2", "Idempotency-Key": "idem-1", "X-Stainless-Lang": "python"}
    for path, body in (
        (CHAT, {"model": "m", "messages": [{"role": "user", "content": "hi"}]}),
        (MESSAGES, {"model": "claude", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}),
    ):
        mock.forget()
        status, _, _ = post(shared_gateway, path, body, **hidden, **passed)
        assert status == 200
        [seen] = mock.requests()
        headers = {k.lower(): v for k, v in seen["headers"].items()}
        for name, value in hidden.items():
            assert value not in json.dumps(headers), name
        for name, value in passed.items():
            assert headers.get(name.lower()) == value
        assert headers.get("content-type") == "application/json"
        if path == CHAT:
            assert headers["authorization"] == "Bearer sk-upstream-secret"
        else:
            assert headers["x-api-key"] == "sk-ant-upstream-secret" and "authorization" not in headers


def raw_request(gateway: Gateway, head: bytes, body: bytes = b"", wait: float = 5.0) -> bytes:
    """Bytes on a socket, and whatever comes back until the server closes or goes quiet."""
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=wait) as sock:
        sock.sendall(head + body)
        out = b""
        try:
            while chunk := sock.recv(65536):
                out += chunk
                if b"\r\n\r\n" in out and out.split(b"\r\n\r\n", 1)[1].rstrip().endswith(b"}"):
                    break
        except TimeoutError:
            pass
        return out


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({"X-Api-Key": "k" * 257}, 401),
        ({"X-Api-Key": "k" * 256}, 200),
        ({"Authorization": "Bearer " + "k" * 257}, 401),
        ({"X-Api-Key": "kéy"}, 401),
        ({"Authorization": "Bearer \ttoken\t"}, 200),
    ],
    ids=["257-bytes", "256-bytes", "bearer-257", "non-ascii", "tabs"],
)
def test_hostile_keys(shared_gateway: Gateway, mock: Mock, headers: dict[str, str], status: int) -> None:
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items()).encode("utf-8")
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
    out = raw_request(
        shared_gateway,
        b"POST "
        + CHAT.encode()
        + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + head
        + b"Content-Length: "
        + str(len(body)).encode()
        + b"\r\nConnection: close\r\n\r\n",
        body,
    )
    assert out.startswith(b"HTTP/1.1 %d" % status), out[:200]
    if status == 401:
        assert b'"invalid api key"' in out and not mock.requests()


@pytest.mark.xfail(
    strict=True,
    reason="SPEC §4/§10 (a keyed-mode key never reaches errors) and §9 (errors are OpenAI-shaped "
    "JSON): a key header with one byte aiohttp's parser refuses (a stray CR from a CRLF key file, "
    "NUL, DEL) gets aiohttp's own plain-text 400 echoing the header line to the client that sent "
    "it; aiohttp has no public hook for that answer. The log side holds: server.py's filter "
    "drops the bytes and the traceback 'aiohttp.server' would log",
)
def test_a_key_with_a_byte_the_parser_refuses_is_not_echoed_or_logged(
    start_gateway: GatewayFactory, mock: Mock
) -> None:
    gateway = start_gateway(TENANT_KEYS="acme=sk-acme-secret-1")
    answers = [
        raw_request(
            gateway,
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Api-Key: sk-acme-secret-1"
            + tail
            + b"\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
        )
        for tail in (b"\r", b"\x00", b"\x7f")  # a CRLF key file, NUL, DEL
    ]
    gateway.stop()
    for out in answers:
        assert out.split(b" ", 2)[1].startswith(b"4"), out[:100]  # refused, as it must be ...
        assert b"sk-acme-secret" not in out  # ... but without the key in the answer
    assert "sk-acme-secret" not in gateway.process.errors() + gateway.process.output()
    assert all(json.loads(out.split(b"\r\n\r\n", 1)[1])["error"]["code"] for out in answers)


def test_expect_100_continue_with_a_body_over_the_limit_is_refused_unread(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway(MAX_BODY_BYTES="1000")
    out = raw_request(
        gateway,
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100000000\r\nExpect: 100-continue\r\nX-Api-Key: demo\r\n\r\n",
    )
    assert b"HTTP/1.1 413" in out, out[:300]
    assert b"request_too_large" in out
    assert http_get(gateway.port, "/healthz")[0] == 200


def test_duplicate_key_headers_name_one_tenant(start_gateway: GatewayFactory, mock: Mock) -> None:
    gateway = start_gateway(TENANT_KEYS="acme=sk-acme-1")
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n"
        b"X-Api-Key: wrong\r\nX-Api-Key: sk-acme-1\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n"
    )
    out = raw_request(gateway, head, body)
    assert out.startswith(b"HTTP/1.1 401"), out[:100]  # the first one counts, as everywhere else
    assert not mock.requests()


@pytest.mark.serial  # asserts a time (/healthz within 100 ms): run alone, not beside another worker
def test_a_long_forwarded_for_list_leaves_healthz_answering(start_gateway: GatewayFactory, mock: Mock) -> None:
    """A client inside a trusted network (TRUSTED_PROXIES=10.0.0.0/8, as .env.example has it)
    sends 120 X-Forwarded-For lines of trusted addresses, ~1 MB: every hop was parsed and
    checked, ~0.5 s of event loop per request, and /healthz waited as long."""
    gateway = start_gateway(TRUSTED_PROXIES="127.0.0.1,10.0.0.0/8")
    hops = ("10.0.0.7," * 1000)[:8000].encode()
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n"
        + b"".join(b"X-Forwarded-For: " + hops + b"\r\n" for _ in range(120))
        + b"Content-Length: %d\r\n\r\n" % len(body)
    )
    answers = []
    with healthz_watch(gateway) as latencies:
        deadline = time.monotonic() + 30
        while len(latencies) < 10 and time.monotonic() < deadline:  # requests until /healthz was asked 10 times
            answers.append(raw_request(gateway, head, body, wait=30))
    print(f"\n{len(answers)} requests of 120 forwarded-for lines: /healthz worst {max(latencies) * 1000:.0f} ms")
    assert all(out.startswith(b"HTTP/1.1 200") for out in answers), answers[0][:200]
    assert max(latencies) < 0.1


@pytest.mark.serial  # asserts a time (/healthz within 100 ms): run alone, not beside another worker
def test_a_body_sent_a_byte_a_chunk_is_refused_before_it_holds_the_loop(start_gateway: GatewayFactory) -> None:
    """8 MiB sent as chunks of one byte (50 MB on the wire): aiohttp parses each chunk in
    ~1.2 µs on the event loop, ~10 s for the body, and the request was served after it while
    /healthz waited 100-200 ms at every turn. Now refused past MAX_BODY_CHUNKS (400, the
    connection closed, the rest unread) within milliseconds."""
    gateway = start_gateway()
    text = b"a" * (8 * MIB - 300)
    payload = b'{"model": "m", "messages": [{"role": "user", "content": "' + text + b'"}]}'
    wire = b"".join(b"1\r\n%c\r\n" % byte for byte in payload) + b"0\r\n\r\n"
    head = b"POST %s HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" % CHAT.encode()

    def send() -> None:
        # The gateway hangs up before the end: sendall fails.
        with socket.create_connection(("127.0.0.1", gateway.port), timeout=60) as sock, contextlib.suppress(OSError):
            sock.sendall(head + wire)

    with healthz_watch(gateway) as latencies:
        sender = threading.Thread(target=send)
        sender.start()
        sender.join(60)
        line = wait_until(
            lambda: next((line for line in gateway.log_lines() if line["path"] == CHAT), None),
            timeout=60,
            what="the request's log line",
        )
    took, worst = line["duration_ms"], max(latencies) * 1000
    print(f"\n8 MiB a byte a chunk: {line['status']} in {took:.0f} ms, /healthz worst {worst:.0f} ms")
    assert line["status"] == 400 and took < 1000
    assert max(latencies) < 0.1
    assert http_get(gateway.port, "/healthz")[0] == 200


def test_a_stream_client_that_stops_reading_gives_its_slot_back(start_gateway: GatewayFactory, mock: Mock) -> None:
    """A client that asks for a long stream and never reads it: the gateway's writes waited for
    it for ever, holding the stream's MAX_CONCURRENCY slot (every other client got 503 for as
    long as the connection stayed open) and its upstream. Now a client that takes no bytes for
    CLIENT_IDLE_SECS is cut, as one that hung up; one that reads slowly but steadily is not."""
    gateway = start_gateway(MAX_CONCURRENCY="2", CLIENT_IDLE_SECS="2", STREAM_IDLE_SECS="2")

    def open_stream(key: str, words: int) -> socket.socket:
        body = json.dumps({"model": "m", "stream": True, "messages": [{"role": "user", "content": "word " * words}]})
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the kernel holds little for it
        sock.connect(("127.0.0.1", gateway.port))
        sock.sendall(
            b"POST %s HTTP/1.1\r\nHost: x\r\nX-Api-Key: %s\r\nX-Stainless-Mock-Echo: 1\r\nConnection: close\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (CHAT.encode(), key.encode(), len(body), body.encode())
        )
        return sock

    slow_phase_over = threading.Event()

    def read_slowly_then_all(sock: socket.socket, tail: list[bytes]) -> None:
        with sock:
            slow_until = time.monotonic() + 10  # five times CLIENT_IDLE_SECS
            while time.monotonic() < slow_until:
                sock.recv(65536)  # what the kernel holds for it (~4-8 KiB), three times a second
                time.sleep(0.3)
            slow_phase_over.set()
            # Then read at speed: a window below the loopback's MSS (64 KiB) is filled by
            # zero-window probes only, one every RTO (~20 KB/s), once the gateway closed its end.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            while data := sock.recv(1 << 20):
                tail[:] = [(tail[0] if tail else b"")[-100:] + data]

    tail: list[bytes] = []
    with open_stream("reads-nothing", 300_000):  # ... and never a recv
        steady = threading.Thread(target=read_slowly_then_all, args=(open_stream("reads-slowly", 100_000), tail))
        steady.start()
        lines = gateway.metrics().splitlines
        wait_until(lambda: "inflight_requests 2" in lines(), what="both streams in flight")
        began = time.monotonic()
        small = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        wait_until(lambda: post(gateway, CHAT, small, **{"X-Api-Key": "other"})[0] == 200, timeout=15, what="a slot")
        print(f"\na client that reads nothing: its slot back after {time.monotonic() - began:.1f} s")
        assert not slow_phase_over.is_set()  # the slot was the silent client's, not the slow reader's
        steady.join(60)
    assert tail and tail[0].endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")  # the slow reader got it all
    statuses = wait_until(
        lambda: (
            (found := {line["tenant"]: line["status"] for line in gateway.log_lines()}).keys()
            >= {"reads-nothing", "reads-slowly"}
            and found
        ),
        what="both streams' log lines",
    )
    assert statuses["reads-nothing"] == 499 and statuses["reads-slowly"] == 200
    assert "inflight_requests 0" in gateway.metrics().splitlines()
    assert "Traceback" not in gateway.process.errors()


@pytest.mark.serial  # asserts a time: run alone, not beside another worker
def test_a_stream_client_is_waited_for_stream_idle_secs_not_client_idle_secs(
    start_gateway: GatewayFactory, mock: Mock
) -> None:
    """A reader's kernel shows bytes taken only in steps of ~100 KiB, so a slow but steady
    reader looks like a silent one for a while: the wait is the idle stream's limit
    (STREAM_IDLE_SECS), not the keep-alive's (CLIENT_IDLE_SECS, 75 s by default, cut SDK clients
    reading 3-10 events a second). A client silent for 3 s, past CLIENT_IDLE_SECS=1 but within
    STREAM_IDLE_SECS=6, then reading, gets its whole stream."""
    gateway = start_gateway(CLIENT_IDLE_SECS="1", STREAM_IDLE_SECS="6")
    body = json.dumps({"model": "m", "stream": True, "messages": [{"role": "user", "content": "word " * 300_000}]})
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the kernel holds little for it
        sock.connect(("127.0.0.1", gateway.port))
        sock.sendall(
            b"POST %s HTTP/1.1\r\nHost: x\r\nX-Api-Key: pauses\r\nX-Stainless-Mock-Echo: 1\r\nConnection: close\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (CHAT.encode(), len(body), body.encode())
        )
        lines = gateway.metrics().splitlines
        wait_until(lambda: "inflight_requests 1" in lines(), what="the stream in flight")
        time.sleep(3)  # the pause under test: three times CLIENT_IDLE_SECS, half STREAM_IDLE_SECS
        # Then read at speed: a window below the loopback's MSS (64 KiB) is filled by zero-window
        # probes only, one every RTO (0.2 s: ~20 KB/s), once the gateway has closed its end.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        sock.settimeout(30)
        tail = b""
        while data := sock.recv(1 << 20):
            tail = tail[-100:] + data
    assert tail.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")
    line = wait_until(lambda: next((x for x in gateway.log_lines() if x.get("tenant") == "pauses"), None))
    assert line["status"] == 200


def test_a_client_that_never_reads_a_large_reply_is_let_go(start_gateway: GatewayFactory, mock: Mock) -> None:
    """A 5 MB JSON reply to a client that reads none of it: aiohttp's write waited for ever
    after the handler had returned (logged 200), holding the reply's memory and the connection.
    Now the gateway writes a reply past the socket's buffer itself, and a client that takes no
    byte for CLIENT_IDLE_SECS is cut (499)."""
    gateway = start_gateway(CLIENT_IDLE_SECS="1", STREAM_IDLE_SECS="1", REDACT_KINDS="")
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "word " * 1_000_000}]}).encode()
    with socket.socket() as stalled:
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.connect(("127.0.0.1", gateway.port))
        stalled.sendall(
            b"POST %s HTTP/1.1\r\nHost: x\r\nX-Api-Key: reads-nothing\r\nX-Stainless-Mock-Echo: 1\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (CHAT.encode(), len(body), body)
        )
        line = wait_until(
            lambda: next((line for line in gateway.log_lines() if line["path"] == CHAT), None),
            timeout=30,
            what="the request's log line",
        )
        assert line["status"] == 499  # cut, not answered 200 and then waited for
        received = 0
        with contextlib.suppress(ConnectionResetError):
            while data := stalled.recv(1 << 20):  # what was on its way, then the end of it
                received += len(data)
        assert received < len(body)
    assert "Traceback" not in gateway.process.errors()


def test_clients_cut_for_reading_nothing_leave_no_memory_behind(start_gateway: GatewayFactory, mock: Mock) -> None:
    """Rounds of five clients that read none of a 5 MB reply, each cut after CLIENT_IDLE_SECS:
    the response noted as started (keys.STARTED) and its request referred to each other, so
    every cut request kept its reply and its body until a full collection, which the serving
    process runs rarely: ~50 MiB more each round. Now the note is dropped as the request ends."""
    gateway = start_gateway(CLIENT_IDLE_SECS="1", STREAM_IDLE_SECS="1", REDACT_KINDS="")
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "word " * 1_000_000}]}).encode()
    request = (
        b"POST %s HTTP/1.1\r\nHost: x\r\nX-Api-Key: reads-nothing\r\nX-Stainless-Mock-Echo: 1\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (CHAT.encode(), len(body), body)
    )
    sizes = []
    for round_ in range(1, 5):
        clients = []
        for _ in range(5):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", gateway.port))
            sock.sendall(request)
            clients.append(sock)
        cut = lambda: sum(line["status"] == 499 for line in gateway.log_lines())  # noqa: E731
        wait_until(lambda: cut() == 5 * round_, timeout=60, what="the clients cut")  # noqa: B023
        for sock in clients:
            sock.close()
        sizes.append(rss_kib(gateway) // 1024)
    print(f"\nthe gateway's size after each round of five cut clients: {sizes} MiB")
    assert sizes[-1] - sizes[0] < 40


def rss_kib(gateway: Gateway) -> int:
    for line in Path(f"/proc/{gateway.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.serial  # asserts a time: run alone, not beside another worker
def test_connections_that_never_finish_a_request_are_closed(start_gateway: GatewayFactory) -> None:
    # Silent, or stopped inside the request line and headers: closed after CLIENT_IDLE_SECS,
    # so one client cannot hold sockets for ever and run the process out of descriptors
    # (found by a black-box review: they stayed open for the hour aiohttp's default allows).
    gateway = start_gateway(CLIENT_IDLE_SECS="1")
    openings = [b"", b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n", b"GET /healthz HTTP/1.1\r\nHo"]
    sockets = [socket.create_connection(("127.0.0.1", gateway.port), timeout=10) for _ in openings]
    try:
        for sock, opening in zip(sockets, openings, strict=True):
            sock.sendall(opening)
        started = time.monotonic()
        for sock in sockets:
            assert sock.recv(1024) == b""  # closed by the gateway, nothing sent
        assert time.monotonic() - started < 5
    finally:
        for sock in sockets:
            sock.close()
    assert http_get(gateway.port, "/healthz")[0] == 200


def test_stalled_bodies_cannot_grow_the_gateway_past_its_limits(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway(MAX_CONCURRENCY="1", RPS="1", BURST="1")
    before = rss_kib(gateway)
    size = 8 * MIB
    sockets = []
    try:
        for _ in range(12):
            sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=10)
            sock.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Api-Key: one-client\r\n"
                b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % size
            )
            sock.sendall(b" " * (size - 1))  # all but the last byte, then silence
            sockets.append(sock)
        # Wait (bounded) for the gateway to take what was sent: it fails as soon as it holds more.
        deadline = time.monotonic() + 3
        grown = 0
        while time.monotonic() < deadline and grown < 64 * 1024:
            grown = rss_kib(gateway) - before
            time.sleep(0.05)
        print(f"\n12 stalled 8 MiB bodies: the gateway grew {grown // 1024} MiB")
        assert grown < 64 * 1024  # MAX_CONCURRENCY=1: one body's worth, with room
    finally:
        for sock in sockets:
            sock.close()


def test_bodies_waiting_for_their_count_cannot_grow_the_gateway_past_its_limits(start_gateway: GatewayFactory) -> None:
    """30 hostile bodies of 7.6 MiB, 0.1 s apart, each counted in turn (~1 s each): once read, a
    body gave its bytes back to the budget and waited for its count holding them all the same,
    so the gateway grew by every body sent (~230 MiB). Now a body holds its bytes until it is
    checked, and those past the budget (two bodies' worth with MAX_CONCURRENCY=2) are shed."""
    gateway = start_gateway(MAX_CONCURRENCY="2")
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "ab cd"}] * 210_000}).encode()
    statuses: list[int] = []
    before = rss_kib(gateway)
    peak = before

    def send() -> None:
        statuses.append(post(gateway, CHAT, body)[0])

    senders = [threading.Thread(target=send) for _ in range(30)]
    for sender in senders:  # one after the other: each is read whole before the next comes
        sender.start()
        time.sleep(0.1)
        peak = max(peak, rss_kib(gateway))
    while any(sender.is_alive() for sender in senders):
        peak = max(peak, rss_kib(gateway))
        time.sleep(0.05)
    print(f"\n30 hostile bodies of 7.6 MiB: the gateway grew {(peak - before) // 1024} MiB; {sorted(statuses)}")
    assert set(statuses) <= {400, 503} and 503 in statuses
    assert peak - before < 100 * 1024


# --- 4. Start-up values and secrets in what the process writes (SPEC §2, §10) ---------------


def check_config(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "gateway.py"), "--check-config"],
        env=base_env() | env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.mark.parametrize("value", ["sk-abc…def", "sk-abc\rdef"], ids=["ellipsis", "carriage-return"])
def test_an_unsendable_upstream_key_stops_start_up(tmp_path: Path, value: str) -> None:
    result = check_config(tmp_path, OPENAI_API_KEY=value)
    assert result.returncode == 2 and "OPENAI_API_KEY" in result.stderr


def test_an_unsendable_upstream_key_never_shows_in_logs_or_errors(tmp_path: Path) -> None:
    # Refused at start-up (see above), and the refusal does not quote it.
    result = check_config(tmp_path, OPENAI_API_KEY="sk-abc\r-secretpart")
    assert result.returncode == 2 and "OPENAI_API_KEY" in result.stderr
    assert "secretpart" not in result.stdout + result.stderr


def test_a_bad_tenant_quotas_item_is_not_echoed(tmp_path: Path) -> None:
    result = check_config(tmp_path, TENANT_QUOTAS="sk-live-4f9a2b:5")
    assert result.returncode == 2 and "TENANT_QUOTAS" in result.stderr
    assert "sk-live-4f9a2b" not in result.stderr + result.stdout


def test_check_config_masks_every_secret(tmp_path: Path) -> None:
    result = check_config(
        tmp_path,
        OPENAI_BASE_URL="https://user:pw-secret-1@proxy.example/v1?key=qs-secret-2",
        ANTHROPIC_BASE_URL="https://pw-secret-3@anthropic.example",
        ANTHROPIC_API_KEY="sk-ant-secret-4",
        REDIS_URL="rediss://:pw-secret-5@redis.example:6380/0?password=qs-secret-6",
        TENANT_KEYS="acme=sk-tenant-secret-7",
        HASH_IDENTIFIERS="true",
        HASH_SECRET="hash-secret-8",
        TENANT_QUOTAS="acme=5",
        OTEL_EXPORTER_OTLP_ENDPOINT="https://otel-secret-10@collector.example",
        OTEL_EXPORTER_OTLP_HEADERS="authorization=Bearer otel-secret-11,x-key=otel-secret-12",
        OTEL_EXPORTER_OTLP_TRACES_HEADERS="x-token=otel-secret-13",
    )
    assert result.returncode == 0, result.stderr
    assert "secret-" not in result.stdout + result.stderr, result.stdout
    lines = result.stdout.splitlines()
    assert all("=" in line for line in lines) and any(line.startswith("OPENAI_BASE_URL=") for line in lines)


def test_hostile_traffic_leaves_no_secret_in_logs_metrics_or_bodies(start_gateway: GatewayFactory, mock: Mock) -> None:
    gateway = start_gateway(TENANT_KEYS="acme=sk-tenant-secret-1", TIMEOUT_SECS="0.5")
    key = {"X-Api-Key": "sk-tenant-secret-1"}
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    claude = {"model": "c", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    bodies = []
    for path, body, headers in [
        (CHAT, chat, key),
        (CHAT, {**chat, "stream": True}, {**key, "x-stainless-mock-die-after": "1", "x-stainless-mock-reply": "a b c"}),
        (MESSAGES, {**claude, "stream": True}, {**key, "x-stainless-mock-die-after": "1"}),
        (CHAT, chat, {**key, "x-stainless-mock-status": "401"}),
        (MESSAGES, claude, {**key, "x-stainless-mock-status": "403"}),
        (CHAT, chat, {**key, "x-stainless-mock-latency-ms": "1500"}),
        (CHAT, b"{not json", key),
        (CHAT, chat, {"X-Api-Key": "sk-tenant-secret-2"}),
        (CHAT, chat, {"Authorization": "Bearer sk-tenant-secret-1x"}),
        (CHAT, {**chat, "metadata": json.loads("[" * 300 + "]" * 300)}, key),  # a 500 today (see the in-process test)
    ]:
        _, headers_out, data = post(gateway, path, body, **headers)
        bodies.append(data.decode("utf-8", "replace") + json.dumps(headers_out))
    metrics = gateway.metrics()
    assert http_get(gateway.port, "/healthz")[0] == 200
    gateway.stop()
    written = gateway.process.output() + gateway.process.errors() + metrics + "".join(bodies)
    for secret in (*UPSTREAM_SECRETS, "sk-tenant-secret"):
        assert secret not in written, secret
    # Every failure after a stream started is an SSE error event, never a second response.
    assert "HTTP/1.1" not in "".join(bodies)


def test_an_upstream_that_dies_mid_stream_ends_it_with_an_error_event_on_both_routes(
    shared_gateway: Gateway, mock: Mock
) -> None:
    die = {"x-stainless-mock-die-after": "2", "x-stainless-mock-reply": "mail jane.doe@example.com soon please"}
    status, _, data = post(
        shared_gateway,
        CHAT,
        {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]},
        **die,
        **{"x-request-id": "dies-mid-stream"},
    )
    assert status == 200 and b"HTTP/1.1" not in data
    last = [line for line in data.split(b"\n") if line.startswith(b"data: ")][-1]
    assert json.loads(last[6:])["error"]["code"] == "upstream_stream_broken"
    # Logged as the 200 the client got, and how its stream ended (the operator's only trace).
    logged = wait_until(
        lambda: [entry for entry in shared_gateway.log_lines() if entry["request_id"] == "dies-mid-stream"],
        what="the stream's log line",
    )[0]
    assert logged["status"] == 200 and logged["stream_error"] == "upstream stream ended unexpectedly"
    claude = {"model": "c", "max_tokens": 5, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    status, _, data = post(shared_gateway, MESSAGES, claude, **die)
    assert status == 200 and data.rstrip().split(b"\n")[-2] == b"event: error"
    assert b"jane.doe@example.com" not in data
    assert http_get(shared_gateway.port, "/healthz")[0] == 200
