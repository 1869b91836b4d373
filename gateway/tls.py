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
    defaults = ssl.get_default_verify_paths()
    if defaults.cafile is not None or (defaults.capath is not None and _holds_certificates(defaults.capath)):
        return context
    for candidate in CA_FILE_CANDIDATES:
        if os.path.isfile(candidate):
            context.load_verify_locations(cafile=candidate)
            return context
    log.warning(
        "no CA certificates found (looked in %s and %s): https upstreams will fail verification;"
        " set SSL_CERT_FILE to a CA bundle",
        defaults.openssl_cafile,
        ", ".join(CA_FILE_CANDIDATES),
    )
    return context


def _holds_certificates(directory: str) -> bool:
    try:
        return any(_HASHED_NAME.fullmatch(name) for name in os.listdir(directory))
    except OSError:
        return False
