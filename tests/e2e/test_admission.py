"""Admission end to end: quotas (memory, Redis, Cluster), rate limit, shedding, tenant keys."""

from __future__ import annotations

import asyncio
import collections
import gzip
import hashlib
import json
import os
import re
import signal
import time

import aiohttp
import openai
import pytest

from ..conftest import GatewayFactory
from ..harness import Gateway, Mock, RedisCluster, RedisServer, wait_until

CHAT = "/v1/chat/completions"
BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "ping"}], "stream": False}


async def call(
    session: aiohttp.ClientSession,
    gateway: Gateway,
    key: str | None = "demo",
    body: dict[str, object] = BODY,
    **headers: str,
) -> tuple[int, dict[str, str], dict[str, object]]:
    if key is not None:
        headers["X-Api-Key"] = key
    async with session.post(gateway.url + CHAT, json=body, headers=headers) as response:
        data = await response.read()
        parsed = json.loads(data) if data.startswith(b"{") else {}
        return response.status, {k.lower(): v for k, v in response.headers.items()}, parsed


async def statuses(
    gateways: list[Gateway], n: int, parallel: int, key: str = "demo", **headers: str
) -> collections.Counter[int]:
    semaphore = asyncio.Semaphore(parallel)
    async with aiohttp.ClientSession() as session:

        async def one(i: int) -> int:
            async with semaphore:
                return (await call(session, gateways[i % len(gateways)], key, **headers))[0]

        return collections.Counter(await asyncio.gather(*(one(i) for i in range(n))))


async def test_quota_of_5_then_429_with_openai_headers(start_gateway: GatewayFactory, mock: Mock) -> None:
    gateway = start_gateway(DEFAULT_QUOTA="5", QUOTA_WINDOW_SECS="60")
    async with aiohttp.ClientSession() as session:
        results = [await call(session, gateway) for _ in range(7)]
    assert [status for status, _, _ in results] == [200] * 5 + [429] * 2
    _status, headers, body = results[0]
    assert headers["x-ratelimit-limit-requests"] == "5"
    assert headers["x-ratelimit-remaining-requests"] == "4"
    assert headers["x-ratelimit-reset-requests"].endswith("s")
    _, headers, body = results[5]
    assert body["error"] == {
        "message": "quota exceeded (limit=5)",
        "type": "insufficient_quota",
        "code": "quota_exceeded",
    }  # type: ignore[comparison-overlap]
    assert 1 <= int(headers["retry-after"]) <= 60
    assert 0 < int(headers["retry-after-ms"]) <= 60_000
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert len(mock.requests()) == 5  # rejected requests never reach the upstream


def test_sdk_raises_rate_limit_error_on_quota(start_gateway: GatewayFactory, mock: Mock) -> None:
    gateway = start_gateway(DEFAULT_QUOTA="1")
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="sdk-tenant", max_retries=0)
    client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.response.headers["retry-after"]


async def test_tenant_overrides(start_gateway: GatewayFactory, mock: Mock) -> None:
    gateway = start_gateway(DEFAULT_QUOTA="100", TENANT_QUOTAS="tenantA=5,tenantB=8")
    assert await statuses([gateway], 7, 1, key="tenantA") == {200: 5, 429: 2}
    assert await statuses([gateway], 10, 1, key="tenantB") == {200: 8, 429: 2}


@pytest.mark.serial  # asserts a time: run alone, not beside another worker
async def test_rate_limit_burst(start_gateway: GatewayFactory, mock: Mock) -> None:
    gateway = start_gateway(RPS="5", BURST="10")
    started = time.monotonic()
    counts = await statuses([gateway], 50, 20, key="ratelimit")
    refilled = int((time.monotonic() - started) * 5) + 1
    assert counts[200] + counts[429] == 50
    assert 10 <= counts[200] <= 10 + refilled  # the burst, plus what refills during the run
    async with aiohttp.ClientSession() as session:
        status, headers, body = await call(session, gateway, "ratelimit")
    assert status == 429 and int(headers["retry-after"]) >= 1
    assert body["error"]["code"] == "rate_limit_exceeded"  # type: ignore[index]
    assert "ratelimit_block_total" in gateway.metrics()


async def test_rate_limit_without_key_is_per_ip_and_path(start_gateway: GatewayFactory, mock: Mock) -> None:
    gateway = start_gateway(RPS="1", BURST="2")
    async with aiohttp.ClientSession() as session:
        got = [(await call(session, gateway, key=None))[0] for _ in range(4)]
        assert got == [200, 200, 429, 429]
        assert (await call(session, gateway, key="has-a-key"))[0] == 200


async def test_load_shedding(start_gateway: GatewayFactory, mock: Mock) -> None:
    gateway = start_gateway(MAX_CONCURRENCY="1")
    counts = await statuses([gateway], 20, 20, key="stress", **{"x-stainless-mock-latency-ms": "300"})
    assert counts[503] >= 15 and counts[200] >= 1
    async with aiohttp.ClientSession() as session:
        status, _headers, _body = await call(session, gateway, "stress", **{"x-stainless-mock-latency-ms": "300"})
    assert status == 200
    metrics = gateway.metrics()
    assert 'cb_events_total{event="load_shed"}' in metrics


async def test_a_stream_holds_its_slot_until_the_last_byte(start_gateway: GatewayFactory, mock: Mock) -> None:
    gateway = start_gateway(MAX_CONCURRENCY="1")
    stream_body = dict(BODY, stream=True)
    async with aiohttp.ClientSession() as session:
        async with session.post(
            gateway.url + CHAT,
            json=stream_body,
            headers={"x-stainless-mock-chunk-delay-ms": "200", "x-stainless-mock-reply": "a b c d"},
        ) as streaming:
            assert streaming.status == 200
            await streaming.content.readline()  # headers and a first event are out
            status, headers, body = await call(session, gateway)
            assert status == 503
            assert body["error"] == {
                "message": "server overloaded",
                "type": "server_error",
                "code": "server_overloaded",
            }  # type: ignore[comparison-overlap]
            assert headers["retry-after"] == "1"
            await streaming.read()
        assert (await call(session, gateway))[0] == 200


async def test_two_gateways_on_one_redis_hold_the_quota_exactly(
    start_gateway: GatewayFactory, redis_server: RedisServer, mock: Mock
) -> None:
    env = {"REDIS_URL": redis_server.url, "DEFAULT_QUOTA": "10"}
    gateways = [start_gateway(**env), start_gateway(**env)]
    counts = await statuses(gateways, 60, 60, key="shared")
    assert counts == {200: 10, 429: 50}
    assert redis_server.cli("GET", "quota:shared") == "60"
    assert 0 < int(redis_server.cli("TTL", "quota:shared")) <= 60


async def test_two_gateways_on_a_redis_cluster_hold_the_quota_exactly(
    start_gateway: GatewayFactory, redis_cluster: RedisCluster, mock: Mock
) -> None:
    env = {"REDIS_URL": redis_cluster.url, "REDIS_CLUSTER": "true", "DEFAULT_QUOTA": "10"}
    gateways = [start_gateway(**env), start_gateway(**env)]
    counts = await statuses(gateways, 60, 60, key="clustered")
    assert counts == {200: 10, 429: 50}
    assert redis_cluster.get("quota:clustered") == "60"


async def test_redis_outage_fail_open_then_recovery(
    start_gateway: GatewayFactory, redis_server: RedisServer, mock: Mock
) -> None:
    gateway = start_gateway(
        REDIS_URL=redis_server.url, DEFAULT_QUOTA="3", QUOTA_FAIL_MODE="open", STORE_TIMEOUT_MS="200"
    )
    assert await statuses([gateway], 4, 1, key="outage") == {200: 3, 429: 1}
    redis_server.kill()
    assert await statuses([gateway], 5, 1, key="outage") == {200: 5}  # admitted while the store is down
    assert 'cb_events_total{event="store_error"} 0' not in gateway.metrics()
    redis_server.start()  # an empty Redis: the window starts again

    async def enforced() -> bool:
        return (await statuses([gateway], 4, 1, key="outage"))[429] >= 1

    deadline = time.monotonic() + 8
    while not await enforced():
        assert time.monotonic() < deadline, "quota not enforced again after Redis came back"
        await asyncio.sleep(0.2)


async def test_redis_outage_fail_closed(start_gateway: GatewayFactory, redis_server: RedisServer, mock: Mock) -> None:
    gateway = start_gateway(REDIS_URL=redis_server.url, QUOTA_FAIL_MODE="closed", STORE_TIMEOUT_MS="200")
    async with aiohttp.ClientSession() as session:
        assert (await call(session, gateway))[0] == 200
        async with session.get(gateway.url + "/readyz") as r:
            assert r.status == 200
        redis_server.kill()
        status, headers, body = await call(session, gateway)
        assert status == 503 and headers["retry-after"] == "1"  # the store's back-off
        assert body["error"]["code"] == "store_unavailable"  # type: ignore[index]
        async with session.get(gateway.url + "/readyz") as r:
            assert r.status == 503
        redis_server.start()
        deadline = time.monotonic() + 8
        while (await call(session, gateway))[0] != 200:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.2)
        async with session.get(gateway.url + "/readyz") as r:
            assert r.status == 200
    assert len(mock.requests()) == 2  # nothing was forwarded while closed


async def test_keyed_mode(start_gateway: GatewayFactory, redis_server: RedisServer, mock: Mock) -> None:
    beta_digest = hashlib.sha256(b"sk-beta-secret-2").hexdigest()
    gateway = start_gateway(
        TENANT_KEYS=f"acme=sk-acme-secret-1,beta=sha256:{beta_digest}",
        REDIS_URL=redis_server.url,
        RPS="1",
        BURST="1",
        DEFAULT_QUOTA="100",
    )
    async with aiohttp.ClientSession() as session:
        # Unknown or missing keys: 401 before rate limit and quota, however many times.
        for _ in range(5):
            status, _, body = await call(session, gateway, "sk-wrong-guess")
            assert status == 401
            assert body["error"]["message"] == "invalid api key"  # type: ignore[index]
        assert (await call(session, gateway, key=None))[0] == 401
        assert (await call(session, gateway, key=None, Authorization="Bearer sk-wrong"))[0] == 401
        # Known keys, by X-Api-Key or bearer token; sha256: entries too.
        assert (await call(session, gateway, "sk-acme-secret-1"))[0] == 200
        assert (await call(session, gateway, key=None, Authorization="Bearer sk-beta-secret-2"))[0] == 200
        status, _, body = await call(session, gateway, "sk-acme-secret-1")  # RPS=1 BURST=1
        assert status == 429
    assert redis_server.cli("GET", "quota:acme") == "1"
    assert redis_server.cli("GET", "quota:beta") == "1"
    keys = redis_server.cli("--scan")
    metrics = gateway.metrics()
    everything = keys + metrics + gateway.process.output() + gateway.process.errors() + json.dumps(mock.requests())
    for secret in ("sk-acme-secret-1", "sk-beta-secret-2", "sk-wrong-guess"):
        assert secret not in everything
    assert "tenant=" not in metrics and "acme" not in metrics  # tenants are never labels
    assert mock.requests() and len(mock.requests()) == 2


async def test_hashed_identifiers(start_gateway: GatewayFactory, redis_server: RedisServer, mock: Mock) -> None:
    gateway = start_gateway(REDIS_URL=redis_server.url, HASH_IDENTIFIERS="true", HASH_SECRET="pepper")
    async with aiohttp.ClientSession() as session:
        assert (await call(session, gateway, "visible-tenant-name"))[0] == 200
    every = redis_server.cli("--scan").split()
    assert all("visible-tenant-name" not in key + redis_server.cli("GET", key) for key in every)
    keys = [key for key in every if not key.startswith("call:")]  # the store's own calls (stores/redis.py)
    assert len(keys) == 1 and keys[0].startswith("quota:h:")
    logs = wait_until(gateway.log_lines, what="log lines")
    assert all("visible-tenant-name" not in json.dumps(line) for line in logs)
    # stable across restarts and replicas: a second process uses the same identifier
    other = start_gateway(REDIS_URL=redis_server.url, HASH_IDENTIFIERS="true", HASH_SECRET="pepper")
    async with aiohttp.ClientSession() as session:
        await call(session, other, "visible-tenant-name")
    assert redis_server.cli("GET", keys[0]) == "2"


async def test_workers_share_the_port_and_the_redis_quota(
    start_gateway: GatewayFactory, redis_server: RedisServer, mock: Mock
) -> None:
    gateway = start_gateway(WORKERS="2", REDIS_URL=redis_server.url, DEFAULT_QUOTA="10")
    counts = await statuses([gateway], 60, 30, key="workers")
    assert counts == {200: 10, 429: 50}
    assert redis_server.cli("GET", "quota:workers") == "60"
    # Request ids stay unique across workers: each has its own prefix (one connection per
    # request here, so the kernel spreads them over both workers).
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        results = await asyncio.gather(*(call(session, gateway, "workers") for _ in range(40)))
    ids = [headers["x-request-id"] for _, headers, _ in results]
    assert len(set(ids)) == len(ids)
    prefixes = {request_id[:-8] for request_id in ids}
    assert len(prefixes) == 2, f"one worker answered all: {gateway.process.errors()}"  # each has its own prefix
    gateway.process.signal(signal.SIGTERM)  # the parent forwards it to every worker
    assert await asyncio.to_thread(gateway.process.wait, 15) == 0


async def test_a_worker_that_dies_is_logged_and_replaced(
    start_gateway: GatewayFactory, redis_server: RedisServer, mock: Mock
) -> None:
    # A worker killed (the OOM killer, a crash) is replaced; the port keeps WORKERS processes
    # (found by a black-box review: the parent noticed nothing, and said nothing).
    gateway = start_gateway(WORKERS="2", REDIS_URL=redis_server.url)
    pids = [int(pid) for pid in re.findall(r"serving on \S+ \(pid (\d+)\)", gateway.process.errors())]
    assert len(pids) == 2
    os.kill(pids[0], signal.SIGKILL)
    await asyncio.to_thread(
        wait_until,
        lambda: gateway.process.errors().count("serving on") == 3,
        10.0,
        0.05,
        "a new worker serving",
    )
    assert f"worker {pids[0]} was killed by signal 9; starting another" in gateway.process.errors()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        results = await asyncio.gather(*(call(session, gateway, "after") for _ in range(20)))
    assert {status for status, _, _ in results} == {200}
    gateway.process.signal(signal.SIGTERM)
    assert await asyncio.to_thread(gateway.process.wait, 15) == 0


def test_workers_without_redis_refuse_to_start(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway(wait=False, WORKERS="2")
    assert gateway.process.wait(15) == 2
    assert "WORKERS" in gateway.process.errors()


async def test_forwarded_for_is_believed_only_from_trusted_proxies(start_gateway: GatewayFactory, mock: Mock) -> None:
    async def anonymous_statuses(gateway: Gateway) -> list[int]:
        async with aiohttp.ClientSession() as session:
            return [
                (await call(session, gateway, key=None, **{"X-Forwarded-For": f"203.0.113.{i}"}))[0] for i in range(3)
            ]

    # Behind a trusted proxy each client address has its own bucket (BURST=1 each)...
    trusted = start_gateway(RPS="0.01", BURST="1", TRUSTED_PROXIES="127.0.0.1")
    assert await anonymous_statuses(trusted) == [200, 200, 200]
    # ...otherwise the header is ignored and every request is the peer's (127.0.0.1).
    untrusted = start_gateway(RPS="0.01", BURST="1")
    assert await anonymous_statuses(untrusted) == [200, 429, 429]
    # One client behind Azure Application Gateway, which writes its address with each connection's
    # source port: one bucket, not one per connection (each had a fresh BURST).
    async with aiohttp.ClientSession() as session:
        ported = [
            (await call(session, trusted, key=None, **{"X-Forwarded-For": hop}))[0]
            for hop in ("198.51.100.7:50001", "198.51.100.7:50002", "[2001:db8::7]:50001", "[2001:db8::7]:50002")
        ]
    assert ported == [200, 429, 200, 429]


async def test_encoded_bodies_through_the_process(start_gateway: GatewayFactory, mock: Mock) -> None:
    """As served by server.py: gzip is decoded once (by the gateway, not by aiohttp as well), and
    a body that does not decode is a 400 before any quota is spent, with no traceback logged."""
    gateway = start_gateway(DEFAULT_QUOTA="1")
    plain = json.dumps(dict(BODY, model="gzipped-model")).encode()
    async with aiohttp.ClientSession() as session:

        async def post(data: bytes, coding: str) -> tuple[int, dict[str, object]]:
            headers = {"X-Api-Key": "enc", "Content-Type": "application/json", "Content-Encoding": coding}
            async with session.post(gateway.url + CHAT, data=data, headers=headers) as r:
                return r.status, await r.json()

        for data, coding in ((b"not gzip", "gzip"), (plain, "br"), (gzip.compress(plain)[:-5], "gzip")):
            status, body = await post(data, coding)
            assert status in (400, 415) and body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
        status, body = await post(gzip.compress(plain), "gzip")
        assert status == 200, body
    assert [seen["body"]["model"] for seen in mock.requests()] == ["gzipped-model"]
    assert "Traceback" not in gateway.process.errors()


async def test_a_malformed_request_spends_no_quota_on_any_route(start_gateway: GatewayFactory, mock: Mock) -> None:
    # Each route's own checks of the body run before the rate limit and the quota: a request
    # refused as malformed (400) costs nothing, so it can never turn into a 429 either.
    gateway = start_gateway(DEFAULT_QUOTA="2", RPS="0")
    bad = [
        ("/v1/responses", {"model": "m", "input": 5}),
        ("/v1/embeddings", {"model": "m"}),
        (CHAT, {"model": "m", "messages": "not a list"}),
        (CHAT, {"model": "m", "messages": [], "logprobs": True}),  # redaction on: logprobs refused
        ("/v1/messages", {"model": "m", "max_tokens": 5}),
    ]
    async with aiohttp.ClientSession() as session:
        for _ in range(2):
            for path, body in bad:
                async with session.post(gateway.url + path, json=body, headers={"X-Api-Key": "demo"}) as response:
                    assert response.status == 400, (path, body, await response.text())
        assert [(await call(session, gateway))[0] for _ in range(3)] == [200, 200, 429]
