"""An https upstream, as every real provider is, through the real process (GATEWAY_CMD's build,
if set: the one-file binary carries its own OpenSSL). Its certificate is verified: against
SSL_CERT_FILE, or the system's CA bundle wherever the distribution keeps it. Reached through
an egress proxy (HTTPS_PROXY) when one is set, but for loopback upstreams and NO_PROXY."""

from __future__ import annotations

import base64
import contextlib
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from ..harness import ROOT, Gateway, Mock, Process, RedisServer, base_env, free_cluster_port, free_port, wait_until

BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "write to jane.doe@example.com"}]}


def self_signed(directory: Path, name: str, names: str = "IP:127.0.0.1,DNS:upstream.test") -> tuple[Path, Path]:
    """A certificate for `names` (127.0.0.1 and upstream.test) that is its own CA, and its key."""
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            f"/CN={name}",
            "-addext",
            f"subjectAltName={names}",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """The upstream's certificate and key, and another CA's certificate."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command (Debian's openssl) to make certificates")
    directory = tmp_path_factory.mktemp("tls")
    cert, key = self_signed(directory, "upstream")
    other, _ = self_signed(directory, "other")
    return cert, key, other


@pytest.fixture(scope="module")
def tls_mock(tmp_path_factory: pytest.TempPathFactory, certificates: tuple[Path, Path, Path]) -> Iterator[Mock]:
    cert, key, _ = certificates
    mock = Mock(tmp_path_factory.mktemp("tls-mock"), TLS_CERT=str(cert), TLS_KEY=str(key))
    assert mock.url.startswith("https://")
    yield mock
    mock.stop()


@pytest.fixture
def cleanup() -> Iterator[contextlib.ExitStack]:
    """Processes stopped when the test ends, however far its setup got (a Redis started
    before a step that failed was left running)."""
    with contextlib.ExitStack() as stack:
        yield stack


@pytest.fixture
def no_ca_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)


def gateway_to(tmp_path: Path, upstream: Mock, wrap: list[str] | None = None, **env: str) -> Gateway:
    settings = {"OPENAI_BASE_URL": upstream.url, "OPENAI_API_KEY": "sk-upstream-secret"} | env
    return Gateway(tmp_path, settings, wrap=wrap)


def test_an_https_upstream_answers_and_streams_when_its_ca_is_trusted(
    tmp_path: Path, tls_mock: Mock, certificates: tuple[Path, Path, Path], no_ca_settings: None
) -> None:
    cert, _, _ = certificates
    gateway = gateway_to(tmp_path, tls_mock, SSL_CERT_FILE=str(cert))
    try:
        client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(**BODY, extra_headers={"x-stainless-mock-echo": "1"})
        assert reply.choices[0].message.content is not None
        assert "jane.doe@example.com" not in reply.choices[0].message.content
        assert "@example.com" in reply.choices[0].message.content  # echoed, masked
        chunks = client.chat.completions.create(**BODY, stream=True, extra_headers={"x-stainless-mock-echo": "1"})
        text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
        assert "@example.com" in text and "jane.doe" not in text
    finally:
        gateway.stop()


def test_a_ca_named_in_dotenv_is_trusted_as_one_in_the_environment(
    tmp_path: Path, tls_mock: Mock, certificates: tuple[Path, Path, Path], no_ca_settings: None
) -> None:
    """SPEC §2: `.env` is read first, the real environment wins. SSL_CERT_FILE in `.env` was
    never seen by OpenSSL, which reads os.environ alone: a private CA named there was not
    trusted, and every request was a 502."""
    cert, _, _ = certificates
    settings = {"OPENAI_BASE_URL": tls_mock.url, "OPENAI_API_KEY": "sk-upstream-secret"}
    gateway = Gateway(tmp_path, settings, dotenv=f"SSL_CERT_FILE={cert}\n")
    try:
        client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)
        assert client.chat.completions.create(**BODY).choices[0].message.content
    finally:
        gateway.stop()


def test_an_https_upstream_whose_certificate_is_not_trusted_is_refused(
    tmp_path: Path, tls_mock: Mock, certificates: tuple[Path, Path, Path], no_ca_settings: None
) -> None:
    _, _, other = certificates
    gateway = gateway_to(tmp_path, tls_mock, SSL_CERT_FILE=str(other))
    try:
        client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.APIStatusError) as refused:
            client.chat.completions.create(**BODY)
        assert refused.value.status_code == 502
        assert "Certificate" in refused.value.message
        assert gateway.process.proc.poll() is None  # and it still serves
        with pytest.raises(openai.APIStatusError):
            client.chat.completions.create(**BODY)
    finally:
        gateway.stop()


def _can_make_a_mount_namespace() -> bool:
    if shutil.which("unshare") is None:
        return False
    try:
        return subprocess.run(["unshare", "-m", "true"], capture_output=True, timeout=10).returncode == 0
    except OSError:
        return False


def test_the_ca_bundle_is_found_where_fedora_alpine_and_arch_keep_it(
    tmp_path: Path, tls_mock: Mock, certificates: tuple[Path, Path, Path], no_ca_settings: None
) -> None:
    """The binary's OpenSSL, built on Debian, looks under /usr/lib/ssl; on Fedora, RHEL, Alpine
    or Arch that directory does not exist and the bundle is /etc/ssl/cert.pem. In a mount
    namespace of its own the gateway sees that layout, with the test's CA as the bundle."""
    if not _can_make_a_mount_namespace():
        pytest.skip("needs unshare -m (root): the test hides /usr/lib/ssl and /etc/ssl in a mount namespace")
    cert, _, _ = certificates
    layout = (
        "mount -t tmpfs tmpfs /usr/lib/ssl && mount -t tmpfs tmpfs /etc/ssl"
        f' && cp "{cert}" /etc/ssl/cert.pem && exec "$@"'
    )
    gateway = gateway_to(tmp_path, tls_mock, wrap=["unshare", "-m", "sh", "-c", layout, "sh"])
    try:
        client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(**BODY)
        assert reply.choices[0].message.content
    finally:
        gateway.stop()


def test_without_any_ca_bundle_the_log_says_to_set_ssl_cert_file(
    tmp_path: Path, tls_mock: Mock, no_ca_settings: None
) -> None:
    if not _can_make_a_mount_namespace():
        pytest.skip("needs unshare -m (root): the test hides /usr/lib/ssl and /etc/ssl in a mount namespace")
    layout = 'mount -t tmpfs tmpfs /usr/lib/ssl && mount -t tmpfs tmpfs /etc/ssl && exec "$@"'
    gateway = gateway_to(tmp_path, tls_mock, wrap=["unshare", "-m", "sh", "-c", layout, "sh"])
    try:
        assert "no CA certificates found" in gateway.process.errors()
        assert "set SSL_CERT_FILE" in gateway.process.errors()
        client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.APIStatusError) as refused:
            client.chat.completions.create(**BODY)
        assert refused.value.status_code == 502
    finally:
        gateway.stop()


def redis_tls_options(cert: Path, key: Path) -> list[str]:
    """redis-server's TLS, with `cert` (its own CA) and `key`; its clients show no certificate."""
    tls = ["--tls-cert-file", str(cert), "--tls-key-file", str(key), "--tls-ca-cert-file", str(cert)]
    return [*tls, "--tls-auth-clients", "no"]


def tls_redis(tmp_path: Path, cert: Path, key: Path, cleanup: contextlib.ExitStack) -> tuple[RedisServer, int]:
    """A redis-server that also serves TLS (redis-cli keeps its plain port), and that TLS port."""
    tls_port = free_port()
    redis = RedisServer(tmp_path, extra=["--tls-port", str(tls_port), *redis_tls_options(cert, key)])
    cleanup.callback(redis.stop)
    return redis, tls_port


def plain_mock(tmp_path: Path, cleanup: contextlib.ExitStack) -> Mock:
    """An http:// mock upstream: these tests are about the Redis's TLS."""
    (tmp_path / "mock").mkdir()
    mock = Mock(tmp_path / "mock")
    cleanup.callback(mock.stop)
    return mock


@pytest.mark.parametrize("hidden", [True, False], ids=["fedora-layout", "debian-layout"])
def test_a_rediss_store_is_verified_with_the_bundle_wherever_the_distribution_keeps_it(
    tmp_path: Path,
    certificates: tuple[Path, Path, Path],
    no_ca_settings: None,
    hidden: bool,
    cleanup: contextlib.ExitStack,
) -> None:
    """A `rediss://` Redis (a managed one) is verified by coredis's own context, which looked
    where OpenSSL was built to look only: on the Fedora/Alpine layout every call failed
    verification, so quotas were never counted (fail-open) or every request refused (closed)."""
    if not _can_make_a_mount_namespace():
        pytest.skip("needs unshare -m (root): the test hides /usr/lib/ssl and /etc/ssl in a mount namespace")
    cert, key, _ = certificates
    redis, tls_port = tls_redis(tmp_path, cert, key, cleanup)
    mock = plain_mock(tmp_path, cleanup)
    # The test's CA as the system's only bundle: at /etc/ssl/cert.pem (Fedora's layout), or in
    # OpenSSL's own directory (Debian's, where coredis always found it).
    layout = "mount -t tmpfs tmpfs /usr/lib/ssl && " + (
        f'mount -t tmpfs tmpfs /etc/ssl && cp "{cert}" /etc/ssl/cert.pem'
        if hidden
        else f'cp "{cert}" /usr/lib/ssl/cert.pem'
    )
    gateway = gateway_to(
        tmp_path,
        mock,
        wrap=["unshare", "-m", "sh", "-c", layout + ' && exec "$@"', "sh"],
        REDIS_URL=f"rediss://127.0.0.1:{tls_port}/0",
        QUOTA_FAIL_MODE="closed",  # a store that cannot be reached refuses: 503
    )
    cleanup.callback(gateway.stop)
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)
    assert client.chat.completions.create(**BODY).choices[0].message.content
    assert redis.cli("KEYS", "quota:*")  # counted in the TLS Redis


@pytest.mark.parametrize("query", ["", "?ssl_check_hostname=false"], ids=["checked", "the-operator-opts-out"])
def test_a_rediss_store_whose_certificate_names_another_host_is_refused(
    tmp_path: Path, no_ca_settings: None, query: str, cleanup: contextlib.ExitStack
) -> None:
    """coredis verifies a `rediss://` server's certificate but not the name in it: a certificate
    any trusted CA signed for another name passed, and the Redis password went to whoever
    showed one. The name is checked now, as an https upstream's is, unless the URL opts out."""
    cert, key = self_signed(tmp_path, "elsewhere", names="DNS:elsewhere.test")
    redis, tls_port = tls_redis(tmp_path, cert, key, cleanup)
    mock = plain_mock(tmp_path, cleanup)
    gateway = gateway_to(
        tmp_path,
        mock,
        SSL_CERT_FILE=str(cert),  # its CA trusted: only the name is wrong
        REDIS_URL=f"rediss://127.0.0.1:{tls_port}/0{query}",
        QUOTA_FAIL_MODE="closed",  # a store that cannot be reached refuses: 503
    )
    cleanup.callback(gateway.stop)
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)
    if query:
        assert client.chat.completions.create(**BODY).choices[0].message.content
        assert redis.cli("KEYS", "quota:*")
    else:
        with pytest.raises(openai.APIStatusError) as refused:
            client.chat.completions.create(**BODY)
        assert refused.value.status_code == 503
        assert not redis.cli("KEYS", "quota:*")
        # The log says why: "Unable to establish a connection" alone, to a Redis that
        # answers redis-cli, left the operator guessing.
        assert "IP address mismatch" in gateway.process.errors()


def test_a_rediss_cluster_is_reached_at_the_addresses_it_announces(
    tmp_path: Path, no_ca_settings: None, cleanup: contextlib.ExitStack
) -> None:
    """A TLS cluster announces its masters by address (127.0.0.1 here, as Redis does by default),
    and coredis reaches each there and checks that address against its certificate: one that
    names the host the URL gives (localhost) and not every master's IP worked before the name
    check came, then failed every call (503 under QUOTA_FAIL_MODE=closed; quotas never counted
    under open). On a cluster the name is checked only when the URL asks for it."""
    cert, key = self_signed(tmp_path, "cluster", names="DNS:localhost")
    tls = [*redis_tls_options(cert, key), "--tls-cluster", "yes"]
    nodes = [
        RedisServer(
            tmp_path,
            port=free_cluster_port(),
            extra=[
                *tls,
                "--tls-port",
                str(free_cluster_port()),
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "n.conf",
            ],
        )
        for _ in range(3)
    ]
    for node in nodes:
        cleanup.callback(node.stop)
    subprocess.run(
        ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in nodes), "--cluster-yes"],
        check=True,
        capture_output=True,
        timeout=30,
    )
    wait_until(lambda: "cluster_state:ok" in nodes[0].cli("CLUSTER", "INFO"), timeout=20, what="cluster ok")
    mock = plain_mock(tmp_path, cleanup)
    tls_port = nodes[0].extra[nodes[0].extra.index("--tls-port") + 1]
    gateway = gateway_to(
        tmp_path,
        mock,
        SSL_CERT_FILE=str(cert),
        REDIS_URL=f"rediss://localhost:{tls_port}/0",
        REDIS_CLUSTER="true",
        QUOTA_FAIL_MODE="closed",  # a store that cannot be reached refuses: 503
    )
    cleanup.callback(gateway.stop)
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)
    for tenant in ("a", "b", "c", "d", "e", "f"):  # keys on every master, most likely
        assert client.with_options(api_key=tenant).chat.completions.create(**BODY).choices[0].message.content


class ConnectProxy:
    """tests/connect_proxy.py: every tunnel to `target`, whatever host the CONNECT names."""

    def __init__(self, tmp: Path, target: int, auth: str = "") -> None:
        self.port = free_port()
        argv = [sys.executable, str(ROOT / "tests" / "connect_proxy.py"), str(self.port), str(target)]
        self.process = Process(argv, base_env() | {"PROXY_AUTH": auth}, tmp, tmp / f"proxy-{self.port}.log")
        wait_until(lambda: "listening" in self.process.output(), what="the proxy")

    def connects(self) -> list[dict[str, str]]:
        lines = [json.loads(line) for line in self.process.output().splitlines()]
        return [line for line in lines if "request" in line]


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def gateway_via(tmp_path: Path, proxy: ConnectProxy, credentials: str, cert: Path) -> Gateway:
    """A gateway whose upstream, https://upstream.test, only `proxy` can reach."""
    return Gateway(
        tmp_path,
        {
            "OPENAI_BASE_URL": "https://upstream.test",
            "OPENAI_API_KEY": "sk-upstream-secret",
            "HTTPS_PROXY": f"http://{credentials}@127.0.0.1:{proxy.port}",
            "SSL_CERT_FILE": str(cert),
        },
    )


def test_an_https_upstream_is_reached_through_https_proxy_with_its_credentials(
    tmp_path: Path, tls_mock: Mock, certificates: tuple[Path, Path, Path], no_ca_settings: None
) -> None:
    """The upstream's name is never resolved here: only the proxy, which tunnels to the mock,
    knows where it is. TLS goes through the tunnel, verified for that name."""
    cert, _, _ = certificates
    proxy = ConnectProxy(tmp_path, tls_mock.port, auth=basic("egress", "p@ss:word"))
    gateway = gateway_via(tmp_path, proxy, "egress:p%40ss%3Aword", cert)
    try:
        client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)
        assert client.chat.completions.create(**BODY).choices[0].message.content
        chunks = client.chat.completions.create(**BODY, stream=True)
        assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
        connects = proxy.connects()
        assert connects and {c["request"] for c in connects} == {"CONNECT upstream.test:443 HTTP/1.1"}
        assert {c["proxy_authorization"] for c in connects} == {basic("egress", "p@ss:word")}
        logged = gateway.process.output() + gateway.process.errors()
        assert "p@ss" not in logged and "p%40ss" not in logged
    finally:
        gateway.stop()
        proxy.process.stop()


def test_a_proxy_that_refuses_is_a_502_that_names_no_credential(
    tmp_path: Path, tls_mock: Mock, certificates: tuple[Path, Path, Path], no_ca_settings: None
) -> None:
    cert, _, _ = certificates
    proxy = ConnectProxy(tmp_path, tls_mock.port, auth=basic("egress", "right"))
    gateway = gateway_via(tmp_path, proxy, "egress:wrong-secret", cert)
    try:
        client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.APIStatusError) as refused:
            client.chat.completions.create(**BODY)
        assert refused.value.status_code == 502
        assert "wrong-secret" not in refused.value.response.text
        assert "wrong-secret" not in gateway.process.output() + gateway.process.errors()
    finally:
        gateway.stop()
        proxy.process.stop()


def test_a_loopback_upstream_does_not_go_through_the_proxy(
    tmp_path: Path, tls_mock: Mock, certificates: tuple[Path, Path, Path], no_ca_settings: None
) -> None:
    cert, _, _ = certificates
    proxy = ConnectProxy(tmp_path, tls_mock.port)
    gateway = gateway_to(tmp_path, tls_mock, HTTPS_PROXY=f"http://127.0.0.1:{proxy.port}", SSL_CERT_FILE=str(cert))
    try:
        client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)
        assert client.chat.completions.create(**BODY).choices[0].message.content
        assert proxy.connects() == []
    finally:
        gateway.stop()
        proxy.process.stop()
