"""The upstreams' egress proxy: HTTPS_PROXY, HTTP_PROXY and NO_PROXY, read once at start-up.

aiohttp reads these itself with `trust_env=True`, but then looks them up again (and `.netrc`)
in a worker thread on every request; the upstreams are known at start-up, so each one's proxy
is decided once and given to its session. Loopback upstreams never go through the proxy (a
local model server, the bundled mock), as in Go's and curl's newer defaults.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from aiohttp import encode_basic_auth
from yarl import URL


@dataclass(frozen=True, slots=True)
class Egress:
    https_proxy: str | None = None  # http://[user:password@]host:port, for https:// upstreams
    http_proxy: str | None = None  # the same, for http:// upstreams
    no_proxy: str = ""  # hosts, domains (".corp", "*.corp" or "corp"), IPs, CIDRs, "*": reached directly

    def proxy_for(self, url: str) -> tuple[URL | None, str | None]:
        """The proxy an upstream at `url` is reached through, and the Proxy-Authorization its
        credentials make; (None, None): directly."""
        target = URL(url)
        proxy = self.https_proxy if target.scheme == "https" else self.http_proxy
        if not proxy or target.host is None or self._bypassed(target.host, target.port):
            return None, None
        parsed = URL(proxy)
        # The credentials go as a header: aiohttp deprecates its BasicAuth for them.
        has_credentials = parsed.user or parsed.password is not None  # a password alone too ("http://:key@")
        authorization = encode_basic_auth(parsed.user or "", parsed.password or "") if has_credentials else None
        return parsed.with_user(None), authorization

    def proxy_url(self, url: str) -> str | None:
        """The proxy for `url` as one URL, credentials in it (as `requests` takes a proxy:
        the OTLP exporter's); None: directly."""
        target = URL(url)
        proxy = self.https_proxy if target.scheme == "https" else self.http_proxy
        if not proxy or target.host is None or self._bypassed(target.host, target.port):
            return None
        return proxy

    def _bypassed(self, host: str, port: int | None) -> bool:
        host = host.lower().rstrip(".")
        address = _address(host)
        if host == "localhost" or host.endswith(".localhost") or (address is not None and address.is_loopback):
            return True
        for entry in self.no_proxy.replace(" ", "").lower().split(","):
            if not entry:
                continue
            if entry == "*":
                return True
            # host:port, or [IPv6]:port (a bare IPv6 address has colons of its own)
            with_port = entry.count(":") == 1 or (entry.startswith("[") and "]:" in entry)
            name, _, entry_port = entry.rpartition(":") if with_port else (entry, "", "")
            if entry_port and (not entry_port.isdigit() or int(entry_port) != port):
                continue
            name = name.strip("[]")
            if address is not None:
                try:
                    if address in ipaddress.ip_network(name, strict=False):
                        return True
                except ValueError:
                    pass
                continue
            domain = (name[2:] if name.startswith("*.") else name).lstrip(".")  # "*.corp" as ".corp" (Go's)
            if host == domain or host.endswith("." + domain):
                return True
        return False


def _address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None
