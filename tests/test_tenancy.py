"""Tenant identity in open, keyed and hashed modes; X-Forwarded-For trust."""

from __future__ import annotations

import hashlib
import ipaddress

import pytest

from gateway.errors import InvalidApiKey
from gateway.tenancy import Tenancy, client_ip, presented_key


def test_key_from_x_api_key_else_bearer() -> None:
    assert presented_key("k1", "Bearer k2") == "k1"
    assert presented_key(None, "Bearer k2") == "k2"
    assert presented_key(None, "bearer k2") == "k2"
    assert presented_key(None, "Basic xyz") is None
    assert presented_key(None, None) is None


def test_open_mode_tenant_is_the_key_or_anonymous() -> None:
    tenancy = Tenancy({}, None)
    assert tenancy.resolve("demo", "1.2.3.4", "/p").name == "demo"
    anonymous = tenancy.resolve(None, "1.2.3.4", "/v1/chat/completions")
    assert anonymous.name == "anonymous"
    assert anonymous.rate_key == "ip:1.2.3.4:/v1/chat/completions"


def test_keyed_mode_admits_listed_keys_only() -> None:
    digests = {
        hashlib.sha256(b"sk-acme-1").digest(): "acme",
        hashlib.sha256(b"sk-beta").digest(): "beta",
    }
    tenancy = Tenancy(digests, None)
    tenant = tenancy.resolve("sk-acme-1", "ip", "/")
    assert (tenant.name, tenant.public_id) == ("acme", "acme")
    assert tenant.rate_key == "key:" + hashlib.sha256(b"sk-acme-1").hexdigest()  # per key, never the key
    with pytest.raises(InvalidApiKey):
        tenancy.resolve("sk-unknown", "ip", "/")
    with pytest.raises(InvalidApiKey):
        tenancy.resolve(None, "ip", "/")


def test_hashed_identifiers_are_stable_and_keyed() -> None:
    a = Tenancy({}, b"secret-1").resolve("demo", "ip", "/")
    b = Tenancy({}, b"secret-1").resolve("demo", "ip", "/")
    c = Tenancy({}, b"secret-2").resolve("demo", "ip", "/")
    assert a.public_id == b.public_id != c.public_id
    assert "demo" not in a.public_id


def test_forwarded_for_is_trusted_only_from_trusted_proxies() -> None:
    trusted = (ipaddress.ip_network("10.0.0.0/8"),)
    assert client_ip("203.0.113.9", "1.1.1.1", trusted) == "203.0.113.9"
    assert client_ip("10.0.0.2", "1.1.1.1", trusted) == "1.1.1.1"
    assert client_ip("10.0.0.2", "6.6.6.6, 1.1.1.1, 10.0.0.7", trusted) == "1.1.1.1"  # right-most untrusted
    assert client_ip("10.0.0.2", "1.1.1.1", ()) == "10.0.0.2"
