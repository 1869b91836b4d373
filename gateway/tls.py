"""The upstreams' TLS: their certificates verified against the system's CA store, wherever the
distribution keeps it.

The one-file binary carries the OpenSSL of the machine it was built on (Debian), which looks
for CA certificates under /usr/lib/ssl. Distributions that keep them elsewhere (Fedora, RHEL,
Arch, Alpine, SUSE) have no such directory, and every https upstream would fail verification.
When OpenSSL's own places (or SSL_CERT_FILE / SSL_CERT_DIR) hold nothing, the bundle is taken
from where those distributions keep it. `truststore` does the same search, but again on every
new connection, reloading the bundle each time (~36 ms of the event loop's time here); this
loads it once.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import ssl
from collections.abc import Callable
from urllib.parse import parse_qs, quote, urlsplit, urlunsplit

log = logging.getLogger("gateway")

# Where distributions keep their CA bundle (truststore's list, after certifi-system-store).
CA_FILE_CANDIDATES = (
    "/etc/ssl/cert.pem",  # Alpine, Arch, Fedora 34-42, RHEL 9-10, BSD
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",  # Fedora 43+, RHEL 11+
    "/etc/pki/tls/cert.pem",  # older Fedora, RHEL, CentOS
    "/etc/ssl/certs/ca-certificates.crt",  # Debian, Ubuntu
    "/etc/ssl/ca-bundle.pem",  # SUSE
)
_HASHED_NAME = re.compile(r"[0-9a-fA-F]{8}\.[0-9]")  # how a CA directory names its certificates


@functools.cache
def client_context() -> ssl.SSLContext:
    """The context every upstream connection verifies with (one per process: loading a CA
    bundle takes tens of milliseconds)."""
    context = ssl.create_default_context()  # OpenSSL's places, SSL_CERT_FILE and SSL_CERT_DIR
    context.set_alpn_protocols(("http/1.1",))  # as aiohttp's own default context says
    if (bundle := distribution_bundle()) is not None:
        context.load_verify_locations(cafile=bundle)
    return context


@functools.cache
def distribution_bundle() -> str | None:
    """The distribution's CA bundle, when OpenSSL's own places (SSL_CERT_FILE, SSL_CERT_DIR,
    the directory it was built with) hold no certificate; None when they do. Found none, the
    log says so, once; and so of a CA file or directory named that is not there."""
    _warn_of_missing(os.environ.get("SSL_CERT_FILE"), os.path.isfile, "SSL_CERT_FILE", "file")
    _warn_of_missing(os.environ.get("SSL_CERT_DIR"), os.path.isdir, "SSL_CERT_DIR", "directory")
    defaults = ssl.get_default_verify_paths()
    if defaults.cafile is not None or (defaults.capath is not None and _holds_certificates(defaults.capath)):
        return None
    for candidate in CA_FILE_CANDIDATES:
        if os.path.isfile(candidate):
            return candidate
    log.warning(
        "no CA certificates found (looked in %s and %s): https upstreams and rediss:// will fail"
        " verification; set SSL_CERT_FILE to a CA bundle",
        defaults.openssl_cafile,
        ", ".join(CA_FILE_CANDIDATES),
    )
    return None


def _warn_of_missing(value: str | None, exists: Callable[[str], bool], name: str, kind: str) -> None:
    """OpenSSL passes over a CA path that is not there without a word (a private CA named
    there is then not trusted, and its upstreams fail verification): the log says so."""
    if value and not any(exists(part) for part in value.split(os.pathsep) if part):
        log.warning("%s names no %s that is there (%s): its CAs are not trusted", name, kind, value)


def redis_url_verified(url: str, *, cluster: bool = False) -> str:
    """A `rediss://` URL with what its verification needs and coredis does not do by itself
    (it builds its TLS context from the URL's `ssl_*` options): the server's host name checked
    (coredis checks none, so any certificate a trusted CA signed for any name passed, and the
    Redis password went to whoever showed one), unless the URL says otherwise
    (`ssl_check_hostname`, or `ssl_cert_reqs=none`); and the distribution's CA bundle where
    OpenSSL's places hold none, unless the URL names its own (`ssl_ca_certs`). A cluster's name
    is checked only when its URL asks (`ssl_check_hostname=true`): coredis reaches each master
    at the address the cluster announces (an IP, by Redis' default), not the URL's host, and
    checks that address, which a certificate seldom names: a TLS cluster that worked failed
    every call."""
    parts = urlsplit(url)
    if parts.scheme != "rediss":
        return url
    given = parse_qs(parts.query)
    added = []
    # An option's first value, as coredis reads it: the last one added a name check to "none"
    # (coredis' context then raised at start-up) or none to "required".
    if not cluster and "ssl_check_hostname" not in given and given.get("ssl_cert_reqs", [""])[0] != "none":
        added.append("ssl_check_hostname=true")
    if "ssl_ca_certs" not in given and (bundle := distribution_bundle()) is not None:
        added.append(f"ssl_ca_certs={quote(bundle, safe='/')}")
    if not added:
        return url
    return urlunsplit(parts._replace(query="&".join(filter(None, (parts.query, *added)))))


def _holds_certificates(directory: str) -> bool:
    try:
        return any(_HASHED_NAME.fullmatch(name) for name in os.listdir(directory))
    except OSError:
        return False
