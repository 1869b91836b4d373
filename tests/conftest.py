"""Fixtures over tests/harness.py: real processes, free ports, stopped at teardown."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .harness import Gateway, Mock, RedisCluster, RedisServer


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
        full = {"OPENAI_BASE_URL": mock_process.url, "OPENAI_API_KEY": "sk-upstream-secret"} | env
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
        tmp_path_factory.mktemp("gw"), {"OPENAI_BASE_URL": mock_process.url, "OPENAI_API_KEY": "sk-upstream-secret"}
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
