"""How a `rediss://` URL is given a host name check and the distribution's CA bundle (gateway/tls.py); the whole
path, in a mount namespace with Fedora's layout, is tests/e2e/test_tls.py's."""

from __future__ import annotations

import ssl
from pathlib import Path

import coredis
import pytest

from gateway import tls


@pytest.fixture
def bundle(monkeypatch: pytest.MonkeyPatch) -> str:
    """OpenSSL's places hold nothing; the distribution keeps its bundle at a path that needs quoting."""
    path = "/etc/pki/my ca/bundle.pem"
    monkeypatch.setattr(tls, "distribution_bundle", lambda: path)
    return path


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "rediss://:pw@cache:6380/0",
            "rediss://:pw@cache:6380/0?ssl_check_hostname=true&ssl_ca_certs=/etc/pki/my%20ca/bundle.pem",
        ),
        (
            "rediss://cache:6380/0?ssl_cert_reqs=required",
            "rediss://cache:6380/0?ssl_cert_reqs=required&ssl_check_hostname=true&ssl_ca_certs=/etc/pki/my%20ca/bundle.pem",
        ),
        # The operator's own choices stand: a CA, no name check, no verification at all.
        (
            "rediss://cache:6380/0?ssl_ca_certs=/mine.pem",
            "rediss://cache:6380/0?ssl_ca_certs=/mine.pem&ssl_check_hostname=true",
        ),
        (
            "rediss://cache:6380/0?ssl_check_hostname=false",
            "rediss://cache:6380/0?ssl_check_hostname=false&ssl_ca_certs=/etc/pki/my%20ca/bundle.pem",
        ),
        (
            "rediss://cache:6380/0?ssl_cert_reqs=none",
            "rediss://cache:6380/0?ssl_cert_reqs=none&ssl_ca_certs=/etc/pki/my%20ca/bundle.pem",
        ),
        ("redis://cache:6379/0", "redis://cache:6379/0"),  # no TLS
        ("unix:///run/redis.sock", "unix:///run/redis.sock"),
    ],
)
def test_a_rediss_url_is_given_a_host_name_check_and_the_distributions_cas(
    bundle: str, url: str, expected: str
) -> None:
    assert tls.redis_url_verified(url) == expected


def test_where_openssl_finds_its_cas_a_rediss_url_names_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tls, "distribution_bundle", lambda: None)
    assert tls.redis_url_verified("rediss://cache:6380/0") == "rediss://cache:6380/0?ssl_check_hostname=true"


@pytest.mark.parametrize("holds", [True, False], ids=["a-ca-directory", "an-empty-directory"])
def test_openssls_ca_directory_counts_only_when_it_holds_certificates(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, holds: bool
) -> None:
    """SSL_CERT_DIR (or the built-in directory) with certificates in it is OpenSSL's place; an
    empty one (a distribution that keeps a bundle file instead) is not."""
    if holds:
        (tmp_path / "5ad8a5d6.0").write_text("a certificate")  # named by its subject's hash
    paths = ssl.DefaultVerifyPaths(
        None, str(tmp_path), "SSL_CERT_FILE", "/nowhere/cert.pem", "SSL_CERT_DIR", str(tmp_path)
    )
    monkeypatch.setattr(ssl, "get_default_verify_paths", lambda: paths)
    monkeypatch.setattr(tls, "CA_FILE_CANDIDATES", ("/nowhere/a.pem", str(tmp_path / "bundle.pem")))
    (tmp_path / "bundle.pem").write_text("a bundle")
    tls.distribution_bundle.cache_clear()
    try:
        assert tls.distribution_bundle() == (None if holds else str(tmp_path / "bundle.pem"))
    finally:
        tls.distribution_bundle.cache_clear()


@pytest.mark.parametrize(
    ("query", "checked"),
    [("ssl_cert_reqs=none&ssl_cert_reqs=required", False), ("ssl_cert_reqs=required&ssl_cert_reqs=none", True)],
    ids=["none-first", "required-first"],
)
def test_a_repeated_option_is_read_as_coredis_reads_it(
    monkeypatch: pytest.MonkeyPatch, query: str, checked: bool
) -> None:
    """coredis takes an option's first value: ssl_cert_reqs=none first is no verification, and the
    added name check made coredis' context raise at start-up (a traceback, exit 1); required
    first is verification, whose name went unchecked."""
    monkeypatch.setattr(tls, "distribution_bundle", lambda: None)
    url = tls.redis_url_verified(f"rediss://cache:6380/0?{query}")
    context = coredis.ConnectionPool.from_url(url).connection_kwargs["ssl_context"]
    assert context.check_hostname is checked


@pytest.mark.parametrize(
    ("name", "value", "warned"),
    [
        ("SSL_CERT_FILE", "/nowhere/ca.pem", True),
        ("SSL_CERT_DIR", "/nowhere:/also/nowhere", True),
        ("SSL_CERT_DIR", "/nowhere:{tmp}", False),  # OpenSSL reads the one that is there
        ("SSL_CERT_FILE", "{tmp}/bundle.pem", False),
    ],
)
def test_a_ca_path_that_is_not_there_is_logged(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
    name: str,
    value: str,
    warned: bool,
) -> None:
    """OpenSSL passes over a CA path that is not there without a word: a private CA named
    with a typo was not trusted, and nothing said why its upstreams failed verification."""
    (tmp_path / "bundle.pem").write_text("a bundle")
    monkeypatch.setenv(name, value.format(tmp=tmp_path))
    tls.distribution_bundle.cache_clear()
    try:
        tls.distribution_bundle()
    finally:
        tls.distribution_bundle.cache_clear()
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith(name)]
    assert bool(said) == warned, said
