"""One master of a Redis Cluster down: only the tenants whose keys it holds feel it (SPEC §4).

The cluster keeps its other masters serving (`cluster-require-full-coverage no`, what an
operator sets for this; with Redis' default every master refuses every key once one is
marked failed, and there is nothing a client can do about it)."""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from ..conftest import GatewayFactory
from ..harness import Gateway, Mock, RedisCluster, RedisServer, http_get, wait_until

CHAT = "/v1/chat/completions"
BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "ping"}]}


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[RedisCluster]:
    cluster = RedisCluster(tmp_path, full_coverage=False)
    yield cluster
    cluster.stop()


def tenant_on(cluster: RedisCluster, node: RedisServer, prefix: str) -> str:
    """A tenant whose request counter `quota:<tenant>` lives on `node`."""
    return next(f"{prefix}{i}" for i in range(1000) if cluster.node_of(f"quota:{prefix}{i}") is node)


def counted(cluster: RedisCluster, tenant: str) -> int:
    key = f"quota:{tenant}"
    return int(cluster.node_of(key).cli("GET", key) or 0)


async def round_of(session: aiohttp.ClientSession, gateway: Gateway, tenants: list[str]) -> list[int]:
    """One request per tenant, all at once (so the gateway batches them together)."""

    async def one(tenant: str) -> int:
        async with session.post(gateway.url + CHAT, json=BODY, headers={"X-Api-Key": tenant}) as response:
            await response.read()
            return response.status

    return list(await asyncio.gather(*(one(tenant) for tenant in tenants)))


@pytest.mark.parametrize("fail_mode", ["closed", "open"])
async def test_a_dead_master_fails_only_its_own_tenants_and_service_resumes_when_it_returns(
    start_gateway: GatewayFactory, cluster: RedisCluster, mock: Mock, fail_mode: str
) -> None:
    gateway = start_gateway(
        REDIS_URL=cluster.url, REDIS_CLUSTER="true", QUOTA_FAIL_MODE=fail_mode, DEFAULT_QUOTA="100000"
    )
    first, second, dead = cluster.nodes
    healthy = [tenant_on(cluster, first, "a"), tenant_on(cluster, second, "b")]
    doomed = tenant_on(cluster, dead, "c")
    tenants = [*healthy, doomed]
    served: collections.Counter[str] = collections.Counter()
    async with aiohttp.ClientSession() as session:
        assert await round_of(session, gateway, tenants) == [200, 200, 200]
        served.update(tenants)

        dead.kill()
        # Past the cluster's node timeout (2 s), so the other masters have marked it failed too.
        doomed_statuses: collections.Counter[int] = collections.Counter()
        deadline = time.monotonic() + 3.5
        while time.monotonic() < deadline:
            *healthy_statuses, doomed_status = await round_of(session, gateway, tenants)
            assert healthy_statuses == [200, 200], f"a tenant on a live master was refused: {healthy_statuses}"
            served.update(healthy)
            doomed_statuses[doomed_status] += 1
            await asyncio.sleep(0.05)
        # The failure behaviour, for the dead master's tenant only.
        assert set(doomed_statuses) == {503 if fail_mode == "closed" else 200}, doomed_statuses
        assert http_get(gateway.port, "/readyz")[0] == 200  # still in service: it serves the others
        for tenant in healthy:  # every request served counted once, none twice, none lost
            assert counted(cluster, tenant) == served[tenant]

        dead.start()  # empty (no persistence): its counters start again
        wait_until(cluster.ok, timeout=20, what="the cluster ok again")
        since_restart = 0
        deadline = time.monotonic() + 10
        while True:  # no restart of the gateway: the doomed tenant is served again by itself
            *healthy_statuses, doomed_status = await round_of(session, gateway, tenants)
            assert healthy_statuses == [200, 200]
            served.update(healthy)
            if doomed_status == 200 and fail_mode == "closed":
                since_restart += 1
            if since_restart >= 3 or (fail_mode == "open" and counted(cluster, doomed) >= 3):
                break
            assert time.monotonic() < deadline, "the restarted master's tenant was not served again"
            await asyncio.sleep(0.05)
        if fail_mode == "closed":  # each request it was served after the restart counted once
            assert counted(cluster, doomed) == since_restart
        for tenant in healthy:
            assert counted(cluster, tenant) == served[tenant]
