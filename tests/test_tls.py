"""How a `rediss://` URL is given a host name check and the distribution's CA bundle (gateway/tls.py); the whole
path, in a mount namespace with Fedora's layout, is tests/e2e/test_tls.py's."""

from __future__ import annotations

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
