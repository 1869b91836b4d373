"""Which upstreams go through the egress proxy (HTTPS_PROXY, HTTP_PROXY, NO_PROXY), and with
which credentials: decided once per upstream (gateway/egress.py)."""

from __future__ import annotations

import pytest
from aiohttp import encode_basic_auth
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from gateway.egress import Egress

PROXY = "http://proxy.corp:3128"


@pytest.mark.parametrize(
    ("url", "no_proxy", "proxied"),
    [
        ("https://api.openai.com/v1/chat/completions", "", True),
        ("https://api.openai.com/v1/chat/completions", "*", False),
        ("https://api.openai.com/v1/chat/completions", "openai.com", False),  # a domain: its subdomains too
        ("https://api.openai.com/v1/chat/completions", ".openai.com", False),
        ("https://api.openai.com/v1/chat/completions", "api.openai.com", False),
        ("https://api.openai.com/v1/chat/completions", "API.OpenAI.com", False),  # names have no case
        ("https://api.openai.com/v1/chat/completions", "penai.com", True),  # not a suffix at a dot
        ("https://api.openai.com/v1/chat/completions", "*.openai.com", False),  # Go's wildcard form
        ("https://api.openai.com/v1/chat/completions", "*.penai.com", True),
        ("https://api.openai.com/v1/chat/completions", "other.example, openai.com", False),
        ("https://api.openai.com/v1/chat/completions", "api.openai.com:443", False),  # https: port 443, as Go reads it
        ("https://api.openai.com/v1/chat/completions", "api.openai.com:8443", True),
        ("https://llm.corp/v1/chat/completions", "llm.corp:80", True),
        ("https://llm.corp:8443/v1/chat/completions", "llm.corp:8443", False),
        ("https://llm.corp:8443/v1/chat/completions", "llm.corp:9000", True),
        ("https://10.1.2.3/v1/chat/completions", "10.0.0.0/8", False),
        ("https://10.1.2.3/v1/chat/completions", "10.1.2.3", False),
        ("https://11.1.2.3/v1/chat/completions", "10.0.0.0/8", True),
        ("https://[fd00::5]/v1/chat/completions", "fd00::/8", False),
        ("https://[fd00::5]:8443/v1/chat/completions", "[fd00::5]:8443", False),  # an IPv6 host:port
        ("https://[fd00::5]:8443/v1/chat/completions", "[fd00::5]:9000", True),
        ("https://[fd00::5]:8443/v1/chat/completions", "[fd00::5]", False),
        ("https://localhost:8000/v1/chat/completions", "", False),  # loopback: never proxied
        ("https://127.0.0.2:8000/v1/chat/completions", "", False),
        ("https://[::1]:8000/v1/chat/completions", "", False),
        ("https://model.localhost/v1/chat/completions", "", False),
    ],
)
def test_no_proxy_and_loopback_decide_who_goes_direct(url: str, no_proxy: str, proxied: bool) -> None:
    proxy, _ = Egress(https_proxy=PROXY, no_proxy=no_proxy).proxy_for(url)
    assert (proxy is not None) is proxied


def test_each_scheme_has_its_own_proxy() -> None:
    egress = Egress(https_proxy="http://secure.corp:3128", http_proxy="http://plain.corp:8080")
    assert egress.proxy_for("https://api.openai.com/v1/x")[0] == URL("http://secure.corp:3128")
    assert egress.proxy_for("http://models.example/v1/x")[0] == URL("http://plain.corp:8080")
    assert Egress(https_proxy="http://secure.corp:3128").proxy_for("http://models.example/v1/x") == (None, None)
    assert Egress().proxy_for("https://api.openai.com/v1/x") == (None, None)


def test_the_proxy_credentials_go_apart_from_its_url() -> None:
    proxy, auth = Egress(https_proxy="http://egress:p%40ss%3Aword@proxy.corp:3128").proxy_for("https://a.example/")
    assert proxy == URL("http://proxy.corp:3128")
    assert auth == encode_basic_auth("egress", "p@ss:word")
    assert Egress(https_proxy=PROXY).proxy_for("https://a.example/")[1] is None
    # A password alone (an API key as the proxy's password): sent as curl and requests send it.
    proxy, auth = Egress(https_proxy="http://:s3cret@proxy.corp:3128").proxy_for("https://a.example/")
    assert proxy == URL("http://proxy.corp:3128")
    assert auth == encode_basic_auth("", "s3cret")


async def test_an_http_upstreams_proxy_gets_the_credentials_too() -> None:
    """An http:// upstream goes through HTTP_PROXY as an absolute-form request, not a CONNECT
    tunnel: aiohttp sends proxy_headers only on a CONNECT, so the proxy got no
    Proxy-Authorization and answered 407 (the client a 502 "upstream answered 407"). Found
    against the real gateway, a ROUTES_FILE upstream http://plain.test and a forward proxy."""
    import asyncio

    from gateway.upstream import Upstream

    seen: list[bytes] = []

    async def proxy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(proxy, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    egress = Egress(http_proxy=f"http://egress:p%40ss@127.0.0.1:{port}")
    upstream = Upstream("http://plain.test:8000/v1/chat/completions", "sk-test-key", 5, egress=egress)
    try:
        await upstream.open()
        reply = await upstream.post(b"{}", upstream.headers_for(CIMultiDictProxy(CIMultiDict())))
        assert reply.status == 200
        reply.close()
    finally:
        await upstream.close()
        server.close()
    head = seen[0].decode("latin-1")
    assert head.startswith("POST http://plain.test:8000/v1/chat/completions HTTP/1.1\r\n")
    assert f"\r\nProxy-Authorization: {encode_basic_auth('egress', 'p@ss')}\r\n" in head


def test_an_http_upstream_without_a_port_is_on_port_80_for_no_proxy() -> None:
    egress = Egress(http_proxy=PROXY, no_proxy="models.example:80")
    assert egress.proxy_for("http://models.example/v1/chat/completions") == (None, None)
    assert Egress(http_proxy=PROXY, no_proxy="models.example:8080").proxy_for("http://models.example/v1/x")[0]


def test_the_span_exporter_gets_the_same_decision_as_one_url_with_its_credentials() -> None:
    # requests (the OTLP exporter's) takes a proxy as one URL, the credentials in it.
    egress = Egress(https_proxy="http://user:pw@proxy.corp:3128", http_proxy=PROXY, no_proxy="collector.corp")
    assert egress.proxy_url("https://otlp.vendor.example/v1/traces") == "http://user:pw@proxy.corp:3128"
    assert egress.proxy_url("http://otel.example:4318/v1/traces") == PROXY
    assert egress.proxy_url("http://collector.corp:4318/v1/traces") is None
    assert egress.proxy_url("http://127.0.0.1:4318/v1/traces") is None  # loopback: never proxied
    assert egress.proxy_url("http://localhost:4318/v1/traces") is None
