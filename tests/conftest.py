"""Fixtures over tests/harness.py: real processes, free ports, stopped at teardown."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from hypothesis import settings as hypothesis_settings

from .harness import Gateway, Mock, RedisCluster, RedisServer

if TYPE_CHECKING:
    from gateway.config import Settings

# Properties check what holds, never how fast: no per-example deadline, so a neighbour on the
# CPU (a parallel worker, a loaded CI machine) cannot fail one. Speed is the bench's job.
hypothesis_settings.register_profile("gateway", deadline=None)
hypothesis_settings.load_profile("gateway")

# What make_settings clears from the environment before setting a test's own variables.
GATEWAY_VARIABLE_PREFIXES = ("OTEL_", "OPENAI_", "REDIS_", "TENANT_", "QUOTA_", "HASH_", "STREAM_", "TOKEN_", "POLICY_")
GATEWAY_VARIABLES = frozenset(
    {
        "LISTEN_ADDR",
        "RPS",
        "BURST",
        "DEFAULT_QUOTA",
        "TIMEOUT_SECS",
        "MAX_CONCURRENCY",
        "TRUSTED_PROXIES",
        "REDACT_KINDS",
        "MAX_BODY_BYTES",
        "SHUTDOWN_GRACE_SECS",
        "WORKERS",
        "STORE_TIMEOUT_MS",
        "MODEL_LABEL_LIMIT",
        "NOTIFY_SOCKET",
        "ROUTES_FILE",
        "CB_FAILURES",
        "CB_OPEN_SECS",
    }
)


@pytest.fixture(scope="module")
def mock_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mock]:
    mock = Mock(tmp_path_factory.mktemp("mock"))
    yield mock
    mock.stop()


@pytest.fixture
def mock(mock_process: Mock) -> Mock:
    """The module's mock upstream, with what it saw forgotten."""
    mock_process.forget()
    return mock_process


GatewayFactory = Callable[..., Gateway]


@pytest.fixture
def start_gateway(tmp_path: Path, mock_process: Mock) -> Iterator[GatewayFactory]:
    """start_gateway(VAR=value, ...) → a running gateway process in front of the mock."""
    started: list[Gateway] = []

    def start(wait: bool = True, **env: str) -> Gateway:
        full = {
            "OPENAI_BASE_URL": mock_process.url,
            "OPENAI_API_KEY": "sk-upstream-secret",
            "ANTHROPIC_BASE_URL": mock_process.url,
            "ANTHROPIC_API_KEY": "sk-ant-upstream-secret",
        } | env
        gateway = Gateway(tmp_path, full, wait=wait)
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        gateway.stop()


@pytest.fixture(scope="module")
def shared_gateway(tmp_path_factory: pytest.TempPathFactory, mock_process: Mock) -> Iterator[Gateway]:
    """One default gateway per module for tests that don't need their own settings."""
    gateway = Gateway(
        tmp_path_factory.mktemp("gw"),
        {
            "OPENAI_BASE_URL": mock_process.url,
            "OPENAI_API_KEY": "sk-upstream-secret",
            "ANTHROPIC_BASE_URL": mock_process.url,
            "ANTHROPIC_API_KEY": "sk-ant-upstream-secret",
        },
    )
    yield gateway
    gateway.stop()


@pytest.fixture
def redis_factory(tmp_path: Path) -> Iterator[Callable[[], RedisServer]]:
    servers: list[RedisServer] = []

    def start() -> RedisServer:
        server = RedisServer(tmp_path)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def redis_server(redis_factory: Callable[[], RedisServer]) -> RedisServer:
    return redis_factory()


@pytest.fixture
def redis_cluster(tmp_path: Path) -> Iterator[RedisCluster]:
    cluster = RedisCluster(tmp_path)
    yield cluster
    cluster.stop()


@pytest.fixture
def make_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Settings]:
    """make_settings(VAR=value, ...) → Settings from gateway.config's loader, reading exactly
    these variables: the test's own environment and any .env are kept out."""
    from gateway.config import load_settings  # in process: only the tests that build an app import it

    monkeypatch.chdir(tmp_path)  # an empty directory: no .env

    def make(**env: str) -> Settings:
        for name in list(os.environ):
            if name.startswith(GATEWAY_VARIABLE_PREFIXES) or name in GATEWAY_VARIABLES:
                monkeypatch.delenv(name)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        return load_settings()

    return make
