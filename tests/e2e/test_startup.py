"""Start-up on the real process (GATEWAY_CMD's build, if set): a failure is one line on stderr
and the same exit status whether one process serves or WORKERS of them; `.env` reaches the
OpenTelemetry SDK's own variables."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from ..conftest import GatewayFactory
from ..harness import Mock, RedisServer, base_env, free_port, gateway_argv, http_get, wait_until

CHAT = "/v1/chat/completions"
BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def start_up(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """Run the gateway to its exit (a failing start-up), in an empty working directory."""
    cwd = tmp_path / f"cwd-{free_port()}"
    cwd.mkdir()
    full = base_env() | {"RPS": "0"} | env
    return subprocess.run(gateway_argv(), env=full, cwd=cwd, capture_output=True, text=True, timeout=30)


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield taken.getsockname()[1]


def test_a_port_in_use_is_the_same_one_line_with_any_number_of_workers(
    tmp_path: Path, taken_port: int, redis_server: RedisServer
) -> None:
    results = {
        workers: start_up(tmp_path, LISTEN_ADDR=f"127.0.0.1:{taken_port}", WORKERS=workers, REDIS_URL=redis_server.url)
        for workers in ("1", "2", "4")
    }
    for result in results.values():
        assert result.returncode == 1
        assert result.stderr.splitlines() == [f"error: cannot listen on 127.0.0.1:{taken_port}: Address already in use"]


def test_a_second_gateway_cannot_share_the_port_of_one_with_workers(
    start_gateway: GatewayFactory, tmp_path: Path, redis_server: RedisServer
) -> None:
    """Workers bind with SO_REUSEPORT; a second gateway (same user) doing so too would quietly
    take a share of the first one's connections. It is refused like any port in use."""
    first = start_gateway(WORKERS="2", REDIS_URL=redis_server.url)
    second = start_up(tmp_path, LISTEN_ADDR=f"127.0.0.1:{first.port}", WORKERS="2", REDIS_URL=redis_server.url)
    assert second.returncode == 1
    assert second.stderr.splitlines() == [f"error: cannot listen on 127.0.0.1:{first.port}: Address already in use"]
    assert http_get(first.port, "/healthz")[0] == 200


def test_two_gateways_with_workers_started_at_once_do_not_share_the_port(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """Each checked the port before either's workers had bound it, and then all of them bound it
    with SO_REUSEPORT: both served, each taking a share of the other's connections (4 rounds
    of 5 here). One serves, the other is refused like any port in use."""
    for _ in range(2):
        _start_two_at_once(tmp_path, redis_server)


def _start_two_at_once(tmp_path: Path, redis_server: RedisServer) -> None:
    port = free_port()
    env = base_env() | {"RPS": "0", "WORKERS": "2", "REDIS_URL": redis_server.url}
    env["LISTEN_ADDR"] = f"127.0.0.1:{port}"
    gateways = []
    for name in ("a", "b"):
        cwd = tmp_path / f"cwd-{port}-{name}"
        cwd.mkdir()
        gateways.append(
            subprocess.Popen(gateway_argv(), env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        )
    try:
        wait_until(lambda: any(g.poll() is not None for g in gateways), timeout=15, what="one of them refused")
        [refused] = [g for g in gateways if g.poll() is not None]
        assert refused.returncode == 1
        assert refused.stderr is not None
        assert refused.stderr.read().decode().splitlines() == [
            f"error: cannot listen on 127.0.0.1:{port}: Address already in use"
        ]
        wait_until(lambda: http_get(port, "/healthz")[0] == 200, what="the other serving")
    finally:
        for gateway in gateways:
            if gateway.poll() is None:
                gateway.send_signal(signal.SIGTERM)
            gateway.wait(timeout=30)
            if gateway.stderr is not None:
                gateway.stderr.close()


_SQUAT = """
import os, socket, sys, time
lock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
lock.bind("\\0secure-llm-gateway " + sys.argv[1])
if sys.argv[2] == "listen":
    lock.listen()
print("held", flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize(
    ("mode", "user"),
    [
        ("bind", None),  # a process that binds the name and never listens: no gateway does that
        # Another user's (any local user can bind an abstract name, none can share our port)
        pytest.param(
            "listen",
            "nobody",
            marks=pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run as another user"),
        ),
    ],
)
def test_the_address_lock_held_by_no_gateway_of_ours_does_not_keep_workers_from_a_free_port(
    tmp_path: Path, redis_server: RedisServer, mode: str, user: str | None
) -> None:
    """The lock's name is no port: any local user could bind it (a port under 1024 too, which
    they cannot bind), and a gateway with WORKERS refused to start on a free port, 'Address
    already in use', where one process started (SPEC §10: the same with WORKERS as without).
    SO_REUSEPORT shares a port only among one user's sockets: only our gateways' hold counts."""
    port = free_port()
    argv = ["python3", "-c", _SQUAT, f"127.0.0.1:{port}", mode]
    squatter = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, user=user)
    try:
        assert squatter.stdout is not None and squatter.stdout.readline() == "held\n"
        env = base_env() | {"RPS": "0", "WORKERS": "2", "REDIS_URL": redis_server.url}
        env["LISTEN_ADDR"] = f"127.0.0.1:{port}"
        cwd = tmp_path / "cwd"
        cwd.mkdir()
        gateway = subprocess.Popen(gateway_argv(), env=env, cwd=cwd, stderr=subprocess.PIPE, text=True)
        try:
            wait_until(
                lambda: gateway.poll() is not None or _serves(port), timeout=15, what="the gateway serving or exiting"
            )
            assert gateway.poll() is None, gateway.stderr.read() if gateway.stderr else ""
        finally:
            if gateway.poll() is None:
                gateway.send_signal(signal.SIGTERM)
            gateway.wait(timeout=30)
            if gateway.stderr is not None:
                gateway.stderr.close()
    finally:
        squatter.kill()
        squatter.wait()
        if squatter.stdout is not None:
            squatter.stdout.close()


def _serves(port: int) -> bool:
    try:
        return http_get(port, "/healthz")[0] == 200
    except OSError:
        return False


@pytest.mark.parametrize("workers", ["1", "2"])
def test_bad_configuration_and_unreadable_files_are_one_line_status_2(tmp_path: Path, workers: str) -> None:
    result = start_up(
        tmp_path, WORKERS=workers, REDIS_URL="redis://127.0.0.1:1/0", TENANT_KEYS_FILE=str(tmp_path / "missing")
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"config error: TENANT_KEYS_FILE: cannot read {tmp_path / 'missing'}: No such file or directory"
    ]


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_redis_cluster_that_cannot_be_read_at_start_up_is_one_line(
    tmp_path: Path, workers: str, redis_server: RedisServer
) -> None:
    """A cluster's layout is read when the store opens; no node answering, or a Redis without
    cluster support, was a traceback (and aiohttp's unclosed sessions) on stderr."""
    for url in (f"redis://:pw-S3CRET@127.0.0.1:{free_port()}/0", redis_server.url):
        result = start_up(tmp_path, WORKERS=workers, REDIS_URL=url, REDIS_CLUSTER="true")
        assert result.returncode == 1
        [line] = result.stderr.splitlines()
        assert line.startswith("error: REDIS_URL: the Redis Cluster's layout could not be read: ")
        assert "S3CRET" not in line


def test_tenant_keys_no_client_could_present_are_refused_without_the_key(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("acme=sk-fine\nbeta=sk-" + "S3CRET" * 50 + "\n")
    result = start_up(tmp_path, TENANT_KEYS_FILE=str(keys))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"config error: TENANT_KEYS_FILE: {keys}: line 2: the key is longer than 256 bytes,"
        " so no client could present it"
    ]


class DotenvGateway:
    """A gateway in a working directory of our own, so that it holds a `.env`."""

    def __init__(self, tmp_path: Path, mock: Mock, dotenv: str, **env: str) -> None:
        self.port = free_port()
        cwd = tmp_path / f"gw-{self.port}"
        cwd.mkdir()
        (cwd / ".env").write_text(dotenv)
        full = base_env() | {"LISTEN_ADDR": f"127.0.0.1:{self.port}", "OPENAI_BASE_URL": mock.url, "RPS": "0"} | env
        # Its own session: killed, it takes the frozen binary's real process with it.
        self.process = subprocess.Popen(
            gateway_argv(), env=full, cwd=cwd, stdout=subprocess.DEVNULL, start_new_session=True
        )
        wait_until(self.ready, what="the gateway")

    def ready(self) -> bool:
        assert self.process.poll() is None, "the gateway exited"
        try:
            return http_get(self.port, "/healthz")[0] == 200
        except OSError:
            return False

    def stop(self) -> None:
        os.killpg(self.process.pid, signal.SIGKILL)  # no graceful export to a collector that is not there
        self.process.wait(10)


@pytest.mark.parametrize(
    ("real_env", "sampled"),
    [({}, False), ({"OTEL_TRACES_SAMPLER": "always_on"}, True)],
    ids=["from-dotenv", "real-environment-wins"],
)
async def test_dotenv_sampler_reaches_the_sdk(
    tmp_path: Path, mock: Mock, real_env: dict[str, str], sampled: bool
) -> None:
    # The collector is never reached: only the sampling decision matters, seen in traceparent.
    dotenv = f"OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:{free_port()}\nOTEL_TRACES_SAMPLER=always_off\n"
    gateway = DotenvGateway(tmp_path, mock, dotenv, **real_env)
    try:
        url = f"http://127.0.0.1:{gateway.port}{CHAT}"
        async with aiohttp.ClientSession() as session, session.post(url, json=BODY) as response:
            assert response.status == 200
    finally:
        gateway.stop()
    [request] = mock.requests()
    flags = int({k.lower(): v for k, v in request["headers"].items()}["traceparent"].split("-")[3], 16)
    assert bool(flags & 0x01) is sampled  # W3C's sampled flag


def test_port_0_logs_the_port_the_kernel_chose(tmp_path: Path) -> None:
    """LISTEN_ADDR=127.0.0.1:0 serves on a port of the kernel's choosing: the log line names that
    port (it said "serving on 127.0.0.1:0", and nobody could find the gateway)."""
    cwd = tmp_path / "cwd-port-0"
    cwd.mkdir()
    env = base_env() | {"RPS": "0", "LISTEN_ADDR": "127.0.0.1:0"}
    with subprocess.Popen(
        gateway_argv(), env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    ) as proc:
        try:
            assert proc.stderr is not None
            line = proc.stderr.readline()
            assert "serving on 127.0.0.1:" in line, line
            port = int(line.split("serving on 127.0.0.1:")[1].split()[0])
            assert port != 0
            assert http_get(port, "/healthz")[0] == 200
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(10) == 0


@pytest.mark.parametrize(("closed", "workers"), [(">&-", 1), ("<&-", 1), ("2>&-", 1), (">&- <&-", 1), (">&-", 2)])
def test_a_standard_descriptor_closed_at_start_serves_and_stops_with_0(
    tmp_path: Path, redis_server: RedisServer, closed: str, workers: int
) -> None:
    """`gateway >&-` (a unit or script that closes stdout, a daemonizing wrapper): descriptor 1
    went to the first socket the gateway opened, and at SIGTERM libuv, closing it, aborted the
    process (`uv__close: Assertion fd > STDERR_FILENO failed`, rc 134). Closed stdin or stderr
    did the same. The gateway serves and a stop exits 0; its lines go nowhere."""
    port = free_port()
    env = base_env() | {"RPS": "0", "LISTEN_ADDR": f"127.0.0.1:{port}", "WORKERS": str(workers)}
    env["REDIS_URL"] = redis_server.url
    argv = ["sh", "-c", f'exec "$@" {closed}', "sh", *gateway_argv()]
    with subprocess.Popen(argv, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as proc:
        try:

            def serving() -> bool:
                assert proc.poll() is None, f"exited with {proc.returncode}"
                return _serves(port)

            wait_until(serving, timeout=15, what="the gateway")
            assert http_get(port, "/nope")[0] == 404  # a request log line, to a stdout that is gone
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(10) == 0
