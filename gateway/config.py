"""Settings: one frozen object, read once. The only module that reads the environment.

`.env` is loaded from the working directory (an explicit path: a PyInstaller bundle has
no source tree to search from) and the real environment wins over it. Every bad variable
is reported at once; `load_settings` raises `ConfigError` with one line per variable.
`Settings.describe()` is what `--check-config` prints: the variables by the names an operator
sets, every secret masked.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import math
import os
import re
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Literal, TypeVar
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from environs import Env, EnvError, EnvValidationError
from marshmallow import ValidationError
from marshmallow.validate import OneOf, Range

if TYPE_CHECKING:
    from .routing import RouteTable

T = TypeVar("T")
PolicyCheck = Callable[[str, str | None], object]  # POLICY_FILE, POLICY_ENTITIES_FILE -> raises ConfigError
REDACT_KIND_NAMES = ("email", "card", "phone", "iban", "ssn")
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
MAX_KEY_BYTES = 256  # SPEC §4: a longer presented key gets 401, so a longer listed key could never match
MASK = "***"
MAX_TOKEN_QUOTA = 10**15  # token budgets stay exact in the store's arithmetic (stores.MAX_TOKENS)
MAX_WINDOW_SECS = 366 * 24 * 3600  # a window in ms stays a small integer for the store
# The slowest rate: one request per longest window. Slower ones made no sense and broke the
# limiter: RPS=1e-320 made every refusal a 500 (its wait overflows), 1e-300 a 300-digit Retry-After.
MIN_RPS = 1 / MAX_WINDOW_SECS
MAX_FILE_BYTES = 16 * 1024 * 1024  # a keys, policy or routes file; far above any real one
# OTEL_* variables the gateway reads itself; every other one is the OpenTelemetry SDK's own.
_GATEWAY_OTEL = frozenset({"OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_SERVICE_NAME"})
# Query parameters known to carry no secret; every other query value is masked when printed.
# The REDIS_URL query options coredis reads as durations (seconds).
_REDIS_DURATIONS = frozenset({"timeout", "stream_timeout", "connect_timeout", "max_idle_time"})
_PLAIN_QUERY_KEYS = frozenset(
    {"db", "protocol", "api-version", "ssl_cert_reqs", "ssl_check_hostname", "timeout", "socket_timeout"}
)
_SECRET_NAME = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL|HEADERS")
_DOTENV_LINES = re.compile(r"\r\n|\n|\r")  # the line breaks python-dotenv counts
_ASSIGNMENT = re.compile(r"[ \t]*(?:export[ \t]+)?([A-Za-z_][A-Za-z0-9_.]*)[ \t]*=")
_OTEL_ASSIGNMENT = re.compile(r"^[ \t]*(?:export[ \t]+)?(OTEL_[A-Za-z0-9_]+)[ \t]*=", re.MULTILINE)
_URL_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/?#\s]*@")


class ConfigError(Exception):
    """Start-up configuration is invalid; `lines` names each bad variable."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("\n".join(lines))
        self.lines = lines


@dataclass(frozen=True, slots=True)
class Settings:
    listen_host: str = "0.0.0.0"
    listen_port: int = 8080
    upstream_base_url: str = field(default="https://api.openai.com", repr=False)  # may hold user info
    upstream_api_key: str | None = field(default=None, repr=False)
    openai_organization: str | None = None  # sent upstream as OpenAI-Organization
    openai_project: str | None = None  # sent upstream as OpenAI-Project
    anthropic_base_url: str = field(default="https://api.anthropic.com", repr=False)  # may hold user info
    anthropic_api_key: str | None = field(default=None, repr=False)
    # The upstreams' egress proxy (HTTPS_PROXY, HTTP_PROXY, NO_PROXY; may hold user info).
    https_proxy: str | None = field(default=None, repr=False)
    http_proxy: str | None = field(default=None, repr=False)
    no_proxy: str = ""
    # The CAs the upstreams (and a rediss:// Redis) are verified against, for OpenSSL, which reads
    # them from os.environ alone: see `export_sdk_environment`.
    ssl_cert_file: str | None = None
    ssl_cert_dir: str | None = None
    rps: float = 5.0
    burst: int = 10
    redis_url: str | None = field(default=None, repr=False)
    redis_cluster: bool = False
    default_quota: int = 120
    quota_window_secs: int = 60
    tenant_quotas: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    quota_fail_mode: Literal["open", "closed"] = "open"
    token_quota: int = 0  # tokens per tenant per token window; 0: no budget (SPEC §14)
    token_window_secs: int = 60
    tenant_token_quotas: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    token_reserve_default: int = 1024  # reserved for the completion of a request with no max-tokens field
    store_timeout_secs: float = 0.25
    timeout_secs: float = 60.0
    stream_idle_secs: float = 300.0  # after the first upstream chunk, silence this long ends a stream
    # A client connection with no request (begun), or taking no byte of a stream, this long is closed.
    client_idle_secs: float = 75.0
    max_concurrency: int = 0
    max_body_bytes: int = 8 * 1024 * 1024
    otlp_endpoint: str | None = field(default=None, repr=False)
    service_name: str = "secure-llm-gateway"
    # sha256(key) -> tenant name; plaintext keys are never kept. All keys, and those of TENANT_KEYS
    # alone (a reload of TENANT_KEYS_FILE merges its new contents with these).
    tenant_key_digests: Mapping[bytes, str] = field(default_factory=lambda: MappingProxyType({}), repr=False)
    inline_key_digests: Mapping[bytes, str] = field(default_factory=lambda: MappingProxyType({}), repr=False)
    tenant_keys_file: str | None = None
    policy_file: str | None = None  # Cedar policies (SPEC §15); both reread on SIGHUP
    policy_entities_file: str | None = None
    hash_identifiers: bool = False
    hash_secret: bytes | None = field(default=None, repr=False)
    trusted_proxies: tuple[IpNetwork, ...] = ()
    redact_kinds: frozenset[str] = frozenset(REDACT_KIND_NAMES)
    shutdown_grace_secs: float = 30.0
    model_label_limit: int = 50
    workers: int = 1
    notify_socket: str | None = None  # systemd's NOTIFY_SOCKET, set by the service manager
    # The OTEL_* variables the OpenTelemetry SDK reads from os.environ itself (sampler, batching,
    # exporter headers), from the environment or `.env`; see `export_sdk_environment`.
    sdk_environment: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}), repr=False)
    # SPEC §13: ROUTES_FILE's table (None without the file: the single upstreams above serve),
    # and the circuit breaker's consecutive failures and first open time.
    routes_file: str | None = None
    routes: RouteTable | None = field(default=None, repr=False)  # holds the upstreams' keys
    cb_failures: int = 5
    cb_open_secs: float = 30.0

    @property
    def upstream_chat_url(self) -> str:
        return _endpoint(self.upstream_base_url, "/v1/chat/completions")

    @property
    def upstream_responses_url(self) -> str:
        return _endpoint(self.upstream_base_url, "/v1/responses")

    @property
    def upstream_embeddings_url(self) -> str:
        return _endpoint(self.upstream_base_url, "/v1/embeddings")

    @property
    def upstream_models_url(self) -> str:
        return _endpoint(self.upstream_base_url, "/v1/models")

    @property
    def upstream_messages_url(self) -> str:
        return _endpoint(self.anthropic_base_url, "/v1/messages")

    @property
    def keyed_mode(self) -> bool:
        return bool(self.tenant_key_digests)

    def describe(self) -> list[tuple[str, str]]:
        """`--check-config`: (variable, effective value) under the names an operator sets,
        every secret masked, every value on one printable line."""
        s = self
        pairs = [
            ("LISTEN_ADDR", _host_port(s.listen_host, s.listen_port)),
            ("OPENAI_BASE_URL", mask_url(s.upstream_base_url)),
            ("OPENAI_API_KEY", MASK if s.upstream_api_key else ""),
            ("OPENAI_ORGANIZATION", s.openai_organization or ""),
            ("OPENAI_PROJECT", s.openai_project or ""),
            ("ANTHROPIC_BASE_URL", mask_url(s.anthropic_base_url)),
            ("ANTHROPIC_API_KEY", MASK if s.anthropic_api_key else ""),
            ("HTTPS_PROXY", mask_url(s.https_proxy) if s.https_proxy else ""),
            ("HTTP_PROXY", mask_url(s.http_proxy) if s.http_proxy else ""),
            ("NO_PROXY", s.no_proxy),
            ("SSL_CERT_FILE", _one_line(s.ssl_cert_file or "")),
            ("SSL_CERT_DIR", _one_line(s.ssl_cert_dir or "")),
            ("RPS", _number(s.rps)),
            ("BURST", str(s.burst)),
            ("TRUSTED_PROXIES", ",".join(str(net) for net in s.trusted_proxies)),
            ("MAX_CONCURRENCY", str(s.max_concurrency)),
            ("ROUTES_FILE", _one_line(s.routes_file or "")),
            ("CB_FAILURES", str(s.cb_failures)),
            ("CB_OPEN_SECS", _number(s.cb_open_secs)),
            ("REDIS_URL", mask_url(s.redis_url) if s.redis_url else ""),
            ("REDIS_CLUSTER", _flag(s.redis_cluster)),
            ("DEFAULT_QUOTA", str(s.default_quota)),
            ("QUOTA_WINDOW_SECS", str(s.quota_window_secs)),
            ("TENANT_QUOTAS", ",".join(f"{s._tenant_shown(name)}={limit}" for name, limit in s.tenant_quotas.items())),
            ("QUOTA_FAIL_MODE", s.quota_fail_mode),
            ("TOKEN_QUOTA", str(s.token_quota)),
            ("TOKEN_WINDOW_SECS", str(s.token_window_secs)),
            (
                "TENANT_TOKEN_QUOTAS",
                ",".join(f"{s._tenant_shown(name)}={limit}" for name, limit in s.tenant_token_quotas.items()),
            ),
            ("TOKEN_RESERVE_DEFAULT", str(s.token_reserve_default)),
            ("STORE_TIMEOUT_MS", _number(round(s.store_timeout_secs * 1000, 3))),
            ("TENANT_KEYS", ",".join(f"{name}={MASK}" for name in s.inline_key_digests.values())),
            ("TENANT_KEYS_FILE", s.tenant_keys_file or ""),
            ("HASH_IDENTIFIERS", _flag(s.hash_identifiers)),
            ("HASH_SECRET", MASK if s.hash_secret else ""),
            ("POLICY_FILE", s.policy_file or ""),
            ("POLICY_ENTITIES_FILE", s.policy_entities_file or ""),
            ("TIMEOUT_SECS", _number(s.timeout_secs)),
            ("STREAM_IDLE_SECS", _number(s.stream_idle_secs)),
            ("CLIENT_IDLE_SECS", _number(s.client_idle_secs)),
            ("MAX_BODY_BYTES", str(s.max_body_bytes)),
            ("REDACT_KINDS", ",".join(kind for kind in REDACT_KIND_NAMES if kind in s.redact_kinds)),
            ("MODEL_LABEL_LIMIT", str(s.model_label_limit)),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", mask_url(s.otlp_endpoint) if s.otlp_endpoint else ""),
            ("OTEL_SERVICE_NAME", s.service_name),
            *sorted((name, _mask_sdk_value(name, value)) for name, value in s.sdk_environment.items()),
            ("SHUTDOWN_GRACE_SECS", _number(s.shutdown_grace_secs)),
            ("WORKERS", str(s.workers)),
        ]
        return [(name, _one_line(value)) for name, value in pairs]

    def _tenant_shown(self, name: str) -> str:
        # In open mode a tenant is the key its clients present (SPEC §4): a secret like any key.
        return name if self.keyed_mode else MASK


def export_sdk_environment(settings: Settings) -> None:
    """Put `.env`'s OTEL_* values into os.environ, where the OpenTelemetry SDK reads them, and
    its SSL_CERT_FILE / SSL_CERT_DIR, where OpenSSL does (environs keeps `.env` to itself: a
    private CA named there was never trusted); a variable already in the environment stays."""
    for name, value in settings.sdk_environment.items():
        os.environ.setdefault(name, value)
    for name, path in (("SSL_CERT_FILE", settings.ssl_cert_file), ("SSL_CERT_DIR", settings.ssl_cert_dir)):
        if path:
            os.environ.setdefault(name, path)


# --- printing: nothing secret, nothing that could pass for a second line ---


def mask_url(url: str) -> str:
    """The URL with its user info, its query values (but a few known harmless ones) and its
    fragment masked: `redis://:***@host`, `https://***@proxy`, `?password=***`."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return MASK
    if "@" in parts.path + parts.query + parts.fragment:
        return MASK  # user info with an unencoded / ? or #: no telling where it ends
    userinfo, at, hostport = parts.netloc.rpartition("@")
    netloc = parts.netloc
    if at:
        user, colon, _ = userinfo.partition(":")
        netloc = (MASK if user else "") + (":" + MASK if colon else "") + "@" + hostport
    query = "&".join(_mask_query_item(item) for item in parts.query.split("&")) if parts.query else ""
    fragment = MASK if parts.fragment else ""
    if parts.scheme and not netloc and url[: len(parts.scheme) + 3].lower() == parts.scheme + "://":
        # An empty host, written as set: urlunsplit drops its "//" for schemes it does not know
        # (unix:///run/r.sock came out as unix:/run/r.sock), and keeps it for a path that starts
        # with "//" as if it were a host's (unix:////run/r.sock as unix://run/r.sock, host "run").
        return (
            parts.scheme
            + "://"
            + parts.path
            + ("?" + query if parts.query else "")
            + ("#" + fragment if fragment else "")
        )
    return urlunsplit((parts.scheme, netloc, parts.path, query, fragment))


def _mask_query_item(item: str) -> str:
    key, eq, _ = item.partition("=")
    if not eq:
        return MASK  # a bare value may be a token itself
    return item if key.lower() in _PLAIN_QUERY_KEYS else f"{key}={MASK}"


def _mask_sdk_value(name: str, value: str) -> str:
    if "HEADERS" in name:  # `authorization=Bearer x,api-key=y`: the names stay, the values go
        return ",".join(_mask_header_item(item) for item in value.split(",") if item.strip())
    if _SECRET_NAME.search(name):
        return MASK if value else ""
    if name.endswith("ENDPOINT"):
        return mask_url(value) if value else ""
    return _URL_USERINFO.sub(rf"\1{MASK}@", value)  # a URL inside, e.g. in OTEL_RESOURCE_ATTRIBUTES


def _mask_header_item(item: str) -> str:
    name, eq, _ = item.partition("=")
    return f"{name.strip()}={MASK}" if eq else MASK  # without "=", the item may be the secret itself


def _one_line(value: str) -> str:
    # A control character (a newline in `.env`, say) is shown escaped, never acted upon.
    return value if value.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in value)


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _flag(value: bool) -> str:
    return "true" if value else "false"


# --- parsers: each raises EnvError with a message that never echoes a secret ---


def _parse_listen_addr(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    # ASCII digits: str.isdigit() also takes "²" (int() then raised: a traceback) and "٨".
    if not sep or not (port.isascii() and port.isdigit()) or not 0 <= int(port) <= 65535:
        raise EnvError("expected host:port, e.g. 0.0.0.0:8080")
    host = host.strip("[]") or "0.0.0.0"
    if not _is_ip(host) and not re.fullmatch(r"[A-Za-z0-9.-]{1,253}", host):
        raise EnvError("the host is neither an IP address nor a host name")
    return host, int(port)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _check_url(value: str, schemes: tuple[str, ...], what: str) -> str:
    """`value`, a URL with one of `schemes` and a host (a path will do for unix://)."""
    if any(not c.isprintable() or c.isspace() for c in value):
        raise EnvError("the URL has white space or control characters")
    try:
        parts = urlsplit(value)
    except ValueError:  # its text may quote the URL: not repeated
        raise EnvError("not a URL") from None
    if "@" in parts.path + parts.query + parts.fragment:
        # An unencoded / ? or # in a password moves the rest of the user info into the path:
        # the host would be wrong, and the password could not be told apart to be masked.
        raise EnvError("an '@' after the host: percent-encode (%40, %2F, %3F, %23) a user name or password")
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise EnvError("the port is not a number in 0..65535") from None
    if parts.scheme not in schemes:
        raise EnvError(f"expected {what}")
    if parts.scheme != "unix" and not parts.hostname:
        raise EnvError("the URL has no host")
    return value


def _parse_http_url(value: str) -> str:
    if urlsplit(_check_url(value, ("http", "https"), "an http:// or https:// URL with a host")).fragment:
        raise EnvError("a URL fragment (#...) is never sent to a server")
    return value


def _parse_proxy_url(value: str) -> str:
    _check_url(value, ("http",), "an http:// proxy URL (an https upstream's TLS goes through it in a tunnel)")
    parts = urlsplit(value)
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise EnvError("a proxy URL is http://[user:password@]host:port, with nothing after")
    if ":" in unquote(parts.username or ""):
        raise EnvError("a user name with ':' cannot go in Basic credentials (RFC 7617)")
    return value


def _set_name(env: Env, lower: str) -> str:
    """The proxy variable's name as set: lower case (curl's), else upper case."""
    return lower if env.str(lower, None) else lower.upper()


def _parse_otlp_url(value: str) -> str:
    if urlsplit(_parse_http_url(value)).query:
        raise EnvError("an OTLP endpoint has no query: /v1/traces is appended to it")
    return value


def _parse_redis_url(value: str) -> str:
    _check_url(value, ("redis", "rediss", "unix"), "a redis://, rediss:// or unix:// URL")
    parts = urlsplit(value)
    database = parts.path.strip("/") if parts.scheme != "unix" else ""
    if database and not (database.isascii() and database.isdigit()):
        # redis://host/abc would run on database 0 without a word: say so instead.
        raise EnvError("the path is a database number (redis://host:6379/0)")
    if parts.scheme == "unix" and not parts.path:
        raise EnvError("a unix:// URL needs the socket's path (unix:///run/redis/redis.sock)")
    _check_redis_options(value)
    return value


def _check_redis_options(value: str) -> None:
    """coredis reads the URL's query options (db, timeout, ssl_cert_reqs, ...) only when the
    store is made, where one it cannot use was a traceback: read them here, the way it will."""
    import coredis  # here: only a configuration with REDIS_URL pays for the import

    try:
        coredis.ConnectionPool.from_url(value, decode_components=True)  # as stores/redis.py reads it
    except Exception:  # whatever it raises: its text may quote a value, so it is not repeated
        parts = urlsplit(value)
        for name, option in parse_qsl(parts.query, keep_blank_values=True):
            alone = urlunsplit(parts._replace(query=urlencode({name: option})))
            try:
                coredis.ConnectionPool.from_url(alone, decode_components=True)
            except Exception:
                raise EnvError(f"the query option {_one_line(name)!r} has a value coredis cannot use") from None
        raise EnvError("coredis cannot read this URL") from None
    # Read, these change what the store gets back: decode_responses reaches coredis' parser as
    # a string (any value fails every call, and /readyz's ping with a 500), and noreply makes
    # every answer None (every call fails). Quotas never enforced, or every request 503.
    for name, option in parse_qsl(urlsplit(value).query, keep_blank_values=True):
        if (name == "decode_responses" and option) or (name == "noreply" and _truthy_query(option)):
            raise EnvError(f"the query option {name!r} cannot be used: the store needs Redis's replies as they are")
        # coredis takes timeout=0 or stream_timeout=-1 too, and then every call fails.
        if name in _REDIS_DURATIONS and option and not _above_zero(option):
            raise EnvError(f"the query option {name!r} must be a number of seconds above 0")


def _above_zero(option: str) -> bool:
    try:
        return 0 < float(option) < math.inf
    except ValueError:
        return False


def _truthy_query(option: str) -> bool:
    """A query flag as coredis reads it: empty is unset, 0/f/false/n/no are false."""
    return option != "" and option.upper() not in ("0", "F", "FALSE", "N", "NO")


def _endpoint(base_url: str, route: str) -> str:
    """The base URL with the route appended (a trailing /v1 not doubled); the path is
    extended, the query (e.g. an api-version) kept after it."""
    parts = urlsplit(base_url)
    path = parts.path.rstrip("/")
    if path.endswith("/v1"):
        path = path[: -len("/v1")]
    return urlunsplit(parts._replace(path=path + route))


def _parse_header_value(value: str) -> str:
    value = value.strip()
    if len(value) > 256 or not all(" " <= c <= "~" for c in value):
        raise EnvError("expected up to 256 printable ASCII characters (it is sent as a header)")
    return value


def _parse_tenant_quotas(value: str) -> Mapping[str, int]:
    quotas: dict[str, int] = {}
    for number, item in enumerate(filter(None, (i.strip() for i in value.split(","))), 1):
        name, sep, limit = item.partition("=")
        if not sep or not name.strip() or not (limit.strip().isascii() and limit.strip().isdigit()):
            # Named by its number, never quoted: in open mode a tenant is a key its clients present.
            raise EnvError(f"entry {number}: expected tenant=limit pairs like tenantA=5,tenantB=8")
        if name.strip() in quotas:  # which one was meant? (TENANT_KEYS refuses a repeat too)
            raise EnvError(f"entry {number}: names a tenant an earlier entry names")
        quotas[name.strip()] = int(limit)
    return MappingProxyType(quotas)


def _parse_api_key(value: str) -> str:
    """An upstream key that can be sent as a header as it is (a stray CR from a CRLF .env, or a
    pasted "…", would fail every request). Never echoed."""
    value = value.strip()
    if not all("!" <= c <= "~" for c in value):
        raise EnvError("the key has a space, a line break or characters outside printable ASCII")
    return value


# What routing.py checks a ROUTES_FILE's upstreams with (EnvError, never echoing the value).
parse_http_url = _parse_http_url
parse_api_key = _parse_api_key
endpoint = _endpoint


def _parse_tenant_token_quotas(value: str) -> Mapping[str, int]:
    """`acme=100000,beta=5000`. An entry is named by its number, never quoted: in open mode a
    tenant is the key its clients present."""
    quotas: dict[str, int] = {}
    items = [item.strip() for item in value.split(",") if item.strip()]
    for number, item in enumerate(items, start=1):
        name, sep, limit = item.partition("=")
        limit = limit.strip()
        if not sep or not name.strip() or not re.fullmatch(r"[0-9]{1,16}", limit) or int(limit) > MAX_TOKEN_QUOTA:
            raise EnvError(f"entry {number}: expected tenant=tokens (0 to 10^15), e.g. acme=100000,beta=5000")
        if name.strip() in quotas:
            raise EnvError(f"entry {number}: names a tenant an earlier entry names")
        quotas[name.strip()] = int(limit)
    return MappingProxyType(quotas)


_SAMPLERS = frozenset(
    {
        "always_on",
        "always_off",
        "traceidratio",
        "parentbased_always_on",
        "parentbased_always_off",
        "parentbased_traceidratio",
    }
)


def _check_sampler(sdk_environment: Mapping[str, str], errors: dict[str, str]) -> None:
    """The SDK only warns on a bad sampler and then samples everything: refuse it here."""
    sampler = sdk_environment.get("OTEL_TRACES_SAMPLER")
    if sampler is not None and sampler not in _SAMPLERS:
        errors["OTEL_TRACES_SAMPLER"] = "expected one of " + ", ".join(sorted(_SAMPLERS))
    argument = sdk_environment.get("OTEL_TRACES_SAMPLER_ARG")
    if argument is not None and (sampler or "").endswith("traceidratio"):
        try:
            ratio = float(argument)
        except ValueError:
            ratio = -1.0
        if not 0.0 <= ratio <= 1.0:
            errors["OTEL_TRACES_SAMPLER_ARG"] = "expected a ratio from 0 to 1 (0.1 samples one trace in ten)"


# What the OTLP exporter accepts in OTEL_EXPORTER_OTLP(_TRACES)_HEADERS: `name=value` entries
# split on commas, the value URL-encoded or plain with spaces (the SDK's "liberal" reading).
_OTLP_HEADER_NAMES = ("OTEL_EXPORTER_OTLP_HEADERS", "OTEL_EXPORTER_OTLP_TRACES_HEADERS")
_OTLP_HEADER_SPLIT = re.compile(r"[ \t]*,[ \t]*")
_OTLP_HEADER = re.compile(
    r"[ \t]*[\x21\x23-\x27\x2a\x2b\x2d\x2e\x30-\x39\x41-\x5a\x5e-\x7a\x7c\x7e]+[ \t]*="
    r"[ \t]*[\x20\x21\x23-\x2b\x2d-\x3a\x3c-\x5b\x5d-\x7e]*[ \t]*"
)


def _check_otlp_headers(sdk_environment: Mapping[str, str], errors: dict[str, str]) -> None:
    """The SDK skips an entry it cannot read with a warning that quotes it, the collector's
    token and all, on stderr: refuse it here, naming the entry by its place, not its text."""
    for name in _OTLP_HEADER_NAMES:
        value = sdk_environment.get(name)
        if not value:
            continue
        entries = [entry for entry in _OTLP_HEADER_SPLIT.split(value) if entry]
        for number, entry in enumerate(entries, start=1):
            if not _OTLP_HEADER.fullmatch(entry.strip()):
                errors[name] = f"entry {number} is not name=value (no quotes, semicolons or backslashes)"
                break


# The BatchSpanProcessor's settings, with the SDK's defaults: it raised on one not above 0 (or
# a batch larger than the queue) when tracing was set up, a traceback and exit status 1, and
# logged a traceback of its own for one int() could not read before taking its default.
_BSP_DEFAULTS = {
    "OTEL_BSP_SCHEDULE_DELAY": 5000,
    "OTEL_BSP_MAX_QUEUE_SIZE": 2048,
    "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": 512,
    "OTEL_BSP_EXPORT_TIMEOUT": 30000,
}


def _check_batch_processor(sdk_environment: Mapping[str, str], errors: dict[str, str]) -> None:
    values = dict(_BSP_DEFAULTS)
    for name in _BSP_DEFAULTS:
        value = sdk_environment.get(name)
        if value is None:
            continue
        if not re.fullmatch(r"[0-9]{1,12}", value.strip()) or int(value) == 0:
            errors[name] = "expected a whole number above 0"
        else:
            values[name] = int(value)
    queue, batch = values["OTEL_BSP_MAX_QUEUE_SIZE"], values["OTEL_BSP_MAX_EXPORT_BATCH_SIZE"]
    if batch > queue and not errors.keys() & {"OTEL_BSP_MAX_QUEUE_SIZE", "OTEL_BSP_MAX_EXPORT_BATCH_SIZE"}:
        errors["OTEL_BSP_MAX_EXPORT_BATCH_SIZE"] = f"above OTEL_BSP_MAX_QUEUE_SIZE ({queue})"


def _check_resource_attributes(sdk_environment: Mapping[str, str], errors: dict[str, str]) -> None:
    """Likewise OTEL_RESOURCE_ATTRIBUTES: the SDK warns of an entry without "=" quoting it (a
    token, a URL with its password) and starts without it."""
    value = sdk_environment.get("OTEL_RESOURCE_ATTRIBUTES")
    if value:
        for number, entry in enumerate(value.split(","), start=1):
            if entry.strip() and "=" not in entry:
                errors["OTEL_RESOURCE_ATTRIBUTES"] = f"entry {number} is not key=value"
                break


def _key_digest(key: str, entry: str) -> bytes:
    # The prefix in any case: `SHA256:<hex>` taken as a plaintext key refused the client's key
    # and made the hash, the part of the configuration meant to be harmless, the key that admits.
    if key[: len("sha256:")].lower() == "sha256:":
        hexdigest = key[len("sha256:") :]
        try:
            digest = bytes.fromhex(hexdigest)
        except ValueError:
            digest = b""
        if len(digest) != 32:
            raise EnvError(f"{entry}: a sha256: key needs 64 hex digits")
        return digest
    # SPEC §4: such a key is refused (401) when presented, so listing it would lock its tenant out.
    if len(key.encode()) > MAX_KEY_BYTES:
        raise EnvError(f"{entry}: the key is longer than {MAX_KEY_BYTES} bytes, so no client could present it")
    if not all("!" <= c <= "~" for c in key):  # as tenancy.py admits keys: no space either
        raise EnvError(
            f"{entry}: the key has a space or characters outside printable ASCII, so no client could present it"
        )
    return hashlib.sha256(key.encode()).digest()


def parse_tenant_key_entries(
    entries: list[tuple[int, str]], unit: str, known: Mapping[bytes, str] | None = None
) -> dict[bytes, str]:
    """Numbered `name=key` entries → {sha256(key): name}. Raises EnvError naming the entry by
    `unit` and number ("line 3"), never by its text: it holds a secret. A key listed twice
    (here or in `known`) is an error too: which tenant it names would depend on the order."""
    digests: dict[bytes, str] = {}
    for number, text in entries:
        entry = f"{unit} {number}"
        name, sep, key = text.partition("=")
        name, key = name.strip(), key.strip()
        if not sep or not name or not key:
            raise EnvError(f"{entry} is not name=key")
        if not name.isprintable():
            raise EnvError(f"{entry}: the tenant name has control characters")
        digest = _key_digest(key, entry)
        if digest in digests or (known is not None and digest in known):
            raise EnvError(f"{entry}: the key is listed already (each key names one tenant)")
        digests[digest] = name
    return digests


def read_config_file(path: str) -> bytes:
    """The bytes of a file-backed setting (TENANT_KEYS_FILE, POLICY_FILE, ROUTES_FILE...). Raises
    OSError. These are read in the event loop's thread, at start-up and on SIGHUP: a path swapped
    for a FIFO (open() waits for a writer) or a device (/dev/zero: read() never ends) froze every
    connection, /healthz included. So: opened without blocking, a regular file only, bounded."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with open(fd, "rb") as file:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(0, "not a regular file")
        data = file.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise OSError(0, f"larger than {MAX_FILE_BYTES // (1024 * 1024)} MiB")
    # A file saved by a Windows editor starts with a UTF-8 BOM: taken as `.env`'s is, not refused
    # as a tenant name with a control character, an invalid Cedar token or TOML statement.
    return data.removeprefix(b"\xef\xbb\xbf")


def read_tenant_keys_file(path: str, known: Mapping[bytes, str] | None = None) -> dict[bytes, str]:
    """The keys of TENANT_KEYS_FILE, one `name=key` per line, `#` comments. Raises EnvError;
    a file without a single key is one too (it would turn keyed mode into open mode)."""
    try:
        lines = read_config_file(path).decode("utf-8").split("\n")  # numbered as an editor shows them
    except OSError as exc:
        raise EnvError(f"cannot read {_one_line(path)}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise EnvError(f"{_one_line(path)} is not UTF-8 text") from None
    entries = [(n, ln) for n, ln in enumerate(lines, start=1) if ln.strip() and not ln.lstrip().startswith("#")]
    if not entries:
        raise EnvError(f"{_one_line(path)} has no name=key entry")
    try:
        return parse_tenant_key_entries(entries, "line", known)
    except EnvError as exc:  # the file named, as every other file's error names it (SPEC §10)
        raise EnvError(f"{_one_line(path)}: {exc}") from None


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


def load_settings(env_file: Path | None = None, check_policies: PolicyCheck | None = None) -> Settings:
    """Read `.env` (working directory by default) under the real environment; validate all.
    `check_policies(POLICY_FILE, POLICY_ENTITIES_FILE)` raises ConfigError for files that do not
    load (the entry point passes the policy loader, a layer above this one): their problems are
    reported with every other bad variable's."""
    env = Env(eager=False)
    dotenv = env_file if env_file is not None else Path.cwd() / ".env"
    otel_in_file: list[str] = []
    unparsed: list[tuple[int, str]] = []
    # Anything at the path counts: a `.env` directory (docker's bind mount of a missing file) or a
    # dangling symlink skipped without a word served on the defaults, open mode for TENANT_KEYS.
    if os.path.lexists(dotenv):
        try:  # read here first: environs would let an unreadable file out as a traceback
            text = read_config_file(str(dotenv)).decode("utf-8")
        except OSError as exc:
            raise ConfigError([f"{_one_line(str(dotenv))}: cannot read it: {exc.strerror}"]) from None
        except UnicodeDecodeError:
            raise ConfigError([f"{_one_line(str(dotenv))}: not UTF-8 text"]) from None
        watch = _UnparsedAssignments(_DOTENV_LINES.split(text))
        dotenv_log = logging.getLogger("dotenv.main")  # python-dotenv warns there of a line it drops
        dotenv_log.addFilter(watch)
        try:
            env.read_env(str(dotenv), recurse=False, override=False)  # into env, under os.environ
        finally:
            dotenv_log.removeFilter(watch)
        unparsed = watch.found  # refused in _read, with every other bad variable
        otel_in_file = _OTEL_ASSIGNMENT.findall(text)
    return _read(env, otel_in_file, dotenv, unparsed, check_policies)


class _UnparsedAssignments(logging.Filter):
    """Watches python-dotenv's warning of a line it could not parse (and dropped): when the line
    assigns a variable the real environment does not set (`NAME="value` with its quote unclosed),
    the variable would silently keep its default, so it is noted for start-up to refuse; any other
    line keeps the warning and is ignored, as before."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__()
        self.lines = lines
        self.found: list[tuple[int, str]] = []

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        if not (str(record.msg).startswith("python-dotenv could not parse") and args and isinstance(args[0], int)):
            return True
        line = args[0]
        match = _ASSIGNMENT.match(self.lines[line - 1]) if 0 < line <= len(self.lines) else None
        if match is None or match.group(1) in os.environ:  # the real environment's value wins anyway
            return True
        self.found.append((line, match.group(1)))
        return False


def environment(env_file: Path | None = None) -> dict[str, str]:
    """The real environment over `.env`'s values: where ROUTES_FILE's `api_key_env` names are
    looked up, at start-up and on a reload."""
    from dotenv import dotenv_values  # environs' own .env reader

    dotenv = env_file if env_file is not None else Path.cwd() / ".env"
    values: dict[str, str] = {}
    if dotenv.is_file():
        try:
            values = {k: v for k, v in dotenv_values(dotenv).items() if v is not None}
        except (OSError, UnicodeDecodeError):
            values = {}  # load_settings reports an unreadable .env itself
    return values | dict(os.environ)


def _sdk_environment(env: Env, otel_in_file: list[str]) -> Mapping[str, str]:
    """The SDK's OTEL_* variables, each as environs reads it: the real environment first."""
    names = ({n for n in os.environ if n.startswith("OTEL_")} | set(otel_in_file)) - _GATEWAY_OTEL
    values = {name: env.str(name, None) for name in sorted(names)}
    return MappingProxyType({name: value for name, value in values.items() if value is not None})


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

    def tenant_keys(self) -> tuple[dict[bytes, str], dict[bytes, str], str | None]:
        """(all keys, those of TENANT_KEYS, the TENANT_KEYS_FILE path)."""
        inline: dict[bytes, str] = {}
        raw_keys = self.env.str("TENANT_KEYS", None)
        if raw_keys:
            try:
                items = [item for item in raw_keys.split(",") if item.strip()]  # a trailing comma is no entry
                inline = parse_tenant_key_entries(list(enumerate(items, start=1)), "entry")
            except EnvError as exc:
                self.errors["TENANT_KEYS"] = str(exc)
        keys_file = self.env.str("TENANT_KEYS_FILE", None) or None
        from_file: dict[bytes, str] = {}
        if keys_file:
            try:
                from_file = read_tenant_keys_file(keys_file, inline)
            except EnvError as exc:
                self.errors["TENANT_KEYS_FILE"] = str(exc)
        return inline | from_file, inline, keys_file


def _is_utf8(value: str) -> bool:
    """Whether `value` is text (os.environ holds the bytes that are not as lone surrogates)."""
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def _check_rps(value: float) -> bool:
    if 0 < value < MIN_RPS:
        raise ValidationError(f"expected 0 (off) or at least {MIN_RPS:.2g} (one request in 366 days)")
    return True


def _read(
    env: Env,
    otel_in_file: list[str],
    dotenv: Path,
    unparsed: list[tuple[int, str]],
    check_policies: PolicyCheck | None,
) -> Settings:
    r = _Reader(env)
    for line, name in unparsed:  # the variable would be left at its default: refuse, naming it (never its value)
        r.errors.setdefault(name, f"{_one_line(str(dotenv))} line {line} does not parse (an unclosed quote?)")
    sdk_environment = _sdk_environment(env, otel_in_file)
    non_negative, positive, above_zero = Range(min=0), Range(min=1), Range(min=0, min_inclusive=False)
    host, port = r.custom("LISTEN_ADDR", _parse_listen_addr, ("0.0.0.0", 8080))
    base_url = r.custom("OPENAI_BASE_URL", _parse_http_url, "https://api.openai.com")
    anthropic_url = r.custom("ANTHROPIC_BASE_URL", _parse_http_url, "https://api.anthropic.com")
    redis_url = r.custom("REDIS_URL", _parse_redis_url, None)
    # The upstreams' egress proxy, under the names every HTTP client reads (lower case first, as curl).
    https_proxy = r.custom(_set_name(env, "https_proxy"), _parse_proxy_url, None)
    http_proxy = r.custom(_set_name(env, "http_proxy"), _parse_proxy_url, None)
    no_proxy = env.str(_set_name(env, "no_proxy"), None) or ""
    # One that is not there is passed over by OpenSSL: tls.py warns of it.
    ssl_cert_file = env.str("SSL_CERT_FILE", None) or None
    ssl_cert_dir = env.str("SSL_CERT_DIR", None) or None
    no_quotas: Mapping[str, int] = MappingProxyType({})
    tenant_quotas = r.custom("TENANT_QUOTAS", _parse_tenant_quotas, no_quotas)
    tenant_token_quotas = r.custom("TENANT_TOKEN_QUOTAS", _parse_tenant_token_quotas, no_quotas)
    no_proxies: tuple[IpNetwork, ...] = ()
    trusted = r.custom("TRUSTED_PROXIES", _parse_trusted_proxies, no_proxies)
    otlp = r.custom("OTEL_EXPORTER_OTLP_ENDPOINT", _parse_otlp_url, None)
    organization = r.custom("OPENAI_ORGANIZATION", _parse_header_value, None) or None
    project = r.custom("OPENAI_PROJECT", _parse_header_value, None) or None
    if env.str("REDACT_KINDS", None) is None:
        redact_kinds = frozenset(REDACT_KIND_NAMES)
    else:  # set but empty turns redaction off
        redact_kinds = r.custom("REDACT_KINDS", _parse_redact_kinds, frozenset())
    digests, inline_digests, keys_file = r.tenant_keys()
    policy_file = env.str("POLICY_FILE", None) or None
    policy_entities_file = env.str("POLICY_ENTITIES_FILE", None) or None
    if policy_entities_file and not policy_file:
        r.errors["POLICY_ENTITIES_FILE"] = "needs POLICY_FILE: entities alone decide nothing"
    elif policy_file and check_policies is not None:
        try:
            check_policies(policy_file, policy_entities_file)
        except ConfigError as error:
            variable, _, policy_problem = error.lines[0].partition(": ")
            r.errors[variable] = policy_problem
    hash_identifiers = bool(env.bool("HASH_IDENTIFIERS", False))
    hash_secret = env.str("HASH_SECRET", None)
    if hash_identifiers and not hash_secret:
        r.errors["HASH_SECRET"] = "required when HASH_IDENTIFIERS=true"
    api_key = r.custom("OPENAI_API_KEY", _parse_api_key, None) or None
    if api_key and "OPENAI_BASE_URL" not in r.errors and urlsplit(base_url).netloc.rpartition("@")[1]:
        # aiohttp refuses a request that has both, so every request would fail.
        r.errors["OPENAI_BASE_URL"] = "user info in the URL and OPENAI_API_KEY cannot both be sent (drop one)"

    anthropic_key = r.custom("ANTHROPIC_API_KEY", _parse_api_key, None) or None
    _check_sampler(sdk_environment, r.errors)
    _check_otlp_headers(sdk_environment, r.errors)
    _check_resource_attributes(sdk_environment, r.errors)
    _check_batch_processor(sdk_environment, r.errors)
    # The real environment may hold any bytes (`HASH_SECRET=$(head -c 32 /dev/urandom)`); `.env`
    # is read as UTF-8. Such a value could not be used: the secret's was a traceback, a service
    # name's or resource attribute's an exporter traceback at every batch.
    not_utf8 = [("HASH_SECRET", hash_secret), ("OTEL_SERVICE_NAME", env.str("OTEL_SERVICE_NAME", None))]
    for name, value in [*not_utf8, *sdk_environment.items()]:
        if value and not _is_utf8(value):
            r.errors[name] = "not UTF-8 text"
    routes_file = env.str("ROUTES_FILE", None) or None
    routes = None
    if routes_file:
        from .routing import load_routes  # here: routing checks its URLs and keys with this module's parsers

        try:
            routes = load_routes(routes_file, environment(dotenv))
        except ConfigError as error:
            r.errors["ROUTES_FILE"] = error.lines[0].removeprefix("ROUTES_FILE: ")

    store_timeout_ms = env.int("STORE_TIMEOUT_MS", 250, validate=positive)
    settings = dict(
        upstream_api_key=api_key,
        anthropic_api_key=anthropic_key,
        rps=env.float("RPS", 5.0, validate=[non_negative, _check_rps]),
        burst=env.int("BURST", 10, validate=positive),
        redis_cluster=env.bool("REDIS_CLUSTER", False),
        default_quota=env.int("DEFAULT_QUOTA", 120, validate=non_negative),
        quota_window_secs=env.int("QUOTA_WINDOW_SECS", 60, validate=Range(min=1, max=MAX_WINDOW_SECS)),
        quota_fail_mode=env.str("QUOTA_FAIL_MODE", "open", validate=OneOf(["open", "closed"])),
        token_quota=env.int("TOKEN_QUOTA", 0, validate=Range(min=0, max=MAX_TOKEN_QUOTA)),
        token_window_secs=env.int("TOKEN_WINDOW_SECS", 60, validate=Range(min=1, max=MAX_WINDOW_SECS)),
        token_reserve_default=env.int("TOKEN_RESERVE_DEFAULT", 1024, validate=Range(min=0, max=MAX_TOKEN_QUOTA)),
        timeout_secs=env.float("TIMEOUT_SECS", 60.0, validate=above_zero),
        stream_idle_secs=env.float("STREAM_IDLE_SECS", 300.0, validate=above_zero),
        client_idle_secs=env.float("CLIENT_IDLE_SECS", 75.0, validate=above_zero),
        max_concurrency=env.int("MAX_CONCURRENCY", 0, validate=non_negative),
        max_body_bytes=env.int("MAX_BODY_BYTES", 8 * 1024 * 1024, validate=positive),
        service_name=env.str("OTEL_SERVICE_NAME", "secure-llm-gateway") or "secure-llm-gateway",
        shutdown_grace_secs=env.float("SHUTDOWN_GRACE_SECS", 30.0, validate=non_negative),
        model_label_limit=env.int("MODEL_LABEL_LIMIT", 50, validate=positive),
        workers=env.int("WORKERS", 1, validate=Range(min=1, max=1024)),  # a typo must not fork thousands
        notify_socket=env.str("NOTIFY_SOCKET", None) or None,
        cb_failures=env.int("CB_FAILURES", 5, validate=Range(min=1, max=1_000_000)),
        cb_open_secs=env.float("CB_OPEN_SECS", 30.0, validate=Range(min=0, max=3600, min_inclusive=False)),
    )
    try:
        env.seal()
    except EnvValidationError as exc:
        messages: Mapping[str, object] = exc.error_messages  # type: ignore[assignment]
        for name, problem in messages.items():
            r.errors[str(name)] = " ".join(str(m) for m in _flatten(problem))
    if settings["redis_cluster"] and redis_url and urlsplit(redis_url).scheme == "unix":
        # coredis' cluster pool asserts a TCP address: this was a traceback when the store was made.
        r.errors["REDIS_URL"] = "a Redis Cluster is reached over TCP (redis:// or rediss://), not unix://"
    if "WORKERS" not in r.errors and int(settings["workers"] or 1) > 1 and not redis_url:
        r.errors["WORKERS"] = (
            "WORKERS>1 needs REDIS_URL: with the in-memory store each worker would count its own quota"
        )
    if "WORKERS" not in r.errors and int(settings["workers"] or 1) > 1 and port == 0:
        r.errors["LISTEN_ADDR"] = (
            "WORKERS>1 needs a fixed port: with port 0 each worker would listen on a port of its own"
        )
    if r.errors:
        raise ConfigError([f"{name}: {message}" for name, message in sorted(r.errors.items())])

    return Settings(
        listen_host=host,
        listen_port=port,
        upstream_base_url=base_url,
        anthropic_base_url=anthropic_url,
        https_proxy=https_proxy,
        http_proxy=http_proxy,
        no_proxy=no_proxy,
        ssl_cert_file=ssl_cert_file,
        ssl_cert_dir=ssl_cert_dir,
        openai_organization=organization,
        openai_project=project,
        redis_url=redis_url,
        tenant_quotas=tenant_quotas,
        tenant_token_quotas=tenant_token_quotas,
        trusted_proxies=trusted,
        otlp_endpoint=otlp,
        redact_kinds=redact_kinds,
        tenant_key_digests=MappingProxyType(digests),
        inline_key_digests=MappingProxyType(inline_digests),
        tenant_keys_file=keys_file,
        policy_file=policy_file,
        policy_entities_file=policy_entities_file,
        hash_identifiers=hash_identifiers,
        hash_secret=hash_secret.encode() if hash_identifiers and hash_secret else None,
        store_timeout_secs=store_timeout_ms / 1000,
        sdk_environment=sdk_environment,
        routes_file=routes_file,
        routes=routes,
        **settings,  # type: ignore[arg-type]  # environs' values, validated above
    )


def _flatten(messages: object) -> list[object]:
    if isinstance(messages, (list, tuple)):
        return [m for item in messages for m in _flatten(item)]
    if isinstance(messages, dict):
        return [m for item in messages.values() for m in _flatten(item)]
    return [messages]
