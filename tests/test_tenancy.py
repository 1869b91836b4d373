"""Tenant identity in open, keyed and hashed modes; X-Forwarded-For trust."""

from __future__ import annotations

import hashlib
import ipaddress
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.errors import InvalidApiKey
from gateway.tenancy import MAX_FORWARDED_HOPS, Tenancy, client_ip, presented_key


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


def test_a_forwarded_for_hop_with_a_port_is_its_address() -> None:
    # Azure Application Gateway writes the client's address with its source port
    # (`203.0.113.9:54321`): used as written, each of the client's connections was a rate-limit
    # bucket (and a body-budget sender) of its own, a fresh BURST every time; and a trusted
    # proxy's hop with a port was no address, so it was taken for the client.
    trusted = (ipaddress.ip_network("10.0.0.0/8"),)
    assert client_ip("10.0.0.2", "203.0.113.9:54321", trusted) == "203.0.113.9"
    assert client_ip("10.0.0.2", "203.0.113.9:1111", trusted) == client_ip("10.0.0.2", "203.0.113.9:2222", trusted)
    assert client_ip("10.0.0.2", "[2001:db8::1]:443", trusted) == "2001:db8::1"
    assert client_ip("10.0.0.2", "[2001:db8::1]", trusted) == "2001:db8::1"
    assert client_ip("10.0.0.2", "2001:DB8::1", trusted) == "2001:db8::1"  # one address, one form
    assert client_ip("10.0.0.2", "203.0.113.9:1, 10.0.0.7:443", trusted) == "203.0.113.9"  # trusted, port and all
    # What is no address stays as written (a key of its own, as before).
    for hop in ("unknown", "203.0.113.9:", "203.0.113.9:x", "[2001:db8::1", "[2001:db8::1]x", "1:2:3"):
        assert client_ip("10.0.0.2", hop, trusted) == hop, hop


def test_only_the_last_hops_of_a_forwarded_for_list_are_looked_at() -> None:
    trusted = (ipaddress.ip_network("10.0.0.0/8"),)
    proxies = ["10.0.0.7"] * (MAX_FORWARDED_HOPS - 1)
    assert client_ip("10.0.0.2", ", ".join(["6.6.6.6", *proxies]), trusted) == "6.6.6.6"
    # Past the bound the list is the client's: its far end is not walked to (each hop is a parse).
    long = ", ".join(["6.6.6.6", *proxies * 10_000])
    assert client_ip("10.0.0.2", long, trusted) == "10.0.0.7"


MALFORMED = [
    "k" * 257,  # one byte past the limit
    "sk-" + "a" * 100_000,
    "sk key",  # a space: bearer tokens have none
    "sk\tkey",
    "sk-key\x7f",
    "sk-\x00key",
    "sk-clé",  # non-ASCII
    "sk-\udcffkey",  # an invalid UTF-8 byte as aiohttp decodes headers (surrogateescape)
    "",
]


@pytest.mark.parametrize("key", MALFORMED, ids=range(len(MALFORMED)))
def test_a_malformed_key_is_refused_in_open_mode(key: str) -> None:
    with pytest.raises(InvalidApiKey):
        Tenancy({}, None).resolve(key, "1.2.3.4", "/v1/chat/completions")
    with pytest.raises(InvalidApiKey):
        Tenancy({}, b"secret").resolve(key, "1.2.3.4", "/v1/chat/completions")


@pytest.mark.parametrize("key", MALFORMED, ids=range(len(MALFORMED)))
def test_a_malformed_key_is_refused_in_keyed_mode_even_if_listed(key: str) -> None:
    # Refused for its shape, before any lookup: even a digest that matches does not admit it.
    listed = {hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest(): "acme"}
    with pytest.raises(InvalidApiKey):
        Tenancy(listed, None).resolve(key, "1.2.3.4", "/v1/chat/completions")


def test_the_longest_key_and_every_printable_character_are_admitted() -> None:
    tenancy = Tenancy({}, None)
    longest = "k" * 256
    assert tenancy.resolve(longest, "ip", "/").name == longest
    every = "".join(chr(c) for c in range(0x21, 0x7F))
    assert tenancy.resolve(every, "ip", "/").name == every


def test_a_bearer_token_with_a_space_inside_is_refused() -> None:
    key = presented_key(None, "Bearer sk-one sk-two")
    with pytest.raises(InvalidApiKey):
        Tenancy({}, None).resolve(key, "ip", "/")


@settings(max_examples=500)
@given(st.text(max_size=300) | st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7F), max_size=300))
def test_a_key_is_admitted_exactly_when_it_is_1_to_256_printable_ascii(key: str) -> None:
    well_formed = re.fullmatch(r"[!-~]{1,256}", key) is not None
    listed = {hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest(): "t"}
    for tenancy, name in ((Tenancy({}, None), key), (Tenancy(listed, None), "t")):
        if well_formed:
            assert tenancy.resolve(key, "ip", "/").name == name
        else:
            with pytest.raises(InvalidApiKey):
                tenancy.resolve(key, "ip", "/")


@pytest.mark.parametrize("header", ["sk-key\x1f", "\x1csk-key", "sk-key\x0b", "sk-key\x85"])
def test_a_control_character_at_either_end_is_not_trimmed_away(header: str) -> None:
    # Only HTTP's whitespace (space, tab) is trimmed; anything else makes the key malformed.
    for key in (presented_key(header, None), presented_key(None, "Bearer " + header)):
        assert key == header
        with pytest.raises(InvalidApiKey):
            Tenancy({}, None).resolve(key, "ip", "/")
    assert presented_key(" \tsk-key\t ", None) == "sk-key"
    assert presented_key(None, "Bearer   sk-key ") == "sk-key"
