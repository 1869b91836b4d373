"""Graceful drain, sd_notify and signals, on the real process."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import re
import signal
import socket
import struct
import subprocess
import time
from pathlib import Path

import aiohttp
import pytest

from ..conftest import GatewayFactory
from ..harness import ROOT, Gateway, Mock, RedisServer, base_env, free_port, gateway_argv, http_get, wait_until

CHAT = "/v1/chat/completions"
BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}


@pytest.mark.serial  # asserts a time: run alone, not beside another worker
async def test_sigterm_lets_a_paced_stream_finish_then_exits_0(start_gateway: GatewayFactory, mock: Mock) -> None:
    gateway = start_gateway(SHUTDOWN_GRACE_SECS="10")
    headers = {
        "x-stainless-mock-chunk-delay-ms": "150",
        "x-stainless-mock-reply": "one two three four five six seven eight",
    }
    async with aiohttp.ClientSession() as session, session.post(gateway.url + CHAT, json=BODY, headers=headers) as r:
        await r.content.readline()
        signalled = time.monotonic()
        gateway.process.signal(signal.SIGTERM)
        # While draining: readiness and new requests answer 503 on fresh connections.
        async with aiohttp.ClientSession() as other:
            await asyncio.sleep(0.1)
            async with other.get(gateway.url + "/readyz") as ready:
                assert ready.status == 503
            async with other.post(gateway.url + CHAT, json=BODY) as refused:
                assert refused.status == 503
                assert (await refused.json())["error"]["code"] == "shutting_down"
        rest = (await r.read()).decode()
    assert rest.rstrip().endswith("data: [DONE]")
    content = "".join(
        json.loads(line[6:])["choices"][0]["delta"].get("content", "")
        for line in rest.splitlines()
        if line.startswith("data: {")
    )
    assert content.endswith("seven eight")
    assert await asyncio.to_thread(gateway.process.wait, 10) == 0
    assert time.monotonic() - signalled < 5


@pytest.mark.serial  # asserts a time: run alone, not beside another worker
async def test_streams_past_the_grace_period_end_with_an_error_event(start_gateway: GatewayFactory, mock: Mock) -> None:
    gateway = start_gateway(SHUTDOWN_GRACE_SECS="1")
    headers = {"x-stainless-mock-chunk-delay-ms": "400", "x-stainless-mock-reply": " ".join(["word"] * 30)}
    async with aiohttp.ClientSession() as session, session.post(gateway.url + CHAT, json=BODY, headers=headers) as r:
        await r.content.readline()
        gateway.process.signal(signal.SIGTERM)
        started = time.monotonic()
        body = (await r.read()).decode()
    events = [line[6:] for line in body.splitlines() if line.startswith("data: ")]
    assert json.loads(events[-1])["error"]["code"] == "shutting_down"
    assert await asyncio.to_thread(gateway.process.wait, 10) == 0
    assert time.monotonic() - started < 4
    wait_until(lambda: mock.events(), what="the upstream to see the cut")  # the upstream call was cancelled too


@pytest.mark.parametrize("stream", [False, True])
async def test_a_request_still_waiting_for_its_upstream_at_the_grace_gets_a_503(
    start_gateway: GatewayFactory, mock: Mock, stream: bool
) -> None:
    # Cut before any answer went out (a JSON reply, or a stream's first event, still on its
    # way): 503 shutting_down with Retry-After, not a connection closed without a reply (found
    # by a black-box review; a stream already answering ends with its error event, above).
    gateway = start_gateway(SHUTDOWN_GRACE_SECS="1")
    async with aiohttp.ClientSession() as session:
        pending = asyncio.ensure_future(
            session.post(
                gateway.url + CHAT, json={**BODY, "stream": stream}, headers={"x-stainless-mock-latency-ms": "5000"}
            )
        )
        await asyncio.to_thread(wait_until, lambda: mock.requests(), 10.0, 0.02, "the upstream call")
        gateway.process.signal(signal.SIGTERM)
        async with await pending as r:
            assert r.status == 503 and r.headers["Retry-After"] == "1"
            assert (await r.json())["error"]["code"] == "shutting_down"
    assert await asyncio.to_thread(gateway.process.wait, 10) == 0
    lines = [line for line in gateway.log_lines() if line["path"] == CHAT]
    assert [line["status"] for line in lines] == [503]


def test_sd_notify_ready_then_stopping(start_gateway: GatewayFactory, tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(10)
        gateway = start_gateway(wait=False, NOTIFY_SOCKET=str(path))
        assert sock.recv(100) == b"READY=1"
        assert http_get(gateway.port, "/healthz")[0] == 200  # READY came after the port was bound
        gateway.process.signal(signal.SIGTERM)
        assert sock.recv(100) == b"STOPPING=1"
        assert gateway.process.wait(10) == 0


def test_sighup_without_files_reloads_nothing_and_is_not_fatal(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway()
    gateway.process.signal(signal.SIGHUP)
    wait_until(
        lambda: "configuration reloaded (no file to read)" in gateway.process.errors(), what="the SIGHUP log line"
    )
    assert http_get(gateway.port, "/healthz")[0] == 200
    gateway.process.signal(signal.SIGINT)
    assert gateway.process.wait(10) == 0


def test_sd_notify_with_workers_comes_from_the_parent(
    start_gateway: GatewayFactory, redis_server: RedisServer, tmp_path: Path
) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(15)
        gateway = start_gateway(wait=False, NOTIFY_SOCKET=str(path), WORKERS="2", REDIS_URL=redis_server.url)
        assert sock.recvfrom(100)[0] == b"READY=1"  # once, from the parent, after the port answers
        assert http_get(gateway.port, "/healthz")[0] == 200
        gateway.process.signal(signal.SIGTERM)
        assert sock.recv(100) == b"STOPPING=1"
        assert gateway.process.wait(15) == 0
        sock.settimeout(0.2)
        with pytest.raises(TimeoutError):
            sock.recv(100)  # the workers themselves said nothing


@pytest.mark.parametrize("workers", [1, 2])
def test_repeated_sigterm_while_stopping_still_exits_0(
    start_gateway: GatewayFactory, redis_server: RedisServer, workers: int
) -> None:
    """An impatient operator (or a supervisor that signals twice) sends SIGTERM again while the
    gateway is already stopping: it is the same request, and the exit stays 0. A SIGTERM every
    few ms until the process is gone reaches it in every phase of its stop: the drain, the
    listener's close, and the last moments after the loop (and the parent's wakeup pipe) closed,
    when the handlers had gone back to the default that kills (rc -15 on the old code)."""
    _not_under_the_bootloader("its end: once its child exited, a signal ends it while it cleans up")
    gateway = start_gateway(WORKERS=str(workers), REDIS_URL=redis_server.url)
    _signal_until_gone(gateway, signal.SIGTERM, every=0.003)


def test_sighup_while_starting_is_not_fatal(tmp_path: Path) -> None:
    """`kill -HUP` (a reload) right after the start, while Python still imports the gateway: its
    default action ended the process (status 129) before any handler was installed."""
    _not_under_the_bootloader("its own start (it unpacks before any Python runs)")
    port = free_port()
    env = base_env() | {"LISTEN_ADDR": f"127.0.0.1:{port}", "RPS": "0"}
    with subprocess.Popen(
        gateway_argv(), env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    ) as proc:
        try:
            time.sleep(0.15)  # python has started; the gateway's imports take longer than this
            proc.send_signal(signal.SIGHUP)

            def over() -> bool:
                with contextlib.suppress(OSError):
                    return http_get(port, "/healthz")[0] == 200
                return proc.poll() is not None

            wait_until(over, timeout=15, what="serving or gone")
            assert proc.poll() is None, proc.returncode
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(10) == 0


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.parametrize("workers", [1, 2])
def test_a_stop_asked_while_starting_is_a_clean_stop(
    tmp_path: Path, redis_server: RedisServer, workers: int, signum: signal.Signals
) -> None:
    """`systemctl stop` (or Ctrl-C) right after the start, while Python still imports the
    gateway: SIGTERM's default action killed the process (status 143 to systemd, a failure)
    and SIGINT printed a KeyboardInterrupt traceback. A stop asked while starting is a stop:
    exit 0, no traceback, and nothing served after it."""
    _not_under_the_bootloader("its own start (it unpacks before any Python runs)")
    for delay in (0.1, 0.25):  # the imports; create_app (both take longer than this here)
        port = free_port()
        env = base_env() | {"LISTEN_ADDR": f"127.0.0.1:{port}", "RPS": "0", "WORKERS": str(workers)}
        env["REDIS_URL"] = redis_server.url
        with subprocess.Popen(
            gateway_argv(), env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        ) as proc:
            try:
                time.sleep(delay)  # python has started (a wait for a moment, not for a condition)
                proc.send_signal(signum)
                deadline = time.monotonic() + 15
                while proc.poll() is None and time.monotonic() < deadline:
                    with contextlib.suppress(OSError):
                        assert http_get(port, "/healthz", timeout=0.5)[0] != 200, "served after the stop"
                    time.sleep(0.01)
                assert proc.wait(5) == 0, (delay, proc.stderr.read() if proc.stderr else "")
                errors = proc.stderr.read() if proc.stderr else ""
                assert "Traceback" not in errors and "KeyboardInterrupt" not in errors, errors
            finally:
                proc.kill()


@pytest.mark.parametrize("workers", [1, 2])
def test_sighup_while_stopping_still_exits_0(
    start_gateway: GatewayFactory, redis_server: RedisServer, workers: int
) -> None:
    """A reload asked for while the gateway stops (a config push racing a deploy) reloads
    during the drain, and after it is moot: the exit stays 0. Once the loop closed, SIGHUP was
    back on its default handler, which ends the process: rc -1 (129 in a shell) on the old code,
    with one process or in the workers."""
    _not_under_the_bootloader("its end: once its child exited, a signal ends it while it cleans up")
    gateway = start_gateway(WORKERS=str(workers), REDIS_URL=redis_server.url)
    gateway.process.signal(signal.SIGTERM)
    _signal_until_gone(gateway, signal.SIGHUP, every=0.001)


def _not_under_the_bootloader(moment: str) -> None:
    """Skips a test of the gateway's own signal handling at a moment when, with the one-file
    binary, the signal reaches PyInstaller's bootloader (the process the harness signals) and
    not the gateway: its handling there is the bootloader's, outside gateway.py."""
    if os.environ.get("GATEWAY_CMD"):
        pytest.skip(f"with the one-file binary, the PyInstaller bootloader's own signal handling at {moment}")


def _signal_until_gone(gateway: Gateway, signum: int, every: float) -> None:
    """`signum` every `every` seconds until the gateway is gone (15 s at most), so one lands in
    every phase of its stop; then its exit status must be 0."""
    proc = gateway.process.proc
    deadline = time.monotonic() + 15
    while proc.poll() is None and time.monotonic() < deadline:
        gateway.process.signal(signum)
        time.sleep(every)
    assert gateway.process.wait(5) == 0, gateway.process.errors()


def test_sighup_with_a_file_swapped_for_a_fifo_is_refused_and_the_gateway_keeps_answering(
    start_gateway: GatewayFactory, tmp_path: Path
) -> None:
    # The keys file swapped (atomically, by symlink) for a FIFO nobody writes to: the reload
    # used to block the event loop in open() for ever, /healthz and every stream with it.
    keys = tmp_path / "keys"
    keys.write_text("acme=sk-acme-1\n")
    gateway = start_gateway(TENANT_KEYS_FILE=str(keys))
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "swap").symlink_to(tmp_path / "fifo")
    os.replace(tmp_path / "swap", keys)
    gateway.process.signal(signal.SIGHUP)
    wait_until(lambda: "reload refused" in gateway.process.errors(), timeout=3, what="the refusal log line")
    assert "TENANT_KEYS_FILE: cannot read" in gateway.process.errors()
    assert "not a regular file" in gateway.process.errors()
    assert http_get(gateway.port, "/healthz", timeout=1)[0] == 200


def test_a_worker_started_after_a_reload_serves_the_reloaded_routes(
    start_gateway: GatewayFactory, redis_server: RedisServer, mock: Mock, tmp_path: Path
) -> None:
    # A worker that replaces a dead one used to get the parent's start-up ROUTES_FILE table:
    # after a reload, it served the old routes beside workers serving the new ones.
    def routes(model: str) -> str:
        return (
            f'[upstreams.a]\nkind = "openai"\nbase_url = "{mock.url}"\napi_key_env = "OPENAI_API_KEY"\n'
            f'[[models]]\nmatch = "m"\nupstreams = [{{ upstream = "a", model = "{model}" }}]\n'
        )

    routes_file = tmp_path / "routes.toml"
    routes_file.write_text(routes("old-model"))
    gateway = start_gateway(ROUTES_FILE=str(routes_file), WORKERS="2", REDIS_URL=redis_server.url)
    routes_file.write_text(routes("new-model"))
    gateway.process.signal(signal.SIGHUP)
    wait_until(lambda: gateway.process.errors().count("configuration reloaded") == 2, what="both workers reloading")
    workers = re.findall(r"serving on \S+ \(pid (\d+)\)", gateway.process.errors())
    assert len(workers) == 2
    for pid in workers:  # both replaced: every request then reaches a new worker
        os.kill(int(pid), signal.SIGKILL)
    wait_until(lambda: gateway.process.errors().count(" serves") == 2, timeout=10, what="two replacements")
    mock.forget()
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    for _ in range(4):  # a connection each: either worker may take it
        connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=5)
        connection.request("POST", CHAT, body, {"Content-Type": "application/json"})
        assert connection.getresponse().status == 200
        connection.close()
    assert {request["body"]["model"] for request in mock.requests()} == {"new-model"}


def test_a_request_still_sending_its_body_at_sigterm_is_answered(start_gateway: GatewayFactory, mock: Mock) -> None:
    # Only requests already calling upstream counted as in flight: one whose body was still
    # coming when SIGTERM arrived got no reply at all (the listener closed under it).
    gateway = start_gateway(SHUTDOWN_GRACE_SECS="10")
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi " * 50}]}).encode()
    head = f"POST {CHAT} HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as client:
        client.sendall(head.encode() + body[:40])
        started = f'requests_total{{route="{CHAT}"}} 1'
        wait_until(lambda: started in gateway.metrics(), what="the request under way")
        gateway.process.signal(signal.SIGTERM)
        wait_until(lambda: "draining" in gateway.process.errors(), what="the drain")
        time.sleep(1)  # the rest of the body comes in the middle of the drain
        client.sendall(body[40:])
        reply = client.makefile("rb").readline()
    assert reply.startswith(b"HTTP/1.1 200"), reply
    assert gateway.process.wait(10) == 0


def test_answers_given_while_draining_close_their_connection(start_gateway: GatewayFactory, mock: Mock) -> None:
    # A reply written while draining kept its connection alive: the client sent its next
    # request on it, and the gateway, its last request done, exited under it: no reply at all
    # (http.client: RemoteDisconnected), where a new connection is refused (nothing sent, safe
    # to retry elsewhere). Each answer while draining says `Connection: close`, and closes.
    gateway = start_gateway(SHUTDOWN_GRACE_SECS="10")
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=5)
    connection.request("POST", CHAT, body, {"x-stainless-mock-latency-ms": "1500"})
    wait_until(lambda: mock.requests(), what="the request upstream")
    gateway.process.signal(signal.SIGTERM)
    wait_until(lambda: "draining" in gateway.process.errors(), what="the drain")
    # Another client, a probe and then a request pipelined on one connection: the probe is
    # answered and the connection closed after it.
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as other:
        reply = http.client.HTTPResponse(other)
        other.sendall(f"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\nPOST {CHAT} HTTP/1.1\r\nHost: gw\r\n".encode())
        other.sendall(f"Content-Length: {len(body)}\r\n\r\n{body}".encode())
        reply.begin()
        assert reply.status == 200 and reply.getheader("Connection") == "close"
        reply.read()
        assert other.recv(100) == b""  # closed: the pipelined request was never taken
    answer = connection.getresponse()
    assert answer.status == 200
    assert answer.getheader("Connection") == "close"
    answer.read()
    connection.close()
    assert gateway.process.wait(10) == 0


def test_a_body_still_coming_at_the_end_of_the_grace_gets_a_503(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway(SHUTDOWN_GRACE_SECS="0.5")
    head = f"POST {CHAT} HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as client:
        client.sendall(head.encode() + b'{"model": "m", ')
        started = f'requests_total{{route="{CHAT}"}} 1'
        wait_until(lambda: started in gateway.metrics(), what="the request under way")
        gateway.process.signal(signal.SIGTERM)
        reply = http.client.HTTPResponse(client)  # the rest of the body never comes
        reply.begin()
        assert reply.status == 503
        assert json.loads(reply.read())["error"]["code"] == "shutting_down"
    assert gateway.process.wait(10) == 0


def test_the_units_notify_access_accepts_the_process_that_sends_ready(
    start_gateway: GatewayFactory, tmp_path: Path
) -> None:
    # systemd drops a READY=1 that is not from the main pid under NotifyAccess=main. The unit
    # runs the one-file binary, whose bootloader (the main pid) runs the gateway as its child:
    # `systemctl start` waited for READY=1 until it timed out. (Run with GATEWAY_CMD=dist/gateway.)
    unit = (ROOT / "scripts" / "secure-llm-gateway.service").read_text()
    access = re.search(r"^NotifyAccess=(\w+)", unit, re.MULTILINE)
    assert access is not None
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        sock.settimeout(10)
        gateway = start_gateway(wait=False, NOTIFY_SOCKET=str(path))
        message, ancillary, _, _ = sock.recvmsg(100, socket.CMSG_SPACE(struct.calcsize("3i")))
    assert message == b"READY=1"
    sender = struct.unpack("3i", ancillary[0][2][: struct.calcsize("3i")])[0]
    assert access.group(1) == "all" or sender == gateway.process.pid


@pytest.mark.parametrize(
    ("variable", "nested", "problem"),
    [
        # Cedar's parser recursed past the stack: SIGSEGV, every connection dropped.
        (
            "POLICY_FILE",
            "permit(principal, action, resource) when { " + "(" * 5000 + "true" + ")" * 5000 + " };",
            "nests brackets more than 256 deep",
        ),
        # tomllib's RecursionError: a 3,000-line traceback and no refusal line or count.
        ("ROUTES_FILE", "a = " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply"),
    ],
)
def test_a_reload_of_a_file_nested_too_deeply_is_refused_in_one_line(
    start_gateway: GatewayFactory, mock: Mock, tmp_path: Path, variable: str, nested: str, problem: str
) -> None:
    policy, routes = tmp_path / "p.cedar", tmp_path / "routes.toml"
    policy.write_text("permit(principal, action, resource);")
    routes.write_text(
        f'[upstreams.a]\nkind = "openai"\nbase_url = "{mock.url}"\napi_key_env = "OPENAI_API_KEY"\n'
        '[[models]]\nmatch = "*"\nupstreams = [{ upstream = "a" }]\n'
    )
    gateway = start_gateway(POLICY_FILE=str(policy), ROUTES_FILE=str(routes))
    (policy if variable == "POLICY_FILE" else routes).write_text(nested)
    gateway.process.signal(signal.SIGHUP)
    wait_until(lambda: 'config_reloads_total{result="refused"} 1' in gateway.metrics(), what="the refused reload")
    [line] = [x for x in gateway.process.errors().splitlines() if "reload refused" in x]
    assert f"{variable}: " in line and problem in line
    assert len(gateway.process.errors().splitlines()) == 2  # "serving on", then that line
    assert http_get(gateway.port, "/healthz")[0] == 200
