"""Configuration: defaults, .env under the real environment, every bad variable reported."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gateway.config import ConfigError, load_settings

from .harness import ROOT, base_env

ALL_VARS = [
    "LISTEN_ADDR",
    "OPENAI_BASE_URL",
    "OPENAI_API_KEY",
    "RPS",
    "BURST",
    "REDIS_URL",
    "REDIS_CLUSTER",
    "DEFAULT_QUOTA",
    "QUOTA_WINDOW_SECS",
    "TENANT_QUOTAS",
    "QUOTA_FAIL_MODE",
    "TIMEOUT_SECS",
    "MAX_CONCURRENCY",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_SERVICE_NAME",
    "TENANT_KEYS",
    "TENANT_KEYS_FILE",
    "HASH_IDENTIFIERS",
    "HASH_SECRET",
    "TRUSTED_PROXIES",
    "REDACT_KINDS",
    "MAX_BODY_BYTES",
    "SHUTDOWN_GRACE_SECS",
    "WORKERS",
    "STORE_TIMEOUT_MS",
    "MODEL_LABEL_LIMIT",
    "NOTIFY_SOCKET",
]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ALL_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)


def test_defaults_match_the_spec() -> None:
    s = load_settings()
    assert (s.listen_host, s.listen_port) == ("0.0.0.0", 8080)
    assert s.upstream_chat_url == "https://api.openai.com/v1/chat/completions"
    assert (s.rps, s.burst, s.default_quota, s.quota_window_secs) == (5, 10, 120, 60)
    assert (s.quota_fail_mode, s.timeout_secs, s.max_concurrency) == ("open", 60, 0)
    assert s.redis_url is None and s.service_name == "secure-llm-gateway"
    assert s.max_body_bytes == 8 * 1024 * 1024 and s.shutdown_grace_secs == 30


@pytest.mark.parametrize("base", ["http://up:4000", "http://up:4000/", "http://up:4000/v1", "http://up:4000/v1/"])
def test_v1_is_not_doubled(monkeypatch: pytest.MonkeyPatch, base: str) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", base)
    assert load_settings().upstream_chat_url == "http://up:4000/v1/chat/completions"


def test_dotenv_is_read_and_the_environment_wins(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("RPS=7\nBURST=20\nTENANT_QUOTAS=tenantA=5,tenantB=8\n")
    monkeypatch.setenv("BURST", "30")
    s = load_settings()
    assert (s.rps, s.burst) == (7, 30)
    assert dict(s.tenant_quotas) == {"tenantA": 5, "tenantB": 8}


def test_every_bad_variable_is_reported_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RPS", "fast")
    monkeypatch.setenv("TENANT_QUOTAS", "tenantA=five")
    monkeypatch.setenv("OPENAI_BASE_URL", "not a url")
    monkeypatch.setenv("QUOTA_FAIL_MODE", "maybe")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    names = [line.split(":")[0] for line in caught.value.lines]
    assert names == ["OPENAI_BASE_URL", "QUOTA_FAIL_MODE", "RPS", "TENANT_QUOTAS"]


def test_tenant_keys_are_kept_hashed_and_never_echoed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TENANT_KEYS", "acme=sk-acme-1,beta=sha256:" + "ab" * 32)
    s = load_settings()
    assert sorted(s.tenant_key_digests.values()) == ["acme", "beta"]
    assert "sk-acme-1" not in repr(s) and "sk-acme-1" not in str(s.describe())
    monkeypatch.setenv("TENANT_KEYS", "acme=sk-acme-1,sk-oops-no-name")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert "sk-oops" not in str(caught.value)


def test_hash_identifiers_needs_a_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HASH_IDENTIFIERS", "true")
    with pytest.raises(ConfigError, match="HASH_SECRET"):
        load_settings()


def test_workers_need_redis(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKERS", "2")
    with pytest.raises(ConfigError, match="WORKERS"):
        load_settings()


def run_gateway(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in base_env().items() if k not in ALL_VARS} | env
    return subprocess.run(
        [sys.executable, str(ROOT / "gateway.py"), *args], env=full, capture_output=True, text=True, timeout=30
    )


def test_bad_value_stops_start_up_with_one_line_and_status_2() -> None:
    result = run_gateway(RPS="abc")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["config error: RPS: Not a valid number."]
    assert "Traceback" not in result.stderr


def test_check_config_masks_secrets() -> None:
    result = run_gateway(
        "--check-config",
        OPENAI_API_KEY="sk-very-secret",
        REDIS_URL="redis://:hunter2@localhost:6379/0",
        TENANT_KEYS="acme=sk-acme-secret",
        HASH_IDENTIFIERS="true",
        HASH_SECRET="pepper-secret",
    )
    assert result.returncode == 0, result.stderr
    for secret in ("sk-very-secret", "hunter2", "sk-acme-secret", "pepper-secret"):
        assert secret not in result.stdout
    assert '"mode": "keyed"' in result.stdout and "acme" in result.stdout


def test_tenant_keys_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# tenants\nacme=sk-acme-1\n\nbeta = sha256:" + "cd" * 32 + "\n")
    monkeypatch.setenv("TENANT_KEYS_FILE", str(keys))
    assert sorted(load_settings().tenant_key_digests.values()) == ["acme", "beta"]
    monkeypatch.setenv("TENANT_KEYS_FILE", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="TENANT_KEYS_FILE"):
        load_settings()


def test_a_port_in_use_is_one_clear_line() -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_gateway(LISTEN_ADDR=f"127.0.0.1:{port}")
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_version_flag() -> None:
    result = run_gateway("--version")
    assert result.returncode == 0
    assert result.stdout.startswith("secure-llm-gateway ")


def test_store_timeout_is_given_in_milliseconds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STORE_TIMEOUT_MS", "400")
    assert load_settings().store_timeout_secs == 0.4
