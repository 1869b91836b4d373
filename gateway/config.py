"""Settings: one frozen object, read once. The only module that reads the environment.

`.env` is loaded from the working directory (an explicit path: a PyInstaller bundle has
no source tree to search from) and the real environment wins over it. Every bad variable
is reported at once; `load_settings` raises `ConfigError` with one line per variable.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Literal, TypeVar
from urllib.parse import urlsplit

from environs import Env, EnvError, EnvValidationError
from marshmallow.validate import OneOf, Range

T = TypeVar("T")
REDACT_KIND_NAMES = ("email", "card", "phone", "iban", "ssn")
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class ConfigError(Exception):
    """Start-up configuration is invalid; `lines` names each bad variable."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("\n".join(lines))
        self.lines = lines


@dataclass(frozen=True, slots=True)
class Settings:
    listen_host: str = "0.0.0.0"
    listen_port: int = 8080
    upstream_base_url: str = "https://api.openai.com"
    upstream_api_key: str | None = field(default=None, repr=False)
    rps: float = 5.0
    burst: int = 10
    redis_url: str | None = field(default=None, repr=False)
    redis_cluster: bool = False
    default_quota: int = 120
    quota_window_secs: int = 60
    tenant_quotas: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    quota_fail_mode: Literal["open", "closed"] = "open"
    store_timeout_secs: float = 0.25
    timeout_secs: float = 60.0
    max_concurrency: int = 0
    max_body_bytes: int = 8 * 1024 * 1024
    otlp_endpoint: str | None = None
    service_name: str = "secure-llm-gateway"
    # sha256(key) -> tenant name; plaintext keys are never kept.
    tenant_key_digests: Mapping[bytes, str] = field(default_factory=lambda: MappingProxyType({}), repr=False)
    hash_identifiers: bool = False
    hash_secret: bytes | None = field(default=None, repr=False)
    trusted_proxies: tuple[IpNetwork, ...] = ()
    redact_kinds: frozenset[str] = frozenset(REDACT_KIND_NAMES)
    shutdown_grace_secs: float = 30.0
    model_label_limit: int = 50
    workers: int = 1
    notify_socket: str | None = None  # systemd's NOTIFY_SOCKET, set by the service manager

    @property
    def upstream_chat_url(self) -> str:
        base = self.upstream_base_url.rstrip("/")
        if base.endswith("/v1"):
            base = base[: -len("/v1")]
        return base + "/v1/chat/completions"

    @property
    def keyed_mode(self) -> bool:
        return bool(self.tenant_key_digests)

    def describe(self) -> dict[str, object]:
        """The effective configuration for `--check-config`, with every secret masked."""
        out: dict[str, object] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("upstream_api_key", "hash_secret"):
                value = "(set, masked)" if value else "(unset)"
            elif f.name == "tenant_key_digests":
                value = sorted(set(value.values()))
                out["tenants"] = value
                continue
            elif f.name == "redis_url" and value:
                value = _mask_url_password(value)
            elif isinstance(value, Mapping):
                value = dict(value)
            elif isinstance(value, frozenset):
                value = sorted(value)
            elif isinstance(value, tuple):
                value = [str(v) for v in value]
            out[f.name] = value
        out["upstream_chat_url"] = self.upstream_chat_url
        out["mode"] = "keyed" if self.keyed_mode else "open"
        return out


def _mask_url_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(":" + parts.password + "@", ":***@")
    return parts._replace(netloc=netloc).geturl()


# --- parsers: each raises EnvError with a message that never echoes a secret ---


def _parse_listen_addr(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise EnvError("expected host:port, e.g. 0.0.0.0:8080")
    return host.strip("[]") or "0.0.0.0", int(port)


def _parse_http_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise EnvError("expected an http:// or https:// URL with a host")
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError as exc:
        raise EnvError("the port is not a number in 0..65535") from exc
    return value


def _parse_redis_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise EnvError("expected a redis://, rediss:// or unix:// URL")
    if parts.scheme != "unix" and not parts.hostname:
        raise EnvError("the URL has no host")
    return value


def _parse_tenant_quotas(value: str) -> Mapping[str, int]:
    quotas: dict[str, int] = {}
    for item in filter(None, (i.strip() for i in value.split(","))):
        name, sep, limit = item.partition("=")
        if not sep or not name.strip() or not limit.strip().isdigit():
            raise EnvError(f"expected tenant=limit pairs like tenantA=5,tenantB=8, got {item!r}")
        quotas[name.strip()] = int(limit)
    return MappingProxyType(quotas)


def _key_digest(key: str) -> bytes:
    if key.startswith("sha256:"):
        hexdigest = key[len("sha256:") :]
        try:
            digest = bytes.fromhex(hexdigest)
        except ValueError:
            digest = b""
        if len(digest) != 32:
            raise EnvError("a sha256: entry needs 64 hex digits")
        return digest
    return hashlib.sha256(key.encode()).digest()


def _parse_tenant_key_entries(entries: list[str], where: str) -> dict[bytes, str]:
    digests: dict[bytes, str] = {}
    for number, entry in enumerate(entries, start=1):
        name, sep, key = entry.partition("=")
        name, key = name.strip(), key.strip()
        if not sep or not name or not key:
            # Never echo the entry: it holds a secret.
            raise EnvError(f"entry {number} of {where} is not name=key")
        digests[_key_digest(key)] = name
    return digests


def _parse_trusted_proxies(value: str) -> tuple[IpNetwork, ...]:
    nets: list[IpNetwork] = []
    for item in filter(None, (i.strip() for i in value.split(","))):
        try:
            nets.append(ipaddress.ip_network(item, strict=False))
        except ValueError as exc:
            raise EnvError(f"{item!r} is not an IP address or CIDR network") from exc
    return tuple(nets)


def _parse_redact_kinds(value: str) -> frozenset[str]:
    kinds = frozenset(k.strip().lower() for k in value.split(",") if k.strip())
    unknown = kinds - set(REDACT_KIND_NAMES)
    if unknown:
        raise EnvError(f"unknown kind(s) {sorted(unknown)}; known: {', '.join(REDACT_KIND_NAMES)}")
    return kinds


def load_settings(env_file: Path | None = None) -> Settings:
    """Read `.env` (working directory by default) under the real environment; validate all."""
    env = Env(eager=False)
    dotenv = env_file if env_file is not None else Path.cwd() / ".env"
    if dotenv.is_file():
        env.read_env(str(dotenv), recurse=False, override=False)  # into env, under os.environ
    return _read(env)


class _Reader:
    """Collects every problem instead of stopping at the first."""

    def __init__(self, env: Env) -> None:
        self.env = env
        self.errors: dict[str, str] = {}

    def custom(self, name: str, parse: Callable[[str], T], default: T) -> T:
        raw = self.env.str(name, None)
        if raw is None or raw == "":
            return default
        try:
            return parse(raw)
        except EnvError as exc:
            self.errors[name] = str(exc)
            return default

    def tenant_keys(self) -> dict[bytes, str]:
        digests: dict[bytes, str] = {}
        raw_keys = self.env.str("TENANT_KEYS", None)
        if raw_keys:
            try:
                digests.update(_parse_tenant_key_entries(raw_keys.split(","), "TENANT_KEYS"))
            except EnvError as exc:
                self.errors["TENANT_KEYS"] = str(exc)
        keys_file = self.env.str("TENANT_KEYS_FILE", None)
        if keys_file:
            try:
                lines = Path(keys_file).read_text().splitlines()
                entries = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
                digests.update(_parse_tenant_key_entries(entries, "TENANT_KEYS_FILE"))
            except OSError as exc:
                self.errors["TENANT_KEYS_FILE"] = f"cannot read {keys_file}: {exc.strerror}"
            except EnvError as exc:
                self.errors["TENANT_KEYS_FILE"] = str(exc)
        return digests


def _read(env: Env) -> Settings:
    r = _Reader(env)
    non_negative, positive = Range(min=0), Range(min=1)
    host, port = r.custom("LISTEN_ADDR", _parse_listen_addr, ("0.0.0.0", 8080))
    base_url = r.custom("OPENAI_BASE_URL", _parse_http_url, "https://api.openai.com")
    redis_url = r.custom("REDIS_URL", _parse_redis_url, None)
    no_quotas: Mapping[str, int] = MappingProxyType({})
    tenant_quotas = r.custom("TENANT_QUOTAS", _parse_tenant_quotas, no_quotas)
    no_proxies: tuple[IpNetwork, ...] = ()
    trusted = r.custom("TRUSTED_PROXIES", _parse_trusted_proxies, no_proxies)
    otlp = r.custom("OTEL_EXPORTER_OTLP_ENDPOINT", _parse_http_url, None)
    if env.str("REDACT_KINDS", None) is None:
        redact_kinds = frozenset(REDACT_KIND_NAMES)
    else:  # set but empty turns redaction off
        redact_kinds = r.custom("REDACT_KINDS", _parse_redact_kinds, frozenset())
    digests = r.tenant_keys()
    hash_identifiers = bool(env.bool("HASH_IDENTIFIERS", False))
    hash_secret = env.str("HASH_SECRET", None)
    if hash_identifiers and not hash_secret:
        r.errors["HASH_SECRET"] = "required when HASH_IDENTIFIERS=true"

    store_timeout_ms = env.int("STORE_TIMEOUT_MS", 250, validate=positive)
    settings = dict(
        upstream_api_key=env.str("OPENAI_API_KEY", None) or None,
        rps=env.float("RPS", 5.0, validate=non_negative),
        burst=env.int("BURST", 10, validate=positive),
        redis_cluster=env.bool("REDIS_CLUSTER", False),
        default_quota=env.int("DEFAULT_QUOTA", 120, validate=non_negative),
        quota_window_secs=env.int("QUOTA_WINDOW_SECS", 60, validate=positive),
        quota_fail_mode=env.str("QUOTA_FAIL_MODE", "open", validate=OneOf(["open", "closed"])),
        timeout_secs=env.float("TIMEOUT_SECS", 60.0, validate=Range(min=0, min_inclusive=False)),
        max_concurrency=env.int("MAX_CONCURRENCY", 0, validate=non_negative),
        max_body_bytes=env.int("MAX_BODY_BYTES", 8 * 1024 * 1024, validate=positive),
        service_name=env.str("OTEL_SERVICE_NAME", "secure-llm-gateway") or "secure-llm-gateway",
        shutdown_grace_secs=env.float("SHUTDOWN_GRACE_SECS", 30.0, validate=non_negative),
        model_label_limit=env.int("MODEL_LABEL_LIMIT", 50, validate=positive),
        workers=env.int("WORKERS", 1, validate=positive),
        notify_socket=env.str("NOTIFY_SOCKET", None) or None,
    )
    try:
        env.seal()
    except EnvValidationError as exc:
        messages: Mapping[str, object] = exc.error_messages  # type: ignore[assignment]
        for name, problem in messages.items():
            r.errors[str(name)] = " ".join(str(m) for m in _flatten(problem))
    if "WORKERS" not in r.errors and int(settings["workers"] or 1) > 1 and not redis_url:
        r.errors["WORKERS"] = (
            "WORKERS>1 needs REDIS_URL: with the in-memory store each worker would count its own quota"
        )
    if r.errors:
        raise ConfigError([f"{name}: {message}" for name, message in sorted(r.errors.items())])

    return Settings(
        listen_host=host,
        listen_port=port,
        upstream_base_url=base_url,
        redis_url=redis_url,
        tenant_quotas=tenant_quotas,
        trusted_proxies=trusted,
        otlp_endpoint=otlp,
        redact_kinds=redact_kinds,
        tenant_key_digests=MappingProxyType(digests),
        hash_identifiers=hash_identifiers,
        hash_secret=hash_secret.encode() if hash_identifiers and hash_secret else None,
        store_timeout_secs=store_timeout_ms / 1000,
        **settings,  # type: ignore[arg-type]  # environs' values, validated above
    )


def _flatten(messages: object) -> list[object]:
    if isinstance(messages, (list, tuple)):
        return [m for item in messages for m in _flatten(item)]
    if isinstance(messages, dict):
        return [m for item in messages.values() for m in _flatten(item)]
    return [messages]
