"""What an adversarial review of hostile upstreams found (each test failed before its fix): a
real gateway in front of a scriptable fake upstream (tests/e2e/scripted_upstream.py)."""

from __future__ import annotations

import contextlib
import gzip
import json
import socket
import threading
from collections.abc import Iterator

import pytest

from ..harness import Gateway, wait_until
from .test_adversarial import healthz_watch
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


# A JSON reply gzip'd at ~1000:1 (200 KiB on the wire, 200 MiB inflated): the gateway read it
# whole, joined and parsed it on the event loop (/healthz held 0.6-0.7 s a reply on this
# 2-core machine), and held the 200 MiB of every such reply in flight at once.
BOMB_MIB = 200


def _gzip_bomb() -> bytes:
    content = b"a" * (BOMB_MIB * 2**20)
    reply = b'{"id":"c","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"'
    return gzip.compress(reply + content + b'"}}]}', compresslevel=9)


@contextlib.contextmanager
def _raw_upstream(answer: list[bytes]) -> Iterator[str]:
    """An upstream that answers every request with `answer[0]` (a whole HTTP response, as
    it is when the request comes)."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(5)
                head = b""
                while b"\r\n\r\n" not in head:
                    head += conn.recv(65536)
                length = int(
                    next(
                        (
                            line.split(b":")[1]
                            for line in head.split(b"\r\n")
                            if line.lower().startswith(b"content-length:")
                        ),
                        b"0",
                    )
                )
                body = head.split(b"\r\n\r\n", 1)[1]
                while len(body) < length:
                    body += conn.recv(65536)
                with contextlib.suppress(OSError):
                    conn.sendall(answer[0])

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(5)
        server.close()


@pytest.mark.serial  # watches /healthz's latency: run alone, not beside another worker
def test_a_gzip_bomb_of_a_json_reply_is_refused_and_leaves_healthz_answering(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    bomb = _gzip_bomb()
    answer = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Encoding: gzip\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(bomb)
    ) + bomb
    with _raw_upstream([answer]) as url:
        gw = Gateway(tmp_path_factory.mktemp("gw"), {"OPENAI_BASE_URL": url, "OPENAI_API_KEY": "sk-review"})
        try:
            with healthz_watch(gw) as latencies:
                body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
                status, _, data = post(gw.port, "/v1/chat/completions", body)
                wait_until(lambda: len(latencies) >= 5, what="/healthz answers after the reply")
        finally:
            gw.stop()
    assert status == 502, data[:200]
    assert json.loads(data)["error"]["message"] == "upstream reply inflates too far"
    print(f"\n/healthz worst {max(latencies) * 1000:.0f} ms of {len(latencies)}")
    assert max(latencies) < 0.2


# An upstream that answers with no HTTP the gateway can read (a bad status line, thousands of
# headers, a header past 8 KiB) was reported as "upstream connection failed: ClientResponseError",
# sending the operator to look at the network when the upstream had answered.
NO_HTTP = {
    "status-line": b"HELLO THERE\r\n\r\n",
    "many-headers": b"HTTP/1.1 200 OK\r\n"
    + b"".join(b"X-H%d: v\r\n" % i for i in range(20000))
    + b"Content-Length: 2\r\n\r\n{}",
    "long-header": b"HTTP/1.1 200 OK\r\nX-H: " + b"v" * 100_000 + b"\r\nContent-Length: 2\r\n\r\n{}",
}


def test_an_answer_that_is_no_http_is_reported_as_such(tmp_path_factory: pytest.TempPathFactory) -> None:
    answer = [b""]
    with _raw_upstream(answer) as url:
        gw = Gateway(tmp_path_factory.mktemp("gw"), {"OPENAI_BASE_URL": url, "OPENAI_API_KEY": "sk-review"})
        try:
            for name, answer[0] in NO_HTTP.items():
                body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
                status, _, data = post(gw.port, "/v1/chat/completions", body)
                assert (name, status) == (name, 502)
                assert json.loads(data)["error"]["message"] == "upstream sent a malformed response", name
        finally:
            gw.stop()
