"""Tenant identity: open mode (the key is the tenant), keyed mode, hashed identifiers."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections.abc import Mapping

from .errors import InvalidApiKey
from .models import Tenant

ANONYMOUS = "anonymous"
MAX_KEY_BYTES = 256
# No deployment chains more proxies than this; a longer X-Forwarded-For list is the client's.
MAX_FORWARDED_HOPS = 16
_OWS = " \t"


def well_formed(key: str) -> bool:
    """1-256 printable ASCII characters, space excluded (0x21-0x7E): a bearer token has none
    of the rest (RFC 6750's b64token is narrower still), and a key past this is refused
    before it can cost anything: no hashing of megabytes, no UnicodeEncodeError, no huge
    tenant names in the process's tables."""
    return 0 < len(key) <= MAX_KEY_BYTES and key.isascii() and key.isprintable() and " " not in key


def presented_key(api_key_header: str | None, authorization: str | None) -> str | None:
    """`X-Api-Key`, else the bearer token of `Authorization` (what OpenAI SDKs send).

    Only spaces and tabs are trimmed (HTTP's own whitespace): str.strip() would also eat
    control characters such as \\x1f, and a key carrying one is malformed, not another key."""
    if api_key_header:
        return api_key_header.strip(_OWS) or None
    if authorization and authorization[:7].lower() == "bearer ":
        return authorization[7:].strip(_OWS) or None
    return None


class Tenancy:
    __slots__ = ("_digests", "_hash_secret")

    def __init__(self, key_digests: Mapping[bytes, str], hash_secret: bytes | None) -> None:
        self._digests = key_digests
        self._hash_secret = hash_secret

    @property
    def keyed(self) -> bool:
        return bool(self._digests)

    def resolve(self, key: str | None, peer_ip: str, path: str) -> Tenant:
        """Raises InvalidApiKey for a malformed key (both modes) and, in keyed mode, for a
        missing or unknown one."""
        if key is not None and not well_formed(key):
            raise InvalidApiKey()
        if self._digests:
            if key is None:
                raise InvalidApiKey()
            # Constant time with respect to the key: only its SHA-256 digest is looked up, so
            # timing can reveal nothing but facts about a hash nobody can invert.
            digest = hashlib.sha256(key.encode()).digest()
            name = self._digests.get(digest)
            if name is None:
                raise InvalidApiKey()
            # Rate-limited per key (SPEC §4), by its digest: the key itself is not kept.
            rate_key = "key:" + digest.hex()
            return Tenant(name, self.public_id(name), rate_key, rate_key)
        if key is None:
            return Tenant(ANONYMOUS, self.public_id(ANONYMOUS), f"ip:{peer_ip}:{path}", "ip:" + peer_ip)
        return Tenant(key, self.public_id(key), "key:" + key, "key:" + key)

    def public_id(self, name: str) -> str:
        if self._hash_secret is None:
            return name
        return "h:" + hmac.new(self._hash_secret, name.encode(), hashlib.sha256).hexdigest()[:32]


def client_ip(peer: str | None, forwarded_for: str | None, trusted: tuple[object, ...]) -> str:
    """The peer address, or the right-most untrusted X-Forwarded-For hop behind a trusted proxy.

    Only the last MAX_FORWARDED_HOPS hops are looked at, each an address parse: a client in a
    trusted network sent ~1 MB of trusted addresses (128 header lines) and held the event loop
    ~0.5 s per request walking all of them."""
    ip = peer or "unknown"
    if not trusted or not forwarded_for or not _is_trusted(_address(ip), trusted):
        return ip
    hops = forwarded_for.rsplit(",", MAX_FORWARDED_HOPS)[-MAX_FORWARDED_HOPS:]  # scans from the right only
    for hop in reversed([h.strip() for h in hops if h.strip()]):
        address = _address(hop)
        if address is None:
            return hop  # no address: a key of its own, as the proxy wrote it
        if not _is_trusted(address, trusted):
            return str(address)
        ip = str(address)
    return ip


def _address(hop: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address an X-Forwarded-For hop names, without the port some proxies add (Azure
    Application Gateway writes `203.0.113.9:54321`, `[2001:db8::1]:443`): kept, each of a
    client's connections was a rate-limit bucket of its own. None when the hop is no address."""
    host = hop
    if hop.startswith("["):
        host, closed, port = hop[1:].partition("]")
        if not closed or (port and not (port[0] == ":" and _is_port(port[1:]))):
            return None
    elif hop.count(":") == 1:  # IPv4 with a port (an IPv6 address has two colons or more)
        host, _, port = hop.partition(":")
        if not _is_port(port):
            return None
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _is_port(text: str) -> bool:
    return 0 < len(text) <= 5 and text.isascii() and text.isdigit()


def _is_trusted(address: ipaddress.IPv4Address | ipaddress.IPv6Address | None, trusted: tuple[object, ...]) -> bool:
    return address is not None and any(address in net for net in trusted)  # type: ignore[operator]
